"""Tests of the dev node (devnode/): control API, node life, fault switches and the Gradio engines.

The dev node runs as a subprocess on a free loopback port (tests/devnode_helpers.py); the engines are
called through gradio_client exactly as the worker calls the real media:fast node.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from devnode_helpers import (
    API_KEY,
    call,
    devnode_log,
    launch_node,
    start_devnode,
    stop_devnode,
    wait_node_up,
)
from gradio_client import Client, handle_file

pytestmark = pytest.mark.timeout(300)

SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def devnode(tmp_path_factory: pytest.TempPathFactory):
    proc, base_url = start_devnode(tmp_path_factory.mktemp("devnode"))
    yield base_url
    code = stop_devnode(proc)
    log = devnode_log(proc)
    assert code in (0, -15) and "Finished server process" in log, log[-3000:]


@pytest.fixture(autouse=True)
def _reset_faults(request: pytest.FixtureRequest):
    yield
    if "devnode" in request.fixturenames:
        call(request.getfixturevalue("devnode"), "POST", "/admin/reset")


@pytest.fixture(scope="module")
def node(devnode: str) -> str:
    launched = launch_node(devnode)
    wait_node_up(launched["node"])
    return launched["node"]


def csm_client(node: str) -> Client:
    return Client(f"http://{node}/csm/", headers={"X-C3-API-KEY": API_KEY}, verbose=False)


def whisper_client(node: str) -> Client:
    return Client(f"http://{node}/whisper/", headers={"X-C3-API-KEY": API_KEY}, verbose=False)


def csm_kwargs(sentences: list[str], voice: str = "random_voice", **extra) -> dict:
    kwargs = {
        "speaker_voice": voice,
        "speaker_text": "",
        "speaker_audio": None,
        "monologue_json": json.dumps(sentences),
        "temperature": 0.9,
        "topk": 50,
        "max_audio_length": 10000,
        "pause_duration": 150,
        "api_name": "/generate_monologue_audio",
    }
    kwargs.update(extra)
    return kwargs


def whisper_kwargs(path: str, **extra) -> dict:
    kwargs = {
        "audio_file": handle_file(path),
        "model": "large-v3",
        "task": "transcribe",
        "language": "",
        "device": "cuda",
        "compute_type": "float16",
        "batch_size": 16,
        "vad_method": "pyannote",
        "word_timestamps": True,
        "segment_resolution": "sentence",
        "api_name": "/transcribe_audio",
    }
    kwargs.update(extra)
    return kwargs


def duration_s(path: str | Path) -> float:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


# --- control API ---------------------------------------------------------------------------------


def test_control_api_requires_key(devnode: str) -> None:
    for path, body in (
        ("/api/v0/launch", {"type": "media:fast", "expires": int(time.time()) + 60}),
        ("/api/v0/workloads", {"running": True}),
        ("/api/v0/stop", {"workload": "x"}),
    ):
        status, answer = call(devnode, "POST", path, body, key=None)
        assert status == 401 and isinstance(answer, dict) and "error" in answer, (path, status, answer)


def test_control_api_shapes(devnode: str) -> None:
    expires = int(time.time()) + 600
    status, launched = call(devnode, "POST", "/api/v0/launch", {"type": "media:fast", "expires": expires})
    assert status == 200
    assert set(launched) >= {"workload", "node", "type", "expires", "created"}
    assert launched["type"] == "media:fast" and launched["expires"] == expires
    port = devnode.rsplit(":", 1)[1]
    assert launched["node"] == f"127.0.0.1:{port}/nodes/{launched['workload']}"

    status, running = call(devnode, "POST", "/api/v0/workloads", {"running": True})
    assert status == 200 and isinstance(running, list)
    mine = [row for row in running if row["workload"] == launched["workload"]]
    assert len(mine) == 1
    assert set(mine[0]) >= {"workload", "node", "type", "status", "created", "expires"}

    status, stopped = call(devnode, "POST", "/api/v0/stop", {"workload": launched["workload"]})
    assert status == 200 and stopped["refund_amount"] == 0.0
    assert abs(stopped["stopped"] - time.time()) < 5
    status, running = call(devnode, "POST", "/api/v0/workloads", {"running": True})
    assert launched["workload"] not in {row["workload"] for row in running}

    status, answer = call(devnode, "POST", "/api/v0/stop", {"workload": "no-such-workload"})
    assert status == 404 and "error" in answer
    status, answer = call(devnode, "POST", "/api/v0/launch", {"type": "media:slow", "expires": expires})
    assert status == 400 and "error" in answer


def test_node_boots_runs_and_stops(devnode: str) -> None:
    launched = launch_node(devnode)
    node_url = f"http://{launched['node']}"
    status, _ = call(node_url, "GET", "/")
    assert status == 503  # DEVNODE_BOOT_S=1 in the helper
    wait_node_up(launched["node"])
    status, health = call(node_url, "GET", "/")
    assert status == 200 and health["workload"] == launched["workload"]
    status, _ = call(node_url, "GET", "/", key=None)
    assert status == 401
    status, _ = call(node_url, "GET", "/csm/config", key=None)
    assert status == 401
    status, _ = call(node_url, "GET", "/csm/config")
    assert status == 200

    call(devnode, "POST", "/api/v0/stop", {"workload": launched["workload"]})
    assert call(node_url, "GET", "/")[0] == 404
    assert call(node_url, "GET", "/csm/config")[0] == 404
    status, nodes = call(devnode, "GET", "/admin/nodes", key=None)
    row = next(row for row in nodes if row["workload"] == launched["workload"])
    assert row["state"] == "stopped" and row["stopped_at"] and row["launched_at"]


def test_node_websocket_requires_key(node: str) -> None:
    import websocket

    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://{node}/comfyui/ws?clientId=t", timeout=5)
    assert refused.value.status_code == 401


def test_devnode_api_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from devnode import server

    monkeypatch.delenv("DEVNODE_API_KEY", raising=False)
    assert server._key_error("anything") is None
    assert server._key_error("") is not None and server._key_error(None) is not None
    monkeypatch.setenv("DEVNODE_API_KEY", "secret")
    assert server._key_error("secret") is None
    assert server._key_error("anything").status_code == 401


def test_node_apps_only_under_a_node(devnode: str) -> None:
    assert call(devnode, "GET", "/csm/config")[0] == 404
    assert call(devnode, "GET", "/nodes/unknown-node/")[0] == 404


def test_node_expires_and_dies(devnode: str) -> None:
    expiring = launch_node(devnode, expires_in_s=2.5)
    assert call(devnode, "POST", "/admin/faults", {"node_dies_after_s": 0.5}, key=None)[0] == 200
    dying = launch_node(devnode)
    call(devnode, "POST", "/admin/reset", key=None)
    time.sleep(3)
    assert call(f"http://{expiring['node']}", "GET", "/")[0] == 404
    assert call(f"http://{dying['node']}", "GET", "/")[0] == 404
    _, nodes = call(devnode, "GET", "/admin/nodes", key=None)
    states = {row["workload"]: row["state"] for row in nodes}
    assert states[expiring["workload"]] == "expired" and states[dying["workload"]] == "dead"
    _, running = call(devnode, "POST", "/api/v0/workloads", {"running": True})
    assert not {expiring["workload"], dying["workload"]} & {row["workload"] for row in running}


def test_launch_failure_faults(devnode: str) -> None:
    body = {"type": "media:fast", "expires": int(time.time()) + 600}
    assert call(devnode, "POST", "/admin/faults", {"launch_failures": 1}, key=None)[0] == 200
    status, answer = call(devnode, "POST", "/api/v0/launch", body)
    assert status == 500 and isinstance(answer, dict)
    call(devnode, "POST", "/admin/faults", {"launch_failures": 1, "launch_failure_mode": "html"}, key=None)
    status, answer = call(devnode, "POST", "/api/v0/launch", body)
    assert status == 502 and isinstance(answer, str) and "<html" in answer.lower()
    call(devnode, "POST", "/admin/faults", {"launch_failures": 1, "launch_failure_mode": "timeout"}, key=None)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        call(devnode, "POST", "/api/v0/launch", body, timeout=1.5)
    assert time.monotonic() - started < 5
    assert call(devnode, "GET", "/admin/faults", key=None)[1]["launch_failures"] == 0
    assert call(devnode, "POST", "/api/v0/launch", body)[0] == 200
    status, answer = call(devnode, "POST", "/admin/faults", {"no_such_switch": 1}, key=None)
    assert status == 400 and "no_such_switch" in answer["error"]


def test_a_held_launch_answer_does_not_take_a_later_lost_answer(devnode: str) -> None:
    """A launch whose answer is held (its caller killed meanwhile) must not use up a "lost answer"
    fault set after it arrived: that fault belongs to the next launch (tests set it for their own)."""
    import threading

    body = {"type": "media:fast", "expires": int(time.time()) + 600}
    call(devnode, "POST", "/admin/faults", {"launch_answer_delay_s": 2}, key=None)
    held: list[int] = []
    first = threading.Thread(target=lambda: held.append(call(devnode, "POST", "/api/v0/launch", body)[0]))
    first.start()
    time.sleep(0.5)  # the first launch is in, its answer held
    call(devnode, "POST", "/admin/faults", {"launch_answer_delay_s": 0, "launch_answer_lost": 1}, key=None)
    first.join(10)
    assert held == [200]
    status, answer = call(devnode, "POST", "/api/v0/launch", body)
    assert status == 504 and "<html" in answer.lower()
    call(devnode, "POST", "/admin/faults", {"launch_answer_lost": 0}, key=None)


# --- engines through gradio_client -------------------------------------------------------------------


def test_csm_voices_give_distinct_mp3(node: str) -> None:
    client = csm_client(node)
    sentences = [SENTENCE, "Every voice should sound a little different."]
    paths = {}
    for voice in ("random_voice", "conversational_a", "conversational_b"):
        started = time.monotonic()
        paths[voice] = client.predict(**csm_kwargs(sentences, voice))
        print(f"csm {voice}: {time.monotonic() - started:.2f} s for {len(sentences)} sentences")
    for path in paths.values():
        assert Path(path).suffix == ".mp3" and Path(path).is_file()
        assert duration_s(path) > 1.0
    contents = {Path(path).read_bytes() for path in paths.values()}
    assert len(contents) == 3
    durations = {voice: duration_s(path) for voice, path in paths.items()}
    assert durations["conversational_a"] < durations["conversational_b"]


def test_csm_upload_voice_and_limits(node: str, tmp_path: Path) -> None:
    client = csm_client(node)
    reference = client.predict(**csm_kwargs(["A short reference clip."]))
    path = client.predict(
        **csm_kwargs(
            [SENTENCE, SENTENCE],
            "upload_voice",
            speaker_text="A short reference clip.",
            speaker_audio=handle_file(reference),
            max_audio_length=1000,
            pause_duration=0,
        )
    )
    assert 1.0 < duration_s(path) < 2.6  # two sentences, each cut at 1 s
    # the real app reports every failure as "Generation failed: ..." (comput3ai/c3-csm-gradio)
    with pytest.raises(Exception, match="Generation failed: Expecting value"):
        client.predict(**csm_kwargs([], monologue_json="not json"))
    # a stereo reference fails as on the real app: the model takes one channel
    stereo = tmp_path / "stereo.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", reference, "-ac", "2", str(stereo)], check=True)
    with pytest.raises(Exception, match="Generation failed: Audio must be single channel"):
        client.predict(**csm_kwargs([SENTENCE], "upload_voice", speaker_audio=handle_file(str(stereo))))
    # upload_voice without audio silently speaks (a random voice), as on the real app
    assert duration_s(client.predict(**csm_kwargs([SENTENCE], "upload_voice"))) > 1.0


def test_csm_is_deterministic_at_the_lowest_temperature(node: str) -> None:
    # Piper's noise is unseeded: at the app's minimum temperature the dev node uses none, so tests that
    # listen to the speech (whisper below, the e2e tests) hear the same audio every run.
    client = csm_client(node)
    first = Path(client.predict(**csm_kwargs([SENTENCE], temperature=0.1))).read_bytes()
    second = Path(client.predict(**csm_kwargs([SENTENCE], temperature=0.1))).read_bytes()
    assert first == second
    warm = {Path(client.predict(**csm_kwargs([SENTENCE]))).read_bytes() for _ in range(2)}
    assert len(warm) == 2  # at the default 0.9 the voice still varies, like the real model


def test_engine_error_fault(devnode: str, node: str) -> None:
    call(devnode, "POST", "/admin/faults", {"engine_error": ["csm"]}, key=None)
    with pytest.raises(Exception, match="dev node fault"):
        csm_client(node).predict(**csm_kwargs([SENTENCE]))


def test_whisper_transcribes_csm_output(node: str) -> None:
    # temperature 0.1: the dev node's speech is then the same every run (at 0.9 Piper's unseeded noise
    # made "quick" sound like "quit" about one run in four)
    audio = csm_client(node).predict(**csm_kwargs([SENTENCE], temperature=0.1))
    client = whisper_client(node)
    started = time.monotonic()
    text, files = client.predict(**whisper_kwargs(audio))
    print(f"whisper: {time.monotonic() - started:.2f} s for {duration_s(audio):.2f} s of audio")
    for word in words(SENTENCE):
        assert word in words(text), (word, text)
    suffixes = sorted(Path(path).suffix for path in files)
    assert suffixes == [".srt", ".txt"]
    txt = next(path for path in files if path.endswith(".txt"))
    assert words(Path(txt).read_text()) == words(text)
    srt = next(path for path in files if path.endswith(".srt"))
    assert "-->" in Path(srt).read_text()
    text, _ = client.predict(**whisper_kwargs(audio, task="translate", language="en", model="tiny"))
    assert "fox" in words(text)


def test_hung_engine_can_be_cancelled(devnode: str, node: str) -> None:
    call(devnode, "POST", "/admin/faults", {"engine_hang": ["csm"]}, key=None)
    client = csm_client(node)
    job = client.submit(**csm_kwargs([SENTENCE]))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and job.status().code.name not in ("PROCESSING",):
        time.sleep(0.1)
    assert job.status().code.name == "PROCESSING"
    time.sleep(1)
    assert not job.done()
    assert job.cancel()
    call(devnode, "POST", "/admin/reset", key=None)
    # the queue slot is free again: a new call runs at once
    started = time.monotonic()
    path = client.predict(**csm_kwargs(["After the hang."]))
    assert duration_s(path) > 0.3 and time.monotonic() - started < 30


def test_shutdown_with_hung_engine(tmp_path: Path) -> None:
    proc, base_url = start_devnode(tmp_path)
    try:
        launched = launch_node(base_url)
        wait_node_up(launched["node"])
        call(base_url, "POST", "/admin/faults", {"engine_hang": ["whisper"]}, key=None)
        client = whisper_client(launched["node"])
        sample = tmp_path / "silence.mp3"
        silence = ["-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "1"]
        subprocess.run(["ffmpeg", "-v", "error", *silence, str(sample)], check=True)
        job = client.submit(**whisper_kwargs(str(sample)))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and job.status().code.name != "PROCESSING":
            time.sleep(0.1)
        assert job.status().code.name == "PROCESSING"
    finally:
        started = time.monotonic()
        code = stop_devnode(proc, timeout_s=20)
        elapsed = time.monotonic() - started
    log = devnode_log(proc)
    # uvicorn re-raises the SIGTERM after its graceful shutdown: -15 is a clean exit here
    assert code in (0, -15) and elapsed < 15, (code, elapsed, log[-2000:])
    assert "Finished server process" in log, log[-2000:]
    assert re.search(r"stopped 1 node\(s\)", log), log[-2000:]


def test_whisper_answers_failures_as_the_real_app_does(devnode: str, node: str, tmp_path: Path) -> None:
    # The real app catches every exception and returns ("Error: <message>", []) (docs/node-protocols.md, WhisperX).
    audio = tmp_path / "tone.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1", str(audio)], check=True)
    client = whisper_client(node)
    text, files = client.predict(**whisper_kwargs(str(audio), language="pt-BR"))
    assert text.startswith("Error: ") and "pt-BR" in text and not files
    call(devnode, "POST", "/admin/faults", {"engine_error": ["whisper"]}, key=None)  # e.g. out of GPU memory
    text, files = client.predict(**whisper_kwargs(str(audio)))
    assert text == "Error: dev node fault: whisper engine error" and not files


def test_csm_inputs_in_the_real_order_with_the_real_defaults(node: str) -> None:
    info = csm_client(node).view_api(print_info=False, return_format="dict")
    params = info["named_endpoints"]["/generate_monologue_audio"]["parameters"]
    assert [p["parameter_name"] for p in params] == [
        "speaker_voice", "speaker_text", "speaker_audio", "monologue_json", "temperature", "topk",
        "max_audio_length", "pause_duration"]
    defaults = {p["parameter_name"]: p.get("parameter_default") for p in params}
    assert defaults["speaker_voice"] == "conversational_a"  # the UI default of comput3ai/c3-csm-gradio
    assert (defaults["temperature"], defaults["topk"], defaults["max_audio_length"], defaults["pause_duration"]) == (
        0.9, 50, 10000, 150)
