"""The GPU node bookkeeping in Redis, shared by all workers (key names come from config.py):

- the node pool: nodes belong to the service, not to a worker. `pool:nodes` (POOL_NODES_KEY) holds the
  ids of the pool's nodes; its size is what MAX_NODES caps. Each node is a hash `pool:node:<id>`
  (POOL_NODE_KEY: type, state launching | booting | ready | stopping, workload, node, launched_at,
  expires, the services seen ready, solo after an out-of-memory error, its time accounts) and its jobs
  a hash `pool:leases:<id>` (POOL_LEASES_KEY: job id -> worker, service, since, share). The scripts
  lua/pool_*.lua change them: a job leases a free slot (pool_lease), a launch reserves a place first
  (pool_reserve), a stop is claimed by one worker (pool_claim_stop) before the node is forgotten
  (pool_forget). Every second of a node's life is shared among the jobs that lease it, or kept pending
  (boot, idle) for the next job to lease it, or the last job it ran (lua/lib/node_time.lua): a job's
  `node_seconds` is its share, and the shares add up to the node's bill.
- the measured estimates of the pool policy: `pool:stats` (POOL_STATS_KEY: boot:<type>,
  service:<service>, idle_since:<type>) and the idle gaps `pool:gaps:<type>` (POOL_GAPS_KEY).
- leak-proof launches: the launch intents `nodes:launching` (LAUNCH_INTENTS_KEY), one launch window each,
  and the registry of the nodes this service launched, `nodes:owned` (NODES_OWNED_KEY). The provider lets
  no client label a workload (docs/node-protocols.md, Comput3 control API): our nodes are known by the ids
  stored there and, for a launch whose answer never arrived, by its recorded window (who launched which
  type when, and which workloads were running before).
- the to-stop list `nodes:to_stop` (NODES_TO_STOP_KEY): workloads whose stop call failed, retried by the
  sweep; the sweep's claim on stopping a workload nobody holds, `sweep:workload:<workload>`
  (SWEEP_WORKLOAD_KEY); the maintainer's turn `pool:maintainer` (POOL_MAINTAINER_KEY).
- the node statistics: node-seconds in total and per UTC day (launch to stop), a log line per stop, and
  node time by kind (booting, busy, idle, unattributed) in `stats:node_time` (NODE_TIME_KEY).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

import config
import pool_policy
import redis_lua


def node_key(node_id: str) -> str:
    return config.POOL_NODE_KEY.format(id=node_id)


def leases_key(node_id: str) -> str:
    return config.POOL_LEASES_KEY.format(id=node_id)


def new_node_id() -> str:
    return uuid.uuid4().hex[:12]


def lease_json(worker_id: str, service: str, since: float) -> str:
    return json.dumps({"worker": worker_id, "service": service, "since": since})


# --- the pool ---------------------------------------------------------------------------------------

def reserve_node(r: redis.Redis, node_id: str, node_type: str, worker_id: str, max_nodes: int, now: float,
                 job_id: str = "", service: str = "") -> bool:
    """Take a place in the pool for a node of node_type about to be launched (with a lease for job_id on
    it, which ends the type's idle gap); False when MAX_NODES nodes are in the pool."""
    return bool(redis_lua.run(r, "pool_reserve", (config.POOL_NODES_KEY, node_key(node_id), leases_key(node_id),
                                                  config.POOL_STATS_KEY, config.POOL_GAPS_KEY.format(type=node_type)),
                              node_id, node_type, worker_id, repr(now), max_nodes, job_id,
                              lease_json(worker_id, service, now), pool_policy.MAX_GAPS))


def lease_slot(r: redis.Redis, node_id: str, node_type: str, job_id: str, worker_id: str, service: str,
               slots: int, total: int, now: float, min_expires: float | None = None) -> str:
    """Lease a slot of a pool node for a job: 'ok', or why not ('gone', 'stopping', 'full', 'short')."""
    return str(redis_lua.run(
        r, "pool_lease", (node_key(node_id), leases_key(node_id), config.POOL_STATS_KEY,
                          config.POOL_GAPS_KEY.format(type=node_type)),
        job_id, lease_json(worker_id, service, now), service, slots, total, repr(now),
        "" if min_expires is None else repr(min_expires), pool_policy.MAX_GAPS))  # idle gaps kept per node type


def release_lease(r: redis.Redis, node_id: str, job_id: str, now: float,
                  job_seconds: float | None = None, confirm: bool = False) -> float | None:
    """End a job's lease: its share of the node's time (node-seconds) goes to its record; None when it held
    no lease on that node. With confirm, the replicas must have it (REDIS_MIN_REPLICA_ACKS, else
    redis_conn.NotReplicated): a release lost in a failover would keep the slot taken by a job that ended,
    for as long as its worker lives."""
    share = float(redis_lua.run(r, "pool_release", (node_key(node_id), leases_key(node_id),
                                                     config.JOB_KEY.format(id=job_id), config.POOL_NODES_KEY,
                                                     config.POOL_STATS_KEY),
                                job_id, repr(now), "" if job_seconds is None else repr(job_seconds),
                                confirm=confirm))
    return None if share < 0 else share


def mark_booting(r: redis.Redis, node_id: str, fields: dict[str, Any]) -> None:
    r.hset(node_key(node_id), mapping={k: str(v) for k, v in fields.items()})


def mark_ready(r: redis.Redis, node_id: str, now: float) -> float | None:
    """A booting node answers: ready (its boot time noted for the estimate). The boot seconds, or None
    when it was not booting (another worker saw it first)."""
    boot = redis_lua.run(r, "pool_ready", (node_key(node_id), leases_key(node_id), config.POOL_STATS_KEY), repr(now))
    return float(boot) if boot else None


def mark_checked(r: redis.Redis, node_id: str, now: float) -> None:
    """The node passed a health check (workloads list and root) at `now` (NODE_CHECK_TTL counts from it)."""
    r.hset(node_key(node_id), "checked_at", repr(now))


def mark_service_ready(r: redis.Redis, node_id: str, service: str) -> None:
    r.hset(node_key(node_id), f"ready:{service}", "1")


def make_solo(r: redis.Redis, node_id: str) -> None:
    """From now on the node runs one job at a time (an engine ran out of memory while it shared it)."""
    r.hset(node_key(node_id), "solo", "1")


def claim_stop(r: redis.Redis, node_id: str, worker_id: str, now: float, state: str = "", idle_since: str = "",
               force: bool = False) -> bool:
    """Make this worker the one that stops the node (no job may lease it after); False when a job leases
    it (unless force), another worker stops it, or it changed since it was seen (state, idle_since)."""
    return bool(redis_lua.run(r, "pool_claim_stop", (node_key(node_id), leases_key(node_id)), worker_id,
                              repr(now), state, idle_since, "force" if force else ""))


def forget_node(r: redis.Redis, node_id: str, now: float) -> dict[str, str]:
    """A node was stopped (or never launched): settle its time accounts and remove it from the pool.
    Returns its workload, node, type and launched_at ({} when it was not in the pool)."""
    values = redis_lua.run(r, "pool_forget", (node_key(node_id), leases_key(node_id), config.POOL_NODES_KEY,
                                              config.NODES_OWNED_KEY), node_id, repr(now))
    return dict(zip(("workload", "node", "type", "launched_at"), values, strict=True)) if values else {}


def pool_nodes(r: redis.Redis) -> list[dict[str, Any]]:
    """Every pool node's record, with its leases under "leases" (job id -> lease), in two round trips."""
    ids = sorted(r.smembers(config.POOL_NODES_KEY))
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for node_id in ids:
        pipe.hgetall(node_key(node_id))
        pipe.hgetall(leases_key(node_id))
    answers = pipe.execute()
    found = []
    for node_id, record, leases in zip(ids, answers[::2], answers[1::2], strict=True):
        if record:
            found.append({**record, "id": node_id, "leases": {job: json.loads(raw) for job, raw in leases.items()}})
    return found


def get_pool_node(r: redis.Redis, node_id: str) -> dict[str, str] | None:
    return r.hgetall(node_key(node_id)) or None


def pool_stats(r: redis.Redis, node_types: list[str]) -> tuple[dict[str, str], dict[str, list[float]]]:
    """The estimates hash and each node type's recent idle gaps (one round trip)."""
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(config.POOL_STATS_KEY)
    for node_type in node_types:
        pipe.lrange(config.POOL_GAPS_KEY.format(type=node_type), 0, -1)
    stats, *gaps = pipe.execute()
    return stats, {t: [float(g) for g in found] for t, found in zip(node_types, gaps, strict=True)}


def take_maintainer_turn(r: redis.Redis, worker_id: str, ttl_s: float) -> bool:
    """Whether this worker looks after the idle nodes now (one worker at a time, for ttl_s)."""
    key = config.POOL_MAINTAINER_KEY
    if r.set(key, worker_id, nx=True, px=int(ttl_s * 1000)):
        return True
    return r.get(key) == worker_id


def lease_holders(r: redis.Redis) -> set[str]:
    """The workers that hold a lease or launch a node (the sweep looks at their heartbeats too)."""
    holders = set()
    for node in pool_nodes(r):
        holders |= {lease.get("worker", "") for lease in node["leases"].values()}
        if node.get("state") in ("launching", "stopping"):
            holders.add(node.get("launcher" if node["state"] == "launching" else "stopper", ""))
    return holders - {""}


# --- launch windows and the registry of the nodes this service launched ---------------------------

def begin_launch(r: redis.Redis, worker_id: str, node_type: str, before: list[str], now: float) -> str:
    """Record a launch intent before calling the provider's launch; return its id."""
    intent_id = uuid.uuid4().hex
    r.hset(config.LAUNCH_INTENTS_KEY, intent_id, json.dumps(
        {"worker": worker_id, "type": node_type, "before": sorted(before), "started_at": now}))
    return intent_id


def orphan_launch(r: redis.Redis, intent_id: str, ended_at: float) -> None:
    """The launcher could not tell what its launch created: leave the window to the sweep."""
    raw = r.hget(config.LAUNCH_INTENTS_KEY, intent_id)
    if raw:
        intent = json.loads(raw)
        intent.update(orphan=True, ended_at=ended_at)
        r.hset(config.LAUNCH_INTENTS_KEY, intent_id, json.dumps(intent))


def close_launch(r: redis.Redis, intent_id: str) -> None:
    r.hdel(config.LAUNCH_INTENTS_KEY, intent_id)


def launch_intents(r: redis.Redis) -> dict[str, dict[str, Any]]:
    return {k: json.loads(v) for k, v in r.hgetall(config.LAUNCH_INTENTS_KEY).items()}


def own_node(r: redis.Redis, node_id: str, worker_id: str, node_type: str, workload: str, node: str,
             launched_at: float, expires: float, intent_id: str = "") -> bool:
    """Make a launched (or adopted) workload the workload of pool node node_id (booting from now): registry
    entry, node record and the end of the launch intent, in one step. False when someone else claimed
    that workload first, or the pool node is gone."""
    owned = json.dumps({"id": node_id, "worker": worker_id, "type": node_type, "node": node,
                        "launched_at": launched_at})
    # its time is counted from the launch: what came before (listing workloads) is not billed
    record = {"state": "booting", "workload": workload, "node": node, "launched_at": repr(launched_at),
              "acct_at": repr(launched_at), "expires": repr(expires)}
    argv: list[Any] = [workload, owned, intent_id]
    for key, value in record.items():
        argv += [key, value]
    return bool(redis_lua.run(r, "own_node", (config.NODES_OWNED_KEY, node_key(node_id),
                                              config.LAUNCH_INTENTS_KEY), *argv))


def claim_workload(r: redis.Redis, workload: str, owner: dict[str, Any]) -> bool:
    """Claim a workload in the registry (the sweep, before stopping one nobody holds)."""
    return bool(r.hsetnx(config.NODES_OWNED_KEY, workload, json.dumps(owner)))


def owned_nodes(r: redis.Redis) -> dict[str, dict[str, Any]]:
    return {k: json.loads(v) for k, v in r.hgetall(config.NODES_OWNED_KEY).items()}


def forget_owned(r: redis.Redis, workload: str) -> None:
    r.hdel(config.NODES_OWNED_KEY, workload)


# --- the to-stop list: workloads whose stop call failed --------------------------------------------

def remember_to_stop(r: redis.Redis, workload: str, node: str) -> None:
    """A stop call failed: the sweep tries again (retry_failed_stops)."""
    r.hset(config.NODES_TO_STOP_KEY, workload, node)


def nodes_to_stop(r: redis.Redis) -> dict[str, str]:
    """workload -> node of every workload whose stop is still to be retried."""
    return r.hgetall(config.NODES_TO_STOP_KEY)


def forget_to_stop(r: redis.Redis, workload: str) -> None:
    r.hdel(config.NODES_TO_STOP_KEY, workload)


def to_stop_count(r: redis.Redis) -> int:
    return r.hlen(config.NODES_TO_STOP_KEY)


# --- the recovery sweep's claims ---------------------------------------------------------------------

def claim_workload_stop(r: redis.Redis, workload: str, ttl_s: int) -> bool:
    """Claim stopping an unheld workload for ttl_s seconds; False when another sweeper has it."""
    return bool(r.set(config.SWEEP_WORKLOAD_KEY.format(workload=workload), "1", nx=True, ex=ttl_s))


# --- node-stop statistics ------------------------------------------------------------------------------

def record_node_stop(r: redis.Redis, workload: str, worker_id: str, seconds: float, reason: str) -> None:
    """Count a stopped node's seconds (in total and for today, UTC) and log the stop. Best effort: a
    Redis error only loses the figures, never the stop."""
    try:
        pipe = r.pipeline(transaction=True)
        pipe.incrbyfloat(config.NODE_SECONDS_KEY, round(seconds, 3))
        day_key = config.NODE_SECONDS_DAY_KEY.format(day=time.strftime("%Y-%m-%d", time.gmtime()))
        pipe.incrbyfloat(day_key, round(seconds, 3))
        pipe.expire(day_key, 8 * 86400)
        pipe.rpush(config.NODE_LOG_KEY, json.dumps({"workload": workload, "worker": worker_id,
                                                    "seconds": round(seconds, 3), "reason": reason}))
        pipe.ltrim(config.NODE_LOG_KEY, -10000, -1)
        pipe.execute()
    except redis.RedisError:
        pass
