"""Decode speed by dtype: bf16 against float32 on this CPU, side by side.

    python benchmarks/bench_dtype.py [--model smollm2-135m-instruct] [--requests 32]
        [--max-tokens 128] [--out results.json]

Each dtype runs in its own engine process, one after the other: `--requests`
greedy requests in flight at once (short prompts, EOS ignored, so every
request generates exactly `--max-tokens`), eager, both cores. Prints the
generated tokens/s of each and the ratio float32 / bf16. On a CPU without
native bf16 (no AVX512-BF16, no AMX) vLLM emulates bf16, and `adaras serve`
runs float32 there for this reason; the MATH study's stages are registered in
bf16 and need a CPU with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DTYPES = ("bfloat16", "float32")


def one(model: str, dtype: str, requests: int, max_tokens: int) -> dict:
    """Runs in the child: one engine, one timed batch."""
    from vllm import LLM, SamplingParams

    from adaras.zoo import resolve_model

    llm = LLM(str(resolve_model(model)), dtype=dtype, enforce_eager=True,
              max_num_seqs=requests, max_model_len=2048)
    prompts = [f"Problem {i}: find all real x with x^2 - {i + 3}x + {i} = 0. "
               "Reason step by step." for i in range(requests)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                ignore_eos=True))
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"dtype": dtype, "tokens": tokens, "seconds": round(seconds, 1),
            "tok_s": round(tokens / seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", choices=DTYPES, help=argparse.SUPPRESS)  # the child's dtype
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.model, args.one, args.requests, args.max_tokens)),
              flush=True)
        return

    from adaras.engine.dtype import cpu_without_native_bf16

    env = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4", **os.environ}
    rows = {}
    for dtype in DTYPES:
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", dtype, "--model", args.model,
                              "--requests", str(args.requests),
                              "--max-tokens", str(args.max_tokens)],
                             capture_output=True, text=True, env=env, start_new_session=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{dtype}: the engine failed:\n{out.stderr[-3000:]}")
        rows[dtype] = json.loads(line.removeprefix("RESULT "))
        print(f"{dtype:9} {rows[dtype]['tokens']} tokens in {rows[dtype]['seconds']} s: "
              f"{rows[dtype]['tok_s']} tok/s", flush=True)
    ratio = rows["float32"]["tok_s"] / rows["bfloat16"]["tok_s"]
    native = not cpu_without_native_bf16()
    print(f"float32 / bf16: {ratio:.2f}  ({args.model}; this CPU "
          f"{'has' if native else 'has no'} native bf16)")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "requests": args.requests,
                                        "max_tokens": args.max_tokens, "native_bf16": native,
                                        "rows": rows, "ratio_float32_to_bf16": ratio},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
