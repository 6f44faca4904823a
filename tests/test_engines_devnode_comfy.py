"""comfyui.py (the worker's portrait engine) against the dev node's ComfyUI stand-in on 127.0.0.1, which
behaves like a real node (docs/node-protocols.md, ComfyUI and SONIC): 100 MiB upload limit, an
uninterruptible sampler, progress only from node 13, partly invalid graphs that still run their valid
rest. Plus mediaconv.shrink_audio on the issue's own case, a 10-minute 48 kHz stereo WAV (106 MiB).

The stand-in is wrapped in a small ASGI shim that answers the node's health check at "/" and can make
the next requests to one path answer 502 (a transient app error on a healthy node).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
import wave
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engines live at the repo root

from conftest import engine_job, serve_asgi  # noqa: E402

import comfyui  # noqa: E402
import mediaconv  # noqa: E402
import sonic_workflow  # noqa: E402
from devnode import comfy, faults  # noqa: E402
from engine_api import EngineError, NodeUrls  # noqa: E402

SHIM = {"fail_next": {}, "healthy": True, "calls": []}


def _shim(app):
    async def wrapper(scope, receive, send):
        if scope["type"] == "http":
            path, method = scope["path"], scope["method"]
            SHIM["calls"].append((method, path))
            status = None
            if path == "/":
                status = 200 if SHIM["healthy"] else 503
            elif SHIM["fail_next"].get(path, 0) > 0:
                SHIM["fail_next"][path] -= 1
                status = 502
            if status is not None:
                body = json.dumps({"status": status}).encode()
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return wrapper


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("comfy-data")
    with serve_asgi(_shim(comfy.create_app(data_dir)), ws="websockets-sansio") as base:
        yield {"node": NodeUrls(base=base, csm="", whisper="", comfyui=base, ollama="", api_key="k"),
               "base": base, "data_dir": data_dir}


@pytest.fixture(autouse=True)
def _reset():
    faults.reset()
    SHIM.update(fail_next={}, healthy=True, calls=[])
    yield
    faults.reset()


def write_wav(path: Path, seconds: float, rate: int = 48_000, channels: int = 2, noise: bool = False) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    signal = np.random.default_rng(7).uniform(-1, 1, t.size) if noise else np.sin(2 * np.pi * 220 * t)
    tone = (signal * 0.3 * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.repeat(tone[:, None], channels, axis=1).tobytes())
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    Image.fromarray(np.full((240, 200, 3), (180, 140, 110), dtype=np.uint8)).save(tmp_path / "face.png")
    return {"image": tmp_path / "face.png", "audio": write_wav(tmp_path / "voice.wav", 2.0)}


def _queue(server: dict) -> dict:
    return requests.get(f"{server['base']}/queue", timeout=10).json()


def _probe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def test_ten_minutes_of_48k_stereo_wav_is_shrunk_to_fit_100_mib(tmp_path: Path) -> None:
    src = write_wav(tmp_path / "long.wav", 600.0, noise=True)  # noise: FLAC cannot shrink it much
    limit = 100 * 1024 * 1024
    assert src.stat().st_size > limit  # 106 MiB: ComfyUI would answer 413
    small = mediaconv.shrink_audio(src, tmp_path / "long_upload", limit)
    assert small == tmp_path / "long_upload.flac" and mediaconv.fits(small, limit)
    stream = _probe(small)["streams"][0]
    assert (stream["codec_name"], stream["channels"], stream["sample_rate"]) == ("flac", 1, "48000")
    assert abs(float(_probe(small)["format"]["duration"]) - 600.0) < 0.1
    assert mediaconv.shrink_audio(small, tmp_path / "again", limit) == small  # fits: used as it is
    mp3 = mediaconv.shrink_audio(src, tmp_path / "tight", 20 * 1024 * 1024)  # FLAC too big: MP3
    assert mp3.suffix == ".mp3" and _probe(mp3)["streams"][0]["channels"] == 1


def test_audio_over_the_node_limit_is_uploaded_compressed(server, inputs, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DEVNODE_COMFY_MAX_UPLOAD_MB", "0.25")  # the node's --max-upload-size
    monkeypatch.setenv("COMFYUI_MAX_UPLOAD_MB", "0.25")  # the worker's setting, matching it
    inputs["audio"] = write_wav(tmp_path / "big.wav", 3.0)  # 563 KiB of WAV
    out = comfyui.run(engine_job({"seed": 1}, "big", inputs, server["node"], tmp_path))
    video = _probe(out)
    assert abs(float(video["format"]["duration"]) - 3.0) <= 0.3
    uploaded = sorted(p.name for p in (server["data_dir"] / "default" / "input").iterdir())
    assert "big_upload.flac" in uploaded and "big_input.wav" not in uploaded


def test_upload_refused_as_too_large_names_the_setting(server, inputs, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DEVNODE_COMFY_MAX_UPLOAD_MB", "0.001")  # the node's limit is below ours
    with pytest.raises(EngineError, match="413.*COMFYUI_MAX_UPLOAD_MB"):
        comfyui.run(engine_job({"seed": 1}, "refused", inputs, server["node"], tmp_path))


def test_progress_is_node_13s_and_phases_follow_the_render(server, inputs, tmp_path) -> None:
    seen: list[int] = []
    phases: list[str] = []
    comfyui.run(engine_job({"seed": 1}, "phases", inputs, server["node"], tmp_path, progress=seen.append,
                           phase=phases.append))
    changes = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert changes == ["uploading_inputs", "rendering", "encoding"]
    assert seen and seen == sorted(seen) and seen[-1] == 100  # only while encoding, up to done


def test_partly_invalid_graph_is_deleted_from_the_queue(server, inputs, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DEVNODE_SONIC_MIN_S", "4")
    node = server["node"]
    image = comfyui.upload(node, inputs["image"], "image/png")
    audio = comfyui.upload(node, inputs["audio"], "audio/wav")
    good = sonic_workflow.build_sonic_workflow(image, audio, (200, 240), 2.0, "busy/x", 1)
    busy = comfyui.queue_prompt(node, good, str(uuid.uuid4()))  # keeps the node busy meanwhile
    partly = sonic_workflow.build_sonic_workflow(image, audio, (200, 240), 2.0, "bad/x", 1)
    partly["13"]["inputs"]["format"] = "video/unknown"  # node 13 invalid; the preview (21) is valid
    with pytest.raises(EngineError, match="node 13"):
        comfyui.queue_prompt(node, partly, str(uuid.uuid4()))
    queue = _queue(server)
    assert [item[1] for item in queue["queue_running"]] == [busy]
    assert queue["queue_pending"] == []  # the refused prompt's valid rest does not run
    comfyui.wait_history(node, busy, lambda: None, 0.2, 60)


def test_5xx_from_a_healthy_node_is_retried_once(server, inputs, tmp_path) -> None:
    SHIM["fail_next"] = {"/prompt": 1, "/upload/image": 1}
    out = comfyui.run(engine_job({"seed": 1}, "retry", inputs, server["node"], tmp_path))
    assert out.is_file()
    assert SHIM["calls"].count(("POST", "/prompt")) == 2 and SHIM["calls"].count(("POST", "/upload/image")) == 3


def test_5xx_twice_or_from_an_unhealthy_node_is_not_retried_into_success(server, inputs, tmp_path) -> None:
    SHIM["fail_next"] = {"/prompt": 2}
    with pytest.raises(requests.HTTPError, match="502"):
        comfyui.run(engine_job({"seed": 1}, "twice", inputs, server["node"], tmp_path))
    assert SHIM["calls"].count(("POST", "/prompt")) == 2
    SHIM.update(fail_next={"/prompt": 1}, healthy=False, calls=[])
    with pytest.raises(requests.HTTPError, match="502"):
        comfyui.run(engine_job({"seed": 1}, "sick", inputs, server["node"], tmp_path))
    assert SHIM["calls"].count(("POST", "/prompt")) == 1  # the node itself is failing: the worker decides


def test_node_busy_follows_the_queue(server, inputs, monkeypatch) -> None:
    monkeypatch.setenv("DEVNODE_SONIC_MIN_S", "2")
    node = server["node"]
    assert comfyui.node_busy(node) is False
    image = comfyui.upload(node, inputs["image"], "image/png")
    audio = comfyui.upload(node, inputs["audio"], "audio/wav")
    prompt_id = comfyui.queue_prompt(node, sonic_workflow.build_sonic_workflow(image, audio, (200, 240), 2.0, "b/x", 1),
                                     str(uuid.uuid4()))
    assert comfyui.node_busy(node) is True
    sampling = server["data_dir"] / "default" / "temp" / f"sonic_{prompt_id}.mp4"
    deadline = time.monotonic() + 30
    while not sampling.exists() and time.monotonic() < deadline:  # the sampler has started
        time.sleep(0.05)
    comfyui.stop_prompt(node, prompt_id, started=True)  # the sampler ignores it
    time.sleep(0.5)
    assert comfyui.node_busy(node) is True
    deadline = time.monotonic() + 30
    while comfyui.node_busy(node) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert comfyui.node_busy(node) is False
    broken = NodeUrls(base=node.base, csm="", whisper="", comfyui=node.base + "/nowhere", ollama="", api_key="k")
    assert comfyui.node_busy(broken) is None
