"""Tests of the dev node's ComfyUI stand-in (devnode/comfy.py) over real HTTP and a real websocket.

The app runs in uvicorn on a free loopback port, wrapped so that a request header picks the
workload id the dev node core would set. Test media (a Pillow portrait, a sine-tone MP3) are made here.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import websocket
from conftest import serve_asgi
from PIL import Image, ImageDraw

from devnode import comfy, faults

pytestmark = pytest.mark.timeout(180)

AUDIO_SECONDS = 3.0
WIDTH, HEIGHT = 640, 360
FPS = 24
STEPS = 25


# --- server and media ------------------------------------------------------------------------


def _with_workload(app):  # stands in for the dev node core: header -> scope["devnode_workload"]
    async def wrapper(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            workload = headers.get(b"x-test-workload")
            if workload:
                scope = {**scope, "devnode_workload": workload.decode()}
        await app(scope, receive, send)

    return wrapper


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    data_dir = tmp_path_factory.mktemp("comfy-data")
    app = comfy.create_app(data_dir)
    with serve_asgi(_with_workload(app), ws="websockets-sansio") as base:
        yield {
            "base": base,
            "ws": "ws://" + base.removeprefix("http://"),
            "data_dir": data_dir,
            "app": app,
        }


@pytest.fixture(autouse=True)
def _reset_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("comfy-media")
    portrait = folder / "portrait.png"
    img = Image.new("RGB", (800, 1000), (70, 110, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse((250, 200, 550, 600), fill=(220, 180, 150))  # a face-ish shape
    draw.ellipse((320, 330, 360, 370), fill=(40, 30, 30))
    draw.ellipse((440, 330, 480, 370), fill=(40, 30, 30))
    draw.rectangle((340, 480, 460, 500), fill=(150, 60, 60))
    img.save(portrait)
    audio = folder / "voice.mp3"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"sine=frequency=330:duration={AUDIO_SECONDS}",
         "-ac", "1", "-c:a", "libmp3lame", "-b:a", "64k", str(audio)],
        check=True,
    )  # fmt: skip
    return {"portrait": portrait, "audio": audio, "audio_seconds": _probe(audio)["format_duration"]}


def _probe(path: Path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries",
         "stream=codec_type,codec_name,pix_fmt,width,height,r_frame_rate:format=duration",
         "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    info = json.loads(out)
    return {"streams": info["streams"], "format_duration": float(info["format"]["duration"])}


# --- helpers --------------------------------------------------------------------------------


def sonic_graph(
    image: str,
    audio: str,
    *,
    width: int = WIDTH,
    height: int = HEIGHT,
    duration: float = AUDIO_SECONDS + 3,
    prefix: str = "job",
    fps: int = FPS,
    steps: int = STEPS,
    preview: bool = True,
) -> dict:
    """The SONIC talking-head workflow in API format (docs/node-protocols.md, ComfyUI and SONIC)."""
    graph = {
        "18": {"class_type": "LoadImage", "inputs": {"image": image}},
        "26": {"class_type": "LoadAudio", "inputs": {"audio": audio}},
        "58": {
            "class_type": "ImageResize+",
            "inputs": {
                "image": ["18", 0],
                "width": width,
                "height": height,
                "interpolation": "nearest",
                "method": "stretch",
                "condition": "always",
                "multiple_of": 0,
            },
        },  # fmt: skip
        "32": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": "svd_xt.safetensors"}},
        "34": {
            "class_type": "SONICTLoader",
            "inputs": {
                "model": ["32", 0],
                "sonic_unet": "unet.pth",
                "ip_audio_scale": 1.0,
                "use_interframe": True,
                "dtype": "bf16",
            },
        },  # fmt: skip
        "33": {
            "class_type": "SONIC_PreData",
            "inputs": {
                "clip_vision": ["32", 1],
                "vae": ["32", 2],
                "audio": ["26", 0],
                "image": ["58", 0],
                "weight_dtype": ["34", 1],
                "min_resolution": 576,
                "duration": duration,
                "expand_ratio": 1,
            },
        },  # fmt: skip
        "31": {
            "class_type": "SONICSampler",
            "inputs": {
                "model": ["34", 0],
                "data_dict": ["33", 0],
                "seed": 1234,
                "inference_steps": steps,
                "dynamic_scale": 1.0,
                "fps": fps,
            },
        },  # fmt: skip
        "13": {
            "class_type": "VHS_VideoCombine",
            "inputs": {
                "images": ["31", 0],
                "frame_rate": ["31", 1],
                "audio": ["26", 0],
                "loop_count": 0,
                "filename_prefix": prefix,
                "format": "video/h264-mp4",
                "pix_fmt": "yuv420p",
                "crf": 19,
                "save_metadata": True,
                "trim_to_audio": True,
                "pingpong": False,
                "save_output": True,
            },
        },  # fmt: skip
    }
    if preview:
        graph["21"] = {"class_type": "PreviewImage", "inputs": {"images": ["58", 0]}}
    return graph


def _headers(workload: str | None) -> dict:
    return {"X-Test-Workload": workload} if workload else {}


def upload(server: dict, path: Path, workload: str | None = None, **fields: str) -> dict:
    with open(path, "rb") as fh:
        resp = requests.post(
            f"{server['base']}/upload/image",
            files={"image": (path.name, fh, "application/octet-stream")},
            data=fields,
            headers=_headers(workload),
            timeout=30,
        )
    assert resp.status_code == 200, resp.text
    return resp.json()


def submit(server: dict, graph: dict, client_id: str, workload: str | None = None) -> requests.Response:
    return requests.post(
        f"{server['base']}/prompt",
        json={"prompt": graph, "client_id": client_id},
        headers=_headers(workload),
        timeout=30,
    )


def connect(server: dict, client_id: str, workload: str | None = None) -> websocket.WebSocket:
    ws = websocket.create_connection(
        f"{server['ws']}/ws?clientId={client_id}",
        timeout=60,
        header=[f"{k}: {v}" for k, v in _headers(workload).items()],
    )
    first = json.loads(ws.recv())
    assert first["type"] == "status"
    assert first["data"]["sid"] == client_id
    assert "queue_remaining" in first["data"]["status"]["exec_info"]
    return ws


def collect(ws: websocket.WebSocket, prompt_id: str, until: set[str], timeout: float = 90) -> list[dict]:
    """Messages of `prompt_id` until one whose type is in `until` (status messages are skipped)."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws.settimeout(max(0.1, deadline - time.monotonic()))
        frame = ws.recv()
        if isinstance(frame, bytes):
            continue  # previews: ignored, as a client must
        message = json.loads(frame)
        if message["data"].get("prompt_id") != prompt_id:
            continue
        got.append(message)
        if message["type"] in until:
            return got
    raise AssertionError(f"no {until} for {prompt_id}; got {[m['type'] for m in got]}")


def history(server: dict, prompt_id: str, workload: str | None = None) -> dict:
    resp = requests.get(f"{server['base']}/history/{prompt_id}", headers=_headers(workload), timeout=10)
    assert resp.status_code == 200
    return resp.json()


def wait_history(server: dict, prompt_id: str, workload: str | None = None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = history(server, prompt_id, workload)
        if entry:
            return entry[prompt_id]
        time.sleep(0.1)
    raise AssertionError(f"history of {prompt_id} stayed empty")


def uploaded(server: dict, media: dict, workload: str | None = None) -> tuple[str, str]:
    image = upload(server, media["portrait"], workload, overwrite="true")
    audio = upload(server, media["audio"], workload, overwrite="true")
    assert image == {"name": "portrait.png", "subfolder": "", "type": "input"}
    assert audio["name"] == "voice.mp3"
    return image["name"], audio["name"]


# --- tests ----------------------------------------------------------------------------------


def test_system_stats_and_empty_history(server: dict) -> None:
    stats = requests.get(f"{server['base']}/system_stats", timeout=10)
    assert stats.status_code == 200
    assert stats.json()["devices"][0]["type"] == "cpu"
    assert requests.get(f"{server['base']}/history/{uuid.uuid4()}", timeout=10).json() == {}
    queue = requests.get(f"{server['base']}/queue", timeout=10).json()
    assert queue == {"queue_running": [], "queue_pending": []}


def test_full_render(server: dict, media: dict) -> None:
    client_id = str(uuid.uuid4())
    ws = connect(server, client_id)  # connected before the prompt is submitted
    try:
        image, audio = uploaded(server, media)
        started = time.monotonic()
        resp = submit(server, sonic_graph(image, audio, prefix="render_test"), client_id)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {"prompt_id", "number", "node_errors"} and body["node_errors"] == {}
        prompt_id = body["prompt_id"]
        messages = collect(ws, prompt_id, {"execution_success", "execution_error"})
        render_s = time.monotonic() - started
        types = [m["type"] for m in messages]
        assert types[0] == "execution_start" and types[1] == "execution_cached"
        assert types[-1] == "execution_success", messages[-1]
        executing = [m["data"]["node"] for m in messages if m["type"] == "executing"]
        assert set(executing) == {"18", "26", "58", "21", "32", "34", "33", "31", "13"}
        assert executing.index("31") < executing.index("13")
        progress = [m["data"] for m in messages if m["type"] == "progress"]
        # Like the real nodes: the SONIC sampler sends no progress; only VHS_VideoCombine (node 13) does,
        # frame by frame while encoding, ending at the frame count.
        assert progress and all(p["node"] == "13" for p in progress)
        values = [p["value"] for p in progress]
        assert values == sorted(values) and values[-1] == progress[-1]["max"]
        executed = {m["data"]["node"]: m["data"]["output"] for m in messages if m["type"] == "executed"}
        gif = executed["13"]["gifs"][0]
        assert gif["filename"] == "render_test_00001.mp4"
        assert gif["type"] == "output" and gif["subfolder"] == "" and gif["format"] == "video/h264-mp4"
        assert gif["frame_rate"] == FPS
        assert executed["21"]["images"][0]["type"] == "temp"
        # executing with node null comes after success, once history is written.
        done = collect(ws, prompt_id, {"executing"}, timeout=10)
        assert done[-1]["data"]["node"] is None
    finally:
        ws.close()
    print(f"\nrender of a {media['audio_seconds']:.2f} s clip at {WIDTH}x{HEIGHT}: {render_s:.2f} s")

    entry = history(server, prompt_id)[prompt_id]  # read after the socket is gone
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_success",
    ]
    assert entry["outputs"]["13"]["gifs"][0]["filename"] == "render_test_00001.mp4"
    assert entry["prompt"][1] == prompt_id
    assert requests.get(f"{server['base']}/history", timeout=10).json()[prompt_id]["status"]["completed"]

    view = requests.get(
        f"{server['base']}/view",
        params={"filename": gif["filename"], "subfolder": "", "type": "output"},
        timeout=30,
    )
    assert view.status_code == 200
    video = server["data_dir"] / "downloaded.mp4"
    video.write_bytes(view.content)
    info = _probe(video)
    videos = [s for s in info["streams"] if s["codec_type"] == "video"]
    audios = [s for s in info["streams"] if s["codec_type"] == "audio"]
    assert len(videos) == 1 and len(audios) == 1
    assert videos[0]["codec_name"] == "h264" and videos[0]["pix_fmt"] == "yuv420p"
    assert (videos[0]["width"], videos[0]["height"]) == (WIDTH, HEIGHT)
    assert videos[0]["r_frame_rate"] == f"{FPS}/1"
    assert audios[0]["codec_name"] == "aac"
    assert abs(info["format_duration"] - media["audio_seconds"]) <= 0.3
    assert render_s < 30

    # The picture moves: first and last frames differ.
    frames = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(video), "-vf", "select='eq(n,0)+eq(n,40)',scale=64:36",
         "-vsync", "0", "-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    first, later = frames[: 64 * 36], frames[64 * 36 :]
    assert len(later) == 64 * 36
    assert sum(abs(a - b) for a, b in zip(first, later, strict=True)) / len(first) > 1.0

    # A second run with the same prefix gets the next counter.
    resp = submit(server, sonic_graph(image, audio, prefix="render_test", preview=False), client_id)
    second = wait_history(server, resp.json()["prompt_id"])
    assert second["outputs"]["13"]["gifs"][0]["filename"] == "render_test_00002.mp4"


