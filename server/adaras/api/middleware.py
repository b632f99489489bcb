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
  7. metrics and one log line.
"""

from __future__ import annotations

import json
import logging
import time

from adaras.api import metrics
from adaras.api.asgi import error_body, route_path, send_json
from adaras.api.profiles import ProfileRegistry, SteeringError
from adaras.engine import reports
from adaras.engine.reports import MAILBOX, OpenRequest, is_internal
from adaras.report import SteeringReport, answer_p_fails, merge
from adaras.steering import STEERING_KEY, Resolved

logger = logging.getLogger("adaras.api")

# Routes that answer with a report (/invocations is SageMaker's alias of both).
STEERED_PATHS = ("/v1/chat/completions", "/v1/completions", "/invocations")
# Generating routes that cannot carry a report: while the default mode is not
# off they need an explicit {"mode": "off"}, so nothing is silently unsteered.
UNREPORTED_PATHS = ("/v1/responses", "/v1/messages", "/v1/chat/completions/batch",
                    "/inference/v1/generate")
class BodyTooLarge(Exception):
    pass


class SteeringMiddleware:
    def __init__(self, app, registry: ProfileRegistry, model: str,
                 max_body_bytes: int = 32 * 2**20, max_response_bytes: int = 64 * 2**20):
        self.app = app
        self.registry = registry
        self.model = model
        self.max_body_bytes = max_body_bytes
        self.max_response_bytes = max_response_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not _is_json(scope):
            return await self.app(scope, receive, send)
        await _Exchange(self, scope, receive, send).run()


def _is_json(scope) -> bool:
    ctype = dict(scope["headers"]).get(b"content-type", b"")
    return ctype.split(b";")[0].strip().lower() in (b"application/json", b"")


def internal_field(data: dict) -> str | None:
    """The first field of a request body that only the server may set."""
    for key in data:
        if is_internal(key):
            return key
    for where, extra in (("vllm_xargs", data.get("vllm_xargs")),
                         ("sampling_params.extra_args",
                          (data.get("sampling_params") or {}).get("extra_args")
                          if isinstance(data.get("sampling_params"), dict) else None)):
        if isinstance(extra, dict):
            for key in extra:
                if key == STEERING_KEY or is_internal(key):
                    return f"{where}.{key}"
    return None


class _Exchange:
    """One JSON POST through the middleware."""

    def __init__(self, mw: SteeringMiddleware, scope, receive, send):
        self.mw, self.scope, self.receive, self.send = mw, scope, receive, send
        self.path = route_path(scope)
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.resolved = Resolved()
        self.entry: OpenRequest | None = None
        self.n = 1  # choices per prompt
        self.usage: dict | None = None
        self.client_wants_usage = False
        self.stream = False
        self.status = 500
        self.failed = False  # an error event inside a 200 stream
        self.client_id = dict(scope["headers"]).get(b"x-request-id")
        self.disconnected = False  # the client hung up before the response ended
        self.response_done = False
        self.passthrough = False  # response too large to annotate: sent as it came
        self.order: dict[int, int] = {}  # order_choices: response index -> index as generated

    # ---- request side --------------------------------------------------------
    async def run(self) -> None:
        try:
            body = await self._read_body()
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
            return await self._pass_unreported(data)
        try:
            self.resolved = self.mw.registry.resolve(data.pop(STEERING_KEY, None))
        except SteeringError as e:
            metrics.ERRORS.labels(self.mw.model, e.metric_kind).inc()
            logger.info("request rejected: %s: %s", e.param, e)
            return await send_json(self.send, e.status, error_body(str(e), e.error_type, e.status,
                                                                   e.param))
        n = data.get("n")
        self.n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        if self.resolved.order_choices and data.get("stream"):
            return await self._refuse("steering.order_choices", "steering.order_choices: a "
                                      "stream sends each choice as it is generated, so it "
                                      "cannot order them; send it without \"stream\"")
        admitted = self.resolved.extra_args()  # the engine's copy ({} when off)
        self.entry = MAILBOX.open(admitted)
        if admitted:
            data.update(admitted, **{reports.ADMISSION_KEY: self.entry.key})
        self.stream = bool(data.get("stream"))
        if self.stream:
            opts = data.get("stream_options")
            opts = dict(opts) if isinstance(opts, dict) else {}
            self.client_wants_usage = bool(opts.get("include_usage"))
            opts["include_usage"] = True  # we need the token counts; hidden if not asked for
            data["stream_options"] = opts
        labels = self._labels()
        metrics.REQUESTS.labels(*labels).inc()
        metrics.RUNNING.labels(self.mw.model).inc()
        body = json.dumps(data).encode()
        try:
            await self.mw.app(self._scope(body), self._replay(body), self._send)
        finally:
            MAILBOX.close(self.entry)
            metrics.RUNNING.labels(self.mw.model).dec()
            self._finish()

    async def _refuse(self, param: str, message: str) -> None:
        metrics.ERRORS.labels(self.mw.model, "bad_request").inc()
        logger.info("request rejected: %s: %s", param, message)
        await send_json(self.send, 400, error_body(message, "BadRequestError", 400, param))

    async def _pass_unreported(self, data: dict) -> None:
        """A JSON POST to a route without a steering report."""
        steering = data.pop(STEERING_KEY, None) if STEERING_KEY in data else None
        explicit_off = isinstance(steering, dict) and steering == {"mode": "off"}
        if steering is not None and not explicit_off:
            return await self._refuse(STEERING_KEY, f"steering is not supported on {self.path}: "
                                      "use /v1/chat/completions or /v1/completions (only "
                                      "{\"mode\": \"off\"} is accepted here)")
        if (self.path in UNREPORTED_PATHS and not explicit_off
                and self.mw.registry.default_mode != "off"):
            return await self._refuse(STEERING_KEY, (
                f"this server steers requests by default (mode "
                f"{self.mw.registry.default_mode!r}), and {self.path} cannot carry a steering "
                "report: use /v1/chat/completions or /v1/completions, or send "
                "\"steering\": {\"mode\": \"off\"} to run unsteered"))
        body = json.dumps(data).encode()
        await self.mw.app(self._scope(body, keep_id=True), self._replay(body), self.send)

    def _scope(self, body: bytes, keep_id: bool = False) -> dict:
        drop = (b"content-length",) if keep_id else (b"content-length", b"x-request-id")
        headers = [(k, v) for k, v in self.scope["headers"] if k not in drop]
        headers.append((b"content-length", str(len(body)).encode()))
        if not keep_id:  # vLLM names the request after the server's key, never the client's
            headers.append((b"x-request-id", self.entry.key.encode()))
        return {**self.scope, "headers": headers}

    async def _read_body(self) -> bytes:
        declared = dict(self.scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.mw.max_body_bytes:
            raise BodyTooLarge
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.mw.max_body_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
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
            body = self._with_report(body)
        headers = [(k, v) for k, v in self._start["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        self.response_done = True
        await self.send({**self._start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    def _with_report(self, body: bytes) -> bytes:
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if not isinstance(data, dict):  # nothing we can annotate: pass it through
            return body
        usage = data.get("usage")
        self.usage = usage if isinstance(usage, dict) else None
        choices = data.get("choices")
        count = len(choices) if isinstance(choices, list) else 1
        if self.resolved.order_choices and isinstance(choices, list):
            self._order_choices(choices)
        data[STEERING_KEY] = self._report(range(max(count, 1))).wire()
        return json.dumps(data).encode()

    def _order_choices(self, choices: list) -> None:
        """order_choices: within each prompt's `n` choices, lowest
        answer_failure_probability first (none last), `index` renumbered;
        self.order maps each new index to the choice's index as generated."""
        if not all(isinstance(c, dict) and isinstance(c.get("index"), int) for c in choices):
            return

        def p(c: dict) -> tuple[bool, float]:
            a = (self._engine_report(c["index"]) or {}).get("answer_failure_probability")
            return a is None, a if a is not None else 0.0

        by_prompt: dict[int, list[dict]] = {}
        for c in sorted(choices, key=lambda c: c["index"]):
            by_prompt.setdefault(c["index"] // self.n, []).append(c)
        ordered = []
        for prompt in sorted(by_prompt):
            ordered += sorted(by_prompt[prompt], key=p)  # stable: ties keep their order
        self.order = {}
        for new_index, c in enumerate(ordered):
            self.order[new_index] = c["index"]
            c["index"] = new_index
        choices[:] = ordered

    async def _send_stream(self, message) -> None:
        self._buffer += message.get("body", b"")
        out = []
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            if event == b"data: [DONE]":  # the response is complete; a hang-up now is no abort
                self.response_done = True
            event = self._rewrite_event(event)
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

    def _rewrite_event(self, event: bytes) -> bytes | None:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            return event
        if not isinstance(chunk, dict):
            return event
        if "error" in chunk and "choices" not in chunk:  # vLLM's in-stream error event
            self.failed = True
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
        ended = [c["index"] for c in choices if c.get("finish_reason") and
                 isinstance(c.get("index"), int)]
        if ended:
            chunk[STEERING_KEY] = self._report(ended).wire()
        elif usage and self.client_wants_usage:
            chunk[STEERING_KEY] = self._report(self._all_choices()).wire()
        else:
            return event
        return b"data: " + json.dumps(chunk).encode()

    # ---- the report ----------------------------------------------------------
    def _all_choices(self) -> range:
        prompts = 1 + max((p for p, _ in self.entry.reports), default=0) if self.entry else 1
        return range(prompts * self.n)

    def _engine_report(self, choice: int) -> dict | None:
        """The engine's report for one response choice (completions number a
        batch's choices prompt by prompt, `n` each)."""
        if self.entry is None:
            return None
        return self.entry.reports.get(divmod(self.order.get(choice, choice), self.n))

    def _report(self, choices) -> SteeringReport:
        """The `steering` report of these response choices (adaras.report.merge)."""
        return merge(self.resolved, [(i, self._engine_report(i), self.order.get(i))
                                     for i in choices])

    def _finish(self) -> None:
        labels = self._labels()
        now = time.perf_counter()
        report = self._report(self._all_choices())
        if self.disconnected:  # neither an error nor a completed request
            metrics.DISCONNECTS.labels(self.mw.model).inc()
        elif self.status != 200 or self.failed:
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
            if self.resolved.mode == "adaptive":
                for (_, child), engine in (self.entry.reports.items() if self.entry else ()):
                    if child == 0 and engine.get("failure_probability") is not None:  # per prompt
                        metrics.P_FAIL.labels(self.mw.model, self.resolved.profile).observe(
                            engine["failure_probability"])
            if self.resolved.answer_probe:
                for engine in (self.entry.reports.values() if self.entry else ()):
                    if engine.get("answer_failure_probability") is not None:  # per choice
                        metrics.ANSWER_P_FAIL.labels(self.mw.model, self.resolved.profile).observe(
                            engine["answer_failure_probability"])
            if self.resolved.mode != "off":
                metrics.DECISIONS.labels(self.mw.model, self.resolved.profile,
                                         "applied" if report.applied else "skipped").inc()
        client = self.client_id.decode("utf-8", "replace") if self.client_id else "-"
        logger.info("request %s client_id=%r path=%s status=%d%s%s mode=%s profile=%s "
                    "applied=%s p_fail=%s%s%s %.3fs", self.entry.key if self.entry else "-",
                    client, self.path, self.status, " stream-error" if self.failed else "",
                    " disconnected" if self.disconnected else "", self.resolved.mode,
                    self.resolved.profile, report.applied, report.failure_probability,
                    f" answer_p_fail={answer_p_fails(report)}"
                    if self.resolved.answer_probe else "",
                    f" error={report.error!r}" if report.error else "", now - self.t0)
