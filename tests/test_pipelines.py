"""Pipelines on the Flask app with a real redis-server, the worker's side played by the job store's own
calls (claim, transition): every 400 and that it writes nothing, the steps as ordinary jobs (waiting ones
in no queue), the hand-off of outputs in the very transition that finishes a step (queued at the end taken
next, preferring the parent's node), the cascade of a failure or cancel, the pipeline's end and its one
webhook, idempotency, tenancy, expiry, /events of a pipeline. The worker's reading of a stored result is
tested here too (local files and a real S3-compatible server)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import uuid

import pytest

import app as api
import config
import jobspec
import jobstore
import media_check
import pipelines
import storage
import webhook_state

FACE = "https://example.com/face.jpg"
TALK = {"steps": {"speech": {"type": "csm", "text": "Hello there.", "voice": "conversational_a"},
                  "video": {"type": "portrait", "image_url": FACE, "audio_url": "{{speech.result_url}}"}},
        "notify_url": "https://example.com/hook"}
ALICE, BOB = "alice-key-0001", "bob-key-0002"


@pytest.fixture
def client(settings):
    return api.create_app(settings).test_client()


def submit(client, body: dict, **headers: str) -> dict:
    answer = client.post("/pipelines", json=body, headers=headers)
    assert answer.status_code == 200, answer.json
    return answer.json


def run_step(r, settings, job_id: str, status: str, fields: dict, worker: str = "w1") -> None:
    """What a worker does: take the job's entry (it must be the one taken next), claim it, settle it."""
    entry = jobstore.take(r, worker, 1)
    assert entry is not None and json.loads(entry)["id"] == job_id, (entry, job_id)
    attempt, _ = jobstore.claim(r, settings, worker, entry)
    assert attempt == 1
    assert jobstore.transition(r, settings, job_id, status, fields, worker_id=worker, attempt=attempt)[0]
    jobstore.ack(r, worker, entry)


def keys_written(r) -> list[str]:
    return sorted(k for k in r.keys("*") if not k.startswith("config:"))


# --- refused before anything is written ---------------------------------------------------------

def step(job_type: str, **fields) -> dict:
    return {"type": job_type, **fields}


