"""Issue 11 through the worker's real code path: the worker process, the API and the dev node, whose
stand-ins behave like the real node services (docs/node-protocols.md: CSM, WhisperX, ComfyUI and SONIC).

- a running job shows its phase (and since when) in /status; a percentage only while encoding;
- WhisperX answers failures as ("Error: ...", []): the job fails with the app's message;
- a region subtag (pt-BR) reaches the node as the bare code;
- audio over ComfyUI's upload limit is compressed before upload instead of failing with 413;
- the SONIC sampler ignores /interrupt: after a cancel the worker keeps the busy node from the next job
  until it is idle, or replaces it after NODE_DRAIN_TIMEOUT.

The dev node runs with a 1 MiB ComfyUI upload limit and a SONIC sampler that takes at least
SAMPLER_MIN_S seconds (a GPU's pace), so these behaviours show on a CPU in a few seconds.
"""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import redis
from conftest import wait_for
from devnode_helpers import start_devnode, stop_devnode
from PIL import Image
from system import (
    devnode_nodes,
    ffprobe,
    http_json,
    reset_faults,
    running_nodes,
    service_env,
    set_faults,
    start_api,
    start_file_server,
    start_worker,
    wait_finished,
)

import jobspec

pytestmark = pytest.mark.e2e

SAMPLER_MIN_S = 6.0
UPLOAD_LIMIT_MB = "1"


@pytest.fixture(scope="module")
def devnode(tmp_path_factory):
    proc, url = start_devnode(tmp_path_factory.mktemp("devnode"),
                              {"DEVNODE_SONIC_MIN_S": str(SAMPLER_MIN_S),
                               "DEVNODE_COMFY_MAX_UPLOAD_MB": UPLOAD_LIMIT_MB})
    yield url
    stop_devnode(proc)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input files on a loopback HTTP server: a portrait, 2 s of speech-rate audio, a 12 s stereo WAV."""
    directory = tmp_path_factory.mktemp("inputs")
    Image.fromarray(np.full((320, 240, 3), (200, 150, 120), dtype=np.uint8)).save(directory / "face.jpg")
    rate = 48_000
    for name, seconds in (("short.wav", 2.0), ("long.wav", 12.0)):
        t = np.arange(int(rate * seconds)) / rate
        left, right = np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)
        samples = (np.stack([left, right], axis=1) * 0.3 * 32767).astype("<i2")
        _write_wav(directory / name, samples, rate)
    server, url = start_file_server(directory)
    yield {"url": url, "dir": directory}
    server.shutdown()


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    import wave

    with wave.open(str(path), "wb") as out:
        out.setnchannels(samples.shape[1])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())


@pytest.fixture
def stack(redis_url, devnode, tmp_path):
    reset_faults(devnode)
    env = service_env(redis_url, devnode, tmp_path, COMFYUI_MAX_UPLOAD_MB=UPLOAD_LIMIT_MB)
    api, api_url = start_api(env, tmp_path)
    workers = []

    def worker(worker_id: str, **extra: str):
        proc = start_worker(env, tmp_path, worker_id, **extra)
        workers.append(proc)
        return proc

    yield {"api": api_url, "devnode": devnode, "worker": worker,
           "r": redis.Redis.from_url(redis_url, decode_responses=True)}
    for proc in workers:
        proc.stop(20)
    api.stop()
    reset_faults(devnode)
    wait_for(lambda: not running_nodes(devnode), 30, what="all dev node nodes to stop")


def submit(stack, route: str, body: dict) -> str:
    status, answer = http_json("POST", stack["api"] + route, body)
    assert status == 200, answer
    return answer["id"]


def status_of(stack, job_id: str) -> dict:
    return http_json("GET", f"{stack['api']}/status/{job_id}")[1]


def comfy_queue(node: str) -> dict:
    request = urllib.request.Request(f"http://{node}/comfyui/queue", headers={"X-C3-API-KEY": "x"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_running_portrait_shows_its_phases_and_progress_only_while_encoding(stack, files):
    stack["worker"]("w-phases")
    job_id = submit(stack, "/portrait", {"image_url": files["url"] + "/face.jpg",
                                         "audio_url": files["url"] + "/short.wav"})
    seen: list[dict] = []
    deadline = time.time() + 120
    while time.time() < deadline:
        body = status_of(stack, job_id)
        if body["status"] != "running":
            if body["status"] != "queued":
                break
        elif body.get("phase") and (not seen or (seen[-1]["phase"], seen[-1].get("progress")) !=
                                    (body["phase"], body.get("progress"))):
            seen.append(body)
        time.sleep(0.05)
    assert body["status"] == "success", body
    assert "phase" not in body and "phase_since" not in body  # finished jobs carry no phase
    phases = [s["phase"] for s in seen]
    order = [jobspec.PHASES.index(p) for p in phases]
    assert order == sorted(order), phases  # phases only move forward
    # the short phases (uploading a small file) may fall between two polls; rendering lasts SAMPLER_MIN_S
    assert "rendering" in phases and len(set(phases)) >= 3, phases
    since = [s["phase_since"] for s in seen]
    assert since == sorted(since) and all(s.endswith("Z") for s in since)
    # no made-up percentage: SONIC reports none while rendering; only node 13 does while encoding
    assert all(s["phase"] == "encoding" for s in seen if "progress" in s), seen


def test_whisper_error_answer_fails_the_job_with_the_apps_message(stack, files):
    stack["worker"]("w-whisper")
    set_faults(stack["devnode"], engine_error=["whisper"])
    job_id = submit(stack, "/api/v1/jobs/whisper", {"audio_url": files["url"] + "/short.wav"})
    final = wait_finished(stack["api"], job_id, 120)
    assert final["status"] == "failed", final
    assert final["error"] == "Whisper failed: dev node fault: whisper engine error"
    reset_faults(stack["devnode"])
    # a region subtag is refused by faster-whisper on the node: the API sends the bare code
    job_id = submit(stack, "/api/v1/jobs/whisper", {"audio_url": files["url"] + "/short.wav", "language": "pt-BR"})
    final = wait_finished(stack["api"], job_id, 120)
    assert final["status"] == "success", final
    status, answer = http_json("POST", stack["api"] + "/api/v1/jobs/whisper",
                               {"audio_url": files["url"] + "/short.wav", "language": "xx-YY"})
    assert status == 400 and "pt" in answer["error"] and "language" in answer["error"]


def test_audio_over_the_upload_limit_is_compressed_not_refused(stack, files, tmp_path):
    assert (files["dir"] / "long.wav").stat().st_size > int(UPLOAD_LIMIT_MB) * 1024 * 1024
    stack["worker"]("w-upload")
    job_id = submit(stack, "/portrait", {"image_url": files["url"] + "/face.jpg",
                                         "audio_url": files["url"] + "/long.wav"})
    final = wait_finished(stack["api"], job_id, 240)
    assert final["status"] == "success", final
    _status, result = http_json("GET", f"{stack['api']}/result/{job_id}")
    video = tmp_path / "long.mp4"
    with urllib.request.urlopen(result["result_url"], timeout=30) as response:
        video.write_bytes(response.read())
    probe = ffprobe(video)
    assert abs(float(probe["format"]["duration"]) - 12.0) <= 0.5  # all of the audio made it


def _wait_sampler_running(stack, job_id: str) -> str:
    """Wait until the job renders on its node; return the node's hostname."""
    wait_for(lambda: status_of(stack, job_id).get("phase") == "rendering", 90, interval=0.1,
             what="the portrait to render")
    node = running_nodes(stack["devnode"])[0]["node"]
    wait_for(lambda: comfy_queue(node)["queue_running"], 30, interval=0.1, what="the prompt to run")
    return node


