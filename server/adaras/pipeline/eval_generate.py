"""`adaras eval`, generate: the answers every config still owes, in
submission order (`pending`; the noise arm's problems in another seeded
order), through the steered engine, appended as they finish."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adaras import confidence
from adaras.pipeline.data import Problem
from adaras.pipeline.eval_args import EvalArgs
from adaras.pipeline.grade import grade_all
from adaras.pipeline.llm import (
    Job,
    run_jobs,
)
from adaras.pipeline.run import append_jsonl, read_jsonl


def pending(configs, problems, args: EvalArgs, path: Path) -> list[tuple[str, str, Problem]]:
    """(key, config, problem) of every job not yet answered in `path`, in
    submission order: config by config, each in its config_problems order."""
    done = {r["key"] for r in read_jsonl(path)}
    return [(key, name, p) for name in configs for p in config_problems(name, problems, args)
            if (key := f"{name}|{p.id}") not in done]


def generate_all(llm, todo: list[tuple[str, str, Problem]], prompts, configs, args: EvalArgs,
                 path: Path, chunk: int, on_progress=None, vocab: int | None = None) -> dict:
    """Generate the `todo` jobs (see `pending`), appending each answer to
    `path`; returns the throughput of this call (see run_jobs). With
    `args.logprobs` each row also keeps its per-token confidence arrays
    (adaras.confidence: "lp", "conf", "sc"; the alternatives' ids and text are
    not kept), computed from the raw top-k logprobs over `vocab` tokens."""
    from vllm import SamplingParams

    params = {name: SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                   logprobs=args.logprobs or None,
                                   extra_args={"steering": steering} if steering else None)
              for name, steering in configs.items()}
    by_key = {key: (name, p) for key, name, p in todo}
    jobs = [Job(key, prompts[p.id], params[name]) for key, name, p in todo]

    def on_done(results):
        probs = [by_key[j.key][1] for j, _, _ in results]
        grades = grade_all(probs, [o.outputs[0].text for _, o, _ in results])
        append_jsonl(path, [
            {"key": j.key, "config": by_key[j.key][0], "problem": p.id,
             "completion": o.outputs[0].text, "tokens": len(o.outputs[0].token_ids),
             "finish_reason": o.outputs[0].finish_reason, "correct": g.correct,
             "extracted": g.extracted, "steering": rep,
             **({"confidence": confidence.from_vllm(o.outputs[0].token_ids,
                                                    o.outputs[0].logprobs, vocab, args.logprobs)}
                if args.logprobs else {})}
            for (j, o, rep), p, g in zip(results, probs, grades)])

    return run_jobs(llm, jobs, on_done,
                    f"evaluate {len(configs)} configs: {len(jobs)} answers", chunk,
                    on_progress=on_progress)


def config_problems(name: str, problems: list[Problem], args: EvalArgs) -> list[Problem]:
    """The problems a config runs, in the order its jobs are submitted: all of
    them in order, except the noise arm (the first --noise-problems, shuffled)."""
    if name != "noise":
        return problems
    subset = problems[:args.noise_problems or len(problems)]
    order = np.random.default_rng(args.seed + 7).permutation(len(subset))
    return [subset[i] for i in order]
