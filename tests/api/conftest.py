"""A real `adaras serve` process on loopback, on a tiny offline model, shared by
the server tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from adaras.tiny_models import make_tiny_model
from tests.engine.conftest import make_profiles

API_KEY = "test-api-key-123"
ADMIN_KEY = "test-admin-key-456"
MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    model_dir: Path
    profiles: dict[str, str]
    starting: list[dict] = field(default_factory=list)  # the 503 bodies seen while it started

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model_dir, profiles, log: Path, *extra: str, api_key=API_KEY,
                 admin_key=ADMIN_KEY, env: dict | None = None, max_model_len: int = 2048,
                 vllm_extra: tuple[str, ...] = ()) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "adaras.cli", "serve", "--model", str(model_dir),
           "--served-model-name", MODEL, "--port", str(port), *extra]
    for name, path in profiles.items():
        cmd += ["--profile", f"{name}={path}"]
    if api_key:
        cmd += ["--api-key", api_key]
    if admin_key:
        cmd += ["--admin-key", admin_key]
    cmd += ["--", "--max-model-len", str(max_model_len), "--dtype", "float32",
            "--max-num-seqs", "32", *vllm_extra]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "ADARAS_PLUGIN": "1",
           "ADARAS_CACHE": str(log.parent / "cache"), **(env or {})}
    f = log.open("w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    return wait_healthy(url, proc, log, Path(model_dir), profiles, timeout=300)


def wait_healthy(url, proc, log: Path, model_dir: Path, profiles, timeout: float) -> Server:
    deadline = time.time() + timeout
    starting = []
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return Server(url, proc, log, Path(model_dir), profiles, starting)
            if r.status_code == 503 and r.headers.get("content-type") == "application/json":
                starting.append(r.json())
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(Server(url, proc, log, Path(model_dir), profiles))
    raise RuntimeError(f"server did not become healthy:\n{log.read_text()[-3000:]}")


def stop_server(server: Server, timeout: float = 60) -> int | None:
    """SIGTERM to the server alone, as an orchestrator sends it (it shuts its
    engine down), then SIGKILL to whatever of its process group is left."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)
    return server.proc.returncode


@pytest.fixture(scope="session")
def server_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("server-models") / "qwen3", "qwen3")


@pytest.fixture(scope="session")
def server_profiles(server_model, tmp_path_factory):
    return make_profiles(server_model, tmp_path_factory.mktemp("server-profiles"))


@pytest.fixture(scope="session")
def server(server_model, server_profiles, tmp_path_factory):
    srv = start_server(server_model, {k: server_profiles[k] for k in ("a", "pred")},
                       tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    stop_server(srv)


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def aclient(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
