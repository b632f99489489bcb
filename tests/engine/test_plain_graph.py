"""Steps with nothing to steer or gather run a second compiled graph without the
steering op (the plain twin, adaras.engine.models.plain_twin): no op call at
all, stock vLLM's numbers bit for bit, and back to the steered graph as soon as
a row is steered."""

from __future__ import annotations

import pytest
import torch

from .conftest import _env, _shape, generate, prompt_ids, shutdown, start_llm, stats
from .test_steered_engine import engine_logprobs, params, tokens

pytestmark = pytest.mark.engine


def delta(after: dict, before: dict) -> dict:
    keys = ("forwards_plain", "forwards_steered", "steering_op_calls", "hooked_layers")
    return {k: after[k] - before[k] for k in keys}


def test_unsteered_steps_run_the_compiled_plain_graph_with_no_op_call(qwen3_llm, qwen3_stock,
                                                                      qwen3_dir):
    layers = _shape(qwen3_dir).num_layers
    prompts = prompt_ids(4, 40, seed=41)
    want = generate(qwen3_stock, prompts, params(logprobs=2))

    before = stats(qwen3_llm)
    assert before["plain_graph"] == "compiled"
    got = generate(qwen3_llm, prompts, params(logprobs=2))
    d = delta(stats(qwen3_llm), before)
    assert d["forwards_plain"] >= 12  # prefill + 11 more decode steps at least
    assert d["forwards_steered"] == 0 and d["steering_op_calls"] == 0
    assert tokens(got) == tokens(want)
    for g, w in zip(got, want):  # bitwise: the plain graph is stock vLLM's graph
        assert torch.equal(engine_logprobs(g), engine_logprobs(w))

    # One steered request among them: its decode steps take the steered graph,
    # which calls the op once per layer; the unsteered rows stay stock there too.
    before = stats(qwen3_llm)
    mixed = [params({"mode": "always", "profile": "a", "alpha": 1.0}, logprobs=2)
             if i == 1 else params(logprobs=2) for i in range(len(prompts))]
    got = generate(qwen3_llm, prompts, mixed)
    d = delta(stats(qwen3_llm), before)
    assert d["forwards_steered"] >= 11  # every decode step has the steered row
    assert d["steering_op_calls"] == layers * d["forwards_steered"]
    assert d["hooked_layers"] == d["steering_op_calls"]
    assert tokens(got)[1] != tokens(want)[1]
    for i in (0, 2, 3):
        assert torch.equal(engine_logprobs(got[i]), engine_logprobs(want[i]))

    # Nothing steered again: back to the plain graph.
    before = stats(qwen3_llm)
    generate(qwen3_llm, prompts[:2], params())
    d = delta(stats(qwen3_llm), before)
    assert d["forwards_plain"] > 0 and d["forwards_steered"] == 0


def test_adaptive_prefill_takes_the_steered_graph_only_while_it_gathers(qwen3_llm):
    """An adaptive request's prompt rows feed the predictor, so its prefill
    steps run the op; its decode steps do only if the gate fired."""
    before = stats(qwen3_llm)
    out = generate(qwen3_llm, prompt_ids(1, 40, seed=42),
                   params({"mode": "adaptive", "profile": "pred", "threshold": 1.0}))
    d = delta(stats(qwen3_llm), before)
    assert out[0].outputs[0].token_ids
    # max_num_batched_tokens is 32: the 40-token prompt is two prefill chunks;
    # threshold 1.0 never steers, so all 11 decode steps run the plain graph.
    assert d["forwards_steered"] == 2
    assert d["forwards_plain"] >= 11


@pytest.fixture(scope="module")
def eager_llm(qwen3_dir, qwen3_profiles):
    llm = start_llm(qwen3_dir, profiles=qwen3_profiles, enforce_eager=True)
    yield llm
    shutdown(llm)


def test_eager_engines_skip_the_op_when_nothing_is_steered(eager_llm, qwen3_stock, qwen3_dir):
    """With --enforce-eager (how steered models run on GPUs today) there is
    one model; the op is left out per layer by the same switch."""
    layers = _shape(qwen3_dir).num_layers
    prompts = prompt_ids(3, 20, seed=43)
    before = stats(eager_llm)
    assert before["plain_graph"] == "eager"
    got = generate(eager_llm, prompts, params())
    d = delta(stats(eager_llm), before)
    assert d["forwards_plain"] > 0 and d["steering_op_calls"] == 0
    assert tokens(got) == tokens(generate(qwen3_stock, prompts, params()))
    before = stats(eager_llm)
    steered = generate(eager_llm, prompts[:1], params({"mode": "always", "profile": "a",
                                                       "alpha": 1.0}))
    d = delta(stats(eager_llm), before)
    assert d["steering_op_calls"] == layers * d["forwards_steered"] > 0
    assert tokens(steered)[0] != tokens(got)[0]


def test_plain_graph_can_be_turned_off_for_a_single_compile(qwen3_dir, qwen3_profiles,
                                                            qwen3_stock):
    """ADARAS_PLAIN_GRAPH=0: one compiled graph, so every forward calls the op
    in every layer (it returns at once), and unsteered output is still stock."""
    layers = _shape(qwen3_dir).num_layers
    prompts = prompt_ids(3, 20, seed=44)
    with _env(ADARAS_PLAIN_GRAPH="0"):
        llm = start_llm(qwen3_dir, profiles=qwen3_profiles)
    try:
        before = stats(llm)
        assert before["plain_graph"] == "disabled"
        got = generate(llm, prompts, params())
        d = delta(stats(llm), before)
        assert d["forwards_steered"] == 0 and d["forwards_plain"] > 0
        assert d["steering_op_calls"] == layers * d["forwards_plain"]
        assert d["hooked_layers"] == 0
        assert tokens(got) == tokens(generate(qwen3_stock, prompts, params()))
        steered = generate(llm, prompts[:1], params({"mode": "always", "profile": "a",
                                                     "alpha": 1.0}))
        assert stats(llm)["hooked_layers"] > 0
        assert tokens(steered)[0] != tokens(got)[0]
    finally:
        shutdown(llm)
