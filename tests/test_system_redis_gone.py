"""SIGTERM to a worker whose Redis is gone, with real parts: a redis-server of the test's own that is
SIGKILLed (connections refused) or SIGSTOPped (frozen: nothing answers, as with a partition or a dead
host), a worker process, the dev node and a webhook receiver that hangs.

The worker must exit in bounded time (docker compose and systemd SIGKILL it after a grace period),
still stop its node through Comput3, say in one line what it left undone, and lose nothing: once Redis
answers again, another worker's recovery sweep gives the job and the in-flight webhook back.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import redis
from conftest import RedisServer, free_port, wait_for
from system import (
    reset_faults,
    running_nodes,
    service_env,
    set_faults,
    start_receiver,
    start_worker,
    wait_job_node_ready,
)

import config
import jobspec
import jobstore
import webhook_state

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server for this test alone (it is killed or frozen); ended afterwards whatever state it is in."""
    server = RedisServer(port=free_port(), data_dir=tmp_path / "redis")
    server.start()
    yield server
    if server.proc is not None:
        server.proc.send_signal(signal.SIGCONT)
    server.kill()


def take_redis_away(server: RedisServer, how: str) -> None:
    if how == "killed":
        server.kill()
    else:
        server.proc.send_signal(signal.SIGSTOP)


def bring_redis_back(server: RedisServer, how: str) -> None:
    if how == "killed":
        server.start()  # same port and data directory: the AOF brings the data back
    else:
        server.proc.send_signal(signal.SIGCONT)


def exit_seconds(proc: subprocess.Popen, limit_s: float) -> float:
    """Seconds from now until proc exits; fails the test (and kills proc) after limit_s."""
    asked = time.time()
    try:
        proc.wait(limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"the worker was still running {limit_s:g} s after SIGTERM with Redis gone")
    assert proc.returncode == 0
    return time.time() - asked


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_sigterm_with_redis_gone_and_a_webhook_in_flight_exits_promptly(own_redis, tmp_path, how):
    """Idle worker, one webhook attempt hanging on its receiver. Before: with Redis killed the process
    waited for the attempt thread (WEBHOOK_TIMEOUT_S, 30 s here) after 3.5 s of hand-back retries; with
    Redis frozen every step waited out a 5 s timeout, and the hand-back was tried four times (32 s)."""
    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    receiver = start_receiver(mode="hang", host="127.0.0.2", hold_s=60)
    env = service_env(own_redis.url, "http://127.0.0.1:9", tmp_path, WEBHOOK_TIMEOUT_S="30")
    worker = start_worker(env, tmp_path, "w-gone")
    rescuer = None
    try:
        wait_for(lambda: r.exists(jobstore.heartbeat_key("w-gone")), 30, what="the worker's heartbeat")
        entry = json.dumps({"job_id": "job-in-flight", "url": receiver.url, "body": "{}", "attempt": 0})
        r.lpush(config.WEBHOOK_OUTBOX_KEY, entry)
        wait_for(lambda: receiver.calls, 15, what="the webhook attempt")
        time.sleep(1.5)  # the AOF (appendfsync everysec) has the in-flight entry on disk
        take_redis_away(own_redis, how)
        time.sleep(1.0)  # the worker's threads notice
        worker.signal(signal.SIGTERM)
        exit_seconds(worker.proc, 15)
        log = worker.log()
        assert "Redis unreachable on the way out" in log, log
        assert "could not hand back 1 in-flight webhook deliveries" in log, log
        # nothing lost: once Redis answers, a live worker's sweep gives the delivery back and sends it
        bring_redis_back(own_redis, how)
        r = redis.Redis.from_url(own_redis.url, decode_responses=True)
        assert r.lrange(webhook_state.webhook_inflight_key("w-gone"), 0, -1) == [entry]
        rescuer = start_worker(env, tmp_path, "w-rescuer")
        wait_for(lambda: len(receiver.calls) >= 2, 40, what="the delivery to be sent again")
        assert {c["headers"]["webhook-id"] for c in receiver.calls} == {"job-in-flight"}
    finally:
        worker.stop(5)
        if rescuer is not None:
            rescuer.stop(10)
        receiver.close()


def test_sigterm_with_redis_frozen_during_a_job_stops_the_node_and_exits_after_the_grace(own_redis, devnode,
                                                                                         tmp_path):
    """A job running on a dev node, Redis frozen, SIGTERM with WORKER_GRACE_S=2. Before: about 50 s (the
    cancel poll, the put-back, the node records and four hand-back tries each waited out 5 s). Now: the
    grace, a 2 s put-back timeout, no retries; the node is stopped all the same."""
    reset_faults(devnode)
    set_faults(devnode, engine_hang=["csm"])
    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    env = service_env(own_redis.url, devnode, tmp_path)
    worker = start_worker(env, tmp_path, "w-job", WORKER_GRACE_S="2")
    rescuer = None
    try:
        job_id, _ = jobstore.submit(r, "csm", jobspec.validate("csm", {"text": "Never ends."}))
        wait_job_node_ready(r, job_id, 60)
        time.sleep(1.5)  # the engine call is under way; the AOF has the running job
        take_redis_away(own_redis, "frozen")
        worker.signal(signal.SIGTERM)
        exit_seconds(worker.proc, 20)
        log = worker.log()
        assert f"could not give job {job_id} back to the queue" in log, log
        assert not running_nodes(devnode)  # stopped through Comput3 although Redis did not answer
        # nothing lost: once Redis answers, a live worker's sweep requeues the job and runs it
        bring_redis_back(own_redis, "frozen")
        reset_faults(devnode)
        rescuer = start_worker(env, tmp_path, "w-rescuer")
        wait_for(lambda: r.hget(jobstore.job_key(job_id), "status") == "success", 90, what="the job to finish")
    finally:
        worker.stop(5)
        if rescuer is not None:
            rescuer.stop(20)
        reset_faults(devnode)
        wait_for(lambda: not running_nodes(devnode), 30, what="all dev node nodes to stop")
