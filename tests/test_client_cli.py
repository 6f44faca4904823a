"""The Python client (c3_render_client) and the `c3-render` CLI against the real API (gunicorn) and a
real redis-server. The jobs are run by a small in-test worker that speaks the queue protocol through
jobstore.py exactly as c3_render_worker does (take, running, progress, finish, ack), so these tests need
no dev node; the whole stack with the real worker is in test_dashboard_browser.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import ROOT, clean_env
from system import start_api, start_file_server

import c3_render_client as c3
import config
import jobstore

KEY = "client-test-key"
SETTINGS = config.Settings()
MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb" * 500


def stand_in_worker(r: redis.Redis, result_url: str, stop: threading.Event) -> None:
    """Run queued jobs: text with 'fail' fails, 'slow' runs ~4 s (or until cancelled), others succeed."""
    worker = "client-test-worker"
    while not stop.is_set():
        entry = jobstore.take(r, worker, 0.2)
        if entry is None:
            continue
        job_id = json.loads(entry)["id"]
        record = jobstore.get_job(r, job_id)
        text = json.loads(record["params"]).get("text") or ""
        attempt, _status = jobstore.claim(r, SETTINGS, worker, entry)
        if not attempt:  # cancelled while queued
            jobstore.ack(r, worker, entry)
            continue
        jobstore.set_progress(r, job_id, 50)
        if "slow" in text:
            for _ in range(40):
                if jobstore.stop_requested(r, job_id) or stop.is_set():
                    break
                time.sleep(0.1)
        else:
            time.sleep(0.3)
        if jobstore.stop_requested(r, job_id):
            jobstore.transition(r, SETTINGS, job_id, "cancelled", {"error": "cancelled by request"},
                                worker_id=worker, attempt=attempt)
        elif "fail" in text:
            jobstore.transition(r, SETTINGS, job_id, "failed", {"error": "engine exploded on purpose"},
                                worker_id=worker, attempt=attempt)
        elif record["type"] == "csm":
            jobstore.transition(r, SETTINGS, job_id, "success", {"result_url": result_url}, worker_id=worker,
                                attempt=attempt)
        else:
            jobstore.transition(r, SETTINGS, job_id, "success", {"text": "a transcript"}, worker_id=worker,
                                attempt=attempt)
        jobstore.ack(r, worker, entry)


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    (tmp / "files").mkdir()
    (tmp / "files" / "speech.mp3").write_bytes(MP3)
    files, files_url = start_file_server(tmp / "files")
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    r.flushall()
    env = clean_env(REDIS_URL=redis_server.url, C3_RENDER_API_KEYS=KEY, OUTPUT_DIR=str(tmp / "output"))
    proc, url = start_api(env, tmp)
    stop = threading.Event()
    thread = threading.Thread(target=stand_in_worker, args=(r, f"{files_url}/speech.mp3", stop), daemon=True)
    thread.start()
    yield url
    stop.set()
    thread.join(10)
    proc.stop()
    files.shutdown()


@pytest.fixture
def api(stack):
    return c3.connect(stack, KEY, timeout_s=10)


def cli(stack: str, *args: str, key: str | None = KEY, timeout: float = 60) -> subprocess.CompletedProcess:
    env = clean_env(C3_RENDER_API=stack)
    if key is not None:
        env["C3_RENDER_API_KEY"] = key
    return subprocess.run([sys.executable, str(ROOT / "c3_render_cli.py"), *args], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_client_submits_waits_and_downloads(api, tmp_path):
    seen = []
    job_id = c3.submit_csm(api, text="Hello there.", voice="conversational_a")
    final = c3.wait(api, job_id, timeout=30, on_update=seen.append)
    assert final["status"] == "success"
    assert seen[-1] == final and any(job.get("progress") == 50 for job in seen)
    saved = c3.download(api, job_id, tmp_path / "hello.mp3")
    assert saved.read_bytes() == MP3
    assert c3.result(api, job_id)["result_url"].endswith("/speech.mp3")
    text_job = c3.submit_whisper(api, "http://127.0.0.1/talk.mp3", task="transcribe")
    assert c3.wait(api, text_job, timeout=30)["type"] == "whisper"
    assert c3.result(api, text_job)["text"] == "a transcript"


def test_client_reports_failures_timeouts_and_cancels(api):
    failing = c3.submit_csm(api, text="Please fail.")
    with pytest.raises(c3.JobFailed, match="engine exploded on purpose") as failed:
        c3.wait(api, failing, timeout=30)
    assert failed.value.job["status"] == "failed"
    slow = c3.submit_csm(api, text="A slow one.")
    with pytest.raises(c3.WaitTimeout) as timed_out:
        c3.wait(api, slow, timeout=1.0)
    assert timed_out.value.job is not None
    assert c3.cancel(api, slow)["status"] in ("cancelled", "running")
    with pytest.raises(c3.JobFailed, match="cancelled"):
        c3.wait(api, slow, timeout=30)


def test_every_submit_helper_sends_its_idempotency_key_as_the_header(api):
    """idempotency_key= is the Idempotency-Key header, not a body field (which the API refuses with a 400):
    the same key again gives the same job, another key a new one."""
    sent = [
        lambda key: c3.submit_csm(api, text="Same order.", idempotency_key=key),
        lambda key: c3.submit_whisper(api, "http://127.0.0.1/talk.mp3", idempotency_key=key),
        lambda key: c3.submit_portrait(api, "http://127.0.0.1/face.png", "http://127.0.0.1/talk.mp3",
                                       idempotency_key=key),
        lambda key: c3.submit_analyze(api, "http://127.0.0.1/photo.jpg", idempotency_key=key),
    ]
    for n, submit in enumerate(sent):
        first = submit(f"order-{n}-{time.time_ns()}")
        key = f"order-{n}-again"
        again = submit(key)
        assert submit(key) == again != first
        assert c3.status(api, again)["id"] == again


def test_client_lists_pages_and_surfaces_api_errors(api, stack):
    ids = [c3.submit_analyze(api, "http://127.0.0.1/photo.jpg", prompt=f"n{n}") for n in range(5)]
    for job_id in ids:
        c3.wait(api, job_id, timeout=30)
    listed = [job["id"] for job in c3.iter_jobs(api, job_type="analyze", page_size=2)]
    assert listed[:len(ids)] == ids[::-1]  # newest first (earlier tests of this module queued analyze jobs too)
    page = c3.list_jobs(api, job_type="analyze", limit=2)
    assert len(page["jobs"]) == 2 and page["next_cursor"]
    with pytest.raises(c3.ApiError, match="image_url") as bad:
        c3.submit(api, "analyze", {"image_url": "not a url"})
    assert bad.value.status == 400
    with pytest.raises(c3.ApiError) as unauthorised:
        c3.status(c3.connect(stack, api_key=""), ids[0])
    assert unauthorised.value.status == 401
    with pytest.raises(c3.ApiError, match="cannot reach"):
        c3.status(c3.connect("http://127.0.0.1:9", KEY, timeout_s=2), ids[0])


def test_cli_submit_wait_out(stack, tmp_path):
    out = tmp_path / "talk.mp3"
    done = cli(stack, "submit", "csm", "--text", "Hello from the CLI.", "--wait", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == MP3
    assert done.stdout.strip().splitlines()[-1].endswith("/speech.mp3")
    progress_lines = [line for line in done.stdout.splitlines() if "elapsed" in line]
    assert any("running" in line and "50%" in line for line in progress_lines), done.stdout  # plain, no TTY


def test_cli_failure_exits_non_zero_with_the_error(stack):
    failed = cli(stack, "submit", "csm", "--text", "This will fail.", "--wait")
    assert failed.returncode == 1
    assert "engine exploded on purpose" in failed.stderr
    bad = cli(stack, "submit", "whisper", "--audio-url", "ftp://nowhere/x.mp3")
    assert bad.returncode == 1 and "audio_url" in bad.stderr
    no_key = cli(stack, "status", "00000000-0000-4000-8000-000000000000", key=None)
    assert no_key.returncode == 1 and "API key" in no_key.stderr


def test_cli_status_result_cancel_jobs_watch(stack):
    submitted = cli(stack, "submit", "csm", "--text", "A slow job.")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert json.loads(cli(stack, "status", job_id).stdout)["id"] == job_id
    timed_out = cli(stack, "watch", job_id, "--timeout", "1")
    assert timed_out.returncode == 3 and "not finished" in timed_out.stderr
    assert cli(stack, "cancel", job_id).returncode == 0
    watched = cli(stack, "watch", job_id)
    assert watched.returncode == 1 and "cancelled" in watched.stderr
    listed = cli(stack, "jobs", "--status", "cancelled", "--json")
    assert job_id in [json.loads(line)["id"] for line in listed.stdout.splitlines()]
    finished = cli(stack, "submit", "analyze", "--image-url", "http://127.0.0.1/p.jpg", "--wait")
    assert finished.returncode == 0 and finished.stdout.strip().splitlines()[-1] == "a transcript"
    analyze_id = json.loads(cli(stack, "jobs", "--type", "analyze", "--limit", "1", "--json").stdout)["id"]
    assert cli(stack, "result", analyze_id).stdout.strip() == "a transcript"


def test_cli_pipeline_out_saves_the_final_step_and_pipeline_status_cancel(stack, tmp_path):
    """--out saves the step no other step takes an output from, wherever it is listed (here first)."""
    body = tmp_path / "steps.json"
    body.write_text(json.dumps({"steps": {"hear": {"type": "whisper", "audio_url": "{{speech.result_url}}"},
                                          "speech": {"type": "csm", "text": "Hello."}}}))
    out = tmp_path / "said.txt"
    done = cli(stack, "pipeline", str(body), "--wait", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "a transcript"  # the whisper step's text, not the speech listed last
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps({"steps": {"speech": {"type": "csm", "text": "A slow one."},
                                          "hear": {"type": "whisper", "audio_url": "{{speech.result_url}}"}}}))
    pipeline_id = cli(stack, "pipeline", str(slow)).stdout.strip()
    shown = json.loads(cli(stack, "pipeline-status", pipeline_id).stdout)
    assert shown["id"] == pipeline_id and shown["steps"]["hear"]["status"] == "waiting"
    cancelled = cli(stack, "pipeline-cancel", pipeline_id)
    assert cancelled.returncode == 0 and cancelled.stdout.startswith(("cancelling", "cancelled")), cancelled.stderr
    with pytest.raises(c3.PipelineFailed) as failed:
        c3.wait_pipeline(c3.connect(stack, KEY, timeout_s=10), pipeline_id, timeout=30)
    assert failed.value.job["status"] == "cancelled"
    again = cli(stack, "pipeline-cancel", pipeline_id)
    assert again.returncode == 1 and "already finished" in again.stderr


def test_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'c3-render = "c3_render_cli:main"' in text
    assert os.path.exists(ROOT / "c3_render_cli.py") and Path(ROOT / "c3_render_client.py").exists()
