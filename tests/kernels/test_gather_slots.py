"""The capture-safe feature gather (steering_kernels.gather_slots): the
Triton kernel under the interpreter against its torch twin, the twin against a
scalar loop, and the buffer contract (rows and entries it must not touch)."""

import math

import pytest
import torch

from steering_kernels.gather_slots import gather_slots_native

from .fresh import interpret_or_skip, rerun_in_fresh_process


def make_case(T, I, L=3, G=4, NF=7, T_max=None, dtype=torch.float32, strided=False, seed=0):
    """Buffers at their maximum size, filled for a T-row step: groups with
    features spread over layers, padding, columns on another shard (>= I)."""
    gen = torch.Generator().manual_seed(seed)
    T_max = T_max or T + 3
    pad = 5 if strided else 0
    gate_up = (torch.randn(T, 2 * I + pad, generator=gen) * 2).to(dtype)[:, :2 * I]
    feat_slot = torch.zeros(T_max, dtype=torch.int32)
    feat_slot[:T] = torch.randint(0, G, (T,), generator=gen, dtype=torch.int32)
    if T > 1:
        feat_slot[0], feat_slot[1] = 0, G - 1
    feat_slot[T:] = G - 1  # rows past the step: must be ignored
    feat_layer = torch.randint(0, L, (G, NF), generator=gen, dtype=torch.int32)
    feat_col = torch.randint(0, I + 2, (G, NF), generator=gen, dtype=torch.int32)  # some >= I
    feat_layer[0], feat_col[0] = -1, -1
    if NF > 2:
        feat_col[:, 2] = -1  # padding
    feats = torch.full((T_max, NF), -7.0)  # stale values: untouched entries keep them
    return feats, gate_up, feat_slot, feat_layer, feat_col


def naive(feats, gate_up, feat_slot, feat_layer, feat_col, layer):
    out = feats.clone().double()
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    for t in range(T):
        s = int(feat_slot[t])
        for f in range(feats.shape[1]):
            c = int(feat_col[s, f])
            if s and int(feat_layer[s, f]) == layer and 0 <= c < I:
                g, u = float(gate_up[t, c]), float(gate_up[t, I + c])
                out[t, f] = g / (1 + math.exp(-g)) * u
    return out


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_native_matches_a_scalar_loop_and_touches_only_its_entries(layer):
    case = make_case(T=6, I=11, strided=True, seed=layer)
    want = naive(*case, layer)
    got = gather_slots_native(*case, layer)
    assert got is case[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert (got[6:] == -7.0).all()  # rows past the step keep their values


def test_a_forward_of_all_layers_fills_every_feature_of_a_gathering_row_once():
    feats, gate_up, slot, lay, col = make_case(T=5, I=9, L=3, seed=3)
    feats.zero_()
    for layer in range(3):
        gather_slots_native(feats, gate_up, slot, lay, col, layer)
    for t in range(5):
        g = int(slot[t])
        for f in range(feats.shape[1]):
            c = int(col[g, f])
            if g == 0 or not 0 <= c < 9 or not 0 <= int(lay[g, f]) < 3:
                assert feats[t, f] == 0.0
            else:
                a = gate_up[t, c].float()
                assert feats[t, f] == pytest.approx(float(a * torch.sigmoid(a) * gate_up[t, 9 + c]),
                                                    rel=1e-5, abs=1e-6)


@pytest.fixture
def kernel():
    interpret_or_skip()
    from steering_kernels.gather_slots import gather_slots_

    return gather_slots_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("T", "I", "NF"), [(1, 1, 1), (5, 13, 7), (9, 40, 300), (0, 8, 4)])
@pytest.mark.parametrize("strided", [False, True])
def test_kernel_equals_the_native_twin(kernel, dtype, T, I, NF, strided):
    for layer in range(3):
        a = make_case(T, I, NF=NF, dtype=dtype, strided=strided, seed=T + I + layer)
        b = tuple(x.clone() for x in a)
        kernel(*a, layer)
        gather_slots_native(*b, layer)
        torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)


def test_kernel_refuses_wrong_shapes_and_dtypes(kernel):
    feats, gate_up, slot, lay, col = make_case(T=4, I=8)
    with pytest.raises(ValueError, match="feats must be float32"):
        kernel(feats.half(), gate_up, slot, lay, col, 0)
    with pytest.raises(ValueError, match="feat_slot must be int32"):
        kernel(feats, gate_up, slot.long(), lay, col, 0)
    with pytest.raises(ValueError, match="feat_col must be int32"):
        kernel(feats, gate_up, slot, lay, col[:, :-1], 0)


def test_gather_kernel_in_fresh_process(tmp_path):
    """If the kernel tests cannot run in this process, rerun them in a clean
    interpreter with TRITON_INTERPRET=1 (as the other kernel file does)."""
    rerun_in_fresh_process(__file__, tmp_path)
