"""The GPU nodes a worker holds, from launch to stop, and running a job's engine on one.

A worker holds at most one node of each workload type (media:fast for csm/whisper/portrait, the analyze
type for analyze; `node_type_for`), each with its own idle timer; all of them count against MAX_NODES
(slots in Redis, taken atomically). `ensure_node` gives the node for the next job: the held one while
`node_usable` says so, else a fresh one (a free slot, or the slot of this worker's idle node of the other
type), launched leak-proof (launches.py) and waited for until it boots. `wait_service_ready` waits once
per node for each service before its first use. `run_on_node` runs an engine there and retries a job
whose node failed on a fresh node. `drain_node` keeps a node that still works on a stopped job from the
next one. Every stop goes through `stop_or_remember`: a stop Comput3 refuses is remembered for the sweep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import redis
import requests

import comput3
import config
import engine_api
import launches
import nodestore
from comput3 import C3Error
from engine_api import EngineError, JobContext, JobStopped, NodeUrls, Phase, ShouldStop, no_phase, node_urls

log = logging.getLogger("c3-render.worker")

# The readiness check of each service: its name on HeldNode.ready and the path that answers 200 when ready.
READY_CHECKS = {"csm": ("csm", "config"), "whisper": ("whisper", "config"),
                "portrait": ("comfyui", "/system_stats"), "analyze": ("ollama", "/api/tags")}
READY_ROOT_CHECK_S = 10.0  # while a service is not ready, check this often that the node itself answers


class NodeFailed(Exception):
    """The GPU node could not be had, or stopped working during the job."""


class NodeDown(Exception):
    """The node stopped answering while the worker waited for one of its services (it is replaced)."""


@dataclass
class HeldNode:
    workload: str
    node: str
    launched_at: float
    urls: NodeUrls
    type: str = config.Settings.workload_type
    last_used: float = field(default_factory=time.time)
    checked_at: float = 0.0  # last time the node was known good (a health check, or a job it ran)
    ready: set[str] = field(default_factory=set)  # services seen ready (csm, whisper, comfyui, ollama)


class NodeHolder(Protocol):
    """What the functions here need of the worker's state (c3_render_worker.WorkerState has it)."""

    settings: config.Settings
    r: redis.Redis
    worker_id: str
    nodes: dict[str, HeldNode]  # workload type -> node
    stopping: threading.Event
    node_seconds: float
    redis_lost: str  # on the way out: why Redis did not answer ('' while it does); its steps are skipped
    unrecorded_stops: int  # nodes stopped on the way out whose records Redis could not take
    unstopped_nodes: int  # nodes whose Comput3 stop failed on the way out, with Redis gone


def node_type_for(settings: config.Settings, job_type: str) -> str:
    """The workload type a job type runs on: the node type is a property of the job type."""
    return settings.analyze_workload_type if job_type == "analyze" else settings.workload_type


def urls_of(settings: config.Settings, node: str) -> NodeUrls:
    return node_urls(node, settings.c3_api_key, settings.c3_node_url, settings.c3_comfyui_url,
                     settings.c3_ollama_url)


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


def stop_node(state: NodeHolder, node_type: str, reason: str, release_slot: bool = True) -> None:
    """Stop the held node of node_type (if any), log its node-seconds, and free its slot (unless the
    worker reuses the slot at once: then it keeps it, so waiting workers cannot take it meanwhile)."""
    held = state.nodes.pop(node_type, None)
    if held is None:
        return
    seconds = time.time() - held.launched_at
    stopped = stop_or_remember(state.settings, None if state.redis_lost else state.r, held.workload, held.node,
                               reason)
    state.node_seconds += seconds
    log.info("%s node %s (workload %s, %s, %s) after %.1f node-seconds; this worker's total %.1f",
             "stopped" if stopped else "let go of (its stop failed)", held.node, held.workload, held.type,
             reason, seconds, state.node_seconds)
    if state.redis_lost:  # on the way out without Redis: shut_down says so once, the sweep tidies up
        if stopped:
            state.unrecorded_stops += 1
        else:
            state.unstopped_nodes += 1
        return
    nodestore.record_node_stop(state.r, held.workload, state.worker_id, seconds, reason)
    try:
        nodestore.release_node(state.r, state.worker_id, node_type, keep_slot=not release_slot,
                              workload=held.workload)
    except redis.RedisError as exc:
        if state.stopping.is_set():
            state.redis_lost = type(exc).__name__
            state.unrecorded_stops += 1
        else:
            log.warning("could not update the node record in Redis; the recovery sweep will")


