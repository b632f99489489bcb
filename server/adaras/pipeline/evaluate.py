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
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adaras import confidence
from adaras.pipeline.collect import read_problems, write_problems
from adaras.pipeline.data import Problem, build_messages, load_distinct
from adaras.pipeline.grade import counts_as_correct, grade_all, is_cut
from adaras.pipeline.identify import model_shape
from adaras.pipeline.llm import (
    EngineOptions,
    Job,
    Meter,
    open_engine,
    prompt_ids,
    run_jobs,
    vocab_size,
)
from adaras.pipeline.run import Run, append_jsonl, read_jsonl, write_json
from adaras.pipeline.stats import (
    MAX_SCORE_RESAMPLES,
    brier,
    calibration_slope,
    mcnemar_p,
    min_detectable_effect,
    paired_bootstrap,
    score_heads,
    selective_accuracy,
    wilson_ci,
    youden_threshold,
)
from adaras.profile import SteeringProfile

MODES = ("baseline", "always", "adaptive", "minus", "random", "noise")
DEFAULT_MODES = ("baseline", "always", "adaptive", "random")


@dataclass
class EvalArgs:
    dataset: str = "rg:gsm_symbolic"
    problems: int = 100
    seed: int = 1  # != collect's seed: other problems
    difficulty: float | None = None
    options: dict | None = None
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    alpha: float | None = None  # default: the profile's default_alpha
    alphas: list[float] = field(default_factory=list)  # sweep
    ks: list[int] = field(default_factory=list)  # sweep
    ablations: dict[str, str] = field(default_factory=dict)  # name -> profile path
    threshold: float | None = None  # default: the profile's calibrated threshold
    max_tokens: int = 512
    profile: str | None = None  # default: the run's train-predictor (else identify) profile
    stage: str = "eval"  # output folder; use another for a second benchmark (transfer)
    bootstrap: int = 10000
    screen: bool = False  # alpha screen: baseline + `alphas`, pick alpha* (see `screen`)
    primary: str | None = None  # pre-registered primary comparison: this config vs baseline
    noise_problems: int | None = None  # the noise arm's size (default: every problem)
    registration: dict | None = None  # the study's registration, written before generating
    answer_probe: bool = False  # every arm asks for the profile's answer head (no extra tokens)
    secondary: str | None = None  # "A,B": config A against config B, exact McNemar (paired)
    also_without: str | None = None  # problem ids (file): every comparison again without them
    logprobs: int | None = None  # top-k logprobs per answer token -> per-token confidence arrays
    knobs: str | None = None  # knobs.json (pipeline.knobs): DeepConf window and tail for scoring


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


def write_profiles(out: Path, profile: SteeringProfile, args: EvalArgs) -> dict[str, Path]:
    """The profiles this evaluation loads into the engine, written next to it."""
    paths = {"main": out / "profile-main.safetensors"}
    profile.save(paths["main"])
    if "random" in args.modes:
        rnd = randomize(profile, args.seed)
        paths["random"] = out / "profile-random.safetensors"
        rnd.save(paths["random"])
    if "minus" in args.modes:
        paths["minus"] = out / "profile-minus.safetensors"
        negate(profile).save(paths["minus"])
    for k in args.ks:
        sub = truncate(profile, k)
        paths[f"k{k}"] = out / f"profile-k{k}.safetensors"
        sub.save(paths[f"k{k}"])
    for name, path in args.ablations.items():
        other = same_norm(SteeringProfile.load(path, expect=profile.model), profile)
        paths[f"ablation-{name}"] = out / f"profile-ablation-{name}.safetensors"
        other.save(paths[f"ablation-{name}"])
    return paths


def same_norm(other: SteeringProfile, profile: SteeringProfile) -> SteeringProfile:
    """`other` with its delta scaled to `profile`'s L2 norm: an ablation then
    differs from the real profile in where it steers, not in how hard."""
    scale = float(profile.delta.norm()) / max(float(other.delta.norm()), 1e-30)
    other.delta = (other.delta.double() * scale).float()
    other.provenance = {**other.provenance, "delta_scaled_to_norm_of": profile.name,
                        "delta_scale": scale}
    return other


