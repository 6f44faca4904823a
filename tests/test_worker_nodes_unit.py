"""Unit tests of the worker's node handling in the pool: leak-proof launches, the sweep's launch-window
rule, the node check cache, service readiness, recovery after Redis errors and the workload-type check
(responses for HTTP, a real redis-server)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import pytest
import requests
import responses

import c3_render_worker as worker
import comput3
import config
import engine_api
import jobstore
import launches
import nodes
import nodestore
import pool
import sweep

API = "https://api.comput3.test/api/v0"


@pytest.fixture
def s():
    return dataclasses.replace(
        config.Settings(), c3_api_key="sekrit-key", c3_api_url=API, c3_node_url="https://{node}",
        c3_ollama_url="https://{node}", launch_attempts=3, launch_backoff_s=0.01, node_boot_timeout_s=2,
        launch_window_slack_s=2, c3_read_timeout_s=60,
    )


@pytest.fixture
def state(s, r):
    return worker.WorkerState(settings=s, r=r, worker_id="w1")


def leased(state, job_id: str = "job-1", job_type: str = "csm"):
    """A slot for a job, its node booted (what run_on_node has before it waits for the service)."""
    lease = pool.acquire(state, job_id, job_type, lambda: None, engine_api.no_phase)
    return nodes.wait_booted(state, lease, lambda: None)


def pool_node(r, node_id: str, worker: str, workload: str, launched_at: float, state: str = "ready",
              job: str = "") -> None:
    """A pool node as a launch by `worker` leaves it (with a lease for `job` when given)."""
    assert nodestore.reserve_node(r, node_id, "media:fast", worker, 8, launched_at, job, "csm")
    if workload:
        assert nodestore.own_node(r, node_id, worker, "media:fast", workload, f"{workload}.gpu", launched_at,
                                  launched_at + 3600)
    nodestore.mark_booting(r, node_id, {"state": state})


def row(workload: str, created: float, node_type: str = "media:fast") -> dict:
    return {"workload": workload, "node": f"{workload}.gpu", "type": node_type, "status": "running",
            "running": True, "created": int(created), "expires": int(created) + 3600}


@responses.activate
def test_launch_answer_timed_out_after_the_node_was_created_is_adopted(state, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    now = time.time()
    listing = responses.post(f"{API}/workloads", json=[row("foreign-old", now - 300)])
    responses.post(f"{API}/launch", body=requests.ReadTimeout("no answer"))  # the answer is lost ...
    responses.post(f"{API}/launch", json={"workload": "wl-2", "node": "wl-2.gpu"})  # (a retry would work)
    responses.get("https://wl-1.gpu/", body="ok")
    responses.get("https://wl-2.gpu/", body="ok")
    original = requests.request

    def provider(method, url, **kwargs):
        try:
            return original(method, url, **kwargs)
        finally:
            if url.endswith("/launch"):  # ... after the provider created the node
                listing.body = json.dumps([row("foreign-old", now - 300), row("wl-1", time.time())])

    monkeypatch.setattr(requests, "request", provider)
    lease = leased(state)
    launches_made = [c for c in responses.calls if c.request.url.endswith("/launch")]
    assert len(launches_made) == 1  # never launched again while the first node ran
    assert lease.workload == "wl-1" and lease.node == "wl-1.gpu"
    assert [n["workload"] for n in nodestore.pool_nodes(state.r)] == ["wl-1"]
    assert set(nodestore.owned_nodes(state.r)) == {"wl-1"} and not nodestore.launch_intents(state.r)


@responses.activate
def test_launch_intent_is_recorded_before_the_launch_call(state):
    responses.post(f"{API}/workloads", json=[row("foreign-old", time.time() - 300)])
    seen = {}

    def capture(request):
        seen.update(nodestore.launch_intents(state.r))
        return 200, {}, json.dumps({"workload": "wl-1", "node": "wl-1.gpu"})

    responses.add_callback(responses.POST, f"{API}/launch", callback=capture)
    assert nodestore.reserve_node(state.r, "n-1", "media:fast", "w1", 4, time.time())
    answer = launches.launch_node(state.settings, state.r, "w1", "media:fast", "n-1")
    assert answer["workload"] == "wl-1"
    (intent,) = seen.values()
    assert intent["worker"] == "w1" and intent["type"] == "media:fast" and intent["before"] == ["foreign-old"]
    assert abs(intent["started_at"] - time.time()) < 5
    assert not nodestore.launch_intents(state.r)  # closed together with the node record


@responses.activate
def test_sweep_stops_only_what_a_dead_launch_created(s, r):
    t = time.time() - 5
    dead_intent = nodestore.begin_launch(r, "dead", "media:fast", ["foreign-before"], t)
    pool_node(r, "n-held", "alive", "ours-held", t + 1)
    r.set(jobstore.heartbeat_key("alive"), "1", ex=30)
    listing = responses.post(f"{API}/workloads", json=[
        row("foreign-before", t - 1),  # running before the launch (listed in its intent)
        row("ours-lost", t + 1),  # created in the window, never recorded: the dead worker's
        row("foreign-other-type", t + 1, "ollama_webui:fast"),  # in the window, but not the type launched
        row("ours-held", t + 1),  # in the window, but a pool node of ours has it
        row("foreign-later", t + 200),  # created after the window closed
        row("foreign-earlier", t - 120),  # long before
    ])
    stop = responses.post(f"{API}/stop", json={"stopped": 1, "refund_amount": 0})
    assert sweep.resolve_launch_intents(s, r) == 1
    assert [json.loads(c.request.body)["workload"] for c in stop.calls] == ["ours-lost"]
    assert dead_intent in nodestore.launch_intents(r)  # kept until its window closes
    listing.body = json.dumps([w for w in json.loads(listing.body) if w["workload"] != "ours-lost"])
    assert sweep.resolve_launch_intents(s, r, now=t + 1000) == 0
    assert not nodestore.launch_intents(r)


@responses.activate
def test_sweep_leaves_a_workload_a_live_launch_may_own(s, r):
    t = time.time() - 5
    nodestore.begin_launch(r, "dead", "media:fast", [], t)
    nodestore.begin_launch(r, "alive", "media:fast", [], t + 0.5)  # its answer has not come yet
    r.set(jobstore.heartbeat_key("alive"), "1", ex=30)
    responses.post(f"{API}/workloads", json=[row("wl-x", t + 1)])
    stop = responses.post(f"{API}/stop", json={"stopped": 1})
    assert sweep.resolve_launch_intents(s, r) == 0 and not stop.calls


@responses.activate
def test_sweep_stops_registered_workloads_no_pool_node_holds(s, r):
    pool_node(r, "n-kept", "gone", "wl-kept", time.time() - 60)  # its launcher died: the pool keeps it
    nodestore.claim_workload(r, "wl-orphan", {"id": "n-forgotten", "worker": "gone", "node": "wl-orphan.gpu",
                                              "launched_at": time.time() - 60})  # its pool node went
    stop = responses.post(f"{API}/stop", json={"stopped": 1})
    assert sweep.stop_unowned_workloads(s, r) == 1
    assert [json.loads(c.request.body)["workload"] for c in stop.calls] == ["wl-orphan"]
    assert set(nodestore.owned_nodes(r)) == {"wl-kept"}


@responses.activate
def test_a_node_checked_recently_costs_no_provider_call(state):
    state.settings = dataclasses.replace(state.settings, node_check_ttl_s=30)
    listing = responses.post(f"{API}/workloads", json=[])
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "wl-1.gpu"})
    health = responses.get("https://wl-1.gpu/", body="ok")
    lease = leased(state)
    pool.release(state, lease)
    listing.body = json.dumps([row("wl-1", time.time())])
    calls = len(responses.calls)
    for n in range(5):
        lease = leased(state, f"job-{n + 2}")
        assert lease.workload == "wl-1" and nodes.node_problem(state, lease) == ""
        pool.release(state, lease)
    assert len(responses.calls) == calls  # checked at boot: no call for the next jobs
    assert nodes.node_problem(state, lease, force=True) == ""  # after any error: asked again
    assert len(responses.calls) == calls + 2
    # a failed list is not a check: the next job checks again once the cache runs out
    listing.status = 502
    state.r.hset(nodestore.node_key(lease.node_id), "checked_at", "0")
    nodes.node_problem(state, lease)
    assert float(state.r.hget(nodestore.node_key(lease.node_id), "checked_at")) == 0.0
    listing.status = 200
    health_calls = len(health.calls)
    nodes.node_problem(state, lease)
    assert len(health.calls) == health_calls + 1


@responses.activate
def test_service_readiness_waited_for_once_per_node(state, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    responses.post(f"{API}/workloads", json=[])
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "wl-1.gpu"})
    responses.get("https://wl-1.gpu/", body="ok")
    stats = responses.get("https://ui-wl-1.gpu/system_stats", status=502)
    lease = leased(state, job_type="portrait")
    state.settings = dataclasses.replace(state.settings, service_ready_timeout_s=0)
    with pytest.raises(nodes.NodeFailed, match="comfyui on the GPU node was not ready.*SERVICE_READY_TIMEOUT.*502"):
        nodes.wait_service_ready(state, lease, "portrait", lambda: None)
    state.settings = dataclasses.replace(state.settings, service_ready_timeout_s=60)
    responses.replace(responses.GET, "https://ui-wl-1.gpu/system_stats", status=404)
    responses.add(responses.GET, "https://ui-wl-1.gpu/system_stats", json={"system": {}})

    def stats_calls() -> int:
        return len([c for c in responses.calls if c.request.url.endswith("/system_stats")])

    before = stats_calls()
    nodes.wait_service_ready(state, lease, "portrait", lambda: None)
    assert stats_calls() - before == 2  # a 404 (the node itself still answers), then ready
    nodes.wait_service_ready(state, lease, "portrait", lambda: None)
    assert stats_calls() - before == 2  # not asked again on this node (by any worker: it is in Redis)
    assert stats.calls


def test_default_comfyui_ready_timeout_fits_a_cold_start():
    assert config.Settings().service_ready_timeout_s >= 420  # public clients wait up to 7 minutes


def test_node_type_is_a_property_of_the_job_type(s):
    assert nodes.node_type_for(s, "analyze") == "ollama_webui:fast"
    assert {nodes.node_type_for(s, kind) for kind in ("csm", "whisper", "portrait")} == {"media:fast"}
    assert config.Settings().c3_ollama_url == "https://{node}"


@responses.activate
def test_workload_types_checked_at_start_up(s, caplog):
    responses.get(f"{API}/types", json=["media:fast", "ollama_webui:large"])
    with caplog.at_level(logging.INFO, logger="c3-render.worker"):
        assert comput3.check_workload_types(s) == ["ollama_webui:fast"]
    assert "C3_ANALYZE_WORKLOAD_TYPE=ollama_webui:fast is not offered by Comput3" in caplog.text
    assert responses.calls[0].request.headers["X-C3-API-KEY"] == "sekrit-key"
    responses.replace(responses.GET, f"{API}/types", status=404, json={"error": "not found"})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="c3-render.worker"):
        assert comput3.check_workload_types(s) == []
    assert "not checked" in caplog.text and "sekrit-key" not in caplog.text


@responses.activate
def test_a_workload_claimed_by_a_sweeper_that_died_is_taken_over(s, r):
    nodestore.claim_workload(r, "wl-fresh", {"worker": "sweep", "node": "f.gpu", "since": time.time()})
    nodestore.claim_workload(r, "wl-stale", {"worker": "sweep", "node": "s.gpu", "since": time.time() - 600})
    stop = responses.post(f"{API}/stop", json={"stopped": 1})
    assert sweep.stop_unowned_workloads(s, r) == 1
    assert [json.loads(c.request.body)["workload"] for c in stop.calls] == ["wl-stale"]
    assert set(nodestore.owned_nodes(r)) == {"wl-fresh"}


@responses.activate
@pytest.mark.parametrize(("job_type", "service", "ready_url"), [
    ("whisper", "whisper", "https://wl-1.gpu/whisper/config"),
    ("portrait", "comfyui", "https://ui-wl-1.gpu/system_stats"),  # the soak's portrait on a node chaos stopped
])
def test_a_node_that_dies_while_a_service_starts_is_not_waited_for(state, monkeypatch, job_type, service, ready_url):
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    responses.post(f"{API}/workloads", json=[])
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "wl-1.gpu"})
    root = responses.get("https://wl-1.gpu/", body="ok")
    responses.get(ready_url, status=404)
    lease = leased(state, job_type=job_type)
    root.status = 404  # the provider stopped the node: everything on it answers 404 now
    started = time.monotonic()
    with pytest.raises(nodes.NodeDown, match=f"stopped answering while {service} was starting"):
        nodes.wait_service_ready(state, lease, job_type, lambda: None)
    assert time.monotonic() - started < 5  # not SERVICE_READY_TIMEOUT (480 s)


@responses.activate
@pytest.mark.parametrize("stop_answer", [200, 502])
def test_stops_on_the_way_out_without_redis_are_told_apart(state, r, stop_answer, monkeypatch, caplog):
    """With Redis gone at shutdown, the node of the job cut short is stopped through Comput3; one whose
    stop failed is not reported as stopped (the sweep stops it from the registry of our nodes), and nothing
    is tried on Redis for it."""
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    stop = responses.post(f"{API}/stop", json={"stopped": 1} if stop_answer == 200 else {"error": "bad gateway"},
                          status=stop_answer)
    pool_node(r, "n-1", "w1", "wl-1", time.time() - 60, job="job-1")
    state.lease = nodes.Lease("n-1", "media:fast", "job-1", "csm", time.time() - 30, "wl-1", "wl-1.gpu",
                              nodes.urls_of(state.settings, "wl-1.gpu"))
    state.redis_lost = "TimeoutError"
    with caplog.at_level(logging.INFO, logger="c3-render.worker"):
        worker.leave_pool(state)
    assert [json.loads(c.request.body)["workload"] for c in stop.calls] == ["wl-1"]
    assert (state.unrecorded_stops, state.unstopped_nodes) == ((1, 0) if stop_answer == 200 else (0, 1))
    assert r.hlen(config.NODES_TO_STOP_KEY) == 0 and set(nodestore.owned_nodes(r)) == {"wl-1"}


@responses.activate
def test_records_left_by_a_redis_error_in_a_launch_are_freed(state, r, monkeypatch):
    """A Redis error inside a launch left a reserved place ("launching") and an open launch intent, and
    a lease of a job that went back: with MAX_NODES places all taken that way no job could get a node
    again. Recovery releases them and orphans the window (the sweep stops what it may have made)."""
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    state.settings = dataclasses.replace(state.settings, max_nodes=2)
    assert nodestore.reserve_node(r, "n-launching", "media:fast", "w1", 2, time.time(), "job-a", "csm")
    intent_id = nodestore.begin_launch(r, "w1", "media:fast", [], time.time())
    other = nodestore.begin_launch(r, "w2", "media:fast", [], time.time())  # another worker's: untouched
    pool_node(r, "n-ready", "w2", "wl-9", time.time(), job="job-b")
    nodestore.release_lease(r, "n-ready", "job-b", time.time())
    assert nodestore.lease_slot(r, "n-ready", "media:fast", "job-c", "w1", "csm", 1, 4, time.time()) == "ok"
    assert not nodestore.reserve_node(r, "n-x", "media:fast", "w1", 2, time.time())  # the pool is full
    pool.release_stale(state, None)
    records = {n["id"]: n for n in nodestore.pool_nodes(r)}
    assert set(records) == {"n-ready"} and records["n-ready"]["leases"] == {}  # the node stays in the pool
    assert not [c for c in responses.calls if c.request.url.endswith("/stop")]
    intents = nodestore.launch_intents(r)
    assert intents[intent_id].get("orphan") is True and not intents[other].get("orphan")
    assert nodestore.reserve_node(r, "n-x", "media:fast", "w1", 2, time.time())  # a place again


@responses.activate
def test_recovery_leaves_the_lease_of_the_running_job(state, r):
    pool_node(r, "n-1", "w1", "wl-1", time.time(), job="job-1")
    lease = nodes.Lease("n-1", "media:fast", "job-1", "csm", time.time(), "wl-1", "wl-1.gpu")
    pool.release_stale(state, lease)
    assert list(nodestore.pool_nodes(r)[0]["leases"]) == ["job-1"]
    assert len(responses.calls) == 0  # no stop call


ODD_RECORDS = ["wl-junk", None, 5, {"workload": 7}, {"node": "x.gpu"}, {"workload": ""}]  # all but objects with an id


@responses.activate
def test_the_workloads_list_keeps_only_objects_with_a_workload_id(s, caplog):
    responses.post(f"{API}/workloads", json=[row("wl-1", time.time()), *ODD_RECORDS])
    with caplog.at_level(logging.WARNING, logger="c3-render.worker"):
        assert [w["workload"] for w in comput3.get_running_workloads(s)] == ["wl-1"]
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warnings == ["Comput3 workloads: dropped 6 of 7 records that are not an object with a workload id"]


@responses.activate
def test_odd_workload_records_stop_neither_a_launch_nor_a_node(state):
    listing = responses.post(f"{API}/workloads", json=[row("foreign", time.time() - 300), *ODD_RECORDS])
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "wl-1.gpu"})
    responses.get("https://wl-1.gpu/", body="ok")
    lease = leased(state)
    assert lease.workload == "wl-1" and nodestore.get_pool_node(state.r, lease.node_id)["state"] == "ready"
    listing.body = json.dumps([*ODD_RECORDS, row("wl-1", time.time())])
    assert nodes.node_problem(state, lease, force=True) == ""


@responses.activate
@pytest.mark.parametrize("failure", [RuntimeError("unexpected"), KeyError("node")])
def test_any_failure_inside_a_launch_gives_its_place_back(state, r, failure):
    """Not only a C3Error: whatever a launch raises, its place in the pool goes back (else, with MAX_NODES
    places held so, no job gets a node again), and its window is left to the sweep."""
    responses.post(f"{API}/workloads", json=[])
    responses.post(f"{API}/launch", body=failure)  # raised by the HTTP call itself
    with pytest.raises(type(failure)):
        pool.acquire(state, "job-1", "csm", lambda: None, engine_api.no_phase)
    assert not r.smembers(config.POOL_NODES_KEY)
    [intent] = nodestore.launch_intents(r).values()
    assert intent["worker"] == "w1" and intent["orphan"] is True  # the sweep stops what it may have made


@responses.activate
def test_odd_workload_records_do_not_stop_the_sweep_before_it_stops_dead_workers_nodes(s, r):
    t = time.time() - 5
    nodestore.begin_launch(r, "dead-launcher", "media:fast", [], t)
    nodestore.claim_workload(r, "wl-dead-owner", {"id": "n-gone", "worker": "dead-owner", "node": "x.gpu",
                                                  "launched_at": t - 60})
    pool_node(r, "n-dead", "dead-worker", "wl-gone", t - 60, job="job-dead")
    responses.post(f"{API}/workloads", json=[*ODD_RECORDS, row("ours-lost", t + 1), row("wl-dead-owner", t - 60)])
    stop = responses.post(f"{API}/stop", json={"stopped": 1})
    summary = sweep.sweep_dead_workers(dataclasses.replace(s, heartbeat_ttl_s=0), r)
    assert summary["workers"] == ["dead-worker"] and summary["stopped_unrecorded"] == 2
    stopped = [json.loads(c.request.body)["workload"] for c in stop.calls]
    assert sorted(stopped) == ["ours-lost", "wl-dead-owner", "wl-gone"]
    assert not r.smembers(config.POOL_NODES_KEY) and nodestore.owned_nodes(r) == {}
