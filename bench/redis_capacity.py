"""Numbers to plan with (README, Running at scale): what one API process and one Redis carry.

Each section prints its figures:

- api: submits/s and /status/s of ONE API process (gunicorn, 1 worker x 8 gthread threads; wrk, 16
  connections), with the API's and Redis' CPU per request, without and with REDIS_MIN_REPLICA_ACKS=1
  (a replica attached); the median of --rounds runs.
- job: Redis CPU of one job's whole life, made with the project's own functions in this process:
  submit, take, claim, five phases, a node slot leased and released, finish (its webhook queued),
  acknowledge, the webhook taken and settled; without and with the replica check. Also one cancel
  poll (a worker makes one a second while a job runs) and one progress update.
- memory: Redis memory per queued job and per finished job (INFO used_memory over --jobs jobs).
- idle: Redis CPU per second of an idle worker (real worker processes, their heartbeat, sweep and
  webhook taker), and of one recovery sweep per registered worker (each worker sweeps every
  SWEEP_INTERVAL_S and looks at every worker's heartbeat, so the fleet's sweeps grow with workers^2).
- failover: seconds from SIGKILL of the primary to the first successful submit through the API
  (Sentinel, REDIS_MIN_REPLICA_ACKS=1; the killed primary is started again as soon as the Sentinels
  have promoted the replica, as a supervisor would, and they make it the new replica), with the test
  suite's Sentinel timings and with production-like ones (down-after 5 s, redis-server's periods).
- workers: how many workers one Redis serves at one job per node-minute, from the figures above.

    python bench/redis_capacity.py [--only api,job,memory,idle,failover] [--rounds 3] [--jobs 10000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis
from harness import (
    ROOT,
    Client,
    Procs,
    cpu_per_request,
    free_port,
    machine,
    redis_cpu_s,
    start_gunicorn,
    start_redis,
    wait_until,
)

sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import config  # noqa: E402
import jobspec  # noqa: E402
import jobstore  # noqa: E402
import nodestore  # noqa: E402
import redis_conn  # noqa: E402
import sweep  # noqa: E402
import webhook_state  # noqa: E402
import webhooks  # noqa: E402

ONE_PROCESS = ["--workers", "1", "--threads", "8", "--worker-class", "gthread", "--log-level", "warning"]
BODY = {"text": "Hello there. This is a sentence of an ordinary length, and here is another one.",
        "notify_url": "https://hooks.example.com/c3-render/done"}
RESULT_URL = "https://files.example.com/c3-render-output/" + "x" * 36 + ".mp3?" + "X-Amz-Signature=" + "f" * 480
JOB_PHASES = ("downloading", "waiting_for_node", "rendering", "encoding", "storing")
SECTIONS = ("api", "job", "memory", "idle", "failover")
BENCH_NODE = "bench-node"


def settings_for(url: str, acks: int = 0) -> config.Settings:
    return dataclasses.replace(config.Settings(), redis_url=url, redis_min_replica_acks=acks)


def start_pair(procs: Procs, tmp: Path) -> tuple[str, str]:
    """A primary and its replica (no persistence); returns both URLs once the replica is in sync."""
    (tmp / "primary").mkdir()
    (tmp / "replica").mkdir()
    primary = start_redis(procs, tmp / "primary", "--repl-diskless-sync-delay", "0")
    port = primary.rsplit(":", 1)[1].split("/")[0]
    replica = start_redis(procs, tmp / "replica", "--replicaof", "127.0.0.1", port)
    info = redis.Redis.from_url(primary).info
    wait_until(lambda: info("replication").get("slave0", {}).get("state") == "online", 20, "the replica")
    return primary, replica


# --- api ---------------------------------------------------------------------------------------------

def api_section(procs: Procs, tmp: Path, primary: str, rounds: int) -> dict[str, float]:
    r = redis.Redis.from_url(primary)
    figures: dict[str, float] = {}
    for acks in (0, 1):
        proc, port = start_gunicorn(procs, "app:create_app()", ROOT, primary, tmp,
                                    {"REDIS_MIN_REPLICA_ACKS": str(acks)}, gunicorn_args=ONE_PROCESS)
        for route in ("submit", "status"):
            runs = []
            for _ in range(rounds):
                r.flushall()
                if route == "submit":
                    url, body = f"http://127.0.0.1:{port}/csm", json.dumps(BODY)
                else:
                    status, job = Client(port).post("/csm", BODY)
                    url, body = f"http://127.0.0.1:{port}/status/{job['id']}", None
                runs.append(cpu_per_request(procs, url, tmp, proc.pid, r, seconds=5, post_json=body))
            rate, api_us, redis_us = (statistics.median(values) for values in zip(*runs, strict=True))
            figures[f"{route}_{acks}"] = rate
            figures[f"{route}_redis_us_{acks}"] = redis_us
            print(f"  {route:6} REDIS_MIN_REPLICA_ACKS={acks}: {rate:7.0f} /s per API process "
                  f"(API CPU {api_us:5.0f} µs, Redis CPU {redis_us:4.0f} µs per request; runs "
                  f"{', '.join(f'{run[0]:.0f}' for run in runs)})", flush=True)
        procs.stop(proc)
    return figures


# --- job ---------------------------------------------------------------------------------------------

def one_job(r: redis.Redis, settings: config.Settings, params: dict, worker: str) -> str:
    """One job's whole life in Redis, as the API and a worker make it (on a ready pool node, BENCH_NODE)."""
    job_id, _ = jobstore.submit(r, "csm", params, idempotency_key=f"idem:bench:{uuid.uuid4().hex}",
                                request_hash="h")
    entry = jobstore.take(r, worker, 1)
    attempt, _status = jobstore.claim(r, settings, worker, entry)
    jobstore.get_job(r, job_id)
    jobstore.set_phase(r, job_id, JOB_PHASES[0], worker_id=worker, attempt=attempt)
    nodestore.lease_slot(r, BENCH_NODE, "csm", job_id, worker, "csm", 4, 4, time.time())
    for phase in JOB_PHASES[1:]:
        jobstore.set_phase(r, job_id, phase, worker_id=worker, attempt=attempt)
    nodestore.release_lease(r, BENCH_NODE, job_id, time.time(), 1.0, confirm=True)
    jobstore.transition(r, settings, job_id, "success", {"result_url": RESULT_URL}, worker_id=worker,
                        attempt=attempt)
    jobstore.ack(r, worker, entry)
    raw, _slot = webhooks.take_next(r, worker, 0.05)
    webhook_state.settle_webhook(r, worker, raw, job_id, "delivered", 1)
    return job_id


