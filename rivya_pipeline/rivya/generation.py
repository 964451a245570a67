"""Building a generation request that Rivya will accept, and refusing one it would not.

Every rule is checked here, before any HTTP call, so bad input never costs a credit. Params are
validated against the model's catalog entry (`ModelInfo`, from GET /models); kling-3-0's entry is
built in, so a brief for the default model is checked with no network at all.
"""

from __future__ import annotations

import functools
import hashlib
import json
import stat as stat_mode
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filetype
from pydantic import BaseModel, ConfigDict

from .errors import RequestValidationError
from .models import FileObject, ModelInfo, ModelParam

DEFAULT_MODEL = "kling-3-0"

KLING_3_0 = ModelInfo(
    id="kling-3-0",
    display_name="Kling 3.0",
    category="video",
    base_credits=90,
    billing_type="FIXED",
    max_prompt_length=2000,
    api_status="available",
    params=[
        ModelParam(key="mode", default="pro", options=["std", "pro"]),
        ModelParam(key="multi_shots", default="false", options=["false", "true"]),
        ModelParam(key="duration", default="5", options=[str(s) for s in range(3, 16)]),
        ModelParam(key="sound", default="false", options=["false", "true"]),
        ModelParam(key="aspect_ratio", default="16:9", options=["16:9", "9:16", "1:1"]),
    ],
)
BUILTIN_MODELS = {KLING_3_0.id: KLING_3_0}


@dataclass(frozen=True)
class ReferencePolicy:
    """What a model accepts as reference media (kling-3-0: up to 2 images of 10 MB)."""

    max_items: int
    max_bytes: int
    mime_types: frozenset[str]
    kind: str = "image"


IMAGE_REFERENCES = ReferencePolicy(
    max_items=2, max_bytes=10_000_000, mime_types=frozenset({"image/jpeg", "image/png", "image/webp"})
)
REFERENCE_POLICIES = {KLING_3_0.id: IMAGE_REFERENCES}


class ReferenceImage(BaseModel):
    """A local reference image that passed the Files API's rules (type judged by magic bytes)."""

    model_config = ConfigDict(frozen=True)

    path: Path
    name: str
    mime_type: str
    size_bytes: int
    sha256: str

    @classmethod
    def from_path(cls, path: Path, *, field: str, policy: ReferencePolicy = IMAGE_REFERENCES) -> ReferenceImage:
        signature = file_signature(path)
        if signature is None:
            raise RequestValidationError(field, f"file not found: {path}")
        size = signature[0]
        if size == 0:
            raise RequestValidationError(field, "file is empty")
        if size > policy.max_bytes:
            raise RequestValidationError(field, f"{size:,} bytes is over the limit of {policy.max_bytes:,} bytes")
        guessed, digest = _sniffed_and_hashed(path, signature)
        if guessed not in policy.mime_types:
            allowed = ", ".join(sorted(policy.mime_types))
            raise RequestValidationError(
                field, f"content is {guessed or 'not a recognised image'}, must be one of {allowed}"
            )
        return cls(path=path, name=path.name, mime_type=guessed, size_bytes=size, sha256=digest)


FileSignature = tuple[int, int, int, int]


def file_signature(path: Path) -> FileSignature | None:
    """Size, inode, mtime and ctime (ns) of a regular file, None if there is none: any write or replacement of the
    file changes one of them (ctime even when a writer restores the mtime)."""
    try:
        found = path.stat()
    except OSError:
        return None
    if not stat_mode.S_ISREG(found.st_mode):
        return None
    return found.st_size, found.st_ino, found.st_mtime_ns, found.st_ctime_ns


@functools.lru_cache(maxsize=4096)
def _sniffed_and_hashed(path: Path, signature: FileSignature) -> tuple[str | None, str]:
    """(type by magic bytes, SHA-256) of the file as it is at `signature`: an image that many briefs reference is
    read once per change, not once per brief and per folder reading."""
    return filetype.guess_mime(str(path)), hashlib.sha256(path.read_bytes()).hexdigest()


