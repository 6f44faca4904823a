"""Unit tests of the worker's node handling: leak-proof launches, the sweep's launch-window rule,
the node check cache, service readiness and the workload-type check (responses for HTTP, real redis)."""

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
    held = nodes.ensure_node(state, lambda: None)
    launches = [c for c in responses.calls if c.request.url.endswith("/launch")]
    assert len(launches) == 1  # never launched again while the first node ran
    assert held.workload == "wl-1" and held.node == "wl-1.gpu"
    assert state.r.hget("node:w1:media:fast", "workload") == "wl-1"
    assert set(nodestore.owned_nodes(state.r)) == {"wl-1"} and not nodestore.launch_intents(state.r)


@responses.activate
def test_launch_intent_is_recorded_before_the_launch_call(state):
    responses.post(f"{API}/workloads", json=[row("foreign-old", time.time() - 300)])
    seen = {}

    def capture(request):
        seen.update(nodestore.launch_intents(state.r))
        return 200, {}, json.dumps({"workload": "wl-1", "node": "wl-1.gpu"})

    responses.add_callback(responses.POST, f"{API}/launch", callback=capture)
    answer = launches.launch_node(state.settings, state.r, "w1", "media:fast")
    assert answer["workload"] == "wl-1"
    (intent,) = seen.values()
    assert intent["worker"] == "w1" and intent["type"] == "media:fast" and intent["before"] == ["foreign-old"]
    assert abs(intent["started_at"] - time.time()) < 5
    assert not nodestore.launch_intents(state.r)  # closed together with the node record


@responses.activate
def test_sweep_stops_only_what_a_dead_launch_created(s, r):
    t = time.time() - 5
    dead_intent = nodestore.begin_launch(r, "dead", "media:fast", ["foreign-before"], t)
    nodestore.own_node(r, "alive", "media:fast", "ours-held", "ours-held.gpu", t + 1)
    r.set(jobstore.heartbeat_key("alive"), "1", ex=30)
    listing = responses.post(f"{API}/workloads", json=[
        row("foreign-before", t - 1),  # running before the launch (listed in its intent)
        row("ours-lost", t + 1),  # created in the window, never recorded: the dead worker's
        row("foreign-other-type", t + 1, "ollama_webui:fast"),  # in the window, but not the type launched
        row("ours-held", t + 1),  # in the window, but a live worker holds it
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
def test_sweep_stops_registered_nodes_of_dead_workers(s, r):
    nodestore.own_node(r, "gone", "media:fast", "wl-g", "wl-g.gpu", time.time() - 60)
    nodestore.own_node(r, "alive", "media:fast", "wl-a", "wl-a.gpu", time.time() - 60)
    r.set(jobstore.heartbeat_key("alive"), "1", ex=30)
    stop = responses.post(f"{API}/stop", json={"stopped": 1})
    assert sweep.stop_nodes_of_dead_owners(s, r) == 1
    assert [json.loads(c.request.body)["workload"] for c in stop.calls] == ["wl-g"]
    assert set(nodestore.owned_nodes(r)) == {"wl-a"}


@responses.activate
def test_a_node_checked_recently_costs_no_provider_call(state):
    state.settings = dataclasses.replace(state.settings, node_check_ttl_s=30)
    listing = responses.post(f"{API}/workloads", json=[])
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "wl-1.gpu"})
    health = responses.get("https://wl-1.gpu/", body="ok")
    held = nodes.ensure_node(state, lambda: None)
    listing.body = json.dumps([row("wl-1", time.time())])
    calls = len(responses.calls)
    for _ in range(5):
        assert nodes.ensure_node(state, lambda: None) is held
    assert len(responses.calls) == calls  # checked at boot: no call for the next jobs
    assert nodes.node_usable(state, "media:fast", force=True) == ""  # after any error: asked again
    assert len(responses.calls) == calls + 2
    # a failed list invalidates the cache: the next job checks again
    listing.status = 502
    nodes.node_usable(state, "media:fast", force=True)
    assert state.nodes["media:fast"].checked_at == 0.0
    listing.status = 200
    health_calls = len(health.calls)
    nodes.ensure_node(state, lambda: None)
    assert len(health.calls) == health_calls + 1


