"""The soak test's webhook receiver: records every delivery it accepts, and can be taken down."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from soak_common import WEBHOOK_SECRET, free_port

import webhooks


@dataclasses.dataclass
class Delivery:
    at: float
    webhook_id: str
    body: str
    signed_ok: bool


class Receiver:
    """Records every webhook it answers 2xx to; can be down (503, dropped connection, or refused)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.lock = threading.Lock()
        self.got: dict[str, list[Delivery]] = collections.defaultdict(list)
        self.mode = "up"  # up | 503 | drop | refused
        self.refused_while_down = 0
        self.server: ThreadingHTTPServer | None = None
        self._serve()

    def _serve(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                if receiver.mode == "drop":
                    receiver.refused_while_down += 1
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if receiver.mode != "up":
                    receiver.refused_while_down += 1
                    self.send_response(503)
                else:
                    receiver.record(dict(self.headers), body)
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True, name="receiver").start()

    def record(self, headers: dict[str, str], body: str) -> None:
        lowered = {k.lower(): v for k, v in headers.items()}
        try:
            job_id = json.loads(body)["id"]
        except (ValueError, KeyError, TypeError):
            job_id = "?"
        signed = webhooks.verify(WEBHOOK_SECRET, headers, body)
        with self.lock:
            self.got[job_id].append(Delivery(time.time(), lowered.get("webhook-id", ""), body, signed))

    def go_down(self, mode: str) -> None:
        self.mode = mode
        if mode == "refused" and self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def come_up(self) -> None:
        if self.server is None:
            self._serve()
        self.mode = "up"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def snapshot(self) -> dict[str, list[Delivery]]:
        with self.lock:
            return {k: list(v) for k, v in self.got.items()}
