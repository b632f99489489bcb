"""Engine configuration that depends on the machine: the dtype the engine
serves in. On an x86 CPU, vLLM's "auto" dtype serves a bf16 or float32 model in
bf16, and a CPU without native bf16 emulates it: on a 2-core AVX2 EPYC,
SmolLM2-135M decoded 45 tok/s in bf16 and 189 in float32, Qwen2.5-Coder-1.5B
4.1 and 20.5 (benchmarks/bench_dtype.py, docs/benchmarks/bench_dtype_*). There
`adaras serve` runs float32 unless the user chose a dtype or a quantization
(which may not allow float32).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from adaras.engine.seam.cpu_platform import cpu_without_native_bf16

__all__ = ["cpu_without_native_bf16", "given", "serve_float32", "unquantized"]


def unquantized(model_path: str) -> bool:
    """A local HF model directory whose config declares no quantization."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "quantization_config" not in config


def given(flag: str, argv: list[str]) -> bool:
    """Whether `argv` sets `flag`, as `--flag value` or `--flag=value`."""
    return any(a.split("=")[0] == flag for a in argv)


def serve_float32(parsed_dtype: str, quantization: str | None, passthrough: list[str],
                  model_path: str, emulated_bf16: Callable[[], bool]) -> bool:
    """Whether to serve in float32 instead of vLLM's "auto": the dtype is still
    "auto" (none on the command line or in a --config file), no quantization,
    an unquantized local model, and a CPU that would emulate bf16."""
    return (parsed_dtype == "auto" and not given("--dtype", passthrough)
            and quantization is None and unquantized(model_path) and emulated_bf16())
