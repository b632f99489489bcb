"""What the server answers while it starts.

`adaras serve` binds its port before the engine starts (vLLM's `setup_server`)
but listens only when the app serves, so without this a request during
start-up is refused and looks like a dead server. `Starting` listens on that
socket meanwhile and answers from a thread (vLLM's engine start-up blocks the
event loop): every request gets a 503 with `Retry-After` and a JSON body
saying what the server is doing,

    {"status": "starting", "phase": "loading the model and its 2 compiled graphs",
     "seconds": 12.3}

and `/health` in particular, so an operator or a readiness probe sees progress
instead of a refused connection. It stops before the app takes the socket; a
request that arrives in between waits in the listen queue for the app.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger("adaras")

RETRY_AFTER_S = 5


class Starting:
    def __init__(self, sock: socket.socket, phase: str):
        self.phase = phase
        self.t0 = time.monotonic()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = json.dumps({"status": "starting", "phase": owner.phase,
                                   "seconds": round(time.monotonic() - owner.t0, 1)}).encode()
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Retry-After", str(RETRY_AFTER_S))
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = _answer

            def log_message(self, *args) -> None:  # one line per request is noise here
                pass

        # The server accepts on a duplicate of the bound socket: closing it leaves
        # the port listening for the app.
        self.server = ThreadingHTTPServer(sock.getsockname()[:2], Handler,
                                          bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = sock.dup()
        self.server.socket.setblocking(True)
        self.server.socket.listen(128)  # the app listens again (its own backlog) later
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,),
                                       name="adaras-starting", daemon=True)
        self.thread.start()

    def set_phase(self, phase: str) -> None:
        logger.info("adaras: starting: %s", phase)
        self.phase = phase

    def stop(self) -> None:
        """Stop answering (idempotent); the socket itself stays bound and listening."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join()
        self.server.server_close()  # closes the duplicate only
