"""Soak test: the whole service under crashes and outages, then a count of what went wrong.

Starts a real redis-server (AOF, everysec), the dev node, the API (gunicorn), N workers, a webhook
receiver and a file server for the inputs, all on 127.0.0.1 in a temporary directory. Submits M jobs
of mixed types (csm, whisper, portrait, analyze) with webhooks, keeping a small backlog queued, while
a seeded chaos thread SIGKILLs workers (restarted a few seconds later under a new WORKER_ID),
restarts Redis, makes the dev node fail launches, stops running nodes through the control API and
takes the webhook receiver down for a while. Then it waits for every job to finish, lets webhooks
settle, stops the workers with SIGTERM (they stop their nodes) and prints

| accepted | succeeded | failed (by reason) | lost | ran twice to success | webhooks missing |
| webhooks duplicated | nodes left running | node-seconds billed |

plus the chaos events. Exit status 1 when lost, webhooks missing or nodes left running is not 0, or a
webhook copy differs from the first (webhook-id or body), or a process died that chaos did not kill.

    python bench/soak.py --jobs 300 --workers 3 [--seed S] [--duration-limit SECONDS]

Everything started is stopped at the end, on failure, on Ctrl-C and on SIGTERM; --keep keeps the
temporary directory (logs, Redis AOF) for a look afterwards.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

import config  # noqa: E402
import webhooks  # noqa: E402

C3_KEY = "soak-c3-key"
WEBHOOK_SECRET = "soak-webhook-secret"
FINISHED = ("success", "failed", "cancelled")
SENTENCES = ("Hello there.", "The soak test is running.", "One more short line.", "Good morning to you.",
             "This sentence is spoken by the dev node.", "Numbers like four and seven.")
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
CHAOS_KINDS = ("kill_worker", "restart_redis", "launch_failures", "kill_node", "receiver_down")
SUCCEEDED_LINE = re.compile(r"job ([0-9a-f-]{36}) succeeded in")


class Timeout(Exception):
    """The global deadline passed."""


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise Timeout(f"timed out after {timeout_s:.0f} s waiting for {what}")


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout_s: float = 10.0) -> tuple[int, Any]:
    """One JSON request; (status, decoded body). Connection errors raise OSError."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


def answers(url: str) -> bool:
    try:
        return http("GET", url, timeout_s=2)[0] == 200
    except OSError:
        return False


# --- child processes ------------------------------------------------------------------------------

