"""The soak test's webhook receivers: healthy ones, a flaky one and hostile ones, each on its own host.

Every receiver listens on its own loopback address (127.0.0.11, .12, ...), so that a sender that caps
deliveries per receiver host sees them as different hosts, as real customers would be.

- healthy: answers 200 at once; its webhooks' delay after the job finished is the latency we measure
- flaky: answers 200, except during the chaos thread's outages (503, a dropped connection, or refused)
- hang: reads the request and then sends nothing (until fixed, or HOSTILE_HOLD_S)
- drip: sends a status line and then a header line one byte every DRIP_EVERY_S, never ending them
- slow500: waits SLOW_500_S, then answers 500

Hostile receivers are "fixed" at the end of the run (they then answer 200 like a healthy one), so that
the webhooks they refused can be sent again and counted as redelivered.
"""

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

HOSTILE = ("hang", "drip", "slow500")
HOSTILE_HOLD_S = 60.0  # the longest a hanging or dripping receiver holds one attempt
DRIP_EVERY_S = 2.0
SLOW_500_S = 4.0
ADDRESSES = {"healthy-1": "127.0.0.11", "healthy-2": "127.0.0.12", "flaky": "127.0.0.13",
             "hang": "127.0.0.21", "drip": "127.0.0.22", "slow500": "127.0.0.23"}


@dataclasses.dataclass
class Delivery:
    at: float
    webhook_id: str
    body: str
    signed_ok: bool
    receiver: str = ""


class Receiver:
    """Records every webhook it answers 2xx to; behaves as its kind says (see the module doc)."""

    def __init__(self, name: str = "healthy-1", kind: str = "healthy") -> None:
        self.name = name
        self.kind = kind  # healthy | flaky | hang | drip | slow500
        self.host = ADDRESSES.get(name, "127.0.0.1")
        self.port = free_port(self.host)
        self.url = f"http://{self.host}:{self.port}/hook"
        self.lock = threading.Lock()
        self.got: dict[str, list[Delivery]] = collections.defaultdict(list)
        self.mode = "up"  # up | 503 | drop | refused
        self.refused_while_down = 0
        self.hostile_answers = 0  # requests answered the hostile way (hung, dripped, slow 500)
        self.fixed = threading.Event()  # a hostile receiver answers 200 from now on
        self.server: ThreadingHTTPServer | None = None
        self._serve()

    @property
    def hostile(self) -> bool:
        return self.kind in HOSTILE and not self.fixed.is_set()

    def _serve(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                if receiver.hostile:
                    receiver.hostile_answers += 1
                    if receiver.misbehave(self):
                        return
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

        self.server = ThreadingHTTPServer((self.host, self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True, name=f"receiver-{self.name}").start()

    def misbehave(self, handler: BaseHTTPRequestHandler) -> bool:
        """Answer the hostile way; True when the request is done with (False: fixed meanwhile, answer 200)."""
        handler.close_connection = True
        if self.kind == "slow500":
            time.sleep(SLOW_500_S)
            handler.send_response(500)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return True
        end = time.monotonic() + HOSTILE_HOLD_S
        # a 503 status line: when the sender gives up, or we cut the answer short, it must not count as 2xx
        drip = b"HTTP/1.1 503 Service Unavailable\r\nX-Drip: "
        sent = 0
        while time.monotonic() < end and not self.fixed.is_set():
            if self.kind == "drip":
                try:
                    handler.wfile.write(drip[sent:sent + 1] if sent < len(drip) else b".")
                    handler.wfile.flush()
                except OSError:
                    return True  # the sender gave up
                sent += 1
            self.fixed.wait(DRIP_EVERY_S)
        if sent == 0 and self.fixed.is_set():
            return False
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)
        return True

    def record(self, headers: dict[str, str], body: str) -> None:
        lowered = {k.lower(): v for k, v in headers.items()}
        try:
            job_id = json.loads(body)["id"]
        except (ValueError, KeyError, TypeError):
            job_id = "?"
        signed = webhooks.verify(WEBHOOK_SECRET, headers, body)
        with self.lock:
            self.got[job_id].append(Delivery(time.time(), lowered.get("webhook-id", ""), body, signed, self.name))

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
        self.fixed.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def snapshot(self) -> dict[str, list[Delivery]]:
        with self.lock:
            return {k: list(v) for k, v in self.got.items()}


def start_receivers() -> dict[str, Receiver]:
    """Two healthy receivers, the flaky one the outages hit, and one of each hostile kind."""
    kinds = {"healthy-1": "healthy", "healthy-2": "healthy", "flaky": "flaky", "hang": "hang", "drip": "drip",
             "slow500": "slow500"}
    return {name: Receiver(name, kind) for name, kind in kinds.items()}


def all_deliveries(receivers: dict[str, Receiver]) -> dict[str, list[Delivery]]:
    """Every delivery any receiver accepted, by job id, in arrival order."""
    merged: dict[str, list[Delivery]] = collections.defaultdict(list)
    for receiver in receivers.values():
        for job_id, copies in receiver.snapshot().items():
            merged[job_id].extend(copies)
    for copies in merged.values():
        copies.sort(key=lambda delivery: delivery.at)
    return dict(merged)
