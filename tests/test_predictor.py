import pytest
import torch
from torch.testing import assert_close

from adaras.predictor import FailurePredictor, PoolState

F, H = 12, 16


def make_predictor(seed: int = 0) -> FailurePredictor:
    torch.manual_seed(seed)
    p = FailurePredictor(torch.arange(F, dtype=torch.int32) % 4, torch.arange(F, dtype=torch.int32) * 3, hidden=H)
    with torch.no_grad():
        p.mean.copy_(torch.randn(F))
        p.std.copy_(torch.rand(F) + 0.5)
        p.attn.weight.mul_(4.0)  # sharper attention so pooling actually matters
    return p.eval()


def random_splits(t: int, g: torch.Generator) -> list[int]:
    sizes, left = [], t
    while left:
        n = int(torch.randint(1, left + 1, (1,), generator=g))
        sizes.append(n)
        left -= n
    return sizes


def stream(p: FailurePredictor, x: torch.Tensor, sizes) -> float:
    state = p.init_state()
    for chunk in x.split(list(sizes)):
        state = p.update(state, chunk)
    assert state.n == x.shape[0]
    return p.finish(state)


def test_streaming_equals_full_prob():
    p = make_predictor()
    g = torch.Generator().manual_seed(1)
    for t in (1, 2, 7, 33, 100):
        x = torch.randn(t, F, generator=g) * 3 + 1
        full = p.prob(x)
        assert_close(stream(p, x, [1] * t), full)  # token by token
        assert_close(stream(p, x, [t]), full)  # one chunk
        for _ in range(5):
            assert_close(stream(p, x, random_splits(t, g)), full)


def test_merged_block_states_equal_the_full_prompt():
    """What the prefix cache relies on: the states of separate token blocks,
    each pooled from scratch, merge (in any order) into the state of the
    whole prompt; merging an empty state changes nothing."""
    p = make_predictor()
    g = torch.Generator().manual_seed(7)
    for t in (2, 33, 100):
        x = torch.randn(t, F, generator=g) * 3 + 1
        full = p.prob(x)
        blocks = [p.update(p.init_state(), chunk) for chunk in x.split(random_splits(t, g))]
        merged = blocks[0]
        for b in blocks[1:]:
            merged = merged.merge(b)
        assert merged.n == t
        assert_close(p.finish(merged), full, atol=1e-6, rtol=0)
        backwards = blocks[-1]
        for b in reversed(blocks[:-1]):
            backwards = b.merge(backwards)
        assert_close(p.finish(backwards), full, atol=1e-6, rtol=0)
        assert p.init_state().merge(merged) is merged and merged.merge(p.init_state()) is merged
    with torch.no_grad():  # huge scores: the merge rescales like the streaming update
        p.attn.weight.mul_(1000.0)
    x = torch.randn(40, F, generator=g) * 5
    halves = [p.update(p.init_state(), c) for c in x.split([17, 23])]
    assert_close(p.finish(halves[0].merge(halves[1])), p.prob(x))


def test_streaming_is_stable_with_huge_scores():
    p = make_predictor()
    with torch.no_grad():
        p.attn.weight.mul_(1000.0)  # scores in the thousands: naive exp would overflow
    x = torch.randn(40, F, generator=torch.Generator().manual_seed(2)) * 5
    full = p.prob(x)
    got = stream(p, x, [3] * 13 + [1])
    assert 0.0 <= got <= 1.0
    assert_close(got, full)


def test_streaming_accepts_bf16_and_empty_chunks():
    p = make_predictor()
    x = torch.randn(9, F).to(torch.bfloat16)
    state = p.update(p.init_state(), x[:0])
    assert state.n == 0
    state = p.update(state, x[:4])
    state = p.update(state, x[4:4])
    state = p.update(state, x[4:])
    assert_close(p.finish(state), p.prob(x))


def test_finish_on_empty_state_raises():
    p = make_predictor()
    with pytest.raises(ValueError, match="no prompt tokens"):
        p.finish(p.init_state())


def test_update_returns_new_state():
    p = make_predictor()
    s0 = p.init_state()
    s1 = p.update(s0, torch.randn(3, F))
    assert isinstance(s1, PoolState)
    assert s0.n == 0 and s0.s == 0.0 and torch.equal(s0.acc, torch.zeros(F))
    assert s1.n == 3


