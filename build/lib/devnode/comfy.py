"""Dev node ComfyUI stand-in: ComfyUI's HTTP and websocket API for the SONIC portrait workflow.

This module owns everything a media:fast node's ComfyUI does in the dev node (PROTOCOLS.md 5):
uploads, prompt validation, the prompt queue, execution of the SONIC graph, history, /view and the
websocket messages. State is kept per workload id (``scope["devnode_workload"]``, set by the dev node
core when it mounts this app under ``/nodes/<workload>/comfyui``; "default" when absent): files live
under ``data_dir/<workload>/{input,output,temp}/`` and each workload has its own queue, history,
websocket clients and one worker thread, so one workload runs one prompt at a time, like a real node.

There is no model: SONICSampler "renders" with ffmpeg, a real H.264/AAC MP4 of the uploaded portrait
with a slow pan and a brightness pulse, as long as the audio. The node classes, their inputs, the
answer shapes and the websocket messages follow ComfyUI's server.py/execution.py and the
ComfyUI-VideoHelperSuite / ComfyUI_Sonic / ComfyUI_essentials nodes the workflow names.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import math
import mimetypes
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image, ImageOps
from starlette.datastructures import UploadFile

from devnode import faults

log = logging.getLogger("devnode.comfy")

MAX_RESOLUTION = 16384
UPLOAD_TYPES = ("input", "temp", "output")
HANG_POLL_S = 0.05

# --- node classes ---------------------------------------------------------------------------
# Input spec: (type, options). type is a ComfyUI type name ("INT", "IMAGE", ...) or a list of
# allowed values; options may hold min/max. "UPLOAD" marks LoadImage/LoadAudio file names.

_INTERPOLATIONS = ["nearest", "bilinear", "bicubic", "area", "nearest-exact", "lanczos"]
_RESIZE_METHODS = ["stretch", "keep proportion", "fill / crop", "pad"]
_RESIZE_CONDITIONS = [
    "always",
    "downscale if bigger",
    "upscale if smaller",
    "if bigger area",
    "if smaller area",
]
_VHS_FORMATS = [
    "image/gif",
    "image/webp",
    "video/h264-mp4",
    "video/h265-mp4",
    "video/webm",
    "video/nvenc_h264-mp4",
]
_PIX_FMTS = ["yuv420p", "yuv420p10le"]


@dataclass(frozen=True)
class NodeDef:
    required: dict[str, tuple[Any, dict]]
    returns: tuple[str, ...]
    optional: dict[str, tuple[Any, dict]] = field(default_factory=dict)
    output_node: bool = False


NODE_DEFS: dict[str, NodeDef] = {
    "LoadImage": NodeDef({"image": ("UPLOAD", {"kind": "image"})}, ("IMAGE", "MASK")),
    "LoadAudio": NodeDef({"audio": ("UPLOAD", {"kind": "audio"})}, ("AUDIO",)),
    "ImageResize+": NodeDef(
        {
            "image": ("IMAGE", {}),
            "width": ("INT", {"min": 0, "max": MAX_RESOLUTION}),
            "height": ("INT", {"min": 0, "max": MAX_RESOLUTION}),
            "interpolation": (_INTERPOLATIONS, {}),
            "method": (_RESIZE_METHODS, {}),
            "condition": (_RESIZE_CONDITIONS, {}),
            "multiple_of": ("INT", {"min": 0, "max": 512}),
        },
        ("IMAGE", "INT", "INT"),
    ),
    "ImageOnlyCheckpointLoader": NodeDef(
        {"ckpt_name": (["svd_xt.safetensors", "svd_xt_1_1.safetensors"], {})}, ("MODEL", "CLIP_VISION", "VAE")
    ),
    "SONICTLoader": NodeDef(
        {
            "model": ("MODEL", {}),
            "sonic_unet": (["unet.pth"], {}),
            "ip_audio_scale": ("FLOAT", {"min": 0.1, "max": 10.0}),
            "use_interframe": ("BOOLEAN", {}),
            "dtype": (["fp16", "fp32", "bf16"], {}),
        },
        ("MODEL_SONIC", "DTYPE"),
    ),
    "SONIC_PreData": NodeDef(
        {
            "clip_vision": ("CLIP_VISION", {}),
            "vae": ("VAE", {}),
            "audio": ("AUDIO", {}),
            "image": ("IMAGE", {}),
            "weight_dtype": ("DTYPE", {}),
            "min_resolution": ("INT", {"min": 64, "max": 2048}),
            "duration": ("FLOAT", {"min": 1.0, "max": 100000.0}),
            "expand_ratio": ("FLOAT", {"min": 0.1, "max": 1.0}),
        },
        ("SONIC_PREDATA",),
    ),
    "SONICSampler": NodeDef(
        {
            "model": ("MODEL_SONIC", {}),
            "data_dict": ("SONIC_PREDATA", {}),
            "seed": ("INT", {"min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "inference_steps": ("INT", {"min": 1, "max": 100}),
            "dynamic_scale": ("FLOAT", {"min": 0.1, "max": 2.0}),
            "fps": ("FLOAT", {"min": 5.0, "max": 120.0}),
        },
        ("IMAGE", "FLOAT"),
    ),
    # Real VHS_VideoCombine also requires loop_count, pingpong and save_output; accepted, not required.
    "VHS_VideoCombine": NodeDef(
        {
            "images": ("IMAGE", {}),
            "frame_rate": ("FLOAT", {"min": 1.0, "max": 240.0}),
            "filename_prefix": ("STRING", {}),
            "format": (_VHS_FORMATS, {}),
        },
        (),
        optional={
            "audio": ("AUDIO", {}),
            "loop_count": ("INT", {"min": 0, "max": 100}),
            "pingpong": ("BOOLEAN", {}),
            "save_output": ("BOOLEAN", {}),
            "pix_fmt": (_PIX_FMTS, {}),
            "crf": ("INT", {"min": 0, "max": 100}),
            "trim_to_audio": ("BOOLEAN", {}),
            "save_metadata": ("BOOLEAN", {}),
        },
        output_node=True,
    ),
    "PreviewImage": NodeDef({"images": ("IMAGE", {})}, (), output_node=True),
}


# --- state ----------------------------------------------------------------------------------


@dataclass
class Task:
    number: float
    prompt_id: str
    prompt: dict
    extra_data: dict
    outputs: list[str]


@dataclass
class Client:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass
class Workload:
    name: str
    root: Path
    cond: threading.Condition = field(default_factory=threading.Condition)
    pending: list[Task] = field(default_factory=list)
    running: Task | None = None
    history: dict[str, dict] = field(default_factory=dict)
    number: int = 0
    clients: dict[str, list[Client]] = field(default_factory=dict)
    interrupt: threading.Event = field(default_factory=threading.Event)
    proc: subprocess.Popen | None = None
    last_node: str | None = None
    worker: threading.Thread | None = None
    stopped: bool = False


class Interrupted(Exception):
    """Raised inside execution when /interrupt stopped the running prompt."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _safe_dir_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "default"
    return "_" + cleaned if cleaned in (".", "..") else cleaned


