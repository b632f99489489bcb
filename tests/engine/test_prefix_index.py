"""The two sides of the predictor-state prefix cache, driven by hand (no
engine): the scheduler's BlockIndex and the worker's PrefixStates must hold the
same blocks after the same steps, because the scheduler grants cache hits from
its index and the worker serves them from its states. A hit then gives the
p_fail of a cold run, and a hit on a block without a state is an error, never
a wrong p_fail. Features are simulated as in test_runtime_positions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from adaras.engine.prefix_states import BLOCKS_KEY, BlockIndex, prompt_blocks

from .test_runtime_positions import PROMPT, feature, runtime  # noqa: F401  (fixture)

BLOCK = 32
HASHES = [bytes([i]) * 8 for i in range(PROMPT // BLOCK)]  # 3 full prompt blocks


def extra(rt, hashes=HASHES) -> dict:
    version = rt.profiles["pred"].version
    return {"steering": {"mode": "adaptive", "profile": "pred"}, "steering_fingerprint": version,
            BLOCKS_KEY: [BLOCK, hashes]}


def step(rt, rid, computed, n, new_extra=None):
    """One step of one request at row offset 0; the op's gather is simulated."""
    new = [(rid, SimpleNamespace(extra_args=new_extra))] if new_extra is not None else []
    ctx = rt.begin_step([rid], {rid: 0}, np.array([n]), np.array([computed]),
                        np.array([PROMPT]), new)
    if ctx is not None and ctx.feats is not None:
        for i, row in enumerate(ctx.feat_rows.tolist()):
            for c in range(ctx.feats.shape[1]):
                ctx.feats[i, c] = feature(computed + row, c)
    rt.end_step()


def run(rt, index, rid, chunks, ex, preempted_after=None):
    """Both sides see the same steps: the worker folds, the scheduler records."""
    blocks = prompt_blocks(ex, ex["steering_fingerprint"])
    for i, (computed, n) in enumerate(chunks):
        step(rt, rid, computed, n, ex if i == 0 else None)
        if preempted_after is None or i < preempted_after:
            index.record(blocks, computed, min(computed + n, PROMPT))
    report = rt.take_reports()[rid]
    rt.release(rid)
    return report


def test_worker_and_scheduler_hold_the_same_blocks(runtime):  # noqa: F811
    index = BlockIndex(limit=100)
    cold = run(runtime, index, "a", [(0, 20), (20, 30), (50, 50), (100, 1)], extra(runtime))
    assert set(index.items) == set(runtime.prefix.items) and len(index) == 3
    # a hit on all three blocks: the scheduler grants them, the worker merges them
    assert index.leading(HASHES, extra(runtime)["steering_fingerprint"]) == 3
    warm = run(runtime, index, "b", [(96, 4), (100, 1)], extra(runtime))
    assert warm["failure_probability"] == pytest.approx(cold["failure_probability"], abs=1e-6)
    assert warm["applied"] == cold["applied"] and "error" not in warm
    assert runtime.prefix.restored_tokens == 96


def test_a_preempted_request_stores_and_records_nothing_more(runtime):  # noqa: F811
    index = BlockIndex(limit=100)
    # 40 tokens in, preempted, recomputed from 0: only block 0 was completed before
    run(runtime, index, "a", [(0, 40), (0, 64), (64, 36), (100, 1)], extra(runtime),
        preempted_after=1)
    assert set(index.items) == set(runtime.prefix.items) and len(index) == 1


def test_a_hit_without_a_state_is_an_error_not_a_wrong_p_fail(runtime):  # noqa: F811
    report = run(runtime, BlockIndex(limit=100), "c", [(64, 36), (100, 1)], extra(runtime))
    assert report["failure_probability"] is None and not report["applied"]
    assert "without their predictor state" in report["error"]


def test_index_is_first_in_first_out_and_reads_leading_blocks():
    index = BlockIndex(limit=2)
    blocks = prompt_blocks({BLOCKS_KEY: [4, [b"a", b"b", b"c"]]}, "v1")
    index.record(blocks, 0, 6)  # completes block 0 only
    assert index.leading([b"a", b"b"], "v1") == 1 and index.leading([b"a"], "v2") == 0
    index.record(blocks, 6, 12)  # blocks 1 and 2; the oldest (a) goes
    assert list(index.items) == [(b"b", "v1"), (b"c", "v1")]
    assert index.leading([b"a", b"b", b"c"], "v1") == 0
    assert prompt_blocks({}, "v1") is None and prompt_blocks({BLOCKS_KEY: [4, []]}, "") is None
