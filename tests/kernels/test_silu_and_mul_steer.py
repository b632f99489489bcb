"""Tests for steering_kernels.silu_and_mul_steer.

The Triton kernel is run on CPU through the Triton interpreter and compared
against the pure-torch reference, which is itself checked against a naive
Python loop.  TRITON_INTERPRET=1 is set in conftest.py; the package jits its
kernel lazily at first launch, so the variable only has to be set before the
first kernel call.  Because the interpreter skips the compiler, one test also
compiles the kernel to a CUDA cubin (no GPU needed).
"""

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import steering_kernels as sk
from steering_kernels import (
    apply_sparse_steer_,
    gather_features,
    silu_and_mul_steer_auto,
    silu_and_mul_steer_native,
)

from .fresh import interpret_or_skip, rerun_in_fresh_process

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def make_case(T, I, S=4, K=5, F_=6, dtype=torch.float32, strided=False, seed=0):
    """Random inputs honouring the contract; tables contain padding (-1) and duplicates."""
    gen = torch.Generator().manual_seed(seed)
    pad = 3 if strided else 0
    base = torch.randn(T, 2 * I + pad, generator=gen).mul_(2).to(dtype)  # [T, 2I+pad]
    gate_up = base[:, :2 * I]  # [T, 2I], row stride 2I+pad when strided
    if strided and T > 1 and I > 0:
        assert not gate_up.is_contiguous()

    steer_idx = torch.randint(0, max(I, 1), (S, K), generator=gen, dtype=torch.int32)  # [S, K]
    steer_val = torch.randn(S, K, generator=gen) * 3  # [S, K]
    if K > 0:
        pad_mask = torch.rand(S, K, generator=gen) < 0.3
        steer_idx[pad_mask] = -1
        steer_val[pad_mask] = 0.0
        if S > 1 and K > 1:
            steer_idx[1, 1] = steer_idx[1, 0] = min(3, I - 1)  # duplicate column in one slot
    steer_idx[0] = -1
    steer_val[0] = 0.0

    row_slot = torch.randint(0, S, (T,), generator=gen, dtype=torch.int32)  # [T]
    if T > 0:
        row_slot[0] = 0  # at least one unsteered row
    if T > 1:
        row_slot[1] = S - 1  # at least one steered row

    feat_idx = torch.randint(0, max(I, 1), (F_,), generator=gen, dtype=torch.int32)  # [F]
    if F_ > 1:
        feat_idx[::3] = -1
    return gate_up, row_slot, steer_idx, steer_val, feat_idx


def naive(gate_up, row_slot, steer_idx, steer_val, feat_idx):
    """Independent scalar-loop reference (python floats, i.e. float64)."""
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    out = [[0.0] * I for _ in range(T)]
    feats = [[0.0] * len(feat_idx) for _ in range(T)]
    for t in range(T):
        act = []
        for j in range(I):
            g, u = float(gate_up[t, j]), float(gate_up[t, I + j])
            act.append(g / (1.0 + math.exp(-g)) * u)
        s = int(row_slot[t])
        for j in range(I):
            v = act[j]
            if s != 0:
                for k in range(steer_idx.shape[1]):
                    if int(steer_idx[s, k]) == j:
                        v += float(steer_val[s, k])
            out[t][j] = v
        for f, c in enumerate(feat_idx.tolist()):
            feats[t][f] = act[c] if c >= 0 else 0.0
    return torch.tensor(out, dtype=torch.float64), torch.tensor(feats, dtype=torch.float64)


@pytest.fixture
def kernel():
    interpret_or_skip()
    return sk.silu_and_mul_steer


def test_kernel_tests_in_fresh_process(tmp_path):
    """If the kernel tests cannot run in this process (see conftest.py), rerun the
    whole file in a clean interpreter with TRITON_INTERPRET=1."""
    rerun_in_fresh_process(__file__, tmp_path)



# --------------------------------------------------------------------------- #
# reference checks
# --------------------------------------------------------------------------- #
def test_native_matches_naive_loop():
    args = make_case(T=4, I=9, S=3, K=4, F_=5, strided=True, seed=1)
    out, feats = silu_and_mul_steer_native(*args)
    ref_out, ref_feats = naive(*args)
    assert out.dtype == torch.float32 and feats.dtype == torch.float32
    assert out.shape == (4, 9) and feats.shape == (4, 5)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats.double(), ref_feats, rtol=1e-5, atol=1e-5)
    # the case really exercises steering, padding and duplicates
    assert (args[1] != 0).any() and (args[2][1:] == -1).any()


