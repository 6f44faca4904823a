"""Fault switches of the dev node: what tests and the soak test can make go wrong.

Set from the environment at start-up (DEVNODE_FAULTS, a JSON object) or at run time through
`POST /admin/faults` with the same JSON; `GET /admin/faults` shows the current values.

- launch_failures: int        the next N launches answer an error (then launches work again)
- launch_failure_mode: str    "500" (JSON 500), "html" (an HTML 502 page as a CDN sends),
                              "timeout" (hangs 30 s)
- launch_answer_delay_s: float  every launch creates its node at once and holds its answer this long
                              (a slow provider; longer than the client's read timeout = a lost answer;
                              a worker killed meanwhile leaves a node it never recorded)
- stop_answer_delay_s: float  every stop holds its answer this long (a slow provider or gateway)
- launch_answer_lost: int     the next N launches create their node, then answer a gateway's HTML 504
                              page instead of the launch answer (the node exists, the client cannot know)
- node_dies_after_s: float|None   every node launched from now on stops answering (404) T s after boot
- comfyui_warmup_s: float     ComfyUI on a node answers a gateway's 502 page for this long after the node's
                              root is up (a real cold start: minutes while models load)
- engine_error: list[str]     engines that answer with an error: "csm", "whisper", "comfyui", "ollama"
- engine_hang: list[str]      engines that never finish (until stopped/interrupted/cancelled)
- oom_when_shared: list[str]  engines ("csm", "whisper", "comfyui") that run out of GPU memory when they
                              start while another service of the same node is busy, answering as the real
                              app does (CSM "Generation failed: CUDA out of memory...", WhisperX
                              "Error: CUDA failed with error out of memory", ComfyUI an execution_error)

Each node's services run one request at a time (`serving`), as each real node's apps do, while the
services of different nodes run side by side (the Gradio apps are shared by every node of the process);
`serving` also notes which services of a node are busy, for oom_when_shared.

Engines that hang call `hang()` (async) or `hang_blocking()` (threads): both end when the node that
runs the request is gone (the server registers that check with `set_node_gone_check`), when the
process shuts down (`SHUTDOWN`), after `limit_s`, or, for `hang()`, when the task is cancelled
(a Gradio client's `job.cancel()`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

_LOCK = threading.Lock()
LOG = logging.getLogger("devnode.faults")
DEFAULTS: dict = {
    "launch_failures": 0,
    "launch_failure_mode": "500",
    "launch_answer_delay_s": 0.0,
    "launch_answer_lost": 0,
    "stop_answer_delay_s": 0.0,
    "node_dies_after_s": None,
    "comfyui_warmup_s": 0.0,
    "engine_error": [],
    "engine_hang": [],
    "oom_when_shared": [],
}
FAULTS: dict = dict(DEFAULTS)
SHUTDOWN = threading.Event()
HANG_LIMIT_S = 600.0
_NODE_GONE: list[Callable[[str], bool]] = []


def load_from_env() -> None:
    raw = os.environ.get("DEVNODE_FAULTS", "").strip()
    if raw:
        update(json.loads(raw))


def update(changes: dict) -> dict:
    """Merge `changes` into the switches (unknown names raise ValueError); return the new state."""
    unknown = set(changes) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown fault switches: {', '.join(sorted(unknown))}")
    with _LOCK:
        FAULTS.update(changes)
        return dict(FAULTS)


def reset() -> dict:
    with _LOCK:
        FAULTS.clear()
        FAULTS.update({k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()})
        return dict(FAULTS)


def snapshot() -> dict:
    with _LOCK:
        return dict(FAULTS)


def take_launch_failure() -> str | None:
    """Consume one pending launch failure; return its mode, or None when launches should work."""
    with _LOCK:
        if FAULTS["launch_failures"] > 0:
            FAULTS["launch_failures"] -= 1
            return str(FAULTS["launch_failure_mode"])
        return None


def take_launch_answer_lost() -> bool:
    """Consume one pending lost launch answer; True when this launch's answer must be lost."""
    with _LOCK:
        if FAULTS["launch_answer_lost"] > 0:
            FAULTS["launch_answer_lost"] -= 1
            return True
        return False


