"""The per-step plan of the worker's steering, apart from its request table
(`runtime.SteeringRuntime`): before every forward it turns the persistent
batch into the step's context (per-token steering slots, the predictors'
gathers, activation captures), and after it feeds the gathered features to
the gate and the answer probe and posts the reports they make.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from adaras.engine.capture import ActivationCapture, capture_slots
from adaras.engine.gate import Gather, PredictorGate
from adaras.engine.prefix_states import PrefixStates
from adaras.engine.profile_store import LoadedProfile
from adaras.engine.request_state import RequestState
from adaras.engine.step import (
    CaptureBuffers,
    GatherBuffers,
    KernelPath,
    StepBuffers,
    StepContext,
    current,
    set_current,
    set_kernel_path,
)
from adaras.model_shape import ModelShape
from steering_kernels.gather_slots import MAX_FEATURES


class StepPlanner:
    """One worker's step buffers, gate and capture. `requests` is the
    runtime's request table (shared, never rebound), `post(rid, state)` posts
    a request's report, `put_capture(rid, result)` keeps a finished capture."""

    def __init__(self, requests: dict, post: Callable, put_capture: Callable,
                 shape: ModelShape, bounds: tuple[int, int], device: torch.device,
                 kernel_path: bool, tp_size: int, max_tokens: int, max_requests: int):
        self.requests, self.post = requests, post
        self.kernel_path, self.tp_size = kernel_path, tp_size
        shard = bounds[1] - bounds[0]
        self.buffers = StepBuffers(max_tokens, max_requests + 1, shape.num_layers, shard, device)
        gather = captured = None
        if self.kernel_path:
            gather = GatherBuffers(max_tokens, max_requests + 1, device)
            captured = CaptureBuffers(max_tokens, capture_slots(), shape.num_layers, shard,
                                      device)
        set_kernel_path(KernelPath(self.buffers, gather, captured) if self.kernel_path else None)
        self.prefix = PrefixStates()
        self.gate = PredictorGate(shard, device, self.prefix, gather)
        self.capture = ActivationCapture(shape.num_layers, shape.intermediate_size, bounds,
                                         device, put_capture, captured,
                                         MAX_FEATURES if self.kernel_path else None)
        self.hooked_layers = 0  # steering-op calls with work to do, ever

    def begin(self, req_ids: list[str], req_id_to_index: dict[str, int],
              num_scheduled: np.ndarray, num_computed: np.ndarray,
              num_prompt: np.ndarray) -> StepContext | None:
        """Fill the step buffers and set the step's context (None: nothing to do).

        num_scheduled, num_computed, num_prompt: int [N] per request of the
        persistent batch, in `req_ids` order (its new requests already admitted)."""
        set_current(None)
        if not self.requests and not self.capture.active:
            self.buffers.fill((), None, plan=False)  # leaves row_slot all 0
            if self.kernel_path:
                self.gate.gather.clear()  # leaves feat_slot all 0
                self.capture.buffers.fill(None)  # leaves cap_slot all 0
            return None
        ends = np.cumsum(num_scheduled[: len(req_ids)])  # token offset after request i

        def rows_of(rid: str):
            i = req_id_to_index.get(rid)
            if i is None or i >= len(req_ids) or int(num_scheduled[i]) == 0:
                return None  # not scheduled this step
            n = int(num_scheduled[i])
            return int(ends[i]) - n, n, int(num_computed[i]), int(num_prompt[i])

        slots: dict[tuple[LoadedProfile, float], int] = {}
        row_slot = None
        pending = []
        for rid, state in self.requests.items():
            where = rows_of(rid)
            if where is None:
                continue
            start, n, computed, prompt = where
            # Steered rows: positions >= the prompt length, or >= prompt - 1 when
            # the profile steers the last prompt position too (all: from 0).
            first_steered = 0 if state.steer_prompt < 0 else prompt - state.steer_prompt
            first_decode = max(first_steered - computed, 0)
            if state.applied and first_decode < n:
                # Keyed by the profile object the request started with, so a
                # reload or unload never changes a request in flight.
                slot = slots.setdefault((state.profile, state.alpha), len(slots) + 1)
                if row_slot is None:
                    row_slot = np.zeros(int(ends[-1]), dtype=np.int32)
                row_slot[start + first_decode: start + n] = slot
            if state.pool is not None and state.p_fail is None:
                if state.pool.n == 0 and state.pool_pos == 0 and computed > 0:
                    self.gate.start_from_prefix(state, computed)  # served from the prefix cache
                    if state.error:
                        self.post(rid, state)
                elif computed < state.pool_pos:  # preempted: recomputes, stores no more blocks
                    state.blocks = state.block_pool = None
            if state.pool is not None and state.p_fail is None and computed < prompt:
                m = min(n, prompt - computed)
                first = min(max(state.pool_pos - computed, 0), m)  # > 0 only when recomputing
                if first < m:  # else: all folded before a preemption (and not the last chunk)
                    pending.append(Gather(rid, state.profile.feat_idx, start + first, m - first,
                                          computed + m, computed + n >= prompt, "prompt"))
            if state.answer_pool is not None:
                self._plan_answer(rid, state, start, n, computed, prompt, pending)
        ctx = StepContext(buffers=self.buffers, steered=row_slot is not None)
        ctx.plan = self.buffers.fill(tuple(slots), row_slot, plan=not self.kernel_path)
        num_tokens = int(ends[-1]) if len(ends) else 0
        if self.capture.active or self.kernel_path:  # (the kernel path clears cap_slot)
            self.capture.plan(ctx, rows_of, pending, num_tokens)
        self.gate.plan(ctx, pending, num_tokens)
        if ctx.empty:
            return None
        set_current(ctx)
        return ctx

    def _plan_answer(self, rid: str, state: RequestState, start: int, n: int, computed: int,
                     prompt: int, pending: list[Gather]) -> None:
        """The answer probe's rows this step: positions from the prompt length
        on that it has not folded yet (a recompute after preemption skips the
        folded ones)."""
        if state.answer_pos < 0:
            state.answer_pos = prompt
        if computed > state.answer_pos:  # positions it never saw (cannot happen in vLLM 0.32)
            state.error = (f"positions {state.answer_pos}..{computed - 1} were never computed "
                           "by this request; the answer was not probed")
            state.answer_pool, state.answer_p_fail = None, None
            self.post(rid, state)
            return
        first = state.answer_pos - computed  # row offset of the first position to fold
        if first < n:
            pending.append(Gather(rid, state.profile.answer_feat_idx, start + first, n - first,
                                  computed + n, False, "answer"))

    def _gathered(self, feats: torch.Tensor) -> torch.Tensor:
        """Per-token feature values [R, F] as fp32 on the CPU. Each rank gathered
        only the features in its neuron shard (zeros elsewhere): sum the ranks."""
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce
            feats = tensor_model_parallel_all_reduce(feats)
        return feats.float().cpu()

    def end(self) -> None:
        """After the forward: feed gathered features to the predictors, and
        fold captured activations into their requests."""
        ctx = current()
        set_current(None)
        if ctx is None:
            return
        self.hooked_layers += ctx.hooked
        feats = None
        if ctx.spans:  # [R, F_all] (CPU path) or [R, F_widest] (kernel path)
            feats = self._gathered(self.gate.gathered(ctx) if self.kernel_path else ctx.feats)
        if ctx.cap_spans:
            if self.kernel_path:  # the capture's token rows rode the gather
                tokens = {rid: feats[rows, cols] for rid, rows, cols, _, _, head in ctx.spans
                          if head == "capture"}
            else:
                tokens = {} if ctx.cap_feats is None else \
                    self.capture.tokens_of(ctx, self._gathered(ctx.cap_feats))
            self.capture.end(ctx, tokens)
        if not ctx.spans:
            return
        answered = set()
        for rid, rows, cols, pos, done, head in ctx.spans:
            state = self.requests.get(rid)
            if state is None or head == "capture":
                continue
            if head == "answer":
                if state.answer_pool is not None:
                    self.gate.fold_answer(state, feats[rows, cols], pos)
                    answered.add(rid)
            elif state.pool is not None:
                self.gate.fold(state, feats[rows, cols], done, pos)
                if done:
                    self.post(rid, state)
        for rid in answered:  # the last one before the request ends is the answer's
            self.post(rid, self.requests[rid])
