"""The request side of the API: what a JSON POST must pass before vLLM sees
it. Its body is read up to a limit (413 above it, while it streams); fields
only the server sets are refused by name; on the completion routes
(`STEERED_PATHS`) the `steering` object is resolved (by the profile
registry), and on any other route only `{"mode": "off"}` passes, which the
generating routes that cannot carry a report (`UNREPORTED_PATHS`) need while
the server's default mode is not `off`. `adaras.api.middleware` runs these
steps; `adaras.api.rendering` is the response side.
"""

from __future__ import annotations

from adaras.engine.reports import is_internal
from adaras.steering import STEERING_KEY

# Routes that answer with a report (/invocations is SageMaker's alias of both).
STEERED_PATHS = ("/v1/chat/completions", "/v1/completions", "/invocations")
# Generating routes that cannot carry a report: while the default mode is not
# off they need an explicit {"mode": "off"}, so nothing is silently unsteered.
UNREPORTED_PATHS = ("/v1/responses", "/v1/messages", "/v1/chat/completions/batch",
                    "/inference/v1/generate")


class BodyTooLarge(Exception):
    pass


def is_json(scope) -> bool:
    ctype = dict(scope["headers"]).get(b"content-type", b"")
    return ctype.split(b";")[0].strip().lower() in (b"application/json", b"")


async def read_body(scope, receive, max_bytes: int) -> bytes:
    """The whole request body; BodyTooLarge as soon as it is over `max_bytes`
    (declared or streamed)."""
    declared = dict(scope["headers"]).get(b"content-length", b"")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


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


def unreported_refusal(path: str, data: dict, default_mode: str) -> str | None:
    """Why a JSON POST to a route without a report is refused (its `steering`
    object popped from `data`), or None to pass it on."""
    steering = data.pop(STEERING_KEY, None) if STEERING_KEY in data else None
    explicit_off = isinstance(steering, dict) and steering == {"mode": "off"}
    if steering is not None and not explicit_off:
        return (f"steering is not supported on {path}: use /v1/chat/completions or "
                "/v1/completions (only {\"mode\": \"off\"} is accepted here)")
    if path in UNREPORTED_PATHS and not explicit_off and default_mode != "off":
        return (f"this server steers requests by default (mode {default_mode!r}), and {path} "
                "cannot carry a steering report: use /v1/chat/completions or "
                "/v1/completions, or send \"steering\": {\"mode\": \"off\"} to run unsteered")
    return None
