"""The recovery sweep, run every SWEEP_INTERVAL_S by every worker: nothing a dead worker held is lost.

`sweep_dead_workers` does one pass: stop again the workloads whose stop failed earlier; then (once Redis
has been up a full HEARTBEAT_TTL) the cleanup (`cleanup`: in-flight webhooks of vanished workers back to
the outbox; at most every CLEANUP_INTERVAL_S, expired local results and leftover work dirs), the jobs of
workers whose heartbeat expired back to the queue (jobstore.requeue_abandoned), their leases of pool
nodes ended (the nodes stay in the pool), and the nodes of launches whose answer or record was lost
(launch windows, launches.py) or that no pool node holds stopped. Every step is safe to run from
several workers at once: claims in Redis let one sweeper act.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

import comput3
import config
import jobstore
import launches
import localfiles
import nodes
import nodestore
import redis_conn
import storage
import webhooks
from comput3 import C3Error

log = logging.getLogger("c3-render.worker")

SWEEP_CLAIM_S = 120  # a sweeper's claim on a workload it stops; another sweeper takes over after it
CLEANUP_INTERVAL_S = 300.0
_next_cleanup = [0.0]  # per process: when the directory walks run next


def sweep_dead_workers(settings: config.Settings, r: redis.Redis, me: str = "") -> dict[str, Any]:
    """Recovery: requeue the jobs of workers whose heartbeat expired, end their leases, and stop the nodes
    of launches whose answer or record was lost."""
    retry_failed_stops(settings, r)
    if redis_conn.primary_age_s(r) < settings.heartbeat_ttl_s:
        # Redis has just come back, or a replica has just been promoted (a failover): every heartbeat may
        # have expired meanwhile. Wait until live workers have had a full TTL to announce themselves
        # before calling anyone dead.
        return {"workers": [], "requeued": 0, "failed": []}
    cleanup(settings, r)
    summary = jobstore.requeue_abandoned(r, settings, me)
    summary["leases_released"] = release_dead_workers_leases(settings, r)
    summary["stopped_unrecorded"] = resolve_launch_intents(settings, r) + stop_unowned_workloads(settings, r)
    if summary["requeued"] or summary["failed"]:
        log.info("recovery sweep: %d job(s) requeued, %d failed after MAX_ATTEMPTS, dead workers %s",
                 summary["requeued"], len(summary["failed"]), ", ".join(summary["workers"]))
    return summary


def retry_failed_stops(settings: config.Settings, r: redis.Redis) -> int:
    """Stop again the workloads whose stop call failed earlier; return how many are still pending."""
    pending = nodestore.nodes_to_stop(r)
    for workload in pending:
        try:
            comput3.stop_workload(settings, workload)
        except C3Error as exc:
            log.warning("stopping workload %s failed again: %s", workload, exc)
            continue
        nodestore.forget_to_stop(r, workload)
        log.info("stopped workload %s on retry", workload)
    return nodestore.to_stop_count(r)


# --- the pool nodes and leases of dead workers ---------------------------------------------------

def release_dead_workers_leases(settings: config.Settings, r: redis.Redis) -> int:
    """The pool after dead workers: their jobs' leases end (the jobs went back to the queue) and a node
    left with no job is stopped (its service may still work on the dead worker's request: CSM and WhisperX
    go on when their client is gone, and nothing tells when they end); a node other jobs hold stays,
    health-checked before its next job. The launches dead workers reserved and never made are given up
    (their launch windows show what they created), and a stop they claimed and did not finish is done again
    after SWEEP_CLAIM_S. Returns how many leases were released."""
    now = time.time()
    released = 0
    for record in nodestore.pool_nodes(r):
        node_id = record["id"]
        dead = [job for job, lease in record["leases"].items() if not alive(r, lease.get("worker", ""))]
        for job_id in dead:
            nodestore.release_lease(r, node_id, job_id, now)
            nodestore.mark_checked(r, node_id, 0.0)  # the job may have died with its node: check first
            released += 1
        if dead and len(dead) == len(record["leases"]) and record.get("state") in ("booting", "ready") \
                and nodestore.claim_stop(r, node_id, "sweep", now, record["state"]):
            finish_stop(settings, r, record, "its job's worker died")
        if record.get("state") == "launching" and not alive(r, record.get("launcher", "")):
            nodestore.forget_node(r, node_id, now)
            log.info("gave up pool node %s: its launching worker %s died", node_id, record.get("launcher"))
        elif record.get("state") == "stopping" and not alive(r, record.get("stopper", "")) \
                and now - float(record.get("stop_claimed_at") or 0) > SWEEP_CLAIM_S:
            finish_stop(settings, r, record, f"its stopping worker {record.get('stopper')} died")
    return released


def alive(r: redis.Redis, worker: str) -> bool:
    return bool(worker) and bool(r.exists(jobstore.heartbeat_key(worker)))


def finish_stop(settings: config.Settings, r: redis.Redis, record: dict[str, Any], why: str) -> None:
    """Stop a pool node whose stop a dead worker claimed, and forget it (a failed stop is remembered)."""
    workload = record.get("workload", "")
    seconds = time.time() - float(record.get("launched_at") or time.time())
    if workload and nodes.stop_or_remember(settings, r, workload, record.get("node", ""), why):
        log.info("stopped node %s (workload %s): %s", record.get("node"), workload, why)
    nodestore.forget_node(r, record["id"], time.time())
    if workload:
        nodestore.record_node_stop(r, workload, "sweep", seconds, why)


def stop_unheld(settings: config.Settings, r: redis.Redis, workload: dict[str, Any], why: str) -> None:
    """Stop a workload of ours that nobody holds (claimed in the registry first by the caller); a stop
    that fails is remembered for the next sweep."""
    seconds = time.time() - float(workload.get("created") or time.time())
    if nodes.stop_or_remember(settings, r, workload["workload"], str(workload.get("node") or ""), why):
        log.info("stopped node %s (workload %s): %s", workload.get("node"), workload["workload"], why)
    nodestore.forget_owned(r, workload["workload"])
    nodestore.record_node_stop(r, workload["workload"], "sweep", seconds, why)


def resolve_launch_intents(settings: config.Settings, r: redis.Redis, now: float | None = None) -> int:
    """Stop the nodes created by the launches of dead workers and by orphaned launches (answer lost,
    nothing adopted); return how many were stopped. A workload that a live launch may yet own is left
    for a later sweep; an intent is dropped once its window has closed."""
    now = time.time() if now is None else now

    def split(intents: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        alive = {worker: bool(r.exists(jobstore.heartbeat_key(worker)))
                 for worker in {i["worker"] for i in intents.values()}}
        settled = {k: i for k, i in intents.items() if i.get("orphan") or not alive[i["worker"]]}
        return settled, [i for k, i in intents.items() if k not in settled]

    if not split(nodestore.launch_intents(r))[0]:
        return 0
    try:
        running = comput3.get_running_workloads(settings)
    except C3Error as exc:
        log.warning("recovery sweep: could not list workloads to resolve launch windows (%s)", exc)
        return 0
    # Read the intents again after the list: a launch begun before the list is then seen as live.
    settled, live = split(nodestore.launch_intents(r))
    stopped = 0
    for intent_id, intent in settled.items():
        for workload in launches.launch_candidates(settings, intent, running, nodestore.owned_nodes(r)):
            if any(launches.in_launch_window(settings, other, workload) for other in live):
                continue  # a live launch may still record it as its own
            if nodestore.claim_workload(r, workload["workload"], {"worker": "sweep", "type": intent["type"],
                                                                 "node": workload.get("node"),
                                                                 "since": time.time()}):
                stop_unheld(settings, r, workload, f"launched by {intent['worker']} in a launch window "
                                                   "that never recorded its node")
                stopped += 1
        if now > launches.launch_window_end(settings, intent):
            nodestore.close_launch(r, intent_id)
    return stopped


def stop_unowned_workloads(settings: config.Settings, r: redis.Redis) -> int:
    """Stop every workload in the registry of our nodes that no pool node has (its record went; a
    sweeper's claim is taken over after SWEEP_CLAIM_S)."""
    stopped = 0
    in_pool = set(r.smembers(config.POOL_NODES_KEY))
    for workload, owner in nodestore.owned_nodes(r).items():
        if owner.get("worker") == "sweep":  # being stopped by a sweeper; taken over if that sweeper died
            if time.time() - float(owner.get("since") or 0) < SWEEP_CLAIM_S:
                continue
        elif owner.get("id") in in_pool:
            continue
        if nodestore.claim_workload_stop(r, workload, SWEEP_CLAIM_S):  # one sweeper at a time
            stop_unheld(settings, r, {"workload": workload, "node": owner.get("node"),
                                      "created": owner.get("launched_at")}, "no pool node holds it")
            stopped += 1
    return stopped


# --- cleanup: webhooks of vanished workers, expired results, leftover work dirs ------------------

def job_is_active(r: redis.Redis, name: str) -> bool:
    """True for a queued or running job's id, and for any name that is not a job id (not ours)."""
    if not jobstore.is_job_id(name):
        return True
    return r.hget(jobstore.job_key(name), "status") in ("queued", "running")


def cleanup(settings: config.Settings, r: redis.Redis, now: float | None = None) -> dict[str, int]:
    """Give the in-flight webhooks of vanished workers back (every sweep) and keep the disk from filling
    up (at most every CLEANUP_INTERVAL_S per process, as these walk directories). Returns what it did:
    {"webhooks_returned", "results_deleted", "work_dirs_removed"}."""
    done = {"webhooks_returned": webhooks.recover_inflight(r), "results_deleted": 0, "work_dirs_removed": 0}
    now = time.time() if now is None else now
    if now >= _next_cleanup[0]:
        _next_cleanup[0] = now + CLEANUP_INTERVAL_S
        done["results_deleted"] = localfiles.cleanup_results(settings, now)
        done["work_dirs_removed"] = storage.cleanup_work_dirs(settings, lambda name: job_is_active(r, name), now)
    return done
