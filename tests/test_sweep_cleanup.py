"""The cleanup the recovery sweep runs (sweep.cleanup), through the worker's sweep, with a real
redis-server and real directories."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import config
import jobspec
import jobstore
import sweep
import webhook_state


def job(r, settings, status: str) -> str:
    params = jobspec.validate("whisper", {"audio_url": "https://example.com/a.mp3"})
    job_id, _ = jobstore.submit(r, "whisper", params)
    if status != "queued":
        jobstore.transition(r, settings, job_id, "running", {"worker": "w"})
    if status not in ("queued", "running"):
        jobstore.transition(r, settings, job_id, status, {"error": "x"} if status != "success" else {"text": "t"})
    return job_id


def aged(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_sweep_cleans_expired_results_and_leftover_work_dirs(r, settings, monkeypatch):
    settings = dataclasses.replace(settings, heartbeat_ttl_s=0, result_ttl_s=3600)
    monkeypatch.setattr(sweep, "_next_cleanup", [0.0])
    work, out = Path(settings.work_dir), Path(settings.output_dir)
    out.mkdir(parents=True)
    names = {"finished": job(r, settings, "success"), "failed": job(r, settings, "failed"),
             "running": job(r, settings, "running"), "queued": job(r, settings, "queued"),
             "expired": "3b0d7a52-9d7e-4c1a-8f0e-2f7e1c3d4b5a", "not-a-job": "cache"}
    for job_id in names.values():
        (work / job_id).mkdir(parents=True)
        (work / job_id / "input.wav").write_bytes(b"x" * 1000)
        aged(work / job_id, 3600)
    (out / "old.mp3").write_bytes(b"x")
    aged(out / "old.mp3", 3700)
    (out / "new.mp3").write_bytes(b"x")

    sweep.sweep_dead_workers(settings, r)

    left = sorted(p.name for p in work.iterdir())
    assert left == sorted([names["running"], names["queued"], "cache"])
    assert sorted(p.name for p in out.iterdir()) == ["new.mp3"]


def test_directory_walks_run_at_most_every_cleanup_interval(r, settings, monkeypatch):
    monkeypatch.setattr(sweep, "_next_cleanup", [0.0])
    now = time.time()
    assert sweep.cleanup(settings, r, now)["results_deleted"] == 0
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "old.mp3").write_bytes(b"x")
    aged(out / "old.mp3", settings.result_ttl_s + 10)
    assert sweep.cleanup(settings, r, now + 1)["results_deleted"] == 0  # not yet: walked a second ago
    assert sweep.cleanup(settings, r, now + sweep.CLEANUP_INTERVAL_S + 1)["results_deleted"] == 1


def test_sweep_returns_inflight_webhooks_of_vanished_senders(r, settings):
    r.lpush(webhook_state.webhook_inflight_key("gone"), '{"job_id": "j", "url": "http://127.0.0.1:9/", "body": "{}"}')
    r.sadd(config.WEBHOOK_SENDERS_KEY, "gone")
    assert sweep.cleanup(settings, r)["webhooks_returned"] == 1
    assert r.llen(config.WEBHOOK_OUTBOX_KEY) == 1 and not r.sismember(config.WEBHOOK_SENDERS_KEY, "gone")