def add_bench_node(r: redis.Redis) -> None:
    """A ready pool node the jobs of one_job lease a slot of."""
    nodestore.reserve_node(r, BENCH_NODE, "csm", "bench-w", 10, time.time())
    r.hset(nodestore.node_key(BENCH_NODE), "state", "ready")


def idle_cpu_rate(r: redis.Redis, seconds: float = 2.0) -> float:
    """Redis' own CPU per second while nobody calls it (its cron): subtracted from the figures."""
    before = redis_cpu_s(r)
    time.sleep(seconds)
    return (redis_cpu_s(r) - before) / seconds


def measured(r: redis.Redis, count: int, step) -> float:
    """Redis CPU µs per call of step(i), its idle CPU taken off."""
    idle = idle_cpu_rate(r, 1.0)
    started, before = time.monotonic(), redis_cpu_s(r)
    for i in range(count):
        step(i)
    spent = redis_cpu_s(r) - before - idle * (time.monotonic() - started)
    return max(0.0, spent) / count * 1e6


def job_section(primary: str, count: int) -> dict[str, float]:
    raw = redis.Redis.from_url(primary)
    params = jobspec.validate("csm", BODY)
    figures: dict[str, float] = {}
    for acks in (0, 1):
        raw.flushall()
        settings = settings_for(primary, acks)
        r = redis_conn.connect(settings)
        add_bench_node(r)
        figures[f"job_{acks}"] = measured(raw, count, lambda _i, r=r, s=settings: one_job(r, s, params, "bench-w"))
        print(f"  one job's life, REDIS_MIN_REPLICA_ACKS={acks}: Redis CPU {figures[f'job_{acks}']:.0f} µs "
              f"(submit, take, claim, {len(JOB_PHASES)} phases, node slot leased and released, finish, ack, "
              "webhook taken and settled)", flush=True)
    raw.flushall()
    r = redis_conn.connect(settings_for(primary))
    job_id, _ = jobstore.submit(r, "csm", params)
    attempt, _status = jobstore.claim(r, settings_for(primary), "bench-w", jobstore.take(r, "bench-w", 1))
    figures["poll"] = measured(raw, count, lambda _i: jobstore.stop_requested(r, job_id))
    figures["progress"] = measured(raw, count, lambda i: jobstore.set_progress(r, job_id, i % 100, worker_id="bench-w",
                                                                               attempt=attempt))
    print(f"  a running job's cancel poll (one a second): {figures['poll']:.1f} µs; a progress update: "
          f"{figures['progress']:.1f} µs", flush=True)
    return figures


# --- memory ------------------------------------------------------------------------------------------

