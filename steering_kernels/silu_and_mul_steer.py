"""Fused SiLU-and-mul + sparse activation steering + feature gather.

Math
----
The MLP of a gated (SwiGLU) block produces ``gate_up = x @ [W_gate | W_up]``
of shape ``[T, 2*I]``.  With ``g = gate_up[:, :I]`` and ``u = gate_up[:, I:]``
the activation is ``a = silu(g) * u`` (``silu(x) = x * sigmoid(x)``).

Steering adds a *sparse* vector to ``a`` per token.  Each token ``t`` carries a
slot ``s = row_slot[t]``; slot 0 means "not steered".  Slot ``s > 0`` selects a
row of two small tables: ``steer_idx[s, :K]`` (column indices in ``[0, I)``,
``-1`` = padding) and ``steer_val[s, :K]`` (values, alpha already folded in)::

    out[t, j] = cast( a32[t, j] + sum_k [steer_idx[s, k] == j] * steer_val[s, k] )
    a32       = silu(float32(g)) * float32(u)

i.e. everything is done in float32 and rounded to ``gate_up.dtype`` exactly
once.  Duplicate indices in one slot add up.  Rows with slot 0 get no add.

Feature read-out (e.g. for SAE / probe monitoring) returns the *unsteered*
fp32 activation at a few columns::

    feats[t, f] = a32[t, feat_idx[f]]   if 0 <= feat_idx[f] < I   else 0

(``feat_idx[f] == -1`` means "feature lives on another tensor-parallel shard").

Column indices outside ``[0, I)`` are treated as padding by every path here.
Slot values are NOT range-checked (that would need a device sync); callers must
guarantee ``0 <= row_slot < S``.

Public API
----------
* ``silu_and_mul_steer_native``  pure torch; reference and production CPU path.
* ``apply_sparse_steer_``        in-place sparse add on an existing activation.
* ``gather_features``            fp32 activation at selected columns only.
* ``silu_and_mul_steer``         one Triton launch doing all of the above.
* ``silu_and_mul_steer_auto``    Triton on CUDA (if importable), native otherwise.
* ``sparse_steer_``              Triton twin of ``apply_sparse_steer_`` for an
                                 activation from vLLM's own ``silu_and_mul``:
                                 one program per row, touching only a steered
                                 row's table columns (the engine's CUDA path).

Importing this module never requires triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # triton is optional: the CPU product path is pure torch.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "apply_sparse_steer_",
    "gather_features",
    "silu_and_mul_steer",
    "silu_and_mul_steer_auto",
    "silu_and_mul_steer_native",
    "sparse_steer_",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- #
# Validation (shapes / dtypes / devices only: no value checks, no device sync)
# --------------------------------------------------------------------------- #
def _check_tables(steer_idx: torch.Tensor, steer_val: torch.Tensor, device: torch.device) -> None:
    if not isinstance(steer_idx, torch.Tensor) or steer_idx.dim() != 2:
        raise ValueError(f"steer_idx must be a 2-D [S, K] tensor, got {_desc(steer_idx)}")
    if steer_idx.dtype != torch.int32:
        raise ValueError(f"steer_idx must be int32, got {steer_idx.dtype}")
    if not isinstance(steer_val, torch.Tensor) or steer_val.dim() != 2:
        raise ValueError(f"steer_val must be a 2-D [S, K] tensor, got {_desc(steer_val)}")
    if steer_val.dtype != torch.float32:
        raise ValueError(f"steer_val must be float32, got {steer_val.dtype}")
    if steer_val.shape != steer_idx.shape:
        raise ValueError(
            f"steer_val shape {tuple(steer_val.shape)} must match steer_idx shape {tuple(steer_idx.shape)}"
        )
    for name, t in (("steer_idx", steer_idx), ("steer_val", steer_val)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")


def _check_row_slot(row_slot: torch.Tensor, T: int, device: torch.device) -> None:
    if not isinstance(row_slot, torch.Tensor) or row_slot.dim() != 1:
        raise ValueError(f"row_slot must be a 1-D [T] tensor, got {_desc(row_slot)}")
    if row_slot.dtype != torch.int32:
        raise ValueError(f"row_slot must be int32, got {row_slot.dtype}")
    if row_slot.shape[0] != T:
        raise ValueError(f"row_slot has {row_slot.shape[0]} rows, expected T={T}")
    if row_slot.device != device:
        raise ValueError(f"row_slot is on {row_slot.device}, expected {device}")


def _check_gate_up(gate_up: torch.Tensor) -> tuple[int, int]:
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 2:
        raise ValueError(f"gate_up must be a 2-D [T, 2*I] tensor, got {_desc(gate_up)}")
    if gate_up.shape[1] % 2 != 0:
        raise ValueError(f"gate_up last dim must be even (2*I), got {gate_up.shape[1]}")
    if gate_up.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"gate_up dtype must be one of {_FLOAT_DTYPES}, got {gate_up.dtype}")
    return gate_up.shape[0], gate_up.shape[1] // 2


def _check_feat_idx(feat_idx: torch.Tensor | None, device: torch.device) -> None:
    if feat_idx is None:
        return
    if not isinstance(feat_idx, torch.Tensor) or feat_idx.dim() != 1:
        raise ValueError(f"feat_idx must be None or a 1-D [F] tensor, got {_desc(feat_idx)}")
    if feat_idx.dtype != torch.int32:
        raise ValueError(f"feat_idx must be int32, got {feat_idx.dtype}")
    if feat_idx.device != device:
        raise ValueError(f"feat_idx is on {feat_idx.device}, expected {device}")


def _validate(gate_up, row_slot, steer_idx, steer_val, feat_idx) -> tuple[int, int]:
    T, I = _check_gate_up(gate_up)
    _check_row_slot(row_slot, T, gate_up.device)
    _check_tables(steer_idx, steer_val, gate_up.device)
    _check_feat_idx(feat_idx, gate_up.device)
    return T, I


def _desc(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__


# --------------------------------------------------------------------------- #
# Pure torch path
# --------------------------------------------------------------------------- #
def apply_sparse_steer_(
    out: torch.Tensor,  # [T, I], any float dtype; modified in place
    row_slot: torch.Tensor,  # [T] int32, 0 = not steered
    steer_idx: torch.Tensor,  # [S, K] int32, -1 = padding
    steer_val: torch.Tensor,  # [S, K] float32
    *,
    any_steered: bool | None = None,
) -> torch.Tensor:
    """In place: ``out[r, c] = cast(float32(out[r, c]) + sum of steer values for (r, c))``.

    Only the (row, column) pairs named by a steered row's table are read and
    written; rows with slot 0 (and all other columns) stay bit-identical.
    Duplicate columns within one slot are summed in fp32 before the single add.

    ``any_steered``: pass the host-side answer to "is any row steered?" if the
    caller already knows it, to skip the ``row_slot.any()`` check.  (On CUDA the
    sparse path itself still syncs via ``nonzero``/``unique``; the GPU hot path
    is the fused Triton kernel.)  Returns ``out``.
    """
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"out must be a 2-D [T, I] tensor, got {_desc(out)}")
    T, I = out.shape
    _check_row_slot(row_slot, T, out.device)
    _check_tables(steer_idx, steer_val, out.device)

    K = steer_idx.shape[1]
    if T == 0 or I == 0 or K == 0 or any_steered is False:
        return out
    if any_steered is None and not bool(row_slot.any()):
        return out

    rows = row_slot.nonzero().squeeze(1)  # [R] int64, steered rows
    slots = row_slot[rows].long()  # [R]
    idx = steer_idx[slots].long()  # [R, K]
    val = steer_val[slots]  # [R, K] fp32
    valid = (idx >= 0) & (idx < I)  # [R, K]

    # Flat key r * I + c identifies an output element; unique() merges duplicates.
    key = (rows.unsqueeze(1) * I + idx)[valid]  # [N] int64
    if key.numel() == 0:
        return out
    ukey, inv = torch.unique(key, return_inverse=True)  # [U], [N]
    delta = torch.zeros(ukey.shape[0], dtype=torch.float32, device=out.device)  # [U]
    delta.index_add_(0, inv, val[valid])
    ur, uc = ukey // I, ukey % I  # [U], [U]
    out[ur, uc] = (out[ur, uc].float() + delta).to(out.dtype)
    return out


def gather_features(
    gate_up: torch.Tensor,  # [T, 2*I]
    feat_idx: torch.Tensor,  # [F] int32, -1 = not on this shard
) -> torch.Tensor:
    """fp32 ``silu(g) * u`` at columns ``feat_idx`` only; 0 where the index is -1.

    Returns ``feats: [T, F] float32``.  Does not compute the full activation.
    """
    T, I = _check_gate_up(gate_up)
    if feat_idx is None:
        raise ValueError("feat_idx must be a 1-D [F] int32 tensor, got None")
    _check_feat_idx(feat_idx, gate_up.device)
    Fn = feat_idx.shape[0]
    if T == 0 or Fn == 0 or I == 0:
        return torch.zeros((T, Fn), dtype=torch.float32, device=gate_up.device)

    valid = (feat_idx >= 0) & (feat_idx < I)  # [F]
    col = torch.where(valid, feat_idx, 0).long()  # [F], safe index
    g = gate_up[:, col].float()  # [T, F]
    u = gate_up[:, col + I].float()  # [T, F]
    feats = F.silu(g) * u  # [T, F] fp32
    return torch.where(valid.unsqueeze(0), feats, torch.zeros((), dtype=torch.float32, device=feats.device))


def silu_and_mul_steer_native(
    gate_up: torch.Tensor,  # [T, 2*I] fp32/bf16/fp16
    row_slot: torch.Tensor,  # [T] int32
    steer_idx: torch.Tensor,  # [S, K] int32
    steer_val: torch.Tensor,  # [S, K] float32
    feat_idx: torch.Tensor | None = None,  # [F] int32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure-torch reference.  Returns ``(out [T, I] gate_up.dtype, feats [T, F] fp32 | None)``."""
    T, I = _validate(gate_up, row_slot, steer_idx, steer_val, feat_idx)
    feats = gather_features(gate_up, feat_idx) if feat_idx is not None else None  # [T, F]

    act = F.silu(gate_up[:, :I].float()) * gate_up[:, I:].float()  # [T, I] fp32
    apply_sparse_steer_(act, row_slot, steer_idx, steer_val)  # fp32 add, no rounding
    out = act.to(gate_up.dtype)  # [T, I], the single cast
    return out, feats


