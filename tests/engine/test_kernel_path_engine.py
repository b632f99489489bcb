"""The engine on the kernel path (the launches a CUDA graph would capture:
`step.launch_kernels_` over buffers filled in place) run on CPU tensors under
the Triton interpreter: a mixed batch (always, adaptive, off, answer probes;
chunked prefills) gives the CPU path's tokens, p_fail and answer p_fail, and
the offline pipeline's activation captures (means and tokens, concurrent,
chunked) equal the CPU path's."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from adaras.engine import pop_captures, reports_of

from .conftest import _env, generate, prompt_ids, shutdown, start_llm, stats

pytest.importorskip("triton")


def params(steering=None):
    return SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                          extra_args={"steering": steering} if steering else None)


@pytest.fixture(scope="module")
def kernel_llm(qwen3_dir, qwen3_profiles):
    with _env(ADARAS_KERNEL_PATH="1", TRITON_INTERPRET="1"):  # inherited by the workers
        llm = start_llm(qwen3_dir, profiles=qwen3_profiles)
    yield llm
    shutdown(llm)


def run_mix(llm):
    prompts = prompt_ids(6, 70, seed=41)  # 70 tokens, 32 per step: chunked prefills
    mix = [{"mode": "always", "profile": "a", "alpha": 0.5}, {"mode": "adaptive",
           "profile": "pred", "threshold": 0.0, "answer_probe": True}, None,
           {"mode": "adaptive", "profile": "pred", "threshold": 1.0},
           {"mode": "always", "profile": "b"},
           {"mode": "off", "profile": "pred", "answer_probe": True}]
    outs = [generate(llm, [p], params(s))[0] for p, s in zip(prompts, mix)]  # one at a time
    together = generate(llm, prompts, [params(s) for s in mix])  # and in one batch
    return outs, together


def test_the_kernel_path_gives_the_cpu_paths_tokens_and_p_fail(kernel_llm, qwen3_llm):
    assert stats(kernel_llm)["requests"] == 0
    for outs_k, outs_c in zip(run_mix(kernel_llm), run_mix(qwen3_llm)):
        assert [list(o.outputs[0].token_ids) for o in outs_k] == \
            [list(o.outputs[0].token_ids) for o in outs_c]
        rk, rc = reports_of(outs_k), reports_of(outs_c)
        pk = [rk.get(o.request_id, {}).get("failure_probability") for o in outs_k]
        pc = [rc.get(o.request_id, {}).get("failure_probability") for o in outs_c]
        assert [p is None for p in pk] == [p is None for p in pc]
        torch.testing.assert_close(torch.tensor([p for p in pk if p is not None]),
                                   torch.tensor([p for p in pc if p is not None]),
                                   atol=1e-5, rtol=1e-5)
        assert [rk[o.request_id]["applied"] for o in outs_k if o.request_id in rk] == \
            [rc[o.request_id]["applied"] for o in outs_c if o.request_id in rc]
        ak = [rk.get(o.request_id, {}).get("answer_failure_probability") for o in outs_k]
        ac = [rc.get(o.request_id, {}).get("answer_failure_probability") for o in outs_c]
        assert sum(a is not None for a in ak) == 2 and [a is None for a in ak] == \
            [a is None for a in ac]
        torch.testing.assert_close(torch.tensor([a for a in ak if a is not None]),
                                   torch.tensor([a for a in ac if a is not None]),
                                   atol=1e-5, rtol=1e-5)
    assert stats(kernel_llm)["requests"] == 0


FEATURES = [[0, 3], [1, 0], [1, 95], [0, 50], [1, 17]]


def run_captures(llm):
    """Captures of means and tokens, concurrent, over chunked prompts (32 tokens
    a step), next to a steered and an adaptive request; the last request is
    adaptive and captures tokens (refused on the kernel path)."""
    prompts = [prompt_ids(1, n, seed=500 + n)[0] for n in (40, 71, 100, 33, 50, 60, 45)]
    specs = [{"mean_from": 5, "features": FEATURES}, {"mean_from": 50},
             {"mean_from": 33, "features": FEATURES, "tokens_until": 60},
             {"features": FEATURES[:2]}, None, None, {"features": FEATURES}]
    steering = [None, {"mode": "always", "profile": "a"}, None, None,
                {"mode": "always", "profile": "b"}, {"mode": "adaptive", "profile": "pred"},
                {"mode": "adaptive", "profile": "pred"}]
    params = [SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True,
                             extra_args={k: v for k, v in (("adaras_capture", c),
                                                           ("steering", s)) if v})
              for c, s in zip(specs, steering)]
    outs = generate(llm, prompts, params)
    return outs, pop_captures(llm, [o.request_id for o in outs])


def test_the_kernel_path_gives_the_cpu_paths_captures(kernel_llm, qwen3_llm):
    outs_k, caps_k = run_captures(kernel_llm)
    outs_c, caps_c = run_captures(qwen3_llm)
    assert [list(o.outputs[0].token_ids) for o in outs_k] == \
        [list(o.outputs[0].token_ids) for o in outs_c]
    for ok, oc in zip(outs_k[:4], outs_c[:4]):
        k, c = caps_k[ok.request_id], caps_c[oc.request_id]
        assert sorted(k) == sorted(c) and k["count"] == c["count"], (k.keys(), c.keys())
        for key in ("mean", "tokens"):
            if key in c:
                torch.testing.assert_close(torch.tensor(k[key]), torch.tensor(c[key]),
                                           atol=1e-5, rtol=1e-5)
    assert caps_c[outs_c[0].request_id]["tokens"].shape == (40, len(FEATURES))
    assert outs_k[4].request_id not in caps_k and outs_k[5].request_id not in caps_k
    assert "adaptive" in caps_k[outs_k[6].request_id]["error"]  # a token row feeds one gather
    assert "tokens" in caps_c[outs_c[6].request_id]  # the CPU path captures it
    assert stats(kernel_llm)["captures"] == 0
