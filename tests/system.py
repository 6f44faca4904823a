"""Start the real parts for system tests: API (gunicorn), workers, a webhook receiver, a file server.

Every process listens on 127.0.0.1 only. The dev node comes from devnode_helpers.start_devnode().
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import ROOT, clean_env, free_port, wait_for

C3_KEY = "system-test-c3-key"


def service_env(redis_url: str, devnode_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment shared by the API and the workers in a system test. Idle nodes stop after
    GPU_IDLE_TIMEOUT (NODE_POLICY=fixed) unless a test asks for the adaptive policy."""
    return clean_env(**{**dict(
        REDIS_URL=redis_url,
        C3_API_KEY=C3_KEY,
        C3_API_URL=f"{devnode_url}/api/v0",
        C3_NODE_URL="http://{node}",
        C3_COMFYUI_URL="http://{node}/comfyui",
        C3_OLLAMA_URL="http://{node}",
        OUTPUT_DIR=str(tmp_path / "output"),
        WORK_DIR=str(tmp_path / "work"),
        URL_ALLOWLIST="127.0.0.0/8",
        FILE_URL_SECRET="system-test-file-secret",
        HEARTBEAT_TTL="3",
        SWEEP_INTERVAL_S="1",
        WEBHOOK_INTERVAL_S="0.5",
        NODE_BOOT_TIMEOUT="30",
        LAUNCH_BACKOFF_S="0.2",
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",
        NODE_POLICY="fixed",
    ), **extra})


@dataclasses.dataclass
class Proc:
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> int | None:
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return self.proc.returncode


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> Proc:
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(args, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return Proc(proc, log_path)


def start_api(env: dict[str, str], tmp_path: Path) -> tuple[Proc, str]:
    """Start gunicorn serving app.py; sets env["PUBLIC_BASE_URL"] so workers started after it link to it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env["PUBLIC_BASE_URL"] = url
    proc = _spawn([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
                   "--threads", "8", "--graceful-timeout", "10", "app:create_app()"],
                  env, tmp_path / f"api-{port}.log")
    wait_for(lambda: _answers(url + "/healthz") or _died(proc), 30, what="the API")
    assert proc.proc.poll() is None, proc.log()
    return proc, url


def start_worker(env: dict[str, str], tmp_path: Path, worker_id: str, **extra: str) -> Proc:
    env = dict(env, WORKER_ID=worker_id, **extra)
    return _spawn([sys.executable, "c3_render_worker.py"], env, tmp_path / f"worker-{worker_id}.log")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _died(proc: Proc) -> bool:
    return proc.proc.poll() is not None


def http_json(method: str, url: str, body: object | None = None, headers: dict | None = None,
              timeout: float = 30) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def download(url: str, dest: Path, timeout: float = 60) -> Path:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        dest.write_bytes(response.read())
    return dest


def wait_finished(api_url: str, job_id: str, timeout: float = 180) -> dict:
    def finished():
        status, body = http_json("GET", f"{api_url}/status/{job_id}")
        return body if status == 200 and body["status"] in ("success", "failed", "cancelled") else None

    return wait_for(finished, timeout, interval=0.3, what=f"job {job_id} to finish")


@dataclasses.dataclass
class Receiver:
    url: str
    calls: list  # every POST: {"at", "headers", "body", "status"}
    answers: list  # status codes to answer, in order; the last one repeats
    server: ThreadingHTTPServer

    def bodies(self) -> list[dict]:
        """The payloads it accepted (answered 2xx)."""
        return [json.loads(c["body"]) for c in self.calls if 200 <= c["status"] < 300]

    def for_job(self, job_id: str) -> list[dict]:
        return [b for b in self.bodies() if b.get("id") == job_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_receiver(answers: list[int] | None = None, *, mode: str = "answer", host: str = "127.0.0.1",
                   hold_s: float = 60.0) -> Receiver:
    """A webhook receiver on loopback that records every POST and answers with `answers` (default 200).

    `mode` makes it hostile: "hang" reads the request and says nothing for hold_s; "drip" sends the
    status line and then one header byte every 0.5 s for hold_s (never tripping a per-read timeout);
    "slow" waits hold_s, then answers. `host` is the loopback address to bind (127.0.0.2 ... give
    distinct receiver hosts)."""
    calls: list = []
    answers = list(answers or [200])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            status = answers[min(len(calls), len(answers) - 1)]
            calls.append({"at": time.time(), "headers": dict(self.headers), "body": body, "status": status})
            try:
                if mode == "hang":
                    time.sleep(hold_s)
                elif mode == "drip":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    end = time.time() + hold_s
                    while time.time() < end:
                        self.wfile.write(b"X")
                        self.wfile.flush()
                        time.sleep(0.5)
                    return
                elif mode == "slow":
                    time.sleep(hold_s)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass  # the sender gave up on us

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False  # close() must not wait for hostile handlers to finish holding
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return Receiver(f"http://{host}:{server.server_address[1]}/hook", calls, answers, server)


def start_file_server(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    """Serve a directory over HTTP on loopback (the inputs clients would host somewhere)."""
    handler = functools.partial(_QuietFiles, directory=str(directory))
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}"


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def ffprobe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams",
                          str(path)], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def devnode_nodes(devnode_url: str) -> list[dict]:
    with urllib.request.urlopen(devnode_url + "/admin/nodes", timeout=5) as response:
        answer = json.loads(response.read())
    return answer["nodes"] if isinstance(answer, dict) else answer


def set_faults(devnode_url: str, **faults) -> None:
    request = urllib.request.Request(devnode_url + "/admin/faults", data=json.dumps(faults).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=5):
        pass


def reset_faults(devnode_url: str) -> None:
    request = urllib.request.Request(devnode_url + "/admin/reset", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5):
        pass


def running_nodes(devnode_url: str) -> list[dict]:
    return [n for n in devnode_nodes(devnode_url) if n.get("state") in ("booting", "running")]



def job_node(r, job_id: str) -> dict | None:
    """The pool node a job holds a lease on (its record, with its id), or None."""
    for node_id in r.smembers("pool:nodes"):
        if r.hexists(f"pool:leases:{node_id}", job_id):
            return {**r.hgetall(f"pool:node:{node_id}"), "id": node_id}
    return None


def wait_job_node_ready(r, job_id: str, timeout: float = 30) -> dict:
    """The ready pool node a running job holds a lease on (waits for it to boot)."""
    return wait_for(lambda: (node := job_node(r, job_id)) and node.get("state") == "ready" and node, timeout,
                    what=f"job {job_id}'s node to be ready")
