"""The per-step plans (engine CPU path) give exactly what the reference
functions give, layer by layer."""

from __future__ import annotations

import pytest
import torch

from steering_kernels import apply_sparse_steer_, gather_features
from steering_kernels.steer_plan import (
    apply_steer_plan_,
    gather_planned_features_,
    plan_features,
    plan_sparse_steer,
)


def tables(S, L, K, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((S, L, K), -1, dtype=torch.int32)
    val = torch.zeros((S, L, K))
    for s in range(1, S):
        for layer in range(L):
            k = int(torch.randint(0, K + 1, (1,), generator=g))  # ragged, may be 0
            idx[s, layer, :k] = torch.randperm(I, generator=g)[:k].to(torch.int32)
            val[s, layer, :k] = torch.randn(k, generator=g)
    return idx, val


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,I,S,L,K", [(1, 7, 2, 1, 3), (17, 769, 4, 3, 9), (5, 64, 3, 5, 1)])
def test_plan_matches_apply_sparse_steer(dtype, T, I, S, L, K):
    g = torch.Generator().manual_seed(T * I)
    idx, val = tables(S, L, K, I, seed=I)
    row_slot = torch.randint(0, S, (T,), generator=g, dtype=torch.int32)
    plan = plan_sparse_steer(row_slot, idx, val, I)
    act = torch.randn(T, I, generator=g).to(dtype)
    for layer in range(L):
        want = apply_sparse_steer_(act.clone(), row_slot, idx[:, layer], val[:, layer])
        got = apply_steer_plan_(act.clone(), plan, layer)
        assert torch.equal(got, want)
        assert torch.equal(got[row_slot == 0], act[row_slot == 0])


def test_plan_with_no_steered_rows_is_a_no_op():
    idx, val = tables(3, 2, 4, 16)
    plan = plan_sparse_steer(torch.zeros(5, dtype=torch.int32), idx, val, 16)
    act = torch.randn(5, 16)
    assert torch.equal(apply_steer_plan_(act.clone(), plan, 1), act)


def test_plan_rejects_bad_tables():
    with pytest.raises(ValueError, match=r"\[S, L, K\]"):
        plan_sparse_steer(torch.zeros(3, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int32),
                          torch.zeros(2, 4), 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_features_match_gather_features(dtype):
    g = torch.Generator().manual_seed(3)
    L, F, I, T = 4, 11, 50, 9
    feat_idx = torch.full((L, F), -1, dtype=torch.int32)
    layer_of = torch.randint(0, L, (F,), generator=g)
    for f in range(F):
        if f % 5 != 4:  # some features live on another shard: -1 everywhere
            feat_idx[layer_of[f], f] = int(torch.randint(0, I, (1,), generator=g))
    plan = plan_features(feat_idx, I)
    gate_up = torch.randn(T, 2 * I, generator=g).to(dtype)
    rows = torch.tensor([0, 2, 3, 8])
    feats = torch.zeros(len(rows), F)
    want = torch.zeros(len(rows), F)
    for layer in range(L):
        gather_planned_features_(feats, gate_up, rows, plan, layer)
        want += gather_features(gate_up, feat_idx[layer])[rows]
    # Same fp32 formula; SiLU's vectorised and scalar tails may differ by 1 ulp.
    torch.testing.assert_close(feats, want, rtol=1e-6, atol=1e-7)
