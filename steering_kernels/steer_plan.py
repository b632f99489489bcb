"""Per-step plans for the torch (CPU) steering path.

`apply_sparse_steer_` and `gather_features` are general but do ~15 small ops
per call; the engine calls them once per layer per step, with the same
`row_slot` for every layer. These plans do the row/slot bookkeeping once per
step (or once per profile set), leaving 1-4 ops per layer:

    plan = plan_sparse_steer(row_slot, steer_idx, steer_val, I)    # once per step
    apply_steer_plan_(act, plan, layer)                            # per layer

    fplan = plan_features(feat_idx, I)                             # once per profile set
    gather_planned_features_(feats, gate_up, rows, fplan, layer)   # per layer

Both give exactly the results of the reference functions (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SteerPlan:
    index: list[torch.Tensor]  # per layer: int64 [N_l], flat indices into act.view(-1)
    value: list[torch.Tensor]  # per layer: fp32 [N_l]


def plan_sparse_steer(row_slot: torch.Tensor, steer_idx: torch.Tensor, steer_val: torch.Tensor,
                      num_cols: int) -> SteerPlan:
    """row_slot: int32 [T]; steer_idx: int32 [S, L, K]; steer_val: fp32 [S, L, K]."""
    if steer_idx.dim() != 3 or steer_idx.shape != steer_val.shape:
        raise ValueError(f"steer_idx/steer_val must both be [S, L, K], got "
                         f"{tuple(steer_idx.shape)} and {tuple(steer_val.shape)}")
    rows = torch.nonzero(row_slot, as_tuple=True)[0]  # [R]
    slot = row_slot.index_select(0, rows).long()  # [R]
    cols = steer_idx.index_select(0, slot).long().transpose(0, 1)  # [L, R, K]
    vals = steer_val.index_select(0, slot).transpose(0, 1)  # [L, R, K]
    valid = (cols >= 0) & (cols < num_cols)  # [L, R, K]
    flat = rows.view(1, -1, 1) * num_cols + cols  # [L, R, K]
    counts = valid.sum(dim=(1, 2)).tolist()  # [L]
    return SteerPlan(list(torch.split(flat[valid], counts)), list(torch.split(vals[valid], counts)))


def apply_steer_plan_(act: torch.Tensor, plan: SteerPlan, layer: int) -> torch.Tensor:
    """act: [T, I] contiguous, modified in place at the plan's entries for `layer`."""
    idx, val = plan.index[layer], plan.value[layer]
    if idx.numel() == 0:
        return act
    flat = act.view(-1)
    if act.dtype == torch.float32:
        flat.index_add_(0, idx, val)  # entries are unique: same as gather + add + scatter
    else:  # add in fp32, round once
        flat.index_put_((idx,), (flat.index_select(0, idx).float() + val).to(act.dtype))
    return act


@dataclass
class FeaturePlan:
    cols: list[torch.Tensor]  # per layer: int64 [2 * F_l], gate columns then up columns
    pos: list[torch.Tensor]  # per layer: int64 [F_l], feature positions in [0, F)
    num_features: int


def plan_features(feat_idx: torch.Tensor, num_cols: int) -> FeaturePlan:
    """feat_idx: int32 [L, F], the local column of feature f if it lives in layer l
    on this shard, else -1."""
    cols, pos = [], []
    for row in feat_idx.long():
        p = torch.nonzero((row >= 0) & (row < num_cols), as_tuple=True)[0]
        c = row.index_select(0, p)
        cols.append(torch.cat([c, c + num_cols]))
        pos.append(p)
    return FeaturePlan(cols, pos, feat_idx.shape[1])


def gather_planned_features_(feats: torch.Tensor, gate_up: torch.Tensor, rows: torch.Tensor,
                             plan: FeaturePlan, layer: int) -> torch.Tensor:
    """feats: fp32 [R, F] += fp32 silu(g) * u at this layer's feature columns of
    gate_up [T, 2I], for the rows `rows` int64 [R]."""
    cols = plan.cols[layer]
    if cols.numel() == 0 or rows.numel() == 0:
        return feats
    sub = gate_up.index_select(1, cols).index_select(0, rows).float()  # [R, 2 F_l]
    g, u = sub.chunk(2, dim=1)
    return feats.index_add_(1, plan.pos[layer], F.silu(g) * u)
