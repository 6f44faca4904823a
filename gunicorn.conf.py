"""gunicorn settings, read at start-up (gunicorn loads ./gunicorn.conf.py by default; the Dockerfile, the
Makefile and the tests start it from the project directory).

Errors gunicorn answers itself, before the app sees a request — a request line over 4094 bytes (414),
more than 100 header fields or one over 8190 bytes (431), malformed HTTP (400) — come back as JSON
{"error": "..."} like every other error of the API, instead of gunicorn's HTML page. gunicorn has no
setting for that body, so its one writer of error pages is replaced here; tests/test_api_server_errors.py
checks it against a real gunicorn, so a gunicorn that changes this function fails the tests.
"""

from __future__ import annotations

import json
import socket

from gunicorn import util


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    body = json.dumps({"error": f"{reason}: {mesg}" if mesg else reason}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


util.write_error = write_json_error


def on_starting(server) -> None:
    """In the master, before any worker forks: a configuration error ends gunicorn with its one line and
    status 1 (raised in each worker instead, it would make gunicorn boot workers again and again)."""
    import config

    config.load()


def when_ready(server) -> None:
    """Once the master listens: one warning line when API keys are off and an address is beyond loopback."""
    import config

    addresses = [_address(listener.sock.getsockname()) for listener in server.LISTENERS
                 if listener.sock.family in (socket.AF_INET, socket.AF_INET6)]  # a Unix socket stays on this host
    if warning := config.keyless_exposure_warning(config.load(), addresses):
        server.log.warning(warning)


def _address(sockname: tuple) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
