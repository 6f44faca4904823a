"""Replay arrival traces against node policies and print what each bills (node-seconds per job) and how
long jobs take (submit to done), beside a clairvoyant lower bound.

The policies:
- `reference`: the reference worker (COST.md): each worker owns one node, launched when it takes a job,
  stopped after its idle timeout (checked every 5 s), one job at a time; a worker holding a node polls
  the queue every 1 s, one without a node every 5 s.
- `fixed` and `adaptive`: c3-render's pool (NODE_POLICY), decided by the same pool_policy functions the
  worker calls: several jobs per node (NODE_SLOTS), leases, keep-alive by rule.
- `bound`: one node that knows the future, one job at a time: it stays up through a gap only when the
  gap is shorter than a boot, else stops and boots again just in time.

Time is compressed like bench/cost.py's runs (--scale 0.1: boot 12 s for 120 s, idle timeout 30 s for
300 s, jobs of 3-4 s for 30-40 s) unless --scale 1. Examples:
  .venv/bin/python bench/cost_sim.py                      # steady, bursty, sparse, day; 2 workers
  .venv/bin/python bench/cost_sim.py --traces day --scale 1 --days 3
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pool_policy  # noqa: E402
from pool_policy import Estimates, NodeView, PolicyConfig  # noqa: E402

NODE_TYPE = "media:fast"


@dataclass(frozen=True)
class Job:
    at: float  # submitted
    type: str  # csm | whisper (the service)
    seconds: float  # how long it runs on a node


# --- traces ------------------------------------------------------------------------------------

def service_seconds(rng: random.Random, job_type: str, scale: float) -> float:
    """A job's run time: the dev node's CPU engines take about 3 s for CSM and 4 s for WhisperX, which stand
    for 30 and 40 s (x scale)."""
    base = {"csm": 30.0, "whisper": 40.0}[job_type] * scale
    return max(0.2 * base, rng.gauss(base, base * 0.2))


def poisson(rng: random.Random, mean_gap_s: float, start: float, end: float) -> list[float]:
    times, t = [], start
    while True:
        t += rng.expovariate(1 / mean_gap_s)
        if t >= end:
            return times
        times.append(t)


def make_trace(name: str, seed: int, scale: float, duration_s: float) -> list[Job]:
    """Arrivals, in seconds x scale of: steady, a job every 2 minutes (Poisson); bursty, 5-10 jobs at once every
    10-20 minutes; sparse, a job every 15 minutes (Poisson); day, Poisson at a rate that follows a day (a
    job every 80 s in the afternoon, one an hour at night), for duration_s."""
    rng = random.Random(seed)
    if name == "steady":
        times = poisson(rng, 120 * scale, 0, duration_s)
    elif name == "sparse":
        times = poisson(rng, 900 * scale, 0, duration_s)
    elif name == "bursty":
        times, t = [], 0.0
        while True:
            t += rng.uniform(600, 1200) * scale
            if t >= duration_s:
                break
            times += [t + rng.uniform(0, 20) * scale for _ in range(rng.randint(5, 10))]
    elif name == "day":
        day, peak_gap, night_gap = 86400 * scale, 80 * scale, 3600 * scale
        times = []
        for t in poisson(rng, peak_gap, 0, duration_s):  # thinned to the rate of the hour
            hour = (t % day) / day * 24
            busy = math.sin(math.pi * min(1.0, max(0.0, (hour - 7) / 16))) ** 2  # 7:00 to 23:00, peak at 15:00
            if rng.random() < max(peak_gap / night_gap, busy):
                times.append(t)
    else:
        raise ValueError(name)
    return [Job(at, (kind := rng.choice(("csm", "whisper"))), service_seconds(rng, kind, scale)) for at in times]


# --- results -----------------------------------------------------------------------------------

@dataclass
class Result:
    policy: str
    node_seconds: float
    launches: int
    latencies: list[float] = field(default_factory=list)  # submit to done, per job
    most_nodes: int = 0

    def per_job(self) -> float:
        return self.node_seconds / max(1, len(self.latencies))

    def pct(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


def clairvoyant(trace: list[Job], boot_s: float) -> Result:
    """One node, one job at a time, knowing every arrival (the lower bound of COST.md)."""
    result = Result("bound", 0.0, 0)
    end = -math.inf
    for job in trace:
        if job.at > end:  # idle gap (or the first job): stay up if shorter than a boot, else boot just in time
            result.node_seconds += boot_s if end == -math.inf else min(job.at - end, boot_s)
            result.launches += 1 if end == -math.inf or job.at - end > boot_s else 0
        start = max(job.at, end)
        end = start + job.seconds
        result.node_seconds += job.seconds
        result.latencies.append(end - job.at)
    result.most_nodes = 1
    return result


# --- an event loop -----------------------------------------------------------------------------

class Events:
    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Callable[[], None]]] = []
        self.count = 0
        self.now = 0.0

    def at(self, when: float, action: Callable[[], None]) -> None:
        self.count += 1
        heapq.heappush(self.heap, (when, self.count, action))

    def run(self, until: float) -> None:
        while self.heap and self.heap[0][0] <= until:
            self.now, _, action = heapq.heappop(self.heap)
            action()


# --- the reference worker ------------------------------------------------------------------------

def reference(trace: list[Job], workers: int, boot_s: float, idle_s: float, max_age_s: float) -> Result:
    ev, result = Events(), Result("reference", 0.0, 0)
    queue: list[Job] = []
    for job in trace:
        ev.at(job.at, lambda job=job: queue.append(job))
    state = [{"node_at": None, "busy": False, "last": 0.0} for _ in range(workers)]

    def stop(w: dict) -> None:
        result.node_seconds += ev.now - w["node_at"]
        w["node_at"] = None

    def poll(w: dict) -> None:
        if not w["busy"] and queue:
            job = queue.pop(0)
            w["busy"] = True
            start = ev.now
            if w["node_at"] is not None and ev.now - w["node_at"] > max_age_s:
                stop(w)  # replaced when too old
            if w["node_at"] is None:
                w["node_at"] = ev.now
                result.launches += 1
                start += boot_s
            result.most_nodes = max(result.most_nodes, sum(x["node_at"] is not None for x in state))

            def done(w: dict = w, job: Job = job) -> None:
                w["busy"], w["last"] = False, ev.now
                result.latencies.append(ev.now - job.at)
            ev.at(start + job.seconds, done)
        ev.at(ev.now + (1.0 if w["node_at"] is not None else 5.0), lambda: poll(w))

    def monitor(w: dict) -> None:
        if w["node_at"] is not None and not w["busy"] and ev.now - w["last"] > idle_s:
            stop(w)
        ev.at(ev.now + 5.0, lambda: monitor(w))

    for i, w in enumerate(state):
        ev.at(i * 0.37, lambda w=w: poll(w))  # the workers' polls are not in step
        ev.at(i * 0.37, lambda w=w: monitor(w))
    horizon = trace[-1].at + 10 * (boot_s + idle_s) + sum(j.seconds for j in trace)
    ev.run(horizon)
    for w in state:
        if w["node_at"] is not None:
            stop(w)
    return result


# --- c3-render's pool --------------------------------------------------------------------------

@dataclass
class SimNode:
    id: str
    launched_at: float
    ready_at: float
    leases: dict[str, list[float]] = field(default_factory=dict)
    idle_since: float | None = None
    total: int = 99


def pool(trace: list[Job], workers: int, boot_s: float, cfg: PolicyConfig, slots: dict[str, int],
         total_slots: int, tick_s: float = 1.0) -> Result:
    """c3-render's pool, each decision taken by pool_policy as the worker takes it: a worker takes the next
    job at once when it is free (BLMOVE), places it (lease / wait / launch), and every tick_s the idle nodes
    are looked at (keep-alive, pre-warm)."""
    ev, result = Events(), Result(cfg.policy, 0.0, 0)
    est = Estimates(default_boot_s=boot_s, default_service_s=4.0)  # seeded as the settings would be
    nodes: dict[str, SimNode] = {}
    queue: list[Job] = []
    free_workers = [workers]
    type_idle_since: list[float | None] = [0.0]
    counter = [0]

    def view(now: float) -> list[NodeView]:
        return [NodeView(n.id, NODE_TYPE, "ready" if now >= n.ready_at else "booting", n.launched_at,
                         n.launched_at + 1e9, slots, min(total_slots, n.total),
                         {s: tuple(v) for s, v in n.leases.items() if v}, n.idle_since) for n in nodes.values()]

    def launch() -> SimNode:
        counter[0] += 1
        node = SimNode(f"n{counter[0]}", ev.now, ev.now + boot_s)
        nodes[node.id] = node
        result.launches += 1
        result.most_nodes = max(result.most_nodes, len(nodes))
        est.boot_s[NODE_TYPE] = pool_policy.moving_average(est.boot_s.get(NODE_TYPE), boot_s)
        ev.at(node.ready_at, lambda: ready(node))
        return node

    def ready(node: SimNode) -> None:
        if node.id in nodes and not any(node.leases.values()):
            node.idle_since = ev.now

    def stop(node: SimNode) -> None:
        result.node_seconds += ev.now - node.launched_at
        del nodes[node.id]

    def take() -> None:
        while free_workers[0] and queue:
            free_workers[0] -= 1
            job = queue.pop(0)
            if type_idle_since[0] is not None:
                pool_policy.add_gap(est, NODE_TYPE, ev.now - type_idle_since[0])
                type_idle_since[0] = None
            place(job)

    def place(job: Job) -> None:
        behind = sum(1 for j in queue if j.type == job.type)
        decision = pool_policy.place(list(view(ev.now)), NODE_TYPE, job.type, ev.now, est, cfg, queued=behind)
        if decision.action == "make_room":  # one type here: never
            raise AssertionError(decision)
        if decision.action == "wait":
            ev.at(ev.now + 0.25, lambda: place(job))
            return
        node = nodes[decision.node] if decision.action == "lease" else launch()
        node.leases.setdefault(job.type, []).append(ev.now)
        node.idle_since = None
        leased, start = ev.now, max(ev.now, node.ready_at)
        ev.at(start + job.seconds, lambda: finish(job, node, leased, start))

    def finish(job: Job, node: SimNode, leased_at: float, started: float) -> None:
        node.leases[job.type].remove(leased_at)
        est.service_s[job.type] = pool_policy.moving_average(est.service_s.get(job.type), ev.now - started)
        if not any(node.leases.values()):
            node.idle_since = ev.now
        if not any(any(n.leases.values()) for n in nodes.values()):
            type_idle_since[0] = ev.now
        result.latencies.append(ev.now - job.at)
        free_workers[0] += 1
        take()

    def tick() -> None:
        for node_id, _why in pool_policy.idle_nodes_to_stop(view(ev.now), ev.now, est, cfg,
                                                              {s: 1 for s in {j.type for j in queue}}):
            stop(nodes[node_id])
        idle = {NODE_TYPE: type_idle_since[0]} if type_idle_since[0] is not None else {}
        for _type, _why in pool_policy.launches_wanted(view(ev.now), ev.now, est, cfg, idle):
            launch()
        ev.at(ev.now + tick_s, tick)

    for job in trace:
        ev.at(job.at, lambda job=job: (queue.append(job), take()))
    ev.at(0.0, tick)
    horizon = trace[-1].at + 10 * (boot_s + cfg.idle_timeout_s) + sum(j.seconds for j in trace)
    ev.run(horizon)
    for node in list(nodes.values()):
        stop(node)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", default="steady,bursty,sparse,day")
    parser.add_argument("--scale", type=float, default=0.1, help="time scale: 0.1 = boot 12 s, idle 30 s (default)")
    parser.add_argument("--minutes", type=float, default=20,
                        help="length of the steady, bursty and sparse traces as run (default 20)")
    parser.add_argument("--days", type=float, default=1, help="length of the day trace, in days x scale")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-nodes", type=int, default=4)
    parser.add_argument("--slots", default="csm:1,whisper:1,portrait:1")
    parser.add_argument("--total-slots", type=int, default=99, help="jobs per node at once (1 = one job per node)")
    parser.add_argument("--seeds", default="1,2,3")
    args = parser.parse_args()
    boot, idle = 120 * args.scale, 300 * args.scale
    slots = {k: int(v) for k, v in (item.split(":") for item in args.slots.split(","))}
    print(f"# boot {boot:g} s, reference idle {idle:g} s, {args.workers} workers, slots {args.slots}, "
          f"MAX_NODES {args.max_nodes}; node-seconds per job (x the bound), submit-to-done p50 / p90 s")
    for name in args.traces.split(","):
        rows: dict[str, list[Result]] = {}
        for seed in (int(s) for s in args.seeds.split(",")):
            length = args.days * 86400 * args.scale if name == "day" else args.minutes * 60
            trace = make_trace(name, seed, args.scale, length)
            cfgs = {p: PolicyConfig(policy=p, max_nodes=args.max_nodes, idle_timeout_s=idle,
                                    node_max_age_s=3600 * args.scale * 10) for p in ("fixed", "adaptive")}
            results = [clairvoyant(trace, boot), reference(trace, args.workers, boot, idle, 3600 * args.scale * 10)]
            results += [pool(trace, args.workers, boot, cfgs[p], slots, args.total_slots) for p in cfgs]
            for res in results:
                rows.setdefault(res.policy, []).append(res)
        bound = sum(r.per_job() for r in rows["bound"]) / len(rows["bound"])
        jobs = sum(len(r.latencies) for r in rows["bound"]) // len(rows["bound"])
        print(f"\n{name}: {jobs} jobs per run, {len(rows['bound'])} seeds")
        for policy, results in rows.items():
            per_job = sum(r.per_job() for r in results) / len(results)
            p50 = sum(r.pct(0.5) for r in results) / len(results)
            p90 = sum(r.pct(0.9) for r in results) / len(results)
            launches = sum(r.launches for r in results) / len(results)
            print(f"  {policy:9s} {per_job:7.1f} node-s/job  (x{per_job / bound:4.2f})   p50 {p50:6.1f} s  "
                  f"p90 {p90:6.1f} s   launches {launches:5.1f}   most nodes {max(r.most_nodes for r in results)}")


if __name__ == "__main__":
    main()
