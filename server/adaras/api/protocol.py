"""Wire models of our extensions. The OpenAI request/response bodies
themselves are vLLM's; these are the `steering` object as /openapi.json
documents it (its report is `adaras.report`'s model, re-exported here), the
profile endpoints' bodies and the OpenAI-style error body.

`adaras.steering` owns the steering contract and validates it; the two
steering models here are its schema, built from the same constants, and a test
checks that they accept and refuse what `parse_steering` does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adaras.profile import PROFILE_NAME_PATTERN
from adaras.report import ChoiceReport, SteeringReport
from adaras.steering import MAX_ALPHA, MODES

ModeField = Literal[MODES]  # type: ignore[valid-type]
__all__ = ["ChoiceReport", "SteeringReport"]  # the report is adaras.report's, served as is


class SteeringParams(BaseModel):
    """The `steering` object of /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="forbid", title="Steering")

    mode: ModeField | None = Field(
        None, description="off | always (every decode step) | adaptive (only when the "
        "profile's failure predictor fires on the prompt); default: the server's --default-mode")
    profile: str | None = Field(None, min_length=1,
                                description="a loaded profile; default: the server's default")
    alpha: float | None = Field(None, ge=0, le=MAX_ALPHA, allow_inf_nan=False,
                                description="steering strength; default: the profile's")
    threshold: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False,
        description="adaptive only: steer when p_fail >= threshold; default: the profile's "
        "calibrated threshold, else 0.5")
    answer_probe: bool | None = Field(
        None, description="in any mode, `off` included: report each choice's "
        "answer_failure_probability, the profile's answer head read from the activations of "
        "the tokens the model generated (no extra forward pass); the profile must carry an "
        "answer head")
    order_choices: bool | None = Field(
        None, description="with answer_probe, not streamed: return the choices lowest "
        "answer_failure_probability first (choices[0] is the best of n; `index` is renumbered "
        "and each report choice names its `sample`, its index as generated)")


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
    has_answer_predictor: bool = Field(
        False, description="the profile carries an answer head (format version 2)")
    dose_in_sigma: float | None = Field(
        None, description="mean |default_alpha * delta| / sigma over the steered neurons: the "
        "default dose in units of each neuron's spread across probe traces (null when the "
        "profile has no sigma)")
    fingerprint: str
    default: bool = False
    source: str | None = None


class ProfileList(BaseModel):
    object: Literal["list"] = "list"
    default: str | None = None
    data: list[ProfileInfo]


class RuntimeStats(BaseModel):
    """GET /v1/steering/runtime: the worker's steering tables."""

    # every key the worker reports is a field here: one it added without a field
    # fails the endpoint (and its test) instead of vanishing from the response
    model_config = ConfigDict(extra="forbid")

    requests: int = Field(description="steered/adaptive requests the worker tracks")
    captures: int = Field(description="activation captures in flight")
    reports: int = Field(description="steering reports waiting for the step's output to carry "
                                     "them (0 between steps: reports travel with outputs)")
    capture_results: int
    profiles: list[str]
    versions: int = Field(description="profile versions held, incl. replaced ones in use")
    hooked_layers: int = Field(description="steering-op calls with work to do, since start")
    prefix_states: int = Field(0, description="predictor states of cached prompt blocks held")
    prefix_tokens_restored: int = Field(
        0, description="prompt tokens of adaptive requests served from the prefix cache with "
                       "their predictor state, since start")
    plain_graph: str = Field(
        "none", description="'compiled': steps with nothing to steer or gather run a second "
                            "compiled graph without the steering op; 'eager': the model is not "
                            "compiled and the op is skipped per layer; 'disabled': "
                            "ADARAS_PLAIN_GRAPH=0, one graph, the op called in every forward")
    plain_graph_from: Literal["loaded", "compiled"] | None = Field(
        None, description="where the plain graph came from at start: 'loaded' from vLLM's "
                          "compile cache or 'compiled'; null when there is none")
    graphs_loaded: int = Field(0, description="compiled graphs loaded from vLLM's compile "
                                              "cache since start (a warm start)")
    graphs_compiled: int = Field(0, description="graphs compiled since start (a cold start)")
    forwards_plain: int = Field(0, description="forwards with nothing to steer or gather, since "
                                               "start (run by the plain graph unless "
                                               "plain_graph is 'disabled')")
    forwards_steered: int = Field(0, description="forwards with a steered row or a predictor "
                                                 "gather (the steered graph), since start")
    steering_op_calls: int = Field(0, description="steering-op calls (one per layer of each "
                                                  "steered forward), since start")
    unavailable: str | None = Field(None, description="why steering is refused, if it is")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo
