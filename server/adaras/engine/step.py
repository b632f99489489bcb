"""Step state: which rows of the forward in progress are steered, and by what.

`StepBuffers` are allocated once per worker, at their maximum size, and filled
in place before every forward:

  * `row_slot`   int32 [T_max]            0 = row not steered, s > 0 = slot s
  * `steer_idx`  int32 [S_max, L, K_max]  local (this rank's shard) neuron columns, -1 pad
  * `steer_val`  fp32  [S_max, L, K_max]  alpha * delta, 0 pad (slot 0 is all pad)

T_max is vLLM's max_num_batched_tokens, S_max its max_num_seqs + 1 (a slot is
one distinct (profile, alpha) pair in the step, so every request in a batch
can steer differently), K_max the profile format's MAX_NEURONS_PER_LAYER.
Rows past the step's tokens stay 0, so a kernel may read `row_slot[:T]` for
any padded T. The steering op only reads these buffers: their addresses never
change, which is what a captured CUDA graph needs.

`GatherBuffers` do the same for the feature gather on the kernel path (CUDA,
or CPU tensors under the Triton interpreter with ADARAS_KERNEL_PATH=1): rows
pick a feature group through `feat_slot`, the groups' layer/column tables sit
at fixed addresses, and the features land in `feats` (see
`steering_kernels.gather_slots`). The offline pipeline's per-token capture
features ride the same groups. `CaptureBuffers` hold the capture's means on
that path: rows add their pre-steering activation to their request's slot
of `cap_sum` through `cap_slot` (see `steering_kernels.sum_slots`). On that
path the op launches the same three kernels every layer of every step,
whatever the batch: its work depends on buffer contents only, which is what
a captured CUDA graph replays, and nothing is allocated per step.

`StepContext` is the per-step view the steered MLPs read, like vLLM's own
forward context: set by the runtime before the forward, cleared after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from adaras.profile import MAX_NEURONS_PER_LAYER
from steering_kernels import gather_slots_, sparse_steer_, sum_slots_
from steering_kernels.gather_slots import MAX_FEATURES
from steering_kernels.steer_plan import FeaturePlan, SteerPlan, plan_sparse_steer


@dataclass
class StepContext:
    buffers: StepBuffers | None = None
    steered: bool = False  # some row of this step is steered
    plan: SteerPlan | None = None  # CPU path: per-layer flat indices/values of the sparse add
    # predictor heads: prompt rows of adaptive requests, answer rows of probing ones
    feat_rows: torch.Tensor | None = None  # int64 [R]
    feat_idx: torch.Tensor | None = None  # int32 [L, F]
    feat_plan: FeaturePlan | None = None  # per-layer feature columns
    feats: torch.Tensor | None = None  # fp32 [R, F], filled layer by layer
    # (req_id, rows slice into feats, feature slice, positions folded after this
    # step, prompt completes this step, head: "prompt" | "answer"); see gate.Gather
    spans: list[tuple[str, slice, slice, int, bool, str]] = field(default_factory=list)
    # activation capture (offline pipeline); read before steering is added.
    # The CPU path's per-step plan (the kernel path uses CaptureBuffers and the
    # gather's groups instead, and sets only cap_spans):
    cap_rows: torch.Tensor | None = None  # int64 [Rm] rows that enter a mean
    cap_seg: torch.Tensor | None = None  # int64 [Rm] which capturing request each row is
    cap_sum: torch.Tensor | None = None  # fp32 [L, Nm, I_shard]
    cap_tok_rows: torch.Tensor | None = None  # int64 [Rt]
    cap_feats: torch.Tensor | None = None  # fp32 [Rt, F_all]
    cap_feat_plan: FeaturePlan | None = None
    # (req_id, mean segment or -1, token rows slice, feature slice, rows in mean,
    # prompt positions recorded after this step, done); on the kernel path the
    # segment is the request's CaptureBuffers slot and the token rows are the
    # gather's (ctx.spans, head "capture")
    cap_spans: list[tuple[str, int, slice, slice, int, int, bool]] = field(default_factory=list)
    hooked: int = 0  # steering-op calls that saw this context (the start-up probe reads it)
    # kernel path: the gather ran into GatherBuffers.feats at these token rows
    gathered_rows: torch.Tensor | None = None  # int64 [R]

    @property
    def empty(self) -> bool:
        return not self.steered and not self.spans and not self.cap_spans


@dataclass
class KernelPath:
    """The buffers the op reads on the kernel path, set once per worker: the op
    never looks at the step's context there."""

    steer: StepBuffers
    gather: GatherBuffers
    capture: CaptureBuffers


