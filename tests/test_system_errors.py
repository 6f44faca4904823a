"""What a client sees of a node failure holds no node host name or URL (issue 17, defect 8): real failures
through the worker's real code path (the worker process, the API, the dev node), checked in the stored
error and in the webhook body.

The node's ComfyUI is reached through a small forwarding proxy on loopback (C3_COMFYUI_URL points at it;
the node's root, its health check, is reached directly), so the ComfyUI service can fail while the node
stays healthy, as when the app or the gateway in front of it fails on a real node: the proxy answers
502 (a gateway error), or stops listening in the middle of a render (connection refused). Before, the
job's error was str() of the requests exception: "HTTPConnectionPool(host='...', port=...): Max retries
exceeded with url: /<node>/comfyui/history/..." or "502 Server Error: Bad Gateway for url: http://...".
"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from conftest import free_port, wait_for
from devnode_helpers import start_devnode, stop_devnode
from PIL import Image
from system import (
    devnode_nodes,
    http_json,
    reset_faults,
    running_nodes,
    service_env,
    start_api,
    start_file_server,
    start_receiver,
    start_worker,
    wait_finished,
)

pytestmark = pytest.mark.e2e

SAMPLER_MIN_S = 8.0  # the render lasts long enough to cut the connection in the middle of it


class ComfyProxy:
    """Forwards http://127.0.0.1:<port>/<node>/comfyui/... to the dev node's /nodes/<id>/comfyui/...
    (the first path segment, the node's host:port, is dropped; the target is always the dev node).
    `fail` maps a path ending to an HTTP status to answer instead; `stop()` closes the listening socket,
    so that every later connection is refused. Websocket upgrades get 404 (the engine then polls)."""

    def __init__(self, devnode_url: str, port: int):
        self.devnode_url, self.port, self.fail, self.calls = devnode_url, port, {}, []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                proxy.forward(self)

            def do_POST(self):  # noqa: N802
                proxy.forward(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        path = "/" + handler.path.lstrip("/").split("/", 1)[1]  # drop "<host>:<port>"
        self.calls.append((handler.command, path))
        status = next((code for ending, code in self.fail.items() if path.split("?")[0].endswith(ending)), None)
        if handler.headers.get("Upgrade", "").lower() == "websocket":
            status = 404
        if status is not None:
            handler.send_response(status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        headers = {k: v for k, v in handler.headers.items() if k.lower() in ("content-type", "x-c3-api-key")}
        request = urllib.request.Request(self.devnode_url + path, data=body, headers=headers, method=handler.command)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                status, content, kind = answer.status, answer.read(), answer.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            status, content, kind = error.code, error.read(), error.headers.get("Content-Type", "")
        handler.send_response(status)
        handler.send_header("Content-Type", kind or "application/octet-stream")
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def devnode(tmp_path_factory):
    proc, url = start_devnode(tmp_path_factory.mktemp("devnode"), {"DEVNODE_SONIC_MIN_S": str(SAMPLER_MIN_S)})
    yield url
    stop_devnode(proc)


@pytest.fixture
def stack(redis_url, devnode, tmp_path):
    reset_faults(devnode)
    port = free_port()
    proxy = ComfyProxy(devnode, port)
    env = service_env(redis_url, devnode, tmp_path, NODE_FAILURE_RETRIES="0")
    env["C3_COMFYUI_URL"] = f"http://127.0.0.1:{port}/{{node}}/comfyui"
    api, api_url = start_api(env, tmp_path)
    receiver = start_receiver()
    Image.new("RGB", (320, 240), (90, 90, 160)).save(tmp_path / "face.png")
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-ac", "1",
                    str(tmp_path / "voice.wav")], check=True, timeout=60)
    files, files_url = start_file_server(tmp_path)
    worker = start_worker(env, tmp_path, "w-errors")
    yield {"api": api_url, "devnode": devnode, "proxy": proxy, "receiver": receiver, "files": files_url,
           "worker": worker, "r": redis.Redis.from_url(redis_url, decode_responses=True), "tmp": tmp_path}
    worker.stop(20)
    api.stop()
    receiver.close()
    files.shutdown()
    try:
        proxy.stop()
    except OSError:
        pass
    wait_for(lambda: not running_nodes(devnode), 30, what="all dev node nodes to stop")


def submit_portrait(stack) -> str:
    status, body = http_json("POST", stack["api"] + "/portrait", {
        "image_url": stack["files"] + "/face.png", "audio_url": stack["files"] + "/voice.wav",
        "notify_url": stack["receiver"].url})
    assert status == 200, body
    return body["id"]


def assert_no_address(stack, text: str) -> None:
    """Neither a node's host name, address or URL, nor a port of ours, nor a server path, nor the key."""
    launched = devnode_nodes(stack["devnode"])
    nodes = [n["node"] for n in launched] + [n["workload"] for n in launched]
    assert nodes
    forbidden = [*nodes, "127.0.0.1", "http", "host=", "/nodes/", "comfyui/", str(stack["proxy"].port),
                 stack["devnode"].rsplit(":", 1)[1], str(stack["tmp"]), "system-test-c3-key"]
    assert not [word for word in forbidden if word in text], text


def final_and_webhook(stack, job_id: str) -> tuple[dict, dict]:
    final = wait_finished(stack["api"], job_id, 120)
    [webhook] = wait_for(lambda: stack["receiver"].for_job(job_id), 20, what="the webhook")
    return final, webhook


def test_a_gateway_error_of_the_nodes_comfyui_is_worded_without_its_url(stack):
    stack["proxy"].fail = {"/prompt": 502}
    job_id = submit_portrait(stack)
    final, webhook = final_and_webhook(stack, job_id)
    assert final["status"] == "failed", final
    assert final["error"] == "portrait failed: the GPU node answered HTTP 502 (Bad Gateway)", final
    assert webhook == {"id": job_id, "status": "failed", "error": final["error"]}
    assert_no_address(stack, final["error"])
    assert [path for method, path in stack["proxy"].calls if path.endswith("/comfyui/prompt")]  # it went through


def test_comfyui_refusing_connections_mid_render_is_worded_without_host_or_url(stack):
    job_id = submit_portrait(stack)

    def rendering():
        body = http_json("GET", f"{stack['api']}/status/{job_id}")[1]
        return body.get("phase") == "rendering" or body.get("status") not in ("queued", "running")

    wait_for(rendering, 90, interval=0.2, what="the render to start")
    assert http_json("GET", f"{stack['api']}/status/{job_id}")[1]["status"] == "running"
    started = time.time()
    stack["proxy"].stop()  # the node's ComfyUI stops answering; the node itself is still up
    final, webhook = final_and_webhook(stack, job_id)
    assert time.time() - started < SAMPLER_MIN_S + 10
    assert final["status"] == "failed", final
    assert final["error"] == "portrait failed: the GPU node refused the connection", final
    assert webhook == {"id": job_id, "status": "failed", "error": final["error"]}
    assert_no_address(stack, final["error"])
    record = stack["r"].hgetall(f"job:{job_id}")
    assert record["error"] == final["error"]
    log = stack["worker"].log()
    assert "healthy" in log and "ConnectionError" in log  # the operator's log keeps the details
