"""The GPU node bookkeeping in Redis, shared by all workers (key names come from config.py):

- the MAX_NODES cap: `nodes:slots` (NODE_SLOTS_KEY), a set of "<worker>|<type>" members, one per node a
  worker holds or launches; RESERVED is the type of a slot taken before the worker knew which node its
  job needs.
- node records: `node:<worker>:<type>` (NODE_KEY), a hash per node a worker holds (state, workload, node,
  launched_at).
- leak-proof launches: the launch intents `nodes:launching` (LAUNCH_INTENTS_KEY), one launch window each,
  and the registry of the nodes this service launched, `nodes:owned` (NODES_OWNED_KEY). The provider lets
  no client label a workload (docs/node-protocols.md, Comput3 control API): our nodes are known by the ids
  stored there and, for a launch whose answer never arrived, by its recorded window (who launched which
  type when, and which workloads were running before).
- the to-stop list `nodes:to_stop` (NODES_TO_STOP_KEY): workloads whose stop call failed, retried by the
  sweep.
- sweep claims: `sweep:<worker>` (SWEEP_WORKER_KEY) and `sweep:workload:<workload>` (SWEEP_WORKLOAD_KEY),
  so that one sweeper at a time handles a dead worker's nodes or stops an unheld workload.
- the node-stop statistics: node-seconds in total and per UTC day, and a log line per stop.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

import config
import redis_lua

RESERVED = "*"  # the slot type of a worker that reserved a slot before it knew which node its job needs
DEAD_NODES_CLAIM_S = 120  # how long one sweeper holds a dead worker's nodes before another may try


# --- the MAX_NODES slots ------------------------------------------------------------------------

def acquire_node_slot(r: redis.Redis, worker_id: str, max_nodes: int, node_type: str = RESERVED,
                      convert_from: str = "") -> bool:
    """Take one of the MAX_NODES slots for this worker's node of node_type (atomic); True if it holds one.

    convert_from names another slot type of the same worker (its reservation, or a node it has just
    stopped) that is turned into this one when no slot is free, so the slot never goes back to the pool.
    """
    convert = slot_member(worker_id, convert_from) if convert_from else ""
    return bool(redis_lua.run(r, "acquire_slot", (config.NODE_SLOTS_KEY,), slot_member(worker_id, node_type),
                              max_nodes, convert))


def slot_types(r: redis.Redis, worker_id: str) -> list[str]:
    """The slot types a worker holds (node types, or RESERVED)."""
    members = (split_slot_member(m) for m in r.smembers(config.NODE_SLOTS_KEY))
    return sorted(node_type for worker, node_type in members if worker == worker_id)


def slot_holders(r: redis.Redis) -> set[str]:
    """The workers that hold at least one slot."""
    return {split_slot_member(m)[0] for m in r.smembers(config.NODE_SLOTS_KEY)}


def slot_member(worker_id: str, node_type: str) -> str:
    return f"{worker_id}|{node_type}" if node_type else worker_id


def split_slot_member(member: str) -> tuple[str, str]:
    """(worker, node type); a member without a type (written by an older worker) is (worker, '')."""
    worker, sep, node_type = member.rpartition("|")
    return (worker, node_type) if sep else (member, "")


# --- node records ---------------------------------------------------------------------------------

def node_key(worker_id: str, node_type: str) -> str:
    return config.NODE_KEY.format(worker=worker_id, type=node_type)


def record_node(r: redis.Redis, worker_id: str, node_type: str, node: dict[str, Any]) -> None:
    r.hset(node_key(worker_id, node_type), mapping={k: str(v) for k, v in node.items()})


def get_node(r: redis.Redis, worker_id: str, node_type: str) -> dict[str, str] | None:
    return r.hgetall(node_key(worker_id, node_type)) or None


def release_node(r: redis.Redis, worker_id: str, node_type: str | None = None, keep_slot: bool = False,
                 workload: str = "") -> None:
    """The worker's node of node_type (None: every one) is stopped or never launched: forget its record,
    its entry in the registry of our nodes (workload), and free its slot unless keep_slot."""
    types = slot_types(r, worker_id) if node_type is None else [node_type]
    pipe = r.pipeline(transaction=True)
    for kind in types:
        pipe.delete(node_key(worker_id, kind))
        if not keep_slot:
            pipe.srem(config.NODE_SLOTS_KEY, slot_member(worker_id, kind))
    if workload:
        pipe.hdel(config.NODES_OWNED_KEY, workload)
    pipe.execute()


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


def own_node(r: redis.Redis, worker_id: str, node_type: str, workload: str, node: str, launched_at: float,
             intent_id: str = "") -> bool:
    """Make a launched (or adopted) workload this worker's node: registry entry, node record and the
    end of the launch intent, in one step. False when someone else claimed that workload first."""
    owned = json.dumps({"worker": worker_id, "type": node_type, "node": node, "launched_at": launched_at})
    record = {"state": "booting", "workload": workload, "node": node, "launched_at": repr(launched_at),
              "worker": worker_id, "type": node_type}
    argv: list[Any] = [workload, owned, intent_id]
    for key, value in record.items():
        argv += [key, value]
    return bool(redis_lua.run(r, "own_node", (config.NODES_OWNED_KEY, node_key(worker_id, node_type),
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

def claim_dead_nodes(r: redis.Redis, worker_id: str) -> list[tuple[str, dict[str, str]]] | None:
    """For the recovery sweep: (type, node record) of each slot of a dead worker, claimed by one
    sweeper at a time (None when the worker is alive or another sweeper has it)."""
    if r.exists(config.HEARTBEAT_KEY.format(worker=worker_id)):  # (jobstore imports this module, not back)
        return None
    if not r.set(config.SWEEP_WORKER_KEY.format(worker=worker_id), "1", nx=True, ex=DEAD_NODES_CLAIM_S):
        return None
    return [(kind, get_node(r, worker_id, kind) or {}) for kind in slot_types(r, worker_id)]


def unclaim_dead_nodes(r: redis.Redis, worker_id: str) -> None:
    """Give up a claim_dead_nodes claim, so that the next sweep tries again."""
    r.delete(config.SWEEP_WORKER_KEY.format(worker=worker_id))


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
