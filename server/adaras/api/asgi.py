"""Plain ASGI helpers the API's middlewares share: the routed path under a
`root_path`, an OpenAI-style error body, and a whole JSON response."""

from __future__ import annotations

from adaras.api.protocol import ErrorInfo, ErrorResponse


def route_path(scope) -> str:
    """The path the app routes on: without the `root_path` it is mounted under."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def error_body(message: str, type_: str, code: int, param: str | None = None) -> bytes:
    """An OpenAI-style error body (protocol.ErrorResponse)."""
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param,
                                         code=code)).model_dump_json().encode()


async def send_json(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
