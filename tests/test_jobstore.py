"""The queue protocol against a real redis-server: take, ack, heartbeats, requeue of dead workers."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import redis
from conftest import ROOT, wait_for

import config
import jobspec
import jobstore
import localfiles
import nodestore
import webhook_state


def new_job(r, job_type="csm", **extra):
    params = jobspec.validate(job_type, {"text": "Hi.", **extra} if job_type == "csm" else extra)
    job_id, created = jobstore.submit(r, job_type, params)
    assert created
    return job_id


def test_take_moves_entry_to_processing_and_ack_removes_it(r, settings):
    first, second = new_job(r), new_job(r)
    entry = jobstore.take(r, "w1", 1)
    assert json.loads(entry)["id"] == first  # oldest first
    assert r.lrange(jobstore.processing_key("w1"), 0, -1) == [entry]
    assert r.llen(config.QUEUE_KEY) == 1
    jobstore.ack(r, "w1", entry)
    assert r.llen(jobstore.processing_key("w1")) == 0
    assert json.loads(jobstore.take(r, "w2", 1))["id"] == second
    assert jobstore.take(r, "w3", 0.1) is None


def test_transitions_are_guarded(r, settings):
    job_id = new_job(r)
    assert jobstore.transition(r, settings, job_id, "success") == (False, "queued")
    assert jobstore.claim(r, settings, "w1", jobstore.take(r, "w1", 1)) == (1, "running")
    assert jobstore.transition(r, settings, job_id, "failed", {"error": "x"}, worker_id="w2", attempt=1) == \
        (False, "running")  # only the worker holding it may finish it
    assert jobstore.transition(r, settings, job_id, "failed", {"error": "x"}, worker_id="w1", attempt=2) == \
        (False, "running")  # in the attempt it holds
    with pytest.raises(ValueError, match="names no attempt"):
        jobstore.transition(r, settings, job_id, "failed", {"error": "x"}, worker_id="w1")
    assert jobstore.transition(r, settings, job_id, "failed", {"error": "x"}, worker_id="w1", attempt=1) == \
        (True, "failed")
    for status in jobspec.STATUSES:
        assert jobstore.transition(r, settings, job_id, status) == (False, "failed")
    assert jobstore.transition(r, settings, "no-such-job", "running") == (False, "missing")


def test_exactly_one_final_webhook(r, settings):
    job_id = new_job(r, notify_url="http://127.0.0.1:9/hook")
    silent = new_job(r)
    for jid in (job_id, silent):
        jobstore.transition(r, settings, jid, "running", {"worker": "w"})
        jobstore.transition(r, settings, jid, "success", {"result_url": "http://x/y.mp3"})
        jobstore.transition(r, settings, jid, "failed", {"error": "late"})
    entries = [json.loads(e) for e in r.lrange(config.WEBHOOK_OUTBOX_KEY, 0, -1)]
    assert len(entries) == 1
    assert entries[0]["url"] == "http://127.0.0.1:9/hook"
    assert json.loads(entries[0]["body"]) == {"id": job_id, "status": "success", "result_url": "http://x/y.mp3"}


def test_webhook_bodies_follow_the_spec():
    assert json.loads(webhook_state.webhook_body("i", "success", {"text": "t"})) == \
        {"id": "i", "status": "success", "text": "t"}
    assert json.loads(webhook_state.webhook_body("i", "failed", {"error": "e"})) == \
        {"id": "i", "status": "failed", "error": "e"}
    assert json.loads(webhook_state.webhook_body("i", "cancelled", {"error": "cancelled by request"})) == \
        {"id": "i", "status": "failed", "error": "cancelled by request"}


KILLED_WORKER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import config, jobstore, redis_conn
    settings = config.Settings(redis_url={url!r})
    r = redis_conn.connect(settings)
    jobstore.heartbeat(r, "doomed", 1)
    entry = jobstore.take(r, "doomed", 5)
    jobstore.transition(r, settings, __import__("json").loads(entry)["id"], "running", {{"worker": "doomed"}})
    print("taken", flush=True)
    time.sleep(60)
""")


