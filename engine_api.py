"""What the worker hands a job engine (csm, whisper, comfyui, analyze) and what an engine may raise.

An engine is a module with one function:

    run(job: JobContext) -> Path | str

JobContext (below) holds everything the engine gets for one job:
- job_id, params: the job's id and its validated parameters (defaults filled in by the API).
- inputs: local files the worker has already downloaded and checked, by role
  ("audio", "image", "reference_audio").
- node: the URLs of the GPU node the job runs on (NodeUrls below). The worker has already waited for
  the job's service on it to answer (once per node), so engines do not wait for it again.
- work_dir: the job's own directory; outputs go there under the spec's names (`job.file(suffix)`).
- settings: the worker's config.Settings. Engines read settings only from here, never config.load().
- should_stop(): None while the job may go on, else the reason it must stop (cancel, max_time,
  complete_by). Engines poll it, stop the remote work (Gradio job cancelled, ComfyUI interrupted)
  and raise JobStopped(reason).
- progress(percent): progress within the current phase (0-100), reported only from a real signal
  (the node's own per-frame messages); engines without one never call it.
- phase(name): what the job is doing now, one of jobspec.PHASES (the engines report uploading_inputs,
  rendering and encoding; the worker the others).

Engines never touch Redis or storage; they return a local file path (media) or text.

What a client sees of a failure never holds a node's host name or URL (nor the C3_API_KEY): engines
write their EngineError messages without them (`without_addresses` for text from a library or the
app), and `failure_text` says in words what an exception from the node's transport means (refused,
timed out, HTTP 502 ...) where a library's str() would name the host and the URL.
"""

from __future__ import annotations

import http
import http.client
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import config

ShouldStop = Callable[[], "str | None"]
Progress = Callable[[int], None]
Phase = Callable[[str], None]


def no_progress(_percent: int) -> None:
    return None


def no_phase(_phase: str) -> None:
    return None


@dataclass(frozen=True)
class NodeUrls:
    """Where a node's services answer. api_key goes in X-C3-API-KEY and is never logged."""

    base: str  # health check: GET base + "/"
    csm: str  # Gradio CSM app (ends with "/")
    whisper: str  # Gradio WhisperX app (ends with "/")
    comfyui: str  # ComfyUI root (no trailing "/")
    ollama: str  # Ollama-compatible root (no trailing "/")
    api_key: str

    def headers(self) -> dict[str, str]:
        return {"X-C3-API-KEY": self.api_key}

    def __repr__(self) -> str:  # keep the key out of logs and tracebacks
        return f"NodeUrls(base={self.base!r})"


def node_urls(node: str, api_key: str, node_url: str, comfyui_url: str, ollama_url: str) -> NodeUrls:
    """Fill the URL templates ({node} placeholders) for one node hostname."""
    base = node_url.replace("{node}", node).rstrip("/")
    return NodeUrls(
        base=base,
        csm=base + "/csm/",
        whisper=base + "/whisper/",
        comfyui=comfyui_url.replace("{node}", node).rstrip("/"),
        ollama=ollama_url.replace("{node}", node).rstrip("/"),
        api_key=api_key,
    )


@dataclass(frozen=True)
class JobContext:
    """One job as an engine sees it (the module docstring says what each field is)."""

    job_id: str
    params: dict[str, Any]
    inputs: dict[str, Path]
    node: NodeUrls
    work_dir: Path
    settings: config.Settings = field(repr=False)  # a long repr, of no use in a traceback
    should_stop: ShouldStop
    progress: Progress = no_progress
    phase: Phase = no_phase

    def file(self, suffix: str) -> Path:
        """work_dir/{job_id}{suffix}: every file of a job is named after it (e.g. "_input.jpg", ".mp4")."""
        return self.work_dir / f"{self.job_id}{suffix}"


class JobStopped(Exception):
    """The engine stopped its remote work because should_stop() gave this reason."""


class EngineError(Exception):
    """The engine's service answered with an error; str() is the message the client sees."""


def pause(seconds: float, should_stop: ShouldStop | None, sleep: Callable[[float], None] = time.sleep) -> None:
    """Wait `seconds` (a retry's back-off); with should_stop, in half-second steps, ending early with
    JobStopped when it gives a reason (a cancel is not held up by a long back-off)."""
    if should_stop is None:
        sleep(seconds)
        return
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if reason := should_stop():
            raise JobStopped(reason)
        sleep(min(0.5, left))


# --- failures as a client may see them -------------------------------------------------------------

_URL_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]*[^\s'\"<>()\[\]{}.,;:!?]")  # not its full stop
# urllib3's connection pools and errors name the host: HTTPSConnectionPool(host='ui-<node>', port=443),
# "Failed to resolve 'ui-<node>'"
_HOST_RE = re.compile(r"""\bhost=(['"])[^'"]*\1""")
_RESOLVE_RE = re.compile(r"""\b(resolve|resolving) (['"])[^'"]*\2""", re.IGNORECASE)


def without_addresses(text: str) -> str:
    """text with every URL and every host name a connection error quotes replaced (<url>, <host>)."""
    text = _URL_RE.sub("<url>", text)
    text = _HOST_RE.sub("host=<host>", text)
    return _RESOLVE_RE.sub(r"\1 <host>", text)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """exc and what it wraps: __cause__, __context__, urllib3's .reason, exceptions among its args."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        linked = [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
        stack += [x for x in linked if isinstance(x, BaseException)]


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of an error answer (requests, httpx, websocket-client), else None."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if not isinstance(status, int):
        status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) and 100 <= status <= 599 else None


def failure_text(exc: BaseException) -> str:
    """What went wrong, for the client, when talking to a GPU node raised exc: in words for transport
    failures and error answers (requests, httpx, websocket-client, http.client, sockets), whose str()
    names the node's host and the URL; the type and a scrubbed message for anything else."""
    chain = list(_causes(exc))
    names = {type(item).__name__ for item in chain}
    if (status := _http_status(exc)) is not None:
        try:
            phrase = f" ({http.HTTPStatus(status).phrase})"
        except ValueError:
            phrase = ""
        return f"the GPU node answered HTTP {status}{phrase}"
    if any(isinstance(item, ConnectionRefusedError) for item in chain):
        return "the GPU node refused the connection"
    if any(isinstance(item, socket.gaierror) for item in chain) or "NameResolutionError" in names:
        return "the GPU node's address could not be resolved"
    if names & {"ConnectTimeout", "ConnectTimeoutError"}:
        return "the GPU node could not be reached (connecting timed out)"
    if any(isinstance(item, TimeoutError) for item in chain) or any("Timeout" in name for name in names):
        return "the GPU node stopped answering (no answer in the time allowed)"
    if any(isinstance(item, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
                             http.client.IncompleteRead)) for item in chain) \
            or names & {"RemoteProtocolError", "ProtocolError", "ReadError", "WebSocketConnectionClosedException"}:
        return "the GPU node closed the connection before it answered"
    if any(isinstance(item, (OSError, http.client.HTTPException)) for item in chain) \
            or names & {"TransportError", "NetworkError", "WebSocketException"}:
        return f"the connection to the GPU node failed ({type(exc).__name__})"
    return without_addresses(f"{type(exc).__name__}: {exc}")
