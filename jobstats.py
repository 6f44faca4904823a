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


def midnight() -> float:
    """Unix time of today's start (UTC)."""
    return datetime.now(tz=UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


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
    pipe.zcount(config.FINISHED_RECENT_KEY, midnight(), "+inf")
    depth, totals, *rest = pipe.execute()
    durations = dict(zip(jobspec.JOB_TYPES, rest[:len(jobspec.JOB_TYPES)], strict=True))
    node_seconds, node_seconds_day, webhooks, running, finished_hour, finished_today = rest[len(jobspec.JOB_TYPES):]
    jobs_total: dict[tuple[str, str], int] = {}
    for label, count in totals.items():
        job_type, _, status = label.partition("|")
        jobs_total[(job_type, status)] = int(count)
    return {
        "queue_depth": int(depth),
        "running": int(running),
        "finished_last_hour": int(finished_hour),
        "finished_today": int(finished_today),
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


def pool(r: redis.Redis) -> list[dict[str, Any]]:
    """The pool's nodes as /overview shows them: id, type, state, node, workload, launched_at, idle_since,
    solo, and the jobs on them (job, service, worker, since)."""
    found = []
    for record in nodestore.pool_nodes(r):
        node = {k: record[k] for k in ("id", "type", "state", "node", "workload") if record.get(k)}
        for name in ("launched_at", "idle_since", "ready_at"):
            if record.get(name):
                node[name] = float(record[name])
        node["solo"] = record.get("solo") == "1"
        node["jobs"] = [{"job": job, "service": lease.get("service"), "worker": lease.get("worker"),
                         "since": lease.get("since")} for job, lease in sorted(record["leases"].items())]
        found.append(node)
    return found


def workers(r: redis.Redis, nodes: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every registered worker (or lease holder): last heartbeat, the pool nodes it runs jobs on and the
    job it has taken."""
    nodes = pool(r) if nodes is None else nodes
    holders = {job["worker"] for node in nodes for job in node["jobs"] if job.get("worker")}
    ids = sorted(set(r.smembers(config.WORKERS_KEY)) | holders)
    pipe = r.pipeline(transaction=False)
    for worker in ids:
        pipe.get(jobstore.heartbeat_key(worker))
        pipe.lrange(jobstore.processing_key(worker), 0, -1)
    answers = iter(pipe.execute())
    now = time.time()
    found = []
    for worker in ids:
        beat, taken = next(answers), next(answers)
        held = [{k: node[k] for k in ("id", "type", "state", "node", "workload", "launched_at") if k in node}
                for node in nodes if any(job.get("worker") == worker for job in node["jobs"])]
        found.append({
            "id": worker,
            "alive": beat is not None,
            "heartbeat_age_s": round(now - float(beat), 1) if beat else None,
            "nodes": held,
            "jobs": [json.loads(entry)["id"] for entry in taken],
        })
    return found


def nodes_running(nodes: list[dict[str, Any]]) -> int:
    """Pool nodes launched and not yet stopped (launching, booting, ready, stopping): the ones paid for."""
    return sum(1 for node in nodes if node.get("workload"))


def live_node_seconds(nodes: list[dict[str, Any]], since: float = 0.0) -> float:
    """Node-seconds that the pool's nodes have run since `since` (unix time)."""
    now = time.time()
    return sum(max(0.0, now - max(float(node["launched_at"]), since)) for node in nodes
               if node.get("workload") and node.get("launched_at"))


def node_seconds_today(stats: dict[str, Any], nodes: list[dict[str, Any]]) -> float:
    """Node-seconds of nodes stopped today plus the part of today that live nodes have run so far."""
    return round(stats["node_seconds_stopped_today"] + live_node_seconds(nodes, midnight()), 1)


def node_seconds_total(stats: dict[str, Any], nodes: list[dict[str, Any]]) -> float:
    """Node-seconds of every node stopped so far plus what live nodes have run (so total >= today)."""
    return round(stats["node_seconds_total"] + live_node_seconds(nodes), 1)


def node_time(r: redis.Redis) -> dict[str, float]:
    """Node-seconds by kind: booting, busy (jobs ran), idle, unattributed (idle time of nodes that ran no job)."""
    found = {kind: 0.0 for kind in ("booting", "busy", "idle", "unattributed")}
    found.update({k: float(v) for k, v in r.hgetall(config.NODE_TIME_KEY).items()})
    return found


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
