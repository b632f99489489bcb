"""Tensor parallelism 2 on the CPU: each rank holds half of every MLP's
neurons and applies only its slice of the profile; predictor features are
gathered per shard and all-reduced. The result must equal TP=1."""

from __future__ import annotations

import pytest
import torch

from adaras.engine import reports_of

from .conftest import _env, generate, prompt_ids, shutdown, start_llm
from .test_steered_engine import engine_logprobs, params, tokens

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def qwen3_tp2(qwen3_dir, qwen3_profiles):
    with _env(VLLM_CPU_OMP_THREADS_BIND="0|1"):
        llm = start_llm(qwen3_dir, profiles=qwen3_profiles, tensor_parallel_size=2)
    yield llm
    shutdown(llm)


def test_tp2_steering_matches_tp1(qwen3_llm, qwen3_tp2):
    prompts = prompt_ids(6, 40, seed=40)
    configs = [None, {"mode": "always", "profile": "a", "alpha": 1.0},
               {"mode": "always", "profile": "b", "alpha": 0.5}] * 2
    ps = [params(c, logprobs=1) for c in configs]
    tp1 = generate(qwen3_llm, prompts, ps)
    tp2 = generate(qwen3_tp2, prompts, ps)
    assert tokens(tp2) == tokens(tp1)
    for a, b in zip(tp1, tp2):
        torch.testing.assert_close(engine_logprobs(b), engine_logprobs(a), atol=1e-3, rtol=1e-3)


def test_tp2_predictor_matches_tp1(qwen3_llm, qwen3_tp2):
    prompts = [prompt_ids(1, n, seed=41 + n)[0] for n in (40, 75)]
    steering = params({"mode": "adaptive", "profile": "pred", "threshold": 0.5})
    p = {}
    for name, llm in (("tp1", qwen3_llm), ("tp2", qwen3_tp2)):
        outs = generate(llm, prompts, steering)
        reports = reports_of(outs)
        p[name] = torch.tensor([reports[o.request_id]["failure_probability"] for o in outs])
    torch.testing.assert_close(p["tp2"], p["tp1"], atol=1e-4, rtol=1e-4)


def test_tp2_answer_probe_matches_tp1(qwen3_llm, qwen3_tp2):
    prompts = [prompt_ids(1, n, seed=43 + n)[0] for n in (40, 75)]
    probe = params({"mode": "off", "profile": "pred", "answer_probe": True})
    p = {}
    for name, llm in (("tp1", qwen3_llm), ("tp2", qwen3_tp2)):
        outs = generate(llm, prompts, probe)
        p[name] = torch.tensor([o.outputs[0].steering["answer_failure_probability"]
                                for o in outs])
    torch.testing.assert_close(p["tp2"], p["tp1"], atol=1e-5, rtol=1e-5)


def test_tp2_capture_joins_the_neuron_shards(qwen3_llm, qwen3_tp2):
    from vllm import SamplingParams

    from adaras.engine import pop_captures

    prompts = [prompt_ids(1, n, seed=50 + n)[0] for n in (40, 75)]
    # features on both sides of the shard boundary (I = 192 -> 96 per rank)
    spec = {"mean_from": 7, "features": [[0, 3], [1, 160], [0, 95], [1, 96]]}
    sp = SamplingParams(max_tokens=1, extra_args={"adaras_capture": spec})
    got = {}
    for name, llm in (("tp1", qwen3_llm), ("tp2", qwen3_tp2)):
        outs = generate(llm, prompts, sp)
        caps = pop_captures(llm, [o.request_id for o in outs])
        got[name] = [caps[o.request_id] for o in outs]
    for a, b in zip(got["tp1"], got["tp2"]):
        assert b["mean"].shape == a["mean"].shape
        torch.testing.assert_close(torch.from_numpy(b["mean"]), torch.from_numpy(a["mean"]),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(b["tokens"]), torch.from_numpy(a["tokens"]),
                                   atol=1e-4, rtol=1e-4)
