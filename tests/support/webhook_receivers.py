"""Webhook receivers for tests: a real HTTP server on a loopback address that answers each request as
told (a status code, or a response trickled one byte at a time until the sender hangs up) and
records what it got and when the sender closed the connection."""

from __future__ import annotations

import json
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from support.gateway_process import HOOK_HOST

TRICKLE = "trickle"
"""A behaviour: send ``HTTP/1.1 200 OK…`` one byte every ``trickle_s``, never finishing."""


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float  # time.monotonic()
    behaviour: int | str
    closed_at: float | None = None  # when the sender hung up (trickled calls)

    @property
    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Answers the n-th request with ``behaviours[n]`` (``then`` once they run out)."""

    behaviours: list[int | str] = field(default_factory=list)
    then: int | str = 200
    host: str = HOOK_HOST
    trickle_s: float = 0.5
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    behaviour = receiver.behaviours.pop(0) if receiver.behaviours else receiver.then
                    call = Call(self.path, dict(self.headers.items()), body, time.monotonic(), behaviour)
                    receiver.calls.append(call)
                if behaviour == TRICKLE:
                    receiver._trickle(self, call)
                    return
                self.send_response(int(behaviour))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((self.host, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _trickle(self, handler: BaseHTTPRequestHandler, call: Call) -> None:
        connection = handler.connection
        handler.close_connection = True
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" * 1000:
            readable, _, _ = select.select([connection], [], [], self.trickle_s)
            try:
                if readable and not connection.recv(1):
                    break  # the sender hung up
                connection.sendall(bytes([byte]))
            except OSError:
                break
        call.closed_at = time.monotonic()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server.server_port}/hook"

    def wait_for(self, count: int, timeout_s: float = 30, where: Callable[[Call], bool] = lambda call: True) -> list[Call]:
        """The first ``count`` calls matching ``where``, once there are that many."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                matching = [call for call in self.calls if where(call)]
            if len(matching) >= count:
                return matching[:count]
            assert time.monotonic() < deadline, f"{len(matching)} of {count} webhook calls after {timeout_s} s"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

