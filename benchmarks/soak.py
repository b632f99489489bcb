"""Soak and fault benchmark for `adaras serve` (a script, not a test).

Starts `adaras serve` on the default model (SmolLM2-135M-Instruct) with three
profiles, then for `--duration` seconds:

  * keeps `--concurrency` streams running, mixing steering off / always /
    adaptive over the profiles, random alphas and lengths;
  * makes `--disconnects` of those requests hang up mid-stream, spread over
    the run;
  * every `--churn` seconds reloads one profile (alternating between two
    files) and unloads or re-loads another.

It reports errors (target 0), requests completed, RSS growth of every server
process from the end of warm-up to the end (target < 5%), the worker's
request table at the end (target 0) and the running gauges at the end
(target 0), and writes them as JSON.

    python benchmarks/soak.py                      # 64 streams, 5 minutes, 100 disconnects
    python benchmarks/soak.py --duration 60 --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

ADMIN = "soak-admin-key-0001"
MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "What is 17 + 25? Think step by step.",
    "A shop sells 3 apples for 2 dollars. How much do 12 apples cost?",
    "Write a haiku about the sea.",
    "List three prime numbers larger than 50 and explain why they are prime.",
    "Tom has 5 coins, finds 7 more and loses 3. How many coins does he have?",
    "Explain what a hash table is in two sentences.",
]


@dataclass
class Tally:
    started: int = 0
    completed: int = 0
    disconnected: int = 0
    refused_unloaded: int = 0  # 400 "unknown profile" for a profile unloaded meanwhile
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    by_mode: dict[str, int] = field(default_factory=dict)
    reloads: int = 0
    unloads: int = 0
    loads: int = 0

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(text[:300])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_profiles(workdir: Path) -> dict[str, Path]:
    """main: the bundled SmolLM2 profile (with a predictor); twin: a copy that is
    reloaded from two files in turn; rand: random neurons, unloaded and loaded."""
    import transformers

    from adaras.api.defaults import bundled_profile
    from adaras.profile import ModelShape, SteeringProfile
    from adaras.zoo import resolve_model

    bundled = bundled_profile(MODEL)
    paths = {"main": workdir / "main.safetensors", "twin": workdir / "twin-a.safetensors",
             "twin-b": workdir / "twin-b.safetensors", "rand": workdir / "rand.safetensors"}
    shutil.copy(bundled, paths["main"])
    shutil.copy(bundled, paths["twin"])
    twin_b = SteeringProfile.load(bundled)
    twin_b.default_alpha = twin_b.default_alpha * 2  # another version: another sha256
    twin_b.save(paths["twin-b"])
    shape = ModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(
        resolve_model(MODEL)))
    SteeringProfile.random("rand", shape, k=40, seed=7, scale=0.5).save(paths["rand"])
    return paths


def start_server(port: int, paths: dict[str, Path], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adaras.cli", "serve", "--port", str(port),
           "--admin-key", ADMIN, "--profile", f"main={paths['main']}",
           "--profile", f"twin={paths['twin']}", "--profile", f"rand={paths['rand']}"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit(f"server not healthy after {timeout} s; see {log}")


def rss(proc: subprocess.Popen) -> dict[str, int]:
    """RSS of the server and every process it started, keyed by role."""
    root = psutil.Process(proc.pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(p.cmdline()) or p.name()
            role = ("EngineCore" if "EngineCore" in name else
                    "Worker" if "Worker" in name or "multiproc" in name else
                    "server" if p.pid == proc.pid else p.name())
            out[f"{role}[{p.pid}]"] = p.memory_info().rss
        except psutil.Error:
            pass
    return out


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def one_request(client: httpx.AsyncClient, url: str, loaded: set[str], tally: Tally,
                      rng: random.Random, hang_up: bool) -> None:
    mode = rng.choice(["off", "always", "adaptive"])
    body = {"model": MODEL, "stream": True, "max_tokens": rng.randint(16, 128),
            "temperature": rng.choice([0.0, 0.7]),
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}
    if mode == "always":
        profile = rng.choice(sorted(loaded))
        body["steering"] = {"mode": mode, "profile": profile,
                            "alpha": round(rng.uniform(0.1, 1.0), 2)}
    elif mode == "adaptive":
        body["steering"] = {"mode": mode, "profile": rng.choice(["main", "twin"])}
    if hang_up:
        body["max_tokens"], body["ignore_eos"] = 512, True
    tally.started += 1
    tally.by_mode[mode] = tally.by_mode.get(mode, 0) + 1
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                if r.status_code == 400 and "unknown profile" in text:
                    tally.refused_unloaded += 1
                else:
                    tally.error(f"{r.status_code} {text}")
                return
            events, report = 0, None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events += 1
                if hang_up and events >= 3:
                    tally.disconnected += 1
                    return  # leaving the block closes the connection mid-stream
                chunk = json.loads(line[6:])
                report = chunk.get("steering") or report
            if report is None or report.get("mode") != mode:
                tally.error(f"missing or wrong steering report: {report} for mode {mode}")
            else:
                tally.completed += 1
    except (httpx.HTTPError, ValueError) as e:
        tally.error(f"{type(e).__name__}: {e}")


async def load(url: str, args, loaded: set[str], tally: Tally, stop_at: float,
               start: float) -> None:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        async def worker(i: int) -> None:
            wrng = random.Random(rng.random())
            while time.time() < stop_at:
                due = args.disconnects * (time.time() - start) / args.duration
                hang_up = tally.disconnected + pending[0] < min(due, args.disconnects)
                if hang_up:
                    pending[0] += 1
                try:
                    await one_request(client, url, loaded, tally, wrng, hang_up)
                finally:
                    if hang_up:
                        pending[0] -= 1

        pending = [0]
        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))


async def churn(url: str, paths: dict[str, Path], loaded: set[str], tally: Tally,
                stop_at: float, every: float) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    twin_files = [paths["twin-b"], paths["twin"]]
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        tick = 0
        while time.time() + every < stop_at:
            await asyncio.sleep(every)
            tick += 1
            r = await client.post(url + "/v1/steering/profiles",
                                  json={"name": "twin", "path": str(twin_files[tick % 2])})
            tally.reloads += 1
            if r.status_code != 201:
                tally.error(f"reload twin: {r.status_code} {r.text}")
            if "rand" in loaded:
                loaded.discard("rand")  # clients stop choosing it before it goes
                r = await client.delete(url + "/v1/steering/profiles/rand")
                tally.unloads += 1
                if r.status_code != 204:
                    tally.error(f"unload rand: {r.status_code} {r.text}")
            else:
                r = await client.post(url + "/v1/steering/profiles",
                                      json={"name": "rand", "path": str(paths["rand"])})
                tally.loads += 1
                if r.status_code != 201:
                    tally.error(f"load rand: {r.status_code} {r.text}")
                loaded.add("rand")


async def soak(url: str, proc, paths, args) -> dict:
    tally = Tally()
    loaded = {"main", "twin", "rand"}
    start = time.time()
    stop_at = start + args.duration
    rss_warm: dict[str, int] = {}

    async def sample_after_warmup():
        await asyncio.sleep(args.warmup)
        rss_warm.update(rss(proc))

    await asyncio.gather(load(url, args, loaded, tally, stop_at, start),
                         churn(url, paths, loaded, tally, stop_at, args.churn),
                         sample_after_warmup())
    elapsed = time.time() - start
    await asyncio.sleep(2)  # let the last aborts and the idle step land
    rss_end = rss(proc)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    runtime = httpx.get(url + "/v1/steering/runtime", headers=headers).json()
    metrics_text = httpx.get(url + "/metrics").text
    growth = {k: (rss_end[k] - v) / v for k, v in rss_warm.items() if k in rss_end}
    return {
        "duration_s": round(elapsed, 1), "concurrency": args.concurrency,
        "requests": asdict(tally),
        "rss_after_warmup_mib": {k: round(v / 2**20, 1) for k, v in rss_warm.items()},
        "rss_end_mib": {k: round(v / 2**20, 1) for k, v in rss_end.items()},
        "rss_growth": {k: round(v, 4) for k, v in growth.items()},
        "runtime_at_end": runtime,
        "adaras_requests_running": metric(metrics_text, "adaras_requests_running"),
        "vllm_num_requests_running": metric(metrics_text, "vllm:num_requests_running"),
        "adaras_client_disconnects_total": metric(metrics_text,
                                                  "adaras_client_disconnects_total"),
    }


def verdict(result: dict) -> list[tuple[str, str, bool]]:
    worst = max(result["rss_growth"].values(), default=0.0)
    rt = result["runtime_at_end"]
    return [
        ("errors", f"{result['requests']['errors']}", result["requests"]["errors"] == 0),
        ("completed", f"{result['requests']['completed']}", result["requests"]["completed"] > 0),
        ("disconnected mid-stream", f"{result['requests']['disconnected']}", True),
        ("worst RSS growth after warm-up", f"{worst:+.2%}", worst < 0.05),
        ("runtime request table at end", f"{rt['requests']} requests, {rt['captures']} captures",
         rt["requests"] == 0 and rt["captures"] == 0),
        ("running gauges at end",
         f"adaras {result['adaras_requests_running']:g}, vllm "
         f"{result['vllm_num_requests_running']:g}",
         result["adaras_requests_running"] == 0 and result["vllm_num_requests_running"] == 0),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--warmup", type=float, default=60.0, help="RSS baseline taken after this")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--disconnects", type=int, default=100)
    ap.add_argument("--churn", type=float, default=10.0, help="seconds between profile changes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="adaras-soak-"))
    paths = make_profiles(workdir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "server.log"
    print(f"starting adaras serve on {url} (log: {log})", flush=True)
    t0 = time.time()
    proc = start_server(port, paths, log)
    try:
        wait_healthy(url, proc, log)
        print(f"healthy after {time.time() - t0:.0f} s; soaking for {args.duration:.0f} s",
              flush=True)
        result = asyncio.run(soak(url, proc, paths, args))
        errors_in_log = [ln for ln in log.read_text(errors="replace").splitlines()
                         if re.search(r"\bERROR\b|Traceback", ln)]
        result["server_log_error_lines"] = len(errors_in_log)
        result["server_log_error_samples"] = errors_in_log[:10]
    finally:
        proc.send_signal(signal.SIGTERM)  # the server shuts its engine down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its process group
        except ProcessLookupError:
            pass
    checks = verdict(result) + [("ERROR lines in the server log",
                                 str(result["server_log_error_lines"]),
                                 result["server_log_error_lines"] == 0)]
    print(json.dumps(result, indent=2))
    print(f"\n{'check':34} {'measured':42} target met")
    for name, value, ok in checks:
        print(f"{name:34} {value:42} {'yes' if ok else 'NO'}")
    if args.out:
        args.out.write_text(json.dumps({**result, "checks": checks}, indent=2))
    sys.exit(0 if all(ok for _, _, ok in checks) else 1)


if __name__ == "__main__":
    main()
