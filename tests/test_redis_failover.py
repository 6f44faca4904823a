"""redis_conn.py against real redis-server processes: a primary, its replica and three Sentinels on
loopback. A client follows a failover (READONLY and connection errors at a moved primary are retried on
the new one, scripts load again there, the SSE hub resubscribes); with REDIS_MIN_REPLICA_ACKS the steps
that settle a job wait for the replica (submit answers 503 and its replay gives the same job, a claim
is not run, a finish and a node lease's end are not acknowledged) until it confirms; the sweep waits a
heartbeat TTL after a promotion; /overview and /metrics show the role and the replicas' lag."""

from __future__ import annotations

import dataclasses
import re
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, wait_for
from redis_ha import HA, MASTER, client, start_ha, wait_switched
from system import start_receiver

import app as api
import c3_render_worker as worker
import config
import events
import jobspec
import jobstore
import nodes
import nodestore
import redis_conn
import redis_lua
import sweep
import webhook_state
import webhooks

CSM = jobspec.validate("csm", {"text": "Hi."})


@pytest.fixture(scope="module")
def ha(tmp_path_factory) -> HA:
    cluster = start_ha(tmp_path_factory.mktemp("redis-ha"))
    yield cluster
    cluster.stop()


@pytest.fixture
def primary(ha: HA) -> int:
    """The primary, once the Sentinels agree on it and its replica is online; data flushed."""
    port = ha.wait_for_primary()
    client(port).flushall()
    return port


def sentinel_settings(ha: HA, **changes) -> config.Settings:
    return dataclasses.replace(config.Settings(), redis_sentinels=tuple(ha.sentinels.split(",")),
                               redis_sentinel_master=MASTER, **changes)


def replica_of(ha: HA, primary: int) -> int:
    return next(port for port in ha.data_ports if port != primary)


@contextmanager
def stopped(ha: HA, port: int):
    """The server on `port` frozen (SIGSTOP): it acknowledges nothing until it is resumed."""
    ha.procs[port].send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        ha.procs[port].send_signal(signal.SIGCONT)


# --- following the primary ---------------------------------------------------------------------------

def test_a_planned_switch_over_reaches_no_caller(ha: HA, primary: int):
    """Submits (through the replica check) and reads go on through SENTINEL FAILOVER without one error."""
    r = redis_conn.connect(sentinel_settings(ha, redis_min_replica_acks=1))
    ids, errors, stop = [], [], threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                job_id, created = jobstore.submit(r, "csm", CSM)
                assert created and jobstore.get_job(r, job_id)["status"] == "queued"
                ids.append(job_id)
            except Exception as exc:  # noqa: BLE001 - every error is what this test counts
                errors.append(repr(exc))
            time.sleep(0.02)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(ids) > 20, 20, what="traffic before the switch-over")
    ha.switch_over()
    new = ha.wait_for_primary(other_than=primary)
    before = len(ids)
    wait_for(lambda: len(ids) > before + 20, 20, what="traffic after the switch-over")
    stop.set()
    for thread in threads:
        thread.join(30)
    assert errors == []
    on_new = client(new)
    assert all(on_new.exists(jobstore.job_key(job_id)) for job_id in ids)  # every acknowledged job kept
    assert on_new.zcard(config.JOBS_INDEX_KEY) == len(ids)  # and none twice


def test_readonly_is_retried_once_on_the_primary_found_again(ha: HA, primary: int, monkeypatch):
    r = redis_conn.connect(sentinel_settings(ha))
    manager = r.connection_pool.sentinel_manager
    real = manager.discover_master
    answers = [("127.0.0.1", replica_of(ha, primary))]  # a stale answer first: a demoted primary
    monkeypatch.setattr(manager, "discover_master", lambda name: answers.pop() if answers else real(name))
    job_id, created = jobstore.submit(r, "csm", CSM)  # a script that writes: READONLY on the replica
    assert created and answers == []
    assert client(primary).hget(jobstore.job_key(job_id), "status") == "queued"
    replica = client(replica_of(ha, primary))
    assert replica.info("errorstats").get("errorstat_READONLY", {}).get("count", 0) >= 1


