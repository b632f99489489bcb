"""Every place AdaRAS patches vLLM, in one module.

vLLM's extension points carry most of the plugin: the `vllm.general_plugins`
entry point (`plugin.register`), registered model classes (`models.py`),
`SamplingParams.extra_args`, `collective_rpc`, and the runner's
`_on_request_state_removed` hook. What they cannot reach is patched here,
each patch saying what it replaces and why:

    patch_input_processor       frontend: validate, salt and route each request
    patch_model_runner          workers: per-step steering context, release, RPC
    patch_cpu_generator_rewind  workers: vLLM-CPU crash fix (seeded chunked prefill)
    patch_openai_requests       HTTP server: carry `steering` into extra_args

Every vLLM symbol these touch is pinned, with the parameters used, by
tests/engine/test_vllm_seam.py, so a vLLM upgrade that moves one fails in CI.
Each patch is idempotent (a class attribute marks it installed).
"""

from __future__ import annotations

import os


def patch_input_processor() -> None:
    """InputProcessor.__init__ and .process_inputs (frontend, every request).

    Replaces: nothing of vLLM's work; both call the original first or around.
    Why: vLLM has no per-request hook between parsing SamplingParams and
    scheduling. Here a bad `steering` or `adaras_capture` object is refused
    with a ValueError naming the field (the API's 400) before the engine
    sees it; steered requests get a prefix-cache salt (their KV is never
    served to other requests); adaptive and capture requests skip reading
    the prefix cache so every prompt token runs through the MLPs. __init__
    records the profiles the workers hold (ADARAS_PROFILES), for the name check.
    """
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from adaras.engine import plugin  # looked up per call: tests replace plugin.steering_salt
    from adaras.engine.config import CAPTURE_KEY, PROFILES_ENV, parse_capture, parse_profiles_env
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
            if STEERING_KEY in params.extra_args:
                steering = steering_from_extra_args(params.extra_args)  # raises ValueError
                plugin.check_profile_name(self, steering)
            capture = parse_capture(params.extra_args.get(CAPTURE_KEY))  # raises ValueError
        request = orig_process(self, request_id, prompt, params, *args, **kwargs)
        if capture is not None:  # every prompt token must run through the MLPs
            request.sampling_params.skip_reading_prefix_cache = True
        if steering is not None and steering.active:
            salt = plugin.steering_salt(request.sampling_params.extra_args)
            request.cache_salt = salt if not request.cache_salt else f"{request.cache_salt}|{salt}"
            if steering.mode == "adaptive":
                request.sampling_params.skip_reading_prefix_cache = True
        return request

    InputProcessor.__init__ = __init__
    InputProcessor.process_inputs = process_inputs
    InputProcessor._adaras = True


def patch_model_runner() -> None:
    """GPUModelRunner (the V1 runner, which vLLM-CPU subclasses) and the
    worker wrapper, in every worker.

    _prepare_inputs (wrapped): after vLLM has laid out the step's batch, build
        the steering context (per-token slot index, plans, predictor rows).
        Why: the steered MLPs need per-token slots for exactly the batch vLLM
        just built; this is where LoRA computes its own mapping too.
    execute_model (wrapped): after the forward, feed the predictors and
        captures (`end_step`), even when the forward raised.
    _on_request_state_removed (wrapped): vLLM's own hook for request-scoped
        side state; it releases ours for every finished or aborted request.
    WorkerWrapperBase.adaras_rpc (added): the runtime's operations, reached
        with vLLM's `collective_rpc` (load/unload profiles, reports, stats).
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from adaras.engine import runtime

    if getattr(GPUModelRunner, "_adaras", False):
        return
    orig_prepare = GPUModelRunner._prepare_inputs
    orig_execute = GPUModelRunner.execute_model
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
    GPUModelRunner._on_request_state_removed = _on_request_state_removed
    GPUModelRunner._adaras = True
    WorkerWrapperBase.adaras_rpc = adaras_rpc


def patch_cpu_generator_rewind() -> None:
    """GPUModelRunner._prepare_inputs and ._bookkeeping_sync (workers), a fix
    for vLLM-CPU 0.32 independent of steering.

    vLLM samples a token after every prefill chunk, discards it for a partial
    prompt, and undoes the draw of a seeded request's generator with
    `generator.set_offset(...)` in `_bookkeeping_sync`. CPU generators have no
    offset ("CPU Generator does not use offset"), so stock vLLM-CPU dies on the
    first seeded request with a chunked prompt (the same bug as
    RBLN-SW/vllm-rbln#1025). For CPU generators this saves the state before
    sampling and restores it instead of the rewind.
    """
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_adaras_generator_fix", False):
        return
    orig_prepare = GPUModelRunner._prepare_inputs
    orig_bookkeeping = GPUModelRunner._bookkeeping_sync

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = orig_prepare(self, scheduler_output, num_scheduled_tokens)
        batch = self.input_batch
        if batch.generators:  # the draws of discarded (partial-prefill) samples
            n = batch.num_reqs
            self._adaras_gen_states = {
                int(i): g.get_state() for i in np.flatnonzero(self.discard_request_mask.np[:n])
                if (g := batch.generators.get(int(i))) is not None and g.device.type == "cpu"}
        return out

    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, "_adaras_gen_states", None) or {}
        self._adaras_gen_states = None
        gens = self.input_batch.generators
        held = {i: gens.pop(i) for i in saved if i in gens}  # hidden from set_offset()
        try:
            return orig_bookkeeping(self, *args, **kwargs)
        finally:
            for i, g in held.items():
                g.set_state(saved[i])
                gens[i] = g

    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync
    GPUModelRunner._adaras_generator_fix = True


def patch_openai_requests() -> None:
    """ChatCompletionRequest/CompletionRequest.to_sampling_params (the HTTP
    server's frontend process).

    Replaces: nothing; wraps the original. Why: vLLM's OpenAI request models
    keep unknown body fields (`extra="allow"`) but drop them when building
    SamplingParams. The steering middleware leaves the resolved `steering`
    object and the profile's fingerprint in the body; this carries them into
    `SamplingParams.extra_args`, where the plugin reads them.
    """
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from adaras.steering import FINGERPRINT_KEY, STEERING_KEY

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
            return params

        cls.to_sampling_params = to_sampling_params
        cls._adaras_hooked = True
