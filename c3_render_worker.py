"""The c3-render worker process: takes jobs from the Redis queue and runs them on Comput3 GPU nodes.

Its loop (`work`) has four steps: maintenance (the pool's idle nodes, one worker at a time; after a
Redis error, give back what was cut short), dequeue (`jobstore.take`, into this worker's processing
list), execute (`run_job`), and in threads of their own the heartbeat (`heartbeat_loop`: a Redis
write, nothing that waits on the network) and the recovery sweep (`sweep_loop`, sweep.py). `run_job`
runs one job as named steps: claim it, prepare its inputs, run its engine on a slot of a pool node
(pool.py), store the result, settle it (the final status and its webhook in one Redis step), let the
slot go. On SIGTERM the running job gets WORKER_GRACE_S to finish,
then `shut_down` lets its slot go (the last worker also stops the idle nodes) and hands back what is in
flight, in bounded time even when Redis is gone.

Run: `python c3_render_worker.py` (configuration from the environment; see README).
"""

from __future__ import annotations

import functools
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import redis

import analyze
import comfyui
import comput3
import config
import csm
import jobspec
import jobstore
import media_check
import netfetch
import nodes
import pool
import redis_conn
import storage
import sweep
import webhooks
import whisper
from engine_api import EngineError, JobContext, JobStopped, ShouldStop, without_addresses
from jobspec import FINISHED_STATUSES
from nodes import Lease

log = logging.getLogger("c3-render.worker")

ENGINES = {"csm": csm.run, "whisper": whisper.run, "portrait": comfyui.run, "analyze": analyze.run}
# After a stopped job, how to see whether the node still works on it (no entry: nothing tells). ComfyUI's
# /queue shows the SONIC sampler, which ignores /interrupt; Gradio's queue does not show a cancelled
# CSM generation that runs on in its thread, so csm/whisper have no check (README: "What a cancel costs").
BUSY_CHECKS = {"portrait": comfyui.node_busy}
NODE_LIFE_MARGIN_S = 60  # a job takes a node that lives at least its max_time and this long after
CANCEL_REASON = "cancelled by request"
SHUTDOWN_REASON = "worker shutting down"
# On the way out, one Redis call may take this long: a Redis that is frozen or cut off by the network
# accepts nothing and refuses nothing, and each call would otherwise wait out the usual 5 s timeout.
EXIT_REDIS_TIMEOUT_S = 2.0
SETTLE_RETRY_WAITS_S = (0.5, 1, 2, 4, 8, 15, 15, 15)  # between tries of a step of a job's end (through_outage)

T = TypeVar("T")


@dataclass
class WorkerState:
    """One worker process: what it holds (nodes.NodeHolder) and where its shutdown stands."""

    settings: config.Settings
    r: redis.Redis
    worker_id: str
    lease: Lease | None = None  # the running job's slot on a pool node
    stopping: threading.Event = field(default_factory=threading.Event)
    settled: threading.Event = field(default_factory=threading.Event)  # after SIGTERM: no job left running
    shutdown_deadline: float | None = None  # time.monotonic() when WORKER_GRACE_S after the SIGTERM ends
    node_seconds: float = 0.0
    entry: str | None = None  # the queue entry taken and not yet settled in Redis (acked, put back, requeued)
    redis_lost: str = ""  # on the way out: why Redis did not answer ('' while it does); its steps are skipped
    unrecorded_stops: int = 0  # nodes stopped on the way out whose records Redis could not take
    unstopped_nodes: int = 0  # nodes whose Comput3 stop failed on the way out, with Redis gone


@dataclass
class ClaimedJob:
    """A job this worker moved to running: what its steps share."""

    id: str
    type: str
    entry: str
    attempt: int  # what the claim produced: every later change of the job names this worker and it
    record: dict[str, str]
    params: dict[str, Any]
    started: float  # wall clock (compared with complete_by, an absolute time)
    complete_by: float
    work_dir: Path
    started_mono: float = field(default_factory=time.monotonic)  # max_time is measured from here


