"""The worker runtime's bookkeeping by prompt position, driven by hand (no
engine): the steering op is simulated by writing a known value for every
(position, feature) into the step's feature buffer. A request that vLLM
preempts and recomputes from token 0 must end with the p_fail of an
uninterrupted run, and a preemption after the decision must not redo it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adaras.engine import step as step_mod
from adaras.engine.runtime import SteeringRuntime
from adaras.predictor import FailurePredictor
from adaras.profile import ModelShape, SteeringProfile

SHAPE = ModelShape("Qwen3ForCausalLM", num_layers=2, intermediate_size=64, hidden_size=32)
PROMPT = 100


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.delenv("ADARAS_PROFILES", raising=False)
    prof = SteeringProfile.random("pred", SHAPE, k=8, seed=3, scale=1.0)
    g = torch.Generator().manual_seed(4)
    flat = torch.randperm(SHAPE.num_layers * SHAPE.intermediate_size, generator=g)[:6]
    predictor = FailurePredictor((flat // SHAPE.intermediate_size).to(torch.int32),
                                 (flat % SHAPE.intermediate_size).to(torch.int32), hidden=8)
    with torch.no_grad():
        for p in predictor.parameters():
            p.normal_(0.0, 0.5, generator=g)
    prof.predictor = predictor.eval()
    prof.threshold = 0.5
    prof.save(tmp_path / "pred.safetensors")
    rt = SteeringRuntime(SHAPE, 0, 1, torch.device("cpu"))
    rt.load_profile("pred", str(tmp_path / "pred.safetensors"))
    return rt


def feature(position: int, column: int) -> float:
    return math.sin(0.37 * position + 1.3 * column)


def step(rt: SteeringRuntime, computed: int, n: int, new: bool = False) -> None:
    params = SimpleNamespace(extra_args={"steering": {"mode": "adaptive", "profile": "pred"}})
    ctx = rt.begin_step(["r"], {"r": 0}, np.array([n]), np.array([computed]),
                        np.array([PROMPT]), [("r", params)] if new else [])
    if ctx is not None and ctx.feats is not None:  # what the steering op gathers
        positions = computed + ctx.feat_rows.numpy()  # one request at row offset 0
        for i, pos in enumerate(positions):
            for c in range(ctx.feats.shape[1]):
                ctx.feats[i, c] = feature(int(pos), c)
    rt.end_step()


def p_fail(rt: SteeringRuntime) -> float:
    return rt.take_reports()["r"]["failure_probability"]


def run(rt, chunks):
    first = True
    for computed, n in chunks:
        step(rt, computed, n, new=first)
        first = False
    return p_fail(rt)


def test_recomputed_prompt_gives_the_uninterrupted_p_fail(runtime):
    want = run(runtime, [(0, 32), (32, 32), (64, 36), (100, 1)])
    runtime.release("r")
    # preempted after 64 prompt tokens, recomputed from 0 in other chunk sizes
    got = run(runtime, [(0, 32), (32, 32), (0, 20), (20, 50), (70, 30), (100, 1)])
    assert got == pytest.approx(want, abs=1e-7)
    runtime.release("r")


def test_without_the_position_skip_the_recompute_would_count_twice(runtime, monkeypatch):
    """The control: folding the recomputed rows again moves p_fail."""
    want = run(runtime, [(0, 32), (32, 32), (64, 36)])
    runtime.release("r")
    step(runtime, 0, 32, new=True)
    step(runtime, 32, 32)
    runtime.requests["r"].pool_pos = 0  # forget what was folded: the old behaviour
    for computed, n in [(0, 64), (64, 36)]:
        step(runtime, computed, n)
    assert abs(p_fail(runtime) - want) > 1e-4
    runtime.release("r")


def test_a_preemption_after_the_decision_keeps_it(runtime):
    want = run(runtime, [(0, 100), (100, 1)])
    decided = runtime.requests["r"].p_fail
    step(runtime, 0, 64)  # recompute of prompt + generated tokens
    step(runtime, 64, 38)
    assert runtime.requests["r"].p_fail == decided == pytest.approx(want)
    runtime.release("r")
    assert runtime.stats()["requests"] == 0


def test_release_forgets_the_request_and_holds_no_report(runtime):
    step(runtime, 0, 40, new=True)  # undecided: nothing to report yet
    assert runtime.stats()["requests"] == 1
    runtime.release("r")
    assert runtime.stats()["requests"] == 0 and step_mod.current() is None
    assert runtime.take_reports() == {} and runtime.stats()["reports"] == 0


def test_a_decision_is_reported_once_and_then_nothing_is_held(runtime):
    step(runtime, 0, 100, new=True)
    first = runtime.take_reports()
    assert first["r"]["failure_probability"] is not None
    step(runtime, 100, 1)  # a decode step posts nothing new
    assert runtime.take_reports() == {} and runtime.stats()["reports"] == 0
    runtime.release("r")
