"""Request lifecycle in the worker: state is released for every request that
ends (including just before the engine goes idle), and a request that vLLM
preempts and recomputes gets the same p_fail, decision and capture as an
uninterrupted run."""

from __future__ import annotations

import time

import numpy as np
import pytest
from vllm import SamplingParams

from adaras.engine import pop_captures, reports_of

from .conftest import generate, prompt_ids, shutdown, start_llm, stats

pytestmark = pytest.mark.engine

FEATURES = [[0, 3], [1, 0], [1, 95], [0, 50], [1, 17]]


def drained(llm, timeout: float = 10.0) -> dict:
    """Runtime stats once the engine has run the step that carries the last
    finished ids (it follows the last forward; allow it a moment)."""
    deadline = time.time() + timeout
    while True:
        s = stats(llm)
        if (s["requests"] == 0 and s["captures"] == 0) or time.time() > deadline:
            return s
        time.sleep(0.05)


def mixed_params(i: int, max_tokens: int = 6) -> SamplingParams:
    extra = [{"steering": {"mode": "always", "profile": "a"}},
             {"steering": {"mode": "adaptive", "profile": "pred"}},
             {"adaras_capture": {"mean_from": 0, "features": FEATURES}},
             None][i % 4]
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=extra)


def test_no_request_state_survives_bursts_separated_by_idle(qwen3_llm):
    for burst in range(4):
        prompts = prompt_ids(8, 20 + 10 * burst, seed=70 + burst)
        outs = generate(qwen3_llm, prompts, [mixed_params(i) for i in range(len(prompts))])
        ids = [o.request_id for o in outs]
        pop_captures(qwen3_llm, ids)
        time.sleep(0.3)  # idle
        s = drained(qwen3_llm)
        # nothing read the reports: they left with the outputs, none is held
        assert (s["requests"], s["captures"], s["reports"]) == (0, 0, 0), f"burst {burst}: {s}"
        assert all(r["mode"] in ("always", "adaptive") for r in reports_of(outs).values())


def test_aborted_requests_release_their_state(qwen3_llm):
    engine = qwen3_llm.llm_engine
    prompts = prompt_ids(4, 40, seed=80)
    ids = []
    for i, p in enumerate(prompts):
        rid = f"abort-me-{i}"
        engine.add_request(rid, {"prompt_token_ids": p}, mixed_params(i, max_tokens=400))
        ids.append(rid)
    for _ in range(3):  # some steps: prompts in flight, state held
        engine.step()
    held = stats(qwen3_llm)
    assert held["requests"] + held["captures"] > 0
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    s = drained(qwen3_llm)
    assert (s["requests"], s["captures"], s["reports"]) == (0, 0, 0), s
    pop_captures(qwen3_llm, ids)


# ---- preemption -------------------------------------------------------------------

# A 60-token and two 150-token prompts, 60 tokens each, in 8 blocks of 32
# tokens: the third request is preempted while its prompt is being prefilled
# and recomputed from token 0 once the first finishes.
PROMPT_LENS = (60, 150, 150)
MEAN_FROM = 5


@pytest.fixture(scope="module")
def tight_llm(qwen3_dir, qwen3_profiles):
    """8 KV blocks of 32 tokens: two 150-token prompts cannot both stay resident,
    so the scheduler preempts one and later recomputes it from token 0."""
    llm = start_llm(qwen3_dir, profiles=qwen3_profiles, num_gpu_blocks_override=8,
                    max_model_len=224,
                    max_num_seqs=4, disable_log_stats=False)
    yield llm
    shutdown(llm)


def preemptions(llm) -> int:
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


def run(llm, prompts, kinds):
    params = []
    for kind in kinds:
        extra = {"adaptive": {"steering": {"mode": "adaptive", "profile": "pred"}},
                 "probe": {"steering": {"mode": "off", "profile": "pred", "answer_probe": True}},
                 "capture": {"adaras_capture": {"mean_from": MEAN_FROM,
                                                "features": FEATURES}}}[kind]
        params.append(SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True,
                                     extra_args=extra))
    outs = generate(llm, prompts, params)
    ids = [o.request_id for o in outs]
    reports, caps = reports_of(outs), pop_captures(llm, ids)
    return ([reports.get(i) for i in ids], [caps.get(i) for i in ids],
            [list(o.outputs[0].token_ids) for o in outs])


@pytest.mark.parametrize("kind", ["adaptive", "capture", "probe"])
def test_preempted_requests_get_the_same_p_fail_decision_and_capture(tight_llm, kind):
    prompts = [prompt_ids(1, n, seed=90 + n + i)[0] for i, n in enumerate(PROMPT_LENS)]
    kinds = [kind] * len(prompts)
    alone = [run(tight_llm, [p], [kind]) for p in prompts]
    before = preemptions(tight_llm)
    reports, caps, toks = run(tight_llm, prompts, kinds)
    assert preemptions(tight_llm) > before, "the test needs preemption; none happened"
    for i, n in enumerate(PROMPT_LENS):
        want_reports, want_caps, want_toks = alone[i]
        if kind == "adaptive":
            got, want = reports[i], want_reports[0]
            assert got["failure_probability"] == pytest.approx(want["failure_probability"],
                                                              abs=1e-6), f"request {i}"
            assert got["applied"] == want["applied"]
        elif kind == "probe":  # recomputed positions after the prompt are folded once
            got, want = reports[i], want_reports[0]
            assert got["answer_failure_probability"] == pytest.approx(
                want["answer_failure_probability"], abs=1e-6), f"request {i}"
        else:
            got, want = caps[i], want_caps[0]
            assert got["count"] == want["count"] == n - MEAN_FROM, f"request {i}"
            np.testing.assert_allclose(got["mean"], want["mean"], atol=1e-6, rtol=0)
            assert got["tokens"].shape == (n, len(FEATURES))
            np.testing.assert_allclose(got["tokens"], want["tokens"], atol=1e-6, rtol=0)
        assert toks[i] == want_toks[0], f"request {i}"
    s = drained(tight_llm)
    assert (s["requests"], s["captures"]) == (0, 0), s
