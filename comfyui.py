"""Portrait video engine: the SONIC talking-head workflow on ComfyUI (docs/node-protocols.md, ComfyUI and SONIC).

This module owns everything between a portrait image + audio on disk and work_dir/{job_id}.mp4:
preparing the inputs (work_dir/{job_id}_input.jpg, and the audio as {job_id}_input.<mp3|wav|flac>),
uploading them, building the workflow (`build_sonic_workflow`), queueing it, following it on the
websocket (falling back to polling /history when the socket drops), stopping it on request, and
downloading the video named in /history.

Raises JobStopped when should_stop() gives a reason (after dropping or interrupting the prompt),
EngineError when ComfyUI rejects or fails the workflow, TimeoutError when ComfyUI does not become
ready within SERVICE_READY_TIMEOUT seconds (config.py; a real cold start takes minutes). Transport
errors (requests, websocket) propagate unchanged: the node is in trouble. A 5xx answer from a node
whose health check still passes is retried once (a transient app error) before the job fails.

Real-node facts this follows (docs/node-protocols.md, ComfyUI and SONIC): uploads over
COMFYUI_MAX_UPLOAD_MB (100 MiB) are refused with 413, so larger audio is compressed first
(mediaconv.shrink_audio); the SONIC sampler ignores /interrupt until it ends, so after a stop the node
stays busy (`node_busy` tells the worker); only VHS_VideoCombine (node 13) reports progress, so the
percentage is that of the encoding phase.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import requests
import websocket
from PIL import Image, ImageOps

import config
import media_check
import mediaconv
from engine_api import EngineError, JobStopped, NodeUrls, Phase, Progress, ShouldStop, no_phase, node_healthy

log = logging.getLogger(__name__)

MAX_INPUT_SIDE = 2048  # larger inputs are scaled down before upload
FIT_W, FIT_H = 1280, 720  # the portrait is resized to fit this box inside the workflow
DURATION_MARGIN_S = 2  # SONIC_PreData duration = ceil(audio seconds) + this
KEEP_AUDIO_FORMATS = {"mp3": "mp3", "wav": "wav", "flac": "flac"}  # ffprobe format -> extension
VIDEO_NODE = "13"
WS_RECV_TIMEOUT_S = 1.0  # so should_stop() is looked at at least every second
STOP_CHECK_INTERVAL_S = 0.5
HISTORY_POLL_S = 2.0  # polling /history when the websocket is gone
HISTORY_SETTLE_S = 30.0  # after "done", how long /history may take to show the prompt
HTTP_TIMEOUT = (10, 60)
INTERRUPTED = "ComfyUI execution was interrupted on the node"
UPLOAD_TIMEOUT = (10, 300)
RETRY_PAUSE_S = 2.0  # before the one retry of a 5xx answer
NODE_CHECK_INTERVAL_S = 10.0  # while ComfyUI is not ready, check this often that the node itself answers
JPEG_QUALITIES = (95, 85, 70)  # tried in turn until the portrait fits the upload limit


# --- pure parts ---------------------------------------------------------------------------------


def fit_size(w: int, h: int, max_w: int = FIT_W, max_h: int = FIT_H) -> tuple[int, int]:
    """Scale (w, h) up or down to the largest size inside max_w x max_h, same aspect, even numbers."""
    if w <= 0 or h <= 0:
        raise ValueError(f"bad image size {w}x{h}")
    scale = min(max_w / w, max_h / h)
    fw = max(2, int(w * scale) // 2 * 2)
    fh = max(2, int(h * scale) // 2 * 2)
    return fw, fh


def sonic_duration(audio_seconds: float) -> int:
    return math.ceil(audio_seconds) + DURATION_MARGIN_S


def build_sonic_workflow(
    image_name: str,
    audio_name: str,
    image_size: tuple[int, int],
    audio_seconds: float,
    prefix: str,
    seed: int,
) -> dict:
    """The SONIC workflow in ComfyUI's API format (docs/node-protocols.md, ComfyUI and SONIC).
    image_size is the uploaded image's."""
    width, height = fit_size(*image_size)
    return {
        "18": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "26": {"class_type": "LoadAudio", "inputs": {"audio": audio_name}},
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
        },
        "32": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": "svd_xt.safetensors"}},
        "34": {
            "class_type": "SONICTLoader",
            "inputs": {
                "model": ["32", 0],
                "sonic_unet": "unet.pth",
                "ip_audio_scale": 1,
                "use_interframe": True,
                "dtype": "bf16",
            },
        },
        "33": {
            "class_type": "SONIC_PreData",
            "inputs": {
                "clip_vision": ["32", 1],
                "vae": ["32", 2],
                "audio": ["26", 0],
                "image": ["58", 0],
                "weight_dtype": ["34", 1],
                "min_resolution": 576,
                "duration": sonic_duration(audio_seconds),
                "expand_ratio": 1,
            },
        },
        "31": {
            "class_type": "SONICSampler",
            "inputs": {
                "model": ["34", 0],
                "data_dict": ["33", 0],
                "seed": seed,
                "inference_steps": 25,
                "dynamic_scale": 1,
                "fps": 24,
            },
        },
        VIDEO_NODE: {
            "class_type": "VHS_VideoCombine",
            "inputs": {
                "images": ["31", 0],
                "frame_rate": ["31", 1],
                "audio": ["26", 0],
                # loop_count and pingpong are required inputs of VHS_VideoCombine
                "loop_count": 0,
                "pingpong": False,
                "format": "video/h264-mp4",
                "pix_fmt": "yuv420p",
                "crf": 19,
                "trim_to_audio": True,
                "save_output": True,
                "filename_prefix": prefix,
            },
        },
        "21": {"class_type": "PreviewImage", "inputs": {"images": ["58", 0]}},
    }


