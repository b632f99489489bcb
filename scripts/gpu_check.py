"""The five-minute device check: the steering kernels compiled on a real GPU.

    python3 scripts/gpu_check.py [OUT_DIR]      # OUT_DIR default: $OUT, else ./gpu_check_out

Needs only torch and Triton (no vLLM, no adaras install). It prints one line
per check (PASS, FAIL, or SKIPPED with the reason) and writes
`gpu_check.json` and `gpu_check.txt` to OUT_DIR:

  parity    every kernel against its torch twin, compiled (not interpreted), in
            bf16/fp16/fp32, odd sizes, strided inputs, steered and unsteered rows;
            rows nobody steers stay bitwise the stock activation
  capture   the steering launch as the engine issues it per layer (sum_slots_
            over the capture slots, gather_slots_ over the gather tables,
            sparse_steer_ over the step tables) captured in one
            torch.cuda.CUDAGraph, then replayed after the buffers' *contents*
            change (other rows, other slots, other alphas, nothing steered,
            other gathering and capturing rows): every replay equals the eager
            twin.
            This is what vLLM's piecewise CUDA graphs need with the op inside a
            piece: the launch depends on buffer contents only.
  bench     CUDA-event timings at Qwen3-1.7B and Qwen3-4B MLP shapes (I = 6144,
            9728; 50 and 256 neurons per layer; T = 1, 8, 64, 512, 4096): the
            steer launch, the gather and the capture sum (every row into one
            slot), each as a fraction of a fused SiLU-and-mul kernel on the same
            tensor

Without a CUDA device every check is SKIPPED and the exit status is 0; a
FAIL makes the exit status 1. CI also runs the checks themselves on the CPU
under the Triton interpreter (`ADARAS_GPU_CHECK_INTERPRET=1` with
`TRITON_INTERPRET=1`: small shapes, the capture check's launches replayed
eagerly, the benchmark's code path on tiny shapes with meaningless timings),
so the script that a scarce GPU runs has run before.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS: list[dict] = []
# CPU tensors under the Triton interpreter: the checks' own code path, small shapes
INTERPRET = os.environ.get("ADARAS_GPU_CHECK_INTERPRET") == "1"


def report(name: str, status: str, detail: str = "", **data) -> None:
    RESULTS.append({"check": name, "status": status, "detail": detail, **data})
    print(f"{status:7s} {name}" + (f": {detail}" if detail else ""), flush=True)


def why_skip() -> str | None:
    if INTERPRET:
        return None if os.environ.get("TRITON_INTERPRET") == "1" else \
            "ADARAS_GPU_CHECK_INTERPRET=1 needs TRITON_INTERPRET=1"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton is not importable ({e})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 would interpret instead of compiling"
    return None


CHECKS = ("parity silu_and_mul_steer", "parity sparse_steer_", "parity gather_slots_",
          "parity sum_slots_", "capture steer+gather+sum launch", "bench")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"fp32": (1e-5, 1e-5), "bf16": (1.6e-2, 1e-2), "fp16": (2e-3, 2e-3)}


def tables(S: int, K: int, I: int, gen, dev, distinct: bool) -> tuple:
    """steer_idx int32 [S, K] (-1 pad, slot 0 all pad), steer_val fp32 [S, K]."""
    idx = torch.full((S, K), -1, dtype=torch.int32)
    for s in range(1, S):
        n = min(K, I)
        cols = torch.randperm(I, generator=gen)[:n] if distinct else \
            torch.randint(0, I, (n,), generator=gen)
        idx[s, :n] = cols.to(torch.int32)
        if n > 1:
            idx[s, n - 1] = -1  # padding inside a row
    val = torch.randn(S, K, generator=gen) * 3
    val[idx < 0] = 0.0
    return idx.to(dev), val.to(dev)


def check_parity_fused(dev) -> None:
    import steering_kernels as sk

    gen = torch.Generator().manual_seed(0)
    worst, cases = 0.0, 0
    for dt_name, dt in DTYPES.items():
        for T, I, K, NF, strided in ((1, 1, 1, 1, False), (7, 37, 5, 13, True),
                                     *(() if INTERPRET else (
                                         (64, 1000, 50, 0, False), (513, 6143, 256, 256, True),
                                         (3, 9728, 0, 7, False)))):
            base = (torch.randn(T, 2 * I + (3 if strided else 0), generator=gen) * 2).to(dt)
            gate_up = base.to(dev)[:, :2 * I]
            idx, val = tables(4, K, I, gen, dev, distinct=False)
            row_slot = torch.randint(0, 4, (T,), generator=gen, dtype=torch.int32).to(dev)
            row_slot[0] = 0
            feat = torch.randint(-1, I, (NF,), generator=gen, dtype=torch.int32).to(dev) \
                if NF else None
            out, feats = sk.silu_and_mul_steer(gate_up, row_slot, idx, val, feat)
            ref, ref_feats = sk.silu_and_mul_steer_native(gate_up, row_slot, idx, val, feat)
            rtol, atol = TOL[dt_name]
            torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol,
                                       msg=f"{dt_name} T={T} I={I} K={K}")
            if feat is not None:
                torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)
            worst = max(worst, float((out.float() - ref.float()).abs().max()))
            cases += 1
    report("parity silu_and_mul_steer", "PASS", f"{cases} cases, max |diff| {worst:.3g}",
           cases=cases, max_abs_diff=worst)


def check_parity_sparse(dev) -> None:
    import steering_kernels as sk

    gen = torch.Generator().manual_seed(1)
    cases = 0
    for dt in DTYPES.values():
        for T, I, K in ((1, 1, 1), (9, 37, 5),
                        *(() if INTERPRET else ((64, 6144, 50), (515, 9728, 256)))):
            act = (torch.randn(T, I + 5, generator=gen) * 2).to(dt).to(dev)[:, :I]  # strided
            before = act.clone()
            idx, val = tables(5, K, I, gen, dev, distinct=True)
            row_slot = torch.randint(0, 5, (T,), generator=gen, dtype=torch.int32).to(dev)
            row_slot[0] = 0
            ref = sk.apply_sparse_steer_(act.clone(), row_slot, idx, val)
            sk.sparse_steer_(act, row_slot, idx, val)
            off = row_slot == 0
            if not torch.equal(act[off], before[off]):
                raise AssertionError(f"unsteered rows changed ({dt}, T={T}, I={I}, K={K})")
            if INTERPRET and dt == torch.bfloat16:
                # the interpreter rounds fp32 -> bf16 toward zero, compiled Triton and
                # torch to nearest even: one bf16 ulp apart at most (bitwise on a GPU)
                torch.testing.assert_close(act, ref)
            elif not torch.equal(act, ref):
                diff = float((act.float() - ref.float()).abs().max())
                raise AssertionError(f"steered rows differ from the twin by {diff} ({dt}, "
                                     f"T={T}, I={I}, K={K})")
            cases += 1
    report("parity sparse_steer_", "PASS",
           f"{cases} cases bitwise equal to apply_sparse_steer_"
           + (" (bf16 within 1 ulp: the interpreter truncates)" if INTERPRET else "")
           + "; unsteered rows untouched", cases=cases)


def check_parity_gather(dev) -> None:
    from steering_kernels.gather_slots import gather_slots_, gather_slots_native

    gen = torch.Generator().manual_seed(2)
    cases = 0
    for dt in DTYPES.values():
        for T, I, NF, L in ((1, 1, 1, 1), (9, 37, 13, 3),
                            *(() if INTERPRET else ((512, 6144, 256, 28), (77, 9728, 1024, 36)))):
            gate_up = (torch.randn(T, 2 * I + 3, generator=gen) * 2).to(dt).to(dev)[:, :2 * I]
            feat_slot = torch.randint(0, 3, (T + 5,), generator=gen, dtype=torch.int32).to(dev)
            lay = torch.randint(0, L, (3, NF), generator=gen, dtype=torch.int32).to(dev)
            col = torch.randint(-1, I + 1, (3, NF), generator=gen, dtype=torch.int32).to(dev)
            a = torch.full((T + 5, NF), -1.0, device=dev)
            b = a.clone()
            for layer in range(L):
                gather_slots_(a, gate_up, feat_slot, lay, col, layer)
                gather_slots_native(b, gate_up, feat_slot, lay, col, layer)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            cases += 1
    report("parity gather_slots_", "PASS", f"{cases} cases (every layer) equal to the twin",
           cases=cases)


def check_parity_sum(dev) -> None:
    from steering_kernels.sum_slots import sum_slots_, sum_slots_native

    gen = torch.Generator().manual_seed(5)
    cases, worst = 0, 0.0
    for dt in DTYPES.values():
        for T, I, C in ((1, 1, 1), (37, 300, 3),
                        *(() if INTERPRET else ((4096, 6144, 16), (77, 9728, 64)))):
            act = (torch.randn(T, I + 3, generator=gen) * 2).to(dt).to(dev)[:, :I]  # strided
            cap_slot = torch.randint(0, C + 1, (T + 5,), generator=gen, dtype=torch.int32)
            cap_slot[: T // 2] = C  # a prompt chunk: a long run of one slot
            cap_slot = cap_slot.to(dev)
            a = torch.randn(C + 1, I, generator=gen).to(dev)
            b, before = a.clone(), a.clone()
            sum_slots_(a, act, cap_slot)
            sum_slots_native(b, act, cap_slot)
            if not torch.equal(a[0], before[0]):
                raise AssertionError(f"slot 0 was written ({dt}, T={T}, I={I})")
            # fp32 atomics in an unspecified order: within rounding of the twin
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * max(1.0, T ** 0.5 / 10))
            worst = max(worst, float((a - b).abs().max()))
            cases += 1
    report("parity sum_slots_", "PASS", f"{cases} cases equal to the twin (max |diff| "
           f"{worst:.3g}); slot 0 untouched", cases=cases, max_abs_diff=worst)


def check_capture(dev) -> None:
    """One forward's launches as the engine issues them, captured once."""
    import steering_kernels as sk
    from steering_kernels.gather_slots import gather_slots_, gather_slots_native
    from steering_kernels.sum_slots import sum_slots_, sum_slots_native

    gen = torch.Generator().manual_seed(3)
    L, I, T, S, K, G, NF = (2, 48, 6, 4, 5, 3, 8) if INTERPRET else (4, 1536, 64, 6, 50, 3, 64)
    dtype = torch.float16 if INTERPRET else torch.bfloat16  # (interpreter: bf16 truncates)
    # buffers allocated once, as the engine's StepBuffers and gather buffers are
    row_slot = torch.zeros(T, dtype=torch.int32, device=dev)  # [T]
    steer_idx = torch.full((S, L, K), -1, dtype=torch.int32, device=dev)  # [S, L, K]
    steer_val = torch.zeros((S, L, K), dtype=torch.float32, device=dev)  # [S, L, K]
    feat_slot = torch.zeros(T, dtype=torch.int32, device=dev)  # [T]
    feat_layer = torch.full((G, NF), -1, dtype=torch.int32, device=dev)  # [G, F]
    feat_col = torch.full((G, NF), -1, dtype=torch.int32, device=dev)  # [G, F]
    feats = torch.zeros((T, NF), dtype=torch.float32, device=dev)  # [T, F]
    C = 3  # capture slots
    cap_slot = torch.zeros(T, dtype=torch.int32, device=dev)  # [T]
    cap_sum = torch.zeros((L, C + 1, I), dtype=torch.float32, device=dev)  # [L, C + 1, I]
    gate_up = torch.zeros((L, T, 2 * I), dtype=dtype, device=dev)  # per layer [T, 2I]
    act = torch.zeros((L, T, I), dtype=dtype, device=dev)  # per layer [T, I]

    def launch(a, gu, rs, si, sv, fs, fl, fc, fe, cs, cm, gather, steer, summed):
        fe.zero_()
        cm.zero_()  # (the engine zeroes a slot when a request takes it)
        for layer in range(L):
            summed(cm[layer], a[layer], cs)
            gather(fe, gu[layer], fs, fl, fc, layer)
            steer(a[layer], rs, si[:, layer, :], sv[:, layer, :])

    def scenario(k: int) -> dict:
        """New buffer contents: which rows steer with which slot, alphas, gathers."""
        rs = torch.randint(0, S, (T,), generator=gen, dtype=torch.int32)
        if k == 2:
            rs.zero_()  # nothing steered at all
        si = torch.full((S, L, K), -1, dtype=torch.int32)
        for s in range(1, S):
            for layer in range(L):
                n = int(torch.randint(1, K + 1, (1,), generator=gen))
                si[s, layer, :n] = torch.randperm(I, generator=gen)[:n].to(torch.int32)
        sv = torch.randn(S, L, K, generator=gen) * (k + 1)
        sv[si < 0] = 0.0
        fs = torch.randint(0, G, (T,), generator=gen, dtype=torch.int32)
        fl = torch.randint(0, L, (G, NF), generator=gen, dtype=torch.int32)
        fc = torch.randint(-1, I, (G, NF), generator=gen, dtype=torch.int32)
        fl[0], fc[0] = -1, -1
        cs = torch.randint(0, C + 1, (T,), generator=gen, dtype=torch.int32)
        if k == 3:
            cs.zero_()  # nothing captured
        return {"rs": rs, "si": si, "sv": sv, "fs": fs, "fl": fl, "fc": fc, "cs": cs,
                "gu": (torch.randn(L, T, 2 * I, generator=gen) * 2).to(dtype),
                "a": (torch.randn(L, T, I, generator=gen) * 2).to(dtype)}

    def load(sc: dict) -> None:  # contents only: every address stays
        for dst, key in ((row_slot, "rs"), (steer_idx, "si"), (steer_val, "sv"),
                         (feat_slot, "fs"), (feat_layer, "fl"), (feat_col, "fc"),
                         (cap_slot, "cs"), (gate_up, "gu"), (act, "a")):
            dst.copy_(sc[key])

    def captured() -> None:
        launch(act, gate_up, row_slot, steer_idx, steer_val, feat_slot, feat_layer, feat_col,
               feats, cap_slot, cap_sum, gather_slots_, sk.sparse_steer_, sum_slots_)

    load(scenario(0))
    if INTERPRET:  # no graphs on the CPU: the same launches, replayed eagerly
        replay = captured
    else:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (compiles the kernels) off the capture
            captured()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured()
        replay = graph.replay
    ptrs = [t.data_ptr() for t in (row_slot, steer_idx, steer_val, feat_slot, feats, act,
                                   cap_slot, cap_sum)]
    for k in range(5):
        sc = scenario(k)
        load(sc)
        replay()
        if not INTERPRET:
            torch.cuda.synchronize()
        a, fe = sc["a"].to(dev), torch.zeros(T, NF, device=dev)
        cm = torch.zeros(L, C + 1, I, device=dev)
        launch(a, sc["gu"].to(dev), sc["rs"].to(dev), sc["si"].to(dev), sc["sv"].to(dev),
               sc["fs"].to(dev), sc["fl"].to(dev), sc["fc"].to(dev), fe, sc["cs"].to(dev), cm,
               gather_slots_native, sk.apply_sparse_steer_, sum_slots_native)
        if not torch.equal(act, a):
            raise AssertionError(f"replay {k}: activations differ from the eager twin by "
                                 f"{float((act.float() - a.float()).abs().max())}")
        torch.testing.assert_close(feats, fe, rtol=1e-5, atol=1e-5,
                                   msg=f"replay {k}: features differ")
        torch.testing.assert_close(cap_sum, cm, rtol=1e-5, atol=1e-4,
                                   msg=f"replay {k}: capture sums differ")
    if ptrs != [t.data_ptr() for t in (row_slot, steer_idx, steer_val, feat_slot, feats, act,
                                       cap_slot, cap_sum)]:
        raise AssertionError("a buffer moved")
    report("capture steer+gather+sum launch", "PASS",
           ("launches replayed eagerly under the interpreter (no CUDA graph on the CPU)"
            if INTERPRET else "1 capture") + ", 5 replays with new contents (incl. nothing "
           "steered) equal the eager twin", replays=5)


