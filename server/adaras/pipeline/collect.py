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
from adaras.pipeline.grade import grade_all
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
        llm = open_engine(engine)
        tok = llm.get_tokenizer()
        prompts = {p.id: prompt_ids(tok, build_messages(p)) for p in problems}
        run.record_throughput("greedy", generate_greedy(
            llm, problems, prompts, args, out / "greedy.jsonl", engine.chunk))
        run.record_throughput("samples", generate_samples(
            llm, problems[:args.probe], prompts, args, out / "samples.jsonl", engine.chunk))
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
              description: str, chunk: int) -> dict:
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

    return run_jobs(llm, jobs, on_done, description, chunk)


def generate_greedy(llm, problems, prompts, args: CollectArgs, path: Path, chunk: int) -> dict:
    from vllm import SamplingParams

    done = {r["key"] for r in read_jsonl(path)}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop=args.stop)
    jobs = [Job(f"{p.id}#greedy", prompts[p.id], params) for p in problems
            if f"{p.id}#greedy" not in done]
    return _generate(llm, jobs, {f"{p.id}#greedy": (p, -1) for p in problems}, path,
                     "greedy answers", chunk)


def sample_key(problem: str, sample: int) -> str:
    return f"{problem}#{sample}"


def sample_jobs(problems, prompts, samples: int, seed: int, done: set[str],
                **params) -> tuple[dict[str, tuple[Problem, int]], list[Job]]:
    """`samples` draws per problem, keyed `<id>#<s>`, each with its own seed
    (`seed * 100003 + its number`), which makes every trace reproducible and
    resumable; jobs for the keys not `done`. params: SamplingParams fields."""
    from vllm import SamplingParams

    by_key, jobs = {}, []
    for p in problems:
        for s in range(samples):
            key = sample_key(p.id, s)
            by_key[key] = (p, s)
            if key not in done:
                jobs.append(Job(key, prompts[p.id], SamplingParams(
                    **params, seed=seed * 100003 + len(by_key))))
    return by_key, jobs


def generate_samples(llm, probe, prompts, args: CollectArgs, path: Path, chunk: int) -> dict:
    by_key, jobs = sample_jobs(probe, prompts, args.samples, args.seed,
                               {r["key"] for r in read_jsonl(path)},
                               temperature=args.temperature, top_p=args.top_p,
                               max_tokens=args.max_tokens, stop=args.stop)
    return _generate(llm, jobs, by_key, path, f"sampled traces (T={args.temperature})", chunk)


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
        if r["finish_reason"] == "length":
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
        "greedy_accuracy": sum(r["correct"] for r in greedy) / max(len(greedy), 1),
        "sample_accuracy": sum(r["correct"] for r in samples) / max(len(samples), 1),
        "problems_with_both": kept, "pairs": len(pairs),
        "greedy_truncated": sum(r["finish_reason"] == "length" for r in greedy),
        "samples_truncated": sum(r["finish_reason"] == "length" for r in samples),
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
        acc.setdefault(r["problem"], []).append(r["correct"])
    values = [sum(v) / len(v) for v in acc.values()]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(values, bins=[i / 10 for i in range(11)], color="#4472c4", edgecolor="white")
    ax.set_xlabel("fraction of sampled traces correct")
    ax.set_ylabel("probe problems")
    ax.set_title("Probe problems by sample accuracy")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
