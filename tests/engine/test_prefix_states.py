"""Adaptive requests read the prefix cache: the blocks vLLM serves from the
cache bring their predictor states, so p_fail and the gate's decision equal a
cold run's and the Hugging Face offline predictor's, under chunked prefill
(32-token steps, 32-token blocks) and with requests that share prefixes of
different lengths. Adaptive requests salt only their decode blocks, so their
prompt KV is shared with unsteered requests, which stay bitwise stock."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from adaras.engine import _rpc, reports_of
from adaras.profile import SteeringProfile, file_version
from adaras.steering import PROMPT_POSITIONS_KEY

from .conftest import generate, prompt_ids
from .test_steered_engine import offline_p_fail, params, tokens

pytestmark = pytest.mark.engine

ATOL = 1e-5  # fp32 engine and reference


def adaptive_params(path: str, **steering) -> SamplingParams:
    """Adaptive on profile "pred", carrying its version as the HTTP API does
    (only requests that name their profile's version read the prefix cache)."""
    p = params({"mode": "adaptive", "profile": "pred", **steering})
    p.extra_args["steering_fingerprint"] = file_version(path)
    return p


def p_fails(llm, outs) -> list[float]:
    reports = reports_of(outs)
    return [reports[o.request_id]["failure_probability"] for o in outs], \
        [reports[o.request_id]["applied"] for o in outs]


def test_without_the_version_an_adaptive_request_reads_no_cache(qwen3_llm, qwen3_profiles):
    prompt = prompt_ids(1, 100, seed=44)[0]
    qwen3_llm.reset_prefix_cache()
    before = _rpc(qwen3_llm, "stats")["prefix_tokens_restored"]
    for _ in range(2):
        generate(qwen3_llm, [prompt], params({"mode": "adaptive", "profile": "pred"}))
    assert _rpc(qwen3_llm, "stats")["prefix_tokens_restored"] == before


def test_adaptive_cache_hits_give_the_cold_p_fail_and_decision(qwen3_llm, qwen3_dir,
                                                                qwen3_profiles):
    profile = SteeringProfile.load(qwen3_profiles["pred"])
    shared = prompt_ids(1, 130, seed=40)[0]  # 4 full blocks of 32 tokens
    tails = prompt_ids(4, 40, seed=41)
    # prefixes of 130, 70, 96 and 33 shared tokens: 4, 2, 3 and 1 cached blocks
    prompts = [shared[:n] + tail[:t] for n, tail, t in
               zip((130, 70, 96, 33), tails, (7, 40, 1, 25))]
    offline = [offline_p_fail(qwen3_dir, profile, p) for p in prompts]
    ranked = sorted(offline)
    threshold = (ranked[1] + ranked[2]) / 2  # halfway: two are steered, none on the boundary
    adaptive = adaptive_params(qwen3_profiles["pred"], threshold=threshold)

    cold = []
    for p in prompts:
        qwen3_llm.reset_prefix_cache()
        cold.append(generate(qwen3_llm, [p], adaptive)[0])
    cold_p, cold_applied = p_fails(qwen3_llm, cold)

    qwen3_llm.reset_prefix_cache()
    before = _rpc(qwen3_llm, "stats")["prefix_tokens_restored"]
    generate(qwen3_llm, [shared + [11, 12, 13]], adaptive)  # computes the shared blocks
    warm = generate(qwen3_llm, prompts, adaptive)  # one batch, each hits its prefix
    restored = _rpc(qwen3_llm, "stats")["prefix_tokens_restored"] - before
    warm_p, warm_applied = p_fails(qwen3_llm, warm)

    assert restored == 32 * (4 + 2 + 3 + 1)  # every shared block came from the cache
    torch.testing.assert_close(torch.tensor(warm_p), torch.tensor(cold_p), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(warm_p), torch.tensor(offline), atol=ATOL, rtol=0)
    assert warm_applied == cold_applied == [p >= threshold for p in offline]
    assert tokens(warm) == tokens(cold)  # same decisions, same steering, same tokens


def test_without_block_states_an_adaptive_request_computes_its_prompt(qwen3_llm, qwen3_dir,
                                                                      qwen3_profiles):
    """An unsteered request caches the prompt's KV but leaves no predictor
    states: the adaptive request after it must not read those blocks."""
    profile = SteeringProfile.load(qwen3_profiles["pred"])
    prompt = prompt_ids(1, 100, seed=42)[0]
    qwen3_llm.reset_prefix_cache()
    generate(qwen3_llm, [prompt], params())
    before = _rpc(qwen3_llm, "stats")["prefix_tokens_restored"]
    out = generate(qwen3_llm, [prompt], adaptive_params(qwen3_profiles["pred"]))
    assert _rpc(qwen3_llm, "stats")["prefix_tokens_restored"] == before
    (p,), _ = p_fails(qwen3_llm, out)
    assert p == pytest.approx(offline_p_fail(qwen3_dir, profile, prompt), abs=ATOL)


def test_unsteered_requests_reuse_steered_prompt_blocks_bitwise(qwen3_llm, qwen3_stock):
    """Adaptive requests, and `always` requests that declare a decode-only
    profile (as the HTTP API does), leave their prompt blocks unsalted: an
    unsteered request with the same prompt reads them and still matches stock
    vLLM token for token and logprob for logprob."""
    prompts = prompt_ids(2, 100, seed=43)
    want = generate(qwen3_stock, prompts, params(logprobs=2))
    for steering, declared in (({"mode": "adaptive", "profile": "pred", "threshold": 0.0}, None),
                               ({"mode": "always", "profile": "a", "alpha": 2.0}, 0)):
        qwen3_llm.reset_prefix_cache()
        steered_params = params(steering)
        if declared is not None:
            steered_params.extra_args[PROMPT_POSITIONS_KEY] = declared
        steered = generate(qwen3_llm, prompts, steered_params)
        got = generate(qwen3_llm, prompts, params(logprobs=2))
        assert tokens(steered) != tokens(want)  # they were steered
        assert tokens(got) == tokens(want)
        for g, w in zip(got, want):
            assert [lp[t].logprob for lp, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)] \
                == [lp[t].logprob for lp, t in zip(w.outputs[0].logprobs, w.outputs[0].token_ids)]
