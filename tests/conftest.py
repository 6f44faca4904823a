"""Shared test fixtures: a real redis-server on a free loopback port, settings, and small helpers."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import config  # noqa: E402
from engine_api import JobContext, NodeUrls, no_phase, no_progress  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def engine_job(params: dict, job_id: str, inputs: dict[str, Path], node: NodeUrls, work_dir: Path,
               should_stop=lambda: None, progress=no_progress, phase=no_phase) -> JobContext:
    """The JobContext the worker gives an engine, with the settings the environment holds now (tests set
    an engine's settings, e.g. OLLAMA_MODEL, with monkeypatch.setenv)."""
    return JobContext(job_id=job_id, params=params, inputs=inputs, node=node, work_dir=work_dir,
                      settings=config.load(), should_stop=should_stop, progress=progress, phase=phase)


@contextmanager
def serve_asgi(app, timeout: float = 20.0, **config) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on a free loopback port; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout, what="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclasses.dataclass
class RedisServer:
    port: int
    data_dir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_for(lambda: _pings(client), 10, what="redis-server to start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.proc is None:
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> config.Settings:
    return dataclasses.replace(
        config.Settings(),
        redis_url=redis_url,
        output_dir=str(tmp_path / "output"),
        work_dir=str(tmp_path / "work"),
        public_base_url="http://127.0.0.1:8000",
        file_url_secret="test-file-secret",
        webhook_interval_s=0.2,
        url_allowlist=("127.0.0.0/8",),
    )


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto, in-process, loopback) for one test module: its host:port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: ours without c3-render settings, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C3_", "MINIO_", "REDIS_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB filesystem (tmpfs) that can be filled up: ENOSPC as a full disk gives it.
    Mounting needs root (CAP_SYS_ADMIN); elsewhere the test is skipped."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill_disk(path: Path) -> Path:
    """Fill the filesystem of `path` with one file (returned, to delete for room again)."""
    filler = path / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


@pytest.fixture(scope="module")
def devnode(tmp_path_factory: pytest.TempPathFactory):
    """A dev node (local Comput3 with CPU engines) for one test module: its nodes and fault switches are
    that module's. Modules that need other dev node settings define their own."""
    from devnode_helpers import start_devnode, stop_devnode

    proc, url = start_devnode(tmp_path_factory.mktemp("devnode"))
    yield url
    stop_devnode(proc)