def test_requeue_after_killed_process(r, settings, redis_url):
    job_id = new_job(r)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WORKER.format(root=str(ROOT), url=redis_url)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "taken"
    finally:
        proc.kill()
        proc.wait()
    assert r.llen(jobstore.processing_key("doomed")) == 1  # the crash left the entry there
    assert r.hget(f"job:{job_id}", "status") == "running"
    # while the heartbeat lives, nothing moves
    jobstore.heartbeat(r, "doomed", 30)
    assert jobstore.requeue_abandoned(r, settings)["requeued"] == 0
    r.delete(jobstore.heartbeat_key("doomed"))
    summary = jobstore.requeue_abandoned(r, settings)
    assert summary == {"workers": ["doomed"], "requeued": 1, "failed": []}
    assert r.llen(jobstore.processing_key("doomed")) == 0
    assert r.hget(f"job:{job_id}", "status") == "queued"
    entry = jobstore.take(r, "w2", 1)
    assert json.loads(entry)["id"] == job_id
    assert jobstore.transition(r, settings, job_id, "running", {"worker": "w2"})[0]
    assert r.hget(f"job:{job_id}", "attempts") == "2"
    assert jobstore.requeue_abandoned(r, settings)["requeued"] == 0  # idempotent


def test_requeued_job_runs_next(r, settings):
    job_id = new_job(r)
    jobstore.take(r, "dead", 1)
    jobstore.transition(r, settings, job_id, "running", {"worker": "dead"})
    later = new_job(r)
    r.sadd(config.WORKERS_KEY, "dead")
    jobstore.requeue_abandoned(r, settings)
    assert json.loads(jobstore.take(r, "w2", 1))["id"] == job_id
    assert json.loads(jobstore.take(r, "w2", 1))["id"] == later


def test_max_attempts_fails_the_job(r, settings):
    settings = dataclasses.replace(settings, max_attempts=2)
    job_id = new_job(r, notify_url="http://127.0.0.1:9/hook")
    for attempt in range(2):
        worker = f"dead{attempt}"
        r.sadd(config.WORKERS_KEY, worker)
        assert json.loads(jobstore.take(r, worker, 1))["id"] == job_id
        jobstore.transition(r, settings, job_id, "running", {"worker": worker})
        summary = jobstore.requeue_abandoned(r, settings)
    assert summary["failed"] == [job_id]
    record = r.hgetall(f"job:{job_id}")
    assert record["status"] == "failed"
    assert "2 attempts" in record["error"] and "MAX_ATTEMPTS" in record["error"]
    assert r.llen(config.QUEUE_KEY) == 0
    assert r.llen(config.WEBHOOK_OUTBOX_KEY) == 1
    assert not r.smembers(config.WORKERS_KEY)


def test_put_back_on_shutdown(r, settings):
    job_id = new_job(r)
    entry = jobstore.take(r, "w1", 1)
    attempt, _status = jobstore.claim(r, settings, "w1", entry)
    assert not jobstore.put_back(r, "w2", job_id, entry, attempt)  # not w2's job: nothing changes
    assert r.hget(f"job:{job_id}", "status") == "running"
    assert jobstore.put_back(r, "w1", job_id, entry, attempt)
    assert r.hget(f"job:{job_id}", "status") == "queued"
    assert r.hget(f"job:{job_id}", "attempts") == "0"
    assert r.lrange(config.QUEUE_KEY, 0, -1) == [entry]
    assert r.llen(jobstore.processing_key("w1")) == 0


def test_the_pool_holds_at_most_max_nodes(r):
    assert nodestore.reserve_node(r, "n1", "media:fast", "a", 2, 100.0)
    assert nodestore.reserve_node(r, "n2", "ollama_webui:fast", "b", 2, 100.0)
    assert not nodestore.reserve_node(r, "n3", "media:fast", "c", 2, 100.0)  # every type counts
    nodestore.forget_node(r, "n1", 101.0)
    assert nodestore.reserve_node(r, "n3", "media:fast", "c", 2, 102.0)
    assert r.smembers(config.POOL_NODES_KEY) == {"n2", "n3"}


