"""The `steering` contract has one owner (`adaras.steering`): the HTTP layer's
admission and the worker runtime resolve the same defaults and report the
same thing, and the documented schema accepts and refuses what the parser
does. No engine: the worker runtime runs in-process on the CPU."""

from __future__ import annotations

import asyncio
import math
import types

import pytest
import torch
from pydantic import ValidationError

from adaras.api.profiles import ProfileRegistry, SteeringError
from adaras.api.protocol import SteeringParams, SteeringReport
from adaras.engine.runtime import SteeringRuntime
from adaras.predictor import FailurePredictor
from adaras.profile import ModelShape, SteeringProfile
from adaras.report import single
from adaras.steering import (
    DEFAULT_THRESHOLD,
    FIELDS,
    MODES,
    PROMPT_POSITIONS_KEY,
    SteeringConfigError,
    parse_steering,
    resolve,
)

SHAPE = ModelShape("Qwen3ForCausalLM", 4, 64, 32)


class InProcessEngine:
    """`collective_rpc("adaras_rpc", ...)` answered by a real worker runtime."""

    def __init__(self):
        self.runtime = SteeringRuntime(SHAPE, 0, 1, torch.device("cpu"))

    async def collective_rpc(self, method, args=()):
        op, *rest = args
        return [getattr(self.runtime, op)(*rest)]


def _profiles(tmp_path) -> dict[str, str]:
    plain = SteeringProfile.random("plain", SHAPE, k=6, seed=1, default_alpha=0.7)
    gated = SteeringProfile.random("gated", SHAPE, k=5, seed=2, default_alpha=0.2)
    gated.predictor = FailurePredictor(torch.tensor([0, 1, 2], dtype=torch.int32),
                                       torch.tensor([3, 4, 5], dtype=torch.int32), hidden=4)
    gated.threshold = 0.3
    uncalibrated = SteeringProfile.random("uncal", SHAPE, k=3, seed=3, default_alpha=1.5)
    uncalibrated.predictor = gated.predictor
    paths = {}
    for prof in (plain, gated, uncalibrated):
        paths[prof.name] = str(tmp_path / f"{prof.name}.safetensors")
        prof.save(paths[prof.name])
    return paths


@pytest.fixture
def both_sides(tmp_path):
    engine = InProcessEngine()
    registry = ProfileRegistry(engine, SHAPE, tmp_path / "uploads")
    for name, path in _profiles(tmp_path).items():
        asyncio.run(registry.load(name, path))
    return registry, engine.runtime


@pytest.mark.parametrize("raw", [
    {"mode": "always"},  # the default profile (the first loaded), its alpha
    {"mode": "always", "profile": "gated", "alpha": 2.5},
    {"mode": "adaptive", "profile": "gated"},  # the profile's calibrated threshold
    {"mode": "adaptive", "profile": "gated", "threshold": 0.9, "alpha": 0.0},
    {"mode": "adaptive", "profile": "uncal"},  # no calibrated threshold: the default
])
def test_admission_and_the_worker_resolve_the_same_steering(both_sides, raw):
    registry, runtime = both_sides
    admitted = registry.resolve(raw)
    params = types.SimpleNamespace(extra_args=admitted.extra_args())
    state = runtime._new_request("r1", params)
    worker = state.report()
    server = single(admitted).wire()
    for key in ("mode", "profile", "alpha", "neurons", "threshold"):
        assert worker.get(key) == server.get(key), key
    prof = SteeringProfile.load(registry.entries[admitted.profile].source)
    assert admitted.alpha == (raw["alpha"] if "alpha" in raw else prof.default_alpha)
    if raw["mode"] == "adaptive":
        want = raw.get("threshold", prof.threshold if prof.threshold is not None
                       else DEFAULT_THRESHOLD)
        assert admitted.threshold == want
    assert admitted.version == registry.entries[admitted.profile].version
    SteeringReport.model_validate(server)  # the documented schema holds
    SteeringReport.model_validate(worker)


@pytest.mark.parametrize("steer_prompt, positions", [(None, 0), ("last", 1), ("all", -1)])
def test_admission_declares_the_prompt_positions_the_worker_steers(tmp_path, steer_prompt,
                                                                   positions):
    """`always` requests carry their profile's steered prompt positions to the
    engine core (which salts the KV blocks from there) and the worker steers
    exactly those; adaptive requests declare none and steer no prompt position."""
    engine = InProcessEngine()
    registry = ProfileRegistry(engine, SHAPE, tmp_path / "uploads")
    prof = SteeringProfile.random("p", SHAPE, k=4, seed=1)
    prof.provenance = {"steer_prompt": steer_prompt} if steer_prompt else {}
    prof.predictor = FailurePredictor(torch.tensor([0], dtype=torch.int32),
                                      torch.tensor([3], dtype=torch.int32), hidden=4)
    prof.save(tmp_path / "p.safetensors")
    asyncio.run(registry.load("p", str(tmp_path / "p.safetensors")))
    always = registry.resolve({"mode": "always"}).extra_args()
    assert always[PROMPT_POSITIONS_KEY] == positions
    assert engine.runtime._new_request("r1", types.SimpleNamespace(extra_args=always)) \
        .steer_prompt == positions
    adaptive = registry.resolve({"mode": "adaptive"}).extra_args()
    assert PROMPT_POSITIONS_KEY not in adaptive
    assert engine.runtime._new_request("r2", types.SimpleNamespace(extra_args=adaptive)) \
        .steer_prompt == 0


def test_the_unknown_profile_error_is_the_same_on_both_sides(both_sides):
    registry, runtime = both_sides
    with pytest.raises(SteeringError) as http:
        registry.resolve({"mode": "always", "profile": "nope"})
    runtime._new_request("r2", types.SimpleNamespace(
        extra_args={"steering": {"mode": "always", "profile": "nope"}}))
    worker = runtime.take_reports()["r2"]["error"]
    assert str(http.value) == worker
    assert http.value.param == "steering.profile"


def test_off_resolves_to_nothing_for_the_engine():
    off = resolve(parse_steering({"mode": "off", "alpha": 3}), profile="p", default_alpha=1,
                  profile_threshold=None)
    assert off.mode == "off" and off.extra_args() == {}
    assert single(off).wire() == {"mode": "off", "profile": None, "alpha": None,
                            "failure_probability": None, "applied": False, "neurons": 0,
                            "threshold": None}  # every key, always: a stable report shape


def test_the_schema_has_the_contracts_fields_and_modes():
    assert tuple(SteeringParams.model_fields) == FIELDS
    schema = SteeringParams.model_json_schema()
    assert schema["properties"]["mode"]["anyOf"][0]["enum"] == list(MODES)
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("raw", [
    {}, {"mode": "always"}, {"mode": "adaptive", "threshold": 0}, {"alpha": 0}, {"alpha": 1e3},
    {"alpha": 1000.5}, {"alpha": 1e308},
    {"mode": "x"}, {"alpha": -0.1}, {"alpha": math.nan}, {"alpha": math.inf}, {"alpha": "1"},
    {"threshold": 1.5, "mode": "adaptive"}, {"threshold": -1, "mode": "adaptive"},
    {"profile": ""}, {"profile": 3}, {"bogus": 1}, {"mode": None}, {"alpha": None},
])
def test_the_schema_accepts_and_refuses_what_the_parser_does(raw):
    def parser_ok():
        try:
            parse_steering(raw, default_mode="off")
            return True
        except SteeringConfigError:
            return False

    def schema_ok():
        try:
            SteeringParams.model_validate(raw, strict=True)
            return True
        except ValidationError:
            return False

    assert parser_ok() == schema_ok(), raw
