"""The worker's profile store: profiles laid out for this rank's neuron shard,
by name (what requests ask for) and by version (what requests were admitted
with: a reload or unload never changes a request in flight).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from adaras.profile import ModelShape, ProfileError, SteeringProfile, file_version

logger = logging.getLogger("adaras.engine")

RETIRE_GRACE_S = 300.0


@dataclass(eq=False)  # hashed by identity: a reloaded profile is a new key
class LoadedProfile:
    """A profile laid out for this rank's shard of the MLP neurons."""

    profile: SteeringProfile
    version: str  # sha256 of the file: identifies this exact profile across processes
    idx: torch.Tensor  # int32 [L, Kp] local columns, -1 pad
    delta: torch.Tensor  # fp32 [L, Kp]
    feat_idx: torch.Tensor | None  # int32 [L, F] local column of feature f if in layer l here, else -1
    answer_feat_idx: torch.Tensor | None = None  # the same for the answer head's features

    @classmethod
    def build(cls, profile: SteeringProfile, version: str, num_layers: int,
              shard: tuple[int, int], device: torch.device) -> LoadedProfile:
        start, end = shard
        per_layer = [[] for _ in range(num_layers)]
        for layer, neuron, d in zip(profile.layers.tolist(), profile.neurons.tolist(),
                                    profile.delta.tolist()):
            if start <= neuron < end:
                per_layer[layer].append((neuron - start, d))
        kp = max((len(x) for x in per_layer), default=0)
        idx = torch.full((num_layers, kp), -1, dtype=torch.int32)
        delta = torch.zeros((num_layers, kp), dtype=torch.float32)
        for layer, items in enumerate(per_layer):
            for j, (col, d) in enumerate(sorted(items)):
                idx[layer, j] = col
                delta[layer, j] = d
        return cls(profile, version, idx.to(device), delta.to(device),
                   feature_columns(profile.predictor, num_layers, shard, device),
                   feature_columns(profile.answer_predictor, num_layers, shard, device))


def feature_columns(predictor, num_layers: int, shard: tuple[int, int],
                    device: torch.device) -> torch.Tensor | None:
    """A predictor's features as int32 [L, F]: the local column of feature f if
    it lives in layer l on this shard, else -1 (None: no predictor)."""
    if predictor is None:
        return None
    start, end = shard
    fl, fn = predictor.feature_layers.tolist(), predictor.feature_neurons.tolist()
    feat_idx = torch.full((num_layers, len(fl)), -1, dtype=torch.int32)
    for f, (layer, neuron) in enumerate(zip(fl, fn)):
        if start <= neuron < end:
            feat_idx[layer, f] = neuron - start
    return feat_idx.to(device)


class ProfileStore:
    def __init__(self, shape: ModelShape, shard: tuple[int, int], device: torch.device,
                 default: str | None = None, max_features: int | None = None):
        self.shape, self.shard, self.device = shape, shard, device
        self.max_features = max_features  # the kernel path's gather width (None: no limit)
        self.by_name: dict[str, LoadedProfile] = {}
        self.by_version: dict[str, LoadedProfile] = {}  # incl. retired ones
        self.retired: dict[str, float] = {}  # version -> when it was replaced/unloaded
        self.default: str | None = default

    def load(self, name: str, path: str, in_use: set[str]) -> dict:
        """Load (or atomically replace) `name`. `in_use`: the versions of the
        requests in flight (kept however long ago they were retired)."""
        profile = SteeringProfile.load(path, expect=self.shape)
        for head, predictor in (("predictor", profile.predictor),
                                ("answer head", profile.answer_predictor)):
            n = predictor.num_features if predictor is not None else 0
            if self.max_features is not None and n > self.max_features:
                raise ProfileError(f"steering profile {path!r}: its {head} reads {n} features; "
                                   f"this engine's feature gather holds {self.max_features} "
                                   "(retrain it with fewer, e.g. train-predictor --features 256)")
        profile.name = name
        loaded = LoadedProfile.build(profile, file_version(path), self.shape.num_layers,
                                     self.shard, self.device)
        self._retire(self.by_name.get(name), in_use)
        self.by_name[name] = loaded
        self.by_version[loaded.version] = loaded
        if self.default is None:
            self.default = name
        logger.info("adaras: loaded profile %s (K=%d, version %s) from %s",
                    name, profile.k, loaded.version, path)
        return {**profile.summary(), "version": loaded.version}

    def unload(self, name: str, in_use: set[str]) -> bool:
        loaded = self.by_name.pop(name, None)
        self._retire(loaded, in_use)
        if self.default == name:
            self.default = next(iter(self.by_name), None)
        return loaded is not None

    def set_default(self, name: str | None) -> None:
        if name is not None and name not in self.by_name:
            raise ValueError(f"unknown profile {name!r}")
        self.default = name

    def find(self, name: str | None, version: str | None) -> LoadedProfile | None:
        """The exact version the frontend admitted the request with, if still
        held; else the profile loaded under `name` (or the default) now."""
        loaded = self.by_version.get(version) if version else None
        if loaded is None:
            loaded = self.by_name.get(name or self.default or "")
        return loaded

    def _retire(self, loaded: LoadedProfile | None, in_use: set[str]) -> None:
        """Keep a replaced profile reachable by version for requests that were
        admitted by the frontend before the swap but reach the worker after;
        forget it after RETIRE_GRACE_S once no request in flight uses it."""
        now = time.monotonic()
        if loaded is not None:
            self.retired[loaded.version] = now
        current = {p.version for p in self.by_name.values()}
        for version, since in list(self.retired.items()):
            if version in current:
                del self.retired[version]
            elif now - since > RETIRE_GRACE_S and version not in in_use:
                del self.retired[version]
                self.by_version.pop(version, None)