@responses.activate
def test_service_readiness_waited_for_once_per_node(state, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    responses.post(f"{API}/workloads", json=[])
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "wl-1.gpu"})
    responses.get("https://wl-1.gpu/", body="ok")
    stats = responses.get("https://ui-wl-1.gpu/system_stats", status=502)
    held = nodes.ensure_node(state, lambda: None)
    state.settings = dataclasses.replace(state.settings, service_ready_timeout_s=0)
    with pytest.raises(nodes.NodeFailed, match="comfyui on the GPU node was not ready.*SERVICE_READY_TIMEOUT.*502"):
        nodes.wait_service_ready(state, held, "portrait", lambda: None)
    state.settings = dataclasses.replace(state.settings, service_ready_timeout_s=60)
    responses.replace(responses.GET, "https://ui-wl-1.gpu/system_stats", status=404)
    responses.add(responses.GET, "https://ui-wl-1.gpu/system_stats", json={"system": {}})

    def stats_calls() -> int:
        return len([c for c in responses.calls if c.request.url.endswith("/system_stats")])

    before = stats_calls()
    nodes.wait_service_ready(state, held, "portrait", lambda: None)
    assert stats_calls() - before == 2  # a 404 (the node itself still answers), then ready
    nodes.wait_service_ready(state, held, "portrait", lambda: None)
    assert stats_calls() - before == 2  # not asked again on this node
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
    assert sweep.stop_nodes_of_dead_owners(s, r) == 1
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
    held = nodes.ensure_node(state, lambda: None)
    root.status = 404  # the provider stopped the node: everything on it answers 404 now
    started = time.monotonic()
    with pytest.raises(nodes.NodeDown, match=f"stopped answering while {service} was starting"):
        nodes.wait_service_ready(state, held, job_type, lambda: None)
    assert time.monotonic() - started < 5  # not SERVICE_READY_TIMEOUT (480 s)


@responses.activate
@pytest.mark.parametrize("stop_answer", [200, 502])
def test_stops_on_the_way_out_without_redis_are_told_apart(state, r, stop_answer, monkeypatch, caplog):
    """With Redis gone at shutdown, a node whose Comput3 stop failed is not reported as stopped (the
    sweep stops it from the registry of our nodes), and nothing is tried on Redis for it."""
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    responses.post(f"{API}/stop", json={"stopped": 1} if stop_answer == 200 else {"error": "bad gateway"},
                   status=stop_answer)
    nodestore.own_node(r, "w1", "media:fast", "wl-1", "wl-1.gpu", time.time() - 60)
    state.nodes["media:fast"] = nodes.HeldNode("wl-1", "wl-1.gpu", time.time() - 60,
                                                engine_api.node_urls("wl-1.gpu", "k", "https://{node}", "https://{node}/comfyui",
                                                                 "https://{node}"))
    state.redis_lost = "TimeoutError"
    with caplog.at_level(logging.INFO, logger="c3-render.worker"):
        nodes.stop_node(state, "media:fast", "worker shutting down")
    assert (state.unrecorded_stops, state.unstopped_nodes) == ((1, 0) if stop_answer == 200 else (0, 1))
    assert ("stopped node wl-1.gpu" in caplog.text) == (stop_answer == 200)
    assert r.hlen(config.NODES_TO_STOP_KEY) == 0 and set(nodestore.owned_nodes(r)) == {"wl-1"}


@responses.activate
def test_records_left_by_a_redis_error_in_a_launch_are_freed(state, r, monkeypatch):
    """A Redis error inside a launch left a slot, a "launching" record and an open launch intent (and,
    for a second type, a node owned but never held): with MAX_NODES slots all taken that way the worker
    could never take a job again. Recovery frees them, stops the owned node, and orphans the window."""
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    state.settings = dataclasses.replace(state.settings, max_nodes=2)
    stop = responses.post(f"{API}/stop", json={"stopped": 1})
    assert nodestore.acquire_node_slot(r, "w1", 2, "media:fast")
    nodestore.record_node(r, "w1", "media:fast", {"state": "launching", "worker": "w1", "type": "media:fast"})
    intent_id = nodestore.begin_launch(r, "w1", "media:fast", [], time.time())
    other = nodestore.begin_launch(r, "w2", "media:fast", [], time.time())  # another worker's: untouched
    assert nodestore.acquire_node_slot(r, "w1", 2, "ollama_webui:fast")
    nodestore.own_node(r, "w1", "ollama_webui:fast", "wl-9", "wl-9.gpu", time.time())
    assert not nodestore.acquire_node_slot(r, "w1", 2)  # the state the soak found: no slot for a job
    nodes.forget_unheld_nodes(state)
    assert nodestore.slot_types(r, "w1") == []
    assert nodestore.get_node(r, "w1", "media:fast") is None and nodestore.owned_nodes(r) == {}
    assert [json.loads(c.request.body)["workload"] for c in stop.calls] == ["wl-9"]
    intents = nodestore.launch_intents(r)
    assert intents[intent_id].get("orphan") is True and not intents[other].get("orphan")
    assert nodestore.acquire_node_slot(r, "w1", 2)  # the worker can take a job again


