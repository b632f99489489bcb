"""The engine flags `adaras serve` adds before the user's own: the dtype a CPU
without native bf16 runs fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaras.api import app
from adaras.api.settings import Settings


def dtype(passthrough: list[str]) -> str:
    return app.vllm_args(Settings(model="some-model"), "some/dir", passthrough).dtype


@pytest.mark.parametrize("native", [True, False])
def test_a_cpu_without_native_bf16_serves_float32_unless_the_user_says(monkeypatch, native):
    """vLLM's "auto" would emulate bf16 there (several times slower); a --dtype
    the user passes, in either spelling, always wins."""
    monkeypatch.setattr(app, "cpu_without_native_bf16", lambda: not native)
    assert dtype([]) == ("auto" if native else "float32")
    assert dtype(["--dtype", "bfloat16"]) == "bfloat16"
    assert dtype(["--dtype=float16"]) == "float16"
    assert dtype(["--max-model-len", "512"]) == ("auto" if native else "float32")


def test_native_bf16_is_read_as_vllm_reads_it():
    """The torch checks it relies on agree with the CPU's own flags (this
    machine has one answer or the other; each kind of machine checks its own)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert app.cpu_without_native_bf16() == (not flags & {"avx512_bf16", "amx_tile"})