def _get_workload(
    registry: dict[str, Workload], lock: threading.Lock, data_dir: Path, scope: Any
) -> Workload:
    name = str(scope.get("devnode_workload") or "default")
    with lock:
        wl = registry.get(name)
        if wl is None:
            root = data_dir / _safe_dir_name(name)
            for sub in UPLOAD_TYPES:
                (root / sub).mkdir(parents=True, exist_ok=True)
            wl = Workload(name=name, root=root)
            registry[name] = wl
        return wl


# --- websocket messages ---------------------------------------------------------------------


def _emit(wl: Workload, event: str, data: dict, client_id: str | None = None) -> None:
    """Send one JSON message to the sockets of `client_id`, or to every socket when it is None."""
    text = json.dumps({"type": event, "data": data})
    with wl.cond:
        if client_id is None:
            targets = [c for group in wl.clients.values() for c in group]
        else:
            targets = list(wl.clients.get(client_id, []))
    for client in targets:
        try:
            client.loop.call_soon_threadsafe(client.queue.put_nowait, text)
        except RuntimeError:  # the connection's event loop is gone
            pass


def _queue_info(wl: Workload) -> dict:
    with wl.cond:
        remaining = len(wl.pending) + (1 if wl.running else 0)
    return {"exec_info": {"queue_remaining": remaining}}


def _broadcast_status(wl: Workload) -> None:
    _emit(wl, "status", {"status": _queue_info(wl)})


# --- validation -----------------------------------------------------------------------------


def _annotated(name: str) -> tuple[str, str | None]:
    """Split ComfyUI's "name.png [output]" annotation; return (name, type or None)."""
    for kind in UPLOAD_TYPES:
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


def _inside(base: Path, candidate: Path) -> bool:
    try:
        candidate.resolve().relative_to(base.resolve())
    except ValueError:
        return False
    return True


def _upload_path(wl: Workload, name: str) -> Path | None:
    """The file a LoadImage/LoadAudio value names, or None when it is not an uploaded file."""
    if not isinstance(name, str) or not name:
        return None
    filename, kind = _annotated(name)
    base = wl.root / (kind or "input")
    path = base / filename
    if not _inside(base, path) or not path.is_file():
        return None
    return path


def _node_error(kind: str, message: str, details: str, **extra: Any) -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _convert(type_name: str, value: Any) -> Any:
    if type_name == "INT":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{value!r} is not an integer")
        return int(value)
    if type_name == "FLOAT":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        return float(value)
    if type_name == "BOOLEAN":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{value!r} is not a boolean")
    if type_name == "STRING":
        return str(value)
    return value


def _check_value(wl: Workload, name: str, spec: tuple[Any, dict], value: Any) -> tuple[Any, dict | None]:
    """Validate one widget value; return (converted value, error or None)."""
    type_input, opts = spec
    config = [type_input if not isinstance(type_input, list) else list(type_input), opts]
    if type_input == "UPLOAD":
        if _upload_path(wl, value) is None:
            what = "image" if opts.get("kind") == "image" else "audio"
            return value, _node_error(
                "custom_validation_failed",
                "Custom validation failed for node",
                f"{name} - Invalid {what} file: {value}",
                input_name=name,
                input_config=None,
                received_value=value,
            )
        return value, None
    if isinstance(type_input, list):
        if value not in type_input:
            return value, _node_error(
                "value_not_in_list",
                "Value not in list",
                f"{name}: '{value}' not in {type_input}",
                input_name=name,
                input_config=config,
                received_value=value,
            )
        return value, None
    if type_input in ("INT", "FLOAT", "BOOLEAN", "STRING"):
        try:
            value = _convert(type_input, value)
        except (TypeError, ValueError) as exc:
            return value, _node_error(
                "invalid_input_type",
                f"Failed to convert an input value to a {type_input} value",
                f"{name}, {value}, {exc}",
                input_name=name,
                input_config=config,
                received_value=value,
                exception_message=str(exc),
            )
        if "min" in opts and value < opts["min"]:
            return value, _node_error(
                "value_smaller_than_min",
                f"Value {value} smaller than min of {opts['min']}",
                name,
                input_name=name,
                input_config=config,
                received_value=value,
            )
        if "max" in opts and value > opts["max"]:
            return value, _node_error(
                "value_bigger_than_max",
                f"Value {value} bigger than max of {opts['max']}",
                name,
                input_name=name,
                input_config=config,
                received_value=value,
            )
        return value, None
    # A link type (IMAGE, AUDIO, ...) given as a plain value.
    return value, _node_error(
        "bad_linked_input",
        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
        name,
        input_name=name,
        input_config=config,
        received_value=value,
    )


