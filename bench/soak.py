"""Soak test: the whole service under crashes and outages, then a count of what went wrong.

Starts a real redis-server (AOF, everysec), the dev node, the API (gunicorn), N workers, a webhook
receiver and a file server for the inputs, all on 127.0.0.1 in a temporary directory. Submits M jobs
of mixed types (csm, whisper, portrait, analyze) with webhooks, keeping a small backlog queued, while
a seeded chaos thread SIGKILLs workers (restarted a few seconds later under a new WORKER_ID),
restarts Redis, makes the dev node fail launches, stops running nodes through the control API and
takes the webhook receiver down for a while. Then it waits for every job to finish, lets webhooks
settle, stops the workers with SIGTERM (they stop their nodes) and prints

| accepted | succeeded | failed (by reason) | lost | ran twice to success | webhooks missing |
| webhooks duplicated | nodes left running | node-seconds billed |

plus the chaos events. Exit status 1 when lost, webhooks missing or nodes left running is not 0, or a
webhook copy differs from the first (webhook-id or body), or a process died that chaos did not kill.

    python bench/soak.py --jobs 300 --workers 3 [--seed S] [--duration-limit SECONDS]

Everything started is stopped at the end, on failure, on Ctrl-C and on SIGTERM; --keep keeps the
temporary directory (logs, Redis AOF) for a look afterwards.

The pieces: soak_stack.py (the processes), soak_receivers.py (the webhook receiver), soak_jobs.py
(inputs, the job mix, submissions), soak_chaos.py (the chaos thread), soak_report.py (count, table,
verdict); this file is the command line and the order of events.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from soak_chaos import Chaos
from soak_common import Timeout, http, log
from soak_jobs import drain, make_images, make_speech, submit_all
from soak_report import count, print_details, table, verdict
from soak_stack import Stack, devnode_nodes, start_stack, stop_all_started, webhooks_pending


def settle_webhooks(stack: Stack, ids: list[str], deadline: float) -> None:
    """Wait until every finished job's webhook arrived and nothing is left to send (or the deadline)."""
    while time.monotonic() < deadline:
        got = stack.receiver.snapshot()
        if all(job_id in got for job_id in ids) and webhooks_pending(stack) == 0:
            break
        time.sleep(0.5)
    time.sleep(2.0)  # a copy being sent right now still arrives


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300, help="jobs to submit (default 300)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the job mix and the chaos (default: random)")
    parser.add_argument("--duration-limit", type=float, default=1800.0,
                        help="global deadline in seconds; the soak stops by itself after it (default 1800)")
    parser.add_argument("--chaos-interval", type=float, default=5.0,
                        help="mean seconds between chaos events (default 5)")
    parser.add_argument("--backlog", type=int, default=0,
                        help="unfinished jobs kept submitted at a time (default 4 per worker)")
    parser.add_argument("--spread", type=float, default=0.0,
                        help="spread the submissions over at least this many seconds, so that a small run "
                             "still meets enough chaos (default 0: as fast as the backlog allows)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, AOF)")
    return parser.parse_args(argv)


def on_sigterm(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    started_at = time.monotonic()
    deadline = started_at + args.duration_limit
    signal.signal(signal.SIGTERM, on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="c3-soak-"))
    command = f"python bench/soak.py --jobs {args.jobs} --workers {args.workers} --seed {seed}"
    log(f"{command}  (deadline {args.duration_limit:.0f} s, logs in {tmp})")
    stack: Stack | None = None
    chaos: Chaos | None = None
    passed = False
    try:
        stack = start_stack(tmp, args.workers)
        log(f"redis {stack.redis.url}, dev node {stack.devnode_url}, API {stack.api_url}, "
            f"{args.workers} workers")
        make_images(tmp / "inputs")
        log(f"inputs ready: {make_speech(stack, tmp / 'inputs')}, a 256 px face, a plain image")
        interval = float(stack.env["WEBHOOK_INTERVAL_S"])
        attempts = int(stack.env["WEBHOOK_ATTEMPTS"])
        chaos = Chaos(stack, rng, args.chaos_interval, webhook_down_max_s=min(8.0, interval * (attempts - 1) - 4))
        chaos.thread.start()
        subs = submit_all(stack, args.jobs, args.backlog or 4 * args.workers, args.spread, rng, deadline - 90)
        log(f"all {args.jobs} submitted ({len(subs.accepted)} accepted, {subs.retries} retried, "
            f"{subs.replayed} answered from the Idempotency-Key); chaos stops")
        chaos.finish()
        http("POST", stack.devnode_url + "/admin/reset", {})
        drain(stack, subs.accepted, deadline - 60)
        settle_webhooks(stack, subs.accepted, min(deadline - 40, time.monotonic() + interval * attempts + 30))
        log("stopping the workers (SIGTERM; each stops its node)")
        for child in stack.workers.values():
            child.killed_by_us = True
            child.send(signal.SIGTERM)
        for child in stack.workers.values():
            child.stop(30)
        time.sleep(1.0)
        nodes = devnode_nodes(stack.devnode_url)
        report = count(stack, subs, nodes)
        wall = time.monotonic() - started_at
        print()
        print(table(report))
        print()
        print_details(report, chaos, subs, wall, command, args)
        wrong = verdict(report, chaos, stack.api, stack.devnode)
        if wrong:
            print("\nFAILED:")
            for line in wrong:
                print(f"- {line}")
            return 1
        print("\nPASSED: nothing lost, every webhook arrived, no node left running")
        passed = True
        return 0
    except Timeout as exc:
        log(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        if chaos is not None:
            chaos.stop_event.set()
        stop_all_started()
        if stack is not None:
            stack.receiver.close()
            stack.files.shutdown()
        if args.keep or not passed:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
