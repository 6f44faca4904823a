"""A Python client of the c3-render API: typed functions over `requests`.

    import c3_render_client as c3
    api = c3.connect("http://127.0.0.1:8000", api_key="...")   # or C3_RENDER_API / C3_RENDER_API_KEY
    job_id = c3.submit_csm(api, text="Hello there.", voice="conversational_a")
    final = c3.wait(api, job_id, timeout=600)                   # raises JobFailed with the job's error
    c3.download(api, job_id, "hello.mp3")

    pipeline = c3.submit_pipeline(api, {                          # one request, jobs chained by output
        "speech": {"type": "csm", "text": "Hello there."},
        "video": {"type": "portrait", "image_url": "https://example.com/face.jpg",
                  "audio_url": "{{speech.result_url}}"}})
    final = c3.wait_pipeline(api, pipeline["id"])                  # raises PipelineFailed
    c3.download(api, final["steps"]["video"]["id"], "talk.mp4")

Every function takes the `Api` from connect(). Errors of the service come back as ApiError with its
status and message; a job that ends failed or cancelled raises JobFailed from wait() (a pipeline:
PipelineFailed from wait_pipeline()). watch() follows a job over Server-Sent Events (GET /events/<id>),
reconnecting with Last-Event-ID, and falls back to polling /status if the stream cannot be opened;
watch_pipeline() does the same for a pipeline (polling /pipelines/<id>).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from jobspec import FINISHED_STATUSES, SUBMIT_ROUTES

DEFAULT_API_URL = "http://127.0.0.1:8000"
SUBMIT_ROUTE = {job_type: route for route, job_type in reversed(SUBMIT_ROUTES.items())}  # canonical route


class ApiError(Exception):
    """The service answered with an error (or could not be reached: status 0)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


class JobFailed(Exception):
    """The job ended failed or cancelled; `job` is its final status object."""

    def __init__(self, job: dict[str, Any]):
        super().__init__(f"job {job['id']} {job['status']}: {job.get('error') or job['status']}")
        self.job = job


class PipelineFailed(JobFailed):
    """The pipeline ended failed or cancelled; `job` is its final object (its steps with their errors)."""

    def __init__(self, pipeline: dict[str, Any]):
        Exception.__init__(self, f"pipeline {pipeline['id']} {pipeline['status']}: "
                                 f"{pipeline.get('error') or pipeline['status']}")
        self.job = pipeline


class WaitTimeout(Exception):
    """wait() gave up before the job finished; `job` is the last status seen."""

    def __init__(self, job_id: str, seconds: float, job: dict[str, Any] | None):
        super().__init__(f"job {job_id} not finished after {seconds:g} s")
        self.job = job


@dataclass(frozen=True)
class Api:
    url: str
    api_key: str = field(default="", repr=False)
    timeout_s: float = 30.0
    session: requests.Session = field(default_factory=requests.Session, repr=False, compare=False)

    def headers(self) -> dict[str, str]:
        return {"X-C3-RENDER-KEY": self.api_key} if self.api_key else {}


def connect(url: str | None = None, api_key: str | None = None, timeout_s: float = 30.0) -> Api:
    """An Api for url (default $C3_RENDER_API, else http://127.0.0.1:8000), key default $C3_RENDER_API_KEY."""
    url = url or os.environ.get("C3_RENDER_API") or DEFAULT_API_URL
    key = api_key if api_key is not None else os.environ.get("C3_RENDER_API_KEY", "")
    return Api(url=url.rstrip("/"), api_key=key, timeout_s=timeout_s)


def call(api: Api, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> Any:
    """One JSON request; the decoded answer, or ApiError with the service's message."""
    try:
        response = api.session.request(method, api.url + path, json=body, params=params,
                                       headers={**api.headers(), **(headers or {})}, timeout=api.timeout_s)
    except requests.RequestException as exc:
        raise ApiError(0, f"cannot reach {api.url}: {type(exc).__name__}: {exc}") from None
    if response.status_code >= 400:
        try:
            message = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500] or response.reason
        raise ApiError(response.status_code, message)
    return response.json()


# --- submitting ----------------------------------------------------------------------------------

def submit(api: Api, job_type: str, params: dict[str, Any], idempotency_key: str | None = None) -> str:
    """Queue a job of job_type with the request fields in params; its id."""
    if job_type not in SUBMIT_ROUTE:
        raise ValueError(f"unknown job type {job_type!r}: one of {', '.join(SUBMIT_ROUTE)}")
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    body = {k: v for k, v in params.items() if v is not None}
    return call(api, "POST", SUBMIT_ROUTE[job_type], body, headers=headers)["id"]


