"""The answer probe's bookkeeping by position, driven by hand (no engine):
the steering op is simulated by writing a known value for every (position,
feature) into the step's feature buffer. The probe must pool exactly the
positions after the prompt that passed through the model, once each, in any
chunking, across a preemption, and report the whole answer's p_fail on the
request's last step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adaras.engine.runtime import SteeringRuntime
from adaras.predictor import FailurePredictor
from adaras.profile import ModelShape, SteeringProfile

SHAPE = ModelShape("Qwen3ForCausalLM", num_layers=2, intermediate_size=64, hidden_size=32)
PROMPT = 100


def head(seed: int, features: int) -> FailurePredictor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(SHAPE.num_layers * SHAPE.intermediate_size, generator=g)[:features]
    p = FailurePredictor((flat // SHAPE.intermediate_size).to(torch.int32),
                         (flat % SHAPE.intermediate_size).to(torch.int32), hidden=8)
    with torch.no_grad():
        for w in p.parameters():
            w.normal_(0.0, 0.5, generator=g)
    return p.eval()


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.delenv("ADARAS_PROFILES", raising=False)
    prof = SteeringProfile.random("probe", SHAPE, k=8, seed=3, scale=1.0)
    prof.predictor, prof.threshold = head(4, 6), 0.5
    prof.answer_predictor = head(5, 5)
    prof.save(tmp_path / "probe.safetensors")
    plain = SteeringProfile.random("plain", SHAPE, k=8, seed=3, scale=1.0)
    plain.save(tmp_path / "plain.safetensors")
    rt = SteeringRuntime(SHAPE, 0, 1, torch.device("cpu"))
    rt.load_profile("probe", str(tmp_path / "probe.safetensors"))
    rt.load_profile("plain", str(tmp_path / "plain.safetensors"))
    rt.profile = prof
    return rt


def feature(position: int, column: int, head: str) -> float:
    return math.sin(0.37 * position + 1.3 * column + (0.5 if head == "answer" else 0.0))


def expected(prof: SteeringProfile, positions) -> float:
    x = torch.tensor([[feature(p, c, "answer") for c in range(prof.answer_predictor.num_features)]
                      for p in positions])
    return prof.answer_predictor.prob(x)


def step(rt: SteeringRuntime, computed: int, n: int, steering: dict | None = None,
         fold_twice: bool = False) -> dict:
    new = [("r", SimpleNamespace(extra_args={"steering": steering}))] if steering else []
    ctx = rt.begin_step(["r"], {"r": 0}, np.array([n]), np.array([computed]),
                        np.array([PROMPT]), new)
    if ctx is not None and ctx.feats is not None:  # what the steering op gathers
        for _, rows, cols, pos, _, kind in ctx.spans:
            first = pos - (rows.stop - rows.start)  # the span's positions: first .. pos - 1
            for i in range(rows.stop - rows.start):
                for c in range(cols.stop - cols.start):
                    ctx.feats[rows.start + i, cols.start + c] = feature(first + i, c, kind)
    rt.end_step()
    return rt.take_reports().get("r")


def run(rt, chunks, steering) -> dict:
    report = None
    for i, (computed, n) in enumerate(chunks):
        report = step(rt, computed, n, steering if i == 0 else None) or report
    return report


DECODES = [(p, 1) for p in range(PROMPT, PROMPT + 11)]  # reads positions 100 .. 110


@pytest.mark.parametrize("mode", ["off", "always", "adaptive"])
def test_the_probe_pools_every_position_after_the_prompt_once(runtime, mode):
    report = run(runtime, [(0, 40), (40, 60)] + DECODES,
                 {"mode": mode, "profile": "probe", "answer_probe": True})
    want = expected(runtime.profile, range(PROMPT, PROMPT + 11))
    assert report["answer_failure_probability"] == pytest.approx(want, abs=1e-6)
    assert report["mode"] == mode
    assert report["applied"] is (mode == "always" or (mode == "adaptive" and report[
        "failure_probability"] >= 0.5))


def test_each_step_reports_the_answer_so_far(runtime):
    step(runtime, 0, PROMPT, {"mode": "off", "profile": "probe", "answer_probe": True})
    for k, (computed, n) in enumerate(DECODES[:4], start=1):
        report = step(runtime, computed, n)
        want = expected(runtime.profile, range(PROMPT, PROMPT + k))
        assert report["answer_failure_probability"] == pytest.approx(want, abs=1e-6)


def test_a_preempted_request_recomputes_and_gets_the_uninterrupted_p_fail(runtime):
    steering = {"mode": "off", "profile": "probe", "answer_probe": True}
    want = run(runtime, [(0, PROMPT)] + DECODES, steering)["answer_failure_probability"]
    runtime.release("r")
    # preempted after reading 100..104; the recompute reads 0..105 in two chunks
    chunks = [(0, PROMPT)] + DECODES[:5] + [(0, 64), (64, 42)] + DECODES[6:]
    got = run(runtime, chunks, steering)["answer_failure_probability"]
    assert got == pytest.approx(want, abs=1e-6)


def test_without_the_position_skip_a_recompute_would_count_twice(runtime):
    """The control for the test above: folding the recomputed rows again moves p_fail."""
    steering = {"mode": "off", "profile": "probe", "answer_probe": True}
    want = run(runtime, [(0, PROMPT)] + DECODES, steering)["answer_failure_probability"]
    runtime.release("r")
    run(runtime, [(0, PROMPT)] + DECODES[:5], steering)
    runtime.requests["r"].answer_pos = PROMPT  # forget what was folded
    got = run(runtime, [(0, 64), (64, 42)] + DECODES[6:], None)["answer_failure_probability"]
    assert abs(got - want) > 1e-4


def test_a_request_without_the_probe_carries_no_answer_field_and_off_holds_nothing(runtime):
    report = run(runtime, [(0, PROMPT)] + DECODES[:2], {"mode": "always", "profile": "probe"})
    assert "answer_failure_probability" not in report
    runtime.release("r")
    step(runtime, 0, PROMPT, {"mode": "off"})
    assert runtime.stats()["requests"] == 0


def test_a_profile_without_an_answer_head_reports_why(runtime):
    report = step(runtime, 0, PROMPT, {"mode": "off", "profile": "plain", "answer_probe": True})
    assert report["answer_failure_probability"] is None
    assert "no answer head" in report["error"]
    assert runtime.stats()["requests"] == 0


def test_a_one_token_answer_has_no_position_to_read(runtime):
    """max_tokens=1: the only generated token is never read by the model."""
    report = step(runtime, 0, PROMPT, {"mode": "off", "profile": "probe", "answer_probe": True})
    assert report["answer_failure_probability"] is None and "error" not in report
    runtime.release("r")
    assert runtime.stats()["requests"] == 0