def test_readonly_without_sentinel_is_a_connection_error_not_a_job_error(ha: HA, primary: int):
    """A client whose REDIS_URL reaches a replica: the write is tried twice and fails as 'Redis cannot be
    reached' (the API's 503, a worker's back-off), never as a job error."""
    replica_port = replica_of(ha, primary)
    replica = client(replica_port)
    before = replica.info("errorstats").get("errorstat_READONLY", {}).get("count", 0)
    r = redis_conn.connect(f"redis://127.0.0.1:{replica_port}/0")
    with pytest.raises(redis_conn.PrimaryMoved):
        jobstore.submit(r, "csm", CSM)
    assert replica.info("errorstats")["errorstat_READONLY"]["count"] == before + 2
    settings = dataclasses.replace(config.Settings(), redis_url=f"redis://127.0.0.1:{replica_port}/0")
    answer = api.create_app(settings).test_client().post("/csm", json={"text": "Hi."})
    assert answer.status_code == 503 and "Redis" in answer.get_json()["error"]


def test_scripts_and_subscriptions_follow_a_killed_primary(ha: HA, primary: int):
    r = redis_conn.connect(sentinel_settings(ha))
    job_id, _ = jobstore.submit(r, "csm", CSM)
    replica_port = replica_of(ha, primary)
    sha = redis_lua.script("position").sha
    redis_lua.run(r, "position", (jobstore.job_key(job_id), *jobstore.QUEUE_KEYS), job_id)
    assert client(replica_port).script_exists(sha) == [False]  # scripts are not replicated: NOSCRIPT ahead
    hub = events.Hub(r)
    wake = hub.register(job_id)
    wait_for(lambda: not wake.empty(), 10, what="the hub's first subscription")
    wake.get_nowait()
    ha.kill_primary()
    try:
        assert wait_switched(ha, primary) == replica_port
        wait_for(lambda: not wake.empty(), 20, what="the hub to resubscribe on the new primary")
        wake.get_nowait()
        assert jobstore.get_job_with_position(r, job_id)["queue_position"] == "1"  # EVALSHA, NOSCRIPT, EVAL
        assert redis_lua.run_many(r, "position", [((jobstore.job_key(job_id), *jobstore.QUEUE_KEYS), (job_id,))]) \
            == [1]
        jobstore.notify_changed(r, job_id)  # published on the new primary
        assert wake.get(timeout=5) is True
    finally:
        ha.restart(primary)
    ha.wait_for_primary()


# --- REDIS_MIN_REPLICA_ACKS ---------------------------------------------------------------------------

def test_submit_answers_503_until_the_replica_confirms_and_the_replay_gives_the_same_job(ha: HA, primary: int,
                                                                                       tmp_path: Path):
    settings = sentinel_settings(ha, redis_min_replica_acks=1, redis_failover_wait_s=1.0,
                                 output_dir=str(tmp_path / "output"))
    http = api.create_app(settings).test_client()
    key = {"Idempotency-Key": "replica-check-1"}
    confirmed = http.post("/csm", json={"text": "Confirmed."})
    assert confirmed.status_code == 200
    with stopped(ha, replica_of(ha, primary)):
        started = time.monotonic()
        answer = http.post("/csm", json={"text": "Unconfirmed."}, headers=key)
        assert answer.status_code == 503 and answer.headers["Retry-After"]
        assert "replicas" in answer.get_json()["error"] and "Idempotency-Key" in answer.get_json()["error"]
        assert 1.0 <= time.monotonic() - started < 5  # REDIS_FAILOVER_WAIT_S of retries, then the answer
        # written on the primary, not confirmed: it may or may not outlive a failover
        [written] = set(client(primary).zrange(config.JOBS_INDEX_KEY, 0, -1)) - {confirmed.get_json()["id"]}
        replay = http.post("/csm", json={"text": "Unconfirmed."}, headers=key)
        assert replay.status_code == 503  # the first one is still not on the replica: not confirmed either
    replay = http.post("/csm", json={"text": "Unconfirmed."}, headers=key)
    assert replay.status_code == 200 and replay.get_json()["id"] == written  # the same job, not a second
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert client(primary).zcard(config.JOBS_INDEX_KEY) == 2


