"""Where a steered decode step's time goes: torch's profiler over the engine.

    python benchmarks/profile_step.py [--model smollm2-135m-instruct] [--requests 32]
        [--max-tokens 64] [--out docs/profile_step.json]

Runs vLLM's engine core and worker in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so the profiler sees the model runner.
For steering off, always and adaptive it generates --requests requests of
exactly --max-tokens tokens (greedy, ignore_eos, short prompts: the steps are
decode steps): twice untimed, then --repeats timed runs (best tok/s), then one
run with wall-clock timers around

    steer_op                  the steering op, called once per layer per forward
                              (from the profiled run: the profiler inflates it)
      add_steering_           of which: the sparse add on steered rows
      gather_features         of which: the predictor's feature gather (adaptive prompts)
    begin_step                planning before each forward (slot index, tables, plans)
    end_step                  after each forward (predictor folds, reports)

(their share of that run's wall time), and one run under torch.profiler (CPU
activities), whose top operators by self time are saved with --out. The
timers are added by this script; the engine itself carries none. The
profiler's own cost inflates small operators, so shares come from the timers.
A second process (ADARAS_PLUGIN=0) measures stock vLLM's tok/s for the same
load the same way.
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

MARKS = ("steer_op", "add_steering_", "gather_features", "begin_step", "end_step")
TIMERS: dict[str, list] = {m: [0.0, 0] for m in MARKS}


def prompts(n: int) -> list[str]:
    return [f"Question {i}: what is {i} plus {i + 7}? Think step by step." for i in range(n)]


def timed(fn, name: str):
    """fn, adding its wall time and calls to TIMERS[name]."""
    clock, cell = time.perf_counter, TIMERS[name]

    def wrapper(*args, **kwargs):
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            cell[0] += clock() - t0
            cell[1] += 1
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
    for _ in range(2):
        run(llm, None, args)
    wall = min(run(llm, None, args) for _ in range(args.repeats))
    print(json.dumps({"tok_s": args.requests * args.max_tokens / wall}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
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
                          str(args.max_tokens), "--repeats", str(args.repeats)],
                         env=dict(os.environ, ADARAS_PLUGIN="0"),
                         capture_output=True, text=True, check=True)
    stock_tok_s = json.loads(res.stdout.strip().splitlines()[-1])["tok_s"]

    models.add_steering_ = timed(models.add_steering_, "add_steering_")
    models.gather_planned_features_ = timed(models.gather_planned_features_, "gather_features")
    runtime.SteeringRuntime.begin_step = timed(runtime.SteeringRuntime.begin_step, "begin_step")
    runtime.SteeringRuntime.end_step = timed(runtime.SteeringRuntime.end_step, "end_step")
    llm = engine(args.model_dir, str(bundled_profile(args.model)), args.requests)
    rows, top = {}, {}
    for mode in ("off", "always", "adaptive"):
        steering = {"mode": mode, "profile": "p", "threshold": 0.0} if mode == "adaptive" \
            else {"mode": mode, "profile": "p"} if mode == "always" else None
        for _ in range(2):
            run(llm, steering, args)  # warm
        best = min(run(llm, steering, args) for _ in range(args.repeats))
        for cell in TIMERS.values():
            cell[0], cell[1] = 0.0, 0
        wall = run(llm, steering, args)
        rows[mode] = {"tok_s": args.requests * args.max_tokens / best, "timed_wall_s": wall,
                      **{m: {"s": t, "calls": c, "fraction": t / wall}
                         for m, (t, c) in TIMERS.items()}}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled = run(llm, steering, args)
        op = next((e for e in prof.key_averages() if e.key == "vllm::adaras_steer_"), None)
        if op is not None:  # the registered op keeps the function it was given: profiler only
            rows[mode]["steer_op"] = {"s": op.cpu_time_total / 1e6, "calls": op.count,
                                      "fraction": op.cpu_time_total / 1e6 / profiled}
        top[mode] = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                     for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
                     [:15]]
    lines = [f"{args.model}, {args.requests} requests x {args.max_tokens} tokens, greedy; "
             f"stock vLLM {stock_tok_s:.1f} tok/s",
             "| mode | tok/s | vs stock | " + " | ".join(MARKS) + " |",
             "|---" * (3 + len(MARKS)) + "|"]
    for mode, r in rows.items():
        cells = [f"{100 * r[m]['fraction']:.2f}% ({r[m]['calls']})" if r[m]["calls"] else "-"
                 for m in MARKS]
        lines.append(f"| {mode} | {r['tok_s']:.1f} | {r['tok_s'] / stock_tok_s:.3f} | "
                     + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"stock_tok_s": stock_tok_s, "rows": rows,
                                        "top_ops": top, "table": lines}, indent=1))


if __name__ == "__main__":
    main()