def bench(dev, quick: bool) -> None:
    import steering_kernels as sk
    from steering_kernels.gather_slots import gather_slots_
    from steering_kernels.sum_slots import sum_slots_

    def timed(fn, reps: int) -> float:
        if INTERPRET:  # no CUDA events on the CPU: this only runs the code path
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / reps  # microseconds

    gen = torch.Generator().manual_seed(4)
    rows = []
    shapes = (("tiny", 48),) if INTERPRET else (("Qwen3-1.7B", 6144), ("Qwen3-4B", 9728))
    for model, I in shapes:
        for K in ((5,) if INTERPRET else (50, 256)):
            for T in ((1, 3) if INTERPRET else (1, 64) if quick else (1, 8, 64, 512, 4096)):
                reps = 20 if quick else (200 if T <= 512 else 50)
                dtype = torch.float32 if INTERPRET else torch.bfloat16
                gate_up = torch.randn(T, 2 * I, device=dev, dtype=dtype)
                no_idx = torch.full((1, 0), -1, dtype=torch.int32, device=dev)
                no_val = torch.zeros((1, 0), device=dev)
                zero_slot = torch.zeros(T, dtype=torch.int32, device=dev)
                fused = timed(partial(sk.silu_and_mul_steer, gate_up, zero_slot, no_idx, no_val),
                              reps)
                act = torch.randn(T, I, device=dev, dtype=dtype)
                idx, val = tables(2, K, I, gen, dev, distinct=True)
                ones = torch.ones(T, dtype=torch.int32, device=dev)  # every row steered
                steer = timed(partial(sk.sparse_steer_, act, ones, idx, val), reps)
                F_ = 8 if INTERPRET else 256
                feats = torch.zeros(T, F_, device=dev)
                lay = torch.zeros(2, F_, dtype=torch.int32, device=dev)
                col = torch.randint(0, I, (2, F_), dtype=torch.int32, device=dev)
                gather = timed(partial(gather_slots_, feats, gate_up, ones, lay, col, 0), reps)
                # every row captured into one slot: the atomics' worst contention
                cap_sum = torch.zeros(2, I, device=dev)
                summed = timed(partial(sum_slots_, cap_sum, act, ones), reps)
                rows.append({"model": model, "I": I, "K": K, "T": T, "fused_silu_mul_us": fused,
                             "steer_us": steer, "gather_256_us": gather, "sum_us": summed,
                             "steer_fraction": steer / fused, "gather_fraction": gather / fused,
                             "sum_fraction": summed / fused})
    worst = max(rows, key=lambda r: r["steer_fraction"])
    if INTERPRET:
        report("bench", "PASS", f"{len(rows)} tiny shapes: the code path only (interpreter "
               "timings mean nothing)", rows=rows)
        return
    report("bench", "PASS", f"{len(rows)} shapes; steer launch at most "
           f"{worst['steer_fraction']:.2f}x a fused SiLU-and-mul (T={worst['T']}, "
           f"I={worst['I']}, K={worst['K']}); gather of 256 features at most "
           f"{max(r['gather_fraction'] for r in rows):.2f}x; capture sum of every row at most "
           f"{max(r['sum_fraction'] for r in rows):.2f}x", rows=rows)


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": None}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    skip = why_skip()
    if skip:
        for name in CHECKS:
            report(name, "SKIPPED", skip)
    else:
        dev = torch.device("cpu" if INTERPRET else "cuda")
        if INTERPRET:
            env["device"] = "cpu (Triton interpreter)"
        else:
            env["device"] = torch.cuda.get_device_name(dev)
            env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        print(f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}",
              flush=True)
        quick = bool(os.environ.get("ADARAS_GPU_CHECK_QUICK"))
        steps = ((CHECKS[0], check_parity_fused), (CHECKS[1], check_parity_sparse),
                 (CHECKS[2], check_parity_gather), (CHECKS[3], check_parity_sum),
                 (CHECKS[4], check_capture), (CHECKS[5], lambda d: bench(d, quick)))
        for name, fn in steps:
            try:
                fn(dev)
            except Exception as e:  # one failing check must not hide the others
                report(name, "FAIL", f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc()[-4000:])
    summary = {"environment": env, "seconds": round(time.time() - started, 1),
               "checks": RESULTS}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    lines = [f"{r['status']:7s} {r['check']}: {r['detail']}" for r in RESULTS]
    bench_rows = next((r.get("rows") for r in RESULTS if r["check"] == "bench"), None)
    if bench_rows:
        lines += ["", "model       I     K     T  fused us  steer us  gather us    sum us  "
                  "steer/fused  gather/fused  sum/fused"]
        lines += [f"{r['model']:10s} {r['I']:5d} {r['K']:4d} {r['T']:5d} "
                  f"{r['fused_silu_mul_us']:8.1f} {r['steer_us']:9.1f} {r['gather_256_us']:10.1f}"
                  f" {r['sum_us']:9.1f} {r['steer_fraction']:12.3f} {r['gather_fraction']:13.3f}"
                  f" {r['sum_fraction']:10.3f}"
                  for r in bench_rows]
    (out / "gpu_check.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'gpu_check.json'} in {summary['seconds']} s", flush=True)
    return 1 if any(r["status"] == "FAIL" for r in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
