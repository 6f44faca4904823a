"""comfyui.py (and sonic_workflow.py): pure helpers, and the engine against a scripted fake ComfyUI on 127.0.0.1.

The fake is a FastAPI app mounted under a path prefix (/nodes/abc/comfyui, like a proxied node) and
served by uvicorn in a thread. Each test sets SCRIPT["mode"]; /prompt then plays that script on the
client's websocket.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect  # module level: FastAPI resolves
from fastapi.responses import JSONResponse, Response  # the route annotations by name from here
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engines live at the repo root

from conftest import engine_job, serve_asgi  # noqa: E402

import comfyui  # noqa: E402
import media_check  # noqa: E402
import mediaconv  # noqa: E402
import sonic_workflow  # noqa: E402
from engine_api import EngineError, JobStopped, NodeUrls  # noqa: E402

KEY = "comfy-key"
VIDEO = b"\x00\x00\x00\x18ftypmp42" + b"fake video" * 1000


# --- pure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1920, 1080), (1280, 720)),
        ((1080, 1920), (404, 720)),
        ((512, 512), (720, 720)),
        ((2048, 1024), (1280, 640)),
        ((1001, 333), (1280, 424)),
        ((3, 3), (720, 720)),
    ],
)
def test_fit_size(size: tuple[int, int], expected: tuple[int, int]) -> None:
    w, h = sonic_workflow.fit_size(*size)
    assert (w, h) == expected
    assert w % 2 == 0 and h % 2 == 0 and w <= 1280 and h <= 720


def _tone(path: Path, seconds: float, fmt: str = "wav") -> Path:
    from pydub.generators import Sine

    Sine(330).to_audio_segment(duration=int(seconds * 1000)).export(str(path), format=fmt)
    return path


def test_build_sonic_workflow(tmp_path: Path) -> None:
    audio, seconds = comfyui.prepare_audio(_tone(tmp_path / "a.wav", 3.2), tmp_path, "j")
    assert audio == tmp_path / "j_input.wav"
    assert 3.1 < seconds < 3.3
    wf = sonic_workflow.build_sonic_workflow("img.jpg", "j_input.wav", (1080, 1920), seconds, "c3render/j", 42)
    assert set(wf) == {"18", "26", "58", "32", "34", "33", "31", "13", "21"}
    classes = {k: v["class_type"] for k, v in wf.items()}
    assert classes == {
        "18": "LoadImage",
        "26": "LoadAudio",
        "58": "ImageResize+",
        "32": "ImageOnlyCheckpointLoader",
        "34": "SONICTLoader",
        "33": "SONIC_PreData",
        "31": "SONICSampler",
        "13": "VHS_VideoCombine",
        "21": "PreviewImage",
    }
    for node in wf.values():  # every link points at an existing node
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in wf and isinstance(value[1], int)
    assert wf["18"]["inputs"] == {"image": "img.jpg"}
    assert wf["26"]["inputs"] == {"audio": "j_input.wav"}
    resize = wf["58"]["inputs"]
    assert (resize["image"], resize["width"], resize["height"]) == (["18", 0], 404, 720)
    assert (resize["interpolation"], resize["method"], resize["condition"], resize["multiple_of"]) == (
        "nearest",
        "stretch",
        "always",
        0,
    )
    assert wf["32"]["inputs"] == {"ckpt_name": "svd_xt.safetensors"}
    assert wf["34"]["inputs"] == {
        "model": ["32", 0],
        "sonic_unet": "unet.pth",
        "ip_audio_scale": 1,
        "use_interframe": True,
        "dtype": "bf16",
    }
    pre = wf["33"]["inputs"]
    assert (pre["clip_vision"], pre["vae"], pre["audio"], pre["image"], pre["weight_dtype"]) == (
        ["32", 1],
        ["32", 2],
        ["26", 0],
        ["58", 0],
        ["34", 1],
    )
    assert pre["duration"] == math.ceil(seconds) + sonic_workflow.DURATION_MARGIN_S == 6
    assert (pre["min_resolution"], pre["expand_ratio"]) == (576, 1)
    sampler = wf["31"]["inputs"]
    assert sampler == {
        "model": ["34", 0],
        "data_dict": ["33", 0],
        "seed": 42,
        "inference_steps": 25,
        "dynamic_scale": 1,
        "fps": 24,
    }
    combine = wf["13"]["inputs"]
    assert (combine["images"], combine["frame_rate"], combine["audio"]) == (["31", 0], ["31", 1], ["26", 0])
    assert combine["format"] == "video/h264-mp4" and combine["pix_fmt"] == "yuv420p" and combine["crf"] == 19
    assert combine["trim_to_audio"] is True and combine["save_output"] is True
    assert combine["filename_prefix"] == "c3render/j"
    assert wf["21"]["inputs"] == {"images": ["58", 0]}


def test_prepare_audio_converts_containers(tmp_path: Path) -> None:
    src = _tone(tmp_path / "voice.m4a", 1.5, fmt="mp4")
    out, seconds = comfyui.prepare_audio(src, tmp_path, "j")
    assert out == tmp_path / "j_input.mp3"
    assert media_check.format_and_duration(out)[0] == "mp3"
    assert 1.4 < seconds < 1.7


def test_prepare_image_scales_and_flattens(tmp_path: Path) -> None:
    Image.new("RGBA", (3000, 1500), (10, 20, 30, 0)).save(tmp_path / "big.png")
    size = mediaconv.prepare_image(tmp_path / "big.png", tmp_path / "out.jpg")
    assert size == (2048, 1024)
    with Image.open(tmp_path / "out.jpg") as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (2048, 1024)
        assert img.getpixel((5, 5))[0] > 240  # transparent -> white
    Image.new("RGB", (640, 480)).save(tmp_path / "small.png")
    assert mediaconv.prepare_image(tmp_path / "small.png", tmp_path / "small.jpg") == (640, 480)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(EngineError):
        mediaconv.prepare_image(tmp_path / "junk.png", tmp_path / "junk.jpg")


def _comfy_error(kind: str, message: str, details: str, input_name: str | None = None) -> dict:
    """A node error as ComfyUI's execution.py (validate_inputs) writes it."""
    return {"type": kind, "message": message, "details": details,
            "extra_info": {"input_name": input_name} if input_name else {}}


