"""AdaRAS failure predictor (arXiv 2601.19847).

Reads MLP neuron activations at F chosen (layer, neuron) pairs over a
request's prompt tokens, pools them over tokens with attention pooling, and
outputs p_fail with a small MLP:

    x_t     : raw activations [F] at prompt token t (fp32)
    z_t     = (x_t - mean) / std                  # standardisation
    s_t     = z_t . attn_w + attn_b               # attention score
    w_t     = softmax_t(s_t) over all prompt tokens
    pooled  = sum_t w_t z_t                       # [F]
    p_fail  = sigmoid(fc2(relu(fc1(pooled))))     # dropout only while training

The engine sees a prompt in chunks (chunked prefill), so besides the batched
training path (`forward`) there is a streaming path (`init_state` / `update`
/ `finish`) that keeps an online-softmax state and gives the same p_fail as
`prob` on the whole prompt, up to fp32 rounding.

This module deliberately does not import vllm or profile.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PREDICTOR_TYPE = "attn-mlp"
PREDICTOR_VERSION = 1


@dataclass
class PoolState:
    """Online-softmax state over the prompt tokens seen so far.

    m   : running max of the attention scores (-inf before the first token)
    s   : running sum of exp(s_t - m)
    acc : running sum of exp(s_t - m) * z_t, float32 [F]
    n   : number of tokens seen
    """

    m: float
    s: float
    acc: Tensor
    n: int

    def merge(self, other: PoolState) -> PoolState:
        """The state of both token sets (any split of a prompt, in any order):
        exact up to fp32 rounding, which is what lets a KV block's state stand
        in for its tokens (adaras.engine.prefix_states)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        m = max(self.m, other.m)
        a, b = math.exp(self.m - m), math.exp(other.m - m)
        return PoolState(m=m, s=self.s * a + other.s * b, acc=self.acc * a + other.acc * b,
                         n=self.n + other.n)


