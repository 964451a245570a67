"""The media host: a separate origin (like Rivya's CDN) serving result videos and uploaded files without
auth. It records every request that wrongly carries an Authorization header (never the value) and, by
default, refuses it, so a client that leaks its API key to this host is caught."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from .faults import applied_fault
from .state import EmulatorState
from .video import iter_padded, padded_size


def build_media_app(state: EmulatorState) -> Starlette:
    async def guarded(request: Request) -> Response:
        has_authorization = "authorization" in request.headers
        state.record_media_request(request.url.path, has_authorization)
        rule = state.faults.take("media")
        injected = await applied_fault(rule)
        if injected is not None:
            return injected
        if has_authorization and state.config.reject_authorized_media:
            return PlainTextResponse("This host takes no Authorization header.", status_code=403)
        if state.config.media_redirect_to:
            return RedirectResponse(state.config.media_redirect_to, status_code=302)
        pace = rule.bytes_per_second if rule is not None and rule.kind == "trickle" else None
        if "task_id" in request.path_params:
            return await result_video(request.path_params["task_id"], pace)
        return uploaded_file(request.path_params["file_id"], pace)

    async def result_video(task_id: str, bytes_per_second: int | None) -> Response:
        shape = state.result_video(task_id)
        if shape is None:
            return PlainTextResponse("Not Found", status_code=404)
        video = await run_in_threadpool(shape.encode, state.config.video_fps)
        total_size = padded_size(len(video), state.config.result_min_bytes)
        return StreamingResponse(
            served(iter_padded(video, total_size), bytes_per_second),
            media_type="video/mp4",
            headers={"Content-Length": str(total_size)},
        )

    async def served(chunks: Iterator[bytes], bytes_per_second: int | None) -> AsyncIterator[bytes]:
        """The body, counted into `media_bytes_served` as it goes out; paced when a `trickle` fault applies,
        in slices of a tenth of a second, so a test can watch a download progress and kill it half-way."""
        for chunk in chunks:
            step = max(1, bytes_per_second // 10 if bytes_per_second else len(chunk))
            for start in range(0, len(chunk), step):
                piece = chunk[start : start + step]
                if bytes_per_second:  # before the bytes go out, so the last one arrives no sooner than the pace
                    await asyncio.sleep(len(piece) / bytes_per_second)
                yield piece
                state.record_media_bytes(len(piece))

    def uploaded_file(file_id: str, bytes_per_second: int | None) -> Response:
        stored = state.file_content(file_id)
        if stored is None:
            return PlainTextResponse("Not Found", status_code=404)
        return StreamingResponse(
            served(iter([stored.content]), bytes_per_second),
            media_type=stored.mime_type,
            headers={"Content-Length": str(len(stored.content))},
        )

    routes = [
        Route("/media/{task_id}.mp4", guarded, methods=["GET"]),
        Route("/files/{file_id}", guarded, methods=["GET"]),
    ]
    return Starlette(routes=routes)