@dataclasses.dataclass
class Child:
    """A process this script started, in its own session (so Ctrl-C reaches only us; we stop it)."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    killed_by_us: bool = False

    def start(self) -> Child:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.args, cwd=str(ROOT), env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.killed_by_us = False
        STARTED.append(self)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, signum: int) -> None:
        """Signal the process group (the child and anything it started), if the child still runs."""
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout_s; return the exit code."""
        if self.proc is None:
            return None
        self.killed_by_us = True
        self.send(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.proc.wait(10)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


STARTED: list[Child] = []


def stop_all_started() -> None:
    for child in reversed(STARTED):
        with contextlib.suppress(Exception):
            child.stop(15)


def base_env(**extra: str) -> dict[str, str]:
    """Our environment without c3-render settings, kept offline, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C3_", "MINIO_", "REDIS_", "DEVNODE_"))}
    env.update(OFFLINE_ENV)
    env.update(extra)
    return env


@dataclasses.dataclass
class RedisProc:
    port: int
    data_dir: Path
    log_path: Path
    child: Child | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.data_dir)]
        self.child = Child("redis", args, base_env(), self.log_path).start()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_until(lambda: _pings(client), 20, "redis-server to start")

    def stop(self) -> None:
        """SIGTERM: Redis writes and fsyncs its AOF and exits; nothing acknowledged is lost."""
        if self.child is not None:
            self.child.stop(20)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


# --- in-process servers: webhook receiver and input files ------------------------------------------

@dataclasses.dataclass
class Delivery:
    at: float
    webhook_id: str
    body: str
    signed_ok: bool


class Receiver:
    """Records every webhook it answers 2xx to; can be down (503, dropped connection, or refused)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.lock = threading.Lock()
        self.got: dict[str, list[Delivery]] = collections.defaultdict(list)
        self.mode = "up"  # up | 503 | drop | refused
        self.refused_while_down = 0
        self.server: ThreadingHTTPServer | None = None
        self._serve()

    def _serve(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                if receiver.mode == "drop":
                    receiver.refused_while_down += 1
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if receiver.mode != "up":
                    receiver.refused_while_down += 1
                    self.send_response(503)
                else:
                    receiver.record(dict(self.headers), body)
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True, name="receiver").start()

    def record(self, headers: dict[str, str], body: str) -> None:
        lowered = {k.lower(): v for k, v in headers.items()}
        try:
            job_id = json.loads(body)["id"]
        except (ValueError, KeyError, TypeError):
            job_id = "?"
        signed = webhooks.verify(WEBHOOK_SECRET, headers, body)
        with self.lock:
            self.got[job_id].append(Delivery(time.time(), lowered.get("webhook-id", ""), body, signed))

    def go_down(self, mode: str) -> None:
        self.mode = mode
        if mode == "refused" and self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def come_up(self) -> None:
        if self.server is None:
            self._serve()
        self.mode = "up"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def snapshot(self) -> dict[str, list[Delivery]]:
        with self.lock:
            return {k: list(v) for k, v in self.got.items()}


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def serve_files(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_QuietFiles, directory=str(directory)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="files").start()
    return server, f"http://127.0.0.1:{port}"


# --- the stack ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stack:
    tmp: Path
    redis: RedisProc
    devnode: Child
    devnode_url: str
    api: Child
    api_url: str
    env: dict[str, str]
    receiver: Receiver
    files: ThreadingHTTPServer
    files_url: str
    workers: dict[int, Child] = dataclasses.field(default_factory=dict)
    generation: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    all_workers: list[Child] = dataclasses.field(default_factory=list)
    r: redis.Redis | None = None


def start_devnode(tmp: Path) -> tuple[Child, str]:
    port = free_port()
    env = base_env(DEVNODE_CACHE_DIR=os.environ.get("DEVNODE_CACHE_DIR") or str(ROOT / "var" / "devnode-cache"),
                   DEVNODE_DATA_DIR=str(tmp / "devnode-data"), DEVNODE_BOOT_S="1", DEVNODE_API_KEY=C3_KEY)
    child = Child("devnode", [sys.executable, "-m", "devnode", "--host", "127.0.0.1", "--port", str(port)],
                  env, tmp / "devnode.log").start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: answers(url + "/admin/faults") or not child.alive(), 90, "the dev node")
    if not child.alive():
        raise RuntimeError("the dev node exited at start:\n" + child.log_text()[-3000:])
    return child, url


def service_env(tmp: Path, redis_url: str, devnode_url: str, workers: int) -> dict[str, str]:
    """The settings the API and the workers share (short timeouts so the chaos resolves quickly)."""
    return base_env(
        REDIS_URL=redis_url, C3_API_KEY=C3_KEY, C3_API_URL=f"{devnode_url}/api/v0",
        C3_NODE_URL="http://{node}", C3_COMFYUI_URL="http://{node}/comfyui", C3_OLLAMA_URL="http://{node}",
        OUTPUT_DIR=str(tmp / "output"), WORK_DIR=str(tmp / "work"), URL_ALLOWLIST="127.0.0.0/8",
        FILE_URL_SECRET="soak-file-secret", WEBHOOK_SECRET=WEBHOOK_SECRET,
        HEARTBEAT_TTL="3", SWEEP_INTERVAL_S="1", WEBHOOK_INTERVAL_S="3", WEBHOOK_ATTEMPTS="5",
        WEBHOOK_TIMEOUT_S="5", NODE_BOOT_TIMEOUT="30", LAUNCH_BACKOFF_S="0.2", GPU_IDLE_TIMEOUT="5",
        MAX_NODES=str(workers), WORKER_GRACE_S="10",
    )


def start_api(tmp: Path, env: dict[str, str]) -> tuple[Child, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env["PUBLIC_BASE_URL"] = url
    args = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "8",
            "--graceful-timeout", "10", "app:create_app()"]
    child = Child("api", args, env, tmp / "api.log").start()
    wait_until(lambda: answers(url + "/healthz") or not child.alive(), 60, "the API")
    if not child.alive():
        raise RuntimeError("the API exited at start:\n" + child.log_text()[-3000:])
    return child, url


