"""The security review's attacks on the HTTP layer, at ASGI level (no engine):
auth on every route and prefix, internal fields, steering on routes without a
report, request identity, report routing, bounded bodies. The same attacks
against a real server are in test_security_server.py."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from adaras.api.auth import ApiKeyMiddleware
from adaras.api.middleware import SteeringMiddleware
from adaras.engine.reports import MAILBOX
from adaras.steering import Resolved

KEY, ADMIN = "key-0123456789", "admin-0123456789"


# ---- auth ----------------------------------------------------------------------

async def ok(request):
    return Response("ran")


async def ws(websocket):
    await websocket.accept()
    await websocket.send_text("ran")
    await websocket.close()


MODEL_ROUTES = ["/v1/chat/completions", "/invocations", "/inference/v1/generate", "/v2/x",
                "/cohere/v1/chat", "/tokenize", "/v1/steering/profiles", "/server_info",
                "/pooling"]


def auth_app(root_path: str = "") -> TestClient:
    inner = Starlette(routes=[Route("/{path:path}", ok, methods=["GET", "POST"]),
                              WebSocketRoute("/v1/realtime", ws)])
    return TestClient(ApiKeyMiddleware(inner, api_key=KEY, admin_key=ADMIN, model="m"),
                      root_path=root_path)


@pytest.mark.parametrize("root_path", ["", "/api"])
@pytest.mark.parametrize("path", MODEL_ROUTES)
def test_every_route_that_can_run_the_model_needs_the_key(root_path, path):
    app = auth_app(root_path)
    url = root_path + path
    r = app.post(url, json={})
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert app.post(url, json={}, headers={"Authorization": "Bearer wrong-key-000"}) \
        .status_code == 401
    for scheme in ("Bearer", "bearer", "BEARER"):  # RFC 7235: the scheme is case-insensitive
        assert app.post(url, json={}, headers={"Authorization": f"{scheme} {KEY}"}).text == "ran"
    assert app.post(url, json={}, headers={"Authorization": f"Bearer {ADMIN}"}).text == "ran"


@pytest.mark.parametrize("path", ["/health", "/ping", "/version", "/metrics", "/openapi.json"])
def test_read_only_routes_stay_open(path):
    assert auth_app().get(path).text == "ran"
    assert auth_app("/api").get("/api" + path).text == "ran"


@pytest.mark.parametrize("path", ["/health/../v1/chat/completions", "/healthz", "/metrics/x",
                                  "/v1/health"])
def test_only_the_exact_open_paths_are_open(path):
    assert auth_app().post(path, json={}).status_code == 401


def test_websockets_need_the_key():
    app = auth_app()
    with pytest.raises(WebSocketDisconnect) as refused:
        with app.websocket_connect("/v1/realtime"):
            pass
    assert refused.value.code == 1008
    with app.websocket_connect("/v1/realtime",
                               headers={"Authorization": f"Bearer {KEY}"}) as conn:
        assert conn.receive_text() == "ran"


def test_admin_routes_take_the_scheme_in_any_case():
    from fastapi import Depends, FastAPI

    from adaras.api.profiles import require_admin

    app = FastAPI()
    app.state.adaras_settings = type("S", (), {"admin_key": ADMIN})()
    app.get("/admin", dependencies=[Depends(require_admin)])(lambda: "ok")
    client = TestClient(app)
    assert client.get("/admin", headers={"Authorization": f"bearer {ADMIN}"}).status_code == 200
    assert client.get("/admin", headers={"X-Admin-Key": ADMIN}).status_code == 200
    assert client.get("/admin", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    assert client.get("/admin").status_code == 401


# ---- admission -------------------------------------------------------------------

class Registry:
    engine = None

    def __init__(self, default_mode: str = "off"):
        self.default_mode = default_mode

    def resolve(self, raw):
        if raw is None and self.default_mode == "off" or raw == {"mode": "off"}:
            return Resolved()
        return Resolved("adaptive", "p", 0.3, 0.5, 5, "v1")


class Seen:
    """What the inner app received."""

    def __init__(self):
        self.bodies, self.request_ids = [], []


def steering_app(seen: Seen, answer=None, *, default_mode="off", stream=False,
                 **limits) -> TestClient:
    """An inner app that records the request and answers like vLLM: the
    engine's reports arrive through the mailbox, keyed by the id vLLM names
    the request after (`cmpl-<x-request-id>-<prompt>`)."""

    async def endpoint(request):
        body = await request.json()
        seen.bodies.append(body)
        rid = request.headers.get("x-request-id")
        seen.request_ids.append(rid)
        if answer is not None:
            return await answer(request, body, rid)
        if stream:
            async def events():
                yield b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n'
                yield b'data: {"error": {"message": "engine died", "code": 500}}\n\n'
                yield b"data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"choices": [{"index": 0, "text": "a"}]},
                            headers={"x-request-id": rid or ""})

    inner = Starlette(routes=[Route("/{path:path}", endpoint, methods=["POST"])])
    return TestClient(SteeringMiddleware(inner, registry=Registry(default_mode), model="m",
                                         **limits))


@pytest.mark.parametrize("body, param", [
    ({"steering_fingerprint": "0123"}, "steering_fingerprint"),
    ({"steering_prompt_positions": -1}, "steering_prompt_positions"),
    ({"adaras_salt": "adaras:x"}, "adaras_salt"),
    ({"adaras_admission": "0" * 32}, "adaras_admission"),
    ({"vllm_xargs": {"adaras_salt": "adaras:x"}}, "vllm_xargs.adaras_salt"),
    ({"vllm_xargs": {"steering": {"mode": "always"}}}, "vllm_xargs.steering"),
    ({"sampling_params": {"extra_args": {"adaras_capture": {"features": [[0, 1]] * 9}}}},
     "sampling_params.extra_args.adaras_capture"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/invocations",
                                  "/v1/chat/completions/batch", "/inference/v1/generate"])
def test_internal_fields_from_a_client_are_a_400_naming_the_field(body, param, path):
    seen = Seen()
    r = steering_app(seen).post(path, json={"model": "m", "prompt": "x", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert seen.bodies == []  # vLLM never saw it


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages", "/v1/chat/completions/batch",
                                  "/inference/v1/generate", "/tokenize"])
def test_steering_on_a_route_without_a_report_is_refused(path):
    seen = Seen()
    r = steering_app(seen).post(path, json={"input": "x", "steering": {"mode": "always"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering"
    assert path in r.json()["error"]["message"]
    r = steering_app(seen).post(path, json={"input": "x", "steering": {"mode": "off"}})
    assert r.status_code == 200 and "steering" not in seen.bodies[-1]


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages", "/inference/v1/generate"])
def test_a_steering_default_is_never_served_silently_unsteered(path):
    seen = Seen()
    app = steering_app(seen, default_mode="adaptive")
    r = app.post(path, json={"input": "x"})
    assert r.status_code == 400 and "adaptive" in r.json()["error"]["message"]
    assert app.post(path, json={"input": "x", "steering": {"mode": "off"}}).status_code == 200
    assert app.post("/tokenize", json={"prompt": "x"}).status_code == 200  # runs no generation


def test_the_client_request_id_is_echoed_never_used_as_the_engine_id():
    seen = Seen()
    app = steering_app(seen)
    for client_id in (b"adaras", b"adaras"):  # two requests with the same id
        r = app.post("/v1/completions", json={"prompt": "x", "steering": {"mode": "adaptive"}},
                     headers={"X-Request-Id": client_id.decode()})
        assert r.headers["x-request-id"] == "adaras"
    assert all(rid != "adaras" and len(rid) == 32 for rid in seen.request_ids)
    assert seen.request_ids[0] != seen.request_ids[1]


def test_a_non_utf8_request_id_is_no_500():
    """h11 and vLLM accept any byte in a header value; the middleware echoes it
    as it came (driven at ASGI level: test clients refuse such headers)."""
    import asyncio

    async def inner(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"x-request-id", dict(scope["headers"])[b"x-request-id"])]})
        await send({"type": "http.response.body", "body": b'{"choices": []}'})

    sent = []

    async def run():
        body = json.dumps({"prompt": "x", "steering": {"mode": "adaptive"}}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
                 "headers": [(b"content-type", b"application/json"),
                             (b"x-request-id", b"id-\xff")]}
        await SteeringMiddleware(inner, registry=Registry(), model="m")(scope, receive, send)

    asyncio.run(run())
    assert sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"x-request-id"] == b"id-\xff"
    assert json.loads(sent[1]["body"])["steering"]["mode"] == "adaptive"


def test_reports_reach_only_their_own_request_and_each_choice_gets_its_own():
    """Two prompts, n=2: four choices, numbered prompt by prompt; the engine
    reports each prompt's p_fail and an error on one choice."""
    seen = Seen()

    async def answer(request, body, rid):
        assert body["adaras_admission"] == rid  # the engine's copy names its admission
        MAILBOX.deliver(f"cmpl-{rid}-0", 0, {"failure_probability": 0.2, "applied": False})
        MAILBOX.deliver(f"cmpl-{rid}-0", 1, {"failure_probability": 0.2, "applied": False})
        MAILBOX.deliver(f"cmpl-{rid}-1", 0, {"failure_probability": 0.9, "applied": True})
        MAILBOX.deliver(f"cmpl-{rid}-1", 1, {"failure_probability": 0.9, "applied": False,
                                             "error": "not gated"})
        MAILBOX.deliver("cmpl-adaras-0", 0, {"failure_probability": 0.5})  # a client's id: nobody
        return JSONResponse({"choices": [{"index": i, "text": "a"} for i in range(4)]})

    r = steering_app(seen, answer).post(
        "/v1/completions", json={"prompt": ["a", "b"], "n": 2, "steering": {"mode": "adaptive"}})
    report = r.json()["steering"]
    assert [c["failure_probability"] for c in report["choices"]] == [0.2, 0.2, 0.9, 0.9]
    assert [c["applied"] for c in report["choices"]] == [False, False, True, False]
    assert report["choices"][3]["error"] == "not gated" and report["error"] == "not gated"
    assert report["failure_probability"] is None and report["applied"] is True
    assert MAILBOX.open_requests == {}  # closed with its response