def submit_csm(api: Api, *, text: str | None = None, monologue: list[str] | str | None = None,
               voice: str | None = None, reference_audio_url: str | None = None,
               reference_text: str | None = None, idempotency_key: str | None = None, **options: Any) -> str:
    """Text to speech (result: an MP3 file). Exactly one of text and monologue. The other submit_* take
    idempotency_key too: sent as the Idempotency-Key header, so a retried submit queues one job."""
    return submit(api, "csm", {"text": text, "monologue": monologue, "voice": voice,
                               "reference_audio_url": reference_audio_url, "reference_text": reference_text,
                               **options}, idempotency_key)


def submit_whisper(api: Api, audio_url: str, *, model: str | None = None, task: str | None = None,
                   language: str | None = None, idempotency_key: str | None = None, **options: Any) -> str:
    """Speech to text (result: text)."""
    return submit(api, "whisper", {"audio_url": audio_url, "model": model, "task": task, "language": language,
                                   **options}, idempotency_key)


def submit_portrait(api: Api, image_url: str, audio_url: str, *, idempotency_key: str | None = None,
                    **options: Any) -> str:
    """Talking-portrait video (result: an MP4 file)."""
    return submit(api, "portrait", {"image_url": image_url, "audio_url": audio_url, **options}, idempotency_key)


def submit_analyze(api: Api, image_url: str, *, prompt: str | None = None, idempotency_key: str | None = None,
                   **options: Any) -> str:
    """Image analysis (result: text)."""
    return submit(api, "analyze", {"image_url": image_url, "prompt": prompt, **options}, idempotency_key)


