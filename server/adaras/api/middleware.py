"""ASGI middleware around vLLM's OpenAI app: admission of every JSON request,
and the `steering` extension of the completion routes (API-key auth is
`adaras.api.auth`).

Admission (`SteeringMiddleware`), for every POST with a JSON body:
  1. the body is read up to `max_body_bytes` (413 above it, while it streams);
  2. fields only the server sets (`reports.is_internal`: the profile
     fingerprint, the steered prompt positions, `adaras_*`), at the top level,
     in `vllm_xargs` or in `sampling_params.extra_args`, are a 400 naming
     the field;
  3. on the completion routes (`STEERED_PATHS`) `steering` is resolved (400
     naming the field on a bad value) and the engine's copy is put in the
     body with the request's admission key; on any other route a `steering`
     object other than `{"mode": "off"}` is a 400, and while the server's
     default mode is not `off`, the generating routes that cannot carry a
     report (`UNREPORTED_PATHS`) need that explicit `{"mode": "off"}`;
  4. the request gets a server-made id (`OpenRequest.key`), which vLLM names
     it by; the client's X-Request-Id is only echoed and logged;
  5. vLLM's own handler runs (validation, chat template, sampling, streaming,
     abort on disconnect are all vLLM's);
  6. the engine's reports arrive with the request's outputs
     (`adaras.engine.reports`): the response gets its `steering` report (the
     JSON body, or each stream chunk that ends a choice, and the usage chunk)
     without any call to the engine;
  7. metrics and one log line (`record`).
Steps 1-3 are `adaras.api.admission`'s, the report's content (step 6)
`adaras.api.rendering`'s; this module runs them in order and moves the bytes.
"""

from __future__ import annotations

import json
import logging
import time

from adaras.api import metrics
from adaras.api.admission import (
    STEERED_PATHS,
    BodyTooLarge,
    internal_field,
    is_json,
    read_body,
    unreported_refusal,
)
from adaras.api.asgi import error_body, route_path, send_json
from adaras.api.profiles import ProfileRegistry, SteeringError
from adaras.api.rendering import Rendering
from adaras.engine import reports
from adaras.engine.reports import MAILBOX, OpenRequest
from adaras.report import answer_p_fails
from adaras.steering import STEERING_KEY, Resolved

logger = logging.getLogger("adaras.api")
__all__ = ["STEERED_PATHS", "SteeringMiddleware"]


class SteeringMiddleware:
    def __init__(self, app, registry: ProfileRegistry, model: str,
                 max_body_bytes: int = 32 * 2**20, max_response_bytes: int = 64 * 2**20):
        self.app = app
        self.registry = registry
        self.model = model
        self.max_body_bytes = max_body_bytes
        self.max_response_bytes = max_response_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not is_json(scope):
            return await self.app(scope, receive, send)
        await _Exchange(self, scope, receive, send).run()


