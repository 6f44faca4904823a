"""Start and stop the dev node (`python -m devnode`) as a subprocess on a free loopback port.

Reusable by every test that needs a Comput3 stand-in: `start_devnode(tmp_path)` returns the process
and its base URL once `/admin/faults` answers; `stop_devnode(proc)` ends it (SIGTERM, then SIGKILL).
Helpers for launching a node and waiting until it is up are here too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import free_port

REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
os.environ.update(OFFLINE_ENV)  # the gradio_client in the test process stays offline too


def shared_cache_dir() -> Path:
    """The whisper model cache shared by test runs (joining the model takes a second; reuse it)."""
    return Path(os.environ.get("DEVNODE_CACHE_DIR") or REPO / "var" / "devnode-cache")


def start_devnode(
    tmp_path: Path, env_extra: dict[str, str] | None = None, timeout_s: float = 60.0
) -> tuple[subprocess.Popen, str]:
    """Start the dev node on a free port; return (process, base_url) once it answers."""
    port = free_port()
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.update(
        {
            "DEVNODE_CACHE_DIR": str(shared_cache_dir()),
            "DEVNODE_DATA_DIR": str(tmp_path / "devnode-data"),
            "DEVNODE_BOOT_S": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(env_extra or {})
    log_path = tmp_path / f"devnode-{port}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed by stop_devnode via the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "devnode", "--host", "127.0.0.1", "--port", str(port)],
        cwd=str(REPO),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.log_path = log_path  # type: ignore[attr-defined]
    proc.log_file = log  # type: ignore[attr-defined]
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"dev node exited early ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base_url + "/admin/faults", timeout=1) as response:
                if response.status == 200:
                    return proc, base_url
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    stop_devnode(proc)
    raise RuntimeError(f"dev node did not answer within {timeout_s} s:\n{log_path.read_text()[-3000:]}")


def stop_devnode(proc: subprocess.Popen, timeout_s: float = 15.0) -> int | None:
    """Stop the dev node with SIGTERM (SIGKILL after `timeout_s`); return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    log_file = getattr(proc, "log_file", None)
    if log_file is not None:
        log_file.close()
    return proc.returncode


def devnode_log(proc: subprocess.Popen) -> str:
    """What the dev node printed so far."""
    path = getattr(proc, "log_path", None)
    return path.read_text(errors="replace") if path else ""


def call(
    base_url: str,
    method: str,
    path: str,
    body: dict | None = None,
    key: str | None = API_KEY,
    timeout: float = 10,
) -> tuple[int, object]:
    """One JSON request; return (status, decoded JSON or text)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-C3-API-KEY"] = key
    request = urllib.request.Request(base_url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def launch_node(base_url: str, expires_in_s: float = 3600) -> dict:
    """Launch a media:fast node; return the launch answer."""
    request = {"type": "media:fast", "expires": int(time.time() + expires_in_s)}
    status, body = call(base_url, "POST", "/api/v0/launch", request)
    assert status == 200, (status, body)
    assert isinstance(body, dict)
    return body


def wait_node_up(node: str, timeout_s: float = 30.0) -> None:
    """Poll `GET http://{node}/` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, _ = call(f"http://{node}", "GET", "/")
        if status == 200:
            return
        time.sleep(0.2)
    raise TimeoutError(f"node {node} did not come up in {timeout_s} s")