@responses.activate
def test_recovery_leaves_the_nodes_a_worker_holds(state, r):
    assert nodestore.acquire_node_slot(r, "w1", 2, "media:fast")
    nodestore.own_node(r, "w1", "media:fast", "wl-1", "wl-1.gpu", time.time())
    state.nodes["media:fast"] = nodes.HeldNode("wl-1", "wl-1.gpu", time.time(), engine_api.node_urls(
        "wl-1.gpu", "k", "https://{node}", "https://{node}/comfyui", "https://{node}"))
    nodes.forget_unheld_nodes(state)
    assert nodestore.slot_types(r, "w1") == ["media:fast"] and set(nodestore.owned_nodes(r)) == {"wl-1"}
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
def test_odd_workload_records_stop_neither_a_launch_nor_a_held_node(state):
    listing = responses.post(f"{API}/workloads", json=[row("foreign", time.time() - 300), *ODD_RECORDS])
    responses.post(f"{API}/launch", json={"workload": "wl-1", "node": "wl-1.gpu"})
    responses.get("https://wl-1.gpu/", body="ok")
    held = nodes.ensure_node(state, lambda: None)
    assert held.workload == "wl-1" and nodestore.get_node(state.r, "w1", "media:fast")["state"] == "running"
    listing.body = json.dumps([*ODD_RECORDS, row("wl-1", time.time())])
    assert nodes.node_usable(state, "media:fast", force=True) == ""


@responses.activate
@pytest.mark.parametrize("failure", [RuntimeError("unexpected"), KeyError("node")])
def test_any_failure_inside_a_launch_frees_the_slot_and_the_launching_record(state, r, failure):
    """Not only a C3Error: whatever a launch raises, its slot and "launching" record go (else, with
    MAX_NODES slots held so, no worker takes a job again), and its window is left to the sweep."""
    responses.post(f"{API}/workloads", json=[])
    responses.post(f"{API}/launch", body=failure)  # raised by the HTTP call itself
    assert nodestore.acquire_node_slot(r, "w1", state.settings.max_nodes)  # the worker's reservation
    with pytest.raises(type(failure)):
        nodes.ensure_node(state, lambda: None)
    assert nodestore.slot_types(r, "w1") == [] and nodestore.get_node(r, "w1", "media:fast") is None
    assert not state.nodes
    [intent] = nodestore.launch_intents(r).values()
    assert intent["worker"] == "w1" and intent["orphan"] is True  # the sweep stops what it may have made


@responses.activate
def test_odd_workload_records_do_not_stop_the_sweep_before_it_stops_dead_owners_nodes(s, r):
    t = time.time() - 5
    nodestore.begin_launch(r, "dead-launcher", "media:fast", [], t)
    nodestore.own_node(r, "dead-owner", "media:fast", "wl-dead-owner", "wl-dead-owner.gpu", t - 60)
    nodestore.acquire_node_slot(r, "dead-worker", 4, "media:fast")
    nodestore.record_node(r, "dead-worker", "media:fast", {"workload": "wl-gone", "node": "wl-gone.gpu",
                                                           "launched_at": t - 60})
    responses.post(f"{API}/workloads", json=[*ODD_RECORDS, row("ours-lost", t + 1), row("wl-dead-owner", t - 60)])

    def stop_answer(request):  # the dead worker's node is gone already: its stop fails
        failed = json.loads(request.body)["workload"] == "wl-gone"
        return (502, {}, '{"error": "bad gateway"}') if failed else (200, {}, '{"stopped": 1}')

    responses.add_callback(responses.POST, f"{API}/stop", callback=stop_answer)
    summary = sweep.sweep_dead_workers(dataclasses.replace(s, heartbeat_ttl_s=0), r)
    assert summary["workers"] == ["dead-worker"] and summary["stopped_unrecorded"] == 2
    stopped = [json.loads(c.request.body)["workload"] for c in responses.calls if c.request.url.endswith("/stop")]
    assert sorted(stopped) == ["ours-lost", "wl-dead-owner", "wl-gone"]
    assert not r.smembers(config.NODE_SLOTS_KEY) and not r.exists("node:dead-worker:media:fast")
    assert nodestore.owned_nodes(r) == {}
