"""The submit baseline: a bare Flask app that parses the JSON body and does one LPUSH.

bench/submit_throughput.py serves it with the same gunicorn settings and Redis as the real API, so the
ratio of the two measures what c3-render's validation, job record and queue protocol cost.

    gunicorn 'bare_app:app'   (with REDIS_URL set; run from bench/)
"""

from __future__ import annotations

import json
import os
import uuid

import redis
from flask import Flask, Response, jsonify, request

app = Flask(__name__)
store = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), decode_responses=True)


@app.post("/csm")
def submit() -> Response:
    body = json.loads(request.get_data())
    job_id = str(uuid.uuid4())
    store.lpush("bare:queue", json.dumps({"id": job_id, "type": "csm", "params": body}))
    return jsonify({"id": job_id, "status": "queued"})


@app.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})