def start_worker(stack: Stack, slot: int) -> Child:
    stack.generation[slot] += 1
    worker_id = f"soak-w{slot}-g{stack.generation[slot]}"
    env = dict(stack.env, WORKER_ID=worker_id)
    child = Child(worker_id, [sys.executable, "c3_render_worker.py"], env,
                  stack.tmp / f"worker-{worker_id}.log").start()
    stack.workers[slot] = child
    stack.all_workers.append(child)
    return child


def start_stack(tmp: Path, workers: int) -> Stack:
    redis_proc = RedisProc(free_port(), tmp / "redis", tmp / "redis.log")
    redis_proc.start()
    devnode, devnode_url = start_devnode(tmp)
    env = service_env(tmp, redis_proc.url, devnode_url, workers)
    api, api_url = start_api(tmp, env)
    inputs = tmp / "inputs"
    inputs.mkdir()
    files, files_url = serve_files(inputs)
    stack = Stack(tmp=tmp, redis=redis_proc, devnode=devnode, devnode_url=devnode_url, api=api,
                  api_url=api_url, env=env, receiver=Receiver(), files=files, files_url=files_url,
                  r=redis.Redis.from_url(redis_proc.url, decode_responses=True, socket_timeout=5,
                                         socket_connect_timeout=2))
    for slot in range(workers):
        start_worker(stack, slot)
    return stack


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


# --- jobs ------------------------------------------------------------------------------------------------

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


@dataclasses.dataclass
class Submissions:
    accepted: list[str] = dataclasses.field(default_factory=list)
    retries: int = 0  # answers of 503 / 5xx or no answer, each followed by a retry with the same key
    replayed: int = 0  # retries answered from the Idempotency-Key (the first try had been accepted)
    rejected: list[str] = dataclasses.field(default_factory=list)


def submit_one(stack: Stack, route: str, body: dict[str, Any], subs: Submissions, deadline: float) -> None:
    """Submit until the API answers; the same Idempotency-Key on every retry, so it is queued once."""
    key = str(uuid.uuid4())
    while time.monotonic() < deadline:
        try:
            status, answer = http("POST", stack.api_url + route, body, {"Idempotency-Key": key}, timeout_s=10)
        except OSError:
            status, answer = 0, None
        if status == 200 and isinstance(answer, dict) and answer.get("id"):
            if answer["id"] not in subs.accepted:
                subs.accepted.append(answer["id"])
            else:
                subs.replayed += 1
            return
        if status == 0 or status >= 500 or status == 429:
            subs.retries += 1
            time.sleep(0.5)
            continue
        subs.rejected.append(f"HTTP {status}: {answer}")
        return
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


def submit_all(stack: Stack, jobs: int, backlog: int, spread_s: float, rng: random.Random,
               deadline: float) -> Submissions:
    """Submit the jobs, keeping at most `backlog` unfinished so that chaos meets running jobs all along,
    and spread over at least spread_s seconds."""
    subs = Submissions()
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
        route, body = job_request(rng, stack.files_url, stack.receiver.url)
        before = len(subs.accepted)
        submit_one(stack, route, body, subs, deadline)
        if len(subs.accepted) > before:
            open_ids.append(subs.accepted[-1])
        if (number + 1) % 25 == 0:
            log(f"submitted {number + 1}/{jobs}")
    return subs


# --- chaos ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Event:
    at: float  # seconds since the chaos started
    kind: str
    detail: str