REFUSED = {
    "unknown step": ({"video": step("portrait", image_url=FACE, audio_url="{{speach.result_url}}")},
                     "steps.video.audio_url: {{speach.result_url}} names no step of this pipeline"),
    "cycle": ({"a": step("csm", text="{{b.text}}"), "b": step("whisper", audio_url="{{a.result_url}}")},
              "makes a cycle (a -> b -> a)"),
    "self reference": ({"a": step("whisper", audio_url="{{a.result_url}}")}, "steps.a.audio_url"),
    "output the type lacks": ({"speech": step("csm", text="Hi."), "say": step("csm", text="{{speech.text}}")},
                              "steps.say.text: {{speech.text}}: a csm step has no output 'text'; it gives result_url"),
    "text into a URL field": ({"hear": step("whisper", audio_url="https://example.com/a.mp3"),
                               "video": step("portrait", image_url=FACE, audio_url="{{hear.text}}")},
                              "steps.video.audio_url: {{hear.text}} is text and audio_url takes a URL"),
    "media into a text field": ({"speech": step("csm", text="Hi."), "say": step("csm", text="{{speech.result_url}}")},
                                "steps.say.text: {{speech.result_url}} is a media file (audio) and text takes text"),
    "reference inside a longer string": ({"hear": step("whisper", audio_url="https://example.com/a.mp3"),
                                          "say": step("csm", text="She said: {{hear.text}}")},
                                         "steps.say.text: a reference must be the whole value"),
    "more than 10 steps": ({f"s{n}": step("csm", text="Hi.") for n in range(11)}, "steps: 11 steps, more than 10"),
    "a field its route refuses": ({"speech": step("csm", text="Hi.", temperature=5)},
                                  "steps.speech: temperature: 5 is out of range"),
    "media into an image field": ({"speech": step("csm", text="Hi."),
                                   "look": step("analyze", image_url="{{speech.result_url}}")},
                                  "steps.look.image_url: {{speech.result_url}} is audio and image_url takes an image"),
    "reference into notify_url": ({"speech": step("csm", text="Hi."),
                                   "video": step("portrait", image_url=FACE, audio_url=FACE,
                                                 notify_url="{{speech.result_url}}")},
                                  "steps.video.notify_url: takes no reference"),
    "unknown type": ({"speech": step("tts", text="Hi.")}, "steps.speech.type: required, one of csm"),
    "bad step name": ({"a.b": step("csm", text="Hi.")}, "is not a step name"),
    "no steps": ({}, "steps: required"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_every_refusal_names_the_step_and_field_and_writes_nothing(client, r, case):
    steps, message = REFUSED[case]
    before = keys_written(r)
    answer = client.post("/pipelines", json={"steps": steps})
    assert answer.status_code == 400, answer.json
    assert message in answer.json["error"], answer.json["error"]
    assert keys_written(r) == before  # no job, no pipeline, no queue entry


def test_a_valid_body_around_unknown_fields_is_refused_too(client):
    answer = client.post("/pipelines", json={**TALK, "priority": 1})
    assert answer.status_code == 400 and "unknown field(s): priority" in answer.json["error"]
    answer = client.post("/pipelines", json={"steps": {"speech": step("csm", text="Hi.", notify_ulr=FACE)}})
    assert answer.status_code == 400 and answer.json["error"].startswith("steps.speech: unknown field(s): notify_ulr")


# --- written: every step a job, the waiting ones in no queue ------------------------------------

def test_submit_writes_the_pipeline_and_its_steps_as_jobs(client, r):
    other = client.post("/csm", json={"text": "Queued before."}).json["id"]
    answer = submit(client, TALK)
    assert answer["status"] == "queued" and list(answer["steps"]) == ["speech", "video"]
    speech, video = answer["steps"]["speech"], answer["steps"]["video"]
    status = client.get(f"/status/{speech}").json
    assert status["status"] == "queued" and status["pipeline"] == answer["id"] and status["step"] == "speech"
    assert status["queue_position"] == 2  # behind the job queued before it
    waiting = client.get(f"/status/{video}").json
    assert waiting["status"] == "waiting" and waiting["waiting_for"] == ["speech"] and "queue_position" not in waiting
    assert [json.loads(e)["id"] for e in r.lrange(config.QUEUE_KEY, 0, -1)] == [speech, other]
    assert [j["id"] for j in client.get("/jobs?status=waiting").json["jobs"]] == [video]
    shown = client.get(f"/pipelines/{answer['id']}").json
    assert shown["status"] == "queued" and shown["steps"]["video"]["status"] == "waiting"
    assert shown["webhook"]["status"] == "waiting"
    params = json.loads(r.hget(f"job:{video}", "params"))
    assert params == {"image_url": FACE}  # the audio_url comes from the speech step
    assert client.get("/pipelines").json["pipelines"][0]["id"] == answer["id"]


def test_a_success_hands_its_output_on_in_the_same_step_and_queues_next_at_the_front(client, r, settings):
    answer = submit(client, TALK)
    speech, video = answer["steps"]["speech"], answer["steps"]["video"]
    later = [client.post("/csm", json={"text": f"Later {n}."}).json["id"] for n in range(3)]
    entry = jobstore.take(r, "w1", 1)
    attempt, _ = jobstore.claim(r, settings, "w1", entry)
    assert client.get(f"/pipelines/{answer['id']}").json["status"] == "running"
    done, _ = jobstore.transition(r, settings, speech, "success",
                                  {"result_url": "https://files.example/speech.mp3", "node_id": "node-1"},
                                  worker_id="w1", attempt=attempt)
    assert done
    # no other call: the portrait got its input and runs next, before the three jobs queued earlier
    record = jobstore.get_job(r, video)
    assert record["status"] == "queued" and record["prefer_node"] == "node-1"
    assert json.loads(record["params"])["audio_url"] == f"{jobspec.STORED_RESULT_PREFIX}{speech}.mp3"
    assert client.get(f"/status/{video}").json["queue_position"] == 1
    assert [json.loads(e)["id"] for e in r.lrange(config.QUEUE_KEY, 0, -1)] == [*reversed(later), video]
    assert [h["status"] for h in client.get(f"/jobs/{video}").json["history"]] == ["waiting", "queued"]
    jobstore.ack(r, "w1", entry)
    run_step(r, settings, video, "success", {"result_url": "https://files.example/talk.mp4"})
    shown = client.get(f"/pipelines/{answer['id']}").json
    assert shown["status"] == "success" and shown["finished_at"]
    assert shown["steps"]["video"]["result_url"] == "https://files.example/talk.mp4"
    hooks = [json.loads(e) for e in r.lrange(config.WEBHOOK_OUTBOX_KEY, 0, -1)]
    assert [h["job_id"] for h in hooks] == [answer["id"]]  # one webhook: the pipeline's (no step has its own)
    body = json.loads(hooks[0]["body"])
    assert hooks[0]["record"] == f"pipeline:{answer['id']}"
    assert body == {"id": answer["id"], "status": "success",
                    "steps": {"speech": {"id": speech, "status": "success",
                                         "result_url": "https://files.example/speech.mp3"},
                              "video": {"id": video, "status": "success",
                                        "result_url": "https://files.example/talk.mp4"}}}
    ttl = settings.result_ttl_s
    for key in (f"pipeline:{answer['id']}", f"job:{speech}", f"job:{video}", f"job:{speech}:history"):
        assert ttl - 5 <= r.ttl(key) <= ttl  # expire together, RESULT_TTL after the pipeline finished


def test_text_is_copied_into_the_next_steps_parameters(client, r, settings):
    answer = submit(client, {"steps": {"transcribe": step("whisper", audio_url="https://example.com/a.mp3"),
                                       "say": step("csm", text="{{transcribe.text}}", voice="conversational_b")}})
    run_step(r, settings, answer["steps"]["transcribe"], "success", {"text": "Heard / said: \"yes\"."})
    params = json.loads(jobstore.get_job(r, answer["steps"]["say"])["params"])
    assert params["text"] == "Heard / said: \"yes\"." and params["voice"] == "conversational_b"
    assert params["temperature"] == 0.9 and params["topk"] == 50  # the route's defaults, kept through Lua


def test_a_step_waits_for_all_its_inputs(client, r, settings):
    body = {"steps": {"hear": step("whisper", audio_url="https://example.com/a.mp3"),
                      "speech": step("csm", text="Hi."),
                      "clone": step("csm", text="{{hear.text}}", voice="clone",
                                    reference_audio_url="{{speech.result_url}}", reference_text="Hi.")}}
    answer = submit(client, body)
    ids = answer["steps"]
    assert client.get(f"/status/{ids['clone']}").json["waiting_for"] == ["hear", "speech"]
    run_step(r, settings, ids["hear"], "success", {"text": "Hello."})
    assert jobstore.get_job(r, ids["clone"])["status"] == "waiting"
    run_step(r, settings, ids["speech"], "success", {"result_url": "https://files.example/s.mp3"})
    assert jobstore.get_job(r, ids["clone"])["status"] == "queued"


# --- failures and cancels cascade -----------------------------------------------------------------

CHAIN = {"steps": {"speech": step("csm", text="Hello."),
                   "hear": step("whisper", audio_url="{{speech.result_url}}", notify_url="https://example.com/h"),
                   "say": step("csm", text="{{hear.text}}"),
                   "other": step("analyze", image_url=FACE)},
         "notify_url": "https://example.com/pipeline"}


def test_a_failure_fails_every_step_downstream_and_the_pipeline_with_its_last_step(client, r, settings):
    answer = submit(client, CHAIN)
    ids = answer["steps"]
    run_step(r, settings, ids["speech"], "failed", {"error": "speech failed: the GPU node refused the connection"})
    for name in ("hear", "say"):  # transitively, in the same step
        record = jobstore.get_job(r, ids[name])
        assert record["status"] == "failed" and record["finished_at"]
        assert record["error"] == 'upstream step "speech" failed: speech failed: the GPU node refused the connection'
    assert client.get(f"/pipelines/{answer['id']}").json["status"] == "running"  # "other" does not depend on it
    hooks = [json.loads(e) for e in r.lrange(config.WEBHOOK_OUTBOX_KEY, 0, -1)]
    assert [h["job_id"] for h in hooks] == [ids["hear"]]  # the failed step's own webhook
    assert json.loads(hooks[0]["body"])["error"].startswith('upstream step "speech" failed')
    run_step(r, settings, ids["other"], "success", {"text": "1 face"})
    shown = client.get(f"/pipelines/{answer['id']}").json
    assert shown["status"] == "failed"
    assert shown["error"] == 'step "speech" failed: speech failed: the GPU node refused the connection'
    body = json.loads(json.loads(r.lindex(config.WEBHOOK_OUTBOX_KEY, 0))["body"])
    assert body["status"] == "failed" and body["steps"]["other"] == {"id": ids["other"], "status": "success",
                                                                     "text": "1 face"}
    assert body["steps"]["say"]["error"].startswith('upstream step "speech" failed')
    assert r.llen(config.QUEUE_KEY) == 0 and r.zcard(config.JOBS_BY_STATUS_KEY.format(status="waiting")) == 0


def test_cancelling_a_step_fails_its_dependents_naming_it(client, r):
    answer = submit(client, TALK)
    assert client.post(f"/cancel/{answer['steps']['speech']}").json["status"] == "cancelled"
    video = client.get(f"/status/{answer['steps']['video']}").json
    assert video["status"] == "failed" and video["error"] == 'upstream step "speech" was cancelled'
    shown = client.get(f"/pipelines/{answer['id']}").json
    assert shown["status"] == "failed" and shown["error"] == 'step "speech" was cancelled'


def test_cancelling_the_pipeline_cancels_every_unfinished_step(client, r, settings):
    answer = submit(client, CHAIN)
    ids = answer["steps"]
    entry = jobstore.take(r, "w1", 1)
    jobstore.claim(r, settings, "w1", entry)  # speech runs
    run_step(r, settings, ids["other"], "success", {"text": "done"}, worker="w2")  # one step finished already
    cancelled = client.post(f"/pipelines/{answer['id']}/cancel").json
    assert cancelled == {"id": answer["id"], "status": "running", "cancel_requested": True}
    assert jobstore.stop_requested(r, ids["speech"])  # as a job cancel asks a running job's worker
    for name in ("hear", "say"):
        assert client.get(f"/status/{ids[name]}").json["status"] == "cancelled"
    attempt = int(jobstore.get_job(r, ids["speech"])["attempts"])
    jobstore.transition(r, settings, ids["speech"], "cancelled", {"error": "cancelled by request"}, worker_id="w1",
                        attempt=attempt)
    shown = client.get(f"/pipelines/{answer['id']}").json
    assert shown["status"] == "cancelled" and shown["steps"]["other"]["status"] == "success"
    body = json.loads(json.loads(r.lindex(config.WEBHOOK_OUTBOX_KEY, 0))["body"])
    # as a job's webhook says a cancel: failed, with the reason; so are the cancelled steps
    assert body == {"id": answer["id"], "status": "failed", "error": "cancelled by request",
                    "steps": {"speech": {"id": ids["speech"], "status": "failed", "error": "cancelled by request"},
                              "hear": {"id": ids["hear"], "status": "failed", "error": "cancelled by request"},
                              "say": {"id": ids["say"], "status": "failed", "error": "cancelled by request"},
                              "other": {"id": ids["other"], "status": "success", "text": "done"}}}
    assert client.post(f"/pipelines/{answer['id']}/cancel").status_code == 409


def test_a_pipelines_failed_webhook_is_sent_again_with_the_same_id_and_body(client, r, settings):
    answer = submit(client, {"steps": {"speech": step("csm", text="Hi.")}, "notify_url": "https://example.com/h"})
    unfinished = client.post(f"/pipelines/{answer['id']}/webhook")
    assert unfinished.status_code == 409 and "the pipeline has not finished" in unfinished.json["error"]
    run_step(r, settings, answer["steps"]["speech"], "success", {"result_url": "https://files.example/s.mp3"})
    first = r.lindex(config.WEBHOOK_OUTBOX_KEY, 0)
    # a worker takes it and it fails for good
    taken = r.lmove(config.WEBHOOK_OUTBOX_KEY, webhook_state.webhook_inflight_key("w1"), "RIGHT", "LEFT")
    assert webhook_state.settle_webhook(r, "w1", taken, answer["id"], "failed", 5, "receiver answered HTTP 500",
                                        record_key=f"pipeline:{answer['id']}")
    assert client.get(f"/pipelines/{answer['id']}").json["webhook"]["status"] == "failed"
    resent = client.post(f"/pipelines/{answer['id']}/webhook")
    assert resent.status_code == 202 and resent.json == {"id": answer["id"], "webhook": {"status": "pending"}}
    queued = [json.loads(e) for e in r.lrange(config.WEBHOOK_OUTBOX_KEY, 0, -1)]
    assert queued == [json.loads(first)]  # the same webhook-id (the pipeline id), body and record, attempt 0
    assert queued[0]["job_id"] == answer["id"] and queued[0]["record"] == f"pipeline:{answer['id']}"
    webhook = client.get(f"/pipelines/{answer['id']}").json["webhook"]
    assert webhook["status"] == "pending" and [e["outcome"] for e in webhook["history"]] == ["failed",
                                                                                             "resend requested"]
    busy = client.post(f"/pipelines/{answer['id']}/webhook")
    assert busy.status_code == 409 and "being delivered" in busy.json["error"]
    no_url = submit(client, {"steps": {"speech": step("csm", text="Hi.")}})
    run_step(r, settings, no_url["steps"]["speech"], "success", {"result_url": "https://files.example/t.mp3"})
    refused = client.post(f"/pipelines/{no_url['id']}/webhook")
    assert refused.status_code == 409 and "no notify_url" in refused.json["error"]
    assert client.post(f"/pipelines/{uuid.uuid4()}/webhook").status_code == 404


# --- idempotency, tenancy, events -----------------------------------------------------------------

def test_idempotency_key_works_as_on_the_job_routes(client, r):
    first = submit(client, TALK, **{"Idempotency-Key": "talk-1"})
    again = client.post("/pipelines", json={**TALK, "steps": {**TALK["steps"], "speech": {
        **TALK["steps"]["speech"], "temperature": 0.9}}}, headers={"Idempotency-Key": "talk-1"})  # the default
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json == first
    assert r.zcard(config.PIPELINES_INDEX_KEY) == 1 and r.llen(config.QUEUE_KEY) == 1
    other = client.post("/pipelines", json={"steps": {"speech": step("csm", text="Other.")}},
                        headers={"Idempotency-Key": "talk-1"})
    assert other.status_code == 422
    job_key = client.post("/csm", json={"text": "Hi."}, headers={"Idempotency-Key": "talk-1"})
    assert job_key.status_code == 422  # the same key on a job route is another request


def test_another_keys_pipeline_is_a_404_like_an_unknown_id(settings, r):
    keyed = api.create_app(dataclasses.replace(settings, api_keys=(ALICE, BOB))).test_client()
    alice, bob = {"X-C3-RENDER-KEY": ALICE}, {"X-C3-RENDER-KEY": BOB}
    answer = keyed.post("/pipelines", json=TALK, headers=alice).json
    unknown = str(uuid.uuid4())
    for method, path in (("GET", "/pipelines/{}"), ("POST", "/pipelines/{}/cancel"), ("GET", "/events/{}"),
                         ("POST", "/pipelines/{}/webhook")):
        mine = keyed.open(path.format(answer["id"]), method=method, headers=bob)
        none = keyed.open(path.format(unknown), method=method, headers=bob)
        assert mine.status_code == none.status_code == 404, (path, mine.json)
        assert mine.json["error"] == none.json["error"].replace(unknown, answer["id"])
    assert keyed.get(f"/status/{answer['steps']['speech']}", headers=bob).status_code == 404
    assert keyed.get("/pipelines", headers=bob).json["pipelines"] == []
    assert keyed.get(f"/pipelines/{answer['id']}", headers=alice).status_code == 200
    assert jobstore.get_job(r, answer["steps"]["video"])["status"] == "waiting"  # bob's cancel changed nothing


def test_listing_pipelines_pages_newest_first_by_owner_and_drops_expired_ones(settings, r):
    keyed = api.create_app(dataclasses.replace(settings, api_keys=(ALICE, BOB), admin_keys=("admin-key-0003",)))
    client = keyed.test_client()
    alice, bob, admin = ({"X-C3-RENDER-KEY": key} for key in (ALICE, BOB, "admin-key-0003"))
    one = {"steps": {"speech": step("csm", text="Hi.")}}
    mine = [client.post("/pipelines", json=one, headers=alice).json["id"] for _ in range(3)]
    theirs = [client.post("/pipelines", json=one, headers=bob).json["id"] for _ in range(2)]
    seen, cursor = [], None
    while True:
        page = client.get("/pipelines?limit=2" + (f"&cursor={cursor}" if cursor else ""), headers=alice).json
        seen.append([p["id"] for p in page["pipelines"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [mine[::-1][:2], mine[::-1][2:]]  # newest first, the key's own
    every = client.get("/pipelines?limit=100", headers=admin).json
    assert [p["id"] for p in every["pipelines"]] == (mine + theirs)[::-1] and every["next_cursor"] is None
    assert every["pipelines"][0]["steps"]["speech"]["status"] == "queued"
    r.delete(pipelines.pipeline_key(mine[1]))  # as when its record expired
    assert [p["id"] for p in client.get("/pipelines", headers=alice).json["pipelines"]] == [mine[2], mine[0]]
    owner_index = config.PIPELINES_BY_OWNER_KEY.format(owner=r.hget(pipelines.pipeline_key(mine[0]), "owner"))
    assert r.zscore(owner_index, mine[1]) is None  # dropped from the index it was read from
    assert client.get("/pipelines?limit=0", headers=alice).status_code == 400
    assert client.get("/pipelines?cursor=nonsense", headers=alice).status_code == 400


def test_events_of_a_pipeline_end_with_its_final_object(client, r, settings):
    answer = submit(client, {"steps": {"speech": step("csm", text="Hi.")}})
    run_step(r, settings, answer["steps"]["speech"], "success", {"result_url": "https://files.example/a.mp3"})
    response = client.get(f"/events/{answer['id']}")
    text = response.get_data(as_text=True)
    assert f": following pipeline {answer['id']}" in text
    event = [block for block in text.split("\n\n") if block.startswith("event: end")][0]
    ident = event.split("\n")[1].removeprefix("id: ")
    data = json.loads(event.split("\n")[2].removeprefix("data: "))
    assert data["status"] == "success" and data["steps"]["speech"]["result_url"] == "https://files.example/a.mp3"
    assert client.get(f"/events/{answer['id']}", headers={"Last-Event-ID": ident}).status_code == 204


# --- the worker reads an earlier step's stored result directly --------------------------------------

@pytest.fixture
def speech_mp3(tmp_path):
    path = tmp_path / "speech.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=300:duration=1.5", str(path)],
                   check=True, timeout=60)
    return path


def test_a_stored_result_is_read_from_the_output_directory_and_checked(settings, speech_mp3, tmp_path):
    job_id = str(uuid.uuid4())
    storage.upload_result(settings, speech_mp3, f"{job_id}.mp3", b"secret")
    stored = {"audio_url": f"{jobspec.STORED_RESULT_PREFIX}{job_id}.mp3"}
    work = tmp_path / "work"
    work.mkdir()
    settings = dataclasses.replace(settings, url_allowlist=())  # nothing is fetched over the network
    inputs = media_check.fetch_inputs(settings, "whisper", stored, job_id, work)
    assert inputs["audio"].read_bytes() == speech_mp3.read_bytes()
    with pytest.raises(storage.StorageError, match="audio_url: the earlier step's result is no longer"):
        media_check.fetch_inputs(settings, "whisper", {"audio_url": f"{jobspec.STORED_RESULT_PREFIX}gone.mp3"},
                                 job_id, work)
    (tmp_path / "output" / f"{job_id}.mp3").write_text("<html>not audio</html>")
    with pytest.raises(media_check.MediaError, match="audio_url"):  # checked as any downloaded input
        media_check.fetch_inputs(settings, "whisper", stored, job_id, work)


def test_a_stored_result_is_read_from_the_bucket(settings, s3_endpoint, speech_mp3, tmp_path):
    settings = dataclasses.replace(settings, minio_endpoint=s3_endpoint, minio_access_key="k", minio_secret_key="s",
                                   minio_bucket="pipeline-test", url_allowlist=(),
                                   minio_public_url="http://public.example:9000")
    storage.ensure_bucket(settings)
    job_id = str(uuid.uuid4())
    storage.upload_result(settings, speech_mp3, f"{job_id}.mp3", b"")
    work = tmp_path / "work"
    work.mkdir()
    inputs = media_check.fetch_inputs(settings, "whisper",
                                      {"audio_url": f"{jobspec.STORED_RESULT_PREFIX}{job_id}.mp3"}, job_id, work)
    assert inputs["audio"].read_bytes() == speech_mp3.read_bytes()  # not through public.example


def test_inputs_an_earlier_step_gave_are_checked_again_before_the_step_runs():
    jobspec.validate_stored("portrait", {"image_url": FACE, "audio_url": f"{jobspec.STORED_RESULT_PREFIX}a.mp3",
                                         "max_time": 1200, "notify_url": None})
    with pytest.raises(jobspec.ValidationError, match="text: must not be empty"):
        jobspec.validate_stored("csm", {"text": "  ", "voice": "random", "max_time": 1200})


def test_the_graph_names_what_each_step_takes():
    spec = pipelines.validate_pipeline(CHAIN)
    assert spec.order.index("speech") < spec.order.index("hear") < spec.order.index("say")
    assert [(n.field, n.step, n.output) for n in spec.steps["say"].needs] == [("text", "hear", "text")]


def test_the_pipeline_page_limits_are_jobspecs_and_the_documents(client):
    """GET /pipelines takes limit 1-100 (default 20: a pipeline carries its steps' status objects), as
    jobspec says and the OpenAPI document shows; /jobs' are its own (1-200, default 50)."""
    for n in range(jobspec.PIPELINES_PAGE_DEFAULT + 1):
        submit(client, {"steps": {"speech": step("csm", text=f"Hi {n}.")}})
    assert len(client.get("/pipelines").json["pipelines"]) == jobspec.PIPELINES_PAGE_DEFAULT == 20
    assert client.get(f"/pipelines?limit={jobspec.PIPELINES_PAGE_MAX}").status_code == 200
    over = client.get(f"/pipelines?limit={jobspec.PIPELINES_PAGE_MAX + 1}")
    assert over.status_code == 400 and over.json["error"] == "limit: an integer from 1 to 100"
    limit = next(p for p in client.get("/openapi.json").json["paths"]["/pipelines"]["get"]["parameters"]
                 if p["name"] == "limit")
    assert limit["schema"]["maximum"] == 100 and limit["schema"]["default"] == 20
    assert client.get(f"/jobs?limit={jobspec.JOBS_PAGE_MAX}").status_code == 200
