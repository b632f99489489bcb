"""Engine-side request options that are not the steering contract
(`adaras.steering` owns that): the profiles loaded into every worker at
start-up, the prefix-cache salt of steered requests, and the offline
pipeline's activation capture.

This module is imported by the frontend, the engine core and the workers, so it
must stay free of vLLM and torch imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROFILES_ENV = "ADARAS_PROFILES"  # "name=path,name2=path2", loaded into every worker


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


# extra_args key of a steered request's prefix-cache salt, set by the frontend
# (adaras.engine.admission.steering_salt) and added by the engine core to the hash
# of every KV block that holds a position the request may steer
SALT_KEY = "adaras_salt"


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
