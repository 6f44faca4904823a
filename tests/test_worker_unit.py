"""Unit tests of the worker's Comput3 calls and node handling (responses for HTTP, a real redis-server)."""

from __future__ import annotations

import dataclasses
import json
import time

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
import sweep

API = "https://api.comput3.test/api/v0"


@pytest.fixture
def s():
    return dataclasses.replace(
        config.Settings(), c3_api_key="sekrit-key", c3_api_url=API, c3_node_url="https://{node}",
        launch_attempts=5, launch_backoff_s=0.01, node_boot_timeout_s=2, gpu_idle_timeout_s=0.2,
        node_check_ttl_s=0,
    )


@responses.activate
def test_request_shapes_and_headers(s, r):
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "abc.comput3.ai"})
    responses.post(f"{API}/workloads", json=[{"workload": "wl-1", "node": "abc.comput3.ai", "type": "media:fast"}])
    responses.post(f"{API}/stop", json={"stopped": 1700000000, "refund_amount": 0.5})
    responses.get("https://abc.comput3.ai/", body="ok")
    answer = launches.launch_node(s, r, "w1", "media:fast", expires=1234)
    assert answer["workload"] == "wl-1"
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
    launches.launch_node(s, r, "w1", "media:fast")
    expires = json.loads(launch.calls[0].request.body)["expires"]
    assert expires >= before + s.node_max_age_s + s.node_expires_margin_s - 1


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
    assert launches.launch_node(s, r, "w1", "media:fast", sleep=slept.append)["workload"] == "wl-9"
    assert len([c for c in responses.calls if c.request.url.endswith("/launch")]) == 5
    looked = list(launches.LOST_ANSWER_WAITS_S)  # after each failure: look for a node the answer hid
    assert slept == [*looked, 0.01, *looked, 0.02, *looked, 0.04, *looked, 0.08]  # exponential backoff


@responses.activate
def test_launch_gives_up_after_attempts_with_clear_message(s, r):
    responses.post(f"{API}/workloads", json=[])
    launch = responses.post(f"{API}/launch", status=503, body="<html>down</html>", content_type="text/html")
    with pytest.raises(comput3.C3Error) as info:
        launches.launch_node(s, r, "w1", "media:fast", sleep=lambda _s: None)
    assert len(launch.calls) == 5
    assert "could not launch a media:fast GPU node" in str(info.value) and "HTTP 503" in str(info.value)
    assert "sekrit-key" not in str(info.value)


@responses.activate
def test_launch_not_retried_on_401(s, r):
    responses.post(f"{API}/workloads", json=[])
    launch = responses.post(f"{API}/launch", status=401, json={"error": "bad key"})
    with pytest.raises(comput3.C3Error, match="check C3_API_KEY"):
        launches.launch_node(s, r, "w1", "media:fast", sleep=lambda _s: None)
    assert len(launch.calls) == 1
    assert not nodestore.launch_intents(r)  # a refused launch created nothing: no window to watch


@pytest.fixture
def make_state(r):
    def make(s):
        return worker.WorkerState(settings=s, r=r, worker_id="w1")
    return make


@responses.activate
def test_node_reused_while_healthy_and_replaced_when_not(s, make_state):
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    responses.post(f"{API}/launch", json={"workload": "wl-2", "node": "n2"})
    workloads = responses.post(f"{API}/workloads", json=[{"workload": "wl-1", "node": "n1"}])
    stop = responses.post(f"{API}/stop", json={"stopped": 1, "refund_amount": 0})
    health1 = responses.get("https://n1/", body="ok")
    responses.get("https://n2/", body="ok")
    state = make_state(s)
    first = nodes.ensure_node(state, lambda: None)
    assert first.workload == "wl-1"
    assert nodes.ensure_node(state, lambda: None) is first  # reused
    assert state.r.hget("node:w1:media:fast", "workload") == "wl-1"
    # the node starts failing its health check: it is stopped and a new one launched
    health1.status = 502
    workloads.body = json.dumps([{"workload": "wl-1"}, {"workload": "wl-2"}])
    second = nodes.ensure_node(state, lambda: None)
    assert second.workload == "wl-2"
    assert json.loads(stop.calls[0].request.body) == {"workload": "wl-1"}
    assert state.r.hget("node:w1:media:fast", "workload") == "wl-2"


@responses.activate
def test_node_replaced_when_gone_from_workloads_list(s, make_state):
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    responses.post(f"{API}/launch", json={"workload": "wl-2", "node": "n2"})
    responses.post(f"{API}/workloads", json=[])
    responses.post(f"{API}/stop", json={"stopped": 1, "refund_amount": 0})
    responses.get("https://n1/", body="ok")
    responses.get("https://n2/", body="ok")
    state = make_state(s)
    nodes.ensure_node(state, lambda: None)
    assert nodes.node_usable(state, "media:fast") == "no longer in the workloads list"
    assert nodes.ensure_node(state, lambda: None).workload == "wl-2"


@responses.activate
def test_node_that_never_boots_is_stopped(s, make_state):
    s = dataclasses.replace(s, node_boot_timeout_s=0.5)
    responses.post(f"{API}/workloads", json=[])  # the list taken before each launch
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    stop = responses.post(f"{API}/stop", json={"stopped": 1, "refund_amount": 0})
    responses.get("https://n1/", status=503)
    state = make_state(s)
    with pytest.raises(nodes.NodeFailed, match="did not become healthy"):
        nodes.ensure_node(state, lambda: None)
    assert len(stop.calls) == 1 and not state.nodes
    assert not state.r.exists("node:w1:media:fast") and not state.r.smembers(config.NODE_SLOTS_KEY)


