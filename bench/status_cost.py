"""CPU per GET /status of a queued job (API and Redis), for one or more checkouts side by side.

Each checkout's API runs under the same gunicorn settings (harness.py) on one redis-server holding 100
queued jobs; wrk (16 connections) polls the 51st job's /status for --seconds, --rounds times, the
checkouts taking turns. Prints requests/s and CPU per request of every run and the medians: the
figure to compare when changing what /status reads (CPU per request stays meaningful on a busy machine
where requests/s do not).

    python bench/status_cost.py [--code DIR ...] [--rounds 5] [--seconds 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import redis
from harness import ROOT, Client, Procs, cpu_per_request, machine, start_gunicorn, start_redis


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, action="append", help="checkout(s) to serve (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4)
    args = parser.parse_args()
    codes = [c.resolve() for c in (args.code or [ROOT])]
    procs = Procs()
    cpu: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="c3-status-") as tmp_name:
            tmp = Path(tmp_name)
            redis_url = start_redis(procs, tmp)
            r = redis.Redis.from_url(redis_url)
            apps = {}
            for code in codes:
                proc, port = start_gunicorn(procs, "app:create_app()", code, redis_url, tmp)
                apps[f"{code.name} ({code})"] = (proc.pid, port)
            client = Client(next(iter(apps.values()))[1])
            ids = [client.post("/csm", {"text": "Hi."})[1]["id"] for _ in range(100)]
            for round_no in range(args.rounds):
                for name, (pid, port) in apps.items():
                    rate, api_us, redis_us = cpu_per_request(procs, f"http://127.0.0.1:{port}/status/{ids[50]}",
                                                             tmp, pid, r, seconds=args.seconds)
                    cpu.setdefault(name, []).append(api_us + redis_us)
                    print(f"round {round_no + 1}  {name:<50} {rate:6.0f} req/s   CPU per request: "
                          f"API {api_us:4.0f} µs + Redis {redis_us:3.0f} µs", flush=True)
    finally:
        procs.stop_all()
    print(f"machine: {machine()}")
    for name, values in cpu.items():
        print(f"{name:<50} median CPU per /status {statistics.median(values):4.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
