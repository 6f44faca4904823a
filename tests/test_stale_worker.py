"""A worker that lost its job changes nothing, against a real redis-server: after the recovery sweep took
the worker for dead and gave the job back to the queue, its claim, final status, put back, progress and
phase are refused, and the job runs once more, on the next taker."""

from __future__ import annotations

import json

import c3_render_worker as worker
import config
import jobspec
import jobstore


def new_job(r, **extra) -> str:
    job_id, created = jobstore.submit(r, "csm", jobspec.validate("csm", {"text": "Hi.", **extra}))
    assert created
    return job_id


def taken_for_dead(r, settings, worker_id: str) -> None:
    """The sweep's requeue of a registered worker whose heartbeat expired (it never had one here)."""
    r.sadd(config.WORKERS_KEY, worker_id)
    assert jobstore.requeue_abandoned(r, settings)["workers"] == [worker_id]


def test_a_worker_the_sweep_took_for_dead_cannot_end_its_job(r, settings):
    job_id = new_job(r, notify_url="http://127.0.0.1:9/hook")
    old = worker.WorkerState(settings=settings, r=r, worker_id="old")
    entry = jobstore.take(r, "old", 1)
    job = worker.claim(old, entry)
    assert job is not None and job.attempt == 1
    taken_for_dead(r, settings, "old")
    assert jobstore.get_job(r, job_id)["status"] == "queued"
    # the old worker carries on: its progress, phase, final status and put back all change nothing
    worker.job_progress(old, job)(50)
    worker.job_phase(old, job)("rendering")
    worker.settle(old, job, worker.Outcome("failed", {"error": "max_time of 1200 s exceeded"}))
    assert not jobstore.put_back(r, "old", job_id, entry, job.attempt)
    record = jobstore.get_job(r, job_id)
    assert record["status"] == "queued" and record["attempts"] == "1"
    assert not {"error", "progress", "phase", "finished_at", "worker"} & set(record)
    assert r.lrange(config.QUEUE_KEY, 0, -1) == [entry]  # one entry, where the sweep put it
    assert jobstore.queue_position(r, record) == 1
    assert r.llen(config.WEBHOOK_OUTBOX_KEY) == 0  # no final webhook for a job that did not end
    assert [h["status"] for h in jobstore.job_history(r, job_id)] == ["queued", "running", "queued"]
    # the next taker runs it; the old worker still changes nothing
    new = worker.WorkerState(settings=settings, r=r, worker_id="new")
    again = worker.claim(new, jobstore.take(r, "new", 1))
    assert again is not None and again.attempt == 2
    worker.job_progress(old, job)(90)
    worker.settle(old, job, worker.Outcome("failed", {"error": "max_time of 1200 s exceeded"}))
    assert not jobstore.put_back(r, "old", job_id, entry, job.attempt)
    record = jobstore.get_job(r, job_id)
    assert (record["status"], record["worker"], record.get("progress")) == ("running", "new", None)
    worker.job_progress(new, again)(40)
    assert jobstore.get_job(r, job_id)["progress"] == "40"
    worker.settle(new, again, worker.Outcome("success", {"text": "hello"}))
    record = jobstore.get_job(r, job_id)
    assert (record["status"], record["text"], record.get("error")) == ("success", "hello", None)
    assert r.llen(jobstore.processing_key("new")) == 0 and r.llen(config.QUEUE_KEY) == 0
    assert [json.loads(e)["job_id"] for e in r.lrange(config.WEBHOOK_OUTBOX_KEY, 0, -1)] == [job_id]


def test_an_earlier_attempt_of_the_same_worker_changes_nothing(r, settings):
    """The attempt tells two runs of one worker apart: the sweep gave the job back and the same worker
    took it again; what the first run still says is refused."""
    job_id = new_job(r)
    first, _status = jobstore.claim(r, settings, "w1", jobstore.take(r, "w1", 1))
    taken_for_dead(r, settings, "w1")
    second, _status = jobstore.claim(r, settings, "w1", jobstore.take(r, "w1", 1))
    assert (first, second) == (1, 2)
    jobstore.set_progress(r, job_id, 70, worker_id="w1", attempt=first)
    jobstore.set_phase(r, job_id, "storing", worker_id="w1", attempt=first)
    assert jobstore.transition(r, settings, job_id, "failed", {"error": "late"}, worker_id="w1",
                               attempt=first) == (False, "running")
    assert not {"progress", "phase", "error"} & set(jobstore.get_job(r, job_id))
    jobstore.set_phase(r, job_id, "rendering", worker_id="w1", attempt=second)
    assert jobstore.get_job(r, job_id)["phase"] == "rendering"
    assert jobstore.transition(r, settings, job_id, "success", {"text": "ok"}, worker_id="w1",
                               attempt=second) == (True, "success")


def test_a_claim_after_the_sweep_gave_the_entry_back_is_left_to_the_next_taker(r, settings):
    """Taken, not yet started, when the sweep took the worker for dead: the entry is back in the queue,
    so the worker may not start the job (it would run with its entry in the queue: taken and dropped by
    the next worker, the job lost if this one died)."""
    job_id = new_job(r)
    old = worker.WorkerState(settings=settings, r=r, worker_id="old")
    entry = jobstore.take(r, "old", 1)
    taken_for_dead(r, settings, "old")
    assert worker.claim(old, entry) is None
    record = jobstore.get_job(r, job_id)
    assert record["status"] == "queued" and record["attempts"] == "0"
    assert r.lrange(config.QUEUE_KEY, 0, -1) == [entry] and r.llen(jobstore.processing_key("old")) == 0
    new = worker.WorkerState(settings=settings, r=r, worker_id="new")
    job = worker.claim(new, jobstore.take(r, "new", 1))
    assert job is not None and job.attempt == 1 and jobstore.get_job(r, job_id)["worker"] == "new"


def test_a_requeue_leaves_a_job_another_worker_runs(r, settings):
    """An entry left in one worker's list for a job another worker runs now is dropped, not requeued:
    the job would run twice (or, out of attempts, fail under the worker running it)."""
    job_id = new_job(r)
    entry = jobstore.take(r, "w2", 1)
    assert jobstore.claim(r, settings, "w2", entry) == (1, "running")
    r.lpush(jobstore.processing_key("w1"), entry)  # a stale copy
    assert jobstore.requeue_processing(r, settings, "w1") == (0, [])
    record = jobstore.get_job(r, job_id)
    assert (record["status"], record["worker"]) == ("running", "w2")
    assert r.llen(config.QUEUE_KEY) == 0 and r.llen(jobstore.processing_key("w1")) == 0
    assert r.lrange(jobstore.processing_key("w2"), 0, -1) == [entry]


def test_the_api_and_the_sweep_still_change_jobs_without_a_worker(r, settings):
    running, queued = new_job(r), new_job(r)
    assert jobstore.cancel(r, settings, queued) == "cancelled"
    assert jobstore.claim(r, settings, "w1", jobstore.take(r, "w1", 1)) == (1, "running")
    assert jobstore.transition(r, settings, running, "failed", {"error": "MAX_ATTEMPTS"}) == (True, "failed")
    assert [jobstore.get_job(r, j)["status"] for j in (running, queued)] == ["failed", "cancelled"]