# --------------------------------------------------------------------------- #
# Triton path
# --------------------------------------------------------------------------- #
def _silu_and_mul_steer_kernel(
    gate_up_ptr,  # [T, 2*I], row stride stride_gu, col stride 1
    row_slot_ptr,  # [T] int32
    steer_idx_ptr,  # [S, K] int32, contiguous
    steer_val_ptr,  # [S, K] fp32, contiguous
    feat_idx_ptr,  # [F] int32
    out_ptr,  # [T, I] contiguous
    feats_ptr,  # [T, F] fp32 contiguous
    I,
    K,
    NF,
    stride_gu,
    NUM_COL_BLOCKS,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    HAS_STEER: tl.constexpr,
):
    # grid = (T, NUM_COL_BLOCKS + NUM_FEAT_BLOCKS): axis 1 first covers the
    # output columns, then (if F > 0) the feature columns of the same row.
    row = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    g_row = gate_up_ptr + row * stride_gu  # gate row start; up = g_row + I

    if pid < NUM_COL_BLOCKS:
        cols = pid * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
        cmask = cols < I
        g = tl.load(g_row + cols, mask=cmask, other=0.0).to(tl.float32)
        u = tl.load(g_row + I + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = g * tl.sigmoid(g) * u  # [BLOCK_I] fp32

        if HAS_STEER:
            slot = tl.load(row_slot_ptr + row).to(tl.int64)
            if slot != 0:
                # Table row in chunks of BLOCK_K: tile [BLOCK_I, BLOCK_K] compare.
                tbl = slot * K
                add = tl.zeros([BLOCK_I], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
                    kmask = ks < K
                    idx = tl.load(steer_idx_ptr + tbl + ks, mask=kmask, other=-1)
                    val = tl.load(steer_val_ptr + tbl + ks, mask=kmask, other=0.0)
                    hit = cols[:, None] == idx[None, :]  # [BLOCK_I, BLOCK_K]
                    add += tl.sum(tl.where(hit, val[None, :], 0.0), axis=1)
                acc = acc + add

        tl.store(out_ptr + row * I + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)
    else:
        fs = (pid - NUM_COL_BLOCKS) * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F]
        fmask = fs < NF
        c = tl.load(feat_idx_ptr + fs, mask=fmask, other=-1)
        ok = fmask & (c >= 0) & (c < I)
        # Distinct names from the then-branch: the compiler (not the interpreter)
        # rejects a name bound in both branches with different shapes.
        fg = tl.load(g_row + c, mask=ok, other=0.0).to(tl.float32)
        fu = tl.load(g_row + I + c, mask=ok, other=0.0).to(tl.float32)
        f = tl.where(ok, fg * tl.sigmoid(fg) * fu, 0.0)  # pre-steer activation, fp32
        tl.store(feats_ptr + row * NF + fs, f, mask=fmask)


# The kernel is jitted lazily (not with a module-level @triton.jit) because
# triton decides "compiled vs interpreter" (TRITON_INTERPRET) at decoration time,
# so importing this module does not freeze the mode.  Triton's own @jit helpers
# (tl.sum, tl.sigmoid, ...) are frozen when `triton.language` is first imported
# (e.g. by vllm), so the env var must still be set before that import.
_JITTED: dict = {}


def _jit(fn):
    interpret = bool(triton.knobs.runtime.interpret)
    lang_interpreted = not isinstance(tl.sum, triton.runtime.jit.JITFunction)
    if interpret != lang_interpreted:
        raise RuntimeError(
            f"TRITON_INTERPRET={int(interpret)} but triton.language was imported with "
            f"TRITON_INTERPRET={int(lang_interpreted)}; set the variable before anything "
            "imports triton (vllm does)"
        )
    jitted = _JITTED.get((fn, interpret))
    if jitted is None:
        jitted = _JITTED[(fn, interpret)] = triton.jit(fn)
    return jitted


def _kernel():
    return _jit(_silu_and_mul_steer_kernel)


_MAX_BLOCK_I = 1024
_MAX_BLOCK_F = 256
# Max BLOCK_I * BLOCK_K elements of the steering compare tile.  With
# BLOCK_I=1024, BLOCK_K=4, num_warps=8 ptxas (sm_80) reports ~40 registers and
# no spills; 8192 with 4 warps needed 128 registers.  Untuned on real GPUs.
_TILE_BUDGET = 4096


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _launch_config(I: int, K: int, NF: int) -> dict:
    """Block sizes (constexprs) and num_warps for the kernel; pure python."""
    block_i = min(_next_pow2(max(I, 1)), _MAX_BLOCK_I)
    return {
        "BLOCK_I": block_i,
        # K is looped over in chunks so the [BLOCK_I, BLOCK_K] tile stays in registers.
        "BLOCK_K": max(1, min(_next_pow2(max(K, 1)), _TILE_BUDGET // block_i)),
        "BLOCK_F": min(_next_pow2(max(NF, 1)), _MAX_BLOCK_F),
        "HAS_STEER": K > 0,
        "num_warps": 8 if block_i >= 1024 else 4,
    }


def silu_and_mul_steer(
    gate_up: torch.Tensor,  # [T, 2*I] fp32/bf16/fp16, stride(1) == 1
    row_slot: torch.Tensor,  # [T] int32
    steer_idx: torch.Tensor,  # [S, K] int32
    steer_val: torch.Tensor,  # [S, K] float32
    feat_idx: torch.Tensor | None = None,  # [F] int32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused Triton kernel; same contract as ``silu_and_mul_steer_native``.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if not HAS_TRITON:
        raise RuntimeError("silu_and_mul_steer requires triton; use silu_and_mul_steer_native")
    T, I = _validate(gate_up, row_slot, steer_idx, steer_val, feat_idx)
    if gate_up.shape[1] > 1 and gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must have last-dim stride 1, got strides {tuple(gate_up.stride())}")
    dev = gate_up.device
    K = steer_idx.shape[1]
    NF = feat_idx.shape[0] if feat_idx is not None else 0

    out = torch.empty((T, I), dtype=gate_up.dtype, device=dev)  # [T, I]
    feats = torch.empty((T, NF), dtype=torch.float32, device=dev) if feat_idx is not None else None  # [T, F]
    if T == 0 or (I == 0 and NF == 0):
        return out, feats
    if I == 0:  # nothing to gather from: every feature is "absent"
        feats.zero_()
        return out, feats

    steer_idx = steer_idx.contiguous()  # [S, K]
    steer_val = steer_val.contiguous()  # [S, K]
    row_slot = row_slot.contiguous()  # [T]
    fidx = feat_idx.contiguous() if NF > 0 else row_slot  # [F]; dummy pointer when F == 0

    cfg = _launch_config(I, K, NF)
    num_col_blocks = triton.cdiv(I, cfg["BLOCK_I"])
    num_feat_blocks = triton.cdiv(NF, cfg["BLOCK_F"])

    grid = (T, num_col_blocks + num_feat_blocks)
    _kernel()[grid](
        gate_up, row_slot, steer_idx, steer_val, fidx, out,
        feats if feats is not None else steer_val,  # fp32; a dummy when F == 0 (never written)
        I, K, NF, gate_up.stride(0), num_col_blocks,
        **cfg,
    )
    return out, feats


def silu_and_mul_steer_auto(
    gate_up: torch.Tensor,  # [T, 2*I]
    row_slot: torch.Tensor,  # [T] int32
    steer_idx: torch.Tensor,  # [S, K] int32
    steer_val: torch.Tensor,  # [S, K] float32
    feat_idx: torch.Tensor | None = None,  # [F] int32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton kernel for CUDA tensors when triton is importable, native torch otherwise."""
    if HAS_TRITON and isinstance(gate_up, torch.Tensor) and gate_up.is_cuda:
        return silu_and_mul_steer(gate_up, row_slot, steer_idx, steer_val, feat_idx)
    return silu_and_mul_steer_native(gate_up, row_slot, steer_idx, steer_val, feat_idx)


# --------------------------------------------------------------------------- #
# Sparse add on an existing activation (Triton twin of apply_sparse_steer_)
# --------------------------------------------------------------------------- #
def _sparse_steer_kernel(
    act_ptr,  # [T, I], row stride stride_act, col stride 1; modified in place
    row_slot_ptr,  # [T] int32
    steer_idx_ptr,  # [S, K] int32, row stride stride_tbl, col stride 1
    steer_val_ptr,  # [S, K] fp32, same strides as steer_idx
    I,
    K,
    stride_act,
    stride_tbl,
    BLOCK_K: tl.constexpr,
):
    # grid = (T,). A row with slot 0 reads one int32 and stops; a steered row
    # reads and writes only its slot's K columns. No host sync, no allocation:
    # the launch depends on T only, so it can be captured in a CUDA graph.
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(row_slot_ptr + row).to(tl.int64)
    if slot != 0:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            kmask = ks < K
            col = tl.load(steer_idx_ptr + slot * stride_tbl + ks, mask=kmask, other=-1)
            val = tl.load(steer_val_ptr + slot * stride_tbl + ks, mask=kmask, other=0.0)
            ok = kmask & (col >= 0) & (col < I)
            ptr = act_ptr + row * stride_act + col
            a = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
            tl.store(ptr, (a + val).to(act_ptr.dtype.element_ty), mask=ok)


def sparse_steer_(
    act: torch.Tensor,  # [T, I] fp32/bf16/fp16, stride(1) == 1; modified in place
    row_slot: torch.Tensor,  # [T] int32, 0 = not steered
    steer_idx: torch.Tensor,  # [S, K] int32, -1 = padding, stride(1) == 1
    steer_val: torch.Tensor,  # [S, K] float32, strides of steer_idx
) -> torch.Tensor:
    """In place, as ``apply_sparse_steer_``: ``act[r, c] = cast(float32(act[r, c]) + v)``
    for each (column c, value v) of row r's slot. Unlike the native twin, the
    columns of one slot must be distinct (a profile's always are: its (layer,
    neuron) pairs are unique), since the K adds of a row run in parallel.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    Only shapes are checked (no device sync). Returns ``act``."""
    if not HAS_TRITON:
        raise RuntimeError("sparse_steer_ requires triton; use apply_sparse_steer_")
    if not isinstance(act, torch.Tensor) or act.dim() != 2:
        raise ValueError(f"act must be a 2-D [T, I] tensor, got {_desc(act)}")
    if act.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"act dtype must be one of {_FLOAT_DTYPES}, got {act.dtype}")
    T, I = act.shape
    _check_row_slot(row_slot, T, act.device)
    _check_tables(steer_idx, steer_val, act.device)
    if steer_idx.stride() != steer_val.stride() or (steer_idx.shape[1] > 1 and steer_idx.stride(1) != 1):
        raise ValueError(f"steer_idx and steer_val need the same strides with a unit last one, "
                         f"got {tuple(steer_idx.stride())} and {tuple(steer_val.stride())}")
    if I > 1 and act.stride(1) != 1:
        raise ValueError(f"act must have last-dim stride 1, got strides {tuple(act.stride())}")
    K = steer_idx.shape[1]
    if T == 0 or I == 0 or K == 0:
        return act
    _jit(_sparse_steer_kernel)[(T,)](
        act, row_slot, steer_idx, steer_val, I, K, act.stride(0), steer_idx.stride(0),
        BLOCK_K=min(_next_pow2(K), 256),
    )
    return act
