"""The engine flags `adaras serve` sets before the user's own: the dtype an x86
CPU without native bf16 runs fast."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from adaras.api import app
from adaras.api.settings import Settings


@pytest.fixture
def model(tmp_path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp_path


def dtype(model_dir, *passthrough: str) -> str:
    return app.vllm_args(Settings(model="some-model"), str(model_dir), list(passthrough)).dtype


@pytest.mark.parametrize("native", [True, False])
def test_a_cpu_without_native_bf16_serves_float32_unless_the_user_says(
        monkeypatch, tmp_path, model, native):
    """vLLM's "auto" would emulate bf16 there (several times slower); a dtype the
    user chose, in either spelling or in a --config file, always wins."""
    monkeypatch.setattr(app, "cpu_without_native_bf16", lambda: not native)
    plain = "auto" if native else "float32"
    assert dtype(model) == plain
    assert dtype(model, "--max-model-len", "512") == plain
    assert dtype(model, "--dtype", "bfloat16") == "bfloat16"
    assert dtype(model, "--dtype=float16") == "float16"
    assert dtype(model, "--dtype", "auto") == "auto"
    config = tmp_path / "engine.yaml"
    config.write_text("dtype: bfloat16\n")
    assert dtype(model, "--config", str(config)) == "bfloat16"


def test_a_quantized_or_unreadable_model_keeps_auto(monkeypatch, tmp_path, model):
    """A quantization may not allow float32 (AWQ, GPTQ and FP8 list fp16/bf16
    only): its model, or one whose config we cannot read, keeps vLLM's choice."""
    monkeypatch.setattr(app, "cpu_without_native_bf16", lambda: True)
    assert dtype(model, "--quantization", "awq") == "auto"
    quantized = tmp_path / "awq"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({"quantization_config": {"bits": 4}}))
    assert dtype(quantized) == "auto"
    assert dtype(tmp_path / "missing") == "auto"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64")
                    or not Path("/proc/cpuinfo").exists(), reason="x86 Linux CPU flags")
def test_native_bf16_is_read_as_vllm_reads_it():
    """On an x86 CPU platform, the torch checks it relies on agree with the
    CPU's own flags (each machine checks its own answer)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        assert not app.cpu_without_native_bf16()  # a GPU build: vLLM picks the dtype
        return
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert app.cpu_without_native_bf16() == (not flags & {"avx512_bf16", "amx_tile"})
