"""Unit tests of the worker's Comput3 calls and node handling (responses for HTTP, a real redis-server)."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import pytest
import requests
import responses

import c3_render_worker as worker
import comput3
import config
import engine_api
import launches
import nodes
import nodestore
import pool
import pool_policy
import sweep

API = "https://api.comput3.test/api/v0"


@pytest.fixture
def s():
    return dataclasses.replace(
        config.Settings(), c3_api_key="sekrit-key", c3_api_url=API, c3_node_url="https://{node}",
        launch_attempts=5, launch_backoff_s=0.01, node_boot_timeout_s=2, gpu_idle_timeout_s=0.2,
        node_check_ttl_s=0,
    )


def reserve(r, node_id: str = "n-1", node_type: str = "media:fast") -> str:
    """A place in the pool for a node about to be launched (what pool.acquire takes before a launch)."""
    assert nodestore.reserve_node(r, node_id, node_type, "w1", 4, time.time())
    return node_id


@responses.activate
def test_request_shapes_and_headers(s, r):
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "abc.comput3.ai"})
    responses.post(f"{API}/workloads", json=[{"workload": "wl-1", "node": "abc.comput3.ai", "type": "media:fast"}])
    responses.post(f"{API}/stop", json={"stopped": 1700000000, "refund_amount": 0.5})
    responses.get("https://abc.comput3.ai/", body="ok")
    answer = launches.launch_node(s, r, "w1", "media:fast", reserve(r), expires=1234)
    assert answer["workload"] == "wl-1"
    assert r.hget(nodestore.node_key("n-1"), "workload") == "wl-1"  # the pool node's workload now
    assert comput3.get_running_workloads(s)[0]["node"] == "abc.comput3.ai"
    assert comput3.check_node_health(nodes.urls_of(s, "abc.comput3.ai"))
    assert comput3.stop_workload(s, "wl-1")["refund_amount"] == 0.5
    _before, launch, workloads, health, stop = responses.calls
    assert json.loads(launch.request.body) == {"type": "media:fast", "expires": 1234}
    assert json.loads(workloads.request.body) == {"running": True}
    assert json.loads(stop.request.body) == {"workload": "wl-1"}
    for call in (launch, workloads, stop):
        assert call.request.headers["X-C3-API-KEY"] == "sekrit-key"
        assert call.request.headers["Content-Type"] == "application/json"
        assert call.request.headers["Origin"] == "https://launch.comput3.ai"
    assert health.request.headers["X-C3-API-KEY"] == "sekrit-key"


@responses.activate
def test_default_expires_leaves_a_margin_beyond_max_age(s, r):
    responses.post(f"{API}/workloads", json=[])
    launch = responses.post(f"{API}/launch", json={"workload": "w", "node": "n"})
    before = time.time()
    launches.launch_node(s, r, "w1", "media:fast", reserve(r))
    expires = json.loads(launch.calls[0].request.body)["expires"]
    assert expires >= before + s.node_max_age_s + s.node_expires_margin_s - 1


@responses.activate
def test_a_node_launched_for_a_long_job_lives_past_its_max_time(s, make_state):
    """Defect 4: a node is launched to outlive the job's max_time, and a job never takes a node whose
    provider expiry comes before its max_time would end."""
    responses.post(f"{API}/workloads", json=[])
    launch = responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    state = make_state(s)
    long_job = s.node_max_age_s + 3600  # longer than NODE_MAX_AGE
    before = time.time()
    lease = pool.acquire(state, "job-long", "csm", lambda: None, engine_api.no_phase, min_life_s=long_job)
    expires = json.loads(launch.calls[0].request.body)["expires"]
    assert expires >= before + long_job + s.node_expires_margin_s - 1
    nodestore.release_lease(state.r, lease.node_id, "job-long", time.time())
    nodestore.mark_booting(state.r, lease.node_id, {"expires": time.time() + 600})  # 10 minutes left
    view = pool.views(s, nodestore.pool_nodes(state.r))
    est = pool.estimates(s, state.r, ["media:fast"])
    cfg = pool.policy_config(s)
    assert pool_policy.place(view, "media:fast", "csm", time.time(), est, cfg, min_life_s=1200).action == "launch"
    assert pool_policy.place(view, "media:fast", "csm", time.time(), est, cfg, min_life_s=300).action == "lease"


@responses.activate
def test_launch_retried_on_5xx_html_and_timeouts(s, r):
    responses.post(f"{API}/workloads", json=[])  # none of the failed launches created a node
    responses.post(f"{API}/launch", status=502, body="<html><body>Bad gateway</body></html>",
                   content_type="text/html")
    responses.post(f"{API}/launch", status=200, body="<html>cdn error</html>", content_type="text/html")
    responses.post(f"{API}/launch", body=requests.Timeout("slow"))
    responses.post(f"{API}/launch", status=500, json={"error": "x"})
    responses.post(f"{API}/launch", json={"workload": "wl-9", "node": "n9"})
    slept = []
    assert launches.launch_node(s, r, "w1", "media:fast", reserve(r), sleep=slept.append)["workload"] == "wl-9"
    assert len([c for c in responses.calls if c.request.url.endswith("/launch")]) == 5
    looked = list(launches.LOST_ANSWER_WAITS_S)  # after each failure: look for a node the answer hid
    assert slept == [*looked, 0.01, *looked, 0.02, *looked, 0.04, *looked, 0.08]  # exponential backoff


@responses.activate
def test_launch_gives_up_after_attempts_with_clear_message(s, r):
    responses.post(f"{API}/workloads", json=[])
    launch = responses.post(f"{API}/launch", status=503, body="<html>down</html>", content_type="text/html")
    with pytest.raises(comput3.C3Error) as info:
        launches.launch_node(s, r, "w1", "media:fast", reserve(r), sleep=lambda _s: None)
    assert len(launch.calls) == 5
    assert "could not launch a media:fast GPU node" in str(info.value) and "HTTP 503" in str(info.value)
    assert "sekrit-key" not in str(info.value)


@responses.activate
def test_launch_not_retried_on_401(s, r):
    responses.post(f"{API}/workloads", json=[])
    launch = responses.post(f"{API}/launch", status=401, json={"error": "bad key"})
    with pytest.raises(comput3.C3Error, match="check C3_API_KEY"):
        launches.launch_node(s, r, "w1", "media:fast", reserve(r), sleep=lambda _s: None)
    assert len(launch.calls) == 1
    assert not nodestore.launch_intents(r)  # a refused launch created nothing: no window to watch


@pytest.fixture
def make_state(r):
    def make(s):
        return worker.WorkerState(settings=s, r=r, worker_id="w1")
    return make


def lease_for(state, job_id: str, job_type: str = "csm", should_stop=lambda: None):
    """A slot for a job, its node booted: what run_on_node has before it calls the engine."""
    lease = pool.acquire(state, job_id, job_type, should_stop, engine_api.no_phase)
    return nodes.wait_booted(state, lease, should_stop)


def run_job_on_node(state, job_id: str, engine, job_type: str = "csm"):
    """pool.run_on_node with a stand-in engine, then the lease released as the worker does."""
    context = functools.partial(engine_api.JobContext, job_id=job_id, params={}, inputs={}, work_dir=Path("."),
                                settings=state.settings, should_stop=lambda: None)
    try:
        return pool.run_on_node(state, job_id, job_type, engine, context, lambda: None, engine_api.no_phase)
    finally:
        pool.release(state, state.lease)
        state.lease = None


@responses.activate
def test_node_reused_while_healthy_and_replaced_when_not(s, make_state):
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    responses.post(f"{API}/launch", json={"workload": "wl-2", "node": "n2"})
    workloads = responses.post(f"{API}/workloads", json=[{"workload": "wl-1", "node": "n1"}])
    stop = responses.post(f"{API}/stop", json={"stopped": 1, "refund_amount": 0})
    health1 = responses.get("https://n1/", body="ok")
    responses.get("https://n2/", body="ok")
    responses.get("https://n1/csm/config", body="{}")
    responses.get("https://n2/csm/config", body="{}")
    state = make_state(s)
    assert run_job_on_node(state, "job-1", lambda job: job.node.base) == "https://n1"
    assert run_job_on_node(state, "job-2", lambda job: job.node.base) == "https://n1"  # reused
    assert [r["workload"] for r in nodestore.pool_nodes(state.r)] == ["wl-1"]
    # the node starts failing its health check under a job: it is stopped and the job runs on a new one
    health1.status = 502
    workloads.body = json.dumps([{"workload": "wl-1"}, {"workload": "wl-2"}])

    def engine(job):
        if job.node.base == "https://n1":
            raise requests.ConnectionError("the node went away")
        return job.node.base

    assert run_job_on_node(state, "job-3", engine) == "https://n2"
    assert json.loads(stop.calls[0].request.body) == {"workload": "wl-1"}
    assert [r["workload"] for r in nodestore.pool_nodes(state.r)] == ["wl-2"]


@responses.activate
def test_node_replaced_when_gone_from_workloads_list(s, make_state):
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    responses.post(f"{API}/launch", json={"workload": "wl-2", "node": "n2"})
    responses.post(f"{API}/workloads", json=[])
    responses.post(f"{API}/stop", json={"stopped": 1, "refund_amount": 0})
    responses.get("https://n1/", body="ok")
    responses.get("https://n2/", body="ok")
    state = make_state(s)
    lease = lease_for(state, "job-1")
    assert nodes.node_problem(state, lease) == "no longer in the workloads list"


@responses.activate
def test_node_that_never_boots_is_stopped(s, make_state):
    s = dataclasses.replace(s, node_boot_timeout_s=0.5)
    responses.post(f"{API}/workloads", json=[])  # the list taken before each launch
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    stop = responses.post(f"{API}/stop", json={"stopped": 1, "refund_amount": 0})
    responses.get("https://n1/", status=503)
    state = make_state(s)
    with pytest.raises(nodes.NodeFailed, match="did not become healthy"):
        lease_for(state, "job-1")
    assert len(stop.calls) == 1
    assert not state.r.smembers(config.POOL_NODES_KEY)  # its place in the pool went back


@responses.activate
def test_idle_node_stopped_after_timeout(s, make_state):
    s = dataclasses.replace(s, node_policy="fixed")
    responses.post(f"{API}/workloads", json=[])  # the list taken before each launch
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    stop = responses.post(f"{API}/stop", json={"stopped": 1, "refund_amount": 0})
    responses.get("https://n1/", body="ok")
    state = make_state(s)
    lease = lease_for(state, "job-1")
    pool.release(state, lease)

    def stop_soon():
        time.sleep(1.8)  # the loop blocks up to 1 s on an empty queue between idle checks
        state.stopping.set()

    import threading

    threading.Thread(target=stop_soon).start()
    worker.work(state)
    assert len(stop.calls) == 1  # stopped by the idle timeout (0.2 s), before the loop ended
    assert not state.r.smembers(config.POOL_NODES_KEY)
    assert float(state.r.get(config.NODE_SECONDS_KEY)) > 0


@responses.activate
def test_slot_cap_waits_and_honours_stop(s, make_state):
    s = dataclasses.replace(s, max_nodes=1)
    state = make_state(s)
    assert nodestore.reserve_node(state.r, "theirs", "media:fast", "someone-else", 1, time.time(), "their-job",
                                  "csm")
    calls = []

    def should_stop():
        calls.append(1)
        return "cancelled by request" if len(calls) > 1 else None

    with pytest.raises(engine_api.JobStopped, match="cancelled"):
        pool.acquire(state, "job-1", "csm", should_stop, engine_api.no_phase)
    assert not [c for c in responses.calls if c.request.url.endswith("/launch")]


@responses.activate
def test_stopping_an_unknown_workload_counts_as_stopped(s):
    responses.post(f"{API}/stop", status=404, json={"error": "unknown workload"})
    assert comput3.stop_workload(s, "gone") == {"already_stopped": True}
    responses.replace(responses.POST, f"{API}/stop", status=500, json={"error": "x"})
    with pytest.raises(comput3.C3Error):
        comput3.stop_workload(s, "gone")


def test_missing_api_key_is_a_clear_startup_error(s):
    with pytest.raises(SystemExit, match="C3_API_KEY is not set"):
        worker.check_startup(dataclasses.replace(s, c3_api_key=""))


def test_bad_allowlist_is_a_clear_startup_error(s):
    with pytest.raises(SystemExit, match="URL_ALLOWLIST"):
        worker.check_startup(dataclasses.replace(s, url_allowlist=("10.0.0.0/99",)))


def test_should_stop_reasons(s, make_state):
    state = make_state(s)
    now, wall = time.monotonic(), time.time()
    assert worker.make_should_stop(state, "j", now, 60, wall + 100)() is None
    assert "max_time of 60 s" in worker.make_should_stop(state, "j", now - 61, 60, wall + 100)()
    assert "complete_by" in worker.make_should_stop(state, "j", now, 60, wall - 1)()
    state.r.hset("job:j", "cancel_requested", "1")
    assert worker.make_should_stop(state, "j", now, 60, wall + 100)() == "cancelled by request"


def test_a_step_of_the_wall_clock_neither_ends_a_job_nor_its_node_wait_early(s, make_state, monkeypatch):
    """Issue 17, defect 10: max_time, the shutdown's grace and the waits for a node count on the monotonic
    clock: the wall clock jumping an hour ahead (an NTP step) ends nothing."""
    state = make_state(s)
    should_stop = worker.make_should_stop(state, "j", time.monotonic(), 60, time.time() + 7200)
    state.shutdown_deadline = time.monotonic() + 30  # a SIGTERM just came
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    assert should_stop() is None  # before: "max_time of 60 s exceeded", then "worker shutting down"


@responses.activate
def test_sweep_releases_the_lease_of_a_dead_worker_and_stops_its_node(s, r):
    responses.post(f"{API}/stop", status=404, json={"error": "unknown workload"})  # gone already
    assert nodestore.reserve_node(r, "n-dead", "media:fast", "dead", 4, time.time() - 10, "job-x", "csm")
    nodestore.mark_booting(r, "n-dead", {"state": "ready", "workload": "wl-gone", "node": "n"})
    r.hset("job:job-x", "status", "running")
    summary = sweep.sweep_dead_workers(dataclasses.replace(s, heartbeat_ttl_s=0), r)
    assert summary["leases_released"] == 1
    assert not r.smembers(config.POOL_NODES_KEY) and not r.exists(nodestore.node_key("n-dead"))
    assert json.loads(responses.calls[0].request.body) == {"workload": "wl-gone"}
    assert float(r.hget("job:job-x", "node_seconds")) >= 10  # its share of the node went to the job


@responses.activate
def test_failed_stop_is_retried_by_the_sweep(s, make_state, r):
    responses.post(f"{API}/workloads", json=[])  # the list taken before each launch
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    responses.get("https://n1/", body="ok")
    stop = responses.post(f"{API}/stop", status=502, body="<html>bad gateway</html>", content_type="text/html")
    state = make_state(s)
    lease = lease_for(state, "job-1")
    pool.release(state, lease)
    assert nodes.stop_pool_node(state, lease.node_id, "test")
    assert r.hgetall(config.NODES_TO_STOP_KEY) == {"wl-1": "n1"}
    stop.status, stop.body, stop.content_type = 200, json.dumps({"stopped": 1}), "application/json"
    assert sweep.retry_failed_stops(s, r) == 0
    assert not r.exists(config.NODES_TO_STOP_KEY)


@responses.activate
def test_a_job_whose_node_failed_gets_another_within_max_nodes(s, make_state, r):
    s = dataclasses.replace(s, max_nodes=1)
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    responses.post(f"{API}/launch", json={"workload": "wl-2", "node": "n2"})
    workloads = responses.post(f"{API}/workloads", json=[])
    responses.post(f"{API}/stop", json={"stopped": 1})
    responses.get("https://n1/", body="ok")
    responses.get("https://n2/", body="ok")
    responses.get("https://n1/csm/config", body="{}")
    responses.get("https://n2/csm/config", body="{}")
    state = make_state(s)
    seen = []

    def engine(job):
        seen.append(len(r.smembers(config.POOL_NODES_KEY)))
        if job.node.base == "https://n1":
            workloads.body = json.dumps([{"workload": "wl-2"}])  # wl-1 vanished
            raise requests.ConnectionError("gone")
        return job.node.base

    assert run_job_on_node(state, "job-1", engine) == "https://n2"
    assert seen == [1, 1]  # never more than MAX_NODES nodes in the pool


def test_sweep_waits_after_a_redis_restart(s, r, monkeypatch):
    r.sadd(config.WORKERS_KEY, "maybe-alive")
    monkeypatch.setattr(r, "info", lambda section=None: {"uptime_in_seconds": 1})
    assert sweep.sweep_dead_workers(dataclasses.replace(s, heartbeat_ttl_s=30), r)["workers"] == []
    monkeypatch.setattr(r, "info", lambda section=None: {"uptime_in_seconds": 100})
    assert sweep.sweep_dead_workers(dataclasses.replace(s, heartbeat_ttl_s=30), r)["workers"] == ["maybe-alive"]
