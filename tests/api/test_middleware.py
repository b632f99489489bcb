"""The steering middleware on its own (no engine): whatever the inner app
answers, it never raises; what it cannot annotate it passes through."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from adaras.api.middleware import SteeringMiddleware
from adaras.api.profiles import Resolved


class Registry:
    engine = None

    def resolve(self, raw):
        return Resolved("always", "p", 0.3, None, 5, "v1") if raw else Resolved("off")


def app_answering(body: bytes, stream: bool = False):
    async def endpoint(request):
        await request.body()
        if stream:
            async def events():
                yield body
            return StreamingResponse(events(), media_type="text/event-stream")
        return Response(body, media_type="application/json")

    inner = Starlette(routes=[Route("/v1/completions", endpoint, methods=["POST"])])
    return TestClient(SteeringMiddleware(inner, registry=Registry(), model="m"),
                      raise_server_exceptions=True)


@pytest.mark.parametrize("body", [b"null", b"[1, 2]", b'"text"', b"3", b"not json", b""])
def test_a_body_that_is_not_an_object_passes_through(body):
    r = app_answering(body).post("/v1/completions", json={"prompt": "x",
                                                          "steering": {"mode": "always"}})
    assert r.status_code == 200 and r.content == body


def test_an_object_body_gets_the_report_even_with_odd_usage():
    body = json.dumps({"choices": [], "usage": "odd"}).encode()
    r = app_answering(body).post("/v1/completions", json={"prompt": "x",
                                                          "steering": {"mode": "always"}})
    assert r.json()["steering"]["mode"] == "always" and r.json()["usage"] == "odd"


@pytest.mark.parametrize("event", [b"data: null\n\n", b"data: [1]\n\n", b'data: {"choices": 3}\n\n',
                                   b'data: {"choices": [null, 1]}\n\n', b"data: {oops\n\n",
                                   b"event: ping\n\n"])
def test_stream_events_that_are_not_chunks_pass_through(event):
    r = app_answering(event, stream=True).post(
        "/v1/completions", json={"prompt": "x", "stream": True, "steering": {"mode": "always"}})
    assert r.status_code == 200 and r.content == event


def test_a_finished_chunk_gets_the_report():
    event = b'data: {"choices": [{"index": 0, "finish_reason": "length"}]}\n\n'
    r = app_answering(event, stream=True).post(
        "/v1/completions", json={"prompt": "x", "stream": True, "steering": {"mode": "always"}})
    chunk = json.loads(r.content.split(b"\n\n")[0][6:])
    assert chunk["steering"]["mode"] == "always" and chunk["steering"]["applied"] is True


def test_vllm_client_errors_are_logged_at_info_and_faults_stay_errors():
    import logging
    from types import SimpleNamespace

    from adaras.api.app import ClientErrorsAtInfo

    def record(code):
        err = SimpleNamespace(error=SimpleNamespace(code=code))
        return logging.LogRecord("vllm.x", logging.ERROR, "f", 1, "Error with model %s",
                                 (err,), None)

    f = ClientErrorsAtInfo()
    not_found, fault = record(404), record(500)
    assert f.filter(not_found) and f.filter(fault)
    assert not_found.levelname == "INFO" and fault.levelname == "ERROR"
    other = logging.LogRecord("vllm.x", logging.ERROR, "f", 1, "boom %s", (1,), None)
    f.filter(other)
    assert other.levelname == "ERROR"


def test_the_quieted_vllm_loggers_are_the_ones_that_log_client_errors():
    import importlib
    import inspect

    from adaras.api.app import CLIENT_ERROR_LOGGERS

    for name in CLIENT_ERROR_LOGGERS:
        module = importlib.import_module(name)
        assert module.logger.name == name
        assert 'logger.error("Error with model %s"' in inspect.getsource(module)


def test_a_hang_up_after_done_is_not_a_disconnect():
    """[DONE] can travel in a body message with more_body=True; once it has been
    forwarded, the response is complete even before the closing message."""
    import asyncio

    from adaras.api.middleware import _Exchange

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.disconnect"}

    mw = SteeringMiddleware(None, registry=Registry(), model="m")
    ex = _Exchange(mw, {"type": "http", "path": "/v1/completions", "headers": []}, receive, send)

    async def run():
        await ex._send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
        await ex._send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                        "more_body": True})
        replay = ex._replay(b"{}")
        await replay()  # the request body
        await replay()  # then the client goes away

    asyncio.run(run())
    assert ex.response_done and not ex.disconnected
