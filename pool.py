"""The node pool as the workers use it: nodes belong to the service, jobs lease slots of them.

`run_on_node` gets a job a slot (`acquire`: the pool policy's place -> lease a free slot, launch a node,
stop an idle node of another type to make room, or wait) and runs its engine there, retrying on a fresh
node when the node fails (NODE_FAILURE_RETRIES) and giving the job back when an engine runs out of
memory on a node it shares (the node then runs one job at a time). The worker releases the lease when
the job is settled (`release`). `maintain`, one worker at a time, looks after the nodes no job holds:
marks booting nodes ready, stops idle ones past their keep-alive, launches what the policy wants warm.
The decisions are pool_policy's (plain functions, replayed by bench/cost_sim.py); the Redis steps are
nodestore's; the steps on one node are nodes.py's.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import redis

import comput3
import config
import engine_api
import nodes
import nodestore
import pool_policy
from engine_api import EngineError, JobContext, JobStopped, Phase, ShouldStop
from jobspec import JOB_TYPES
from nodes import Lease, NodeFailed, NodeHolder, node_type_for

log = logging.getLogger("c3-render.worker")

WAIT_POLL_S = 0.25  # a job waiting for a slot looks again this often
QUEUE_PEEK = 50  # queue entries looked at to count the jobs of a service waiting behind one
MAINTAINER_TURN_S = 5.0
# What engines and their apps say when the GPU ran out of memory (torch, CUDA, ComfyUI's allocator).
OUT_OF_MEMORY = re.compile(r"out of memory|OutOfMemoryError|CUDA error: out of memory|Allocation on device", re.I)


class SharedNodeOutOfMemory(Exception):
    """An engine ran out of GPU memory on a node other jobs shared: the job runs again (the node now runs
    one job at a time); not the job's failure."""


def policy_config(settings: config.Settings) -> pool_policy.PolicyConfig:
    return pool_policy.PolicyConfig(policy=settings.node_policy, max_nodes=settings.max_nodes,
                                    min_warm=settings.min_warm_nodes, idle_timeout_s=settings.gpu_idle_timeout_s,
                                    node_max_age_s=settings.node_max_age_s, default_type=settings.workload_type)


def views(settings: config.Settings, records: list[dict]) -> list[pool_policy.NodeView]:
    """The pool nodes (but those being stopped) as the policy sees them."""
    slots, total = config.parse_node_slots(settings.node_slots)
    found = []
    for record in records:
        if record.get("state") == "stopping":
            continue
        leases: dict[str, list[float]] = {}
        for lease in record["leases"].values():
            leases.setdefault(lease.get("service", ""), []).append(float(lease.get("since") or 0))
        launched = float(record.get("launched_at") or 0)
        found.append(pool_policy.NodeView(
            id=record["id"], type=record.get("type", ""), state=record.get("state", ""), launched_at=launched,
            expires=float(record.get("expires") or launched + settings.node_max_age_s + settings.node_expires_margin_s),
            slots=slots, total=1 if record.get("solo") == "1" else total,
            leases={service: tuple(starts) for service, starts in leases.items()},
            idle_since=float(record["idle_since"]) if record.get("idle_since") else None))
    return found


def estimates(settings: config.Settings, r, node_types: list[str]) -> pool_policy.Estimates:
    stats, gaps = nodestore.pool_stats(r, node_types)
    boot = {k.split(":", 1)[1]: float(v) for k, v in stats.items() if k.startswith("boot:")}
    service = {k.split(":", 1)[1]: float(v) for k, v in stats.items() if k.startswith("service:")}
    return pool_policy.Estimates(boot_s=boot, service_s=service, gaps=gaps,
                                 default_boot_s=settings.node_boot_estimate_s,
                                 default_service_s=settings.job_time_estimate_s)


