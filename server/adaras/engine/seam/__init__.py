"""Every place AdaRAS patches vLLM, in one module.

vLLM's extension points carry most of the plugin: the `vllm.general_plugins`
entry point (`plugin.register`), registered model classes (`models.py`),
`SamplingParams.extra_args`, `collective_rpc`, and the runner's
`_on_request_state_removed` hook. What they cannot reach is patched here,
each patch saying what it replaces and why:

    patch_input_processor       frontend: validate, admit, salt and route each request
    patch_output_processor      frontend: take each request's steering report off its output
    patch_prefix_cache          engine core: salt steered blocks; adaptive cache hits
    patch_scheduler_reports     engine core: carry reports from the worker to the outputs
    patch_model_runner          workers: per-step steering context, reports, release, RPC
    patch_cpu_generator_rewind  workers: vLLM-CPU crash fix (seeded chunked prefill)
    patch_compile_cache         workers: a restart loads its compiled graphs instead of compiling
    patch_openai_requests       HTTP server: carry `steering` into extra_args

Two of them live in their own modules of this package: the vLLM-CPU fix
(`cpu_platform`) and the compile cache (`compile_cache`, which also holds the
steered backbone's compile key and the loading of a compiled graph without
running it, the only calls of private vLLM functions). No module outside this
package patches vLLM or torch or calls their private functions.

Every vLLM symbol these touch is pinned, with the parameters used, by
tests/engine/test_vllm_seam.py, so a vLLM upgrade that moves one fails in CI.
Each patch is idempotent (a class attribute marks it installed).

What a user of a real KV connector must know: vLLM 0.32 has no extension field
on `EngineCoreOutput`, so the engine core carries each request's steering
report to the frontend in `kv_transfer_params` (`patch_scheduler_reports`),
and the frontend takes it off again before the response is built
(`patch_output_processor`). A KV connector that sets its own
`kv_transfer_params` for a request keeps them; the report is added beside its
keys under `adaras_report` (a key of that name of its own would be taken for
a report) and removed before vLLM's response code sees them.
"""

from __future__ import annotations

import os

from adaras.engine.seam.compile_cache import (  # noqa: F401 - the package's patches
    VEC_ISA_FILE,
    patch_compile_cache,
    per_cpu_cache_root,
    remember_successes,
)
from adaras.engine.seam.cpu_platform import patch_cpu_generator_rewind  # noqa: F401


def patch_input_processor() -> None:
    """InputProcessor.__init__ and .process_inputs (frontend, every request).

    Replaces: nothing of vLLM's work; both call the original first or around.
    Why: vLLM has no per-request hook between parsing SamplingParams and
    scheduling. Here a bad `steering` or `adaras_capture` object is refused
    with a ValueError naming the field (the API's 400) before the engine
    sees it; in the HTTP server, steering and internal fields that the server
    did not admit are refused too (`reports.MAILBOX.check_admitted`: a client
    cannot reach the engine's steering by another route or through
    `vllm_xargs`), and admitted requests skip the name check (the server's
    profile registry resolved the name); steered requests carry a prefix-cache salt in extra_args (the
    engine core salts the blocks they may steer: `patch_prefix_cache`);
    capture requests skip reading the prefix cache so every prompt token runs
    through the MLPs. __init__ records the profiles the workers hold
    (ADARAS_PROFILES), for the name check.
    """
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from adaras.engine import (
        admission,  # looked up per call: tests replace admission.steering_salt
        reports,
    )
    from adaras.engine.config import (
        CAPTURE_KEY,
        PROFILES_ENV,
        SALT_KEY,
        parse_capture,
        parse_profiles_env,
    )
    from adaras.steering import STEERING_KEY, steering_from_extra_args

    if getattr(InputProcessor, "_adaras", False):
        return

    orig_init = InputProcessor.__init__
    orig_process = InputProcessor.process_inputs

    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        names = set(parse_profiles_env(os.environ.get(PROFILES_ENV)))
        self._adaras_profiles = names or None

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        steering = capture = None
        if isinstance(params, SamplingParams) and params.extra_args:
            reports.MAILBOX.check_admitted(params.extra_args)  # raises ValueError
            if STEERING_KEY in params.extra_args:
                steering = steering_from_extra_args(params.extra_args)  # raises ValueError
                if reports.ADMISSION_KEY not in params.extra_args:
                    admission.check_profile_name(self, steering)
            capture = parse_capture(params.extra_args.get(CAPTURE_KEY))  # raises ValueError
        request = orig_process(self, request_id, prompt, params, *args, **kwargs)
        if capture is not None:  # every prompt token must run through the MLPs
            request.sampling_params.skip_reading_prefix_cache = True
        if steering is not None and steering.active:
            salt = admission.steering_salt(request.sampling_params.extra_args)
            if salt is not None:
                request.sampling_params.extra_args = {**request.sampling_params.extra_args,
                                                      SALT_KEY: salt}
        return request

    InputProcessor.__init__ = __init__
    InputProcessor.process_inputs = process_inputs
    InputProcessor._adaras = True


