"""adaras.confidence: the logprob scores set beside the answer probe, checked
against their definitions written out the slow way (DeepConf's loops,
self-certainty over a full vocabulary)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from adaras import confidence
from adaras.confidence import Knobs, from_vllm, groups, token_arrays, trace_scores


def _softmax_logprobs(rng, vocab):
    logits = rng.normal(size=vocab) * 3
    return logits - np.log(np.exp(logits).sum())


def test_token_confidence_is_minus_the_mean_of_the_top_k_logprobs():
    rng = np.random.default_rng(0)
    full = np.stack([_softmax_logprobs(rng, 50) for _ in range(7)])  # [T, V]
    top = -np.sort(-full, axis=1)[:, :20]
    chosen = full[np.arange(7), rng.integers(0, 50, size=7)]
    got = token_arrays(chosen, top, 50)
    # DeepConf's compute_confidence: -sum(logprobs) / len(logprobs), per token
    want = [-sum(row) / len(row) for row in top.tolist()]
    np.testing.assert_allclose(got["conf"], want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["lp"], chosen)


def test_self_certainty_equals_the_full_vocab_kl_when_the_rest_is_uniform():
    """With the mass outside the top k truly spread evenly, the top-k
    approximation is exact: KL(uniform || p) over the whole vocabulary."""
    vocab, k = 40, 20
    rng = np.random.default_rng(1)
    head = np.sort(rng.dirichlet(np.ones(k)) * 0.9)[::-1]
    p = np.concatenate([head, np.full(vocab - k, 0.1 / (vocab - k))])
    kl = float(np.sum((1 / vocab) * np.log((1 / vocab) / p)))
    got = token_arrays(np.log(p[:1]), np.log(p[None, :k]), vocab)["sc"][0]
    assert got == pytest.approx(kl, abs=1e-10)


def test_a_peaked_token_is_more_certain_and_more_confident_than_a_flat_one():
    vocab = 1000
    flat = np.full((1, 20), math.log(1 / vocab))
    peaked = np.log(np.array([[0.98] + [1e-5] * 19]))
    a, b = token_arrays(flat[:, 0], flat, vocab), token_arrays(peaked[:, 0], peaked, vocab)
    assert b["conf"][0] > a["conf"][0] and b["sc"][0] > a["sc"][0]


def test_groups_are_stride_one_sliding_means_and_one_group_when_short():
    conf = np.arange(10, dtype=float)
    np.testing.assert_allclose(groups(conf, 4), [np.mean(conf[i:i + 4]) for i in range(7)])
    np.testing.assert_allclose(groups(conf[:3], 4), [1.0])


def test_trace_scores_follow_their_definitions_and_rank_failure_high():
    conf = np.array([5.0, 5.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    tokens = {"lp": -np.ones(10) * 0.2, "conf": conf, "sc": conf / 10}
    s = trace_scores(tokens, Knobs(window=2, tail=3))
    g = [np.mean(conf[i:i + 2]) for i in range(9)]
    assert s["conf_lowest_group"] == pytest.approx(-min(g))
    assert s["conf_bottom10"] == pytest.approx(-min(g))  # 10% of 9 groups rounds down to 1
    assert s["conf_tail"] == pytest.approx(-5.0)
    assert s["conf_mean"] == pytest.approx(-conf.mean())
    assert s["mean_logprob"] == pytest.approx(0.2)
    assert s["length"] == 10
    # a less confident answer scores higher on every confidence-based failure score
    worse = trace_scores({"lp": tokens["lp"] - 1, "conf": conf - 0.5, "sc": conf / 10 - 0.1},
                         Knobs(window=2, tail=3))
    for name in ("mean_logprob", "conf_mean", "conf_lowest_group", "conf_bottom10",
                 "conf_tail", "self_certainty"):
        assert worse[name] > s[name], name


def test_an_empty_answer_has_no_confidence():
    s = trace_scores({"lp": [], "conf": [], "sc": []})
    assert s["length"] == 0 and all(math.isnan(s[k]) for k in confidence.SCORES if k != "length")


def test_from_vllm_takes_the_top_k_by_value_and_the_sampled_token_even_below_them():
    vocab, k = 100, 3
    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731
    # token 7 was sampled but ranks 4th: vLLM adds it beside the top k
    entries = [{1: lp(-0.1), 2: lp(-2.0), 3: lp(-3.0), 7: lp(-5.0)}, {4: lp(-0.5), 5: lp(-1.0),
                                                                   6: lp(-4.0)}]
    got = from_vllm([7, 4], entries, vocab, k)
    assert got["lp"] == [-5.0, -0.5]
    assert got["conf"] == pytest.approx([(0.1 + 2 + 3) / 3, (0.5 + 1 + 4) / 3], abs=1e-5)
    with pytest.raises(ValueError, match="fewer than 3"):
        from_vllm([4], [{4: lp(-0.5)}], vocab, k)
    with pytest.raises(ValueError, match="2 logprob entries for 1 tokens"):
        from_vllm([7], entries, vocab, k)


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError):
        Knobs(window=0)
    with pytest.raises(ValueError):
        Knobs(bottom_fraction=0)