def test_a_slot_is_leased_only_while_the_node_has_one_free(r):
    assert nodestore.reserve_node(r, "n1", "media:fast", "w", 4, 100.0, "job-a", "csm")
    nodestore.mark_booting(r, "n1", {"state": "ready", "workload": "wl1", "node": "n1.gpu"})
    assert nodestore.lease_slot(r, "n1", "media:fast", "job-b", "w", "csm", 1, 3, 101.0) == "full"  # csm:1
    assert nodestore.lease_slot(r, "n1", "media:fast", "job-b", "w", "whisper", 1, 3, 101.0) == "ok"
    assert nodestore.lease_slot(r, "n1", "media:fast", "job-c", "w", "portrait", 1, 2, 101.0) == "full"  # 2 in all
    nodestore.make_solo(r, "n1")  # after an out-of-memory error: one job at a time
    nodestore.release_lease(r, "n1", "job-a", 102.0)
    assert nodestore.lease_slot(r, "n1", "media:fast", "job-c", "w", "portrait", 1, 3, 103.0) == "full"
    nodestore.release_lease(r, "n1", "job-b", 104.0)
    assert nodestore.lease_slot(r, "n1", "media:fast", "job-c", "w", "portrait", 1, 3, 105.0) == "ok"
    assert nodestore.claim_stop(r, "n1", "w", 106.0, force=True)
    assert nodestore.lease_slot(r, "n1", "media:fast", "job-d", "w", "csm", 1, 3, 107.0) == "stopping"
    nodestore.forget_node(r, "n1", 108.0)
    assert nodestore.lease_slot(r, "n1", "media:fast", "job-d", "w", "csm", 1, 3, 109.0) == "gone"


def test_leases_never_overfill_a_node_under_concurrent_workers(r):
    """Eight threads (workers) lease the two csm slots of one node at once, release and lease again:
    never more than the slots at one time (the check and the write are one Lua step)."""
    assert nodestore.reserve_node(r, "n1", "media:fast", "w0", 4, time.time())
    nodestore.mark_booting(r, "n1", {"state": "ready", "workload": "wl1"})
    most, lock = [0], threading.Lock()

    def worker(n: int) -> None:
        client = redis.Redis(connection_pool=r.connection_pool)  # a client per thread, one pool
        for i in range(30):
            job = f"job-{n}-{i}"
            if nodestore.lease_slot(client, "n1", "media:fast", job, f"w{n}", "csm", 2, 3, time.time()) == "ok":
                held = client.hlen(nodestore.leases_key("n1"))
                with lock:
                    most[0] = max(most[0], held)
                nodestore.release_lease(client, "n1", job, time.time())

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= most[0] <= 2 and r.hlen(nodestore.leases_key("n1")) == 0


def test_node_time_is_shared_among_its_jobs_and_adds_up_to_its_life(r):
    """Boot and idle time go to the next job (the last job takes the idle time before the stop), time
    with jobs is split among them: the shares add up to launch-to-stop exactly."""
    for job in ("job-a", "job-b", "job-c"):
        r.hset(f"job:{job}", "status", "running")
    assert nodestore.reserve_node(r, "n1", "media:fast", "w", 4, 0.0, "job-a", "csm")  # launched at 0
    nodestore.mark_booting(r, "n1", {"state": "booting", "workload": "wl1"})
    assert nodestore.mark_ready(r, "n1", 10.0) == 10.0  # booted in 10 s, job-a waiting for it
    assert nodestore.lease_slot(r, "n1", "media:fast", "job-b", "w", "whisper", 1, 3, 20.0) == "ok"
    nodestore.release_lease(r, "n1", "job-a", 30.0)  # job-a: 20 s alone + 10 s shared with job-b = 25
    nodestore.release_lease(r, "n1", "job-b", 40.0)  # job-b: 10/2 + 10 = 15
    assert nodestore.lease_slot(r, "n1", "media:fast", "job-c", "w", "csm", 1, 3, 50.0) == "ok"  # 10 s idle
    nodestore.release_lease(r, "n1", "job-c", 55.0)  # job-c: 10 idle + 5 = 15, then 5 idle before the stop
    assert nodestore.claim_stop(r, "n1", "w", 60.0)
    forgotten = nodestore.forget_node(r, "n1", 60.0)
    assert forgotten["type"] == "media:fast"
    shares = {job: float(r.hget(f"job:{job}", "node_seconds")) for job in ("job-a", "job-b", "job-c")}
    assert shares == pytest.approx({"job-a": 25.0, "job-b": 15.0, "job-c": 20.0})
    assert sum(shares.values()) == pytest.approx(60.0)
    kinds = {k: float(v) for k, v in r.hgetall(config.NODE_TIME_KEY).items()}
    assert kinds == pytest.approx({"booting": 10.0, "busy": 35.0, "idle": 15.0})
    assert float(r.hget(config.POOL_STATS_KEY, "boot:media:fast")) == 10.0
    assert r.lrange(config.POOL_GAPS_KEY.format(type="media:fast"), 0, -1) == ["10"]  # 40 -> 50


