"""Qwen2 and Llama: the steered classes load, steer like the HF reference, and
leave unsteered requests identical to stock vLLM."""

from __future__ import annotations

import pytest
import torch

from adaras.profile import SteeringProfile
from adaras.tiny_models import make_tiny_model

from .conftest import generate, make_profiles, prompt_ids, shutdown, start_llm, stats
from .test_steered_engine import engine_logprobs, hf_logprobs, params, tokens

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def arch_setup(request, models_dir, tmp_path_factory):
    model_dir = make_tiny_model(models_dir / request.param, request.param, seed=5)
    profiles = make_profiles(model_dir, tmp_path_factory.mktemp(f"profiles-{request.param}"))
    stock = start_llm(model_dir, plugin_on=False)
    prompts = prompt_ids(6, 50, seed=30)
    stock_tokens = tokens(generate(stock, prompts, params()))
    shutdown(stock)
    llm = start_llm(model_dir, profiles=profiles)
    yield model_dir, profiles, llm, prompts, stock_tokens
    shutdown(llm)


def test_unsteered_match_stock_beside_steered(arch_setup):
    _, _, llm, prompts, stock_tokens = arch_setup
    mixed = [params({"mode": "always", "profile": "a", "alpha": 1.0}) if i % 2 else params()
             for i in range(len(prompts))]
    got = tokens(generate(llm, prompts, mixed))
    for i in range(0, len(prompts), 2):
        assert got[i] == stock_tokens[i]
    assert any(got[i] != stock_tokens[i] for i in range(1, len(prompts), 2))


def test_unsteered_requests_run_the_compiled_plain_graph(arch_setup):
    _, _, llm, prompts, stock_tokens = arch_setup
    before = stats(llm)
    got = tokens(generate(llm, prompts[:2], params()))
    after = stats(llm)
    assert after["plain_graph"] == "compiled"
    assert after["forwards_plain"] > before["forwards_plain"]
    assert after["steering_op_calls"] == before["steering_op_calls"]
    assert got == stock_tokens[:2]


def test_steered_logprobs_match_hf_hook(arch_setup):
    model_dir, profiles, llm, prompts, _ = arch_setup
    profile = SteeringProfile.load(profiles["b"])
    out = generate(llm, [prompts[0]], params({"mode": "always", "profile": "b", "alpha": 0.7},
                                             logprobs=1))[0]
    want = hf_logprobs(model_dir, profile, 0.7, prompts[0], list(out.outputs[0].token_ids))
    torch.testing.assert_close(engine_logprobs(out), want, atol=2e-3, rtol=1e-3)