def engine_fault(engine: str) -> str | None:
    """'error', 'hang' or None for the engine named ('csm', 'whisper', 'comfyui', 'ollama')."""
    with _LOCK:
        if engine in FAULTS["engine_error"]:
            return "error"
        if engine in FAULTS["engine_hang"]:
            return "hang"
        return None


def set_node_gone_check(check: Callable[[str], bool]) -> None:
    """Register `check(workload) -> True when that node is stopped, expired or dead` (the server does)."""
    _NODE_GONE[:] = [check]


def _should_stop(workload: str | None) -> bool:
    if SHUTDOWN.is_set():
        return True
    return bool(workload and _NODE_GONE and _NODE_GONE[0](workload))


async def hang(workload: str | None, engine: str = "", limit_s: float = HANG_LIMIT_S) -> None:
    """Sleep in small steps like a hung engine until cancelled, the node is gone, shutdown or `limit_s`."""
    deadline = time.monotonic() + limit_s
    LOG.info("%s engine hangs (fault) for workload %s", engine or "an", workload)
    try:
        while time.monotonic() < deadline and not _should_stop(workload):
            await asyncio.sleep(0.2)
    except asyncio.CancelledError:
        LOG.info("%s engine hang cancelled", engine or "an")
        raise
    LOG.info("%s engine hang ended (node gone, shutdown or time limit)", engine or "an")


def hang_blocking(workload: str | None, engine: str = "", limit_s: float = HANG_LIMIT_S) -> None:
    """`hang()` for code running in a thread (cannot be cancelled; ends on node gone/shutdown/limit)."""
    deadline = time.monotonic() + limit_s
    LOG.info("%s engine hangs (fault) for workload %s", engine or "an", workload)
    while time.monotonic() < deadline and not _should_stop(workload):
        SHUTDOWN.wait(0.2)
    LOG.info("%s engine hang ended (node gone, shutdown or time limit)", engine or "an")


def workload_of(request: object) -> str | None:
    """The workload id the node router put into the ASGI scope (`devnode_workload`), if any.

    Accepts a Starlette/FastAPI request (has `.scope`) or a `gr.Request` (wraps one as `.request`).
    """
    inner = getattr(request, "__dict__", {}).get("request")  # gr.Request keeps the Starlette one here
    scope = getattr(inner if inner is not None else request, "scope", None)
    if isinstance(scope, dict):
        return scope.get("devnode_workload")
    return None


# --- each node's services: one request at a time, and which are busy ------------------------------

_BUSY: dict[str, dict[str, int]] = {}  # workload -> service -> requests running
_TURNS: dict[tuple[str, str], asyncio.Lock] = {}
OUT_OF_MEMORY = {"csm": "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total capacity)",
                 "whisper": "CUDA failed with error out of memory",
                 "comfyui": "CUDA out of memory. Tried to allocate 1.50 GiB"}


@contextmanager
def busy(workload: str | None, service: str) -> Iterator[None]:
    """Note that a service of a node runs a request (for oom_when_shared)."""
    key = workload or ""
    with _LOCK:
        services = _BUSY.setdefault(key, {})
        services[service] = services.get(service, 0) + 1
    try:
        yield
    finally:
        with _LOCK:
            services[service] -= 1
            if not any(_BUSY[key].values()):
                _BUSY.pop(key, None)


@asynccontextmanager
async def serving(workload: str | None, service: str) -> AsyncIterator[None]:
    """A request of a node's service: it waits for the one before it on the same node, then runs busy."""
    with _LOCK:
        turn = _TURNS.setdefault((workload or "", service), asyncio.Lock())
    async with turn:
        with busy(workload, service):
            yield


def out_of_memory(workload: str | None, service: str) -> str | None:
    """The out-of-memory message when oom_when_shared names this engine and another service of the same
    node is busy; None otherwise."""
    with _LOCK:
        if service not in FAULTS["oom_when_shared"]:
            return None
        others = {name for name, count in _BUSY.get(workload or "", {}).items() if count and name != service}
    return OUT_OF_MEMORY[service] if others else None
