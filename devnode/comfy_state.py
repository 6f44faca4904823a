"""Dev node ComfyUI stand-in: the per-workload state (queue, history, websocket clients) and file paths.

Each workload (one dev node "node") has its own input/output/temp folders under the data dir, its own
prompt queue, history and websocket clients; `_emit` sends a websocket message to one client or all.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UPLOAD_TYPES = ("input", "temp", "output")

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
    models: Path  # the node's model folders (shared by every workload of the dev node)
    cond: threading.Condition = field(default_factory=threading.Condition)
    pending: list[Task] = field(default_factory=list)
    running: Task | None = None
    history: dict[str, dict] = field(default_factory=dict)
    number: int = 0
    clients: dict[str, list[Client]] = field(default_factory=dict)
    interrupt: threading.Event = field(default_factory=threading.Event)
    proc: subprocess.Popen | None = None
    proc_interruptible: bool = True  # False while a node that ignores /interrupt runs (SONICSampler)
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
            wl = Workload(name=name, root=root, models=data_dir / "models")
            registry[name] = wl
        return wl


def _client(task: Task) -> str | None:
    return task.extra_data.get("client_id")


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


# --- files ----------------------------------------------------------------------------------


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


