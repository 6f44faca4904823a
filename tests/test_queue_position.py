"""Queue positions and cancels without scanning the queue, against a real redis-server.

Random sequences of submit / take / start / finish / cancel / put back / give back / requeue of a
dead worker's jobs / requeue of a worker the sweep takes for dead while it carries on, over several
workers, compare `jobstore.queue_position` after every step with the truth read from the list itself (the
job's place among the entries of jobs still queued); a worker that lost its job changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import random

import hypothesis.strategies as st
import pytest
import redis
from hypothesis import HealthCheck, given, settings

import config
import jobspec
import jobstore

WORKERS = ("w1", "w2", "w3")
OPS = ("submit", "submit", "submit", "take", "start", "finish", "cancel", "put_back", "give_back", "crash",
       "lose")


def new_job(r) -> str:
    job_id, created = jobstore.submit(r, "csm", jobspec.validate("csm", {"text": "Hi."}))
    assert created
    return job_id


def true_positions(r) -> dict[str, int]:
    """Every queued job's place in the list, counted from the right end over queued jobs only."""
    entries = r.lrange(config.QUEUE_KEY, 0, -1)
    statuses = [r.hget(jobstore.job_key(json.loads(e)["id"]), "status") for e in entries]
    positions: dict[str, int] = {}
    for entry, status in zip(reversed(entries), reversed(statuses), strict=True):
        if status == "queued":
            positions[json.loads(entry)["id"]] = len(positions) + 1
    return positions


def check_positions(r, jobs: list[str]) -> None:
    """Both ways of reading a position (queue_position, and the record read with its position that
    /status uses) agree with the list itself; the latter adds nothing to a job that is not queued."""
    truth = true_positions(r)
    for job_id in jobs:
        record = jobstore.get_job(r, job_id)
        with_position = jobstore.get_job_with_position(r, job_id)
        if record["status"] != "queued":
            assert with_position == record
            continue
        assert jobstore.queue_position(r, record) == truth.get(job_id), (job_id, truth)
        assert with_position.pop("queue_position") == str(truth.get(job_id, "")), (job_id, truth)
        assert with_position == record


@dataclasses.dataclass
class Workers:
    """What the model's workers hold: the entry each took, the attempt each started, and which of them
    the sweep took for dead while they still work (their entry given back: every later change refused)."""

    held: dict[str, str] = dataclasses.field(default_factory=dict)
    started: dict[str, int] = dataclasses.field(default_factory=dict)
    lost: set[str] = dataclasses.field(default_factory=set)

    def drop(self, worker: str) -> str:
        self.started.pop(worker, None)
        self.lost.discard(worker)
        return self.held.pop(worker)


def step(r, cfg, op: str, worker: str, pick: int, jobs: list[str], workers: Workers) -> None:
    """One action of the protocol, done the way the API and the worker do it."""
    held, started, lost = workers.held, workers.started, workers.lost
    if op == "submit":
        jobs.append(new_job(r))
    elif op == "take" and worker not in held:
        entry = r.lmove(config.QUEUE_KEY, jobstore.processing_key(worker), "RIGHT", "LEFT")  # BLMOVE, no wait
        if entry:
            held[worker] = entry
    elif op == "start" and worker in held and worker not in started:
        attempt, _status = jobstore.claim(r, cfg, worker, held[worker])
        if worker in lost:
            assert not attempt  # its entry is back in the queue: the next taker runs the job
        if attempt:
            started[worker] = attempt
        else:  # cancelled while held, or given back by the sweep: the worker drops the entry
            jobstore.ack(r, worker, workers.drop(worker))
    elif op == "finish" and worker in started:
        job_id = json.loads(held[worker])["id"]
        status, fields = ("success", {"text": "ok"}) if pick % 2 else ("failed", {"error": "it broke"})
        changed, _status = jobstore.transition(r, cfg, job_id, status, fields, worker_id=worker,
                                               attempt=started[worker])
        assert changed == (worker not in lost)
        jobstore.ack(r, worker, workers.drop(worker))
    elif op == "cancel" and jobs:
        jobstore.cancel(r, cfg, jobs[pick % len(jobs)])
    elif op == "put_back" and worker in started:
        job_id = json.loads(held[worker])["id"]
        assert jobstore.put_back(r, worker, job_id, held[worker], started[worker]) == (worker not in lost)
        workers.drop(worker)
    elif op == "give_back" and worker in held and worker not in started:  # taken, not started
        jobstore.return_entry(r, worker, workers.drop(worker))
    elif op == "crash" and worker in held:  # the worker died: the sweep gives its entries back
        workers.drop(worker)
        jobstore.requeue_processing(r, cfg, worker)
    elif op == "lose" and worker in held and worker not in lost:
        # the sweep takes the worker for dead while it still works: its entry goes back, it carries on
        jobstore.requeue_processing(r, cfg, worker)
        lost.add(worker)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.lists(st.tuples(st.sampled_from(OPS), st.sampled_from(WORKERS), st.integers(0, 1000)),
                min_size=1, max_size=80))
def test_queue_position_is_exact_under_random_protocol_sequences(redis_url, settings, actions):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushall()
    cfg = dataclasses.replace(settings, max_attempts=1000)
    jobs: list[str] = []
    workers = Workers()
    for op, worker, pick in actions:
        step(r, cfg, op, worker, pick, jobs, workers)
        check_positions(r, jobs)
    # drain: every queued job still runs exactly once, tombstones are dropped, nothing is lost
    for worker in list(workers.held):
        step(r, cfg, "crash", worker, 0, jobs, workers)
    ran = []
    while (entry := r.lmove(config.QUEUE_KEY, jobstore.processing_key("w1"), "RIGHT", "LEFT")) is not None:
        job_id = json.loads(entry)["id"]
        attempt, _status = jobstore.claim(r, cfg, "w1", entry)
        if attempt:
            ran.append(job_id)
            jobstore.transition(r, cfg, job_id, "success", {"text": "ok"}, worker_id="w1", attempt=attempt)
        jobstore.ack(r, "w1", entry)
        check_positions(r, jobs)
    assert len(ran) == len(set(ran))
    left = {j: r.hgetall(jobstore.job_key(j)) for j in jobs}
    assert all(rec["status"] in jobspec.FINISHED_STATUSES for rec in left.values()), (left, actions)
    # slot notes left behind are all beyond the (empty) queue's right end: stale, never counted
    right = -int(r.get(config.QUEUE_PUSHES_KEY) or 0) - 1
    assert r.zcount(config.QUEUE_CANCELLED_KEY, "-inf", right) == 0
    assert r.zcount(config.QUEUE_REQUEUED_KEY, "-inf", right) == 0


def test_long_seeded_sequence_with_deep_queue(r, settings):
    """A longer run (a few thousand steps, a queue hundreds deep) than Hypothesis' examples reach."""
    rng = random.Random(9)
    cfg = dataclasses.replace(settings, max_attempts=1000)
    jobs: list[str] = []
    workers = Workers()
    ops = OPS + ("submit",) * 3
    for index in range(3000):
        step(r, cfg, rng.choice(ops), rng.choice(WORKERS), rng.randrange(1000), jobs, workers)
        if index % 50 == 0:
            check_positions(r, jobs)
    check_positions(r, jobs)
    assert r.llen(config.QUEUE_KEY) > 200



