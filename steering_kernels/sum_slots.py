"""Capture-safe activation sum: a step's rows add their activation to their slot.

The offline pipeline's activation capture keeps, per capturing request, a sum
over prompt positions of every neuron's pre-steering activation. Like the
steering tables, it lives in buffers allocated once at their maximum size and
filled in place, so the launch has the same shape every step and a CUDA graph
can replay it:

    cap_slot  int32 [T_max]            0 = the row adds nothing, s > 0 = slot s
    cap_sum   fp32  [C_max + 1, I]     one layer's sums (the engine holds
                                       [L, C_max + 1, I] and passes cap_sum[layer])

For each row t < T with s = cap_slot[t] > 0:

    cap_sum[s, :] += float32(act[t, :])

Every other entry is left as it was: row 0 of `cap_sum` is never written, a
row with slot 0 costs one int32 read and touches nothing, and the caller
zeroes a slot's sums once, when a request takes it. Which rows and entries
are touched depends only on buffer contents, never on a Python branch, a host
read or an allocation.

Several rows share a slot (a prompt chunk), so programs meet on one slot's
row. The kernel is not bitwise deterministic: each program sums its tile of
rows in row order in fp32 registers and adds each slot's partial sum to
`cap_sum` with `tl.atomic_add`; the order in which tiles land is unspecified,
so results agree with the twin to fp32 rounding (about 1e-7 relative per add)
and may differ in the last bits from run to run.

``sum_slots_native`` is the torch twin (and the reference); ``sum_slots_`` is
the Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from .silu_and_mul_steer import HAS_TRITON, _jit, _next_pow2

if HAS_TRITON:
    import triton.language as tl
else:  # pragma: no cover
    tl = None

_ROWS = 16  # rows per program: one atomic add per slot run in the tile
_MAX_BLOCK_I = 256


def _check(cap_sum, act, cap_slot) -> tuple[int, int]:
    if act.dim() != 2 or not act.is_floating_point():
        raise ValueError(f"act must be a float [T, I] tensor, got {act.dtype} "
                         f"{tuple(act.shape)}")
    T, I = act.shape
    if cap_sum.dtype != torch.float32 or cap_sum.dim() != 2 or cap_sum.shape[1] != I:
        raise ValueError(f"cap_sum must be float32 [C + 1, {I}], got {cap_sum.dtype} "
                         f"{tuple(cap_sum.shape)}")
    if cap_slot.dtype != torch.int32 or cap_slot.dim() != 1 or cap_slot.shape[0] < T:
        raise ValueError(f"cap_slot must be int32 [T_max >= {T}], got {cap_slot.dtype} "
                         f"{tuple(cap_slot.shape)}")
    for t in (act, cap_slot):
        if t.device != cap_sum.device:
            raise ValueError("all tensors must be on one device")
    return T, I


def sum_slots_native(cap_sum: torch.Tensor, act: torch.Tensor,
                     cap_slot: torch.Tensor) -> torch.Tensor:
    """The torch twin; adds in place and returns cap_sum. Branch-free: every
    row is added, rows of slot 0 as zeros into row 0 (which keeps its values)."""
    T, I = _check(cap_sum, act, cap_slot)
    if T == 0 or I == 0:
        return cap_sum
    slot = cap_slot[:T].long()  # [T]
    rows = torch.where((slot > 0).unsqueeze(1), act.float(), 0.0)  # [T, I]
    cap_sum.index_add_(0, slot, rows)
    return cap_sum


def _sum_slots_kernel(
    cap_sum_ptr,  # [C + 1, I] fp32, row stride stride_cs, unit column stride
    act_ptr,  # [T, I], row stride stride_act, unit column stride
    cap_slot_ptr,  # [T_max] int32
    T,
    I,
    stride_cs,
    stride_act,
    ROWS: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    # grid = (cdiv(T, ROWS), cdiv(I, BLOCK_I)). A tile with no capturing row
    # reads its ROWS int32 slots and stops.
    row0 = tl.program_id(0).to(tl.int64) * ROWS
    cols = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
    cmask = cols < I
    rows = row0 + tl.arange(0, ROWS)
    slots = tl.load(cap_slot_ptr + rows, mask=rows < T, other=0)  # [ROWS]
    if tl.max(slots, axis=0) > 0:
        # the row's slot as a [BLOCK_I] vector: every mask below is elementwise
        zero = tl.zeros([BLOCK_I], dtype=tl.int64)
        acc = tl.zeros([BLOCK_I], dtype=tl.float32)
        cur = zero + tl.load(cap_slot_ptr + row0)  # row0 < T
        for r in range(0, ROWS):
            t = row0 + r
            s = zero + tl.load(cap_slot_ptr + t, mask=t < T, other=0)
            # a run of one slot ends: add its partial sum (masked off for slot 0)
            tl.atomic_add(cap_sum_ptr + cur * stride_cs + cols, acc, sem="relaxed",
                          mask=cmask & (s != cur) & (cur > 0))
            acc = tl.where(s != cur, 0.0, acc)
            cur = s
            x = tl.load(act_ptr + t * stride_act + cols, mask=cmask & (s > 0), other=0.0)
            acc += x.to(tl.float32)
        tl.atomic_add(cap_sum_ptr + cur * stride_cs + cols, acc, mask=cmask & (cur > 0),
                      sem="relaxed")


def sum_slots_(cap_sum: torch.Tensor, act: torch.Tensor, cap_slot: torch.Tensor) -> torch.Tensor:
    """Triton twin of ``sum_slots_native`` (a program per tile of rows and
    block of columns; no host sync, no allocation). Returns cap_sum."""
    if not HAS_TRITON:
        raise RuntimeError("sum_slots_ requires triton; use sum_slots_native")
    T, I = _check(cap_sum, act, cap_slot)
    for name, t in (("act", act), ("cap_sum", cap_sum)):
        if I > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have last-dim stride 1, got {tuple(t.stride())}")
    if T == 0 or I == 0:
        return cap_sum
    block_i = min(_next_pow2(I), _MAX_BLOCK_I)
    grid = ((T + _ROWS - 1) // _ROWS, (I + block_i - 1) // block_i)
    _jit(_sum_slots_kernel)[grid](
        cap_sum, act, cap_slot, T, I, cap_sum.stride(0), act.stride(0),
        ROWS=_ROWS, BLOCK_I=block_i,
    )
    return cap_sum
