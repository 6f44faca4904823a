"""How many GET /events streams one API process holds, and what they cost.

Starts a redis-server and ONE gunicorn worker process (gthread, --threads T, SSE_MAX_STREAMS=S) on
loopback, queues S jobs, opens one event stream per job (asyncio sockets on the client side), then:
- changes every job at once (set_progress, as workers do) and measures how long each event takes to
  arrive (p50 / p99 / max),
- times /healthz while every stream is open (ordinary requests still get a thread),
- counts the Redis commands the API process sends over an idle stretch (keepalive reads only: no
  per-client polling), and the worker process's resident memory,
- checks that stream S+1 is refused with 503.

    python bench/sse_streams.py --streams 48 --threads 64
    python bench/sse_streams.py --streams 400 --threads 440
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from harness import free_port  # noqa: E402

import config  # noqa: E402
import jobstore  # noqa: E402


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


async def open_stream(port: int, job_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /events/{job_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(status.decode().strip() + " " + (await reader.read(2000)).decode(errors="replace"))
    return reader, writer


async def next_data(reader: asyncio.StreamReader) -> dict:
    while True:
        line = await reader.readline()
        if not line:
            raise RuntimeError("stream closed")
        text = line.decode().strip()
        if text.startswith("data: "):
            return json.loads(text[6:])


async def bench(args: argparse.Namespace, port: int, r: redis.Redis, api_pid: int) -> dict:
    ids = [jobstore.submit(r, "csm", {"text": "x", "max_time": 600, "complete_in": 3600})[0]
           for _ in range(args.streams)]
    for job_id in ids:  # running, so a progress change is an event
        jobstore.transition(r, config.Settings(), job_id, "running", {"worker": "bench"})
    rss_before = rss_mb(api_pid)
    started = time.perf_counter()
    streams = await asyncio.gather(*(open_stream(port, job_id) for job_id in ids))
    await asyncio.gather(*(next_data(reader) for reader, _ in streams))  # the opening event
    opened_s = time.perf_counter() - started

    refused = await asyncio.to_thread(lambda: _status(f"http://127.0.0.1:{port}/events/{ids[0]}"))
    health = []
    for _ in range(20):
        t0 = time.perf_counter()
        await asyncio.to_thread(lambda: _status(f"http://127.0.0.1:{port}/healthz"))
        health.append((time.perf_counter() - t0) * 1000)

    r.config_resetstat()
    await asyncio.sleep(args.idle)
    idle_calls = sum(v["calls"] for k, v in r.info("commandstats").items() if k.startswith("cmdstat_"))

    latencies = []

    async def receive(reader: asyncio.StreamReader, sent: float) -> None:
        await next_data(reader)
        latencies.append((time.perf_counter() - sent) * 1000)

    sent = time.perf_counter()
    waiting = [asyncio.create_task(receive(reader, sent)) for reader, _ in streams]
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hset(jobstore.job_key(job_id), "progress", "50")
        pipe.hincrby(jobstore.job_key(job_id), "events", 1)
        pipe.publish(config.JOB_EVENTS_CHANNEL.format(id=job_id), "bench")
    pipe.execute()
    await asyncio.wait_for(asyncio.gather(*waiting), 60)
    rss_open = rss_mb(api_pid)
    for _, writer in streams:
        writer.close()
    latencies.sort()
    return {
        "streams": args.streams, "threads": args.threads,
        "open_all_s": round(opened_s, 2),
        "event_ms_p50": round(statistics.median(latencies), 1),
        "event_ms_p99": round(latencies[int(len(latencies) * 0.99) - 1], 1),
        "event_ms_max": round(latencies[-1], 1),
        "healthz_ms_p50_while_open": round(statistics.median(health), 1),
        "stream_over_cap_status": refused,
        f"redis_commands_in_{args.idle:g}s_idle": idle_calls,
        "api_rss_mb_before": round(rss_before, 1), "api_rss_mb_streams_open": round(rss_open, 1),
    }


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=48)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle streams to count Redis calls")
    parser.add_argument("--keepalive", type=float, default=15.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sse-bench-"))
    redis_port, api_port = free_port(), free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                   "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C3_", "REDIS_"))}
    env.update(REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", SSE_MAX_STREAMS=str(args.streams),
               SSE_KEEPALIVE_S=str(args.keepalive), OUTPUT_DIR=str(tmp / "out"))
    api_log = open(tmp / "api.log", "wb")  # noqa: SIM115 - the child keeps it
    api = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{api_port}", "--workers", "1",
                            "--worker-class", "gthread", "--threads", str(args.threads),
                            "--worker-connections", str(args.threads + 100), "app:create_app()"],
                           cwd=str(ROOT), env=env, stdout=api_log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{api_port}/healthz")
        r = redis.Redis(port=redis_port, decode_responses=True)
        figures = asyncio.run(bench(args, api_port, r, worker_pid(api.pid)))
        for name, value in figures.items():
            print(f"{name:34} {value}")
    except Exception:
        print((tmp / "api.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        api.terminate()
        try:
            api.wait(30)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait(10)
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
