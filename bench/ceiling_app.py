"""c3-render's API with parts of its submit taken away, to measure how close to the bare app it could get.

bench/submit_throughput.py --ceilings serves this next to the real API, under the same gunicorn settings
and Redis, so the ratios answer "if we dropped X from the submit, would it reach 0.9x the bare app?".
CEILING (environment) names what is taken away, comma-separated:

- `script`: jobstore.submit's one EVALSHA (job record, queue entry, idempotency, the GET /jobs indexes,
  history and counter) becomes one LPUSH of the job as JSON, as in bare_app.py. No job record is
  written, so /status cannot find the job: this is a measurement, not a service.
- `checks`: json_body()'s Content-Type and shape checks become a plain json.loads (jobspec.validate
  still runs: its output is what gets queued).
- `key`: the API-key hook (before every request) is not installed.

    gunicorn 'ceiling_app:create()'   (from the project directory, PYTHONPATH=bench, CEILING=script,checks)

Measuring only: the replacements are made on this process's modules and nothing else imports this file.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import redis
from flask import Flask, request

import app as c3_app
import config
import jobstore


def submit_with_one_lpush(r: redis.Redis, job_type: str, params: dict[str, Any], now: float | None = None,
                          **_idempotency: Any) -> tuple[str, bool]:
    job_id = str(uuid.uuid4())
    r.lpush(config.QUEUE_KEY, json.dumps({"id": job_id, "type": job_type, "params": params,
                                          "created_at": time.time() if now is None else now}))
    return job_id, True


def plain_json_body() -> Any:
    return json.loads(request.get_data())


def create() -> Flask:
    removed = {part.strip() for part in os.environ.get("CEILING", "").split(",") if part.strip()}
    unknown = removed - {"script", "checks", "key"}
    if unknown:
        raise SystemExit(f"CEILING: unknown part(s) {', '.join(sorted(unknown))} (script, checks, key)")
    if "script" in removed:
        jobstore.submit = submit_with_one_lpush
    if "checks" in removed:
        c3_app.json_body = plain_json_body
    if "key" in removed:
        c3_app.check_api_key = lambda: None
    return c3_app.create_app()
