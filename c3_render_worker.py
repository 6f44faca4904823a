"""The c3-render worker: takes jobs from the Redis queue and runs them on Comput3 GPU nodes.

Owns the Comput3 calls (launch, workloads list, types, node health, stop), the nodes each worker
holds (one per workload type: analyze jobs on C3_ANALYZE_WORKLOAD_TYPE, the others on
C3_WORKLOAD_TYPE; launched when a job needs one, reused while healthy, replaced when it fails or
grows old, stopped when idle or on SIGTERM, capped at MAX_NODES across all workers), leak-proof
launches (a launch window recorded in Redis before each launch call; lost answers resolved from the
workloads list), the job run (inputs downloaded and checked, the node's service waited for, the
engine called with a should_stop() that enforces cancel, max_time and complete_by, the result
uploaded and recorded), the heartbeat, the recovery sweep that requeues the jobs of dead workers
and stops every node of ours that no live worker holds, and the shutdown on SIGTERM (bounded in time
even when Redis is gone: shut_down).

Run: `python c3_render_worker.py` (configuration from the environment; see README).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import redis
import requests

import analyze
import comfyui
import config
import csm
import housekeeping
import jobstore
import media_check
import netfetch
import storage
import webhooks
import whisper
from engine_api import EngineError, JobContext, JobStopped, NodeUrls, node_urls

log = logging.getLogger("c3-render.worker")

ENGINES = {"csm": csm.run, "whisper": whisper.run, "portrait": comfyui.run, "analyze": analyze.run}
RESULT_NAMES = {"csm": "{id}.mp3", "portrait": "{id}.mp4", "whisper": "{id}.txt", "analyze": "{id}.txt"}
CANCEL_REASON = "cancelled by request"
SHUTDOWN_REASON = "worker shutting down"
C3_CONNECT_TIMEOUT_S = 10  # the read timeout is C3_READ_TIMEOUT
# On the way out, one Redis call may take this long: a Redis that is frozen or cut off by the network
# accepts nothing and refuses nothing, and each call would otherwise wait out the usual 5 s timeout.
EXIT_REDIS_TIMEOUT_S = 2.0


class C3Error(Exception):
    """A Comput3 control API call failed; str() is safe to show (no key). `retryable` for 5xx, timeouts
    and non-JSON answers; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, retryable: bool = False, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class NodeFailed(Exception):
    """The GPU node could not be had, or stopped working during the job."""


class NodeDown(Exception):
    """The node stopped answering while the worker waited for one of its services (it is replaced)."""


# --- the Comput3 control API -------------------------------------------------------------------

def c3_headers(settings: config.Settings) -> dict[str, str]:
    return {"X-C3-API-KEY": settings.c3_api_key, "Content-Type": "application/json",
            "Origin": settings.c3_origin}


def _c3_post(settings: config.Settings, path: str, body: dict[str, Any]) -> Any:
    """One call; raises C3Error saying what went wrong, with `retryable` set for 5xx/timeouts/non-JSON."""
    return _c3_call(settings, "POST", path, body)


