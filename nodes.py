"""One pool node's life, as the worker that touches it sees it: launch, boot, services ready, health,
drain and stop.

The pool (pool.py) decides which node a job leases and when one is launched or stopped; these are the
steps on one node. `launch_pool_node` launches a reserved node leak-proof (launches.py); `wait_booted`
waits until it answers its health check (any worker holding a lease on it may see it first);
`wait_service_ready` waits once per node for each service before its first job; `node_problem` tells
whether a node can take the next job (NODE_CHECK_TTL spares back-to-back jobs the provider calls);
`drain_node` keeps a node that still works on a stopped job from the next one; `stop_pool_node` claims
the stop, stops the workload (a stop Comput3 refuses is remembered for the sweep: `stop_or_remember`)
and forgets the node, settling its time accounts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis
import requests

import comput3
import config
import launches
import nodestore
from comput3 import C3Error
from engine_api import JobStopped, NodeUrls, ShouldStop, node_urls

log = logging.getLogger("c3-render.worker")

# The readiness check of each service: the NodeUrls field it lives under and the path that answers 200.
READY_CHECKS = {"csm": ("csm", "config"), "whisper": ("whisper", "config"),
                "portrait": ("comfyui", "/system_stats"), "analyze": ("ollama", "/api/tags")}
READY_ROOT_CHECK_S = 10.0  # while a service is not ready, check this often that the node itself answers
BOOT_CHECK_S = 1.0  # while a node boots, check its health this often


class NodeFailed(Exception):
    """The GPU node could not be had, or stopped working during the job."""


class NodeDown(Exception):
    """The node stopped answering while the worker waited for one of its services (it is replaced)."""


@dataclass
class Lease:
    """A job's slot on a pool node (nodestore's lease), with what the worker needs to reach the node."""

    node_id: str
    type: str
    job_id: str
    service: str
    leased_at: float
    workload: str = ""  # '' while the node is launching
    node: str = ""  # the node's host name
    urls: NodeUrls | None = None
    ran_s: float | None = None  # how long the engine ran (the service's job-time estimate learns from it)


class NodeHolder(Protocol):
    """What the functions here need of the worker's state (c3_render_worker.WorkerState has it)."""

    settings: config.Settings
    r: redis.Redis
    worker_id: str
    stopping: threading.Event
    node_seconds: float  # of the nodes this worker stopped
    redis_lost: str  # on the way out: why Redis did not answer ('' while it does); its steps are skipped
    unrecorded_stops: int  # nodes stopped on the way out whose records Redis could not take
    unstopped_nodes: int  # nodes whose Comput3 stop failed on the way out, with Redis gone


def node_type_for(settings: config.Settings, job_type: str) -> str:
    """The workload type a job type runs on: the node type is a property of the job type."""
    return settings.analyze_workload_type if job_type == "analyze" else settings.workload_type


def urls_of(settings: config.Settings, node: str) -> NodeUrls:
    return node_urls(node, settings.c3_api_key, settings.c3_node_url, settings.c3_comfyui_url,
                     settings.c3_ollama_url)


def fill_lease(settings: config.Settings, lease: Lease, record: dict[str, str]) -> Lease:
    """The lease with the node's workload and URLs, once the node has them (after its launch)."""
    if record.get("workload") and not lease.workload:
        lease.workload, lease.node = record["workload"], record.get("node", "")
        lease.urls = urls_of(settings, lease.node)
    return lease


# --- launching and booting ---------------------------------------------------------------------

def launch_pool_node(state: NodeHolder, node_id: str, node_type: str, attempts: int | None = None,
                     min_life_s: float = 0.0, should_stop: ShouldStop | None = None) -> None:
    """Launch the workload of a pool node this worker reserved, to live NODE_MAX_AGE (or min_life_s, the
    job's max_time, if longer) plus NODE_EXPIRES_MARGIN; it boots on its own after. A launch that fails
    gives its place in the pool back (NodeFailed)."""
    settings = state.settings
    expires = int(time.time() + max(settings.node_max_age_s, min_life_s) + settings.node_expires_margin_s)
    try:
        answer = launches.launch_node(settings, state.r, state.worker_id, node_type, node_id, expires=expires,
                                      attempts=attempts, should_stop=should_stop)
    except C3Error as exc:
        nodestore.forget_node(state.r, node_id, time.time())
        raise NodeFailed(str(exc)) from None
    except BaseException:
        nodestore.forget_node(state.r, node_id, time.time())  # whatever stopped us: the place goes back
        raise
    log.info("%s node %s (workload %s, %s) for the pool; it boots", "adopted" if answer.get("adopted") else
             "launched", answer["node"], answer["workload"], node_type)


