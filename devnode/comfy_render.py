"""Dev node ComfyUI stand-in: running a prompt (the node runners, ffmpeg) and each workload's worker.

There is no model: SONICSampler "renders" with ffmpeg, a real H.264 MP4 of the uploaded portrait with
a slow pan and a brightness pulse, as long as the audio; VHS_VideoCombine muxes the audio in. One
worker thread per workload runs one prompt at a time, like a real node.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from devnode import faults
from devnode.comfy_nodes import _execution_order
from devnode.comfy_state import (
    Interrupted,
    Task,
    Workload,
    _broadcast_status,
    _client,
    _emit,
    _inside,
    _now_ms,
    _upload_path,
)

log = logging.getLogger("devnode.comfy")

HANG_POLL_S = 0.05

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


def _run_ffmpeg(wl: Workload, args: list[str], on_frame: Any = None, interruptible: bool = True) -> None:
    """Run ffmpeg; /interrupt kills it (Interrupted) unless `interruptible` is False (then it runs to its
    end and the interrupt takes effect before the next node); a non-zero exit raises RuntimeError."""
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
            wl.proc_interruptible = interruptible
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
                wl.proc_interruptible = True
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr.seek(0)
        errors = stderr.read().decode("utf-8", "replace").strip()
    if wl.stopped or (interruptible and wl.interrupt.is_set()):
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


def sampler_min_s() -> float:
    """DEVNODE_SONIC_MIN_S: the least time SONICSampler takes (a GPU's pace; default 0 = ffmpeg's)."""
    try:
        return max(0.0, float(os.environ.get("DEVNODE_SONIC_MIN_S", "") or 0))
    except ValueError:
        return 0.0


def _run_sonic_sampler(ctx: RunContext, inputs: dict) -> tuple[tuple, dict | None]:
    """Like the real sampler: no progress messages, and /interrupt is ignored until it ends (its loop
    never checks for interrupts); only a stopped node or shutdown ends it early."""
    wl, task = ctx.wl, ctx.task
    started = time.monotonic()
    fault = faults.engine_fault("comfyui")
    if fault == "error":
        raise RuntimeError("dev node fault injection: comfyui engine_error is set")
    if fault == "hang":
        _hang_until_interrupted(wl)
    if (oom := faults.out_of_memory(wl.name, "comfyui")) is not None:
        raise RuntimeError(oom)  # torch's OutOfMemoryError reaches the client as its message
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
    log.info("SONICSampler: %d frames, %d steps (ignores /interrupt until done)", frames, steps)
    args = [
        "-loop", "1", "-framerate", f"{fps:g}", "-i", str(image["path"]),
        "-filter_complex", _motion_filter(width, height), "-map", "[v]",
        "-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast", "-crf", "20",
        "-pix_fmt", "yuv420p", "-r", f"{fps:g}", str(out),
    ]  # fmt: skip
    _run_ffmpeg(wl, args, interruptible=False)
    while time.monotonic() - started < sampler_min_s():
        if wl.stopped or faults._should_stop(wl.name):
            raise Interrupted()
        time.sleep(HANG_POLL_S)
    video = {"path": out, "fps": fps, "frames": frames, "width": width, "height": height}
    return (video, fps), None


def _progress(task: Task, node_id: str, value: int, maximum: int) -> dict:
    return {"value": value, "max": maximum, "prompt_id": task.prompt_id, "node": node_id}


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


# ProRes.json's profiles; the 4444 ones are 4:4:4 (no alpha here: the frames have none)
_PRORES_PROFILES = {"lt": None, "standard": None, "hq": None, "4444": "yuv444p10le", "4444xq": "yuv444p10le"}


def _video_format(inputs: dict) -> tuple[str, list[str], list[str]]:
    """(extension, video args, audio args) of the VHS format asked for, as its video_formats/*.json
    says; the dev node renders two of them: h264-mp4 (its sampler's own encoding, copied) and ProRes."""
    name = inputs["format"]
    if name == "video/h264-mp4":
        if inputs.get("pix_fmt", "yuv420p") != "yuv420p":
            raise ValueError(f"the dev node renders only yuv420p, not {inputs['pix_fmt']}")
        return "mp4", ["-c:v", "copy", "-movflags", "+faststart"], ["-c:a", "aac", "-b:a", "192k"]
    if name == "video/ProRes":
        profile = str(inputs.get("profile", "hq"))
        if profile not in _PRORES_PROFILES:
            raise ValueError(f"ProRes profile {profile!r} is not one of {', '.join(_PRORES_PROFILES)}")
        pix_fmt = ["-pix_fmt", _PRORES_PROFILES[profile]] if _PRORES_PROFILES[profile] else []
        return "mov", ["-c:v", "prores_ks", "-profile:v", profile, *pix_fmt], ["-c:a", "pcm_s16le"]
    raise ValueError(f"the dev node renders video/h264-mp4 and video/ProRes only, not {name}")


def _run_video_combine(ctx: RunContext, inputs: dict) -> tuple[tuple, dict | None]:
    """Mux the frames and the audio; the one node that reports progress (frame by frame, as VHS does)."""
    wl, task = ctx.wl, ctx.task
    video = inputs["images"]
    frames = max(1, int(video["frames"]))
    sent = 0

    def on_frame(frame: int) -> None:
        nonlocal sent
        value = min(frames, frame)
        if value > sent:
            sent = value
            _emit(wl, "progress", _progress(task, ctx.node_id, value, frames), _client(task))

    extension, video_args, audio_args = _video_format(inputs)
    kind = "output" if inputs.get("save_output", True) else "temp"
    directory, subfolder, base = _output_target(wl, inputs["filename_prefix"], kind)
    with wl.cond:  # two prompts never run at once in one workload; the lock is for /view readers
        filename = f"{base}_{_next_counter(directory, base):05}.{extension}"
    target = directory / filename
    audio = inputs.get("audio")
    args = ["-i", str(video["path"])]
    if audio is not None:
        args += ["-i", str(audio["path"]), "-map", "0:v:0", "-map", "1:a:0", *audio_args]
        if inputs.get("trim_to_audio", False):
            args += ["-t", f"{audio['duration']:.3f}", "-shortest"]
    else:
        args += ["-map", "0:v:0"]
    args += [*video_args, "-stats_period", "0.1", str(target)]
    _run_ffmpeg(wl, args, on_frame)
    on_frame(frames)
    Path(video["path"]).unlink(missing_ok=True)
    entry = {
        "filename": filename,
        "subfolder": subfolder,
        "type": kind,
        "format": inputs["format"],
        "frame_rate": float(inputs["frame_rate"]),
        "fullpath": str(target.resolve()),
    }
    return ((kind == "output", [str(target.resolve())]),), {"gifs": [entry]}  # VHS_FILENAMES, the preview


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
        for node_id in _execution_order(task.prompt, task.outputs):
            if wl.interrupt.is_set():
                raise Interrupted()
            results[node_id], ui = _run_node(wl, task, node_id, results)
            executed.append(node_id)
            if ui:
                outputs[node_id] = ui
                event = {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": task.prompt_id}
                _emit(wl, "executed", event, client)
    except Interrupted:
        add("execution_interrupted", _interrupted_message(task, node_id, executed), send=False)
        return outputs, {"status_str": "error", "completed": False, "messages": messages}
    except Exception as exc:  # noqa: BLE001 - every node failure becomes execution_error, as in ComfyUI
        log.warning("prompt %s failed in node %s: %s", task.prompt_id, node_id, exc)
        add("execution_error", _error_message(task, node_id, executed, exc), send=False)
        return outputs, {"status_str": "error", "completed": False, "messages": messages}
    add("execution_success", {"prompt_id": task.prompt_id}, send=False)
    return outputs, {"status_str": "success", "completed": True, "messages": messages}


def _run_node(wl: Workload, task: Task, node_id: str, results: dict[str, tuple]) -> tuple[tuple, dict | None]:
    """Run one node of the prompt (after telling the client it is executing): its output values and
    what it shows in the UI (None for most nodes)."""
    node = task.prompt[node_id]
    with wl.cond:
        wl.last_node = node_id
    _emit(wl, "executing", {"node": node_id, "display_node": node_id, "prompt_id": task.prompt_id}, _client(task))
    ctx = RunContext(wl, task, node_id, node["class_type"])
    return RUNNERS[node["class_type"]](ctx, _resolve_inputs(node, results))


def _interrupted_message(task: Task, node_id: str, executed: list[str]) -> dict:
    return {
        "prompt_id": task.prompt_id,
        "node_id": node_id,
        "node_type": task.prompt[node_id]["class_type"] if node_id else "",
        "executed": executed,
    }


def _error_message(task: Task, node_id: str, executed: list[str], exc: Exception) -> dict:
    """ComfyUI's execution_error data (exception_type is module-qualified except for builtins)."""
    exc_type = type(exc)
    type_name = (
        exc_type.__qualname__
        if exc_type.__module__ == "builtins"
        else f"{exc_type.__module__}.{exc_type.__qualname__}"
    )
    return {
        "prompt_id": task.prompt_id,
        "node_id": node_id,
        "node_type": task.prompt[node_id]["class_type"],
        "executed": executed,
        "exception_message": str(exc),
        "exception_type": type_name,
        "traceback": [],
        "current_inputs": {},
        "current_outputs": {},
    }


def _cleanup_temp(wl: Workload, prompt_id: str) -> None:
    for path in (wl.root / "temp").glob(f"*_{prompt_id}*"):
        path.unlink(missing_ok=True)


def _worker_loop(wl: Workload) -> None:
    while (task := _next_task(wl)) is not None:
        _broadcast_status(wl)
        try:
            with faults.busy(wl.name, "comfyui"):
                outputs, status = _execute(wl, task)
        except Exception as exc:  # noqa: BLE001 - keep the worker alive whatever happens
            log.exception("dev node comfy worker failed on %s", task.prompt_id)
            outputs, status = {}, _crash_status(task, exc)
        _cleanup_temp(wl, task.prompt_id)
        with wl.cond:
            wl.history[task.prompt_id] = _history_entry(task, outputs, status)
            wl.running = None
            wl.last_node = None
            wl.interrupt.clear()
        client = _client(task)
        final_event, final_data = status["messages"][-1]
        _emit(wl, final_event, final_data, client)  # after the history entry exists
        _emit(wl, "executing", {"node": None, "prompt_id": task.prompt_id}, client)
        _broadcast_status(wl)


def _next_task(wl: Workload) -> Task | None:
    """Wait for the next prompt (lowest number first) and mark it running; None once the node is
    stopped (its queue goes with it and the worker ends)."""
    with wl.cond:
        while not wl.pending and not wl.stopped and not faults._should_stop(wl.name):
            wl.cond.wait(timeout=1.0)
        if wl.stopped or faults._should_stop(wl.name):
            wl.pending.clear()
            wl.stopped = True
            wl.worker = None
            return None
        wl.pending.sort(key=lambda t: t.number)
        task = wl.pending.pop(0)
        wl.running = task
        wl.interrupt.clear()
        return task


def _crash_status(task: Task, exc: Exception) -> dict:
    """The status of a prompt the worker itself failed on (not one of its nodes)."""
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
    return {"status_str": "error", "completed": False, "messages": [["execution_error", data]]}


def _history_entry(task: Task, outputs: dict, status: dict) -> dict:
    meta = {nid: {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid} for nid in outputs}
    return {
        "prompt": [task.number, task.prompt_id, task.prompt, task.extra_data, task.outputs],
        "outputs": outputs,
        "status": status,
        "meta": meta,
    }


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
        proc = wl.proc if (wl.proc_interruptible or wl.stopped) else None  # the sampler runs on
    if proc is not None and proc.poll() is None:
        proc.kill()
    return True


