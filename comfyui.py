"""Portrait video engine: the SONIC talking-head workflow on ComfyUI (docs/node-protocols.md, ComfyUI and SONIC).

This module owns everything between a portrait image + audio on disk and work_dir/{job_id}.mp4:
preparing the inputs (work_dir/{job_id}_input.jpg, made by mediaconv.prepare_image, and the audio as
{job_id}_input.<mp3|wav|flac>), uploading them, building the workflow (sonic_workflow.py), queueing
it, following it on the websocket (falling back to polling /history when the socket drops), stopping it
on request, and downloading the video named in /history. The worker has waited for ComfyUI to answer
(GET /system_stats, once per node) before the engine runs.

Raises JobStopped when should_stop() gives a reason (after dropping or interrupting the prompt),
EngineError when ComfyUI rejects or fails the workflow. Transport errors (requests, websocket) propagate
unchanged: the node is in trouble. A 5xx answer from a node whose health check still passes is retried
once (a transient app error) before the job fails.

Real-node facts this follows (docs/node-protocols.md, ComfyUI and SONIC): uploads over
COMFYUI_MAX_UPLOAD_MB (100 MiB) are refused with 413, so larger audio is compressed first
(mediaconv.shrink_audio); the SONIC sampler ignores /interrupt until it ends, so after a stop the node
stays busy (`node_busy` tells the worker); only VHS_VideoCombine (node 13) reports progress, so the
percentage is that of the encoding phase.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import requests
import websocket

import comput3
import media_check
import mediaconv
from engine_api import EngineError, JobContext, JobStopped, NodeUrls, ShouldStop
from sonic_workflow import VIDEO_NODE, build_sonic_workflow

log = logging.getLogger(__name__)

KEEP_AUDIO_FORMATS = {"mp3": "mp3", "wav": "wav", "flac": "flac"}  # ffprobe format -> extension
WS_RECV_TIMEOUT_S = 1.0  # so should_stop() is looked at at least every second
STOP_CHECK_INTERVAL_S = 0.5
HISTORY_POLL_S = 2.0  # polling /history when the websocket is gone
HISTORY_SETTLE_S = 30.0  # after "done", how long /history may take to show the prompt
HTTP_TIMEOUT = (10, 60)
INTERRUPTED = "ComfyUI execution was interrupted on the node"
UPLOAD_TIMEOUT = (10, 300)
RETRY_PAUSE_S = 2.0  # before the one retry of a 5xx answer


# --- ComfyUI's answers -------------------------------------------------------------------------


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


def prepare_audio(src: Path, work_dir: Path, job_id: str, max_bytes: int | None = None) -> tuple[Path, float]:
    """Keep MP3/WAV/FLAC as is, convert anything else (video containers, m4a, ogg, webm...) to MP3;
    then, when the file would not fit max_bytes (ComfyUI's upload limit), a mono FLAC or MP3 of it.

    Returns the file to upload and its duration in seconds. ffmpeg converts file to file.
    """
    fmt, duration = media_check.format_and_duration(src)
    if fmt in KEEP_AUDIO_FORMATS:
        dest = work_dir / f"{job_id}_input.{KEEP_AUDIO_FORMATS[fmt]}"
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
    else:
        dest = work_dir / f"{job_id}_input.mp3"
        try:
            mediaconv.transcode_audio(src, dest, codec="libmp3lame", bitrate=mediaconv.MP3_BITRATE)
        except media_check.MediaError as exc:
            raise EngineError(f"could not convert the audio to MP3: {exc}") from exc
        duration = media_check.format_and_duration(dest)[1]
    if duration is None:
        try:
            duration = mediaconv.decoded_seconds(dest)
        except media_check.MediaError as exc:
            raise EngineError(f"could not read the audio: {exc}") from exc
    if max_bytes is not None and not mediaconv.fits(dest, max_bytes):
        try:
            small = mediaconv.shrink_audio(dest, work_dir / f"{job_id}_upload", max_bytes)
        except media_check.MediaError as exc:
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
    if resp.status_code < 500 or not comput3.check_node_health(node):
        return resp
    log.warning("ComfyUI %s %s answered HTTP %d on a healthy node; retrying once", method, path, resp.status_code)
    resp.close()
    time.sleep(RETRY_PAUSE_S)
    for item in (kwargs.get("files") or {}).values():
        handle = item[1] if isinstance(item, tuple) else item
        if hasattr(handle, "seek"):
            handle.seek(0)
    return requests.request(method, url, headers=node.headers(), timeout=timeout, **kwargs)


def get_queue(node: NodeUrls) -> dict | None:
    """GET /queue ({"queue_running": [...], "queue_pending": [...]}); None when it cannot tell."""
    try:
        resp = requests.get(f"{node.comfyui}/queue", headers=node.headers(), timeout=(5, 10))
        body = resp.json() if resp.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None
    return body if isinstance(body, dict) else None


def node_busy(node: NodeUrls) -> bool | None:
    """Whether the node's ComfyUI still runs or queues a prompt (GET /queue); None when it cannot tell."""
    queue = get_queue(node)
    return None if queue is None else bool(queue.get("queue_running") or queue.get("queue_pending"))


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
    running = (get_queue(node) or {}).get("queue_running")
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


def follow_websocket(ws: Any, job: JobContext, prompt_id: str) -> bool:
    """Follow the prompt on the websocket: True when it finished, False when the socket dropped.

    Phases: rendering once the prompt starts, encoding once node 13 (VHS_VideoCombine) runs; the
    percentage is node 13's frame count, the one real progress signal (the SONIC nodes send none).
    """
    started = False
    next_check = 0.0
    while True:
        if time.monotonic() >= next_check:
            reason = job.should_stop()
            if reason:
                raise _stopped(job.node, prompt_id, started, reason)
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
            job.progress(max(0, min(99, int(100 * float(data.get("value", 0)) / float(data["max"])))))
        elif kind == "executing":
            if data.get("node") is None:
                return True
            started = True
            job.phase("encoding" if str(data.get("node")) == VIDEO_NODE else "rendering")
        elif kind == "execution_success":
            return True
        elif kind == "execution_error":
            raise EngineError(format_execution_error(data))
        elif kind == "execution_interrupted":
            raise _interrupted(job.should_stop)


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


def run(job: JobContext) -> Path:
    """Render a talking-head video of inputs["image"] speaking inputs["audio"]; return the .mp4 path."""
    if "image" not in job.inputs or "audio" not in job.inputs:
        raise EngineError("portrait needs an image and an audio input")
    workflow, audio_seconds = send_inputs(job)
    prompt_id, followed = run_prompt(job, workflow, audio_seconds)
    # /history is the source of truth; without the websocket it is also how we learn the end.
    entry = wait_history(job.node, prompt_id, job.should_stop, 0.5 if followed else HISTORY_POLL_S,
                         HISTORY_SETTLE_S if followed else None)
    return fetch_video(job, entry)


def send_inputs(job: JobContext) -> tuple[dict, float]:
    """Prepare the portrait and the audio within the upload limit and upload both; return the SONIC
    workflow that uses them and the audio's length in seconds."""
    max_bytes = int(job.settings.comfyui_max_upload_mb * 1024 * 1024)
    image_path = job.file("_input.jpg")
    image_size = mediaconv.prepare_image(job.inputs["image"], image_path, max_bytes)
    audio_path, audio_seconds = prepare_audio(job.inputs["audio"], job.work_dir, job.job_id, max_bytes)
    job.phase("uploading_inputs")
    image_name = upload(job.node, image_path, "image/jpeg")
    audio_mime = f"audio/{'mpeg' if audio_path.suffix == '.mp3' else audio_path.suffix[1:]}"
    audio_name = upload(job.node, audio_path, audio_mime)
    seed = job.params.get("seed")
    workflow = build_sonic_workflow(
        image_name,
        audio_name,
        image_size,
        audio_seconds,
        prefix=f"c3render/{job.job_id}",
        seed=int(seed) if isinstance(seed, int) else random.randint(1, 2**31 - 1),
    )
    return workflow, audio_seconds


def run_prompt(job: JobContext, workflow: dict, audio_seconds: float) -> tuple[str, bool]:
    """Queue the workflow and follow it on the websocket; return the prompt id and whether the socket
    saw it finish (False: the socket was unavailable or dropped)."""
    client_id = str(uuid.uuid4())
    ws = open_websocket(job.node, client_id)  # before the prompt is queued, so no message is missed
    try:
        reason = job.should_stop()
        if reason:
            raise JobStopped(reason)
        prompt_id = queue_prompt(job.node, workflow, client_id)
        log.info("job %s: ComfyUI prompt %s queued (%.1f s of audio)", job.job_id, prompt_id, audio_seconds)
        job.phase("rendering")
        return prompt_id, ws is not None and follow_websocket(ws, job, prompt_id)
    finally:
        if ws is not None:
            try:
                ws.close()
            except (websocket.WebSocketException, OSError):
                pass


def fetch_video(job: JobContext, entry: dict) -> Path:
    """Download the video of a finished /history entry to work_dir/{job_id}.mp4; its error as EngineError."""
    error = history_error(entry)
    if error:
        if error == INTERRUPTED:
            raise _interrupted(job.should_stop)
        raise EngineError(error)
    out = download(job.node, video_output(entry), job.file(".mp4"))
    job.progress(100)
    return out
