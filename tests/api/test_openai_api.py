"""The OpenAI endpoints through the official `openai` client, with `steering`
in `extra_body`, against a real server process."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest

from .conftest import MODEL

pytestmark = pytest.mark.engine

PROMPT = "one two three four five six"
MESSAGES = [{"role": "user", "content": "the answer is"}]


def steer(mode="always", **kw):
    return {"steering": {"mode": mode, **kw}}


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_completion_carries_steering_report_and_steering_changes_text(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    steered = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                        extra_body=steer(profile="a", alpha=3.0))
    assert base.model_extra["steering"] == {"mode": "off", "profile": None, "alpha": None,
                                            "failure_probability": None, "applied": False,
                                            "neurons": 0, "threshold": None}
    rep = steered.model_extra["steering"]
    assert rep["mode"] == "always" and rep["profile"] == "a" and rep["alpha"] == 3.0
    assert rep["applied"] is True and rep["neurons"] == 24
    assert steered.choices[0].text != base.choices[0].text
    assert steered.usage.completion_tokens == 12 and steered.choices[0].finish_reason == "length"


def test_alpha_zero_equals_unsteered(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    zero = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                     extra_body=steer(profile="a", alpha=0.0))
    assert zero.choices[0].text == base.choices[0].text


def test_chat_sampling_options(client):
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, max_completion_tokens=6, temperature=0.8, top_p=0.9,
        seed=7, logprobs=True, top_logprobs=2, extra_body=steer(profile="a"))
    assert len(out.choices) == 2
    for choice in out.choices:
        assert choice.finish_reason in ("length", "stop")
        assert len(choice.logprobs.content) >= 1
        assert len(choice.logprobs.content[0].top_logprobs) == 2
    assert out.usage.completion_tokens <= 12
    assert out.model_extra["steering"]["mode"] == "always"
    # seed makes sampling reproducible
    again = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, max_completion_tokens=6, temperature=0.8, top_p=0.9,
        seed=7, extra_body=steer(profile="a"))
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]


def test_stop_sequence_finishes_with_stop(client):
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    text = free.choices[0].text
    stop = text[3:6]
    assert stop.strip(), f"need a non-blank stop string from {text!r}"
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                    stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.index(stop)]


def test_adaptive_reports_p_fail_and_decision(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                    extra_body=steer("adaptive", profile="pred"))
    rep = out.model_extra["steering"]
    assert 0.0 <= rep["failure_probability"] <= 1.0
    assert rep["threshold"] == 0.5  # the profile's calibrated threshold
    assert rep["applied"] == (rep["failure_probability"] >= 0.5)
    low = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                    extra_body=steer("adaptive", profile="pred", threshold=0.0))
    assert low.model_extra["steering"]["applied"] is True
    assert math.isclose(low.model_extra["steering"]["failure_probability"],
                        rep["failure_probability"], rel_tol=1e-5)


def test_stream_puts_report_in_final_chunk_with_usage(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=steer("adaptive", profile="pred")))
    with_report = [c for c in chunks if c.model_extra.get("steering")]
    assert with_report, "no chunk carried the steering report"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].model_extra["steering"]["failure_probability"] is not None
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish[0].model_extra["steering"]["mode"] == "adaptive"
    assert all(not c.model_extra.get("steering") for c in chunks
               if c.choices and not c.choices[0].finish_reason)


def test_stream_without_usage_hides_usage(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5,
                                            temperature=0, stream=True,
                                            extra_body=steer(profile="a")))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["steering"]["profile"] == "a"
    assert "".join(c.choices[0].text for c in chunks)


def test_async_client_stream(aclient):
    async def run():
        stream = await aclient.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                                  temperature=0, stream=True,
                                                  extra_body=steer(profile="a"))
        return [c async for c in stream]

    chunks = asyncio.run(run())
    assert chunks[-1].model_extra["steering"]["applied"] is True


def test_request_without_steering_uses_server_default(client):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert out.model_extra["steering"]["mode"] == "off"


@pytest.mark.parametrize("steering, param", [
    ({"mode": "sometimes"}, "steering.mode"),
    ({"mode": "always", "profile": "nope"}, "steering.profile"),
    ({"mode": "always", "alpha": -0.1}, "steering.alpha"),
    ({"mode": "always", "alpha": "lots"}, "steering.alpha"),
    ({"mode": "adaptive", "profile": "pred", "threshold": 1.5}, "steering.threshold"),
    ({"mode": "adaptive", "profile": "a"}, "steering.mode"),  # no predictor in profile a
    ({"mode": "always", "extra": 1}, "steering.extra"),
    ("always", "steering"),
    ([1, 2], "steering"),
])
def test_bad_steering_is_a_400_naming_the_field(client, steering, param):
    for call in (
        lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                          extra_body={"steering": steering}),
        lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                               extra_body={"steering": steering}),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        err = e.value.response.json()["error"]
        assert err["param"] == param and err["code"] == 400 and err["message"]


def test_nan_alpha_is_a_400(server):
    import httpx

    body = ('{"model": "tiny", "prompt": "x", "max_tokens": 2, '
            '"steering": {"mode": "always", "alpha": NaN}}')
    r = httpx.post(server.url + "/v1/completions", content=body,
                   headers={"Authorization": "Bearer test-api-key-123",
                            "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.alpha"


def test_openapi_documents_the_steering_object_and_report(server):
    import httpx

    schema = httpx.get(server.url + "/openapi.json", timeout=30).json()
    components = schema["components"]["schemas"]
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        assert components[request]["properties"]["steering"] == {
            "$ref": "#/components/schemas/Steering"}
    steering = components["Steering"]
    assert set(steering["properties"]) == {"mode", "profile", "alpha", "threshold",
                                           "answer_probe", "order_choices"}
    assert steering["properties"]["mode"]["anyOf"][0]["enum"] == ["off", "always", "adaptive"]
    report = components["SteeringReport"]["properties"]
    assert {"applied", "answer_failure_probability", "choices"} <= set(report)
    assert "answer_failure_probability" in components["ChoiceReport"]["properties"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        ok = schema["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]
        assert ok["schema"]["properties"]["steering"] == {
            "$ref": "#/components/schemas/SteeringReport"}