def test_upload_does_not_overwrite_by_default(server: dict, tmp_path: Path) -> None:
    first = tmp_path / "same.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(first)
    assert upload(server, first)["name"] == "same.png"
    assert upload(server, first)["name"] == "same.png"  # identical content: reused
    Image.new("RGB", (8, 8), (9, 9, 9)).save(first)
    assert upload(server, first)["name"] == "same (1).png"
    assert upload(server, first, subfolder="sub")["subfolder"] == "sub"
    with open(first, "rb") as fh:
        bad = requests.post(
            f"{server['base']}/upload/image",
            files={"image": ("x.png", fh)},
            data={"subfolder": "../.."},
            timeout=10,
        )
    assert bad.status_code == 400


def test_validation_errors(server: dict, media: dict) -> None:
    image, audio = uploaded(server, media)
    client_id = str(uuid.uuid4())

    graph = sonic_graph(image, audio)
    graph["40"] = {"class_type": "NoSuchNode", "inputs": {}}
    resp = submit(server, graph, client_id)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_prompt"
    assert set(resp.json()["error"]) == {"type", "message", "details", "extra_info"}

    resp = submit(server, sonic_graph("missing.png", audio), client_id)
    assert resp.status_code == 400
    body = resp.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["18"]["class_type"] == "LoadImage"
    assert body["node_errors"]["18"]["errors"][0]["type"] == "custom_validation_failed"
    assert sorted(body["node_errors"]["18"]["dependent_outputs"]) == ["13", "21"]

    resp = submit(server, sonic_graph(image, "missing.mp3", preview=False), client_id)
    assert resp.status_code == 400
    assert "26" in resp.json()["node_errors"]

    graph = sonic_graph(image, audio)
    graph["58"]["inputs"]["image"] = ["99", 0]  # link to a node that does not exist
    resp = submit(server, graph, client_id)
    assert resp.status_code == 400
    assert resp.json()["node_errors"]["58"]["errors"][0]["type"] == "exception_during_inner_validation"

    graph = sonic_graph(image, audio, preview=False)
    graph["34"]["inputs"]["model"] = ["32", 7]  # the loader has 3 outputs
    resp = submit(server, graph, client_id)
    assert resp.status_code == 400
    assert resp.json()["node_errors"]["34"]["errors"][0]["type"] == "bad_linked_input"

    graph = sonic_graph(image, audio, preview=False)
    graph["34"]["inputs"]["model"] = ["32", 1]  # CLIP_VISION where MODEL is wanted
    resp = submit(server, graph, client_id)
    assert resp.json()["node_errors"]["34"]["errors"][0]["type"] == "return_type_mismatch"

    graph = sonic_graph(image, audio, preview=False)
    del graph["31"]["inputs"]["inference_steps"]
    resp = submit(server, graph, client_id)
    assert resp.status_code == 400
    error = resp.json()["node_errors"]["31"]["errors"][0]
    assert error["type"] == "required_input_missing" and error["details"] == "inference_steps"

    graph = sonic_graph(image, audio, preview=False)
    graph["32"]["inputs"]["ckpt_name"] = "other.safetensors"
    assert (
        submit(server, graph, client_id).json()["node_errors"]["32"]["errors"][0]["type"]
        == "value_not_in_list"
    )

    graph = {k: v for k, v in sonic_graph(image, audio).items() if k not in ("13", "21")}
    resp = submit(server, graph, client_id)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "prompt_no_outputs"

    resp = requests.post(f"{server['base']}/prompt", json={"client_id": client_id}, timeout=10)
    assert resp.status_code == 400

    # As in ComfyUI: when another output (the preview) is valid, the prompt is accepted with node_errors
    # and only the valid output runs, so node 13 has no output in history.
    resp = submit(server, sonic_graph(image, "missing.mp3"), client_id)
    assert resp.status_code == 200
    assert "26" in resp.json()["node_errors"]
    entry = wait_history(server, resp.json()["prompt_id"])
    assert (
        entry["status"]["status_str"] == "success"
        and "13" not in entry["outputs"]
        and "21" in entry["outputs"]
    )


