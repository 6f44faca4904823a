"""GET /events/<id> on the real API (gunicorn, gthread workers) and a real redis-server: every change
of a job arrives as an event, the final one closes the stream, Last-Event-ID is honoured, streams are
capped per process, and an event made through one API replica reaches a stream on another."""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest
import redis
import requests
from conftest import clean_env
from system import http_json, start_api

import config
import jobstore

SETTINGS = config.Settings()


@pytest.fixture(scope="module")
def apis(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("events-api")
    env = clean_env(REDIS_URL=redis_server.url, SSE_KEEPALIVE_S="0.5", SSE_MAX_STREAMS="3",
                    OUTPUT_DIR=str(tmp / "output"))
    started = [start_api(dict(env), tmp) for _ in range(2)]
    yield [url for _proc, url in started]
    for proc, _url in started:
        proc.stop()


@pytest.fixture
def r(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    return client


class Stream:
    """An SSE client reading in a thread: events (dicts) and comment lines go to queues."""

    def __init__(self, url: str, last_event_id: str = ""):
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self.response = requests.get(url, headers=headers, stream=True, timeout=(5, 30))
        self.events: queue.Queue = queue.Queue()
        self.comments: list[str] = []
        self.closed = threading.Event()
        if self.response.status_code == 200:
            threading.Thread(target=self.read, daemon=True).start()

    def read(self) -> None:
        event: dict = {}
        try:
            for line in self.response.iter_lines(decode_unicode=True):
                if line == "":
                    if "data" in event:
                        self.events.put(event)
                    event = {}
                elif line.startswith(":"):
                    self.comments.append(line)
                else:
                    name, _, value = line.partition(": ")
                    event[name] = value
        except (requests.RequestException, OSError, AttributeError, ValueError):
            pass  # closed by the test (requests gives AttributeError when closed mid-read)
        self.closed.set()

    def next(self, timeout: float = 10) -> dict:
        event = self.events.get(timeout=timeout)
        return {"event": event.get("event"), "id": event.get("id"), "job": json.loads(event["data"])}

    def close(self) -> None:
        self.response.close()


def submit(api: str, text: str = "Hello.") -> str:
    status, body = http_json("POST", f"{api}/csm", {"text": text})
    assert status == 200, body
    return body["id"]


def start(r: redis.Redis, job_id: str, worker: str = "w1") -> None:
    entry = r.hget(f"job:{job_id}", "queue_entry")
    r.lrem(config.QUEUE_KEY, 1, entry)
    r.lpush(jobstore.processing_key(worker), entry)
    assert jobstore.claim(r, SETTINGS, worker, entry) == (1, "running")


def test_a_stream_follows_every_change_to_the_end(apis, r):
    api = apis[0]
    first, second = submit(api), submit(api)
    stream = Stream(f"{api}/events/{second}")
    assert stream.response.headers["Content-Type"].startswith("text/event-stream")
    opening = stream.next()
    assert opening["event"] == "status" and opening["job"]["status"] == "queued"
    assert opening["job"]["queue_position"] == 2
    start(r, first)  # the job ahead leaves the queue: the position moves without a change to this job
    moved = stream.next()
    assert moved["job"]["queue_position"] == 1 and moved["id"] != opening["id"]
    time.sleep(1.2)  # longer than SSE_KEEPALIVE_S: a keepalive comment, and no repeated event
    assert any("keepalive" in c for c in stream.comments)
    assert stream.events.empty()
    start(r, second)
    assert stream.next()["job"]["status"] == "running"
    jobstore.set_progress(r, second, 40)
    progressed = stream.next()
    assert progressed["job"]["progress"] == 40
    jobstore.transition(r, SETTINGS, second, "success", {"result_url": "http://x/y.mp3"}, worker_id="w1", attempt=1)
    final = stream.next()
    assert final["event"] == "end" and final["job"]["status"] == "success"
    assert stream.closed.wait(5), "the stream stays open after the final event"
    assert stream.events.empty()

    # Last-Event-ID: the final event again means nothing left to send (204 stops EventSource)
    again = requests.get(f"{api}/events/{second}", headers={"Last-Event-ID": final["id"]}, timeout=5)
    assert again.status_code == 204
    # an older id gets the current state at once
    behind = Stream(f"{api}/events/{second}", last_event_id=progressed["id"])
    assert behind.next()["event"] == "end"


def test_reconnecting_with_the_current_id_gets_no_repeat(apis, r):
    api = apis[0]
    job_id = submit(api)
    start(r, job_id)
    stream = Stream(f"{api}/events/{job_id}")
    current = stream.next()
    stream.close()
    resumed = Stream(f"{api}/events/{job_id}", last_event_id=current["id"])
    time.sleep(0.8)
    assert resumed.events.empty()  # nothing changed since: no event
    jobstore.set_progress(r, job_id, 70)
    assert resumed.next()["job"]["progress"] == 70
    resumed.close()


def test_a_cancel_through_one_replica_reaches_a_stream_on_another(apis, r):
    job_id = submit(apis[0])
    stream = Stream(f"{apis[1]}/events/{job_id}")
    assert stream.next()["job"]["status"] == "queued"
    status, _ = http_json("POST", f"{apis[0]}/cancel/{job_id}")
    assert status == 200
    final = stream.next()
    assert final["event"] == "end" and final["job"]["status"] == "cancelled"


def test_streams_are_capped_per_process_and_free_their_slot(apis, r):
    api = apis[1]
    job_id = submit(api)
    streams = [Stream(f"{api}/events/{job_id}") for _ in range(3)]
    for stream in streams:
        stream.next()
    over = requests.get(f"{api}/events/{job_id}", timeout=5)
    assert over.status_code == 503 and over.headers["Retry-After"] and "SSE_MAX_STREAMS" in over.json()["error"]
    assert requests.get(f"{api}/status/{job_id}", timeout=5).status_code == 200  # other requests still served
    streams[0].close()
    time.sleep(1.5)  # the next keepalive write finds the client gone and frees the slot

    def reopened():
        attempt = requests.get(f"{api}/events/{job_id}", stream=True, timeout=5)
        attempt.close()
        return attempt.status_code == 200

    assert reopened()
    for stream in streams[1:]:
        stream.close()


def test_unknown_and_malformed_ids(apis, r):
    assert requests.get(f"{apis[0]}/events/00000000-0000-4000-8000-000000000000", timeout=5).status_code == 404
    assert requests.get(f"{apis[0]}/events/nope", timeout=5).status_code == 400


def test_sigterm_ends_open_streams_so_the_api_stops_at_once(redis_server, r, tmp_path):
    proc, api = start_api(clean_env(REDIS_URL=redis_server.url, SSE_KEEPALIVE_S="30"), tmp_path)
    job_id = submit(api)
    stream = Stream(f"{api}/events/{job_id}")
    stream.next()
    stopping = time.monotonic()
    proc.stop(timeout=30)
    took = time.monotonic() - stopping
    assert stream.closed.wait(2), "the stream is still open after the API stopped"
    assert took < 5, f"the API took {took:.1f} s to stop with a stream open (graceful timeout: 10 s)"
    assert any("stopping" in c for c in stream.comments)


def test_a_stream_rides_out_a_short_redis_outage(apis, redis_server, r):
    """A Redis restart (or a failover) shorter than REDIS_FAILOVER_WAIT_S does not end a stream: it reads
    again once Redis answers, and the hub's new subscription wakes it."""
    job_id = submit(apis[0])
    stream = Stream(f"{apis[0]}/events/{job_id}")
    assert stream.next()["job"]["status"] == "queued"
    redis_server.stop()  # a clean stop writes the AOF: the job is still there afterwards
    try:
        time.sleep(2)  # several keepalives (0.5 s) whose reads fail
    finally:
        redis_server.start()
    back = redis.Redis.from_url(redis_server.url, decode_responses=True)
    start(back, job_id)
    assert stream.next(timeout=15)["job"]["status"] == "running"
    assert not stream.closed.is_set() and not any("cannot be reached" in c for c in stream.comments)
    stream.close()