def _validate_node(wl: Workload, prompt: dict, node_id: str, memo: dict[str, tuple[bool, list]]) -> bool:
    """Validate node `node_id` and everything it links to; results go to `memo` (id -> (ok, errors))."""
    if node_id in memo:
        return memo[node_id][0]
    memo[node_id] = (True, [])  # guards against cycles while recursing
    node = prompt[node_id]
    definition = NODE_DEFS[node["class_type"]]
    inputs = node.get("inputs") or {}
    errors: list[dict] = []
    upstream_ok = True
    specs = {**definition.required, **definition.optional}
    for name, spec in specs.items():
        if name not in inputs:
            if name in definition.required:
                errors.append(
                    _node_error("required_input_missing", "Required input is missing", name, input_name=name)
                )
            continue
        value = inputs[name]
        if isinstance(value, list):
            if len(value) != 2 or not isinstance(value[1], int) or isinstance(value[1], bool):
                errors.append(
                    _node_error(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        name,
                        input_name=name,
                        received_value=value,
                    )
                )
                continue
            source_id, slot = str(value[0]), value[1]
            source = prompt.get(source_id)
            if source is None:
                errors.append(
                    _node_error(
                        "bad_linked_input",
                        f"Linked node '{source_id}' does not exist in the prompt",
                        f"{name}, node '{source_id}' not found",
                        input_name=name,
                        linked_node=value,
                    )
                )
                continue
            returns = NODE_DEFS[source["class_type"]].returns
            if not 0 <= slot < len(returns):
                errors.append(
                    _node_error(
                        "bad_linked_input",
                        f"Linked output index {slot} out of range for {source['class_type']}",
                        f"{name}, {source['class_type']} has {len(returns)} outputs",
                        input_name=name,
                        linked_node=value,
                    )
                )
                continue
            if spec[0] != returns[slot]:
                errors.append(
                    _node_error(
                        "return_type_mismatch",
                        "Return type mismatch between linked nodes",
                        f"{name}, received_type({returns[slot]}) mismatch input_type({spec[0]})",
                        input_name=name,
                        received_type=returns[slot],
                        linked_node=value,
                    )
                )
                continue
            if not _validate_node(wl, prompt, source_id, memo):
                upstream_ok = False
            continue
        converted, error = _check_value(wl, name, spec, value)
        if error is not None:
            errors.append(error)
        else:
            inputs[name] = converted
    memo[node_id] = (not errors and upstream_ok, errors)
    return memo[node_id][0]


def _invalid_prompt(message: str, details: str) -> tuple[dict, list, dict]:
    return _node_error("invalid_prompt", message, details), [], {}


def validate_prompt(wl: Workload, prompt: Any) -> tuple[dict | None, list[str], dict]:
    """ComfyUI-style validation: (error or None, output node ids to run, node_errors)."""
    if not isinstance(prompt, dict) or not prompt:
        return _invalid_prompt("Cannot execute because the prompt is not a non-empty object.", "")
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return _invalid_prompt(
                "Cannot execute because a node is missing the class_type property.", f"Node ID '#{node_id}'"
            )
        if node["class_type"] not in NODE_DEFS:
            return _invalid_prompt(
                f"Cannot execute because node {node['class_type']} does not exist.", f"Node ID '#{node_id}'"
            )
        if not isinstance(node.get("inputs", {}), dict):
            return _invalid_prompt(
                "Cannot execute because a node's inputs are not an object.", f"Node ID '#{node_id}'"
            )
    outputs = sorted(
        (nid for nid, n in prompt.items() if NODE_DEFS[n["class_type"]].output_node), key=_id_key
    )
    if not outputs:
        return _node_error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}
    memo: dict[str, tuple[bool, list]] = {}
    good: list[str] = []
    node_errors: dict[str, dict] = {}
    lines: list[str] = []
    for out in outputs:
        if _validate_node(wl, prompt, out, memo):
            good.append(out)
            continue
        for node_id in _upstream(prompt, out):
            ok, reasons = memo.get(node_id, (True, []))
            if ok or not reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {"errors": reasons, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]},
            )
            entry["dependent_outputs"].append(out)
            lines.extend(f"{r['message']}: {r['details']}" for r in reasons)
    if not good:
        error = _node_error(
            "prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(lines)
        )
        return error, [], node_errors
    return None, good, node_errors


