"""The response side of a steered request: each choice's `steering` report
(built by `adaras.report.merge` from the engine's reports, which arrive with
the request's outputs) put into the JSON body or into the stream chunks that
end a choice and the usage chunk; `order_choices`; and what the metrics need
from the response (usage, first token time, an in-stream error).
`adaras.api.middleware` moves the bytes; this module decides their content.
"""

from __future__ import annotations

import json
import time

from adaras.engine.reports import OpenRequest
from adaras.report import SteeringReport, merge
from adaras.steering import STEERING_KEY, Resolved


class Rendering:
    """One response's rendering state."""

    def __init__(self, resolved: Resolved | None = None, entry: OpenRequest | None = None,
                 n: int = 1, client_wants_usage: bool = False):
        self.resolved = resolved or Resolved()
        self.entry = entry
        self.n = n  # choices per prompt
        self.client_wants_usage = client_wants_usage
        self.order: dict[int, int] = {}  # order_choices: response index -> index as generated
        self.usage: dict | None = None
        self.t_first: float | None = None
        self.failed = False  # an error event inside a 200 stream

    # ---- the report ----------------------------------------------------------
    def all_choices(self) -> range:
        prompts = 1 + max((p for p, _ in self.entry.reports), default=0) if self.entry else 1
        return range(prompts * self.n)

    def engine_report(self, choice: int) -> dict | None:
        """The engine's report for one response choice (completions number a
        batch's choices prompt by prompt, `n` each)."""
        if self.entry is None:
            return None
        return self.entry.reports.get(divmod(self.order.get(choice, choice), self.n))

    def report(self, choices) -> SteeringReport:
        """The `steering` report of these response choices (adaras.report.merge)."""
        return merge(self.resolved, [(i, self.engine_report(i), self.order.get(i))
                                     for i in choices])

    # ---- a JSON body -----------------------------------------------------------
    def json_body(self, body: bytes) -> bytes:
        """A 200 JSON response with its report (and its choices ordered when asked)."""
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
            self.order_choices(choices)
        data[STEERING_KEY] = self.report(range(max(count, 1))).wire()
        return json.dumps(data).encode()

    def order_choices(self, choices: list) -> None:
        """order_choices: within each prompt's `n` choices, lowest
        answer_failure_probability first (none last), `index` renumbered;
        self.order maps each new index to the choice's index as generated."""
        if not all(isinstance(c, dict) and isinstance(c.get("index"), int) for c in choices):
            return

        def p(c: dict) -> tuple[bool, float]:
            a = (self.engine_report(c["index"]) or {}).get("answer_failure_probability")
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

    # ---- a stream ------------------------------------------------------------
    def stream_event(self, event: bytes) -> bytes | None:
        """One server-sent event, rewritten: the report on the chunk that ends a
        choice (and on the usage chunk the client asked for); the usage chunk
        the server asked for on the client's behalf dropped (None)."""
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
            chunk[STEERING_KEY] = self.report(ended).wire()
        elif usage and self.client_wants_usage:
            chunk[STEERING_KEY] = self.report(self.all_choices()).wire()
        else:
            return event
        return b"data: " + json.dumps(chunk).encode()
