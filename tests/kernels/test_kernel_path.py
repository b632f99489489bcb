"""The engine's kernel path (the launch a CUDA graph would capture), run on CPU
tensors under the Triton interpreter across steps with changing batch mixes
(steered, gathering and capturing rows): its results equal a scalar
reference, it allocates no new buffers, it never reads a tensor back to the
host, and it launches the same kernels every step."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from .fresh import interpret_or_skip, rerun_in_fresh_process

L, I, T_MAX, SLOTS, F_MAX, CAPS = 3, 40, 16, 6, 32, 4


def profile(rng, k_per_layer: int, feats: int):
    """What StepBuffers/GatherBuffers read of a LoadedProfile: idx/delta [L, k]
    (local columns, -1 pad) and feat_idx [L, F] (column if the feature is in
    that layer, else -1)."""
    idx = torch.stack([torch.from_numpy(rng.choice(I, k_per_layer, replace=False))
                       for _ in range(L)]).to(torch.int32)
    idx[0, -1] = -1
    delta = torch.from_numpy(rng.normal(0, 2, (L, k_per_layer)).astype(np.float32))
    feat_idx = torch.full((L, feats), -1, dtype=torch.int32)
    for f in range(feats):
        col = int(rng.integers(-1, I))  # -1: another shard
        feat_idx[int(rng.integers(0, L)), f] = col
    return SimpleNamespace(idx=idx, delta=delta, feat_idx=feat_idx)


def reference(act, gate_up, rows, slots, gather_rows, groups, layer):
    """Scalar-loop reference of one layer: features of gathering rows at this
    layer's columns (pre-steering), then alpha * delta on steered rows."""
    act = act.clone().double()
    feats = {}
    for t, g in enumerate(gather_rows):
        if g:
            fi = groups[g - 1].feat_idx[layer]
            for f, c in enumerate(fi.tolist()):
                if c >= 0:
                    a, u = float(gate_up[t, c]), float(gate_up[t, I + c])
                    feats[(t, f)] = a / (1 + np.exp(-a)) * u
    for t, s in enumerate(rows):
        if s:
            p, alpha = slots[s - 1]
            for c, v in zip(p.idx[layer].tolist(), p.delta[layer].tolist()):
                if c >= 0:
                    act[t, c] = float(act[t, c]) + alpha * v
    return act, feats


@pytest.fixture
def interpreter():
    interpret_or_skip()


