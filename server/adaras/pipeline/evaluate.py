"""`adaras eval`: accuracy of the model with and without steering, through
the steered engine, on problems kept apart from the probe set.

Configurations (each one greedy pass over the evaluation problems):
    baseline      no steering
    always        the profile at alpha, every request        (= "no gate" ablation)
    adaptive      the profile, gated by its failure predictor
    minus         the profile negated (-S: same neurons, same dose, opposite sign), always on
    random        the same delta values on random neurons drawn layer by layer (as many in
                  each layer as the profile has there; values shuffled within the layer,
                  so the norm is the profile's), always on
    noise         the baseline again on the first --noise-problems problems, submitted in
                  another (seeded) order, so its batches mix differently: how many answers
                  change with no steering at all
    alpha=<a>     sweep: always-on at alpha a
    k=<n>         sweep: always-on with the profile's top-n neurons (by |delta|)
    <name>        --ablation name=profile.safetensors: another profile, always on

Output in <run>/<stage>/: generations.jsonl (resumable), outcomes.jsonl (one
compact line per problem and config: id, config, correct, truncated, tokens,
p_fail, and answer_p_fail with --answer-probe), results.json, report.md, accuracy.png and sweep plots. Accuracies carry paired-bootstrap
95% confidence intervals of the difference to baseline (same problems).

This module configures and runs the stage; each verb has its own module:
eval_args (the options), arms (the control arms' profiles), eval_generate,
eval_score, eval_report (report.md and the plots).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from adaras.pipeline.arms import write_profiles
from adaras.pipeline.collect import read_problems, write_problems
from adaras.pipeline.data import Problem, build_messages, load_distinct
from adaras.pipeline.eval_args import MODES, EvalArgs
from adaras.pipeline.eval_generate import generate_all, pending
from adaras.pipeline.eval_report import plot_calibration, plot_results, write_report
from adaras.pipeline.eval_score import screen, summarize
from adaras.pipeline.identify import model_shape
from adaras.pipeline.llm import (
    EngineOptions,
    Meter,
    open_engine,
    prompt_ids,
    vocab_size,
)
from adaras.pipeline.run import Run, write_json
from adaras.profile import SteeringProfile


def default_profile(run: Run) -> Path:
    """The profile the run wrote last, of identify's, train-predictor's (the
    prompt head) and train-answer-probe's (both heads)."""
    found = [path for stage in ("identify", "train-predictor", "train-answer-probe")
             if (path := run.root / stage / "profile.safetensors").exists()]
    if not found:
        raise FileNotFoundError(f"{run.root}: no profile yet; run `adaras identify` or pass "
                                "--profile")
    return max(found, key=lambda p: p.stat().st_mtime_ns)


def evaluate(run: Run, args: EvalArgs, engine: EngineOptions, *, restart: bool = False) -> dict:
    if args.screen:
        if len(args.alphas) < 1:
            raise ValueError("--screen needs --alphas, e.g. --alphas 1,3,10,30")
        args.modes = ["baseline"]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown --modes {unknown}; choose from {list(MODES)}")
    if "baseline" not in args.modes:
        args.modes = ["baseline", *args.modes]  # every comparison is paired against it
    names = [*args.modes, *sweep_names(args)]
    if args.primary is not None and args.primary not in names:
        raise ValueError(f"--primary {args.primary!r} is not one of this run's configs {names}")
    if args.secondary is not None and (len(pair := args.secondary.split(",")) != 2
                                       or not set(pair) <= set(names) or pair[0] == pair[1]):
        raise ValueError(f"--secondary must be two of this run's configs {names} as A,B; "
                         f"got {args.secondary!r}")
    excluded = read_ids(args.also_without) if args.also_without else None
    steered = set(args.modes) - {"baseline", "noise"} or args.alphas or args.ks or args.ablations
    if steered or args.profile or args.answer_probe:
        source = Path(args.profile) if args.profile else default_profile(run)
        profile = SteeringProfile.load(source, expect=model_shape(engine.model))
    else:  # a baseline alone (a task pilot) needs no profile, unless it is probed
        source, profile = None, None
    if args.answer_probe and (profile is None or profile.answer_predictor is None):
        raise ValueError(f"--answer-probe needs a profile with an answer head; {source} has "
                         "none (run `adaras train-predictor --target answer`)")
    if "adaptive" in args.modes and profile.predictor is None:
        raise ValueError(f"{source} has no failure predictor; run `adaras train-predictor`, "
                         "or drop 'adaptive' from --modes")
    if args.ks and any(k < 1 or k > profile.k for k in args.ks):
        raise ValueError(f"--k values must be in 1..{profile.k} (the profile's K), got {args.ks}")
    with run.stage(args.stage, {**vars(args), "profile": str(source), "engine": engine.to_dict()},
                   restart=restart) as out:
        # never evaluate on a problem the profile or the predictor was built
        # from, nor on one another eval stage of this run used (dev vs confirm)
        used, used_by = other_stage_problems(run, args.stage)
        problems, dropped = load_distinct(args.dataset, args.problems, seed=args.seed,
                                          difficulty=args.difficulty, options=args.options,
                                          exclude=used)
        write_problems(out / "problems.jsonl", problems)
        if args.primary is not None or args.registration:  # before any answer is generated
            # a resumed stage keeps the registration it was first given (and its date)
            earlier = (run.stage_entry(args.stage).get("results") or {}).get("preregistered")
            run.record(args.stage, preregistered=earlier
                       or preregistration(args, profile, len(problems)))
        profiles = write_profiles(out, profile, args) if profile else {}
        configs = build_configs(profile, profiles, args)
        todo = pending(configs, problems, args, out / "generations.jsonl")
        # on a resume, the total of every attempt's work; kept up to date as answers come
        record, meter = run.throughput_recorder("generate"), Meter().to_dict()
        if todo:  # a resumed stage with every answer in place starts no engine
            llm = open_engine(engine, run)
            from adaras.engine import load_profile

            for name, path in profiles.items():
                load_profile(llm, name, str(path))
            tok = llm.get_tokenizer()
            prompts = {p.id: prompt_ids(tok, build_messages(p))
                       for p in {p.id: p for _, _, p in todo}.values()}
            meter = generate_all(llm, todo, prompts, configs, args, out / "generations.jsonl",
                                 engine.chunk, on_progress=record, vocab=vocab_size(llm))
        meter = record(meter)
        results = summarize(out, problems, configs, args)
        if excluded is not None:  # e.g. near-duplicates of training problems
            dropped_here = sorted(excluded & {p.id for p in problems})
            keep = {p.id for p in problems} - excluded
            results["without"] = {"file": args.also_without, "excluded": dropped_here,
                                  **summarize(out, problems, configs, args, keep=keep)}
        if profile is not None:
            alpha = profile.default_alpha if args.alpha is None else args.alpha
            results.update({"alpha": alpha, "dose_in_sigma": profile.dose_in_sigma(alpha),
                            "steered_prompt_positions": profile.steered_prompt_positions})
        results.update({"profile": str(source) if source else None, "dataset": args.dataset,
                        "removed_overlap": dropped, "excluded_stages": used_by,
                        "throughput": meter})
        if args.screen:
            results["screen"] = screen(results)
        if args.primary is not None:
            results["primary"] = {"config": args.primary,
                                  **results["configs"][args.primary]}
        write_json(out / "results.json", results)
        write_report(out, results, args)
        plot_results(out, results)
        plot_calibration(out, results)
        run.record(args.stage,
                   **{name: {k: r[k] for k in ("accuracy", "delta", "ci95", "mcnemar_p",
                                               "fixed", "broken", "changed")}
                      for name, r in results["configs"].items()},
                   **({"screen": results["screen"]} if args.screen else {}))
        return results


