"""Pipelines with real parts: redis-server, the dev node, worker processes, the API (gunicorn), the CLI and a
webhook receiver. Text -> speech -> talking portrait from `c3-render submit talk` (an H.264 MP4 as long as
the CSM step's audio, one node for both steps and for a second pipeline while it is warm, the pipeline's
webhook verified with the standardwebhooks library); an upstream failure and a cancel cascading; a worker
SIGKILLed just after the transition that finished the first step, before it acknowledged it (the second
still runs, once); whisper -> csm from `c3-render pipeline FILE.json --wait` with the transcript as the
text; a failed pipeline's non-zero exit from the CLI."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import redis
from conftest import ROOT, clean_env, wait_for
from PIL import Image
from skimage import data as sample_data
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from system import (
    Proc,
    devnode_nodes,
    download,
    ffprobe,
    http_json,
    reset_faults,
    running_nodes,
    service_env,
    set_faults,
    start_api,
    start_file_server,
    start_receiver,
    start_worker,
)

from jobspec import STORED_RESULT_PREFIX

pytestmark = pytest.mark.e2e

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a test secret in the Standard Webhooks form
SPOKEN = "Hello world from the render service. The weather is sunny and warm today."
HEARD = {"hello", "world", "render", "service", "weather", "sunny", "warm", "today"}


@pytest.fixture
def stack(redis_url, devnode, tmp_path):
    reset_faults(devnode)
    env = service_env(redis_url, devnode, tmp_path, WEBHOOK_SECRET=SECRET)
    api, api_url = start_api(env, tmp_path)
    receiver = start_receiver()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(sample_data.astronaut()).save(inputs / "face.jpg", quality=90)
    files, files_url = start_file_server(inputs)
    workers = []

    def worker(worker_id: str):
        proc = start_worker(env, tmp_path, worker_id)
        workers.append(proc)
        return proc

    yield {"api": api_url, "env": env, "worker": worker, "devnode": devnode, "receiver": receiver,
           "face": f"{files_url}/face.jpg", "r": redis.Redis.from_url(redis_url, decode_responses=True)}
    for proc in workers:
        proc.stop(20)
    api.stop()
    receiver.close()
    files.shutdown()
    reset_faults(devnode)
    wait_for(lambda: not running_nodes(devnode), 30, what="all dev node nodes to stop")


def talk(stack, text: str = "Hello there. This is a pipeline.") -> dict:
    status, answer = http_json("POST", stack["api"] + "/pipelines", {
        "steps": {"speech": {"type": "csm", "text": text, "voice": "conversational_a"},
                  "video": {"type": "portrait", "image_url": stack["face"], "audio_url": "{{speech.result_url}}"}},
        "notify_url": stack["receiver"].url})
    assert status == 200, answer
    return answer


def pipeline(stack, pipeline_id: str) -> dict:
    return http_json("GET", f"{stack['api']}/pipelines/{pipeline_id}")[1]


def wait_pipeline(stack, pipeline_id: str, timeout: float = 240) -> dict:
    return wait_for(lambda: (p := pipeline(stack, pipeline_id))["status"] in ("success", "failed", "cancelled") and p,
                    timeout, interval=0.3, what=f"pipeline {pipeline_id} to finish")


def history(stack, job_id: str) -> list[str]:
    return [item["status"] for item in http_json("GET", f"{stack['api']}/jobs/{job_id}")[1]["history"]]


def verified_webhook(stack, pipeline_id: str) -> dict:
    """The pipeline's one webhook, its signature checked by the Standard Webhooks library."""
    wait_for(lambda: stack["receiver"].for_job(pipeline_id), 30, what="the pipeline's webhook")
    time.sleep(1.0)  # a second copy would come now
    calls = [c for c in stack["receiver"].calls if json.loads(c["body"]).get("id") == pipeline_id]
    assert len(calls) == 1, calls
    body, headers = calls[0]["body"], {name.lower(): value for name, value in calls[0]["headers"].items()}
    assert headers["webhook-id"] == pipeline_id
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body + " ", headers)  # a body changed on the way does not pass
    return Webhook(SECRET).verify(body, headers)


