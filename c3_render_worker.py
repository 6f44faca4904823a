"""The c3-render worker: takes jobs from the Redis queue and runs them on Comput3 GPU nodes.

Owns the Comput3 calls (launch_workload, get_running_workloads, check_node_health, stop_workload),
the one node each worker holds (launched when a job needs it, reused while healthy, replaced when it
fails or grows old, stopped when idle or on SIGTERM, capped at MAX_NODES across all workers), the job
run (inputs downloaded and checked, the engine called with a should_stop() that enforces cancel,
max_time and complete_by, the result uploaded and recorded), the heartbeat, and the recovery sweep
that requeues the jobs of dead workers and stops their nodes.

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
from typing import Any

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
from engine_api import EngineError, JobStopped, NodeUrls, node_urls

log = logging.getLogger("c3-render.worker")

ENGINES = {"csm": csm.run, "whisper": whisper.run, "portrait": comfyui.run, "analyze": analyze.run}
RESULT_NAMES = {"csm": "{id}.mp3", "portrait": "{id}.mp4", "whisper": "{id}.txt", "analyze": "{id}.txt"}
CANCEL_REASON = "cancelled by request"
SHUTDOWN_REASON = "worker shutting down"
C3_TIMEOUT_S = (10, 60)  # connect, read


class C3Error(Exception):
    """A Comput3 control API call failed; str() is safe to show (no key). `retryable` for 5xx, timeouts
    and non-JSON answers; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, retryable: bool = False, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class NodeFailed(Exception):
    """The GPU node could not be had, or stopped working during the job."""


# --- the Comput3 control API -------------------------------------------------------------------

def c3_headers(settings: config.Settings) -> dict[str, str]:
    return {"X-C3-API-KEY": settings.c3_api_key, "Content-Type": "application/json",
            "Origin": settings.c3_origin}


def _c3_post(settings: config.Settings, path: str, body: dict[str, Any]) -> Any:
    """One call; raises C3Error saying what went wrong, with `retryable` set for 5xx/timeouts/non-JSON."""
    url = f"{settings.c3_api_url}/{path}"
    try:
        response = requests.post(url, json=body, headers=c3_headers(settings), timeout=C3_TIMEOUT_S)
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


def launch_workload(settings: config.Settings, workload_type: str = "media:fast",
                    expires: int | None = None, sleep=time.sleep) -> dict[str, Any]:
    """Launch a node; retried with exponential backoff on 5xx, timeouts and non-JSON answers."""
    expires = expires or int(time.time() + settings.node_max_age_s + settings.node_expires_margin_s)
    last: C3Error | None = None
    for attempt in range(1, settings.launch_attempts + 1):
        try:
            answer = _c3_post(settings, "launch", {"type": workload_type, "expires": expires})
            if not isinstance(answer, dict) or not answer.get("workload") or not answer.get("node"):
                raise C3Error("Comput3 launch: answer has no workload or node", retryable=True)
            return answer
        except C3Error as exc:
            last = exc
            if not exc.retryable or attempt == settings.launch_attempts:
                break
            delay = settings.launch_backoff_s * 2 ** (attempt - 1)
            log.warning("launch attempt %d/%d failed (%s); retrying in %.1f s", attempt,
                        settings.launch_attempts, exc, delay)
            sleep(delay)
    raise C3Error(f"could not launch a {workload_type} GPU node: {last}")


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


# --- the node this worker holds ----------------------------------------------------------------

@dataclass
class HeldNode:
    workload: str
    node: str
    launched_at: float
    urls: NodeUrls
    last_used: float = field(default_factory=time.time)


@dataclass
class WorkerState:
    settings: config.Settings
    r: redis.Redis
    worker_id: str
    node: HeldNode | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    shutdown_deadline: float | None = None
    node_seconds: float = 0.0


