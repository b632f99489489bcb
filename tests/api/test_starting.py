"""What the port answers while the engine starts (api.starting), without an
engine: a bound socket, the responder on it, then another server on the same
socket once it stops."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx

from adaras.api.starting import Starting


def bound() -> socket.socket:
    """A bound socket that does not listen yet, as vLLM's setup_server leaves it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_every_route_gets_a_503_saying_what_the_server_does_until_it_stops():
    sock = bound()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    starting = Starting(sock, "starting the engine: compiling")
    try:
        r = httpx.get(url + "/health", timeout=5)
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        body = r.json()
        assert body["status"] == "starting" and body["phase"] == "starting the engine: compiling"
        assert body["seconds"] >= 0
        starting.set_phase("starting the steering API")
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            r = httpx.request(method, url + path, json={}, timeout=5)
            assert r.status_code == 503 and r.json()["phase"] == "starting the steering API"
        assert httpx.head(url + "/health", timeout=5).status_code == 503
    finally:
        starting.stop()
    starting.stop()  # idempotent

    # the port still listens: the app takes the same socket and answers
    class Ok(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    app = HTTPServer(sock.getsockname(), Ok, bind_and_activate=False)
    app.socket.close()
    app.socket = sock
    sock.listen(16)  # as uvicorn does
    thread = threading.Thread(target=app.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    try:
        r = httpx.get(url + "/health", timeout=5)
        assert r.status_code == 200 and r.text == "ok"
    finally:
        app.shutdown()
        sock.close()
