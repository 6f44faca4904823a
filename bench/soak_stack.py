"""The soak test's processes: redis-server, the dev node, the API, the workers and the input file server.

Each child runs in its own session so that Ctrl-C reaches only the soak; everything started is
remembered in STARTED and stopped by stop_all_started().
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import signal
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
from soak_common import C3_KEY, OFFLINE_ENV, ROOT, WEBHOOK_SECRET, answers, free_port, http, wait_until
from soak_receivers import Receiver, start_receivers

import config


@dataclasses.dataclass
class Child:
    """A process this script started, in its own session (so Ctrl-C reaches only us; we stop it)."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    killed_by_us: bool = False

    def start(self) -> Child:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.args, cwd=str(ROOT), env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.killed_by_us = False
        STARTED.append(self)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, signum: int) -> None:
        """Signal the process group (the child and anything it started), if the child still runs."""
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout_s; return the exit code."""
        if self.proc is None:
            return None
        self.killed_by_us = True
        self.send(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.proc.wait(10)
        return self.proc.returncode

    def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM to the child alone (as Docker or Kubernetes stop a container's main process), SIGKILL to
        its group after timeout_s; return the exit code."""
        if self.proc is None:
            return None
        self.killed_by_us = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything it left behind in its group
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


STARTED: list[Child] = []


def stop_all_started() -> None:
    for child in reversed(STARTED):
        with contextlib.suppress(Exception):
            child.stop(15)