def stop_node(state: WorkerState, reason: str, release_slot: bool = True) -> None:
    """Stop the held node (if any), log its node-seconds, and free its slot (unless the worker is
    replacing the node at once: then it keeps the slot, so waiting workers cannot take it meanwhile)."""
    held = state.node
    state.node = None
    if held is None:
        return
    seconds = time.time() - held.launched_at
    try:
        stop_workload(state.settings, held.workload)
    except C3Error as exc:
        log.warning("stopping workload %s failed: %s; the recovery sweep will retry", held.workload, exc)
        try:
            state.r.hset(config.NODES_TO_STOP_KEY, held.workload, held.node)
        except redis.RedisError:
            log.warning("could not record workload %s for a later stop; it ends at its expires time",
                        held.workload)
    state.node_seconds += seconds
    log.info("stopped node %s (workload %s, %s) after %.1f node-seconds; this worker's total %.1f",
             held.node, held.workload, reason, seconds, state.node_seconds)
    _record_node_stop(state.r, held.workload, state.worker_id, seconds, reason)
    try:
        if release_slot:
            jobstore.release_node(state.r, state.worker_id)
        else:
            state.r.delete(jobstore.node_key(state.worker_id))
    except redis.RedisError:
        log.warning("could not update the node record in Redis; the recovery sweep will")


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
        pipe.rpush(config.NODE_LOG_KEY, json.dumps({"workload": workload, "worker": worker_id,
                                                    "seconds": round(seconds, 3), "reason": reason}))
        pipe.ltrim(config.NODE_LOG_KEY, -10000, -1)
        pipe.execute()
    except redis.RedisError:
        pass


def node_usable(state: WorkerState) -> str:
    """'' when the held node can take the next job, else why it must be replaced."""
    held = state.node
    settings = state.settings
    if held is None:
        return "no node"
    if time.time() - held.launched_at > settings.node_max_age_s:
        return "older than NODE_MAX_AGE"
    try:
        running = {w.get("workload") for w in get_running_workloads(settings)}
    except C3Error as exc:
        log.warning("could not list workloads (%s); relying on the health check", exc)
        running = {held.workload}
    if held.workload not in running:
        return "no longer in the workloads list"
    if not check_node_health(settings, held.node):
        return "failed its health check"
    return ""


def ensure_node(state: WorkerState, should_stop) -> HeldNode:
    """The node for the next job: the held one when usable, else a fresh one (waiting for a slot)."""
    settings = state.settings
    if state.node is not None:
        problem = node_usable(state)
        if not problem:
            return state.node
        log.info("replacing node %s: %s", state.node.node, problem)
        stop_node(state, problem, release_slot=False)
    waited = False
    while not jobstore.acquire_node_slot(state.r, state.worker_id, settings.max_nodes):
        if not waited:
            log.info("MAX_NODES (%d) nodes are running; waiting for a slot", settings.max_nodes)
            waited = True
        reason = should_stop()
        if reason:
            raise JobStopped(reason)
        time.sleep(1.0)
    jobstore.record_node(state.r, state.worker_id, {"state": "launching", "worker": state.worker_id,
                                                    "since": time.time()})
    try:
        answer = launch_workload(settings, settings.workload_type)
    except C3Error as exc:
        jobstore.release_node(state.r, state.worker_id)
        raise NodeFailed(str(exc)) from None
    held = HeldNode(workload=str(answer["workload"]), node=str(answer["node"]), launched_at=time.time(),
                    urls=node_urls(str(answer["node"]), settings.c3_api_key, settings.c3_node_url,
                                   settings.c3_comfyui_url, settings.c3_ollama_url))
    state.node = held
    jobstore.record_node(state.r, state.worker_id, {"state": "booting", "workload": held.workload,
                                                    "node": held.node, "launched_at": held.launched_at,
                                                    "worker": state.worker_id})
    log.info("launched node %s (workload %s); waiting for it to boot", held.node, held.workload)
    deadline = time.time() + settings.node_boot_timeout_s
    while not check_node_health(settings, held.node, timeout_s=5.0):
        reason = should_stop()
        if reason:
            stop_node(state, "job stopped while the node booted")
            raise JobStopped(reason)
        if time.time() > deadline:
            stop_node(state, "did not boot")
            raise NodeFailed(f"GPU node did not become healthy within {settings.node_boot_timeout_s:g} s "
                             "(NODE_BOOT_TIMEOUT)")
        time.sleep(1.0)
    jobstore.record_node(state.r, state.worker_id, {"state": "running"})
    log.info("node %s is up after %.1f s", held.node, time.time() - held.launched_at)
    return held