def queued_behind(r, job_type: str) -> int:
    """Jobs of this type among the next QUEUE_PEEK queue entries (the backlog the policy weighs)."""
    return sum(1 for entry in r.lrange(config.QUEUE_KEY, -QUEUE_PEEK, -1) if f'"type":"{job_type}"' in entry)


# --- a slot for a job ------------------------------------------------------------------------------

def acquire(state: NodeHolder, job_id: str, job_type: str, should_stop: ShouldStop, phase: Phase,
            min_life_s: float = 0.0, prefer: str = "") -> Lease:
    """A lease of a slot for this job on a node of its type, by the pool policy (see the module docstring);
    the node may still be launching or booting (nodes.wait_booted waits for it)."""
    settings, r = state.settings, state.r
    node_type = node_type_for(settings, job_type)
    slots, total = config.parse_node_slots(settings.node_slots)
    cfg = policy_config(settings)
    waited = ""
    while True:
        now = time.time()
        view = views(settings, nodestore.pool_nodes(r))
        est = estimates(settings, r, [node_type])
        decision = pool_policy.place(view, node_type, job_type, now, est, cfg, min_life_s, prefer,
                                     queued_behind(r, job_type))
        if decision.action == "lease":
            answer = nodestore.lease_slot(r, decision.node, node_type, job_id, state.worker_id, job_type,
                                          slots[job_type], total if not _solo(view, decision.node) else 1, now,
                                          now + min_life_s if min_life_s else None)
            if answer == "ok":
                return Lease(decision.node, node_type, job_id, job_type, now)
            continue  # taken or changed meanwhile: look again
        if decision.action == "launch":
            node_id = nodestore.new_node_id()
            if nodestore.reserve_node(r, node_id, node_type, state.worker_id, settings.max_nodes, now, job_id,
                                      job_type):
                phase("booting_node")
                nodes.launch_pool_node(state, node_id, node_type, min_life_s=min_life_s, should_stop=should_stop)
                return Lease(node_id, node_type, job_id, job_type, now)
            continue
        if decision.action == "make_room":
            nodes.stop_pool_node(state, decision.node, decision.why, state_seen="ready")
            continue
        if decision.why != waited:
            log.info("job %s waits for a node: %s", job_id, decision.why)
            waited = decision.why
        phase("waiting_for_node")
        reason = should_stop()
        if reason:
            raise JobStopped(reason)
        time.sleep(WAIT_POLL_S)


def _solo(view: list[pool_policy.NodeView], node_id: str) -> bool:
    return any(n.id == node_id and n.total == 1 for n in view)


def release(state: NodeHolder, lease: Lease | None, confirm: bool = False) -> None:
    """End the job's lease (its share of the node's time goes to its record); the node stays in the pool.
    With confirm (the worker's release at the job's end), as nodestore.release_lease's."""
    if lease is not None:
        nodestore.release_lease(state.r, lease.node_id, lease.job_id, time.time(), lease.ran_s, confirm=confirm)


def release_stale(state: NodeHolder, current: Lease | None) -> None:
    """After a Redis error cut a job short: release this worker's leases but the current one, and give up
    the launches it reserved and did not finish (their launch windows go to the sweep, which stops what
    they created unless it is ours)."""
    for record in nodestore.pool_nodes(state.r):
        for job_id, lease in record["leases"].items():
            if lease.get("worker") == state.worker_id and (current is None or job_id != current.job_id):
                nodestore.release_lease(state.r, record["id"], job_id, time.time())
        if record.get("state") == "launching" and record.get("launcher") == state.worker_id:
            nodestore.forget_node(state.r, record["id"], time.time())
    for intent_id, intent in nodestore.launch_intents(state.r).items():
        if intent.get("worker") == state.worker_id and not intent.get("orphan"):
            nodestore.orphan_launch(state.r, intent_id, time.time())