def test_an_idle_gap_that_ends_in_a_launch_is_noted_and_a_pre_warm_ends_none(r):
    """The long gaps end in a cold start (no node left to lease): the keep-alive policy must see them, and
    a job joining the launched node while its first job runs ends no gap (the type is busy)."""
    gaps = config.POOL_GAPS_KEY.format(type="media:fast")
    assert nodestore.reserve_node(r, "n1", "media:fast", "w", 4, 0.0, "job-a", "csm")
    nodestore.mark_booting(r, "n1", {"state": "booting", "workload": "wl1"})
    nodestore.mark_ready(r, "n1", 10.0)
    nodestore.release_lease(r, "n1", "job-a", 20.0)  # the type is idle from 20
    assert nodestore.claim_stop(r, "n1", "w", 25.0)
    nodestore.forget_node(r, "n1", 25.0)
    assert nodestore.reserve_node(r, "n2", "media:fast", "w", 4, 80.0, "job-b", "whisper")  # a cold start
    assert r.lrange(gaps, 0, -1) == ["60"]
    nodestore.mark_booting(r, "n2", {"state": "booting", "workload": "wl2"})
    nodestore.mark_ready(r, "n2", 90.0)
    assert nodestore.lease_slot(r, "n2", "media:fast", "job-c", "w", "csm", 1, 3, 95.0) == "ok"
    assert r.lrange(gaps, 0, -1) == ["60"]  # job-b runs: no gap ended
    nodestore.release_lease(r, "n2", "job-b", 100.0)
    nodestore.release_lease(r, "n2", "job-c", 100.0)
    assert nodestore.reserve_node(r, "n3", "media:fast", "w", 4, 110.0)  # a pre-warm: the gap goes on
    assert r.lrange(gaps, 0, -1) == ["60"]
    assert float(r.hget(config.POOL_STATS_KEY, "idle_since:media:fast")) == 100.0


def test_a_node_that_ran_no_job_is_unattributed(r):
    assert nodestore.reserve_node(r, "n1", "media:fast", "w", 4, 0.0)  # a pre-warm: no job
    nodestore.mark_booting(r, "n1", {"state": "booting"})
    nodestore.mark_ready(r, "n1", 5.0)
    assert nodestore.claim_stop(r, "n1", "w", 8.0)
    nodestore.forget_node(r, "n1", 8.0)
    assert float(r.hget(config.NODE_TIME_KEY, "unattributed")) == pytest.approx(8.0)


def test_a_stop_is_claimed_once_and_never_under_a_job(r):
    assert nodestore.reserve_node(r, "n1", "media:fast", "w", 4, 0.0, "job-a", "csm")
    nodestore.mark_booting(r, "n1", {"state": "ready"})
    assert not nodestore.claim_stop(r, "n1", "w", 1.0)  # a job leases it
    nodestore.release_lease(r, "n1", "job-a", 2.0)
    idle_since = r.hget(nodestore.node_key("n1"), "idle_since")
    assert nodestore.lease_slot(r, "n1", "media:fast", "job-b", "w", "csm", 1, 3, 3.0) == "ok"
    nodestore.release_lease(r, "n1", "job-b", 4.0)
    assert not nodestore.claim_stop(r, "n1", "w", 5.0, "ready", idle_since)  # used since it was seen idle
    assert nodestore.claim_stop(r, "n1", "w", 5.0, "ready", r.hget(nodestore.node_key("n1"), "idle_since"))
    assert not nodestore.claim_stop(r, "n1", "other", 5.0)  # stopping already