def test_an_entry_the_sweep_gave_back_already_is_not_given_back_again(r, settings):
    """A worker took an entry and gives it back (told to stop) after the sweep took it for dead and gave
    that entry back already: one entry per job stays in the queue, positions count right, and a drain
    takes each job once."""
    first, second, third = new_job(r), new_job(r), new_job(r)
    entry = jobstore.take(r, "w1", 1)
    assert json.loads(entry)["id"] == first
    r.sadd(config.WORKERS_KEY, "w1")  # registered, and its heartbeat expired
    assert jobstore.requeue_abandoned(r, settings)["requeued"] == 1
    jobstore.return_entry(r, "w1", entry)
    assert r.llen(config.QUEUE_KEY) == 3 and r.llen(jobstore.processing_key("w1")) == 0
    assert [jobstore.queue_position(r, jobstore.get_job(r, j)) for j in (first, second, third)] == [1, 2, 3]
    check_positions(r, [first, second, third])
    taken = []
    while (entry := r.lmove(config.QUEUE_KEY, jobstore.processing_key("w2"), "RIGHT", "LEFT")) is not None:
        job_id = json.loads(entry)["id"]
        taken.append(job_id)
        attempt, _status = jobstore.claim(r, settings, "w2", entry)
        assert attempt
        assert jobstore.transition(r, settings, job_id, "success", {"text": "ok"}, worker_id="w2", attempt=attempt)[0]
        jobstore.ack(r, "w2", entry)
    assert taken == [first, second, third]


def list_scans(r) -> dict[str, int]:
    """Calls of commands that walk the queue list (O(N)) since the last CONFIG RESETSTAT."""
    stats = r.info("commandstats")
    return {name: stats[f"cmdstat_{name}"]["calls"] for name in ("lpos", "lrem", "lrange", "lindex")
            if f"cmdstat_{name}" in stats}


@pytest.fixture
def client(settings):
    import app as api

    return api.create_app(settings).test_client()


def test_status_and_cancel_of_a_queued_job_do_not_scan_the_queue(client, r):
    ids = [new_job(r) for _ in range(50)]
    r.config_resetstat()
    assert client.get(f"/status/{ids[0]}").get_json()["queue_position"] == 1
    assert client.get(f"/status/{ids[-1]}").get_json()["queue_position"] == 50
    assert client.post(f"/cancel/{ids[10]}").get_json()["status"] == "cancelled"
    assert client.get(f"/status/{ids[-1]}").get_json()["queue_position"] == 49
    assert list_scans(r) == {}


def test_status_of_a_queued_job_is_one_round_trip(client, r):
    ids = [new_job(r) for _ in range(5)]
    r.config_resetstat()
    answer = client.get(f"/status/{ids[1]}").get_json()
    assert answer["status"] == "queued" and answer["queue_position"] == 2
    stats = r.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert "cmdstat_hgetall" in stats  # inside the script: one call from the API, record and position
    assert jobstore.get_job_with_position(r, "0b0e4a6e-3f4c-4d8e-9a51-6f1f2b7d9c11") is None


def test_submit_is_one_round_trip(client, r):
    new_job(r)
    r.config_resetstat()
    assert client.post("/csm", json={"text": "Hi."}).status_code == 200
    stats = r.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert "cmdstat_multi" not in stats and "cmdstat_watch" not in stats


def test_jobs_queued_before_queue_slots_keep_working(r, settings):
    """A record written by the previous version (no queue_slot) is found the old way and cancels."""
    legacy = "0b0e4a6e-3f4c-4d8e-9a51-6f1f2b7d9c10"
    entry = jobstore.queue_entry(legacy, "csm")
    r.hset(jobstore.job_key(legacy), mapping={"id": legacy, "type": "csm", "status": "queued", "params": "{}",
                                              "attempts": "0", "queue_entry": entry})
    r.lpush(config.QUEUE_KEY, entry)
    newer = new_job(r)
    assert jobstore.queue_position(r, jobstore.get_job(r, legacy)) == 1
    assert jobstore.queue_position(r, jobstore.get_job(r, newer)) == 2
    assert jobstore.get_job_with_position(r, legacy)["queue_position"] == "1"
    assert jobstore.cancel(r, settings, legacy) == "cancelled"
    taken = jobstore.take(r, "w1", 1)
    assert json.loads(taken)["id"] == legacy  # the worker drops it: it cannot start a cancelled job
    assert jobstore.transition(r, settings, legacy, "running", {"worker": "w1"}) == (False, "cancelled")
    jobstore.ack(r, "w1", taken)
    assert jobstore.queue_position(r, jobstore.get_job(r, newer)) == 1
