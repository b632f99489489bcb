"""Activation capture for the offline pipeline: a request with
`extra_args["adaras_capture"]` records its prompt's pre-steering MLP
activations while vLLM prefills it (a mean over positions of every neuron,
and/or per-token values of a few features), this rank's neuron shard only.
Positions are recorded once: a preempted request that recomputes its prompt
skips what it already recorded.

Two layouts, as for the steering itself:

  * CPU path: a per-step plan (row indices, a [L, n, I_shard] sum and a
    [rows, F] feature tensor allocated for the step), folded into each
    request after the forward.
  * Kernel path (CUDA, or ADARAS_KERNEL_PATH=1 under the Triton interpreter):
    nothing is allocated per step. A request with a mean takes a slot of
    `step.CaptureBuffers` when it arrives, and its rows add their activation
    to that slot in place every layer (`steering_kernels.sum_slots_`); the
    sums are read back once, when its prompt is done. Its per-token features
    ride the predictor gather (`gate.Gather`, head "capture"). There are
    ADARAS_CAPTURE_SLOTS slots per worker (default 16; the pipeline sets its
    max_num_seqs); a request that finds none gets an error result naming the
    variable, never a partial mean. A token row feeds one gather there, so a
    request that is adaptive and also captures tokens gets an error result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from adaras.engine.config import CAPTURE_KEY, CaptureRequest, parse_capture
from adaras.engine.gate import Gather
from adaras.engine.step import CaptureBuffers, StepContext
from steering_kernels.steer_plan import plan_features

CAPTURE_SLOTS_ENV = "ADARAS_CAPTURE_SLOTS"
DEFAULT_CAPTURE_SLOTS = 16


def capture_slots() -> int:
    """Concurrent mean captures per worker on the kernel path (ADARAS_CAPTURE_SLOTS)."""
    raw = os.environ.get(CAPTURE_SLOTS_ENV, "").strip()
    if not raw:
        return DEFAULT_CAPTURE_SLOTS
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"{CAPTURE_SLOTS_ENV} must be an integer >= 0, got {raw!r}")
    return n


@dataclass
class CaptureState:
    """Running capture of one request's prompt activations (this rank's shard)."""

    spec: CaptureRequest
    feat_idx: torch.Tensor | None  # int32 [L, F] local columns, -1 = elsewhere
    total: torch.Tensor | None = None  # fp32 [L, I_shard] sum over positions >= mean_from
    count: int = 0
    next_pos: int = 0  # prompt positions already recorded (recomputation skips them)
    tokens: list[torch.Tensor] = field(default_factory=list)  # fp32 [t, F] chunks
    slot: int = 0  # kernel path: its CaptureBuffers slot (0: none, no mean)

    def result(self) -> dict:
        """Arrays travel as raw float32 bytes + shape (RPC turns arrays into lists)."""
        out: dict = {"count": self.count}
        if self.total is not None:
            mean = (self.total / max(self.count, 1)).float().cpu()  # [L, I_shard]
            out["mean"] = (mean.numpy().tobytes(), list(mean.shape))
        if self.spec.features is not None:
            F = len(self.spec.features)
            tokens = torch.cat(self.tokens) if self.tokens else torch.zeros(0, F)  # [T, F]
            out["tokens"] = (tokens.float().numpy().tobytes(), list(tokens.shape))
        return out


class ActivationCapture:
    def __init__(self, num_layers: int, intermediate_size: int, shard: tuple[int, int],
                 device: torch.device, put_result, buffers: CaptureBuffers | None = None,
                 max_features: int | None = None):
        self.num_layers, self.intermediate_size = num_layers, intermediate_size
        self.shard, self.device = shard, device
        self.put_result = put_result  # (req_id, dict) -> None: where finished captures go
        self.buffers = buffers  # the kernel path's (None: the CPU path's per-step plans)
        self.max_features = max_features  # kernel path: the gather's width
        self.active: dict[str, CaptureState] = {}
        self._columns: dict[tuple, torch.Tensor] = {}

    @property
    def num_cols(self) -> int:
        return self.shard[1] - self.shard[0]

    def add(self, req_id: str, sampling_params, gathers_prompt: bool = False) -> None:
        """Admit a capturing request. gathers_prompt: the request is adaptive
        (its prompt rows feed the gate's gather)."""
        extra = getattr(sampling_params, "extra_args", None) if sampling_params else None
        if not extra or CAPTURE_KEY not in extra:
            return
        try:
            spec = parse_capture(extra[CAPTURE_KEY])
            if spec is None:
                return
            feat_idx = self._feature_columns(spec.features) if spec.features else None
        except ValueError as e:  # validated in the frontend; belt and braces
            self.put_result(req_id, {"error": str(e)})
            return
        state = CaptureState(spec, feat_idx)
        if self.buffers is not None:
            error = self._kernel_path_error(spec, gathers_prompt)
            if error is None and spec.mean_from is not None:
                state.slot = self.buffers.take() or 0
                if not state.slot:
                    error = (f"no free capture slot: {self.buffers.max_slots} requests with a "
                             f"mean are being captured on this worker; raise "
                             f"{CAPTURE_SLOTS_ENV} (now {self.buffers.max_slots}) to at least "
                             "the engine's max_num_seqs; the activations were not captured")
            if error is not None:
                self.put_result(req_id, {"error": error})
                return
        self.active[req_id] = state

    def _kernel_path_error(self, spec: CaptureRequest, gathers_prompt: bool) -> str | None:
        if spec.features is None:
            return None
        if gathers_prompt:
            return (f"{CAPTURE_KEY}.features: this request is also adaptive, and on the kernel "
                    "path (CUDA) a prompt token feeds one feature gather, the gate's; capture "
                    "the tokens in a request without adaptive steering")
        if self.max_features is not None and len(spec.features) > self.max_features:
            return (f"{CAPTURE_KEY}.features: {len(spec.features)} features; the kernel "
                    f"path's gather holds {self.max_features}")
        return None

    def drop(self, req_id: str) -> None:
        """Forget a request (finished or aborted), giving back its slot."""
        cap = self.active.pop(req_id, None)
        if cap is not None and cap.slot:
            self.buffers.give(cap.slot)
            cap.slot = 0

    def _feature_columns(self, features: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """int32 [L, F] local columns of `features` (cached: the pipeline sends
        one feature list with many requests)."""
        if features in self._columns:
            return self._columns[features]
        L, I = self.num_layers, self.intermediate_size
        start, end = self.shard
        idx = torch.full((L, len(features)), -1, dtype=torch.int32)
        for f, (layer, neuron) in enumerate(features):
            if layer >= L or neuron >= I:
                raise ValueError(f"{CAPTURE_KEY}.features: ({layer}, {neuron}) is outside the "
                                 f"model ({L} layers x {I} neurons)")
            if start <= neuron < end:
                idx[layer, f] = neuron - start
        if len(self._columns) > 16:
            self._columns.clear()
        self._columns[features] = idx = idx.to(self.device)
        return idx

    def plan(self, ctx: StepContext, rows_of, pending: list[Gather], num_tokens: int) -> None:
        """Lay out this step's capture rows. rows_of(req_id) -> (first row,
        scheduled tokens, computed, prompt length) or None if not scheduled.
        Kernel path: fill CaptureBuffers.cap_slot in place (also when nothing
        is captured) and append the token rows to `pending`, the gather's."""
        mean_rows, mean_seg, tok_rows = [], [], []
        tok_sets: dict[tuple, tuple[torch.Tensor, slice]] = {}  # features -> (idx, cols)
        n_tok, n_seg, n_feat = 0, 0, 0
        cap_slot = None  # kernel path: int32 [T]
        for rid, cap in self.active.items():
            where = rows_of(rid)
            if where is None:
                continue
            start, n, computed, prompt = where
            m = max(min(n, prompt - computed), 0)  # prompt rows this step
            skip = min(max(cap.next_pos - computed, 0), m)  # recorded before a preemption
            pos, done = max(computed + m, cap.next_pos), computed + n >= prompt
            seg, in_mean = -1, 0
            if cap.spec.mean_from is not None:
                first = max(cap.spec.mean_from - computed, skip)
                if first < m:
                    in_mean = m - first
                    if self.buffers is not None:
                        if cap_slot is None:
                            cap_slot = np.zeros(num_tokens, dtype=np.int32)
                        seg = cap.slot
                        cap_slot[start + first:start + m] = seg
                    else:
                        seg = n_seg
                        mean_rows.append(np.arange(start + first, start + m))
                        mean_seg.append(np.full(in_mean, n_seg))
                        n_seg += 1
            rows, cols = slice(0, 0), slice(0, 0)
            if cap.feat_idx is not None:
                until = prompt if cap.spec.tokens_until is None else cap.spec.tokens_until
                t = max(min(m, until - computed), 0)
                if t > skip and self.buffers is not None:
                    pending.append(Gather(rid, cap.feat_idx, start + skip, t - skip, pos, done,
                                          "capture"))
                elif t > skip:
                    key = cap.spec.features
                    if key not in tok_sets:
                        F = cap.feat_idx.shape[1]
                        tok_sets[key] = (cap.feat_idx, slice(n_feat, n_feat + F))
                        n_feat += F
                    cols = tok_sets[key][1]
                    tok_rows.append(np.arange(start + skip, start + t))
                    rows = slice(n_tok, n_tok + t - skip)
                    n_tok += t - skip
            ctx.cap_spans.append((rid, seg, rows, cols, in_mean, pos, done))
        if self.buffers is not None:
            self.buffers.fill(cap_slot)
            return
        if n_seg:
            ctx.cap_rows = torch.from_numpy(np.concatenate(mean_rows)).to(self.device)
            ctx.cap_seg = torch.from_numpy(np.concatenate(mean_seg)).to(self.device)
            ctx.cap_sum = torch.zeros(self.num_layers, n_seg, self.num_cols, device=self.device)
        if n_tok:
            feat_idx = torch.cat([idx for idx, _ in tok_sets.values()], dim=1)  # [L, F_all]
            ctx.cap_feat_plan = plan_features(feat_idx, self.num_cols)
            ctx.cap_tok_rows = torch.from_numpy(np.concatenate(tok_rows)).to(self.device)
            ctx.cap_feats = torch.zeros(n_tok, n_feat, device=self.device)

    @staticmethod
    def tokens_of(ctx: StepContext, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """CPU path: each request's gathered per-token features [t, F] out of
        the step's capture features (fp32, CPU, summed over ranks)."""
        return {rid: feats[rows, cols] for rid, _, rows, cols, *_ in ctx.cap_spans
                if rows.stop > rows.start}

    def end(self, ctx: StepContext, tokens: dict[str, torch.Tensor]) -> None:
        """Fold the step into each capture: the CPU path's sums, and the
        per-token features `tokens` (req_id -> fp32 [t, F], CPU, summed over
        ranks). Finished captures go to put_result; on the kernel path their
        sums are read back (the one host copy) and their slots given back."""
        for rid, seg, _, _, in_mean, pos, done in ctx.cap_spans:
            cap = self.active.get(rid)
            if cap is None:
                continue
            cap.next_pos = pos
            cap.count += in_mean
            if seg >= 0 and self.buffers is None:
                part = ctx.cap_sum[:, seg]  # [L, I_shard]
                cap.total = part.clone() if cap.total is None else cap.total + part
            if rid in tokens:
                cap.tokens.append(tokens[rid])
            if done:
                if cap.slot:  # its sums over every step, zeroed when it took the slot
                    cap.total = self.buffers.cap_sum[:, cap.slot].to("cpu", copy=True)
                elif cap.total is None and cap.spec.mean_from is not None:
                    cap.total = torch.zeros(self.num_layers, self.num_cols)
                self.put_result(rid, cap.result())
                self.drop(rid)