class FailurePredictor(nn.Module):
    def __init__(
        self,
        feature_layers: Tensor,
        feature_neurons: Tensor,
        hidden: int = 256,
        dropout: float = 0.3,
    ):
        super().__init__()
        layers = torch.as_tensor(feature_layers).to(torch.int32).reshape(-1)  # [F]
        neurons = torch.as_tensor(feature_neurons).to(torch.int32).reshape(-1)  # [F]
        if layers.numel() != neurons.numel():
            raise ValueError(
                f"feature_layers has {layers.numel()} entries but feature_neurons has "
                f"{neurons.numel()}; they must have the same length F"
            )
        if layers.numel() == 0:
            raise ValueError("a failure predictor needs at least one feature (F >= 1)")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        num_features = layers.numel()
        self.hidden = int(hidden)
        self.register_buffer("feature_layers", layers.clone())  # int32 [F]
        self.register_buffer("feature_neurons", neurons.clone())  # int32 [F]
        self.register_buffer("mean", torch.zeros(num_features))  # float32 [F]
        self.register_buffer("std", torch.ones(num_features))  # float32 [F]
        self.attn = nn.Linear(num_features, 1)  # [F] -> score
        self.fc1 = nn.Linear(num_features, self.hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(self.hidden, 1)

    @property
    def num_features(self) -> int:
        return self.feature_layers.numel()

    # ------------------------------------------------------------------ math
    def _standardize(self, x: Tensor) -> Tensor:
        # x: [..., F] any float dtype -> z: float32 [..., F]
        if x.shape[-1] != self.num_features:
            raise ValueError(
                f"expected activations with {self.num_features} features in the last "
                f"dimension, got shape {list(x.shape)}"
            )
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def _scores(self, z: Tensor) -> Tensor:
        # z: [..., F] -> attention scores [...]
        return self.attn(z).squeeze(-1)

    def _head(self, pooled: Tensor, dropout: bool) -> Tensor:
        # pooled: [..., F] -> logits [...]
        h = torch.relu(self.fc1(pooled))  # [..., H]
        if dropout:
            h = self.drop(h)
        return self.fc2(h).squeeze(-1)

    # ---------------------------------------------------------- batched path
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: [B, T, F] activations, mask: [B, T] bool (True = real token) -> logits [B]."""
        if x.dim() != 3:
            raise ValueError(f"forward expects x of shape [B, T, F], got {list(x.shape)}")
        z = self._standardize(x)  # [B, T, F]
        if mask is not None:
            mask = mask.to(torch.bool)
            if mask.shape != x.shape[:2]:
                raise ValueError(
                    f"mask shape {list(mask.shape)} does not match x shape [B, T] = {list(x.shape[:2])}"
                )
            if not bool(mask.any(dim=1).all()):
                raise ValueError("every sequence needs at least one unmasked token")
            z = z.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding may hold garbage
        s = self._scores(z)  # [B, T]
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        w = torch.softmax(s, dim=1)  # [B, T]
        pooled = torch.einsum("bt,btf->bf", w, z)  # [B, F]
        return self._head(pooled, dropout=self.training)  # [B]

    # ------------------------------------------------------ single sequence
    def pool(self, x: Tensor) -> Tensor:
        """x: [T, F] activations of one prompt -> pooled [F]."""
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"pool expects x of shape [T, F] with T >= 1, got {list(x.shape)}")
        z = self._standardize(x)  # [T, F]
        w = torch.softmax(self._scores(z), dim=0)  # [T]
        return w @ z  # [F]

    @torch.no_grad()
    def prob(self, x: Tensor) -> float:
        """Eval-mode (no dropout) p_fail for one prompt, x: [T, F]."""
        return float(torch.sigmoid(self._head(self.pool(x), dropout=False)))

    # ------------------------------------------------------- streaming path
    def init_state(self) -> PoolState:
        return PoolState(
            m=float("-inf"),
            s=0.0,
            acc=torch.zeros(self.num_features, dtype=self.mean.dtype, device=self.mean.device),
            n=0,
        )

    @torch.no_grad()
    def update(self, state: PoolState, x_chunk: Tensor) -> PoolState:
        """Fold a chunk of prompt tokens x_chunk: [t, F] into the state; returns a new state."""
        if x_chunk.dim() != 2:
            raise ValueError(f"update expects x_chunk of shape [t, F], got {list(x_chunk.shape)}")
        if x_chunk.shape[0] == 0:
            return state
        z = self._standardize(x_chunk)  # [t, F]
        s = self._scores(z)  # [t]
        m_new = max(state.m, float(s.max()))
        old_scale = math.exp(state.m - m_new)  # 0.0 for the first chunk (m = -inf)
        e = torch.exp(s - m_new)  # [t], all <= 1
        return PoolState(
            m=m_new,
            s=state.s * old_scale + float(e.sum()),
            acc=state.acc * old_scale + e @ z,  # [F]
            n=state.n + x_chunk.shape[0],
        )

    @torch.no_grad()
    def finish(self, state: PoolState) -> float:
        """p_fail from a streamed state; equals prob(full x) up to fp32 rounding."""
        if state.n == 0:
            raise ValueError(
                "cannot compute p_fail: no prompt tokens were fed to the predictor "
                "(call update() with at least one token first)"
            )
        pooled = state.acc / state.s  # [F]
        return float(torch.sigmoid(self._head(pooled, dropout=False)))

    # ---------------------------------------------------------- persistence
    def config(self) -> dict:
        return {
            "type": PREDICTOR_TYPE,
            "version": PREDICTOR_VERSION,
            "hidden": self.hidden,
            "num_features": self.num_features,
            "pooling": "attention",
        }

    def to_tensors(self) -> dict[str, Tensor]:
        """State as CPU, contiguous tensors (floats as float32, indices as int32); no prefix."""
        out = {}
        for key, value in self.state_dict().items():
            value = value.detach().cpu()
            if value.is_floating_point():
                value = value.to(torch.float32)
            out[key] = value.contiguous().clone()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], config: dict, *, key_prefix: str = "") -> FailurePredictor:
        """Rebuild from to_tensors() output + config(). Raises ValueError naming the bad key.

        key_prefix is only used in error messages (profile.py passes "predictor.").
        """
        check_tensors(tensors, config, key_prefix)
        model = cls(tensors["feature_layers"], tensors["feature_neurons"], hidden=config["hidden"])
        model.load_state_dict({k: v.clone() for k, v in tensors.items()})
        return model.eval()


# ------------------------------------------------------- the stored head
def expected_shapes(num_features: int, hidden: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    f, h = num_features, hidden
    return {
        "feature_layers": ((f,), torch.int32),
        "feature_neurons": ((f,), torch.int32),
        "mean": ((f,), torch.float32),
        "std": ((f,), torch.float32),
        "attn.weight": ((1, f), torch.float32),
        "attn.bias": ((1,), torch.float32),
        "fc1.weight": ((h, f), torch.float32),
        "fc1.bias": ((h,), torch.float32),
        "fc2.weight": ((1, h), torch.float32),
        "fc2.bias": ((1,), torch.float32),
    }


def check_tensors(tensors: dict[str, Tensor], config: dict, key_prefix: str = "") -> None:
    """A stored head's config and tensors as `FailurePredictor.from_tensors`
    needs them; ValueError naming the bad key (with `key_prefix`) otherwise."""
    if not isinstance(config, dict):
        raise ValueError(f"predictor config must be a JSON object, got {type(config).__name__}")
    for key, want in (("type", PREDICTOR_TYPE), ("version", PREDICTOR_VERSION), ("pooling", "attention")):
        if config.get(key) != want:
            raise ValueError(
                f"predictor config '{key}' is {config.get(key)!r}, expected {want!r} "
                f"(this build only understands {PREDICTOR_TYPE} predictors, version {PREDICTOR_VERSION})"
            )
    for key in ("hidden", "num_features"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"predictor config '{key}' must be a positive integer, got {value!r}")
    expected = expected_shapes(config["num_features"], config["hidden"])
    for key in expected:
        if key not in tensors:
            raise ValueError(f"predictor tensor '{key_prefix}{key}' is missing")
    for key in tensors:
        if key not in expected:
            raise ValueError(f"unexpected predictor tensor '{key_prefix}{key}'")
    for key, (shape, dtype) in expected.items():
        t = tensors[key]
        if not isinstance(t, Tensor):
            raise ValueError(f"predictor tensor '{key_prefix}{key}' is not a tensor")
        if t.dtype != dtype:
            raise ValueError(
                f"predictor tensor '{key_prefix}{key}' has dtype {str(t.dtype).removeprefix('torch.')}, "
                f"expected {str(dtype).removeprefix('torch.')}"
            )
        if tuple(t.shape) != shape:
            raise ValueError(
                f"predictor tensor '{key_prefix}{key}' has shape {list(t.shape)}, expected {list(shape)} "
                f"(num_features = {config['num_features']}, hidden = {config['hidden']})"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"predictor tensor '{key_prefix}{key}' contains NaN or Inf")
    if not bool((tensors["std"] > 0).all()):
        raise ValueError(
            f"predictor tensor '{key_prefix}std' has entries <= 0; standard deviations must be "
            f"positive (floor them, e.g. std.clamp_min(1e-6), when training)"
        )
