"""`adaras identify`: capture mean activations of the probe traces, score
every neuron by the polarity-aware mean difference, keep the top K, write a
steering profile.

Two recipes (--recipe):

paired (default; this project's)

For trace p and neuron (l, i), mu(p) is the mean of a = act(gate)*up over
the trace's generated tokens (teacher-forced: prompt + trace prefilled once
by the engine, the mean taken from the first generated position on).

    S(l, i)   = mean_k [ mu(p_k+) - mu(p_k-) ]
    polarity  : keep (l, i) only if mean_k mu(p_k+) * mean_k mu(p_k-) < 0
    selection : top K of |S| among the survivors

reference (the paper's reference implementation, cat-sk/AdaRAS)
    traces    every untruncated sampled trace of a probe problem that has both
              kinds, at most --per-side correct and --per-side incorrect each (4)
    mu(t)     mean `a` over *every* token of "Question: {q}\nThinking process:{trace}",
              tokenized without the chat template
    g, b      mean mu over all correct traces, over all incorrect ones (unpaired)
    S         g - b (the CSV's `weight`)
    polarity  keep (l, i) only if g * b < 0
    ranking   |S| / (|g| + |b| + 1e-8) in float32, descending (1 exactly when the
              sign flips, so this mostly ties), then |S| descending: its CSVs' order
    K         the first K (50); alpha 0.3; the profile steers the last prompt
              position and every decode step (provenance steer_prompt "last"), as
              its hook does. Adaptive requests decide after the prompt and steer
              decode steps only.

Both recipes store sigma: each selected neuron's standard deviation of mu(t)
over the traces used (both kinds), so a dose can be read in sigma units. And
both report split-half reliability: the top-K chosen from two disjoint halves
of the probe problems, their overlap, the overlap of K random neurons (K^2/N),
and the overlap when the correct/incorrect labels are shuffled within each
problem (the null of "the same high-variance neurons come up anyway").

Ablations (--selection):
    mean-diff    the method above (default)
    no-polarity  top K of |S| over all neurons
    no-ranking   K neurons drawn at random among the polarity survivors, delta = S there
                 (scaled, like no-polarity, to the mean-diff profile's L2 norm)
    random       K neurons drawn at random over all neurons; they carry the
                 mean-diff profile's K delta values (shuffled), so the steering
                 has the same size and only *where* it goes is random
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adaras.pipeline.capture import capture_cached
from adaras.pipeline.grade import is_cut
from adaras.pipeline.llm import EngineOptions, Job, capture_params
from adaras.pipeline.run import Run, read_jsonl, write_json
from adaras.profile import ModelShape, SteeringProfile

SELECTIONS = ("mean-diff", "no-polarity", "no-ranking", "random")
RECIPES = ("paired", "reference")
REFERENCE_EPS = 1e-8  # in the reference's relative difference
# Which prompt positions a profile also steers (provenance "steer_prompt"; the
# runtime reads it). Decode steering alone never touches the first generated
# token, whose logits come from the last prompt position.
STEER_PROMPT = ("none", "last")


@dataclass
class IdentifyArgs:
    k: int = 50
    selection: str = "mean-diff"
    alpha: float = 0.3
    name: str | None = None  # default: the run folder's name (+ the ablation)
    seed: int = 0
    skip_last_layers: int = 0  # choose neurons only in layers before the last N
    steer_prompt: str | None = None  # "last": also steer the last prompt position
    # (STEER_PROMPT); default "none", "last" for the reference recipe
    stage: str | None = None  # default: identify[-reference][-<selection>][-skip<N>][-prompt-<p>]
    recipe: str = "paired"
    per_side: int = 4  # reference recipe: traces of each kind per problem
    split_half_permutations: int = 20


def identify(run: Run, args: IdentifyArgs, engine: EngineOptions, *,
             restart: bool = False) -> Path:
    if args.selection not in SELECTIONS:
        raise ValueError(f"--selection must be one of {list(SELECTIONS)}, got {args.selection!r}")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {list(RECIPES)}, got {args.recipe!r}")
    if args.recipe == "reference" and args.selection != "mean-diff":
        raise ValueError("--recipe reference has its own ranking; the --selection ablations "
                         "belong to the paired recipe")
    if args.per_side < 1:
        raise ValueError(f"--per-side must be >= 1, got {args.per_side}")
    if args.steer_prompt is None:
        args.steer_prompt = "last" if args.recipe == "reference" else "none"
    if args.steer_prompt not in STEER_PROMPT:
        raise ValueError(f"--steer-prompt must be one of {list(STEER_PROMPT)}, "
                         f"got {args.steer_prompt!r}")
    if args.skip_last_layers < 0:
        raise ValueError(f"--skip-last-layers must be >= 0, got {args.skip_last_layers}")
    collect_entry = run.require("collect")
    shape = model_shape(engine.model)
    if args.skip_last_layers >= shape.num_layers:
        raise ValueError(f"--skip-last-layers {args.skip_last_layers} leaves no layer "
                         f"(the model has {shape.num_layers})")
    variant = "".join([f"-{args.recipe}" if args.recipe != "paired" else "",
                       f"-{args.selection}" if args.selection != "mean-diff" else "",
                       f"-skip{args.skip_last_layers}" if args.skip_last_layers else "",
                       f"-prompt-{args.steer_prompt}"
                       if args.steer_prompt != default_steer_prompt(args.recipe) else ""])
    stage = args.stage or f"identify{variant}"
    with run.stage(stage, {**vars(args), "engine": engine.to_dict()}, restart=restart) as out:
        groups = probe_traces(run, args)  # [(problem, correct keys, incorrect keys)]
        # The capture does not depend on the selection: all ablations share it.
        means = (capture_reference_means(run, groups, engine) if args.recipe == "reference"
                 else capture_trace_means(run, json.loads(
                     (run.root / "collect" / "pairs.json").read_text()), engine))

        score, (layers, neurons, delta) = choose(groups, means, args)
        used = [key for _, pos, neg in groups for key in (*pos, *neg)]
        sigma = trace_spread(means, used, layers, neurons)
        reliability = split_half(groups, means, args)
        name = args.name or f"{run.root.name}{variant}"
        profile = SteeringProfile(
            name=name, model=shape, layers=layers, neurons=neurons, delta=delta,
            default_alpha=args.alpha, sigma=sigma,
            provenance={
                "dataset": collect_entry["args"]["dataset"],
                "model": engine.model, "recipe": args.recipe,
                "problems": len(groups),
                **({"traces_correct": sum(len(g[1]) for g in groups),
                    "traces_incorrect": sum(len(g[2]) for g in groups),
                    "per_side": args.per_side, "mean_over": "question and trace, no chat template",
                    "ranking": "relative difference, then |S| (float32)"}
                   if args.recipe == "reference" else
                   {"pairs": sum(len(g[1]) for g in groups),
                    "mean_over": "generated tokens (prompt through the chat template)"}),
                "k": args.k, "selection": args.selection,
                "polarity_filter": args.selection in ("mean-diff", "no-ranking"),
                "polarity_survivors": int(score["survivors"].sum()),
                "seed": args.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "skip_last_layers": args.skip_last_layers,
                **({"steer_prompt": args.steer_prompt} if args.steer_prompt != "none" else {}),
                "split_half_overlap": reliability["overlap"],
                "method": "AdaRAS (arXiv 2601.19847)",
            })
        profile.validate(shape)
        path = out / "profile.safetensors"
        profile.save(path)
        plot_layers(profile, shape, out / "rcn_layers.png")
        stats = {"k": args.k, "selection": args.selection,
                 "polarity_survivors": int(score["survivors"].sum()),
                 "neurons_total": int(score["s"].size),
                 "mean_abs_delta": float(np.abs(delta.numpy()).mean()),
                 "mean_sigma": float(sigma.numpy().mean()),
                 "dose_in_sigma": profile.dose_in_sigma(),
                 "split_half": reliability,
                 "layer_histogram": profile.layer_histogram()}
        write_json(out / "summary.json", stats)
        run.record(stage, **stats)
        return path


def model_shape(model: str) -> ModelShape:
    import transformers

    from adaras.zoo import resolve_model

    return ModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(resolve_model(model)))


def default_steer_prompt(recipe: str) -> str:
    return "last" if recipe == "reference" else "none"


def chosen_selection(args: IdentifyArgs) -> str:
    return "reference" if args.recipe == "reference" else args.selection


def probe_traces(run: Run, args: IdentifyArgs) -> list[tuple[str, list[str], list[str]]]:
    """The traces each recipe contrasts, by probe problem: (problem id, correct
    trace keys, incorrect trace keys). Paired: the collect stage's pairs, one
    entry per pair's two sides. Reference: every untruncated sampled trace of a
    problem with both kinds, at most `per_side` of each (seeded choice)."""
    cdir = run.root / "collect"
    if args.recipe == "paired":
        out: dict[str, tuple[list[str], list[str]]] = {}
        for p in json.loads((cdir / "pairs.json").read_text()):
            pos, neg = out.setdefault(p["problem"], ([], []))
            pos.append(p["correct"])
            neg.append(p["incorrect"])
        return [(pid, pos, neg) for pid, (pos, neg) in out.items()]
    rng = np.random.default_rng(args.seed)
    by_problem: dict[str, tuple[list[str], list[str]]] = {}
    for r in read_jsonl(cdir / "samples.jsonl"):
        if is_cut(r):
            continue  # cut off: neither correct nor incorrect
        by_problem.setdefault(r["problem"], ([], []))[0 if r["correct"] else 1].append(r["key"])
    groups = []
    for pid in sorted(by_problem):
        pos, neg = (sorted(v) for v in by_problem[pid])
        if pos and neg:
            groups.append((pid, sorted(rng.permutation(pos)[:args.per_side].tolist()),
                           sorted(rng.permutation(neg)[:args.per_side].tolist())))
    if not groups:
        raise RuntimeError("no probe problem has both a correct and an incorrect trace; "
                           "collect more samples")
    return groups


def capture_trace_means(run: Run, pairs: list[dict], engine: EngineOptions) -> dict[str, np.ndarray]:
    """Mean `a` over each paired trace's generated tokens: {trace key: float32 [L, I]}."""
    keys = sorted({p["correct"] for p in pairs} | {p["incorrect"] for p in pairs})
    traces = {r["key"]: r for r in read_jsonl(run.root / "collect" / "samples.jsonl")}
    jobs = []
    for key in keys:
        r = traces[key]
        if not r["completion_ids"]:
            raise ValueError(f"trace {key} is empty; nothing to average")
        jobs.append(Job(key, r["prompt"] + r["completion_ids"],
                        capture_params({"mean_from": len(r["prompt"])})))
    return capture_cached(run, "trace", jobs, "mean", engine)


