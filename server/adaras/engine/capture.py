"""Activation capture for the offline pipeline: a request with
`extra_args["adaras_capture"]` records its prompt's pre-steering MLP
activations while vLLM prefills it (a mean over positions of every neuron,
and/or per-token values of a few features), this rank's neuron shard only.
Positions are recorded once: a preempted request that recomputes its prompt
skips what it already recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from adaras.engine.config import CAPTURE_KEY, CaptureRequest, parse_capture
from adaras.engine.step import StepContext
from steering_kernels.steer_plan import plan_features


@dataclass
class CaptureState:
    """Running capture of one request's prompt activations (this rank's shard)."""

    spec: CaptureRequest
    feat_idx: torch.Tensor | None  # int32 [L, F] local columns, -1 = elsewhere
    total: torch.Tensor | None = None  # fp32 [L, I_shard] sum over positions >= mean_from
    count: int = 0
    next_pos: int = 0  # prompt positions already recorded (recomputation skips them)
    tokens: list[torch.Tensor] = field(default_factory=list)  # fp32 [t, F] chunks

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
                 device: torch.device, put_result):
        self.num_layers, self.intermediate_size = num_layers, intermediate_size
        self.shard, self.device = shard, device
        self.put_result = put_result  # (req_id, dict) -> None: where finished captures go
        self.active: dict[str, CaptureState] = {}
        self._columns: dict[tuple, torch.Tensor] = {}

    @property
    def num_cols(self) -> int:
        return self.shard[1] - self.shard[0]

    def add(self, req_id: str, sampling_params) -> None:
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
        self.active[req_id] = CaptureState(spec, feat_idx)

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

    def plan(self, ctx: StepContext, rows_of) -> None:
        """Lay out this step's capture rows. rows_of(req_id) -> (first row,
        scheduled tokens, computed, prompt length) or None if not scheduled."""
        mean_rows, mean_seg, tok_rows = [], [], []
        tok_sets: dict[tuple, tuple[torch.Tensor, slice]] = {}  # features -> (idx, cols)
        n_tok, n_seg, n_feat = 0, 0, 0
        for rid, cap in self.active.items():
            where = rows_of(rid)
            if where is None:
                continue
            start, n, computed, prompt = where
            m = max(min(n, prompt - computed), 0)  # prompt rows this step
            skip = min(max(cap.next_pos - computed, 0), m)  # recorded before a preemption
            seg, in_mean = -1, 0
            if cap.spec.mean_from is not None:
                first = max(cap.spec.mean_from - computed, skip)
                if first < m:
                    seg, in_mean = n_seg, m - first
                    mean_rows.append(np.arange(start + first, start + m))
                    mean_seg.append(np.full(in_mean, n_seg))
                    n_seg += 1
            rows, cols = slice(0, 0), slice(0, 0)
            if cap.feat_idx is not None:
                until = prompt if cap.spec.tokens_until is None else cap.spec.tokens_until
                t = max(min(m, until - computed), 0)
                if t > skip:
                    key = cap.spec.features
                    if key not in tok_sets:
                        F = cap.feat_idx.shape[1]
                        tok_sets[key] = (cap.feat_idx, slice(n_feat, n_feat + F))
                        n_feat += F
                    cols = tok_sets[key][1]
                    tok_rows.append(np.arange(start + skip, start + t))
                    rows = slice(n_tok, n_tok + t - skip)
                    n_tok += t - skip
            ctx.cap_spans.append((rid, seg, rows, cols, in_mean, max(computed + m, cap.next_pos),
                                  computed + n >= prompt))
        if n_seg:
            ctx.cap_rows = torch.from_numpy(np.concatenate(mean_rows)).to(self.device)
            ctx.cap_seg = torch.from_numpy(np.concatenate(mean_seg)).to(self.device)
            ctx.cap_sum = torch.zeros(self.num_layers, n_seg, self.num_cols, device=self.device)
        if n_tok:
            feat_idx = torch.cat([idx for idx, _ in tok_sets.values()], dim=1)  # [L, F_all]
            ctx.cap_feat_plan = plan_features(feat_idx, self.num_cols)
            ctx.cap_tok_rows = torch.from_numpy(np.concatenate(tok_rows)).to(self.device)
            ctx.cap_feats = torch.zeros(n_tok, n_feat, device=self.device)

    def end(self, ctx: StepContext, feats: torch.Tensor | None) -> None:
        """Fold the step's sums and the gathered per-token features (fp32, CPU,
        summed over ranks) into each capture; finished ones go to put_result."""
        for rid, seg, rows, cols, in_mean, pos, done in ctx.cap_spans:
            cap = self.active.get(rid)
            if cap is None:
                continue
            cap.next_pos = pos
            if seg >= 0:
                part = ctx.cap_sum[:, seg]  # [L, I_shard]
                cap.total = part.clone() if cap.total is None else cap.total + part
                cap.count += in_mean
            if rows.stop > rows.start:
                cap.tokens.append(feats[rows, cols])
            if done:
                if cap.total is None and cap.spec.mean_from is not None:
                    cap.total = torch.zeros(self.num_layers, self.num_cols)
                self.put_result(rid, cap.result())
                del self.active[rid]

