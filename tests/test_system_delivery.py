"""Issue 12 with real worker processes, a real redis-server, the dev node and real receivers: a SIGTERM
during a webhook attempt keeps the delivery, a full output disk is retried while the output is kept,
and a job does not start on a full work disk (no GPU node is taken)."""

from __future__ import annotations

import json
import signal

import pytest
import redis
from conftest import fill_disk, wait_for
from system import (
    http_json,
    reset_faults,
    running_nodes,
    service_env,
    start_api,
    start_receiver,
    start_worker,
    wait_finished,
)

import config
import jobspec
import jobstore
import webhook_state

pytestmark = pytest.mark.e2e


def finished_job(r: redis.Redis, notify_url: str) -> str:
    settings = config.Settings()
    params = jobspec.validate("whisper", {"audio_url": "https://example.com/a.mp3", "notify_url": notify_url})
    job_id, _ = jobstore.submit(r, "whisper", params)
    jobstore.transition(r, settings, job_id, "running", {"worker": "w"})
    jobstore.transition(r, settings, job_id, "success", {"text": "hello"})
    return job_id


def test_sigterm_during_an_attempt_gives_the_delivery_back(redis_url, tmp_path):
    """The old worker deregistered and exited with the delivery in its in-flight list: it stayed
    `pending` forever. Now it goes back to the outbox and the next worker delivers it."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    env = service_env(redis_url, "http://127.0.0.1:9", tmp_path)
    receiver = start_receiver(mode="hang", host="127.0.0.2", hold_s=7)  # every call: 7 s, then 200
    first = start_worker(env, tmp_path, "w-term")
    second = None
    try:
        job_id = finished_job(r, receiver.url)
        wait_for(lambda: receiver.calls, 15, what="the first attempt")
        first.signal(signal.SIGTERM)
        assert first.proc.wait(15) == 0
        assert "gave 1 in-flight webhook deliveries back to the outbox" in first.log()
        entries = [json.loads(e) for e in r.lrange(config.WEBHOOK_OUTBOX_KEY, 0, -1)]
        assert [(e["job_id"], e["attempt"]) for e in entries] == [(job_id, 0)]
        assert r.llen(webhook_state.webhook_inflight_key("w-term")) == 0
        second = start_worker(env, tmp_path, "w-next")
        wait_for(lambda: r.hget(f"job:{job_id}", "webhook_status") == "delivered", 30, what="delivery")
        ids = {call["headers"]["webhook-id"] for call in receiver.calls}
        assert ids == {job_id}  # receivers can drop the copy by its webhook-id
        history = webhook_state.webhook_history(r.hgetall(f"job:{job_id}"))
        assert [e["outcome"] for e in history] == ["delivered"]
    finally:
        first.stop(10)
        if second is not None:
            second.stop(20)
        receiver.close()


@pytest.fixture
def stack(redis_url, devnode, tmp_path, small_disk):
    reset_faults(devnode)
    env = service_env(redis_url, devnode, tmp_path, STORAGE_RETRY_S="60", MIN_FREE_DISK_MB="0")
    env["OUTPUT_DIR"] = str(small_disk / "output")
    api, api_url = start_api(env, tmp_path)
    workers = []
    yield {"api": api_url, "env": env, "workers": workers, "devnode": devnode, "disk": small_disk,
           "r": redis.Redis.from_url(redis_url, decode_responses=True)}
    for proc in workers:
        proc.stop(20)
    api.stop()
    wait_for(lambda: not running_nodes(devnode), 30, what="all dev node nodes to stop")


def test_full_output_disk_is_retried_and_the_result_kept(stack, tmp_path):
    """The old worker failed the job for good after the node did the work, with the server path in
    the error. Now storing is retried until there is room, and the job succeeds."""
    (stack["disk"] / "output").mkdir()
    filler = fill_disk(stack["disk"])
    stack["workers"].append(start_worker(stack["env"], tmp_path, "w-disk"))
    status, body = http_json("POST", stack["api"] + "/csm", {"text": "A result for a full disk."})
    assert status == 200, body
    job_id = body["id"]
    wait_for(lambda: "storing" in stack["workers"][0].log() and "no space left" in stack["workers"][0].log(),
             120, interval=0.5, what="a failed store on the full disk")
    _status, during = http_json("GET", f"{stack['api']}/status/{job_id}")
    assert during["status"] == "running"
    filler.unlink()
    done = wait_finished(stack["api"], job_id, 90)
    assert done["status"] == "success", done
    _status, result = http_json("GET", f"{stack['api']}/result/{job_id}")
    assert (stack["disk"] / "output" / f"{job_id}.mp3").stat().st_size > 0
    assert result["result_url"].startswith(stack["api"] + f"/files/{job_id}.mp3")


def test_full_output_disk_final_error_has_no_server_path(stack, tmp_path):
    (stack["disk"] / "output").mkdir()
    fill_disk(stack["disk"])
    stack["workers"].append(start_worker(dict(stack["env"], STORAGE_RETRY_S="2"), tmp_path, "w-full"))
    status, body = http_json("POST", stack["api"] + "/csm", {"text": "No room for this one."})
    assert status == 200, body
    done = wait_finished(stack["api"], body["id"], 120)
    assert done["status"] == "failed"
    assert done["error"].startswith("could not store the result after 2 tries: cannot store "
                                    f"{body['id']}.mp3 in the output directory (OUTPUT_DIR): no space left")
    assert str(tmp_path) not in done["error"] and "/srv" not in done["error"]


def test_job_does_not_start_on_a_full_work_disk(stack, tmp_path):
    env = dict(stack["env"], WORK_DIR=str(stack["disk"] / "work"), MIN_FREE_DISK_MB="1", STORAGE_RETRY_S="2")
    fill_disk(stack["disk"])
    stack["workers"].append(start_worker(env, tmp_path, "w-nowork"))
    status, body = http_json("POST", stack["api"] + "/csm", {"text": "Not on a full disk."})
    assert status == 200, body
    done = wait_finished(stack["api"], body["id"], 60)
    assert done["status"] == "failed"
    assert done["error"].startswith("not enough free disk space to run the job: the work directory has 0 MB "
                                    "free, less than MIN_FREE_DISK_MB=1"), done["error"]
    assert not running_nodes(stack["devnode"])  # no GPU node was taken for it
