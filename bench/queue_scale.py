"""/status, cancel and submit at 10 and at 200,000 queued jobs, and submit latency under 16 pollers.

Serves the API (gunicorn 2 workers x 4 gthread) on a fresh redis-server and prints, for a job at the
back of a 10-job queue and of a 200,000-job queue: the /status latency (one keep-alive client, p50 and
p99, ms) and Redis' CPU per /status (INFO cpu, µs: commands and their round trips); the latency of
cancelling a queued job and of submitting; then submit p50 while 16 clients poll /status of the last job (wrk):

- at full speed, on the same API processes as the submitter, three times, each with a new submitter
  connection (gunicorn gives a connection to one worker process for its life, so the figure depends
  on how many pollers share that process: min / median / max are printed);
- at full speed, on a second API replica (its own gunicorn) sharing only Redis with the submitter: what
  pollers cost submitters through the shared job store, the one part that does not scale out;
- at one poll per 20 ms per client, on the same API processes.

Ratios are printed against the targets of issue 9 (status 200k/10 <= 1.5, submit with pollers /
without <= 2).

    python bench/queue_scale.py [--jobs 200000] [--code DIR] [--threads 4]

--code serves another checkout (e.g. `git archive <old commit> | tar -x -C /tmp/before`) to measure
"before" in the same way. --threads sets gunicorn's threads per worker (the Dockerfile and
scripts/run-local.sh use 64).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import redis
from harness import (
    ROOT,
    Client,
    Procs,
    machine,
    parse_wrk,
    pct,
    redis_cpu_s,
    start_gunicorn,
    start_redis,
    timed,
    wrk,
)

BODY = {"text": "Hello there. General Kenobi."}


def status_figures(client: Client, r: redis.Redis, job_id: str, samples: int) -> tuple[float, float, float]:
    path = f"/status/{job_id}"
    status, answer = client.get(path)
    assert status == 200 and answer.get("queue_position"), answer
    redis0 = redis_cpu_s(r)
    times = timed(lambda: client.get(path), samples)
    return pct(times, 50), pct(times, 99), (redis_cpu_s(r) - redis0) / samples * 1e6


def submit_p50(client: Client, samples: int) -> float:
    return pct(timed(lambda: client.post("/csm", BODY), samples), 50)


def cancel_p50(client: Client, ids: list[str]) -> float:
    it = iter(ids)

    def one() -> None:
        status, answer = client.post(f"/cancel/{next(it)}", {})
        assert status == 200 and answer["status"] == "cancelled", answer

    return pct(timed(one, len(ids)), 50)


def fill(code_dir: Path, redis_url: str, count: int) -> None:
    """Queue `count` jobs straight through that checkout's jobstore.submit (no HTTP, for speed)."""
    script = (
        "import sys, redis, jobstore, jobspec\n"
        "r = redis.Redis.from_url(sys.argv[1], decode_responses=True)\n"
        "params = jobspec.validate('csm', {'text': 'Hi.'})\n"
        "for _ in range(int(sys.argv[2])): jobstore.submit(r, 'csm', params)\n"
    )
    subprocess.run([sys.executable, "-c", script, redis_url, str(count)], cwd=code_dir, check=True)


def submit_under_pollers(procs: Procs, poll_port: int, tmp: Path, client: Client, job_id: str,
                         delay_ms: int) -> tuple[float, float]:
    """Submit p50 while 16 wrk connections poll /status of job_id on poll_port (8 s); also the pollers'
    requests/s."""
    pollers = wrk(procs, f"http://127.0.0.1:{poll_port}/status/{job_id}", tmp, seconds=8, connections=16,
                  delay_ms=delay_ms, background=True)
    time.sleep(1.0)
    times = []
    deadline = time.time() + 6
    while time.time() < deadline and len(times) < 1000:
        start = time.perf_counter()
        client.post("/csm", BODY)
        times.append((time.perf_counter() - start) * 1000)
    out, _ = pollers.communicate(timeout=60)
    procs.children.remove(pollers)
    return pct(sorted(times), 50), parse_wrk(out.decode())


