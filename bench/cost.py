"""Replay compressed arrival traces against the real stack and read the bill from the dev node's own node table.

For each trace (bench/cost_sim.py's make_trace: steady, bursty, sparse; time x --scale, 0.1 by default:
a boot of 12 s stands for 120 s, GPU_IDLE_TIMEOUT 30 s for 300 s) a fresh stack is started on loopback
in a temporary directory: redis-server, the dev node (DEVNODE_BOOT_S = the boot), the API (gunicorn),
--workers workers with NODE_POLICY=--policy and the pool's settings seeded as a deployment would be
(NODE_BOOT_ESTIMATE_S, JOB_TIME_ESTIMATE_S). The trace's CSM and Whisper jobs are submitted through the
HTTP API at their arrival times (Whisper transcribes a few seconds of speech made once at the start by
the dev node's CSM, served by a local file server). When every job has finished and the pool has
stopped every node (and no pre-warm can still come), it prints per trace:

- jobs completed; the bill (sum of stopped_at - created over the dev node's node table) per completed
  job; the clairvoyant bound for the same arrivals and the jobs' measured engine times, and the ratio;
- submit-to-done p50 / p90 (the job records' created_at to finished_at);
- nodes launched, the most at once (from the table; checked against MAX_NODES), nodes left running;
- the jobs' node_seconds summed against the bill, and stats:node_time (booting, busy, idle, unattributed);
- the simulator (cost_sim.pool, same policy, workers, slots, boot and idle timeout) fed with the same
  arrivals and the measured engine times, and how far its bill is from the real one; the simulated
  reference policy (cost_sim.reference) on the same arrivals.

Then one table of all traces, and each target of issue 18 as met or not. Per-job and per-node timelines
(TSV) and every process's log are in the temporary directory, kept with --keep or when a target is
missed. The exit status is 1 when a check that must hold on any run failed (CHECKS: every job completed,
no node left running, never more than MAX_NODES, the shares adding up to the bill); the cost, latency
and simulator targets are printed, as they need traces long enough for the pool to learn their gaps.

    .venv/bin/python bench/cost.py [--traces steady:5,bursty:6,sparse:16] [--minutes 20] [--seed 1]
                                   [--policy adaptive|fixed] [--workers 2] [--keep]

Everything started is stopped at the end, on failure, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cost_sim
import redis
from harness import machine
from soak_common import Timeout, wait_until
from soak_jobs import SENTENCES, Submissions, drain, make_speech, submit_one
from soak_stack import STARTED, Stack, devnode_nodes, start_stack, stop_all_started

import config
import pool_policy

NODE_TYPE = cost_sim.NODE_TYPE
SHARE_TOLERANCE = 0.02  # the jobs' node_seconds add up to the bill within this (issue 18)
SIM_TOLERANCE = 0.15  # the simulator's bill within this of the real one
BOUND_RATIO = 1.3  # node-seconds per completed job within this of the clairvoyant bound
P90_TARGET = "p90 <= reference's"
# What must hold on any run, however short (the exit status says whether it did); the other targets are
# figures that need traces long enough for the pool to learn their gaps (bench/README.md).
CHECKS = ("every job completed", "0 nodes left running", "never > MAX_NODES", f"shares within {SHARE_TOLERANCE:.0%}")


def log(message: str) -> None:
    print(f"[cost {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every trace runs with: the service's settings and the simulator's same parameters."""

    policy: str
    workers: int
    max_nodes: int
    scale: float
    slots: str
    job_estimate_s: float
    seed: int

    @property
    def boot_s(self) -> float:
        return 120 * self.scale

    @property
    def idle_s(self) -> float:
        return 300 * self.scale

    @property
    def max_age_s(self) -> float:
        return 3600 * self.scale * 10  # as cost_sim.py's main: an hour of jobs, so replacement is rare

    def settings(self) -> dict[str, str]:
        return {"NODE_POLICY": self.policy, "MAX_NODES": str(self.max_nodes), "NODE_SLOTS": self.slots,
                "GPU_IDLE_TIMEOUT": f"{self.idle_s:g}", "NODE_BOOT_ESTIMATE_S": f"{self.boot_s:g}",
                "JOB_TIME_ESTIMATE_S": f"{self.job_estimate_s:g}", "NODE_MAX_AGE": f"{self.max_age_s:g}",
                "NODE_BOOT_TIMEOUT": f"{max(60.0, 10 * self.boot_s):g}", "MIN_WARM_NODES": "0"}

    def policy_config(self) -> pool_policy.PolicyConfig:
        return pool_policy.PolicyConfig(policy=self.policy, max_nodes=self.max_nodes, idle_timeout_s=self.idle_s,
                                        node_max_age_s=self.max_age_s, default_type=NODE_TYPE)