class Chaos:
    """Random faults at random moments (seeded); every fault is undone by a scheduled restore."""

    def __init__(self, stack: Stack, rng: random.Random, mean_interval_s: float, webhook_down_max_s: float):
        self.stack = stack
        self.rng = rng
        self.mean_interval_s = mean_interval_s
        self.webhook_down_max_s = webhook_down_max_s
        self.events: list[Event] = []
        self.restores: list[tuple[float, str, Callable[[], None]]] = []
        self.busy: set[str] = set()  # kinds whose fault is in force
        self.stop_event = threading.Event()
        self.start = time.monotonic()
        self.errors: list[str] = []
        self.unexpected_exits: list[str] = []
        # the first events go through every kind once (in a random order), then kinds are drawn at random
        self.pending_kinds = list(CHAOS_KINDS)
        rng.shuffle(self.pending_kinds)
        self.thread = threading.Thread(target=self.run, name="chaos", daemon=True)

    def note(self, kind: str, detail: str) -> None:
        event = Event(round(time.monotonic() - self.start, 1), kind, detail)
        self.events.append(event)
        log(f"chaos +{event.at:.1f}s {kind}: {detail}")

    def later(self, delay_s: float, name: str, action: Callable[[], None]) -> None:
        self.restores.append((time.monotonic() + delay_s, name, action))

    def run(self) -> None:
        next_at = time.monotonic() + self.rng.uniform(1, self.mean_interval_s)
        while not self.stop_event.is_set():
            self.run_due_restores(force=False)
            self.watch_workers()
            if time.monotonic() >= next_at:
                kind = self.pending_kinds.pop() if self.pending_kinds else self.rng.choice(CHAOS_KINDS)
                try:
                    self.fire(kind)
                except Exception as exc:
                    self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                    log(f"chaos {kind} could not be done: {exc}")
                next_at = time.monotonic() + self.rng.expovariate(1 / self.mean_interval_s) + 0.5
            self.stop_event.wait(0.2)
        self.run_due_restores(force=True)

    def finish(self) -> None:
        self.stop_event.set()
        self.thread.join(120)
        self.watch_workers()

    def run_due_restores(self, force: bool) -> None:
        for item in sorted(self.restores, key=lambda entry: entry[0]):
            when, name, action = item
            if force or time.monotonic() >= when:
                self.restores.remove(item)
                try:
                    action()
                except Exception as exc:
                    self.errors.append(f"restore {name}: {type(exc).__name__}: {exc}")
                    log(f"chaos restore {name} failed: {exc}")

    def watch_workers(self) -> None:
        """A worker that exited without being killed by us is a crash: note it and start it again."""
        for slot, child in list(self.stack.workers.items()):
            if child.proc is not None and not child.alive() and not child.killed_by_us:
                message = f"{child.name} exited by itself with status {child.proc.returncode}"
                self.unexpected_exits.append(message)
                child.killed_by_us = True
                self.note("worker_crashed", message)
                start_worker(self.stack, slot)

    def fire(self, kind: str) -> None:
        if kind in self.busy:
            kind = "kill_node" if kind != "kill_node" else "launch_failures"
        getattr(self, kind)()

    def kill_worker(self) -> None:
        slot = self.rng.choice(sorted(self.stack.workers))
        child = self.stack.workers[slot]
        child.killed_by_us = True
        child.send(signal.SIGKILL)
        if child.proc is not None:
            child.proc.wait(10)
        down = round(self.rng.uniform(2, 6), 1)
        self.note("kill_worker", f"SIGKILL {child.name}; a new worker in slot {slot} in {down} s")
        self.busy.add("kill_worker")

        def restart() -> None:
            self.busy.discard("kill_worker")
            new = start_worker(self.stack, slot)
            self.note("worker_restarted", new.name)

        self.later(down, "restart worker", restart)

    def restart_redis(self) -> None:
        down = round(self.rng.uniform(0.5, 2.5), 1)
        self.busy.add("restart_redis")
        self.stack.redis.stop()
        self.note("restart_redis", f"SIGTERM redis-server, down for {down} s")
        time.sleep(down)
        self.stack.redis.start()
        self.busy.discard("restart_redis")
        self.note("redis_up", "redis-server started again (same port and AOF directory)")

    def launch_failures(self) -> None:
        count = self.rng.choice((2, 2, 2, 3))
        status, answer = http("POST", self.stack.devnode_url + "/admin/faults", {"launch_failures": count,
                              "launch_failure_mode": self.rng.choice(("500", "html"))})
        self.note("launch_failures", f"the next {count} launches fail ({answer.get('launch_failure_mode')})"
                  if status == 200 else f"HTTP {status}")

    def kill_node(self) -> None:
        nodes = [n for n in devnode_nodes(self.stack.devnode_url) if n.get("state") == "running"]
        if not nodes:
            self.note("kill_node", "no running node to stop")
            return
        node = self.rng.choice(nodes)
        status, _ = http("POST", self.stack.devnode_url + "/api/v0/stop", {"workload": node["workload"]},
                         {"X-C3-API-KEY": C3_KEY})
        self.note("kill_node", f"stopped node {node['workload']} through the control API (HTTP {status})")

    def receiver_down(self) -> None:
        mode = self.rng.choice(("503", "drop", "refused"))
        down = round(self.rng.uniform(2, self.webhook_down_max_s), 1)
        self.busy.add("receiver_down")
        self.stack.receiver.go_down(mode)
        self.note("receiver_down", f"webhook receiver down ({mode}) for {down} s")

        def up() -> None:
            self.stack.receiver.come_up()
            self.busy.discard("receiver_down")
            self.note("receiver_up", "webhook receiver answers 200 again")

        self.later(down, "receiver up", up)