def _c3_call(settings: config.Settings, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    url = f"{settings.c3_api_url}/{path}"
    try:
        response = requests.request(method, url, json=body, headers=c3_headers(settings),
                                    timeout=(C3_CONNECT_TIMEOUT_S, settings.c3_read_timeout_s))
    except requests.Timeout:
        raise C3Error(f"Comput3 {path}: timed out", retryable=True) from None
    except requests.ConnectionError:
        raise C3Error(f"Comput3 {path}: cannot connect to {settings.c3_api_url}", retryable=True) from None
    if response.status_code >= 500:
        raise C3Error(f"Comput3 {path}: HTTP {response.status_code}", retryable=True,
                      status=response.status_code)
    if response.status_code in (401, 403):
        raise C3Error(f"Comput3 {path}: HTTP {response.status_code} (check C3_API_KEY)",
                      status=response.status_code)
    if response.status_code >= 400:
        raise C3Error(f"Comput3 {path}: HTTP {response.status_code}: {response.text[:200]}",
                      status=response.status_code)
    try:
        return response.json()
    except ValueError:
        kind = response.headers.get("Content-Type", "unknown content").split(";")[0]
        raise C3Error(f"Comput3 {path}: answer was not JSON ({kind})", retryable=True) from None


def default_expires(settings: config.Settings) -> int:
    return int(time.time() + settings.node_max_age_s + settings.node_expires_margin_s)


def launch_once(settings: config.Settings, workload_type: str, expires: int) -> dict[str, Any]:
    """One launch call (no retry here: a failed launch may still have created a node; see launch_node)."""
    answer = _c3_post(settings, "launch", {"type": workload_type, "expires": expires})
    if not isinstance(answer, dict) or not answer.get("workload") or not answer.get("node"):
        raise C3Error("Comput3 launch: answer has no workload or node", retryable=True)
    return answer


def get_workload_types(settings: config.Settings) -> list[str]:
    """The workload types the provider offers (GET /types: a list of names, or of records with one)."""
    answer = _c3_call(settings, "GET", "types")
    if isinstance(answer, dict):
        answer = answer.get("types", list(answer))
    if not isinstance(answer, list):
        raise C3Error("Comput3 types: answer is not a list")
    names = []
    for item in answer:
        if isinstance(item, dict):
            item = item.get("type") or item.get("name")
        if isinstance(item, str):
            names.append(item)
    return names


def get_running_workloads(settings: config.Settings) -> list[dict[str, Any]]:
    answer = _c3_post(settings, "workloads", {"running": True})
    if not isinstance(answer, list):
        raise C3Error("Comput3 workloads: answer is not a list")
    return answer


def check_node_health(settings: config.Settings, node: str, timeout_s: float = 10.0) -> bool:
    """True when the node answers 200 at its root URL."""
    url = node_urls(node, settings.c3_api_key, settings.c3_node_url, settings.c3_comfyui_url,
                    settings.c3_ollama_url).base + "/"
    try:
        response = requests.get(url, headers={"X-C3-API-KEY": settings.c3_api_key}, timeout=timeout_s)
    except requests.RequestException:
        return False
    return response.status_code == 200


def stop_workload(settings: config.Settings, workload_id: str) -> dict[str, Any]:
    """Stop a workload. One the provider no longer knows (404) is already stopped: that is success."""
    try:
        answer = _c3_post(settings, "stop", {"workload": workload_id})
    except C3Error as exc:
        if exc.status == 404:
            return {"already_stopped": True}
        raise
    return answer if isinstance(answer, dict) else {}


# --- the nodes this worker holds ---------------------------------------------------------------
# A worker holds at most one node of each workload type (media:fast for csm/whisper/portrait, the
# analyze type for analyze), each with its own idle timer; all of them count against MAX_NODES.

READY_PATHS = {"csm": "csm", "whisper": "whisper", "portrait": "comfyui", "analyze": "ollama"}
READY_ROOT_CHECK_S = 10.0  # while a service is not ready, check this often that the node itself answers


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


@dataclass
class WorkerState:
    settings: config.Settings
    r: redis.Redis
    worker_id: str
    nodes: dict[str, HeldNode] = field(default_factory=dict)  # workload type -> node
    stopping: threading.Event = field(default_factory=threading.Event)
    settled: threading.Event = field(default_factory=threading.Event)  # after SIGTERM: no job left running
    shutdown_deadline: float | None = None
    node_seconds: float = 0.0
    entry: str | None = None  # the queue entry taken and not yet settled in Redis (acked, put back, requeued)
    redis_lost: str = ""  # on the way out: why Redis did not answer ('' while it does); its steps are skipped
    unrecorded_stops: int = 0  # nodes stopped on the way out whose records Redis could not take
    unstopped_nodes: int = 0  # nodes whose Comput3 stop failed on the way out, with Redis gone


def node_type_for(settings: config.Settings, job_type: str) -> str:
    """The workload type a job type runs on: the node type is a property of the job type."""
    return settings.analyze_workload_type if job_type == "analyze" else settings.workload_type


def stop_node(state: WorkerState, node_type: str, reason: str, release_slot: bool = True) -> None:
    """Stop the held node of node_type (if any), log its node-seconds, and free its slot (unless the
    worker reuses the slot at once: then it keeps it, so waiting workers cannot take it meanwhile)."""
    held = state.nodes.pop(node_type, None)
    if held is None:
        return
    seconds = time.time() - held.launched_at
    stopped = True
    try:
        stop_workload(state.settings, held.workload)
    except C3Error as exc:
        stopped = False
        log.warning("stopping workload %s failed: %s; the recovery sweep will retry", held.workload, exc)
        try:
            if not state.redis_lost:
                state.r.hset(config.NODES_TO_STOP_KEY, held.workload, held.node)
        except redis.RedisError:
            log.warning("could not record workload %s for a later stop; the sweep finds it in the registry "
                        "of our nodes", held.workload)
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
    _record_node_stop(state.r, held.workload, state.worker_id, seconds, reason)
    try:
        jobstore.release_node(state.r, state.worker_id, node_type, keep_slot=not release_slot,
                              workload=held.workload)
    except redis.RedisError as exc:
        if state.stopping.is_set():
            state.redis_lost = type(exc).__name__
            state.unrecorded_stops += 1
        else:
            log.warning("could not update the node record in Redis; the recovery sweep will")


def stop_all_nodes(state: WorkerState, reason: str) -> None:
    for node_type in list(state.nodes):
        stop_node(state, node_type, reason)


def forget_unheld_nodes(state: WorkerState) -> None:
    """After a Redis error cut a launch or a stop short, this worker's records in Redis can name nodes
    it does not hold: a slot and a node record ("launching", or a node it owns), and an open launch
    intent. Left so, the slot is never free again (with MAX_NODES slots all taken that way no worker
    takes a job) and a node the launch created runs until it expires, since the sweep leaves a live
    worker's launches alone. So: stop an owned node we do not hold, free those slots and records, and
    leave each open launch window to the sweep (orphaned), which stops what it created unless owned."""
    r = state.r
    for kind in jobstore.slot_types(r, state.worker_id):
        if kind in state.nodes or kind == jobstore.RESERVED:
            continue
        record = jobstore.get_node(r, state.worker_id, kind) or {}
        workload = record.get("workload", "")
        if workload:
            try:
                stop_workload(state.settings, workload)
            except C3Error as exc:
                log.warning("stopping workload %s failed: %s; the recovery sweep will retry", workload, exc)
                r.hset(config.NODES_TO_STOP_KEY, workload, record.get("node", ""))
        jobstore.release_node(r, state.worker_id, kind, workload=workload)
        log.info("freed this worker's %s slot%s, left by a Redis error", kind,
                 f" and stopped its node (workload {workload})" if workload else "")
    for intent_id, intent in jobstore.launch_intents(r).items():
        if intent.get("worker") == state.worker_id and not intent.get("orphan"):
            jobstore.orphan_launch(r, intent_id, time.time())


def retry_failed_stops(settings: config.Settings, r: redis.Redis) -> int:
    """Stop again the workloads whose stop call failed earlier; return how many are still pending."""
    pending = r.hgetall(config.NODES_TO_STOP_KEY)
    for workload in pending:
        try:
            stop_workload(settings, workload)
        except C3Error as exc:
            log.warning("stopping workload %s failed again: %s", workload, exc)
            continue
        r.hdel(config.NODES_TO_STOP_KEY, workload)
        log.info("stopped workload %s on retry", workload)
    return r.hlen(config.NODES_TO_STOP_KEY)


def _record_node_stop(r: redis.Redis, workload: str, worker_id: str, seconds: float, reason: str) -> None:
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


def node_usable(state: WorkerState, node_type: str, force: bool = False) -> str:
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
        running = {w.get("workload") for w in get_running_workloads(settings)}
    except C3Error as exc:
        log.warning("could not list workloads (%s); relying on the health check", exc)
        running, listed = {held.workload}, False
    if held.workload not in running:
        return "no longer in the workloads list"
    if not check_node_health(settings, held.node):
        return "failed its health check"
    if listed:
        held.checked_at = time.time()
    return ""


def _take_slot(state: WorkerState, node_type: str, should_stop) -> None:
    """Hold a MAX_NODES slot for a node of node_type: the worker's reservation, a free slot, or the slot
    of its own idle node of another type (stopped: an idle node is not kept for a job of the other type,
    and a job never waits behind it)."""
    settings = state.settings
    waited = False
    while True:
        if jobstore.acquire_node_slot(state.r, state.worker_id, settings.max_nodes, node_type,
                                      convert_from=jobstore.RESERVED):
            return
        others = sorted((held.last_used, kind) for kind, held in state.nodes.items() if kind != node_type)
        if others:
            other = others[0][1]
            stop_node(state, other, f"idle; its slot is needed for a {node_type} node", release_slot=False)
            if jobstore.acquire_node_slot(state.r, state.worker_id, settings.max_nodes, node_type,
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


def ensure_node(state: WorkerState, should_stop, node_type: str | None = None, phase=None) -> HeldNode:
    """The node of node_type for the next job: the held one when usable, else a fresh one (waiting for a
    slot, or taking the slot of this worker's idle node of the other type)."""
    settings = state.settings
    node_type = node_type or settings.workload_type
    if node_type in state.nodes:
        problem = node_usable(state, node_type)
        if not problem:
            return state.nodes[node_type]
        log.info("replacing node %s: %s", state.nodes[node_type].node, problem)
        stop_node(state, node_type, problem, release_slot=False)
    _take_slot(state, node_type, should_stop)
    jobstore.record_node(state.r, state.worker_id, node_type,
                         {"state": "launching", "worker": state.worker_id, "type": node_type,
                          "since": time.time()})
    try:
        answer = launch_node(settings, state.r, state.worker_id, node_type)
    except C3Error as exc:
        jobstore.release_node(state.r, state.worker_id, node_type)
        raise NodeFailed(str(exc)) from None
    held = HeldNode(workload=str(answer["workload"]), node=str(answer["node"]), launched_at=answer["launched_at"],
                    type=node_type, urls=node_urls(str(answer["node"]), settings.c3_api_key, settings.c3_node_url,
                                                   settings.c3_comfyui_url, settings.c3_ollama_url))
    state.nodes[node_type] = held
    if phase:
        phase("booting_node")
    log.info("%s node %s (workload %s, %s); waiting for it to boot",
             "adopted" if answer.get("adopted") else "launched", held.node, held.workload, node_type)
    deadline = time.time() + settings.node_boot_timeout_s
    while not check_node_health(settings, held.node, timeout_s=5.0):
        reason = should_stop()
        if reason:
            stop_node(state, node_type, "job stopped while the node booted")
            raise JobStopped(reason)
        if time.time() > deadline:
            stop_node(state, node_type, "did not boot")
            raise NodeFailed(f"GPU node did not become healthy within {settings.node_boot_timeout_s:g} s "
                             "(NODE_BOOT_TIMEOUT)")
        time.sleep(1.0)
    held.checked_at = time.time()
    jobstore.record_node(state.r, state.worker_id, node_type, {"state": "running"})
    log.info("node %s is up after %.1f s", held.node, time.time() - held.launched_at)
    return held


def wait_service_ready(state: WorkerState, held: HeldNode, job_type: str, should_stop) -> None:
    """Before a node's service is first used: wait until it answers (ComfyUI answers 404/502 for minutes
    after the node's root is up). Once seen ready, a service is not checked again on that node."""
    service = READY_PATHS[job_type]
    if service in held.ready:
        return
    url = {"csm": held.urls.csm + "config", "whisper": held.urls.whisper + "config",
           "comfyui": held.urls.comfyui + "/system_stats", "ollama": held.urls.ollama + "/api/tags"}[service]
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
            if not check_node_health(state.settings, held.node):
                raise NodeDown(f"the node stopped answering while {service} was starting ({answer})")
        reason = should_stop()
        if reason:
            raise JobStopped(reason)
        if time.time() > deadline:
            raise NodeFailed(f"{service} on the GPU node was not ready within {timeout_s:g} s "
                             f"(SERVICE_READY_TIMEOUT; last answer: {last})")
        time.sleep(2.0)


# --- leak-proof launches ---------------------------------------------------------------------------
# Before each launch call the worker records a launch intent in Redis: its type, the workloads running
# before it and the time. When the answer is lost (timeout, gateway error, or the worker dies before it
# records the node), the workload that appeared in that window is found in the workloads list and
# adopted (by the launcher) or stopped (by the sweep). Workloads that appeared outside every window of
# ours, or that another live launch could own, are never touched: the account may be shared.

def launch_window_end(settings: config.Settings, intent: dict[str, Any]) -> float:
    """The latest a workload created by this launch can carry as `created` (plus clock slack)."""
    end = intent.get("ended_at") or intent["started_at"] + C3_CONNECT_TIMEOUT_S + settings.c3_read_timeout_s
    return float(end) + settings.launch_window_slack_s


def in_launch_window(settings: config.Settings, intent: dict[str, Any], workload: dict[str, Any]) -> bool:
    try:
        created = float(workload.get("created"))
    except (TypeError, ValueError):
        return False
    if workload.get("type") and workload.get("type") != intent["type"]:
        return False
    if workload.get("workload") in set(intent.get("before") or ()):
        return False
    return intent["started_at"] - settings.launch_window_slack_s <= created <= launch_window_end(settings, intent)


def launch_candidates(settings: config.Settings, intent: dict[str, Any], running: list[dict[str, Any]],
                      owned: dict[str, Any]) -> list[dict[str, Any]]:
    """Running workloads this launch may have created that no one of ours holds, closest in time first."""
    # No filter on status: a fresh node's status while it boots is not documented (and stopping one
    # that is already gone is harmless).
    found = [w for w in running if w.get("workload") and w["workload"] not in owned
             and in_launch_window(settings, intent, w)]
    return sorted(found, key=lambda w: abs(float(w["created"]) - intent["started_at"]))


SWEEP_CLAIM_S = 120  # a sweeper's claim on a workload it stops; another sweeper takes over after it
LOST_ANSWER_WAITS_S = (0.0, 1.0, 3.0)  # the provider may list a new workload a moment late


def adopt_lost_launch(settings: config.Settings, r: redis.Redis, worker_id: str, node_type: str,
                      intent_id: str, intent: dict[str, Any], sleep=time.sleep) -> dict[str, Any] | None:
    """After a launch whose answer was lost: find the workload it created and make it ours."""
    intent = dict(intent, ended_at=time.time())
    for wait_s in LOST_ANSWER_WAITS_S:
        sleep(wait_s)
        try:
            running = get_running_workloads(settings)
        except C3Error as exc:
            log.warning("could not list workloads after a lost launch answer (%s)", exc)
            continue
        for workload in launch_candidates(settings, intent, running, jobstore.owned_nodes(r)):
            launched_at = float(workload["created"])
            if jobstore.own_node(r, worker_id, node_type, workload["workload"], str(workload["node"]),
                                 launched_at, intent_id):
                log.warning("launch answer lost; adopted workload %s that appeared in the launch window",
                            workload["workload"])
                return {"workload": workload["workload"], "node": workload["node"], "launched_at": launched_at,
                        "adopted": True}
    # Nothing seen (most failed launches create nothing): the sweep watches the window until it closes.
    jobstore.orphan_launch(r, intent_id, intent["ended_at"])
    return None


def launch_node(settings: config.Settings, r: redis.Redis, worker_id: str, node_type: str,
                sleep=time.sleep, expires: int | None = None) -> dict[str, Any]:
    """Launch (or adopt) a node of node_type for this worker, leak-proof; it is recorded in Redis as this
    worker's node (booting) when this returns. Retried LAUNCH_ATTEMPTS times with exponential backoff on
    5xx, timeouts and non-JSON answers (each time after looking for the node a lost answer hid)."""
    expires = expires or default_expires(settings)
    last: C3Error | None = None
    for attempt in range(1, settings.launch_attempts + 1):
        try:
            before = [str(w.get("workload")) for w in get_running_workloads(settings)]
            started = time.time()
            intent_id = jobstore.begin_launch(r, worker_id, node_type, before, started)
            intent = {"worker": worker_id, "type": node_type, "before": before, "started_at": started}
            try:
                answer = launch_once(settings, node_type, expires)
            except C3Error as exc:
                if not exc.retryable and exc.status is not None:
                    jobstore.close_launch(r, intent_id)  # refused (4xx): nothing was created
                    raise
                adopted = adopt_lost_launch(settings, r, worker_id, node_type, intent_id, intent, sleep)
                if adopted:
                    return adopted
                raise exc from None
            launched_at = time.time()
            if jobstore.own_node(r, worker_id, node_type, str(answer["workload"]), str(answer["node"]),
                                 launched_at, intent_id):
                return {**answer, "launched_at": launched_at}
            # Another launcher took our workload for its own lost launch; ours is then its node.
            adopted = adopt_lost_launch(settings, r, worker_id, node_type, intent_id, intent, sleep)
            if adopted:
                return adopted
            raise C3Error("Comput3 launch: the launched workload was claimed by another launch", retryable=True)
        except C3Error as exc:
            last = exc
            if not exc.retryable or attempt == settings.launch_attempts:
                break
            delay = settings.launch_backoff_s * 2 ** (attempt - 1)
            log.warning("launch attempt %d/%d failed (%s); retrying in %.1f s", attempt,
                        settings.launch_attempts, exc, delay)
            sleep(delay)
    raise C3Error(f"could not launch a {node_type} GPU node: {last}")


def _stop_unheld(settings: config.Settings, r: redis.Redis, workload: dict[str, Any], why: str) -> None:
    """Stop a workload of ours that nobody holds (claimed in the registry first by the caller)."""
    seconds = time.time() - float(workload.get("created") or time.time())
    try:
        stop_workload(settings, workload["workload"])
        log.info("stopped node %s (workload %s): %s", workload.get("node"), workload["workload"], why)
    except C3Error as exc:
        log.warning("could not stop workload %s (%s): %s; retried by the next sweep", workload["workload"], why, exc)
        r.hset(config.NODES_TO_STOP_KEY, workload["workload"], str(workload.get("node") or ""))
    jobstore.forget_owned(r, workload["workload"])
    _record_node_stop(r, workload["workload"], "sweep", seconds, why)


def resolve_launch_intents(settings: config.Settings, r: redis.Redis, now: float | None = None) -> int:
    """Sweep: stop the nodes created by the launches of dead workers and by orphaned launches (answer
    lost, nothing adopted); return how many were stopped. A workload that a live launch may yet own is
    left for a later sweep; an intent is dropped once its window has closed."""
    now = time.time() if now is None else now

    def split(intents: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        alive = {worker: bool(r.exists(jobstore.heartbeat_key(worker)))
                 for worker in {i["worker"] for i in intents.values()}}
        settled = {k: i for k, i in intents.items() if i.get("orphan") or not alive[i["worker"]]}
        return settled, [i for k, i in intents.items() if k not in settled]

    if not split(jobstore.launch_intents(r))[0]:
        return 0
    try:
        running = get_running_workloads(settings)
    except C3Error as exc:
        log.warning("recovery sweep: could not list workloads to resolve launch windows (%s)", exc)
        return 0
    # Read the intents again after the list: a launch begun before the list is then seen as live.
    settled, live = split(jobstore.launch_intents(r))
    stopped = 0
    for intent_id, intent in settled.items():
        for workload in launch_candidates(settings, intent, running, jobstore.owned_nodes(r)):
            if any(in_launch_window(settings, other, workload) for other in live):
                continue  # a live launch may still record it as its own
            if jobstore.claim_workload(r, workload["workload"], {"worker": "sweep", "type": intent["type"],
                                                                 "node": workload.get("node"),
                                                                 "since": time.time()}):
                _stop_unheld(settings, r, workload, f"launched by {intent['worker']} in a launch window "
                                                    "that never recorded its node")
                stopped += 1
        if now > launch_window_end(settings, intent):
            jobstore.close_launch(r, intent_id)
    return stopped


def stop_nodes_of_dead_owners(settings: config.Settings, r: redis.Redis) -> int:
    """Sweep: stop every node in the registry of our nodes whose worker is dead (its record may be gone)."""
    stopped = 0
    for workload, owner in jobstore.owned_nodes(r).items():
        worker = owner.get("worker", "")
        if worker == "sweep":  # being stopped by a sweeper; taken over if that sweeper died meanwhile
            if time.time() - float(owner.get("since") or 0) < SWEEP_CLAIM_S:
                continue
        elif r.exists(jobstore.heartbeat_key(worker)):
            continue
        if r.set(f"sweep:workload:{workload}", "1", nx=True, ex=SWEEP_CLAIM_S):  # one sweeper at a time
            _stop_unheld(settings, r, {"workload": workload, "node": owner.get("node"),
                                       "created": owner.get("launched_at")}, f"its worker {worker} died")
            stopped += 1
    return stopped


def sweep_dead_workers(settings: config.Settings, r: redis.Redis) -> dict[str, Any]:
    """Recovery: requeue the jobs of workers whose heartbeat expired, stop their nodes, and stop the nodes
    of launches whose answer or record was lost."""
    retry_failed_stops(settings, r)
    if int(r.info("server").get("uptime_in_seconds", 0)) < settings.heartbeat_ttl_s:
        # Redis has just come back: every heartbeat may have expired while it was down. Wait until
        # live workers have had a full TTL to announce themselves before calling anyone dead.
        return {"workers": [], "requeued": 0, "failed": []}
    housekeeping.sweep(settings, r)  # webhooks of vanished workers, expired results, leftover work dirs
    summary = jobstore.requeue_abandoned(r, settings)
    for worker in summary["workers"]:
        claimed = jobstore.claim_dead_nodes(r, worker)
        if claimed is None:
            continue
        retry = False
        for node_type, record in claimed:
            if record.get("workload") and not _stop_dead_workers_node(settings, r, worker, record):
                retry = True
                continue
            jobstore.release_node(r, worker, node_type, workload=record.get("workload", ""))
        if retry:
            r.delete(f"sweep:{worker}")  # let the next sweep try again
    summary["stopped_unrecorded"] = resolve_launch_intents(settings, r) + stop_nodes_of_dead_owners(settings, r)
    if summary["requeued"] or summary["failed"]:
        log.info("recovery sweep: %d job(s) requeued, %d failed after MAX_ATTEMPTS, dead workers %s",
                 summary["requeued"], len(summary["failed"]), ", ".join(summary["workers"]))
    return summary


def _stop_dead_workers_node(settings: config.Settings, r: redis.Redis, worker: str, record: dict[str, str]) -> bool:
    """Stop the recorded node of a dead worker; False when that failed and must be tried again."""
    seconds = time.time() - float(record.get("launched_at") or time.time())
    try:
        stop_workload(settings, record["workload"])
        log.info("stopped node %s of dead worker %s after %.1f node-seconds", record.get("node"), worker, seconds)
    except C3Error as exc:
        # A node already stopped, expired or dead answers stop with a 404: it is gone, so the
        # record and its MAX_NODES slot must go too (retrying forever would leak the slot).
        try:
            gone = record["workload"] not in {w.get("workload") for w in get_running_workloads(settings)}
        except C3Error:
            gone = False
        if not gone:
            log.warning("could not stop node of dead worker %s: %s", worker, exc)
            return False
        log.info("node %s of dead worker %s was already gone (%s)", record.get("node"), worker, exc)
    _record_node_stop(r, record["workload"], worker, seconds, "worker died")
    return True


# --- running one job ---------------------------------------------------------------------------

def fetch_inputs(settings: config.Settings, job_type: str, params: dict[str, Any], job_id: str,
                 work_dir: Path) -> dict[str, Path]:
    """Download the job's input URLs and check them, before any GPU time is spent."""
    wanted: list[tuple[str, str, str]] = []  # (role, field, kind)
    if job_type == "csm" and params.get("voice") == "clone":
        wanted.append(("reference_audio", "reference_audio_url", "audio"))
    elif job_type == "whisper":
        wanted.append(("audio", "audio_url", "audio"))
    elif job_type == "portrait":
        wanted += [("image", "image_url", "image"), ("audio", "audio_url", "audio")]
    elif job_type == "analyze":
        wanted.append(("image", "image_url", "image"))
    inputs: dict[str, Path] = {}
    for role, name, kind in wanted:
        dest = work_dir / f"{job_id}_download_{role}"
        netfetch.download(params[name], dest, field=name, max_bytes=settings.max_input_bytes,
                          allowlist=settings.url_allowlist, total_timeout=settings.download_timeout_s)
        if kind == "image":
            media_check.check_image(dest, field=name, max_pixels=settings.max_image_pixels)
        else:
            media_check.check_audio(dest, field=name, max_seconds=settings.max_audio_seconds)
        inputs[role] = dest
    return inputs


def make_should_stop(state: WorkerState, job_id: str, started: float, max_time: int, complete_by: float):
    """should_stop() for one job: cancel (polled from Redis each second), max_time, complete_by, shutdown."""
    last_poll = [0.0]
    cancelled = [False]

    def should_stop() -> str | None:
        now = time.time()
        if not cancelled[0] and state.shutdown_deadline is not None and now > state.shutdown_deadline:
            return SHUTDOWN_REASON  # without one more poll: a Redis that does not answer would delay it
        if now - last_poll[0] >= 1.0:
            last_poll[0] = now
            try:
                cancelled[0] = jobstore.stop_requested(state.r, job_id)
            except redis.RedisError:
                pass  # keep working through a Redis blip; the result is recorded when it is back
        if cancelled[0]:
            return CANCEL_REASON
        if now - started > max_time:
            return f"max_time of {max_time} s exceeded (the job ran too long and was stopped)"
        if now > complete_by:
            return "complete_by deadline passed (the job was stopped unfinished)"
        if state.shutdown_deadline is not None and now > state.shutdown_deadline:
            return SHUTDOWN_REASON
        return None

    return should_stop


def job_phase(state: WorkerState, job_id: str):
    """phase(name) for one job: recorded on its record for /status (best effort, like progress); a
    repeat of the last name (engines report it at each poll) costs no Redis call."""
    last = [""]

    def phase(name: str) -> None:
        if name == last[0]:
            return
        last[0] = name
        try:
            jobstore.set_phase(state.r, job_id, name)
        except redis.RedisError:
            pass
    return phase


def run_engine_on_node(state: WorkerState, job_type: str, params: dict[str, Any], job_id: str,
                       inputs: dict[str, Path], work_dir: Path, should_stop) -> Path | str:
    """Get a node of the job's type and run the engine; a node failure is retried on a fresh node
    NODE_FAILURE_RETRIES times."""
    engine = ENGINES[job_type]
    node_type = node_type_for(state.settings, job_type)
    tries = 1 + max(0, state.settings.node_failure_retries)
    phase = job_phase(state, job_id)
    for attempt in range(1, tries + 1):
        phase("waiting_for_node")
        held = ensure_node(state, should_stop, node_type, phase)
        held.last_used = time.time()

        def progress(percent: int) -> None:
            try:
                jobstore.set_progress(state.r, job_id, percent)
            except redis.RedisError:
                pass

        try:
            try:
                wait_service_ready(state, held, job_type, should_stop)
            except NodeFailed:
                stop_node(state, node_type, "a service never became ready")
                raise
            job = JobContext(job_id=job_id, params=params, inputs=inputs, node=held.urls, work_dir=work_dir,
                             settings=state.settings, should_stop=should_stop, progress=progress, phase=phase)
            output = engine(job)
            held.checked_at = time.time()  # it just did a job: known good for NODE_CHECK_TTL
            return output
        except (JobStopped, NodeFailed):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure (NodeDown included): was it the node?
            detail = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            problem = node_usable(state, node_type, force=True)
            if not problem:
                if isinstance(exc, EngineError):
                    raise
                raise EngineError(f"{job_type} failed: {detail}") from None
            log.warning("node %s failed during job %s (%s): %s", held.node, job_id, problem, detail)
            stop_node(state, node_type, f"failed during a job: {problem}", release_slot=attempt == tries)
            if attempt == tries:
                raise NodeFailed(f"the GPU node failed during the job ({problem})") from None
            log.info("retrying job %s on a new node", job_id)
        finally:
            if node_type in state.nodes:
                state.nodes[node_type].last_used = time.time()
    raise NodeFailed("the GPU node failed during the job")


# After a stopped job, how to see whether the node still works on it (None: nothing tells). ComfyUI's
# /queue shows the SONIC sampler, which ignores /interrupt; Gradio's queue does not show a cancelled
# CSM generation that runs on in its thread, so csm/whisper have no check (README: "What a cancel costs").
BUSY_CHECKS = {"portrait": comfyui.node_busy}


def drain_node(state: WorkerState, job_type: str, job_id: str) -> None:
    """After a stopped job (already reported), keep the node from the next job while it still works on
    the stopped one: wait up to NODE_DRAIN_TIMEOUT (node time of the stopped job), else replace it."""
    node_type = node_type_for(state.settings, job_type)
    held, check = state.nodes.get(node_type), BUSY_CHECKS.get(job_type)
    if held is None or check is None:
        return
    started = time.time()
    while check(held.urls):
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


def store_result(state: WorkerState, job_type: str, job_id: str, output: Path | str,
                 work_dir: Path) -> dict[str, str]:
    settings = state.settings
    secret = jobstore.file_url_secret(state.r, settings.file_url_secret)
    if isinstance(output, str):
        text_path = work_dir / f"{job_id}.txt"
        if not text_path.exists():
            text_path.write_text(output, encoding="utf-8")
        storage.upload_with_retry(settings, text_path, f"{job_id}.txt", secret, settings.result_ttl_s)
        return {"text": output}
    name = RESULT_NAMES[job_type].format(id=job_id)
    url = storage.upload_with_retry(settings, Path(output), name, secret, settings.result_ttl_s)
    return {"result_url": url}


def run_job(state: WorkerState, entry: str) -> None:
    """Run one taken queue entry to its end; the entry is acknowledged unless the job goes back."""
    settings, worker_id = state.settings, state.worker_id
    r = state.r  # calls made after a SIGTERM use state.r, by then the short-timeout client
    job_id = json.loads(entry)["id"]
    changed, status = jobstore.transition(r, settings, job_id, "running", {"worker": worker_id})
    if not changed:
        log.info("job %s is %s; skipping it", job_id, status)
        jobstore.ack(r, worker_id, entry)
        return
    record = jobstore.get_job(r, job_id) or {}
    job_type = record.get("type", "")
    params = jobstore.job_params(record)
    started = time.time()
    complete_by = float(record.get("complete_by") or started + 3600)

    def finish(new_status: str, fields: dict[str, Any]) -> None:
        if fields.get("error"):  # no server paths in what the client sees
            fields = {**fields, "error": storage.scrub_paths(settings, str(fields["error"]))}
        # Ride out a short Redis outage here rather than throw the finished work away: the transition is
        # idempotent (a retry after a lost reply finds the job finished and changes nothing). Not past
        # WORKER_GRACE_S on SIGTERM: the entry stays in our processing list for the sweep to give back.
        for wait_s in (0.5, 1, 2, 4, 8, 0):
            try:
                done, now_status = jobstore.transition(state.r, settings, job_id, new_status, fields,
                                                       worker_id=worker_id)
                break
            except redis.RedisError:
                past_grace = state.shutdown_deadline is not None and time.time() + wait_s > state.shutdown_deadline
                if not wait_s or past_grace:
                    raise  # the main loop gives the entry back to the queue once Redis answers
                log.warning("job %s: Redis unavailable while recording the %s; retrying in %g s", job_id,
                            new_status, wait_s)
                time.sleep(wait_s)
        if not done:
            log.info("job %s: result dropped, the job is already %s", job_id, now_status)
        jobstore.ack(state.r, worker_id, entry)

    if record.get("cancel_requested") == "1":
        finish("cancelled", {"error": CANCEL_REASON})
        return
    if started > complete_by:
        finish("failed", {"error": "expired before it started: its complete_by time passed while it was "
                                   "queued"})
        return
    log.info("job %s (%s) started, attempt %s", job_id, job_type, record.get("attempts"))
    work_dir = Path(settings.work_dir) / job_id
    work_dir.mkdir(parents=True, exist_ok=True)
    should_stop = make_should_stop(state, job_id, started, int(params["max_time"]), complete_by)
    try:
        job_phase(state, job_id)("downloading")
        storage.wait_for_free_space(settings, should_stop)  # before inputs and outputs are written
        inputs = fetch_inputs(settings, job_type, params, job_id, work_dir)
        reason = should_stop()
        if reason:
            raise JobStopped(reason)
        output = run_engine_on_node(state, job_type, params, job_id, inputs, work_dir, should_stop)
        job_phase(state, job_id)("storing")
        fields = store_result(state, job_type, job_id, output, work_dir)
        finish("success", fields)
        log.info("job %s succeeded in %.1f s", job_id, time.time() - started)
    except JobStopped as exc:
        reason = str(exc)
        if reason == SHUTDOWN_REASON:
            jobstore.put_back(state.r, worker_id, job_id, entry)
            log.info("job %s put back on the queue (worker shutting down)", job_id)
        elif reason == CANCEL_REASON:
            finish("cancelled", {"error": CANCEL_REASON})
            log.info("job %s cancelled", job_id)
        else:
            finish("failed", {"error": reason})
            log.info("job %s stopped: %s", job_id, reason)
        if reason != SHUTDOWN_REASON:
            drain_node(state, job_type, job_id)
    except media_check.ToolKilled as exc:
        # A stop of the whole process group (systemd, docker) kills ffprobe/ffmpeg with the worker: the job
        # goes back. Otherwise (the OOM killer, say) it fails, saying so, rather than blaming the input.
        if state.stopping.wait(1.0):
            jobstore.put_back(state.r, worker_id, job_id, entry)
            log.info("job %s put back on the queue (%s; worker shutting down)", job_id, exc)
        else:
            finish("failed", {"error": f"{exc}; the worker may be short of memory, try again later"})
            log.warning("job %s failed: %s", job_id, exc)
    except (netfetch.FetchError, media_check.MediaError, EngineError, NodeFailed) as exc:
        finish("failed", {"error": str(exc)})
        log.info("job %s failed: %s", job_id, exc)
    except storage.StorageError as exc:
        finish("failed", {"error": str(exc)})
        log.warning("job %s: storage failed: %s", job_id, exc)
    except redis.RedisError:
        raise  # the entry stays in our processing list; the main loop requeues it once Redis answers
    except Exception as exc:  # noqa: BLE001 - report, never crash the worker on one job
        log.exception("job %s failed unexpectedly", job_id)
        finish("failed", {"error": f"internal error while running the job ({type(exc).__name__})"})
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


# --- the worker process ------------------------------------------------------------------------

def heartbeat_loop(state: WorkerState) -> None:
    """Keep the heartbeat alive and run the recovery sweep every SWEEP_INTERVAL_S. After a SIGTERM the
    heartbeat goes on (no more sweeps) until the running job is settled: a job finishing within
    WORKER_GRACE_S must not look abandoned to other workers' sweeps, which would run it again."""
    r = jobstore.connect(state.settings.redis_url)
    interval = max(0.2, state.settings.heartbeat_ttl_s / 3)
    next_sweep = 0.0
    while not state.settled.is_set():
        try:
            jobstore.heartbeat(r, state.worker_id, state.settings.heartbeat_ttl_s)
            if time.time() >= next_sweep and not state.stopping.is_set():
                next_sweep = time.time() + state.settings.sweep_interval_s
                sweep_dead_workers(state.settings, r)
        except redis.RedisError as exc:
            log.warning("heartbeat: Redis unavailable (%s)", type(exc).__name__)
        except Exception:  # noqa: BLE001 - the heartbeat thread must not die
            log.exception("heartbeat/sweep error")
        state.settled.wait(interval)


def check_startup(settings: config.Settings) -> None:
    for line in config.retired_variables_set():
        log.warning("configuration: %s", line)
    if not settings.c3_api_key:
        raise SystemExit("configuration error: C3_API_KEY is not set; the worker needs a Comput3 API key "
                         "(for the local dev node any value works, e.g. C3_API_KEY=dev)")
    if problems := config.node_url_problems(settings):
        raise SystemExit(f"configuration error: {problems[0]}")
    try:
        netfetch.parse_allowlist(settings.url_allowlist)
    except ValueError as exc:
        raise SystemExit(f"configuration error: URL_ALLOWLIST: {exc}") from None
    try:
        storage.ensure_bucket(settings)
    except storage.StorageError as exc:
        raise SystemExit(f"storage error: {exc}") from None


def check_workload_types(settings: config.Settings) -> list[str]:
    """Ask the provider which workload types it offers (GET /types) and say clearly in the log when a
    configured one is not among them; return the missing ones. A provider without /types is no error."""
    try:
        offered = get_workload_types(settings)
    except C3Error as exc:
        if exc.status in (404, 405):
            log.info("Comput3 offers no list of workload types (GET /types: %s); not checked", exc)
        else:
            log.warning("could not ask Comput3 which workload types it offers (%s); not checked", exc)
        return []
    wanted = {"C3_WORKLOAD_TYPE": settings.workload_type, "C3_ANALYZE_WORKLOAD_TYPE": settings.analyze_workload_type}
    missing = []
    for name, kind in wanted.items():
        if kind not in offered:
            missing.append(kind)
            log.error("%s=%s is not offered by Comput3 (offered: %s): jobs that need it will fail at launch",
                      name, kind, ", ".join(offered) or "none")
    if not missing:
        log.info("Comput3 offers the configured workload types %s", ", ".join(sorted(set(wanted.values()))))
    return missing


def work(state: WorkerState) -> None:
    """Take and run jobs until asked to stop; stop each node when idle."""
    settings = state.settings
    backoff = 0.5
    recover = True  # entries in our processing list while no job runs were cut short: give them back
    while not state.stopping.is_set():
        try:
            if recover:
                # announce ourselves before the first take (the heartbeat thread keeps it up after)
                jobstore.heartbeat(state.r, state.worker_id, settings.heartbeat_ttl_s)
                requeued, failed = jobstore.requeue_processing(state.r, settings, state.worker_id)
                forget_unheld_nodes(state)
                recover = False
                state.entry = None
                if requeued or failed:
                    log.info("gave %d job(s) cut short by a Redis error back to the queue (%d failed after "
                             "MAX_ATTEMPTS)", requeued, len(failed))
            for node_type, held in list(state.nodes.items()):  # each node has its own idle timer
                if time.time() - held.last_used > settings.gpu_idle_timeout_s:
                    stop_node(state, node_type, f"idle for {settings.gpu_idle_timeout_s:g} s")
            # A worker without a node takes a job only when it can reserve a node slot: at the MAX_NODES
            # cap it leaves the queue to the workers that hold nodes instead of sitting on a job.
            if not state.nodes and not jobstore.acquire_node_slot(state.r, state.worker_id, settings.max_nodes):
                state.stopping.wait(1.0)
                continue
            entry = state.entry = jobstore.take(state.r, state.worker_id, 1.0)
            if entry is None and not state.nodes:
                jobstore.release_node(state.r, state.worker_id, jobstore.RESERVED)  # give the reservation back
            if entry is not None and state.stopping.is_set():
                jobstore.return_entry(state.r, state.worker_id, entry)  # taken as we were told to stop
            elif entry is not None:
                run_job(state, entry)
                state.entry = None  # settled; a Redis error leaves it in our processing list (and set)
                if state.nodes:  # a reservation the job did not turn into a node goes back
                    jobstore.release_node(state.r, state.worker_id, jobstore.RESERVED)
            state.entry = None
            backoff = 0.5
        except redis.RedisError as exc:
            if state.stopping.is_set():  # asked to stop: Redis is not retried, shut_down says what is left
                state.redis_lost = type(exc).__name__
                return
            log.warning("Redis unavailable (%s); retrying in %.1f s", type(exc).__name__, backoff)
            recover = True
            state.stopping.wait(backoff)
            backoff = min(backoff * 2, 15.0)


def shut_down(state: WorkerState, webhook_stop: threading.Event, senders: webhooks.Senders) -> None:
    """After work(): stop the held nodes, hand the in-flight webhooks back and retire the worker, in
    bounded time even when Redis is gone. The Redis steps use a client with short timeouts and are
    skipped once Redis does not answer (the Comput3 stop calls are not); one line then says what was left
    undone: the recovery sweep of a live worker does it once Redis answers and our heartbeat expired."""
    settings, worker_id = state.settings, state.worker_id
    state.settled.set()  # no job runs any more: the heartbeat stops (retire_worker removes it below)
    state.r = jobstore.connect(settings.redis_url, timeout_s=EXIT_REDIS_TIMEOUT_S)
    if not state.redis_lost:  # work() ended on a Redis error after the SIGTERM: not asked again
        try:
            state.r.ping()
        except redis.RedisError as exc:
            state.redis_lost = type(exc).__name__
    stop_all_nodes(state, "worker shutting down")
    unreturned = 0
    if not state.redis_lost:
        # one try: Redis answered just now, and a retry would hold the exit (the sweep covers a miss)
        returned = webhooks.stop_delivery(state.r, worker_id, webhook_stop, senders, retry_waits=())
        if returned is None:
            state.redis_lost = "no answer"
    if state.redis_lost:
        unreturned = webhooks.abandon_delivery(webhook_stop, senders)
    if not state.redis_lost:
        try:
            if state.entry is not None:  # cut short by a Redis error before: no job runs now, so it goes back
                jobstore.requeue_processing(state.r, settings, worker_id)
                state.entry = None
            if state.r.llen(jobstore.processing_key(worker_id)) == 0:
                jobstore.retire_worker(state.r, worker_id)
            return
        except redis.RedisError as exc:
            state.redis_lost = type(exc).__name__
    undone = []
    if unreturned:
        undone.append(f"hand back {unreturned} in-flight webhook deliveries")
    if state.entry is not None:
        undone.append(f"give job {json.loads(state.entry)['id']} back to the queue")
    if state.unrecorded_stops:
        undone.append(f"record the stop of {state.unrecorded_stops} node(s) (the nodes were stopped)")
    if state.unstopped_nodes:
        undone.append(f"stop {state.unstopped_nodes} node(s) (Comput3's stop failed; they are in the registry "
                      "of our nodes, which the sweep stops)")
    log.warning("Redis unreachable on the way out (%s): could not %s; the recovery sweep of a live worker "
                "does that once Redis answers and this worker's heartbeat (HEARTBEAT_TTL) has expired",
                state.redis_lost, ", ".join(undone or ["retire this worker (nothing else was in flight)"]))


def run() -> int:
    """The worker's life: start, take and run jobs until asked to stop, shut down; the exit code."""
    settings = config.load()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_startup(settings)
    media_check.return_large_frees()  # memory of a big input goes back to the system after the job
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    state = WorkerState(settings=settings, r=jobstore.connect(settings.redis_url), worker_id=worker_id)
    webhook_stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if state.shutdown_deadline is None:
            log.info("signal %d: finishing the running job (up to WORKER_GRACE_S=%g s), then exiting",
                     signum, settings.worker_grace_s)
            state.shutdown_deadline = time.time() + settings.worker_grace_s
            # From now on the job's Redis calls wait at most EXIT_REDIS_TIMEOUT_S each (a frozen Redis)
            state.r = jobstore.connect(settings.redis_url, timeout_s=EXIT_REDIS_TIMEOUT_S)
        state.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("worker %s started; queue %s, Comput3 API %s", worker_id, config.QUEUE_KEY, settings.c3_api_url)
    check_workload_types(settings)
    threading.Thread(target=heartbeat_loop, args=(state,), name="heartbeat", daemon=True).start()
    senders = webhooks.start_delivery(settings, worker_id, webhook_stop)
    work(state)
    shut_down(state, webhook_stop, senders)
    log.info("worker %s stopped; %.1f node-seconds used", worker_id, state.node_seconds)
    return 0


def main() -> NoReturn:
    """`python c3_render_worker.py` and the `c3-render-worker` command."""
    try:
        code = run()
    except SystemExit as exc:  # a configuration error: its message and status, as sys.exit gives them
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except Exception:
        log.exception("the worker failed")
        code = 1
    # End now: a webhook attempt thread still waiting on a slow receiver (its delivery was handed back,
    # or is left for the sweep) must not hold the exit, as the interpreter's join of executor threads would.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
