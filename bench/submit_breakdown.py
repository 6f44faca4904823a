"""Where the submit's CPU goes: c3-render's POST /csm against the bare app, one part at a time.

submit_throughput.py measures the two apps under gunicorn; this one calls each Flask app in-process
(a WSGI environ per request, no HTTP server, one thread), so that what gunicorn and the machine's other
work add is left out and the difference is the apps' own. It prints the CPU per request (this process)
and Redis' (INFO cpu) of the bare app, of c3-render, and of c3-render with one part replaced by what
the bare app does:

- "one LPUSH instead of the submit script": jobstore.submit writes the record, the queue entry and
  the indexes in one EVALSHA; replaced by one LPUSH of the job as JSON.
- "plain json.loads instead of the checks": json_body()'s Content-Type and shape checks and
  jobspec.validate, replaced by json.loads (and the validated fields, computed once, so that the job
  record stays the same).
- "no API-key hook": the before_request hook (no keys are configured here, as in the gunicorn run).
- "plain pool": a redis.ConnectionPool without timeouts instead of redis_conn.connect()'s
  BlockingConnectionPool with socket timeouts.

    python bench/submit_breakdown.py [--requests 1500] [--rounds 7]

Rounds alternate the variants; the medians are printed. Measuring only: the replacements are made
here, on this process's modules.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
from harness import ROOT, Procs, machine, redis_cpu_s, start_redis

BODY = b'{"text": "Hello there. General Kenobi."}'


def environ() -> dict:
    return {"REQUEST_METHOD": "POST", "PATH_INFO": "/csm", "SCRIPT_NAME": "", "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(BODY)), "HTTP_HOST": "127.0.0.1:8000",
            "REMOTE_ADDR": "127.0.0.1", "wsgi.input": io.BytesIO(BODY), "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
            "wsgi.version": (1, 0)}


def start_response(status: str, headers: list, exc_info: object = None) -> None:
    if not status.startswith("200"):
        raise SystemExit(f"submit answered {status}")


def cpu_per_request(wsgi, count: int, r: redis.Redis) -> tuple[float, float]:
    """(API, Redis) CPU µs per request of `count` submits."""
    redis0, api0 = redis_cpu_s(r), time.process_time()
    for _ in range(count):
        body = wsgi(environ(), start_response)
        b"".join(body)
        getattr(body, "close", lambda: None)()
    return (time.process_time() - api0) / count * 1e6, (redis_cpu_s(r) - redis0) / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    procs = Procs()
    try:
        with tempfile.TemporaryDirectory(prefix="c3-breakdown-") as tmp_name:
            redis_url = start_redis(procs, Path(tmp_name))
            for name in [n for n in os.environ if n.startswith(("C3_", "MINIO_", "REDIS_"))]:
                del os.environ[name]  # the settings of the gunicorn run (harness.start_gunicorn): no API keys
            os.environ.update({"REDIS_URL": redis_url, "OUTPUT_DIR": str(Path(tmp_name) / "output")})
            sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
            # imported once REDIS_URL is set and the project is on the path (bare_app connects at import)
            import bare_app  # noqa: PLC0415

            import app as api  # noqa: PLC0415
            import jobspec  # noqa: PLC0415
            import jobstore  # noqa: PLC0415

            real = {"submit": jobstore.submit, "json_body": api.json_body, "validate": jobspec.validate}
            validated = jobspec.validate("csm", json.loads(BODY))  # the same job record either way

            def lpush_submit(r: redis.Redis, job_type: str, params: dict, **_: object) -> tuple[str, bool]:
                job_id = str(uuid.uuid4())
                r.lpush("bare:queue", json.dumps({"id": job_id, "type": job_type, "params": params}))
                return job_id, True

            def variant(*, script: bool = True, checks: bool = True, hook: bool = True, pool: bool = True):
                app = api.create_app()
                if not hook:
                    app.before_request_funcs = {}
                if not pool:
                    app.extensions["c3_redis"] = redis.Redis.from_url(redis_url, decode_responses=True)

                def wsgi(env: dict, start: object) -> object:
                    jobstore.submit = real["submit"] if script else lpush_submit
                    api.json_body = real["json_body"] if checks else lambda: json.loads(api.request.get_data())
                    jobspec.validate = real["validate"] if checks else lambda _type, _body: dict(validated)
                    return app(env, start)
                return wsgi

            apps = {
                "bare Flask + LPUSH": bare_app.app,
                "c3-render": variant(),
                "  one LPUSH instead of the submit script": variant(script=False),
                "  plain json.loads instead of the checks": variant(checks=False),
                "  no API-key hook": variant(hook=False),
                "  plain pool": variant(pool=False),
                "  all four": variant(script=False, checks=False, hook=False, pool=False),
            }
            r = redis.Redis.from_url(redis_url)
            figures: dict[str, list[tuple[float, float]]] = {name: [] for name in apps}
            for wsgi in apps.values():  # warm-up
                cpu_per_request(wsgi, 200, r)
            for _ in range(args.rounds):
                r.flushall()
                for name, wsgi in apps.items():
                    figures[name].append(cpu_per_request(wsgi, args.requests, r))
    finally:
        procs.stop_all()
    print(f"machine: {machine()}")
    print(f"{'CPU µs per request (median of rounds)':<44} {'API':>6} {'Redis':>6} {'total':>6}  vs c3-render")
    ours = sum(statistics.median(f[i] for f in figures["c3-render"]) for i in (0, 1))
    for name, values in figures.items():
        api_us = statistics.median(v[0] for v in values)
        redis_us = statistics.median(v[1] for v in values)
        print(f"{name:<44} {api_us:6.1f} {redis_us:6.1f} {api_us + redis_us:6.1f}  {api_us + redis_us - ours:+6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
