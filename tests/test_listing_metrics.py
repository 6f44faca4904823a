"""GET /jobs (cursor pages over the Redis indexes), GET /jobs/<id>, GET /overview and GET /metrics,
on the Flask app with a real redis-server; job changes are made through jobstore as a worker makes them."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

import app as api
import config
import jobspec
import jobstore
import nodestore
import webhook_state


@pytest.fixture
def client(settings):
    return api.create_app(settings).test_client()


def submit(client, route="/csm", body=None) -> str:
    answer = client.post(route, json=body or {"text": "Hello there."})
    assert answer.status_code == 200, answer.json
    return answer.json["id"]


def run(r, settings, job_id, outcome="success", fields=None, now=None):
    """Run a job to its end as a worker does: off the queue, running, finished."""
    entry = jobstore.get_job(r, job_id)["queue_entry"]
    r.lrem(config.QUEUE_KEY, 1, entry)
    r.lpush(jobstore.processing_key("w1"), entry)
    attempt, _status = jobstore.claim(r, settings, "w1", entry, now=now)
    assert attempt
    assert jobstore.transition(r, settings, job_id, outcome, fields or {"result_url": "http://x/y.mp3"},
                               worker_id="w1", attempt=attempt, now=None if now is None else now + 42)[0]


def all_pages(client, query="", limit=3):
    seen, cursor = [], None
    while True:
        url = f"/jobs?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url)
        assert page.status_code == 200, page.json
        seen += page.json["jobs"]
        cursor = page.json["next_cursor"]
        if not cursor:
            return seen


def test_jobs_come_newest_first_in_stable_pages(client):
    ids = [submit(client) for _ in range(7)]
    first = client.get("/jobs?limit=3").json
    assert [j["id"] for j in first["jobs"]] == ids[::-1][:3]
    assert first["jobs"][0]["status"] == "queued" and first["jobs"][0]["queue_position"] == 7
    newer = [submit(client) for _ in range(2)]  # inserts between pages do not shift later pages
    second = client.get(f"/jobs?limit=3&cursor={first['next_cursor']}").json
    assert [j["id"] for j in second["jobs"]] == ids[::-1][3:6]
    assert [j["id"] for j in all_pages(client)] == (ids + newer)[::-1]


def test_filters_by_status_and_type(client, r, settings):
    csm = [submit(client) for _ in range(4)]
    analyze = [submit(client, "/analyze", {"image_url": "http://127.0.0.1/a.png"}) for _ in range(3)]
    run(r, settings, csm[0])
    run(r, settings, analyze[1], "failed", {"error": "no face"})
    jobstore.cancel(r, settings, csm[2])
    assert [j["id"] for j in all_pages(client, "&type=analyze", 2)] == analyze[::-1]
    assert [j["id"] for j in all_pages(client, "&status=success")] == [csm[0]]
    failed = all_pages(client, "&status=failed")
    assert [j["id"] for j in failed] == [analyze[1]] and failed[0]["error"] == "no face"
    assert [j["id"] for j in all_pages(client, "&status=cancelled")] == [csm[2]]
    assert [j["id"] for j in all_pages(client, "&status=queued&type=csm", 1)] == [csm[3], csm[1]]
    assert [j["id"] for j in all_pages(client, "&status=queued&type=analyze")] == [analyze[2], analyze[0]]


def test_a_page_reads_limit_records_not_all(client, r, settings):
    """O(limit): with 3,000 jobs in the index, one page of 10 reads a few dozen records at most."""
    now = time.time()
    ids = [jobstore.submit(r, "csm", {"text": "x", "max_time": 60, "complete_in": 600}, now=now - 3000 + n)[0]
           for n in range(3000)]
    r.config_resetstat()
    page = client.get("/jobs?limit=10").json
    assert [j["id"] for j in page["jobs"]][0] == ids[-1]
    reads = int(r.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))
    assert 10 <= reads <= 40, reads


def test_a_page_of_queued_jobs_gets_exact_positions_in_one_round_trip(client, r, settings, monkeypatch):
    ids = [submit(client) for _ in range(12)]
    jobstore.cancel(r, settings, ids[3])  # its entry stays in the list as a tombstone
    expected = [i for i in ids if i != ids[3]]
    sends = []  # what the API sends to Redis, one entry per round trip (a pipeline is one send)
    real_send = redis.connection.AbstractConnection.send_packed_command
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command",
                        lambda conn, command, *a, **k: sends.append(1) or real_send(conn, command, *a, **k))
    r.script_flush()  # as after a Redis restart: the page must load the position script again
    page = client.get("/jobs?status=queued&limit=20").json["jobs"]
    assert [(j["id"], j["queue_position"]) for j in page] == [
        (job_id, n) for n, job_id in reversed(list(enumerate(expected, start=1)))]
    sends.clear()
    again = client.get("/jobs?status=queued&limit=20").json["jobs"]
    assert again == page
    assert len(sends) <= 4, len(sends)  # index and records as before, the positions: not one per job


def test_expired_records_leave_the_index(client, r, settings):
    ids = [submit(client) for _ in range(5)]
    r.delete(f"job:{ids[1]}", f"job:{ids[3]}")  # as if their retention ran out
    assert [j["id"] for j in all_pages(client, limit=2)] == [ids[4], ids[2], ids[0]]
    assert r.zscore(config.JOBS_INDEX_KEY, ids[1]) is None


def test_finishing_trims_index_entries_past_retention(r, settings):
    settings = dataclasses.replace(settings, result_ttl_s=60)
    ancient = time.time() - 60 - jobspec.INDEX_HORIZON_S - 10
    old, _ = jobstore.submit(r, "csm", {"text": "x", "max_time": 60, "complete_in": 600}, now=ancient)
    job_id, _ = jobstore.submit(r, "csm", {"text": "x", "max_time": 60, "complete_in": 600})
    run(r, settings, job_id)
    assert r.zscore(config.JOBS_INDEX_KEY, old) is None
    assert r.zscore(config.JOBS_INDEX_KEY, job_id) is not None
    assert 0 < r.ttl(config.JOB_HISTORY_KEY.format(id=job_id)) <= 60


@pytest.mark.parametrize("query, message", [
    ("limit=0", "limit"), ("limit=201", "limit"), ("limit=x", "limit"), ("status=done", "status"),
    ("type=video", "type"), ("cursor=abc", "cursor"), ("cursor=1e999_x", "cursor"),
])
def test_bad_list_queries_are_400(client, query, message):
    answer = client.get(f"/jobs?{query}")
    assert answer.status_code == 400 and message in answer.json["error"]


def test_job_detail_has_history_and_result(client, r, settings):
    job_id = submit(client)
    jobstore.transition(r, settings, job_id, "running", {"worker": "w1"})
    jobstore.set_progress(r, job_id, 30)
    jobstore.put_back(r, "w1", job_id, jobstore.queue_entry(job_id, "csm"), 1)  # worker shut down: requeued
    run(r, settings, job_id)
    detail = client.get(f"/jobs/{job_id}").json
    assert [h["status"] for h in detail["history"]] == ["queued", "running", "queued", "running", "success"]
    assert detail["result"] == {"result_url": "http://x/y.mp3"}
    assert client.get("/jobs/not-a-uuid").status_code == 400


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_count_from_redis_the_same_in_every_process(settings, r):
    first, second = api.create_app(settings).test_client(), api.create_app(settings).test_client()
    now = time.time()
    ids = [submit(first) for _ in range(3)] + [submit(second, "/analyze", {"image_url": "http://127.0.0.1/a.png"})]
    run(r, settings, ids[0], now=now)  # 42 s
    run(r, settings, ids[3], "failed", {"error": "boom"}, now=now)
    jobstore.cancel(r, settings, ids[1])
    for attempt, outcome in ((1, "retrying"), (2, "delivered")):  # as a delivery thread settles attempts
        raw = json.dumps({"job_id": ids[0], "url": "https://example.com/hook", "body": "{}", "attempt": attempt})
        r.lpush(webhook_state.webhook_inflight_key("w1"), raw)
        assert webhook_state.settle_webhook(r, "w1", raw, ids[0], outcome, attempt, "HTTP 500" if attempt == 1 else "")
    r.incrbyfloat(config.NODE_SECONDS_KEY, 125.5)
    assert nodestore.reserve_node(r, "n1", "media:fast", "w1", 4, now - 10)
    nodestore.mark_booting(r, "n1", {"state": "booting", "node": "n-1", "workload": "wl-1"})
    nodestore.mark_ready(r, "n1", now - 5)  # 5 s booting, then 5 s idle so far: counted at the next change
    assert nodestore.lease_slot(r, "n1", "media:fast", "job-x", "w1", "csm", 1, 4, now) == "ok"
    texts = [c.get("/metrics") for c in (first, second)]
    assert texts[0].status_code == 200 and texts[0].content_type.startswith("text/plain")
    samples = metric_samples(texts[0].data.decode())
    assert samples == metric_samples(texts[1].data.decode())
    assert samples[("c3_render_queue_depth", ())] == 1
    assert samples[("c3_render_jobs_total", (("status", "queued"), ("type", "csm")))] == 3
    assert samples[("c3_render_jobs_total", (("status", "success"), ("type", "csm")))] == 1
    assert samples[("c3_render_jobs_total", (("status", "cancelled"), ("type", "csm")))] == 1
    assert samples[("c3_render_jobs_total", (("status", "failed"), ("type", "analyze")))] == 1
    assert samples[("c3_render_job_duration_seconds_bucket", (("le", "30.0"), ("type", "csm")))] == 0
    assert samples[("c3_render_job_duration_seconds_bucket", (("le", "60.0"), ("type", "csm")))] == 1
    assert samples[("c3_render_job_duration_seconds_bucket", (("le", "+Inf"), ("type", "csm")))] == 1
    assert samples[("c3_render_job_duration_seconds_count", (("type", "csm"),))] == 1
    assert samples[("c3_render_job_duration_seconds_sum", (("type", "csm"),))] == pytest.approx(42, abs=0.01)
    assert samples[("c3_render_nodes_running", ())] == 1
    assert samples[("c3_render_node_seconds_total", ())] == 125.5
    assert samples[("c3_render_node_time_seconds_total", (("kind", "booting"),))] == pytest.approx(5, abs=0.01)
    assert samples[("c3_render_node_time_seconds_total", (("kind", "idle"),))] == pytest.approx(5, abs=0.01)
    assert samples[("c3_render_node_time_seconds_total", (("kind", "busy"),))] == 0
    assert samples[("c3_render_webhook_deliveries_total", (("outcome", "delivered"),))] == 1
    assert samples[("c3_render_webhook_deliveries_total", (("outcome", "retrying"),))] == 1
    assert samples[("c3_render_webhook_deliveries_total", (("outcome", "failed"),))] == 0


def test_keys_guard_the_data_routes_not_docs_metrics_or_the_page(settings):
    keyed = api.create_app(dataclasses.replace(settings, api_keys=("k1",))).test_client()
    for path in ("/jobs", "/overview", "/events/00000000-0000-4000-8000-000000000001",
                 "/jobs/00000000-0000-4000-8000-000000000001"):
        assert keyed.get(path).status_code == 401, path
    assert keyed.get("/jobs", headers={"X-C3-RENDER-KEY": "k1"}).status_code == 200
    for path in ("/docs", "/docs/assets/swagger-ui-bundle.js", "/metrics", "/dashboard",
                 "/dashboard/assets/dashboard.js"):
        assert keyed.get(path).status_code == 200, path
    closed = api.create_app(dataclasses.replace(settings, api_keys=("k1",), public_routes=())).test_client()
    assert closed.get("/metrics").status_code == 401 and closed.get("/docs").status_code == 401
    assert closed.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_metrics_token(settings):
    guarded = api.create_app(dataclasses.replace(settings, metrics_token="scrape-me")).test_client()
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    answer = guarded.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert answer.status_code == 200 and b"c3_render_queue_depth" in answer.data
    assert b"scrape-me" not in answer.data


def test_overview_shows_workers_nodes_and_throughput(client, r, settings):
    ids = [submit(client) for _ in range(3)]
    run(r, settings, ids[0])
    jobstore.heartbeat(r, "worker-a", 30)
    r.lpush(jobstore.processing_key("worker-a"), jobstore.queue_entry(ids[1], "csm"))
    assert nodestore.reserve_node(r, "n7", "media:fast", "worker-a", 4, time.time() - 100, ids[1], "csm")
    nodestore.mark_booting(r, "n7", {"state": "ready", "node": "node-7", "workload": "wl-7"})
    r.incrbyfloat(config.NODE_SECONDS_DAY_KEY.format(day=time.strftime("%Y-%m-%d", time.gmtime())), 50)
    view = client.get("/overview").json
    assert view["queue_depth"] == 2 and view["finished_last_hour"] == 1 and view["nodes_running"] == 1
    assert 149 <= view["node_seconds_today"] <= 160
    # all time counts the live node too (stopped nodes' total is 0 here), so it is never below today's own
    assert 99 <= view["node_seconds_total"] <= 110
    [worker] = view["workers"]
    assert worker["id"] == "worker-a" and worker["alive"] and worker["heartbeat_age_s"] < 5
    assert worker["nodes"] == [{"id": "n7", "type": "media:fast", "state": "ready", "node": "node-7",
                                "workload": "wl-7", "launched_at": worker["nodes"][0]["launched_at"]}]
    assert worker["jobs"] == [ids[1]]
    [node] = view["nodes"]  # the pool, with the job on each node
    assert node["id"] == "n7" and node["jobs"] == [{"job": ids[1], "service": "csm", "worker": "worker-a",
                                                    "since": node["jobs"][0]["since"]}]
    assert view["finished_today"] == 1 and view["node_seconds_per_job_today"] == view["node_seconds_today"]


def test_docs_are_served_locally(client):
    page = client.get("/docs").data.decode()
    assert "swagger-ui-bundle.js" in page and "http" not in page  # no CDN: every asset from this server
    bundle = client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.data) > 100_000
    assert client.get("/docs/assets/../app.py").status_code == 404
    dashboard = client.get("/dashboard").data.decode()
    assert "http://" not in dashboard and "https://" not in dashboard


def test_events_are_published_on_every_change(r, settings):
    pubsub = redis.Redis.from_url(settings.redis_url, decode_responses=True).pubsub()
    job_id, _ = jobstore.submit(r, "csm", {"text": "x", "max_time": 60, "complete_in": 600})
    pubsub.subscribe(config.JOB_EVENTS_CHANNEL.format(id=job_id), config.QUEUE_EVENTS_CHANNEL)
    jobstore.transition(r, settings, job_id, "running", {"worker": "w1"})
    jobstore.set_progress(r, job_id, 10)
    jobstore.set_progress(r, job_id, 10)  # no change, no event
    jobstore.notify_changed(r, job_id)
    jobstore.transition(r, settings, job_id, "success", {"text": "ok"})
    messages = []
    deadline = time.time() + 5
    while time.time() < deadline and len(messages) < 5:
        message = pubsub.get_message(timeout=0.5)
        if message and message["type"] == "message":
            messages.append((message["channel"], message["data"]))
    assert messages == [(config.QUEUE_EVENTS_CHANNEL, job_id),
                        (config.JOB_EVENTS_CHANNEL.format(id=job_id), "1"),
                        (config.JOB_EVENTS_CHANNEL.format(id=job_id), "2"),
                        (config.JOB_EVENTS_CHANNEL.format(id=job_id), "3"),
                        (config.JOB_EVENTS_CHANNEL.format(id=job_id), "4")]
    assert json.loads(r.lrange(config.JOB_HISTORY_KEY.format(id=job_id), -1, -1)[0])["status"] == "success"


def test_queue_depth_leaves_out_cancelled_jobs_still_in_the_list(client, r, settings):
    ids = [submit(client) for _ in range(4)]
    assert client.post(f"/cancel/{ids[1]}").json["status"] == "cancelled"
    assert r.llen(config.QUEUE_KEY) == 4  # the cancelled entry stays until a worker drops it
    assert client.get("/overview").json["queue_depth"] == 3


def test_a_job_shows_what_it_cost(r, settings):
    """A job's share of its node's time (node_seconds, as the pool scripts write it) and, with
    C3_PRICE_PER_HOUR, its cost: on /status, /jobs/<id> and the CLI's line."""
    import c3_render_cli

    priced = api.create_app(dataclasses.replace(settings, price_per_hour="media:fast=1.80,0.5")).test_client()
    job_id = submit(priced)
    assert "node_seconds" not in priced.get(f"/status/{job_id}").json  # nothing ran yet
    assert nodestore.reserve_node(r, "n1", "media:fast", "w1", 4, 100.0, job_id, "csm")
    nodestore.release_lease(r, "n1", job_id, 200.0, 60.0)  # 100 node-seconds: its boot, and its run
    answer = priced.get(f"/status/{job_id}").json
    assert answer["node_seconds"] == 100.0 and answer["node_type"] == "media:fast"
    assert answer["cost"] == pytest.approx(100 * 1.80 / 3600, abs=1e-4)
    assert priced.get(f"/jobs/{job_id}").json["cost"] == answer["cost"]
    unpriced = api.create_app(settings).test_client()
    assert "cost" not in unpriced.get(f"/status/{job_id}").json  # no price: node-seconds only
    line = c3_render_cli.describe(answer, time.monotonic())
    assert "100.0 node-s (cost 0.05)" in line
