"""Rivya's request rules, applied strictly so that a client mistake fails here as it would at Rivya:
params are strings from the catalog's options, no top-level `files`, prompt length in characters,
reference media only as files this account uploaded, uploads typed by magic bytes."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import av
import filetype
from av.error import FFmpegError

from .catalog import CATALOG, REFERENCE_ITEMS_PARAM, UPLOAD_RULES, ModelSpec, ParamSpec
from .errors import ApiError
from .records import StoredFile

GENERATION_FIELDS = frozenset({"model", "prompt", "params", "client_request_id"})
REFERENCE_ITEM_FIELDS = frozenset({"url", "kind", "name", "mimeType", "durationSeconds", "durationToken"})
UPLOAD_FIELDS = frozenset({"file", "kind", "model", "client_request_id"})
MAX_CLIENT_REQUEST_ID = 128


def _fail(message: str) -> NoReturn:
    raise ApiError("validation_failed", message)


@dataclass(frozen=True)
class GenerationRequest:
    model: ModelSpec
    prompt: str
    params: dict[str, Any]  # catalog defaults applied


def validate_generation(body: Any, owned_file: Callable[[str], StoredFile | None]) -> GenerationRequest:
    """`owned_file(url)` returns the caller's uploaded file with that url, or None."""
    if not isinstance(body, dict):
        _fail("The request body must be a JSON object.")
    if "files" in body:
        _fail("There is no top-level 'files' field; list uploaded files in params.referenceMediaItems.")
    unknown = sorted(set(body) - GENERATION_FIELDS)
    if unknown:
        _fail(f"Unknown fields: {', '.join(unknown)}.")
    model = validate_model_id(body.get("model"))
    if model.api_status != "available":
        _fail(f"Model {model.id} is {model.api_status} and cannot be used through the API.")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        _fail("prompt is required and must be a non-empty string.")
    if len(prompt) > model.max_prompt_length:
        _fail(f"prompt has {len(prompt)} characters; {model.id} accepts at most {model.max_prompt_length}.")
    validate_client_request_id(body.get("client_request_id"))
    params = body.get("params")
    params = {} if params is None else params
    if not isinstance(params, dict):
        _fail("params must be an object.")
    return GenerationRequest(model=model, prompt=prompt, params=_resolve_params(params, model, owned_file))


def validate_model_id(model_id: Any) -> ModelSpec:
    if not isinstance(model_id, str) or model_id not in CATALOG:
        _fail(f"model must be one of: {', '.join(CATALOG)}.")
    return CATALOG[model_id]


def validate_client_request_id(value: Any) -> None:
    if value is not None and (not isinstance(value, str) or len(value) > MAX_CLIENT_REQUEST_ID):
        _fail(f"client_request_id must be a string of at most {MAX_CLIENT_REQUEST_ID} characters.")


def _resolve_params(
    params: dict[str, Any], model: ModelSpec, owned_file: Callable[[str], StoredFile | None]
) -> dict[str, Any]:
    resolved: dict[str, Any] = {}
    for key, value in params.items():
        if key == REFERENCE_ITEMS_PARAM:
            resolved[key] = _validate_references(value, model, owned_file)
            continue
        spec = model.param(key)
        if spec is None:
            known = ", ".join([spec.key for spec in model.params] + [REFERENCE_ITEMS_PARAM])
            _fail(f"Unknown param {key!r} for {model.id}; known params: {known}.")
        _validate_param_value(spec, value)
        resolved[key] = value
    for spec in model.params:
        if spec.key in resolved:
            continue
        if spec.required and spec.default is None:
            _fail(f"param {spec.key!r} is required for {model.id}.")
        if spec.default is not None:
            resolved[spec.key] = spec.default
    return resolved


def _validate_param_value(spec: ParamSpec, value: Any) -> None:
    if spec.type == "select":
        if not isinstance(value, str) or value not in (spec.options or ()):
            _fail(f"param {spec.key!r} must be one of the strings {list(spec.options or ())}, got {value!r}.")
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(f"param {spec.key!r} must be a number, got {value!r}.")
    if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
        _fail(f"param {spec.key!r} must be between {spec.min} and {spec.max}.")
    if spec.step is not None:
        steps = (value - (spec.min or 0)) / spec.step
        if abs(steps - round(steps)) > 1e-9:
            _fail(f"param {spec.key!r} must be a multiple of {spec.step}.")


def _validate_references(
    items: Any, model: ModelSpec, owned_file: Callable[[str], StoredFile | None]
) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        _fail(f"params.{REFERENCE_ITEMS_PARAM} must be a list.")
    if len(items) > model.max_reference_items:
        _fail(f"{model.id} accepts at most {model.max_reference_items} reference media items.")
    for item in items:
        if not isinstance(item, dict):
            _fail("each reference media item must be an object.")
        unknown = sorted(set(item) - REFERENCE_ITEM_FIELDS)
        if unknown:
            _fail(f"Unknown reference media fields {unknown}; allowed (camelCase): {sorted(REFERENCE_ITEM_FIELDS)}.")
        if item.get("kind") not in model.reference_kinds:
            _fail(f"reference media kind must be one of {list(model.reference_kinds)} for {model.id}.")
        if not isinstance(item.get("url"), str):
            _fail("each reference media item needs a url.")
        stored = owned_file(item["url"])
        if stored is None:
            _fail("reference media url must be the url of a file this account uploaded via /api/v1/files.")
        if stored.kind != item["kind"]:
            _fail(f"reference media kind {item['kind']!r} does not match the uploaded file ({stored.kind}).")
        if "mimeType" in item and item["mimeType"] != stored.mime_type:
            _fail(f"reference media mimeType {item['mimeType']!r} does not match the file ({stored.mime_type}).")
        if "durationToken" in item and item["durationToken"] != stored.duration_token:
            _fail("reference media durationToken does not match the uploaded file.")
    return items


def upload_rules(kind: Any, model_id: Any) -> tuple[str, int, tuple[str, ...]]:
    """(kind, max bytes, accepted MIME types) for this upload; a given model narrows the accepted kinds."""
    if not isinstance(kind, str) or kind not in UPLOAD_RULES:
        _fail(f"kind must be one of: {', '.join(UPLOAD_RULES)}.")
    if model_id is not None and kind not in validate_model_id(model_id).reference_kinds:
        _fail(f"{model_id} does not accept {kind} files.")
    return (kind, *UPLOAD_RULES[kind])


def judge_content(kind: str, content: bytes, accepted: tuple[str, ...]) -> tuple[str, float | None]:
    """MIME type from the file's signature (never its name or declared type), and the duration of
    audio/video, which Rivya reports alongside a duration token."""
    if not content:
        _fail("file is empty.")
    mime_type = filetype.guess_mime(content)
    if mime_type not in accepted:
        _fail(f"file signature says {mime_type or 'unknown type'}; {kind} accepts {', '.join(accepted)}.")
    if kind == "image":
        return mime_type, None
    try:
        with av.open(io.BytesIO(content), mode="r") as container:
            duration = container.duration
    except FFmpegError:
        duration = None
    if not duration:
        _fail(f"could not read the duration of this {kind} file.")
    return mime_type, duration / 1_000_000
