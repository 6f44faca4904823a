"""Jobs belong to the API key that submitted them: on the Flask app with a real redis-server, two ordinary
keys and an admin key (C3_RENDER_ADMIN_KEYS). Another key's job is a 404 exactly like an unknown id on
every route that names a job; /jobs lists the caller's own jobs from a per-owner index (O(limit));
/overview is for admin keys; without keys everything is as before."""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid

import pytest

import app as api
import config
import jobspec
import jobstore

ALICE, BOB, ROOT_KEY = "alice-key-0001", "bob-key-0002", "root-key-0003"
CSM = {"text": "Hello there."}


def key(value: str) -> dict[str, str]:
    return {"X-C3-RENDER-KEY": value}


def key_id(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


@pytest.fixture
def keyed(settings):
    return dataclasses.replace(settings, api_keys=(ALICE, BOB), admin_keys=(ROOT_KEY,))


@pytest.fixture
def client(keyed):
    return api.create_app(keyed).test_client()


def submit(client, who: str, route: str = "/csm", body: dict | None = None, **headers: str) -> str:
    answer = client.post(route, json=body or CSM, headers={**key(who), **headers})
    assert answer.status_code == 200, answer.json
    return answer.json["id"]


def finish(r, settings, job_id: str, status: str = "failed", fields: dict | None = None) -> None:
    entry = jobstore.get_job(r, job_id)["queue_entry"]
    r.lrem(config.QUEUE_KEY, 1, entry)
    r.lpush(jobstore.processing_key("w1"), entry)
    attempt, _ = jobstore.claim(r, settings, "w1", entry)
    assert jobstore.transition(r, settings, job_id, status, fields or {"error": "boom"}, worker_id="w1",
                               attempt=attempt)[0]


def job_routes(job_id: str) -> list[tuple[str, str, dict | None]]:
    """Every route that names a job: (method, path, JSON body)."""
    return [("GET", f"/status/{job_id}", None), ("GET", f"/result/{job_id}", None),
            ("GET", f"/jobs/{job_id}", None), ("GET", f"/events/{job_id}", None),
            ("POST", f"/cancel/{job_id}", None), ("POST", f"/job/{job_id}", {"status": "cancelled"}),
            ("POST", f"/jobs/{job_id}/webhook", None)]


def test_another_keys_job_is_a_404_like_an_unknown_id_and_nothing_changes(client, r, keyed):
    mine = submit(client, ALICE, body={**CSM, "notify_url": "https://example.com/hook"})
    finished = submit(client, ALICE, body={**CSM, "notify_url": "https://example.com/hook"})
    finish(r, keyed, finished)
    before = {job_id: r.hgetall(jobstore.job_key(job_id)) for job_id in (mine, finished)}
    for job_id in (mine, finished):
        unknown = str(uuid.uuid4())
        for (method, path, body), (_, unknown_path, _) in zip(job_routes(job_id), job_routes(unknown), strict=True):
            answer = client.open(path, method=method, json=body, headers=key(BOB))
            expected = client.open(unknown_path, method=method, json=body, headers=key(BOB))
            assert answer.status_code == expected.status_code == 404, (path, answer.json)
            assert answer.json["error"] == expected.json["error"].replace(unknown, job_id), path
    assert {job_id: r.hgetall(jobstore.job_key(job_id)) for job_id in (mine, finished)} == before
    assert r.llen(config.WEBHOOK_OUTBOX_KEY) == 1  # only the finished job's own webhook, not resent
    # the owner reaches both: its queued job answers, cancels; its finished job resends its webhook
    assert client.get(f"/status/{mine}", headers=key(ALICE)).json["status"] == "queued"
    assert client.get(f"/result/{mine}", headers=key(ALICE)).status_code == 409
    assert client.get(f"/jobs/{finished}", headers=key(ALICE)).json["error"] == "boom"
    assert client.post(f"/cancel/{mine}", headers=key(ALICE)).json["status"] == "cancelled"
    with client.get(f"/events/{mine}", headers=key(ALICE)) as stream:
        assert stream.status_code == 200 and "event: end" in stream.get_data(as_text=True)
    resend = client.post(f"/jobs/{finished}/webhook", headers=key(ALICE))  # its first delivery is pending
    assert resend.status_code == 409 and "being delivered" in resend.json["error"]


def test_the_record_keeps_the_keys_id_never_the_key(client, r):
    job_id = submit(client, ALICE)
    record = r.hgetall(jobstore.job_key(job_id))
    assert record["owner"] == key_id(ALICE)
    assert not any(ALICE in value for value in record.values())
    assert r.zscore(config.JOBS_BY_OWNER_KEY.format(owner=key_id(ALICE)), job_id) is not None


def test_jobs_lists_only_the_callers_jobs_and_an_admin_every_job(client, r, keyed):
    alice = [submit(client, ALICE, route, body) for route, body in (
        ("/csm", CSM), ("/analyze", {"image_url": "https://example.com/a.jpg"}), ("/csm", CSM))]
    bob = [submit(client, BOB) for _ in range(2)]
    finish(r, keyed, alice[0])

    def listed(who: str, query: str = "", limit: int = 2) -> list[str]:
        seen, cursor = [], None
        while True:
            page = client.get(f"/jobs?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else ""),
                              headers=key(who)).json
            seen += [job["id"] for job in page["jobs"]]
            cursor = page["next_cursor"]
            if not cursor:
                return seen

    assert listed(ALICE) == alice[::-1]
    assert listed(BOB) == bob[::-1]
    assert listed(ALICE, "&type=csm") == [alice[2], alice[0]]
    assert listed(ALICE, "&status=queued") == [alice[2], alice[1]]
    assert listed(ALICE, "&status=failed&type=csm") == [alice[0]]
    assert listed(BOB, "&status=failed") == []
    assert listed(ROOT_KEY, limit=50) == (alice + bob)[::-1]


def test_a_keys_page_reads_its_own_index_not_every_job(client, r):
    """O(limit) for a key too: with 2,000 newer jobs of another key, a page of 5 reads a few records."""
    own = [submit(client, ALICE) for _ in range(8)]
    other = key_id(BOB)
    now = time.time()
    for n in range(2000):
        jobstore.submit(r, "csm", {"text": "x", "max_time": 60, "complete_in": 600}, now=now + 1 + n, owner=other)
    r.config_resetstat()
    page = client.get("/jobs?limit=5", headers=key(ALICE)).json
    assert [job["id"] for job in page["jobs"]] == own[::-1][:5] and page["next_cursor"]
    reads = int(r.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))
    assert reads <= 5 + 16, reads


