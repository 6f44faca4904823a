"""The soak test's chaos thread: seeded faults at random moments, each undone by a scheduled restore."""

from __future__ import annotations

import dataclasses
import random
import signal
import threading
import time
from collections.abc import Callable

from soak_common import C3_KEY, http, log
from soak_stack import Stack, devnode_nodes, start_worker

CHAOS_KINDS = ("kill_worker", "restart_redis", "launch_failures", "kill_node", "receiver_down")


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
