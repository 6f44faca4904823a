"""The Comput3.ai control API, as the spec names its calls (docs/node-protocols.md, Comput3 control API).

`launch_workload()`, `check_node_health()` and `stop_workload()` are the spec's three functions; beside
them the two listings the worker needs: `get_running_workloads()` (POST /workloads) and
`get_workload_types()` (GET /types, and `check_workload_types()`, the start-up check that names a
configured type the provider does not offer). One call, one answer: retries and leak-proof launches are
launches.py's, what a node is for is nodes.py's. `check_node_health` is the one node health check, used
by the worker and by the engines (to tell a node that went away from a service that answered badly).
`get_running_workloads` is the one place that checks the shape of the workloads list: its callers read
every record it returns as an object with a string `workload`.
"""

from __future__ import annotations

import logging
from typing import Any

import requests

import config
from engine_api import NodeUrls

log = logging.getLogger("c3-render.worker")

CONNECT_TIMEOUT_S = 10  # the read timeout is C3_READ_TIMEOUT


class C3Error(Exception):
    """A Comput3 control API call failed; str() is safe to show (no key). `retryable` for 5xx, timeouts
    and non-JSON answers; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, retryable: bool = False, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status


def c3_headers(settings: config.Settings) -> dict[str, str]:
    return {"X-C3-API-KEY": settings.c3_api_key, "Content-Type": "application/json",
            "Origin": settings.c3_origin}


def call(settings: config.Settings, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One call; raises C3Error saying what went wrong, with `retryable` set for 5xx/timeouts/non-JSON."""
    url = f"{settings.c3_api_url}/{path}"
    try:
        response = requests.request(method, url, json=body, headers=c3_headers(settings),
                                    timeout=(CONNECT_TIMEOUT_S, settings.c3_read_timeout_s))
    except requests.Timeout:
        raise C3Error(f"Comput3 {path}: timed out", retryable=True) from None
    except requests.ConnectionError:
        # its URL is not repeated: this text can become a job's error (the worker logs C3_API_URL at start)
        raise C3Error(f"Comput3 {path}: cannot connect to the Comput3 API (C3_API_URL)", retryable=True) from None
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


def launch_workload(settings: config.Settings, workload_type: str, expires: int) -> dict[str, Any]:
    """One launch call: {"node", "workload", ...}. No retry here: a failed launch may still have created
    a node (launches.launch_node finds it)."""
    answer = call(settings, "POST", "launch", {"type": workload_type, "expires": expires})
    if not isinstance(answer, dict) or not answer.get("workload") or not answer.get("node"):
        raise C3Error("Comput3 launch: answer has no workload or node", retryable=True)
    return answer


def get_running_workloads(settings: config.Settings) -> list[dict[str, Any]]:
    """The account's running workloads (records with workload, node, type, status, created, expires).

    Every record returned is an object with a non-empty string `workload`: any other item of the list (a
    string, null, a number, a record without an id) is dropped, and one warning says how many, so that
    one odd record neither aborts the sweep nor a launch.
    """
    answer = call(settings, "POST", "workloads", {"running": True})
    if not isinstance(answer, list):
        raise C3Error("Comput3 workloads: answer is not a list")
    records = [item for item in answer if isinstance(item, dict) and isinstance(item.get("workload"), str)
               and item["workload"]]
    if len(records) < len(answer):
        log.warning("Comput3 workloads: dropped %d of %d records that are not an object with a workload id",
                    len(answer) - len(records), len(answer))
    return records


def get_workload_types(settings: config.Settings) -> list[str]:
    """The workload types the provider offers (GET /types: a list of names, or of records with one)."""
    answer = call(settings, "GET", "types")
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


def check_node_health(node: NodeUrls, timeout_s: float = 10.0) -> bool:
    """True when the node answers 200 at its root URL (the node itself, not one of its services)."""
    try:
        response = requests.get(node.base + "/", headers=node.headers(), timeout=(min(5.0, timeout_s), timeout_s))
    except requests.RequestException:
        return False
    return response.status_code == 200


def stop_workload(settings: config.Settings, workload_id: str) -> dict[str, Any]:
    """Stop a workload. One the provider no longer knows (404) is already stopped: that is success."""
    try:
        answer = call(settings, "POST", "stop", {"workload": workload_id})
    except C3Error as exc:
        if exc.status == 404:
            return {"already_stopped": True}
        raise
    return answer if isinstance(answer, dict) else {}


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
