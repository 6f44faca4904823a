"""Shared parts of the API benchmarks: a redis-server, gunicorn, wrk and a keep-alive HTTP client.

Everything runs on 127.0.0.1 in a temporary directory and is stopped by `Procs.stop_all()`. The API
runs like production (gunicorn, 2 workers x 4 gthread threads). `code_dir` picks the checkout whose
app.py is served, so one benchmark can measure an older commit ("before") and this one ("after").
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = ["--workers", "2", "--threads", "4", "--worker-class", "gthread", "--log-level", "warning"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if predicate():
                return
        except (OSError, redis.RedisError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class Procs:
    """Child processes, each in its own session, stopped together."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []

    def start(self, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(args, start_new_session=True, stdout=kwargs.pop("stdout", subprocess.DEVNULL),
                                stderr=kwargs.pop("stderr", subprocess.DEVNULL), **kwargs)
        self.children.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc in self.children:
            self.children.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.children)):
            self.stop(proc)


def start_redis(procs: Procs, tmp: Path, *extra: str) -> str:
    """A redis-server without persistence on a free port (`extra`: more options, e.g. --replicaof)."""
    port = free_port()
    procs.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp), *extra])
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(redis.Redis.from_url(url).ping, 10, "redis-server")
    return url


def start_gunicorn(procs: Procs, app: str, code_dir: Path, redis_url: str, tmp: Path,
                   extra_env: dict[str, str] | None = None, gunicorn_args: list[str] = GUNICORN,
                   ) -> tuple[subprocess.Popen, int]:
    """Serve `app` (a gunicorn app spec) from code_dir; return the process and its port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C3_", "MINIO_", "REDIS_"))}
    extra_env = dict(extra_env or {})
    path = [str(code_dir)] + ([extra_env.pop("EXTRA_PATH")] if "EXTRA_PATH" in extra_env else [])
    env.update({"REDIS_URL": redis_url, "OUTPUT_DIR": str(tmp / "output"), "PYTHONPATH": os.pathsep.join(path),
                **extra_env})
    proc = procs.start([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", *gunicorn_args, app],
                       cwd=code_dir, env=env)
    wait_until(lambda: Client(port).get("/healthz")[0] == 200, 30, f"gunicorn {app} in {code_dir}")
    return proc, port


class Client:
    """One keep-alive HTTP/1.1 connection, as a polling client would hold."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method: str, path: str, body: object | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected):  # gunicorn closed an idle connection
            self.conn.close()
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else {})

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def post(self, path: str, body: object) -> tuple[int, dict]:
        return self.request("POST", path, body)


def timed(call, count: int) -> list[float]:
    """Milliseconds of `count` sequential calls."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)


def pct(sorted_ms: list[float], p: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * p / 100))]


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    return path


def wrk(procs: Procs, url: str, tmp: Path, *, seconds: float, connections: int = 16, threads: int = 2,
        post_json: str | None = None, delay_ms: int = 0, background: bool = False, full_output: bool = False):
    """Run wrk against url; return requests/s (wrk's whole output with full_output; the running
    process when background)."""
    lua = []
    if post_json is not None:
        lua += ['wrk.method = "POST"', f"wrk.body = {json.dumps(post_json)}",
                'wrk.headers["Content-Type"] = "application/json"']
    if delay_ms:
        lua += [f"function delay() return {int(delay_ms)} end"]
    script = tmp / f"wrk-{time.monotonic_ns()}.lua"
    script.write_text("\n".join(lua) + "\n")
    args = [wrk_path(), "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "-s", str(script), url]
    if background:
        return procs.start(args, stdout=subprocess.PIPE)
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out) if not full_output else out


def session_cpu_s(session_id: int) -> float:
    """CPU seconds (user + system) used so far by every live process of a session (gunicorn master
    and workers). Per request, this stays meaningful on a busy machine where requests/s do not."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:  # fields after the name: state, ppid, pgrp, session, ...
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def cpu_per_request(procs: Procs, url: str, tmp: Path, session_id: int, r: redis.Redis, *, seconds: float,
                    post_json: str | None = None) -> tuple[float, float, float]:
    """One wrk run against url: (requests/s, API CPU µs per request, Redis CPU µs per request); the API
    is gunicorn's session `session_id`."""
    api0, redis0 = session_cpu_s(session_id), redis_cpu_s(r)
    out = wrk(procs, url, tmp, seconds=seconds, post_json=post_json, full_output=True)
    count = max(1, wrk_requests(out))
    return (parse_wrk(out), (session_cpu_s(session_id) - api0) / count * 1e6,
            (redis_cpu_s(r) - redis0) / count * 1e6)


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def wrk_requests(out: str) -> int:
    match = re.search(r"(\d+) requests in", out)
    return int(match.group(1)) if match else 0


def parse_wrk(out: str) -> float:
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise SystemExit(f"could not read wrk's output:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk saw {errors.group(1)} error responses:\n{out}")
    return float(match.group(1))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