def reference_text(question: str, trace: str) -> str:
    """What the reference implementation averages over: no chat template."""
    return f"Question: {question}\nThinking process:{trace}"


def capture_reference_means(run: Run, groups, engine: EngineOptions) -> dict[str, np.ndarray]:
    """Mean `a` over every token of `reference_text` for each trace:
    {trace key: float32 [L, I]}."""
    import transformers

    from adaras.pipeline.collect import read_problems
    from adaras.zoo import resolve_model

    tok = transformers.AutoTokenizer.from_pretrained(resolve_model(engine.model))
    questions = {p.id: p.question for p in read_problems(run.root / "collect" / "problems.jsonl")}
    traces = {r["key"]: r for r in read_jsonl(run.root / "collect" / "samples.jsonl")}
    jobs = []
    for pid, pos, neg in groups:
        for key in (*pos, *neg):
            ids = tok.encode(reference_text(questions[pid], traces[key]["completion"]))
            jobs.append(Job(key, ids, capture_params({"mean_from": 0})))
    return capture_cached(run, "reference-trace", jobs, "mean", engine)


def contrast(groups, means: dict[str, np.ndarray], recipe: str) -> dict[str, np.ndarray]:
    """The recipe's score over all neurons, float32/bool [L, I]: s (S), the
    means on each side, polarity survivors; the reference adds `rel`."""
    pos = np.stack([means[k] for _, keys, _ in groups for k in keys]).astype(np.float64)
    neg = np.stack([means[k] for _, _, keys in groups for k in keys]).astype(np.float64)
    mu_pos, mu_neg = pos.mean(axis=0), neg.mean(axis=0)  # [L, I]; paired: E_k[mu+ - mu-]
    score = {"s": (mu_pos - mu_neg).astype(np.float32), "mu_pos": mu_pos.astype(np.float32),
             "mu_neg": mu_neg.astype(np.float32), "survivors": (mu_pos * mu_neg) < 0}
    if recipe == "reference":  # its pandas columns are float32, and so is its arithmetic
        g, b = score["mu_pos"], score["mu_neg"]
        score["s"] = g - b  # float32: |S| then equals |g| + |b| exactly where the sign flips
        score["rel"] = np.abs(score["s"]) / (np.abs(g) + np.abs(b) + np.float32(REFERENCE_EPS))
    return score


