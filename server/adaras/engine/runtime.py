"""Worker-side steering: one `SteeringRuntime` per worker process (one per TP
rank), held by the model runner. It owns the requests' steering state and
reports (posted to `reports.Outbox`, which rides each step's output), and
before every forward turns the persistent batch into the step's
context, with the help of one part per job:

    profile_store.ProfileStore   profiles by name and by version (this rank's shard)
    step.StepBuffers             per-token slot index and slot tables, allocated once
                                 (kernel path: step.GatherBuffers, step.CaptureBuffers too)
    gate.PredictorGate           adaptive requests: prompt features -> p_fail -> decision
    prefix_states.PrefixStates   predictor states of cached prompt blocks
    capture.ActivationCapture    the offline pipeline's activation capture

Python work per step is per *steered* request only: unsteered requests never
enter `self.requests`, and a step with nothing to do sets no context.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from adaras.engine.capture import ActivationCapture, capture_slots
from adaras.engine.config import PROFILES_ENV, parse_profiles_env
from adaras.engine.gate import Gather, PredictorGate
from adaras.engine.prefix_states import PrefixStates, PromptBlocks, prompt_blocks
from adaras.engine.profile_store import LoadedProfile, ProfileStore
from adaras.engine.reports import Outbox
from adaras.engine.step import (
    STATS,
    CaptureBuffers,
    GatherBuffers,
    KernelPath,
    StepBuffers,
    StepContext,
    current,
    set_current,
    set_kernel_path,
)
from adaras.predictor import PoolState
from adaras.profile import ModelShape
from adaras.report import single as single_report
from adaras.steering import (
    FINGERPRINT_KEY,
    STEERING_KEY,
    Resolved,
    SteeringConfigError,
    declared_prompt_positions,
    resolve,
    steered_prompt_positions,
    steering_from_extra_args,
    unknown_profile,
)
from steering_kernels.gather_slots import MAX_FEATURES

DEFAULT_PROFILE_ENV = "ADARAS_DEFAULT_PROFILE"
MAX_CAPTURES = 65536


_SUFFIX = re.compile(r"-[0-9a-f]{8}$")
_CHILD = re.compile(r"^\d+_")


def request_base_id(engine_id: str) -> str:
    """An engine request id without what the engine added: vLLM appends
    `-<8 hex>` to make ids unique and prefixes `<i>_` for the n > 1 children."""
    return _CHILD.sub("", _SUFFIX.sub("", engine_id))


def belongs_to(engine_id: str, frontend_id: str) -> bool:
    """Whether an engine request was made for `frontend_id`: the same id, or a
    sub-request of it (the OpenAI server adds `-<prompt index>` or `_<i>`)."""
    base = request_base_id(engine_id)
    return base == frontend_id or base.startswith((frontend_id + "-", frontend_id + "_"))


def put_bounded(store: OrderedDict, key: str, value) -> None:
    """Insert, dropping the oldest entries beyond MAX_CAPTURES (results nobody pops)."""
    store[key] = value
    while len(store) > MAX_CAPTURES:
        store.popitem(last=False)


def pop_belonging(store: OrderedDict, frontend_ids: list[str]) -> dict:
    """Remove and return the entries whose engine request id belongs to one of
    `frontend_ids` (see `belongs_to`)."""
    return {rid: store.pop(rid) for rid in list(store)
            if any(belongs_to(rid, w) for w in frontend_ids)}


@dataclass
class RequestState:
    steering: Resolved  # the request's steering with its defaults filled in
    profile: LoadedProfile | None
    # prompt positions also steered when the request is steered from the start
    # ("always"): 0 = none, 1 = the last one, -1 = all (profile provenance
    # "steer_prompt"; see SteeringProfile.steered_prompt_positions)
    steer_prompt: int = 0
    pool: PoolState | None = None
    pool_pos: int = 0  # prompt positions already in `pool` (recomputation skips them)
    blocks: PromptBlocks | None = None  # its prompt blocks' hashes, to store their states
    block_pool: PoolState | None = None  # the current prompt block's own state
    p_fail: float | None = None
    applied: bool = False  # decode steps are steered
    error: str | None = None
    # the answer probe: its head's pooling state over positions >= the prompt length
    answer_pool: PoolState | None = None
    answer_pos: int = -1  # positions before it are folded (-1: not started)
    answer_p_fail: float | None = None

    @property
    def alpha(self) -> float:
        return self.steering.alpha

    def report(self) -> dict:
        return single_report(self.steering, self.p_fail, self.applied, self.error,
                             self.answer_p_fail).wire()



class SteeringRuntime:
    def __init__(self, shape: ModelShape, tp_rank: int, tp_size: int, device: torch.device,
                 max_tokens: int = 8192, max_requests: int = 256):
        if shape.intermediate_size % tp_size:
            raise ValueError(f"intermediate_size {shape.intermediate_size} not divisible by TP {tp_size}")
        self.shape = shape
        self.tp_rank, self.tp_size = tp_rank, tp_size
        shard = shape.intermediate_size // tp_size
        self.shard = (tp_rank * shard, (tp_rank + 1) * shard)
        self.device = device
        # The kernel path (CUDA with Triton; ADARAS_KERNEL_PATH=1 runs it on CPU tensors
        # under TRITON_INTERPRET=1, for tests): the op launches the same kernels every
        # step over buffers filled in place, as a captured CUDA graph needs.
        self.kernel_path = uses_kernel_path(device)
        self.store = ProfileStore(shape, self.shard, device,
                                  default=os.environ.get(DEFAULT_PROFILE_ENV) or None,
                                  max_features=MAX_FEATURES if self.kernel_path else None)
        self.buffers = StepBuffers(max_tokens, max_requests + 1, shape.num_layers, shard, device)
        gather = captured = None
        if self.kernel_path:
            gather = GatherBuffers(max_tokens, max_requests + 1, device)
            captured = CaptureBuffers(max_tokens, capture_slots(), shape.num_layers, shard,
                                      device)
        set_kernel_path(KernelPath(self.buffers, gather, captured) if self.kernel_path else None)
        self.prefix = PrefixStates()
        self.gate = PredictorGate(shard, device, self.prefix, gather)
        self.capture = ActivationCapture(shape.num_layers, shape.intermediate_size, self.shard,
                                         device, self._put_capture, captured,
                                         MAX_FEATURES if self.kernel_path else None)
        self.requests: dict[str, RequestState] = {}
        self.outbox = Outbox()  # reports made this step; the runner empties it into the output
        self.capture_results: OrderedDict[str, dict] = OrderedDict()
        self.hooked_layers = 0  # steering-op calls with work to do, ever
        for name, path in parse_profiles_env(os.environ.get(PROFILES_ENV)).items():
            self.load_profile(name, path)

    # ---- profiles (RPC) ---------------------------------------------------
    def _in_use(self) -> set[str]:
        return {s.profile.version for s in self.requests.values() if s.profile}

    def load_profile(self, name: str, path: str) -> dict:
        """Load (or atomically replace) `name`. Requests already admitted keep
        the profile object they started with."""
        return self.store.load(name, path, self._in_use())

    def unload_profile(self, name: str) -> bool:
        return self.store.unload(name, self._in_use())

    def set_default_profile(self, name: str | None) -> None:
        self.store.set_default(name)

    @property
    def profiles(self) -> dict[str, LoadedProfile]:
        return self.store.by_name

    # ---- requests ---------------------------------------------------------
    def _new_request(self, req_id: str, sampling_params) -> RequestState | None:
        extra = getattr(sampling_params, "extra_args", None) if sampling_params else None
        try:
            config = steering_from_extra_args(extra)
        except SteeringConfigError as e:  # validated in the frontend; belt and braces
            self._put_report(req_id, RequestState(Resolved(), None, error=str(e)))
            return None
        if not config.engaged:
            if extra and STEERING_KEY in extra:  # explicit "off": still report it
                self._put_report(req_id, RequestState(Resolved(), None))
            return None
        name = config.profile or self.store.default
        loaded = self.store.find(name, (extra or {}).get(FINGERPRINT_KEY))
        if loaded is None:
            unknown = Resolved(config.mode, name, config.alpha, config.threshold)
            self._put_report(req_id, RequestState(unknown, None,
                                                  error=str(unknown_profile(name, self.profiles))))
            return None
        prof = loaded.profile
        state = RequestState(
            resolve(config, profile=prof.name, default_alpha=prof.default_alpha,
                    profile_threshold=prof.threshold, neurons=prof.k, version=loaded.version),
            loaded, steer_prompt=steered_prompt_positions(
                prof.steered_prompt_positions, declared_prompt_positions(extra))
            if config.mode == "always" else 0)
        if config.answer_probe:
            if prof.answer_predictor is None:
                state.error = f"profile {name!r} has no answer head; the answer was not probed"
            else:
                state.answer_pool = prof.answer_predictor.init_state()
        if config.mode == "off":
            self._put_report(req_id, state)
            return state if state.answer_pool is not None else None
        if config.mode == "always":
            state.applied = True
        elif prof.predictor is None:
            state.error = f"profile {name!r} has no failure predictor; adaptive mode cannot gate"
        else:
            state.pool = prof.predictor.init_state()
            if (extra or {}).get(FINGERPRINT_KEY) == loaded.version:
                state.blocks = prompt_blocks(extra, loaded.version)
            return state  # reported when the gate has decided
        self._put_report(req_id, state)
        return state

    def _put_report(self, req_id: str, state: RequestState) -> None:
        """Post the request's report; it leaves with this step's output."""
        self.outbox.post(req_id, state.report())

    def _put_capture(self, req_id: str, result: dict) -> None:
        put_bounded(self.capture_results, req_id, result)

    def take_reports(self) -> dict[str, dict]:
        """The reports posted since the last call, by engine request id (the
        runner calls this once per step and sends them with the step's output)."""
        return self.outbox.drain()

    def pop_captures(self, req_ids: list[str]) -> dict[str, dict]:
        """Finished captures of requests that belong to these frontend ids,
        keyed by engine request id. `mean` is this rank's neuron shard."""
        return pop_belonging(self.capture_results, req_ids)

    def release(self, req_id: str) -> None:
        """Forget a request that finished or was aborted. Called where vLLM drops the request's state, which
        happens on every step, including the empty one before going idle."""
        self.requests.pop(req_id, None)
        self.capture.drop(req_id)

    def stats(self) -> dict:
        """Sizes of the per-request tables (all 0 when idle and drained)."""
        return {"requests": len(self.requests), "captures": len(self.capture.active),
                "reports": len(self.outbox), "capture_results": len(self.capture_results),
                "profiles": sorted(self.profiles), "versions": len(self.store.by_version),
                "hooked_layers": self.hooked_layers, "prefix_states": len(self.prefix),
                "prefix_tokens_restored": self.prefix.restored_tokens,
                "plain_graph": STATS.plain_graph, "plain_graph_from": STATS.plain_graph_from,
                "forwards_plain": STATS.forwards_plain,
                "forwards_steered": STATS.forwards_steered, "steering_op_calls": STATS.op_calls,
                **compiled_graphs()}

    # ---- per step ---------------------------------------------------------
    def begin_step(self, req_ids: list[str], req_id_to_index: dict[str, int],
                   num_scheduled: np.ndarray, num_computed: np.ndarray, num_prompt: np.ndarray,
                   new_requests: list[tuple[str, object]] = ()) -> StepContext | None:
        """Fill the step buffers and set the step's context (None: nothing to do).

        num_scheduled, num_computed, num_prompt: int [N] per request of the
        persistent batch, in `req_ids` order; new_requests: (req_id,
        SamplingParams) of the requests scheduled for the first time."""
        for rid, sampling_params in new_requests:
            state = self._new_request(rid, sampling_params)
            if state is not None:
                self.requests[rid] = state
            self.capture.add(rid, sampling_params,
                             gathers_prompt=state is not None and state.pool is not None)
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
                        self._put_report(rid, state)
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
            self._put_report(rid, state)
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

    def end_step(self) -> None:
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
                    self._put_report(rid, state)
        for rid in answered:  # the last one before the request ends is the answer's
            self._put_report(rid, self.requests[rid])


KERNEL_PATH_ENV = "ADARAS_KERNEL_PATH"


def uses_kernel_path(device: torch.device) -> bool:
    """CUDA with Triton, or ADARAS_KERNEL_PATH=1 (CPU tensors; then Triton must
    run under TRITON_INTERPRET=1)."""
    from steering_kernels import HAS_TRITON

    if os.environ.get(KERNEL_PATH_ENV) == "1":
        if not HAS_TRITON:
            raise RuntimeError(f"{KERNEL_PATH_ENV}=1 needs triton")
        return True
    return device.type == "cuda" and HAS_TRITON


def get_runtime(runner, create: bool = True) -> SteeringRuntime | None:
    """The worker's runtime, held by its model runner (`runner.adaras_runtime`)
    and created on first use from the runner's model; None when `create` is
    False and the runner has none yet."""
    rt = getattr(runner, "adaras_runtime", None)
    if rt is None and create:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )
        shape = ModelShape.from_hf_config(runner.model_config.hf_config)
        rt = runner.adaras_runtime = SteeringRuntime(
            shape, get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(),
            runner.device, max_tokens=runner.max_num_tokens, max_requests=runner.max_num_reqs)
    return rt


def compiled_graphs() -> dict:
    """How this worker got its compiled graphs since start: loaded from
    vLLM's compile cache (a warm start) or compiled (`seam.patch_compile_cache`)."""
    from vllm.compilation.counter import compilation_counter as c

    return {"graphs_loaded": c.num_aot_artifacts_loaded, "graphs_compiled": c.num_aot_compiles}