def test_cancelled_portrait_keeps_the_busy_node_from_the_next_job(stack, files):
    stack["worker"]("w-drain")
    body = {"image_url": files["url"] + "/face.jpg", "audio_url": files["url"] + "/short.wav"}
    first = submit(stack, "/portrait", body)
    node = _wait_sampler_running(stack, first)
    cancelled_at = time.time()
    assert http_json("POST", f"{stack['api']}/cancel/{first}")[0] == 200
    final = wait_finished(stack["api"], first, 10)
    assert final["status"] == "cancelled" and time.time() - cancelled_at < 5  # the client hears at once
    assert comfy_queue(node)["queue_running"], "the sampler ignores /interrupt: the node is still busy"
    second = submit(stack, "/portrait", body)
    idle = wait_for(lambda: not comfy_queue(node)["queue_running"] and time.time(), 60, interval=0.1,
                    what="the interrupted sampler to end")
    final = wait_finished(stack["api"], second, 120)
    assert final["status"] == "success", final
    started = datetime.fromisoformat(final["started_at"].replace("Z", "+00:00")).timestamp()
    assert started >= idle - 1.5, "the next job was handed a node still busy with the cancelled render"
    assert [n["node"] for n in running_nodes(stack["devnode"])] == [node]  # waited, not replaced


def test_node_still_busy_after_the_drain_timeout_is_replaced(stack, files):
    stack["worker"]("w-replace", NODE_DRAIN_TIMEOUT="1")
    body = {"image_url": files["url"] + "/face.jpg", "audio_url": files["url"] + "/short.wav"}
    first = submit(stack, "/portrait", body)
    node = _wait_sampler_running(stack, first)
    assert http_json("POST", f"{stack['api']}/cancel/{first}")[0] == 200
    assert wait_finished(stack["api"], first, 10)["status"] == "cancelled"
    wait_for(lambda: all(n["state"] not in ("booting", "running") for n in devnode_nodes(stack["devnode"])
                         if n["node"] == node), 20, what="the busy node to be stopped")
    second = submit(stack, "/portrait", body)
    final = wait_finished(stack["api"], second, 120)
    assert final["status"] == "success", final
    assert node not in [n["node"] for n in running_nodes(stack["devnode"])]