def devnode_nodes(devnode_url: str) -> list[dict[str, Any]]:
    status, answer = http("GET", devnode_url + "/admin/nodes")
    if status != 200:
        raise RuntimeError(f"/admin/nodes answered HTTP {status}")
    return answer["nodes"] if isinstance(answer, dict) else answer


# --- the end: drain, settle, shut down, count --------------------------------------------------------------

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


def webhooks_pending(stack: Stack) -> int | None:
    assert stack.r is not None
    try:
        pending = stack.r.llen(config.WEBHOOK_OUTBOX_KEY) + stack.r.zcard(config.WEBHOOK_RETRY_KEY)
        for key in stack.r.scan_iter(config.WEBHOOK_INFLIGHT_KEY.format(worker="*")):
            pending += stack.r.llen(key)
    except redis.RedisError:
        return None
    return pending


def settle_webhooks(stack: Stack, ids: list[str], deadline: float) -> None:
    """Wait until every finished job's webhook arrived and nothing is left to send (or the deadline)."""
    while time.monotonic() < deadline:
        got = stack.receiver.snapshot()
        if all(job_id in got for job_id in ids) and webhooks_pending(stack) == 0:
            break
        time.sleep(0.5)
    time.sleep(2.0)  # a copy being sent right now still arrives


def short_reason(error: str) -> str:
    """A short name for a failure message, to group them."""
    patterns = (
        ("could not launch", "launch failed"), ("failed during the job", "node failed mid-job"),
        ("did not become healthy", "node boot timeout"), ("MAX_ATTEMPTS", "worker died MAX_ATTEMPTS times"),
        ("404", "input 404"), ("max_time", "max_time"), ("complete_by", "complete_by"),
        ("cancelled", "cancelled"), ("could not store", "storage"), ("internal error", "internal error"),
    )
    for needle, name in patterns:
        if needle in error:
            return name
    return error[:60]


@dataclasses.dataclass
class Report:
    accepted: int = 0
    succeeded: int = 0
    failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    lost: list[str] = dataclasses.field(default_factory=list)
    ran_twice: list[str] = dataclasses.field(default_factory=list)
    webhooks_missing: list[str] = dataclasses.field(default_factory=list)
    webhooks_duplicated: list[str] = dataclasses.field(default_factory=list)
    copies_differ: list[str] = dataclasses.field(default_factory=list)
    bad_signatures: int = 0
    nodes_left: list[str] = dataclasses.field(default_factory=list)
    nodes_launched: int = 0
    node_seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)