def test_native_single_cast_bf16():
    gate_up, row_slot, si, sv, fi = make_case(T=5, I=13, dtype=torch.bfloat16, seed=2)
    out, _ = silu_and_mul_steer_native(gate_up, row_slot, si, sv, fi)
    out32, _ = silu_and_mul_steer_native(gate_up.float(), row_slot, si, sv, fi)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, out32.to(torch.bfloat16))  # fp32 math, one rounding at the end


def test_apply_sparse_steer_untouched_rows_bitwise():
    gate_up, row_slot, si, sv, _ = make_case(T=9, I=11, dtype=torch.bfloat16, seed=3)
    base = (F.silu(gate_up[:, :11].float()) * gate_up[:, 11:].float()).to(torch.bfloat16)  # [T, I]
    base[0, :3] = -0.0  # signed zeros must survive in untouched rows
    out = apply_sparse_steer_(base.clone(), row_slot, si, sv)
    unsteered = row_slot == 0
    assert unsteered.any() and (~unsteered).any()
    assert torch.equal(out[unsteered], base[unsteered])
    # untouched columns of steered rows are bit-identical too
    for t in torch.nonzero(~unsteered).flatten().tolist():
        cols = {c for c in si[row_slot[t]].tolist() if c >= 0}
        other = [j for j in range(11) if j not in cols]
        assert torch.equal(out[t, other], base[t, other])
        # touched columns: fp32 add of the summed table values, one cast
        for c in cols:
            v = sv[row_slot[t]][si[row_slot[t]] == c].sum()
            assert out[t, c] == (base[t, c].float() + v).to(torch.bfloat16)


def test_apply_sparse_steer_is_linear_in_values():
    gate_up, row_slot, si, sv, _ = make_case(T=7, I=10, seed=4)
    base = F.silu(gate_up[:, :10]) * gate_up[:, 10:]  # [T, I] fp32
    d1 = apply_sparse_steer_(base.clone(), row_slot, si, sv) - base
    d2 = apply_sparse_steer_(base.clone(), row_slot, si, sv * 2) - base
    assert d1.abs().sum() > 0
    torch.testing.assert_close(d2, 2 * d1)


def test_apply_sparse_steer_noop_cases():
    gate_up, row_slot, si, sv, _ = make_case(T=6, I=8, seed=5)
    base = torch.randn(6, 8)
    out = base.clone()
    assert apply_sparse_steer_(out, torch.zeros(6, dtype=torch.int32), si, sv) is out
    assert torch.equal(out, base)
    assert torch.equal(apply_sparse_steer_(out, row_slot, si, sv, any_steered=False), base)
    empty_i, empty_v = si[:, :0], sv[:, :0]  # K == 0
    assert torch.equal(apply_sparse_steer_(out, row_slot, empty_i, empty_v), base)


def test_gather_features_only_reads_requested_columns():
    gate_up, _, _, _, _ = make_case(T=3, I=8, seed=6)
    gate_up = gate_up.clone()
    fi = torch.tensor([2, -1, 5, 5], dtype=torch.int32)
    poisoned = gate_up.clone()
    for c in range(8):
        if c not in (2, 5):
            poisoned[:, c] = float("nan")
            poisoned[:, 8 + c] = float("inf")
    feats = gather_features(poisoned, fi)  # [T, F]
    assert feats.dtype == torch.float32 and feats.shape == (3, 4)
    assert torch.isfinite(feats).all()
    act = F.silu(gate_up[:, :8]) * gate_up[:, 8:]
    torch.testing.assert_close(feats[:, 0], act[:, 2])
    torch.testing.assert_close(feats[:, 2], act[:, 5])
    assert torch.equal(feats[:, 1], torch.zeros(3))


def test_auto_dispatch_cpu_uses_native():
    args = make_case(T=3, I=7, seed=7)
    out_a, f_a = silu_and_mul_steer_auto(*args)
    out_n, f_n = silu_and_mul_steer_native(*args)
    assert torch.equal(out_a, out_n) and torch.equal(f_a, f_n)


