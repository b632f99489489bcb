"""The answer probe through the HTTP API: a per-choice
`answer_failure_probability`, best-of-n ordering, streams, refusals and the
metric, against a real server process."""

from __future__ import annotations

import openai
import pytest

from .conftest import MODEL
from .test_operations import metric

pytestmark = pytest.mark.engine

MESSAGES = [{"role": "user", "content": "count with me: one two three"}]


def probe(mode: str = "off", **kw) -> dict:
    return {"steering": {"mode": mode, "profile": "pred", "answer_probe": True, **kw}}


def sample(client, n=4, **steering):
    return client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=n, max_completion_tokens=8, temperature=1.0, seed=11,
        extra_body=probe(**steering))


def test_each_choice_carries_its_own_answer_failure_probability(client, server):
    before = metric(server, "adaras_answer_failure_probability_count", profile="pred")
    out = sample(client)
    rep = out.model_extra["steering"]
    assert rep["mode"] == "off" and rep["applied"] is False
    per = rep["choices"]
    assert [c["index"] for c in per] == [0, 1, 2, 3]
    values = [c["answer_failure_probability"] for c in per]
    assert all(0.0 < v < 1.0 for v in values)
    assert len(set(values)) > 1 and rep["answer_failure_probability"] is None  # not shared
    one = client.completions.create(model=MODEL, prompt="one two three", max_tokens=6,
                                    temperature=0, extra_body=probe())
    assert 0.0 < one.model_extra["steering"]["answer_failure_probability"] < 1.0
    after = metric(server, "adaras_answer_failure_probability_count", profile="pred")
    assert after - before == 5  # one observation per choice


def test_order_choices_returns_the_lowest_answer_failure_probability_first(client):
    plain = sample(client)
    ordered = sample(client, order_choices=True)
    per = ordered.model_extra["steering"]["choices"]
    values = [c["answer_failure_probability"] for c in per]
    assert values == sorted(values)
    assert [c.index for c in ordered.choices] == [c["index"] for c in per] == [0, 1, 2, 3]
    assert sorted(c["sample"] for c in per) == [0, 1, 2, 3]
    unordered = {c.index: c.message.content for c in plain.choices}
    by_sample = plain.model_extra["steering"]["choices"]
    for choice, c in zip(ordered.choices, per):  # the same samples (seeded), reordered
        assert choice.message.content == unordered[c["sample"]]
        assert c["answer_failure_probability"] == pytest.approx(
            by_sample[c["sample"]]["answer_failure_probability"], abs=1e-6)


def test_a_stream_reports_each_choice_on_the_chunk_that_ends_it(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, max_completion_tokens=6, temperature=1.0, seed=5,
        stream=True, extra_body=probe("always")))
    ends = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(ends) == 2
    for c in ends:
        rep = c.model_extra["steering"]
        assert rep["mode"] == "always" and rep["applied"] is True
        assert 0.0 < rep["answer_failure_probability"] < 1.0


@pytest.mark.parametrize("steering, param", [
    ({"mode": "off", "profile": "a", "answer_probe": True}, "steering.answer_probe"),
    ({"mode": "off", "profile": "pred", "answer_probe": "yes"}, "steering.answer_probe"),
    ({"mode": "off", "profile": "pred", "order_choices": True}, "steering.order_choices"),
])
def test_bad_answer_probe_requests_are_a_400_naming_the_field(client, steering, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                       extra_body={"steering": steering})
    assert e.value.response.json()["error"]["param"] == param


def test_order_choices_cannot_stream(client):
    with pytest.raises(openai.BadRequestError) as e:
        list(client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=2,
                                            stream=True, extra_body=probe(order_choices=True)))
    assert e.value.response.json()["error"]["param"] == "steering.order_choices"
