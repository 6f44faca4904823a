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
    threads = webhooks.start_delivery_threads(settings, "wtest", stop, count=2)
    try:
        wait_for(stop_after, 20, what="webhook deliveries")
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)


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
    real = jobstore.settle_webhook
    failures = [1]

    def flaky(*args, **kwargs):
        if failures:
            failures.pop()
            raise redis_lib.ConnectionError("Redis went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(jobstore, "settle_webhook", flaky)
    run_deliveries(settings, lambda: r.hget(f"job:{job_id}", "webhook_status") == "delivered")
    assert len(receiver.calls) == 1
    assert r.llen(config.WEBHOOK_INFLIGHT_KEY.format(worker="wtest")) == 0