def randomize(profile: SteeringProfile, seed: int) -> SteeringProfile:
    """The random-neuron control, matched per layer and in norm: in each layer
    as many random neurons as the profile steers there (none of the profile's
    own), carrying that layer's delta values in a shuffled order. Only which
    neurons within a layer are steered differs; depth and size do not."""
    m = profile.model
    rng = np.random.default_rng(seed)
    layers, neurons, delta = [], [], []
    for layer, (own, values) in sorted(profile.by_layer().items()):
        pool = np.setdiff1d(np.arange(m.intermediate_size), own.numpy())
        layers += [layer] * own.numel()
        neurons += rng.choice(pool, size=own.numel(), replace=False).tolist()
        delta += rng.permutation(values.numpy()).tolist()
    order = np.argsort(-np.abs(np.array(delta)), kind="stable")
    return SteeringProfile(
        name=f"{profile.name}-random", model=m,
        layers=torch.tensor(layers, dtype=torch.int32)[order],
        neurons=torch.tensor(neurons, dtype=torch.int32)[order],
        delta=torch.tensor(delta, dtype=torch.float32)[order],
        default_alpha=profile.default_alpha, **heads(profile),
        provenance={**profile.provenance, "selection": "random, matched per layer and in norm",
                    "random_seed": seed})


def heads(profile: SteeringProfile) -> dict:
    """The profile's predictor heads and threshold, for a control arm built
    from it: the arm's answers are then probed and gated by the same heads."""
    return {"predictor": profile.predictor, "threshold": profile.threshold,
            "answer_predictor": profile.answer_predictor}


def negate(profile: SteeringProfile) -> SteeringProfile:
    """-S: the same neurons and dose, the opposite direction (the same heads)."""
    return SteeringProfile(name=f"{profile.name}-minus", model=profile.model,
                           layers=profile.layers.clone(), neurons=profile.neurons.clone(),
                           delta=-profile.delta, default_alpha=profile.default_alpha,
                           sigma=None if profile.sigma is None else profile.sigma.clone(),
                           **heads(profile), provenance={**profile.provenance, "negated": True})


def truncate(profile: SteeringProfile, k: int) -> SteeringProfile:
    """The profile's top-k neurons by |delta|."""
    order = np.argsort(-np.abs(profile.delta.numpy()), kind="stable")[:k]
    return SteeringProfile(name=f"{profile.name}-k{k}", model=profile.model,
                           layers=profile.layers[order].clone(),
                           neurons=profile.neurons[order].clone(),
                           delta=profile.delta[order].clone(), default_alpha=profile.default_alpha,
                           provenance={**profile.provenance, "k": k, "truncated_from": profile.k})


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


def write_outcomes(out: Path, rows: list[dict], configs) -> None:
    """outcomes.jsonl: one compact line per (config, problem) in config order."""
    lines = []
    for r in sorted(rows, key=lambda r: (config_order(r["config"]), r["problem"])):
        if r["config"] not in configs:
            continue
        rep = r.get("steering") or {}
        lines.append({"problem": r["problem"], "arm": r["config"], "correct": r["correct"],
                      "truncated": is_cut(r), "tokens": r["tokens"],
                      "p_fail": rep.get("failure_probability"),
                      "applied": rep.get("applied"),
                      **({"answer_p_fail": rep["answer_failure_probability"]}
                         if "answer_failure_probability" in rep else {})})
    tmp = out / "outcomes.jsonl.tmp"
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tmp.replace(out / "outcomes.jsonl")


