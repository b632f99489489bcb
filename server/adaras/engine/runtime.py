"""Worker-side steering: one `SteeringRuntime` per worker process (one per TP
rank), held by the model runner. It owns the request table: each steered
request's state (`request_state.RequestState`), admitted when first
scheduled, its reports (posted to `reports.Outbox`, which rides each step's
output), the profiles (RPC) and the finished captures. The per-step plan, which
before every forward turns the persistent batch into the step's context and
after it feeds the predictors, is `step_plan.StepPlanner`, with one part per job:

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

import numpy as np
import torch

from adaras.engine.capture import ActivationCapture
from adaras.engine.config import PROFILES_ENV, parse_profiles_env
from adaras.engine.gate import PredictorGate
from adaras.engine.prefix_states import PrefixStates, prompt_blocks
from adaras.engine.profile_store import LoadedProfile, ProfileStore
from adaras.engine.reports import Outbox
from adaras.engine.request_state import RequestState
from adaras.engine.step import (
    STATS,
    StepBuffers,
    StepContext,
)
from adaras.engine.step_plan import StepPlanner
from adaras.profile import ModelShape
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
        self.requests: dict[str, RequestState] = {}
        self.outbox = Outbox()  # reports made this step; the runner empties it into the output
        self.capture_results: OrderedDict[str, dict] = OrderedDict()
        self.planner = StepPlanner(self.requests, self._put_report, self._put_capture, shape,
                                   self.shard, device, self.kernel_path, tp_size, max_tokens,
                                   max_requests)
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

    # ---- per step (engine.step_plan) --------------------------------------
    def begin_step(self, req_ids: list[str], req_id_to_index: dict[str, int],
                   num_scheduled: np.ndarray, num_computed: np.ndarray, num_prompt: np.ndarray,
                   new_requests: list[tuple[str, object]] = ()) -> StepContext | None:
        """Admit the step's new requests, then plan the step (StepPlanner.begin)."""
        for rid, sampling_params in new_requests:
            state = self._new_request(rid, sampling_params)
            if state is not None:
                self.requests[rid] = state
            self.capture.add(rid, sampling_params,
                             gathers_prompt=state is not None and state.pool is not None)
        return self.planner.begin(req_ids, req_id_to_index, num_scheduled, num_computed,
                                  num_prompt)

    def end_step(self) -> None:
        """After the forward (StepPlanner.end)."""
        self.planner.end()

    @property
    def buffers(self) -> StepBuffers:
        return self.planner.buffers

    @property
    def gate(self) -> PredictorGate:
        return self.planner.gate

    @property
    def prefix(self) -> PrefixStates:
        return self.planner.prefix

    @property
    def capture(self) -> ActivationCapture:
        return self.planner.capture

    @property
    def hooked_layers(self) -> int:
        return self.planner.hooked_layers


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
