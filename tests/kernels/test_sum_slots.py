"""The capture-safe activation sum (steering_kernels.sum_slots): the Triton
kernel under the interpreter against its torch twin, the twin against a scalar
loop, and the buffer contract (rows and entries it must not touch)."""

import pytest
import torch

from steering_kernels.sum_slots import sum_slots_native

from .fresh import interpret_or_skip, rerun_in_fresh_process


def make_case(T, I, C=4, T_max=None, dtype=torch.float32, strided=False, seed=0):
    """Buffers at their maximum size, filled for a T-row step: runs of one slot
    (a prompt chunk), rows of slot 0 between them, stale sums."""
    gen = torch.Generator().manual_seed(seed)
    T_max = T_max or T + 3
    pad = 5 if strided else 0
    act = (torch.randn(T, I + pad, generator=gen) * 2).to(dtype)[:, :I]
    cap_slot = torch.zeros(T_max, dtype=torch.int32)
    cap_slot[:T] = torch.randint(0, C + 1, (T,), generator=gen, dtype=torch.int32)
    if T > 6:
        cap_slot[2:6] = C  # one slot's run across a few rows
    cap_slot[T:] = 1  # rows past the step: must be ignored
    cap_sum = torch.randn(C + 1, I, generator=gen)  # stale values: untouched rows keep them
    return cap_sum, act, cap_slot


def naive(cap_sum, act, cap_slot):
    out = cap_sum.clone().double()
    for t in range(act.shape[0]):
        s = int(cap_slot[t])
        if s:
            out[s] += act[t].double()
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_matches_a_scalar_loop_and_touches_only_its_rows(seed):
    case = make_case(T=9, I=11, strided=True, seed=seed)
    before = case[0].clone()
    want = naive(*case)
    got = sum_slots_native(*case)
    assert got is case[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0], before[0])  # slot 0 is never summed into
    used = set(case[2][:9].tolist())
    for s in range(1, 5):
        if s not in used:
            assert torch.equal(got[s], before[s])


def test_rows_of_one_slot_are_summed_over_steps():
    act = torch.arange(12.0).reshape(4, 3)  # [T, I]
    cap_slot = torch.tensor([2, 2, 0, 2, 1, 1], dtype=torch.int32)
    cap_sum = torch.zeros(3, 3)
    sum_slots_native(cap_sum, act, cap_slot)
    sum_slots_native(cap_sum, act[:2], cap_slot)  # a next step: rows 0, 1 again
    assert cap_sum.tolist() == [[0.0] * 3, [0.0] * 3,
                                (act[0] + act[1] + act[3] + act[0] + act[1]).tolist()]


@pytest.fixture
def kernel():
    interpret_or_skip()
    from steering_kernels.sum_slots import sum_slots_

    return sum_slots_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("T", "I"), [(1, 1), (5, 13), (37, 300), (0, 8), (17, 769)])
@pytest.mark.parametrize("strided", [False, True])
def test_kernel_equals_the_native_twin(kernel, dtype, T, I, strided):
    a = make_case(T, I, dtype=dtype, strided=strided, seed=T + I)
    b = tuple(x.clone() for x in a)
    before = a[0].clone()
    kernel(*a)
    sum_slots_native(*b)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-5)
    assert torch.equal(a[0][0], before[0])  # the kernel never writes row 0


def test_kernel_sums_a_long_run_of_one_slot(kernel):
    """A prompt chunk: every row of the step in one slot, across tiles of rows."""
    act = torch.randn(70, 33, generator=torch.Generator().manual_seed(5))
    cap_slot = torch.full((80,), 3, dtype=torch.int32)
    got = kernel(torch.zeros(4, 33), act, cap_slot)
    torch.testing.assert_close(got[3], act.sum(0), rtol=1e-5, atol=1e-5)
    assert not got[:3].any()


def test_kernel_refuses_wrong_shapes_and_dtypes(kernel):
    cap_sum, act, cap_slot = make_case(T=4, I=8)
    with pytest.raises(ValueError, match="cap_sum must be float32"):
        kernel(cap_sum.half(), act, cap_slot)
    with pytest.raises(ValueError, match="cap_sum must be float32"):
        kernel(cap_sum[:, :-1], act, cap_slot)
    with pytest.raises(ValueError, match="cap_slot must be int32"):
        kernel(cap_sum, act, cap_slot.long())
    with pytest.raises(ValueError, match="cap_slot must be int32"):
        kernel(cap_sum, act, cap_slot[:2])
    with pytest.raises(ValueError, match="act must be"):
        kernel(cap_sum, act.int(), cap_slot)
    with pytest.raises(ValueError, match="act must have last-dim stride 1"):
        kernel(cap_sum, act.t().contiguous().t(), cap_slot)


def test_sum_kernel_in_fresh_process(tmp_path):
    """If the kernel tests cannot run in this process, rerun them in a clean
    interpreter with TRITON_INTERPRET=1 (as the other kernel files do)."""
    rerun_in_fresh_process(__file__, tmp_path)