def format_prompt_error(body: Any) -> str:
    """EngineError text for a 400 answer to POST /prompt (node_errors first, else error).

    ComfyUI's execution.py fills an error's `message` and `details` by kind. A range error
    (value_smaller_than_min / value_bigger_than_max), a missing input or a bad link has only the input
    name in `details` and the rest in `message` ("Value 2147483648 bigger than max of 2147483647"): the
    name leads. value_not_in_list and custom_validation_failed have a generic `message` and everything
    in `details` ("format: 'x' not in [...]", "image - Invalid image file: x.png"): `details` alone.
    The others (return_type_mismatch, invalid_input_type, exception_during_validation ...) need both,
    given as ComfyUI's own log line gives them, "<message>: <details>"."""

    def reason(err: Any) -> str:
        if not isinstance(err, dict):
            return str(err)
        message, details = str(err.get("message") or "").strip(), str(err.get("details") or "").strip()
        extra = err.get("extra_info") if isinstance(err.get("extra_info"), dict) else {}
        if not details or details in message:
            return message or "invalid"
        if not message:
            return details
        if details == extra.get("input_name") or (not extra and details.isidentifier()):
            return f"{details}: {message}"
        if err.get("type") in ("value_not_in_list", "custom_validation_failed"):
            return details
        return f"{message}: {details}"

    parts: list[str] = []
    node_errors = body.get("node_errors") if isinstance(body, dict) else None
    if isinstance(node_errors, dict):
        for node_id, info in node_errors.items():
            info = info if isinstance(info, dict) else {}
            messages = [reason(err) for err in info.get("errors") or []]
            parts.append(f"node {node_id} ({info.get('class_type', '?')}): {'; '.join(messages) or 'invalid'}")
    if not parts:
        error = body.get("error") if isinstance(body, dict) else body
        if isinstance(error, dict):
            error = ": ".join(str(v) for v in (error.get("message"), error.get("details")) if v)
        parts.append(str(error or "no details"))
    return "ComfyUI rejected the workflow: " + "; ".join(parts)


