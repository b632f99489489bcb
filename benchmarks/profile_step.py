"""Where a steered decode step's time goes: torch's profiler over the engine.

    python benchmarks/profile_step.py [--model smollm2-135m-instruct] [--requests 32]
        [--max-tokens 64] [--out docs/profile_step.json]

Runs vLLM's engine core and worker in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so the profiler sees the model runner.
For steering off, always and adaptive it generates --requests requests of
exactly --max-tokens tokens (greedy, ignore_eos, short prompts: the steps are
decode steps) once untimed, then once under torch.profiler (CPU activities),
and sums the time of:

    vllm::adaras_steer_       the steering op, called once per layer per forward
      add_steering_           of which: the sparse add on steered rows
      gather features         of which: the predictor's feature gather (adaptive prompts)
    begin_step                planning before each forward (slot index, tables, plans)
    end_step                  after each forward (predictor folds, reports)

as a fraction of the profiled generate's wall time. The marks are added by
this script around those functions; the engine itself carries none. A second
process (ADARAS_PLUGIN=0) measures stock vLLM's tok/s for the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

MARKS = ("vllm::adaras_steer_", "adaras::add_steering_", "adaras::gather_features",
         "adaras::begin_step", "adaras::end_step")


def prompts(n: int) -> list[str]:
    return [f"Question {i}: what is {i} plus {i + 7}? Think step by step." for i in range(n)]


def marked(fn, name: str):
    import torch

    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return wrapper


def engine(model_dir: str, profile: str | None, requests: int):
    from vllm import LLM

    if profile is not None:
        os.environ["ADARAS_PROFILES"] = f"p={profile}"
    return LLM(model_dir, max_model_len=1024, max_num_seqs=requests, seed=0,
               enable_prefix_caching=False)


def run(llm, steering: dict | None, args) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                            extra_args={"steering": steering} if steering else None)
    t0 = time.perf_counter()
    outs = llm.generate(prompts(args.requests), params, use_tqdm=False)
    wall = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == args.max_tokens for o in outs)
    return wall


def stock(args) -> None:
    """--stock: tok/s of stock vLLM for the same load (plugin off)."""
    llm = engine(args.model_dir, None, args.requests)
    run(llm, None, args)
    wall = min(run(llm, None, args) for _ in range(2))
    print(json.dumps({"tok_s": args.requests * args.max_tokens / wall}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--stock", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stock:
        return stock(args)

    import torch

    from adaras.api.defaults import bundled_profile
    from adaras.engine import models, runtime
    from adaras.zoo import resolve_model

    args.model_dir = str(resolve_model(args.model))
    res = subprocess.run([sys.executable, __file__, "--stock", "--model-dir", args.model_dir,
                          "--requests", str(args.requests), "--max-tokens",
                          str(args.max_tokens)], env=dict(os.environ, ADARAS_PLUGIN="0"),
                         capture_output=True, text=True, check=True)
    stock_tok_s = json.loads(res.stdout.strip().splitlines()[-1])["tok_s"]

    models.add_steering_ = marked(models.add_steering_, "adaras::add_steering_")
    models.gather_planned_features_ = marked(models.gather_planned_features_,
                                             "adaras::gather_features")
    runtime.SteeringRuntime.begin_step = marked(runtime.SteeringRuntime.begin_step,
                                                "adaras::begin_step")
    runtime.SteeringRuntime.end_step = marked(runtime.SteeringRuntime.end_step,
                                              "adaras::end_step")
    llm = engine(args.model_dir, str(bundled_profile(args.model)), args.requests)
    rows = {}
    for mode in ("off", "always", "adaptive"):
        steering = {"mode": mode, "profile": "p", "threshold": 0.0} if mode == "adaptive" \
            else {"mode": mode, "profile": "p"} if mode == "always" else None
        run(llm, steering, args)  # warm
        timed = run(llm, steering, args)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            wall = run(llm, steering, args)
        totals = {e.key: (e.cpu_time_total / 1e6, e.count) for e in prof.key_averages()
                  if e.key in MARKS}
        rows[mode] = {"tok_s": args.requests * args.max_tokens / timed,
                      "profiled_wall_s": wall,
                      **{k: {"s": t, "calls": c, "fraction": t / wall}
                         for k, (t, c) in totals.items()}}
    lines = [f"{args.model}, {args.requests} requests x {args.max_tokens} tokens, greedy; "
             f"stock vLLM {stock_tok_s:.1f} tok/s",
             "| mode | tok/s (unprofiled) | vs stock | " + " | ".join(m.split("::")[1] for m in MARKS)
             + " |", "|---" * (3 + len(MARKS)) + "|"]
    for mode, r in rows.items():
        cells = [f"{100 * r[m]['fraction']:.2f}% ({r[m]['calls']})" if m in r else "-"
                 for m in MARKS]
        lines.append(f"| {mode} | {r['tok_s']:.1f} | {r['tok_s'] / stock_tok_s:.3f} | "
                     + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"stock_tok_s": stock_tok_s, "rows": rows,
                                        "table": lines}, indent=1))


if __name__ == "__main__":
    main()
