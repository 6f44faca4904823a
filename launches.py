"""Leak-proof launches: no node we pay for is ever left without an owner.

The provider lets no client label a workload (docs/node-protocols.md, Comput3 control API), so before
each launch call the worker records a launch intent in Redis: its type, the workloads running before it
and the time (its launch window). When the answer is lost (timeout, gateway error, or the worker dies
before it records the node), the workload that appeared in that window is found in the workloads list
and adopted by the launcher (`adopt_lost_launch`) or stopped by the recovery sweep (sweep.py, with the
window helpers below). Workloads that appeared outside every window of ours, or that another live launch
could own, are never touched: the account may be shared.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis

import comput3
import config
import nodestore
from comput3 import C3Error
from engine_api import JobStopped, ShouldStop, pause

log = logging.getLogger("c3-render.worker")

LOST_ANSWER_WAITS_S = (0.0, 1.0, 3.0)  # the provider may list a new workload a moment late


def default_expires(settings: config.Settings) -> int:
    """When the provider is to stop a node by itself: past NODE_MAX_AGE, with NODE_EXPIRES_MARGIN to spare."""
    return int(time.time() + settings.node_max_age_s + settings.node_expires_margin_s)


def launch_window_end(settings: config.Settings, intent: dict[str, Any]) -> float:
    """The latest a workload created by this launch can carry as `created` (plus clock slack)."""
    end = intent.get("ended_at") or intent["started_at"] + comput3.CONNECT_TIMEOUT_S + settings.c3_read_timeout_s
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


def adopt_lost_launch(settings: config.Settings, r: redis.Redis, worker_id: str, node_type: str, node_id: str,
                      intent_id: str, intent: dict[str, Any],
                      sleep: Callable[[float], None] = time.sleep) -> dict[str, Any] | None:
    """After a launch whose answer was lost: find the workload it created and make it pool node node_id's."""
    intent = dict(intent, ended_at=time.time())
    for wait_s in LOST_ANSWER_WAITS_S:
        sleep(wait_s)
        try:
            running = comput3.get_running_workloads(settings)
        except C3Error as exc:
            log.warning("could not list workloads after a lost launch answer (%s)", exc)
            continue
        for workload in launch_candidates(settings, intent, running, nodestore.owned_nodes(r)):
            launched_at = float(workload["created"])
            expires = float(workload.get("expires") or launched_at + settings.node_max_age_s)
            if nodestore.own_node(r, node_id, worker_id, node_type, workload["workload"], str(workload["node"]),
                                  launched_at, expires, intent_id):
                log.warning("launch answer lost; adopted workload %s that appeared in the launch window",
                            workload["workload"])
                return {"workload": workload["workload"], "node": workload["node"], "launched_at": launched_at,
                        "expires": expires, "adopted": True}
    # Nothing seen (most failed launches create nothing): the sweep watches the window until it closes.
    nodestore.orphan_launch(r, intent_id, intent["ended_at"])
    return None


def launch_in_window(settings: config.Settings, r: redis.Redis, worker_id: str, node_type: str, node_id: str,
                     expires: int, sleep: Callable[[float], None]) -> dict[str, Any]:
    """One launch inside a recorded launch window: the workload becomes pool node node_id's (booting), or
    the one a lost answer hid is adopted; C3Error otherwise (a refusal closes the window: nothing was
    created). Any other failure leaves the window to the sweep (orphaned), which stops what the launch
    created."""
    before = [w["workload"] for w in comput3.get_running_workloads(settings)]
    started = time.time()
    intent_id = nodestore.begin_launch(r, worker_id, node_type, before, started)
    intent = {"worker": worker_id, "type": node_type, "before": before, "started_at": started}
    try:
        return launch_recorded(settings, r, worker_id, node_type, node_id, expires, sleep, intent_id, intent)
    except C3Error:
        raise  # its window is closed, adopted or orphaned already
    except Exception:
        nodestore.orphan_launch(r, intent_id, time.time())
        raise


def launch_recorded(settings: config.Settings, r: redis.Redis, worker_id: str, node_type: str, node_id: str,
                    expires: int, sleep: Callable[[float], None], intent_id: str,
                    intent: dict[str, Any]) -> dict[str, Any]:
    """The launch call of a recorded launch intent, and what its answer (or its loss) means."""
    try:
        answer = comput3.launch_workload(settings, node_type, expires)
    except C3Error as exc:
        if not exc.retryable and exc.status is not None:
            nodestore.close_launch(r, intent_id)  # refused (4xx): nothing was created
            raise
        adopted = adopt_lost_launch(settings, r, worker_id, node_type, node_id, intent_id, intent, sleep)
        if adopted:
            return adopted
        raise exc from None
    launched_at = time.time()
    if nodestore.own_node(r, node_id, worker_id, node_type, str(answer["workload"]), str(answer["node"]),
                          launched_at, expires, intent_id):
        return {**answer, "launched_at": launched_at, "expires": expires}
    # Another launcher took our workload for its own lost launch (or our pool node was given up).
    adopted = adopt_lost_launch(settings, r, worker_id, node_type, node_id, intent_id, intent, sleep)
    if adopted:
        return adopted
    raise C3Error("Comput3 launch: the launched workload was claimed by another launch", retryable=True)


def launch_node(settings: config.Settings, r: redis.Redis, worker_id: str, node_type: str, node_id: str,
                sleep: Callable[[float], None] = time.sleep, expires: int | None = None,
                attempts: int | None = None, should_stop: ShouldStop | None = None) -> dict[str, Any]:
    """Launch (or adopt) a node of node_type for pool node node_id (reserved by the caller), leak-proof; it
    is recorded in Redis as booting when this returns. Retried LAUNCH_ATTEMPTS (or attempts) times with
    exponential backoff on 5xx, timeouts and non-JSON answers (each time after looking for the node a
    lost answer hid). A stop of the job (should_stop: its cancel, max_time) is seen between the
    attempts, during the backoff and while a lost answer's node is looked for, not only when they are
    over: JobStopped, no more launches, and the open launch window is left to the sweep."""
    expires = expires or default_expires(settings)
    last: C3Error | None = None
    attempts = attempts or settings.launch_attempts

    def wait(seconds: float) -> None:
        pause(seconds, should_stop, sleep)

    for attempt in range(1, attempts + 1):
        if should_stop is not None and (reason := should_stop()):
            raise JobStopped(reason)
        try:
            return launch_in_window(settings, r, worker_id, node_type, node_id, expires, wait)
        except C3Error as exc:
            last = exc
            if not exc.retryable or attempt == attempts:
                break
            delay = settings.launch_backoff_s * 2 ** (attempt - 1)
            log.warning("launch attempt %d/%d failed (%s); retrying in %.1f s", attempt, attempts, exc, delay)
            wait(delay)
    raise C3Error(f"could not launch a {node_type} GPU node: {last}")
