"""Soak test: the whole service under crashes, outages and hostile receivers, then a count of what went wrong.

Starts a real redis-server (AOF, everysec), the dev node, the API (gunicorn), N workers, six webhook
receivers (soak_receivers.py: healthy, flaky, hanging, dripping, slow 500) and a file server for the
inputs, all on loopback in a temporary directory. Submits M jobs of mixed types (csm, whisper,
portrait, analyze) with webhooks, keeping a small backlog queued, while a seeded chaos thread
(soak_chaos.py: the kinds are listed there) kills and restarts workers, Redis and the API, makes
launches, engines and nodes fail, takes the flaky receiver down and cancels jobs. Then it waits for
every job to finish and the webhooks to settle, lets the hostile receivers recover, asks again with
`POST /jobs/<id>/webhook` for every webhook that never arrived, stops the workers with SIGTERM (they
stop their nodes) and prints

| accepted | succeeded | failed (by reason) | lost | ran twice to success | webhooks delivered |
| webhooks redelivered | webhooks missing | webhooks duplicated | starved healthy webhooks |
| nodes left running | node-seconds billed |

a table of how often each kind of chaos happened, the healthy receivers' webhook latency (p50, p99)
and the chaos log. Exit status 1 when lost, webhooks missing, starved healthy webhooks or nodes left
running is not 0, a webhook copy differs from the first (webhook-id or body), a cancelled queued job
ran, or a process died that chaos did not kill.

    python bench/soak.py --jobs 300 --workers 4 [--seed S] [--duration-limit SECONDS] [--skip KINDS]

Everything started is stopped at the end, on failure, on Ctrl-C and on SIGTERM; --keep keeps the
temporary directory (logs, Redis AOF) for a look afterwards.

The pieces: soak_stack.py (the processes), soak_receivers.py (the webhook receivers), soak_jobs.py
(inputs, the job mix, submissions), soak_chaos.py (the chaos thread), soak_report.py (count, tables,
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

import redis
from soak_chaos import CHAOS_KINDS, Chaos
from soak_common import Timeout, http, log
from soak_jobs import Submissions, drain, make_images, make_speech, submit_all
from soak_receivers import HOSTILE, all_deliveries
from soak_report import Redelivery, chaos_table, count, print_details, table, verdict
from soak_stack import Stack, devnode_nodes, start_stack, stop_all_started, webhooks_pending


def webhook_statuses(stack: Stack, ids: list[str]) -> dict[str, str]:
    assert stack.r is not None
    try:
        pipe = stack.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(f"job:{job_id}", "webhook_status")
        return dict(zip(ids, (status or "" for status in pipe.execute()), strict=True))
    except redis.RedisError:
        return {}


def settle_webhooks(stack: Stack, subs: Submissions, deadline: float) -> None:
    """Wait until every webhook for a healthy or the flaky receiver arrived or failed for good (or the
    deadline); the hostile receivers' webhooks are still being refused meanwhile."""
    while time.monotonic() < deadline:
        got = all_deliveries(stack.receivers)
        waiting = [job_id for job_id in subs.accepted if subs.receiver_of.get(job_id) not in HOSTILE
                   and job_id not in got]
        statuses = webhook_statuses(stack, waiting)
        if not waiting or (statuses and all(status == "failed" for status in statuses.values())):
            return
        time.sleep(0.5)
    log("deadline: webhooks still on their way to healthy receivers")


def fix_receivers(stack: Stack, deadline: float) -> None:
    """The hostile receivers answer 200 from now on; wait until nothing is left to send (or the deadline)."""
    for receiver in stack.receivers.values():
        receiver.fixed.set()
        receiver.come_up()
    while time.monotonic() < deadline and webhooks_pending(stack) != 0:
        time.sleep(0.5)
    time.sleep(2.0)  # a copy being sent right now still arrives


