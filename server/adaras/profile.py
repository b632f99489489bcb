"""AdaRAS steering profile: one ``*.safetensors`` file (a public format contract).

Tensors
    layers   int32 [K]    decoder layer index of each steered neuron
    neurons  int32 [K]    index within that layer's MLP intermediate dimension
    delta    float32 [K]  mean-difference steering values S
    sigma    float32 [K]  optional (v2): each neuron's activation spread over the
                          probe traces (standard deviation of the per-trace mean
                          activation), so alpha * |delta| / sigma is the dose in
                          sigma units
    predictor.<key>         optional failure predictor read from the prompt
                            (FailurePredictor.to_tensors())
    answer_predictor.<key>  optional (v2): a second head, read from the positions
                            decoded after the prompt (the answer probe)

Metadata (all values are strings)
    format          "adaras-profile"
    format_version  "2" (written); "1" is still read: v1 is v2 without sigma and
                    answer_predictor
    name            ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$, must not contain ".."
    default_alpha   float >= 0
    threshold       optional float in [0, 1]
    model           JSON {"architecture", "num_layers", "intermediate_size", "hidden_size"}
    provenance      JSON object, free-form (dataset, counts, K, selection options, time, ...)
    predictor       optional JSON, FailurePredictor.config(); present iff predictor.* tensors are
    answer_predictor  optional JSON (v2), the answer head's config; present iff
                    answer_predictor.* tensors are

Model compatibility rule (ModelShape.compatible_with): num_layers, intermediate_size
and hidden_size must be equal. Architecture names are compared case-insensitively
after dropping a leading "Steered" (so "LlamaForCausalLM" matches vLLM's
"SteeredLlamaForCausalLM"); an empty architecture means "unknown" and matches any.

The file format is `adaras.profile_format`, the model shape
`adaras.model_shape`; this module holds the profile itself: its validation
(`validate`), its queries and its dose. It does not import vllm.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from adaras import profile_format
from adaras.model_shape import ModelShape, ProfileError, _shape_problem
from adaras.predictor import FailurePredictor
from adaras.profile_format import (
    ANSWER_PREFIX,
    FORMAT,
    FORMAT_VERSION,
    PREDICTOR_PREFIX,
    READS_VERSIONS,
    bytes_version,
    file_version,
)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# the public names this module has always had (the format and the shape live beside it)
__all__ = ["ANSWER_PREFIX", "FORMAT", "FORMAT_VERSION", "MAX_NEURONS_PER_LAYER",
           "PREDICTOR_PREFIX", "PROFILE_NAME_PATTERN", "READS_VERSIONS", "ModelShape",
           "ProfileError", "SteeringProfile", "bytes_version", "file_version",
           "valid_profile_name"]
# The engine's per-step steering tables are [slots, layers, MAX_NEURONS_PER_LAYER],
# allocated once per worker (adaras.engine.step).
MAX_NEURONS_PER_LAYER = 256
PROFILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # and no ".." anywhere
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def valid_profile_name(name) -> bool:
    """The one rule for profile names: safe as a file-name component, no paths."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None and ".." not in name
# provenance "steer_prompt" -> prompt positions steered (-1 = all); True/False
# are the older spelling of "all"/"none"
STEER_PROMPT = {None: 0, False: 0, "none": 0, "last": 1, True: -1, "all": -1}


