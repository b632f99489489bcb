"""Served benchmark: `adaras serve` against stock vLLM's own OpenAI server.

    python benchmarks/bench_serve.py [--model smollm2-135m-instruct] [--repeats 3]
        [--kv-gib 3] [--out results.json] [--skip-hf] [-- <vLLM engine flags>]

Starts stock vLLM (`python -m vllm.entrypoints.openai.api_server`, with
ADARAS_PLUGIN=0 so the plugin never registers) and then `adaras serve` on the
same model with the same engine flags and environment, one after the other
(never both at once: they would share the cores), each in its own process
group. Both are driven by the same loads from an async OpenAI client:

  decode   64 chat requests of exactly 128 tokens (greedy, ignore_eos), 32 in
           flight: output tok/s. adaras rows: steering off, always, adaptive
           (the profile's own threshold) and `configs` (64 distinct alphas: 64
           (profile, alpha) slots in the batches).
  prefix   32 chat requests sharing one ~900-word system prompt, 8 in flight,
           16 tokens each, after one warm-up request: mean time to first token
           (streamed) and wall time. Rows: stock, off, adaptive.
  hf       the do-it-yourself reference: Hugging Face `generate` at batch 32
           with a `down_proj` forward pre-hook adding alpha * delta at the
           profile's neurons, 128 new tokens, greedy.

Each load runs --repeats times per row after one untimed warm-up of it; the
table reports the best run (interference on a shared machine only slows a run
down) and the median. With --bracket stock is started a second time after
adaras serve and its runs join the stock rows, so drift of the machine over
the run shows up in the stock rows' spread. Ratios are to stock's best. Targets (issue 9): off and
adaptive >= 0.98x stock, always and configs >= 0.97x; on the prefix load,
adaptive's mean TTFT and wall time <= 1.1x off's.

Engine flags default to `--max-model-len 2048 --max-num-seqs 64`, and the KV
cache to VLLM_CPU_KVCACHE_SPACE=--kv-gib for both servers; every other
environment variable (e.g. VLLM_CPU_OMP_THREADS_BIND) is passed unchanged to
both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DECODE = dict(requests=64, concurrency=32, max_tokens=128)
PREFIX = dict(requests=32, concurrency=8, max_tokens=16, words=900)
TARGETS = {"off": 0.98, "adaptive": 0.98, "always": 0.97, "configs": 0.97}


# ---------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One OpenAI server in its own process group, killed as a group."""

    def __init__(self, name: str, cmd: list[str], env: dict, port: int, log: Path):
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 900) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"see {self.log}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} not healthy after {timeout} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()


# ------------------------------------------------------------------ loads
def decode_messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Problem {i}: a shop sells {i + 3} apples at {i % 7 + 2} "
                                        "dollars each. Explain step by step what they cost."}]


def system_prompt(words: int) -> str:
    base = ("You are a careful assistant for arithmetic word problems. Read the problem, "
            "name the quantities, write one equation per step, check units, and state the "
            "final answer on its own line. ").split()
    return " ".join(base[i % len(base)] for i in range(words))


async def run_decode(client, model: str, steering: list[dict | None]) -> dict:
    """steering[i]: the i-th request's `steering` object (None: no field)."""
    sem = asyncio.Semaphore(DECODE["concurrency"])

    async def one(i: int) -> int:
        extra = {"ignore_eos": True}
        if steering[i] is not None:
            extra["steering"] = steering[i]
        async with sem:
            out = await client.chat.completions.create(
                model=model, messages=decode_messages(i), max_tokens=DECODE["max_tokens"],
                temperature=0.0, extra_body=extra)
        return out.usage.completion_tokens

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one(i) for i in range(len(steering))))
    wall = time.perf_counter() - t0
    return {"tok_s": sum(tokens) / wall, "tokens": sum(tokens), "wall_s": wall}