@dataclasses.dataclass
class TraceRun:
    """One trace replayed on the real stack: what was measured, and the simulations of the same arrivals."""

    name: str
    minutes: float  # the trace's length as run
    submitted: int
    records: list[dict[str, str]]  # the job records, in submission order
    t0: float  # wall clock of the trace's time 0
    nodes: list[dict[str, Any]]  # the dev node's table
    node_time: dict[str, float]
    pool_stats: dict[str, str]  # the pool's estimates at the end (pool:stats)
    gaps: list[float]  # the idle gaps the pool saw (pool:gaps)
    settled: bool  # the pool reached 0 nodes (and stayed there past any pre-warm)
    settle_s: float  # seconds from the last job's end to the last node's stop
    real: cost_sim.Result
    bound: cost_sim.Result
    sim: cost_sim.Result
    reference: cost_sim.Result
    engine_fallbacks: int  # jobs without a measured engine time (the simulator got their type's median)

    def completed(self) -> list[dict[str, str]]:
        return [rec for rec in self.records if rec.get("status") == "success"]

    def shares(self) -> float:
        return sum(float(rec.get("node_seconds") or 0) for rec in self.records)

    def running_nodes(self) -> int:
        return sum(1 for n in self.nodes if n["state"] in ("booting", "running"))

    def keep_alive_s(self, cfg: RunConfig) -> float:
        """The keep-alive the policy would choose at the end, from what the pool measured."""
        boot = self.pool_stats.get(f"boot:{NODE_TYPE}")
        est = pool_policy.Estimates(boot_s={NODE_TYPE: float(boot)} if boot else {}, gaps={NODE_TYPE: self.gaps},
                                    default_boot_s=cfg.boot_s)
        return pool_policy.keep_alive_s(NODE_TYPE, est, cfg.policy_config())

    def ratio(self) -> float:
        return self.real.per_job() / self.bound.per_job() if self.bound.per_job() else float("inf")

    def share_error(self) -> float:
        return abs(self.shares() - self.real.node_seconds) / max(1e-9, self.real.node_seconds)

    def sim_error(self) -> float:
        return (self.sim.node_seconds - self.real.node_seconds) / max(1e-9, self.real.node_seconds)

    def targets(self, max_nodes: int) -> dict[str, bool]:
        return {
            "every job completed": len(self.completed()) == self.submitted,
            f"node-s/job <= {BOUND_RATIO}x bound": self.ratio() <= BOUND_RATIO,
            P90_TARGET: self.real.pct(0.9) <= self.reference.pct(0.9),
            "0 nodes left running": self.settled and self.running_nodes() == 0,
            "never > MAX_NODES": self.real.most_nodes <= max_nodes,
            f"shares within {SHARE_TOLERANCE:.0%}": self.share_error() <= SHARE_TOLERANCE,
            f"simulator within {SIM_TOLERANCE:.0%}": abs(self.sim_error()) <= SIM_TOLERANCE,
        }


# --- the stack ---------------------------------------------------------------------------------------

def prepare_speech(tmp: Path, inputs: Path) -> str:
    """A few seconds of speech for the Whisper jobs, from one CSM job on a throwaway stack (so that neither
    its node nor what the pool learnt from it is in any trace's figures); stopped before the traces."""
    tmp.mkdir(parents=True)
    stack = start_stack(tmp, 1, inputs=inputs, receivers=False)
    try:
        return make_speech(stack, inputs)
    finally:
        stop_stack(stack)