@pytest.mark.parametrize(("error", "text"), [
    (_comfy_error("value_bigger_than_max", "Value 2147483648 bigger than max of 2147483647", "seed", "seed"),
     "seed: Value 2147483648 bigger than max of 2147483647"),  # was just "seed"
    (_comfy_error("value_smaller_than_min", "Value 0.4 smaller than min of 0.5", "dynamic_scale", "dynamic_scale"),
     "dynamic_scale: Value 0.4 smaller than min of 0.5"),
    (_comfy_error("required_input_missing", "Required input is missing", "pingpong", "pingpong"),
     "pingpong: Required input is missing"),
    (_comfy_error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                  "images", "images"),
     "images: Bad linked input, must be a length-2 list of [node_id, slot_index]"),
    (_comfy_error("value_not_in_list", "Value not in list", "format: 'video/mpeg' not in ['image/gif']", "format"),
     "format: 'video/mpeg' not in ['image/gif']"),
    (_comfy_error("custom_validation_failed", "Custom validation failed for node",
                  "image - Invalid image file: x.png", "image"),
     "image - Invalid image file: x.png"),
    (_comfy_error("custom_validation_failed", "Custom validation failed for node", "image", "image"),
     "image: Custom validation failed for node"),  # VALIDATE_INPUTS answered False: no reason given
    (_comfy_error("return_type_mismatch", "Return type mismatch between linked nodes",
                  "images, received_type(AUDIO) mismatch input_type(IMAGE)", "images"),
     "Return type mismatch between linked nodes: images, received_type(AUDIO) mismatch input_type(IMAGE)"),
    (_comfy_error("invalid_input_type", "Failed to convert an input value to a INT value",
                  "seed, abc, invalid literal for int() with base 10: 'abc'", "seed"),
     "Failed to convert an input value to a INT value: seed, abc, invalid literal for int() with base 10: 'abc'"),
    (_comfy_error("exception_during_validation", "Exception when validating node", "'31'"),
     "Exception when validating node: '31'"),
    ({"type": "value_bigger_than_max", "message": "Value 9 bigger than max of 8", "details": "steps"},
     "steps: Value 9 bigger than max of 8"),  # no extra_info: a bare input name still leads
    ({"message": "Something broke"}, "Something broke"),
    ("a plain string", "a plain string"),
])
def test_each_kind_of_validation_error_says_what_is_wrong(error, text) -> None:
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
            "node_errors": {"31": {"errors": [error], "dependent_outputs": ["13"], "class_type": "SONICSampler"}}}
    assert comfyui.format_prompt_error(body) == f"ComfyUI rejected the workflow: node 31 (SONICSampler): {text}"


