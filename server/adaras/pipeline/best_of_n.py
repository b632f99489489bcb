"""`adaras best-of-n`: the answer probe put to work on sampled answers.

For each problem of another stage (by default the first --problems of an eval
stage, so that its greedy baseline is the reference), draw --samples answers
at --temperature / --top-p, each request asking for the profile's answer head
(`answer_probe`, unsteered). Then, per problem:

    probe best-of-k   the sample with the lowest answer p_fail among the first k
    first sample      sample 0
    random sample     the expected accuracy of one sample drawn uniformly (the
                      mean correctness of the first k), exact, no draw
    majority vote     the most frequent extracted final answer among the first k
                      (ties: the one seen first), graded by a sample that gave it
    shortest          the sample with the fewest tokens among the first k (ties:
                      the first): a selector that needs no probe
    greedy            the eval stage's baseline arm (when it has one)

and the probe's within-problem discrimination: over the problems whose samples
are both right and wrong, the fraction of (wrong, right) sample pairs of one
problem that the probe orders correctly (ties count 1/2), i.e. the
pair-weighted mean of the per-problem AUROCs, with a bootstrap over problems;
and the same for the samples' lengths in tokens, the free baseline it must beat.
Tokens: the mean generated tokens per problem each method costs (k samples,
or the greedy answer).

Output in <run>/<stage>/: samples.jsonl (resumable), outcomes.jsonl (one line
per sample: problem, sample, correct, truncated, tokens, answer_p_fail,
extracted), results.json, report.md.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adaras.pipeline.collect import pending_samples, read_problems, sample_jobs, write_problems
from adaras.pipeline.data import build_messages
from adaras.pipeline.grade import counts_as_correct, grade_all, is_cut
from adaras.pipeline.identify import model_shape
from adaras.pipeline.llm import EngineOptions, Meter, open_engine, prompt_ids, run_jobs
from adaras.pipeline.run import Run, append_jsonl, read_jsonl, write_json
from adaras.pipeline.stats import MAX_SCORE_RESAMPLES, paired_bootstrap
from adaras.profile import SteeringProfile


@dataclass
class BestOfNArgs:
    profile: str  # a profile with an answer head
    problems_from: str = "eval"  # the stage whose problems (and baseline arm) it uses
    problems: int = 100
    samples: int = 8
    ks: list[int] = field(default_factory=lambda: [4, 8])
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 1280
    seed: int = 0
    stage: str = "best-of-n"
    bootstrap: int = 10000


def best_of_n(run: Run, args: BestOfNArgs, engine: EngineOptions, *,
              restart: bool = False) -> dict:
    profile = SteeringProfile.load(args.profile, expect=model_shape(engine.model))
    if profile.answer_predictor is None:
        raise ValueError(f"{args.profile} has no answer head; run `adaras train-predictor "
                         "--target answer`")
    if not args.ks or max(args.ks) > args.samples or min(args.ks) < 1:
        raise ValueError(f"--ks must be in 1..--samples ({args.samples}), got {args.ks}")
    source = run.root / args.problems_from / "problems.jsonl"
    if not source.exists():
        raise FileNotFoundError(f"{source}: run the {args.problems_from!r} stage first")
    with run.stage(args.stage, {**vars(args), "engine": engine.to_dict()},
                   restart=restart) as out:
        problems = read_problems(source)[:args.problems]
        write_problems(out / "problems.jsonl", problems)
        path, meter = out / "samples.jsonl", Meter().to_dict()
        record = run.throughput_recorder("generate")  # every attempt's, kept up to date
        todo = pending_samples(problems, args.samples, {r["key"] for r in read_jsonl(path)})
        if todo:  # a resumed stage with every sample in place starts no engine
            llm = open_engine(engine, run)
            from adaras.engine import load_profile

            load_profile(llm, "main", str(args.profile))
            tok = llm.get_tokenizer()
            prompts = {p.id: prompt_ids(tok, build_messages(p)) for p in problems}
            meter = generate(llm, todo, prompts, args, path, engine.chunk, on_progress=record)
        meter = record(meter)
        greedy = greedy_outcomes(run.root / args.problems_from / "outcomes.jsonl")
        results = summarize(out, problems, greedy, args)
        results["throughput"] = meter
        write_json(out / "results.json", results)
        write_report(out, results, args)
        run.record(args.stage, **{k: results[k] for k in ("within_problem_auroc", "methods")})
        return results


def generate(llm, todo, prompts, args: BestOfNArgs, path: Path, chunk: int,
             on_progress=None) -> dict:
    """The pending_samples draws `todo`, each asking for the answer head,
    graded and appended to `path`."""
    steering = {"mode": "off", "profile": "main", "answer_probe": True}
    jobs = sample_jobs(todo, prompts, args.seed, temperature=args.temperature, top_p=args.top_p,
                       max_tokens=args.max_tokens, extra_args={"steering": steering})
    by_key = {key: (p, s) for key, p, s, _ in todo}

    def on_done(results):
        probs = [by_key[j.key][0] for j, _, _ in results]
        grades = grade_all(probs, [o.outputs[0].text for _, o, _ in results])
        append_jsonl(path, [
            {"key": j.key, "problem": p.id, "sample": by_key[j.key][1],
             "completion": o.outputs[0].text, "tokens": len(o.outputs[0].token_ids),
             "finish_reason": o.outputs[0].finish_reason, "correct": g.correct,
             "extracted": g.extracted,
             "answer_p_fail": rep.get("answer_failure_probability"), "steering": rep}
            for (j, o, rep), p, g in zip(results, probs, grades)])

    return run_jobs(llm, jobs, on_done, f"{len(jobs)} samples (answer probe)", chunk,
                    on_progress=on_progress)


def greedy_outcomes(path: Path) -> dict[str, dict]:
    """The baseline arm of an eval stage's outcomes.jsonl, by problem ({} when absent)."""
    return {o["problem"]: o for o in read_jsonl(path) if o.get("arm") == "baseline"}