def stop_all_nodes(state: NodeHolder, reason: str) -> None:
    for node_type in list(state.nodes):
        stop_node(state, node_type, reason)


def stop_idle_nodes(state: NodeHolder) -> None:
    """Stop each held node idle for GPU_IDLE_TIMEOUT (each node has its own idle timer)."""
    timeout = state.settings.gpu_idle_timeout_s
    for node_type, held in list(state.nodes.items()):
        if time.time() - held.last_used > timeout:
            stop_node(state, node_type, f"idle for {timeout:g} s")


def forget_unheld_nodes(state: NodeHolder) -> None:
    """After a Redis error cut a launch or a stop short, this worker's records in Redis can name nodes
    it does not hold: a slot and a node record ("launching", or a node it owns), and an open launch
    intent. Left so, the slot is never free again (with MAX_NODES slots all taken that way no worker
    takes a job) and a node the launch created runs until it expires, since the sweep leaves a live
    worker's launches alone. So: stop an owned node we do not hold, free those slots and records, and
    leave each open launch window to the sweep (orphaned), which stops what it created unless owned."""
    r = state.r
    for kind in nodestore.slot_types(r, state.worker_id):
        if kind in state.nodes or kind == nodestore.RESERVED:
            continue
        record = nodestore.get_node(r, state.worker_id, kind) or {}
        workload = record.get("workload", "")
        if workload:
            stop_or_remember(state.settings, r, workload, record.get("node", ""), "left by a Redis error")
        nodestore.release_node(r, state.worker_id, kind, workload=workload)
        log.info("freed this worker's %s slot%s, left by a Redis error", kind,
                 f" and stopped its node (workload {workload})" if workload else "")
    for intent_id, intent in nodestore.launch_intents(r).items():
        if intent.get("worker") == state.worker_id and not intent.get("orphan"):
            nodestore.orphan_launch(r, intent_id, time.time())


# --- the node for the next job -----------------------------------------------------------------

def node_usable(state: NodeHolder, node_type: str, force: bool = False) -> str:
    """'' when the held node of node_type can take the next job, else why it must be replaced.

    A node known good within NODE_CHECK_TTL (a check, or a job it just ran) is not asked again, so
    back-to-back jobs cost no provider call; force (after any error) always asks the provider and the node.
    """
    held = state.nodes.get(node_type)
    settings = state.settings
    if held is None:
        return "no node"
    if time.time() - held.launched_at > settings.node_max_age_s:
        return "older than NODE_MAX_AGE"
    if not force and time.time() - held.checked_at < settings.node_check_ttl_s:
        return ""
    held.checked_at = 0.0  # invalidated until this check succeeds in full
    listed = True
    try:
        running = {w.get("workload") for w in comput3.get_running_workloads(settings)}
    except C3Error as exc:
        log.warning("could not list workloads (%s); relying on the health check", exc)
        running, listed = {held.workload}, False
    if held.workload not in running:
        return "no longer in the workloads list"
    if not comput3.check_node_health(held.urls):
        return "failed its health check"
    if listed:
        held.checked_at = time.time()
    return ""


