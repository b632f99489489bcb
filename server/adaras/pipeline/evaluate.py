"""`adaras eval`: accuracy of the model with and without steering, through
the steered engine, on problems kept apart from the probe set.

Configurations (each one greedy pass over the evaluation problems):
    baseline      no steering
    always        the profile at alpha, every request        (= "no gate" ablation)
    adaptive      the profile, gated by its failure predictor
    random        a profile with the same K deltas on random neurons, always on
    alpha=<a>     sweep: always-on at alpha a
    k=<n>         sweep: always-on with the profile's top-n neurons (by |delta|)
    <name>        --ablation name=profile.safetensors: another profile, always on

Output in <run>/<stage>/: generations.jsonl (resumable), results.json,
report.md, accuracy.png and sweep plots. Accuracies carry paired-bootstrap
95% confidence intervals of the difference to baseline (same problems).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adaras.pipeline.collect import read_problems
from adaras.pipeline.data import build_messages, load_distinct
from adaras.pipeline.engine import EngineOptions, Job, open_engine, prompt_ids, run_jobs
from adaras.pipeline.grade import grade_all
from adaras.pipeline.identify import select
from adaras.pipeline.run import Run, append_jsonl, read_jsonl, write_json
from adaras.profile import SteeringProfile

MODES = ("baseline", "always", "adaptive", "random")


@dataclass
class EvalArgs:
    dataset: str = "rg:gsm_symbolic"
    problems: int = 100
    seed: int = 1  # != collect's seed: other problems
    difficulty: float | None = None
    options: dict | None = None
    modes: list[str] = field(default_factory=lambda: list(MODES))
    alpha: float | None = None  # default: the profile's default_alpha
    alphas: list[float] = field(default_factory=list)  # sweep
    ks: list[int] = field(default_factory=list)  # sweep
    ablations: dict[str, str] = field(default_factory=dict)  # name -> profile path
    threshold: float | None = None  # default: the profile's calibrated threshold
    max_tokens: int = 512
    profile: str | None = None  # default: the run's train-predictor (else identify) profile
    stage: str = "eval"  # output folder; use another for a second benchmark (transfer)
    bootstrap: int = 10000


def default_profile(run: Run) -> Path:
    for stage in ("train-predictor", "identify"):
        path = run.root / stage / "profile.safetensors"
        if path.exists():
            return path
    raise FileNotFoundError(f"{run.root}: no profile yet; run `adaras identify` or pass --profile")


def evaluate(run: Run, args: EvalArgs, engine: EngineOptions, *, restart: bool = False) -> dict:
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown --modes {unknown}; choose from {list(MODES)}")
    if "baseline" not in args.modes:
        args.modes = ["baseline", *args.modes]  # every comparison is paired against it
    source = Path(args.profile) if args.profile else default_profile(run)
    profile = SteeringProfile.load(source)
    if "adaptive" in args.modes and profile.predictor is None:
        raise ValueError(f"{source} has no failure predictor; run `adaras train-predictor`, "
                         "or drop 'adaptive' from --modes")
    if any(k < 1 or k > profile.k for k in args.ks):
        raise ValueError(f"--k values must be in 1..{profile.k} (the profile's K), got {args.ks}")
    with run.stage(args.stage, {**vars(args), "profile": str(source), "engine": engine.to_dict()},
                   restart=restart) as out:
        probe_file = run.root / "collect" / "problems.jsonl"
        # never evaluate on a problem the profile or the predictor was built from
        probe = read_problems(probe_file) if probe_file.exists() else []
        problems, dropped = load_distinct(args.dataset, args.problems, seed=args.seed,
                                          difficulty=args.difficulty, options=args.options,
                                          exclude=probe)
        profiles = write_profiles(out, profile, args)
        configs = build_configs(profile, profiles, args)
        llm = open_engine(engine)
        from adaras.engine import load_profile

        for name, path in profiles.items():
            load_profile(llm, name, str(path))
        tok = llm.get_tokenizer()
        prompts = {p.id: prompt_ids(tok, build_messages(p)) for p in problems}
        generate_all(llm, problems, prompts, configs, args, out / "generations.jsonl",
                     engine.chunk)
        results = summarize(out, problems, configs, args)
        results.update({"profile": str(source), "dataset": args.dataset,
                        "removed_probe_overlap": dropped})
        write_json(out / "results.json", results)
        write_report(out, results, args)
        plot_results(out, results)
        run.record(args.stage, **{name: {k: r[k] for k in ("accuracy", "delta", "ci95")}
                                  for name, r in results["configs"].items()})
        return results


def write_profiles(out: Path, profile: SteeringProfile, args: EvalArgs) -> dict[str, Path]:
    """The profiles this evaluation loads into the engine, written next to it."""
    paths = {"main": out / "profile-main.safetensors"}
    profile.save(paths["main"])
    if "random" in args.modes:
        rnd = randomize(profile, args.seed)
        paths["random"] = out / "profile-random.safetensors"
        rnd.save(paths["random"])
    for k in args.ks:
        sub = truncate(profile, k)
        paths[f"k{k}"] = out / f"profile-k{k}.safetensors"
        sub.save(paths[f"k{k}"])
    for name, path in args.ablations.items():
        other = SteeringProfile.load(path, expect=profile.model)
        paths[f"ablation-{name}"] = out / f"profile-ablation-{name}.safetensors"
        other.save(paths[f"ablation-{name}"])
    return paths


def randomize(profile: SteeringProfile, seed: int) -> SteeringProfile:
    """Same K delta values, moved to K random neurons (the random-steering control)."""
    m = profile.model
    s = np.zeros((m.num_layers, m.intermediate_size), dtype=np.float32)
    s[profile.layers.numpy(), profile.neurons.numpy()] = profile.delta.numpy()
    survivors = np.zeros_like(s, dtype=bool)
    survivors[profile.layers.numpy(), profile.neurons.numpy()] = True
    layers, neurons, delta = select({"s": s, "survivors": survivors}, profile.k, "random", seed)
    return SteeringProfile(name=f"{profile.name}-random", model=m, layers=layers, neurons=neurons,
                           delta=delta, default_alpha=profile.default_alpha,
                           provenance={**profile.provenance, "selection": "random",
                                       "random_seed": seed})


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
    alpha = profile.default_alpha if args.alpha is None else args.alpha
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
    for a in args.alphas:
        configs[f"alpha={a:g}"] = {"mode": "always", "profile": "main", "alpha": a}
    for k in args.ks:
        configs[f"k={k}"] = {"mode": "always", "profile": f"k{k}", "alpha": alpha}
    for name in args.ablations:
        configs[name] = {"mode": "always", "profile": f"ablation-{name}", "alpha": alpha}
    return configs


def generate_all(llm, problems, prompts, configs, args: EvalArgs, path: Path, chunk: int) -> None:
    from vllm import SamplingParams

    done = {r["key"] for r in read_jsonl(path)}
    by_key, jobs = {}, []
    for name, steering in configs.items():
        extra = {"steering": steering} if steering else None
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, extra_args=extra)
        for p in problems:
            key = f"{name}|{p.id}"
            by_key[key] = (name, p)
            if key not in done:
                jobs.append(Job(key, prompts[p.id], params))

    def on_done(results):
        probs = [by_key[j.key][1] for j, _, _ in results]
        grades = grade_all(probs, [o.outputs[0].text for _, o, _ in results])
        append_jsonl(path, [
            {"key": j.key, "config": by_key[j.key][0], "problem": p.id,
             "completion": o.outputs[0].text, "tokens": len(o.outputs[0].token_ids),
             "finish_reason": o.outputs[0].finish_reason, "correct": g.correct,
             "extracted": g.extracted, "steering": rep}
            for (j, o, rep), p, g in zip(results, probs, grades)])

    run_jobs(llm, jobs, on_done, f"evaluate {len(configs)} configs x {len(problems)} problems",
             chunk)


def paired_bootstrap(base: np.ndarray, other: np.ndarray, n: int, seed: int = 0) -> list[float]:
    """95% CI of mean(other - base) resampling problems (paired)."""
    rng = np.random.default_rng(seed)
    diff = other.astype(float) - base.astype(float)
    idx = rng.integers(0, diff.size, size=(n, diff.size))
    means = diff[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarize(out: Path, problems, configs, args: EvalArgs) -> dict:
    rows = read_jsonl(out / "generations.jsonl")
    ids = [p.id for p in problems]
    table = {(r["config"], r["problem"]): r for r in rows}
    base = np.array([table[("baseline", i)]["correct"] for i in ids])
    results = {"problems": len(ids), "configs": {}}
    for name, steering in configs.items():
        got = [table[(name, i)] for i in ids]
        correct = np.array([r["correct"] for r in got])
        applied = [bool(r["steering"].get("applied")) for r in got if r["steering"]]
        entry = {
            "steering": steering,
            "accuracy": float(correct.mean()),
            "delta": float(correct.mean() - base.mean()),
            "ci95": paired_bootstrap(base, correct, args.bootstrap) if name != "baseline"
            else [0.0, 0.0],
            "fixed": int((correct & ~base).sum()), "broken": int((~correct & base).sum()),
            "mean_tokens": float(np.mean([r["tokens"] for r in got])),
            "truncated": int(sum(r["finish_reason"] == "length" for r in got)),
        }
        if steering and steering["mode"] == "adaptive":
            entry["gate_rate"] = float(np.mean(applied)) if applied else 0.0
            p_fail = [r["steering"].get("failure_probability") for r in got]
            entry["threshold"] = got[0]["steering"].get("threshold")
            wrong = ~base
            gated = np.array(applied)
            if wrong.any() and (~wrong).any():
                entry["gate_rate_on_baseline_wrong"] = float(gated[wrong].mean())
                entry["gate_rate_on_baseline_right"] = float(gated[~wrong].mean())
                from sklearn.metrics import roc_auc_score

                entry["predictor_auroc"] = float(roc_auc_score(wrong, p_fail))
        results["configs"][name] = entry
    return results


def write_report(out: Path, results: dict, args: EvalArgs) -> None:
    lines = [f"# Evaluation: {results['dataset']}", "",
             f"{results['problems']} problems (seed {args.seed}; "
             f"{results['removed_probe_overlap']} repeated or probe-set problems skipped), greedy "
             f"decoding, max {args.max_tokens} tokens. Profile: `{results['profile']}`.", "",
             "| config | accuracy | Δ vs baseline | paired bootstrap 95% CI | fixed | broken "
             "| gate rate |", "|---|---|---|---|---|---|---|"]
    for name in sorted(results["configs"], key=config_order):
        r = results["configs"][name]
        gate = f"{r['gate_rate']:.2f}" if "gate_rate" in r else ""
        ci = "" if name == "baseline" else f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
        delta = "" if name == "baseline" else f"{r['delta']:+.3f}"
        lines.append(f"| {name} | {r['accuracy']:.3f} | {delta} | {ci} | {r['fixed']} | "
                     f"{r['broken']} | {gate} |")
    ad = results["configs"].get("adaptive")
    if ad and "predictor_auroc" in ad:
        lines += ["", f"Adaptive gate: threshold {ad['threshold']}, fired on "
                  f"{ad['gate_rate_on_baseline_wrong']:.2f} of the problems the baseline got wrong "
                  f"and {ad['gate_rate_on_baseline_right']:.2f} of those it got right "
                  f"(in-engine p_fail AUROC against baseline failure: {ad['predictor_auroc']:.2f})."]
    lines += ["", "A difference is significant at 95% only when its CI excludes 0.", ""]
    (out / "report.md").write_text("\n".join(lines))


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