def test_a_launched_workload_is_owned_once(r):
    intent = nodestore.begin_launch(r, "a", "media:fast", ["old"], 100.0)
    assert nodestore.launch_intents(r)[intent] == {"worker": "a", "type": "media:fast", "before": ["old"],
                                                  "started_at": 100.0}
    assert nodestore.reserve_node(r, "n1", "media:fast", "a", 4, 100.0)
    assert nodestore.own_node(r, "n1", "a", "media:fast", "wl1", "n1.gpu", 101.0, 3701.0, intent)
    assert not nodestore.launch_intents(r)  # the intent ends with the record, in one step
    assert nodestore.get_pool_node(r, "n1")["workload"] == "wl1"
    assert nodestore.reserve_node(r, "n2", "media:fast", "b", 4, 100.0)
    assert not nodestore.own_node(r, "n2", "b", "media:fast", "wl1", "n1.gpu", 101.0, 3701.0)  # claimed already
    assert not nodestore.own_node(r, "n-gone", "b", "media:fast", "wl2", "n2.gpu", 101.0, 3701.0)  # no node
    assert nodestore.get_pool_node(r, "n2").get("workload") is None
    assert set(nodestore.owned_nodes(r)) == {"wl1"}


def test_file_url_secret_made_once(r):
    first = localfiles.file_url_secret(r, "")
    assert len(first) == 64 and localfiles.file_url_secret(r, "") == first
    assert localfiles.file_url_secret(r, "configured") == b"configured"


@pytest.mark.parametrize("value", ["", "x", "123e4567-e89b-12d3-a456-426614174000"])
def test_is_job_id_refuses_non_uuid4(value):
    assert not jobstore.is_job_id(value)


def test_submit_is_atomic_under_concurrency(r, settings):
    import threading

    ids: list[str] = []
    lock = threading.Lock()

    def many():
        for _ in range(50):
            job_id = new_job(r)
            with lock:
                ids.append(job_id)

    threads = [threading.Thread(target=many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queued = {json.loads(e)["id"] for e in r.lrange(config.QUEUE_KEY, 0, -1)}
    assert queued == set(ids) and len(ids) == 200
    wait_for(lambda: all(r.exists(f"job:{i}") for i in ids), 1)


def test_live_worker_gives_back_a_job_cut_short_by_redis(r, settings):
    """A Redis error while finishing leaves the entry in our own list; the worker gives it back."""
    job_id = new_job(r)
    entry = jobstore.take(r, "alive", 1)
    jobstore.transition(r, settings, job_id, "running", {"worker": "alive"})
    jobstore.heartbeat(r, "alive", 30)  # alive: the sweep would never touch it
    assert jobstore.requeue_abandoned(r, settings)["requeued"] == 0
    assert jobstore.requeue_processing(r, settings, "alive") == (1, [])
    assert r.lrange(config.QUEUE_KEY, 0, -1) == [entry]
    assert r.hget(f"job:{job_id}", "status") == "queued"


def test_phase_is_recorded_only_while_running_and_gone_when_finished(r, settings):
    job_id = new_job(r)
    jobstore.set_phase(r, job_id, "downloading", now=1000.0)
    assert r.hget(jobstore.job_key(job_id), "phase") is None  # queued: nothing changes
    jobstore.transition(r, settings, job_id, "running", {"worker": "w1"})
    jobstore.set_phase(r, job_id, "downloading", now=1000.0)
    jobstore.set_progress(r, job_id, 40)
    jobstore.set_phase(r, job_id, "downloading", now=1005.0)  # the same phase again keeps its start
    record = jobstore.get_job(r, job_id)
    assert (record["phase"], float(record["phase_since"]), record["progress"]) == ("downloading", 1000.0, "40")
    jobstore.set_phase(r, job_id, "rendering", now=1010.0)  # a percentage belongs to its phase
    record = jobstore.get_job(r, job_id)
    assert (record["phase"], float(record["phase_since"]), record.get("progress")) == ("rendering", 1010.0, None)
    with pytest.raises(ValueError, match="unknown phase"):
        jobstore.set_phase(r, job_id, "thinking")
    jobstore.transition(r, settings, job_id, "success", {"text": "hi"})
    before = jobstore.get_job(r, job_id)
    assert "phase" not in before and "phase_since" not in before
    jobstore.set_phase(r, job_id, "storing")  # finished jobs never change
    assert jobstore.get_job(r, job_id) == before