def format_execution_error(data: dict) -> str:
    """EngineError text for an execution_error message (websocket or /history)."""
    return (
        f"ComfyUI node {data.get('node_id', '?')} ({data.get('node_type', '?')}): "
        f"{str(data.get('exception_message', 'failed')).strip()}"
    )


def ws_url(comfyui_url: str, client_id: str) -> str:
    """The websocket URL for a ComfyUI root, keeping any path prefix (http->ws, https->wss)."""
    parts = urlsplit(comfyui_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + "/ws"
    return urlunsplit((scheme, parts.netloc, path, urlencode({"clientId": client_id}), ""))


def history_error(entry: dict) -> str | None:
    """The error text of a finished /history entry, None when it succeeded."""
    status = entry.get("status") or {}
    if status.get("status_str") != "error":
        return None
    texts = []
    for message in status.get("messages") or []:
        if isinstance(message, (list, tuple)) and len(message) == 2 and isinstance(message[1], dict):
            if message[0] == "execution_error":
                texts.append(format_execution_error(message[1]))
            elif message[0] == "execution_interrupted":
                texts.append(INTERRUPTED)
    return "; ".join(texts) or "ComfyUI execution failed"


def video_output(entry: dict) -> dict:
    """The first video file (filename, subfolder, type) in a /history entry's outputs."""
    outputs = entry.get("outputs") or {}
    nodes = [outputs.get(VIDEO_NODE) or {}] + [v for k, v in outputs.items() if k != VIDEO_NODE]
    for output in nodes:
        for key in ("gifs", "videos"):
            items = output.get(key) if isinstance(output, dict) else None
            if items and isinstance(items[0], dict) and items[0].get("filename"):
                return items[0]
    raise EngineError("ComfyUI finished without a video output")


# --- inputs -------------------------------------------------------------------------------------


def prepare_image(src: Path, dest: Path, max_bytes: int | None = None, isolate: bool = True) -> tuple[int, int]:
    """Write src as an RGB JPEG at dest, upright, at most MAX_INPUT_SIDE px a side, within max_bytes
    (lower JPEG quality when needed); return its size.

    A large image in a format without reduced decoding (PNG, WebP...) is done in a child process
    (isolate), so the worker's own memory never holds it at full size.
    """
    try:
        with Image.open(src) as opened:
            # A JPEG decodes straight at the smallest 1/2, 1/4 or 1/8 scale still >= MAX_INPUT_SIDE
            # (draft mode), not at full size: a 40 MP photo then needs ~30 MB instead of ~120 MB.
            opened.draft("RGB", (MAX_INPUT_SIDE, MAX_INPUT_SIDE))
            large = media_check.decoded_bytes(opened) > media_check.IN_PROCESS_DECODE_BYTES
            if isolate and large and opened.format != "JPEG":
                # no reduced decode for this format: the full-size decode happens in a child process
                width, height = media_check.run_isolated("comfyui", "prepare_image", str(src), str(dest),
                                                         max_bytes=max_bytes, error=EngineError, isolate=False)
                return width, height
            img = opened
            ImageOps.exif_transpose(img, in_place=True)  # no full-size copies: every step below is in place
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))  # transparency -> white, not black
                del rgba
            if img.mode != "RGB":
                img = img.convert("RGB")
            if max(img.size) > MAX_INPUT_SIDE:
                img.thumbnail((MAX_INPUT_SIDE, MAX_INPUT_SIDE), Image.Resampling.LANCZOS)
            for quality in JPEG_QUALITIES:
                img.save(dest, "JPEG", quality=quality)
                if max_bytes is None or mediaconv.fits(dest, max_bytes):
                    return img.size
            raise EngineError(f"the image does not fit ComfyUI's upload limit of {max_bytes} bytes")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise EngineError(f"could not read the image: {exc}") from exc


