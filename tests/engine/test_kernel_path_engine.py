"""The engine on the kernel path (the launches a CUDA graph would capture:
`step.launch_kernels_` over buffers filled in place) run on CPU tensors under
the Triton interpreter: a mixed batch (always, adaptive, off, answer probes;
chunked prefills) gives the CPU path's tokens, p_fail and answer p_fail."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from adaras.engine import reports_of

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