@dataclass
class Outcome:
    """How a job ended here: the status and fields to settle it with, or back to the queue."""

    status: str  # success | failed | cancelled | "" (put back: the job runs again, attempt not counted)
    fields: dict[str, Any] = field(default_factory=dict)
    drain: bool = False  # the node may still work on the stopped job: keep it from the next one meanwhile


def put_back(why: str) -> Outcome:
    return Outcome("", {"why": why})


# --- one job: claim, prepare inputs, run on the node, store, settle --------------------------------

def run_job(state: WorkerState, entry: str) -> None:
    """Run one taken queue entry to its end; the entry is acknowledged unless the job goes back."""
    job = claim(state, entry)
    if job is None:
        return
    outcome = refused_before_start(job) or execute(state, job)
    if not outcome.drain:  # the job's share of the node's time is on its record when it is settled
        let_go(state)
    if not outcome.status:
        if jobstore.put_back(state.r, state.worker_id, job.id, entry, job.attempt):
            log.info("job %s put back on the queue (%s)", job.id, outcome.fields["why"])
        else:
            log.info("job %s not put back: it is no longer this worker's (finished, or given back)", job.id)
    else:
        settle(state, job, outcome)
    if state.lease is not None:  # the node may still work on the stopped job: its slot is kept meanwhile
        nodes.drain_node(state, state.lease, job.id, BUSY_CHECKS.get(job.type))
        let_go(state)


def let_go(state: WorkerState) -> None:
    """Release the running job's slot (the node stays in the pool for the next job): a step of the job's
    end, confirmed by the replicas and ridden through an outage like settle(). A Redis error past that
    keeps it in state.lease: on the way out the node is then stopped through Comput3 (leave_pool)."""
    lease = state.lease
    if lease is not None:  # (a second release finds the lease gone and changes nothing)
        through_outage(state, lease.job_id, "ending its node lease", lambda: pool.release(state, lease, confirm=True))
    state.lease = None


def claim(state: WorkerState, entry: str) -> ClaimedJob | None:
    """Move the entry's job to running on this worker; None (entry dropped) when it is no longer queued,
    or when the sweep gave the entry back to the queue meanwhile (the next taker runs it)."""
    job_id = json.loads(entry)["id"]
    try:
        attempt, status = jobstore.claim(state.r, state.settings, state.worker_id, entry)
    except redis_conn.NotReplicated as exc:
        # A claim the replicas do not have may vanish in a failover, and another worker then runs the job
        # too: it is not run here; it goes back (attempt not counted) and the main loop backs off.
        if exc.result[0]:  # {1, 'running', attempt}: started on the primary
            jobstore.put_back(state.r, state.worker_id, job_id, entry, int(exc.result[2]))
        raise
    if not attempt:
        if status == "queued":
            log.warning("job %s: the recovery sweep gave its entry back to the queue; left to the next taker",
                        job_id)
        else:
            log.info("job %s is %s; skipping it", job_id, status)
        jobstore.ack(state.r, state.worker_id, entry)
        return None
    record = jobstore.get_job(state.r, job_id) or {}
    started = time.time()
    return ClaimedJob(id=job_id, type=record.get("type", ""), entry=entry, attempt=attempt, record=record,
                      params=jobstore.job_params(record), started=started,
                      complete_by=float(record.get("complete_by") or started + 3600),
                      work_dir=Path(state.settings.work_dir) / job_id)


def refused_before_start(job: ClaimedJob) -> Outcome | None:
    """A job cancelled while it was taken, or whose complete_by passed while it was queued, ends at once; so
    does a pipeline step whose inputs from earlier steps break its field limits (an empty transcript, say)."""
    if job.record.get("cancel_requested") == "1":
        return Outcome("cancelled", {"error": CANCEL_REASON})
    if job.started > job.complete_by:
        return Outcome("failed", {"error": "expired before it started: its complete_by time passed while it "
                                           "was queued"})
    if job.record.get("inputs_from", "{}") != "{}":
        try:
            jobspec.validate_stored(job.type, job.params)
        except jobspec.ValidationError as exc:
            steps = sorted(set(json.loads(job.record["inputs_from"]).values()))
            named = ", ".join(f'"{step}"' for step in steps)
            return Outcome("failed", {"error": f"the output of step {named} cannot be this step's input: {exc}"})
    return None