def run_on_node(state: NodeHolder, job_id: str, job_type: str, engine: Callable[[JobContext], Path | str],
                context: Callable[..., JobContext], should_stop: ShouldStop, phase: Phase,
                min_life_s: float = 0.0, prefer: str = "") -> Path | str:
    """Lease a slot (state.lease), wait for the node and its service, run the engine there
    (`context(node=urls)` is the job as the engine sees it). The caller releases state.lease once the job
    is settled. A node that fails under the job is stopped and the job tried on a fresh one
    NODE_FAILURE_RETRIES times. prefer: a node id to take first when it has a free slot (a pipeline step's
    parent's node)."""
    tries = 1 + max(0, state.settings.node_failure_retries)
    for attempt in range(1, tries + 1):
        phase("waiting_for_node")
        lease = state.lease = acquire(state, job_id, job_type, should_stop, phase, min_life_s,
                                      prefer if attempt == 1 else "")
        try:
            nodes.wait_booted(state, lease, should_stop)
            nodes.wait_service_ready(state, lease, job_type, should_stop)
            started = time.monotonic()
            output = engine(context(node=lease.urls))
            lease.ran_s = time.monotonic() - started
        except JobStopped:
            raise  # the lease stays: the node may still work on the stopped job (the caller drains it)
        except Exception as exc:  # noqa: BLE001 - any failure (NodeDown included): was it the node?
            give_up_lease(state, lease, job_type, exc, last=attempt == tries)
            log.info("retrying job %s on another node", job_id)
            continue
        try:
            nodestore.mark_checked(state.r, lease.node_id, time.time())  # it just did a job: known good
        except redis.RedisError:
            pass  # only a hint (the node's next job checks it sooner): the job's output is not thrown away
        return output
    raise NodeFailed("the GPU node failed during the job")


def give_up_lease(state: NodeHolder, lease: Lease, job_type: str, exc: Exception, last: bool) -> None:
    """After a failure on a leased node, let the lease go and say what it means for the job: returns when
    the node failed (it was stopped) and the job may try another; raises the job's failure otherwise
    (EngineError; NodeFailed; SharedNodeOutOfMemory: the job runs again, the node one job at a time)."""
    detail = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"  # for the log only
    state.lease = None
    if isinstance(exc, EngineError) and OUT_OF_MEMORY.search(detail) and shared(state, lease):
        nodestore.make_solo(state.r, lease.node_id)
        release(state, lease)
        log.warning("job %s ran out of GPU memory on node %s, shared with other jobs; the node runs one job at "
                    "a time from now and the job runs again", lease.job_id, lease.node)
        raise SharedNodeOutOfMemory(detail) from None
    if isinstance(exc, NodeFailed):  # did not boot, or a service never became ready: not tried again
        nodes.stop_pool_node(state, lease.node_id, str(exc), force=True)
        release(state, lease)
        raise exc
    problem = nodes.node_problem(state, lease, force=True)
    if not problem:
        release(state, lease)
        if isinstance(exc, EngineError):
            raise exc
        log.warning("%s failed on node %s, which is healthy: %s", job_type, lease.node, detail)
        raise EngineError(f"{job_type} failed: {engine_api.failure_text(exc)}") from None  # no host, no URL
    log.warning("node %s failed during job %s (%s): %s", lease.node, lease.job_id, problem, detail)
    nodes.stop_pool_node(state, lease.node_id, f"failed during a job: {problem}", force=True)
    if last:
        raise NodeFailed(f"the GPU node failed during the job ({problem})") from None


def shared(state: NodeHolder, lease: Lease) -> bool:
    """Whether other jobs lease the node now (or did while this one ran: its share was split)."""
    record = next((n for n in nodestore.pool_nodes(state.r) if n["id"] == lease.node_id), None)
    return record is not None and len(record["leases"]) > 1


# --- the nodes no job holds -----------------------------------------------------------------------