def other_stage_problems(run: Run, stage: str) -> tuple[list[Problem], list[str]]:
    """Problems of every other stage of this run that wrote a problems.jsonl
    (collect, and the other eval stages), and which stages those are."""
    problems, stages = [], []
    for path in sorted(run.root.glob("*/problems.jsonl")):
        if path.parent.name != stage:
            problems += read_problems(path)
            stages.append(path.parent.name)
    return problems, stages


def preregistration(args: EvalArgs, profile: SteeringProfile | None, n: int) -> dict:
    alpha = profile.default_alpha if args.alpha is None and profile else args.alpha
    return {"primary": f"{args.primary} vs baseline" if args.primary else None,
            "test": "exact McNemar (two-sided)", "alpha": alpha,
            "dose_in_sigma": profile.dose_in_sigma(alpha) if profile else None,
            "problems": n, "dataset": args.dataset, "seed": args.seed, "modes": args.modes,
            "noise_problems": args.noise_problems, "max_tokens": args.max_tokens,
            "secondary_test": f"{args.secondary.replace(',', ' vs ')}, exact McNemar (two-sided)"
            if args.secondary else None, "also_without": args.also_without,
            **(args.registration or {}), "registered": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def sweep_names(args: EvalArgs) -> list[str]:
    return ([f"alpha={a:g}" for a in args.alphas] + [f"k={k}" for k in args.ks]
            + list(args.ablations))


def build_configs(profile: SteeringProfile, profiles: dict, args: EvalArgs) -> dict[str, dict | None]:
    """Config name -> `steering` object (None = no steering)."""
    alpha = profile.default_alpha if args.alpha is None and profile else args.alpha
    configs: dict[str, dict | None] = {}
    for mode in args.modes:
        if mode == "baseline":
            configs[mode] = None
        elif mode == "always":
            configs[mode] = {"mode": "always", "profile": "main", "alpha": alpha}
        elif mode == "adaptive":
            configs[mode] = {"mode": "adaptive", "profile": "main", "alpha": alpha}
            if args.threshold is not None:
                configs[mode]["threshold"] = args.threshold
        elif mode == "random":
            configs[mode] = {"mode": "always", "profile": "random", "alpha": alpha}
        elif mode == "minus":
            configs[mode] = {"mode": "always", "profile": "minus", "alpha": alpha}
        elif mode == "noise":
            configs[mode] = None
    for a in args.alphas:
        configs[f"alpha={a:g}"] = {"mode": "always", "profile": "main", "alpha": a}
    for k in args.ks:
        configs[f"k={k}"] = {"mode": "always", "profile": f"k{k}", "alpha": alpha}
    for name in args.ablations:
        configs[name] = {"mode": "always", "profile": f"ablation-{name}", "alpha": alpha}
    if args.answer_probe:  # the main profile's answer head reads every arm's answers
        for name, steering in configs.items():
            configs[name] = {**(steering or {"mode": "off", "profile": "main"}),
                             "answer_probe": True}
    return configs


def read_ids(path: str) -> set[str]:
    """Problem ids from a JSON file: a list of ids, {"ids": [...]}, or the
    near-duplicate file's {"pairs": [{"test": id, ...}, ...]}."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--also-without: cannot read {path}: {e}") from None
    if isinstance(data, dict):
        data = data.get("ids", [p.get("test") for p in data.get("pairs", [])
                                if isinstance(p, dict)] or None)
    if not isinstance(data, list) or not all(isinstance(i, str) for i in data):
        raise ValueError(f"--also-without: {path} must hold a list of problem ids, "
                         '{"ids": [...]} or {"pairs": [{"test": id}, ...]}')
    return set(data)
