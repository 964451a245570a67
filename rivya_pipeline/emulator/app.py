"""The API host: Rivya Public API v1 routes plus the unauthenticated /_emulator/* control routes that let
another process (a Dagster run, the CLI) inspect and steer the emulator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .catalog import models_listing
from .config import EmulatorConfig, FaultRule
from .errors import ApiError, error_response
from .faults import fault_response, injected_response
from .state import EmulatorState
from .validation import UPLOAD_FIELDS, judge_content, upload_rules, validate_client_request_id

Handler = Callable[[Request], Awaitable[Response]]
_FAULT_RULES = TypeAdapter(list[FaultRule])


class CreditsUpdate(BaseModel):
    account: str
    credits: int


def build_api_app(state: EmulatorState) -> Starlette:
    def api_route(path: str, endpoint_name: str, handler: Handler, method: str = "GET") -> Route:
        """Every API request is counted, delayed by `latency_seconds`, offered to the fault injector, then
        handled; an ApiError becomes the contract's envelope."""

        async def endpoint(request: Request) -> Response:
            state.count_request(endpoint_name)
            if state.config.latency_seconds:
                await asyncio.sleep(state.config.latency_seconds)
            injected = await injected_response(state.faults, endpoint_name)
            if injected is not None:
                return injected
            try:
                return await handler(request)
            except ApiError as error:
                return error_response(error.code, error.message, error.headers)

        return Route(path, endpoint, methods=[method], name=endpoint_name)

    def account_for(request: Request, scope: str) -> str:
        return state.authenticate(request.headers.get("authorization"), scope)

    async def list_models(request: Request) -> Response:
        return JSONResponse(models_listing())

    async def upload_file(request: Request) -> Response:
        account = account_for(request, "files:create")
        try:
            async with request.form(max_files=1, max_fields=len(UPLOAD_FIELDS)) as form:
                unknown = sorted(set(form.keys()) - UPLOAD_FIELDS)
                if unknown:
                    raise ApiError("validation_failed", f"Unknown form fields: {', '.join(unknown)}.")
                upload, kind, model_id = form.get("file"), form.get("kind"), form.get("model")
                validate_client_request_id(form.get("client_request_id"))
                if not isinstance(upload, UploadFile):
                    raise ApiError("validation_failed", "file is required (multipart/form-data field 'file').")
                kind, max_bytes, accepted = upload_rules(kind, model_id)
                content = await upload.read(max_bytes + 1)
                name = upload.filename or "upload"
        except HTTPException as error:
            raise ApiError("validation_failed", f"Malformed multipart body: {error.detail}") from error
        if len(content) > max_bytes:
            raise ApiError("validation_failed", f"{kind} files may be at most {max_bytes:,} bytes.")
        mime_type, duration = await run_in_threadpool(judge_content, kind, content, accepted)
        stored = state.add_file(account, kind, name, mime_type, content, duration)
        return JSONResponse(stored, status_code=201)

    async def get_file(request: Request) -> Response:
        account = account_for(request, "files:read")
        return JSONResponse(state.get_file(account, request.path_params["file_id"]))

    async def create_generation(request: Request) -> Response:
        account = account_for(request, "generations:create")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ApiError("validation_failed", "Send the body as Content-Type: application/json.")
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            raise ApiError("validation_failed", "The body is not valid JSON.") from error
        task, replayed = state.create_generation(account, request.headers.get("idempotency-key"), body)
        if not replayed:
            lost = state.faults.take("create_generation", kind="lost_response")
            if lost is not None:
                return fault_response(lost)
        return JSONResponse(task, status_code=202, headers={"Idempotent-Replayed": "true"} if replayed else None)

    async def get_generation(request: Request) -> Response:
        account = account_for(request, "generations:read")
        return JSONResponse(state.get_generation(account, request.path_params["task_id"]))

    async def get_credits(request: Request) -> Response:
        account = account_for(request, "credits:read")
        return JSONResponse({"current_credits": state.credits(account)})

    async def control_stats(request: Request) -> Response:
        return JSONResponse(state.snapshot())

    async def control_faults(request: Request) -> Response:
        rules = _FAULT_RULES.validate_json(await request.body())
        state.faults.replace(rules)
        return JSONResponse({"faults": len(rules)})

    async def control_reset(request: Request) -> Response:
        body = await request.body()
        state.reset(EmulatorConfig.model_validate_json(body) if body.strip() else state.config)
        return JSONResponse({"reset": True})

    async def control_credits(request: Request) -> Response:
        update = CreditsUpdate.model_validate_json(await request.body())
        state.set_credits(update.account, update.credits)
        return JSONResponse({"account": update.account, "current_credits": update.credits})

    async def invalid_control_body(request: Request, error: Exception) -> Response:
        return JSONResponse({"error": str(error)}, status_code=400)

    async def unknown_route(request: Request, error: Exception) -> Response:
        return error_response("not_found", f"No route {request.method} {request.url.path}.")

    routes = [
        api_route("/api/v1/models", "models", list_models),
        api_route("/api/v1/files", "upload_file", upload_file, method="POST"),
        api_route("/api/v1/files/{file_id}", "get_file", get_file),
        api_route("/api/v1/generations", "create_generation", create_generation, method="POST"),
        api_route("/api/v1/generations/{task_id}", "get_generation", get_generation),
        api_route("/api/v1/credits", "credits", get_credits),
        Route("/_emulator/stats", control_stats),
        Route("/_emulator/faults", control_faults, methods=["POST"]),
        Route("/_emulator/reset", control_reset, methods=["POST"]),
        Route("/_emulator/credits", control_credits, methods=["POST"]),
    ]
    handlers = {404: unknown_route, ValidationError: invalid_control_body}
    return Starlette(routes=routes, exception_handlers=handlers)