def _id_key(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (sys.maxsize, node_id)


def _upstream(prompt: dict, node_id: str) -> list[str]:
    """`node_id` and every node it depends on (existing ones only), in dependency order."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(nid: str) -> None:
        if nid in seen or nid not in prompt:
            return
        seen.add(nid)
        for value in (prompt[nid].get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2:
                visit(str(value[0]))
        order.append(nid)

    visit(node_id)
    return order


def _execution_order(prompt: dict, outputs: list[str]) -> list[str]:
    """Run the output with the fewest not-yet-run dependencies first, as ComfyUI does."""
    order: list[str] = []
    remaining = list(outputs)
    while remaining:
        remaining.sort(key=lambda o: (len([n for n in _upstream(prompt, o) if n not in order]), _id_key(o)))
        for nid in _upstream(prompt, remaining.pop(0)):
            if nid not in order:
                order.append(nid)
    return order


# --- ffmpeg ---------------------------------------------------------------------------------


def _probe_duration(path: Path) -> float:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "default=nw=1:nk=1", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    try:
        duration = float(result.stdout.strip())
    except ValueError:
        raise RuntimeError(
            f"ffprobe cannot read a duration from {path.name}: {result.stderr.strip()}"
        ) from None
    if not math.isfinite(duration) or duration <= 0:
        raise RuntimeError(f"{path.name} has no playable audio (duration {duration})")
    return duration


def _run_ffmpeg(wl: Workload, args: list[str], on_frame: Any = None) -> None:
    """Run ffmpeg; /interrupt kills it (Interrupted); a non-zero exit raises RuntimeError."""
    cmd = [
        "ffmpeg",
        "-hide_banner",
        "-nostdin",
        "-y",
        "-v",
        "error",
        "-progress",
        "pipe:1",
        "-nostats",
        *args,
    ]
    with tempfile.TemporaryFile() as stderr:
        with wl.cond:
            if wl.interrupt.is_set():
                raise Interrupted()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
            wl.proc = proc
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if on_frame is not None and line.startswith("frame="):
                    try:
                        on_frame(int(line.split("=", 1)[1]))
                    except ValueError:
                        pass
            code = proc.wait()
        finally:
            with wl.cond:
                wl.proc = None
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr.seek(0)
        errors = stderr.read().decode("utf-8", "replace").strip()
    if wl.interrupt.is_set():
        raise Interrupted()
    if code != 0:
        tail = errors[-800:] if errors else "(no output)"
        raise RuntimeError(f"ffmpeg exited with status {code}: {tail}")


def _even(value: int) -> int:
    return max(2, value - value % 2)


# --- node execution -------------------------------------------------------------------------


@dataclass
class RunContext:
    wl: Workload
    task: Task
    node_id: str
    class_type: str


def _hang_until_interrupted(wl: Workload) -> None:
    """The 'hang' fault: wait until /interrupt, the node is gone, shutdown or faults.HANG_LIMIT_S."""
    deadline = time.monotonic() + faults.HANG_LIMIT_S
    log.info("comfyui hangs (fault) for workload %s until interrupted", wl.name)
    while not wl.interrupt.wait(HANG_POLL_S):
        if wl.stopped or faults._should_stop(wl.name):
            raise Interrupted()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"dev node fault injection: hung for {faults.HANG_LIMIT_S:.0f} s, giving up")
    raise Interrupted()


def _run_load_image(ctx: RunContext, inputs: dict) -> tuple[tuple, dict | None]:
    path = _upload_path(ctx.wl, inputs["image"])
    if path is None:
        raise FileNotFoundError(f"Invalid image file: {inputs['image']}")
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        size = img.size
    return ({"path": path, "width": size[0], "height": size[1]}, None), None


def _run_load_audio(ctx: RunContext, inputs: dict) -> tuple[tuple, dict | None]:
    path = _upload_path(ctx.wl, inputs["audio"])
    if path is None:
        raise FileNotFoundError(f"Invalid audio file: {inputs['audio']}")
    return ({"path": path, "duration": _probe_duration(path)},), None


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}


def _run_image_resize(ctx: RunContext, inputs: dict) -> tuple[tuple, dict | None]:
    source = inputs["image"]
    width = inputs["width"] or source["width"]
    height = inputs["height"] or source["height"]
    multiple = inputs["multiple_of"]
    if multiple > 1:
        width, height = max(multiple, width - width % multiple), max(multiple, height - height % multiple)
    src_w, src_h = source["width"], source["height"]
    condition = inputs["condition"]
    wanted = {
        "always": True,
        "downscale if bigger": src_w > width or src_h > height,
        "upscale if smaller": src_w < width or src_h < height,
        "if bigger area": src_w * src_h > width * height,
        "if smaller area": src_w * src_h < width * height,
    }[condition]
    resample = _RESAMPLE[inputs["interpolation"]]
    with Image.open(source["path"]) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        if wanted:
            method = inputs["method"]
            if method == "keep proportion":
                img = ImageOps.contain(img, (width, height), resample)
            elif method == "fill / crop":
                img = ImageOps.fit(img, (width, height), resample)
            elif method == "pad":
                img = ImageOps.pad(img, (width, height), resample, color=(0, 0, 0))
            else:
                img = img.resize((width, height), resample)
        out = ctx.wl.root / "temp" / f"resize_{ctx.task.prompt_id}_{ctx.node_id}.png"
        img.save(out, compress_level=1)
        size = img.size
    image = {"path": out, "width": size[0], "height": size[1]}
    return (image, size[0], size[1]), None


def _run_checkpoint(ctx: RunContext, inputs: dict) -> tuple[tuple, dict | None]:
    name = inputs["ckpt_name"]
    return ({"model": name}, {"clip_vision": name}, {"vae": name}), None


def _run_sonic_loader(ctx: RunContext, inputs: dict) -> tuple[tuple, dict | None]:
    return (
        {"sonic_unet": inputs["sonic_unet"], "use_interframe": inputs["use_interframe"]},
        inputs["dtype"],
    ), None


def _run_sonic_predata(ctx: RunContext, inputs: dict) -> tuple[tuple, dict | None]:
    data = {
        "image": inputs["image"],
        "audio": inputs["audio"],
        "duration": inputs["duration"],
        "min_resolution": inputs["min_resolution"],
    }
    return (data,), None


def _motion_filter(width: int, height: int) -> str:
    """A slow pan over a slightly enlarged portrait plus a gentle brightness pulse."""
    big_w, big_h = _even(int(width * 1.08) + 2), _even(int(height * 1.08) + 2)
    return (
        f"[0:v]scale={big_w}:{big_h},"
        f"crop={width}:{height}:x='(iw-ow)/2*(1+sin(2*PI*t/5))':y='(ih-oh)/2*(1+sin(2*PI*t/3.5))',"
        "eq=brightness='0.05*sin(2*PI*t*1.6)':eval=frame,format=yuv420p[v]"
    )


def _run_sonic_sampler(ctx: RunContext, inputs: dict) -> tuple[tuple, dict | None]:
    wl, task = ctx.wl, ctx.task
    fault = faults.engine_fault("comfyui")
    if fault == "error":
        raise RuntimeError("dev node fault injection: comfyui engine_error is set")
    if fault == "hang":
        _hang_until_interrupted(wl)
    data = inputs["data_dict"]
    fps = float(inputs["fps"])
    steps = int(inputs["inference_steps"])
    length = data["audio"]["duration"]
    if data["duration"] > 0:
        length = min(length, float(data["duration"]))
    frames = max(1, math.ceil(length * fps))
    image = data["image"]
    width, height = _even(image["width"]), _even(image["height"])
    out = wl.root / "temp" / f"sonic_{task.prompt_id}.mp4"
    sent = 0

    def on_frame(frame: int) -> None:
        nonlocal sent
        value = min(steps, frame * steps // frames)
        while sent < value:
            sent += 1
            _emit(wl, "progress", _progress(task, ctx.node_id, sent, steps), _client(task))

    args = [
        "-loop", "1", "-framerate", f"{fps:g}", "-i", str(image["path"]),
        "-filter_complex", _motion_filter(width, height), "-map", "[v]",
        "-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast", "-crf", "20",
        "-pix_fmt", "yuv420p", "-r", f"{fps:g}", str(out),
    ]  # fmt: skip
    _run_ffmpeg(wl, args, on_frame)
    on_frame(frames)
    video = {"path": out, "fps": fps, "frames": frames, "width": width, "height": height}
    return (video, fps), None


def _progress(task: Task, node_id: str, value: int, maximum: int) -> dict:
    return {"value": value, "max": maximum, "prompt_id": task.prompt_id, "node": node_id}


def _client(task: Task) -> str | None:
    return task.extra_data.get("client_id")


def _output_target(wl: Workload, prefix: str, kind: str) -> tuple[Path, str, str]:
    """(directory, subfolder, base name) for a VHS filename_prefix such as "jobs/abc"."""
    prefix = prefix.replace("\\", "/").strip("/") or "ComfyUI"
    subfolder, _, base = prefix.rpartition("/")
    base_dir = wl.root / kind
    directory = base_dir / subfolder if subfolder else base_dir
    if not _inside(base_dir, directory / "x"):
        raise ValueError(f"filename_prefix {prefix!r} leaves the {kind} directory")
    directory.mkdir(parents=True, exist_ok=True)
    return directory, subfolder, base


def _next_counter(directory: Path, base: str) -> int:
    pattern = re.compile(rf"^{re.escape(base)}_(\d{{5}})")
    found = [int(m.group(1)) for p in directory.iterdir() if (m := pattern.match(p.name))]
    return max(found, default=0) + 1


def _run_video_combine(ctx: RunContext, inputs: dict) -> tuple[tuple, dict | None]:
    wl = ctx.wl
    video = inputs["images"]
    if inputs["format"] != "video/h264-mp4":
        raise ValueError(f"the dev node renders only video/h264-mp4, not {inputs['format']}")
    if inputs.get("pix_fmt", "yuv420p") != "yuv420p":
        raise ValueError(f"the dev node renders only yuv420p, not {inputs['pix_fmt']}")
    kind = "output" if inputs.get("save_output", True) else "temp"
    directory, subfolder, base = _output_target(wl, inputs["filename_prefix"], kind)
    with wl.cond:  # two prompts never run at once in one workload; the lock is for /view readers
        filename = f"{base}_{_next_counter(directory, base):05}.mp4"
    target = directory / filename
    audio = inputs.get("audio")
    args = ["-i", str(video["path"])]
    if audio is not None:
        args += ["-i", str(audio["path"]), "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "192k"]
        if inputs.get("trim_to_audio", False):
            args += ["-t", f"{audio['duration']:.3f}", "-shortest"]
    else:
        args += ["-map", "0:v:0"]
    args += ["-c:v", "copy", "-movflags", "+faststart", str(target)]
    _run_ffmpeg(wl, args)
    Path(video["path"]).unlink(missing_ok=True)
    entry = {
        "filename": filename,
        "subfolder": subfolder,
        "type": kind,
        "format": inputs["format"],
        "frame_rate": float(inputs["frame_rate"]),
        "fullpath": str(target.resolve()),
    }
    return (), {"gifs": [entry]}


def _run_preview(ctx: RunContext, inputs: dict) -> tuple[tuple, dict | None]:
    image = inputs["images"]
    filename = f"ComfyUI_temp_{ctx.task.prompt_id[:8]}_{ctx.node_id}_00001_.png"
    with Image.open(image["path"]) as img:
        img.save(ctx.wl.root / "temp" / filename, compress_level=1)
    return (), {"images": [{"filename": filename, "subfolder": "", "type": "temp"}]}


RUNNERS: dict[str, Any] = {
    "LoadImage": _run_load_image,
    "LoadAudio": _run_load_audio,
    "ImageResize+": _run_image_resize,
    "ImageOnlyCheckpointLoader": _run_checkpoint,
    "SONICTLoader": _run_sonic_loader,
    "SONIC_PreData": _run_sonic_predata,
    "SONICSampler": _run_sonic_sampler,
    "VHS_VideoCombine": _run_video_combine,
    "PreviewImage": _run_preview,
}


def _resolve_inputs(node: dict, results: dict[str, tuple]) -> dict:
    resolved = {}
    for name, value in (node.get("inputs") or {}).items():
        if isinstance(value, list) and len(value) == 2:
            resolved[name] = results[str(value[0])][value[1]]
        else:
            resolved[name] = value
    return resolved


def _execute(wl: Workload, task: Task) -> tuple[dict, dict]:
    """Run one prompt; return (outputs by node id, status). Sends the websocket messages except the
    last one of status["messages"] (success, error or interrupted), which the caller sends once the
    history entry is written."""
    client = _client(task)
    prompt = task.prompt
    messages: list[list] = []

    def add(event: str, data: dict, send: bool = True) -> None:
        data = {**data, "timestamp": _now_ms()}
        messages.append([event, data])
        if send:
            _emit(wl, event, data, client)

    add("execution_start", {"prompt_id": task.prompt_id})
    add("execution_cached", {"nodes": [], "prompt_id": task.prompt_id})
    results: dict[str, tuple] = {}
    outputs: dict[str, dict] = {}
    executed: list[str] = []
    node_id = ""
    try:
        for node_id in _execution_order(prompt, task.outputs):
            if wl.interrupt.is_set():
                raise Interrupted()
            class_type = prompt[node_id]["class_type"]
            with wl.cond:
                wl.last_node = node_id
            _emit(
                wl,
                "executing",
                {"node": node_id, "display_node": node_id, "prompt_id": task.prompt_id},
                client,
            )
            ctx = RunContext(wl, task, node_id, class_type)
            values, ui = RUNNERS[class_type](ctx, _resolve_inputs(prompt[node_id], results))
            results[node_id] = values
            executed.append(node_id)
            if ui:
                outputs[node_id] = ui
                _emit(
                    wl,
                    "executed",
                    {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": task.prompt_id},
                    client,
                )
    except Interrupted:
        add(
            "execution_interrupted",
            {
                "prompt_id": task.prompt_id,
                "node_id": node_id,
                "node_type": prompt[node_id]["class_type"] if node_id else "",
                "executed": executed,
            },
            send=False,
        )
        return outputs, {"status_str": "error", "completed": False, "messages": messages}
    except Exception as exc:  # noqa: BLE001 - every node failure becomes execution_error, as in ComfyUI
        log.warning("prompt %s failed in node %s: %s", task.prompt_id, node_id, exc)
        exc_type = type(exc)
        type_name = (
            exc_type.__qualname__
            if exc_type.__module__ == "builtins"
            else f"{exc_type.__module__}.{exc_type.__qualname__}"
        )
        add(
            "execution_error",
            {
                "prompt_id": task.prompt_id,
                "node_id": node_id,
                "node_type": prompt[node_id]["class_type"],
                "executed": executed,
                "exception_message": str(exc),
                "exception_type": type_name,
                "traceback": [],
                "current_inputs": {},
                "current_outputs": {},
            },
            send=False,
        )
        return outputs, {"status_str": "error", "completed": False, "messages": messages}
    add("execution_success", {"prompt_id": task.prompt_id}, send=False)
    return outputs, {"status_str": "success", "completed": True, "messages": messages}


def _cleanup_temp(wl: Workload, prompt_id: str) -> None:
    for path in (wl.root / "temp").glob(f"*_{prompt_id}*"):
        path.unlink(missing_ok=True)


def _worker_loop(wl: Workload) -> None:
    while True:
        with wl.cond:
            while not wl.pending and not wl.stopped and not faults._should_stop(wl.name):
                wl.cond.wait(timeout=1.0)
            if wl.stopped or faults._should_stop(wl.name):  # node stopped: its queue goes with it
                wl.pending.clear()
                wl.stopped = True
                wl.worker = None
                return
            wl.pending.sort(key=lambda t: t.number)
            task = wl.pending.pop(0)
            wl.running = task
            wl.interrupt.clear()
        _broadcast_status(wl)
        try:
            outputs, status = _execute(wl, task)
        except Exception as exc:  # noqa: BLE001 - keep the worker alive whatever happens
            log.exception("dev node comfy worker failed on %s", task.prompt_id)
            data = {
                "prompt_id": task.prompt_id,
                "node_id": "",
                "node_type": "",
                "executed": [],
                "exception_message": str(exc),
                "exception_type": type(exc).__name__,
                "traceback": [],
                "timestamp": _now_ms(),
            }
            status = {"status_str": "error", "completed": False, "messages": [["execution_error", data]]}
            outputs = {}
        meta = {
            nid: {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
            for nid in outputs
        }
        entry = {
            "prompt": [task.number, task.prompt_id, task.prompt, task.extra_data, task.outputs],
            "outputs": outputs,
            "status": status,
            "meta": meta,
        }
        _cleanup_temp(wl, task.prompt_id)
        with wl.cond:
            wl.history[task.prompt_id] = entry
            wl.running = None
            wl.last_node = None
            wl.interrupt.clear()
        client = _client(task)
        final_event, final_data = status["messages"][-1]
        _emit(wl, final_event, final_data, client)  # after the history entry exists
        _emit(wl, "executing", {"node": None, "prompt_id": task.prompt_id}, client)
        _broadcast_status(wl)


def _ensure_worker(wl: Workload) -> None:
    with wl.cond:
        if wl.worker is None or not wl.worker.is_alive():
            wl.stopped = False
            wl.worker = threading.Thread(
                target=_worker_loop, args=(wl,), name=f"comfy-{wl.name}", daemon=True
            )
            wl.worker.start()


def _interrupt(wl: Workload, prompt_id: str | None = None) -> bool:
    with wl.cond:
        running = wl.running
        if running is None or (prompt_id and running.prompt_id != prompt_id):
            return False
        wl.interrupt.set()
        proc = wl.proc
    if proc is not None and proc.poll() is None:
        proc.kill()
    return True


def reset_workload(app: FastAPI, workload: str) -> None:
    """Forget a workload (its node was stopped): interrupt it, drop queue and history, stop its worker."""
    registry: dict[str, Workload] = app.state.comfy_workloads
    with app.state.comfy_lock:
        wl = registry.pop(workload, None)
    if wl is None:
        return
    with wl.cond:
        wl.pending.clear()
        wl.stopped = True
        wl.cond.notify_all()
    _interrupt(wl)


# --- HTTP -----------------------------------------------------------------------------------


def _error_400(error: dict, node_errors: Any = None) -> JSONResponse:
    return JSONResponse(
        {"error": error, "node_errors": node_errors if node_errors is not None else {}}, status_code=400
    )


def _same_content(path: Path, data: bytes) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


def _system_stats() -> dict:
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        free_pages = os.sysconf("SC_AVPHYS_PAGES")
        ram_total, ram_free = pages * page_size, free_pages * page_size
    except (ValueError, OSError, AttributeError):
        ram_total = ram_free = 0
    return {
        "system": {
            "os": os.name,
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": "c3-render-devnode",
            "python_version": sys.version,
            "pytorch_version": "none (dev node: ffmpeg on CPU)",
            "embedded_python": False,
            "argv": ["devnode"],
        },
        "devices": [
            {
                "name": f"cpu ({platform.machine()}, c3-render dev node)",
                "type": "cpu",
                "index": None,
                "vram_total": 0,
                "vram_free": 0,
                "torch_vram_total": 0,
                "torch_vram_free": 0,
            }
        ],
    }


def _object_info() -> dict:
    info = {}
    for name, definition in NODE_DEFS.items():

        def widgets(specs: dict) -> dict:
            return {k: [v[0] if v[0] != "UPLOAD" else [], v[1]] for k, v in specs.items()}

        info[name] = {
            "input": {"required": widgets(definition.required), "optional": widgets(definition.optional)},
            "output": list(definition.returns),
            "name": name,
            "display_name": name,
            "output_node": definition.output_node,
        }
    return info


def _build_router(data_dir: Path, registry: dict[str, Workload], lock: threading.Lock) -> APIRouter:
    router = APIRouter()

    def workload_of(request: Request | WebSocket) -> Workload:
        return _get_workload(registry, lock, data_dir, request.scope)

    @router.get("/system_stats")
    async def system_stats() -> dict:
        return _system_stats()

    @router.get("/object_info")
    async def object_info() -> dict:
        return _object_info()

    @router.post("/upload/image")
    async def upload_image(request: Request) -> Response:
        wl = workload_of(request)
        form = await request.form()
        image = form.get("image")
        if not isinstance(image, UploadFile):
            return Response(status_code=400)
        filename = os.path.basename((image.filename or "").replace("\\", "/"))
        if not filename or filename in (".", ".."):
            return Response(status_code=400)
        kind = str(form.get("type") or "input")
        if kind not in UPLOAD_TYPES:
            kind = "input"
        subfolder = str(form.get("subfolder") or "")
        base = wl.root / kind
        folder = base / subfolder
        if not _inside(base, folder / filename):
            return Response(status_code=400)
        data = await image.read()
        overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
        stem, suffix = os.path.splitext(filename)

        def save() -> str:
            folder.mkdir(parents=True, exist_ok=True)
            name = filename
            counter = 1
            while not overwrite and (folder / name).exists():
                if _same_content(folder / name, data):
                    return name
                name = f"{stem} ({counter}){suffix}"
                counter += 1
            tmp = folder / f".{name}.{uuid.uuid4().hex}.part"
            tmp.write_bytes(data)
            tmp.replace(folder / name)
            return name

        name = await asyncio.to_thread(save)
        return JSONResponse({"name": name, "subfolder": subfolder, "type": kind})

    @router.post("/prompt")
    async def post_prompt(request: Request) -> Response:
        wl = workload_of(request)
        try:
            body = await request.json()
        except ValueError:
            return _error_400(_node_error("invalid_prompt", "The request body is not JSON", ""))
        if not isinstance(body, dict) or "prompt" not in body:
            return _error_400(_node_error("no_prompt", "No prompt provided", "No prompt provided"))
        prompt = copy.deepcopy(body["prompt"])
        error, good_outputs, node_errors = await asyncio.to_thread(validate_prompt, wl, prompt)
        if error is not None:
            return _error_400(error, node_errors)
        extra_data = dict(body.get("extra_data") or {})
        if body.get("client_id"):
            extra_data["client_id"] = str(body["client_id"])
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        with wl.cond:
            if "number" in body:
                number: float = float(body["number"])
            else:
                number = -wl.number if body.get("front") else wl.number
                wl.number += 1
            wl.pending.append(Task(number, prompt_id, prompt, extra_data, good_outputs))
            wl.cond.notify_all()
        _ensure_worker(wl)
        _broadcast_status(wl)
        return JSONResponse({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    @router.get("/prompt")
    async def get_prompt(request: Request) -> dict:
        return _queue_info(workload_of(request))

    @router.get("/queue")
    async def get_queue(request: Request) -> dict:
        wl = workload_of(request)
        with wl.cond:
            running = [[t.number, t.prompt_id, t.prompt, t.extra_data, t.outputs] for t in [wl.running] if t]
            pending = [[t.number, t.prompt_id, t.prompt, t.extra_data, t.outputs] for t in wl.pending]
            return copy.deepcopy({"queue_running": running, "queue_pending": pending})

    @router.post("/queue")
    async def post_queue(request: Request) -> Response:
        wl = workload_of(request)
        try:
            body = await request.json()
        except ValueError:
            body = {}
        with wl.cond:
            if isinstance(body, dict) and body.get("clear"):
                wl.pending.clear()
            if isinstance(body, dict) and isinstance(body.get("delete"), list):
                drop = {str(x) for x in body["delete"]}
                wl.pending = [t for t in wl.pending if t.prompt_id not in drop]
        _broadcast_status(wl)
        return Response(status_code=200)

    @router.post("/interrupt")
    async def post_interrupt(request: Request) -> Response:
        wl = workload_of(request)
        prompt_id = None
        try:
            body = await request.json()
            if isinstance(body, dict) and body.get("prompt_id"):
                prompt_id = str(body["prompt_id"])
        except ValueError:
            pass
        _interrupt(wl, prompt_id)
        return Response(status_code=200)

    @router.get("/history")
    async def get_history(request: Request, max_items: int | None = None) -> dict:
        wl = workload_of(request)
        with wl.cond:
            items = list(wl.history.items())
            if max_items is not None:
                items = items[-max_items:] if max_items > 0 else []
            return copy.deepcopy(dict(items))

    @router.get("/history/{prompt_id}")
    async def get_history_item(request: Request, prompt_id: str) -> dict:
        wl = workload_of(request)
        with wl.cond:
            entry = wl.history.get(prompt_id)
            return {prompt_id: copy.deepcopy(entry)} if entry is not None else {}

    @router.post("/history")
    async def post_history(request: Request) -> Response:
        wl = workload_of(request)
        try:
            body = await request.json()
        except ValueError:
            body = {}
        with wl.cond:
            if isinstance(body, dict) and body.get("clear"):
                wl.history.clear()
            if isinstance(body, dict) and isinstance(body.get("delete"), list):
                for prompt_id in body["delete"]:
                    wl.history.pop(str(prompt_id), None)
        return Response(status_code=200)

    @router.get("/view")
    async def view(
        request: Request, filename: str = "", subfolder: str = "", type: str = "output"
    ) -> Response:
        wl = workload_of(request)
        if not filename:
            return Response(status_code=404)
        filename, annotated = _annotated(filename)
        kind = annotated or type
        if filename.startswith("/") or ".." in filename or kind not in UPLOAD_TYPES:
            return Response(status_code=400)
        base = wl.root / kind
        folder = base / subfolder if subfolder else base
        if not _inside(base, folder):
            return Response(status_code=403)
        path = folder / os.path.basename(filename)
        if not _inside(base, path) or not path.is_file():
            return Response(status_code=404)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(
            path, media_type=media_type, headers={"Content-Disposition": f'filename="{path.name}"'}
        )

    @router.websocket("/ws")
    async def websocket_endpoint(websocket: WebSocket) -> None:
        wl = workload_of(websocket)
        await websocket.accept()
        sid = websocket.query_params.get("clientId") or uuid.uuid4().hex
        client = Client(asyncio.Queue(), asyncio.get_running_loop())
        client.queue.put_nowait(
            json.dumps({"type": "status", "data": {"status": _queue_info(wl), "sid": sid}})
        )
        with wl.cond:
            running = wl.running
            if running is not None and _client(running) == sid and wl.last_node is not None:
                event = {"node": wl.last_node, "display_node": wl.last_node, "prompt_id": running.prompt_id}
                client.queue.put_nowait(json.dumps({"type": "executing", "data": event}))
            wl.clients.setdefault(sid, []).append(client)

        async def pump() -> None:
            while True:
                text = await client.queue.get()
                await websocket.send_text(text)

        sender = asyncio.create_task(pump())
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        except Exception as exc:  # noqa: BLE001 - any receive failure means the client is gone
            log.debug("websocket %s closed: %s", sid, exc)
        finally:
            sender.cancel()
            with wl.cond:
                group = wl.clients.get(sid, [])
                if client in group:
                    group.remove(client)
                if not group:
                    wl.clients.pop(sid, None)

    return router


def create_app(data_dir: Path) -> FastAPI:
    """The ComfyUI stand-in; serves every workload, keeping each one's files under data_dir/<workload>/."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    registry: dict[str, Workload] = {}
    lock = threading.Lock()
    app = FastAPI(
        title="c3-render dev node: ComfyUI stand-in", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.comfy_workloads = registry
    app.state.comfy_lock = lock
    router = _build_router(data_dir, registry, lock)
    app.include_router(router)
    app.include_router(router, prefix="/api")  # ComfyUI serves every route under /api as well
    return app
