"""Wire models of our extensions. The OpenAI request/response bodies
themselves are vLLM's; these are only the `steering` object, its report, the
profile endpoints' bodies and the OpenAI-style error body."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adaras.profile import PROFILE_NAME_PATTERN


class SteeringParams(BaseModel):
    """The `steering` object of /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["off", "always", "adaptive"] | None = Field(
        None, description="default: the server's configured default mode")
    profile: str | None = Field(None, description="default: the server's default profile")
    alpha: float | None = Field(None, ge=0, description="overrides the profile's default_alpha")
    threshold: float | None = Field(None, ge=0, le=1, description="adaptive only")


class SteeringReport(BaseModel):
    """The `steering` object of every response (in a stream: the final chunk)."""

    mode: Literal["off", "always", "adaptive"]
    profile: str | None = None
    alpha: float | None = None
    failure_probability: float | None = None
    applied: bool = False
    neurons: int = 0
    threshold: float | None = None


class ProfileLoad(BaseModel):
    """POST /v1/steering/profiles with a JSON body: load a file the server can read."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=PROFILE_NAME_PATTERN)
    path: str
    default: bool = Field(False, description="make it the server's default profile")


class ProfileInfo(BaseModel):
    name: str
    k: int
    default_alpha: float
    threshold: float | None = None
    model: dict[str, Any]
    provenance: dict[str, Any]
    layer_histogram: list[int]
    has_predictor: bool
    fingerprint: str
    default: bool = False
    source: str | None = None


class ProfileList(BaseModel):
    object: Literal["list"] = "list"
    default: str | None = None
    data: list[ProfileInfo]


class RuntimeStats(BaseModel):
    """GET /v1/steering/runtime: the worker's steering tables."""

    requests: int = Field(description="steered/adaptive requests the worker tracks")
    captures: int = Field(description="activation captures in flight")
    reports: int = Field(description="steering reports not yet read (bounded)")
    capture_results: int
    profiles: list[str]
    versions: int = Field(description="profile versions held, incl. replaced ones in use")
    hooked_layers: int = Field(description="steering-op calls with work to do, since start")
    unavailable: str | None = Field(None, description="why steering is refused, if it is")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo
