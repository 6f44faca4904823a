"""Calling a Gradio app on a node: the CSM and WhisperX apps (docs/node-protocols.md, Gradio apps on the nodes).

This module owns `call`: submit one call to an app with gradio_client, poll it, honour the job's
should_stop (the Gradio job is cancelled), report the job's phase from the Gradio job's status and its
progress from the app's progress units, map the app's errors to EngineError, and retry one HTTP 5xx
answer when the node itself is healthy. Plus what reading an app needs: `endpoint_input_names` (the
inputs an app version declares) and `first_path` (the file in an app's output).

Transport failures (node unreachable, connection dropped) propagate unchanged so the worker can treat
them as a node problem (nodes.run_on_node words them with engine_api.failure_text), and so do
gradio_client's errors of reaching the app ("Could not fetch config for <the app's URL>"). gradio_client
names the app's URL in its errors: what this module puts in an EngineError goes through
engine_api.without_addresses.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import comput3
from engine_api import EngineError, JobContext, JobStopped, without_addresses

log = logging.getLogger(__name__)

# gradio_client ignores Client(analytics_enabled=False) unless this env says so too (it ORs the two),
# and huggingface_hub reads its telemetry switch when imported: set both before gradio_client loads.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

POLL_INTERVAL_S = 0.5
# Where a Gradio job is, from its status code: still sending its inputs, waiting in the app's queue
# behind other work on the node (e.g. a cancelled generation that Gradio could not stop), or running.
PHASES = {"STARTING": "uploading_inputs", "JOINING_QUEUE": "uploading_inputs", "IN_QUEUE": "waiting_for_node",
          "SENDING_DATA": "rendering", "PROCESSING": "rendering", "ITERATING": "rendering", "PROGRESS": "rendering"}

Kwargs = dict[str, Any] | Callable[[set[str]], dict[str, Any]]


def call(job: JobContext, url: str, api_name: str, kwargs: Kwargs, label: str) -> Any:
    """Submit one call to the Gradio app at url (on job.node) and wait for it while honouring job.should_stop.

    kwargs may be a function of the endpoint's declared input names (to adapt to app versions).
    Returns the app's output; files it names are downloaded under job.work_dir/"gradio". Raises JobStopped
    (after cancelling the Gradio job) or EngineError(f"{label} failed: <app message>"). An HTTP 5xx answer
    (a transient app error) is retried once when the node still answers its health check.
    """
    try:
        return _call_once(job, url, api_name, kwargs, label)
    except Exception as exc:
        if not (_server_error(exc) and comput3.check_node_health(job.node)):
            raise
        log.warning("%s: the app answered HTTP %s on a healthy node; retrying once", label,
                    exc.response.status_code)  # type: ignore[attr-defined]
    return _call_once(job, url, api_name, kwargs, label)


def _call_once(job: JobContext, url: str, api_name: str, kwargs: Kwargs, label: str) -> Any:
    reason = job.should_stop()
    if reason:
        raise JobStopped(reason)
    from gradio_client import Client

    download_dir = job.work_dir / "gradio"
    download_dir.mkdir(parents=True, exist_ok=True)
    client = Client(url, headers=job.node.headers(), verbose=False, download_files=str(download_dir),
                    analytics_enabled=False)
    try:
        if callable(kwargs):
            kwargs = kwargs(endpoint_input_names(client, api_name))
        try:
            job.phase("uploading_inputs")
            pending = client.submit(api_name=api_name, **kwargs)
        except (ValueError, TypeError) as exc:  # unknown api_name or input names: the app differs
            raise EngineError(f"{label} failed: {without_addresses(str(exc))}") from exc
        _wait_until_done(job, pending, label)
        return _result(pending, label)
    finally:
        try:
            client.close()
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            log.debug("closing the Gradio client failed: %s", exc)


def _wait_until_done(job: JobContext, pending: Any, label: str) -> None:
    """Poll the Gradio job until it is done; on a stop, cancel it and raise JobStopped."""
    while not pending.done():
        reason = job.should_stop()
        if reason:
            try:
                # Removes the job from the app's queue and cancels its task; a function already
                # running in a worker thread on the node is not interrupted (see tests).
                pending.cancel()
            except Exception as exc:  # noqa: BLE001 - we stop anyway
                log.warning("%s: cancelling the Gradio job failed: %s", label, exc)
            raise JobStopped(reason)
        _report_progress(job, pending)
        time.sleep(POLL_INTERVAL_S)


def _result(pending: Any, label: str) -> Any:
    """The finished Gradio job's output; the app's errors as EngineError."""
    from gradio_client.exceptions import AppError

    try:
        return pending.result()
    except AppError as exc:
        raise EngineError(f"{label} failed: {without_addresses(str(exc.message or exc))}") from exc
    except (ValueError, TypeError, KeyError) as exc:  # gradio_client's own "bad answer" errors
        raise EngineError(f"{label} failed: {without_addresses(str(exc))}") from exc


def _report_progress(job: JobContext, pending: Any) -> None:
    try:
        status = pending.status()
        units = status.progress_data
    except Exception:  # noqa: BLE001 - progress is best effort
        return
    code = getattr(getattr(status, "code", None), "name", "")
    if code in PHASES:
        job.phase(PHASES[code])
    if not units:
        return
    unit = units[-1]
    if unit.progress is not None:
        job.progress(max(0, min(100, int(unit.progress * 100))))
    elif unit.index is not None and unit.length:
        job.progress(max(0, min(100, int(100 * unit.index / unit.length))))


def _server_error(exc: BaseException) -> bool:
    """Whether exc is an HTTP 5xx answer (httpx, as gradio_client raises it)."""
    response = getattr(exc, "response", None)
    return isinstance(getattr(response, "status_code", None), int) and response.status_code >= 500


def endpoint_input_names(client: Any, api_name: str) -> set[str]:
    """The keyword input names an app's endpoint declares (empty when it does not say)."""
    try:
        info = client.view_api(print_info=False, return_format="dict")
        params = info["named_endpoints"][api_name]["parameters"]
    except Exception:  # noqa: BLE001 - older apps may not describe themselves; send everything
        return set()
    return {p["parameter_name"] for p in params if p.get("parameter_name")}


def first_path(result: Any) -> Path:
    """The first file path in a Gradio output (a path, a tuple/list of outputs, or a FileData dict)."""
    if isinstance(result, (list, tuple)):
        for item in result:
            try:
                return first_path(item)
            except EngineError:
                continue
    if isinstance(result, dict):
        result = result.get("path") or result.get("name")
    if isinstance(result, (str, os.PathLike)) and Path(result).is_file():
        return Path(result)
    raise EngineError(f"the app returned no audio file (got {type(result).__name__})")
