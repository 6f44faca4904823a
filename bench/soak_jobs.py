"""The soak test's jobs: inputs, a random job mix, submission with Idempotency-Key retries, draining."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import redis
from soak_common import FINISHED, Timeout, http, log, wait_until
from soak_receivers import HOSTILE
from soak_stack import Stack

SENTENCES = ("Hello there.", "The soak test is running.", "One more short line.", "Good morning to you.",
             "This sentence is spoken by the dev node.", "Numbers like four and seven.")


def make_images(inputs: Path) -> None:
    import numpy as np
    from PIL import Image
    from skimage import data as sample_data

    face = Image.fromarray(sample_data.astronaut())
    face.thumbnail((256, 256))
    face.save(inputs / "face.jpg", quality=88)
    Image.fromarray(np.full((128, 160, 3), (40, 110, 190), dtype=np.uint8)).save(inputs / "plain.png")


def make_speech(stack: Stack, inputs: Path) -> str:
    """A short speech MP3 from one CSM job (the first node boot, before any chaos); a sine if that fails."""
    dest = inputs / "speech.mp3"
    try:
        status, answer = http("POST", stack.api_url + "/csm", {"text": "Hello from the soak test of c3 render."})
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {answer}")
        job_id = answer["id"]
        record = wait_until(lambda: _finished_record(stack, job_id), 180, "the speech job")
        if record.get("status") != "success":
            raise RuntimeError(record.get("error", record.get("status")))
        with urllib.request.urlopen(record["result_url"], timeout=30) as response:
            dest.write_bytes(response.read())
        return "speech from a CSM job"
    except (OSError, RuntimeError, Timeout, KeyError) as exc:
        log(f"speech job failed ({exc}); using a 2 s sine instead")
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
                        "-q:a", "9", str(dest)], check=True, timeout=60)
        return "a 2 s sine (ffmpeg)"


def _finished_record(stack: Stack, job_id: str) -> dict[str, str] | None:
    assert stack.r is not None
    try:
        record = stack.r.hgetall(f"job:{job_id}")
    except redis.RedisError:
        return None
    return record if record.get("status") in FINISHED else None


def job_request(rng: random.Random, files_url: str, notify_url: str) -> tuple[str, dict[str, Any]]:
    """One job of a random type (route, body), each cheap on CPU; a few fail on purpose (input 404)."""
    kind = rng.choices(("csm", "whisper", "portrait", "analyze", "bad_input"), weights=(30, 25, 15, 27, 3))[0]
    if kind == "csm":
        route, body = "/csm", {"text": rng.choice(SENTENCES),
                               "voice": rng.choice(("random", "conversational_a", "conversational_b"))}
    elif kind == "whisper":
        route, body = "/api/v1/jobs/whisper", {"audio_url": f"{files_url}/speech.mp3", "model": "tiny",
                                               "language": "en"}
    elif kind == "portrait":
        route, body = "/portrait", {"image_url": f"{files_url}/face.jpg", "audio_url": f"{files_url}/speech.mp3"}
    elif kind == "analyze":
        image = rng.choice(("face.jpg", "plain.png"))
        route, body = "/analyze", {"image_url": f"{files_url}/{image}", "prompt": "How many people?"}
    else:
        route, body = "/analyze", {"image_url": f"{files_url}/missing-{rng.randrange(10**6)}.jpg"}
    return route, {**body, "notify_url": notify_url}


def pick_receiver(rng: random.Random, hostile_share: float) -> str:
    """The receiver a job's notify_url points at: a hostile one for about hostile_share of the jobs."""
    if rng.random() < hostile_share:
        return rng.choices(HOSTILE, weights=(1, 3, 1))[0]  # drip the most: it holds a sender the longest
    return rng.choices(("healthy-1", "healthy-2", "flaky"), weights=(40, 40, 20))[0]


@dataclasses.dataclass
class Submissions:
    accepted: list[str] = dataclasses.field(default_factory=list)
    receiver_of: dict[str, str] = dataclasses.field(default_factory=dict)  # job id -> receiver name
    retries: int = 0  # answers of 503 / 5xx or no answer, each followed by a retry with the same key
    replayed: int = 0  # retries answered from the Idempotency-Key (the first try had been accepted)
    rejected: list[str] = dataclasses.field(default_factory=list)
    sending: threading.Event = dataclasses.field(default_factory=threading.Event)  # a submission under way
    extra: int = 0  # jobs the chaos submitted (to cancel them, or to have a webhook for an outage)


def submit_one(stack: Stack, route: str, body: dict[str, Any], subs: Submissions, deadline: float) -> str | None:
    """Submit until the API answers; the same Idempotency-Key on every retry, so it is queued once.
    Returns the job id (None when the API refused the job)."""
    key = str(uuid.uuid4())
    while time.monotonic() < deadline:
        subs.sending.set()
        try:
            status, answer = http("POST", stack.api_url + route, body, {"Idempotency-Key": key}, timeout_s=10)
        except OSError:
            status, answer = 0, None
        finally:
            subs.sending.clear()
        if status == 200 and isinstance(answer, dict) and answer.get("id"):
            if answer["id"] not in subs.accepted:
                subs.accepted.append(answer["id"])
            else:
                subs.replayed += 1
            return str(answer["id"])
        if status == 0 or status >= 500 or status == 429:
            subs.retries += 1
            time.sleep(0.5)
            continue
        subs.rejected.append(f"HTTP {status}: {answer}")
        return None
    raise Timeout("deadline passed while submitting")


def unfinished(stack: Stack, ids: list[str]) -> list[str] | None:
    """The ids not finished yet (None when Redis cannot be asked right now)."""
    assert stack.r is not None
    if not ids:
        return []
    try:
        pipe = stack.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(f"job:{job_id}", "status")
        statuses = pipe.execute()
    except redis.RedisError:
        return None
    return [job_id for job_id, status in zip(ids, statuses, strict=True) if status not in FINISHED]


def submit_all(stack: Stack, subs: Submissions, jobs: int, backlog: int, spread_s: float, rng: random.Random,
               hostile_share: float, deadline: float) -> Submissions:
    """Submit the jobs, keeping at most `backlog` unfinished so that chaos meets running jobs all along,
    and spread over at least spread_s seconds; each job's webhook goes to one of the receivers."""
    open_ids: list[str] = []
    start = time.monotonic()
    for number in range(jobs):
        time.sleep(max(0.0, start + spread_s * number / jobs - time.monotonic()))
        while len(open_ids) >= backlog:
            if time.monotonic() > deadline:
                raise Timeout("deadline passed while submitting")
            still = unfinished(stack, open_ids)
            if still is None:
                break  # Redis is down: submit now, so that the 503 answers and the retries are exercised
            open_ids = still
            if len(open_ids) >= backlog:
                time.sleep(0.3)
        receiver = pick_receiver(rng, hostile_share)
        route, body = job_request(rng, stack.files_url, stack.receivers[receiver].url)
        job_id = submit_one(stack, route, body, subs, deadline)
        if job_id:
            open_ids.append(job_id)
            subs.receiver_of[job_id] = receiver
        if (number + 1) % 25 == 0:
            log(f"submitted {number + 1}/{jobs}")
    return subs


def drain(stack: Stack, ids: list[str], deadline: float) -> None:
    open_ids = list(ids)
    last_report = 0.0
    while open_ids and time.monotonic() < deadline:
        still = unfinished(stack, open_ids)
        if still is not None:
            open_ids = still
        if time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            log(f"waiting for {len(open_ids)} job(s) to finish")
        time.sleep(0.5)
    if open_ids:
        log(f"deadline: {len(open_ids)} job(s) not finished")
