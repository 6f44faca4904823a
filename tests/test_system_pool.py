"""The node pool with real parts (redis-server, the dev node, worker processes, the API): several jobs on
one node, the node that runs out of memory when shared, the cost of a job adding up to the bill."""

from __future__ import annotations

import calendar
import subprocess
import time

import pytest
import redis
from conftest import wait_for
from system import (
    devnode_nodes,
    http_json,
    reset_faults,
    running_nodes,
    service_env,
    set_faults,
    start_api,
    start_file_server,
    start_worker,
    wait_finished,
    wait_job_node_ready,
)

pytestmark = pytest.mark.e2e

LONG_TEXT = " ".join(f"This is sentence number {n} of a long monologue." for n in range(1, 25))


@pytest.fixture
def stack(redis_url, devnode, tmp_path):
    reset_faults(devnode)
    env = service_env(redis_url, devnode, tmp_path, NODE_POLICY="adaptive", GPU_IDLE_TIMEOUT="20")
    api, api_url = start_api(env, tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
                    str(inputs / "talk.wav")], check=True, timeout=60)
    files, files_url = start_file_server(inputs)
    workers = []

    def worker(worker_id: str, **extra: str):
        proc = start_worker(env, tmp_path, worker_id, **extra)
        workers.append(proc)
        return proc

    yield {"api": api_url, "worker": worker, "devnode": devnode, "files": files_url,
           "r": redis.Redis.from_url(redis_url, decode_responses=True)}
    for proc in workers:
        proc.stop(20)
    api.stop()
    files.shutdown()
    reset_faults(devnode)
    wait_for(lambda: not running_nodes(devnode), 30, what="all dev node nodes to stop")


def submit(stack, route: str, body: dict) -> str:
    status, answer = http_json("POST", stack["api"] + route, body)
    assert status == 200, answer
    return answer["id"]


def test_a_csm_and_a_whisper_job_share_one_node_and_their_shares_add_up_to_its_bill(stack):
    t0 = time.time()
    stack["worker"]("w-a")
    stack["worker"]("w-b")
    speech = submit(stack, "/csm", {"text": LONG_TEXT})
    node = wait_job_node_ready(stack["r"], speech, 60)
    words = submit(stack, "/whisper", {"audio_url": f"{stack['files']}/talk.wav"})
    # the whisper job takes the free whisper slot of the node the CSM job runs on: no second node
    wait_for(lambda: stack["r"].hexists(f"pool:leases:{node['id']}", words), 30, what="the whisper job's lease")
    assert len(stack["r"].hgetall(f"pool:leases:{node['id']}")) == 2
    finals = [wait_finished(stack["api"], job_id, 120) for job_id in (speech, words)]
    assert [f["status"] for f in finals] == ["success", "success"], finals
    assert len([n for n in devnode_nodes(stack["devnode"]) if n["launched_at"] >= t0]) == 1
    # the idle node stops by the keep-alive (one boot until gaps are known, at most GPU_IDLE_TIMEOUT)
    stopped = wait_for(lambda: [n for n in devnode_nodes(stack["devnode"])
                                if n["workload"] == node["workload"] and n["stopped_at"]], 40, what="the stop")
    billed = stopped[0]["stopped_at"] - stopped[0]["launched_at"]
    shares = [float(stack["r"].hget(f"job:{job_id}", "node_seconds")) for job_id in (speech, words)]
    assert sum(shares) == pytest.approx(billed, rel=0.02)  # every second of the node went to a job
    assert all(share > 0 for share in shares)
    status = http_json("GET", f"{stack['api']}/status/{speech}")[1]
    assert status["node_seconds"] == round(shares[0], 1) and status["node_type"] == "media:fast"


def test_an_engine_out_of_memory_on_a_shared_node_makes_it_run_one_job_at_a_time(stack):
    set_faults(stack["devnode"], oom_when_shared=["whisper"])
    stack["worker"]("w-a")
    stack["worker"]("w-b")
    speech = submit(stack, "/csm", {"text": LONG_TEXT})
    node = wait_job_node_ready(stack["r"], speech, 60)
    time.sleep(1.0)  # CSM is rendering on the node
    words = submit(stack, "/whisper", {"audio_url": f"{stack['files']}/talk.wav"})

    def history() -> list[str]:
        return [item["status"] for item in http_json("GET", f"{stack['api']}/jobs/{words}")[1]["history"]]

    wait_for(lambda: history()[:3] == ["queued", "running", "queued"], 60, what="the whisper job given back")
    assert stack["r"].hget(f"pool:node:{node['id']}", "solo") == "1"  # one job at a time from now on
    finals = [wait_finished(stack["api"], job_id, 120) for job_id in (speech, words)]
    assert [f["status"] for f in finals] == ["success", "success"], finals
    assert finals[1]["attempts"] == 1  # the out-of-memory run was given back, not counted
    assert history() == ["queued", "running", "queued", "running", "success"]


def test_a_worker_killed_on_a_shared_node_leaves_the_node_to_the_pool(stack):
    """The killed worker's lease ends (its job goes back to the queue and runs again); the node, which
    another job holds, stays in the pool and is used on: never lost, never stopped under that job."""
    set_faults(stack["devnode"], engine_hang=["whisper"])
    keeper = stack["worker"]("w-keeper")
    speech = submit(stack, "/csm", {"text": LONG_TEXT + " " + LONG_TEXT})
    node = wait_job_node_ready(stack["r"], speech, 60)
    doomed = stack["worker"]("w-doomed")
    words = submit(stack, "/whisper", {"audio_url": f"{stack['files']}/talk.wav"})
    wait_for(lambda: stack["r"].hexists(f"pool:leases:{node['id']}", words), 30, what="the whisper lease")
    doomed.proc.kill()
    doomed.proc.wait(10)
    reset_faults(stack["devnode"])
    wait_for(lambda: not stack["r"].hexists(f"pool:leases:{node['id']}", words), 20, what="the sweep")
    assert stack["r"].hexists(f"pool:leases:{node['id']}", speech)  # the node stays, with its other job
    finals = [wait_finished(stack["api"], job_id, 120) for job_id in (speech, words)]
    assert [f["status"] for f in finals] == ["success", "success"], finals
    assert finals[1]["attempts"] == 2
    row = next(n for n in devnode_nodes(stack["devnode"]) if n["workload"] == node["workload"])
    finished = calendar.timegm(time.strptime(finals[0]["finished_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert row["stopped_at"] is None or row["stopped_at"] >= finished - 1  # not stopped under the CSM job
    assert "recovery sweep" in keeper.log() or "requeued" in keeper.log()