def test_a_pipeline_submit_is_confirmed_like_a_job_and_its_replay_gives_the_same_steps(ha: HA, primary: int,
                                                                                       tmp_path: Path):
    settings = sentinel_settings(ha, redis_min_replica_acks=1, redis_failover_wait_s=1.0,
                                 output_dir=str(tmp_path / "output"))
    http = api.create_app(settings).test_client()
    key = {"Idempotency-Key": "replica-pipeline-1"}
    body = {"steps": {"speech": {"type": "csm", "text": "Hello there."},
                      "video": {"type": "portrait", "image_url": "https://example.com/face.jpg",
                                "audio_url": "{{speech.result_url}}"}}}
    index = config.PIPELINES_INDEX_KEY
    with stopped(ha, replica_of(ha, primary)):
        answer = http.post("/pipelines", json=body, headers=key)
        assert answer.status_code == 503 and "Idempotency-Key" in answer.get_json()["error"]
        [written] = client(primary).zrange(index, 0, -1)
        # retried for REDIS_FAILOVER_WAIT_S with the same ids: written by the first try only (one queue
        # entry of its first step, not one per try)
        assert http.post("/pipelines", json=body).status_code == 503
        assert client(primary).zcard(index) == 2 and client(primary).llen(config.QUEUE_KEY) == 2
    replay = http.post("/pipelines", json=body, headers=key)
    assert replay.status_code == 200 and replay.get_json()["id"] == written
    steps = replay.get_json()["steps"]
    assert client(primary).zcard(index) == 2
    assert jobstore.get_job(client(primary), steps["speech"])["status"] == "queued"
    assert jobstore.get_job(client(primary), steps["video"])["status"] == "waiting"


def test_a_claim_the_replica_does_not_confirm_is_not_run(ha: HA, primary: int, tmp_path: Path):
    settings = sentinel_settings(ha, redis_min_replica_acks=1, work_dir=str(tmp_path / "work"))
    r = redis_conn.connect(settings)
    job_id, _ = jobstore.submit(r, "csm", CSM)
    state = worker.WorkerState(settings=settings, r=r, worker_id="w-claim")
    with stopped(ha, replica_of(ha, primary)):
        entry = jobstore.take(r, "w-claim", 1)
        with pytest.raises(redis_conn.NotReplicated):
            worker.run_job(state, entry)  # the claim is not confirmed: the engine never starts
    record = jobstore.get_job(r, job_id)
    assert record["status"] == "queued" and record["attempts"] == "0" and "worker" not in record
    assert r.llen(jobstore.processing_key("w-claim")) == 0 and r.llen(config.QUEUE_KEY) == 1
    assert not (tmp_path / "work" / job_id).exists()


def test_a_finish_is_acknowledged_only_once_the_replica_has_it(ha: HA, primary: int, tmp_path: Path):
    settings = sentinel_settings(ha, redis_min_replica_acks=1, work_dir=str(tmp_path / "work"))
    r = redis_conn.connect(settings)
    job_id, _ = jobstore.submit(r, "csm", CSM)
    state = worker.WorkerState(settings=settings, r=r, worker_id="w-settle")
    entry = jobstore.take(r, "w-settle", 1)
    job = worker.claim(state, entry)
    assert job is not None
    with stopped(ha, replica_of(ha, primary)):
        settling = threading.Thread(target=worker.settle, args=(state, job, worker.Outcome("success", {"text": "ok"})))
        settling.start()
        time.sleep(2.0)
        assert settling.is_alive()  # retrying: the entry is still ours, nothing acknowledged
        assert r.llen(jobstore.processing_key("w-settle")) == 1
    settling.join(20)
    assert not settling.is_alive()
    assert r.llen(jobstore.processing_key("w-settle")) == 0
    assert client(replica_of(ha, primary)).hget(jobstore.job_key(job_id), "status") == "success"