def mean_difference(pairs: list[dict], means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """s = E_k[mu+ - mu-], the mean activations on each side, and the polarity
    survivors (E[mu+] * E[mu-] < 0); all float32/bool [L, I]."""
    return contrast([(p["problem"], [p["correct"]], [p["incorrect"]]) for p in pairs],
                    means, "paired")


def trace_spread(means: dict[str, np.ndarray], keys: list[str], layers, neurons) -> torch.Tensor:
    """sigma: float32 [K], the standard deviation (ddof 1) of the per-trace mean
    activation over `keys` at each (layer, neuron)."""
    values = np.stack([means[k][layers.numpy(), neurons.numpy()] for k in keys])  # [T, K]
    return torch.from_numpy(values.astype(np.float64).std(axis=0, ddof=1).astype(np.float32))


def choose(groups, means: dict[str, np.ndarray], args: IdentifyArgs):
    """The recipe's contrast over these probe groups, the last layers skipped,
    and its selection: (score, (layers, neurons, delta))."""
    score = skip_last_layers(contrast(groups, means, args.recipe), args.skip_last_layers)
    return score, select(score, args.k, chosen_selection(args), args.seed)


def split_half(groups, means: dict[str, np.ndarray], args: IdentifyArgs) -> dict:
    """Split-half reliability of the top K: the probe problems split into two
    disjoint halves (seeded), the recipe's top K chosen from each; their
    overlap, against K^2 / N (two random K-sets of N neurons) and against the
    overlaps when each half's labels are shuffled within every problem."""
    if len(groups) < 4:
        return {"overlap": None, "why": f"{len(groups)} probe problems; need at least 4"}
    rng = np.random.default_rng(args.seed + 1)
    order = rng.permutation(len(groups))
    halves = [[groups[i] for i in sorted(order[:len(groups) // 2])],
              [groups[i] for i in sorted(order[len(groups) // 2:])]]

    def top(part) -> set[int]:
        score, (layers, neurons, _) = choose(part, means, args)
        width = score["s"].shape[1]
        return set((layers.long() * width + neurons.long()).tolist())

    def shuffled(part):
        out = []
        for pid, pos, neg in part:
            keys = rng.permutation([*pos, *neg]).tolist()
            out.append((pid, keys[:len(pos)], keys[len(pos):]))
        return out

    a, b = (top(h) for h in halves)
    n_neurons = next(iter(means.values())).size
    k = min(len(a), len(b))
    null = [len(top(shuffled(halves[0])) & top(shuffled(halves[1])))
            for _ in range(args.split_half_permutations)]
    return {"k": k, "problems": [len(h) for h in halves], "overlap": len(a & b),
            "overlap_fraction": len(a & b) / max(k, 1),
            "chance_random_neurons": k * k / n_neurons,
            "label_shuffled_overlaps": null,
            "label_shuffled_mean": float(np.mean(null)) if null else None,
            "label_shuffled_p95": float(np.percentile(null, 95)) if null else None}


def skip_last_layers(score: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The score with the last `n` layers taken out of every selection (S = 0,
    no polarity survivor there)."""
    if n == 0:
        return score
    out = {k: v.copy() for k, v in score.items()}
    out["s"][-n:] = 0.0
    out["survivors"][-n:] = False
    out["allowed"] = np.ones_like(out["survivors"])
    out["allowed"][-n:] = False
    return out


def select(score: dict[str, np.ndarray], k: int, selection: str, seed: int = 0):
    """(layers int32 [K], neurons int32 [K], delta float32 [K]), sorted by |delta| descending.

    The ablations (every selection but mean-diff) are scaled to the mean-diff
    profile's L2 norm, so they differ from it in placement only."""
    s = score["s"]
    L, I = s.shape
    flat = s.reshape(-1)
    rng = np.random.default_rng(seed)
    if selection == "mean-diff":
        pool = np.flatnonzero(score["survivors"].reshape(-1))
        chosen = pool[np.argsort(-np.abs(flat[pool]), kind="stable")[:k]]
    elif selection == "reference":  # its CSV order: rel desc, then |S| desc; kept as ranked
        pool = np.flatnonzero(score["survivors"].reshape(-1))
        rank = np.lexsort((-np.abs(flat[pool]), -score["rel"].reshape(-1)[pool]))
        chosen = pool[rank[:k]]
        if chosen.size == 0:
            raise RuntimeError("no neuron survives the polarity filter; collect more traces")
        return (torch.from_numpy((chosen // I).astype(np.int32)),
                torch.from_numpy((chosen % I).astype(np.int32)),
                torch.from_numpy(flat[chosen].astype(np.float32)))
    elif selection == "no-polarity":
        chosen = np.argsort(-np.abs(flat), kind="stable")[:k]
    elif selection == "no-ranking":
        pool = np.flatnonzero(score["survivors"].reshape(-1))
        chosen = rng.choice(pool, size=min(k, pool.size), replace=False)
    elif selection == "random":
        real = select(score, k, "mean-diff")[2].numpy()
        pool = np.flatnonzero(score["allowed"].reshape(-1)) if "allowed" in score \
            else np.arange(flat.size)
        chosen = rng.choice(pool, size=real.size, replace=False)
        values = rng.permutation(real)
        order = np.argsort(-np.abs(values), kind="stable")
        chosen, values = chosen[order], values[order]
        return (torch.from_numpy((chosen // I).astype(np.int32)),
                torch.from_numpy((chosen % I).astype(np.int32)),
                torch.from_numpy(values.astype(np.float32)))
    else:
        raise ValueError(f"unknown selection {selection!r}; one of {list(SELECTIONS)}")
    if chosen.size == 0:
        raise RuntimeError("no neuron survives the polarity filter; collect more pairs")
    chosen = chosen[np.argsort(-np.abs(flat[chosen]), kind="stable")]
    values = flat[chosen].astype(np.float64)
    if selection != "mean-diff":  # an ablation varies where the steering goes, not its size
        values *= np.linalg.norm(select(score, k, "mean-diff")[2].numpy()) / \
            max(np.linalg.norm(values), 1e-30)
    return (torch.from_numpy((chosen // I).astype(np.int32)),
            torch.from_numpy((chosen % I).astype(np.int32)),
            torch.from_numpy(values.astype(np.float32)))


def plot_layers(profile: SteeringProfile, shape: ModelShape, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = profile.layer_histogram()
    fig, ax = plt.subplots(figsize=(max(4, shape.num_layers * 0.25), 3))
    ax.bar(range(shape.num_layers), hist, color="#c0504d")
    ax.set_xlabel("layer")
    ax.set_ylabel("RCNs")
    ax.set_title(f"{profile.name}: {profile.k} RCNs by layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
