"""Reads of the service's numbers from Redis, for /metrics and the dashboard.

The counters are written atomically where things happen (the job scripts in lua/, nodestore.record_node_stop),
so every API process reads the same numbers whichever process or worker caused them. Nothing here
writes to Redis.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import redis

import config
import jobspec
import jobstore
import nodestore
import redis_conn


def today() -> str:
    return datetime.now(tz=UTC).strftime("%Y-%m-%d")


def counters(r: redis.Redis) -> dict[str, Any]:
    """Queue depth, job counters, duration histograms, node and webhook totals, in one round trip."""
    pipe = r.pipeline(transaction=False)
    # queued jobs from the status index: LLEN of the queue would count cancelled entries (tombstones)
    # that wait there for a worker to drop them
    pipe.zcard(config.JOBS_BY_STATUS_KEY.format(status="queued"))
    pipe.hgetall(config.JOBS_TOTAL_KEY)
    for job_type in jobspec.JOB_TYPES:
        pipe.hgetall(config.JOB_DURATION_KEY.format(type=job_type))
    pipe.get(config.NODE_SECONDS_KEY)
    pipe.get(config.NODE_SECONDS_DAY_KEY.format(day=today()))
    pipe.hgetall(config.WEBHOOK_OUTCOMES_KEY)
    pipe.zcard(config.JOBS_BY_STATUS_KEY.format(status="running"))
    pipe.zcount(config.FINISHED_RECENT_KEY, time.time() - 3600, "+inf")
    depth, totals, *rest = pipe.execute()
    durations = dict(zip(jobspec.JOB_TYPES, rest[:len(jobspec.JOB_TYPES)], strict=True))
    node_seconds, node_seconds_day, webhooks, running, finished_hour = rest[len(jobspec.JOB_TYPES):]
    jobs_total: dict[tuple[str, str], int] = {}
    for label, count in totals.items():
        job_type, _, status = label.partition("|")
        jobs_total[(job_type, status)] = int(count)
    return {
        "queue_depth": int(depth),
        "running": int(running),
        "finished_last_hour": int(finished_hour),
        "jobs_total": jobs_total,
        "durations": {t: {k: float(v) for k, v in d.items()} for t, d in durations.items()},
        "node_seconds_total": float(node_seconds or 0),
        "node_seconds_stopped_today": float(node_seconds_day or 0),
        "webhook_deliveries": {k: int(v) for k, v in webhooks.items()},
    }


def histogram_buckets(duration: dict[str, float]) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs of one type's duration hash, ending with +Inf, for Prometheus."""
    buckets, running = [], 0.0
    for bound in config.DURATION_BUCKETS:
        running += duration.get(str(bound), 0)
        buckets.append((str(float(bound)), running))
    buckets.append(("+Inf", running + duration.get("+Inf", 0)))
    return buckets


def workers(r: redis.Redis) -> list[dict[str, Any]]:
    """Every registered worker (or node holder): last heartbeat, its nodes (one per workload type it
    holds) and the job it has taken."""
    slots = [nodestore.split_slot_member(m) for m in r.smembers(config.NODE_SLOTS_KEY)]
    ids = sorted(set(r.smembers(config.WORKERS_KEY)) | {worker for worker, _ in slots})
    node_types = {worker: sorted(t for w, t in slots if w == worker and t and t != nodestore.RESERVED)
                  for worker in ids}
    pipe = r.pipeline(transaction=False)
    for worker in ids:
        pipe.get(jobstore.heartbeat_key(worker))
        pipe.lrange(jobstore.processing_key(worker), 0, -1)
        for node_type in node_types[worker]:
            pipe.hgetall(nodestore.node_key(worker, node_type))
    answers = iter(pipe.execute())
    now = time.time()
    found = []
    for worker in ids:
        beat, taken = next(answers), next(answers)
        nodes = []
        for node_type in node_types[worker]:
            node = next(answers)
            if node:
                nodes.append({"type": node_type, **{k: node[k] for k in ("state", "node", "workload", "launched_at",
                                                                          "since") if k in node}})
        found.append({
            "id": worker,
            "alive": beat is not None,
            "heartbeat_age_s": round(now - float(beat), 1) if beat else None,
            "nodes": nodes,
            "jobs": [json.loads(entry)["id"] for entry in taken],
        })
    return found


def nodes_running(found_workers: list[dict[str, Any]]) -> int:
    """Nodes launched and not yet stopped (booting or running): the ones being paid for."""
    return sum(1 for w in found_workers for node in w["nodes"] if node.get("state") in ("booting", "running"))


def live_node_seconds(found_workers: list[dict[str, Any]], since: float = 0.0) -> float:
    """Node-seconds that nodes still held by workers have run since `since` (unix time)."""
    now = time.time()
    live = 0.0
    for worker in found_workers:
        for node in worker["nodes"]:
            if node.get("launched_at"):
                live += max(0.0, now - max(float(node["launched_at"]), since))
    return live


def node_seconds_today(stats: dict[str, Any], found_workers: list[dict[str, Any]]) -> float:
    """Node-seconds of nodes stopped today plus the part of today that live nodes have run so far."""
    midnight = datetime.now(tz=UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    return round(stats["node_seconds_stopped_today"] + live_node_seconds(found_workers, midnight), 1)


def node_seconds_total(stats: dict[str, Any], found_workers: list[dict[str, Any]]) -> float:
    """Node-seconds of every node stopped so far plus what live nodes have run (so total >= today)."""
    return round(stats["node_seconds_total"] + live_node_seconds(found_workers), 1)


def redis_replication(r: redis.Redis) -> dict[str, Any]:
    """The Redis this client talks to: its role, its replicas (state, seconds since each last
    acknowledged, bytes it is behind) and how many must confirm a settling step."""
    info = r.info("replication")
    offset = int(info.get("master_repl_offset") or 0)
    replicas = []
    for index in range(int(info.get("connected_slaves") or 0)):
        replica = info.get(f"slave{index}")
        if isinstance(replica, dict):
            replicas.append({"state": str(replica.get("state", "")), "lag_s": int(replica.get("lag") or 0),
                             "behind_bytes": max(0, offset - int(replica.get("offset") or 0))})
    wanted = redis_conn.durability(r)
    return {"role": "primary" if info.get("role") == "master" else str(info.get("role")),
            "sentinel": wanted.sentinel, "replicas": replicas, "min_replica_acks": wanted.replica_acks}