def test_finishing_trims_the_owner_index_like_the_others(r, settings):
    settings = dataclasses.replace(settings, result_ttl_s=60)
    params = {"text": "x", "max_time": 60, "complete_in": 600}
    ancient = time.time() - 60 - jobspec.INDEX_HORIZON_S - 10
    old, _ = jobstore.submit(r, "csm", params, now=ancient, owner="0123456789abcdef")
    job_id, _ = jobstore.submit(r, "csm", params, owner="0123456789abcdef")
    finish(r, settings, job_id, "success", {"result_url": "http://x/y.mp3"})
    index = config.JOBS_BY_OWNER_KEY.format(owner="0123456789abcdef")
    assert r.zscore(index, old) is None and r.zscore(index, job_id) is not None


def test_overview_is_for_admin_keys(client):
    refused = client.get("/overview", headers=key(ALICE))
    assert refused.status_code == 403 and "C3_RENDER_ADMIN_KEYS" in refused.json["error"]
    assert client.get("/overview", headers=key(ROOT_KEY)).status_code == 200
    assert client.get("/overview").status_code == 401


def test_an_admin_key_reads_and_acts_on_every_job(client, r):
    job_id = submit(client, ALICE)
    assert client.get(f"/status/{job_id}", headers={"Authorization": f"Bearer {ROOT_KEY}"}).status_code == 200
    assert client.get(f"/jobs/{job_id}", headers=key(ROOT_KEY)).json["id"] == job_id
    assert client.post(f"/cancel/{job_id}", headers=key(ROOT_KEY)).json["status"] == "cancelled"
    own = submit(client, ROOT_KEY)  # an admin's own job is its own, not anyone's
    assert r.hget(jobstore.job_key(own), "owner") == key_id(ROOT_KEY)
    assert client.get(f"/status/{own}", headers=key(ALICE)).status_code == 404


def test_jobs_from_before_keys_are_for_admins_only(settings, r):
    open_client = api.create_app(settings).test_client()
    job_id = open_client.post("/csm", json=CSM).json["id"]
    assert r.hget(jobstore.job_key(job_id), "owner") == ""
    client = api.create_app(dataclasses.replace(settings, api_keys=(ALICE,), admin_keys=(ROOT_KEY,))).test_client()
    assert client.get(f"/status/{job_id}", headers=key(ALICE)).status_code == 404
    assert client.get("/jobs", headers=key(ALICE)).json["jobs"] == []
    assert client.get(f"/status/{job_id}", headers=key(ROOT_KEY)).status_code == 200


def test_without_keys_everything_is_as_before(settings, r):
    client = api.create_app(settings).test_client()
    ids = [client.post("/csm", json=CSM).json["id"] for _ in range(2)]
    assert [job["id"] for job in client.get("/jobs").json["jobs"]] == ids[::-1]
    assert client.get("/overview").status_code == 200
    assert client.get(f"/status/{ids[0]}").status_code == 200
    assert client.post(f"/cancel/{ids[0]}").json["status"] == "cancelled"
    assert not r.keys(config.JOBS_BY_OWNER_KEY.format(owner="*"))


def test_only_admin_keys_set_is_keys_on(settings):
    client = api.create_app(dataclasses.replace(settings, admin_keys=(ROOT_KEY,))).test_client()
    assert client.post("/csm", json=CSM).status_code == 401
    assert client.get("/").json["auth_required"] is True
    assert submit(client, ROOT_KEY)


def test_idempotency_and_rate_limits_stay_per_key(keyed, r):
    client = api.create_app(dataclasses.replace(keyed, rate_limit_per_minute=2)).test_client()
    first = submit(client, ALICE, **{"Idempotency-Key": "order-1"})
    assert submit(client, ALICE, **{"Idempotency-Key": "order-1"}) == first
    others = submit(client, BOB, **{"Idempotency-Key": "order-1"})
    assert others != first and r.hget(jobstore.job_key(others), "owner") == key_id(BOB)
    assert client.post("/csm", json=CSM, headers=key(ALICE)).status_code in (200, 429)
    assert client.post("/csm", json=CSM, headers=key(ALICE)).status_code == 429
    assert client.post("/csm", json=CSM, headers=key(BOB)).status_code == 200


def test_admin_keys_alone_satisfy_require_api_keys_and_silence_the_keyless_warning(monkeypatch):
    for name in ("C3_RENDER_API_KEYS", "C3_RENDER_ADMIN_KEYS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REQUIRE_API_KEYS", "1")
    with pytest.raises(SystemExit):
        config.load()
    monkeypatch.setenv("C3_RENDER_ADMIN_KEYS", ROOT_KEY)
    loaded = config.load()
    assert loaded.admin_keys == (ROOT_KEY,) and ROOT_KEY not in repr(loaded)
    assert config.keyless_exposure_warning(loaded, ["0.0.0.0:8000"]) is None
