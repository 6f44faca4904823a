"""Errors gunicorn answers before the app sees the request are JSON too (gunicorn.conf.py)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest
from system import service_env, start_api

pytestmark = pytest.mark.e2e


def raw_request(api_url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(api_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.fixture(scope="module")
def api_url(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-errors")
    proc, url = start_api(service_env(redis_server.url, "http://127.0.0.1:9", tmp), tmp)
    yield url
    proc.stop()


@pytest.mark.parametrize(("request_bytes", "status", "words"), [
    (b"GET /status/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "URI Too Long"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(150)) + b"\r\n",
     431, "Request Header Fields Too Large"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n", 431,
     "Request Header Fields Too Large"),
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "Bad Request"),
])
def test_server_layer_errors_are_json(api_url, request_bytes, status, words):
    code, headers, body = raw_request(api_url, request_bytes)
    assert code == status
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)["error"]
    assert error.startswith(words), error
