"""`adaras collect`: sample traces, grade them, pair correct with incorrect,
and label each problem by the correctness of the model's greedy answer.

Artifacts in <run>/collect/:
  problems.jsonl   the problems (probe problems first)
  greedy.jsonl     one greedy answer per problem + grade  -> predictor labels
  samples.jsonl    N sampled traces per probe problem + grades
  pairs.json       (correct, incorrect) trace pairs from the same prompt
  summary.json     counts and accuracies;  accuracy.png  per-problem sample accuracy
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from adaras.pipeline.data import Problem, build_messages, load_distinct
from adaras.pipeline.grade import counts_as_correct, grade_all, is_cut
from adaras.pipeline.llm import EngineOptions, Job, open_engine, prompt_ids, run_jobs
from adaras.pipeline.run import Run, append_jsonl, read_jsonl, write_json


@dataclass
class CollectArgs:
    dataset: str = "rg:gsm_symbolic"
    problems: int = 200  # greedy-labelled problems (predictor data)
    probe: int = 16  # of these, the first `probe` get N sampled traces (RCN data)
    samples: int = 8
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 512
    pairs_per_problem: int = 4
    difficulty: float | None = None
    seed: int = 0
    options: dict | None = None
    stop: list[str] | None = None  # stop strings for every generation (SamplingParams.stop)


def collect(run: Run, args: CollectArgs, engine: EngineOptions, *, restart: bool = False) -> dict:
    if not 0 < args.probe <= args.problems:
        raise ValueError(f"--probe must be in 1..--problems ({args.problems}), got {args.probe}")
    if args.samples < 2:
        raise ValueError(f"--samples must be >= 2 to find correct and incorrect traces, "
                         f"got {args.samples}")
    with run.stage("collect", {**vars(args), "engine": engine.to_dict()},
                   restart=restart) as out:
        problems, _ = load_distinct(args.dataset, args.problems, seed=args.seed,
                                    difficulty=args.difficulty, options=args.options)
        write_problems(out / "problems.jsonl", problems)
        greedy, samples = out / "greedy.jsonl", out / "samples.jsonl"
        done = {r["key"] for r in read_jsonl(greedy)}
        greedy_todo = [p for p in problems if greedy_key(p.id) not in done]
        samples_todo = pending_samples(problems[:args.probe], args.samples,
                                       {r["key"] for r in read_jsonl(samples)})
        if greedy_todo or samples_todo:  # a resumed stage with every trace in place starts none
            llm = open_engine(engine, run)
            tok = llm.get_tokenizer()
            prompts = {p.id: prompt_ids(tok, build_messages(p)) for p in problems}
            record = run.throughput_recorder("greedy")  # kept up to date as answers come
            record(generate_greedy(llm, greedy_todo, prompts, args, greedy, engine.chunk, record))
            record = run.throughput_recorder("samples")
            record(generate_samples(llm, samples_todo, prompts, args, samples, engine.chunk,
                                    record))
        summary = pair(out, problems, args)
        plot_accuracy(out)
        run.record("collect", **summary)
        return summary


def write_problems(path: Path, problems: list[Problem]) -> None:
    old = read_jsonl(path)
    if old and [r["id"] for r in old] != [p.id for p in problems]:
        raise ValueError(f"{path} holds other problems; use --restart")
    if not old:
        append_jsonl(path, [p.to_json() for p in problems])


def read_problems(path: Path) -> list[Problem]:
    return [Problem.from_json(r) for r in read_jsonl(path)]


def _generate(llm, jobs: list[Job], by_key: dict[str, tuple[Problem, int]], path: Path,
              description: str, chunk: int, on_progress=None) -> dict:
    def on_done(results):
        problems = [by_key[j.key][0] for j, _, _ in results]
        texts = [o.outputs[0].text for _, o, _ in results]
        grades = grade_all(problems, texts)
        append_jsonl(path, [
            {"key": j.key, "problem": p.id, "sample": by_key[j.key][1], "prompt": j.prompt,
             "completion": o.outputs[0].text, "completion_ids": list(o.outputs[0].token_ids),
             "finish_reason": o.outputs[0].finish_reason, "correct": g.correct,
             "extracted": g.extracted, "error": g.error}
            for (j, o, _), p, g in zip(results, problems, grades)])

    return run_jobs(llm, jobs, on_done, description, chunk, on_progress=on_progress)


def greedy_key(problem: str) -> str:
    return f"{problem}#greedy"


def generate_greedy(llm, todo: list[Problem], prompts, args: CollectArgs, path: Path,
                    chunk: int, on_progress=None) -> dict:
    """One greedy answer for each problem of `todo`, appended to `path`."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop=args.stop)
    jobs = [Job(greedy_key(p.id), prompts[p.id], params) for p in todo]
    return _generate(llm, jobs, {greedy_key(p.id): (p, -1) for p in todo}, path,
                     "greedy answers", chunk, on_progress)