def start_cost_stack(tmp: Path, cfg: RunConfig, inputs: Path) -> Stack:
    """redis-server, the dev node booting nodes for cfg.boot_s, the API and cfg.workers workers, up."""
    tmp.mkdir(parents=True)
    stack = start_stack(tmp, cfg.workers, boot_s=cfg.boot_s, settings=cfg.settings(), inputs=inputs, receivers=False)
    r = stack.r
    assert r is not None
    wait_until(lambda: all(r.exists(config.HEARTBEAT_KEY.format(worker=w.name)) for w in stack.all_workers), 90,
               "the workers to start")
    return stack


def stop_stack(stack: Stack) -> None:
    """SIGTERM to the workers first (the last one stops what is idle), then everything else."""
    for child in stack.all_workers:
        child.stop(30)
    stack.files.shutdown()
    stop_all_started()
    STARTED.clear()


# --- one trace -------------------------------------------------------------------------------------

def job_body(job: cost_sim.Job, rng: random.Random, files_url: str) -> tuple[str, dict[str, Any]]:
    if job.type == "csm":
        return "/csm", {"text": rng.choice(SENTENCES), "voice": rng.choice(("random", "conversational_a"))}
    return "/api/v1/jobs/whisper", {"audio_url": f"{files_url}/speech.mp3", "model": "tiny", "language": "en"}


def submit_trace(stack: Stack, trace: list[cost_sim.Job], seed: int, deadline: float) -> tuple[list[str], float]:
    """Submit each job at its arrival time (from now); the job ids and the wall clock of time 0."""
    rng = random.Random(seed)
    subs = Submissions()
    ids = []
    t0, start = time.time(), time.monotonic()
    for number, job in enumerate(trace):
        time.sleep(max(0.0, start + job.at - time.monotonic()))
        route, body = job_body(job, rng, stack.files_url)
        job_id = submit_one(stack, route, body, subs, deadline)
        if job_id is None:
            raise RuntimeError(f"the API refused a job: {subs.rejected[-1]}")
        ids.append(job_id)
        if (number + 1) % 20 == 0:
            log(f"submitted {number + 1}/{len(trace)} at {time.monotonic() - start:.0f} s")
    return ids, t0


def live_nodes(stack: Stack) -> int:
    assert stack.r is not None
    return (sum(1 for n in devnode_nodes(stack.devnode_url) if n["state"] in ("booting", "running"))
            + stack.r.scard(config.POOL_NODES_KEY))


def prewarm_window_end(r: redis.Redis) -> float:
    """The last moment the adaptive policy could still launch a node ahead of an expected job (its pre-warm
    window, pool_policy.launches_wanted: up to the idle gaps' largest x 1.1 after the type went idle)."""
    gaps = [float(g) for g in r.lrange(config.POOL_GAPS_KEY.format(type=NODE_TYPE), 0, -1)]
    idle_since = r.hget(config.POOL_STATS_KEY, f"idle_since:{NODE_TYPE}")
    if len(gaps) < pool_policy.PREWARM_MIN_GAPS or not idle_since:
        return 0.0
    return float(idle_since) + max(gaps) * 1.1 + 1.0


def wait_pool_empty(stack: Stack, cfg: RunConfig, limit_s: float) -> tuple[bool, float]:
    """Wait until no node is booting or running (on the dev node, and in the pool) and none can be
    pre-warmed any more; (reached, seconds waited)."""
    assert stack.r is not None
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if live_nodes(stack) == 0 and (cfg.policy == "fixed" or time.time() >= prewarm_window_end(stack.r)):
            return True, time.monotonic() - start
        time.sleep(0.5)
    return False, time.monotonic() - start


def most_at_once(nodes: list[dict[str, Any]], now: float) -> int:
    events = sorted([(n["created"], 1) for n in nodes] + [(n["stopped_at"] or now, -1) for n in nodes],
                    key=lambda e: (e[0], e[1]))
    most = level = 0
    for _at, step in events:
        level += step
        most = max(most, level)
    return most