def patch_prefix_cache() -> None:
    """The engine core's prefix cache: block hashing, cache lookup, scheduling.

    kv_cache_utils.generate_block_hash_extra_keys (wrapped, and rebound where
    vLLM imported it by name): a steered request's salt (extra_args, from the
    frontend) and its first steered position (`admission.first_steered_position`)
    go into the hash of every block that holds a position it may steer. Why:
    vLLM's own `cache_salt` changes the hash of block 0 and so of every block
    after it; steering only changes the KV of the positions it steers, so the
    blocks before them stay shareable with every other request.

    KVCacheManager.get_computed_blocks (wrapped): an adaptive request's hit
    is cut to the leading blocks whose predictor states its worker holds
    (`prefix_states`), and its prompt block hashes go to the worker in
    extra_args; no hit for a request without its profile's version, or one
    that was preempted (its worker recomputes from token 0, skipping what it
    already pooled).

    Scheduler.schedule (wrapped): after vLLM has scheduled a step, record the
    prompt blocks each adaptive request completes in it: the blocks its
    worker stores states for in that step.
    """
    import sys

    import vllm.v1.core.kv_cache_utils as kv_cache_utils
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    from adaras.engine import admission, prefix_states
    from adaras.engine.config import SALT_KEY
    from adaras.steering import FINGERPRINT_KEY, STEERING_KEY, steering_from_extra_args

    if getattr(KVCacheManager, "_adaras", False):
        return
    orig_extra_keys = kv_cache_utils.generate_block_hash_extra_keys
    orig_computed = KVCacheManager.get_computed_blocks
    orig_schedule = Scheduler.schedule

    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm = orig_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx)
        params = request.sampling_params
        extra = params.extra_args if params is not None else None
        if extra and SALT_KEY in extra:
            first = admission.first_steered_position(steering_from_extra_args(extra), extra,
                                                  request.num_prompt_tokens)
            if end_token_idx > first:  # the key names which positions of the block are steered
                keys = (*(keys or ()), ("adaras", extra[SALT_KEY], first))
        return keys, next_mm

    def get_computed_blocks(self, request):
        params = request.sampling_params
        extra = params.extra_args if params is not None else None
        if not extra or STEERING_KEY not in extra:
            return orig_computed(self, request)
        if steering_from_extra_args(extra).mode != "adaptive":
            return orig_computed(self, request)
        version = extra.get(FINGERPRINT_KEY)
        if not version or request.num_preemptions or \
                not self.prefix_cache_lookup_enabled(request):
            return self.empty_kv_cache_blocks, 0, 0
        size = self.coordinator.block_pool.hash_block_size
        if prefix_states.BLOCKS_KEY not in extra:  # what the worker stores states under
            params.extra_args = {**extra, prefix_states.BLOCKS_KEY: [
                size, list(request.block_hashes[: request.num_prompt_tokens // size])]}
        usable = prefix_states.scheduler_index().leading(request.block_hashes, version)
        if usable == 0:
            return self.empty_kv_cache_blocks, 0, 0
        return orig_computed(self, _LeadingBlocks(request, usable))

    def schedule(self, *args, **kwargs):
        output = orig_schedule(self, *args, **kwargs)
        for req_id, n in output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            params = request.sampling_params if request is not None else None
            extra = params.extra_args if params is not None else None
            if not extra or prefix_states.BLOCKS_KEY not in extra or request.num_preemptions:
                continue
            after = min(request.num_computed_tokens, request.num_prompt_tokens)
            before = request.num_computed_tokens - n
            if before < after:
                blocks = prefix_states.prompt_blocks(extra, extra.get(FINGERPRINT_KEY, ""))
                prefix_states.scheduler_index().record(blocks, before, after)
        return output

    # Modules imported later bind the wrapped function from kv_cache_utils;
    # those already imported (block_pool, by kv_cache_manager) are rebound.
    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("vllm.") and \
                vars(module).get("generate_block_hash_extra_keys") is orig_extra_keys:
            module.generate_block_hash_extra_keys = generate_block_hash_extra_keys
    KVCacheManager.get_computed_blocks = get_computed_blocks
    Scheduler.schedule = schedule
    KVCacheManager._adaras = True


class _LeadingBlocks:
    """A request seen through its first `n` block hashes (the prefix-cache
    lookup reads `block_hashes`; everything else is the request's)."""

    def __init__(self, request, n: int):
        self._request = request
        self.block_hashes = request.block_hashes[:n]

    def __getattr__(self, name):
        return getattr(self._request, name)


def patch_scheduler_reports() -> None:
    """Scheduler.update_from_output (engine core), wrapped.

    Why: a report the worker posted (`reports.OUTPUT_ATTR` on the step's
    ModelRunnerOutput) must reach the frontend with the request's outputs;
    EngineCoreOutput's only free-form field is `kv_transfer_params`, so the
    report rides there under `reports.REPORT_KEY` on the request's next
    output, and the frontend (`patch_output_processor`) takes it out before
    vLLM reads the field. Reports of requests that end without another output
    are dropped with them (`reports.carry`): nothing accumulates.
    """
    from vllm.v1.core.sched.scheduler import Scheduler

    from adaras.engine import reports

    if getattr(Scheduler, "_adaras_reports", False):
        return
    orig_update = Scheduler.update_from_output

    def update_from_output(self, scheduler_output, model_runner_output):
        result = orig_update(self, scheduler_output, model_runner_output)
        pending = self.__dict__.setdefault("_adaras_pending_reports", {})
        posted = getattr(model_runner_output, reports.OUTPUT_ATTR, None)
        if posted or pending:
            outputs = [o for eco in result.values() for o in eco.outputs]
            reports.carry(pending, posted, outputs, self.requests)
        return result

    Scheduler.update_from_output = update_from_output
    Scheduler._adaras_reports = True


def patch_output_processor() -> None:
    """OutputProcessor.process_outputs and RequestState._new_completion_output
    (the frontend process: the HTTP server, or the offline LLM).

    process_outputs (wrapped): before vLLM processes a step's outputs, take
        each steering report out of `kv_transfer_params` (vLLM would return
        the field to clients), keep it on the request's state and hand it to
        the HTTP server's open request (`reports.MAILBOX`), by the
        server-made id vLLM named the request after.
    _new_completion_output (wrapped): each CompletionOutput carries its
        request's latest report as `.steering` (None when it has none), which
        the offline API reads.
    """
    from vllm.v1.engine.output_processor import OutputProcessor, RequestState

    from adaras.engine import reports

    if getattr(OutputProcessor, "_adaras", False):
        return
    orig_process = OutputProcessor.process_outputs
    orig_completion = RequestState._new_completion_output

    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        for out in engine_core_outputs:
            if out.kv_transfer_params is None:
                continue
            report = reports.take_report(out)
            state = self.request_states.get(out.request_id) if report is not None else None
            if state is None:
                continue
            state.adaras_report = report
            parent = state.parent_req
            external = parent.external_req_id if parent is not None else state.external_req_id
            reports.MAILBOX.deliver(external, state.request_index, report)
        return orig_process(self, engine_core_outputs, *args, **kwargs)

    def _new_completion_output(self, *args, **kwargs):
        completion = orig_completion(self, *args, **kwargs)
        completion.steering = getattr(self, "adaras_report", None)
        return completion

    OutputProcessor.process_outputs = process_outputs
    RequestState._new_completion_output = _new_completion_output
    OutputProcessor._adaras = True


def patch_model_runner() -> None:
    """GPUModelRunner (the V1 runner, which vLLM-CPU subclasses) and the
    worker wrapper, in every worker.

    _prepare_inputs (wrapped): after vLLM has laid out the step's batch, build
        the steering context (per-token slot index, plans, predictor rows).
        Why: the steered MLPs need per-token slots for exactly the batch vLLM
        just built; this is where LoRA computes its own mapping too.
    execute_model (wrapped): after the forward, feed the predictors and
        captures (`end_step`), even when the forward raised.
    sample_tokens (wrapped): the step's ModelRunnerOutput carries the reports
        the runtime posted in the step (`reports.OUTPUT_ATTR`, a plain
        attribute: the output is pickled to the engine core as it is). Why:
        vLLM has no per-request side channel from worker to scheduler; the
        output is the one message every step sends anyway.
    _on_request_state_removed (wrapped): vLLM's own hook for request-scoped
        side state; it releases ours for every finished or aborted request.
    WorkerWrapperBase.adaras_rpc (added): the runtime's operations, reached
        with vLLM's `collective_rpc` (load/unload profiles, reports, stats).
    """
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from adaras.engine import reports, runtime

    if getattr(GPUModelRunner, "_adaras", False):
        return
    orig_prepare = GPUModelRunner._prepare_inputs
    orig_execute = GPUModelRunner.execute_model
    orig_sample = GPUModelRunner.sample_tokens
    orig_removed = GPUModelRunner._on_request_state_removed

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = orig_prepare(self, scheduler_output, num_scheduled_tokens)
        batch = self.input_batch
        n = batch.num_reqs
        runtime.get_runtime(self).begin_step(
            batch.req_ids[:n],
            batch.req_id_to_index,
            num_scheduled_tokens,
            batch.num_computed_tokens_cpu[:n],
            batch.num_prompt_tokens[:n],
            [(r.req_id, r.sampling_params) for r in scheduler_output.scheduled_new_reqs],
        )
        return out

    def execute_model(self, scheduler_output, *args, **kwargs):
        try:
            return orig_execute(self, scheduler_output, *args, **kwargs)
        finally:
            rt = runtime.get_runtime(self, create=False)
            if rt is not None:
                rt.end_step()

    def sample_tokens(self, *args, **kwargs):
        output = orig_sample(self, *args, **kwargs)
        rt = runtime.get_runtime(self, create=False)
        if rt is None or not len(rt.outbox):
            return output
        # async scheduling wraps the output it will return (GPU)
        target = getattr(output, "_model_runner_output", output)
        if isinstance(target, ModelRunnerOutput) and target is not EMPTY_MODEL_RUNNER_OUTPUT:
            setattr(target, reports.OUTPUT_ATTR, rt.take_reports())
        return output

    def _on_request_state_removed(self, req_id, req_state):
        # vLLM's hook for request-scoped side caches: called from
        # _update_states for every finished or aborted request, on every step,
        # including the empty step that carries the last ids before idling.
        orig_removed(self, req_id, req_state)
        rt = runtime.get_runtime(self, create=False)
        if rt is not None:
            rt.release(req_id)

    def adaras_rpc(self, op: str, *args):
        rt = runtime.get_runtime(self.worker.model_runner)
        return getattr(rt, op)(*args)

    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.execute_model = execute_model
    GPUModelRunner.sample_tokens = sample_tokens
    GPUModelRunner._on_request_state_removed = _on_request_state_removed
    GPUModelRunner._adaras = True
    WorkerWrapperBase.adaras_rpc = adaras_rpc


def patch_openai_requests() -> None:
    """ChatCompletionRequest/CompletionRequest.to_sampling_params (the HTTP
    server's frontend process).

    Replaces: nothing; wraps the original. Why: vLLM's OpenAI request models
    keep unknown body fields (`extra="allow"`) but drop them when building
    SamplingParams. The steering middleware leaves the resolved `steering`
    object, the profile's fingerprint, (always) its steered prompt positions
    and the request's admission key in the body; this carries them into
    `SamplingParams.extra_args`, where the plugin reads them (and
    `patch_input_processor` checks that the server admitted exactly them).
    """
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from adaras.engine.reports import ADMISSION_KEY
    from adaras.steering import FINGERPRINT_KEY, PROMPT_POSITIONS_KEY, STEERING_KEY

    for cls in (ChatCompletionRequest, CompletionRequest):
        if getattr(cls, "_adaras_hooked", False):
            continue
        orig = cls.to_sampling_params

        def to_sampling_params(self, *args, _orig=orig, **kwargs):
            params = _orig(self, *args, **kwargs)
            extra = self.model_extra or {}
            if STEERING_KEY in extra:
                params.extra_args = dict(params.extra_args or {})
                params.extra_args[STEERING_KEY] = extra[STEERING_KEY]
                params.extra_args[FINGERPRINT_KEY] = extra.get(FINGERPRINT_KEY, "")
                for key in (PROMPT_POSITIONS_KEY, ADMISSION_KEY):
                    if key in extra:
                        params.extra_args[key] = extra[key]
            return params

        cls.to_sampling_params = to_sampling_params
        cls._adaras_hooked = True