def probe(path: Path) -> tuple[str, float | None]:
    """(ffprobe format_name, duration seconds or None)."""
    cmd = ["ffprobe", "-v", "error", "-show_entries", "format=format_name,duration", "-of", "json", str(path)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        fmt = json.loads(out.stdout or "{}").get("format", {})
        duration = float(fmt["duration"]) if fmt.get("duration") not in (None, "N/A") else None
    except (OSError, subprocess.SubprocessError, ValueError, TypeError):
        return "", None
    return str(fmt.get("format_name", "")), duration


def prepare_audio(src: Path, work_dir: Path, job_id: str, max_bytes: int | None = None) -> tuple[Path, float]:
    """Keep MP3/WAV/FLAC as is, convert anything else (video containers, m4a, ogg, webm...) to MP3;
    then, when the file would not fit max_bytes (ComfyUI's upload limit), a mono FLAC or MP3 of it.

    Returns the file to upload and its duration in seconds. ffmpeg converts file to file.
    """
    fmt, duration = probe(src)
    if fmt in KEEP_AUDIO_FORMATS:
        dest = work_dir / f"{job_id}_input.{KEEP_AUDIO_FORMATS[fmt]}"
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
    else:
        dest = work_dir / f"{job_id}_input.mp3"
        try:
            media_check.transcode_audio(src, dest, codec="libmp3lame", bitrate="192k")
        except media_check.MediaError as exc:
            raise EngineError(f"could not convert the audio to MP3: {exc}") from exc
        duration = probe(dest)[1]
    if duration is None:
        try:
            duration = media_check.decoded_seconds(dest)
        except media_check.MediaError as exc:
            raise EngineError(f"could not read the audio: {exc}") from exc
    if max_bytes is not None and not mediaconv.fits(dest, max_bytes):
        try:
            small = mediaconv.shrink_audio(dest, work_dir / f"{job_id}_upload", max_bytes)
        except mediaconv.ConversionError as exc:
            raise EngineError(f"the audio does not fit ComfyUI's upload limit: {exc}") from exc
        log.info("audio %s (%d bytes) compressed to %s (%d bytes) to fit the upload limit", dest.name,
                 dest.stat().st_size, small.name, small.stat().st_size)
        dest = small
    return dest, duration


# --- HTTP and websocket -------------------------------------------------------------------------


def _wait(seconds: float, should_stop: ShouldStop) -> str | None:
    """Sleep up to `seconds`, looking at should_stop() every STOP_CHECK_INTERVAL_S; return a reason."""
    end = time.monotonic() + seconds
    while True:
        reason = should_stop()
        if reason:
            return reason
        left = end - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(STOP_CHECK_INTERVAL_S, left))


def node_request(
    node: NodeUrls, method: str, path: str, timeout: tuple[float, float], **kwargs: Any
) -> requests.Response:
    """One request to ComfyUI; a 5xx answer is retried once when the node is still healthy.

    Files in kwargs["files"] are rewound before the retry. The answer is returned whatever its status
    (the caller decides); transport errors propagate.
    """
    url = f"{node.comfyui}{path}"
    resp = requests.request(method, url, headers=node.headers(), timeout=timeout, **kwargs)
    if resp.status_code < 500 or not node_healthy(node):
        return resp
    log.warning("ComfyUI %s %s answered HTTP %d on a healthy node; retrying once", method, path, resp.status_code)
    resp.close()
    time.sleep(RETRY_PAUSE_S)
    for item in (kwargs.get("files") or {}).values():
        handle = item[1] if isinstance(item, tuple) else item
        if hasattr(handle, "seek"):
            handle.seek(0)
    return requests.request(method, url, headers=node.headers(), timeout=timeout, **kwargs)


