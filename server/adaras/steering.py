"""The per-request `steering` contract, owned here and nowhere else.

One request's steering arrives as the top-level `"steering"` object of an
HTTP body, or as `SamplingParams.extra_args["steering"]` offline:

    {"mode": "off" | "always" | "adaptive", "profile": "name",
     "alpha": 0.3, "threshold": 0.5, "answer_probe": true, "order_choices": true}

`answer_probe` (any mode, `off` included) asks for the profile's answer head's
p_fail over the positions decoded after the prompt, per choice
(`answer_failure_probability`); `order_choices` (with it, not streamed) asks
the HTTP server to return the choices lowest p_fail first.

This module parses and validates it (errors name the field), resolves the
defaults against the chosen profile (alpha: the profile's default_alpha;
threshold: the profile's calibrated threshold, else DEFAULT_THRESHOLD), and
builds the report every response carries. The HTTP layer, the frontend's
validation, the worker runtime and the offline `Steering` API all call it.

Pure Python: imported by the frontend, the engine core and the workers, so it
must stay free of vLLM and torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

Mode = Literal["off", "always", "adaptive"]
MODES: tuple[str, ...] = get_args(Mode)
FIELDS: tuple[str, ...] = ("mode", "profile", "alpha", "threshold", "answer_probe",
                           "order_choices")
STEERING_KEY = "steering"  # the HTTP body field and the SamplingParams.extra_args key
# extra_args key of the profile version (sha256 of its file) fixed at admission
FINGERPRINT_KEY = "steering_fingerprint"
# extra_args key of the prompt positions an `always` request may steer, fixed at
# admission from its profile (0 = decode only, 1 = also the last, -1 = all). The
# engine core salts the KV blocks from the first of them on; the worker never
# steers more of the prompt than this declares. Absent: every position may be
# steered, so every block is salted.
PROMPT_POSITIONS_KEY = "steering_prompt_positions"
DEFAULT_THRESHOLD = 0.5  # adaptive, when neither the request nor the profile sets one
# Far above any useful strength (the Qwen study screens up to 30), and low
# enough that alpha * delta cannot overflow the model's activations into inf/NaN.
MAX_ALPHA = 1000.0


class SteeringConfigError(ValueError):
    """A bad `steering` object. `field` names the offending key ("<object>"
    when the value is not an object at all); `param` is the OpenAI error
    body's `param` ("steering.alpha", or "steering")."""

    def __init__(self, field: str, message: str):
        super().__init__(f"steering.{field}: {message}")
        self.field = field

    @property
    def param(self) -> str:
        return STEERING_KEY if self.field == "<object>" else f"{STEERING_KEY}.{self.field}"


