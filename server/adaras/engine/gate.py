"""The predictor gate: an adaptive request's prompt activations at its
predictor's feature neurons are gathered by the steering op while vLLM
prefills the prompt, streamed into the request's attention-pooling state
after each step, and turned into p_fail (and the steer/no-steer decision) when
the prompt is complete.

Prompt features are folded by position: a request that vLLM preempted and
recomputes from token 0 skips the positions it already folded, so its p_fail
equals that of an uninterrupted run. A request that vLLM served part of its
prompt from the prefix cache starts from the stored states of those blocks,
and every full prompt block it computes leaves its own state for the next
request (adaras.engine.prefix_states).
"""

from __future__ import annotations

import numpy as np
import torch

from adaras.engine.prefix_states import PrefixStates
from adaras.engine.profile_store import LoadedProfile
from adaras.engine.step import GatherBuffers, StepContext
from adaras.predictor import FailurePredictor, PoolState
from steering_kernels.steer_plan import plan_features


class PredictorGate:
    def __init__(self, num_cols: int, device: torch.device, prefix: PrefixStates,
                 gather: GatherBuffers | None = None):
        self.num_cols, self.device = num_cols, device  # neurons in this rank's shard
        self.prefix = prefix
        self.gather = gather  # the kernel path's buffers (None: the CPU path's plans)
        self._key: tuple = ()
        self._table = None  # (feat_idx int32 [L, F_all], FeaturePlan) for self._key

    def plan(self, ctx: StepContext,
             pending: list[tuple[str, LoadedProfile, int, int, int, bool]],
             num_tokens: int = 0) -> None:
        """pending: (req_id, profile, first row of its prompt tokens to fold,
        rows, prompt positions folded after this step, prompt completes this
        step) for each adaptive request still reading its prompt; num_tokens:
        the step's token rows."""
        if self.gather is not None:
            self._plan_kernel_path(ctx, pending, num_tokens)
            return
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

    def _plan_kernel_path(self, ctx: StepContext, pending, num_tokens: int) -> None:
        """Fill GatherBuffers in place: each pending request's rows read its
        profile's group; spans index the gathered rows (ctx.gathered_rows)."""
        groups: dict[LoadedProfile, int] = {}
        for _, p, *_ in pending:
            groups.setdefault(p, len(groups) + 1)
        if not pending:
            self.gather.fill(tuple(p.feat_idx for p in groups), None)
            return
        feat_slot = np.zeros(num_tokens, dtype=np.int32)
        rows, n = [], 0
        for rid, p, first, m, pos, done in pending:
            feat_slot[first:first + m] = groups[p]
            rows.append(np.arange(first, first + m))
            ctx.spans.append((rid, slice(n, n + m), slice(0, p.feat_idx.shape[1]), pos, done))
            n += m
        self.gather.fill(tuple(p.feat_idx for p in groups), feat_slot)
        ctx.gathered_rows = torch.from_numpy(np.concatenate(rows))  # int64 [R], read after

    def gathered(self, ctx: StepContext) -> torch.Tensor:
        """Kernel path, after the forward: the gathered rows' features [R, F_max]
        (this rank's shard; other columns 0)."""
        return self.gather.feats.index_select(0, ctx.gathered_rows.to(self.device))

    def start_from_prefix(self, state, computed: int) -> None:
        """The request's first step starts `computed` tokens in (a prefix-cache
        hit): its pooling state is the merge of those blocks' stored states."""
        blocks = state.blocks
        states = []
        if blocks is not None and computed % blocks.block_size == 0:
            for h in blocks.hashes[: computed // blocks.block_size]:
                block_state = self.prefix.get(h, blocks.version)
                if block_state is None:
                    break
                states.append(block_state)
        if blocks is None or len(states) * blocks.block_size != computed:
            state.error = (f"{computed} prompt tokens came from the prefix cache without "
                           "their predictor state; the request was not gated")
            state.pool = state.blocks = None
            return
        for block_state in states:
            state.pool = state.pool.merge(block_state)
        state.pool_pos = computed
        self.prefix.restored_tokens += computed

    def fold(self, state, feats: torch.Tensor, prompt_done: bool, pos: int) -> None:
        """Stream one step's features [R, F] (fp32, CPU) of prompt positions
        [state.pool_pos, pos) into `state.pool`; store the state of each full
        block they complete; at the end of the prompt decide `state.applied`."""
        predictor: FailurePredictor = state.profile.profile.predictor
        if state.blocks is not None:
            self._store_blocks(state, predictor, feats, state.pool_pos)
        pool: PoolState = predictor.update(state.pool, feats)
        state.pool, state.pool_pos = pool, pos
        if prompt_done:
            state.p_fail = predictor.finish(pool)
            state.applied = state.p_fail >= state.steering.threshold
            state.pool = None
            state.blocks = state.block_pool = None

    def _store_blocks(self, state, predictor: FailurePredictor, feats: torch.Tensor,
                      start: int) -> None:
        """feats [R, F]: positions start .. start + R - 1 of the prompt."""
        blocks, size = state.blocks, state.blocks.block_size
        pos, end = start, start + feats.shape[0]
        while pos < end:
            block = pos // size
            stop = min((block + 1) * size, end)
            part = feats[pos - start: stop - start]  # [t, F]
            state.block_pool = predictor.update(state.block_pool or predictor.init_state(), part)
            pos = stop
            if pos == (block + 1) * size:  # the block is complete (and all prompt)
                if block < len(blocks.hashes):
                    self.prefix.put(blocks.hashes[block], blocks.version, state.block_pool)
                state.block_pool = None
