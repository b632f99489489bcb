"""Hugging Face transformers reference paths: the same steering and the same
predictor features as the engine, computed with forward hooks.

The neuron activation `a = act(gate) * up` is the *input* of `mlp.down_proj`
(hooking `mlp.act_fn` would give `act(gate)` without `* up`). Used by the
parity tests and by teacher-forced activation capture.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from adaras.profile import SteeringProfile


def _down_projs(model) -> list[torch.nn.Module]:
    return [layer.mlp.down_proj for layer in model.model.layers]


@contextmanager
def steering_hooks(model, profile: SteeringProfile, alpha: float, start: int = 0) -> Iterator[None]:
    """Add `alpha * S'` to `a` at sequence positions >= `start` in every layer."""
    handles = []
    for layer, (neurons, delta) in profile.by_layer().items():
        down = _down_projs(model)[layer]

        def pre_hook(module, args, neurons=neurons, delta=delta):
            (a,) = args  # a: [B, T, I]
            a = a.clone()
            a[:, start:, neurons] += (alpha * delta).to(a.dtype)
            return (a,)

        handles.append(down.register_forward_pre_hook(pre_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_neurons(model, layers: torch.Tensor, neurons: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Capture `a[:, :, neuron]` for each (layer, neuron) pair.

    Yields a list that, after a forward, holds one tensor `[B, T, F]` (float32),
    columns in the order of the given pairs.
    """
    layers, neurons = layers.tolist(), neurons.tolist()
    per_layer: dict[int, list[tuple[int, int]]] = {}
    for f, (layer, neuron) in enumerate(zip(layers, neurons)):
        per_layer.setdefault(layer, []).append((f, neuron))
    store: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []
    handles = []
    for layer, items in per_layer.items():
        cols = torch.tensor([n for _, n in items])

        def pre_hook(module, args, layer=layer, cols=cols):
            store[layer] = args[0][..., cols].float()

        handles.append(_down_projs(model)[layer].register_forward_pre_hook(pre_hook))
    try:
        yield out
        if store:
            first = next(iter(store.values()))
            feats = torch.zeros(*first.shape[:2], len(layers))
            for layer, items in per_layer.items():
                feats[..., [f for f, _ in items]] = store[layer]
            out.append(feats)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def mean_activations(model, input_ids: list[int], start: int = 0) -> torch.Tensor:
    """Teacher-forced mean of `a` over positions >= `start` of one sequence,
    for every neuron of every layer -> float32 [L, I]. The reference for the
    engine's capture path (`extra_args["adaras_capture"]["mean_from"]`)."""
    downs = _down_projs(model)
    means: list[torch.Tensor | None] = [None] * len(downs)
    handles = []
    for layer, down in enumerate(downs):

        def pre_hook(module, args, layer=layer):
            means[layer] = args[0][0, start:].float().mean(dim=0)  # [I]

        handles.append(down.register_forward_pre_hook(pre_hook))
    try:
        model(torch.tensor([input_ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(means)  # [L, I]
