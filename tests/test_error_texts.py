"""Failure texts a client sees hold no node host name, URL or key (issue 17, defect 8): the exceptions of
real failures on loopback (a closed port, a server that never answers, one that answers 502, one that
hangs up) worded by engine_api.failure_text; gradio_app's errors against a real server answering 502; the
worker's last net before a job's error is stored (c3_render_worker.client_error); Comput3's connect error.
The system test with a real worker and dev node is tests/test_system_errors.py."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import requests
import websocket
from conftest import engine_job, free_port

import c3_render_worker as worker
import comput3
import config
import gradio_app
import nodes
from engine_api import EngineError, NodeUrls, failure_text, node_urls, without_addresses

NODE_PATH = "/nodes/wl-secret-7/comfyui/history/p-1"


def leaks(text: str, port: int) -> list[str]:
    return [word for word in ("127.0.0.1", str(port), "wl-secret-7", "http", "host='", "/nodes/") if word in text]


@pytest.fixture
def closed_port() -> int:
    return free_port()  # nothing listens there: connections are refused


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A socket that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def http_server() -> Iterator[int]:
    """Answers 502 Bad Gateway to everything, except /hangup, where it closes the connection unanswered."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path.startswith("/hangup"):
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(502)
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b"bad gateway")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def raised(call) -> BaseException:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the exception is what is looked at
        return exc
    raise AssertionError("no exception")


def test_a_refused_connection(closed_port):
    url = f"http://127.0.0.1:{closed_port}{NODE_PATH}"
    for exc in (raised(lambda: requests.get(url, timeout=5)), raised(lambda: httpx.get(url, timeout=5)),
                raised(lambda: websocket.create_connection(url.replace("http", "ws"), timeout=5)),
                raised(lambda: socket.create_connection(("127.0.0.1", closed_port), timeout=5))):
        assert "127.0.0.1" in str(exc) or "refused" in str(exc).lower()  # what a str() of it would show
        text = failure_text(exc)
        assert text == "the GPU node refused the connection", (type(exc), text)


def test_a_node_that_stops_answering(silent_port):
    url = f"http://127.0.0.1:{silent_port}{NODE_PATH}"
    for exc in (raised(lambda: requests.get(url, timeout=(5, 0.3))), raised(lambda: httpx.get(url, timeout=0.3))):
        assert failure_text(exc) == "the GPU node stopped answering (no answer in the time allowed)", exc


def test_an_error_answer_and_a_hang_up(http_server):
    url = f"http://127.0.0.1:{http_server}{NODE_PATH}"
    with_status = [raised(lambda: requests.get(url, timeout=5).raise_for_status()),
                   raised(lambda: httpx.get(url, timeout=5).raise_for_status()),
                   raised(lambda: websocket.create_connection(url.replace("http", "ws"), timeout=5))]
    assert all(str(http_server) in str(exc) or "502" in str(exc) for exc in with_status)
    for exc in with_status:
        assert failure_text(exc) == "the GPU node answered HTTP 502 (Bad Gateway)", (type(exc), exc)
    hangup = f"http://127.0.0.1:{http_server}/hangup{NODE_PATH}"
    for exc in (raised(lambda: requests.get(hangup, timeout=5)), raised(lambda: httpx.get(hangup, timeout=5))):
        assert failure_text(exc) == "the GPU node closed the connection before it answered", (type(exc), exc)


def test_anything_else_keeps_its_message_without_addresses():
    exc = ValueError(f"Could not fetch config for http://127.0.0.1:9/{NODE_PATH} (HTTPConnectionPool("
                     "host='ui-abc.comput3.ai', port=443); Failed to resolve 'ui-abc.comput3.ai')")
    text = failure_text(exc)
    assert text.startswith("ValueError: Could not fetch config for <url>")
    assert "host=<host>" in text and "resolve <host>" in text
    assert "comput3.ai" not in text and "127.0.0.1" not in text


def test_gradio_errors_name_no_url(http_server, tmp_path):
    """gradio_client says "Could not fetch config for <the app's URL>" when the app answers 502; it reaches
    the worker unchanged (a node problem, or not: nodes.run_on_node asks), which words it without the URL."""
    urls = node_urls(f"127.0.0.1:{http_server}/nodes/wl-secret-7", "k", "http://{node}", "http://{node}/c",
                     "http://{node}")
    job = engine_job({}, "j-1", {}, urls, tmp_path)
    exc = raised(lambda: gradio_app.call(job, urls.csm, "/generate_monologue_audio", {}, "CSM"))
    assert not isinstance(exc, EngineError) and leaks(str(exc), http_server)  # gradio_client's own text
    text = failure_text(exc)
    assert text == "ValueError: Could not fetch config for <url>", text


def test_comput3_unreachable_is_said_without_its_url(closed_port):
    settings = dataclasses.replace(config.Settings(), c3_api_url=f"http://127.0.0.1:{closed_port}/api/v0",
                                   c3_api_key="k")
    with pytest.raises(comput3.C3Error) as info:
        comput3.get_running_workloads(settings)
    assert str(info.value) == "Comput3 workloads: cannot connect to the Comput3 API (C3_API_URL)"


def test_the_workers_last_net_before_an_error_is_stored(settings):
    """Whatever text reaches settle: no URL, no quoted host, no name of the job's node, no C3_API_KEY, no
    path."""
    settings = dataclasses.replace(settings, c3_api_key="c3-key-0123456789")
    state = worker.WorkerState(settings=settings, r=None, worker_id="w")  # type: ignore[arg-type]
    urls = NodeUrls(base="https://abc-node.comput3.ai", csm="", whisper="", comfyui="", ollama="", api_key="x")
    state.lease = nodes.Lease("n-1", "media:fast", "j-1", "csm", 0.0, workload="wl-1", node="abc-node.comput3.ai",
                              urls=urls)
    text = (f"csm failed: HTTPSConnectionPool(host='ui-abc-node.comput3.ai', port=443) at "
            f"https://ui-abc-node.comput3.ai/prompt; node abc-node.comput3.ai; key c3-key-0123456789; "
            f"file {Path(settings.work_dir).resolve()}/j-1/x.wav")
    cleaned = worker.client_error(state, text)
    assert cleaned == ("csm failed: HTTPSConnectionPool(host=<host>, port=443) at <url>; node <node>; "
                       "key <C3_API_KEY>; file <work dir>/j-1/x.wav"), cleaned


def test_without_addresses_leaves_ordinary_text_alone():
    text = "Whisper failed: the model tiny.en is unknown (choose tiny, base)"
    assert without_addresses(text) == text
