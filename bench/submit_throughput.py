"""Submit throughput of the API against a bare Flask app that parses the JSON and does one LPUSH.

Both run under the same gunicorn settings (2 workers x 4 gthread) on the same redis-server, measured
in one run: wrk (16 connections, 2 threads) POSTs a CSM job to each in turn, --rounds times, the Redis
database flushed between runs. Prints requests/s of each run, the medians and their ratio (issue 9's
target: ours / bare >= 0.9).

    python bench/submit_throughput.py [--seconds 5] [--rounds 5] [--code DIR ...] [--with-path DIR]

Several --code checkouts (e.g. the commit before the change) are measured in the same run. --with-path
also runs every app with DIR on PYTHONPATH (e.g. `pip install --target DIR hiredis`), to measure a
library before adding it. The ratio printed per app is the median of the per-round ratios (each run
against the bare app's run of the same round), which is steadier than a ratio of medians on a busy
machine.
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
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--with-path", type=Path, help="also run every app with this directory on PYTHONPATH")
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
            variants = {"": {}}
            if args.with_path:
                variants[f" + {args.with_path.name}"] = {"EXTRA_PATH": str(args.with_path.resolve())}
            apps: dict[str, int] = {}
            for suffix, extra in variants.items():
                apps["bare Flask + LPUSH" + suffix] = start_gunicorn(procs, "bare_app:app", ROOT / "bench", redis_url,
                                                                     tmp, extra)[1]
                for code in codes:
                    apps[f"c3-render ({code.name}){suffix}"] = start_gunicorn(procs, "app:create_app()", code,
                                                                              redis_url, tmp, extra)[1]
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
    for name, values in rates.items():
        bare_name = "bare Flask + LPUSH" + (name.split(")", 1)[1] if name.startswith("c3-render") else "")
        bare_name = name if name.startswith("bare") else bare_name
        ratios = [v / b for v, b in zip(values, rates[bare_name], strict=True)]
        print(f"median  {name:<60} {statistics.median(values):8.0f} req/s   "
              f"ratio to {bare_name}: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
