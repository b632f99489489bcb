"""The predictor heads, fed by the feature gather the steering op runs.

The gate (prompt head): an adaptive request's prompt activations at its
predictor's feature neurons are gathered while vLLM prefills the prompt,
streamed into the request's attention-pooling state after each step, and
turned into p_fail (and the steer/no-steer decision) when the prompt is
complete.

The answer probe (answer head): a request with `answer_probe` gathers the
answer head's features at every position after the prompt (each generated
token but the last sampled one, which never passes through the model), folds
them the same way, and reports the answer's p_fail after every step that read
one, so the report on a request's last output is that of the whole answer.

Both fold by position: a request that vLLM preempted and recomputes from
token 0 skips the positions it already folded, so its p_fail equals that of
an uninterrupted run. A request that vLLM served part of its prompt from the
prefix cache starts from the stored states of those blocks, and every full
prompt block it computes leaves its own state for the next request
(adaras.engine.prefix_states).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from adaras.engine.prefix_states import PrefixStates
from adaras.engine.step import GatherBuffers, StepContext
from adaras.predictor import FailurePredictor, PoolState
from steering_kernels.steer_plan import plan_features


class Gather(NamedTuple):
    """One request's rows of this step that read a predictor head's features
    (or, on the kernel path, the offline pipeline's capture features)."""

    req_id: str
    feat_idx: torch.Tensor  # int32 [L, F]: the head's columns (LoadedProfile), its key
    first: int  # its first token row in the step
    rows: int
    pos: int  # positions folded once this step is
    done: bool  # prompt head: the prompt completes this step
    head: str  # "prompt" (the gate), "answer" (the answer probe) or "capture"


class PredictorGate:
    def __init__(self, num_cols: int, device: torch.device, prefix: PrefixStates,
                 gather: GatherBuffers | None = None):
        self.num_cols, self.device = num_cols, device  # neurons in this rank's shard
        self.prefix = prefix
        self.gather = gather  # the kernel path's buffers (None: the CPU path's plans)
        self._key: tuple = ()
        self._table = None  # (feat_idx int32 [L, F_all], FeaturePlan) for self._key

    def plan(self, ctx: StepContext, pending: list[Gather], num_tokens: int = 0) -> None:
        """Lay out the step's feature gathers (num_tokens: the step's token
        rows); ctx.spans index the gathered features."""
        if self.gather is not None:
            self._plan_kernel_path(ctx, pending, num_tokens)
            return
        if not pending:
            return
        heads: dict[torch.Tensor, slice] = {}  # by identity: one per profile head
        o = 0
        for g in pending:
            if g.feat_idx not in heads:
                heads[g.feat_idx] = slice(o, o + g.feat_idx.shape[1])
                o += g.feat_idx.shape[1]
        key = tuple(heads)
        if len(key) != len(self._key) or any(a is not b for a, b in zip(key, self._key)):
            feat_idx = torch.cat(key, dim=1)  # [L, F_all]
            self._key, self._table = key, (feat_idx, plan_features(feat_idx, self.num_cols))
        ctx.feat_idx, ctx.feat_plan = self._table
        rows, n = [], 0
        for g in pending:
            rows.append(np.arange(g.first, g.first + g.rows))
            ctx.spans.append((g.req_id, slice(n, n + g.rows), heads[g.feat_idx], g.pos, g.done,
                              g.head))
            n += g.rows
        ctx.feat_rows = torch.from_numpy(np.concatenate(rows)).to(self.device)  # [R]
        ctx.feats = torch.zeros(n, o, device=self.device)  # [R, F_all]

    def _plan_kernel_path(self, ctx: StepContext, pending: list[Gather], num_tokens: int) -> None:
        """Fill GatherBuffers in place: each pending request's rows read its
        head's group; spans index the gathered rows (ctx.gathered_rows)."""
        groups: dict[torch.Tensor, int] = {}
        for g in pending:
            groups.setdefault(g.feat_idx, len(groups) + 1)
        if not pending:
            self.gather.clear()
            return
        feat_slot = np.zeros(num_tokens, dtype=np.int32)
        rows, n = [], 0
        for g in pending:
            feat_slot[g.first:g.first + g.rows] = groups[g.feat_idx]
            rows.append(np.arange(g.first, g.first + g.rows))
            ctx.spans.append((g.req_id, slice(n, n + g.rows), slice(0, g.feat_idx.shape[1]),
                              g.pos, g.done, g.head))
            n += g.rows
        self.gather.fill(tuple(groups), feat_slot)
        ctx.gathered_rows = torch.from_numpy(np.concatenate(rows))  # int64 [R], read after

    def gathered(self, ctx: StepContext) -> torch.Tensor:
        """Kernel path, after the forward: the gathered rows' features
        [R, F_widest] (this rank's shard; other columns 0)."""
        feats = self.gather.feats[:, :self.gather.width]
        return feats.index_select(0, ctx.gathered_rows.to(self.device))

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

    @staticmethod
    def fold_answer(state, feats: torch.Tensor, pos: int) -> None:
        """Stream one step's features [R, F] (fp32, CPU) of positions
        [state.answer_pos, pos), all after the prompt, into the answer probe's
        pool, and update its p_fail."""
        head: FailurePredictor = state.profile.profile.answer_predictor
        state.answer_pool = head.update(state.answer_pool, feats)
        state.answer_pos = pos
        state.answer_p_fail = head.finish(state.answer_pool)