def wait_booted(state: NodeHolder, lease: Lease, should_stop: ShouldStop) -> Lease:
    """Wait until the leased node is ready: launched (by whichever worker reserved it) and answering its
    health check (whoever sees it first marks it ready). NODE_BOOT_TIMEOUT after its launch it is stopped."""
    settings = state.settings
    deadline: float | None = None  # time.monotonic() when NODE_BOOT_TIMEOUT after the launch is over
    while True:
        record = nodestore.get_pool_node(state.r, lease.node_id)
        if record is None or record.get("state") == "stopping":
            raise NodeFailed("the GPU node was stopped before it booted")
        fill_lease(settings, lease, record)
        if deadline is None:  # the launch time is shared (wall clock); the wait is counted here
            launched_ago = max(0.0, time.time() - float(record.get("launched_at") or time.time()))
            deadline = time.monotonic() + settings.node_boot_timeout_s - launched_ago
        if record.get("state") == "ready":
            return lease
        if lease.urls is not None and comput3.check_node_health(lease.urls, timeout_s=5.0):
            boot = nodestore.mark_ready(state.r, lease.node_id, time.time())
            if boot is not None:
                log.info("node %s is up after %.1f s", lease.node, boot)
            return lease
        if time.monotonic() > deadline:
            stop_pool_node(state, lease.node_id, "did not boot", force=True)
            raise NodeFailed(f"GPU node did not become healthy within {settings.node_boot_timeout_s:g} s "
                             "(NODE_BOOT_TIMEOUT)")
        reason = should_stop()
        if reason:
            raise JobStopped(reason)
        time.sleep(BOOT_CHECK_S)


def wait_service_ready(state: NodeHolder, lease: Lease, job_type: str, should_stop: ShouldStop) -> None:
    """Before a node's service is first used: wait until it answers (ComfyUI answers 404/502 for minutes
    after the node's root is up), checking every READY_ROOT_CHECK_S that the node itself still answers.
    Once seen ready (by any worker), a service is not checked again on that node."""
    field, path = READY_CHECKS[job_type]
    record = nodestore.get_pool_node(state.r, lease.node_id) or {}
    if record.get(f"ready:{field}") == "1":
        return
    assert lease.urls is not None  # noqa: S101 - wait_booted filled it
    url = getattr(lease.urls, field) + path
    timeout_s = state.settings.service_ready_timeout_s
    deadline = time.monotonic() + timeout_s
    last = ""
    root_checked = -READY_ROOT_CHECK_S
    while True:
        try:
            response = requests.get(url, headers=lease.urls.headers(), timeout=(5, 15))
            if response.status_code == 200:
                nodestore.mark_service_ready(state.r, lease.node_id, field)
                if last:
                    log.info("%s on node %s is ready", field, lease.node)
                return
            answer = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            answer = type(exc).__name__
        if not last:
            log.info("waiting for %s on node %s to be ready (%s)", field, lease.node, answer)
        last = answer
        if time.monotonic() - root_checked >= READY_ROOT_CHECK_S:  # a node that died is not waited for
            root_checked = time.monotonic()
            if not comput3.check_node_health(lease.urls):
                raise NodeDown(f"the node stopped answering while {field} was starting ({answer})")
        reason = should_stop()
        if reason:
            raise JobStopped(reason)
        if time.monotonic() > deadline:
            raise NodeFailed(f"{field} on the GPU node was not ready within {timeout_s:g} s "
                             f"(SERVICE_READY_TIMEOUT; last answer: {last})")
        time.sleep(2.0)


# --- health ------------------------------------------------------------------------------------