def test_a_node_lease_ends_only_once_the_replica_has_it(ha: HA, primary: int, tmp_path: Path):
    """The lease release at a job's end (the pool's slot, the job's node-seconds) is confirmed like the finish:
    released on a replica that did not have it, the slot would stay taken by a job that ended."""
    settings = sentinel_settings(ha, redis_min_replica_acks=1, work_dir=str(tmp_path / "work"))
    r = redis_conn.connect(settings)
    job_id, _ = jobstore.submit(r, "csm", CSM)
    state = worker.WorkerState(settings=settings, r=r, worker_id="w-lease")
    assert nodestore.reserve_node(r, "n-1", "csm", "w-lease", 4, time.time(), job_id, "csm")
    state.lease = nodes.Lease("n-1", "csm", job_id, "csm", time.time(), ran_s=1.5)
    replica = client(replica_of(ha, primary))
    with stopped(ha, replica_of(ha, primary)):
        letting_go = threading.Thread(target=worker.let_go, args=(state,))
        letting_go.start()
        time.sleep(2.0)
        assert letting_go.is_alive() and state.lease is not None  # retrying until the replica has it
    letting_go.join(20)
    assert not letting_go.is_alive() and state.lease is None
    assert replica.hlen(nodestore.leases_key("n-1")) == 0
    assert float(replica.hget(jobstore.job_key(job_id), "engine_seconds")) == 1.5  # recorded once


def test_a_webhook_outcome_is_recorded_again_until_the_replica_has_it(ha: HA, primary: int):
    receiver = start_receiver()
    try:
        settings = sentinel_settings(ha, redis_min_replica_acks=1, url_allowlist=("127.0.0.0/8",))
        r = redis_conn.connect(settings)
        job_id, _ = jobstore.submit(r, "csm", jobspec.validate("csm", {"text": "Hi.", "notify_url": receiver.url}))
        attempt, _status = jobstore.claim(r, settings, "w-hook", jobstore.take(r, "w-hook", 1))
        jobstore.transition(r, settings, job_id, "success", {"text": "ok"}, worker_id="w-hook", attempt=attempt)
        raw, _slot = webhooks.take_next(r, "w-hook", 1)
        with stopped(ha, replica_of(ha, primary)):
            with pytest.raises(webhooks.Unsettled) as unsettled:
                webhooks.attempt_and_settle(r, settings, "w-hook", raw)  # delivered; not on the replica
        assert [body["id"] for body in receiver.bodies()] == [job_id]
        unsettled.value.settle()  # what the attempt thread does once Redis confirms again
        replica = client(replica_of(ha, primary))
        assert replica.hget(jobstore.job_key(job_id), "webhook_status") == "delivered"
        assert replica.llen(webhook_state.webhook_inflight_key("w-hook")) == 0
    finally:
        receiver.close()