def summarize(out: Path, problems, configs, args: EvalArgs,
              keep: set[str] | None = None) -> dict:
    """Every config's numbers against the baseline; with `keep`, on those
    problems only (each arm's own problems, e.g. the noise arm's, intersected)."""
    rows = [{**r, "correct": counts_as_correct(r)}  # a cut answer counts as a failure
            for r in read_jsonl(out / "generations.jsonl")]
    ids = [p.id for p in problems if keep is None or p.id in keep]
    table = {(r["config"], r["problem"]): r for r in rows}
    write_outcomes(out, rows, configs)
    results = {"problems": len(ids), "configs": {}}
    # the prompt predictor's p_fail of each problem (a function of the prompt alone,
    # reported by the arms that run the gate), to set beside the answer probe's
    prompt_p = {r["problem"]: r["steering"]["failure_probability"] for r in rows
                if (r.get("steering") or {}).get("failure_probability") is not None}
    for name, steering in configs.items():
        arm = [p.id for p in config_problems(name, problems, args)]
        arm_set = set(arm)
        sub = [i for i in ids if i in arm_set]  # problem order, for pairing with baseline
        base = np.array([table[("baseline", i)]["correct"] for i in sub])
        base_answers = [table[("baseline", i)]["extracted"] for i in sub]
        got = [table[(name, i)] for i in sub]
        correct = np.array([r["correct"] for r in got])
        applied = [bool(r["steering"].get("applied")) for r in got if r["steering"]]
        vs = compare(table, sub, name, "baseline", args.bootstrap)
        entry = {
            "steering": steering, "problems": len(sub),
            "accuracy": float(correct.mean()),
            "accuracy_ci95": wilson_ci(int(correct.sum()), len(sub)),
            **{k: vs[k] for k in ("delta", "ci95", "mcnemar_p")},
            "fixed": vs["only_a"], "broken": vs["only_b"],
            # the final answer differs from the baseline's (not only its correctness)
            "changed": float(np.mean([r["extracted"] != b for r, b in zip(got, base_answers)])),
            "mean_tokens": float(np.mean([r["tokens"] for r in got])),
            "median_tokens": float(np.median([r["tokens"] for r in got])),
            "truncated": int(sum(is_cut(r) for r in got)),
        }
        discordant = (entry["fixed"] + entry["broken"]) / max(len(sub), 1)
        entry["mde80"] = min_detectable_effect(len(sub), discordant)
        if steering and steering["mode"] == "adaptive":
            entry["gate_rate"] = float(np.mean(applied)) if applied else 0.0
            p_fail = np.array([r["steering"].get("failure_probability") for r in got],
                              dtype=float)
            entry["threshold"] = got[0]["steering"].get("threshold")
            wrong = ~base
            gated = np.array(applied)
            prompt = score_heads(wrong, {"prompt": p_fail}, args.seed,
                                 min(args.bootstrap, MAX_SCORE_RESAMPLES))["prompt"]
            if wrong.any() and (~wrong).any():
                entry["gate_rate_on_baseline_wrong"] = float(gated[wrong].mean())
                entry["gate_rate_on_baseline_right"] = float(gated[~wrong].mean())
                entry["predictor_auroc"] = prompt["auroc"]
                entry["predictor_auroc_ci95"] = prompt["auroc_ci95"]
                # the cut a later stage can take from this one (threshold chosen on dev)
                entry["youden_threshold"] = youden_threshold(wrong.astype(int), p_fail)
            entry["calibration"] = prompt["calibration"]
            entry["calibration_ece_ci95"] = prompt.get("ece_ci95")
        if steering and steering.get("answer_probe"):
            entry["answer_probe"] = answer_probe_metrics(
                got, correct, args.seed,
                np.array([prompt_p.get(i, np.nan) for i in sub], dtype=float)
                if prompt_p else None, n=min(args.bootstrap, MAX_SCORE_RESAMPLES),
                knobs=read_knobs(args.knobs))
        results["configs"][name] = entry
    if args.secondary:
        a, b = args.secondary.split(",")
        results["secondary"] = compare(table, ids, a, b, args.bootstrap)
    return results


