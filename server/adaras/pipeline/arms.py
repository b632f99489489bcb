"""The profiles an eval's control arms load, each built from the profile under
test: -S (`negate`), random neurons matched per layer and in norm
(`randomize`), its top-k neurons (`truncate`), another profile scaled to its
norm (`same_norm`); each keeps the profile's heads, so every arm is probed and
gated alike. `write_profiles` writes the ones a stage's arms need."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from adaras.pipeline.eval_args import EvalArgs
from adaras.profile import SteeringProfile


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