def take_slot(state: NodeHolder, node_type: str, should_stop: ShouldStop) -> None:
    """Hold a MAX_NODES slot for a node of node_type: the worker's reservation, a free slot, or the slot
    of its own idle node of another type (stopped: an idle node is not kept for a job of the other type,
    and a job never waits behind it)."""
    settings = state.settings
    waited = False
    while True:
        if nodestore.acquire_node_slot(state.r, state.worker_id, settings.max_nodes, node_type,
                                      convert_from=nodestore.RESERVED):
            return
        others = sorted((held.last_used, kind) for kind, held in state.nodes.items() if kind != node_type)
        if others:
            other = others[0][1]
            stop_node(state, other, f"idle; its slot is needed for a {node_type} node", release_slot=False)
            if nodestore.acquire_node_slot(state.r, state.worker_id, settings.max_nodes, node_type,
                                          convert_from=other):
                return
            continue
        if not waited:
            log.info("MAX_NODES (%d) nodes are running; waiting for a slot", settings.max_nodes)
            waited = True
        reason = should_stop()
        if reason:
            raise JobStopped(reason)
        time.sleep(1.0)


def launch_held_node(state: NodeHolder, node_type: str) -> HeldNode:
    """Launch a node of node_type into the slot this worker holds for it; it is held (booting) after."""
    settings = state.settings
    nodestore.record_node(state.r, state.worker_id, node_type,
                         {"state": "launching", "worker": state.worker_id, "type": node_type, "since": time.time()})
    try:
        answer = launches.launch_node(settings, state.r, state.worker_id, node_type)
    except Exception as exc:  # any failure (not only C3Error) frees the slot and the "launching" record
        nodestore.release_node(state.r, state.worker_id, node_type)
        if isinstance(exc, C3Error):
            raise NodeFailed(str(exc)) from None
        raise
    held = HeldNode(workload=str(answer["workload"]), node=str(answer["node"]), launched_at=answer["launched_at"],
                    type=node_type, urls=urls_of(settings, str(answer["node"])))
    state.nodes[node_type] = held
    log.info("%s node %s (workload %s, %s); waiting for it to boot",
             "adopted" if answer.get("adopted") else "launched", held.node, held.workload, node_type)
    return held


def wait_booted(state: NodeHolder, held: HeldNode, should_stop: ShouldStop) -> None:
    """Wait until a launched node answers its health check (NODE_BOOT_TIMEOUT); stopped on failure."""
    settings = state.settings
    deadline = time.time() + settings.node_boot_timeout_s
    while not comput3.check_node_health(held.urls, timeout_s=5.0):
        reason = should_stop()
        if reason:
            stop_node(state, held.type, "job stopped while the node booted")
            raise JobStopped(reason)
        if time.time() > deadline:
            stop_node(state, held.type, "did not boot")
            raise NodeFailed(f"GPU node did not become healthy within {settings.node_boot_timeout_s:g} s "
                             "(NODE_BOOT_TIMEOUT)")
        time.sleep(1.0)
    held.checked_at = time.time()
    nodestore.record_node(state.r, state.worker_id, held.type, {"state": "running"})
    log.info("node %s is up after %.1f s", held.node, time.time() - held.launched_at)


def ensure_node(state: NodeHolder, should_stop: ShouldStop, node_type: str | None = None,
                phase: Phase = no_phase) -> HeldNode:
    """The node of node_type for the next job: the held one when usable, else a fresh one (waiting for a
    slot, or taking the slot of this worker's idle node of the other type)."""
    node_type = node_type or state.settings.workload_type
    if node_type in state.nodes:
        problem = node_usable(state, node_type)
        if not problem:
            return state.nodes[node_type]
        log.info("replacing node %s: %s", state.nodes[node_type].node, problem)
        stop_node(state, node_type, problem, release_slot=False)
    take_slot(state, node_type, should_stop)
    held = launch_held_node(state, node_type)
    phase("booting_node")
    wait_booted(state, held, should_stop)
    return held


