"""Every knob of the emulator, as pydantic models so a YAML/JSON file or an HTTP body can set them."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

ALL_SCOPES: tuple[str, ...] = (
    "models:read",
    "generations:create",
    "generations:read",
    "files:create",
    "files:read",
    "credits:read",
    "webhooks:manage",
    "chat:create",
    "chat:read",
)
DEFAULT_TEST_KEY = "rvya_sk_test_0123456789"
DEFAULT_ACCOUNT = "acct_test"
# A prompt containing this marker always fails, so tests can force the failure path without randomness.
FAIL_MARKER = "[emulator:fail]"

# What a `bad_video` fault (or a prompt holding "[emulator:<fault>]") makes of a task's result video: all black,
# one still frame, an audio track of digital silence, no audio track even when sound was asked for, or a 4:3 frame.
VideoFault = Literal["black", "frozen", "silent", "no_audio", "wrong_aspect"]
VIDEO_FAULTS: tuple[VideoFault, ...] = get_args(VideoFault)


def video_fault_marker(fault: VideoFault) -> str:
    """The prompt marker that gives a task this faulty result video, whatever fault rules are set."""
    return f"[emulator:{fault}]"


# Which requests a fault rule matches: one API endpoint by name, "media" (the media host), "api" (every API
# endpoint, not the media host) or "*" (every API endpoint and the media host).
FaultEndpoint = Literal[
    "*", "api", "models", "upload_file", "get_file", "create_generation", "get_generation", "credits", "media"
]
FaultKind = Literal[
    "rate_limited",
    "server_error",
    "internal_error",
    "public_api_disabled",
    "drop_connection",
    "slow",
    "lost_response",
    "trickle",
    "bad_video",
]


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelt knob in a config file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ApiKeyConfig(_Strict):
    """One API key; keys belong to accounts, and an account owns its wallet, files and tasks."""

    key: str
    account: str = DEFAULT_ACCOUNT
    scopes: list[str] = Field(default_factory=lambda: list(ALL_SCOPES))
    status: Literal["active", "revoked", "expired"] = "active"


class FaultRule(_Strict):
    """One injected failure. Fires by `times` (the next N matching requests), by `rate` (seeded
    probability), during a window of `for_seconds` (an outage), or on every matching request when none is given.
    `endpoint` "*" matches every API endpoint and the media host; "api" every API endpoint but not the media host."""

    endpoint: FaultEndpoint = "*"
    kind: FaultKind
    rate: float | None = Field(default=None, ge=0.0, le=1.0)
    times: int | None = Field(default=None, ge=1)
    for_seconds: float | None = Field(
        default=None,
        gt=0.0,
        description="an outage: fire on every matching request for this many emulated seconds (scaled by "
        "time_scale), from the first matching request that reaches this rule, then never again",
    )
    retry_after: int = Field(default=1, ge=0, description="Retry-After seconds for rate_limited")
    delay: float = Field(default=1.0, ge=0.0, description="seconds to wait for slow, and to stall a lost_response")
    status: int = Field(default=502, ge=500, le=599, description="HTTP status for server_error")
    body: Literal["html", "envelope", "empty"] = Field(
        default="html", description="server_error body: a proxy's HTML page, a Rivya envelope, or nothing"
    )
    lost_as: Literal["internal_error", "drop_connection", "stall"] = Field(
        default="internal_error",
        description="how lost_response loses the answer of a performed create; stall holds it for `delay` "
        "seconds, then drops the connection (a window to kill a client after its create was performed)",
    )
    bytes_per_second: int = Field(
        default=1_000_000, ge=1, description="trickle: pace of a media body, so a client can be killed mid-download"
    )
    video: VideoFault = Field(
        default="black", description="bad_video: what the result video of the task being created is made of"
    )

    @model_validator(mode="after")
    def _endpoint_specific_kinds(self) -> FaultRule:
        if self.kind in ("lost_response", "bad_video") and self.endpoint != "create_generation":
            raise ValueError(f"{self.kind} applies only to endpoint 'create_generation'")
        if self.kind == "trickle" and self.endpoint != "media":
            raise ValueError("trickle applies only to endpoint 'media'")
        if self.rate is not None and self.times is not None:
            raise ValueError("give either rate or times, not both")
        if self.for_seconds is not None and (self.rate is not None or self.times is not None):
            raise ValueError("for_seconds fires on every matching request of its window: give it without times or rate")
        return self


class EmulatorConfig(_Strict):
    """Behaviour of one emulator instance. Times are in emulated seconds; `time_scale` speeds the clock."""

    api_keys: list[ApiKeyConfig] = Field(default_factory=lambda: [ApiKeyConfig(key=DEFAULT_TEST_KEY)])
    initial_credits: int = Field(default=10_000, ge=0, description="wallet of every account at reset")
    credits_by_account: dict[str, int] = Field(default_factory=dict, description="per-account overrides")
    queued_seconds: float = Field(default=0.5, ge=0.0)
    processing_seconds: float = Field(default=2.0, ge=0.0)
    time_scale: float = Field(default=1.0, gt=0.0, description="emulated seconds per real second")
    failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int = 0
    idempotency_ttl_seconds: float = Field(default=24 * 3600, gt=0.0)
    latency_seconds: float = Field(default=0.0, ge=0.0, description="added to every API request")
    result_min_bytes: int = Field(default=0, ge=0, description="pad result videos up to this size")
    media_redirect_to: str | None = None
    result_url_base: str | None = Field(
        default=None, description="hand out result URLs under this base instead of the media host's (hostile URLs)"
    )
    reject_authorized_media: bool = True
    video_fps: int = Field(default=8, ge=1, le=60)
    faults: list[FaultRule] = Field(default_factory=list)

    def starting_credits(self, account: str) -> int:
        return self.credits_by_account.get(account, self.initial_credits)
