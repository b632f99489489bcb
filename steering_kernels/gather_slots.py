"""Capture-safe feature gather: a step's rows read their group's feature columns.

The predictor gate reads the prompt rows of adaptive requests, and the answer
probe reads the decode rows of probing requests, each at its own profile's
feature neurons. Like the steering tables, everything lives in buffers
allocated once at their maximum size and filled in place, so the launch has
the same shape every step and a CUDA graph can replay it:

    feat_slot   int32 [T_max]        0 = the row gathers nothing, g > 0 = group g
    feat_layer  int32 [G_max, F_max] the decoder layer of group g's feature f (-1 pad)
    feat_col    int32 [G_max, F_max] its column in this rank's shard (-1: pad or
                                     another shard)
    feats       fp32  [T_max, F_max] out: feats[t, f] = silu(g) * u at (layer, column)

At layer `layer`, for each row t < T with g = feat_slot[t] > 0 and each f with
feat_layer[g, f] == layer and 0 <= feat_col[g, f] < I:

    feats[t, f] = silu(float32(gate[t, c])) * float32(up[t, c])     c = feat_col[g, f]

Every other entry of `feats` is left as it was: a feature lives in one layer,
so the L launches of a forward write disjoint entries, and the caller zeroes
`feats` once per step (features on another shard stay 0 there and are summed
across ranks). Which rows and columns are touched depends only on buffer
contents, never on a Python branch, a host read or an allocation.

``gather_slots_native`` is the torch twin (and the reference);
``gather_slots_`` is the Triton kernel (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .silu_and_mul_steer import HAS_TRITON, _jit, _next_pow2

if HAS_TRITON:
    import triton.language as tl
else:  # pragma: no cover
    tl = None

# The largest predictor a profile may carry, in features per head: the gather
# buffers are [T_max, MAX_FEATURES] fp32 and allocated once.
MAX_FEATURES = 1024


def _check(feats, gate_up, feat_slot, feat_layer, feat_col) -> tuple[int, int]:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2*I], got shape {tuple(gate_up.shape)}")
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    if feats.dtype != torch.float32 or feats.dim() != 2 or feats.shape[0] < T:
        raise ValueError(f"feats must be float32 [T_max >= {T}, F], got {feats.dtype} "
                         f"{tuple(feats.shape)}")
    if feat_slot.dtype != torch.int32 or feat_slot.dim() != 1 or feat_slot.shape[0] < T:
        raise ValueError(f"feat_slot must be int32 [T_max >= {T}], got {feat_slot.dtype} "
                         f"{tuple(feat_slot.shape)}")
    for name, t in (("feat_layer", feat_layer), ("feat_col", feat_col)):
        if t.dtype != torch.int32 or t.dim() != 2 or t.shape[1] != feats.shape[1]:
            raise ValueError(f"{name} must be int32 [G, {feats.shape[1]}], got {t.dtype} "
                             f"{tuple(t.shape)}")
    if feat_layer.shape != feat_col.shape:
        raise ValueError("feat_layer and feat_col must have one shape")
    for t in (gate_up, feat_slot, feat_layer, feat_col):
        if t.device != feats.device:
            raise ValueError("all tensors must be on one device")
    return T, I


def gather_slots_native(feats: torch.Tensor, gate_up: torch.Tensor, feat_slot: torch.Tensor,
                        feat_layer: torch.Tensor, feat_col: torch.Tensor,
                        layer: int) -> torch.Tensor:
    """The torch twin; writes feats[:T] in place and returns feats. Branch-free:
    every row is computed and masked."""
    T, I = _check(feats, gate_up, feat_slot, feat_layer, feat_col)
    if T == 0 or I == 0 or feats.shape[1] == 0:
        return feats
    slot = feat_slot[:T].long()  # [T]
    lay, col = feat_layer.index_select(0, slot), feat_col.index_select(0, slot)  # [T, F]
    ok = (slot > 0).unsqueeze(1) & (lay == layer) & (col >= 0) & (col < I)  # [T, F]
    c = col.clamp(0, I - 1).long()  # [T, F]
    g = gate_up[:, :I].gather(1, c).float()  # [T, F]
    u = gate_up[:, I:].gather(1, c).float()  # [T, F]
    feats[:T] = torch.where(ok, F.silu(g) * u, feats[:T])
    return feats


def _gather_slots_kernel(
    feats_ptr,  # [T_max, NF] fp32, row stride NF
    gate_up_ptr,  # [T, 2I], row stride stride_gu, unit column stride
    feat_slot_ptr,  # [T_max] int32
    feat_layer_ptr,  # [G, NF] int32
    feat_col_ptr,  # [G, NF] int32
    layer,
    I,
    NF,
    stride_gu,
    BLOCK_F: tl.constexpr,
):
    # grid = (T,). A row of group 0 reads one int32 and stops.
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(feat_slot_ptr + row).to(tl.int64)
    if slot != 0:
        for f0 in range(0, NF, BLOCK_F):
            fs = f0 + tl.arange(0, BLOCK_F)  # [BLOCK_F]
            fmask = fs < NF
            lay = tl.load(feat_layer_ptr + slot * NF + fs, mask=fmask, other=-1)
            col = tl.load(feat_col_ptr + slot * NF + fs, mask=fmask, other=-1)
            ok = fmask & (lay == layer) & (col >= 0) & (col < I)
            g = tl.load(gate_up_ptr + row * stride_gu + col, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(gate_up_ptr + row * stride_gu + I + col, mask=ok,
                        other=0.0).to(tl.float32)
            tl.store(feats_ptr + row * NF + fs, g * tl.sigmoid(g) * u, mask=ok)


def gather_slots_(feats: torch.Tensor, gate_up: torch.Tensor, feat_slot: torch.Tensor,
                  feat_layer: torch.Tensor, feat_col: torch.Tensor, layer: int) -> torch.Tensor:
    """Triton twin of ``gather_slots_native`` (one program per row, no host
    sync, no allocation). Returns feats."""
    if not HAS_TRITON:
        raise RuntimeError("gather_slots_ requires triton; use gather_slots_native")
    T, I = _check(feats, gate_up, feat_slot, feat_layer, feat_col)
    if I > 1 and gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must have last-dim stride 1, got {tuple(gate_up.stride())}")
    for name, t in (("feats", feats), ("feat_layer", feat_layer), ("feat_col", feat_col)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    NF = feats.shape[1]
    if T == 0 or I == 0 or NF == 0:
        return feats
    _jit(_gather_slots_kernel)[(T,)](
        feats, gate_up, feat_slot, feat_layer, feat_col, layer, I, NF, gate_up.stride(0),
        BLOCK_F=min(_next_pow2(NF), 256),
    )
    return feats
