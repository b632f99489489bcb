"""The engine's kernel path (the launch a CUDA graph would capture), run on CPU
tensors under the Triton interpreter across steps with changing batch mixes:
its results equal the CPU path's, it allocates no new buffers, it never reads
a tensor back to the host, and it launches the same kernels every step."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from .fresh import rerun_in_fresh_process
from .test_silu_and_mul_steer import _interpreter_problem

L, I, T_MAX, SLOTS, F_MAX = 3, 40, 16, 6, 32


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
    pytest.importorskip("triton")
    problem = _interpreter_problem()
    if problem:
        pytest.skip(f"{problem}; covered by test_kernel_path_in_fresh_process")


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
    kernels = step.KernelPath(steer, gather)
    buffers = [steer.row_slot, steer.steer_idx, steer.steer_val, gather.feat_slot,
               gather.feat_layer, gather.feat_col, gather.feats]
    ptrs = [(id(b), b.data_ptr()) for b in buffers]
    profiles = [profile(rng, k, f) for k, f in ((4, 5), (7, 20), (2, 32))]
    launches = []
    for name in ("gather_slots_", "sparse_steer_"):
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
        steer.fill(slots, rows, plan=False)
        gather.fill(tuple(p.feat_idx for p in groups), gather_rows)
        before = len(launches)
        for layer in range(L):
            act = torch.randn(T, I).to(torch.float32)
            gate_up = torch.randn(T, 2 * I)
            want, feats = reference(act, gate_up, rows if rows is not None else [0] * T,
                                    slots, gather_rows if gather_rows is not None else [0] * T,
                                    groups, layer)
            with NoHostReads():
                step.launch_kernels_(act, gate_up, layer, kernels)
            torch.testing.assert_close(act.double(), want, rtol=1e-5, atol=1e-5)
            for (t, f), v in feats.items():
                assert float(gather.feats[t, f]) == pytest.approx(v, rel=1e-5, abs=1e-6)
        per_step.append(launches[before:])
    assert all(s == per_step[0] for s in per_step), "the launches depend on the batch"
    assert per_step[0] == [(n, layer if n == "gather_slots_" else None)
                           for layer in range(L) for n in ("gather_slots_", "sparse_steer_")]
    assert [(id(b), b.data_ptr()) for b in buffers] == ptrs  # nothing reallocated


def test_kernel_path_in_fresh_process(tmp_path):
    rerun_in_fresh_process(__file__, tmp_path, _interpreter_problem)
