"""The per-request `steering` object: parsing and validation.

It arrives as `SamplingParams.extra_args["steering"]` (offline) or as the
top-level `"steering"` object of an HTTP request, and has this shape
(DESIGN §2):

    {"mode": "off" | "always" | "adaptive", "profile": "name",
     "alpha": 0.3, "threshold": 0.5}

This module is imported by the frontend, the engine core and the workers, so it
must stay free of vLLM and torch imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["off", "always", "adaptive"]
MODES: tuple[str, ...] = ("off", "always", "adaptive")
EXTRA_ARGS_KEY = "steering"
PROFILES_ENV = "ADARAS_PROFILES"  # "name=path,name2=path2", loaded into every worker
_FIELDS = {"mode", "profile", "alpha", "threshold"}


class SteeringConfigError(ValueError):
    """A bad `steering` object. `field` names the offending key."""

    def __init__(self, field: str, message: str):
        super().__init__(f"steering.{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SteeringRequest:
    """A validated per-request steering config. `None` fields take defaults
    from the profile (alpha, threshold) or the engine (profile)."""

    mode: Mode = "off"
    profile: str | None = None
    alpha: float | None = None
    threshold: float | None = None

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SteeringConfigError(field, f"must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise SteeringConfigError(field, f"must be finite, got {value}")
    return value


def parse_steering(obj: Any, *, default_mode: Mode = "off") -> SteeringRequest:
    """Validate a raw `steering` object (dict or None) into a SteeringRequest.

    Raises SteeringConfigError (a ValueError) naming the bad field.
    """
    if obj is None:
        return SteeringRequest(mode=default_mode)
    if isinstance(obj, SteeringRequest):
        return obj
    if not isinstance(obj, dict):
        raise SteeringConfigError(
            "<object>", f"must be an object like {{\"mode\": \"always\"}}, got {type(obj).__name__}"
        )
    unknown = set(obj) - _FIELDS
    if unknown:
        raise SteeringConfigError(
            sorted(unknown)[0], f"unknown field; allowed fields are {sorted(_FIELDS)}"
        )
    mode = obj.get("mode", default_mode)
    if mode not in MODES:
        raise SteeringConfigError("mode", f"must be one of {list(MODES)}, got {mode!r}")
    profile = obj.get("profile")
    if profile is not None and (not isinstance(profile, str) or not profile):
        raise SteeringConfigError("profile", f"must be a non-empty string, got {profile!r}")
    alpha = obj.get("alpha")
    if alpha is not None:
        alpha = _number("alpha", alpha)
        if alpha < 0:
            raise SteeringConfigError("alpha", f"must be >= 0, got {alpha}")
    threshold = obj.get("threshold")
    if threshold is not None:
        threshold = _number("threshold", threshold)
        if not 0.0 <= threshold <= 1.0:
            raise SteeringConfigError("threshold", f"must be in [0, 1], got {threshold}")
        if mode != "adaptive":
            raise SteeringConfigError("threshold", f"only applies to mode 'adaptive', not {mode!r}")
    return SteeringRequest(mode=mode, profile=profile, alpha=alpha, threshold=threshold)


def steering_from_extra_args(extra_args: dict | None) -> SteeringRequest:
    """The request's SteeringRequest, or mode 'off' when it carries none."""
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return SteeringRequest()
    return parse_steering(extra_args[EXTRA_ARGS_KEY])


def parse_profiles_env(value: str | None) -> dict[str, str]:
    """`"a=/p/a.safetensors,b=/p/b.safetensors"` -> {"a": ..., "b": ...}."""
    out: dict[str, str] = {}
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{PROFILES_ENV}: expected name=path, got {item!r}")
        out[name.strip()] = path.strip()
    return out


# ---- activation capture (the offline pipeline's teacher-forced capture path) ----

CAPTURE_KEY = "adaras_capture"


@dataclass(frozen=True)
class CaptureRequest:
    """`SamplingParams.extra_args["adaras_capture"]`: record the prompt's
    pre-steering MLP activations `act(gate)*up` while the engine prefills it.

    mean_from : mean over prompt positions >= mean_from of every neuron of
                every layer -> float32 [L, I]  (None: no mean)
    features  : (layer, neuron) pairs whose per-token values are recorded for
                prompt positions < tokens_until -> float32 [T, F]  (None: none)
    """

    mean_from: int | None = None
    features: tuple[tuple[int, int], ...] | None = None
    tokens_until: int | None = None


def _index(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{CAPTURE_KEY}.{field}: must be an integer >= 0, got {value!r}")
    return value


def parse_capture(obj: Any) -> CaptureRequest | None:
    """Validate a raw capture object; None when there is nothing to capture."""
    if obj is None:
        return None
    if isinstance(obj, CaptureRequest):
        return obj
    if not isinstance(obj, dict):
        raise ValueError(f"{CAPTURE_KEY}: must be an object, got {type(obj).__name__}")
    unknown = set(obj) - {"mean_from", "features", "tokens_until"}
    if unknown:
        raise ValueError(f"{CAPTURE_KEY}.{sorted(unknown)[0]}: unknown field")
    mean_from = obj.get("mean_from")
    if mean_from is not None:
        mean_from = _index("mean_from", mean_from)
    features = obj.get("features")
    if features is not None:
        if not isinstance(features, (list, tuple)) or not features:
            raise ValueError(f"{CAPTURE_KEY}.features: must be a non-empty list of [layer, neuron]")
        pairs = []
        for f in features:
            if not isinstance(f, (list, tuple)) or len(f) != 2:
                raise ValueError(f"{CAPTURE_KEY}.features: each entry must be [layer, neuron], "
                                 f"got {f!r}")
            pairs.append((_index("features", f[0]), _index("features", f[1])))
        features = tuple(pairs)
    until = obj.get("tokens_until")
    if until is not None:
        until = _index("tokens_until", until)
        if features is None:
            raise ValueError(f"{CAPTURE_KEY}.tokens_until: needs 'features'")
    if mean_from is None and features is None:
        return None
    return CaptureRequest(mean_from=mean_from, features=features, tokens_until=until)
