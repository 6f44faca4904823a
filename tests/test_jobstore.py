"""The queue protocol against a real redis-server: take, ack, heartbeats, requeue of dead workers."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, wait_for

import config
import jobspec
import jobstore
import nodestore
import storage
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
    assert jobstore.transition(r, settings, job_id, "running", {"worker": "w1"}) == (True, "running")
    assert jobstore.transition(r, settings, job_id, "failed", {"error": "x"}, worker_id="w2") == \
        (False, "running")  # only the worker holding it may finish it
    assert jobstore.transition(r, settings, job_id, "failed", {"error": "x"}, worker_id="w1") == \
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
    jobstore.transition(r, settings, job_id, "running", {"worker": "w1"})
    assert jobstore.put_back(r, "w1", job_id, entry)
    assert r.hget(f"job:{job_id}", "status") == "queued"
    assert r.hget(f"job:{job_id}", "attempts") == "0"
    assert r.lrange(config.QUEUE_KEY, 0, -1) == [entry]
    assert r.llen(jobstore.processing_key("w1")) == 0


def test_node_slots_are_capped(r):
    assert nodestore.acquire_node_slot(r, "a", 2)
    assert nodestore.acquire_node_slot(r, "a", 2)  # already held
    assert nodestore.acquire_node_slot(r, "b", 2)
    assert not nodestore.acquire_node_slot(r, "c", 2)
    nodestore.release_node(r, "a")
    assert nodestore.acquire_node_slot(r, "c", 2)


def test_dead_worker_node_claimed_once(r):
    nodestore.acquire_node_slot(r, "gone", 4, "media:fast")
    nodestore.record_node(r, "gone", "media:fast", {"workload": "wl1", "node": "n1"})
    nodestore.acquire_node_slot(r, "gone", 4, "ollama_webui:fast")
    assert jobstore.dead_workers(r) == ["gone"]
    claimed = dict(nodestore.claim_dead_nodes(r, "gone"))
    assert claimed["media:fast"]["workload"] == "wl1" and claimed["ollama_webui:fast"] == {}
    assert nodestore.claim_dead_nodes(r, "gone") is None  # another sweeper is on it


def test_one_slot_per_node_type_and_conversion_keeps_the_slot(r):
    assert nodestore.acquire_node_slot(r, "a", 2, "media:fast")
    assert nodestore.acquire_node_slot(r, "a", 2, "ollama_webui:fast")  # a second node of the same worker
    assert not nodestore.acquire_node_slot(r, "b", 2)  # both slots are a's
    assert nodestore.slot_types(r, "a") == ["media:fast", "ollama_webui:fast"]
    # the slot of a's media node becomes the slot of its next node without ever being free
    nodestore.release_node(r, "a", "ollama_webui:fast")
    assert nodestore.acquire_node_slot(r, "b", 2, "media:fast")
    assert not nodestore.acquire_node_slot(r, "a", 2, "ollama_webui:fast")
    assert nodestore.acquire_node_slot(r, "a", 2, "ollama_webui:fast", convert_from="media:fast")
    assert nodestore.slot_types(r, "a") == ["ollama_webui:fast"]


def test_a_launched_workload_is_owned_once(r):
    intent = nodestore.begin_launch(r, "a", "media:fast", ["old"], 100.0)
    assert nodestore.launch_intents(r)[intent] == {"worker": "a", "type": "media:fast", "before": ["old"],
                                                  "started_at": 100.0}
    assert nodestore.own_node(r, "a", "media:fast", "wl1", "n1", 101.0, intent)
    assert not nodestore.launch_intents(r)  # the intent ends with the record, in one step
    assert nodestore.get_node(r, "a", "media:fast")["workload"] == "wl1"
    assert not nodestore.own_node(r, "b", "media:fast", "wl1", "n1", 101.0)  # claimed already
    assert nodestore.get_node(r, "b", "media:fast") is None
    assert set(nodestore.owned_nodes(r)) == {"wl1"}


def test_file_url_secret_made_once(r):
    first = storage.file_url_secret(r, "")
    assert len(first) == 64 and storage.file_url_secret(r, "") == first
    assert storage.file_url_secret(r, "configured") == b"configured"


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