async def run_prefix(client, model: str, steering: dict | None) -> dict:
    system = system_prompt(PREFIX["words"])
    sem = asyncio.Semaphore(PREFIX["concurrency"])

    async def one(i: int) -> float:
        extra = {"steering": steering} if steering is not None else {}
        async with sem:
            t0 = time.perf_counter()
            stream = await client.chat.completions.create(
                model=model, max_tokens=PREFIX["max_tokens"], temperature=0.0, stream=True,
                messages=[{"role": "system", "content": system},
                          {"role": "user", "content": f"Question {i}: what is {i} times 7?"}],
                extra_body=extra)
            ttft = None
            async for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.perf_counter() - t0
            return ttft if ttft is not None else time.perf_counter() - t0

    await one(-1)  # warm-up: puts the shared system prompt into the prefix cache
    t0 = time.perf_counter()
    ttfts = await asyncio.gather(*(one(i) for i in range(PREFIX["requests"])))
    return {"ttft_s": statistics.mean(ttfts), "wall_s": time.perf_counter() - t0}


async def measure(url: str, model: str, rows: dict[str, tuple[str, object]], repeats: int) -> dict:
    """rows: name -> ("decode", [steering per request]) | ("prefix", steering)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", timeout=600, max_retries=0)
    runs: dict[str, list[dict]] = {name: [] for name in rows}
    for load, steering in rows.values():  # untimed warm-up of every row
        await (run_decode if load == "decode" else run_prefix)(client, model, steering)
    for r in range(repeats):  # rounds, each row once, order rotated per round
        names = list(rows)
        names = names[r % len(names):] + names[: r % len(names)]
        for name in names:
            load, steering = rows[name]
            res = await (run_decode if load == "decode" else run_prefix)(client, model, steering)
            runs[name].append(res)
            print(f"  {name:>16}: {json.dumps({k: round(v, 3) for k, v in res.items()})}",
                  flush=True)
    await client.close()
    return runs


# ------------------------------------------------------------- HF reference
def hf_reference(model_dir: str, profile_path: str, batch: int = 32, max_new: int = 128) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaras.profile import SteeringProfile

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    prof = SteeringProfile.load(profile_path)
    alpha = prof.default_alpha
    hooks = []
    for layer in range(prof.model.num_layers):
        at = prof.layers == layer
        if not bool(at.any()):
            continue
        cols, vals = prof.neurons[at].long(), alpha * prof.delta[at]

        def pre_hook(module, args, cols=cols, vals=vals):
            x = args[0].clone()  # [B, T, I] the activation entering down_proj
            x[..., cols] += vals.to(x.dtype)
            return (x,)

        hooks.append(model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(pre_hook))
    prompts = [tok.apply_chat_template(decode_messages(i), tokenize=False,
                                       add_generation_prompt=True) for i in range(batch)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False)
        wall = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    tokens = (out.shape[1] - enc["input_ids"].shape[1]) * batch
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall}


# ------------------------------------------------------------------- main
def best(runs: list[dict], key: str, high: bool) -> float:
    vals = [r[key] for r in runs]
    return max(vals) if high else min(vals)


def report(runs: dict[str, list[dict]], hf: dict | None) -> list[str]:
    stock = best(runs["stock"], "tok_s", True)
    lines = ["decode load: 64 requests x 128 tokens, 32 in flight (output tok/s, best and median "
             f"of {len(runs['stock'])})",
             "| row | best tok/s | median tok/s | ratio to stock | target |",
             "|---|---|---|---|---|"]
    for name in ("stock", "off", "always", "adaptive", "configs"):
        b, med = best(runs[name], "tok_s", True), statistics.median(r["tok_s"] for r in runs[name])
        target = TARGETS.get(name)
        verdict = "" if target is None else f">= {target} ({'met' if b / stock >= target else 'MISSED'})"
        lines.append(f"| {name} | {b:.1f} | {med:.1f} | {b / stock:.3f} | {verdict} |")
    if hf is not None:
        lines.append(f"| hf hooks (batch 32) | {hf['tok_s']:.1f} | | {hf['tok_s'] / stock:.3f} | |")
    lines += ["", "shared-prefix load: 32 requests, one ~900-word system prompt, 8 in flight, "
              "16 tokens (best of the runs)",
              "| row | mean TTFT s | wall s | TTFT vs off | wall vs off |", "|---|---|---|---|---|"]
    off_t, off_w = best(runs["prefix-off"], "ttft_s", False), best(runs["prefix-off"], "wall_s", False)
    for name in ("prefix-stock", "prefix-off", "prefix-adaptive"):
        t, w = best(runs[name], "ttft_s", False), best(runs[name], "wall_s", False)
        lines.append(f"| {name.removeprefix('prefix-')} | {t:.3f} | {w:.2f} | {t / off_t:.2f} | "
                     f"{w / off_w:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-gib", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--bracket", action="store_true",
                    help="start stock again after adaras serve (its runs join the stock rows)")
    ap.add_argument("engine", nargs="*", help="vLLM engine flags (after --)")
    args = ap.parse_args()

    from adaras.api.defaults import bundled_profile
    from adaras.zoo import resolve_model

    model_dir = str(resolve_model(args.model))
    profile = bundled_profile(args.model)
    if profile is None:
        sys.exit(f"no bundled profile for {args.model}; this benchmark needs one")
    name = args.model
    from adaras.profile import SteeringProfile

    profile_name = SteeringProfile.load(profile).name  # the default: requests name no profile
    engine = args.engine or ["--max-model-len", "2048", "--max-num-seqs", "64"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_gib))
    env.pop("ADARAS_PLUGIN", None)
    work = Path(tempfile.mkdtemp(prefix="adaras-bench-serve-"))
    print(f"logs in {work}", flush=True)

    n = DECODE["requests"]
    rows_stock = {"stock": ("decode", [None] * n), "prefix-stock": ("prefix", None)}
    rows_adaras = {
        "off": ("decode", [{"mode": "off"}] * n),
        "always": ("decode", [{"mode": "always"}] * n),
        "adaptive": ("decode", [{"mode": "adaptive"}] * n),
        "configs": ("decode", [{"mode": "always", "alpha": round(0.05 + 0.01 * i, 2)}
                               for i in range(n)]),
        "prefix-off": ("prefix", {"mode": "off"}),
        "prefix-adaptive": ("prefix", {"mode": "adaptive"}),
    }
    runs: dict[str, list[dict]] = {}
    stock_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                 model_dir, "--served-model-name", name]
    servers = [("stock", stock_cmd, {"ADARAS_PLUGIN": "0"}, rows_stock),
               ("adaras", [sys.executable, "-m", "adaras.cli", "serve", "--model", model_dir,
                           "--served-model-name", name, "--profile", f"{profile_name}={profile}"],
                {}, rows_adaras)]
    if args.bracket:  # stock again after adaras: the machine's drift, in the stock rows
        servers.append(("stock-again", stock_cmd, {"ADARAS_PLUGIN": "0"}, rows_stock))
    for label, cmd, extra_env, rows in servers:
        port = free_port()
        server = Server(label, [*cmd, "--port", str(port)] + (["--"] if label == "adaras" else [])
                        + engine, {**env, **extra_env}, port, work / f"{label}.log")
        try:
            t0 = time.monotonic()
            server.wait_healthy()
            print(f"{label}: healthy after {time.monotonic() - t0:.0f} s", flush=True)
            for row, got in asyncio.run(measure(server.url, name, rows, args.repeats)).items():
                runs.setdefault(row, []).extend(got)
        finally:
            server.stop()
    hf = None if args.skip_hf else hf_reference(model_dir, str(profile))
    lines = report(runs, hf)
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"model": name, "engine": engine, "kv_gib": args.kv_gib,
                                        "runs": runs, "hf": hf, "table": lines}, indent=1))


if __name__ == "__main__":
    main()
