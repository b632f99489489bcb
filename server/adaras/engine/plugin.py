"""The vLLM general plugin (`vllm.general_plugins` entry point `adaras`).

vLLM calls `register()` in every process it starts (frontend, engine core,
workers). It is cheap and idempotent, and `ADARAS_PLUGIN=0` turns it off, in
which case vLLM runs stock.

What it installs:
  * model classes: Qwen3/Qwen2/LlamaForCausalLM resolve to the steered
    subclasses in `adaras.engine.models` (lazy "module:Class" strings);
  * the patches in `adaras.engine.seam` (frontend validation, prefix-cache
    salt and routing; the runner's per-step steering context and release;
    `adaras_rpc` for `collective_rpc`; a vLLM-CPU fix for seeded chunked
    prefill). What they decide with (the salt, the first steered position,
    the profile name check) is in `adaras.engine.admission`, below both.

It refuses to load (UnsupportedVllm) where steering would silently do nothing:
a vLLM outside the tested range, or Model Runner V2. Pipeline parallelism and
CUDA graphs are refused by the steered model classes (`models.check_supported`).
"""

from __future__ import annotations

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

    from adaras.engine import seam

    for arch, cls in ARCHS.items():
        ModelRegistry.register_model(arch, cls)
    seam.patch_input_processor()
    seam.patch_output_processor()
    seam.patch_prefix_cache()
    seam.patch_scheduler_reports()
    seam.patch_model_runner()
    seam.patch_cpu_generator_rewind()
    seam.patch_compile_cache()
