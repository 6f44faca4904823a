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
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