def memory_section(primary: str, count: int) -> dict[str, float]:
    raw = redis.Redis.from_url(primary)
    raw.flushall()
    settings = settings_for(primary)
    r = redis_conn.connect(settings)
    params = jobspec.validate("csm", BODY)
    base = raw.info("memory")["used_memory"]
    ids = [jobstore.submit(r, "csm", params)[0] for _ in range(count)]
    queued = (raw.info("memory")["used_memory"] - base) / count
    add_bench_node(r)
    for job_id in ids:
        entry = jobstore.take(r, "bench-w", 1)
        attempt, _status = jobstore.claim(r, settings, "bench-w", entry)
        nodestore.lease_slot(r, BENCH_NODE, "csm", job_id, "bench-w", "csm", 4, 4, time.time())
        for phase in JOB_PHASES:
            jobstore.set_phase(r, job_id, phase, worker_id="bench-w", attempt=attempt)
        nodestore.release_lease(r, BENCH_NODE, job_id, time.time(), 1.0)
        jobstore.transition(r, settings, job_id, "success", {"result_url": RESULT_URL}, worker_id="bench-w",
                            attempt=attempt)
        jobstore.ack(r, "bench-w", entry)
        raw_entry, _slot = webhooks.take_next(r, "bench-w", 0.05)
        webhook_state.settle_webhook(r, "bench-w", raw_entry, job_id, "delivered", 1)
    finished = (raw.info("memory")["used_memory"] - base) / count
    print(f"  Redis memory per queued job {queued:.0f} B, per finished job {finished:.0f} B (a {len(RESULT_URL)}-"
          f"character result URL, a delivered webhook; {count} jobs)", flush=True)
    return {"queued_bytes": queued, "finished_bytes": finished}


# --- idle workers and the sweep ------------------------------------------------------------------------