# --------------------------------------------------------------------------- #
# kernel vs native
# --------------------------------------------------------------------------- #
def test_interpreter_is_active(kernel):
    from triton.runtime.interpreter import InterpretedFunction

    # The package attribute `silu_and_mul_steer` is the function; get the module itself.
    mod = importlib.import_module("steering_kernels.silu_and_mul_steer")
    assert isinstance(mod._kernel(), InterpretedFunction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("I", [1, 7, 769])
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_kernel_matches_native(kernel, dtype, I, T, strided):
    K = 20 if I == 769 else 5  # I=769 -> BLOCK_K chunk of 8: multi-iteration K loop
    args = make_case(T, I, S=4, K=K, F_=7, dtype=dtype, strided=strided, seed=T * 1000 + I)
    out_k, f_k = kernel(*args)
    out_n, f_n = silu_and_mul_steer_native(*args)
    assert out_k.dtype == dtype and out_k.shape == (T, I)
    assert f_k.dtype == torch.float32 and f_k.shape == (T, 7)
    torch.testing.assert_close(out_k, out_n)
    torch.testing.assert_close(f_k, f_n)


@pytest.mark.parametrize(
    "T,I,K,F_",
    [(0, 7, 5, 3), (5, 7, 0, 3), (5, 7, 5, 0), (0, 7, 0, 0), (4, 33, 0, 0)],
    ids=["T0", "K0", "F0", "all0", "K0F0"],
)
def test_kernel_empty_dims(kernel, T, I, K, F_):
    args = make_case(T, I, S=3, K=K, F_=F_, seed=8)
    out_k, f_k = kernel(*args)
    out_n, f_n = silu_and_mul_steer_native(*args)
    assert out_k.shape == out_n.shape == (T, I)
    assert f_k.shape == f_n.shape == (T, F_)
    torch.testing.assert_close(out_k, out_n)
    torch.testing.assert_close(f_k, f_n)


def test_kernel_feat_idx_none_and_all_unsteered(kernel):
    gate_up, _, si, sv, _ = make_case(T=6, I=40, seed=9)
    rs = torch.zeros(6, dtype=torch.int32)
    out_k, f_k = kernel(gate_up, rs, si, sv, None)
    out_n, f_n = silu_and_mul_steer_native(gate_up, rs, si, sv, None)
    assert f_k is None and f_n is None
    torch.testing.assert_close(out_k, out_n)


def test_kernel_features_are_pre_steer_and_padding_is_zero(kernel):
    T, I = 3, 16
    gate_up = torch.randn(T, 2 * I)
    rs = torch.tensor([1, 0, 2], dtype=torch.int32)
    si = torch.tensor([[-1, -1], [4, I], [4, 4]], dtype=torch.int32)  # I: out of range -> padding
    sv = torch.tensor([[0.0, 0.0], [100.0, 7.0], [1.0, 2.0]])
    fi = torch.tensor([4, -1, 99], dtype=torch.int32)  # 99: out of range -> treated as padding
    out, feats = kernel(gate_up, rs, si, sv, fi)
    out_n, feats_n = silu_and_mul_steer_native(gate_up, rs, si, sv, fi)
    torch.testing.assert_close(out, out_n)
    torch.testing.assert_close(feats, feats_n)
    act = F.silu(gate_up[:, :I]) * gate_up[:, I:]
    torch.testing.assert_close(feats[:, 0], act[:, 4])  # unsteered value even on steered rows
    assert torch.equal(feats[:, 1:], torch.zeros(T, 2))
    torch.testing.assert_close(out[0, 4], act[0, 4] + 100.0)
    torch.testing.assert_close(out[0, 5:], act[0, 5:])  # the out-of-range 7.0 went nowhere
    torch.testing.assert_close(out[1], act[1])
    torch.testing.assert_close(out[2, 4], act[2, 4] + 3.0)  # duplicates add


def test_kernel_large_k_many_slots(kernel):
    args = make_case(T=9, I=300, S=6, K=130, F_=40, dtype=torch.bfloat16, seed=10)
    out_k, f_k = kernel(*args)
    out_n, f_n = silu_and_mul_steer_native(*args)
    torch.testing.assert_close(out_k, out_n)
    torch.testing.assert_close(f_k, f_n)


# --------------------------------------------------------------------------- #
# sparse_steer_ (the engine's CUDA path) vs its torch twin apply_sparse_steer_
# --------------------------------------------------------------------------- #
def table_case(T, I, S, L, K, layer, dtype, seed):
    """An activation, a row-slot index with padding rows, and [S, L, K] tables
    whose slots hold distinct columns (as a profile's do) with -1 padding;
    the kernel gets the [S, K] view of one layer, as the engine passes it."""
    gen = torch.Generator().manual_seed(seed)
    act = (torch.randn(T, I, generator=gen) * 2).to(dtype)  # [T, I]
    idx = torch.full((S, L, K), -1, dtype=torch.int32)
    val = torch.zeros(S, L, K)
    for s in range(1, S):
        for l_ in range(L):
            n = int(torch.randint(0, min(K, I) + 1, (1,), generator=gen))
            idx[s, l_, :n] = torch.randperm(I, generator=gen)[:n].to(torch.int32)
            val[s, l_, :n] = torch.randn(n, generator=gen) * 3
    row_slot = torch.randint(0, S, (T,), generator=gen, dtype=torch.int32)
    row_slot[-2:] = 0  # padding rows past the step's tokens
    return act, row_slot, idx[:, layer], val[:, layer]


@pytest.fixture
def sparse_kernel(kernel):
    return sk.sparse_steer_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T,I,K", [(1, 7, 1), (9, 64, 5), (17, 769, 300)])
def test_sparse_kernel_matches_its_torch_twin(sparse_kernel, dtype, T, I, K):
    act, rs, idx, val = table_case(T + 2, I, S=4, L=3, K=K, layer=1, dtype=dtype, seed=T * 7 + I)
    assert not idx.is_contiguous()  # a layer's view of the [S, L, K] buffer
    out_k = sparse_kernel(act.clone(), rs, idx, val)
    out_n = apply_sparse_steer_(act.clone(), rs, idx, val)
    if dtype == torch.bfloat16:
        # Triton's interpreter rounds fp32 -> bf16 toward zero, compiled Triton
        # and torch to nearest even: one bf16 ulp apart at most.
        torch.testing.assert_close(out_k, out_n)
    else:
        assert torch.equal(out_k, out_n)
    unsteered = rs == 0
    assert torch.equal(out_k[unsteered], act[unsteered])  # rows of slot 0: bit for bit


def test_sparse_kernel_touches_only_the_named_columns(sparse_kernel):
    act = torch.arange(24, dtype=torch.float32).view(3, 8)
    rs = torch.tensor([0, 1, 2], dtype=torch.int32)
    idx = torch.tensor([[-1, -1], [2, 8], [7, -1]], dtype=torch.int32)  # 8: out of range
    val = torch.tensor([[0.0, 0.0], [0.5, 9.0], [-1.0, 0.0]])
    want = act.clone()
    want[1, 2] += 0.5
    want[2, 7] -= 1.0
    assert torch.equal(sparse_kernel(act, rs, idx, val), want)


def test_sparse_kernel_refuses_bad_input(sparse_kernel):
    act, rs, idx, val = table_case(5, 16, S=3, L=2, K=4, layer=0, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="row_slot"):
        sparse_kernel(act, rs[:3], idx, val)
    with pytest.raises(ValueError, match="steer_idx"):
        sparse_kernel(act, rs, idx.long(), val)
    with pytest.raises(ValueError, match="same strides"):
        sparse_kernel(act, rs, idx, val.contiguous())
    with pytest.raises(ValueError, match="act"):
        sparse_kernel(act.t().contiguous().t(), rs, idx, val)


_COMPILE_SCRIPT = r"""
import importlib, os, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

try:
    ptxas = triton.knobs.nvidia.ptxas.path
except Exception as e:  # no nvidia backend / ptxas in this triton build
    print("SKIP", repr(e)); sys.exit(0)

mod = importlib.import_module("steering_kernels.silu_and_mul_steer")
fn = JITFunction(mod._silu_and_mul_steer_kernel)
names = fn.arg_names
for dt in ("bf16", "fp16", "fp32"):
    for I, K, NF in ((14336, 128, 300), (769, 20, 7), (7, 1, 1), (1, 0, 0)):
        sig = dict(zip(names, ["*" + dt, "*i32", "*i32", "*fp32", "*i32", "*" + dt, "*fp32",
                               "i32", "i32", "i32", "i64", "i32"]))
        consts = mod._launch_config(I, K, NF)
        num_warps = consts.pop("num_warps")
        for name, v in (("I", I), ("K", K), ("NF", NF)):
            if v == 1:  # the JIT specializes integer args equal to 1 as constexpr
                consts[name] = 1
        for name in names:
            if name in consts:
                sig[name] = "constexpr"
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 80, 32), options={"num_warps": num_warps})
        assert "cubin" in k.asm, list(k.asm)
        # re-run ptxas verbosely on the PTX to check for register spills
        ptx = os.path.join(os.environ["TRITON_CACHE_DIR"], "check.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        info = subprocess.run([ptxas, "-arch=sm_80", "-v", ptx, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
        assert " 0 bytes spill stores" in info, (dt, I, K, NF, info)
sparse = JITFunction(mod._sparse_steer_kernel)
for dt in ("bf16", "fp16", "fp32"):
    sig = dict(zip(sparse.arg_names, ["*" + dt, "*i32", "*i32", "*fp32", "i32", "i32", "i64",
                                      "i64", "constexpr"]))
    k = triton.compile(ASTSource(fn=sparse, signature=sig, constexprs={"BLOCK_K": 128}),
                       target=GPUTarget("cuda", 80, 32), options={"num_warps": 4})
    assert "cubin" in k.asm, list(k.asm)
gmod = importlib.import_module("steering_kernels.gather_slots")
gather = JITFunction(gmod._gather_slots_kernel)
for dt in ("bf16", "fp16", "fp32"):
    sig = dict(zip(gather.arg_names, ["*fp32", "*" + dt, "*i32", "*i32", "*i32", "i32", "i32",
                                      "i32", "i64", "constexpr"]))
    k = triton.compile(ASTSource(fn=gather, signature=sig, constexprs={"BLOCK_F": 256}),
                       target=GPUTarget("cuda", 80, 32), options={"num_warps": 4})
    assert "cubin" in k.asm, list(k.asm)
smod = importlib.import_module("steering_kernels.sum_slots")
summed = JITFunction(smod._sum_slots_kernel)
for dt in ("bf16", "fp16", "fp32"):
    sig = dict(zip(summed.arg_names, ["*fp32", "*" + dt, "*i32", "i32", "i32", "i64", "i64",
                                      "constexpr", "constexpr"]))
    k = triton.compile(ASTSource(fn=summed, signature=sig,
                                 constexprs={"ROWS": smod._ROWS, "BLOCK_I": 256}),
                       target=GPUTarget("cuda", 80, 32), options={"num_warps": 4})
    assert "cubin" in k.asm, list(k.asm)
print("OK")
"""


def test_kernel_compiles_for_cuda_sm80(tmp_path):
    """The interpreter skips the compiler's checks (e.g. if/else type unification).

    Compile the real kernel down to a CUDA cubin (sm_80) in a fresh process,
    which works without a GPU because triton bundles ptxas.
    """
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([_ROOT, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=300)
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
def _good():
    return make_case(T=4, I=6, S=3, K=2, F_=3, seed=11)


def _bad_cases():
    g, rs, si, sv, fi = _good()
    return {
        "gate_up_1d": ((g[0], rs, si, sv, fi), "gate_up"),
        "gate_up_odd": ((g[:, :11], rs, si, sv, fi), "gate_up"),
        "gate_up_int": ((g.to(torch.int32), rs, si, sv, fi), "gate_up"),
        "row_slot_int64": ((g, rs.long(), si, sv, fi), "row_slot"),
        "row_slot_len": ((g, rs[:3], si, sv, fi), "row_slot"),
        "row_slot_2d": ((g, rs[:, None], si, sv, fi), "row_slot"),
        "steer_idx_1d": ((g, rs, si[0], sv, fi), "steer_idx"),
        "steer_idx_int64": ((g, rs, si.long(), sv, fi), "steer_idx"),
        "steer_val_shape": ((g, rs, si, sv[:, :1], fi), "steer_val"),
        "steer_val_fp64": ((g, rs, si, sv.double(), fi), "steer_val"),
        "feat_idx_2d": ((g, rs, si, sv, fi[None]), "feat_idx"),
        "feat_idx_int64": ((g, rs, si, sv, fi.long()), "feat_idx"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_native(case):
    args, name = _bad_cases()[case]
    with pytest.raises(ValueError, match=name):
        silu_and_mul_steer_native(*args)


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_kernel(kernel, case):
    args, name = _bad_cases()[case]
    with pytest.raises(ValueError, match=name):
        kernel(*args)


def test_bad_input_helpers():
    g, rs, si, sv, fi = _good()
    out = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="out"):
        apply_sparse_steer_(out[0], rs, si, sv)
    with pytest.raises(ValueError, match="row_slot"):
        apply_sparse_steer_(out, rs.long(), si, sv)
    with pytest.raises(ValueError, match="steer_val"):
        apply_sparse_steer_(out, rs, si, sv[:, :1])
    with pytest.raises(ValueError, match="feat_idx"):
        gather_features(g, fi.long())
    with pytest.raises(ValueError, match="gate_up"):
        gather_features(g[:, :5], fi)


def test_bad_input_kernel_last_dim_stride(kernel):
    g, rs, si, sv, fi = _good()
    with pytest.raises(ValueError, match="gate_up"):
        kernel(g.t().contiguous().t(), rs, si, sv, fi)  # last-dim stride != 1