def within_problem_auroc(groups: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, int]:
    """groups: (wrong bool [n], p_fail [n]) per problem. The fraction of
    (wrong, right) pairs within a problem where the wrong one has the higher
    p_fail (ties 1/2), over all problems; and the number of pairs."""
    hits, pairs = 0.0, 0
    for wrong, p in groups:
        pw, pr = p[wrong], p[~wrong]
        if pw.size and pr.size:
            diff = pw[:, None] - pr[None, :]
            hits += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            pairs += diff.size
    return (hits / pairs if pairs else float("nan")), pairs


def majority(rows: list[dict]) -> dict:
    """The sample whose extracted answer is the most frequent (ties: seen first);
    samples without an answer never win unless none has one."""
    answers = [r["extracted"] for r in rows if r["extracted"] is not None]
    if not answers:
        return rows[0]
    counts = Counter(answers)
    best = max(counts.values())
    winner = next(a for a in answers if counts[a] == best)
    return next(r for r in rows if r["extracted"] == winner)


def choose(rows: list[dict], k: int) -> dict[str, tuple[float, int]]:
    """(correct, tokens) per method for one problem's samples (in sample order)."""
    first = rows[:k]
    tokens = sum(r["tokens"] for r in first)
    probed = [r for r in first if r["answer_p_fail"] is not None] or first
    best = min(probed, key=lambda r: (r["answer_p_fail"] is None, r["answer_p_fail"] or 0.0))
    shortest = min(first, key=lambda r: r["tokens"])  # ties: the first
    return {f"probe best-of-{k}": (float(best["correct"]), tokens),
            f"majority vote of {k}": (float(majority(first)["correct"]), tokens),
            f"shortest of {k}": (float(shortest["correct"]), tokens),
            f"random sample of {k}": (float(np.mean([r["correct"] for r in first])),
                                      round(tokens / k))}