def node_busy(node: NodeUrls) -> bool | None:
    """Whether the node's ComfyUI still runs or queues a prompt (GET /queue); None when it cannot tell."""
    try:
        resp = requests.get(f"{node.comfyui}/queue", headers=node.headers(), timeout=(5, 10))
        body = resp.json() if resp.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    return bool(body.get("queue_running") or body.get("queue_pending"))


def wait_ready(node: NodeUrls, should_stop: ShouldStop, timeout_s: float) -> None:
    """Wait for GET /system_stats to answer 200. A node that itself stops answering (stopped, expired,
    gone) is not waited for: ConnectionError, which the worker takes to its node check and a new node."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    node_checked = time.monotonic()  # the first check after NODE_CHECK_INTERVAL_S: a blip is no reason
    while True:
        try:
            resp = requests.get(f"{node.comfyui}/system_stats", headers=node.headers(), timeout=(5, 10))
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        if time.monotonic() - node_checked >= NODE_CHECK_INTERVAL_S:
            node_checked = time.monotonic()
            if not node_healthy(node):
                raise ConnectionError(f"the node stopped answering while ComfyUI was not ready ({last})")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"ComfyUI not ready after {timeout_s:.0f} s ({last})")
        reason = _wait(1.0, should_stop)
        if reason:
            raise JobStopped(reason)


def upload(node: NodeUrls, path: Path, mime: str) -> str:
    """POST /upload/image; return the name to use in the workflow."""
    with path.open("rb") as fh:
        resp = node_request(
            node,
            "POST",
            "/upload/image",
            files={"image": (path.name, fh, mime)},
            data={"overwrite": "true", "type": "input"},
            timeout=UPLOAD_TIMEOUT,
        )
    if resp.status_code == 413:
        raise EngineError(f"ComfyUI refused the upload of {path.name} ({path.stat().st_size} bytes) as too large "
                          "(HTTP 413): lower COMFYUI_MAX_UPLOAD_MB to the node's --max-upload-size")
    if resp.status_code != 200:
        raise EngineError(f"ComfyUI refused the upload of {path.name}: HTTP {resp.status_code} {resp.text[:200]}")
    body = resp.json()
    name = str(body.get("name") or path.name)
    return f"{body['subfolder']}/{name}" if body.get("subfolder") else name


def queue_prompt(node: NodeUrls, workflow: dict, client_id: str) -> str:
    """POST /prompt; return prompt_id. 400 -> EngineError naming the node errors.

    A 200 answer that still lists node_errors means part of the graph was refused and the valid rest
    (e.g. the preview) was queued: that prompt is deleted from the queue before giving up on it.
    """
    resp = node_request(
        node, "POST", "/prompt", json={"prompt": workflow, "client_id": client_id}, timeout=HTTP_TIMEOUT
    )
    if resp.status_code == 400:
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:300]}
        raise EngineError(format_prompt_error(body))
    resp.raise_for_status()
    body = resp.json()
    if body.get("node_errors"):
        if body.get("prompt_id"):
            stop_prompt(node, str(body["prompt_id"]), started=False)
        raise EngineError(format_prompt_error(body))
    return str(body["prompt_id"])


def get_history(node: NodeUrls, prompt_id: str) -> dict | None:
    """The /history entry of a finished prompt, None while it is not finished."""
    resp = node_request(node, "GET", f"/history/{prompt_id}", timeout=HTTP_TIMEOUT)
    resp.raise_for_status()
    entry = resp.json().get(prompt_id)
    return entry if isinstance(entry, dict) else None


def _is_running(node: NodeUrls, prompt_id: str) -> bool | None:
    """Whether GET /queue lists the prompt as running (None if /queue does not tell)."""
    try:
        resp = requests.get(f"{node.comfyui}/queue", headers=node.headers(), timeout=(5, 10))
        running = resp.json().get("queue_running") if resp.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None
    if not isinstance(running, list):
        return None
    return any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in running)


def stop_prompt(node: NodeUrls, prompt_id: str, started: bool) -> None:
    """Drop the prompt from the queue if it has not started, else interrupt it. Never raises."""
    try:
        if not started:
            requests.post(
                f"{node.comfyui}/queue", headers=node.headers(), json={"delete": [prompt_id]}, timeout=(5, 10)
            )
            # It may have started since our last message: interrupt only if /queue says it runs
            # (or cannot tell; the body scopes the interrupt to our prompt on recent ComfyUI).
            if _is_running(node, prompt_id) is False:
                return
        requests.post(
            f"{node.comfyui}/interrupt",
            headers=node.headers(),
            json={"prompt_id": prompt_id},
            timeout=(5, 10),
        )
    except requests.RequestException as exc:
        log.warning("stopping ComfyUI prompt %s failed: %s", prompt_id, exc)


def _stopped(node: NodeUrls, prompt_id: str, started: bool, reason: str) -> JobStopped:
    stop_prompt(node, prompt_id, started)
    return JobStopped(reason)


def _interrupted(should_stop: ShouldStop) -> Exception:
    reason = should_stop()
    return JobStopped(reason) if reason else EngineError(INTERRUPTED)


def follow_websocket(
    ws: Any, node: NodeUrls, prompt_id: str, should_stop: ShouldStop, progress: Progress, phase: Phase = no_phase
) -> bool:
    """Follow the prompt on the websocket: True when it finished, False when the socket dropped.

    Phases: rendering once the prompt starts, encoding once node 13 (VHS_VideoCombine) runs; the
    percentage is node 13's frame count, the one real progress signal (the SONIC nodes send none).
    """
    started = False
    next_check = 0.0
    while True:
        if time.monotonic() >= next_check:
            reason = should_stop()
            if reason:
                raise _stopped(node, prompt_id, started, reason)
            next_check = time.monotonic() + STOP_CHECK_INTERVAL_S
        try:
            frame = ws.recv()
        except websocket.WebSocketTimeoutException:
            next_check = 0.0
            continue
        except (websocket.WebSocketException, OSError) as exc:
            log.warning("ComfyUI websocket dropped (%s); polling /history", type(exc).__name__)
            return False
        if not isinstance(frame, str):
            continue  # binary frames are previews
        if frame == "":  # websocket-client returns "" once the peer closed
            return False
        try:
            message = json.loads(frame)
        except ValueError:
            continue
        kind = message.get("type") if isinstance(message, dict) else None
        data = message.get("data") if isinstance(message, dict) else None
        if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
            continue
        if kind in ("execution_start", "execution_cached", "progress"):
            started = True
        if kind == "progress" and data.get("max") and str(data.get("node")) == VIDEO_NODE:
            progress(max(0, min(99, int(100 * float(data.get("value", 0)) / float(data["max"])))))
        elif kind == "executing":
            if data.get("node") is None:
                return True
            started = True
            phase("encoding" if str(data.get("node")) == VIDEO_NODE else "rendering")
        elif kind == "execution_success":
            return True
        elif kind == "execution_error":
            raise EngineError(format_execution_error(data))
        elif kind == "execution_interrupted":
            raise _interrupted(should_stop)


def wait_history(
    node: NodeUrls, prompt_id: str, should_stop: ShouldStop, interval_s: float, limit_s: float | None
) -> dict:
    """Poll /history until the prompt shows up there (the prompt finished)."""
    deadline = None if limit_s is None else time.monotonic() + limit_s
    while True:
        entry = get_history(node, prompt_id)
        if entry is not None:
            return entry
        if deadline is not None and time.monotonic() >= deadline:
            raise EngineError("ComfyUI said the prompt finished but /history does not show it")
        reason = _wait(interval_s, should_stop)
        if reason:
            raise _stopped(node, prompt_id, False, reason)


def download(node: NodeUrls, item: dict, dest: Path) -> Path:
    """GET /view for one output file, streamed to dest."""
    query = {
        "filename": item["filename"],
        "subfolder": item.get("subfolder", ""),
        "type": item.get("type", "output"),
    }
    partial = dest.with_name(dest.name + ".part")
    with node_request(node, "GET", "/view", params=query, stream=True, timeout=UPLOAD_TIMEOUT) as resp:
        if resp.status_code != 200:
            raise EngineError(f"ComfyUI output {item['filename']} not downloadable: HTTP {resp.status_code}")
        with partial.open("wb") as fh:
            for chunk in resp.iter_content(chunk_size=1 << 20):
                fh.write(chunk)
    if partial.stat().st_size == 0:
        partial.unlink()
        raise EngineError(f"ComfyUI output {item['filename']} is empty")
    partial.replace(dest)
    return dest


def open_websocket(node: NodeUrls, client_id: str) -> Any:
    """Connect the websocket (before the prompt is queued, so no message is missed); None on failure."""
    try:
        ws = websocket.create_connection(ws_url(node.comfyui, client_id), timeout=10, header=node.headers())
    except (websocket.WebSocketException, OSError) as exc:
        log.warning("ComfyUI websocket unavailable (%s); will poll /history", type(exc).__name__)
        return None
    ws.settimeout(WS_RECV_TIMEOUT_S)
    return ws


# --- the engine ---------------------------------------------------------------------------------


def run(
    params: dict,
    job_id: str,
    inputs: dict[str, Path],
    node: NodeUrls,
    work_dir: Path,
    should_stop: ShouldStop,
    progress: Progress,
    phase: Phase = no_phase,
) -> Path:
    """Render a talking-head video of inputs["image"] speaking inputs["audio"]; return the .mp4 path."""
    if "image" not in inputs or "audio" not in inputs:
        raise EngineError("portrait needs an image and an audio input")
    settings = config.load()
    max_bytes = int(settings.comfyui_max_upload_mb * 1024 * 1024)
    image_path = work_dir / f"{job_id}_input.jpg"
    image_size = prepare_image(inputs["image"], image_path, max_bytes)
    audio_path, audio_seconds = prepare_audio(inputs["audio"], work_dir, job_id, max_bytes)

    wait_ready(node, should_stop, settings.service_ready_timeout_s)
    phase("uploading_inputs")
    image_name = upload(node, image_path, "image/jpeg")
    audio_name = upload(node, audio_path, f"audio/{'mpeg' if audio_path.suffix == '.mp3' else audio_path.suffix[1:]}")
    seed = params.get("seed")
    workflow = build_sonic_workflow(
        image_name,
        audio_name,
        image_size,
        audio_seconds,
        prefix=f"c3render/{job_id}",
        seed=int(seed) if isinstance(seed, int) else random.randint(1, 2**31 - 1),
    )

    client_id = str(uuid.uuid4())
    ws = open_websocket(node, client_id)
    try:
        reason = should_stop()
        if reason:
            raise JobStopped(reason)
        prompt_id = queue_prompt(node, workflow, client_id)
        log.info("job %s: ComfyUI prompt %s queued (%.1f s of audio)", job_id, prompt_id, audio_seconds)
        phase("rendering")
        finished = ws is not None and follow_websocket(ws, node, prompt_id, should_stop, progress, phase)
    finally:
        if ws is not None:
            try:
                ws.close()
            except (websocket.WebSocketException, OSError):
                pass
    # /history is the source of truth; without the websocket it is also how we learn the end.
    entry = wait_history(
        node,
        prompt_id,
        should_stop,
        0.5 if finished else HISTORY_POLL_S,
        HISTORY_SETTLE_S if finished else None,
    )
    error = history_error(entry)
    if error:
        if error == INTERRUPTED:
            raise _interrupted(should_stop)
        raise EngineError(error)
    out = download(node, video_output(entry), work_dir / f"{job_id}.mp4")
    progress(100)
    return out
