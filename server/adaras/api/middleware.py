"""ASGI middleware around vLLM's OpenAI app: API-key auth and the `steering`
extension of /v1/chat/completions and /v1/completions.

Every completion request takes one path:
  1. pop `steering` from the JSON body and resolve it (400 naming the field on
     a bad value); leave the engine's copy in the body for the request hooks;
  2. hand the request to vLLM's own handler (validation, chat template,
     sampling, streaming, aborting on client disconnect are all vLLM's);
  3. add the `steering` report to the response: the JSON body, or in a stream
     every chunk that carries a finish_reason or the usage;
  4. record metrics and one log line.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid

from adaras.api import metrics
from adaras.api.glue import engine_rpc
from adaras.api.profiles import ProfileRegistry, SteeringError
from adaras.api.protocol import ErrorInfo, ErrorResponse
from adaras.steering import STEERING_KEY, Resolved

logger = logging.getLogger("adaras.api")

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")


def error_body(message: str, type_: str, code: int, param: str | None = None) -> bytes:
    """An OpenAI-style error body (protocol.ErrorResponse)."""
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param,
                                         code=code)).model_dump_json().encode()


async def send_json(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """Bearer key on /v1/* (the API key or the admin key), when one is set."""

    def __init__(self, app, api_key: str | None, admin_key: str | None, model: str):
        self.app = app
        self.keys = [k.encode() for k in (api_key, admin_key) if k]
        self.enabled = api_key is not None
        self.model = model

    async def __call__(self, scope, receive, send):
        if (not self.enabled or scope["type"] != "http" or not scope["path"].startswith("/v1")
                or scope["method"] == "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if not any(secrets.compare_digest(token, k) for k in self.keys):
            metrics.ERRORS.labels(self.model, "unauthorized").inc()
            return await send_json(send, 401, error_body(
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                "AuthenticationError", 401), [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class SteeringMiddleware:
    def __init__(self, app, registry: ProfileRegistry, model: str, report_timeout_s: float = 5.0):
        self.app = app
        self.registry = registry
        self.model = model
        self.report_timeout_s = report_timeout_s

    async def __call__(self, scope, receive, send):
        if not (scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] in COMPLETION_PATHS):
            return await self.app(scope, receive, send)
        await _Exchange(self, scope, receive, send).run()


class _Exchange:
    """One completion request through the middleware."""

    def __init__(self, mw: SteeringMiddleware, scope, receive, send):
        self.mw, self.scope, self.receive, self.send = mw, scope, receive, send
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.resolved = Resolved()
        self.engine_report: dict | None = None
        self.usage: dict | None = None
        self.client_wants_usage = False
        self.stream = False
        self.status = 500
        self.request_id = ""
        self.disconnected = False  # the client hung up before the response ended
        self.response_done = False

    # ---- request side --------------------------------------------------------
    async def run(self) -> None:
        body = await self._read_body()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        if not isinstance(data, dict):  # let vLLM produce its own 400 for junk
            return await self.mw.app(self.scope, self._replay(body), self.send)
        try:
            self.resolved = self.mw.registry.resolve(data.pop(STEERING_KEY, None))
        except SteeringError as e:
            metrics.ERRORS.labels(self.mw.model, e.metric_kind).inc()
            logger.info("request rejected: %s: %s", e.param, e)
            return await send_json(self.send, e.status, error_body(str(e), e.error_type, e.status,
                                                                   e.param))
        data.update(self.resolved.extra_args())  # the engine's copy ({} when off)
        self.stream = bool(data.get("stream"))
        if self.stream:
            opts = data.get("stream_options")
            opts = dict(opts) if isinstance(opts, dict) else {}
            self.client_wants_usage = bool(opts.get("include_usage"))
            opts["include_usage"] = True  # we need the token counts; hidden if not asked for
            data["stream_options"] = opts
        body = json.dumps(data).encode()

        headers = [(k, v) for k, v in self.scope["headers"]
                   if k not in (b"content-length", b"x-request-id")]
        given = dict(self.scope["headers"]).get(b"x-request-id")
        self.request_id = given.decode() if given else f"adaras-{uuid.uuid4().hex}"
        headers += [(b"content-length", str(len(body)).encode()),
                    (b"x-request-id", self.request_id.encode())]
        scope = {**self.scope, "headers": headers}

        labels = self._labels()
        metrics.REQUESTS.labels(*labels).inc()
        metrics.RUNNING.labels(self.mw.model).inc()
        try:
            await self.mw.app(scope, self._replay(body), self._send)
        finally:
            metrics.RUNNING.labels(self.mw.model).dec()
            self._finish()

    async def _read_body(self) -> bytes:
        chunks = []
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        return b"".join(chunks)

    def _replay(self, body: bytes):
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await self.receive()  # later calls: wait for http.disconnect
            if message["type"] == "http.disconnect" and not self.response_done:
                self.disconnected = True
            return message

        return receive

    def _labels(self) -> tuple[str, str, str]:
        return self.mw.model, self.resolved.profile or "none", self.resolved.mode

    # ---- response side -------------------------------------------------------
    async def _send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            ctype = dict(message.get("headers", [])).get(b"content-type", b"")
            self.stream = ctype.startswith(b"text/event-stream")
            self._start = message
            if self.stream:
                self._buffer = b""
                await self.send(message)
            else:
                self._chunks: list[bytes] = []
            return
        if message["type"] != "http.response.body":
            return await self.send(message)
        if self.stream:
            return await self._send_stream(message)
        self._chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(self._chunks)
        if self.status == 200:
            body = await self._with_report(body)
        headers = [(k, v) for k, v in self._start.get("headers", []) if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        self.response_done = True
        await self.send({**self._start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def _with_report(self, body: bytes) -> bytes:
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if not isinstance(data, dict):  # nothing we can annotate: pass it through
            return body
        usage = data.get("usage")
        self.usage = usage if isinstance(usage, dict) else None
        data[STEERING_KEY] = await self._report()
        return json.dumps(data).encode()

    async def _send_stream(self, message) -> None:
        self._buffer += message.get("body", b"")
        out = []
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            if event == b"data: [DONE]":  # the response is complete; a hang-up now is no abort
                self.response_done = True
            event = await self._rewrite_event(event)
            if event is not None:
                out.append(event + b"\n\n")
        more = message.get("more_body", False)
        if not more and self._buffer:
            out.append(self._buffer)
            self._buffer = b""
        if not more:
            self.response_done = True
        if out or not more:
            await self.send({"type": "http.response.body", "body": b"".join(out),
                             "more_body": more})

    async def _rewrite_event(self, event: bytes) -> bytes | None:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            return event
        if not isinstance(chunk, dict):
            return event
        choices = chunk.get("choices")
        choices = [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
        if self.t_first is None and choices:
            self.t_first = time.perf_counter()
        usage = chunk.get("usage")
        if isinstance(usage, dict) and usage:
            self.usage = usage
            if not choices and not self.client_wants_usage:
                return None  # the usage chunk we asked for on the client's behalf
            if not self.client_wants_usage:
                chunk["usage"] = None
        finished = any(c.get("finish_reason") for c in choices)
        if finished or (usage and self.client_wants_usage):
            chunk[STEERING_KEY] = await self._report()
        else:
            return event
        return b"data: " + json.dumps(chunk).encode()

    async def _report(self) -> dict:
        if self.resolved.mode == "adaptive" and self.engine_report is None:
            self.engine_report = await self._fetch_engine_report()
        return self._final_report()

    def _final_report(self) -> dict:
        """The response's report: the admission-time steering plus the engine's
        gate decision (adaptive)."""
        engine = self.engine_report or {}
        return self.resolved.report(engine.get("failure_probability"), engine.get("applied"))

    async def _fetch_engine_report(self) -> dict:
        import asyncio

        deadline = time.perf_counter() + self.mw.report_timeout_s
        while True:
            reports = await engine_rpc(self.mw.registry.engine, "pop_reports",
                                       [f"chatcmpl-{self.request_id}", f"cmpl-{self.request_id}"])
            # n > 1: every child saw the same prompt, so the same p_fail and decision.
            done = [r for r in reports.values() if r.get("failure_probability") is not None]
            if done or time.perf_counter() > deadline:
                return done[0] if done else {}
            await asyncio.sleep(0.01)

    def _finish(self) -> None:
        labels = self._labels()
        now = time.perf_counter()
        report = self._final_report()
        if self.disconnected:  # neither an error nor a completed request
            metrics.DISCONNECTS.labels(self.mw.model).inc()
        elif self.status != 200:
            kind = "bad_request" if 400 <= self.status < 500 else "engine"
            metrics.ERRORS.labels(self.mw.model, kind).inc()
        else:
            metrics.E2E.labels(*labels).observe(now - self.t0)
            if self.usage:
                out_tokens = int(self.usage.get("completion_tokens") or 0)
                metrics.GEN_TOKENS.labels(*labels).inc(out_tokens)
                metrics.PROMPT_TOKENS.labels(*labels).inc(int(self.usage.get("prompt_tokens") or 0))
                if self.t_first is not None and out_tokens > 1:
                    metrics.TPOT.labels(*labels).observe((now - self.t_first) / (out_tokens - 1))
            if self.t_first is not None:
                metrics.TTFT.labels(*labels).observe(self.t_first - self.t0)
            if self.resolved.mode == "adaptive" and report["failure_probability"] is not None:
                metrics.P_FAIL.labels(self.mw.model, self.resolved.profile).observe(
                    report["failure_probability"])
            if self.resolved.mode != "off":
                metrics.DECISIONS.labels(self.mw.model, self.resolved.profile,
                                         "applied" if report["applied"] else "skipped").inc()
        logger.info("request %s path=%s status=%d%s mode=%s profile=%s applied=%s p_fail=%s "
                    "%.3fs", self.request_id, self.scope["path"], self.status,
                    " disconnected" if self.disconnected else "", self.resolved.mode,
                    self.resolved.profile, report["applied"],
                    (self.engine_report or {}).get("failure_probability"), now - self.t0)
