"""`adaras identify`: capture mean activations of the paired traces, score
every neuron by the polarity-aware mean difference, keep the top K, write a
steering profile.

For trace p and neuron (l, i), mu(p) is the mean of a = act(gate)*up over
the trace's generated tokens (teacher-forced: prompt + trace prefilled once
by the engine, the mean taken from the first generated position on).

    S(l, i)   = mean_k [ mu(p_k+) - mu(p_k-) ]
    polarity  : keep (l, i) only if mean_k mu(p_k+) * mean_k mu(p_k-) < 0
    selection : top K of |S| among the survivors

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
from adaras.pipeline.llm import EngineOptions, Job, capture_params
from adaras.pipeline.run import Run, read_jsonl, write_json
from adaras.profile import ModelShape, SteeringProfile

SELECTIONS = ("mean-diff", "no-polarity", "no-ranking", "random")
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
    steer_prompt: str = "none"  # "last": also steer the last prompt position (STEER_PROMPT)
    stage: str | None = None  # default: identify[-<selection>][-skip<N>][-prompt-<p>]


def identify(run: Run, args: IdentifyArgs, engine: EngineOptions, *,
             restart: bool = False) -> Path:
    if args.selection not in SELECTIONS:
        raise ValueError(f"--selection must be one of {list(SELECTIONS)}, got {args.selection!r}")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
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
    variant = "".join([f"-{args.selection}" if args.selection != "mean-diff" else "",
                       f"-skip{args.skip_last_layers}" if args.skip_last_layers else "",
                       f"-prompt-{args.steer_prompt}" if args.steer_prompt != "none" else ""])
    stage = args.stage or f"identify{variant}"
    with run.stage(stage, {**vars(args), "engine": engine.to_dict()}, restart=restart) as out:
        cdir = run.root / "collect"
        pairs = json.loads((cdir / "pairs.json").read_text())
        # The capture does not depend on the selection: all ablations share it.
        means = capture_trace_means(run, pairs, engine)
        score = skip_last_layers(mean_difference(pairs, means), args.skip_last_layers)
        layers, neurons, delta = select(score, args.k, args.selection, args.seed)
        name = args.name or f"{run.root.name}{variant}"
        profile = SteeringProfile(
            name=name, model=shape, layers=layers, neurons=neurons, delta=delta,
            default_alpha=args.alpha,
            provenance={
                "dataset": collect_entry["args"]["dataset"],
                "model": engine.model,
                "problems": collect_entry["results"]["problems_with_both"],
                "pairs": len(pairs), "k": args.k, "selection": args.selection,
                "polarity_filter": args.selection in ("mean-diff", "no-ranking"),
                "polarity_survivors": int(score["survivors"].sum()),
                "seed": args.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "skip_last_layers": args.skip_last_layers,
                **({"steer_prompt": args.steer_prompt} if args.steer_prompt != "none" else {}),
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
                 "layer_histogram": profile.layer_histogram()}
        write_json(out / "summary.json", stats)
        run.record(stage, **stats)
        return path


def model_shape(model: str) -> ModelShape:
    import transformers

    from adaras.zoo import resolve_model

    return ModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(resolve_model(model)))


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


def mean_difference(pairs: list[dict], means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """s = E_k[mu+ - mu-], the mean activations on each side, and the polarity
    survivors (E[mu+] * E[mu-] < 0); all float32/bool [L, I]."""
    pos = np.stack([means[p["correct"]] for p in pairs]).astype(np.float64)  # [P, L, I]
    neg = np.stack([means[p["incorrect"]] for p in pairs]).astype(np.float64)  # [P, L, I]
    mu_pos, mu_neg = pos.mean(axis=0), neg.mean(axis=0)
    return {"s": (mu_pos - mu_neg).astype(np.float32), "mu_pos": mu_pos.astype(np.float32),
            "mu_neg": mu_neg.astype(np.float32), "survivors": (mu_pos * mu_neg) < 0}


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