def test_interrupt_hung_prompt(server: dict, media: dict) -> None:
    image, audio = uploaded(server, media)
    faults.update({"engine_hang": ["comfyui"]})
    client_id = str(uuid.uuid4())
    ws = connect(server, client_id)
    try:
        prompt_id = submit(server, sonic_graph(image, audio, prefix="hung"), client_id).json()["prompt_id"]
        seen = collect(ws, prompt_id, {"executing"}, timeout=30)
        while seen[-1]["data"]["node"] != "31":
            seen = collect(ws, prompt_id, {"executing"}, timeout=30)
        time.sleep(0.5)
        assert history(server, prompt_id) == {}
        queue = requests.get(f"{server['base']}/queue", timeout=10).json()
        assert queue["queue_running"][0][1] == prompt_id
        assert requests.post(f"{server['base']}/interrupt", timeout=10).status_code == 200
        messages = collect(
            ws, prompt_id, {"execution_interrupted", "execution_success", "execution_error"}, 15
        )
        last = messages[-1]
        assert last["type"] == "execution_interrupted"
        assert last["data"]["node_id"] == "31" and last["data"]["node_type"] == "SONICSampler"
    finally:
        ws.close()
    entry = wait_history(server, prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert "13" not in entry["outputs"]


def test_queue_delete(server: dict, media: dict) -> None:
    image, audio = uploaded(server, media)
    faults.update({"engine_hang": ["comfyui"]})
    client_id = str(uuid.uuid4())
    first = submit(server, sonic_graph(image, audio, prefix="q1"), client_id).json()["prompt_id"]
    second = submit(server, sonic_graph(image, audio, prefix="q2"), client_id).json()["prompt_id"]
    deadline = time.monotonic() + 20
    while True:
        queue = requests.get(f"{server['base']}/queue", timeout=10).json()
        if queue["queue_running"] and queue["queue_running"][0][1] == first:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [item[1] for item in queue["queue_pending"]] == [second]
    assert requests.post(f"{server['base']}/queue", json={"delete": [second]}, timeout=10).status_code == 200
    assert requests.get(f"{server['base']}/queue", timeout=10).json()["queue_pending"] == []
    requests.post(f"{server['base']}/interrupt", timeout=10)
    assert wait_history(server, first)["status"]["status_str"] == "error"
    time.sleep(0.3)
    assert history(server, second) == {}  # a dropped prompt never gets a history entry


def test_engine_error_fault(server: dict, media: dict) -> None:
    image, audio = uploaded(server, media)
    faults.update({"engine_error": ["comfyui"]})
    client_id = str(uuid.uuid4())
    ws = connect(server, client_id)
    try:
        prompt_id = submit(server, sonic_graph(image, audio, prefix="broken"), client_id).json()["prompt_id"]
        messages = collect(ws, prompt_id, {"execution_error", "execution_success"}, timeout=30)
    finally:
        ws.close()
    error = messages[-1]
    assert error["type"] == "execution_error"
    assert error["data"]["node_id"] == "31" and error["data"]["node_type"] == "SONICSampler"
    assert error["data"]["exception_message"] and isinstance(error["data"]["traceback"], list)
    entry = wait_history(server, prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_error"


def test_view_rejects_traversal_and_missing(server: dict) -> None:
    base = server["base"]
    assert requests.get(f"{base}/view", params={"filename": "../secret.txt"}, timeout=10).status_code == 400
    resp = requests.get(f"{base}/view", params={"filename": "a.mp4", "subfolder": "../../"}, timeout=10)
    assert resp.status_code == 403
    assert requests.get(f"{base}/view", params={"filename": "nope.mp4"}, timeout=10).status_code == 404


def test_workloads_are_isolated(server: dict, media: dict) -> None:
    upload(server, media["portrait"], "node-a", overwrite="true")
    upload(server, media["audio"], "node-a", overwrite="true")
    graph = sonic_graph("portrait.png", "voice.mp3", prefix="iso", preview=False)
    assert submit(server, graph, str(uuid.uuid4()), "node-b").status_code == 400  # not uploaded to node-b
    resp = submit(server, graph, str(uuid.uuid4()), "node-a")
    assert resp.status_code == 200
    prompt_id = resp.json()["prompt_id"]
    entry = wait_history(server, prompt_id, "node-a")
    assert entry["status"]["status_str"] == "success"
    assert history(server, prompt_id, "node-b") == {}
    assert history(server, prompt_id) == {}
    assert (server["data_dir"] / "node-a" / "output" / "iso_00001.mp4").is_file()
    # Also under the /api prefix, as ComfyUI serves it.
    api = requests.get(f"{server['base']}/api/history/{prompt_id}", headers=_headers("node-a"), timeout=10)
    assert prompt_id in api.json()


# --- fidelity to the real nodes (issue 11; docs/node-protocols.md, ComfyUI and SONIC) -----------------


def _first_error(server: dict, graph: dict, node_id: str) -> dict | None:
    resp = submit(server, graph, str(uuid.uuid4()))
    errors = (resp.json().get("node_errors") or {}).get(node_id)
    return errors["errors"][0] if errors else None


@pytest.mark.parametrize(
    ("node_id", "name", "value", "kind"),
    [
        ("31", "seed", 2**31, "value_bigger_than_max"),  # SONIC's MAX_SEED is int32
        ("31", "inference_steps", 1025, "value_bigger_than_max"),
        ("31", "dynamic_scale", 0.4, "value_smaller_than_min"),
        ("34", "ip_audio_scale", 0.4, "value_smaller_than_min"),
        ("33", "min_resolution", 64, "value_smaller_than_min"),
        ("34", "sonic_unet", "other.pth", "value_not_in_list"),
    ],
)
def test_real_input_ranges(server: dict, media: dict, node_id: str, name: str, value: object, kind: str) -> None:
    image, audio = uploaded(server, media)
    graph = sonic_graph(image, audio, preview=False)
    graph[node_id]["inputs"][name] = value
    error = _first_error(server, graph, node_id)
    assert error is not None and error["type"] == kind, error


def test_real_signatures_accept_what_comfyui_accepts(server: dict, media: dict) -> None:
    image, audio = uploaded(server, media)
    graph = sonic_graph(image, audio, preview=False)
    graph["31"]["inputs"].update(seed=2**31 - 1, inference_steps=1024)
    graph["34"]["inputs"]["sonic_unet"] = "none"  # "none" plus the files under models/sonic
    graph["13"]["inputs"].update(crf=999, trim_to_audio="whatever")  # format extras: passed through
    assert submit(server, graph, str(uuid.uuid4())).json()["node_errors"] == {}
    requests.post(f"{server['base']}/interrupt", timeout=10)
    # choices come from the model folders, as folder_paths lists them
    info = requests.get(f"{server['base']}/object_info", timeout=10).json()
    assert info["ImageOnlyCheckpointLoader"]["input"]["required"]["ckpt_name"][0] == ["svd_xt.safetensors"]
    assert info["SONICTLoader"]["input"]["required"]["sonic_unet"][0] == ["none", *SONIC_FOLDER]
    (server["data_dir"] / "models" / "checkpoints" / "svd_xt_1_1.safetensors").touch()
    graph = sonic_graph(image, audio, preview=False)
    graph["32"]["inputs"]["ckpt_name"] = "svd_xt_1_1.safetensors"
    assert _first_error(server, graph, "32") is None
    requests.post(f"{server['base']}/interrupt", timeout=10)
    # VHS_VideoCombine requires loop_count, pingpong and save_output
    for name in ("loop_count", "pingpong", "save_output"):
        graph = sonic_graph(image, audio, preview=False)
        del graph["13"]["inputs"][name]
        error = _first_error(server, graph, "13")
        assert error is not None and error["type"] == "required_input_missing" and error["details"] == name


# What the real nodes answer, from their public sources: ComfyUI_Sonic registers models/sonic without an
# extension filter, so folder_paths lists every file under it (sorted, subfolders as relative paths); its
# README lists the folder's files. VHS_VideoCombine offers image/gif, image/webp and "video/" + each
# video_formats/*.json but gifski (whose binary a node lacks).
SONIC_FOLDER = ["RIFE/flownet.pkl", "audio2bucket.pth", "audio2token.pth", "unet.pth", "whisper-tiny/config.json",
                "whisper-tiny/model.safetensors", "whisper-tiny/preprocessor_config.json", "yoloface_v5m.pt"]
VHS_VIDEO_FORMAT_FILES = ["16bit-png", "8bit-png", "ProRes", "av1-webm", "ffmpeg-gif", "ffv1-mkv", "h264-mp4",
                          "h265-mp4", "nvenc_av1-mp4", "nvenc_h264-mp4", "nvenc_hevc-mp4", "webm"]


def test_object_info_of_video_combine_and_sonic_loader_is_the_real_one(server: dict) -> None:
    info = requests.get(f"{server['base']}/object_info", timeout=10).json()
    combine = info["VHS_VideoCombine"]
    formats = combine["input"]["required"]["format"][0]
    assert sorted(formats) == sorted(["image/gif", "image/webp"] + [f"video/{n}" for n in VHS_VIDEO_FORMAT_FILES])
    assert formats[:2] == ["image/gif", "image/webp"] and len(formats) == 14
    assert combine["input"]["required"]["frame_rate"][0] == "FLOAT"  # VHS's MultiInput("FLOAT", [FLOAT, INT])
    assert set(combine["input"]["optional"]) == {"audio", "meta_batch", "vae"}
    assert combine["input"]["optional"]["meta_batch"][0] == "VHS_BatchManager"
    assert combine["output"] == ["VHS_FILENAMES"] and combine["output_node"] is True
    assert info["SONICTLoader"]["input"]["required"]["sonic_unet"][0] == ["none", *SONIC_FOLDER]


def test_frame_rate_takes_a_float_or_int_link_and_a_number(server: dict, media: dict) -> None:
    image, audio = uploaded(server, media)
    graph = sonic_graph(image, audio, preview=False)
    graph["13"]["inputs"]["frame_rate"] = ["58", 1]  # ImageResize+'s width: an INT output
    assert _first_error(server, graph, "13") is None
    requests.post(f"{server['base']}/interrupt", timeout=10)
    graph["13"]["inputs"]["frame_rate"] = ["58", 0]  # an IMAGE output
    error = _first_error(server, graph, "13")
    assert error is not None and error["type"] == "return_type_mismatch", error
    graph["13"]["inputs"]["frame_rate"] = "fast"  # a widget value is converted to FLOAT
    error = _first_error(server, graph, "13")
    assert error is not None and error["type"] == "invalid_input_type" and "FLOAT" in error["message"], error


def test_prores_is_rendered_as_vhs_writes_it(server: dict, media: dict) -> None:
    """VHS's ProRes.json: prores_ks with the `profile` widget (default hq), PCM audio, a .mov file."""
    image, audio = uploaded(server, media)
    graph = sonic_graph(image, audio, prefix="prores", preview=False)
    for name in ("pix_fmt", "crf", "save_metadata", "trim_to_audio"):  # h264-mp4's widgets, not ProRes's
        del graph["13"]["inputs"][name]
    graph["13"]["inputs"].update(format="video/ProRes", profile="hq")
    resp = submit(server, graph, str(uuid.uuid4()))
    assert resp.status_code == 200 and resp.json()["node_errors"] == {}, resp.text
    entry = wait_history(server, resp.json()["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    gif = entry["outputs"]["13"]["gifs"][0]
    assert gif["filename"].endswith(".mov") and gif["format"] == "video/ProRes"
    info = _probe(server["data_dir"] / "default" / "output" / gif["filename"])
    codecs = {s["codec_type"]: s for s in info["streams"]}
    assert codecs["video"]["codec_name"] == "prores" and codecs["audio"]["codec_name"] == "pcm_s16le"
    graph["13"]["inputs"].update(format="video/webm")  # accepted by validation, not rendered by the dev node
    resp = submit(server, graph, str(uuid.uuid4()))
    assert resp.json()["node_errors"] == {}
    entry = wait_history(server, resp.json()["prompt_id"])
    assert entry["status"]["status_str"] == "error"


def test_a_range_error_reads_as_the_input_and_its_limit(server: dict, media: dict) -> None:
    """The dev node's answer as the engine words it for the job (issue 17: it said only "seed")."""
    import comfyui

    image, audio = uploaded(server, media)
    graph = sonic_graph(image, audio, preview=False)
    graph["31"]["inputs"]["seed"] = 2**31
    graph["13"]["inputs"]["format"] = "video/mpeg"
    resp = submit(server, graph, str(uuid.uuid4()))
    assert resp.status_code == 400
    text = comfyui.format_prompt_error(resp.json())
    assert "node 31 (SONICSampler): seed: Value 2147483648 bigger than max of 2147483647" in text, text
    assert "node 13 (VHS_VideoCombine): format: 'video/mpeg' not in [" in text, text


def test_upload_over_the_limit_is_refused_with_413(server: dict, tmp_path: Path, monkeypatch) -> None:
    assert comfy.max_upload_bytes() == 100 * 1024 * 1024  # ComfyUI's --max-upload-size default
    monkeypatch.setenv("DEVNODE_COMFY_MAX_UPLOAD_MB", "0.5")
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (600 * 1024))
    with big.open("rb") as fh:
        resp = requests.post(f"{server['base']}/upload/image", files={"image": ("big.wav", fh)}, timeout=30)
    assert resp.status_code == 413 and "Maximum request body size" in resp.text
    assert not (server["data_dir"] / "default" / "input" / "big.wav").exists()


def test_sampler_ignores_interrupt_until_it_ends(server: dict, media: dict, monkeypatch) -> None:
    monkeypatch.setenv("DEVNODE_SONIC_MIN_S", "3")
    image, audio = uploaded(server, media)
    client_id = str(uuid.uuid4())
    ws = connect(server, client_id)
    try:
        prompt_id = submit(server, sonic_graph(image, audio, prefix="busy"), client_id).json()["prompt_id"]
        seen = collect(ws, prompt_id, {"executing"}, timeout=30)
        while seen[-1]["data"]["node"] != "31":
            seen = collect(ws, prompt_id, {"executing"}, timeout=30)
        interrupted_at = time.monotonic()
        assert requests.post(f"{server['base']}/interrupt", timeout=10).status_code == 200
        time.sleep(1.0)
        queue = requests.get(f"{server['base']}/queue", timeout=10).json()
        assert [item[1] for item in queue["queue_running"]] == [prompt_id]  # still busy after /interrupt
        messages = collect(ws, prompt_id, {"execution_interrupted", "execution_success", "execution_error"}, 60)
    finally:
        ws.close()
    assert time.monotonic() - interrupted_at >= 1.5  # ran on to the sampler's end
    assert messages[-1]["type"] == "execution_interrupted"
    assert not [m for m in messages if m["type"] == "progress"]  # the sampler reports no progress
    assert "13" not in {m["data"].get("node") for m in messages if m["type"] == "executing"}
    assert requests.get(f"{server['base']}/queue", timeout=10).json()["queue_running"] == []