@responses.activate
def test_idle_node_stopped_after_timeout(s, make_state):
    responses.post(f"{API}/workloads", json=[])  # the list taken before each launch
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    stop = responses.post(f"{API}/stop", json={"stopped": 1, "refund_amount": 0})
    responses.get("https://n1/", body="ok")
    state = make_state(s)
    nodes.ensure_node(state, lambda: None)
    state.nodes["media:fast"].last_used = time.time()

    def stop_soon():
        time.sleep(1.8)  # the loop blocks up to 1 s on an empty queue between idle checks
        state.stopping.set()

    import threading

    threading.Thread(target=stop_soon).start()
    worker.work(state)
    assert len(stop.calls) == 1  # stopped by the idle timeout, before the loop ended
    assert not state.nodes
    assert float(state.r.get(config.NODE_SECONDS_KEY)) > 0


@responses.activate
def test_slot_cap_waits_and_honours_stop(s, make_state):
    s = dataclasses.replace(s, max_nodes=1)
    state = make_state(s)
    state.r.sadd(config.NODE_SLOTS_KEY, "someone-else|media:fast")
    calls = []

    def should_stop():
        calls.append(1)
        return "cancelled by request" if len(calls) > 1 else None

    with pytest.raises(engine_api.JobStopped, match="cancelled"):
        nodes.ensure_node(state, should_stop)
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
    now = time.time()
    assert worker.make_should_stop(state, "j", now, 60, now + 100)() is None
    assert "max_time of 60 s" in worker.make_should_stop(state, "j", now - 61, 60, now + 100)()
    assert "complete_by" in worker.make_should_stop(state, "j", now, 60, now - 1)()
    state.r.hset("job:j", "cancel_requested", "1")
    assert worker.make_should_stop(state, "j", now, 60, now + 100)() == "cancelled by request"


@responses.activate
def test_sweep_releases_the_slot_of_a_dead_workers_vanished_node(s, r):
    responses.post(f"{API}/stop", status=404, json={"error": "unknown workload"})
    nodestore.acquire_node_slot(r, "dead", 4, "media:fast")
    nodestore.record_node(r, "dead", "media:fast",
                          {"workload": "wl-gone", "node": "n", "launched_at": time.time() - 10})
    summary = sweep.sweep_dead_workers(dataclasses.replace(s, heartbeat_ttl_s=0), r)
    assert summary["workers"] == ["dead"]
    assert not r.exists("node:dead:media:fast") and not r.smembers(config.NODE_SLOTS_KEY)
    assert json.loads(responses.calls[0].request.body) == {"workload": "wl-gone"}


@responses.activate
def test_failed_stop_is_retried_by_the_sweep(s, make_state, r):
    responses.post(f"{API}/workloads", json=[])  # the list taken before each launch
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    responses.get("https://n1/", body="ok")
    stop = responses.post(f"{API}/stop", status=502, body="<html>bad gateway</html>", content_type="text/html")
    state = make_state(s)
    nodes.ensure_node(state, lambda: None)
    nodes.stop_node(state, "media:fast", "test")
    assert r.hgetall(config.NODES_TO_STOP_KEY) == {"wl-1": "n1"}
    stop.status, stop.body, stop.content_type = 200, json.dumps({"stopped": 1}), "application/json"
    assert sweep.retry_failed_stops(s, r) == 0
    assert not r.exists(config.NODES_TO_STOP_KEY)


@responses.activate
def test_replacing_a_node_keeps_the_slot(s, make_state, r):
    s = dataclasses.replace(s, max_nodes=1)
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "n1"})
    responses.post(f"{API}/launch", json={"workload": "wl-2", "node": "n2"})
    responses.post(f"{API}/workloads", json=[])  # wl-1 vanished
    responses.post(f"{API}/stop", json={"stopped": 1})
    responses.get("https://n1/", body="ok")
    responses.get("https://n2/", body="ok")
    state = make_state(s)
    nodes.ensure_node(state, lambda: None)
    real_stop = comput3.stop_workload

    def stop_and_race(settings, workload):  # another worker tries to take the slot mid-replacement
        answer = real_stop(settings, workload)
        assert not nodestore.acquire_node_slot(r, "other", 1, "media:fast")
        return answer

    comput3.stop_workload = stop_and_race
    try:
        assert nodes.ensure_node(state, lambda: None).workload == "wl-2"
    finally:
        comput3.stop_workload = real_stop
    assert r.smembers(config.NODE_SLOTS_KEY) == {"w1|media:fast"}


def test_sweep_waits_after_a_redis_restart(s, r, monkeypatch):
    r.sadd(config.WORKERS_KEY, "maybe-alive")
    monkeypatch.setattr(r, "info", lambda section=None: {"uptime_in_seconds": 1})
    assert sweep.sweep_dead_workers(dataclasses.replace(s, heartbeat_ttl_s=30), r)["workers"] == []
    monkeypatch.setattr(r, "info", lambda section=None: {"uptime_in_seconds": 100})
    assert sweep.sweep_dead_workers(dataclasses.replace(s, heartbeat_ttl_s=30), r)["workers"] == ["maybe-alive"]