def billed_seconds(nodes: list[dict[str, Any]], now: float) -> float:
    """Launch to stop (to expiry, to now for a node still running) over the dev node's table."""
    return sum(min(n["stopped_at"] or now, n["expires"]) - n["created"] for n in nodes)


def measured_jobs(records: list[dict[str, str]], t0: float) -> tuple[list[cost_sim.Job], int]:
    """The arrivals as submitted (created_at from time 0) with each job's measured engine time; a job that
    has none (it failed before its engine ran) gets its type's median. (jobs, how many got the median)"""
    by_type: dict[str, list[float]] = {}
    for rec in records:
        if rec.get("engine_seconds"):
            by_type.setdefault(rec["type"], []).append(float(rec["engine_seconds"]))
    jobs, fallbacks = [], 0
    for rec in records:
        seconds = rec.get("engine_seconds")
        if not seconds:
            fallbacks += 1
        jobs.append(cost_sim.Job(float(rec["created_at"]) - t0, rec["type"],
                                 float(seconds) if seconds else statistics.median(by_type.get(rec["type"], [3.0]))))
    return sorted(jobs, key=lambda j: j.at), fallbacks


def run_trace(name: str, minutes: float, cfg: RunConfig, tmp: Path, inputs: Path) -> TraceRun:
    trace = cost_sim.make_trace(name, cfg.seed, cfg.scale, minutes * 60)
    if not trace:
        raise RuntimeError(f"trace {name} has no jobs in {minutes:g} minutes")
    log(f"{name}: {len(trace)} jobs over {trace[-1].at:.0f} s; starting the stack ({cfg.policy}, "
        f"{cfg.workers} workers)")
    stack = start_cost_stack(tmp / name, cfg, inputs)
    assert stack.r is not None
    try:
        deadline = time.monotonic() + trace[-1].at + 900
        ids, t0 = submit_trace(stack, trace, cfg.seed, deadline)
        log(f"{name}: all {len(ids)} submitted; waiting for them to finish")
        drain(stack, ids, deadline)
        log(f"{name}: jobs finished; waiting for the pool to stop every node")
        settled, _waited = wait_pool_empty(stack, cfg, cfg.idle_s + 4 * cfg.boot_s + 120)
        now = time.time()
        nodes = [n for n in devnode_nodes(stack.devnode_url) if n["type"] == NODE_TYPE]
        pipe = stack.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(config.JOB_KEY.format(id=job_id))
        records = pipe.execute()
        node_time = {k: float(v) for k, v in stack.r.hgetall(config.NODE_TIME_KEY).items()}
        pool_stats = stack.r.hgetall(config.POOL_STATS_KEY)
        gaps = [float(g) for g in stack.r.lrange(config.POOL_GAPS_KEY.format(type=NODE_TYPE), 0, -1)]
    finally:
        stop_stack(stack)
    finished = [rec for rec in records if rec.get("status") == "success"]
    real = cost_sim.Result(cfg.policy, billed_seconds(nodes, now), len(nodes),
                           [float(rec["finished_at"]) - float(rec["created_at"]) for rec in finished],
                           most_at_once(nodes, now))
    jobs, fallbacks = measured_jobs(records, t0)
    slots, total = config.parse_node_slots(cfg.slots)
    run = TraceRun(name=name, minutes=minutes, submitted=len(ids), records=records, t0=t0, nodes=nodes,
                   node_time=node_time, pool_stats=pool_stats, gaps=gaps, settled=settled,
                   settle_s=max((n["stopped_at"] or now for n in nodes), default=now)
                   - max((float(rec.get("finished_at") or 0) for rec in records), default=now),
                   real=real, bound=cost_sim.clairvoyant(jobs, cfg.boot_s),
                   sim=cost_sim.pool(jobs, cfg.workers, cfg.boot_s, cfg.policy_config(), slots, total),
                   reference=cost_sim.reference(jobs, cfg.workers, cfg.boot_s, cfg.idle_s, cfg.max_age_s),
                   engine_fallbacks=fallbacks)
    write_timelines(run, tmp / name)
    return run