def base_env(**extra: str) -> dict[str, str]:
    """Our environment without c3-render settings, kept offline, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C3_", "MINIO_", "REDIS_", "DEVNODE_"))}
    env.update(OFFLINE_ENV)
    env.update(extra)
    return env


@dataclasses.dataclass
class RedisProc:
    port: int
    data_dir: Path
    log_path: Path
    child: Child | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.data_dir)]
        self.child = Child("redis", args, base_env(), self.log_path).start()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_until(lambda: _pings(client), 20, "redis-server to start")

    def stop(self) -> None:
        """SIGTERM: Redis writes and fsyncs its AOF and exits; nothing acknowledged is lost."""
        if self.child is not None:
            self.child.stop(20)

    def kill(self) -> None:
        """SIGKILL, as a crash: what Redis wrote to the AOF is in the kernel's page cache and survives
        (appendfsync everysec loses up to 1 s only when the host itself goes down)."""
        if self.child is not None and self.child.proc is not None:
            self.child.killed_by_us = True
            self.child.send(signal.SIGKILL)
            self.child.proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def serve_files(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_QuietFiles, directory=str(directory)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="files").start()
    return server, f"http://127.0.0.1:{port}"


# --- the stack ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stack:
    tmp: Path
    redis: RedisProc
    devnode: Child
    devnode_url: str
    api: Child
    api_url: str
    api_port: int
    env: dict[str, str]
    receivers: dict[str, Receiver]
    files: ThreadingHTTPServer
    files_url: str
    workers: dict[int, Child] = dataclasses.field(default_factory=dict)
    generation: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    all_workers: list[Child] = dataclasses.field(default_factory=list)
    r: redis.Redis | None = None


def start_devnode(tmp: Path, boot_s: float = 1.0) -> tuple[Child, str]:
    """The dev node on a free port; its nodes boot for boot_s (DEVNODE_BOOT_S)."""
    port = free_port()
    env = base_env(DEVNODE_CACHE_DIR=os.environ.get("DEVNODE_CACHE_DIR") or str(ROOT / "var" / "devnode-cache"),
                   DEVNODE_DATA_DIR=str(tmp / "devnode-data"), DEVNODE_BOOT_S=f"{boot_s:g}", DEVNODE_API_KEY=C3_KEY)
    child = Child("devnode", [sys.executable, "-m", "devnode", "--host", "127.0.0.1", "--port", str(port)],
                  env, tmp / "devnode.log").start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: answers(url + "/admin/faults") or not child.alive(), 90, "the dev node")
    if not child.alive():
        raise RuntimeError("the dev node exited at start:\n" + child.log_text()[-3000:])
    return child, url


def service_env(tmp: Path, redis_url: str, devnode_url: str, workers: int) -> dict[str, str]:
    """The settings the API and the workers share (short timeouts so the chaos resolves quickly)."""
    return base_env(
        REDIS_URL=redis_url, C3_API_KEY=C3_KEY, C3_API_URL=f"{devnode_url}/api/v0",
        C3_NODE_URL="http://{node}", C3_COMFYUI_URL="http://{node}/comfyui", C3_OLLAMA_URL="http://{node}",
        OUTPUT_DIR=str(tmp / "output"), WORK_DIR=str(tmp / "work"), URL_ALLOWLIST="127.0.0.0/8",
        FILE_URL_SECRET="soak-file-secret", WEBHOOK_SECRET=WEBHOOK_SECRET,
        HEARTBEAT_TTL="3", SWEEP_INTERVAL_S="1", WEBHOOK_INTERVAL_S="3", WEBHOOK_ATTEMPTS="5",
        WEBHOOK_TIMEOUT_S="5", NODE_BOOT_TIMEOUT="30", LAUNCH_BACKOFF_S="0.2", GPU_IDLE_TIMEOUT="5",
        MAX_NODES=str(workers), WORKER_GRACE_S="10",
        WEBHOOK_SCHEDULE="3,3,3,3",  # the same 5 attempts 3 s apart, for a sender that reads the schedule
    )


def start_api(tmp: Path, env: dict[str, str], port: int = 0) -> tuple[Child, str]:
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env["PUBLIC_BASE_URL"] = url
    args = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "8",
            "--graceful-timeout", "10", "app:create_app()"]
    child = Child("api", args, env, tmp / "api.log").start()
    wait_until(lambda: answers(url + "/healthz") or not child.alive(), 60, "the API")
    if not child.alive():
        raise RuntimeError("the API exited at start:\n" + child.log_text()[-3000:])
    return child, url


def start_worker(stack: Stack, slot: int) -> Child:
    stack.generation[slot] += 1
    worker_id = f"soak-w{slot}-g{stack.generation[slot]}"
    env = dict(stack.env, WORKER_ID=worker_id)
    child = Child(worker_id, [sys.executable, "c3_render_worker.py"], env,
                  stack.tmp / f"worker-{worker_id}.log").start()
    stack.workers[slot] = child
    stack.all_workers.append(child)
    return child


def start_stack(tmp: Path, workers: int, *, boot_s: float = 1.0, settings: dict[str, str] | None = None,
                inputs: Path | None = None, receivers: bool = True) -> Stack:
    """redis-server, the dev node (nodes boot for boot_s), the API and the workers with service_env plus
    settings, a file server of inputs (tmp/inputs, made empty, by default) and the webhook receivers."""
    redis_proc = RedisProc(free_port(), tmp / "redis", tmp / "redis.log")
    redis_proc.start()
    devnode, devnode_url = start_devnode(tmp, boot_s)
    env = {**service_env(tmp, redis_proc.url, devnode_url, workers), **(settings or {})}
    api, api_url = start_api(tmp, env)
    if inputs is None:
        inputs = tmp / "inputs"
        inputs.mkdir()
    files, files_url = serve_files(inputs)
    stack = Stack(tmp=tmp, redis=redis_proc, devnode=devnode, devnode_url=devnode_url, api=api,
                  api_url=api_url, api_port=int(api_url.rsplit(":", 1)[1]), env=env,
                  receivers=start_receivers() if receivers else {}, files=files, files_url=files_url,
                  r=redis.Redis.from_url(redis_proc.url, decode_responses=True, socket_timeout=5,
                                         socket_connect_timeout=2))
    for slot in range(workers):
        start_worker(stack, slot)
    return stack


def kill_api(stack: Stack) -> None:
    """SIGKILL the API (gunicorn and its worker), as a crash."""
    stack.api.killed_by_us = True
    stack.api.send(signal.SIGKILL)
    if stack.api.proc is not None:
        stack.api.proc.wait(10)


def restart_api(stack: Stack) -> None:
    """Start the API again on the same port (clients keep its URL)."""
    stack.api, _url = start_api(stack.tmp, stack.env, stack.api_port)


def devnode_faults(devnode_url: str) -> dict[str, Any]:
    """The dev node's fault switches and their values (which switches exist depends on its version)."""
    status, answer = http("GET", devnode_url + "/admin/faults")
    if status != 200 or not isinstance(answer, dict):
        raise RuntimeError(f"/admin/faults answered HTTP {status}")
    return answer


def set_faults(devnode_url: str, changes: dict[str, Any]) -> None:
    status, answer = http("POST", devnode_url + "/admin/faults", changes)
    if status != 200:
        raise RuntimeError(f"/admin/faults {changes} answered HTTP {status}: {answer}")


def devnode_nodes(devnode_url: str) -> list[dict[str, Any]]:
    status, answer = http("GET", devnode_url + "/admin/nodes")
    if status != 200:
        raise RuntimeError(f"/admin/nodes answered HTTP {status}")
    return answer["nodes"] if isinstance(answer, dict) else answer


def webhooks_pending(stack: Stack) -> int | None:
    assert stack.r is not None
    try:
        pending = stack.r.llen(config.WEBHOOK_OUTBOX_KEY) + stack.r.zcard(config.WEBHOOK_RETRY_KEY)
        for key in stack.r.scan_iter(config.WEBHOOK_INFLIGHT_KEY.format(worker="*")):
            pending += stack.r.llen(key)
    except redis.RedisError:
        return None
    return pending