def three_runs(runs: list[tuple[float, float]], alone_ms: float) -> str:
    """Submit p50 of each run under pollers, lowest first, with its ratio to no pollers and the pollers'
    rate in that run."""
    return "  ".join(f"{p50:.3f} ms (x{p50 / alone_ms:.2f}, {rate:.0f}/s)" for p50, rate in sorted(runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose app is served")
    parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker process")
    args = parser.parse_args()
    harness.GUNICORN[harness.GUNICORN.index("--threads") + 1] = str(args.threads)
    code = args.code.resolve()
    procs = Procs()
    rows: list[tuple[str, str]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="c3-queue-scale-") as tmp_name:
            tmp = Path(tmp_name)
            redis_url = start_redis(procs, tmp)
            r = redis.Redis.from_url(redis_url, decode_responses=True)
            _proc, port = start_gunicorn(procs, "app:create_app()", code, redis_url, tmp)
            client = Client(port)
            for _ in range(10):  # warm up both gunicorn workers' connections
                client.post("/csm", BODY)
            r.flushall()
            ids = [client.post("/csm", BODY)[1]["id"] for _ in range(10)]
            s10 = status_figures(client, r, ids[-1], args.samples)
            sub10 = submit_p50(client, 500)
            extra = [client.post("/csm", BODY)[1]["id"] for _ in range(200)]
            can10 = cancel_p50(client, extra[:100])
            r.flushall()
            started = time.time()
            fill(code, redis_url, args.jobs)
            fill_s = time.time() - started
            last = client.post("/csm", BODY)[1]["id"]
            first_ids = [json.loads(e)["id"] for e in reversed(r.lrange("queue:jobs", -100, -1))]
            big = r.llen("queue:jobs")
            sbig = status_figures(client, r, last, args.samples)
            subbig = submit_p50(client, 500)
            canbig = cancel_p50(client, first_ids[:100])  # the oldest jobs: the far end for LREM
            full = [submit_under_pollers(procs, port, tmp, Client(port), last, 0) for _ in range(3)]
            _replica, replica_port = start_gunicorn(procs, "app:create_app()", code, redis_url, tmp)
            replica = [submit_under_pollers(procs, replica_port, tmp, client, last, 0) for _ in range(3)]
            sub_paced, rate_paced = submit_under_pollers(procs, port, tmp, client, last, 20)
    finally:
        procs.stop_all()
    rows += [
        ("code", str(code)),
        ("machine", machine()),
        ("gunicorn", " ".join(harness.GUNICORN)),
        ("queue filled", f"{big} jobs in {fill_s:.1f} s"),
        ("/status p50 / p99, 10 queued", f"{s10[0]:.3f} / {s10[1]:.3f} ms  (Redis CPU {s10[2]:.1f} µs/call)"),
        (f"/status p50 / p99, {big} queued", f"{sbig[0]:.3f} / {sbig[1]:.3f} ms  (Redis CPU {sbig[2]:.1f} µs/call)"),
        ("/status ratio big/10 (p50; target <= 1.5)", f"{sbig[0] / s10[0]:.2f}"),
        ("cancel p50, 10 / big queue", f"{can10:.3f} / {canbig:.3f} ms  (ratio {canbig / can10:.2f})"),
        ("submit p50, 10 / big queue", f"{sub10:.3f} / {subbig:.3f} ms  (ratio {subbig / sub10:.2f})"),
        ("submit p50, 16 pollers at full speed, same API", three_runs(full, subbig)),
        ("submit p50, 16 pollers at full speed, other replica", three_runs(replica, subbig)),
        ("submit p50, 16 pollers every 20 ms", f"{sub_paced:.3f} ms  (x{sub_paced / subbig:.2f}; "
                                               f"pollers {rate_paced:.0f} /status per s; target x <= 2)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
