"""Outages and leaks with real parts: secrets never appear anywhere, workers ride out a Redis outage,
launches that keep failing and nodes that vanish end in clear errors with no node left running."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import redis
from conftest import free_port, wait_for
from moto.server import ThreadedMotoServer
from system import (
    C3_KEY,
    devnode_nodes,
    http_json,
    reset_faults,
    running_nodes,
    service_env,
    set_faults,
    start_api,
    start_file_server,
    start_receiver,
    start_worker,
    wait_finished,
    wait_job_node_ready,
)

pytestmark = pytest.mark.e2e

S3_SECRET = "s3-secret-4c1d0e9f7a2b"
WEBHOOK_SECRET = "webhook-secret-8e7d6c5b4a39"
FILE_SECRET = "file-secret-0f1e2d3c4b5a"


@pytest.fixture
def env(redis_url, devnode, tmp_path):
    reset_faults(devnode)
    yield service_env(redis_url, devnode, tmp_path)
    reset_faults(devnode)


def test_secrets_never_appear_in_logs_records_or_answers(redis_url, devnode, tmp_path, env):
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    env.update(MINIO_ENDPOINT=f"{host}:{port}", MINIO_ACCESS_KEY="access-id", MINIO_SECRET_KEY=S3_SECRET,
               WEBHOOK_SECRET=WEBHOOK_SECRET, FILE_URL_SECRET=FILE_SECRET, LOG_LEVEL="DEBUG")
    api, api_url = start_api(env, tmp_path)
    worker = start_worker(env, tmp_path, "w-secrets")
    receiver = start_receiver()
    answers: list[str] = []
    try:
        jobs = []
        for body in ({"text": "Secrets stay secret."},
                     {"text": "This one fails.", "voice": "clone", "reference_text": "x",
                      "reference_audio_url": f"http://127.0.0.1:{free_port()}/missing.wav"}):
            status, answer = http_json("POST", api_url + "/csm", {**body, "notify_url": receiver.url})
            answers.append(json.dumps(answer))
            jobs.append(answer["id"])
        set_faults(devnode, engine_error=["ollama"])
        status, answer = http_json("POST", api_url + "/analyze",
                                   {"image_url": "https://127.0.0.1:1/x.jpg", "notify_url": receiver.url})
        jobs.append(answer["id"])
        for job_id in jobs:
            answers.append(json.dumps(wait_finished(api_url, job_id, 120)))
            answers.append(json.dumps(http_json("GET", f"{api_url}/result/{job_id}")[1]))
        wait_for(lambda: len(receiver.calls) >= 3, 30, what="webhooks")
        # a failing Comput3 launch (bad key answer) must not echo the key either
        set_faults(devnode, launch_failures=10, launch_failure_mode="html")
    finally:
        worker.stop()
        api.stop()
        receiver.close()
        moto.stop()
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    stored = []
    for key in r.keys("*"):
        kind = r.type(key)
        if kind == "hash":
            stored.append(json.dumps(r.hgetall(key)))
        elif kind == "list":
            stored.append(json.dumps(r.lrange(key, 0, -1)))
        elif kind == "string":
            stored.append(r.get(key))
    webhook_text = json.dumps([c["body"] for c in receiver.calls])
    haystacks = {"worker log": worker.log(), "api log": api.log(), "redis": "\n".join(stored),
                 "api answers": "\n".join(answers), "webhook bodies": webhook_text}
    assert "job" in haystacks["worker log"] and len(stored) > 3
    for where, text in haystacks.items():
        for secret in (C3_KEY, S3_SECRET, WEBHOOK_SECRET, FILE_SECRET):
            assert secret not in text, f"{secret[:6]}... found in {where}"


def test_worker_rides_out_a_redis_outage(redis_server, redis_url, devnode, tmp_path, env):
    api, api_url = start_api(env, tmp_path)
    worker = start_worker(env, tmp_path, "w-outage")
    try:
        wait_for(lambda: "started" in worker.log(), 20, what="worker start")
        redis_server.stop()
        time.sleep(6)
        assert worker.proc.poll() is None, worker.log()  # still running, no crash loop
        status, answer = http_json("POST", api_url + "/csm", {"text": "Redis is down."})
        assert status == 503 and "Redis" in answer["error"]
        redis_server.start()
        status, answer = http_json("POST", api_url + "/csm", {"text": "Redis is back."})
        assert status == 200
        assert wait_finished(api_url, answer["id"], 120)["status"] == "success"
        assert "Redis unavailable" in worker.log()
    finally:
        if redis_server.proc is None:
            redis_server.start()
        worker.stop()
        api.stop()


def test_launch_that_keeps_failing_fails_the_job_and_frees_the_slot(redis_url, devnode, tmp_path, env):
    set_faults(devnode, launch_failures=50, launch_failure_mode="html")
    api, api_url = start_api(env, tmp_path)
    worker = start_worker(env, tmp_path, "w-nolaunch", LAUNCH_ATTEMPTS="3")
    try:
        status, answer = http_json("POST", api_url + "/csm", {"text": "No GPU today."})
        final = wait_finished(api_url, answer["id"], 60)
        assert final["status"] == "failed"
        assert "could not launch a media:fast GPU node" in final["error"]
        assert "not JSON" in final["error"] or "HTTP 502" in final["error"]
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        assert not r.smembers("pool:nodes")  # the place the launch took went back
        assert not running_nodes(devnode)
        # and the worker goes on: launches work again
        reset_faults(devnode)
        status, answer = http_json("POST", api_url + "/csm", {"text": "GPU is back."})
        assert wait_finished(api_url, answer["id"], 90)["status"] == "success"
    finally:
        worker.stop()
        api.stop()


def test_node_vanishing_mid_job_is_replaced(redis_url, devnode, tmp_path, env):
    t0 = time.time()
    set_faults(devnode, engine_hang=["csm"])
    api, api_url = start_api(env, tmp_path)
    worker = start_worker(env, tmp_path, "w-vanish")
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        status, answer = http_json("POST", api_url + "/csm", {"text": "The node will vanish."})
        job_id = answer["id"]
        workload = wait_job_node_ready(r, job_id, 60)["workload"]
        time.sleep(1)
        reset_faults(devnode)
        # the provider stops the node (as if it was reclaimed): it leaves the workloads list
        status, _ = http_json("POST", f"{devnode}/api/v0/stop", {"workload": workload},
                              headers={"X-C3-API-KEY": C3_KEY})
        assert status == 200
        final = wait_finished(api_url, job_id, 90)
        assert final["status"] == "success", final
        nodes = [n for n in devnode_nodes(devnode) if n["launched_at"] >= t0]
        pool = [r.hget(key, "workload") for key in r.scan_iter("pool:node:*")]
        assert len(nodes) == 2 and workload not in pool
        assert "no longer in the workloads list" in worker.log()
    finally:
        worker.stop()
        api.stop()
    wait_for(lambda: not running_nodes(devnode), 20, what="nodes stopped")


@pytest.mark.parametrize("stopping", [False, True], ids=["oom-like", "process-group-stop"])
def test_an_ffprobe_killed_by_a_signal_is_not_blamed_on_the_input(redis_url, devnode, tmp_path, env, stopping):
    """ffprobe killed by a signal: when the worker is being stopped with its process group (systemd,
    docker), the job goes back to the queue; otherwise it fails saying what happened, never 'not an
    audio file'."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
                    str(inputs / "talk.wav")], check=True, timeout=60)
    server, files_url = start_file_server(inputs)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # a group stop: the worker gets SIGTERM at the same moment as its ffprobe
    (fake_bin / "ffprobe").write_text("#!/bin/sh\n" + ("kill -TERM $PPID\n" if stopping else "") + "kill -TERM $$\n")
    (fake_bin / "ffprobe").chmod(0o755)
    api, api_url = start_api(env, tmp_path)
    worker = start_worker(env, tmp_path, f"w-ffprobe-{stopping}", PATH=f"{fake_bin}:{os.environ['PATH']}")
    try:
        status, answer = http_json("POST", api_url + "/whisper", {"audio_url": f"{files_url}/talk.wav"})
        assert status == 200
        if stopping:
            assert worker.proc.wait(timeout=60) == 0
            record = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(f"job:{answer['id']}")
            assert record["status"] == "queued" and record["attempts"] == "0"
            assert "put back on the queue (ffprobe was stopped by signal 15" in worker.log()
        else:
            final = wait_finished(api_url, answer["id"], 60)
            assert final["status"] == "failed"
            assert "ffprobe was stopped by signal 15" in final["error"] and "not an audio" not in final["error"]
    finally:
        worker.stop()
        api.stop()
        server.shutdown()
