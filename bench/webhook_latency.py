"""Webhook latency under hostile receivers: how late a healthy receiver's webhook arrives.

Starts a real redis-server and N real worker processes (`c3_render_worker.py` of --tree, so the same
benchmark runs against an older checkout), --hosts hostile receiver hosts on loopback (4 by default,
127.0.0.2 onwards; in turn they drip one header byte every 0.5 s, drip, hang, answer 500 after 8 s:
--kinds; each holds a request for up to --hold seconds) and one healthy receiver (127.0.0.1, answers 200 at
once). It finishes --hostile jobs whose notify_url is a hostile receiver (half at the start, half
spread over the run) and --healthy jobs for the healthy receiver, one every --every seconds, the way a
worker finishes a job (jobstore.transition queues the final webhook), and measures, per healthy job,
the time from its finish to its webhook's arrival. Workers use the default webhook settings (5
attempts 5 s apart, 10 s per attempt). No Comput3 call is made: the queue stays empty.

    python bench/webhook_latency.py [--tree PATH] [--workers 2] [--hostile 100] [--healthy 60]

Prints the latency percentiles; a healthy webhook that never arrived within --wait seconds of the
last finish counts as missing (and makes p99 "missing"). Exit status 1 when the p99 is over --target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from harness import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def start_receiver(host: str, mode: str, hold_s: float, arrivals: dict[str, float]) -> tuple[ThreadingHTTPServer, str]:
    """A receiver: "ok" records each job id's first arrival; the others hold the request."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                if mode == "ok":
                    arrivals.setdefault(json.loads(body)["id"], time.time())
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif mode == "drip":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    end = time.time() + hold_s
                    while time.time() < end:
                        self.wfile.write(b"X")
                        self.wfile.flush()
                        time.sleep(0.5)
                elif mode == "hang":
                    time.sleep(hold_s)
                else:  # slow500
                    time.sleep(min(8.0, hold_s))
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
            except OSError:
                pass  # the sender gave up

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/hook"


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(ROOT), help="checkout whose worker and jobstore to run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hostile", type=int, default=100)
    parser.add_argument("--healthy", type=int, default=60)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between healthy job finishes")
    parser.add_argument("--hold", type=float, default=120.0, help="how long a hostile receiver holds a request")
    parser.add_argument("--wait", type=float, default=30.0, help="how long to wait for the last healthy webhook")
    parser.add_argument("--target", type=float, default=2.0, help="p99 target in seconds")
    parser.add_argument("--kinds", default="drip,drip,hang,slow500",
                        help="what the hostile hosts do, in turn: drip, hang or slow500")
    parser.add_argument("--hosts", type=int, default=4, help="hostile receiver hosts (127.0.0.2 onwards)")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="WEBHOOK_CONCURRENCY for the workers (default: the tree's default)")
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))
    import redis

    import config  # the tree's own modules: the webhook queued exactly as that version queues it
    import jobspec
    import jobstore

    tmp = Path(tempfile.mkdtemp(prefix="webhook-bench-"))
    procs: list[subprocess.Popen] = []
    servers: list[ThreadingHTTPServer] = []
    try:
        port = free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        redis_url = f"redis://127.0.0.1:{port}/0"
        r = redis.Redis.from_url(redis_url, decode_responses=True)

        wait_until(r.ping, 10, "redis-server")
        arrivals: dict[str, float] = {}
        healthy_server, healthy_url = start_receiver("127.0.0.1", "ok", 0, arrivals)
        servers.append(healthy_server)
        hostile_urls = []
        kinds = args.kinds.split(",")
        if not set(kinds) <= {"drip", "hang", "slow500"} or not 1 <= args.hosts <= 250:
            raise SystemExit("--kinds: drip, hang or slow500, comma-separated; --hosts: 1 to 250")
        for n in range(args.hosts):
            host, mode = f"127.0.0.{n + 2}", kinds[n % len(kinds)]
            server, url = start_receiver(host, mode, args.hold, {})
            servers.append(server)
            hostile_urls.append(url)

        env = {k: v for k, v in os.environ.items() if not k.startswith(("C3_", "MINIO_", "REDIS_", "WEBHOOK_"))}
        env.update(REDIS_URL=redis_url, C3_API_KEY="bench", C3_API_URL="http://127.0.0.1:9/api/v0",
                   URL_ALLOWLIST="127.0.0.0/8", OUTPUT_DIR=str(tmp / "output"), WORK_DIR=str(tmp / "work"),
                   FILE_URL_SECRET="bench", PYTHONUNBUFFERED="1", LOG_LEVEL="WARNING")
        if args.concurrency:
            env["WEBHOOK_CONCURRENCY"] = str(args.concurrency)
        for n in range(args.workers):
            log = open(tmp / f"worker-{n}.log", "wb")  # noqa: SIM115 - the child keeps it
            procs.append(subprocess.Popen([sys.executable, "c3_render_worker.py"], cwd=str(tree),
                                          env=dict(env, WORKER_ID=f"bench-{n}"), stdout=log,
                                          stderr=subprocess.STDOUT))
        wait_until(lambda: r.scard(config.WORKERS_KEY) >= args.workers, 30, "the workers to start")

        settings = config.Settings()

        def finish(url: str) -> tuple[str, float]:
            params = jobspec.validate("whisper", {"audio_url": "https://example.com/a.mp3", "notify_url": url})
            job_id, _ = jobstore.submit(r, "whisper", params)
            jobstore.transition(r, settings, job_id, "running", {"worker": "bench"})
            finished_at = time.time()
            jobstore.transition(r, settings, job_id, "success", {"text": "done"})
            return job_id, finished_at

        first_half = args.hostile // 2
        for i in range(first_half):
            finish(hostile_urls[i % len(hostile_urls)])
        healthy: dict[str, float] = {}
        spread = args.hostile - first_half
        for i in range(args.healthy):
            job_id, finished_at = finish(healthy_url)
            healthy[job_id] = finished_at
            if spread and i % max(1, args.healthy // spread) == 0:
                finish(hostile_urls[(first_half + i) % len(hostile_urls)])
                spread -= 1
            time.sleep(args.every)
        while spread:
            finish(hostile_urls[spread % len(hostile_urls)])
            spread -= 1
        deadline = time.time() + args.wait
        while time.time() < deadline and len([j for j in healthy if j in arrivals]) < len(healthy):
            time.sleep(0.2)

        latencies = [arrivals[j] - t for j, t in healthy.items() if j in arrivals]
        missing = len(healthy) - len(latencies)
        commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        print(f"tree {tree} ({commit or 'unknown commit'}), {args.workers} workers, {args.hostile} hostile jobs "
              f"({', '.join(kinds)} on {args.hosts} hosts), {args.healthy} healthy jobs every {args.every} s"
              + (f", WEBHOOK_CONCURRENCY={args.concurrency}" if args.concurrency else ""))
        print(f"| healthy delivered | missing (> {args.wait:.0f} s) | p50 s | p90 s | p99 s | max s |")
        print("|---|---|---|---|---|---|")
        if latencies:
            p99 = "missing" if missing > len(healthy) * 0.01 else f"{percentile(latencies, 99):.2f}"
            print(f"| {len(latencies)} | {missing} | {percentile(latencies, 50):.2f} | "
                  f"{percentile(latencies, 90):.2f} | {p99} | {max(latencies):.2f} |")
        else:
            print(f"| 0 | {missing} | - | - | missing | - |")
        ok = latencies and missing <= len(healthy) * 0.01 and percentile(latencies, 99) <= args.target
        return 0 if ok else 1
    finally:
        for proc in procs[1:]:
            proc.send_signal(signal.SIGTERM)
        for proc in procs[1:]:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if procs:
            procs[0].terminate()
            procs[0].wait(10)
        for server in servers:
            server.shutdown()
            server.server_close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
