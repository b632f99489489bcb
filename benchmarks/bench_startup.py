"""Start-up benchmark: stock vLLM's OpenAI server and `adaras serve`, cold and warm.

    python benchmarks/bench_startup.py [--models smollm2-135m-instruct qwen2.5-coder-1.5b-instruct]
        [--out docs/benchmarks/bench_startup.json]

For each model it starts, one at a time and each in its own process group:

  adaras cold   `python -m adaras.cli serve --model NAME`, as `make serve` runs it
                (no engine flag, no memory variable), with empty compile caches
  stock  cold   `python -m vllm.entrypoints.openai.api_server --model DIR` with the
                engine flags and KV-cache bytes adaras chose (from its log), ADARAS_PLUGIN=0
  adaras warm   the same command again, caches left by the cold start
  stock  warm   likewise

With --prepared it measures `make install` then the first `make serve` instead:
`adaras serve --prepare-only --model NAME` on empty caches (timed, with the graphs it
compiled and loaded), then `adaras serve --model NAME` on the same VLLM_CACHE_ROOT and
a fresh TORCHINDUCTOR_CACHE_DIR (row caches "prepared"); --no-decode skips the decode
runs.

Cold means a fresh VLLM_CACHE_ROOT and TORCHINDUCTOR_CACHE_DIR (a temporary
directory per server kind, kept for its warm start); the prepared model is not
part of it (`make install` prepares the default one). For each start it prints
the seconds from the command to a 200 on /health and to the first answer (one
short chat request sent as soon as /health answers), how many compiled graphs
the engine compiled and how many it loaded (from vLLM's log lines), and then
decode tok/s: one untimed warm-up and one timed run of N chat requests of
exactly M tokens (greedy, ignore_eos), all in flight at once up to C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import Server, decode_messages, free_port  # noqa: E402

# (requests, tokens each, in flight) of the decode load, per model
DECODE = {"smollm2-135m-instruct": (64, 128, 32), "qwen2.5-coder-1.5b-instruct": (16, 64, 16)}
GiB = 1 << 30


async def decode(url: str, model: str, requests: int, tokens: int, concurrency: int) -> float:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", timeout=900, max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with sem:
            out = await client.chat.completions.create(
                model=model, messages=decode_messages(i), max_tokens=tokens, temperature=0.0,
                extra_body={"ignore_eos": True})
        return out.usage.completion_tokens

    t0 = time.perf_counter()
    n = sum(await asyncio.gather(*(one(i) for i in range(requests))))
    await client.close()
    return n / (time.perf_counter() - t0)


def first_answer(url: str, model: str) -> None:
    import httpx

    r = httpx.post(url + "/v1/chat/completions", timeout=900, json={
        "model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
    r.raise_for_status()


def start(kind: str, model: str, model_dir: str, cache: Path, log: Path, engine: list[str],
          load: tuple[int, int, int] | None) -> dict:
    port = free_port()
    env = dict(os.environ, VLLM_CACHE_ROOT=str(cache / "vllm"),
               TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"))
    for var in ("VLLM_CPU_KVCACHE_SPACE", "ADARAS_PLUGIN", "ADARAS_PLAIN_GRAPH"):
        env.pop(var, None)
    if kind == "adaras":
        cmd = [sys.executable, "-m", "adaras.cli", "serve", "--model", model, "--port", str(port)]
    else:
        env["ADARAS_PLUGIN"] = "0"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--served-model-name", model, "--port", str(port), *engine]
    t0 = time.monotonic()
    server = Server(kind, cmd, env, port, log)
    try:
        server.wait_healthy(timeout=1800)
        healthy = time.monotonic() - t0
        first_answer(server.url, model)
        answered = time.monotonic() - t0
        tok_s = None
        if load is not None:
            asyncio.run(decode(server.url, model, *load))  # warm-up
            tok_s = asyncio.run(decode(server.url, model, *load))
    finally:
        server.stop()
    text = log.read_text(errors="replace")
    return {"healthy_s": round(healthy, 1), "first_answer_s": round(answered, 1),
            "graphs_compiled": text.count("saved AOT compiled function"),
            "graphs_loaded": text.count("Directly load AOT compilation"),
            "recompiled_after_load_failure": text.count("Compiling model again"),
            "decode_tok_s": None if tok_s is None else round(tok_s, 1)}


def prepare(model: str, cache: Path, log: Path) -> dict:
    """`make install`'s step: `adaras serve --prepare-only` on `cache`, timed."""
    env = dict(os.environ, VLLM_CACHE_ROOT=str(cache / "vllm"),
               TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor-prepare"))
    for var in ("VLLM_CPU_KVCACHE_SPACE", "ADARAS_PLUGIN", "ADARAS_PLAIN_GRAPH"):
        env.pop(var, None)
    t0 = time.monotonic()
    with log.open("w") as f:
        subprocess.run([sys.executable, "-m", "adaras.cli", "serve", "--prepare-only",
                        "--model", model], env=env, stdout=f, stderr=subprocess.STDOUT,
                       check=True)
    took = time.monotonic() - t0
    text = log.read_text(errors="replace")
    return {"prepare_s": round(took, 1),
            "prepare_graphs_compiled": text.count("saved AOT compiled function"),
            "prepare_graphs_loaded": text.count("Directly load AOT compilation")}


def engine_flags(log: Path) -> list[str]:
    """What adaras serve chose (its defaults and KV plan), for stock to use too."""
    text = log.read_text(errors="replace")
    args = re.search(r"non-default args: (\{.*\})", text)[1]
    flags = []
    for key in ("max_model_len", "max_num_seqs", "kv_cache_memory_bytes", "dtype"):
        value = re.search(rf"'{key}': '?(\w+)", args)
        if value:
            flags += ["--" + key.replace("_", "-"), value[1]]
    return flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(DECODE))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--prepared", action="store_true",
                    help="`adaras serve --prepare-only` on empty caches, then serve")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode runs")
    args = ap.parse_args()

    from adaras.zoo import resolve_model

    work = Path(tempfile.mkdtemp(prefix="adaras-bench-startup-"))
    print(f"logs and caches in {work}", flush=True)
    rows = []
    for model in args.models:
        model_dir = str(resolve_model(model))
        load = None if args.no_decode else DECODE.get(model, (16, 64, 16))
        if args.prepared:
            cache = work / f"{model}-prepared"
            prep = prepare(model, cache, work / f"{model}-prepare.log")
            res = start("adaras", model, model_dir, cache, work / f"{model}-adaras-prepared.log",
                        [], load)
            row = {"model": model, "server": "adaras", "caches": "prepared", **prep, **res}
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        engine: list[str] = []
        for state in ("cold", "warm"):
            for kind in ("adaras", "stock"):
                log = work / f"{model}-{kind}-{state}.log"
                res = start(kind, model, model_dir, work / f"{model}-{kind}", log, engine, load)
                if kind == "adaras" and not engine:
                    engine = engine_flags(log)
                row = {"model": model, "server": kind, "caches": state, **res}
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = ["| model | server | caches | healthy s | first answer s | graphs compiled / loaded "
             "| decode tok/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['server']} | {r['caches']} | {r['healthy_s']} | "
                     f"{r['first_answer_s']} | {r['graphs_compiled']} / {r['graphs_loaded']} | "
                     f"{r['decode_tok_s']} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "table": lines}, indent=1))


if __name__ == "__main__":
    main()
