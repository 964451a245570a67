"""The model catalog served by GET /api/v1/models: kling-3-0 exactly as docs/rivya-api.md (section 5) states,
plus models with other param names and prices so a client that hard-codes kling-3-0 gets caught."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGE_MIME_TYPES = ("image/jpeg", "image/png", "image/webp")
VIDEO_MIME_TYPES = ("video/mp4", "video/quicktime", "video/webm")
AUDIO_MIME_TYPES = ("audio/mpeg", "audio/mp4", "audio/wav", "audio/x-wav", "audio/aac", "audio/ogg")
MB = 1_000_000
# kind -> (max bytes, accepted MIME types judged from magic bytes); Rivya's default limits [doc].
UPLOAD_RULES: dict[str, tuple[int, tuple[str, ...]]] = {
    "image": (10 * MB, IMAGE_MIME_TYPES),
    "video": (50 * MB, VIDEO_MIME_TYPES),
    "audio": (10 * MB, AUDIO_MIME_TYPES),
}
REFERENCE_ITEMS_PARAM = "referenceMediaItems"


@dataclass(frozen=True)
class ParamSpec:
    """One entry of a model's `params[]`, in the shape docs/rivya-api.md marks [assumed]."""

    key: str
    type: str = "select"
    default: str | float | None = None
    options: tuple[str, ...] | None = None
    required: bool = False
    min: float | None = None
    max: float | None = None
    step: float | None = None

    def public(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "type": self.type,
            "required": self.required,
            "default": self.default,
            "options": list(self.options) if self.options is not None else None,
            "min": self.min,
            "max": self.max,
            "step": self.step,
        }


@dataclass(frozen=True)
class ModelSpec:
    """A catalog entry; `duration_param`/`aspect_param` (and `mode_param`/`sound_param` where the model has them)
    tell the video maker which params shape the result."""

    id: str
    display_name: str
    base_credits: int
    max_prompt_length: int
    params: tuple[ParamSpec, ...]
    duration_param: str
    aspect_param: str
    mode_param: str | None = None
    sound_param: str | None = None
    reference_kinds: tuple[str, ...] = ("image",)
    max_reference_items: int = 2
    api_status: str = "available"
    category: str = "video"
    notices: tuple[str, ...] = field(default=())

    def param(self, key: str) -> ParamSpec | None:
        return next((spec for spec in self.params if spec.key == key), None)

    def price(self) -> int:
        """Every catalog model bills FIXED: the price does not depend on the params."""
        return self.base_credits

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "display_name": self.display_name,
            "category": self.category,
            "runtime": "async",
            "base_credits": self.base_credits,
            "billing_type": "FIXED",
            "supported_modes": ["text-to-video", "image-to-video"],
            "max_prompt_length": self.max_prompt_length,
            "reference_media": {
                "param": REFERENCE_ITEMS_PARAM,
                "max_items": self.max_reference_items,
                "kinds": list(self.reference_kinds),
                "max_bytes": UPLOAD_RULES["image"][0],
                "mime_types": list(IMAGE_MIME_TYPES),
            },
            "params": [spec.public() for spec in self.params],
            "api_status": self.api_status,
            "api_input_status": self.api_status,
            "supported_api_inputs": ["text", "file"],
            "requires_files_api": True,
            "requires_upload_for_modes": ["image-to-video"],
            "url_input_supported": False,
            "file_kinds": list(self.reference_kinds),
            "chat_capabilities": None,
            "notices": list(self.notices),
        }


def _select(key: str, default: str, options: list[str]) -> ParamSpec:
    return ParamSpec(key=key, default=default, options=tuple(options))


_FLAGS = ["false", "true"]
CATALOG: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        ModelSpec(
            id="kling-3-0",
            display_name="Kling 3.0",
            base_credits=90,
            max_prompt_length=2000,
            duration_param="duration",
            aspect_param="aspect_ratio",
            mode_param="mode",
            sound_param="sound",
            params=(
                _select("mode", "pro", ["std", "pro"]),
                _select("multi_shots", "false", _FLAGS),
                _select("duration", "5", [str(seconds) for seconds in range(3, 16)]),
                _select("sound", "false", _FLAGS),
                _select("aspect_ratio", "16:9", ["16:9", "9:16", "1:1"]),
            ),
        ),
        ModelSpec(
            id="veo3-1-fast",
            display_name="Veo 3.1 Fast",
            base_credits=60,
            max_prompt_length=1000,
            duration_param="duration",
            aspect_param="aspectRatio",
            sound_param="generateAudio",
            max_reference_items=3,
            params=(
                _select("aspectRatio", "16:9", ["16:9", "9:16"]),
                _select("duration", "8", ["4", "6", "8"]),
                _select("generateAudio", "true", _FLAGS),
                ParamSpec(key="seed", type="number", min=0, max=2**31 - 1, step=1),
            ),
        ),
        ModelSpec(
            id="sora-2",
            display_name="Sora 2",
            base_credits=150,
            max_prompt_length=2000,
            duration_param="seconds",
            aspect_param="aspect_ratio",
            api_status="coming_soon",
            notices=("Not yet available through the public API.",),
            params=(
                _select("seconds", "8", ["4", "8", "12"]),
                _select("aspect_ratio", "16:9", ["16:9", "9:16"]),
            ),
        ),
    )
}


def models_listing() -> dict[str, Any]:
    return {"object": "list", "data": [spec.public() for spec in CATALOG.values()]}