def test_pool_matches_direct_softmax():
    p = make_predictor()
    x = torch.randn(20, F)
    z = (x - p.mean) / p.std  # [T, F]
    scores = z @ p.attn.weight[0] + p.attn.bias[0]  # [T]
    w = torch.softmax(scores, dim=0)  # [T]
    expected = (w[:, None] * z).sum(0)  # [F]
    assert_close(p.pool(x), expected)
    with torch.no_grad():
        logit = p.fc2(torch.relu(p.fc1(expected)))[0]
    assert_close(p.prob(x), float(torch.sigmoid(logit)))


def test_forward_with_padding_matches_per_sequence():
    p = make_predictor()
    lengths = [5, 1, 9, 3]
    T = max(lengths)
    seqs = [torch.randn(n, F) for n in lengths]
    x = torch.full((len(lengths), T, F), float("nan"))  # garbage in the padding
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = s
        mask[i, : len(s)] = True
    with torch.no_grad():
        logits = p(x, mask)  # eval mode: no dropout
    assert logits.shape == (len(lengths),)
    for i, s in enumerate(seqs):
        assert_close(float(torch.sigmoid(logits[i])), p.prob(s))
    # the same with zero padding and without a mask only agrees for the full-length row
    x0 = torch.nan_to_num(x, nan=0.0)
    assert_close(p(x0)[2], p(x0, mask)[2])


def test_forward_rejects_fully_masked_row():
    p = make_predictor()
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="at least one unmasked token"):
        p(torch.randn(2, 2, F), mask)


def test_forward_trains():
    p = make_predictor().train()
    x, mask = torch.randn(4, 6, F), torch.ones(4, 6, dtype=torch.bool)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(p(x, mask), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    loss.backward()
    assert p.attn.weight.grad is not None and p.fc1.weight.grad is not None


def test_wrong_feature_count_refused():
    p = make_predictor()
    with pytest.raises(ValueError, match="features"):
        p.prob(torch.randn(4, F + 1))


def test_tensor_round_trip():
    p = make_predictor()
    tensors = p.to_tensors()
    assert set(tensors) == {
        "feature_layers", "feature_neurons", "mean", "std",
        "attn.weight", "attn.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
    }
    for key, t in tensors.items():
        assert t.is_contiguous()
        assert t.dtype == (torch.int32 if key.startswith("feature_") else torch.float32)
    assert p.config() == {"type": "attn-mlp", "version": 1, "hidden": H, "num_features": F, "pooling": "attention"}
    q = FailurePredictor.from_tensors(tensors, p.config())
    assert not q.training
    for key, t in q.to_tensors().items():
        assert torch.equal(t, tensors[key]), key
    x = torch.randn(11, F)
    assert q.prob(x) == p.prob(x)


@pytest.mark.parametrize(
    "mutate, keyword",
    [
        (lambda t, c: t.pop("fc1.bias"), "'fc1.bias' is missing"),
        (lambda t, c: t.update({"fc1.weight": torch.zeros(H + 1, F)}), "'fc1.weight' has shape"),
        (lambda t, c: t.update({"mean": torch.zeros(F + 2)}), "'mean' has shape"),
        (lambda t, c: t.update({"attn.weight": torch.zeros(F)}), "'attn.weight' has shape"),
        (lambda t, c: t.update({"feature_layers": torch.zeros(F, dtype=torch.int64)}), "'feature_layers' has dtype int64"),
        (lambda t, c: t.update({"fc2.weight": torch.zeros(1, H, dtype=torch.float16)}), "'fc2.weight' has dtype float16"),
        (lambda t, c: t.update({"extra": torch.zeros(1)}), "unexpected predictor tensor 'extra'"),
        (lambda t, c: t["fc2.bias"].fill_(float("nan")), "'fc2.bias' contains NaN"),
        (lambda t, c: t["std"].fill_(0.0), "'std' has entries <= 0"),
        (lambda t, c: c.update({"type": "lstm"}), "'type'"),
        (lambda t, c: c.update({"version": 2}), "'version'"),
        (lambda t, c: c.update({"hidden": H + 1}), "'fc1.weight' has shape"),
        (lambda t, c: c.update({"num_features": 0}), "'num_features' must be a positive integer"),
    ],
)
def test_from_tensors_refuses_bad_input(mutate, keyword):
    p = make_predictor()
    tensors, config = p.to_tensors(), p.config()
    mutate(tensors, config)
    with pytest.raises(ValueError, match=keyword):
        FailurePredictor.from_tensors(tensors, config)


def test_from_tensors_error_uses_prefix():
    p = make_predictor()
    tensors = p.to_tensors()
    del tensors["mean"]
    with pytest.raises(ValueError, match=r"'predictor\.mean' is missing"):
        FailurePredictor.from_tensors(tensors, p.config(), key_prefix="predictor.")
