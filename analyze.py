"""Image analysis engine: a vision model behind an Ollama-compatible /api/generate (docs/node-protocols.md, Ollama).

This module owns the analyze job's files (work_dir/{job_id}_input.jpg, the JPEG sent; work_dir/{job_id}.txt,
the answer) and the /api/generate call. It returns the model's answer text.

Why streaming over a raw http.client connection: Ollama stops generating when its client disconnects,
and it sends nothing while it loads the model (often tens of seconds). The request runs in a thread;
the caller's thread checks should_stop() every 0.5 s and, on stop, shuts the socket down, which ends
the request on the node at once (with requests there is no socket to shut before headers arrive).
The body asks for "stream": true; a single JSON object (a server that ignores "stream") is read too.

Model: params["model"], else the OLLAMA_MODEL setting (config.py, read from job.settings). Raises JobStopped,
EngineError("vision model failed: ...") for error answers; OSError / http.client errors when the node
cannot be reached.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from engine_api import EngineError, JobContext, JobStopped, Progress, ShouldStop
from mediaconv import prepare_image

log = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "Describe this image in detail: the main subjects and what they are doing, any people and their "
    "expressions, notable objects, the setting, any visible text, and the overall colours and mood."
)
READ_TIMEOUT_S = 600.0  # the node may load the model before the first byte
STOP_CHECK_S = 0.5


@dataclass
class _Call:
    """State shared between the request thread and the caller."""

    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    sock: socket.socket | None = None
    parts: list[str] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    exc: BaseException | None = None


def _collect(call: _Call, obj: object) -> None:
    if not isinstance(obj, dict):
        call.error = f"unexpected answer {str(obj)[:200]}"
        return
    if obj.get("error"):
        call.error = str(obj["error"])
        return
    call.parts.append(str(obj.get("response") or ""))
    call.finished = call.finished or bool(obj.get("done"))


def _error_text(status: int, body: bytes) -> str:
    try:
        detail = json.loads(body).get("error")
    except (ValueError, AttributeError):
        detail = None
    return f"HTTP {status}: {detail or body.decode('utf-8', 'replace').strip()[:300]}"


def _request(call: _Call, url: str, headers: dict[str, str], payload: bytes) -> None:
    """Thread body: POST the request and read the NDJSON answer into call."""
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname or "", parts.port, timeout=READ_TIMEOUT_S)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.connect()
        call.sock = conn.sock
        if call.stop.is_set():
            return
        conn.request("POST", path, body=payload, headers={**headers, "Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            call.error = _error_text(resp.status, resp.read(4096))
            return
        raw = bytearray()
        lines_ok = True
        while not call.stop.is_set():
            line = resp.readline()
            if not line:
                break
            raw += line
            if not line.strip():
                continue
            try:
                _collect(call, json.loads(line))
            except ValueError:
                lines_ok = False  # not NDJSON: parse the whole body below
        if not lines_ok and not call.stop.is_set():
            call.parts.clear()
            call.error = None
            try:
                _collect(call, json.loads(bytes(raw)))
            except ValueError:
                call.error = f"unreadable answer {bytes(raw[:200])!r}"
    except (OSError, http.client.HTTPException) as exc:
        if not call.stop.is_set():
            call.exc = exc
    finally:
        conn.close()
        call.done.set()


def _shutdown(call: _Call) -> None:
    """Cut the connection so the node sees the client go (and a blocked read returns)."""
    sock = call.sock
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def generate(url: str, headers: dict[str, str], body: dict, should_stop: ShouldStop, progress: Progress) -> str:
    """POST body to an Ollama /api/generate URL and return the whole answer, honouring should_stop."""
    call = _Call()
    payload = json.dumps({**body, "stream": True}).encode()
    thread = threading.Thread(target=_request, args=(call, url, headers, payload), daemon=True)
    thread.start()
    while not call.done.wait(STOP_CHECK_S):
        reason = should_stop()
        if reason:
            call.stop.set()
            _shutdown(call)
            thread.join(timeout=2)
            raise JobStopped(reason)
        # no progress(): tokens flow without a total to measure them against (README: Progress)
    if call.exc is not None:
        raise call.exc
    if call.error:
        raise EngineError(f"vision model failed: {call.error}")
    text = "".join(call.parts).strip()
    if not text:
        raise EngineError("vision model failed: empty answer" + ("" if call.finished else " (stream cut)"))
    return text


def run(job: JobContext) -> str:
    """Describe inputs["image"] with the vision model on the node; return the text."""
    if "image" not in job.inputs:
        raise EngineError("analyze needs an image input")
    image_path = job.file("_input.jpg")
    prepare_image(job.inputs["image"], image_path)
    model = str(job.params.get("model") or job.settings.ollama_model)
    body = {
        "model": model,
        "prompt": str(job.params.get("prompt") or DEFAULT_PROMPT),
        "images": [base64.b64encode(image_path.read_bytes()).decode("ascii")],
    }
    log.info("job %s: vision model %s", job.job_id, model)
    job.phase("rendering")  # the image travels inside the request: no separate upload
    text = generate(f"{job.node.ollama}/api/generate", job.node.headers(), body, job.should_stop, job.progress)
    job.file(".txt").write_text(text, encoding="utf-8")
    return text