def compare(table: dict, ids: list[str], a: str, b: str, bootstrap: int) -> dict:
    """Config `a` against config `b`, paired on the problems both ran: the
    accuracy difference a - b, its paired bootstrap CI and the exact McNemar p."""
    both = [i for i in ids if (a, i) in table and (b, i) in table]
    ca = np.array([table[(a, i)]["correct"] for i in both], dtype=bool)
    cb = np.array([table[(b, i)]["correct"] for i in both], dtype=bool)
    return {"configs": [a, b], "problems": len(both),
            "accuracy": [float(ca.mean()), float(cb.mean())],
            "delta": float(ca.mean() - cb.mean()), "ci95": paired_bootstrap(cb, ca, bootstrap),
            "mcnemar_p": mcnemar_p(cb, ca),
            "only_a": int((ca & ~cb).sum()), "only_b": int((~ca & cb).sum())}


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


def read_knobs(path: str | None) -> confidence.Knobs | None:
    """The DeepConf window and tail a knobs.json fixed (None: the defaults)."""
    if path is None:
        return None
    k = json.loads(Path(path).read_text())
    return confidence.Knobs(window=int(k["window"]), tail=int(k["tail"]),
                            bottom_fraction=float(k.get("bottom_fraction", 0.1)))


def confidence_metrics(rows: list[dict], p: np.ndarray, wrong: np.ndarray, read: np.ndarray,
                       seed: int, n: int, knobs: confidence.Knobs) -> dict:
    """The logprob confidences of the same answers the head read, as failure
    scores (adaras.confidence): each one's AUROC with its CI and the head's
    paired AUROC gain over it, its selective accuracy, and which of them ranks
    best here (`best`; a registered study fixes its best on validation first)."""
    per = [confidence.trace_scores(r["confidence"], knobs) for r in rows]
    stats = {k: np.array([s[k] for s in per], dtype=float)[read]
             for k in confidence.SCORES if k != "length"}
    scored = score_heads(wrong[read], {"answer": p[read], **stats}, seed, n,
                         scores=tuple(stats))
    out = {k: {**{f: v for f, v in scored[k].items() if f not in ("gain", "gain_ci95")},
               **({"answer_auroc_gain": scored[k]["gain"],
                   "answer_auroc_gain_ci95": scored[k]["gain_ci95"]} if "gain" in scored[k]
                  else {}),
               "selective_accuracy": selective_accuracy(wrong[read], v)}
           for k, v in stats.items()}
    ranked = [k for k in stats if out[k].get("auroc") is not None]
    return {"knobs": {"window": knobs.window, "tail": knobs.tail,
                      "bottom_fraction": knobs.bottom_fraction},
            "scores": out, "best": max(ranked, key=lambda k: out[k]["auroc"]) if ranked else None}


