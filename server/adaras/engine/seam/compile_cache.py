"""vLLM's compile cache, where the steered engine meets it: the steered
backbone's own compile key (a renamed class, so it never shares stock
vLLM's graph), loading a compiled graph without running it (vLLM's private
`_try_load_aot_compiled_fn` and its artifact path, computed as vLLM does),
and the fixes that let a restart load its graphs instead of compiling
(`patch_compile_cache`). Every vLLM and torch internal used here is pinned by
tests/engine/test_vllm_seam.py.
"""

from __future__ import annotations

import json
import os
import types

from torch import nn

VEC_ISA_FILE = "adaras_vec_isa.json"  # in vLLM's torch_compile_cache directory


def renamed(base: type, name: str) -> type:
    """A subclass of `base` named `name` whose `forward` is base.forward's code
    under the qualified name `name.forward`. vLLM keys its AOT compile cache by
    the forward's qualified name and Dynamo its compiled code by the code
    object, so the subclass's graph shares no compiled artifact with base's."""
    stock = base.forward
    code = stock.__code__
    code = code.replace(co_qualname=f"{name}.forward") if hasattr(code, "co_qualname") \
        else code.replace(co_name=code.co_name)
    forward = types.FunctionType(code, stock.__globals__, "forward", stock.__defaults__,
                                 stock.__closure__)
    forward.__kwdefaults__ = stock.__kwdefaults__
    forward.__qualname__ = f"{name}.forward"
    forward.__annotations__ = stock.__annotations__
    # the module name the classes had before they moved here: compile-cache keys unchanged
    return type(name, (base,), {"forward": forward, "__module__": "adaras.engine.models",
                                "__qualname__": name})


def own_compile_key(model: nn.Module) -> None:
    """Give the steered backbone (a stock backbone instance with wrapped MLPs)
    a class of its own (`renamed`), so its compiled graph, which calls the
    op, never shares vLLM's compile-cache entry with stock vLLM's graph of
    the same model and configuration, which does not: a steered engine
    would otherwise load stock's graph and never steer."""
    if getattr(model, "do_not_compile", True):
        return
    model.__class__ = renamed(type(model), f"AdarasSteered{type(model).__name__}")


def aot_artifact(module: nn.Module) -> tuple[str, str] | None:
    """(cache directory, artifact path) where vLLM's compile decorator keeps
    `module`'s AOT-compiled graph, computed as its `__call__` computes them;
    None when vLLM does not use AOT artifacts."""
    import hashlib

    from vllm import envs
    from vllm.compilation.caching import aot_compile_hash_factors
    from vllm.compilation.decorators import _model_hash_key

    if not envs.VLLM_USE_AOT_COMPILE or envs.VLLM_DISABLE_COMPILE_CACHE:
        return None
    factors = aot_compile_hash_factors(module.vllm_config)
    factors.append(_model_hash_key(module.forward))
    root = os.path.join(envs.VLLM_CACHE_ROOT, "torch_compile_cache", "torch_aot_compile",
                        hashlib.sha256(str(factors).encode()).hexdigest())
    parallel = module.vllm_config.parallel_config
    return root, os.path.join(root, f"rank_{parallel.rank}_{parallel.data_parallel_index}",
                              "model")


def load_compiled(module: nn.Module) -> bool:
    """Load `module`'s compiled graph from vLLM's compile cache without
    running it, as its compile decorator does on a first call that finds the
    artifact (then its calls run the loaded graph); False when there is none
    or it does not load (the caller compiles it by running it)."""
    from vllm.compilation import decorators

    found = aot_artifact(module)
    if found is None or not os.path.isfile(found[1]):
        return False
    root, path = found
    module.compilation_config.local_cache_dir = root
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor_cache")
    loaded = decorators._try_load_aot_compiled_fn(module, path)
    if loaded is None:
        return False
    module.aot_compiled_fn = loaded
    module.was_aot_compile_fn_loaded_from_disk = True
    return True


