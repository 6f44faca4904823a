"""Webhook delivery against a real HTTP receiver and a real redis-server."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import threading
import time

import pytest
from conftest import free_port, wait_for
from system import start_receiver

import config
import jobspec
import jobstore
import sweep
import webhook_state
import webhooks


@pytest.fixture
def receiver():
    receiver = start_receiver()
    yield receiver
    receiver.close()


def finished_job(r, settings, url, status="success", fields=None):
    params = jobspec.validate("whisper", {"audio_url": "https://example.com/a.mp3", "notify_url": url})
    job_id, _ = jobstore.submit(r, "whisper", params)
    jobstore.transition(r, settings, job_id, "running", {"worker": "w"})
    jobstore.transition(r, settings, job_id, status, fields or {"text": "hello"})
    return job_id


def run_deliveries(settings, stop_after):
    stop = threading.Event()
    senders = webhooks.start_delivery(settings, "wtest", stop)
    try:
        wait_for(stop_after, 20, what="webhook deliveries")
    finally:
        stop.set()
        senders.taker.join(5)
        senders.executor.shutdown(wait=True)


def test_one_delivery_when_it_works_signed(r, settings, receiver):
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    settings = dataclasses.replace(settings, webhook_secret=secret)
    job_id = finished_job(r, settings, receiver.url)
    run_deliveries(settings, lambda: r.hget(f"job:{job_id}", "webhook_status") == "delivered")
    time.sleep(0.5)
    assert len(receiver.calls) == 1
    call = receiver.calls[0]
    assert json.loads(call["body"]) == {"id": job_id, "status": "success", "text": "hello"}
    headers = {k.lower(): v for k, v in call["headers"].items()}
    assert headers["webhook-id"] == job_id
    # verify exactly as the Standard Webhooks scheme says, independently of webhooks.sign
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{call['body']}".encode()
    expected = base64.b64encode(hmac.new(b"0123456789abcdef0123456789abcdef", signed,
                                         hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert webhooks.verify(secret, call["headers"], call["body"])
    assert not webhooks.verify(secret, call["headers"], call["body"] + " ")
    record = r.hgetall(f"job:{job_id}")
    assert record["webhook_attempts"] == "1" and record["webhook_status"] == "delivered"


def test_five_attempts_at_the_interval_then_failed(r, settings, receiver):
    receiver.answers[:] = [500]
    job_id = finished_job(r, settings, receiver.url, "failed", {"error": "CSM failed: boom"})
    run_deliveries(settings, lambda: r.hget(f"job:{job_id}", "webhook_status") == "failed")
    assert len(receiver.calls) == settings.webhook_attempts == 5
    gaps = [b["at"] - a["at"] for a, b in zip(receiver.calls, receiver.calls[1:], strict=False)]
    assert all(gap >= settings.webhook_interval_s * 0.9 for gap in gaps), gaps
    assert all(call["headers"]["webhook-id"] == job_id for call in receiver.calls)
    assert json.loads(receiver.calls[0]["body"]) == {"id": job_id, "status": "failed",
                                                     "error": "CSM failed: boom"}
    record = r.hgetall(f"job:{job_id}")
    assert record["webhook_attempts"] == "5"
    assert "HTTP 500" in record["webhook_error"]
    assert "webhook-signature" not in receiver.calls[0]["headers"]  # no secret configured


def test_recovers_after_failures(r, settings, receiver):
    receiver.answers[:] = [503, 502, 204]
    job_id = finished_job(r, settings, receiver.url)
    run_deliveries(settings, lambda: r.hget(f"job:{job_id}", "webhook_status") == "delivered")
    assert len(receiver.calls) == 3


def test_dead_receiver_does_not_hold_other_deliveries(r, settings, receiver):
    dead = f"http://127.0.0.1:{free_port()}/nobody"
    settings = dataclasses.replace(settings, webhook_interval_s=5.0)
    slow = finished_job(r, settings, dead)
    fast = finished_job(r, settings, receiver.url)
    started = time.time()
    run_deliveries(settings, lambda: r.hget(f"job:{fast}", "webhook_status") == "delivered")
    assert time.time() - started < 4
    assert r.hget(f"job:{slow}", "webhook_status") == "retrying"
    assert "connect" in r.hget(f"job:{slow}", "webhook_error").lower()


def test_refused_destination_is_reported(r, settings, receiver):
    settings = dataclasses.replace(settings, url_allowlist=(), webhook_attempts=1)
    job_id = finished_job(r, settings, receiver.url)
    run_deliveries(settings, lambda: r.hget(f"job:{job_id}", "webhook_status") == "failed")
    assert receiver.calls == []
    assert "notify_url" in r.hget(f"job:{job_id}", "webhook_error")


def test_inflight_entries_of_dead_worker_go_back(r, settings):
    finished_job(r, settings, "http://127.0.0.1:9/x")
    entry = r.lmove(config.WEBHOOK_OUTBOX_KEY, config.WEBHOOK_INFLIGHT_KEY.format(worker="gone"), "RIGHT", "LEFT")
    r.sadd(config.WORKERS_KEY, "gone")
    jobstore.requeue_abandoned(r, settings)
    assert r.lrange(config.WEBHOOK_OUTBOX_KEY, 0, -1) == [entry]


def test_outcome_recorded_after_a_redis_error(r, settings, receiver, monkeypatch):
    """Redis fails right after a delivery: the outcome is settled later, and nothing is sent twice."""
    import redis as redis_lib

    job_id = finished_job(r, settings, receiver.url)
    real = webhook_state.settle_webhook
    failures = [1]

    def flaky(*args, **kwargs):
        if failures:
            failures.pop()
            raise redis_lib.ConnectionError("Redis went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(webhook_state, "settle_webhook", flaky)
    run_deliveries(settings, lambda: r.hget(f"job:{job_id}", "webhook_status") == "delivered")
    assert len(receiver.calls) == 1
    assert r.llen(config.WEBHOOK_INFLIGHT_KEY.format(worker="wtest")) == 0


# --- issue 12: one receiver cannot hold up the others; nothing lost for good --------------------------

def test_dripping_and_hanging_receivers_do_not_starve_a_healthy_one(r, settings, receiver):
    """Four hostile receiver hosts with 10 finished jobs each (two drip header bytes, two hang, for 60 s):
    a healthy receiver's webhook still arrives at once. The old code's two threads sat on the first
    hostile deliveries (dripping ones forever)."""
    settings = dataclasses.replace(settings, webhook_timeout_s=5.0, webhook_schedule=(30.0,))
    hostile = [start_receiver(mode=mode, host=f"127.0.0.{n}", hold_s=60)
               for n, mode in ((2, "drip"), (3, "drip"), (4, "hang"), (5, "hang"))]
    stop = threading.Event()
    webhooks.start_delivery(settings, "wtest", stop)
    try:
        for _ in range(10):
            for bad in hostile:
                finished_job(r, settings, bad.url)
        wait_for(lambda: sum(len(bad.calls) for bad in hostile) >= 4, 10, what="hostile deliveries under way")
        healthy = finished_job(r, settings, receiver.url)
        finished_at = time.time()
        wait_for(lambda: receiver.for_job(healthy), 8, what="the healthy webhook")
        latency = receiver.calls[0]["at"] - finished_at
        assert latency < 2.0, latency
        # a host not yet known to answer quickly gets one attempt at a time
        assert max(len(bad.calls) for bad in hostile) == 1
    finally:
        stop.set()
        for bad in hostile:
            bad.close()


def test_header_dripping_receiver_is_cut_off_at_the_total_deadline(r, settings):
    settings = dataclasses.replace(settings, webhook_timeout_s=1.0, webhook_schedule=(30.0,))
    drip = start_receiver(mode="drip", host="127.0.0.2", hold_s=30)
    try:
        job_id = finished_job(r, settings, drip.url)
        started = time.time()
        run_deliveries(settings, lambda: r.hget(f"job:{job_id}", "webhook_status") == "retrying")
        assert time.time() - started < 4  # one 1 s attempt, not 30 s of dripping
        assert "timed out" in r.hget(f"job:{job_id}", "webhook_error")
    finally:
        drip.close()


def test_due_retries_do_not_jump_ahead_of_new_deliveries(r, settings, receiver):
    """A retry that falls due joins the back of the outbox: deliveries already waiting go first."""
    settings = dataclasses.replace(settings, webhook_interval_s=0.0)
    old = finished_job(r, settings, receiver.url)
    entry = json.loads(r.rpop(config.WEBHOOK_OUTBOX_KEY))
    r.zadd(config.WEBHOOK_RETRY_KEY, {json.dumps({**entry, "attempt": 1}): time.time() - 1})  # due now
    new = finished_job(r, settings, receiver.url)
    for _ in range(2):
        assert webhooks.deliver_next(r, settings, "wtest", wait_s=1)
    assert [json.loads(c["body"])["id"] for c in receiver.calls] == [new, old]


def test_schedule_sets_attempts_and_gaps_and_history_is_kept(r, settings, receiver):
    receiver.answers[:] = [500, 503, 500]
    settings = dataclasses.replace(settings, webhook_schedule=(0.3, 1.2))
    job_id = finished_job(r, settings, receiver.url)
    run_deliveries(settings, lambda: r.hget(f"job:{job_id}", "webhook_status") == "failed")
    assert len(receiver.calls) == 3
    gaps = [b["at"] - a["at"] for a, b in zip(receiver.calls, receiver.calls[1:], strict=False)]
    assert 0.3 * 0.9 <= gaps[0] < 1.0 and gaps[1] >= 1.2 * 0.9, gaps
    history = webhook_state.webhook_history(r.hgetall(f"job:{job_id}"))
    assert [(e["attempt"], e["outcome"]) for e in history] == [(1, "retrying"), (2, "retrying"), (3, "failed")]
    assert "HTTP 503" in history[1]["error"] and history[0]["at"] < history[2]["at"]


def test_history_is_bounded(r, settings, receiver):
    receiver.answers[:] = [500]
    settings = dataclasses.replace(settings, webhook_schedule=(0.0,) * (config.WEBHOOK_HISTORY_MAX + 4))
    job_id = finished_job(r, settings, receiver.url)
    run_deliveries(settings, lambda: r.hget(f"job:{job_id}", "webhook_status") == "failed")
    history = webhook_state.webhook_history(r.hgetall(f"job:{job_id}"))
    assert len(history) == config.WEBHOOK_HISTORY_MAX
    assert history[-1] == {**history[-1], "attempt": config.WEBHOOK_HISTORY_MAX + 5, "outcome": "failed"}


def test_schedule_setting_format(monkeypatch):
    monkeypatch.setenv("WEBHOOK_SCHEDULE", "5, 30,120,600,3600")
    loaded = config.load()
    assert loaded.webhook_schedule == (5, 30, 120, 600, 3600)
    assert webhooks.retry_delays(loaded) == (5, 30, 120, 600, 3600)
    monkeypatch.delenv("WEBHOOK_SCHEDULE")
    monkeypatch.setenv("WEBHOOK_ATTEMPTS", "3")
    monkeypatch.setenv("WEBHOOK_INTERVAL_S", "7")
    assert webhooks.retry_delays(config.load()) == (7, 7)  # the older pair still works
    monkeypatch.setenv("WEBHOOK_SCHEDULE", "5,soon")
    with pytest.raises(SystemExit, match="WEBHOOK_SCHEDULE must be comma-separated seconds"):
        config.load()


def test_stop_gives_inflight_deliveries_back_unchanged(r, settings):
    """Graceful stop while an attempt hangs: the delivery goes back to the outbox as it was (same
    webhook-id, attempt count kept), and the attempt ending later records nothing."""
    hang = start_receiver(mode="hang", host="127.0.0.2", hold_s=3)
    try:
        settings = dataclasses.replace(settings, webhook_timeout_s=5.0)
        job_id = finished_job(r, settings, hang.url)
        raw = r.lindex(config.WEBHOOK_OUTBOX_KEY, 0)
        entry = json.loads(raw)
        r.delete(config.WEBHOOK_OUTBOX_KEY)
        r.lpush(config.WEBHOOK_OUTBOX_KEY, json.dumps({**entry, "attempt": 2}))  # a retry under way
        stop = threading.Event()
        senders = webhooks.start_delivery(settings, "wstop", stop)
        wait_for(lambda: hang.calls, 5, what="the attempt to start")
        returned = webhooks.stop_delivery(r, "wstop", stop, senders, wait_s=1.5)
        assert returned == 1
        wait_for(lambda: r.llen(config.WEBHOOK_OUTBOX_KEY) == 1, 2, what="the delivery back in the outbox")
        assert [json.loads(e) for e in r.lrange(config.WEBHOOK_OUTBOX_KEY, 0, -1)] == [{**entry, "attempt": 2}]
        assert r.llen(webhook_state.webhook_inflight_key("wstop")) == 0
        time.sleep(3.5)  # the hanging attempt ends now; its outcome must not be recorded
        assert r.hget(f"job:{job_id}", "webhook_status") == "pending"
        assert r.zcard(config.WEBHOOK_RETRY_KEY) == 0
    finally:
        hang.close()


def test_abandon_without_redis_counts_only_the_unsettled_deliveries(r, settings):
    """A stop while Redis does not answer hands nothing back; the worker's last line says how many
    deliveries it left in flight for the sweep: one delivered meanwhile is not among them."""
    ok = start_receiver()
    hang = start_receiver(mode="hang", host="127.0.0.2", hold_s=3)
    try:
        delivered = finished_job(r, settings, ok.url)
        stop = threading.Event()
        senders = webhooks.start_delivery(settings, "w-abandon", stop)
        wait_for(lambda: r.hget(f"job:{delivered}", "webhook_status") == "delivered", 5, what="the delivery")
        finished_job(r, settings, hang.url)
        wait_for(lambda: hang.calls, 5, what="the hanging attempt to start")
        assert webhooks.abandon_delivery(stop, senders) == 1
        assert r.llen(webhook_state.webhook_inflight_key("w-abandon")) == 1  # left for the sweep, as said
    finally:
        ok.close()
        hang.close()


def test_sweep_recovers_inflight_of_a_worker_that_vanished_without_deregistering_as_dead(r, settings):
    """A worker that left the workers set (a clean retire) with a delivery in flight: the sweep still
    finds its in-flight list (through the senders set) once its heartbeat is gone."""

    hang = start_receiver(mode="hang", host="127.0.0.2", hold_s=3)
    try:
        finished_job(r, settings, hang.url)
        entry = r.lindex(config.WEBHOOK_OUTBOX_KEY, 0)
        stop = threading.Event()
        webhooks.start_delivery(settings, "w-vanished", stop)
        wait_for(lambda: hang.calls, 5, what="the attempt to start")
        stop.set()  # the process is gone: nobody hands the delivery back
        r.delete(config.WORKERS_KEY)
        settings = dataclasses.replace(settings, heartbeat_ttl_s=0)
        sweep.sweep_dead_workers(settings, r)
        assert r.lrange(config.WEBHOOK_OUTBOX_KEY, 0, -1) == [entry]
        assert r.llen(webhook_state.webhook_inflight_key("w-vanished")) == 0
    finally:
        hang.close()


def test_sweep_leaves_a_live_worker_alone(r, settings):
    r.lpush(webhook_state.webhook_inflight_key("w-live"), '{"job_id": "x", "url": "http://127.0.0.1:9/", "body": "{}"}')
    r.sadd(config.WEBHOOK_SENDERS_KEY, "w-live")
    jobstore.heartbeat(r, "w-live", 30)
    assert webhooks.recover_inflight(r) == 0
    assert r.llen(webhook_state.webhook_inflight_key("w-live")) == 1