_KERNEL: KernelPath | None = None


def launch_kernels_(act: torch.Tensor, gate_up: torch.Tensor, layer: int,
                    kernels: KernelPath) -> None:
    """The kernel path of one layer (act [T, I] in place, gate_up [T, 2I]):
    add the capturing rows' pre-steering activations to their capture slots,
    gather the pre-steering features of the rows that read some, then steer
    the steered rows. Branch-free, no host read, no allocation: what it does
    depends on buffer contents only."""
    T = act.shape[0]
    c, g, s = kernels.capture, kernels.gather, kernels.steer
    sum_slots_(c.cap_sum[layer], act, c.cap_slot[:T])
    gather_slots_(g.feats, gate_up, g.feat_slot[:T], g.feat_layer, g.feat_col, layer)
    sparse_steer_(act, s.row_slot[:T], s.steer_idx[:, layer], s.steer_val[:, layer])


def kernel_path() -> KernelPath | None:
    return _KERNEL


def set_kernel_path(path: KernelPath | None) -> None:
    global _KERNEL
    _KERNEL = path


@dataclass
class GraphStats:
    """Which compiled graph this worker's forwards ran, since start (the
    steered model counts; the runtime reports it)."""

    # "compiled": a twin graph without the op; "eager": the op skipped per layer;
    # "disabled": ADARAS_PLAIN_GRAPH=0, one graph; "none": no steered model here
    plain_graph: str = "none"
    # how the compiled twin got ready at start-up: "loaded" from vLLM's compile
    # cache without running it, or "compiled" (by running vLLM's warm-up batch)
    plain_graph_from: str | None = None
    forwards_plain: int = 0  # forwards with nothing to steer or gather (the plain graph)
    forwards_steered: int = 0  # forwards with a steered row or a gather (the op in every layer)
    op_calls: int = 0  # steering-op calls, with or without work to do


STATS = GraphStats()
_CURRENT: StepContext | None = None


def current() -> StepContext | None:
    """The context of the forward in progress (None: nothing to do this step)."""
    return _CURRENT


def set_current(ctx: StepContext | None) -> None:
    global _CURRENT
    _CURRENT = ctx