def write_timelines(run: TraceRun, directory: Path) -> None:
    """jobs.tsv and nodes.tsv (seconds from the trace's time 0, for a look at what each job waited for) and
    gaps.txt (the idle gaps the pool recorded)."""
    def at(value: str | float | None) -> str:
        return f"{float(value) - run.t0:.2f}" if value not in (None, "") else ""

    lines = ["id\ttype\tstatus\tsubmitted\tstarted\tfinished\tsubmit_to_done\tengine_s\tnode_s"]
    for rec in run.records:
        total = (f"{float(rec['finished_at']) - float(rec['created_at']):.2f}"
                 if rec.get("finished_at") and rec.get("created_at") else "")
        lines.append("\t".join((rec.get("id", ""), rec.get("type", ""), rec.get("status", ""),
                                at(rec.get("created_at")), at(rec.get("started_at")), at(rec.get("finished_at")), total,
                                rec.get("engine_seconds", ""), rec.get("node_seconds", ""))))
    (directory / "jobs.tsv").write_text("\n".join(lines) + "\n")
    lines = ["workload\tcreated\tup\tstopped\tseconds\tstate"]
    for node in sorted(run.nodes, key=lambda n: n["created"]):
        end = node["stopped_at"]
        lines.append("\t".join((node["workload"], at(node["created"]), at(node["up_at"]), at(end),
                                f"{(end or time.time()) - node['created']:.2f}", node["state"])))
    (directory / "nodes.tsv").write_text("\n".join(lines) + "\n")
    (directory / "gaps.txt").write_text("".join(f"{gap:.2f}\n" for gap in run.gaps))  # as the pool saw them


# --- the report ------------------------------------------------------------------------------------

def slower_than_boot(result: cost_sim.Result, boot_s: float) -> str:
    """The share of jobs whose submit-to-done was longer than a boot (most of them waited for one)."""
    return f"{sum(1 for t in result.latencies if t > boot_s) / max(1, len(result.latencies)):.0%}"


