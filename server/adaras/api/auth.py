"""API-key auth, one owner for the HTTP middleware and the profile routes.

With an API key set, every HTTP and websocket route needs it, under any
`root_path`, except the read-only routes in `OPEN_PATHS` (health, version,
metrics, the API docs). Keys are compared in constant time on their SHA-256
digests; the scheme is case-insensitive (RFC 7235). The admin key, which the
profile routes ask for, is checked the same way.
"""

from __future__ import annotations

import hashlib
import secrets

from adaras.api import metrics
from adaras.api.asgi import error_body, route_path, send_json

# Routes served without the API key: they neither run the model nor read data.
OPEN_PATHS = ("/health", "/ping", "/version", "/metrics", "/openapi.json", "/docs",
              "/docs/oauth2-redirect", "/redoc")


def bearer_token(headers) -> bytes | None:
    """The credentials of an `Authorization: Bearer <token>` header (any case of
    the scheme), or None."""
    scheme, _, token = (dict(headers).get(b"authorization") or b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


def key_matches(token: bytes | str | None, keys: list[bytes]) -> bool:
    """Constant-time comparison of `token` with each key's SHA-256 digest."""
    if token is None:
        return False
    digest = hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()
    found = False
    for key in keys:
        found |= secrets.compare_digest(digest, key)
    return found


def key_digests(*keys: str | None) -> list[bytes]:
    return [hashlib.sha256(k.encode()).digest() for k in keys if k]


class ApiKeyMiddleware:
    """With an API key set: every route but OPEN_PATHS needs the API key or the
    admin key as a bearer token; websockets are refused before they open."""

    def __init__(self, app, api_key: str | None, admin_key: str | None, model: str):
        self.app = app
        self.keys = key_digests(api_key, admin_key)
        self.enabled = api_key is not None
        self.model = model

    async def __call__(self, scope, receive, send):
        if (not self.enabled or scope["type"] not in ("http", "websocket")
                or scope.get("method") == "OPTIONS"  # CORS preflight carries no credentials
                or route_path(scope) in OPEN_PATHS
                or key_matches(bearer_token(scope["headers"]), self.keys)):
            return await self.app(scope, receive, send)
        metrics.ERRORS.labels(self.model, "unauthorized").inc()
        if scope["type"] == "websocket":  # closing before accept: the handshake gets a 403
            return await send({"type": "websocket.close", "code": 1008})
        return await send_json(send, 401, error_body(
            "missing or wrong API key: send `Authorization: Bearer <key>`",
            "AuthenticationError", 401), [(b"www-authenticate", b"Bearer")])