def count(stack: Stack, subs: Submissions, nodes: list[dict[str, Any]]) -> Report:
    assert stack.r is not None
    report = Report(accepted=len(subs.accepted))
    pipe = stack.r.pipeline(transaction=False)
    for job_id in subs.accepted:
        pipe.hgetall(f"job:{job_id}")
    records = dict(zip(subs.accepted, pipe.execute(), strict=True))
    got = stack.receiver.snapshot()
    for job_id, record in records.items():
        status = record.get("status")
        if status not in FINISHED:
            report.lost.append(f"{job_id} ({status or 'record missing'})")
            continue
        if status == "success":
            report.succeeded += 1
        else:
            report.failed[short_reason(record.get("error") or status)] += 1
        copies = got.get(job_id, [])
        if record.get("notify_url") and not copies:
            report.webhooks_missing.append(f"{job_id} (webhook_status {record.get('webhook_status')}, "
                                           f"{record.get('webhook_error', '')})")
        if len(copies) > 1:
            report.webhooks_duplicated.append(job_id)
        for copy in copies:
            if copy.webhook_id != job_id or copy.body != copies[0].body:
                report.copies_differ.append(f"{job_id}: webhook-id {copy.webhook_id!r}, body {copy.body}")
            report.bad_signatures += 0 if copy.signed_ok else 1
    strangers = set(got) - set(records)
    if strangers:
        report.problems.append(f"webhooks for jobs we did not submit: {sorted(strangers)[:5]}")
    successes: collections.Counter = collections.Counter()
    for child in stack.all_workers:
        successes.update(SUCCEEDED_LINE.findall(child.log_text()))
    report.ran_twice = sorted(job_id for job_id, n in successes.items() if n > 1)
    now = time.time()
    report.nodes_launched = len(nodes)
    for node in nodes:
        report.node_seconds += (node.get("stopped_at") or now) - node["launched_at"]
        if node.get("state") in ("booting", "running"):
            report.nodes_left.append(node["workload"])
    if report.bad_signatures:
        report.problems.append(f"{report.bad_signatures} webhook(s) with a bad signature")
    if subs.rejected:
        report.problems.append(f"{len(subs.rejected)} submission(s) rejected: {subs.rejected[:3]}")
    return report


def table(report: Report) -> str:
    failed = sum(report.failed.values())
    reasons = ", ".join(f"{name} {n}" for name, n in report.failed.most_common())
    failed_cell = f"{failed} ({reasons})" if failed else "0"
    head = ("accepted", "succeeded", "failed (by reason)", "lost", "ran twice to success", "webhooks missing",
            "webhooks duplicated", "nodes left running", "node-seconds billed")
    row = (report.accepted, report.succeeded, failed_cell, len(report.lost), len(report.ran_twice),
           len(report.webhooks_missing), len(report.webhooks_duplicated), len(report.nodes_left),
           f"{report.node_seconds:.0f} ({report.nodes_launched} nodes)")
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
                      "| " + " | ".join(str(cell) for cell in row) + " |"])


def verdict(report: Report, chaos: Chaos, api: Child, devnode: Child) -> list[str]:
    """What makes the run fail; empty when it passed."""
    wrong = []
    if report.lost:
        wrong.append(f"lost {len(report.lost)}: {report.lost[:5]}")
    if report.webhooks_missing:
        wrong.append(f"webhooks missing {len(report.webhooks_missing)}: {report.webhooks_missing[:5]}")
    if report.nodes_left:
        wrong.append(f"nodes left running {len(report.nodes_left)}: {report.nodes_left[:5]}")
    if report.copies_differ:
        wrong.append(f"webhook copies that differ from the first: {report.copies_differ[:3]}")
    wrong += report.problems
    wrong += [f"unexpected exit: {m}" for m in chaos.unexpected_exits]
    for child in (api, devnode):
        if child.proc is not None and child.proc.poll() is not None and not child.killed_by_us:
            wrong.append(f"{child.name} died during the run (status {child.proc.returncode})")
    return wrong


# --- main ---------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300, help="jobs to submit (default 300)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the job mix and the chaos (default: random)")
    parser.add_argument("--duration-limit", type=float, default=1800.0,
                        help="global deadline in seconds; the soak stops by itself after it (default 1800)")
    parser.add_argument("--chaos-interval", type=float, default=5.0,
                        help="mean seconds between chaos events (default 5)")
    parser.add_argument("--backlog", type=int, default=0,
                        help="unfinished jobs kept submitted at a time (default 4 per worker)")
    parser.add_argument("--spread", type=float, default=0.0,
                        help="spread the submissions over at least this many seconds, so that a small run "
                             "still meets enough chaos (default 0: as fast as the backlog allows)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, AOF)")
    return parser.parse_args(argv)