def maintain(state: NodeHolder) -> None:
    """One worker at a time: mark booting nodes that answer ready (and stop those past NODE_BOOT_TIMEOUT),
    stop idle nodes the policy does not keep, launch the nodes it wants warm."""
    settings, r = state.settings, state.r
    if not nodestore.take_maintainer_turn(r, state.worker_id, MAINTAINER_TURN_S):
        return
    records = nodestore.pool_nodes(r)
    now = time.time()
    for record in records:
        if record.get("state") == "booting" and not record["leases"]:
            check_booting(state, record, now)
    view = views(settings, records)
    types = sorted({settings.workload_type, settings.analyze_workload_type} | {n.type for n in view})
    est = estimates(settings, r, types)
    cfg = policy_config(settings)
    queued = dict.fromkeys(_queued_types(r), 1)  # by service: an idle node a queued job will take stays
    for node_id, why in pool_policy.idle_nodes_to_stop(view, now, est, cfg, queued):
        node = next(n for n in view if n.id == node_id)
        nodes.stop_pool_node(state, node_id, why, state_seen="ready",
                             idle_since=repr(node.idle_since) if node.idle_since is not None else "")
    idle_types = _idle_since_by_type(r, types)
    for node_type, why in pool_policy.launches_wanted(view, now, est, cfg, idle_types):
        node_id = nodestore.new_node_id()
        if nodestore.reserve_node(r, node_id, node_type, state.worker_id, settings.max_nodes, time.time()):
            log.info("launching a %s node: %s", node_type, why)
            try:
                nodes.launch_pool_node(state, node_id, node_type, attempts=1)
            except NodeFailed as exc:
                log.warning("could not launch a %s node (%s): %s", node_type, why, exc)


def check_booting(state: NodeHolder, record: dict, now: float) -> None:
    """A booting node no job waits for: ready when it answers; stopped past NODE_BOOT_TIMEOUT."""
    if not record.get("workload"):
        return
    urls = nodes.urls_of(state.settings, record.get("node", ""))
    if comput3.check_node_health(urls, timeout_s=5.0):
        boot = nodestore.mark_ready(state.r, record["id"], now)
        if boot is not None:
            log.info("node %s is up after %.1f s", record.get("node"), boot)
    elif now - float(record.get("launched_at") or now) > state.settings.node_boot_timeout_s:
        nodes.stop_pool_node(state, record["id"], "did not boot", state_seen="booting")


def _queued_types(r) -> set[str]:
    return {t for t in JOB_TYPES if queued_behind(r, t)}


def _idle_since_by_type(r, types: list[str]) -> dict[str, float]:
    stats = r.hgetall(config.POOL_STATS_KEY)
    return {t: float(stats[f"idle_since:{t}"]) for t in types if stats.get(f"idle_since:{t}")}


def can_serve_next(state: NodeHolder) -> bool:
    """Whether the job at the head of the queue can get a node: False only when no node of its type is in
    the pool and none can be launched or made room for (MAX_NODES nodes of other types, all busy)."""
    settings, r = state.settings, state.r
    entry = r.lindex(config.QUEUE_KEY, -1)
    if entry is None:
        return True
    job_type = next((t for t in JOB_TYPES if f'"type":"{t}"' in entry), "")
    if not job_type:
        return True
    node_type = node_type_for(settings, job_type)
    view = views(settings, nodestore.pool_nodes(r))
    if any(n.type == node_type for n in view):
        return True
    decision = pool_policy.place(view, node_type, job_type, time.time(), estimates(settings, r, [node_type]),
                                 policy_config(settings))
    return decision.action != "wait"


def other_workers_alive(state: NodeHolder) -> bool:
    """Whether another worker has a live heartbeat (it looks after the pool once this one is gone)."""
    others = sorted(set(state.r.smembers(config.WORKERS_KEY)) - {state.worker_id})
    if not others:
        return False
    pipe = state.r.pipeline(transaction=False)
    for worker in others:
        pipe.exists(config.HEARTBEAT_KEY.format(worker=worker))
    return any(pipe.execute())