def write_rows_(buf: torch.Tensor, rows: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Write the int32 per-row table `rows` [T] into buf[:T] in place and zero
    what the last write (`last`) set past T; nothing when they are equal.
    Returns what buf now holds, the next call's `last`."""
    if np.array_equal(rows, last):
        return last
    n, prev = rows.shape[0], last.shape[0]
    if n:
        buf[:n].copy_(torch.from_numpy(rows))
    if prev > n:
        buf[n:prev].zero_()
    return rows.copy()


class StepBuffers:
    def __init__(self, max_tokens: int, max_slots: int, num_layers: int, num_cols: int,
                 device: torch.device, max_k: int = MAX_NEURONS_PER_LAYER):
        self.num_cols = num_cols  # neurons in this rank's shard
        self.row_slot = torch.zeros(max_tokens, dtype=torch.int32, device=device)  # [T_max]
        self.steer_idx = torch.full((max_slots, num_layers, max_k), -1, dtype=torch.int32,
                                    device=device)  # [S_max, L, K_max]
        self.steer_val = torch.zeros((max_slots, num_layers, max_k), dtype=torch.float32,
                                     device=device)  # [S_max, L, K_max]
        self._slots: tuple = ()  # the (profile, alpha) keys written into slots 1..S
        self._k = 0  # columns of the tables in use
        self._rows = np.zeros(0, dtype=np.int32)  # row_slot[:T] as last written
        self._plan: SteerPlan | None = None

    @property
    def max_tokens(self) -> int:
        return self.row_slot.shape[0]

    @property
    def max_slots(self) -> int:
        return self.steer_idx.shape[0] - 1

    def fill(self, slots: tuple, row_slot: np.ndarray | None, plan: bool) -> SteerPlan | None:
        """Write this step's slots and per-row slot index in place.

        slots: ((LoadedProfile, alpha), ...) for slots 1..S, in slot order;
        row_slot: int32 [T] for the step's tokens (None: no row steered).
        With `plan` (the CPU path), also return the per-layer sparse plan,
        reused while the rows and slots stay the same (steady decode)."""
        if row_slot is None:
            row_slot = np.zeros(0, dtype=np.int32)
        if row_slot.shape[0] > self.max_tokens or len(slots) > self.max_slots:
            raise ValueError(f"step has {row_slot.shape[0]} tokens and {len(slots)} steering "
                             f"slots; the buffers hold {self.max_tokens} and {self.max_slots}")
        same_slots = len(slots) == len(self._slots) and all(
            p is q and a == b for (p, a), (q, b) in zip(slots, self._slots))
        if not same_slots:
            for s, (p, alpha) in enumerate(slots, start=1):
                kp = p.idx.shape[1]
                self.steer_idx[s, :, :kp] = p.idx
                self.steer_idx[s, :, kp:] = -1
                self.steer_val[s, :, :kp] = p.delta * alpha
                self.steer_val[s, :, kp:] = 0.0
            self._slots = slots
            self._k = max((p.idx.shape[1] for p, _ in slots), default=0)
        same_rows = np.array_equal(row_slot, self._rows)
        self._rows = write_rows_(self.row_slot, row_slot, self._rows)
        if not plan or not slots:
            self._plan = None
            return None
        if self._plan is None or not (same_rows and same_slots):
            n, s = row_slot.shape[0], len(slots) + 1
            self._plan = plan_sparse_steer(self.row_slot[:n], self.steer_idx[:s, :, :self._k],
                                           self.steer_val[:s, :, :self._k], self.num_cols)
        return self._plan


class GatherBuffers:
    """The kernel path's feature gather, allocated once at its maximum size:

      * `feat_slot`  int32 [T_max]         0 = the row gathers nothing, g > 0 = group g
      * `feat_layer` int32 [G_max, F_max]  group g's feature f: its decoder layer, -1 pad
      * `feat_col`   int32 [G_max, F_max]  its column in this rank's shard, -1: pad or
                                           another shard
      * `feats`      fp32  [T_max, F_max]  the gathered values, row t = token row t

    A group is one (profile, head) pair of the step, e.g. a profile's prompt
    predictor, or one feature list of the offline pipeline's capture; G_max is
    vLLM's max_num_seqs + 1 (every request its own group)."""

    def __init__(self, max_tokens: int, max_groups: int, device: torch.device,
                 max_features: int = MAX_FEATURES):
        self.feat_slot = torch.zeros(max_tokens, dtype=torch.int32, device=device)  # [T_max]
        self.feat_layer = torch.full((max_groups, max_features), -1, dtype=torch.int32,
                                     device=device)  # [G_max, F_max]
        self.feat_col = torch.full((max_groups, max_features), -1, dtype=torch.int32,
                                   device=device)  # [G_max, F_max]
        self.feats = torch.zeros((max_tokens, max_features), dtype=torch.float32,
                                 device=device)  # [T_max, F_max]
        self._groups: tuple = ()
        self._rows = np.zeros(0, dtype=np.int32)
        self.width = 0  # the widest group's features: columns past it stay 0

    @staticmethod
    def tables(feat_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A profile's feat_idx int32 [L, F] (the local column of feature f if it
        lives in layer l on this shard, else -1) as (layer, column) int32 [F]."""
        here = feat_idx >= 0  # [L, F]; at most one layer per feature
        layer = torch.where(here.any(dim=0), here.int().argmax(dim=0),
                            torch.full_like(feat_idx[0], -1, dtype=torch.int64))
        col = feat_idx.max(dim=0).values  # the one valid column, or -1
        return layer.to(torch.int32), col.to(torch.int32)

    def fill(self, groups: tuple, feat_slot: np.ndarray | None) -> None:
        """groups: the feat_idx tensors (int32 [L, F_g]) of groups 1..G, in
        order; feat_slot: int32 [T] for the step's tokens (None: no row
        gathers). Writes in place; zeroes the gathering rows' features."""
        if feat_slot is None:
            feat_slot = np.zeros(0, dtype=np.int32)
        if len(groups) >= self.feat_layer.shape[0] or feat_slot.shape[0] > self.feats.shape[0]:
            raise ValueError(f"step has {len(groups)} feature groups and {feat_slot.shape[0]} "
                             f"tokens; the buffers hold {self.feat_layer.shape[0] - 1} and "
                             f"{self.feats.shape[0]}")
        if len(groups) != len(self._groups) or any(a is not b for a, b in
                                                   zip(groups, self._groups)):
            for g, feat_idx in enumerate(groups, start=1):
                n = feat_idx.shape[1]
                if n > self.feats.shape[1]:
                    raise ValueError(f"a predictor with {n} features; the gather holds "
                                     f"{self.feats.shape[1]}")
                layer, col = self.tables(feat_idx)
                self.feat_layer[g, :n], self.feat_col[g, :n] = layer, col
                self.feat_layer[g, n:], self.feat_col[g, n:] = -1, -1
            self._groups = groups
            self.width = max((f.shape[1] for f in groups), default=0)
        self._rows = write_rows_(self.feat_slot, feat_slot, self._rows)
        if feat_slot.any():
            self.feats[:feat_slot.shape[0], :self.width].zero_()

    def clear(self) -> None:
        """No row gathers (an idle step): feat_slot all 0, tables kept."""
        if self._rows.any():
            self.feat_slot[:self._rows.shape[0]].zero_()
        self._rows = np.zeros(0, dtype=np.int32)


