"""The answer probe in the engine against its reference: the profile's answer
head on Hugging Face teacher-forced activations of the same positions (the
prompt plus every generated token but the last), fp32, atol 1e-5 — in a
mixed batch under chunked prefill, per choice with n > 1, on a prefix-cache
hit, steered, and under adaptive gating."""

from __future__ import annotations

import pytest
import torch
import transformers
from vllm import SamplingParams

from adaras.engine import reports_of
from adaras.profile import SteeringProfile
from tests.helpers.hf import capture_neurons, steering_hooks

from .conftest import generate, prompt_ids, stats
from .test_steered_engine import offline_p_fail

pytestmark = pytest.mark.engine

MAX_TOKENS = 12


def probe(mode: str = "off", **kw) -> dict:
    return {"mode": mode, "profile": "pred", "answer_probe": True, **kw}


def params(steering=None, **kw) -> SamplingParams:
    kw = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, **kw}
    return SamplingParams(**kw, extra_args={"steering": steering} if steering else None)


@pytest.fixture(scope="module")
def hf(qwen3_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def pred(qwen3_profiles) -> SteeringProfile:
    return SteeringProfile.load(qwen3_profiles["pred"])


def offline_answer_p(model, profile: SteeringProfile, prompt: list[int], completion: list[int],
                     alpha: float | None = None) -> float:
    """The answer head on teacher-forced activations at positions
    len(prompt) .. len(prompt) + len(completion) - 2 (with `alpha`: steered from
    the first generated position, features read before this layer's steering)."""
    head = profile.answer_predictor
    ids = torch.tensor([prompt + completion[:-1]])
    with torch.no_grad(), capture_neurons(model, head.feature_layers,
                                          head.feature_neurons) as feats:
        if alpha is None:
            model(ids)
        else:  # registered after the capture: the capture reads the pre-steering value
            with steering_hooks(model, profile, alpha, start=len(prompt)):
                model(ids)
    return head.prob(feats[0][0][len(prompt):])


def answer_p(out, choice: int = 0) -> float:
    return out.outputs[choice].steering["answer_failure_probability"]


def test_in_engine_answer_p_fail_matches_hf_in_a_mixed_batch(qwen3_llm, hf, pred):
    # 33..90-token prompts at 32 tokens per step: chunked prefills beside decodes
    prompts = [prompt_ids(1, n, seed=60 + n)[0] for n in (45, 33, 90, 60, 70)]
    mix = [probe(), None, probe(), {"mode": "always", "profile": "a"}, probe()]
    outs = generate(qwen3_llm, prompts, [params(s) for s in mix])
    plain = generate(qwen3_llm, prompts, params())
    for out, base, prompt, s in zip(outs, plain, prompts, mix):
        completion = list(out.outputs[0].token_ids)
        if s is None or not s.get("answer_probe"):
            assert "answer_failure_probability" not in (out.outputs[0].steering or {})
            continue
        assert completion == list(base.outputs[0].token_ids)  # probing never changes output
        assert out.outputs[0].steering["applied"] is False
        want = offline_answer_p(hf, pred, prompt, completion)
        assert answer_p(out) == pytest.approx(want, abs=1e-5)
    assert stats(qwen3_llm)["requests"] == 0


def test_each_of_n_choices_gets_its_own_answer_p_fail(qwen3_llm, hf, pred):
    prompt = prompt_ids(1, 40, seed=70)[0]
    out = generate(qwen3_llm, [prompt], params(probe(), n=4, temperature=1.0, seed=3))[0]
    got, want = [], []
    for i, choice in enumerate(out.outputs):
        got.append(answer_p(out, i))
        want.append(offline_answer_p(hf, pred, prompt, list(choice.token_ids)))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
    assert len({round(p, 6) for p in got}) > 1, "sampled choices should differ"


def test_a_prefix_cache_hit_gives_the_same_answer_p_fail(qwen3_llm, hf, pred):
    prompt = prompt_ids(1, 80, seed=71)[0]  # 2 full blocks of 32 cached after the first
    qwen3_llm.reset_prefix_cache()
    first = generate(qwen3_llm, [prompt], params(probe()))[0]
    second = generate(qwen3_llm, [prompt], params(probe()))[0]
    assert (second.num_cached_tokens or 0) >= 64, "the test needs a prefix-cache hit"
    completion = list(first.outputs[0].token_ids)
    want = offline_answer_p(hf, pred, prompt, completion)
    assert answer_p(first) == pytest.approx(want, abs=1e-5)
    assert answer_p(second) == pytest.approx(want, abs=1e-5)


def test_a_steered_answer_is_probed_on_its_pre_steering_activations(qwen3_llm, hf, pred):
    prompt = prompt_ids(1, 50, seed=72)[0]
    out = generate(qwen3_llm, [prompt], params(probe("always", alpha=1.0)))[0]
    report = out.outputs[0].steering
    assert report["applied"] is True
    completion = list(out.outputs[0].token_ids)
    want = offline_answer_p(hf, pred, prompt, completion, alpha=1.0)
    assert answer_p(out) == pytest.approx(want, abs=1e-5)
    unsteered = offline_answer_p(hf, pred, prompt, completion)
    assert abs(unsteered - want) > 1e-4, "control: steering should move the features"


def test_adaptive_requests_get_both_heads(qwen3_llm, qwen3_dir, hf, pred):
    prompt = prompt_ids(1, 70, seed=73)[0]
    out = generate(qwen3_llm, [prompt], params(probe("adaptive", threshold=1.0)))[0]
    report = out.outputs[0].steering
    assert report["applied"] is False
    assert report["failure_probability"] == pytest.approx(
        offline_p_fail(qwen3_dir, pred, prompt), abs=1e-4)
    want = offline_answer_p(hf, pred, prompt, list(out.outputs[0].token_ids))
    assert answer_p(out) == pytest.approx(want, abs=1e-5)


def test_a_one_token_answer_reports_no_probability(qwen3_llm):
    out = generate(qwen3_llm, prompt_ids(1, 20, seed=74), params(probe(), max_tokens=1))[0]
    assert out.outputs[0].steering["answer_failure_probability"] is None
    assert reports_of([out])[out.request_id]["mode"] == "off"