def answer_probe_metrics(rows: list[dict], correct: np.ndarray, seed: int,
                         prompt_p: np.ndarray | None = None,
                         n: int = MAX_SCORE_RESAMPLES,
                         knobs: confidence.Knobs | None = None) -> dict:
    """How well the answer head's p_fail tells this arm's wrong answers from
    its right ones: AUROC and ECE, each with a bootstrap 95% CI, over the
    answers it read (a one-token answer has no position to read). With
    `prompt_p` (the prompt predictor's p_fail of each row's problem, nan where
    unknown), `prompt`: both heads on the answers both read (their own count),
    the prompt p_fail's AUROC and ECE and the answer head's AUROC gain over
    it, with a paired CI (the same resamples for both heads).

    Two baselines that cost a client nothing: `length`, the answer's length in
    tokens ranked as a failure score, on the answers the head read (its AUROC,
    and the head's AUROC gain over it with a paired CI); and `finished`, the
    head's AUROC and the same length comparison on the answers not cut at
    max_tokens (a cut answer counts as wrong, and is usually a loop, so it is
    easy to call).

    Beside them: the head's Brier score, calibration slope (with CI) and
    selective accuracy at 50, 70 and 90% coverage, and, when every answer kept
    its per-token logprobs (eval --logprobs), `confidence`: the logprob scores
    any server can compute, each against the head (see confidence_metrics)."""
    p = np.array([(r["steering"] or {}).get("answer_failure_probability") for r in rows],
                 dtype=float)  # None -> nan
    wrong = ~correct
    read = ~np.isnan(p)
    tokens = np.array([r["tokens"] for r in rows], dtype=float)
    finished = read & np.array([not is_cut(r) for r in rows], dtype=bool)
    both = read & ~np.isnan(prompt_p) if prompt_p is not None else None
    # the answer head first: every head after it gets its paired AUROC gain over that
    # head. Where each answer read has its prompt p_fail, one bootstrap scores all three.
    heads = {"answer": p, "length": tokens}
    if both is not None and (both == read).all():
        heads["prompt"] = prompt_p
    own = score_heads(wrong[read], {h: q[read] for h, q in heads.items()}, seed, n,
                      scores=("length",))
    pair = (own if "prompt" in heads else
            score_heads(wrong[both], {"answer": p[both], "prompt": prompt_p[both]}, seed, n)
            if both is not None else None)
    fin = score_heads(wrong[finished], {"answer": p[finished], "length": tokens[finished]},
                      seed, n, scores=("answer", "length"))

    def bare(head: dict) -> dict:  # a head's own numbers, without the answer head's gain
        return {k: v for k, v in head.items() if k not in ("gain", "gain_ci95")}

    def length(head: dict) -> dict:  # length's AUROC, and the answer head's gain over it
        return {**bare(head), **({"answer_auroc_gain": head["gain"],
                                  "answer_auroc_gain_ci95": head["gain_ci95"]}
                                 if "gain" in head else {})}

    out = {"answers": int(read.sum()), "unread": int((~read).sum()),
           "mean": float(p[read].mean()) if read.any() else None, **own["answer"],
           "length": length(own["length"]),
           "finished": {"answers": int(finished.sum()), **fin["answer"],
                        "length": length(fin["length"])}}
    out["brier"] = brier(wrong[read], p[read]) if read.any() else None
    out["selective_accuracy"] = selective_accuracy(wrong[read], p[read])
    out.update(calibration_slope(wrong[read], p[read], seed, min(n, 500)))
    if read.any() and all("confidence" in r for r in rows):
        out["confidence"] = confidence_metrics(rows, p, wrong, read, seed, n,
                                               knobs or confidence.Knobs())
    if pair is not None:
        out["prompt"] = {"answers": int(both.sum()), **bare(pair["prompt"])}
        if "gain" in pair["prompt"]:
            out["prompt"]["answer_auroc"] = pair["answer"]["auroc"]  # on these answers
            out.update(auroc_gain=pair["prompt"]["gain"],
                       auroc_gain_ci95=pair["prompt"]["gain_ci95"])
    return out


def screen(results: dict, min_changed: float = 0.10) -> dict:
    """The alpha screen: for each swept alpha, the fraction of final answers
    that changed, net fixed - broken and mean output length. alpha* is the
    largest alpha that changes at least `min_changed` of the answers without a
    net loss; None (the profile is inert at these alphas) when no alpha
    changes that many."""
    rows = []
    for name, r in results["configs"].items():
        if name.startswith("alpha="):
            rows.append({"alpha": float(name[len("alpha="):]), "changed": r["changed"],
                         "net": r["fixed"] - r["broken"], "fixed": r["fixed"],
                         "broken": r["broken"], "accuracy": r["accuracy"],
                         "mean_tokens": r["mean_tokens"], "truncated": r["truncated"]})
    rows.sort(key=lambda r: r["alpha"])
    moving = [r for r in rows if r["changed"] >= min_changed]
    ok = [r for r in moving if r["net"] >= 0]
    if not moving:
        verdict = (f"inert: no alpha in {[r['alpha'] for r in rows]} changes "
                   f"{min_changed:.0%} of the final answers")
    elif not ok:
        verdict = (f"every alpha that changes {min_changed:.0%} of the answers loses more than "
                   f"it fixes")
    else:
        verdict = f"alpha* = {ok[-1]['alpha']:g}"
    return {"alpha_star": ok[-1]["alpha"] if ok else None, "min_changed": min_changed,
            "verdict": verdict, "baseline_mean_tokens":
            results["configs"]["baseline"]["mean_tokens"], "alphas": rows}