def test_the_sweep_waits_a_heartbeat_ttl_after_a_promotion(ha: HA, primary: int):
    """Heartbeats may expire on the new primary while the failover runs: no live worker is called dead."""
    r = redis_conn.connect(sentinel_settings(ha))
    settings = sentinel_settings(ha, heartbeat_ttl_s=5)
    job_id, _ = jobstore.submit(r, "csm", CSM)
    entry = jobstore.take(r, "w-quiet", 1)
    assert jobstore.claim(r, settings, "w-quiet", entry) == (1, "running")
    r.sadd(config.WORKERS_KEY, "w-quiet")  # its heartbeat key has expired (as in a long failover)
    replica = client(replica_of(ha, primary))
    wait_for(lambda: float(replica.info("server")["uptime_in_seconds"]) > 6, 10, what="an uptime over the TTL")
    ha.switch_over()
    ha.wait_for_primary(other_than=primary)
    assert redis_conn.primary_age_s(r) < 5 < float(r.info("server")["uptime_in_seconds"])
    assert sweep.sweep_dead_workers(settings, r)["requeued"] == 0
    assert jobstore.get_job(r, job_id)["status"] == "running"
    replid = r.info("replication")["master_replid"]
    r.set(config.PRIMARY_SINCE_KEY.format(replid=replid), repr(time.time() - 60))  # a TTL later
    assert sweep.sweep_dead_workers(settings, r)["requeued"] == 1
    assert entry and jobstore.get_job(r, job_id)["status"] == "queued"


# --- what operators see ----------------------------------------------------------------------------

def test_overview_and_metrics_show_the_role_and_the_replicas_lag(ha: HA, primary: int, tmp_path: Path):
    settings = sentinel_settings(ha, redis_min_replica_acks=1, output_dir=str(tmp_path / "output"))
    http = api.create_app(settings).test_client()
    overview = http.get("/overview").get_json()["redis"]
    assert overview["role"] == "primary" and overview["sentinel"] is True and overview["min_replica_acks"] == 1
    assert [replica["state"] for replica in overview["replicas"]] == ["online"]
    assert overview["replicas"][0]["lag_s"] >= 0 and overview["replicas"][0]["behind_bytes"] >= 0
    text = http.get("/metrics").get_data(as_text=True)
    assert "c3_render_redis_primary 1.0" in text and "c3_render_redis_replicas 1.0" in text
    assert re.search(r'c3_render_redis_replica_lag_seconds\{replica="0"\} \d', text)
    assert re.search(r'c3_render_redis_replica_lag_bytes\{replica="0"\} \d', text)


# --- one way to connect --------------------------------------------------------------------------------

def test_every_process_connects_through_redis_conn():
    """No module builds its own client from REDIS_URL: a Sentinel setting would be ignored there."""
    offenders = []
    for path in [*ROOT.glob("*.py"), *ROOT.glob("devnode/*.py")]:
        if path.name in ("config.py", "redis_conn.py"):
            continue
        text = path.read_text()
        if re.search(r"\.redis_url\b|Redis\.from_url|ConnectionPool\.from_url|redis\.Redis\(", text):
            offenders.append(path.name)
    assert offenders == []


def test_sentinel_addresses_are_checked_at_start(monkeypatch):
    monkeypatch.setenv("REDIS_SENTINELS", "s1:26379, [::1]:26380 ,s3")
    assert [config.sentinel_address(e) for e in config.load().redis_sentinels] == \
        [("s1", 26379), ("::1", 26380), ("s3", 26379)]
    monkeypatch.setenv("REDIS_SENTINELS", "s1:26379,s2:port")
    with pytest.raises(SystemExit, match="REDIS_SENTINELS.*'s2:port'"):
        config.load()


def test_secrets_of_redis_stay_out_of_the_settings_repr(monkeypatch):
    monkeypatch.setenv("REDIS_PASSWORD", "data-secret-123")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", "sentinel-secret-456")
    shown = repr(config.load())
    assert "data-secret-123" not in shown and "sentinel-secret-456" not in shown


def test_hub_wakes_every_stream_when_it_subscribes(ha: HA, primary: int):
    hub = events.Hub(redis_conn.connect(sentinel_settings(ha)))
    wakes = [hub.register("a"), hub.register("b")]
    for wake in wakes:
        assert wake.get(timeout=10) is True  # (re)subscribed: changes may have been missed