@dataclass(frozen=True)
class SteeringRequest:
    """A validated `steering` object. `None` fields take defaults from the
    profile (alpha, threshold) or the server/engine (profile)."""

    mode: Mode = "off"
    profile: str | None = None
    alpha: float | None = None
    threshold: float | None = None
    answer_probe: bool = False
    order_choices: bool = False

    @property
    def active(self) -> bool:
        """Steered (always) or gated (adaptive)."""
        return self.mode != "off"

    @property
    def engaged(self) -> bool:
        """The engine does something for the request: it steers, gates or probes."""
        return self.active or self.answer_probe

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in FIELDS
                if getattr(self, k) is not None and getattr(self, k) is not False}


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SteeringConfigError(field, f"must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise SteeringConfigError(field, f"must be finite, got {value}")
    return value


def parse_steering(obj: Any, *, default_mode: Mode = "off") -> SteeringRequest:
    """Validate a raw `steering` value (dict or None) into a SteeringRequest.
    Raises SteeringConfigError (a ValueError) naming the bad field."""
    if obj is None:
        return SteeringRequest(mode=default_mode)
    if isinstance(obj, SteeringRequest):
        return obj
    if not isinstance(obj, dict):
        raise SteeringConfigError(
            "<object>", f"must be an object like {{\"mode\": \"always\"}}, got {type(obj).__name__}")
    unknown = set(obj) - set(FIELDS)
    if unknown:
        raise SteeringConfigError(sorted(unknown)[0],
                                  f"unknown field; allowed fields are {sorted(FIELDS)}")
    mode = obj.get("mode")
    if mode is None:  # absent or JSON null: the server's (engine's) default
        mode = default_mode
    if mode not in MODES:
        raise SteeringConfigError("mode", f"must be one of {list(MODES)}, got {mode!r}")
    profile = obj.get("profile")
    if profile is not None and (not isinstance(profile, str) or not profile):
        raise SteeringConfigError("profile", f"must be a non-empty string, got {profile!r}")
    alpha = obj.get("alpha")
    if alpha is not None:
        alpha = _number("alpha", alpha)
        if not 0 <= alpha <= MAX_ALPHA:
            raise SteeringConfigError("alpha", f"must be >= 0 and <= {MAX_ALPHA:g}, got {alpha}")
    threshold = obj.get("threshold")
    if threshold is not None:
        threshold = _number("threshold", threshold)
        if not 0.0 <= threshold <= 1.0:
            raise SteeringConfigError("threshold", f"must be in [0, 1], got {threshold}")
        if mode != "adaptive":
            raise SteeringConfigError("threshold", f"only applies to mode 'adaptive', not {mode!r}")
    flags = {}
    for name in ("answer_probe", "order_choices"):
        value = obj.get(name)
        if value is not None and not isinstance(value, bool):
            raise SteeringConfigError(name, f"must be true or false, got {value!r}")
        flags[name] = bool(value)
    if flags["order_choices"] and not flags["answer_probe"]:
        raise SteeringConfigError("order_choices", "orders choices by their answer failure "
                                  "probability, so it needs \"answer_probe\": true")
    return SteeringRequest(mode=mode, profile=profile, alpha=alpha, threshold=threshold, **flags)


def steering_from_extra_args(extra_args: dict | None) -> SteeringRequest:
    """The request's SteeringRequest, or mode 'off' when it carries none."""
    if not extra_args or STEERING_KEY not in extra_args:
        return SteeringRequest()
    return parse_steering(extra_args[STEERING_KEY])


def unknown_profile(name: str | None, loaded) -> SteeringConfigError:
    """The one error for a profile name that is not loaded."""
    if name is None:
        return SteeringConfigError("profile", "no steering profile is loaded")
    return SteeringConfigError("profile", f"unknown profile {name!r}; loaded: {sorted(loaded)}")


@dataclass(frozen=True)
class Resolved:
    """One request's steering with every default filled in, fixed at admission."""

    mode: Mode = "off"
    profile: str | None = None
    alpha: float | None = None
    threshold: float | None = None  # adaptive only
    neurons: int = 0
    version: str = ""  # the profile file's sha256 prefix (FINGERPRINT_KEY)
    prompt_positions: int = 0  # always: the profile's steered prompt positions (-1 = all)
    answer_probe: bool = False
    order_choices: bool = False  # the HTTP server's business: never sent to the engine

    def extra_args(self) -> dict:
        """What the engine gets in SamplingParams.extra_args ({} when off and
        not probing)."""
        if self.mode == "off" and not self.answer_probe:
            return {}
        steering = {"mode": self.mode, "profile": self.profile}
        if self.mode != "off":
            steering["alpha"] = self.alpha
        if self.answer_probe:
            steering["answer_probe"] = True
        out = {STEERING_KEY: steering, FINGERPRINT_KEY: self.version}
        if self.mode == "adaptive":
            steering["threshold"] = self.threshold
        elif self.mode == "always":
            out[PROMPT_POSITIONS_KEY] = self.prompt_positions
        return out


def resolve(request: SteeringRequest, *, profile: str | None, default_alpha: float,
            profile_threshold: float | None, neurons: int = 0, version: str = "",
            prompt_positions: int = 0) -> Resolved:
    """Fill a request's defaults from the profile it runs on (named `profile`;
    `prompt_positions`: its SteeringProfile.steered_prompt_positions)."""
    if not request.active:
        if not request.answer_probe:
            return Resolved()
        return Resolved("off", profile, version=version, answer_probe=True,
                        order_choices=request.order_choices)
    alpha = default_alpha if request.alpha is None else request.alpha
    threshold = None
    if request.mode == "adaptive":
        threshold = request.threshold if request.threshold is not None else (
            profile_threshold if profile_threshold is not None else DEFAULT_THRESHOLD)
    positions = prompt_positions if request.mode == "always" else 0
    return Resolved(request.mode, profile, alpha, threshold, neurons, version, positions,
                    request.answer_probe, request.order_choices)


def declared_prompt_positions(extra_args: dict | None) -> int | None:
    """PROMPT_POSITIONS_KEY of a request, or None when it declares none."""
    value = (extra_args or {}).get(PROMPT_POSITIONS_KEY)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= -1 \
        else None


def steered_prompt_positions(profile_positions: int, declared: int | None) -> int:
    """The prompt positions a worker steers: the profile's, but never more than
    the request declared (its blocks are salted only from there; -1 = all)."""
    if declared is None or declared < 0:
        return profile_positions
    return declared if profile_positions < 0 else min(profile_positions, declared)