def sample_key(problem: str, sample: int) -> str:
    return f"{problem}#{sample}"


def pending_samples(problems, samples: int, done: set[str]) -> list[tuple[str, Problem, int, int]]:
    """`samples` draws per problem, keyed `<id>#<s>`: (key, problem, s, n) of
    each draw not `done`, in order, where n, the draw's 1-based number among
    all of them, seeds it (`seed * 100003 + n`, see sample_jobs), which makes
    every trace reproducible and resumable."""
    todo, n = [], 0
    for p in problems:
        for s in range(samples):
            n += 1
            if (key := sample_key(p.id, s)) not in done:
                todo.append((key, p, s, n))
    return todo


def sample_jobs(todo, prompts, seed: int, **params) -> list[Job]:
    """Jobs for pending_samples' draws; params: SamplingParams fields."""
    from vllm import SamplingParams

    return [Job(key, prompts[p.id], SamplingParams(**params, seed=seed * 100003 + n))
            for key, p, _, n in todo]


def generate_samples(llm, todo, prompts, args: CollectArgs, path: Path, chunk: int,
                     on_progress=None) -> dict:
    """The pending_samples draws `todo`, graded and appended to `path`."""
    jobs = sample_jobs(todo, prompts, args.seed, temperature=args.temperature,
                       top_p=args.top_p, max_tokens=args.max_tokens, stop=args.stop)
    return _generate(llm, jobs, {key: (p, s) for key, p, s, _ in todo}, path,
                     f"sampled traces (T={args.temperature})", chunk, on_progress)


def pair(out: Path, problems: list[Problem], args: CollectArgs) -> dict:
    """Pairs (p+, p-) of traces of the same prompt; up to `pairs_per_problem`
    each, every trace used at most once. A trace cut off by max_tokens is
    neither correct nor incorrect and never enters a pair. Also writes
    summary.json."""
    samples = read_jsonl(out / "samples.jsonl")
    greedy = read_jsonl(out / "greedy.jsonl")
    rng = random.Random(args.seed)
    pairs = []
    per_problem: dict[str, dict[str, list[str]]] = {}
    for r in samples:
        if is_cut(r):
            continue  # cut off: neither correct nor incorrect, so never in a pair
        per_problem.setdefault(r["problem"], {"+": [], "-": []})["+" if r["correct"] else "-"] \
            .append(r["key"])
    kept = 0
    for pid in [p.id for p in problems[:args.probe]]:
        groups = per_problem.get(pid, {"+": [], "-": []})
        pos, neg = sorted(groups["+"]), sorted(groups["-"])
        if not pos or not neg:
            continue
        kept += 1
        rng.shuffle(pos)
        rng.shuffle(neg)
        for a, b in list(zip(pos, neg))[:args.pairs_per_problem]:
            pairs.append({"problem": pid, "correct": a, "incorrect": b})
    write_json(out / "pairs.json", pairs)
    summary = {
        "problems": len(problems), "probe_problems": args.probe,
        "greedy_accuracy": sum(map(counts_as_correct, greedy)) / max(len(greedy), 1),
        "sample_accuracy": sum(map(counts_as_correct, samples)) / max(len(samples), 1),
        "problems_with_both": kept, "pairs": len(pairs),
        "greedy_truncated": sum(is_cut(r) for r in greedy),
        "samples_truncated": sum(is_cut(r) for r in samples),
    }
    write_json(out / "summary.json", summary)
    if not pairs:
        raise RuntimeError(
            f"no probe problem has both a correct and an incorrect trace "
            f"(sample accuracy {summary['sample_accuracy']:.2f}); pick a difficulty where the "
            f"model is right about half the time, or raise --samples/--temperature")
    return summary


def plot_accuracy(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(out / "samples.jsonl")
    acc: dict[str, list[bool]] = {}
    for r in rows:
        acc.setdefault(r["problem"], []).append(counts_as_correct(r))
    values = [sum(v) / len(v) for v in acc.values()]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(values, bins=[i / 10 for i in range(11)], color="#4472c4", edgecolor="white")
    ax.set_xlabel("fraction of sampled traces correct")
    ax.set_ylabel("probe problems")
    ax.set_title("Probe problems by sample accuracy")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
