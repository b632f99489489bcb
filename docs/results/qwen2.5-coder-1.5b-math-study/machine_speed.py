"""How fast this machine decodes the study's model, in the study's dtype (bf16)
and in fp32: 32 greedy requests in flight, 48 tokens each (EOS ignored),
short prompts, eager, both cores. It tells whether a machine can run the
registered stages (run.sh refuses a CPU without AVX-512 bf16).

    python3 docs/results/qwen2.5-coder-1.5b-math-study/machine_speed.py bfloat16
    python3 docs/results/qwen2.5-coder-1.5b-math-study/machine_speed.py float32

Prints one JSON line: dtype, generated tokens, seconds in generate, tok/s.
Needs the model prepared (`adaras models qwen2.5-coder-1.5b-instruct`).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


def main(dtype: str) -> None:
    from vllm import LLM, SamplingParams

    from adaras.zoo import model_dir

    llm = LLM(str(model_dir("qwen2.5-coder-1.5b-instruct")), dtype=dtype,
              enforce_eager=True, max_num_seqs=32, max_model_len=2048)
    prompts = [f"Problem {i}: find all real x with x^2 - {i + 3}x + {i} = 0. "
               "Reason step by step." for i in range(32)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(json.dumps({"dtype": dtype, "tokens": tokens, "seconds": round(seconds, 1),
                      "tok_s": round(tokens / seconds, 2)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