class NoHostReads:
    """Make every way of reading a tensor back to Python raise."""

    NAMES = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "nonzero")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def refuse(name):
            def f(*a, **k):
                raise AssertionError(f"the kernel path read a tensor back: Tensor.{name}")
            return f

        for n in self.NAMES:
            setattr(torch.Tensor, n, refuse(n))

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def test_kernel_path_over_changing_batches(interpreter, monkeypatch):
    from adaras.engine import step

    rng = np.random.default_rng(0)
    steer = step.StepBuffers(T_MAX, SLOTS, L, I, torch.device("cpu"))
    gather = step.GatherBuffers(T_MAX, SLOTS, torch.device("cpu"), max_features=F_MAX)
    capture = step.CaptureBuffers(T_MAX, CAPS, L, I, torch.device("cpu"))
    kernels = step.KernelPath(steer, gather, capture)
    buffers = [steer.row_slot, steer.steer_idx, steer.steer_val, gather.feat_slot,
               gather.feat_layer, gather.feat_col, gather.feats, capture.cap_slot,
               capture.cap_sum]
    ptrs = [(id(b), b.data_ptr()) for b in buffers]
    profiles = [profile(rng, k, f) for k, f in ((4, 5), (7, 20), (2, 32))]
    taken = [capture.take() for _ in range(CAPS)]
    assert taken == [1, 2, 3, 4] and capture.take() is None
    want_sum = torch.zeros(L, CAPS + 1, I, dtype=torch.float64)
    launches = []
    for name in ("sum_slots_", "gather_slots_", "sparse_steer_"):
        real = getattr(step, name)

        def spy(*a, _name=name, _real=real, **k):
            launches.append((_name, a[-1] if _name == "gather_slots_" else None))
            return _real(*a, **k)

        monkeypatch.setattr(step, name, spy)
    per_step = []
    for n in range(6):  # batch mixes: nothing, steering only, gathering only, both, ...
        T = int(rng.integers(1, T_MAX + 1))
        n_slots = 0 if n == 0 else int(rng.integers(1, 4))
        slots = tuple((profiles[int(rng.integers(0, 3))], float(rng.choice([0.3, 1.0, 2.5])))
                      for _ in range(n_slots))
        rows = rng.integers(0, n_slots + 1, T).astype(np.int32) if n_slots else None
        groups = tuple(profiles[i] for i in range(int(rng.integers(0, 3)) if n != 2 else 2))
        gather_rows = rng.integers(0, len(groups) + 1, T).astype(np.int32) if groups else None
        cap_rows = None
        if n % 3:  # capturing rows: runs of one slot (prompt chunks) and single rows
            cap_rows = np.repeat(rng.integers(0, CAPS + 1, 4), rng.integers(1, 6, 4))
            cap_rows = np.resize(cap_rows, T).astype(np.int32)
        steer.fill(slots, rows, plan=False)
        gather.fill(tuple(p.feat_idx for p in groups), gather_rows)
        capture.fill(cap_rows)
        before = len(launches)
        for layer in range(L):
            act = torch.randn(T, I).to(torch.float32)
            gate_up = torch.randn(T, 2 * I)
            want, feats = reference(act, gate_up, rows if rows is not None else [0] * T,
                                    slots, gather_rows if gather_rows is not None else [0] * T,
                                    groups, layer)
            for t, c in enumerate(cap_rows if cap_rows is not None else []):
                if c:
                    want_sum[layer, c] += act[t].double()  # before steering
            with NoHostReads():
                step.launch_kernels_(act, gate_up, layer, kernels)
            torch.testing.assert_close(act.double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(capture.cap_sum[layer].double(), want_sum[layer],
                                       rtol=1e-5, atol=1e-5)
            for (t, f), v in feats.items():
                assert float(gather.feats[t, f]) == pytest.approx(v, rel=1e-5, abs=1e-6)
        per_step.append(launches[before:])
    assert all(s == per_step[0] for s in per_step), "the launches depend on the batch"
    assert per_step[0] == [(n, layer if n == "gather_slots_" else None) for layer in range(L)
                           for n in ("sum_slots_", "gather_slots_", "sparse_steer_")]
    assert [(id(b), b.data_ptr()) for b in buffers] == ptrs  # nothing reallocated


def test_kernel_path_in_fresh_process(tmp_path):
    rerun_in_fresh_process(__file__, tmp_path)


def test_the_runtimes_capture_on_the_kernel_path(interpreter, monkeypatch, tmp_path):
    """The worker runtime on the kernel path, driven by hand over chunked
    prompts with changing batch mixes (captures of means and tokens, a
    preemption, a steered and an adaptive request; the forward simulated by
    launch_kernels_ on random activations): each capture equals a reference
    made from the activations it was fed, no step allocates or moves a
    buffer, the launch reads nothing back and is the same every step, a
    mean capture that finds no free slot and an adaptive request that also
    captures tokens get error results, and a freed slot serves the next."""
    from adaras.engine import step
    from adaras.engine.runtime import SteeringRuntime
    from adaras.predictor import FailurePredictor
    from adaras.profile import ModelShape, SteeringProfile

    monkeypatch.setenv("ADARAS_KERNEL_PATH", "1")
    monkeypatch.setenv("ADARAS_CAPTURE_SLOTS", "2")
    monkeypatch.delenv("ADARAS_PROFILES", raising=False)
    monkeypatch.delenv("ADARAS_DEFAULT_PROFILE", raising=False)
    shape = ModelShape("Qwen3ForCausalLM", num_layers=L, intermediate_size=I, hidden_size=16)
    prof = SteeringProfile.random("pred", shape, k=6, seed=3, scale=1.0)
    prof.predictor = FailurePredictor(torch.tensor([0, 2, 1], dtype=torch.int32),
                                      torch.tensor([5, 9, 33], dtype=torch.int32), hidden=4)
    prof.save(tmp_path / "pred.safetensors")
    rt = SteeringRuntime(shape, 0, 1, torch.device("cpu"), max_tokens=T_MAX, max_requests=8)
    rt.load_profile("pred", str(tmp_path / "pred.safetensors"))
    kernels = step.kernel_path()
    buffers = [kernels.steer.row_slot, kernels.steer.steer_idx, kernels.steer.steer_val,
               kernels.gather.feat_slot, kernels.gather.feat_layer, kernels.gather.feat_col,
               kernels.gather.feats, kernels.capture.cap_slot, kernels.capture.cap_sum]
    ptrs = [(id(b), b.data_ptr()) for b in buffers]

    features = [[0, 3], [2, 39], [1, 0], [1, 17]]
    cap = lambda **spec: {"adaras_capture": spec}  # noqa: E731
    requests = {  # id: (arrives at step, prompt length, extra_args)
        "m": (0, 23, cap(mean_from=3)),
        "t": (0, 12, cap(mean_from=0, features=features, tokens_until=9)),
        "x": (1, 6, cap(mean_from=1)),  # both slots are taken: an error
        "s": (1, 5, {"steering": {"mode": "always", "profile": "pred"}}),
        "f": (2, 7, cap(features=features[:2])),  # tokens only: needs no slot
        "a": (2, 9, {**cap(features=features), "steering": {"mode": "adaptive",
                                                               "profile": "pred"}}),
        "y": (6, 10, cap(mean_from=2, features=features)),  # a freed slot
    }
    computed = {rid: 0 for rid in requests}
    decoded = {rid: 0 for rid in requests}
    first_seen: dict = {}  # (rid, layer, position) -> (act row, gate_up row) first computed
    launches, per_step = [], []
    for name in ("sum_slots_", "gather_slots_", "sparse_steer_"):
        real = getattr(step, name)

        def spy(*a, _name=name, _real=real, **k):
            launches.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(step, name, spy)
    rng = torch.Generator().manual_seed(7)
    admitted, finished = set(), set()
    for n_step in range(14):
        if n_step == 3:
            computed["m"] = 0  # preempted: recomputes its prompt from token 0
        budget, sched = T_MAX, []
        for rid, (arrives, prompt, _) in requests.items():
            if arrives > n_step or rid in finished or budget == 0:
                continue
            n = min(prompt - computed[rid], budget, 7) if computed[rid] < prompt else 1
            sched.append((rid, n))
            budget -= n
        ids = [rid for rid, _ in sched]
        new = [(rid, SimpleNamespace(extra_args=requests[rid][2])) for rid in ids
               if rid not in admitted]
        admitted.update(ids)
        ctx = rt.begin_step(ids, {rid: i for i, rid in enumerate(ids)},
                            np.array([n for _, n in sched]), np.array([computed[r] for r in ids]),
                            np.array([requests[r][1] for r in ids]), new)
        if ctx is not None:  # else the plain graph runs: no op, no launch
            assert (ctx.cap_sum, ctx.cap_feats, ctx.feats, ctx.cap_rows) == (None,) * 4
            T = sum(n for _, n in sched)
            before = len(launches)
            for layer in range(L):
                act = torch.randn(T, I, generator=rng)
                gate_up = torch.randn(T, 2 * I, generator=rng)
                row = 0
                for rid, n in sched:
                    for j in range(n):
                        first_seen.setdefault((rid, layer, computed[rid] + j),
                                              (act[row].clone(), gate_up[row].clone()))
                        row += 1
                with NoHostReads():
                    step.launch_kernels_(act, gate_up, layer, kernels)
            per_step.append(launches[before:])
        rt.end_step()
        for rid, n in sched:
            computed[rid] += n
            if computed[rid] > requests[rid][1]:
                decoded[rid] += 1
                if decoded[rid] == 2:
                    finished.add(rid)
                    rt.release(rid)
    assert finished == set(requests)
    assert all(s == per_step[0] for s in per_step), "the launches depend on the batch"
    assert per_step[0] == ["sum_slots_", "gather_slots_", "sparse_steer_"] * L
    assert [(id(b), b.data_ptr()) for b in buffers] == ptrs  # nothing reallocated

    caps = rt.pop_captures(list(requests))
    assert set(caps) == {"m", "t", "x", "f", "a", "y"}
    assert "ADARAS_CAPTURE_SLOTS" in caps["x"]["error"]
    assert "adaptive" in caps["a"]["error"]

    def array(raw):
        return torch.from_numpy(np.frombuffer(raw[0], dtype=np.float32).reshape(raw[1]).copy())

    for rid in ("m", "t", "f", "y"):
        _, prompt, extra = requests[rid]
        spec = extra["adaras_capture"]
        got = caps[rid]
        if "mean_from" in spec:
            start = spec["mean_from"]
            assert got["count"] == prompt - start
            want = torch.stack([torch.stack([first_seen[(rid, layer, p)][0]
                                             for p in range(start, prompt)]).double().mean(0)
                                for layer in range(L)])  # [L, I]
            torch.testing.assert_close(array(got["mean"]).double(), want, rtol=1e-5, atol=1e-5)
        else:
            assert "mean" not in got
        if "features" in spec:
            until = min(spec.get("tokens_until", prompt), prompt)
            silu_mul = lambda g, c: float(torch.nn.functional.silu(g[c]) * g[I + c])  # noqa: E731
            want = torch.tensor([[silu_mul(first_seen[(rid, layer, p)][1], c)
                                  for layer, c in spec["features"]] for p in range(until)])
            torch.testing.assert_close(array(got["tokens"]), want, rtol=1e-5, atol=1e-5)
    assert rt.stats()["captures"] == 0 and len(rt.capture.buffers._free) == 2