def validate_prompt(spec: ModelInfo, prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise RequestValidationError("prompt", f"must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise RequestValidationError("prompt", "must not be empty")
    limit = spec.max_prompt_length
    if limit is not None and len(prompt) > limit:
        raise RequestValidationError("prompt", f"{len(prompt)} characters is over the limit of {limit}")
    return prompt


def _as_option(value: Any) -> str | None:
    """Natural YAML values (5, false) to the strings Rivya's select params require."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return str(value)
    return None


def _normalize_param(param: ModelParam, value: Any) -> Any:
    field = f"params.{param.key}"
    if param.type == "select":
        options = [str(o) for o in param.options or []]
        as_text = _as_option(value)
        if as_text not in options:
            raise RequestValidationError(field, f"must be one of {', '.join(options)} (got {value!r})")
        return as_text
    if param.type == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestValidationError(field, f"must be a number (got {value!r})")
        if (param.min is not None and value < param.min) or (param.max is not None and value > param.max):
            raise RequestValidationError(field, f"must be between {param.min} and {param.max} (got {value!r})")
        return value
    if not isinstance(value, str):
        raise RequestValidationError(field, f"must be text (got {value!r})")
    return value


def normalize_params(spec: ModelInfo, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate natural params against the catalog entry; return every param in its API form."""
    params = dict(params or {})
    known = {p.key for p in spec.params}
    for key in params:
        if key not in known:
            raise RequestValidationError(
                f"params.{key}", f"unknown parameter for {spec.id} (known: {', '.join(sorted(known))})"
            )
    normalized: dict[str, Any] = {}
    for param in spec.params:
        if param.key in params:
            normalized[param.key] = _normalize_param(param, params[param.key])
        elif param.default is not None:
            normalized[param.key] = _normalize_param(param, param.default)
        elif param.required:
            raise RequestValidationError(f"params.{param.key}", f"is required by {spec.id}")
    return normalized


class GenerationRequest(BaseModel):
    """A validated request: what will be sent, what it costs, and its idempotency key."""

    model_config = ConfigDict(frozen=True)

    model: str
    prompt: str
    params: dict[str, Any]
    references: tuple[ReferenceImage, ...] = ()
    price_credits: int
    regenerate: int = 0

    @classmethod
    def build(
        cls,
        *,
        prompt: Any,
        params: Mapping[str, Any] | None = None,
        reference_paths: Sequence[Path] = (),
        spec: ModelInfo = KLING_3_0,
        regenerate: int = 0,
    ) -> GenerationRequest:
        if spec.api_status not in (None, "available"):
            raise RequestValidationError("model", f"{spec.id} is {spec.api_status}, not available in the API")
        if spec.base_credits is None:
            raise RequestValidationError("model", f"{spec.id} has no published price; refusing to spend blind")
        policy = REFERENCE_POLICIES.get(spec.id, IMAGE_REFERENCES)
        if len(reference_paths) > policy.max_items:
            raise RequestValidationError(
                "references", f"{len(reference_paths)} given, {spec.id} accepts at most {policy.max_items}"
            )
        references = tuple(
            ReferenceImage.from_path(Path(p), field=f"references[{i}]", policy=policy)
            for i, p in enumerate(reference_paths)
        )
        return cls(
            model=spec.id,
            prompt=validate_prompt(spec, prompt),
            params=normalize_params(spec, params),
            references=references,
            price_credits=spec.base_credits,
            regenerate=regenerate,
        )

    def idempotency_key(self) -> str:
        """Derived from what is asked (never from when or by whom), so every retry and re-run reuses it.

        A deliberate regeneration bumps `regenerate` and so gets a new key.
        """
        identity = {
            "model": self.model,
            "prompt": self.prompt,
            "params": self.params,
            "references": [r.sha256 for r in self.references],
            "regenerate": self.regenerate,
        }
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "rvp1-" + hashlib.sha256(canonical.encode()).hexdigest()

    def api_body(self, uploads: Sequence[FileObject], client_request_id: str | None = None) -> dict[str, Any]:
        """The JSON body of POST /generations; references go in params.referenceMediaItems (no `files`)."""
        if len(uploads) != len(self.references):
            raise RequestValidationError("references", "every reference must be uploaded before submitting")
        params: dict[str, Any] = dict(self.params)
        if uploads:
            params["referenceMediaItems"] = [
                {"url": f.url, "kind": "image", "name": ref.name, "mimeType": ref.mime_type}
                for f, ref in zip(uploads, self.references, strict=True)
            ]
        body: dict[str, Any] = {"model": self.model, "prompt": self.prompt, "params": params}
        if client_request_id:
            body["client_request_id"] = client_request_id[:128]
        return body