def loudness(path: Path) -> np.ndarray:
    """A file's audio as its loudness every 50 ms (decoded by ffmpeg, mono 8 kHz)."""
    pcm = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-vn", "-ac", "1", "-ar", "8000", "-f", "s16le",
                          "-"], capture_output=True, check=True, timeout=60).stdout
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    frames = samples[:len(samples) // 400 * 400].reshape(-1, 400)
    return np.sqrt((frames ** 2).mean(axis=1))


def envelope_match(a: Path, b: Path) -> float:
    """How alike two files' loudness over time is (correlation; 1 = the same shape)."""
    x, y = loudness(a), loudness(b)
    n = min(len(x), len(y))
    return float(np.corrcoef(x[:n], y[:n])[0, 1])


def test_talk_from_the_cli_gives_an_h264_mp4_speaking_the_csm_steps_audio(stack, tmp_path):
    t0 = time.time()
    stack["worker"]("w-talk")
    out = tmp_path / "talk.mp4"
    done = subprocess.run([sys.executable, str(ROOT / "c3_render_cli.py"), "submit", "talk", "--text", SPOKEN,
                           "--image-url", stack["face"], "--voice", "conversational_a", "--notify-url",
                           stack["receiver"].url, "--wait", "--out", str(out)],
                          cwd=str(ROOT), env=clean_env(C3_RENDER_API=stack["api"]), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    pipeline_id = re.search(r"queued pipeline (\S+)", done.stderr).group(1)
    final = pipeline(stack, pipeline_id)
    speech, video = final["steps"]["speech"], final["steps"]["video"]
    assert final["status"] == "success" and done.stdout.splitlines()[-1] == f"video: {video['result_url']}"
    probe = ffprobe(out)
    assert sorted(s["codec_type"] for s in probe["streams"]) == ["audio", "video"]
    assert next(s for s in probe["streams"] if s["codec_type"] == "video")["codec_name"] == "h264"
    mp3 = ffprobe(download(speech["result_url"], tmp_path / "speech.mp3"))
    assert abs(float(probe["format"]["duration"]) - float(mp3["format"]["duration"])) <= 0.5
    assert envelope_match(out, tmp_path / "speech.mp3") > 0.9  # the video speaks that very audio
    # the portrait ran on the node the speech ran on: no second node was launched
    r = stack["r"]
    assert r.hget(f"job:{video['id']}", "prefer_node") == r.hget(f"job:{speech['id']}", "node_id") != ""
    assert len([n for n in devnode_nodes(stack["devnode"]) if n["launched_at"] >= t0]) == 1
    assert history(stack, video["id"]) == ["waiting", "queued", "running", "success"]
    # the portrait read the stored speech, not its public URL
    audio_ref = json.loads(r.hget(f"job:{video['id']}", "params"))["audio_url"]
    assert audio_ref == f"{STORED_RESULT_PREFIX}{speech['id']}.mp3", audio_ref
    again = wait_pipeline(stack, talk(stack)["id"])  # with the node warm: no node launched at all
    assert again["status"] == "success", again
    assert len([n for n in devnode_nodes(stack["devnode"]) if n["launched_at"] >= t0]) == 1
    hook = verified_webhook(stack, pipeline_id)
    assert hook == {"id": pipeline_id, "status": "success",
                    "steps": {"speech": {"id": speech["id"], "status": "success", "result_url": speech["result_url"]},
                              "video": {"id": video["id"], "status": "success", "result_url": video["result_url"]}}}


def test_an_upstream_failure_and_a_cancel_cascade(stack):
    stack["worker"]("w-cascade")
    set_faults(stack["devnode"], engine_error=["csm"])
    failing = talk(stack)
    final = wait_pipeline(stack, failing["id"], 120)
    speech, video = final["steps"]["speech"], final["steps"]["video"]
    assert final["status"] == "failed" and speech["status"] == "failed"
    assert video["status"] == "failed" and video["error"] == f'upstream step "speech" failed: {speech["error"]}'
    assert video["started_at"] is None and video["attempts"] == 0  # never ran
    assert final["error"] == f'step "speech" failed: {speech["error"]}'
    assert verified_webhook(stack, failing["id"])["steps"]["video"]["error"] == video["error"]

    reset_faults(stack["devnode"])
    set_faults(stack["devnode"], engine_hang=["csm"])
    hanging = talk(stack)
    wait_for(lambda: pipeline(stack, hanging["id"])["steps"]["speech"]["status"] == "running", 60,
             what="the speech step to run")
    status, answer = http_json("POST", f"{stack['api']}/pipelines/{hanging['id']}/cancel")
    assert status == 200 and answer["cancel_requested"] is True
    final = wait_pipeline(stack, hanging["id"], 60)
    assert final["status"] == "cancelled", final
    assert {name: step["status"] for name, step in final["steps"].items()} == {"speech": "cancelled",
                                                                              "video": "cancelled"}, final
    assert verified_webhook(stack, hanging["id"])["error"] == "cancelled by request"

    # a step cancelled on its own (POST /cancel/<job id>) fails the steps that take its output
    alone = talk(stack)
    wait_for(lambda: pipeline(stack, alone["id"])["steps"]["speech"]["status"] == "running", 60,
             what="the speech step to run")
    assert http_json("POST", f"{stack['api']}/cancel/{alone['steps']['speech']}")[0] == 200
    final = wait_pipeline(stack, alone["id"], 60)
    assert final["status"] == "failed" and final["error"] == 'step "speech" was cancelled', final
    assert final["steps"]["speech"]["status"] == "cancelled"
    assert final["steps"]["video"]["status"] == "failed"
    assert final["steps"]["video"]["error"] == 'upstream step "speech" was cancelled'


class AckTrap:
    """A TCP relay between one worker and Redis that SIGKILLs the worker when it sends the acknowledgement
    (LREM of its processing list) of a job that has succeeded, and drops that command: the worker dies
    right after the transition that finished the job, with its entry and its node slot still held."""

    def __init__(self, redis_url: str, worker_id: str, job_key: str, r: redis.Redis) -> None:
        parsed = urllib.parse.urlsplit(redis_url)
        self.target = (parsed.hostname, parsed.port)
        self.marker = f"processing:{worker_id}".encode()
        self.job_key, self.r = job_key, r
        self.worker: Proc | None = None
        self.killed = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.server.getsockname()[1]}/0"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self.relay, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self.relay, args=(upstream, client, False), daemon=True).start()

    def relay(self, src: socket.socket, dst: socket.socket, from_worker: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if (from_worker and b"LREM" in chunk.upper() and self.marker in chunk
                        and self.r.hget(self.job_key, "status") == "success"):
                    self.worker.signal(signal.SIGKILL)
                    self.killed.set()
                    return
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self.server.close()


def test_a_worker_killed_just_as_the_first_step_finishes_loses_nothing(stack, redis_url, tmp_path):
    """The transition that finishes the speech queues the portrait in the same Redis step: a worker
    SIGKILLed right after it (its entry not acknowledged, its node slot not let go) loses nothing, and the
    portrait runs once."""
    r = stack["r"]
    answer = talk(stack)
    speech, video = answer["steps"]["speech"], answer["steps"]["video"]
    trap = AckTrap(redis_url, "w-doomed", f"job:{speech}", r)
    trap.worker = start_worker({**stack["env"], "REDIS_URL": trap.url}, tmp_path, "w-doomed")
    try:
        assert trap.killed.wait(120), "the speech step never finished"
        trap.worker.proc.wait(10)
    finally:
        trap.close()
    assert r.hget(f"job:{speech}", "status") == "success"
    assert r.llen("processing:w-doomed") == 1  # killed before its acknowledgement
    assert r.hget(f"job:{video}", "status") == "queued"  # queued in the same step, not by the dead worker
    stack["worker"]("w-rescuer")
    final = wait_pipeline(stack, answer["id"], 240)
    assert final["status"] == "success", final
    assert final["steps"]["speech"]["attempts"] == 1 and final["steps"]["video"]["attempts"] == 1
    assert history(stack, speech) == ["queued", "running", "success"]
    assert history(stack, video) == ["waiting", "queued", "running", "success"]  # ran once
    assert verified_webhook(stack, answer["id"])["status"] == "success"
    wait_for(lambda: r.llen("processing:w-doomed") == 0, 20, what="the sweep to drop the dead worker's entry")


def cli(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "c3_render_cli.py"), *args], cwd=str(ROOT),
                          env=clean_env(C3_RENDER_API=stack["api"]), capture_output=True, text=True, timeout=300)