def sweep_dead_workers(settings: config.Settings, r: redis.Redis) -> dict[str, Any]:
    """Recovery: requeue the jobs of workers whose heartbeat expired, and stop their nodes."""
    retry_failed_stops(settings, r)
    if int(r.info("server").get("uptime_in_seconds", 0)) < settings.heartbeat_ttl_s:
        # Redis has just come back: every heartbeat may have expired while it was down. Wait until
        # live workers have had a full TTL to announce themselves before calling anyone dead.
        return {"workers": [], "requeued": 0, "failed": []}
    housekeeping.sweep(settings, r)  # webhooks of vanished workers, expired results, leftover work dirs
    summary = jobstore.requeue_abandoned(r, settings)
    for worker in summary["workers"]:
        record = jobstore.claim_dead_node(r, worker)
        if record is None:
            continue
        if record.get("workload"):
            seconds = time.time() - float(record.get("launched_at") or time.time())
            try:
                stop_workload(settings, record["workload"])
                log.info("stopped node %s of dead worker %s after %.1f node-seconds", record.get("node"),
                         worker, seconds)
            except C3Error as exc:
                # A node already stopped, expired or dead answers stop with a 404: it is gone, so the
                # record and its MAX_NODES slot must go too (retrying forever would leak the slot).
                try:
                    gone = record["workload"] not in {w.get("workload") for w in get_running_workloads(settings)}
                except C3Error:
                    gone = False
                if not gone:
                    log.warning("could not stop node of dead worker %s: %s", worker, exc)
                    r.delete(f"sweep:{worker}")  # let the next sweep try again
                    continue
                log.info("node %s of dead worker %s was already gone (%s)", record.get("node"), worker, exc)
            _record_node_stop(r, record["workload"], worker, seconds, "worker died")
        jobstore.release_node(r, worker)
    if summary["requeued"] or summary["failed"]:
        log.info("recovery sweep: %d job(s) requeued, %d failed after MAX_ATTEMPTS, dead workers %s",
                 summary["requeued"], len(summary["failed"]), ", ".join(summary["workers"]))
    return summary


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


def run_engine_on_node(state: WorkerState, job_type: str, params: dict[str, Any], job_id: str,
                       inputs: dict[str, Path], work_dir: Path, should_stop) -> Path | str:
    """Get a node and run the engine; a node failure is retried on a fresh node NODE_FAILURE_RETRIES times."""
    engine = ENGINES[job_type]
    tries = 1 + max(0, state.settings.node_failure_retries)
    for attempt in range(1, tries + 1):
        held = ensure_node(state, should_stop)
        held.last_used = time.time()

        def progress(percent: int) -> None:
            try:
                jobstore.set_progress(state.r, job_id, percent)
            except redis.RedisError:
                pass

        try:
            return engine(params, job_id, inputs, held.urls, work_dir, should_stop, progress)
        except JobStopped:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: was it the node?
            detail = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            problem = node_usable(state)
            if not problem:
                if isinstance(exc, EngineError):
                    raise
                raise EngineError(f"{job_type} failed: {detail}") from None
            log.warning("node %s failed during job %s (%s): %s", held.node, job_id, problem, detail)
            stop_node(state, f"failed during a job: {problem}", release_slot=attempt == tries)
            if attempt == tries:
                raise NodeFailed(f"the GPU node failed during the job ({problem})") from None
            log.info("retrying job %s on a new node", job_id)
        finally:
            if state.node is not None:
                state.node.last_used = time.time()
    raise NodeFailed("the GPU node failed during the job")


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
    settings, r, worker_id = state.settings, state.r, state.worker_id
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
        # idempotent (a retry after a lost reply finds the job finished and changes nothing).
        for wait_s in (0.5, 1, 2, 4, 8, 0):
            try:
                done, now_status = jobstore.transition(r, settings, job_id, new_status, fields,
                                                       worker_id=worker_id)
                break
            except redis.RedisError:
                if not wait_s:
                    raise  # the main loop gives the entry back to the queue once Redis answers
                log.warning("job %s: Redis unavailable while recording the %s; retrying in %g s", job_id,
                            new_status, wait_s)
                time.sleep(wait_s)
        if not done:
            log.info("job %s: result dropped, the job is already %s", job_id, now_status)
        jobstore.ack(r, worker_id, entry)

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
        storage.wait_for_free_space(settings, should_stop)  # before inputs and outputs are written
        inputs = fetch_inputs(settings, job_type, params, job_id, work_dir)
        reason = should_stop()
        if reason:
            raise JobStopped(reason)
        output = run_engine_on_node(state, job_type, params, job_id, inputs, work_dir, should_stop)
        fields = store_result(state, job_type, job_id, output, work_dir)
        finish("success", fields)
        log.info("job %s succeeded in %.1f s", job_id, time.time() - started)
    except JobStopped as exc:
        reason = str(exc)
        if reason == SHUTDOWN_REASON:
            jobstore.put_back(r, worker_id, job_id, entry)
            log.info("job %s put back on the queue (worker shutting down)", job_id)
        elif reason == CANCEL_REASON:
            finish("cancelled", {"error": CANCEL_REASON})
            log.info("job %s cancelled", job_id)
        else:
            finish("failed", {"error": reason})
            log.info("job %s stopped: %s", job_id, reason)
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
    """Keep the heartbeat alive and run the recovery sweep every SWEEP_INTERVAL_S."""
    r = jobstore.connect(state.settings.redis_url)
    interval = max(0.2, state.settings.heartbeat_ttl_s / 3)
    next_sweep = 0.0
    while not state.stopping.is_set():
        try:
            jobstore.heartbeat(r, state.worker_id, state.settings.heartbeat_ttl_s)
            if time.time() >= next_sweep:
                next_sweep = time.time() + state.settings.sweep_interval_s
                sweep_dead_workers(state.settings, r)
        except redis.RedisError as exc:
            log.warning("heartbeat: Redis unavailable (%s)", type(exc).__name__)
        except Exception:  # noqa: BLE001 - the heartbeat thread must not die
            log.exception("heartbeat/sweep error")
        state.stopping.wait(interval)