def summarize(out: Path, problems, greedy: dict[str, dict], args: BestOfNArgs) -> dict:
    rows = [{**r, "correct": counts_as_correct(r)}  # a cut answer counts as a failure
            for r in read_jsonl(out / "samples.jsonl")]
    by_problem: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["sample"]):
        by_problem.setdefault(r["problem"], []).append(r)
    ids = [p.id for p in problems if len(by_problem.get(p.id, [])) == args.samples]
    lines = [{"problem": r["problem"], "sample": r["sample"], "correct": r["correct"],
              "truncated": is_cut(r), "tokens": r["tokens"],
              "answer_p_fail": r["answer_p_fail"], "extracted": r["extracted"]}
             for i in ids for r in by_problem[i]]
    (out / "outcomes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    score: dict[str, list[tuple[float, int]]] = {}
    for i in ids:
        first = by_problem[i][0]
        score.setdefault("first sample", []).append((float(first["correct"]), first["tokens"]))
        for k in args.ks:
            for name, value in choose(by_problem[i], k).items():
                score.setdefault(name, []).append(value)
        if i in greedy:
            score.setdefault("greedy", []).append((float(greedy[i]["correct"]),
                                                   greedy[i]["tokens"]))
    reference = "greedy" if len(score.get("greedy", [])) == len(ids) else "first sample"
    ref = np.array([c for c, _ in score[reference]])
    methods = {}
    for name, values in score.items():
        acc = np.array([c for c, _ in values])
        methods[name] = {"accuracy": float(acc.mean()),
                         "mean_tokens": float(np.mean([t for _, t in values])),
                         "problems": len(values)}
        if name != reference and len(values) == len(ids):
            methods[name]["delta_vs_" + reference] = float(acc.mean() - ref.mean())
            methods[name]["ci95"] = paired_bootstrap(ref, acc, args.bootstrap, args.seed)
    wrong = [np.array([not r["correct"] for r in by_problem[i]]) for i in ids]
    p_fail = [np.array([np.nan if r["answer_p_fail"] is None else r["answer_p_fail"]
                        for r in by_problem[i]]) for i in ids]
    length = [np.array([r["tokens"] for r in by_problem[i]], dtype=float) for i in ids]
    read = [~np.isnan(p) for p in p_fail]  # both on the samples the probe read
    return {"problems": len(ids), "samples": args.samples, "reference": reference,
            "within_problem_auroc": discrimination(
                [(w[m], p[m]) for w, p, m in zip(wrong, p_fail, read)], args),
            "within_problem_auroc_length": discrimination(
                [(w[m], t[m]) for w, t, m in zip(wrong, length, read)], args),
            "methods": methods}


def discrimination(groups: list[tuple[np.ndarray, np.ndarray]], args: BestOfNArgs) -> dict:
    """within_problem_auroc of (wrong, score) per problem, with its bootstrap
    95% CI over the problems whose samples are both right and wrong."""
    auc, pairs = within_problem_auroc(groups)
    rng = np.random.default_rng(args.seed)
    mixed = [g for g in groups if g[0].any() and (~g[0]).any()]
    boot = [within_problem_auroc([mixed[j] for j in rng.integers(0, len(mixed), len(mixed))])[0]
            for _ in range(min(args.bootstrap, MAX_SCORE_RESAMPLES))] if mixed else []
    return {"auroc": auc, "pairs": pairs, "problems_with_both": len(mixed),
            "ci95": [float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))]
            if boot else None}


def write_report(out: Path, results: dict, args: BestOfNArgs) -> None:
    w = results["within_problem_auroc"]
    ci = w["ci95"] or [float("nan")] * 2
    ref = results["reference"]
    ln = results.get("within_problem_auroc_length")  # absent from older results
    lci = (ln or {}).get("ci95") or [float("nan")] * 2
    length = (f" The samples' length alone (the longer taken as wrong) orders {ln['auroc']:.3f} "
              f"of the {ln['pairs']} pairs of all samples (95% CI {lci[0]:.3f}-{lci[1]:.3f})."
              if ln else "")
    lines = ["# Best of n by the answer probe", "",
             f"{results['problems']} problems of the `{args.problems_from}` stage, "
             f"{args.samples} samples each at T {args.temperature}, top-p {args.top_p}, max "
             f"{args.max_tokens} tokens, unsteered. Profile: `{args.profile}`.", "",
             f"Within-problem discrimination: over the {w['problems_with_both']} problems whose "
             f"samples are both right and wrong, the probe ranks a wrong sample above a right "
             f"one in {w['auroc']:.3f} of {w['pairs']} pairs (bootstrap over problems, 95% CI "
             f"{ci[0]:.3f}-{ci[1]:.3f}).{length}", "",
             f"| method | accuracy | Δ vs {ref} | paired bootstrap 95% CI | mean tokens per "
             "problem |", "|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        d = m.get("delta_vs_" + ref)
        delta = f"{d:+.3f}" if d is not None else ""
        ci = f"[{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}]" if "ci95" in m else ""
        lines.append(f"| {name} | {m['accuracy']:.3f} | {delta} | {ci} | "
                     f"{m['mean_tokens']:.0f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
