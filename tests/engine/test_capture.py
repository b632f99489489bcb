"""The engine's activation-capture path (used by `adaras identify` and
`adaras train-predictor`) against a teacher-forced Hugging Face forward."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from adaras.engine import pop_captures
from tests.helpers.hf import capture_neurons, mean_activations

from .conftest import generate, prompt_ids

pytestmark = pytest.mark.engine

FEATURES = [[0, 3], [1, 0], [1, 95], [0, 50], [1, 17]]


def capture_params(spec, steering=None):
    extra = {"adaras_capture": spec}
    if steering is not None:
        extra["steering"] = steering
    return SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra)


@pytest.fixture(scope="module")
def hf_model(qwen3_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32)


def test_capture_matches_hf_teacher_forcing_under_chunked_prefill(qwen3_llm, hf_model):
    # 40..100 tokens with max_num_batched_tokens=32: every prompt spans 2-4 steps,
    # and the mean starts inside a later chunk for some of them.
    prompts = [prompt_ids(1, n, seed=300 + n)[0] for n in (40, 71, 100)]
    starts = [5, 50, 33]
    specs = [{"mean_from": s, "features": FEATURES} for s in starts]
    outs = [generate(qwen3_llm, [p], capture_params(spec))[0] for p, spec in zip(prompts, specs)]
    caps = pop_captures(qwen3_llm, [o.request_id for o in outs])
    layers = torch.tensor([f[0] for f in FEATURES])
    neurons = torch.tensor([f[1] for f in FEATURES])
    for out, prompt, start in zip(outs, prompts, starts):
        cap = caps[out.request_id]
        assert cap["count"] == len(prompt) - start
        want = mean_activations(hf_model, prompt, start)  # [L, I]
        torch.testing.assert_close(torch.from_numpy(cap["mean"]), want, atol=1e-4, rtol=1e-4)
        with torch.no_grad(), capture_neurons(hf_model, layers, neurons) as feats:
            hf_model(torch.tensor([prompt]))
        assert cap["tokens"].shape == (len(prompt), len(FEATURES))
        torch.testing.assert_close(torch.from_numpy(cap["tokens"]), feats[0][0],
                                   atol=1e-4, rtol=1e-4)


def test_capture_is_unaffected_by_batching_prefix_cache_and_steering(qwen3_llm, hf_model):
    prompt = prompt_ids(1, 64, seed=777)[0]
    spec = {"mean_from": 10, "features": FEATURES, "tokens_until": 20}
    want = mean_activations(hf_model, prompt, 10)
    # The same prompt twice (the second could be served from the prefix cache),
    # next to steered and unsteered requests, in one batch.
    others = prompt_ids(3, 50, seed=778)
    outs = generate(qwen3_llm, [prompt, prompt] + others,
                    [capture_params(spec), capture_params(spec),
                     SamplingParams(max_tokens=4, extra_args={"steering": {"mode": "always",
                                                                           "profile": "a"}}),
                     SamplingParams(max_tokens=4),
                     capture_params({"mean_from": 0})])
    caps = pop_captures(qwen3_llm, [o.request_id for o in outs])
    for o in outs[:2]:
        torch.testing.assert_close(torch.from_numpy(caps[o.request_id]["mean"]), want,
                                   atol=1e-4, rtol=1e-4)
        assert caps[o.request_id]["tokens"].shape == (20, len(FEATURES))
    assert outs[2].request_id not in caps and outs[3].request_id not in caps
    assert "tokens" not in caps[outs[4].request_id]
    assert pop_captures(qwen3_llm, [o.request_id for o in outs]) == {}  # popped once


@pytest.mark.parametrize("spec, message", [
    ({"mean_from": -1}, "adaras_capture.mean_from"),
    ({"features": [[0]]}, "adaras_capture.features"),
    ({"features": []}, "adaras_capture.features"),
    ({"tokens_until": 3}, "needs 'features'"),
    ({"means": 0}, "adaras_capture.means: unknown field"),
    ("all", "must be an object"),
])
def test_bad_capture_spec_is_refused(qwen3_llm, spec, message):
    with pytest.raises(ValueError, match=message):
        generate(qwen3_llm, prompt_ids(1, 8), capture_params(spec))


def test_capture_of_a_feature_outside_the_model_reports_an_error(qwen3_llm):
    out = generate(qwen3_llm, prompt_ids(1, 8, seed=5), capture_params({"features": [[99, 0]]}))
    caps = pop_captures(qwen3_llm, [out[0].request_id])
    assert "outside the model" in caps[out[0].request_id]["error"]
