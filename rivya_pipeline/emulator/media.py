"""The media host: a separate origin (like Rivya's CDN) serving result videos and uploaded files without
auth. It records every request that wrongly carries an Authorization header (never the value) and, by
default, refuses it, so a client that leaks its API key to this host is caught."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from .faults import injected_response
from .state import EmulatorState
from .video import encode_mp4, iter_padded, padded_size


def build_media_app(state: EmulatorState) -> Starlette:
    async def guarded(request: Request) -> Response:
        has_authorization = "authorization" in request.headers
        state.record_media_request(request.url.path, has_authorization)
        injected = await injected_response(state.faults, "media")
        if injected is not None:
            return injected
        if has_authorization and state.config.reject_authorized_media:
            return PlainTextResponse("This host takes no Authorization header.", status_code=403)
        if state.config.media_redirect_to:
            return RedirectResponse(state.config.media_redirect_to, status_code=302)
        if "task_id" in request.path_params:
            return await result_video(request.path_params["task_id"])
        return uploaded_file(request.path_params["file_id"])

    async def result_video(task_id: str) -> Response:
        shape = state.result_video(task_id)
        if shape is None:
            return PlainTextResponse("Not Found", status_code=404)
        video = await run_in_threadpool(encode_mp4, *shape, state.config.video_fps)
        total_size = padded_size(len(video), state.config.result_min_bytes)
        if total_size == len(video):
            return Response(video, media_type="video/mp4")
        return StreamingResponse(
            iter_padded(video, total_size), media_type="video/mp4", headers={"Content-Length": str(total_size)}
        )

    def uploaded_file(file_id: str) -> Response:
        stored = state.file_content(file_id)
        if stored is None:
            return PlainTextResponse("Not Found", status_code=404)
        return Response(stored.content, media_type=stored.mime_type)

    routes = [
        Route("/media/{task_id}.mp4", guarded, methods=["GET"]),
        Route("/files/{file_id}", guarded, methods=["GET"]),
    ]
    return Starlette(routes=routes)
