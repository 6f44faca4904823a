"""The HTTP API against a real redis-server: submit, status, result, cancel, errors, keys, limits."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

import pytest

import app as api
import config
import jobstore
import localfiles
import storage
import webhook_state

CSM = {"text": "Hello there. General Kenobi."}
JOBS = {
    "/csm": CSM,
    "/portrait": {"image_url": "https://example.com/a.jpg", "audio_url": "https://example.com/a.mp3"},
    "/api/v1/jobs/whisper": {"audio_url": "https://example.com/a.mp3"},
    "/whisper": {"audio_url": "https://example.com/a.mp3", "model": "tiny", "language": "en"},
    "/analyze": {"image_url": "https://example.com/a.jpg", "prompt": "faces?"},
}


@pytest.fixture
def client(settings):
    return api.create_app(settings).test_client()


def submit(client, route="/csm", body=None, **kwargs):
    return client.post(route, json=CSM if body is None else body, **kwargs)


@pytest.mark.parametrize("route", list(JOBS))
def test_submit_writes_record_and_queue_entry_together(client, r, route):
    answer = submit(client, route, JOBS[route])
    assert answer.status_code == 200, answer.get_json()
    body = answer.get_json()
    assert body["status"] == "queued" and jobstore.is_job_id(body["id"])
    record = r.hgetall(f"job:{body['id']}")
    assert record["status"] == "queued"
    assert record["type"] == {"/csm": "csm", "/portrait": "portrait", "/analyze": "analyze"}.get(route, "whisper")
    assert r.lrange(config.QUEUE_KEY, 0, -1) == [record["queue_entry"]]
    assert json.loads(record["queue_entry"]) == {"id": body["id"], "type": record["type"]}
    assert float(record["complete_by"]) - float(record["created_at"]) == pytest.approx(3600)


def test_status_shapes_and_queue_position(client, r):
    ids = [submit(client).get_json()["id"] for _ in range(3)]
    status = client.get(f"/status/{ids[0]}").get_json()
    assert status["queue_position"] == 1
    assert client.get(f"/status/{ids[2]}").get_json()["queue_position"] == 3
    assert status["type"] == "csm" and status["status"] == "queued"
    assert status["started_at"] is None and status["finished_at"] is None
    assert status["created_at"].endswith("Z")
    assert "error" not in status


def finish_job(r, settings, job_id, status, fields, worker="w1"):
    entry = jobstore.take(r, worker, 1)
    assert json.loads(entry)["id"] == job_id
    assert jobstore.claim(r, settings, worker, entry) == (1, "running")
    assert jobstore.transition(r, settings, job_id, status, fields, worker_id=worker, attempt=1)[0]
    jobstore.ack(r, worker, entry)


@pytest.mark.parametrize(("route", "status", "fields", "expected"), [
    ("/csm", "success", {"result_url": "http://x/y.mp3"}, {"result_url": "http://x/y.mp3"}),
    ("/portrait", "success", {"result_url": "http://x/y.mp4"}, {"result_url": "http://x/y.mp4"}),
    ("/whisper", "success", {"text": "hello world"}, {"text": "hello world"}),
    ("/analyze", "success", {"text": "1 face"}, {"text": "1 face"}),
    ("/csm", "failed", {"error": "CSM failed: boom"}, {"error": "CSM failed: boom"}),
])
def test_result_shapes(client, r, settings, route, status, fields, expected):
    job_id = submit(client, route, JOBS[route]).get_json()["id"]
    assert client.get(f"/result/{job_id}").status_code == 409
    assert "queued" in client.get(f"/result/{job_id}").get_json()["error"]
    finish_job(r, settings, job_id, status, fields)
    answer = client.get(f"/result/{job_id}")
    assert answer.status_code == 200
    assert answer.get_json() == {"id": job_id, "status": status, **expected}
    state = client.get(f"/status/{job_id}").get_json()
    assert state["status"] == status and state["finished_at"] and state["started_at"]
    assert ("error" in state) == (status == "failed")
    assert r.ttl(f"job:{job_id}") > 0  # finished records expire after RESULT_TTL


def test_running_status_shows_progress(client, r, settings):
    job_id = submit(client).get_json()["id"]
    jobstore.take(r, "w1", 1)
    jobstore.transition(r, settings, job_id, "running", {"worker": "w1"})
    jobstore.set_progress(r, job_id, 40)
    state = client.get(f"/status/{job_id}").get_json()
    assert state["status"] == "running" and state["progress"] == 40 and state["attempts"] == 1
    assert "queue_position" not in state
    assert client.get(f"/result/{job_id}").status_code == 409


def test_cancel_queued_job_stops_counting_in_the_queue(client, r):
    job_id = submit(client).get_json()["id"]
    other = submit(client).get_json()["id"]
    assert client.get(f"/status/{other}").get_json()["queue_position"] == 2
    answer = client.post(f"/cancel/{job_id}")
    assert answer.status_code == 200 and answer.get_json() == {"id": job_id, "status": "cancelled"}
    # the cancelled entry stays queued as a tombstone (no O(N) LREM) and no longer counts
    assert client.get(f"/status/{other}").get_json()["queue_position"] == 1
    assert client.get(f"/result/{job_id}").get_json() == {"id": job_id, "status": "cancelled",
                                                           "error": "cancelled by request"}
    assert client.post(f"/cancel/{job_id}").status_code == 409


def test_cancel_older_form(client):
    job_id = submit(client).get_json()["id"]
    assert client.post(f"/job/{job_id}", json={"status": "running"}).status_code == 400
    assert client.post(f"/job/{job_id}", json={"status": "cancelled"}).get_json()["status"] == "cancelled"


def test_cancel_running_job_flags_it(client, r, settings):
    job_id = submit(client).get_json()["id"]
    attempt, _status = jobstore.claim(r, settings, "w1", jobstore.take(r, "w1", 1))
    answer = client.post(f"/cancel/{job_id}").get_json()
    assert answer == {"id": job_id, "status": "running", "cancel_requested": True}
    assert jobstore.stop_requested(r, job_id)
    # a late success after the worker saw the cancel and finished it as cancelled is dropped
    assert jobstore.transition(r, settings, job_id, "cancelled", {"error": "cancelled by request"},
                               worker_id="w1", attempt=attempt) == (True, "cancelled")
    assert jobstore.transition(r, settings, job_id, "success", {"result_url": "http://x"},
                               worker_id="w1", attempt=attempt) == (False, "cancelled")
    assert client.get(f"/result/{job_id}").get_json()["status"] == "cancelled"


def test_cancel_of_taken_but_not_started_job(client, r, settings):
    job_id = submit(client).get_json()["id"]
    entry = jobstore.take(r, "w1", 1)  # taken, status still queued
    assert client.get(f"/status/{job_id}").get_json()["queue_position"] is None
    assert client.post(f"/cancel/{job_id}").get_json() == {"id": job_id, "status": "cancelled"}
    # the worker that took it finds it cancelled: it cannot start it, and giving it back drops it
    assert jobstore.transition(r, settings, job_id, "running", {"worker": "w1"}) == (False, "cancelled")
    jobstore.return_entry(r, "w1", entry)
    assert r.llen(config.QUEUE_KEY) == 0 and r.llen(jobstore.processing_key("w1")) == 0


def test_cancel_finished_job_409(client, r, settings):
    job_id = submit(client).get_json()["id"]
    finish_job(r, settings, job_id, "success", {"result_url": "http://x/y.mp3"})
    answer = client.post(f"/cancel/{job_id}")
    assert answer.status_code == 409 and "success" in answer.get_json()["error"]


@pytest.mark.parametrize(("method", "path"), [("get", "/status/{}"), ("get", "/result/{}"),
                                              ("post", "/cancel/{}")])
def test_unknown_and_malformed_ids(client, method, path):
    unknown = getattr(client, method)(path.format(uuid.uuid4()))
    assert unknown.status_code == 404 and "error" in unknown.get_json()
    for bad in ("nope", "123", str(uuid.uuid1()), str(uuid.uuid4()).upper()):
        answer = getattr(client, method)(path.format(bad))
        assert answer.status_code == 400 and "malformed job id" in answer.get_json()["error"]


def test_bad_bodies_never_reach_the_queue(client, r):
    cases = [
        (client.post("/csm", data="{not json", content_type="application/json"), 400, "malformed JSON"),
        (client.post("/csm", data="text=hi", content_type="application/x-www-form-urlencoded"), 415, "JSON"),
        (client.post("/csm", data="hi"), 415, "JSON"),
        (client.post("/csm", json={"text": "x", "notify_ulr": "http://e.com"}), 400, "notify_ulr"),
        (client.post("/csm", json={"text": "x", "topk": 0}), 400, "1 to 100"),
        (client.post("/portrait", json={"image_url": "file:///etc/passwd", "audio_url": "http://e.com/a"}),
         400, "image_url"),
        (client.post("/csm", json=[1, 2]), 400, "JSON object"),
        (client.post("/csm", data=b"\xff\xfe", content_type="application/json"), 400, "malformed JSON"),
    ]
    for answer, status, fragment in cases:
        assert answer.status_code == status, answer.get_json()
        assert fragment in answer.get_json()["error"]
        assert "Traceback" not in answer.get_data(as_text=True)
    assert r.llen(config.QUEUE_KEY) == 0
    assert not r.keys("job:*")


def test_the_sentence_limit_is_a_400_naming_the_field_and_queues_nothing(client, r):
    answer = client.post("/csm", json={"text": "Hi. " * 2499 + "Go."})
    assert answer.status_code == 400 and answer.get_json()["error"].startswith("text: 2500 sentences")
    answer = client.post("/csm", json={"monologue": "Yes. " * 2000})
    assert answer.status_code == 400 and answer.get_json()["error"].startswith("monologue: 2000 sentences")
    assert r.llen(config.QUEUE_KEY) == 0 and not r.keys("job:*")


def test_oversized_body_413(settings, r):
    client = api.create_app(dataclasses.replace(settings, max_content_length=1000)).test_client()
    answer = client.post("/csm", data=json.dumps({"text": "x" * 2000}), content_type="application/json")
    assert answer.status_code == 413 and "too large" in answer.get_json()["error"]
    assert r.llen(config.QUEUE_KEY) == 0


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nope").get_json() == {"error": "not found"}
    answer = client.get("/csm")
    assert answer.status_code == 405 and "not allowed" in answer.get_json()["error"]


def test_api_keys(settings):
    client = api.create_app(dataclasses.replace(settings, api_keys=("k1", "k2"))).test_client()
    assert client.post("/csm", json=CSM).status_code == 401
    assert client.post("/csm", json=CSM, headers={"X-C3-RENDER-KEY": "wrong"}).status_code == 401
    assert client.post("/csm", json=CSM, headers={"X-C3-RENDER-KEY": "k2"}).status_code == 200
    answer = client.post("/csm", json=CSM, headers={"Authorization": "Bearer k1"})
    assert answer.status_code == 200
    job_id = answer.get_json()["id"]
    assert client.get(f"/status/{job_id}").status_code == 401
    assert client.get(f"/status/{job_id}", headers={"Authorization": "Bearer k1"}).status_code == 200
    for open_route in ("/", "/healthz", "/readyz", "/openapi.json"):
        assert client.get(open_route).status_code == 200
    assert "k1" not in client.post("/csm", json=CSM).get_data(as_text=True)


def test_health_routes_and_openapi(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ready"}
    info = client.get("/").get_json()
    assert info["service"] == "c3-render" and "/csm" in info["submit"]
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")


def test_redis_down_gives_503_and_writes_nothing(redis_server, settings):
    client = api.create_app(settings).test_client()
    redis_server.stop()
    try:
        started = time.time()
        answer = client.post("/csm", json=CSM)
        assert answer.status_code == 503 and "Redis" in answer.get_json()["error"]
        assert time.time() - started < 5
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        assert client.get(f"/status/{uuid.uuid4()}").status_code == 503
    finally:
        redis_server.start()
    # and it comes back by itself
    assert client.post("/csm", json=CSM).status_code == 200


def test_idempotency_key(client, r):
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/csm", json=CSM, headers=headers)
    again = client.post("/csm", json=CSM, headers=headers)
    assert first.get_json()["id"] == again.get_json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert r.llen(config.QUEUE_KEY) == 1
    conflict = client.post("/csm", json={"text": "something else"}, headers=headers)
    assert conflict.status_code == 422 and "Idempotency-Key" in conflict.get_json()["error"]
    other = client.post("/csm", json=CSM, headers={"Idempotency-Key": "order-43"})
    assert other.get_json()["id"] != first.get_json()["id"]
    assert client.post("/csm", json=CSM, headers={"Idempotency-Key": "x" * 300}).status_code == 400


def test_idempotency_compares_the_validated_parameters_not_the_bytes(client, r):
    headers = {"Idempotency-Key": "order-null"}
    first = client.post("/csm", json={"text": "Hi there.", "voice": None}, headers=headers)
    assert first.status_code == 200
    for same in ({"text": "Hi there."}, {"voice": "random", "text": "Hi there.", "notify_url": None}):
        again = client.post("/csm", json=same, headers=headers)
        assert again.status_code == 200, again.get_json()
        assert again.get_json()["id"] == first.get_json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    whisper = {"Idempotency-Key": "order-lang"}
    tagged = client.post("/whisper", json={"audio_url": "https://example.com/a.mp3", "language": "pt-BR"},
                         headers=whisper).get_json()["id"]
    assert client.post("/whisper", json={"audio_url": "https://example.com/a.mp3", "language": "pt"},
                       headers=whisper).get_json()["id"] == tagged
    assert client.post("/csm", json={"text": "Hi there.", "voice": "conversational_a"},
                       headers=headers).status_code == 422
    assert r.llen(config.QUEUE_KEY) == 2


def test_a_replay_after_the_job_expired_queues_a_new_job(settings, r):
    short = dataclasses.replace(settings, result_ttl_s=1)
    client = api.create_app(short).test_client()
    headers = {"Idempotency-Key": "order-expired"}
    first = client.post("/csm", json=CSM, headers=headers).get_json()["id"]
    finish_job(r, short, first, "success", {"result_url": "http://x/y.mp3"})
    time.sleep(1.2)
    assert r.exists(f"job:{first}") == 0  # its retention ran out; the Idempotency-Key's 24 h did not
    again = client.post("/csm", json=CSM, headers=headers)
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
    second = again.get_json()["id"]
    assert second != first and again.get_json()["status"] == "queued"
    assert client.get(f"/status/{second}").get_json()["status"] == "queued"  # a job that exists
    replay = client.post("/csm", json=CSM, headers=headers)  # and the key now names the new job
    assert replay.get_json()["id"] == second and replay.headers["Idempotent-Replayed"] == "true"


def test_replays_and_conflicts_do_not_count_against_the_rate_limit(settings, r):
    client = api.create_app(dataclasses.replace(settings, rate_limit_per_minute=2)).test_client()
    headers = {"Idempotency-Key": "retry-me"}
    first = client.post("/csm", json=CSM, headers=headers)
    for _ in range(5):  # a client retrying after lost answers
        assert client.post("/csm", json=CSM, headers=headers).get_json()["id"] == first.get_json()["id"]
        assert client.post("/csm", json={"text": "Other."}, headers=headers).status_code == 422
    assert client.post("/csm", json=CSM).status_code == 200
    assert client.post("/csm", json=CSM).status_code == 429
    assert client.post("/csm", json=CSM, headers=headers).status_code == 200  # a replay, even now
    assert r.llen(config.QUEUE_KEY) == 2


def test_rate_limit(settings, r):
    client = api.create_app(dataclasses.replace(settings, rate_limit_per_minute=3)).test_client()
    codes = [client.post("/csm", json=CSM).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
    limited = client.post("/csm", json=CSM)
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert r.llen(config.QUEUE_KEY) == 3


def test_local_files_signed_urls(client, settings, r, tmp_path):
    secret = localfiles.file_url_secret(r, settings.file_url_secret)
    source = tmp_path / "x.mp3"
    source.write_bytes(b"ID3 fake mp3 bytes")
    url = storage.upload_result(settings, source, "abc.mp3", secret)
    assert url.startswith("http://127.0.0.1:8000/files/abc.mp3?")
    path = url[len("http://127.0.0.1:8000"):]
    answer = client.get(path)
    assert answer.status_code == 200 and answer.data == b"ID3 fake mp3 bytes"
    assert answer.mimetype == "audio/mpeg"
    tampered = path.replace("sig=", "sig=0")
    assert client.get(tampered).status_code == 403
    expired = localfiles.signed_file_url(settings, "abc.mp3", secret, 1, now=time.time() - 100)
    assert client.get(expired[len("http://127.0.0.1:8000"):]).status_code == 403
    assert client.get("/files/..%2Fsecret?expires=1&sig=0").status_code in (403, 404)


# --- issue 12: bad input, delivery history, re-sending a webhook, a full disk ---------------------------

@pytest.mark.parametrize("depth", [17, 5000])
def test_deeply_nested_json_is_a_400_naming_the_problem(client, r, depth, caplog):
    body = '{"text": "hi", "extra": ' + "[" * depth + "]" * depth + "}"
    answer = client.post("/csm", data=body, content_type="application/json")
    assert answer.status_code == 400
    assert answer.get_json() == {"error": "JSON nested too deeply (more than 16 levels of arrays and objects)"}
    assert r.llen(config.QUEUE_KEY) == 0
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text


@pytest.mark.parametrize(("body", "field"), [
    ('{"text": "bad \\ud800 text"}', "text"),
    ('{"monologue": ["fine", "\\udfff"]}', "monologue[1]"),
    ('{"text": "ok", "notify_url": "https://example.com/\\ud83d"}', "notify_url"),
])
def test_lone_surrogate_is_a_400_naming_the_field(client, r, body, field):
    answer = client.post("/csm", data=body, content_type="application/json")
    assert answer.status_code == 400
    error = answer.get_json()["error"]
    assert error.startswith(f"{field}: contains a lone UTF-16 surrogate"), error
    assert r.llen(config.QUEUE_KEY) == 0


def test_a_valid_surrogate_pair_is_accepted(client):
    answer = client.post("/csm", data='{"text": "emoji \\ud83d\\ude00 ok"}', content_type="application/json")
    assert answer.status_code == 200, answer.get_json()


def finished_with_webhook(client, r, settings, webhook_status):
    job_id = submit(client, body={**CSM, "notify_url": "https://example.com/hook"}).get_json()["id"]
    jobstore.transition(r, settings, job_id, "running", {"worker": "w"})
    jobstore.transition(r, settings, job_id, "success", {"result_url": "https://example.com/r.mp3"})
    raw = r.rpop(config.WEBHOOK_OUTBOX_KEY)
    if webhook_status != "pending":
        r.lpush(webhook_state.webhook_inflight_key("w"), raw)
        webhook_state.settle_webhook(r, "w", raw, job_id, webhook_status, 5, "receiver answered HTTP 500")
    return job_id, json.loads(raw)


def test_status_shows_the_delivery_history(client, r, settings):
    job_id, _entry = finished_with_webhook(client, r, settings, "failed")
    webhook = client.get(f"/status/{job_id}").get_json()["webhook"]
    assert webhook["status"] == "failed" and webhook["attempts"] == 5
    assert webhook["history"] == [{"at": webhook["history"][0]["at"], "attempt": 5, "outcome": "failed",
                                   "error": "receiver answered HTTP 500"}]
    assert webhook["history"][0]["at"].endswith("Z")


def test_resend_a_failed_webhook_with_the_same_id_and_body(client, r, settings):
    job_id, first = finished_with_webhook(client, r, settings, "failed")
    answer = client.post(f"/jobs/{job_id}/webhook")
    assert answer.status_code == 202
    assert answer.get_json() == {"id": job_id, "webhook": {"status": "pending"}}
    queued = [json.loads(e) for e in r.lrange(config.WEBHOOK_OUTBOX_KEY, 0, -1)]
    assert queued == [{**first, "attempt": 0}]  # same job id (webhook-id) and the same body
    status = client.get(f"/status/{job_id}").get_json()["webhook"]
    assert status["status"] == "pending" and status["attempts"] == 0
    assert [e["outcome"] for e in status["history"]] == ["failed", "resend requested"]
    # while it is being delivered, a second request changes nothing
    again = client.post(f"/jobs/{job_id}/webhook")
    assert again.status_code == 409 and "being delivered" in again.get_json()["error"]
    assert r.llen(config.WEBHOOK_OUTBOX_KEY) == 1


def test_resend_refusals(client, r, settings):
    queued = submit(client, body={**CSM, "notify_url": "https://example.com/hook"}).get_json()["id"]
    assert client.post(f"/jobs/{queued}/webhook").status_code == 409
    no_url = submit(client).get_json()["id"]
    jobstore.transition(r, settings, no_url, "running", {"worker": "w"})
    jobstore.transition(r, settings, no_url, "failed", {"error": "x"})
    answer = client.post(f"/jobs/{no_url}/webhook")
    assert answer.status_code == 409 and "notify_url" in answer.get_json()["error"]
    assert client.post(f"/jobs/{uuid.uuid4()}/webhook").status_code == 404
    assert client.post("/jobs/nope/webhook").status_code == 400
    delivered, _ = finished_with_webhook(client, r, settings, "delivered")
    assert client.post(f"/jobs/{delivered}/webhook").status_code == 202  # a receiver that lost it


def test_readyz_reports_a_full_disk(settings, r):
    full = api.create_app(dataclasses.replace(settings, min_free_disk_mb=10**12)).test_client()
    answer = full.get("/readyz")
    assert answer.status_code == 503
    error = answer.get_json()["error"]
    assert error.startswith("not ready: disk full: the output directory has") and "MIN_FREE_DISK_MB" in error
    assert settings.output_dir not in error
    assert api.create_app(settings).test_client().get("/readyz").status_code == 200