def execute(state: WorkerState, job: ClaimedJob) -> Outcome:
    """Prepare the inputs, run the engine on a node and store the result: how the job ended."""
    settings = state.settings
    log.info("job %s (%s) started, attempt %d", job.id, job.type, job.attempt)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    should_stop = make_should_stop(state, job.id, job.started_mono, int(job.params["max_time"]), job.complete_by)
    phase = job_phase(state, job)
    try:
        phase("downloading")
        storage.wait_for_free_space(settings, should_stop)  # before inputs and outputs are written
        inputs = media_check.fetch_inputs(settings, job.type, job.params, job.id, job.work_dir)
        if reason := should_stop():
            raise JobStopped(reason)
        context = functools.partial(JobContext, job_id=job.id, params=job.params, inputs=inputs,
                                    work_dir=job.work_dir, settings=settings, should_stop=should_stop,
                                    progress=job_progress(state, job), phase=phase)
        output = pool.run_on_node(state, job.id, job.type, ENGINES[job.type], context, should_stop, phase,
                                  min_life_s=job.params["max_time"] + NODE_LIFE_MARGIN_S,
                                  prefer=job.record.get("prefer_node", ""))
        phase("storing")
        fields = storage.store_result(settings, state.r, job.type, job.id, output, job.work_dir, should_stop)
        if state.lease is not None:  # the pipeline steps that take this job's outputs prefer its node
            fields["node_id"] = state.lease.node_id
        log.info("job %s succeeded in %.1f s", job.id, time.monotonic() - job.started_mono)
        return Outcome("success", fields)
    except redis.RedisError:
        raise  # the entry stays in our processing list; the main loop requeues it once Redis answers
    except Exception as exc:  # noqa: BLE001 - every failure becomes the job's outcome, never a crash
        return failure_outcome(state, job, exc)
    finally:
        shutil.rmtree(job.work_dir, ignore_errors=True)


def failure_outcome(state: WorkerState, job: ClaimedJob, exc: Exception) -> Outcome:
    """What a failure of a running job means for it."""
    if isinstance(exc, JobStopped):
        reason = str(exc)
        if reason == SHUTDOWN_REASON:
            return put_back(SHUTDOWN_REASON)
        log.info("job %s %s", job.id, "cancelled" if reason == CANCEL_REASON else f"stopped: {reason}")
        return Outcome("cancelled" if reason == CANCEL_REASON else "failed", {"error": reason}, drain=True)
    if isinstance(exc, pool.SharedNodeOutOfMemory):
        return put_back(f"out of GPU memory on a shared node: {exc}")
    if isinstance(exc, media_check.ToolKilled):
        # A stop of the whole process group (systemd, docker) kills ffprobe/ffmpeg with the worker: the job
        # goes back. Otherwise (the OOM killer, say) it fails, saying so, rather than blaming the input.
        if state.stopping.wait(1.0):
            return put_back(f"{exc}; {SHUTDOWN_REASON}")
        log.warning("job %s failed: %s", job.id, exc)
        return Outcome("failed", {"error": f"{exc}; the worker may be short of memory, try again later"})
    if isinstance(exc, (netfetch.FetchError, media_check.MediaError, EngineError, nodes.NodeFailed,
                        storage.StorageError)):
        log.log(logging.WARNING if isinstance(exc, storage.StorageError) else logging.INFO,
                "job %s failed: %s", job.id, exc)
        return Outcome("failed", {"error": str(exc)})
    log.error("job %s failed unexpectedly", job.id, exc_info=exc)
    return Outcome("failed", {"error": f"internal error while running the job ({type(exc).__name__})"})


def settle(state: WorkerState, job: ClaimedJob, outcome: Outcome) -> None:
    """Record the job's final status (its webhook is queued in the same step) and acknowledge the entry."""
    fields = outcome.fields
    if fields.get("error"):  # what the client sees (and its webhook): see client_error
        fields = {**fields, "error": client_error(state, str(fields["error"]))}
    recorded = [False]  # by an earlier try that the replicas did not confirm (REDIS_MIN_REPLICA_ACKS)

    def record() -> tuple[bool, str]:
        try:
            changed, now_status = jobstore.transition(state.r, state.settings, job.id, outcome.status, fields,
                                                      worker_id=state.worker_id, attempt=job.attempt)
        except redis_conn.NotReplicated as exc:  # on the primary, not yet on enough replicas
            recorded[0] = recorded[0] or bool(exc.result[0])
            raise
        return changed or recorded[0], now_status

    # The transition is idempotent (a retry after a lost reply finds the job finished and changes
    # nothing), and the entry is acknowledged only once the replicas have the result.
    done, now_status = through_outage(state, job.id, f"recording the {outcome.status}", record)
    if not done and now_status in FINISHED_STATUSES:
        log.info("job %s: result dropped, the job is already %s", job.id, now_status)
    elif not done:  # the sweep took this worker for dead and gave the job back: it runs again elsewhere
        log.warning("job %s: result dropped, attempt %d is no longer this worker's (the job is %s)", job.id,
                    job.attempt, now_status)
    jobstore.ack(state.r, state.worker_id, job.entry)


def through_outage(state: WorkerState, job_id: str, what: str, step: Callable[[], T]) -> T:
    """Run an idempotent Redis step of a job's end, riding out a Redis outage of up to a minute (a failover
    with Sentinel's default 30 s down-after, or replicas slow to confirm it) rather than throw the finished
    work away. Not past WORKER_GRACE_S on SIGTERM: the error goes to the main loop, which gives the entry
    back to the queue once Redis answers (or the sweep does)."""
    for wait_s in SETTLE_RETRY_WAITS_S:
        try:
            return step()
        except redis.RedisError as exc:
            why = str(exc) if isinstance(exc, redis_conn.NotReplicated) else type(exc).__name__
            if state.shutdown_deadline is not None and time.monotonic() + wait_s > state.shutdown_deadline:
                raise
            log.warning("job %s: Redis unavailable while %s (%s); retrying in %g s", job_id, what, why, wait_s)
            time.sleep(wait_s)
    return step()  # the last try


def client_error(state: WorkerState, text: str) -> str:
    """A job's error as its client sees it: no URL and no host a connection error quotes, no name of a node
    this worker holds, no C3_API_KEY, no server path. A safety net: the messages are written without them."""
    text = without_addresses(text)
    if state.lease is not None and state.lease.node:  # the node of the job's lease
        text = text.replace(state.lease.node, "<node>")
    if len(state.settings.c3_api_key) >= 8:  # a short dev key would be found inside ordinary words
        text = text.replace(state.settings.c3_api_key, "<C3_API_KEY>")
    return storage.scrub_paths(state.settings, text)


def make_should_stop(state: WorkerState, job_id: str, started: float, max_time: int, complete_by: float) -> ShouldStop:
    """should_stop() for one job: cancel (polled from Redis each second), max_time (from `started`, a
    time.monotonic(): a step of the wall clock neither ends a job early nor lets it run on), complete_by
    (an absolute wall-clock time) and the end of the shutdown's grace."""
    last_poll = [-1.0]
    cancelled = [False]

    def should_stop() -> str | None:
        now = time.monotonic()
        if not cancelled[0] and state.shutdown_deadline is not None and now > state.shutdown_deadline:
            return SHUTDOWN_REASON  # without one more poll: a Redis that does not answer would delay it
        if last_poll[0] < 0 or now - last_poll[0] >= 1.0:
            last_poll[0] = now
            try:
                cancelled[0] = jobstore.stop_requested(state.r, job_id)
            except redis.RedisError:
                pass  # keep working through a Redis blip; the result is recorded when it is back
        if cancelled[0]:
            return CANCEL_REASON
        if now - started > max_time:
            return f"max_time of {max_time} s exceeded (the job ran too long and was stopped)"
        if time.time() > complete_by:
            return "complete_by deadline passed (the job was stopped unfinished)"
        if state.shutdown_deadline is not None and now > state.shutdown_deadline:
            return SHUTDOWN_REASON
        return None

    return should_stop


def job_phase(state: WorkerState, job: ClaimedJob):
    """phase(name) for one job: recorded on its record for /status while this attempt owns it (best
    effort, like progress); a repeat of the last name (engines report it at each poll) costs no Redis call."""
    last = [""]

    def phase(name: str) -> None:
        if name == last[0]:
            return
        last[0] = name
        try:
            jobstore.set_phase(state.r, job.id, name, worker_id=state.worker_id, attempt=job.attempt)
        except redis.RedisError:
            pass
    return phase


def job_progress(state: WorkerState, job: ClaimedJob):
    """progress(percent) for one job: recorded on its record for /status while this attempt owns it
    (best effort)."""

    def progress(percent: int) -> None:
        try:
            jobstore.set_progress(state.r, job.id, percent, worker_id=state.worker_id, attempt=job.attempt)
        except redis.RedisError:
            pass
    return progress


# --- the worker process: loop, heartbeat, start-up and shutdown ------------------------------------

def work(state: WorkerState) -> None:
    """Take and run jobs until asked to stop: maintenance, dequeue, execute."""
    backoff = 0.5
    recover = True  # entries in our processing list while no job runs were cut short: give them back
    while not state.stopping.is_set():
        try:
            if recover:
                recover_after_redis_error(state)
                recover = False
            pool.maintain(state)
            entry = dequeue(state)
            if entry is not None:
                run_job(state, entry)
            state.entry = None  # settled; a Redis error leaves it in our processing list (and set)
            backoff = 0.5
        except redis.RedisError as exc:
            if state.stopping.is_set():  # asked to stop: Redis is not retried, shut_down says what is left
                state.redis_lost = type(exc).__name__
                return
            log.warning("Redis unavailable (%s); retrying in %.1f s", type(exc).__name__, backoff)
            recover = True
            state.stopping.wait(backoff)
            backoff = min(backoff * 2, 15.0)


def recover_after_redis_error(state: WorkerState) -> None:
    """Announce the worker (before its first take) and give back what a Redis error cut short: entries
    left in our processing list, and node slots and launches this worker does not hold."""
    jobstore.heartbeat(state.r, state.worker_id, state.settings.heartbeat_ttl_s)
    requeued, failed = jobstore.requeue_processing(state.r, state.settings, state.worker_id)
    pool.release_stale(state, None)
    state.lease = None
    state.entry = None
    if requeued or failed:
        log.info("gave %d job(s) cut short by a Redis error back to the queue (%d failed after MAX_ATTEMPTS)",
                 requeued, len(failed))


def dequeue(state: WorkerState) -> str | None:
    """The next queue entry for this worker (moved into its processing list), or None after a second.

    A job whose type no node can serve (MAX_NODES nodes of other types, none of them idle) is left in the
    queue: the worker would only sit on it, while its turn comes when a node goes."""
    if not pool.can_serve_next(state):
        state.stopping.wait(1.0)
        return None
    entry = state.entry = jobstore.take(state.r, state.worker_id, 1.0)
    if entry is not None and state.stopping.is_set():
        jobstore.return_entry(state.r, state.worker_id, entry)  # taken as we were told to stop
        return None
    return entry


def heartbeat_loop(state: WorkerState) -> None:
    """Keep the heartbeat alive: a Redis write every HEARTBEAT_TTL / 3 and nothing else (never a call that
    can wait on the network: a heartbeat that expires makes other workers run this worker's job again).
    After a SIGTERM it goes on until the running job is settled, so a job finishing within WORKER_GRACE_S
    does not look abandoned to other workers' sweeps."""
    r = redis_conn.connect(state.settings)
    interval = max(0.2, state.settings.heartbeat_ttl_s / 3)
    while not state.settled.is_set():
        try:
            jobstore.heartbeat(r, state.worker_id, state.settings.heartbeat_ttl_s)
        except redis.RedisError as exc:
            log.warning("heartbeat: Redis unavailable (%s)", type(exc).__name__)
        except Exception:  # noqa: BLE001 - the heartbeat thread must not die
            log.exception("heartbeat error")
        state.settled.wait(interval)


def sweep_loop(state: WorkerState) -> None:
    """The recovery sweep every SWEEP_INTERVAL_S, in a thread of its own (it calls Comput3, which may take a
    minute), until the worker is asked to stop."""
    r = redis_conn.connect(state.settings)
    while not state.stopping.is_set():
        try:
            sweep.sweep_dead_workers(state.settings, r, state.worker_id)
        except redis.RedisError as exc:
            log.warning("recovery sweep: Redis unavailable (%s)", type(exc).__name__)
        except Exception:  # noqa: BLE001 - the sweep thread must not die
            log.exception("recovery sweep error")
        state.stopping.wait(state.settings.sweep_interval_s)


def check_startup(settings: config.Settings) -> None:
    """Refuse to start, with one line naming the setting, when the configuration cannot work."""
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


def shut_down(state: WorkerState, webhook_stop: threading.Event, senders: webhooks.Senders) -> None:
    """After work(): stop the held nodes, hand the in-flight webhooks back and retire the worker, in
    bounded time even when Redis is gone. The Redis steps use a client with short timeouts and are
    skipped once Redis does not answer (the Comput3 stop calls are not); one line then says what was left
    undone: the recovery sweep of a live worker does it once Redis answers and our heartbeat expired."""
    settings, worker_id = state.settings, state.worker_id
    state.settled.set()  # no job runs any more: the heartbeat stops (retire_worker removes it below)
    state.r = redis_conn.connect(settings, timeout_s=EXIT_REDIS_TIMEOUT_S)
    if not state.redis_lost:  # work() ended on a Redis error after the SIGTERM: not asked again
        try:
            state.r.ping()
        except redis.RedisError as exc:
            state.redis_lost = type(exc).__name__
    leave_pool(state)
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
    log_left_undone(state, unreturned)


def leave_pool(state: WorkerState) -> None:
    """On the way out: let the job's slot go; the last worker stops the idle nodes (nobody else would).
    With Redis gone, the node of the job cut short is stopped through Comput3 (other workers cannot work
    without Redis either; the sweep tidies the pool once it answers)."""
    lease, state.lease = state.lease, None
    if state.redis_lost:
        if lease is not None and lease.workload:
            stopped = nodes.stop_or_remember(state.settings, None, lease.workload, lease.node, SHUTDOWN_REASON)
            state.unrecorded_stops += 1 if stopped else 0
            state.unstopped_nodes += 0 if stopped else 1
        return
    try:
        pool.release(state, lease)
        # without our heartbeat first: of workers stopping together, the last to look sees nobody left
        state.r.delete(jobstore.heartbeat_key(state.worker_id))
        if not pool.other_workers_alive(state):
            nodes.stop_idle_on_exit(state, "the last worker is shutting down")
    except redis.RedisError as exc:
        state.redis_lost = type(exc).__name__


def log_left_undone(state: WorkerState, unreturned: int) -> None:
    """One warning line: what the way out could not do with Redis gone (the sweep does it later)."""
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
    state = WorkerState(settings=settings, r=redis_conn.connect(settings), worker_id=worker_id)
    webhook_stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if state.shutdown_deadline is None:
            log.info("signal %d: finishing the running job (up to WORKER_GRACE_S=%g s), then exiting",
                     signum, settings.worker_grace_s)
            state.shutdown_deadline = time.monotonic() + settings.worker_grace_s
            # From now on the job's Redis calls wait at most EXIT_REDIS_TIMEOUT_S each (a frozen Redis)
            state.r = redis_conn.connect(settings, timeout_s=EXIT_REDIS_TIMEOUT_S)
        state.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("worker %s started; queue %s, Comput3 API %s", worker_id, config.QUEUE_KEY, settings.c3_api_url)
    comput3.check_workload_types(settings)
    threading.Thread(target=heartbeat_loop, args=(state,), name="heartbeat", daemon=True).start()
    threading.Thread(target=sweep_loop, args=(state,), name="sweep", daemon=True).start()
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
