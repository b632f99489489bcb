"""Engine glue: how the HTTP layer talks to vLLM's engine and request models.

* The middleware leaves the resolved `steering` object (and the profile's
  fingerprint, for the prefix-cache salt) in the JSON body;
  `adaras.engine.seam.patch_openai_requests` carries them into
  `SamplingParams.extra_args`, where the engine plugin reads them.
* `engine_rpc` calls the worker runtime through `collective_rpc`.
* `probe_steering` checks at start-up that the steering op runs.
* `compile_cache_note` and `compiled_graphs_note` say in the log whether a
  start compiles or loads its graphs.
"""

from __future__ import annotations

from typing import Any

from adaras.steering import Resolved

PROBE_TIMEOUT_S = 120.0


async def engine_rpc(engine, op: str, *args: Any) -> Any:
    """`SteeringRuntime.<op>(*args)` on every worker; rank 0's answer."""
    results = await engine.collective_rpc("adaras_rpc", args=(op, *args))
    return results[0]


def plugin_off_reason() -> str | None:
    """Why the engine has no steering runtime, judged in the frontend (the engine
    processes inherit its environment). An RPC to a worker without the plugin
    would kill the engine, so nothing may call one then."""
    from adaras.engine import plugin

    if plugin.enabled():
        return None
    return (f"the steering plugin is off ({plugin.PLUGIN_ENV}=0 in the server's environment), "
            "so the engine runs stock vLLM")


async def probe_steering(engine, registry, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Send one steered request through the engine and check that the steering
    op ran. Returns why steering does not work, or None when it does.

    With a profile loaded the probe steers its decode step (`always`);
    without one it captures activations, which runs through the same hooks.
    Any failure, or no answer within `timeout_s`, is a reason, never a crash."""
    import asyncio
    import uuid

    from vllm import SamplingParams

    from adaras.engine.config import CAPTURE_KEY

    name = registry.default
    if name is not None:
        extra = Resolved("always", name, 1.0, version=registry.entries[name].version).extra_args()
    else:
        extra = {CAPTURE_KEY: {"mean_from": 0}}
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, extra_args=extra)
    request_id = f"adaras-probe-{uuid.uuid4().hex}"

    async def run() -> tuple[int, int]:
        before = (await engine_rpc(engine, "stats"))["hooked_layers"]
        async for _ in engine.generate({"prompt_token_ids": [1, 2, 3, 4]}, params, request_id):
            pass
        after = (await engine_rpc(engine, "stats"))["hooked_layers"]
        await engine_rpc(engine, "pop_captures", [request_id])
        return before, after

    try:
        before, after = await asyncio.wait_for(run(), timeout_s)
    except asyncio.TimeoutError:
        await engine.abort(request_id)
        return f"the steered probe request got no answer within {timeout_s:.0f} s"
    except Exception as e:  # noqa: BLE001 - any failure is a reason to refuse steering
        return f"the steered probe request failed: {type(e).__name__}: {e}"
    if after > before:
        return None
    arch = ",".join(engine.model_config.hf_config.architectures or ["?"])
    return (f"a steered probe request did not reach the steering op ({arch}): the model class "
            "is not one of the steered ones (Qwen3, Qwen2, Llama) or vLLM bypassed the "
            "plugin's runner hook")


def stored_graphs() -> int:
    """Compiled graphs in the compile cache (the per-CPU directory,
    seam.per_cpu_cache_root), of any model and configuration."""
    import os

    from vllm import envs

    aot = os.path.join(envs.VLLM_CACHE_ROOT, "torch_compile_cache", "torch_aot_compile")
    return sum(1 for _, _, files in os.walk(aot) for f in files if f == "model") \
        if os.path.isdir(aot) else 0


def starting_phase(graphs: int) -> str:
    """What the engine's start does, for /health while it starts (api.starting)."""
    if graphs:
        return ("starting the engine: loading the model and its compiled graphs from the "
                "compile cache")
    return ("starting the engine: compiling the model's graphs (the compile cache is "
            "empty; minutes on a few cores, once)")


def compile_cache_note() -> str:
    """Before the engine starts: where its compile cache is and whether it
    holds any compiled graph (the per-CPU directory, seam.per_cpu_cache_root)."""
    from vllm import envs

    graphs = stored_graphs()
    if graphs:
        return (f"compile cache {envs.VLLM_CACHE_ROOT}: {graphs} compiled graph(s) stored; "
                "graphs of this model and configuration load instead of compiling")
    return (f"compile cache {envs.VLLM_CACHE_ROOT} is empty: this start compiles the model's "
            "graphs (minutes on a few cores) and stores them; later starts load them")


def compiled_graphs_note(stats: dict) -> str:
    """After the engine started: what its workers did (SteeringRuntime.stats)."""
    loaded, compiled = stats.get("graphs_loaded", 0), stats.get("graphs_compiled", 0)
    if loaded + compiled == 0:
        return "no compiled graph (eager mode)"
    return f"{loaded} compiled graph(s) loaded from the compile cache, {compiled} compiled"
