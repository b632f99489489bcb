"""`adaras serve --prepare-only`: build the engine as `adaras serve` would,
let it compile its graphs into vLLM's compile cache (or load them from it), say
what it did, and exit without serving.

`make install` runs it for the default model, so the first `make serve` loads
the two compiled graphs (the steered backbone and its plain twin) instead of
compiling them. A compiled graph loads only when the engine's configuration
hashes to the one it was compiled under, so the engine here is built from the
very arguments `adaras.api.app.serve` builds (`app.engine_args`: our defaults,
then the flags passed after `--`, the KV cache sized), in the same environment.
Nothing binds a port. `tests/api/test_readme_serve.py` checks that a later
plain `adaras serve` on the same cache compiles nothing.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

from adaras.api.settings import Settings


@dataclass(frozen=True)
class Prepared:
    model: str
    cache: str  # vLLM's compile cache (the per-CPU directory)
    seconds: float
    graphs_compiled: int | None  # None: the plugin is off, the worker cannot be asked
    graphs_loaded: int | None

    def summary(self) -> str:
        head = f"adaras serve --prepare-only: {self.model}: engine built in {self.seconds:.1f} s"
        if self.graphs_compiled is None:
            return f"{head}; the steering plugin is off, so the graphs were not counted"
        if self.graphs_compiled + self.graphs_loaded == 0:
            return f"{head}; no compiled graph (eager mode), nothing to prepare"
        done = (f"{self.graphs_compiled} graph(s) compiled and stored, "
                f"{self.graphs_loaded} loaded")
        then = ("a later `adaras serve` with the same settings and engine flags loads them"
                if self.graphs_compiled else "the compile cache was already warm")
        return f"{head}; {done} (compile cache {self.cache}); {then}"


async def prepare(settings: Settings, passthrough: list[str]) -> Prepared:
    """Start the engine `adaras serve` would start, read how it got its
    graphs, shut it down. Raises KvCacheTooSmall as serving would."""
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

    from adaras.api import glue
    from adaras.api.app import engine_args

    t0 = time.monotonic()
    args = engine_args(settings, passthrough)  # exactly what `adaras serve` starts
    stats: dict | None = None
    async with build_async_engine_client(args) as engine:
        if glue.plugin_off_reason() is None:  # an RPC to a worker without it kills the engine
            stats = await glue.engine_rpc(engine, "stats")
    # Shut down above; collected now, not at interpreter exit, where its __del__ fails.
    del engine
    gc.collect()
    return Prepared(
        model=settings.model_name, cache=envs.VLLM_CACHE_ROOT,
        seconds=time.monotonic() - t0,
        graphs_compiled=None if stats is None else stats.get("graphs_compiled", 0),
        graphs_loaded=None if stats is None else stats.get("graphs_loaded", 0))
