"""The predictor gate: an adaptive request's prompt activations at its
predictor's feature neurons are gathered by the steering op while vLLM
prefills the prompt, streamed into the request's attention-pooling state
after each step, and turned into p_fail (and the steer/no-steer decision) when
the prompt is complete.

Prompt features are folded by position: a request that vLLM preempted and
recomputes from token 0 skips the positions it already folded, so its p_fail
equals that of an uninterrupted run.
"""

from __future__ import annotations

import numpy as np
import torch

from adaras.engine.profile_store import LoadedProfile
from adaras.engine.step import StepContext
from adaras.predictor import FailurePredictor, PoolState
from steering_kernels.steer_plan import plan_features


class PredictorGate:
    def __init__(self, num_cols: int, device: torch.device):
        self.num_cols, self.device = num_cols, device  # neurons in this rank's shard
        self._key: tuple = ()
        self._table = None  # (feat_idx int32 [L, F_all], FeaturePlan) for self._key

    def plan(self, ctx: StepContext,
             pending: list[tuple[str, LoadedProfile, int, int, int, bool]]) -> None:
        """pending: (req_id, profile, first row of its prompt tokens to fold,
        rows, prompt positions folded after this step, prompt completes this
        step) for each adaptive request still reading its prompt."""
        if not pending:
            return
        profiles: dict[LoadedProfile, slice] = {}
        o = 0
        for _, p, *_ in pending:
            if p not in profiles:
                profiles[p] = slice(o, o + p.feat_idx.shape[1])
                o += p.feat_idx.shape[1]
        key = tuple(profiles)
        if len(key) != len(self._key) or any(a is not b for a, b in zip(key, self._key)):
            feat_idx = torch.cat([p.feat_idx for p in key], dim=1)  # [L, F_all]
            self._key, self._table = key, (feat_idx, plan_features(feat_idx, self.num_cols))
        ctx.feat_idx, ctx.feat_plan = self._table
        rows, n = [], 0
        for rid, p, first, m, pos, done in pending:
            rows.append(np.arange(first, first + m))
            ctx.spans.append((rid, slice(n, n + m), profiles[p], pos, done))
            n += m
        ctx.feat_rows = torch.from_numpy(np.concatenate(rows)).to(self.device)  # [R]
        ctx.feats = torch.zeros(n, o, device=self.device)  # [R, F_all]

    @staticmethod
    def fold(state, feats: torch.Tensor, prompt_done: bool, pos: int) -> None:
        """Stream one step's features [R, F] (fp32, CPU) into `state.pool`; at
        the end of the prompt decide `state.applied`."""
        predictor: FailurePredictor = state.profile.profile.predictor
        pool: PoolState = predictor.update(state.pool, feats)
        state.pool, state.pool_pos = pool, pos
        if prompt_done:
            state.p_fail = predictor.finish(pool)
            state.applied = state.p_fail >= state.steering.threshold
            state.pool = None
