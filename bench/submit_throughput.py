"""Submit throughput of the API against a bare Flask app that parses the JSON and does one LPUSH.

Both run under the same gunicorn settings (2 workers x 4 gthread) on the same redis-server, measured
in one run: wrk (16 connections, 2 threads) POSTs a CSM job to each in turn, --rounds times, the Redis
database flushed between runs. Prints requests/s of each run, the medians and their ratio (issue 9's
target: ours / bare >= 0.9).

    python bench/submit_throughput.py [--seconds 10] [--rounds 3] [--code DIR] [--code DIR2 ...]

Several --code checkouts (e.g. the commit before the change) are measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import redis
from harness import ROOT, Procs, machine, start_gunicorn, start_redis, wrk

BODY = '{"text": "Hello there. General Kenobi."}'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--code", type=Path, action="append", help="checkout(s) to serve (default: this one)")
    args = parser.parse_args()
    codes = [c.resolve() for c in (args.code or [ROOT])]
    procs = Procs()
    rates: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="c3-submit-") as tmp_name:
            tmp = Path(tmp_name)
            redis_url = start_redis(procs, tmp)
            r = redis.Redis.from_url(redis_url)
            apps = {"bare Flask + LPUSH": start_gunicorn(procs, "bare_app:app", ROOT / "bench", redis_url, tmp)[1]}
            for code in codes:
                apps[f"c3-render ({code.name})"] = start_gunicorn(procs, "app:create_app()", code, redis_url, tmp)[1]
            for port in apps.values():  # warm-up
                wrk(procs, f"http://127.0.0.1:{port}/csm", tmp, seconds=2, post_json=BODY)
            for round_no in range(args.rounds):
                for name, port in apps.items():
                    r.flushall()
                    rate = wrk(procs, f"http://127.0.0.1:{port}/csm", tmp, seconds=args.seconds, post_json=BODY)
                    rates.setdefault(name, []).append(rate)
                    print(f"round {round_no + 1}  {name:<60} {rate:8.0f} req/s", flush=True)
    finally:
        procs.stop_all()
    print(f"machine: {machine()}")
    bare = statistics.median(rates["bare Flask + LPUSH"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"median  {name:<60} {median:8.0f} req/s   ratio to bare {median / bare:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
