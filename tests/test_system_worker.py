"""The worker process against real parts: redis-server, the dev node (HTTP, Gradio, websocket), the API.

Crash recovery (SIGKILL mid-job), max_time, cancel of a running job, node failure mid-job, the
MAX_NODES cap across workers, and SIGTERM with a job running.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import redis
from conftest import wait_for
from system import (
    devnode_nodes,
    http_json,
    reset_faults,
    running_nodes,
    service_env,
    set_faults,
    start_api,
    start_receiver,
    start_worker,
    wait_finished,
    wait_job_node_ready,
)

import jobspec
import jobstore

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(redis_url, devnode, tmp_path):
    """The API, a webhook receiver and a way to start workers; everything stopped afterwards."""
    reset_faults(devnode)
    env = service_env(redis_url, devnode, tmp_path)
    api, api_url = start_api(env, tmp_path)
    receiver = start_receiver()
    workers = []

    def worker(worker_id: str, **extra: str):
        proc = start_worker(env, tmp_path, worker_id, **extra)
        workers.append(proc)
        return proc

    yield {"api": api_url, "env": env, "receiver": receiver, "worker": worker, "devnode": devnode,
           "r": redis.Redis.from_url(redis_url, decode_responses=True)}
    for proc in workers:
        proc.stop(20)
    api.stop()
    receiver.close()
    reset_faults(devnode)
    wait_for(lambda: not running_nodes(devnode), 30, what="all dev node nodes to stop")


def submit_csm(stack, text="Hello there. This is a test.", **extra):
    status, body = http_json("POST", stack["api"] + "/csm",
                             {"text": text, "notify_url": stack["receiver"].url, **extra})
    assert status == 200, body
    return body["id"]


def wait_status(stack, job_id, wanted, timeout=60):
    def check():
        _status, body = http_json("GET", f"{stack['api']}/status/{job_id}")
        return body if body.get("status") == wanted else None
    return wait_for(check, timeout, interval=0.2, what=f"job {job_id} to be {wanted}")


def test_sigkill_mid_job_another_worker_finishes_one_webhook_node_stopped(stack):
    r = stack["r"]
    set_faults(stack["devnode"], engine_hang=["csm"])
    doomed = stack["worker"]("doomed")
    job_id = submit_csm(stack)
    wait_status(stack, job_id, "running", 60)
    node = wait_job_node_ready(r, job_id)
    time.sleep(1.0)  # the engine call is in flight on the node
    doomed.signal(signal.SIGKILL)
    doomed.proc.wait(10)
    reset_faults(stack["devnode"])
    stack["worker"]("rescuer")
    final = wait_finished(stack["api"], job_id, 120)
    assert final["status"] == "success", final
    assert final["attempts"] == 2
    # the dead worker's node (no other job on it) was stopped by the recovery sweep, not left billing
    states = {n["workload"]: n["state"] for n in devnode_nodes(stack["devnode"])}
    assert states[node["workload"]] == "stopped"
    assert not r.exists(f"pool:node:{node['id']}") and r.llen("processing:doomed") == 0
    wait_for(lambda: stack["receiver"].for_job(job_id), 20, what="the webhook")
    time.sleep(2)
    assert len(stack["receiver"].for_job(job_id)) == 1  # exactly one final webhook
    assert stack["receiver"].for_job(job_id)[0]["status"] == "success"


def test_max_time_stops_the_engine_and_names_the_limit(stack):
    r = stack["r"]
    set_faults(stack["devnode"], engine_hang=["csm"])
    stack["worker"]("w-maxtime")
    params = jobspec.validate("csm", {"text": "Never ends.", "notify_url": stack["receiver"].url})
    params["max_time"] = 4  # below the API's minimum of 60 s, to keep the test short
    job_id, _ = jobstore.submit(r, "csm", params)
    final = wait_finished(stack["api"], job_id, 90)
    assert final["status"] == "failed"
    assert "max_time of 4 s exceeded" in final["error"]
    started = time.mktime(time.strptime(final["started_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    finished = time.mktime(time.strptime(final["finished_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert finished - started < 30
    wait_for(lambda: stack["receiver"].for_job(job_id), 20, what="the webhook")
    assert "max_time" in stack["receiver"].for_job(job_id)[0]["error"]
    # the node was checked and is used again for the next job
    reset_faults(stack["devnode"])
    second = submit_csm(stack, "Now it works.")
    assert wait_finished(stack["api"], second, 90)["status"] == "success"
    assert len(running_nodes(stack["devnode"])) == 1


def test_cancel_of_a_running_job(stack):
    set_faults(stack["devnode"], engine_hang=["csm"])
    stack["worker"]("w-cancel")
    job_id = submit_csm(stack)
    wait_status(stack, job_id, "running", 60)
    wait_job_node_ready(stack["r"], job_id)
    time.sleep(1)
    status, body = http_json("POST", f"{stack['api']}/cancel/{job_id}")
    assert status == 200 and body["cancel_requested"] is True
    asked = time.time()
    final = wait_finished(stack["api"], job_id, 30)
    assert time.time() - asked < 10
    assert final["status"] == "cancelled" and final["error"] == "cancelled by request"
    wait_for(lambda: stack["receiver"].for_job(job_id), 20, what="the webhook")
    assert stack["receiver"].for_job(job_id)[0] == {"id": job_id, "status": "failed",
                                                    "error": "cancelled by request"}


def test_node_failing_mid_job_is_retried_once_then_reported(stack):
    t0 = time.time()
    set_faults(stack["devnode"], engine_hang=["csm"], node_dies_after_s=4)
    stack["worker"]("w-nodefail")
    job_id = submit_csm(stack, max_time=120)
    final = wait_finished(stack["api"], job_id, 120)
    assert final["status"] == "failed"
    assert "GPU node failed" in final["error"], final
    launched = [n for n in devnode_nodes(stack["devnode"]) if n["launched_at"] >= t0]
    assert len(launched) == 2  # the first node died, the job was retried once on a new one
    # what the client sees of it names no node (host, address, workload), in the record and the webhook
    names = [n["node"] for n in launched] + [n["workload"] for n in launched] + ["127.0.0.1", "http"]
    assert not [name for name in names if name in final["error"]], final["error"]
    [webhook] = wait_for(lambda: stack["receiver"].for_job(job_id), 20, what="the webhook")
    assert webhook == {"id": job_id, "status": "failed", "error": final["error"]}
    wait_for(lambda: not running_nodes(stack["devnode"]), 10, what="the dead nodes to be stopped")


def test_workers_never_share_a_job_and_respect_max_nodes(stack):
    r = stack["r"]
    t0 = time.time()
    for name in ("w-a", "w-b", "w-c"):
        stack["worker"](name, MAX_NODES="2")
    ids = [submit_csm(stack, f"Job number {i}.") for i in range(6)]
    finals = [wait_finished(stack["api"], job_id, 240) for job_id in ids]
    assert all(f["status"] == "success" for f in finals), finals
    assert all(f["attempts"] == 1 for f in finals)
    # every job was started by exactly one worker
    nodes = [n for n in devnode_nodes(stack["devnode"]) if n["launched_at"] >= t0]
    assert 1 <= len(nodes) <= 2
    events = sorted([(n["launched_at"], 1) for n in nodes]
                    + [(n.get("stopped_at") or time.time() + 1e6, -1) for n in nodes])
    running = peak = 0
    for _at, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2
    assert len(r.smembers("pool:nodes")) <= 2
    wait_for(lambda: len(stack["receiver"].bodies()) >= 6, 20, what="webhooks")
    assert sorted(b["id"] for b in stack["receiver"].bodies()) == sorted(ids)


def test_sigterm_lets_the_running_job_finish(stack):
    worker = stack["worker"]("w-term", WORKER_GRACE_S="60")
    job_id = submit_csm(stack, "One sentence to finish while the worker shuts down.")
    wait_status(stack, job_id, "running", 60)
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(90) == 0
    final = wait_finished(stack["api"], job_id, 10)
    assert final["status"] == "success"
    assert "stopped node" in worker.log()
    wait_for(lambda: not running_nodes(stack["devnode"]), 10, what="the node to be stopped")


def test_heartbeat_lasts_while_a_stopping_worker_finishes_its_job(stack):
    """After SIGTERM the worker keeps its heartbeat until the running job is settled, so other workers'
    sweeps do not take that job for abandoned and run it again (grace longer than the heartbeat TTL)."""
    r = stack["r"]
    set_faults(stack["devnode"], engine_hang=["csm"])
    worker = stack["worker"]("w-beat", WORKER_GRACE_S="8", HEARTBEAT_TTL="2")
    job_id = submit_csm(stack)
    wait_status(stack, job_id, "running", 60)
    wait_job_node_ready(r, job_id)
    worker.signal(signal.SIGTERM)
    alive = []
    for _ in range(5):  # 5 s after the SIGTERM: more than twice the heartbeat's TTL
        time.sleep(1.0)
        alive.append(bool(r.exists(jobstore.heartbeat_key("w-beat"))))
    assert alive == [True] * 5 and r.hget(f"job:{job_id}", "status") == "running"
    assert worker.proc.wait(60) == 0
    assert r.hget(f"job:{job_id}", "status") == "queued"  # put back at the end of the grace period
    assert not r.exists(jobstore.heartbeat_key("w-beat"))  # retired


def test_sigterm_puts_a_long_job_back(stack):
    r = stack["r"]
    set_faults(stack["devnode"], engine_hang=["csm"])
    worker = stack["worker"]("w-term2", WORKER_GRACE_S="2")
    job_id = submit_csm(stack)
    wait_status(stack, job_id, "running", 60)
    wait_job_node_ready(r, job_id)
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0
    record = r.hgetall(f"job:{job_id}")
    assert record["status"] == "queued"
    assert json.loads(r.lrange("queue:jobs", -1, -1)[0])["id"] == job_id
    assert not running_nodes(stack["devnode"])
    reset_faults(stack["devnode"])
    stack["worker"]("w-after")
    assert wait_finished(stack["api"], job_id, 90)["status"] == "success"


def test_a_slow_comput3_call_in_the_sweep_never_lets_the_worker_take_itself_for_dead(stack):
    """Issue 17, defect 1: the sweep's Comput3 calls (here a stop to retry that takes 8 s) must not hold up
    the heartbeat (HEARTBEAT_TTL 2 s): before, the worker's own heartbeat expired during the call and its
    sweep requeued its own running job and stopped its own node."""
    r = stack["r"]
    set_faults(stack["devnode"], engine_hang=["csm"], stop_answer_delay_s=8)
    r.hset("nodes:to_stop", "some-old-workload", "old.gpu")  # a failed stop the sweep retries (slowly)
    worker = stack["worker"]("w-slowstop", HEARTBEAT_TTL="2")
    job_id = submit_csm(stack)
    wait_status(stack, job_id, "running", 60)
    node = wait_job_node_ready(r, job_id)
    deadline = time.time() + 12
    while time.time() < deadline:  # a slow sweep or two
        assert r.exists(jobstore.heartbeat_key("w-slowstop")), "the worker's heartbeat expired"
        record = r.hgetall(f"job:{job_id}")
        assert record["status"] == "running" and record["attempts"] == "1", record
        time.sleep(0.5)
    assert {n["workload"]: n["state"] for n in devnode_nodes(stack["devnode"])}[node["workload"]] == "running"
    assert "requeued" not in worker.log()
    reset_faults(stack["devnode"])
    http_json("POST", f"{stack['api']}/cancel/{job_id}")
    assert wait_finished(stack["api"], job_id, 30)["status"] == "cancelled"


def test_a_cancel_during_launch_retries_is_seen_at_once_and_nothing_more_is_launched(stack):
    """Issue 17, defect 9: a cancel while the worker retries a failing launch (LAUNCH_BACKOFF_S 3 s,
    doubling) ends the job within seconds, not when the retries are over, and no launch follows it."""
    set_faults(stack["devnode"], launch_failures=50, launch_failure_mode="500")
    stack["worker"]("w-cancel-launch", LAUNCH_BACKOFF_S="3", LAUNCH_ATTEMPTS="5")
    job_id = submit_csm(stack)
    wait_for(lambda: request_count(stack["devnode"], "POST /api/v0/launch") >= 1, 30, what="a first launch")
    status, _ = http_json("POST", f"{stack['api']}/cancel/{job_id}")
    asked = time.time()
    launches_then = request_count(stack["devnode"], "POST /api/v0/launch")
    final = wait_finished(stack["api"], job_id, 30)
    assert status == 200 and final["status"] == "cancelled"
    assert time.time() - asked < 4  # was: the rest of 3 + 6 + 12 + 24 s of back-off and launches
    time.sleep(1)
    assert request_count(stack["devnode"], "POST /api/v0/launch") <= launches_then + 1
    assert not stack["r"].smembers("pool:nodes")  # the launch's place in the pool went back


def request_count(devnode: str, what: str) -> int:
    import urllib.request

    with urllib.request.urlopen(devnode + "/admin/requests", timeout=5) as response:
        return json.loads(response.read()).get(what, 0)