def on_sigterm(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    started_at = time.monotonic()
    deadline = started_at + args.duration_limit
    signal.signal(signal.SIGTERM, on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="c3-soak-"))
    command = f"python bench/soak.py --jobs {args.jobs} --workers {args.workers} --seed {seed}"
    log(f"{command}  (deadline {args.duration_limit:.0f} s, logs in {tmp})")
    stack: Stack | None = None
    chaos: Chaos | None = None
    passed = False
    try:
        stack = start_stack(tmp, args.workers)
        log(f"redis {stack.redis.url}, dev node {stack.devnode_url}, API {stack.api_url}, "
            f"{args.workers} workers")
        make_images(tmp / "inputs")
        log(f"inputs ready: {make_speech(stack, tmp / 'inputs')}, a 256 px face, a plain image")
        interval = float(stack.env["WEBHOOK_INTERVAL_S"])
        attempts = int(stack.env["WEBHOOK_ATTEMPTS"])
        chaos = Chaos(stack, rng, args.chaos_interval, webhook_down_max_s=min(8.0, interval * (attempts - 1) - 4))
        chaos.thread.start()
        subs = submit_all(stack, args.jobs, args.backlog or 4 * args.workers, args.spread, rng, deadline - 90)
        log(f"all {args.jobs} submitted ({len(subs.accepted)} accepted, {subs.retries} retried, "
            f"{subs.replayed} answered from the Idempotency-Key); chaos stops")
        chaos.finish()
        http("POST", stack.devnode_url + "/admin/reset", {})
        drain(stack, subs.accepted, deadline - 60)
        settle_webhooks(stack, subs.accepted, min(deadline - 40, time.monotonic() + interval * attempts + 30))
        log("stopping the workers (SIGTERM; each stops its node)")
        for child in stack.workers.values():
            child.killed_by_us = True
            child.send(signal.SIGTERM)
        for child in stack.workers.values():
            child.stop(30)
        time.sleep(1.0)
        nodes = devnode_nodes(stack.devnode_url)
        report = count(stack, subs, nodes)
        wall = time.monotonic() - started_at
        print()
        print(table(report))
        print()
        print_details(report, chaos, subs, wall, command, args)
        wrong = verdict(report, chaos, stack.api, stack.devnode)
        if wrong:
            print("\nFAILED:")
            for line in wrong:
                print(f"- {line}")
            return 1
        print("\nPASSED: nothing lost, every webhook arrived, no node left running")
        passed = True
        return 0
    except Timeout as exc:
        log(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        if chaos is not None:
            chaos.stop_event.set()
        stop_all_started()
        if stack is not None:
            stack.receiver.close()
            stack.files.shutdown()
        if args.keep or not passed:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def print_details(report: Report, chaos: Chaos, subs: Submissions, wall: float, command: str,
                  args: argparse.Namespace) -> None:
    kinds = collections.Counter(event.kind for event in chaos.events)
    print(f"command: {command} --duration-limit {args.duration_limit:g} --chaos-interval {args.chaos_interval:g}"
          + (f" --spread {args.spread:g}" if args.spread else ""))
    print(f"wall time: {wall:.0f} s")
    print("chaos events: " + ", ".join(f"{kind} {kinds[kind]}" for kind in CHAOS_KINDS)
          + (f", worker_crashed {kinds['worker_crashed']}" if kinds["worker_crashed"] else ""))
    print(f"submissions retried after 503 or no answer: {subs.retries}; answered from the Idempotency-Key: "
          f"{subs.replayed}")
    print(f"webhook deliveries refused while the receiver was down: {chaos.stack.receiver.refused_while_down}")
    print("Redis runs with appendonly yes, appendfsync everysec: a crash of the host can lose up to 1 s of "
          "writes; the soak restarts it cleanly (SIGTERM), which loses nothing.")
    if report.ran_twice:
        print(f"ran twice to success: {report.ran_twice[:10]}")
    if report.webhooks_duplicated:
        print(f"webhooks duplicated (same webhook-id each copy): {report.webhooks_duplicated[:10]}")
    if chaos.errors:
        print(f"chaos actions that could not be done: {chaos.errors[:10]}")
    print("\nchaos log:")
    for event in chaos.events:
        print(f"  +{event.at:7.1f}s  {event.kind:<16} {event.detail}")


if __name__ == "__main__":
    sys.exit(main())