def patch_compile_cache() -> None:
    """Two fixes that let a restart reuse vLLM's compile cache (workers).

    1. `BundledAOTAutogradSerializableCallable.finalize_loading` (torch),
       added as a no-op. vLLM 0.32 saves every compiled graph as an AOT
       artifact and, on the next start, `_try_load_aot_compiled_fn` loads it
       and calls `compiled_fn.finalize_loading(vllm_config)`, a method of its
       own backend's `VllmSerializableFunction`. vLLM-CPU compiles with mode
       DYNAMO_TRACE_ONCE and backend "inductor", so the loaded function is
       torch's bundled callable, which its `deserialize` has already loaded
       in full; the call fails ("Compiling model again due to a load failure
       ... 'function' object has no attribute 'finalize_loading'") and every
       start of vLLM-CPU, stock included, compiles again.
    2. `VecISA.check_build` (torch Inductor) remembers its successes.
       Before Inductor generates or loads a C++ kernel in a process, it
       checks each vector ISA the CPU advertises (AVX2, AVX512, ...) by
       building a test library and dlopen-ing it in a fresh Python process,
       and keeps the answer for that process only: about 40 s of every start
       on a 2-core machine, loading a cached graph included. A probe that
       passed is recorded in `VEC_ISA_FILE` under the ISA, its flags, the
       test code, torch's version and the compiler binary, and is not run
       again; a probe that failed is not recorded (it may have timed out
       under load), so it runs again next time.

    A loaded artifact is machine code for the CPU it was compiled on, and
    vLLM's cache key does not say which, so a cache shared by machines of
    different kinds (a k8s volume, a copied home directory) would hand AVX-512
    kernels to a CPU without them: `per_cpu_cache_root` gives each CPU kind
    its own directory under VLLM_CACHE_ROOT.
    """
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    from torch._inductor import cpu_vec_isa

    per_cpu_cache_root()
    if not hasattr(BundledAOTAutogradSerializableCallable, "finalize_loading"):
        def finalize_loading(self, vllm_config) -> None:
            return None  # deserialize() has loaded everything

        BundledAOTAutogradSerializableCallable.finalize_loading = finalize_loading

    if getattr(cpu_vec_isa.VecISA, "_adaras_cached", False):
        return
    cpu_vec_isa.VecISA.check_build = remember_successes(cpu_vec_isa.VecISA.check_build)
    cpu_vec_isa.VecISA._adaras_cached = True


def per_cpu_cache_root() -> str:
    """Point VLLM_CACHE_ROOT at `<root>/cpu-<key>`, the key naming the
    machine and the vector ISAs Inductor may generate code for (read from
    the CPU's flags, no probe). Idempotent, and inherited by the processes
    vLLM spawns; returns the directory."""
    import hashlib
    import platform

    from torch._inductor.cpu_vec_isa import x86_isa_checker
    from vllm import envs

    isas = sorted(x86_isa_checker()) if platform.machine() in ("x86_64", "AMD64") else []
    key = hashlib.sha256(" ".join([platform.machine(), *isas]).encode()).hexdigest()[:12]
    root = os.path.normpath(envs.VLLM_CACHE_ROOT)
    if os.path.basename(root) != f"cpu-{key}":
        root = os.path.join(root, f"cpu-{key}")
        os.environ["VLLM_CACHE_ROOT"] = root
    return root


def remember_successes(check):
    """`check(isa, code) -> bool`, answered from `vec_isa_file()` where it
    once returned True for the same key."""

    def check_build(self, code: str) -> bool:
        key, path = vec_isa_key(self, code), vec_isa_file()
        if key is not None and read_json(path).get(key) is True:
            return True
        ok = check(self, code)
        if ok and key is not None:
            write_json(path, {**read_json(path), key: True})
        return ok

    return check_build


def vec_isa_file() -> str:
    from vllm import envs

    return os.path.join(envs.VLLM_CACHE_ROOT, "torch_compile_cache", VEC_ISA_FILE)


def vec_isa_key(isa, code: str) -> str | None:
    """What a vector-ISA probe's answer depends on; None when the compiler
    cannot be identified (then the probe runs, as torch would run it)."""
    import hashlib
    import platform
    import shutil

    import torch
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        compiler = os.path.realpath(shutil.which(get_cpp_compiler()) or get_cpp_compiler())
        stat = os.stat(compiler)
    except (OSError, RuntimeError, TypeError):
        return None
    parts = [str(isa), isa.build_arch_flags(), code, torch.__version__, platform.machine(),
             compiler, str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def read_json(path: str) -> dict:

    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: str, data: dict) -> None:
    """Atomic, and silent where the cache is not writable (the probe then runs again)."""
    import tempfile

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass


