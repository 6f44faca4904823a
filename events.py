"""GET /events/<id>: a job's (or a pipeline's) status as Server-Sent Events, woken by Redis pub/sub.

jobstore.py's scripts PUBLISH on `events:job:<id>` whenever a job record changes (status, progress,
webhook, phase through notify_changed), on `events:pipeline:<id>` when a pipeline or one of its steps
changes (pipelines.py), and on `events:queue` when a job leaves or re-enters the queue.
Each API process holds ONE pub/sub connection (a `Hub` thread) and wakes the streams it serves; a woken
stream reads the record once and sends the status object if it differs from what it sent last. So Redis
work grows with changes, not with clients times seconds, and it works across API replicas.

Event ids are the record's change number (plus the queue position while queued); a reconnect with
Last-Event-ID equal to the current id gets no repeat, and one after the final event gets 204 (which
tells EventSource to stop reconnecting). Each open stream holds one gunicorn thread (gthread workers),
so SSE_MAX_STREAMS caps them per process to leave threads for ordinary requests.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from flask import Blueprint, Response, current_app, request, stream_with_context

import api_common
import config
import jobspec
import jobstore
import pipelines

log = logging.getLogger("c3-render.events")

events_routes = Blueprint("events", __name__)
SHUTTING_DOWN = threading.Event()  # set on SIGTERM: open streams end so the process can stop at once


class Hub:
    """One pub/sub subscription per process, fanned out to the streams of this process."""

    def __init__(self, r: redis.Redis):
        self.r = r
        self.lock = threading.Lock()
        self.by_job: dict[str, set[queue.Queue]] = {}
        self.thread: threading.Thread | None = None
        self.job_prefix = config.JOB_EVENTS_CHANNEL.format(id="")
        self.pipeline_prefix = config.PIPELINE_EVENTS_CHANNEL.format(id="")

    def open_streams(self) -> int:
        with self.lock:
            return sum(len(listeners) for listeners in self.by_job.values())

    def register(self, job_id: str) -> queue.Queue:
        wake: queue.Queue = queue.Queue(maxsize=1)
        with self.lock:
            self.by_job.setdefault(job_id, set()).add(wake)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self.run, name="sse-hub", daemon=True)
                self.thread.start()
        return wake

    def unregister(self, job_id: str, wake: queue.Queue) -> None:
        with self.lock:
            listeners = self.by_job.get(job_id, set())
            listeners.discard(wake)
            if not listeners:
                self.by_job.pop(job_id, None)

    def wake(self, job_id: str | None) -> None:
        """Wake the streams of one job, or every stream (None: the queue moved, or we may have missed some)."""
        with self.lock:
            targets = [w for listeners in self.by_job.values() for w in listeners] if job_id is None \
                else list(self.by_job.get(job_id, ()))
        for target in targets:
            try:
                target.put_nowait(True)
            except queue.Full:  # already woken; one read covers both changes
                pass

    def run(self) -> None:
        while True:
            pubsub = self.r.pubsub()
            try:
                pubsub.psubscribe(self.job_prefix + "*", self.pipeline_prefix + "*")
                pubsub.subscribe(config.QUEUE_EVENTS_CHANNEL)
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    channel = message["channel"]
                    if message["type"] in ("subscribe", "psubscribe"):
                        # (re)subscribed, here or by redis-py on a new primary after a failover: changes
                        # may have been missed while we were away
                        self.wake(None)
                    elif channel == config.QUEUE_EVENTS_CHANNEL:
                        self.wake(None)
                    elif channel.startswith(self.job_prefix):
                        self.wake(channel[len(self.job_prefix):])
                    elif channel.startswith(self.pipeline_prefix):  # (ids of jobs and pipelines never meet)
                        self.wake(channel[len(self.pipeline_prefix):])
            except (redis.RedisError, OSError) as exc:
                log.warning("event subscription lost (%s); reconnecting", type(exc).__name__)
                time.sleep(1.0)
            finally:
                pubsub.close()


@events_routes.record_once
def end_streams_on_sigterm(state: Any) -> None:
    """Chain a SIGTERM handler (gunicorn's worker installs its own before it loads the app): open streams
    would otherwise hold a graceful shutdown for its whole timeout. Their clients reconnect with
    Last-Event-ID to another process. Only possible in the main thread (not under a test client)."""
    if threading.current_thread() is not threading.main_thread():
        return
    app = state.app
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        SHUTTING_DOWN.set()
        hub = app.extensions.get("c3_events_hub")
        if hub is not None:  # not from the handler itself: wake() takes a lock
            threading.Thread(target=hub.wake, args=(None,), daemon=True).start()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def current_hub() -> Hub:
    """The hub of the app handling this request (made on its first stream)."""
    with _HUB_LOCK:
        hub = current_app.extensions.get("c3_events_hub")
        if hub is None:
            hub = current_app.extensions["c3_events_hub"] = Hub(api_common.store())
        return hub


_HUB_LOCK = threading.Lock()


def event_id(record: dict[str, str], answer: dict[str, Any]) -> str:
    """The record's change number, plus the queue position while queued (it moves without a change)."""
    number = record.get("events") or "0"
    position = answer.get("queue_position")
    return f"{number}.q{position}" if record["status"] == "queued" and position else number


def sse(event: str, ident: str, data: dict[str, Any]) -> str:
    return f"event: {event}\nid: {ident}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


Snapshot = Callable[[redis.Redis, str], "tuple[dict[str, Any], str, bool] | None"]


def job_snapshot(r: redis.Redis, job_id: str) -> tuple[dict[str, Any], str, bool] | None:
    """A job's status object, its event id and whether it is finished; None once its record expired."""
    current = jobstore.get_job_with_position(r, job_id)
    if current is None:
        return None
    answer = api_common.status_answer(current)
    return answer, event_id(current, answer), current["status"] in jobspec.FINISHED_STATUSES


@events_routes.get("/events/<job_id>")
def events(job_id: str) -> Response:
    """A job's stream, or a pipeline's (its GET /pipelines/<id> object on every change of it or its steps)."""
    r = api_common.store()
    snapshot: Snapshot = job_snapshot
    what = "job"
    record = jobstore.get_job(r, job_id) if jobstore.is_job_id(job_id) else None
    pipeline = pipelines.get_pipeline(r, job_id) if record is None and jobstore.is_job_id(job_id) else None
    if pipeline is not None and api_common.may_see(pipeline):
        snapshot, what = pipelines.snapshot, "pipeline"
    elif record is None or not api_common.may_see(record):
        api_common.record_or_error(job_id)  # the 400, or the 404 of an unknown id (another key's job too)
    last_sent = request.headers.get("Last-Event-ID", "")
    now = snapshot(r, job_id) if last_sent else None
    if now is not None and now[2] and last_sent == now[1]:
        return Response(status=204)  # the client has the final event: EventSource stops reconnecting
    settings = api_common.settings()
    hub = current_hub()
    if SHUTTING_DOWN.is_set():
        raise api_common.ApiError(503, "this API process is stopping; retry", {"Retry-After": "1"})
    if hub.open_streams() >= settings.sse_max_streams:
        raise api_common.ApiError(503, f"too many open event streams on this API process (SSE_MAX_STREAMS="
                                       f"{settings.sse_max_streams}); retry shortly or poll /status",
                                  {"Retry-After": "5"})
    wake = hub.register(job_id)  # before the first read, so no change can slip between the two
    stream = status_stream(job_id, last_sent, hub, wake, settings.sse_keepalive_s, snapshot, what,
                           settings.redis_failover_wait_s)
    response = Response(stream_with_context(stream), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass events through as they come
    return response


def status_stream(job_id: str, last_sent: str, hub: Hub, wake: queue.Queue, keepalive_s: float,
                  snapshot: Snapshot = job_snapshot, what: str = "job", patience_s: float = 0.0) -> Iterator[str]:
    """The event stream of one job (or pipeline: `snapshot` reads it, `what` names it): its status object
    whenever it changes, until it finishes, the record expires, Redis is lost for longer than patience_s
    (a failover: REDIS_FAILOVER_WAIT_S) or the process stops; a comment every keepalive_s while nothing
    happens. Leaves the hub when it ends, however it ends."""
    sent = last_sent
    lost_since: float | None = None
    try:
        yield f"retry: 3000\n: following {what} {job_id}\n\n"
        while True:
            try:
                current = snapshot(api_common.store(), job_id)
                lost_since = None
            except redis.RedisError:
                lost_since = time.monotonic() if lost_since is None else lost_since
                if time.monotonic() - lost_since >= patience_s or SHUTTING_DOWN.is_set():
                    yield ": the job store cannot be reached; reconnect shortly\n\n"
                    return
                time.sleep(0.5)  # Sentinel may be promoting a replica: read again shortly
                continue
            if current is None:
                yield sse("end", sent or "0", {"id": job_id, "error": f"the {what} record has expired"})
                return
            answer, ident, finished = current
            if ident != sent or finished:
                yield sse("end" if finished else "status", ident, answer)
                sent = ident
            if finished:
                return
            if SHUTTING_DOWN.is_set():
                yield ": this API process is stopping; reconnect\n\n"
                return
            try:
                wake.get(timeout=keepalive_s)
            except queue.Empty:
                yield ": keepalive\n\n"
    finally:
        hub.unregister(job_id, wake)
