"""Seconds from SIGTERM to exit for a worker whose Redis is gone (docker compose and systemd SIGKILL it
after their grace period: the worker's `stop_grace_period` is 40 s).

Starts a real redis-server (AOF) and the dev node, then for each scenario a worker process of --tree
(`c3_render_worker.py`); takes Redis away, sends the worker SIGTERM and times its exit. Redis is taken
away two ways: `killed` (SIGKILL: connections are refused) and `frozen` (SIGSTOP: connections hang, as
with a network partition or a dead host). Scenarios: `idle` (waiting for jobs), `webhook` (one
delivery attempt hanging on a receiver that never answers, WEBHOOK_TIMEOUT_S=30) and `job` (a CSM job
hanging on the dev node's engine, WORKER_GRACE_S=10).

    python bench/sigterm_redis_gone.py [--tree PATH] [--limit 120]

`--tree` runs the worker of another checkout (e.g. the code before this change:
`git archive 0427b12 | tar -x -C /tmp/before`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from soak_common import ROOT, free_port, wait_until
from soak_stack import RedisProc, service_env, set_faults, start_devnode, stop_all_started

sys.path.insert(0, str(ROOT))

import jobspec  # noqa: E402
import jobstore  # noqa: E402

SCENARIOS = [("idle", "killed"), ("idle", "frozen"), ("webhook", "killed"), ("webhook", "frozen"),
             ("job", "killed"), ("job", "frozen")]


def silent_receiver() -> tuple[socket.socket, str]:
    """A webhook receiver that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}/hook"


def run_one(tree: Path, tmp: Path, devnode_url: str, scenario: str, how: str, limit_s: float) -> tuple[str, str]:
    """(exit seconds or 'still running', the worker's last warning line)."""
    server = RedisProc(free_port(), tmp / f"redis-{scenario}-{how}", tmp / f"redis-{scenario}-{how}.log")
    server.start()
    r = redis.Redis.from_url(server.url, decode_responses=True)
    env = service_env(tmp, server.url, devnode_url, 1)
    env.update(WORKER_ID=f"w-{scenario}-{how}", WEBHOOK_TIMEOUT_S="30", WORKER_GRACE_S="10",
               PYTHONUNBUFFERED="1")
    set_faults(devnode_url, {"engine_hang": ["csm"]} if scenario == "job" else {"engine_hang": []})
    log_path = tmp / f"worker-{scenario}-{how}.log"
    receiver = None
    with open(log_path, "wb") as out:
        worker = subprocess.Popen([sys.executable, "c3_render_worker.py"], cwd=str(tree), env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: r.exists(f"worker:{env['WORKER_ID']}:alive"), 60, "the worker's heartbeat")
        if scenario == "webhook":
            receiver, url = silent_receiver()
            r.lpush("webhooks:outbox", json.dumps({"job_id": "bench-job", "url": url, "body": "{}", "attempt": 0}))
            wait_until(lambda: r.llen(f"webhooks:inflight:{env['WORKER_ID']}") == 1, 30, "the attempt")
        elif scenario == "job":
            jobstore.submit(r, "csm", jobspec.validate("csm", {"text": "Never ends."}))
            wait_until(lambda: r.hget(f"node:{env['WORKER_ID']}:media:fast", "state") == "running", 60,
                       "the worker's node")
        time.sleep(1.5)
        assert server.child is not None and server.child.proc is not None
        if how == "killed":
            server.kill()
        else:
            server.child.proc.send_signal(signal.SIGSTOP)
        time.sleep(1.0)
        asked = time.time()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(limit_s)
            took = f"{time.time() - asked:.1f} s"
        except subprocess.TimeoutExpired:
            took = f"still running after {limit_s:g} s"
        warnings = [line for line in log_path.read_text(errors="replace").splitlines()  # not the retry lines
                    if "WARNING" in line and "Redis unavailable" not in line]
        return took, (warnings[-1].split(": ", 1)[-1] if warnings else "")[:150]
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
        if server.child is not None and server.child.proc is not None and server.child.proc.poll() is None:
            server.child.proc.send_signal(signal.SIGCONT)
            server.kill()
        if receiver is not None:
            receiver.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(ROOT), help="checkout whose c3_render_worker.py to run")
    parser.add_argument("--limit", type=float, default=120.0, help="give up waiting for an exit after this")
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="sigterm-bench-"))
    try:
        _child, devnode_url = start_devnode(tmp)
        commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        print(f"tree {tree} ({commit or 'unknown commit'}); WORKER_GRACE_S=10, WEBHOOK_TIMEOUT_S=30")
        print("| scenario | Redis | SIGTERM to exit | last warning of the worker |")
        print("|---|---|---|---|")
        for scenario, how in SCENARIOS:
            took, warning = run_one(tree, tmp, devnode_url, scenario, how, args.limit)
            print(f"| {scenario} | {how} | {took} | {warning} |", flush=True)
    finally:
        stop_all_started()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