# ------------------------------------------------------------------- profile
@dataclass
class SteeringProfile:
    name: str
    layers: Tensor  # int32 [K]
    neurons: Tensor  # int32 [K]
    delta: Tensor  # float32 [K]
    model: ModelShape
    default_alpha: float = 0.3
    threshold: float | None = None
    provenance: dict = field(default_factory=dict)
    predictor: FailurePredictor | None = None
    sigma: Tensor | None = None  # float32 [K], or None when unknown (v1, imported lists)
    answer_predictor: FailurePredictor | None = None

    @property
    def k(self) -> int:
        return int(self.layers.numel())

    def dose_in_sigma(self, alpha: float | None = None) -> float | None:
        """mean over neurons of |alpha * delta| / sigma at `alpha` (default: the
        profile's default_alpha): how far steering moves a neuron, in units of
        its own spread across traces. None without sigma; neurons whose sigma is
        0 are left out."""
        if self.sigma is None:
            return None
        alpha = self.default_alpha if alpha is None else alpha
        ok = self.sigma > 0
        if not bool(ok.any()):
            return None
        return float((alpha * self.delta[ok].abs().double() / self.sigma[ok].double()).mean())

    # ------------------------------------------------------------ validation
    @property
    def steered_prompt_positions(self) -> int:
        """How many prompt positions an `always` request also steers, from the
        provenance key "steer_prompt": absent/"none" -> 0 (decode only),
        "last" -> 1 (the last prompt position, whose logits pick the first
        generated token), "all" -> -1 (every prompt position). Adaptive
        requests decide after the prompt, so they steer decode tokens only."""
        return STEER_PROMPT[self.provenance.get("steer_prompt")]

    def validate(self, expect: ModelShape | None = None) -> None:
        """Raise ProfileError if the profile is unusable (for the model `expect`, if given)."""
        check(self, expect, f"steering profile {self.name!r}")

    def save(self, path) -> None:
        """Validate, then write atomically (temp file + rename) to `path`."""
        self.validate()
        profile_format.write(path, self)

    @classmethod
    def read(cls, path, expect: ModelShape | None = None) -> tuple[SteeringProfile, str]:
        """`load` and `file_version` from one read of the file."""
        path = Path(path)
        if not path.is_file():  # load() says what is wrong with it
            return cls.load(path, expect), ""
        data = path.read_bytes()
        return cls.load(path, expect, data=data), bytes_version(data)

    @classmethod
    def load(cls, path, expect: ModelShape | None = None,
             data: bytes | None = None) -> SteeringProfile:
        """Read and validate a profile file (or its bytes `data`, read from
        `path`); every problem is a ProfileError naming the file."""
        fields, where = profile_format.read(path, data)
        profile = cls(**fields)
        check(profile, expect, where)
        return profile

    # ------------------------------------------------------------- queries
    def by_layer(self) -> dict[int, tuple[Tensor, Tensor]]:
        """layer -> (neurons int64 [k_l] sorted ascending, delta float32 [k_l] aligned)."""
        out = {}
        for layer in torch.unique(self.layers).tolist():
            sel = self.layers == layer  # [K] bool
            neurons = self.neurons[sel].long()
            order = torch.argsort(neurons)
            out[int(layer)] = (neurons[order], self.delta[sel][order].to(torch.float32))
        return out

    def layer_histogram(self) -> list[int]:
        """Number of steered neurons per layer, length num_layers."""
        return torch.bincount(self.layers.long(), minlength=self.model.num_layers).tolist()

    def fingerprint(self) -> str:
        """16-hex-digit SHA-256 of (sorted (layer, neuron, delta) entries, model shape).

        Independent of entry order; changes with any delta bit or the model shape.
        Not covered: name, default_alpha, threshold, provenance, predictor."""
        key = self.layers.long() * self.model.intermediate_size + self.neurons.long()  # [K]
        order = torch.argsort(key)
        h = hashlib.sha256(b"adaras-profile-v1\0")
        h.update(json.dumps(asdict(self.model), sort_keys=True).encode())
        for t, dtype in ((self.layers, "<i4"), (self.neurons, "<i4"), (self.delta, "<f4")):
            h.update(t.detach().cpu()[order].numpy().astype(dtype).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        return {
            "name": self.name,
            "k": self.k,
            "default_alpha": self.default_alpha,
            "threshold": self.threshold,
            "model": asdict(self.model),
            "provenance": self.provenance,
            "layer_histogram": self.layer_histogram(),
            "has_predictor": self.predictor is not None,
            "has_answer_predictor": self.answer_predictor is not None,
            "dose_in_sigma": self.dose_in_sigma(),
            "fingerprint": self.fingerprint(),
        }

    @classmethod
    def random(
        cls,
        name: str,
        model: ModelShape,
        k: int,
        *,
        seed: int = 0,
        scale: float = 1.0,
        default_alpha: float = 0.3,
    ) -> SteeringProfile:
        """Synthetic profile for tests: k unique (layer, neuron) pairs sorted, delta ~ N(0, scale)."""
        total = model.num_layers * model.intermediate_size
        if not 0 <= k <= total:
            raise ProfileError(f"cannot pick k = {k} unique neurons from a model with {total}")
        g = torch.Generator().manual_seed(seed)
        flat = torch.randperm(total, generator=g)[:k].sort().values  # [k] int64
        return cls(
            name=name,
            layers=(flat // model.intermediate_size).to(torch.int32),
            neurons=(flat % model.intermediate_size).to(torch.int32),
            delta=(torch.randn(k, generator=g) * scale).to(torch.float32),
            model=model,
            default_alpha=default_alpha,
            provenance={"synthetic": True, "seed": seed, "scale": scale},
        )


# ---------------------------------------------------------------- validation
def check(self: SteeringProfile, expect: ModelShape | None, where: str) -> None:
    """Every rule a profile's values must meet (indices in range, shapes,
    dtypes, finite numbers, name, heads); a ProfileError naming `where` otherwise."""
    def fail(msg: str):
        raise ProfileError(f"{where}: {msg}")

    name = self.name
    if not valid_profile_name(name):
        fail(
            f"invalid profile name {name!r}; use 1-64 characters from letters, digits, '.', '_' "
            f"and '-', starting with a letter or digit and without '..'"
        )
    problem = _shape_problem(self.model)
    if problem:
        fail(problem)
    if expect is not None and not self.model.compatible_with(expect):
        fail(
            f"built for another model shape: the profile is for {self.model.describe()}, "
            f"but the served model is {expect.describe()}; use a profile made for this model"
        )
    for tname, want in (("layers", torch.int32), ("neurons", torch.int32), ("delta", torch.float32)):
        t = getattr(self, tname)
        if not isinstance(t, Tensor):
            fail(f"'{tname}' must be a tensor, got {type(t).__name__}")
        if t.dtype != want:
            fail(f"tensor '{tname}' has dtype {_dt(t.dtype)}, expected {_dt(want)}")
        if t.dim() != 1:
            fail(f"tensor '{tname}' must be 1-D [K], got shape {list(t.shape)}")
    if self.sigma is not None:
        t = self.sigma
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.dim() != 1:
            fail(f"tensor 'sigma' must be a 1-D float32 tensor [K], got "
                 f"{_dt(t.dtype) + str(list(t.shape)) if isinstance(t, Tensor) else type(t).__name__}")
        if t.numel() != self.delta.numel():
            fail(f"tensor 'sigma' has {t.numel()} entries; 'delta' has {self.delta.numel()}")
        if not bool((torch.isfinite(t) & (t >= 0)).all()):
            fail("sigma must be finite and >= 0 (a standard deviation per neuron)")
    lengths = (self.layers.numel(), self.neurons.numel(), self.delta.numel())
    if len(set(lengths)) != 1:
        fail(
            "mismatched tensor lengths: 'layers', 'neurons' and 'delta' must all have K entries, "
            f"got {lengths[0]}, {lengths[1]} and {lengths[2]}"
        )
    m = self.model
    _check_indices(self.layers, self.neurons, m, "", fail)
    bad = (~torch.isfinite(self.delta)).nonzero()
    if bad.numel():
        i = int(bad[0])
        fail(f"delta contains NaN or Inf (entry {i}: {float(self.delta[i])}); re-create the profile")
    if self.k:
        key = self.layers.long() * m.intermediate_size + self.neurons.long()  # [K]
        sorted_key, order = torch.sort(key, stable=True)
        same = (sorted_key[1:] == sorted_key[:-1]).nonzero()
        if same.numel():
            j = int(same[0])
            a, b = sorted((int(order[j]), int(order[j + 1])))
            fail(
                f"duplicate (layer, neuron) pair ({int(self.layers[a])}, {int(self.neurons[a])}) "
                f"at entries {a} and {b}; each pair may appear only once (merge or drop one)"
            )
    if self.k:
        per_layer = torch.bincount(self.layers.long(), minlength=m.num_layers)  # [L]
        crowded = int(per_layer.argmax())
        if int(per_layer[crowded]) > MAX_NEURONS_PER_LAYER:
            fail(f"layer {crowded} has {int(per_layer[crowded])} neurons; a profile may steer "
                 f"at most {MAX_NEURONS_PER_LAYER} per layer (the engine's steering tables "
                 "are allocated once at that size)")
    alpha = self.default_alpha
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        fail(f"default_alpha must be a finite number >= 0, got {alpha!r}")
    thr = self.threshold
    if thr is not None and (
        not isinstance(thr, (int, float)) or isinstance(thr, bool) or not 0.0 <= thr <= 1.0
    ):
        fail(f"threshold must be a probability in [0, 1] (or absent), got {thr!r}")
    if not isinstance(self.provenance, dict):
        fail(f"provenance must be a JSON object (dict), got {type(self.provenance).__name__}")
    sp = self.provenance.get("steer_prompt")
    if not isinstance(sp, (str, bool, type(None))) or sp not in STEER_PROMPT:
        fail(f"provenance.steer_prompt must be one of 'none', 'last' or 'all' (or absent), "
             f"got {self.provenance['steer_prompt']!r}")
    try:
        json.dumps(self.provenance, allow_nan=False)
    except (TypeError, ValueError) as e:
        fail(f"provenance is not JSON-serialisable: {e}")
    for prefix, p in ((PREDICTOR_PREFIX, self.predictor), (ANSWER_PREFIX, self.answer_predictor)):
        if p is None:
            continue
        head = prefix.rstrip(".")
        if not isinstance(p, FailurePredictor):
            fail(f"{head} must be a FailurePredictor, got {type(p).__name__}")
        _check_indices(p.feature_layers, p.feature_neurons, m, f"{head} feature ", fail)
        for key, t in p.to_tensors().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                fail(f"{head} tensor '{prefix}{key}' contains NaN or Inf")
    if self.k == 0:
        warnings.warn(f"{where}: K = 0, this profile steers nothing", UserWarning, stacklevel=3)

def _check_indices(layers: Tensor, neurons: Tensor, m: ModelShape, what: str, fail) -> None:
    for tname, t, hi, label in (
        ("layer", layers, m.num_layers, "num_layers"),
        ("neuron", neurons, m.intermediate_size, "intermediate_size"),
    ):
        bad = ((t < 0) | (t >= hi)).nonzero()
        if bad.numel():
            i = int(bad[0])
            fail(
                f"{what}entry {i}: {tname} index {int(t[i])} is out of range; valid range is "
                f"0..{hi - 1} ({label} = {hi}); is this profile for another model?"
            )