class CaptureBuffers:
    """The kernel path's activation capture (the offline pipeline's means),
    allocated once at its maximum size:

      * `cap_slot`  int32 [T_max]                 0 = the row adds nothing, c > 0 = slot c
      * `cap_sum`   fp32  [L, C_max + 1, I_shard] slot c's sum over its rows, per layer

    A capturing request takes a slot when it arrives (its sums zeroed in
    place), keeps it until its prompt is done, and gives it back once its
    sums have been read (a host copy, after the step). C_max is
    ADARAS_CAPTURE_SLOTS (`capture.capture_slots`): L * (C_max + 1) * I_shard
    * 4 bytes, e.g. 36 * 17 * 9728 * 4 = 24 MB for Qwen3-4B at the default 16."""

    def __init__(self, max_tokens: int, max_slots: int, num_layers: int, num_cols: int,
                 device: torch.device):
        self.cap_slot = torch.zeros(max_tokens, dtype=torch.int32, device=device)  # [T_max]
        self.cap_sum = torch.zeros((num_layers, max_slots + 1, num_cols), dtype=torch.float32,
                                   device=device)  # [L, C_max + 1, I_shard]
        self._free = list(range(max_slots, 0, -1))  # pop() hands out the lowest
        self._rows = np.zeros(0, dtype=np.int32)

    @property
    def max_slots(self) -> int:
        return self.cap_sum.shape[1] - 1

    def take(self) -> int | None:
        """A free slot with its sums zeroed (None: all are taken)."""
        if not self._free:
            return None
        slot = self._free.pop()
        self.cap_sum[:, slot].zero_()
        return slot

    def give(self, slot: int) -> None:
        assert 0 < slot <= self.max_slots and slot not in self._free, slot
        self._free.append(slot)

    def fill(self, cap_slot: np.ndarray | None) -> None:
        """cap_slot: int32 [T] for the step's tokens (None: no row adds).
        Writes in place; rows past T are left 0."""
        if cap_slot is None:
            cap_slot = np.zeros(0, dtype=np.int32)
        if cap_slot.shape[0] > self.cap_slot.shape[0]:
            raise ValueError(f"step has {cap_slot.shape[0]} tokens; the capture buffers hold "
                             f"{self.cap_slot.shape[0]}")
        self._rows = write_rows_(self.cap_slot, cap_slot, self._rows)