def test_whisper_to_csm_from_a_pipeline_file_speaks_the_transcript(stack, tmp_path):
    stack["worker"]("w-words")
    body = tmp_path / "words.json"
    body.write_text(json.dumps({"steps": {
        "speech": {"type": "csm", "text": SPOKEN, "voice": "conversational_a", "temperature": 0.5},
        "transcribe": {"type": "whisper", "audio_url": "{{speech.result_url}}"},
        "say": {"type": "csm", "text": "{{transcribe.text}}", "voice": "conversational_b"}}}))
    done = cli(stack, "pipeline", str(body), "--wait", "--out", str(tmp_path / "said.mp3"))
    assert done.returncode == 0, done.stderr
    pipeline_id = re.search(r"queued pipeline (\S+)", done.stderr).group(1)
    final = pipeline(stack, pipeline_id)
    assert final["status"] == "success", final
    transcript = final["steps"]["transcribe"]["text"]
    assert HEARD <= set(re.sub(r"[^a-z ]", " ", transcript.lower()).split()), transcript
    said = json.loads(stack["r"].hget(f"job:{final['steps']['say']['id']}", "params"))
    assert said["text"] == transcript and said["voice"] == "conversational_b"
    assert done.stdout.splitlines()[-3:] == [f"speech: {final['steps']['speech']['result_url']}",
                                        f"transcribe: {transcript}", f"say: {final['steps']['say']['result_url']}"]
    assert ffprobe(tmp_path / "said.mp3")["streams"][0]["codec_type"] == "audio"


def test_a_failed_pipeline_exits_non_zero_from_the_cli_naming_the_step(stack, tmp_path):
    stack["worker"]("w-cli-fail")
    set_faults(stack["devnode"], engine_error=["csm"])
    done = cli(stack, "submit", "talk", "--text", "Hi.", "--image-url", stack["face"], "--wait")
    assert done.returncode != 0 and "upstream step \"speech\" failed" in done.stderr, done.stderr