def test_an_engine_error_in_the_report_reaches_the_response():
    seen = Seen()

    async def answer(request, body, rid):
        MAILBOX.deliver(f"chatcmpl-{rid}", 0, {"failure_probability": None, "applied": False,
                                               "error": "profile 'p' has no predictor"})
        return JSONResponse({"choices": [{"index": 0}]})

    r = steering_app(seen, answer).post("/v1/chat/completions",
                                        json={"messages": [], "steering": {"mode": "adaptive"}})
    assert r.json()["steering"]["error"] == "profile 'p' has no predictor"
    assert "choices" not in r.json()["steering"]


def test_a_stream_that_fails_in_the_engine_counts_as_an_error():
    from adaras.api import metrics

    def count(kind):
        return metrics.ERRORS.labels("m", kind)._value.get()

    before = count("engine")
    seen = Seen()
    r = steering_app(seen, stream=True).post("/v1/completions",
                                             json={"prompt": "x", "stream": True})
    assert r.status_code == 200 and b"engine died" in r.content
    assert count("engine") == before + 1


# ---- bounded bodies ------------------------------------------------------------------

def test_a_body_over_the_cap_is_refused_before_it_is_read():
    seen = Seen()
    app = steering_app(seen, max_body_bytes=1000)
    r = app.post("/v1/completions", json={"prompt": "x" * 2000})
    assert r.status_code == 413 and seen.bodies == []
    # no content-length: the cap applies while the body streams (at ASGI level:
    # test clients read a streamed body whole before they send it)
    import asyncio

    received, sent = [], []

    async def run():
        async def receive():
            received.append(1)
            return {"type": "http.request", "body": b" " * 100, "more_body": len(received) < 100}

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
                 "headers": [(b"content-type", b"application/json")]}
        await SteeringMiddleware(None, registry=Registry(), model="m", max_body_bytes=1000)(
            scope, receive, send)

    asyncio.run(run())
    assert sent[0]["status"] == 413 and len(received) == 11  # stopped at the first byte over


def test_a_response_over_the_bound_passes_through_whole_without_a_report():
    seen = Seen()

    async def answer(request, body, rid):
        async def parts():
            for i in range(10):
                yield json.dumps({"part": i, "pad": "x" * 200}).encode()
        return StreamingResponse(parts(), media_type="application/json")

    r = steering_app(seen, answer, max_response_bytes=1000).post(
        "/v1/completions", json={"prompt": "x", "steering": {"mode": "adaptive"}})
    assert r.status_code == 200 and r.content.count(b'"part"') == 10
    assert b'"steering"' not in r.content