def yes(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def print_trace(run: TraceRun, cfg: RunConfig) -> None:
    real, bound, sim, ref = run.real, run.bound, run.sim, run.reference
    done = run.completed()
    failed = [rec for rec in run.records if rec.get("status") != "success"]
    engine = {t: [float(r["engine_seconds"]) for r in run.records if r.get("type") == t and r.get("engine_seconds")]
              for t in ("csm", "whisper")}
    targets = run.targets(cfg.max_nodes)
    print(f"\n{run.name} ({cfg.policy}, seed {cfg.seed}, {run.minutes:g} min): {run.submitted} jobs submitted, "
          f"{len(done)} completed, {len(failed)} not"
          + (f" ({', '.join(sorted({r.get('status', '?') + ': ' + r.get('error', '')[:80] for r in failed}))})"
             if failed else ""))
    print("  engine seconds (measured): " + ", ".join(
        f"{t} {len(v)} jobs, mean {statistics.fmean(v):.2f} s, p90 {sorted(v)[int(0.9 * len(v))]:.2f} s"
        for t, v in engine.items() if v)
        + (f"; {run.engine_fallbacks} without, given their type's median" if run.engine_fallbacks else ""))
    print(f"  bill (dev node table)     {real.node_seconds:8.1f} node-s = {real.per_job():6.2f} node-s/job; "
          f"{real.launches} nodes launched, most {real.most_nodes} at once (MAX_NODES {cfg.max_nodes}: "
          f"{yes(targets['never > MAX_NODES'])})")
    print(f"  clairvoyant bound         {bound.node_seconds:8.1f} node-s = {bound.per_job():6.2f} node-s/job; "
          f"ratio x{run.ratio():.2f} (target <= {BOUND_RATIO}: {yes(targets[f'node-s/job <= {BOUND_RATIO}x bound'])})")
    print(f"  submit-to-done            p50 {real.pct(0.5):6.1f} s   p90 {real.pct(0.9):6.1f} s   "
          f"(reference p90 {ref.pct(0.9):.1f} s: {yes(targets[P90_TARGET])})")
    print(f"  nodes left running        {run.running_nodes()} "
          f"({'the last node stopped' if run.settled else 'the pool did NOT reach 0 nodes; the last stop'} "
          f"{run.settle_s:.1f} s after the last job ended: {yes(targets['0 nodes left running'])})")
    kinds = ", ".join(f"{k} {run.node_time.get(k, 0.0):.1f}" for k in ("booting", "busy", "idle"))
    print(f"  jobs' node_seconds        {run.shares():8.1f} node-s = {run.shares() / max(1e-9, real.node_seconds):.2%} "
          f"of the bill (target within {SHARE_TOLERANCE:.0%}: {yes(targets[f'shares within {SHARE_TOLERANCE:.0%}'])}); "
          f"stats:node_time {kinds}, unattributed {run.node_time.get('unattributed', 0.0):.1f} node-s")
    print(f"  simulator ({cfg.policy:8s})      {sim.node_seconds:8.1f} node-s = {sim.per_job():6.2f} node-s/job, "
          f"p50 {sim.pct(0.5):.1f} s p90 {sim.pct(0.9):.1f} s, {sim.launches} launches, most {sim.most_nodes}; "
          f"{run.sim_error():+.1%} from the bill (target within {SIM_TOLERANCE:.0%}: "
          f"{yes(targets[f'simulator within {SIM_TOLERANCE:.0%}'])})")
    print(f"  reference (simulated)     {ref.node_seconds:8.1f} node-s = {ref.per_job():6.2f} node-s/job, "
          f"p50 {ref.pct(0.5):.1f} s p90 {ref.pct(0.9):.1f} s, {ref.launches} launches; "
          f"the bill is x{real.per_job() / max(1e-9, ref.per_job()):.2f} of it")
    print(f"  jobs slower than a boot   real {slower_than_boot(real, cfg.boot_s)}, simulator "
          f"{slower_than_boot(sim, cfg.boot_s)}, reference {slower_than_boot(ref, cfg.boot_s)}, bound "
          f"{slower_than_boot(run.bound, cfg.boot_s)}")
    estimate = {name: float(run.pool_stats.get(name, "nan")) for name in (f"boot:{NODE_TYPE}", "service:csm",
                                                                           "service:whisper")}
    gaps = (f" (median {statistics.median(run.gaps):.1f} s, {sum(g > cfg.boot_s for g in run.gaps)} longer than a "
            "boot)") if run.gaps else ""
    print(f"  the pool at the end       boot-to-ready {estimate[f'boot:{NODE_TYPE}']:.1f} s, job time csm "
          f"{estimate['service:csm']:.2f} s, whisper {estimate['service:whisper']:.2f} s (moving estimates); "
          f"{len(run.gaps)} idle gaps seen{gaps}; keep-alive now {run.keep_alive_s(cfg):.1f} s")


def print_table(runs: list[TraceRun], cfg: RunConfig) -> None:
    print(f"\n| trace | jobs done | node-s/job | bound | x bound | p50 / p90 s | reference node-s/job, p90 s | "
          f"launches, most at once | shares / bill | unattributed | simulator ({cfg.policy}) node-s/job, vs bill | "
          f"left running |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        real = run.real
        print(f"| {run.name} | {len(run.completed())}/{run.submitted} | {real.per_job():.2f} "
              f"| {run.bound.per_job():.2f} | {run.ratio():.2f} | {real.pct(0.5):.1f} / {real.pct(0.9):.1f} "
              f"| {run.reference.per_job():.2f}, "
              f"{run.reference.pct(0.9):.1f} | {real.launches}, {real.most_nodes} | "
              f"{run.shares() / max(1e-9, real.node_seconds):.2%} | {run.node_time.get('unattributed', 0.0):.1f} | "
              f"{run.sim.per_job():.2f}, {run.sim_error():+.1%} | {run.running_nodes()} |")


def print_targets(runs: list[TraceRun], cfg: RunConfig) -> tuple[bool, bool]:
    """Print each target per trace; (the checks all held, every target was met)."""
    print("\ntargets (issue 18):")
    checks_held = all_met = True
    for target in runs[0].targets(cfg.max_nodes):
        verdicts = [(run.name, run.targets(cfg.max_nodes)[target]) for run in runs]
        met = all(ok for _name, ok in verdicts)
        all_met &= met
        checks_held &= met or target not in CHECKS
        print(f"  {target:28s} " + ", ".join(f"{name} {yes(ok)}" for name, ok in verdicts))
    return checks_held, all_met


# --- the command line --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--traces", default="steady,bursty,sparse",
                        help="traces to run, each optionally with its own length: steady:5,bursty:6,sparse:16")
    parser.add_argument("--minutes", type=float, default=20,
                        help="length of a trace as run when --traces gives none (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="the traces' seed (cost_sim.make_trace; default 1)")
    parser.add_argument("--policy", default="adaptive", choices=("adaptive", "fixed"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-nodes", type=int, default=4)
    parser.add_argument("--scale", type=float, default=0.1, help="time scale: 0.1 = boot 12 s, idle 30 s (default)")
    parser.add_argument("--slots", default="csm:1,whisper:1,portrait:1,analyze:1", help="NODE_SLOTS")
    parser.add_argument("--job-estimate", type=float, default=3.0,
                        help="JOB_TIME_ESTIMATE_S, until jobs are measured (default 3: the dev node's CSM and "
                             "Whisper jobs take 1.5-4 s on 2 cores)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, timelines)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.max_nodes < 1:
        parser.error("--workers and --max-nodes must be 1 or more")
    try:
        args.trace_list = parse_traces(args.traces, args.minutes)
    except ValueError as exc:
        parser.error(str(exc))
    cfg = RunConfig(policy=args.policy, workers=args.workers, max_nodes=args.max_nodes, scale=args.scale,
                    slots=args.slots, job_estimate_s=args.job_estimate, seed=args.seed)
    return args, cfg


def parse_traces(text: str, minutes: float) -> list[tuple[str, float]]:
    """"steady:5,bursty,sparse:16" -> [(name, minutes)], a trace without a length taking `minutes`."""
    traces = []
    for item in text.split(","):
        name, _, length = item.strip().partition(":")
        if name not in ("steady", "bursty", "sparse", "day"):
            raise ValueError(f"unknown trace: {name!r}")
        try:
            traces.append((name, float(length) if length else minutes))
        except ValueError:
            raise ValueError(f"the length of {name} is not a number of minutes: {length!r}") from None
        if traces[-1][1] <= 0:
            raise ValueError(f"the length of {name} must be positive")
    return traces


def on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="c3-cost-"))
    keep = args.keep
    traces = ",".join(f"{name}:{minutes:g}" for name, minutes in args.trace_list)
    print(f"# bench/cost.py --traces {traces} --seed {cfg.seed} --policy {cfg.policy} "
          f"--workers {cfg.workers} --max-nodes {cfg.max_nodes} --scale {cfg.scale:g}")
    print(f"# machine: {machine()}")
    print(f"# boot {cfg.boot_s:g} s (DEVNODE_BOOT_S, NODE_BOOT_ESTIMATE_S), GPU_IDLE_TIMEOUT {cfg.idle_s:g} s, "
          f"NODE_SLOTS {cfg.slots}, JOB_TIME_ESTIMATE_S {cfg.job_estimate_s:g}; logs in {tmp}", flush=True)
    runs: list[TraceRun] = []
    try:
        inputs = tmp / "inputs"
        inputs.mkdir()
        log(f"speech for the Whisper jobs: {prepare_speech(tmp / 'prep', inputs)}")
        for name, minutes in args.trace_list:
            run = run_trace(name, minutes, cfg, tmp, inputs)
            runs.append(run)
            print_trace(run, cfg)
        print_table(runs, cfg)
        checks_held, all_met = print_targets(runs, cfg)
        keep = keep or not all_met
        return 0 if checks_held else 1
    except (Timeout, RuntimeError) as exc:
        log(f"FAILED: {exc}")
        keep = True
        return 1
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        keep = True
        return 130
    finally:
        stop_all_started()
        if keep:
            log(f"logs and timelines kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