class _Exchange:
    """One JSON POST through the middleware: admission (adaras.api.admission),
    vLLM's handler, the response's bytes (its content: adaras.api.rendering),
    then metrics and the log line."""

    def __init__(self, mw: SteeringMiddleware, scope, receive, send):
        self.mw, self.scope, self.receive, self.send = mw, scope, receive, send
        self.path = route_path(scope)
        self.t0 = time.perf_counter()
        self.resolved = Resolved()
        self.entry: OpenRequest | None = None
        self.render = Rendering()
        self.stream = False
        self.status = 500
        self.client_id = dict(scope["headers"]).get(b"x-request-id")
        self.disconnected = False  # the client hung up before the response ended
        self.response_done = False
        self.passthrough = False  # response too large to annotate: sent as it came

    # ---- request side --------------------------------------------------------
    async def run(self) -> None:
        try:
            body = await read_body(self.scope, self.receive, self.mw.max_body_bytes)
        except BodyTooLarge:
            metrics.ERRORS.labels(self.mw.model, "bad_request").inc()
            return await send_json(self.send, 413, error_body(
                f"request body larger than {self.mw.max_body_bytes} bytes "
                "(the server's max_body_mb)", "BadRequestError", 413))
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        if not isinstance(data, dict):  # let vLLM produce its own 400 for junk
            return await self.mw.app(self.scope, self._replay(body), self.send)
        if (field := internal_field(data)) is not None:
            return await self._refuse(field, f"{field}: set by the server only; send "
                                             "`steering` in the body of /v1/chat/completions "
                                             "or /v1/completions")
        if self.path not in STEERED_PATHS:
            if (why := unreported_refusal(self.path, data, self.mw.registry.default_mode)):
                return await self._refuse(STEERING_KEY, why)
            body = json.dumps(data).encode()
            return await self.mw.app(self._scope(body, keep_id=True), self._replay(body),
                                     self.send)
        try:
            self.resolved = self.mw.registry.resolve(data.pop(STEERING_KEY, None))
        except SteeringError as e:
            metrics.ERRORS.labels(self.mw.model, e.metric_kind).inc()
            logger.info("request rejected: %s: %s", e.param, e)
            return await send_json(self.send, e.status, error_body(str(e), e.error_type, e.status,
                                                                   e.param))
        n = data.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        if self.resolved.order_choices and data.get("stream"):
            return await self._refuse("steering.order_choices", "steering.order_choices: a "
                                      "stream sends each choice as it is generated, so it "
                                      "cannot order them; send it without \"stream\"")
        admitted = self.resolved.extra_args()  # the engine's copy ({} when off)
        self.entry = MAILBOX.open(admitted)
        if admitted:
            data.update(admitted, **{reports.ADMISSION_KEY: self.entry.key})
        self.stream = bool(data.get("stream"))
        wants_usage = False
        if self.stream:
            opts = data.get("stream_options")
            opts = dict(opts) if isinstance(opts, dict) else {}
            wants_usage = bool(opts.get("include_usage"))
            opts["include_usage"] = True  # we need the token counts; hidden if not asked for
            data["stream_options"] = opts
        self.render = Rendering(self.resolved, self.entry, n, wants_usage)
        labels = self._labels()
        metrics.REQUESTS.labels(*labels).inc()
        metrics.RUNNING.labels(self.mw.model).inc()
        body = json.dumps(data).encode()
        try:
            await self.mw.app(self._scope(body), self._replay(body), self._send)
        finally:
            MAILBOX.close(self.entry)
            metrics.RUNNING.labels(self.mw.model).dec()
            record(self)

    async def _refuse(self, param: str, message: str) -> None:
        metrics.ERRORS.labels(self.mw.model, "bad_request").inc()
        logger.info("request rejected: %s: %s", param, message)
        await send_json(self.send, 400, error_body(message, "BadRequestError", 400, param))

    def _scope(self, body: bytes, keep_id: bool = False) -> dict:
        drop = (b"content-length",) if keep_id else (b"content-length", b"x-request-id")
        headers = [(k, v) for k, v in self.scope["headers"] if k not in drop]
        headers.append((b"content-length", str(len(body)).encode()))
        if not keep_id:  # vLLM names the request after the server's key, never the client's
            headers.append((b"x-request-id", self.entry.key.encode()))
        return {**self.scope, "headers": headers}

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

    # ---- response side: the bytes ----------------------------------------------
    def _response_headers(self, headers) -> list:
        """vLLM's headers, with the client's X-Request-Id echoed (never ours)."""
        out = [(k, v) for k, v in headers if k.lower() != b"x-request-id"]
        if self.client_id is not None:
            out.append((b"x-request-id", self.client_id))
        return out

    async def _send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            ctype = dict(message.get("headers", [])).get(b"content-type", b"")
            self.stream = ctype.startswith(b"text/event-stream")
            self._start = {**message, "headers": self._response_headers(message.get("headers",
                                                                                    []))}
            if self.stream:
                self._buffer = b""
                await self.send(self._start)
            else:
                self._chunks: list[bytes] = []
                self._size = 0
            return
        if message["type"] != "http.response.body":
            return await self.send(message)
        if self.stream:
            return await self._send_stream(message)
        if self.passthrough:
            self.response_done = not message.get("more_body")
            return await self.send(message)
        self._chunks.append(message.get("body", b""))
        self._size += len(self._chunks[-1])
        if message.get("more_body"):
            if self._size > self.mw.max_response_bytes:  # too large to hold: send it as it is
                logger.warning("response of %s over %d bytes: sent without its steering report",
                               self.entry.key, self.mw.max_response_bytes)
                self.passthrough = True
                await self.send(self._start)
                await self.send({"type": "http.response.body", "body": b"".join(self._chunks),
                                 "more_body": True})
                self._chunks = []
            return
        body = b"".join(self._chunks)
        if self.status == 200:
            body = self.render.json_body(body)
        headers = [(k, v) for k, v in self._start["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        self.response_done = True
        await self.send({**self._start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def _send_stream(self, message) -> None:
        self._buffer += message.get("body", b"")
        out = []
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            if event == b"data: [DONE]":  # the response is complete; a hang-up now is no abort
                self.response_done = True
            event = self.render.stream_event(event)
            if event is not None:
                out.append(event + b"\n\n")
        more = message.get("more_body", False)
        if (not more or len(self._buffer) > self.mw.max_response_bytes) and self._buffer:
            out.append(self._buffer)  # no event boundary: pass it on as it is
            self._buffer = b""
        if not more:
            self.response_done = True
        if out or not more:
            await self.send({"type": "http.response.body", "body": b"".join(out),
                             "more_body": more})


def record(ex: _Exchange) -> None:
    """After the response: the exchange's metrics and its one log line."""
    labels = ex._labels()
    now = time.perf_counter()
    render = ex.render
    report = render.report(render.all_choices())
    if ex.disconnected:  # neither an error nor a completed request
        metrics.DISCONNECTS.labels(ex.mw.model).inc()
    elif ex.status != 200 or render.failed:
        kind = "bad_request" if 400 <= ex.status < 500 else "engine"
        metrics.ERRORS.labels(ex.mw.model, kind).inc()
    else:
        metrics.E2E.labels(*labels).observe(now - ex.t0)
        if render.usage:
            out_tokens = int(render.usage.get("completion_tokens") or 0)
            metrics.GEN_TOKENS.labels(*labels).inc(out_tokens)
            metrics.PROMPT_TOKENS.labels(*labels).inc(int(render.usage.get("prompt_tokens") or 0))
            if render.t_first is not None and out_tokens > 1:
                metrics.TPOT.labels(*labels).observe((now - render.t_first) / (out_tokens - 1))
        if render.t_first is not None:
            metrics.TTFT.labels(*labels).observe(render.t_first - ex.t0)
        if ex.resolved.mode == "adaptive":
            for (_, child), engine in (ex.entry.reports.items() if ex.entry else ()):
                if child == 0 and engine.get("failure_probability") is not None:  # per prompt
                    metrics.P_FAIL.labels(ex.mw.model, ex.resolved.profile).observe(
                        engine["failure_probability"])
        if ex.resolved.answer_probe:
            for engine in (ex.entry.reports.values() if ex.entry else ()):
                if engine.get("answer_failure_probability") is not None:  # per choice
                    metrics.ANSWER_P_FAIL.labels(ex.mw.model, ex.resolved.profile).observe(
                        engine["answer_failure_probability"])
        if ex.resolved.mode != "off":
            metrics.DECISIONS.labels(ex.mw.model, ex.resolved.profile,
                                     "applied" if report.applied else "skipped").inc()
    client = ex.client_id.decode("utf-8", "replace") if ex.client_id else "-"
    logger.info("request %s client_id=%r path=%s status=%d%s%s mode=%s profile=%s "
                "applied=%s p_fail=%s%s%s %.3fs", ex.entry.key if ex.entry else "-",
                client, ex.path, ex.status, " stream-error" if render.failed else "",
                " disconnected" if ex.disconnected else "", ex.resolved.mode,
                ex.resolved.profile, report.applied, report.failure_probability,
                f" answer_p_fail={answer_p_fails(report)}"
                if ex.resolved.answer_probe else "",
                f" error={report.error!r}" if report.error else "", now - ex.t0)