def wait_service_ready(state: NodeHolder, held: HeldNode, job_type: str, should_stop: ShouldStop) -> None:
    """Before a node's service is first used: wait until it answers (ComfyUI answers 404/502 for minutes
    after the node's root is up), checking every READY_ROOT_CHECK_S that the node itself still answers.
    Once seen ready, a service is not checked again on that node."""
    service, path = READY_CHECKS[job_type]
    if service in held.ready:
        return
    url = getattr(held.urls, service) + path
    timeout_s = state.settings.service_ready_timeout_s
    deadline = time.time() + timeout_s
    last = ""
    root_checked = 0.0
    while True:
        try:
            response = requests.get(url, headers=held.urls.headers(), timeout=(5, 15))
            if response.status_code == 200:
                held.ready.add(service)
                if last:
                    log.info("%s on node %s is ready", service, held.node)
                return
            answer = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            answer = type(exc).__name__
        if not last:
            log.info("waiting for %s on node %s to be ready (%s)", service, held.node, answer)
        last = answer
        if time.time() - root_checked >= READY_ROOT_CHECK_S:  # a node that died is not waited for
            root_checked = time.time()
            if not comput3.check_node_health(held.urls):
                raise NodeDown(f"the node stopped answering while {service} was starting ({answer})")
        reason = should_stop()
        if reason:
            raise JobStopped(reason)
        if time.time() > deadline:
            raise NodeFailed(f"{service} on the GPU node was not ready within {timeout_s:g} s "
                             f"(SERVICE_READY_TIMEOUT; last answer: {last})")
        time.sleep(2.0)


# --- running the engine ------------------------------------------------------------------------

def run_on_node(state: NodeHolder, job_type: str, engine: Callable[[JobContext], Path | str],
                context: Callable[..., JobContext], should_stop: ShouldStop, phase: Phase) -> Path | str:
    """Get a node of the job's type and run the engine on it (`context(node=urls)` is the job as the
    engine sees it); a node failure is retried on a fresh node NODE_FAILURE_RETRIES times."""
    node_type = node_type_for(state.settings, job_type)
    tries = 1 + max(0, state.settings.node_failure_retries)
    for attempt in range(1, tries + 1):
        phase("waiting_for_node")
        held = ensure_node(state, should_stop, node_type, phase)
        held.last_used = time.time()
        try:
            try:
                wait_service_ready(state, held, job_type, should_stop)
            except NodeFailed:
                stop_node(state, node_type, "a service never became ready")
                raise
            job = context(node=held.urls)
            output = engine(job)
            held.checked_at = time.time()  # it just did a job: known good for NODE_CHECK_TTL
            return output
        except (JobStopped, NodeFailed):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure (NodeDown included): was it the node?
            detail = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"  # for the log
            problem = node_usable(state, node_type, force=True)
            if not problem:
                if isinstance(exc, EngineError):
                    raise
                log.warning("%s failed on node %s, which is healthy: %s", job_type, held.node, detail)
                raise EngineError(f"{job_type} failed: {engine_api.failure_text(exc)}") from None  # no host, no URL
            log.warning("node %s failed during job %s (%s): %s", held.node, job.job_id, problem, detail)
            stop_node(state, node_type, f"failed during a job: {problem}", release_slot=attempt == tries)
            if attempt == tries:
                raise NodeFailed(f"the GPU node failed during the job ({problem})") from None
            log.info("retrying job %s on a new node", job.job_id)
        finally:
            if node_type in state.nodes:
                state.nodes[node_type].last_used = time.time()
    raise NodeFailed("the GPU node failed during the job")


def drain_node(state: NodeHolder, job_type: str, job_id: str, busy: Callable[[NodeUrls], bool | None] | None) -> None:
    """After a stopped job (already reported), keep the node from the next job while it still works on
    the stopped one (busy(urls) tells; None: nothing tells): wait up to NODE_DRAIN_TIMEOUT (node time of
    the stopped job), else replace it."""
    node_type = node_type_for(state.settings, job_type)
    held = state.nodes.get(node_type)
    if held is None or busy is None:
        return
    started = time.time()
    while busy(held.urls):
        if state.stopping.is_set():
            return  # the worker stops the node on its way out
        if time.time() - started > state.settings.node_drain_timeout_s:
            stop_node(state, node_type, f"still busy with stopped job {job_id} after NODE_DRAIN_TIMEOUT "
                             f"({state.settings.node_drain_timeout_s:g} s)")
            return
        time.sleep(1.0)
    if time.time() - started >= 1.0:
        log.info("job %s: node %s finished the work it could not stop after %.1f s more (node time of the "
                 "stopped job)", job_id, held.node, time.time() - started)
    held.last_used = time.time()
