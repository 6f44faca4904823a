"""SIGTERM to the API under gunicorn: a request already in flight still gets its answer."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest
from conftest import clean_env
from system import start_api

pytestmark = pytest.mark.e2e


def test_sigterm_lets_an_in_flight_request_finish(redis_url, tmp_path):
    api, url = start_api(clean_env(REDIS_URL=redis_url), tmp_path)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"text": "Arrives slowly."}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        head = (f"POST /csm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        sock.sendall(head + body[:5])  # the request has started...
        time.sleep(0.5)
        api.signal(signal.SIGTERM)  # ...when the API is told to stop
        time.sleep(0.5)
        sock.sendall(body[5:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert b"200" in status_line, answer
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["status"] == "queued"
    assert api.proc.wait(30) == 0