def node_problem(state: NodeHolder, lease: Lease, force: bool = False) -> str:
    """'' when the leased node can take (or go on with) a job, else why it must be replaced.

    A node known good within NODE_CHECK_TTL (a check, or a job it just ran, by any worker) is not asked
    again, so back-to-back jobs cost no provider call; force (after an error) always asks the provider
    and the node."""
    settings = state.settings
    record = nodestore.get_pool_node(state.r, lease.node_id)
    if record is None or record.get("state") == "stopping":
        return "it was stopped"
    if time.time() - float(record.get("launched_at") or 0) > settings.node_max_age_s:
        return "older than NODE_MAX_AGE"
    if not force and time.time() - float(record.get("checked_at") or 0) < settings.node_check_ttl_s:
        return ""
    listed = True
    try:
        running = {w.get("workload") for w in comput3.get_running_workloads(settings)}
    except C3Error as exc:
        log.warning("could not list workloads (%s); relying on the health check", exc)
        running, listed = {lease.workload}, False
    if lease.workload not in running:
        return "no longer in the workloads list"
    if lease.urls is None or not comput3.check_node_health(lease.urls):
        return "failed its health check"
    if listed:
        nodestore.mark_checked(state.r, lease.node_id, time.time())
    return ""


def drain_node(state: NodeHolder, lease: Lease, job_id: str, busy: Callable[[NodeUrls], bool | None] | None) -> None:
    """After a stopped job (already reported), keep its slot while the node still works on the stopped
    job (busy(urls) tells; None: nothing tells): wait up to NODE_DRAIN_TIMEOUT (node time of the stopped
    job), else stop the node."""
    if lease.urls is None or busy is None:
        return
    started = time.monotonic()
    while busy(lease.urls):
        if state.stopping.is_set():
            return
        if time.monotonic() - started > state.settings.node_drain_timeout_s:
            stop_pool_node(state, lease.node_id, f"still busy with stopped job {job_id} after NODE_DRAIN_TIMEOUT "
                           f"({state.settings.node_drain_timeout_s:g} s)", force=True)
            return
        time.sleep(1.0)
    if time.monotonic() - started >= 1.0:
        log.info("job %s: node %s finished the work it could not stop after %.1f s more (node time of the "
                 "stopped job)", job_id, lease.node, time.monotonic() - started)


# --- stopping ----------------------------------------------------------------------------------

def stop_or_remember(settings: config.Settings, r: redis.Redis | None, workload: str, node: str, why: str) -> bool:
    """Stop a workload; True when it is stopped. When Comput3's stop fails, the workload is remembered in
    Redis (r; None: Redis is gone) for the sweep, which stops it again (retry_failed_stops)."""
    try:
        comput3.stop_workload(settings, workload)
        return True
    except C3Error as exc:
        log.warning("stopping workload %s (%s) failed: %s; the recovery sweep will retry", workload, why, exc)
    if r is not None:
        try:
            nodestore.remember_to_stop(r, workload, node)
        except redis.RedisError:
            log.warning("could not record workload %s for a later stop; the sweep finds it in the registry "
                        "of our nodes", workload)
    return False


def stop_pool_node(state: NodeHolder, node_id: str, reason: str, force: bool = False, state_seen: str = "",
                   idle_since: str = "") -> bool:
    """Stop one pool node if this worker gets the stop (no job leases it, unless force; it is still as it
    was seen: state_seen, idle_since), and forget it: its node-seconds are counted and its time
    accounts settled. True when this worker stopped it."""
    now = time.time()
    if not nodestore.claim_stop(state.r, node_id, state.worker_id, now, state_seen, idle_since, force):
        return False
    record = nodestore.get_pool_node(state.r, node_id) or {}
    workload = record.get("workload", "")
    stopped = not workload or stop_or_remember(state.settings, state.r, workload, record.get("node", ""), reason)
    forgotten = nodestore.forget_node(state.r, node_id, time.time())
    if workload:
        seconds = time.time() - float(record.get("launched_at") or now)
        state.node_seconds += seconds
        nodestore.record_node_stop(state.r, workload, state.worker_id, seconds, reason)
        log.info("%s node %s (workload %s, %s, %s) after %.1f node-seconds", "stopped" if stopped else
                 "let go of (its stop failed)", record.get("node"), workload, record.get("type"), reason, seconds)
    elif forgotten:
        log.info("gave up pool node %s before its launch (%s)", node_id, reason)
    return True


def stop_idle_on_exit(state: NodeHolder, reason: str) -> int:
    """The last worker leaving stops every pool node no job leases (nobody would stop them after);
    the count stopped. With Redis gone, nothing (the sweep of the next worker does it)."""
    stopped = 0
    for record in nodestore.pool_nodes(state.r):
        if record["leases"] or record.get("state") == "stopping":
            continue
        if stop_pool_node(state, record["id"], reason):
            stopped += 1
    return stopped