def check_startup(settings: config.Settings) -> None:
    if not settings.c3_api_key:
        raise SystemExit("configuration error: C3_API_KEY is not set; the worker needs a Comput3 API key "
                         "(for the local dev node any value works, e.g. C3_API_KEY=dev)")
    try:
        netfetch.parse_allowlist(settings.url_allowlist)
    except ValueError as exc:
        raise SystemExit(f"configuration error: URL_ALLOWLIST: {exc}") from None
    try:
        storage.ensure_bucket(settings)
    except storage.StorageError as exc:
        raise SystemExit(f"storage error: {exc}") from None


def work(state: WorkerState) -> None:
    """Take and run jobs until asked to stop; stop the node when idle."""
    settings = state.settings
    backoff = 0.5
    recover = True  # entries in our processing list while no job runs were cut short: give them back
    while not state.stopping.is_set():
        try:
            if recover:
                # announce ourselves before the first take (the heartbeat thread keeps it up after)
                jobstore.heartbeat(state.r, state.worker_id, settings.heartbeat_ttl_s)
                requeued, failed = jobstore.requeue_processing(state.r, settings, state.worker_id)
                recover = False
                if requeued or failed:
                    log.info("gave %d job(s) cut short by a Redis error back to the queue (%d failed after "
                             "MAX_ATTEMPTS)", requeued, len(failed))
            if state.node is not None and time.time() - state.node.last_used > settings.gpu_idle_timeout_s:
                stop_node(state, f"idle for {settings.gpu_idle_timeout_s:g} s")
            # A worker without a node takes a job only when it can get a node slot: at the MAX_NODES
            # cap it leaves the queue to the workers that hold nodes instead of sitting on a job.
            if state.node is None and not jobstore.acquire_node_slot(state.r, state.worker_id,
                                                                     settings.max_nodes):
                state.stopping.wait(1.0)
                continue
            entry = jobstore.take(state.r, state.worker_id, 1.0)
            if entry is None and state.node is None:
                jobstore.release_node(state.r, state.worker_id)  # give the reserved slot back
            if entry is not None and state.stopping.is_set():
                jobstore.return_entry(state.r, state.worker_id, entry)  # taken as we were told to stop
            elif entry is not None:
                run_job(state, entry)
            backoff = 0.5
        except redis.RedisError as exc:
            log.warning("Redis unavailable (%s); retrying in %.1f s", type(exc).__name__, backoff)
            recover = True
            state.stopping.wait(backoff)
            backoff = min(backoff * 2, 15.0)


def main() -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = config.load()
    check_startup(settings)
    worker_id = os.environ.get("WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    state = WorkerState(settings=settings, r=jobstore.connect(settings.redis_url), worker_id=worker_id)
    webhook_stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if state.shutdown_deadline is None:
            log.info("signal %d: finishing the running job (up to WORKER_GRACE_S=%g s), then exiting",
                     signum, settings.worker_grace_s)
            state.shutdown_deadline = time.time() + settings.worker_grace_s
        state.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("worker %s started; queue %s, Comput3 API %s", worker_id, config.QUEUE_KEY, settings.c3_api_url)
    threading.Thread(target=heartbeat_loop, args=(state,), name="heartbeat", daemon=True).start()
    senders = webhooks.start_delivery(settings, worker_id, webhook_stop)
    work(state)
    stop_node(state, "worker shutting down")
    webhooks.stop_delivery(state.r, worker_id, webhook_stop, senders)
    try:
        if state.r.llen(jobstore.processing_key(worker_id)) == 0:
            jobstore.retire_worker(state.r, worker_id)
    except redis.RedisError:
        pass
    log.info("worker %s stopped; %.1f node-seconds used", worker_id, state.node_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