def test_error_formatting() -> None:
    body = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
        "node_errors": {
            "18": {
                "errors": [{"type": "custom_validation_failed", "message": "Custom validation failed for node",
                            "details": "Invalid image file: x.png"}],
                "dependent_outputs": ["13"],
                "class_type": "LoadImage",
            }
        },
    }  # fmt: skip
    assert comfyui.format_prompt_error(body) == (
        "ComfyUI rejected the workflow: node 18 (LoadImage): Invalid image file: x.png"
    )
    assert comfyui.format_prompt_error({"error": {"message": "no outputs", "details": "x"}, "node_errors": {}}) == (
        "ComfyUI rejected the workflow: no outputs: x"
    )
    assert comfyui.format_prompt_error({"error": "bad json"}) == "ComfyUI rejected the workflow: bad json"
    data = {"node_id": "31", "node_type": "SONICSampler", "exception_message": "CUDA out of memory\n"}
    assert comfyui.format_execution_error(data) == "ComfyUI node 31 (SONICSampler): CUDA out of memory"
    entry = {"status": {"status_str": "error", "messages": [["execution_start", {}], ["execution_error", data]]}}
    assert comfyui.history_error(entry) == "ComfyUI node 31 (SONICSampler): CUDA out of memory"
    assert comfyui.history_error({"status": {"status_str": "success"}}) is None


def test_ws_url() -> None:
    assert comfyui.ws_url("http://127.0.0.1:8700/nodes/abc/comfyui", "c1") == (
        "ws://127.0.0.1:8700/nodes/abc/comfyui/ws?clientId=c1"
    )
    assert comfyui.ws_url("https://ui-node.comput3.ai", "c2") == "wss://ui-node.comput3.ai/ws?clientId=c2"


def test_video_output_prefers_node_13_and_videos_key() -> None:
    entry = {"outputs": {"21": {"images": [{"filename": "p.png"}]}, "13": {"videos": [{"filename": "v.mp4"}]}}}
    assert comfyui.video_output(entry)["filename"] == "v.mp4"
    with pytest.raises(EngineError):
        comfyui.video_output({"outputs": {"21": {"images": [{"filename": "p.png"}]}}})


# --- the fake ComfyUI ---------------------------------------------------------------------------

SCRIPT: dict = {}
CALLS: list[tuple[str, object]] = []


def _reset(mode: str) -> None:
    SCRIPT.clear()
    SCRIPT.update(mode=mode, history={}, sockets={}, uploads={}, queue_pending=[], queue_running=[],
                  prompts={})  # fmt: skip
    CALLS.clear()


def _fake_comfyui():
    app = FastAPI()

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if request.headers.get("x-c3-api-key") != KEY:
            return JSONResponse({"error": "missing key"}, status_code=401)
        return await call_next(request)

    @app.get("/system_stats")
    async def system_stats():
        CALLS.append(("system_stats", None))
        return {"system": {"os": "posix"}, "devices": []}

    @app.post("/upload/image")
    async def upload(request: Request):
        form = await request.form()
        image = form["image"]
        SCRIPT["uploads"][image.filename] = await image.read()
        CALLS.append(("upload", {"filename": image.filename, "overwrite": form.get("overwrite"),
                                 "type": form.get("type")}))  # fmt: skip
        return {"name": image.filename, "subfolder": "c3", "type": "input"}

    @app.post("/prompt")
    async def prompt(request: Request):
        body = await request.json()
        CALLS.append(("prompt", body))
        if SCRIPT["mode"] == "reject":
            return JSONResponse(
                {
                    "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed"},
                    "node_errors": {
                        "18": {"errors": [{"message": "Invalid image file: x.png"}], "class_type": "LoadImage"}
                    },
                },  # fmt: skip
                status_code=400,
            )
        prompt_id = f"p-{len(SCRIPT['prompts']) + 1}"
        SCRIPT["prompts"][prompt_id] = body
        ws = SCRIPT["sockets"].get(body["client_id"])
        SCRIPT["queue_pending"].append(prompt_id)
        asyncio.get_running_loop().create_task(_play(ws, prompt_id))
        return {"prompt_id": prompt_id, "number": 1, "node_errors": {}}

    @app.websocket("/ws")
    async def ws_route(websocket: WebSocket):
        if websocket.headers.get("x-c3-api-key") != KEY:
            await websocket.close(code=1008)
            return
        await websocket.accept()
        client_id = websocket.query_params.get("clientId")
        CALLS.append(("ws", client_id))
        SCRIPT["sockets"][client_id] = websocket
        await websocket.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}},
                                   "sid": client_id})  # fmt: skip
        try:
            while True:
                await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError):
            return

    @app.get("/history/{prompt_id}")
    async def history(prompt_id: str):
        CALLS.append(("history", prompt_id))
        entry = SCRIPT["history"].get(prompt_id)
        return {prompt_id: entry} if entry else {}

    @app.get("/view")
    async def view(filename: str, subfolder: str = "", type: str = ""):
        CALLS.append(("view", {"filename": filename, "subfolder": subfolder, "type": type}))
        return Response(VIDEO, media_type="video/mp4")

    @app.get("/queue")
    async def get_queue():
        running = [[0, p, {}, {}, []] for p in SCRIPT["queue_running"]]
        pending = [[1, p, {}, {}, []] for p in SCRIPT["queue_pending"]]
        return {"queue_running": running, "queue_pending": pending}

    @app.post("/queue")
    async def post_queue(request: Request):
        body = await request.json()
        CALLS.append(("queue", body))
        SCRIPT["queue_pending"] = [p for p in SCRIPT["queue_pending"] if p not in body.get("delete", [])]
        return {}

    @app.post("/interrupt")
    async def interrupt(request: Request):
        CALLS.append(("interrupt", await request.body()))
        return {}

    outer = FastAPI()

    @outer.get("/")
    async def node_root():  # the node itself, as the worker's health check asks it
        return {"status": "ok"}

    outer.mount("/nodes/abc/comfyui", app)
    return outer