def submit_pipeline(api: Api, steps: dict[str, dict[str, Any]], *, notify_url: str | None = None,
                    idempotency_key: str | None = None) -> dict[str, Any]:
    """Queue jobs chained by their outputs: steps is {name: job body with its "type"}, where a string that is
    exactly "{{<step>.<output>}}" takes an earlier step's result_url (csm, portrait) or text (whisper,
    analyze). The answer: {"id": pipeline id, "status", "steps": {name: job id}}."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    body: dict[str, Any] = {"steps": {name: {k: v for k, v in step.items() if v is not None}
                                      for name, step in steps.items()}}
    if notify_url:
        body["notify_url"] = notify_url
    return call(api, "POST", "/pipelines", body, headers=headers)


def pipeline_status(api: Api, pipeline_id: str) -> dict[str, Any]:
    """{"id", "status", "created_at", "started_at", "finished_at", "steps": {name: status object}, ...}."""
    return call(api, "GET", f"/pipelines/{pipeline_id}")


def cancel_pipeline(api: Api, pipeline_id: str) -> dict[str, Any]:
    """Cancel every unfinished step of a pipeline."""
    return call(api, "POST", f"/pipelines/{pipeline_id}/cancel")


# --- following ------------------------------------------------------------------------------------

def status(api: Api, job_id: str) -> dict[str, Any]:
    return call(api, "GET", f"/status/{job_id}")


def result(api: Api, job_id: str) -> dict[str, Any]:
    """{"id", "status", "result_url" | "text" | "error"}; ApiError 409 while the job is not finished."""
    return call(api, "GET", f"/result/{job_id}")


def cancel(api: Api, job_id: str) -> dict[str, Any]:
    return call(api, "POST", f"/cancel/{job_id}")


def list_jobs(api: Api, *, status: str | None = None, job_type: str | None = None, limit: int = 50,
              cursor: str | None = None) -> dict[str, Any]:
    """One page, newest first: {"jobs": [status objects], "next_cursor": str | None}."""
    params = {"status": status, "type": job_type, "limit": limit, "cursor": cursor}
    return call(api, "GET", "/jobs", params={k: v for k, v in params.items() if v is not None})


def iter_jobs(api: Api, *, status: str | None = None, job_type: str | None = None,
              page_size: int = 100) -> Iterator[dict[str, Any]]:
    """Every job matching the filters, newest first, page after page."""
    cursor = None
    while True:
        page = list_jobs(api, status=status, job_type=job_type, limit=page_size, cursor=cursor)
        yield from page["jobs"]
        cursor = page["next_cursor"]
        if not cursor:
            return


def watch(api: Api, job_id: str, *, timeout: float | None = None,
          poll_s: float = 1.0) -> Iterator[dict[str, Any]]:
    """The job's status object at every change, ending with its final one (over /events, else polling).

    Raises WaitTimeout when timeout seconds pass first.
    """
    return follow_events(api, job_id, lambda: status(api, job_id), timeout, poll_s)


def watch_pipeline(api: Api, pipeline_id: str, *, timeout: float | None = None,
                   poll_s: float = 1.0) -> Iterator[dict[str, Any]]:
    """The pipeline's object (GET /pipelines/<id>) at every change of it or its steps, ending with its final
    one (over /events, else polling). Raises WaitTimeout when timeout seconds pass first."""
    return follow_events(api, pipeline_id, lambda: pipeline_status(api, pipeline_id), timeout, poll_s)


def follow_events(api: Api, ident: str, read: Callable[[], dict[str, Any]], timeout: float | None,
                  poll_s: float) -> Iterator[dict[str, Any]]:
    """What /events/<ident> sends, until the end; read() (its status route) says what went wrong when the
    stream is refused, and is polled when no event stream can be had."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last_id = ""
    last_job: dict[str, Any] | None = None
    failures = 0

    def remaining() -> float:
        if deadline is None:
            return 60.0
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(ident, timeout or 0, last_job)
        return min(60.0, left)

    while True:
        headers = {**api.headers(), "Accept": "text/event-stream"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        try:
            with api.session.get(f"{api.url}/events/{ident}", headers=headers, stream=True,
                                 timeout=(api.timeout_s, remaining())) as response:
                if response.status_code == 204:  # we already had the final event
                    return
                if response.status_code in (400, 401, 403, 404):
                    read()  # raises ApiError with the service's message
                if response.status_code >= 400 or \
                        not response.headers.get("Content-Type", "").startswith("text/event-stream"):
                    raise ApiError(response.status_code, "no event stream")
                failures = 0
                for event in parse_events(response.iter_lines(decode_unicode=True)):
                    remaining()  # a keepalive (an event without data) lets a deadline pass here
                    if "data" not in event:
                        continue
                    last_id = event.get("id", last_id)
                    last_job = json.loads(event["data"])
                    yield last_job
                    if event.get("event") == "end" or last_job.get("status") in FINISHED_STATUSES:
                        return
        except (requests.RequestException, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status in (400, 401, 403, 404):
                raise
            remaining()
            failures += 1
            if failures >= 3:  # no event stream here (a proxy, an older server): poll instead
                for job in poll(read, poll_s):
                    remaining()
                    yield job
                return
            time.sleep(min(5.0, 0.5 * failures))


def parse_events(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-Sent Events from a stream of lines: {"event", "id", "data"} per event; a comment-only
    block (a keepalive) gives an empty dict, so a reader can look at the clock."""
    event: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                event["data"] = "\n".join(data)
            yield event
            event, data = {}, []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name in ("event", "id"):
                event[name] = value


def poll(read: Callable[[], dict[str, Any]], interval_s: float = 1.0) -> Iterator[dict[str, Any]]:
    """What read() gives (a job's or a pipeline's status) whenever it differs from the last, until finished."""
    last = None
    while True:
        job = read()
        if job != last:
            yield job
            last = job
        if job["status"] in FINISHED_STATUSES:
            return
        time.sleep(interval_s)


def final_of(updates: Iterator[dict[str, Any]], on_update: Callable[[dict[str, Any]], None] | None,
             ask: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The last object a watch yields, each shown to on_update; asked once more (ask()) when the stream
    ended without a finished one (a 204: the final event was already seen)."""
    last: dict[str, Any] | None = None
    for last in updates:
        if on_update:
            on_update(last)
    if last is None or last["status"] not in FINISHED_STATUSES:
        last = ask()
    return last


def wait(api: Api, job_id: str, timeout: float | None = None,
         on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Block until the job finishes; its final status object. Raises JobFailed (failed or cancelled)
    or WaitTimeout after timeout seconds; on_update sees every status object on the way."""
    job = final_of(watch(api, job_id, timeout=timeout), on_update, lambda: status(api, job_id))
    if job["status"] != "success":
        raise JobFailed(job)
    return job


def wait_pipeline(api: Api, pipeline_id: str, timeout: float | None = None,
                  on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Block until the pipeline finishes; its final object (each step with its result_url or text). Raises
    PipelineFailed (failed or cancelled) or WaitTimeout after timeout seconds; on_update sees every change."""
    pipeline = final_of(watch_pipeline(api, pipeline_id, timeout=timeout), on_update,
                        lambda: pipeline_status(api, pipeline_id))
    if pipeline["status"] != "success":
        raise PipelineFailed(pipeline)
    return pipeline


def download(api: Api, job_id: str, dest: str | Path) -> Path:
    """Save a finished media job's result file to dest; the path."""
    answer = result(api, job_id)
    if answer.get("status") != "success":
        raise JobFailed({**answer, "id": job_id})
    url = answer.get("result_url")
    if not url:
        raise ApiError(0, f"job {job_id} has a text result, not a file: use result()['text']")
    same_origin = urlsplit(url)[:2] == urlsplit(api.url)[:2]
    dest = Path(dest)
    with api.session.get(url, stream=True, timeout=api.timeout_s,
                         headers=api.headers() if same_origin else None) as response:
        if response.status_code >= 400:
            raise ApiError(response.status_code, f"downloading the result failed: {response.reason}")
        tmp = dest.with_name(dest.name + ".part")
        with open(tmp, "wb") as out:
            for chunk in response.iter_content(chunk_size=1 << 16):
                out.write(chunk)
        tmp.replace(dest)
    return dest