def redeliver(stack: Stack, subs: Submissions, deadline: float) -> Redelivery:
    """Ask the API to send again every finished job's webhook that never arrived (`POST /jobs/<id>/webhook`),
    then wait for the copies. A 404/405 means the API has no such route: those webhooks stay missing."""
    redelivery = Redelivery()
    todo = [job_id for job_id in subs.accepted if job_id not in all_deliveries(stack.receivers)]
    while todo and time.monotonic() < deadline:
        got = all_deliveries(stack.receivers)
        for job_id in [job_id for job_id in todo if job_id in got]:
            todo.remove(job_id)  # arrived by itself meanwhile (it was still being retried)
        for job_id in list(todo):
            asked = time.time()  # before the request: the copy may arrive before its answer does
            try:
                status, answer = http("POST", f"{stack.api_url}/jobs/{job_id}/webhook", {})
            except OSError as exc:
                redelivery.refused[job_id] = f"no answer: {exc}"
                continue
            if status in (200, 202):
                redelivery.asked_at[job_id] = asked
                redelivery.route = "answered"
                todo.remove(job_id)
            elif status != 409:  # 409: not finished or still being sent; ask again in a moment
                redelivery.refused[job_id] = f"HTTP {status}: {answer}"
                if status in (404, 405):
                    redelivery.route = f"HTTP {status} (no POST /jobs/<id>/webhook in this API)"
                todo.remove(job_id)
            else:
                redelivery.refused[job_id] = f"HTTP 409 until the deadline: {answer}"
        time.sleep(1.0)
    while time.monotonic() < deadline:  # until a copy sent after each request arrived
        got = all_deliveries(stack.receivers)
        if all(any(copy.at >= asked for copy in got.get(job_id, ())) for job_id, asked in redelivery.asked_at.items()):
            break
        time.sleep(0.5)
    return redelivery


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
                        help="spread the submissions over at least this many seconds (default, and at least: "
                             "1.5 x the chaos kinds x --chaos-interval, so that every kind meets running jobs)")
    parser.add_argument("--hostile-share", type=float, default=0.3,
                        help="share of the jobs whose webhook goes to a hostile receiver (default 0.3)")
    parser.add_argument("--skip", default="", help="chaos kinds not to inject, comma-separated (default none; "
                        "kinds: " + ", ".join(CHAOS_KINDS) + ")")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, AOF)")
    args = parser.parse_args(argv)
    args.skip = {kind.strip() for kind in args.skip.split(",") if kind.strip()}
    if args.skip - set(CHAOS_KINDS):
        parser.error(f"unknown chaos kinds: {', '.join(sorted(args.skip - set(CHAOS_KINDS)))}")
    return args


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
    command = (f"python bench/soak.py --jobs {args.jobs} --workers {args.workers} --seed {seed} "
               f"--duration-limit {args.duration_limit:g} --chaos-interval {args.chaos_interval:g}"
               + (f" --spread {args.spread:g}" if args.spread else "")
               + (f" --hostile-share {args.hostile_share:g}" if args.hostile_share != 0.3 else "")
               + (f" --skip {','.join(sorted(args.skip))}" if args.skip else ""))
    log(f"{command}  (logs in {tmp})")
    stack: Stack | None = None
    chaos: Chaos | None = None
    passed = False
    try:
        stack = start_stack(tmp, args.workers)
        log(f"redis {stack.redis.url}, dev node {stack.devnode_url}, API {stack.api_url}, "
            f"{args.workers} workers, receivers " + ", ".join(f"{n} {r.url}" for n, r in stack.receivers.items()))
        make_images(tmp / "inputs")
        log(f"inputs ready: {make_speech(stack, tmp / 'inputs')}, a 256 px face, a plain image")
        interval = float(stack.env["WEBHOOK_INTERVAL_S"])
        retry_window = interval * (int(stack.env["WEBHOOK_ATTEMPTS"]) - 1)
        subs = Submissions()
        chaos = Chaos(stack, subs, rng, args.chaos_interval, webhook_down_max_s=min(8.0, retry_window - 4),
                      retry_window_s=retry_window, skip=args.skip)
        if chaos.unsupported:
            log(f"the dev node lacks the switches for: {', '.join(sorted(chaos.unsupported))} (skipped)")
        # submissions last long enough for the chaos to go through every kind once while jobs run
        spread = max(args.spread, len(chaos.kinds) * args.chaos_interval * 1.5)
        log(f"{len(chaos.kinds)} kinds of chaos, one every {args.chaos_interval:g} s on average; submissions "
            f"spread over at least {spread:.0f} s")
        chaos.thread.start()
        submit_all(stack, subs, args.jobs, args.backlog or 4 * args.workers, spread, rng, args.hostile_share,
                   deadline - 150)
        log(f"all {args.jobs} submitted ({len(subs.accepted)} accepted, {subs.retries} retried, "
            f"{subs.replayed} answered from the Idempotency-Key)")
        chaos.wait_first_round(min(60.0, deadline - 150 - time.monotonic()))
        log("chaos stops" + (f" before these kinds happened: {chaos.pending_kinds}" if chaos.pending_kinds else ""))
        chaos.finish()
        http("POST", stack.devnode_url + "/admin/reset", {})
        drain(stack, subs.accepted, deadline - 120)
        log("all jobs finished; waiting for the webhooks to healthy and flaky receivers")
        settle_webhooks(stack, subs, min(deadline - 100, time.monotonic() + retry_window + 30))
        log("the hostile receivers answer 200 now; waiting for the outbox to empty")
        fix_receivers(stack, min(deadline - 70, time.monotonic() + retry_window + 20))
        log(f"outbox empty: {webhooks_pending(stack) == 0}; asking again for the webhooks that never arrived")
        redelivery = redeliver(stack, subs, min(deadline - 40, time.monotonic() + retry_window + 20))
        log(f"redelivery: {redelivery.route}; {len(redelivery.asked_at)} webhook(s) sent again")
        log("stopping the workers (SIGTERM; each stops its node)")
        for child in stack.workers.values():
            child.killed_by_us = True
            child.send(signal.SIGTERM)
        for child in stack.workers.values():
            child.stop(30)
        time.sleep(1.0)
        nodes = devnode_nodes(stack.devnode_url)
        report = count(stack, subs, nodes, chaos, redelivery)
        wall = time.monotonic() - started_at
        print()
        print(table(report))
        print()
        print(chaos_table(chaos))
        print()
        print_details(report, chaos, subs, redelivery, wall, command)
        wrong = verdict(report, chaos, stack.api, stack.devnode)
        if wrong:
            print("\nFAILED:")
            for line in wrong:
                print(f"- {line}")
            return 1
        print("\nPASSED: nothing lost, every webhook arrived, none starved, no node left running")
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
        if stack is not None:
            for receiver in stack.receivers.values():
                receiver.fixed.set()  # hanging handlers let go, so the processes can stop
        stop_all_started()
        if stack is not None:
            for receiver in stack.receivers.values():
                receiver.close()
            stack.files.shutdown()
        if args.keep or not passed:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
