"""How a request's steering report travels: with the request's own outputs.

A report (`adaras.report`: mode, profile, alpha, failure_probability,
applied, ...) is made in the worker that steers the request, and read in the
frontend process that answers it. It takes the path the request's tokens take,
so nothing polls and nothing is stored for a reader that may never come:

  worker       the runtime posts a report when it is final for the prompt (the
               gate's decision, or an error) to its `Outbox`; the runner puts
               the outbox on the step's ModelRunnerOutput (`OUTPUT_ATTR`) and
               empties it, every step.
  engine core  the scheduler keeps a posted report until the request's next
               EngineCoreOutput, which carries it in `kv_transfer_params` under
               `REPORT_KEY`; a request that ends first drops it (`carry`).
  frontend     the output processor takes it out again before vLLM reads
               `kv_transfer_params`, sets it on the choice's CompletionOutput
               (`.steering`, read by the offline API) and hands it to the
               `Mailbox` entry the HTTP layer opened for the request, if any.

The `Mailbox` is also the HTTP server's admission record: every request the
server admits gets a server-made key (`OpenRequest.key`, never the client's
X-Request-Id), under which vLLM names it (`chatcmpl-<key>`, `cmpl-<key>-<i>`)
and under which its reports arrive. While the mailbox is enforced (the HTTP
server sets it), the frontend refuses steering fields in a request that the
server did not admit with exactly those values (`check_admitted`).

Pure Python: imported by the frontend, the engine core and the workers.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

REPORT_KEY = "adaras_report"  # kv_transfer_params key, engine core -> frontend
OUTPUT_ATTR = "adaras_reports"  # ModelRunnerOutput attribute, worker -> engine core
ADMISSION_KEY = "adaras_admission"  # extra_args: the OpenRequest.key that admitted it

# Fields a client may never set: the server sets them after admission.
INTERNAL_FIELDS = ("steering_fingerprint", "steering_prompt_positions")
INTERNAL_PREFIX = "adaras_"

_EXTERNAL_ID = re.compile(r"^(?:chatcmpl|cmpl)-(?P<key>[0-9a-f]{32})(?:-(?P<prompt>\d+))?$")


def is_internal(name: object) -> bool:
    """Whether an extra_args / body key is one only the server may set."""
    return isinstance(name, str) and (name in INTERNAL_FIELDS or name.startswith(INTERNAL_PREFIX))


# ---- worker -------------------------------------------------------------------

class Outbox:
    """Reports posted during one step, by engine request id (the last one
    posted for a request wins). Emptied into every step's output."""

    def __init__(self) -> None:
        self._reports: dict[str, dict] = {}

    def post(self, req_id: str, report: dict) -> None:
        self._reports[req_id] = report

    def drain(self) -> dict[str, dict]:
        out, self._reports = self._reports, {}
        return out

    def __len__(self) -> int:
        return len(self._reports)


# ---- engine core --------------------------------------------------------------

def carry(pending: dict[str, dict], posted: dict[str, dict] | None, outputs: Iterable,
          live: Iterable[str] | dict) -> None:
    """One scheduler step: add the reports `posted` by the worker to `pending`,
    put each pending report on its request's EngineCoreOutput in `outputs`,
    and forget the reports of requests that are not `live` any more (finished
    or aborted: their last output, if any, is among `outputs`)."""
    if posted:
        pending.update(posted)
    if not pending:
        return
    for out in outputs:
        report = pending.pop(out.request_id, None)
        if report is not None:
            out.kv_transfer_params = {**(out.kv_transfer_params or {}), REPORT_KEY: report}
    for rid in [r for r in pending if r not in live]:
        del pending[rid]


# ---- frontend -----------------------------------------------------------------

def take_report(engine_core_output) -> dict | None:
    """Remove the report an EngineCoreOutput carries (None: it carries none),
    leaving `kv_transfer_params` as vLLM would have it."""
    params = engine_core_output.kv_transfer_params
    if not params or REPORT_KEY not in params:
        return None
    params = dict(params)
    report = params.pop(REPORT_KEY)
    engine_core_output.kv_transfer_params = params or None
    return report


@dataclass
class OpenRequest:
    """One request the HTTP server admitted, from admission until its
    response has ended. `reports`: (prompt index, choice index within the
    prompt) -> the engine's report for that choice."""

    admitted: dict  # the internal extra_args the server set ({} when unsteered)
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    reports: dict[tuple[int, int], dict] = field(default_factory=dict)


class Mailbox:
    """The frontend's open requests, by key. Reports for a request that is not
    open (already answered, or not made by the HTTP server) are dropped."""

    def __init__(self) -> None:
        self.open_requests: dict[str, OpenRequest] = {}
        self.enforced = False  # set by the HTTP server: refuse unadmitted steering

    def open(self, admitted: dict) -> OpenRequest:
        entry = OpenRequest(dict(admitted))
        self.open_requests[entry.key] = entry
        return entry

    def close(self, entry: OpenRequest) -> None:
        self.open_requests.pop(entry.key, None)

    def deliver(self, external_id: str, index: int, report: dict) -> bool:
        """File a report under the request vLLM named `external_id`
        (`chatcmpl-<key>` or `cmpl-<key>-<prompt>`); False when no such
        request is open."""
        m = _EXTERNAL_ID.match(external_id)
        entry = self.open_requests.get(m["key"]) if m else None
        if entry is None:
            return False
        entry.reports[(int(m["prompt"] or 0), index)] = report
        return True

    def check_admitted(self, extra_args: dict | None) -> None:
        """Raise ValueError naming the field when `extra_args` carries steering
        or internal fields the server did not admit (only while enforced)."""
        from adaras.steering import STEERING_KEY

        if not self.enforced or not extra_args:
            return
        claimed = {k: v for k, v in extra_args.items()
                   if (k == STEERING_KEY or is_internal(k)) and k != ADMISSION_KEY}
        if not claimed:
            return
        entry = self.open_requests.get(extra_args.get(ADMISSION_KEY) or "")
        if entry is None or claimed != entry.admitted:
            name = next((k for k in claimed if entry is None or
                         entry.admitted.get(k, object()) != claimed[k]), sorted(claimed)[0])
            raise ValueError(f"{name}: set by the server only; send `steering` in the body of "
                             "/v1/chat/completions or /v1/completions")


MAILBOX = Mailbox()  # one per process; only the HTTP server's frontend opens entries