def _success_entry(prompt_id: str) -> dict:
    return {
        "prompt": [1, prompt_id, {}, {}, ["13"]],
        "outputs": {
            "21": {"images": [{"filename": "prev.png", "subfolder": "", "type": "temp"}]},
            "13": {
                "gifs": [
                    {
                        "filename": "j_00001-audio.mp4",
                        "subfolder": "c3render",
                        "type": "output",
                        "format": "video/h264-mp4",
                    }
                ]
            },
        },  # fmt: skip
        "status": {"status_str": "success", "completed": True, "messages": []},
    }


async def _play(ws, prompt_id: str) -> None:
    """Send the scripted messages for a queued prompt."""
    mode = SCRIPT["mode"]

    async def send(kind: str, **data) -> None:
        await ws.send_json({"type": kind, "data": {**data, "prompt_id": prompt_id}})

    def start() -> None:
        SCRIPT["queue_pending"].remove(prompt_id)
        SCRIPT["queue_running"].append(prompt_id)

    await asyncio.sleep(0.1)
    if mode == "queued" or ws is None:
        if ws is None:  # no socket: just finish later
            await asyncio.sleep(1.0)
            SCRIPT["history"][prompt_id] = _success_entry(prompt_id)
        return
    start()
    await send("execution_start", timestamp=1)
    await ws.send_bytes(b"\x00\x00\x00\x01preview")
    other = {"prompt_id": "someone-else", "node_id": "1", "node_type": "X", "exception_message": "not ours"}
    await ws.send_json({"type": "execution_error", "data": other})
    await send("execution_cached", nodes=["32"])
    await send("executing", node="31")
    await send("progress", value=5, max=25, node="31")  # per-node progress of another node: not job progress
    await send("executing", node="13")
    for frame in (12, 24):
        await send("progress", value=frame, max=48, node="13")
    if mode == "success":
        await send("executed", node="13", output={})
        await send("execution_success", timestamp=2)
        await asyncio.sleep(0.7)  # history shows up a little after the success message
        SCRIPT["history"][prompt_id] = _success_entry(prompt_id)
        await send("executing", node=None)
    elif mode == "error":
        data = {"node_id": "31", "node_type": "SONICSampler", "exception_message": "CUDA out of memory"}
        await send("execution_error", **data)
        SCRIPT["history"][prompt_id] = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                                                  "messages": [["execution_error", data]]}}  # fmt: skip
    elif mode == "drop":
        await ws.close(code=1011)
        await asyncio.sleep(1.5)
        SCRIPT["history"][prompt_id] = _success_entry(prompt_id)
    elif mode == "hang":
        pass  # runs until interrupted


@pytest.fixture(scope="module")
def node():
    with serve_asgi(_fake_comfyui()) as base:
        yield NodeUrls(base=base, csm="", whisper="", comfyui=base + "/nodes/abc/comfyui", ollama="", api_key=KEY)


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (1080, 1920), (200, 150, 120)).save(src / "face.png")
    return {"image": src / "face.png", "audio": _tone(src / "voice.wav", 2.5)}


def _names(kind: str) -> list[object]:
    return [value for name, value in CALLS if name == kind]


def test_success(node: NodeUrls, inputs: dict[str, Path], tmp_path: Path) -> None:
    _reset("success")
    seen: list[int] = []
    phases: list[str] = []
    job = engine_job({"seed": 7}, "job1", inputs, node, tmp_path, progress=seen.append, phase=phases.append)
    out = comfyui.run(job)
    assert out == tmp_path / "job1.mp4"
    assert out.read_bytes() == VIDEO
    assert not _names("system_stats")  # the worker waited for ComfyUI before the engine ran: not again
    uploads = _names("upload")
    assert [u["filename"] for u in uploads] == ["job1_input.jpg", "job1_input.wav"]
    assert all(u["overwrite"] == "true" for u in uploads)
    with Image.open(tmp_path / "job1_input.jpg") as img:
        assert img.size == (1080, 1920)
    (body,) = _names("prompt")
    assert _names("ws") == [body["client_id"]]  # the socket was opened with the same client id
    wf = body["prompt"]
    assert wf["18"]["inputs"]["image"] == "c3/job1_input.jpg"  # the returned subfolder/name
    assert wf["26"]["inputs"]["audio"] == "c3/job1_input.wav"
    assert (wf["58"]["inputs"]["width"], wf["58"]["inputs"]["height"]) == (404, 720)
    assert wf["33"]["inputs"]["duration"] == 5
    assert wf["31"]["inputs"]["seed"] == 7
    assert wf["13"]["inputs"]["filename_prefix"] == "c3render/job1"
    assert _names("view") == [{"filename": "j_00001-audio.mp4", "subfolder": "c3render", "type": "output"}]
    assert seen == [25, 50, 100]  # node 13's frames only (the encoding phase), then done
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == [
        "uploading_inputs", "rendering", "encoding"]
    assert not _names("interrupt")


def test_rejected_workflow(node: NodeUrls, inputs: dict[str, Path], tmp_path: Path) -> None:
    _reset("reject")
    with pytest.raises(EngineError) as info:
        comfyui.run(engine_job({}, "job2", inputs, node, tmp_path))
    assert str(info.value) == "ComfyUI rejected the workflow: node 18 (LoadImage): Invalid image file: x.png"


def test_execution_error(node: NodeUrls, inputs: dict[str, Path], tmp_path: Path) -> None:
    _reset("error")
    with pytest.raises(EngineError) as info:
        comfyui.run(engine_job({}, "job3", inputs, node, tmp_path))
    assert str(info.value) == "ComfyUI node 31 (SONICSampler): CUDA out of memory"


def test_socket_drop_falls_back_to_history(
    node: NodeUrls, inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(comfyui, "HISTORY_POLL_S", 0.5)
    _reset("drop")
    out = comfyui.run(engine_job({}, "job4", inputs, node, tmp_path))
    assert out.read_bytes() == VIDEO
    assert len(_names("history")) >= 2  # it polled until the entry appeared


def test_stop_interrupts_running_prompt(node: NodeUrls, inputs: dict[str, Path], tmp_path: Path) -> None:
    _reset("hang")
    started = time.monotonic()

    def should_stop() -> str | None:
        return "max_time" if time.monotonic() - started > 1.5 else None

    with pytest.raises(JobStopped, match="max_time"):
        comfyui.run(engine_job({}, "job5", inputs, node, tmp_path, should_stop))
    assert time.monotonic() - started < 4
    assert len(_names("interrupt")) == 1
    assert not _names("queue")  # it had started: nothing to drop from the queue


def test_stop_drops_queued_prompt(node: NodeUrls, inputs: dict[str, Path], tmp_path: Path) -> None:
    _reset("queued")
    started = time.monotonic()

    def should_stop() -> str | None:
        return "cancelled" if time.monotonic() - started > 1.0 else None

    with pytest.raises(JobStopped, match="cancelled"):
        comfyui.run(engine_job({}, "job6", inputs, node, tmp_path, should_stop))
    assert _names("queue") == [{"delete": ["p-1"]}]
    assert not _names("interrupt")  # /queue no longer lists it as running