def idle_section(procs: Procs, tmp: Path, primary: str, workers: int = 4, seconds: float = 30.0) -> dict[str, float]:
    raw = redis.Redis.from_url(primary, decode_responses=True)
    raw.flushall()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C3_", "MINIO_", "REDIS_"))}
    env.update(REDIS_URL=primary, C3_API_KEY="bench", C3_API_URL=f"http://127.0.0.1:{free_port()}/api/v0",
               OUTPUT_DIR=str(tmp / "output"), LOG_LEVEL="WARNING")
    started = [procs.start([sys.executable, "c3_render_worker.py"], cwd=ROOT,
                           env={**env, "WORKER_ID": f"idle-{n}", "WORK_DIR": str(tmp / f"work-{n}")})
               for n in range(workers)]
    wait_until(lambda: raw.scard(config.WORKERS_KEY) == workers, 30, "the idle workers")
    time.sleep(3)

    def calls() -> int:
        return sum(int(stats["calls"]) for stats in raw.info("commandstats").values())

    cpu0, calls0, t0 = redis_cpu_s(raw), calls(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    per_worker = (redis_cpu_s(raw) - cpu0) / elapsed / workers * 1e6
    commands = (calls() - calls0) / elapsed / workers
    for proc in started:
        procs.stop(proc)
    print(f"  an idle worker: Redis CPU {per_worker:.0f} µs per second ({commands:.1f} commands/s: job take, "
          f"the pool's look, webhook taker, heartbeat, sweep; {workers} workers, {seconds:.0f} s)", flush=True)
    # one sweep against a fleet of live workers: it reads every worker's heartbeat (and webhook sender)
    fleet = 1000
    raw.flushall()
    pipe = raw.pipeline(transaction=False)
    for n in range(fleet):
        pipe.sadd(config.WORKERS_KEY, f"w{n}")
        pipe.sadd(config.WEBHOOK_SENDERS_KEY, f"w{n}")
        pipe.set(jobstore.heartbeat_key(f"w{n}"), "1", ex=600)
    pipe.execute()
    settings = dataclasses.replace(settings_for(primary), heartbeat_ttl_s=1, output_dir=str(tmp / "output"),
                                   work_dir=str(tmp / "work-sweep"))
    r = redis_conn.connect(settings)
    wait_until(lambda: redis_conn.primary_age_s(r) > 1, 10, "an uptime over the heartbeat TTL")
    per_sweep = measured(raw, 20, lambda _i: sweep.sweep_dead_workers(settings, r))
    per_registered = per_sweep / fleet
    print(f"  one recovery sweep: Redis CPU {per_registered:.2f} µs per registered worker ({per_sweep / 1000:.1f} ms "
          f"with {fleet}); each worker sweeps every SWEEP_INTERVAL_S ({config.Settings().sweep_interval_s:g} s)",
          flush=True)
    return {"idle_us_per_s": per_worker, "sweep_us_per_worker": per_registered}


# --- failover gap ------------------------------------------------------------------------------------

def failover_once(procs: Procs, tmp: Path, down_after_ms: int, fast: bool, acks: int) -> tuple[float, float]:
    """(seconds from the kill to the first 200 of a submit sent after it, the longest submit around it)."""
    from redis_ha import start_ha, wait_switched

    ha = start_ha(tmp / f"ha-{down_after_ms}-{fast}-{acks}-{time.monotonic_ns()}", down_after_ms, fast)
    try:
        proc, port = start_gunicorn(procs, "app:create_app()", ROOT, "redis://127.0.0.1:9/0", tmp,
                                    ha.env(REDIS_MIN_REPLICA_ACKS=str(acks)), gunicorn_args=ONE_PROCESS)
        answers: list[tuple[float, float, int]] = []
        stop = threading.Event()

        def submitter() -> None:
            client = Client(port)
            while not stop.is_set():
                sent = time.time()
                try:
                    status, _ = client.post("/csm", {"text": "Failover."})
                except OSError:
                    status = 0
                    client = Client(port)
                answers.append((sent, time.time(), status))
                time.sleep(0.02)

        threads = [threading.Thread(target=submitter) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        old = ha.kill_primary()
        killed_at = time.time()  # (a submit sent before the kill may still have reached the old primary)
        wait_switched(ha, old, 120)
        ha.restart(old)
        wait_until(lambda: any(sent >= killed_at and status == 200 for sent, _a, status in answers), 180,
                   "a submit after the failover")
        time.sleep(1)
        stop.set()
        for thread in threads:
            thread.join(60)
        procs.stop(proc)
        gap = min(answered - killed_at for sent, answered, status in answers if sent >= killed_at and status == 200)
        longest = max(answered - sent for sent, answered, _s in answers if answered >= killed_at)
        return gap, longest
    finally:
        ha.stop()


def failover_section(procs: Procs, tmp: Path, rounds: int) -> None:
    for label, down_after, fast, acks in (("test timings (down-after 1 s, fast periods)", 1000, True, 1),
                                          ("down-after 5 s, redis-server's periods", 5000, False, 1),
                                          ("down-after 5 s, redis-server's periods", 5000, False, 0)):
        runs = [failover_once(procs, tmp, down_after, fast, acks) for _ in range(rounds)]
        print(f"  failover gap, {label}, REDIS_MIN_REPLICA_ACKS={acks}: "
              f"{', '.join(f'{gap:.1f} s' for gap, _l in runs)} from SIGKILL to the first submit answered 200 "
              f"(longest submit meanwhile {max(longest for _g, longest in runs):.1f} s)", flush=True)


# --- workers per Redis ---------------------------------------------------------------------------------

def workers_section(figures: dict[str, float]) -> None:
    interval = config.Settings().sweep_interval_s
    for acks in (0, 1):
        job = figures.get(f"job_{acks}")
        if job is None or "idle_us_per_s" not in figures:
            return
        # per second, W workers each finishing a job a minute: W/60 job lives, W idle loops (an upper bound:
        # a busy worker's cancel polls cost less than its idle take loop), W sweeps / interval of W workers
        linear = figures["idle_us_per_s"] + job / 60 + figures["poll"]
        quadratic = figures["sweep_us_per_worker"] / interval
        for share in (0.5, 1.0):
            budget = share * 1e6
            count = (-linear + math.sqrt(linear * linear + 4 * quadratic * budget)) / (2 * quadratic)
            print(f"  REDIS_MIN_REPLICA_ACKS={acks}: one Redis core at {share:.0%} serves about {count:,.0f} workers "
                  f"at one job per node-minute (per worker {linear:.0f} µs/s + {quadratic:.3f} µs/s per other "
                  f"worker for the sweeps)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10000, help="jobs for the memory section (job: a fifth)")
    parser.add_argument("--failover-rounds", type=int, default=1)
    args = parser.parse_args()
    only = set(args.only.split(","))
    print(f"machine: {machine()}; nproc {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}; redis-server "
          f"{subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]}",
          flush=True)
    procs = Procs()
    figures: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="c3-capacity-") as tmp_name:
            tmp = Path(tmp_name)
            primary, _replica = start_pair(procs, tmp)
            if "api" in only:
                print("api:", flush=True)
                figures.update(api_section(procs, tmp, primary, args.rounds))
            if "job" in only or "idle" in only:
                print("job:", flush=True)
                figures.update(job_section(primary, max(200, args.jobs // 5)))
            if "memory" in only:
                print("memory:", flush=True)
                figures.update(memory_section(primary, args.jobs))
            if "idle" in only:
                print("idle:", flush=True)
                figures.update(idle_section(procs, tmp, primary))
                print("workers:", flush=True)
                workers_section(figures)
            if "failover" in only:
                print("failover:", flush=True)
                failover_section(procs, tmp, args.failover_rounds)
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
