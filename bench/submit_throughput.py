"""Submit throughput of the API against a bare Flask app that parses the JSON and does one LPUSH.

Both run under the same gunicorn settings (2 workers x 4 gthread) on the same redis-server, measured
in one run: wrk (16 connections, 2 threads) POSTs a CSM job to each in turn, --rounds times, the Redis
database flushed between runs. Prints requests/s of each run, the medians and their ratio (issue 9's
target: ours / bare >= 0.9). Because requests/s swing widely when other work shares the machine, it
also prints the API's CPU time per request (gunicorn master + workers, from /proc) and Redis' (INFO
cpu), and the CPU ratio bare / ours: the throughput ratio the two would have when CPU-bound alone.

    python bench/submit_throughput.py [--seconds 5] [--rounds 5] [--code DIR ...] [--with-path DIR] [--ceilings]

Several --code checkouts (e.g. the commit before the change) are measured in the same run. --with-path
also runs every app with DIR on PYTHONPATH (e.g. `pip install --target DIR hiredis`), to measure a
library before adding it. The ratio printed per app is the median of the per-round ratios (each run
against the bare app's run of the same round), which is steadier than a ratio of medians on a busy
machine; "best" is the best run of each app (the one least disturbed by other work).

--ceilings also serves this checkout's API with parts of the submit taken away (bench/ceiling_app.py):
without the submit script (one LPUSH instead: no job record), and without the script, the JSON checks
and the API-key hook; their ratios are the most that trimming those parts could give.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import redis
from harness import ROOT, Procs, cpu_per_request, machine, start_gunicorn, start_redis, wrk

BODY = '{"text": "Hello there. General Kenobi."}'
CEILINGS = ("script", "script,checks,key")  # what --ceilings takes away (see ceiling_app.py)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--with-path", type=Path, help="also run every app with this directory on PYTHONPATH")
    parser.add_argument("--code", type=Path, action="append", help="checkout(s) to serve (default: this one)")
    parser.add_argument("--ceilings", action="store_true",
                        help="also serve the API with parts of the submit taken away (bench/ceiling_app.py)")
    args = parser.parse_args()
    codes = [c.resolve() for c in (args.code or [ROOT])]
    procs = Procs()
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="c3-submit-") as tmp_name:
            tmp = Path(tmp_name)
            redis_url = start_redis(procs, tmp)
            r = redis.Redis.from_url(redis_url)
            variants = {"": {}}
            if args.with_path:
                variants[f" + {args.with_path.name}"] = {"EXTRA_PATH": str(args.with_path.resolve())}
            apps: dict[str, tuple[int, int]] = {}  # name -> (gunicorn's pid = its session, port)
            for suffix, extra in variants.items():
                proc, port = start_gunicorn(procs, "bare_app:app", ROOT / "bench", redis_url, tmp, extra)
                apps["bare Flask + LPUSH" + suffix] = (proc.pid, port)
                for code in codes:
                    proc, port = start_gunicorn(procs, "app:create_app()", code, redis_url, tmp, extra)
                    apps[f"c3-render ({code.name}){suffix}"] = (proc.pid, port)
                for removed in CEILINGS if args.ceilings else ():
                    proc, port = start_gunicorn(procs, "ceiling_app:create()", ROOT, redis_url, tmp,
                                                {**extra, "CEILING": removed,
                                                 "EXTRA_PATH": os.pathsep.join([str(ROOT / "bench"), *extra.values()])})
                    apps[f"c3-render (without {removed}){suffix}"] = (proc.pid, port)
            for _pid, port in apps.values():  # warm-up
                wrk(procs, f"http://127.0.0.1:{port}/csm", tmp, seconds=2, post_json=BODY)
            for round_no in range(args.rounds):
                for name, (pid, port) in apps.items():
                    r.flushall()
                    rate, api_us, redis_us = cpu_per_request(procs, f"http://127.0.0.1:{port}/csm", tmp, pid, r,
                                                             seconds=args.seconds, post_json=BODY)
                    rates.setdefault(name, []).append(rate)
                    cpu.setdefault(name, []).append(api_us + redis_us)
                    print(f"round {round_no + 1}  {name:<44} {rates[name][-1]:6.0f} req/s   CPU per request: "
                          f"API {api_us:5.0f} µs + Redis {redis_us:4.0f} µs", flush=True)
    finally:
        procs.stop_all()
    print(f"machine: {machine()}")
    for name, values in rates.items():
        suffix = name.split(")", 1)[1] if name.startswith("c3-render") else name[len("bare Flask + LPUSH"):]
        bare = "bare Flask + LPUSH" + suffix
        ratios = [v / b for v, b in zip(values, rates[bare], strict=True)]
        cpu_ratio = statistics.median(cpu[bare]) / statistics.median(cpu[name])
        print(f"{name:<44} median {statistics.median(values):5.0f} req/s (ratio {statistics.median(ratios):.2f})  "
              f"best {max(values):5.0f} req/s (ratio {max(values) / max(rates[bare]):.2f})  "
              f"CPU {statistics.median(cpu[name]):4.0f} µs/request (ratio bare/ours {cpu_ratio:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
