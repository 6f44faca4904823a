"""The soak test's chaos thread: seeded faults at random moments, each undone by a scheduled restore.

The kinds (CHAOS_KINDS, in the order the table shows them):

- kill_worker: SIGKILL a worker; a new one starts in its slot a few seconds later
- rolling_restart: SIGTERM every worker in turn (preferably while it sends a webhook), a new one each time
- kill_in_launch_window: SIGKILL a worker between its launch call and the answer being recorded (the
  worker's node record says "launching"); widened with the dev node's `launch_answer_delay_s` switch
  when it has one
- launch_failures: the next 2-3 launches answer an error
- launch_answer_lost: the next launch creates its node but its answer is lost (dev node switch
  `launch_answer_lost`; only when the dev node has it)
- kill_node: stop a running node through the control API (a node death mid-job)
- engine_error / engine_hang: an engine answers errors / never finishes for a few seconds; the hung
  jobs are then cancelled (CSM, WhisperX) or their node is stopped
- restart_redis (SIGTERM) / kill_redis (SIGKILL; AOF everysec): Redis down for up to 2.5 s
- kill_api: SIGKILL the API during submissions (clients retry with the same Idempotency-Key); it is
  started again on the same port
- receiver_down: the flaky webhook receiver down for less than the retry window
- receiver_outage_long: the flaky receiver down for longer than the retry window (its webhooks fail
  for good and are redelivered at the end)
- cancel_queued / cancel_running: cancel a queued / a running job through the API
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from soak_common import C3_KEY, FINISHED, http, log
from soak_jobs import Submissions, job_request, submit_one
from soak_stack import Stack, devnode_faults, devnode_nodes, kill_api, restart_api, set_faults, start_worker

import config

CHAOS_KINDS = ("kill_worker", "rolling_restart", "kill_in_launch_window", "launch_failures", "launch_answer_lost",
               "kill_node", "engine_error", "engine_hang", "restart_redis", "kill_redis", "kill_api",
               "receiver_down", "receiver_outage_long", "cancel_queued", "cancel_running")
# What each kind takes while its fault is in force (no second fault on the same part meanwhile).
TAKES = {"kill_worker": "workers", "rolling_restart": "workers", "kill_in_launch_window": "workers",
         "engine_error": "engine", "engine_hang": "engine", "restart_redis": "redis", "kill_redis": "redis",
         "kill_api": "api", "receiver_down": "receiver", "receiver_outage_long": "receiver"}
NEEDS = {"cancel_queued": "api", "cancel_running": "api"}  # parts that must be up for the kind
# Dev node switches a kind needs; a dev node without them (an older one) skips the kind.
SWITCHES = {"launch_answer_lost": "launch_answer_lost"}
ENGINE_JOB_TYPE = {"csm": "csm", "whisper": "whisper", "comfyui": "portrait", "ollama": "analyze"}
CANCELLABLE_HANGS = ("csm", "whisper")  # Gradio jobs end when cancelled; other hangs end with their node
OUTAGE_MAX_S = 60.0  # the longest outage of the flaky receiver


@dataclasses.dataclass
class Event:
    at: float  # seconds since the chaos started
    kind: str
    detail: str
    wall: float = 0.0  # unix time


class Chaos:
    """Random faults at random moments (seeded); every fault is undone by a scheduled restore."""

    def __init__(self, stack: Stack, subs: Submissions, rng: random.Random, mean_interval_s: float,
                 webhook_down_max_s: float, retry_window_s: float, skip: set[str] = frozenset()):
        self.stack = stack
        self.subs = subs
        self.rng = rng
        self.mean_interval_s = mean_interval_s
        self.webhook_down_max_s = webhook_down_max_s
        self.retry_window_s = retry_window_s
        self.events: list[Event] = []
        self.restores: list[tuple[float, str, Callable[[], None]]] = []
        self.busy: set[str] = set()  # parts whose fault is in force (TAKES values)
        self.stop_event = threading.Event()
        self.start = time.monotonic()
        self.errors: list[str] = []
        self.unexpected_exits: list[str] = []
        self.threads: list[threading.Thread] = []
        # Faults (unix start, end) that may legitimately delay a healthy receiver's webhook: Redis down,
        # a worker SIGKILLed with a delivery in flight (recovered once its heartbeat expired).
        self.excused: list[tuple[float, float, str]] = []
        self.cancelled: dict[str, str] = {}  # job id -> "queued" or "running" (what it was when cancelled)
        self.faults = devnode_faults(stack.devnode_url)
        self.unsupported = {kind for kind, switch in SWITCHES.items() if switch not in self.faults}
        self.skipped = set(skip)
        self.kinds = [kind for kind in CHAOS_KINDS if kind not in self.unsupported | self.skipped]
        # the first events go through every kind once (in a random order), then kinds are drawn at random
        self.pending_kinds = list(self.kinds)
        rng.shuffle(self.pending_kinds)
        self.thread = threading.Thread(target=self.run, name="chaos", daemon=True)

    # --- the loop -----------------------------------------------------------------------------------

    def note(self, kind: str, detail: str) -> None:
        event = Event(round(time.monotonic() - self.start, 1), kind, detail, time.time())
        self.events.append(event)
        log(f"chaos +{event.at:.1f}s {kind}: {detail}")

    def later(self, delay_s: float, name: str, action: Callable[[], None]) -> None:
        self.restores.append((time.monotonic() + delay_s, name, action))

    def in_background(self, name: str, action: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                action()
            except Exception as exc:
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                log(f"chaos {name} could not be done: {exc}")

        thread = threading.Thread(target=guarded, name=f"chaos-{name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def run(self) -> None:
        next_at = time.monotonic() + self.rng.uniform(1, self.mean_interval_s)
        while not self.stop_event.is_set():
            self.run_due_restores(force=False)
            self.watch_workers()
            if time.monotonic() >= next_at:
                kind = self.next_kind()
                if kind is None:
                    next_at = time.monotonic() + 0.5
                else:
                    try:
                        getattr(self, kind)()
                    except Exception as exc:
                        self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                        log(f"chaos {kind} could not be done: {exc}")
                    next_at = time.monotonic() + self.rng.expovariate(1 / self.mean_interval_s) + 0.5
            self.stop_event.wait(0.1)
        for thread in self.threads:
            thread.join(60)
        self.run_due_restores(force=True)

    def free(self, kind: str) -> bool:
        return TAKES.get(kind) not in self.busy and NEEDS.get(kind) not in self.busy

    def next_kind(self) -> str | None:
        """The next kind to fire: a not yet fired one first; never one whose part is busy."""
        for kind in reversed(self.pending_kinds):
            if self.free(kind):
                self.pending_kinds.remove(kind)
                return kind
        free = [kind for kind in self.kinds if self.free(kind)]
        return self.rng.choice(free) if free and not self.pending_kinds else None

    def wait_first_round(self, timeout_s: float) -> None:
        """Keep the chaos going until every kind happened once (or timeout_s)."""
        end = time.monotonic() + timeout_s
        while self.pending_kinds and time.monotonic() < end and self.thread.is_alive():
            time.sleep(0.2)

    def finish(self) -> None:
        self.stop_event.set()
        self.thread.join(180)
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

    def try_again(self, kind: str) -> None:
        """A kind that found nothing to act on is drawn again later (each kind should happen once)."""
        if kind not in self.pending_kinds:
            self.pending_kinds.insert(0, kind)

    def excuse(self, start: float, end: float, why: str) -> None:
        self.excused.append((start, end, why))

    # --- workers ------------------------------------------------------------------------------------

    def sigkill_worker(self, slot: int) -> str:
        child = self.stack.workers[slot]
        child.killed_by_us = True
        child.send(signal.SIGKILL)
        if child.proc is not None:
            child.proc.wait(10)
        self.excuse(time.time(), time.time(), f"{child.name} SIGKILLed")
        return child.name

    def restart_later(self, slot: int, down: float) -> None:
        def restart() -> None:
            self.busy.discard("workers")
            new = start_worker(self.stack, slot)
            self.note("worker_restarted", new.name)

        self.later(down, "restart worker", restart)

    def kill_worker(self) -> None:
        slot = self.rng.choice(sorted(self.stack.workers))
        self.busy.add("workers")
        name = self.sigkill_worker(slot)
        down = round(self.rng.uniform(2, 6), 1)
        self.note("kill_worker", f"SIGKILL {name}; a new worker in slot {slot} in {down} s")
        self.restart_later(slot, down)

    def rolling_restart(self) -> None:
        self.busy.add("workers")
        self.note("rolling_restart", f"SIGTERM each of the {len(self.stack.workers)} workers in turn")
        self.in_background("rolling_restart", self._roll)

    def _roll(self) -> None:
        grace = float(self.stack.env["WORKER_GRACE_S"])
        try:
            for slot in sorted(self.stack.workers):
                child = self.stack.workers[slot]
                inflight = config.WEBHOOK_INFLIGHT_KEY.format(worker=child.name)
                in_flight = 0
                end = time.monotonic() + 3  # wait a little for a delivery to be under way
                while time.monotonic() < end and not self.stop_event.is_set():
                    in_flight = self.redis_len(inflight)
                    if in_flight:
                        break
                    time.sleep(0.05)
                child.killed_by_us = True
                began = time.monotonic()
                code = child.terminate(grace + 20)
                if code != 0:
                    self.unexpected_exits.append(f"{child.name} exited with status {code} after SIGTERM")
                self.note("worker_sigterm", f"{child.name} ({in_flight} webhook(s) in flight) exited with "
                          f"status {code} after {time.monotonic() - began:.1f} s")
                new = start_worker(self.stack, slot)
                self.note("worker_restarted", new.name)
                time.sleep(1.0)
        finally:
            self.busy.discard("workers")

    def redis_len(self, key: str) -> int:
        assert self.stack.r is not None
        try:
            return int(self.stack.r.llen(key))
        except redis.RedisError:
            return 0

    def launching_workers(self) -> list[str]:
        """Workers whose pool node says they called launch and have not recorded its answer yet."""
        assert self.stack.r is not None
        found = []
        try:
            for key in self.stack.r.scan_iter("pool:node:*", count=100):
                record = self.stack.r.hgetall(key)
                if record.get("state") == "launching" and record.get("launcher"):
                    found.append(record["launcher"])
        except redis.RedisError:
            return []
        return found

    def kill_in_launch_window(self) -> None:
        self.busy.add("workers")
        widen = "launch_answer_delay_s" in self.faults
        if widen:
            set_faults(self.stack.devnode_url, {"launch_answer_delay_s": 3.0})
        self.note("launch_window_armed", "waiting for a worker to call launch"
                  + (" (launch answers held 3 s)" if widen else " (no launch_answer_delay_s switch: the "
                     "window is the launch call itself)"))
        self.in_background("kill_in_launch_window", lambda: self._kill_in_launch_window(widen))

    def _kill_in_launch_window(self, widen: bool) -> None:
        slot: int | None = None
        try:
            known = {node["workload"] for node in devnode_nodes(self.stack.devnode_url)}
            end = time.monotonic() + 15
            while slot is None and time.monotonic() < end and not self.stop_event.is_set():
                by_name = {child.name: number for number, child in self.stack.workers.items()}
                launching = [by_name[w] for w in self.launching_workers() if w in by_name]
                if launching:
                    slot = launching[0]
                    if widen:  # the answer is held: kill once the node exists, before the answer arrives
                        wait_end = time.monotonic() + 2.5
                        while time.monotonic() < wait_end and not [
                                n for n in devnode_nodes(self.stack.devnode_url) if n["workload"] not in known]:
                            time.sleep(0.05)
                    name = self.sigkill_worker(slot)
                    time.sleep(1.0)
                    new = [n["workload"] for n in devnode_nodes(self.stack.devnode_url) if n["workload"] not in known]
                    self.note("kill_in_launch_window", f"SIGKILL {name} inside its launch window; nodes created "
                              f"meanwhile: {new or 'none'}")
                    break
                time.sleep(0.01)
            if slot is None:
                self.note("launch_window_missed", "no worker called launch within 15 s")
                self.try_again("kill_in_launch_window")
        finally:
            if widen:
                set_faults(self.stack.devnode_url, {"launch_answer_delay_s": 0.0})
            if slot is not None:
                self.restart_later(slot, 2.0)
            else:
                self.busy.discard("workers")

    # --- the provider and the nodes -----------------------------------------------------------------

    def launch_failures(self) -> None:
        count = self.rng.choice((2, 2, 2, 3))
        status, answer = http("POST", self.stack.devnode_url + "/admin/faults", {"launch_failures": count,
                              "launch_failure_mode": self.rng.choice(("500", "html"))})
        self.note("launch_failures", f"the next {count} launches fail ({answer.get('launch_failure_mode')})"
                  if status == 200 else f"HTTP {status}")

    def launch_answer_lost(self) -> None:
        set_faults(self.stack.devnode_url, {"launch_answer_lost": 1})
        self.note("launch_answer_lost", "the next launch creates its node and loses its answer")

    def stop_node(self, workload: str) -> int:
        status, _ = http("POST", self.stack.devnode_url + "/api/v0/stop", {"workload": workload},
                         {"X-C3-API-KEY": C3_KEY})
        return status

    def kill_node(self) -> None:
        nodes = [n for n in devnode_nodes(self.stack.devnode_url) if n.get("state") == "running"]
        if not nodes:
            self.note("kill_node_skipped", "no running node to stop")
            self.try_again("kill_node")
            return
        node = self.rng.choice(nodes)
        status = self.stop_node(node["workload"])
        self.note("kill_node", f"stopped node {node['workload']} through the control API (HTTP {status})")

    def engine_error(self) -> None:
        engine = self.rng.choice(sorted(ENGINE_JOB_TYPE))
        down = round(self.rng.uniform(3, 6), 1)
        self.busy.add("engine")
        set_faults(self.stack.devnode_url, {"engine_error": [engine]})
        self.note("engine_error", f"{engine} answers errors for {down} s")

        def clear() -> None:
            set_faults(self.stack.devnode_url, {"engine_error": []})
            self.busy.discard("engine")

        self.later(down, "engine errors end", clear)

    def engine_hang(self) -> None:
        engine = self.rng.choice(sorted(ENGINE_JOB_TYPE))
        down = round(self.rng.uniform(3, 5), 1)
        self.busy.add("engine")
        set_faults(self.stack.devnode_url, {"engine_hang": [engine]})
        self.note("engine_hang", f"{engine} never finishes for {down} s")

        def clear() -> None:
            set_faults(self.stack.devnode_url, {"engine_hang": []})
            self.busy.discard("engine")
            self.end_hung_jobs(engine)

        self.later(down, "engine hangs end", clear)

    def end_hung_jobs(self, engine: str) -> None:
        """Every job of the engine's type running now may be hung: cancel it, or stop its node."""
        job_type = ENGINE_JOB_TYPE[engine]
        cancelled, stopped = [], []
        for job_id, record in self.records(("running",)).items():
            if record.get("type") != job_type:
                continue
            if engine in CANCELLABLE_HANGS and "api" not in self.busy and self.rng.random() < 0.5:
                if self.cancel(job_id, "running"):
                    cancelled.append(job_id[:8])
                    continue
            workload = self.workload_of(record.get("worker", ""))
            if workload and self.stop_node(workload) == 200:
                stopped.append(workload)
        self.note("engine_hang_end", f"{engine} hangs no more; running {job_type} jobs cancelled: {cancelled}, "
                  f"their nodes stopped: {stopped}")

    def workload_of(self, worker: str) -> str:
        """The workload of a pool node the worker runs a job on ('' when none)."""
        assert self.stack.r is not None
        try:
            for node_id in self.stack.r.smembers("pool:nodes"):
                leases = self.stack.r.hvals(f"pool:leases:{node_id}")
                if any(json.loads(lease).get("worker") == worker for lease in leases):
                    workload = self.stack.r.hget(f"pool:node:{node_id}", "workload")
                    if workload:
                        return str(workload)
        except redis.RedisError:
            pass
        return ""

    # --- Redis and the API --------------------------------------------------------------------------

    def redis_outage(self, kind: str, crash: bool) -> None:
        down = round(self.rng.uniform(0.5, 2.5), 1)
        self.busy.add("redis")
        began = time.time()
        if crash:
            self.stack.redis.kill()
            self.note(kind, f"SIGKILL redis-server under load (AOF everysec), down for {down} s")
        else:
            self.stack.redis.stop()
            self.note(kind, f"SIGTERM redis-server, down for {down} s")
        time.sleep(down)
        self.stack.redis.start()
        self.busy.discard("redis")
        self.excuse(began, time.time(), kind)
        self.note("redis_up", "redis-server started again (same port and AOF directory)")

    def restart_redis(self) -> None:
        self.redis_outage("restart_redis", crash=False)

    def kill_redis(self) -> None:
        self.redis_outage("kill_redis", crash=True)

    def kill_api(self) -> None:
        down = round(self.rng.uniform(1, 3), 1)
        self.busy.add("api")
        self.subs.sending.wait(3.0)  # kill while a submission is under way, if one comes soon
        kill_api(self.stack)
        self.note("kill_api", f"SIGKILL the API (gunicorn) during submissions; back in {down} s")

        def restart() -> None:
            try:
                restart_api(self.stack)
                self.note("api_up", "the API started again on the same port")
            finally:
                self.busy.discard("api")

        self.later(down, "restart the API", restart)

    # --- webhook receivers --------------------------------------------------------------------------

    def flaky_down(self, kind: str, down: float, modes: tuple[str, ...],
                   until: Callable[[], bool] | None = None) -> None:
        """The flaky receiver down for `down` seconds, and then until `until()` says so."""
        mode = self.rng.choice(modes)
        receiver = self.stack.receivers["flaky"]
        self.busy.add("receiver")
        receiver.go_down(mode)
        self.note(kind, f"flaky webhook receiver down ({mode}) for {down} s" + (" or more" if until else ""))
        began = time.monotonic()

        def up() -> None:
            if until is not None and not until() and time.monotonic() - began < OUTAGE_MAX_S:
                self.later(1.0, "receiver up", up)
                return
            receiver.come_up()
            self.busy.discard("receiver")
            self.note("receiver_up", f"flaky webhook receiver answers 200 again after {time.monotonic() - began:.1f} s")

        self.later(down, "receiver up", up)

    def receiver_down(self) -> None:
        self.flaky_down("receiver_down", round(self.rng.uniform(2, self.webhook_down_max_s), 1),
                        ("503", "drop", "refused"))

    def receiver_outage_long(self) -> None:
        """Down past the retry window, until a webhook to it failed for good (or OUTAGE_MAX_S); a job is
        submitted for it when none is on its way."""
        def failed_for_good() -> bool:
            return any(self.subs.receiver_of.get(job_id) == "flaky" and record.get("webhook_status") == "failed"
                       for job_id, record in self.records(FINISHED).items())

        self.flaky_down("receiver_outage_long", round(self.retry_window_s + self.rng.uniform(3, 6), 1),
                        ("503", "refused"), until=failed_for_good)
        if not [job_id for job_id in self.records(("queued", "running"))
                if self.subs.receiver_of.get(job_id) == "flaky"]:
            self.extra_job("flaky")

    # --- cancels ------------------------------------------------------------------------------------

    def records(self, statuses: tuple[str, ...]) -> dict[str, dict[str, str]]:
        """Records of the submitted jobs (the latest 60) whose status is one of statuses."""
        assert self.stack.r is not None
        ids = list(self.subs.accepted[-60:])
        try:
            pipe = self.stack.r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(f"job:{job_id}")
            found = pipe.execute()
        except redis.RedisError:
            return {}
        return {job_id: record for job_id, record in zip(ids, found, strict=True)
                if record.get("status") in statuses}

    def cancel(self, job_id: str, was: str) -> dict[str, Any] | None:
        try:
            status, answer = http("POST", f"{self.stack.api_url}/cancel/{job_id}", {})
        except OSError as exc:
            self.errors.append(f"cancel {job_id}: {exc}")
            return None
        if status != 200 or not isinstance(answer, dict):
            self.errors.append(f"cancel {job_id}: HTTP {status} {answer}")
            return None
        self.cancelled[job_id] = was
        return answer

    def cancel_one(self, kind: str, was: str) -> None:
        candidates = sorted(self.records((was,)))
        submitted = not candidates
        if submitted:  # nothing to cancel right now: submit jobs for it (one more than the workers take)
            ids = [self.extra_job("healthy-1") for _ in range(len(self.stack.workers) + 1 if was == "queued" else 1)]
            end = time.monotonic() + (15 if was == "running" else 1)
            while time.monotonic() < end and not candidates:
                candidates = sorted(set(self.records((was,))) & set(ids))
                time.sleep(0.1)
        if not candidates:
            self.note(f"{kind}_skipped", f"no {was} job to cancel")
            self.try_again(kind)
            return
        job_id = self.rng.choice(candidates)
        answer = self.cancel(job_id, was)
        if answer is None:
            self.try_again(kind)
            return
        # a queued job may have been taken meanwhile: what the API answered says which cancel it was
        done = "cancel_queued" if answer.get("status") == "cancelled" else "cancel_running"
        self.cancelled[job_id] = "queued" if done == "cancel_queued" else "running"
        self.note(done, f"cancel job {job_id} ({'submitted for it, ' if submitted else ''}{was} when chosen): "
                  f"{answer}")
        if done != kind:
            self.try_again(kind)

    def extra_job(self, receiver: str) -> str:
        """Submit one more job (to cancel it, or to have a webhook for the flaky receiver); its id, or ""."""
        route, body = job_request(self.rng, self.stack.files_url, self.stack.receivers[receiver].url)
        job_id = submit_one(self.stack, route, body, self.subs, time.monotonic() + 15)
        if not job_id:
            return ""
        self.subs.receiver_of[job_id] = receiver
        self.subs.extra += 1
        return job_id

    def cancel_queued(self) -> None:
        self.cancel_one("cancel_queued", "queued")

    def cancel_running(self) -> None:
        self.cancel_one("cancel_running", "running")
