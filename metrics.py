"""GET /metrics: the service's numbers in Prometheus text format (prometheus_client).

Every number is read from Redis at scrape time (jobstats.py), so any API process of any replica answers
the same, however many gunicorn workers and render workers there are; no multiprocess directory needed.
With METRICS_TOKEN set, a scrape must send `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Any

import redis
from flask import Blueprint, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

import api_common
import jobspec
import jobstats

metrics_routes = Blueprint("metrics", __name__)


class RedisCollector:
    """A prometheus_client collector whose every sample comes from Redis."""

    def __init__(self, r: redis.Redis):
        self.r = r

    def collect(self) -> Iterator[Metric]:
        stats = jobstats.counters(self.r)
        nodes = jobstats.pool(self.r)
        workers = jobstats.workers(self.r, nodes)
        yield GaugeMetricFamily("c3_render_queue_depth", "Jobs waiting in the queue.", value=stats["queue_depth"])
        yield GaugeMetricFamily("c3_render_jobs_running", "Jobs running now.", value=stats["running"])
        jobs = CounterMetricFamily("c3_render_jobs", "Jobs submitted (status queued) and finished, by final "
                                   "status.", labels=["type", "status"])
        for job_type in jobspec.JOB_TYPES:
            for status in ("queued", *jobspec.FINISHED_STATUSES):
                jobs.add_metric([job_type, status], stats["jobs_total"].get((job_type, status), 0))
        yield jobs
        durations = HistogramMetricFamily("c3_render_job_duration_seconds", "Run time of finished jobs, "
                                          "from start to finish.", labels=["type"])
        for job_type in jobspec.JOB_TYPES:
            duration = stats["durations"].get(job_type, {})
            durations.add_metric([job_type], jobstats.histogram_buckets(duration),
                                 sum_value=duration.get("sum", 0.0))
        yield durations
        yield GaugeMetricFamily("c3_render_nodes_running", "GPU nodes launched and not stopped (booting or "
                                "running).", value=jobstats.nodes_running(nodes))
        yield CounterMetricFamily("c3_render_node_seconds", "Node-seconds of stopped nodes, launch to stop.",
                                  value=stats["node_seconds_total"])
        node_time = CounterMetricFamily("c3_render_node_time_seconds", "Node-seconds by what the nodes did: "
                                        "booting, busy (running jobs), idle; unattributed: idle time of nodes "
                                        "that ran no job.", labels=["kind"])
        for kind, seconds in jobstats.node_time(self.r).items():
            node_time.add_metric([kind], seconds)
        yield node_time
        yield GaugeMetricFamily("c3_render_workers_alive", "Workers with a live heartbeat.",
                                value=sum(1 for w in workers if w["alive"]))
        hooks = CounterMetricFamily("c3_render_webhook_deliveries", "Webhook delivery attempts by outcome.",
                                    labels=["outcome"])
        for outcome in sorted({"delivered", "retrying", "failed"} | set(stats["webhook_deliveries"])):
            hooks.add_metric([outcome], stats["webhook_deliveries"].get(outcome, 0))
        yield hooks
        yield from redis_metrics(jobstats.redis_replication(self.r))


def redis_metrics(replication: dict[str, Any]) -> Iterator[Metric]:
    """The Redis role and its replicas' lag (replicas are numbered as Redis lists them, not named)."""
    yield GaugeMetricFamily("c3_render_redis_primary", "1 when the Redis this API talks to is a primary.",
                            value=1 if replication["role"] == "primary" else 0)
    yield GaugeMetricFamily("c3_render_redis_replicas", "Replicas connected to the primary.",
                            value=len(replication["replicas"]))
    lag_s = GaugeMetricFamily("c3_render_redis_replica_lag_seconds", "Seconds since each replica last "
                              "acknowledged the primary's writes.", labels=["replica"])
    lag_bytes = GaugeMetricFamily("c3_render_redis_replica_lag_bytes", "Bytes of the primary's writes each "
                                  "replica has not acknowledged.", labels=["replica"])
    for index, replica in enumerate(replication["replicas"]):
        lag_s.add_metric([str(index)], replica["lag_s"])
        lag_bytes.add_metric([str(index)], replica["behind_bytes"])
    yield lag_s
    yield lag_bytes


@metrics_routes.get("/metrics")
def metrics() -> Response:
    token = api_common.settings().metrics_token
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return api_common.error_response(401, "missing or invalid metrics token: send Authorization: "
                                                  "Bearer <METRICS_TOKEN>", {"WWW-Authenticate": "Bearer"})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(api_common.store()))
    return Response(generate_latest(registry), mimetype=None, content_type=CONTENT_TYPE_LATEST)
