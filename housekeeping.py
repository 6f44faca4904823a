"""The cleanup part of the worker's recovery sweep, run every SWEEP_INTERVAL_S by every worker.

Gives the in-flight webhook deliveries of vanished workers back to the outbox (every sweep), and
keeps the disk from filling up (at most every CLEANUP_INTERVAL_S per process, as these walk
directories): expired local result files and the work directories killed workers left behind.
"""

from __future__ import annotations

import logging
import time

import redis

import config
import jobstore
import storage
import webhooks

log = logging.getLogger("c3-render.housekeeping")

CLEANUP_INTERVAL_S = 300.0
_next_cleanup = [0.0]  # per process: when the directory walks run next


def job_is_active(r: redis.Redis, name: str) -> bool:
    """True for a queued or running job's id, and for any name that is not a job id (not ours)."""
    if not jobstore.is_job_id(name):
        return True
    return r.hget(jobstore.job_key(name), "status") in ("queued", "running")


def sweep(settings: config.Settings, r: redis.Redis, now: float | None = None) -> dict[str, int]:
    """One pass; returns what it did: {"webhooks_returned", "results_deleted", "work_dirs_removed"}."""
    done = {"webhooks_returned": webhooks.recover_inflight(r), "results_deleted": 0, "work_dirs_removed": 0}
    now = time.time() if now is None else now
    if now >= _next_cleanup[0]:
        _next_cleanup[0] = now + CLEANUP_INTERVAL_S
        done["results_deleted"] = storage.cleanup_results(settings, now)
        done["work_dirs_removed"] = storage.cleanup_work_dirs(settings, lambda name: job_is_active(r, name), now)
    return done