def write_report(out: Path, results: dict, args: EvalArgs) -> None:
    lines = [f"# Evaluation: {results['dataset']}", "",
             f"{results['problems']} problems (seed {args.seed}; "
             f"{results['removed_overlap']} repeated problems or problems of "
             f"{', '.join(results['excluded_stages']) or 'no other stage'} skipped), greedy "
             f"decoding, max {args.max_tokens} tokens. Profile: `{results['profile']}`.", ""]
    primary = results.get("primary")
    if primary:
        lines += [f"**Pre-registered primary comparison:** `{primary['config']}` vs baseline, "
                  f"exact McNemar: {primary['fixed']} fixed, {primary['broken']} broken, "
                  f"Δ {primary['delta']:+.3f} (95% CI [{primary['ci95'][0]:+.3f}, "
                  f"{primary['ci95'][1]:+.3f}]), p = {primary['mcnemar_p']:.3g}. "
                  + (f"Minimum detectable effect at 80% power with this discordance: "
                     f"{primary['mde80']:.3f}." if primary["mde80"] else ""), ""]
    sec = results.get("secondary")
    if sec:
        a, b = sec["configs"]
        lines += [f"**Key secondary comparison:** `{a}` vs `{b}`, exact McNemar on "
                  f"{sec['problems']} problems: {sec['only_a']} right only with `{a}`, "
                  f"{sec['only_b']} right only with `{b}`, Δ {sec['delta']:+.3f} (95% CI "
                  f"[{sec['ci95'][0]:+.3f}, {sec['ci95'][1]:+.3f}]), p = {sec['mcnemar_p']:.3g}.",
                  ""]
    if results.get("steered_prompt_positions") and "adaptive" in results["configs"]:
        lines += ["Positions: `always`, `minus`, `random` and the sweeps steer the last prompt "
                  "position and every decode step (the profile's `steer_prompt`); `adaptive` "
                  "decides after the prompt, so it steers decode steps only.", ""]
    if results.get("dose_in_sigma") is not None:
        lines += [f"Dose: alpha {results['alpha']:g} on raw S, "
                  f"{results['dose_in_sigma']:.3f} sigma on average per steered neuron.", ""]
    lines += ["| config | accuracy | Wilson 95% CI | Δ vs baseline | paired bootstrap 95% CI "
              "| McNemar p | fixed | broken | answers changed | mean tokens | median tokens "
              "| truncated | gate rate |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(results["configs"], key=config_order):
        r = results["configs"][name]
        gate = f"{r['gate_rate']:.2f}" if "gate_rate" in r else ""
        base = name == "baseline"
        ci = "" if base else f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
        delta = "" if base else f"{r['delta']:+.3f}"
        p = "" if base else f"{r['mcnemar_p']:.3g}"
        wil = r.get("accuracy_ci95") or [float("nan")] * 2
        lines.append(f"| {name} | {r['accuracy']:.3f} | {wil[0]:.3f}-{wil[1]:.3f} | {delta} "
                     f"| {ci} | {p} | {r['fixed']} | "
                     f"{r['broken']} | {r['changed']:.2f} | {r['mean_tokens']:.0f} | "
                     f"{r['median_tokens']:.0f} | "
                     f"{r['truncated']} | {gate} |")
    ad = results["configs"].get("adaptive")
    if ad and ad.get("predictor_auroc") is not None:
        ci = ad.get("predictor_auroc_ci95") or [float("nan")] * 2
        lines += ["", f"Adaptive gate: threshold {ad['threshold']}, fired on "
                  f"{ad['gate_rate_on_baseline_wrong']:.2f} of the problems the baseline got wrong "
                  f"and {ad['gate_rate_on_baseline_right']:.2f} of those it got right. "
                  f"In-engine p_fail against baseline failure: AUROC {ad['predictor_auroc']:.2f} "
                  f"(bootstrap 95% CI {ci[0]:.2f}-{ci[1]:.2f}), expected calibration error "
                  f"{ad['calibration']['ece']:.3f} (calibration.png). The cut that maximises "
                  f"TPR - FPR on these problems (Youden's J): {ad['youden_threshold']:.3f}."]
    probed = [(n, results["configs"][n]["answer_probe"]) for n in
              sorted(results["configs"], key=config_order)
              if "answer_probe" in results["configs"][n]]
    if probed:
        lines += ["", "## Answer probe", "", "The profile's answer head on each arm's own "
                  "answers (its features read in the engine while they decoded), against "
                  "their being wrong; beside it, the prompt predictor's p_fail of the same "
                  "answers' problems (read from the prompt alone, by the arms that run the "
                  "gate) and the answer head's AUROC gain over it, both on the answers that "
                  "both heads read. 95% CIs: percentile bootstrap over answers, the gain's "
                  "paired; ECE's interval sits high (resampling only adds miscalibration).",
                  "",
                  "| config | answers read | AUROC | ECE | mean p_fail | prompt AUROC "
                  "| prompt ECE | AUROC gain |", "|---|---|---|---|---|---|---|---|"]

        def value(x, ci=None, fmt: str = ".3f") -> str:  # "0.812 (0.770 to 0.850)"
            if x is None:  # not computed (one class, or no prompt p_fail)
                return ""
            return format(x, fmt) + (f" ({format(ci[0], fmt)} to {format(ci[1], fmt)})"
                                     if ci else "")

        for name, a in probed:
            pr = a.get("prompt") or {}
            lines.append(
                f"| {name} | {a['answers']} | {value(a.get('auroc'), a.get('auroc_ci95'))} | "
                f"{value(a['calibration']['ece'], a.get('ece_ci95'))} | {value(a.get('mean'))} "
                f"| {value(pr.get('auroc'), pr.get('auroc_ci95'))} | "
                f"{value(pr['calibration']['ece'] if pr else None, pr.get('ece_ci95'))} | "
                f"{value(a.get('auroc_gain'), a.get('auroc_gain_ci95'), '+.3f')} |")
        lines += ["", "What a client has without the probe, on the same answers: the "
                  "answer's length in tokens as a failure score; then both again on the "
                  "answers not cut at max_tokens (a cut answer counts as wrong and is easy to "
                  "call).", "",
                  "| config | length AUROC | head's AUROC gain over length | finished answers "
                  "| head AUROC on them | length AUROC on them | head's gain on them |",
                  "|---|---|---|---|---|---|---|"]
        for name, a in probed:
            ln, fin = a.get("length") or {}, a.get("finished") or {}
            fln = fin.get("length") or {}
            lines.append(
                f"| {name} | {value(ln.get('auroc'), ln.get('auroc_ci95'))} | "
                f"{value(ln.get('answer_auroc_gain'), ln.get('answer_auroc_gain_ci95'), '+.3f')}"
                f" | {fin.get('answers', '')} | "
                f"{value(fin.get('auroc'), fin.get('auroc_ci95'))} | "
                f"{value(fln.get('auroc'), fln.get('auroc_ci95'))} | "
                f"{value(fln.get('answer_auroc_gain'), fln.get('answer_auroc_gain_ci95'), '+.3f')}"
                " |")
    wo = results.get("without")
    if wo:
        lines += ["", f"## Without {len(wo['excluded'])} problems listed in `{wo['file']}`", "",
                  "| config | problems | accuracy | Δ vs baseline | paired bootstrap 95% CI "
                  "| McNemar p | answer-probe AUROC |", "|---|---|---|---|---|---|---|"]
        for name in sorted(wo["configs"], key=config_order):
            r = wo["configs"][name]
            base = name == "baseline"
            ci = "" if base else f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
            auc = (r.get("answer_probe") or {}).get("auroc")
            lines.append(f"| {name} | {r['problems']} | {r['accuracy']:.3f} | "
                         f"{'' if base else format(r['delta'], '+.3f')} | {ci} | "
                         f"{'' if base else format(r['mcnemar_p'], '.3g')} | "
                         f"{'' if auc is None else format(auc, '.3f')} |")
        if wo.get("secondary"):
            w = wo["secondary"]
            lines += ["", f"Key secondary without them: Δ {w['delta']:+.3f} (95% CI "
                      f"[{w['ci95'][0]:+.3f}, {w['ci95'][1]:+.3f}]), p = {w['mcnemar_p']:.3g}."]
    sc = results.get("screen")
    if sc:
        lines += ["", f"## Alpha screen: {sc['verdict']}", "",
                  f"alpha* is the largest alpha that changes at least {sc['min_changed']:.0%} "
                  "of the final answers without a net loss (fixed - broken >= 0). Baseline "
                  f"mean output: {sc['baseline_mean_tokens']:.0f} tokens.", "",
                  "| alpha | answers changed | fixed | broken | net | accuracy | mean tokens "
                  "| truncated |", "|---|---|---|---|---|---|---|---|"]
        for r in sc["alphas"]:
            lines.append(f"| {r['alpha']:g} | {r['changed']:.2f} | {r['fixed']} | {r['broken']} "
                         f"| {r['net']:+d} | {r['accuracy']:.3f} | {r['mean_tokens']:.0f} "
                         f"| {r['truncated']} |")
    tp = results.get("throughput") or {}
    if tp.get("seconds"):
        lines += ["", f"Generation: {tp['generated_tokens']} tokens in {tp['seconds']:.0f} s "
                  f"({tp['generated_tok_s']:.0f} generated tok/s)."]
    lines += ["", "A difference is significant at 95% only when its CI excludes 0 (bootstrap) "
              "or p < 0.05 (McNemar).", ""]
    (out / "report.md").write_text("\n".join(lines))


def plot_calibration(out: Path, results: dict) -> None:
    """Reliability diagram of the adaptive gate's p_fail against baseline failure."""
    ad = results["configs"].get("adaptive")
    if not ad or "calibration" not in ad:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.array(ad["calibration"]["bins"])  # [B, 3]: mean p, observed rate, count
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.scatter(bins[:, 0], bins[:, 1], s=10 + 4 * bins[:, 2], color="#4472c4")
    ax.set_xlabel("predicted p_fail (bin mean)")
    ax.set_ylabel("baseline failure rate")
    ax.set_title(f"calibration, ECE {ad['calibration']['ece']:.3f}", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=120)
    plt.close(fig)


def config_order(name: str) -> tuple:
    """baseline, always, adaptive, random, then the alpha and K sweeps by value,
    then ablation profiles."""
    if name in MODES:
        return (MODES.index(name), 0.0, name)
    for rank, prefix in ((4, "alpha="), (5, "k=")):
        if name.startswith(prefix):
            return (rank, float(name[len(prefix):]), name)
    return (6, 0.0, name)


def plot_results(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    base = configs["baseline"]["accuracy"]
    names = sorted(configs, key=config_order)
    acc = [configs[n]["accuracy"] for n in names]
    # error bars: the CI of the difference, drawn around baseline + delta
    lo = [base + configs[n]["ci95"][0] for n in names]
    hi = [base + configs[n]["ci95"][1] for n in names]
    err = np.array([[a - lo_ for a, lo_ in zip(acc, lo)], [hi_ - a for a, hi_ in zip(acc, hi)]])
    err = np.clip(err, 0, None)
    fig, ax = plt.subplots(figsize=(max(4, len(names) * 0.9), 3.2))
    ax.bar(names, acc, yerr=err, capsize=3, color="#4472c4")
    ax.axhline(base, color="k", lw=0.8, ls="--")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{results['dataset']} ({results['problems']} problems)\n"
                 "error bars: paired-bootstrap 95% CI of the change", fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    for prefix, label in (("alpha=", "alpha"), ("k=", "K")):
        sweep = [(float(n[len(prefix):]), configs[n]["accuracy"]) for n in names
                 if n.startswith(prefix)]
        if len(sweep) < 2:
            continue
        sweep.sort()
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([x for x, _ in sweep], [a for _, a in sweep], "o-")
        ax.axhline(base, color="k", lw=0.8, ls="--", label="baseline")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"sweep-{label.lower()}.png", dpi=120)
        plt.close(fig)
