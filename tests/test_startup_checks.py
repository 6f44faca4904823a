"""Settings that cannot work stop the API (under gunicorn) and the worker at start, as processes: one
"configuration error: NAME ..." line and a non-zero exit, before any job is taken. And the API's one warning
line when it asks for no key while it listens beyond loopback."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, free_port

BAD_SECRET_BODY = "c2VjcmV0-_c2VjcmV0"  # URL-safe base64: Python's decoder would drop '-' and '_'
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - what a container's gunicorn binds; the warning is about it


def worker_env(redis_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A worker that would start and run: Redis is real, Comput3 a closed loopback port."""
    return clean_env(REDIS_URL=redis_url, C3_API_KEY="k", C3_API_URL=f"http://127.0.0.1:{free_port()}/api/v0",
                     OUTPUT_DIR=str(tmp_path / "out"), WORK_DIR=str(tmp_path / "work"), **extra)


def run_until_exit(args: list[str], env: dict[str, str], timeout: float = 30) -> tuple[int | None, str]:
    """Start a process; its exit status (None: still running after `timeout`, then stopped) and output."""
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        code = None
    return code, proc.stdout.read()


def gunicorn(bind: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "gunicorn", "--bind", f"{bind}:{free_port()}", "--workers", "1",
            "--threads", "2", "app:create_app()"]


WORKER = [sys.executable, "c3_render_worker.py"]


def config_errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("configuration error:")]


@pytest.mark.parametrize("secret", [f"whsec_{BAD_SECRET_BODY}", "whsec_", "whsec_a"])
@pytest.mark.parametrize("process", ["api", "worker"])
def test_a_whsec_secret_that_is_not_standard_base64_stops_the_start(process, secret, redis_url, tmp_path):
    env = worker_env(redis_url, tmp_path, WEBHOOK_SECRET=secret)
    code, output = run_until_exit(gunicorn() if process == "api" else WORKER, env)
    assert code not in (None, 0), output  # before: gunicorn booted workers forever; the worker ran
    errors = config_errors(output)
    assert len(errors) == 1 and errors[0].startswith("configuration error: WEBHOOK_SECRET "), output
    assert output.count("configuration error") == 1, output  # once, not once per gunicorn worker boot
    assert BAD_SECRET_BODY not in output  # the secret is not repeated


@pytest.mark.parametrize("process", ["api", "worker"])
def test_a_path_in_minio_public_url_stops_the_start(process, s3_endpoint, redis_url, tmp_path):
    """With a real S3 server that would take the uploads: before, the error came only when a finished job's
    result was presigned, after the GPU work."""
    env = worker_env(redis_url, tmp_path, MINIO_ENDPOINT=s3_endpoint, MINIO_ACCESS_KEY="a", MINIO_SECRET_KEY="s",
                     MINIO_PUBLIC_URL="https://cdn.example.com/media/")
    code, output = run_until_exit(gunicorn() if process == "api" else WORKER, env)
    assert code not in (None, 0), output
    errors = config_errors(output)
    assert len(errors) == 1 and errors[0].startswith("configuration error: MINIO_PUBLIC_URL "), output
    assert "signature" in errors[0] and "own host name" in errors[0]


def test_a_good_whsec_secret_and_public_host_let_the_worker_start(s3_endpoint, redis_url, tmp_path):
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode().rstrip("=")  # unpadded: the Python library's form
    env = worker_env(redis_url, tmp_path, WEBHOOK_SECRET=secret, MINIO_ENDPOINT=s3_endpoint,
                     MINIO_ACCESS_KEY="a", MINIO_SECRET_KEY="s", MINIO_PUBLIC_URL=f"http://{s3_endpoint}/")
    code, output = run_until_exit(WORKER, env, timeout=8)
    assert code is None and "started" in output, output


@pytest.mark.parametrize("process", ["api", "worker"])
def test_require_api_keys_without_keys_stops_the_start(process, redis_url, tmp_path):
    env = worker_env(redis_url, tmp_path, REQUIRE_API_KEYS="1", C3_RENDER_API_KEYS="")
    code, output = run_until_exit(gunicorn() if process == "api" else WORKER, env)
    assert code not in (None, 0), output
    errors = config_errors(output)
    assert len(errors) == 1 and errors[0].startswith("configuration error: C3_RENDER_API_KEYS is empty"), output


def warnings_of_api(bind: str, redis_url: str, tmp_path: Path, **extra: str) -> list[str]:
    env = worker_env(redis_url, tmp_path, **extra)
    proc = subprocess.Popen(gunicorn(bind), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Booting worker" in line or not line:  # the master is ready (when_ready ran) once it forks
                break
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    lines += out.splitlines()
    assert any("Booting worker" in line for line in lines), "".join(lines)
    return [line for line in lines if "API keys are off" in line]


def test_the_api_warns_once_when_keys_are_off_beyond_loopback(redis_url, tmp_path):
    warned = warnings_of_api(ALL_INTERFACES, redis_url, tmp_path)
    assert len(warned) == 1 and "[WARNING]" in warned[0] and "0.0.0.0:" in warned[0], warned
    assert "C3_RENDER_API_KEYS" in warned[0]


@pytest.mark.parametrize(("bind", "extra"), [("127.0.0.1", {}), (ALL_INTERFACES, {"C3_RENDER_API_KEYS": "k1"})])
def test_the_api_does_not_warn_on_loopback_or_with_keys(bind, extra, redis_url, tmp_path):
    assert warnings_of_api(bind, redis_url, tmp_path, **extra) == []


def test_flask_run_beyond_loopback_warns_too(redis_url, tmp_path):
    env = worker_env(redis_url, tmp_path)
    flask = [sys.executable, "-m", "flask", "--app", "app", "run", "--host", ALL_INTERFACES, "--port", str(free_port())]
    code, output = run_until_exit(flask, env, timeout=6)
    assert code is None, output
    assert sum("API keys are off" in line for line in output.splitlines()) == 1, output
