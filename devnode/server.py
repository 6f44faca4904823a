"""The dev node's HTTP server: a local stand-in for Comput3.ai and its media:fast and ollama_webui:fast nodes.

This module owns
- the Comput3 control API at `/api/v0` (launch, workloads, stop, types; docs/node-protocols.md, Comput3 control API),
- the node table (`NODES`) and each node's life: booting (503), running, then stopped / expired /
  dead (404, gone from the workloads list),
- the node router, an ASGI wrapper that serves `/nodes/<workload>/...` after checking the node state
  and the `X-C3-API-KEY` header: a media:fast node from the CSM and WhisperX Gradio apps and the
  ComfyUI stand-in, an ollama_webui:fast node from the Ollama stand-in at its root,
- the admin routes for tests (`/admin/faults`, `/admin/reset`, `/admin/nodes`, `/admin/requests`:
  requests counted per control route and per node service; no key needed).

Node routing follows the ASGI convention Starlette and Gradio use: `scope["path"]` keeps the full
path and `scope["root_path"]` gains `/nodes/<workload>`; routing inside then sees `/csm/...` etc.
while `request.url` (which Gradio uses to build file URLs) still carries the prefix.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from devnode import faults

LOG = logging.getLogger("devnode")

MEDIA_TYPE = "media:fast"  # CSM, WhisperX and ComfyUI under one host
VISION_TYPE = "ollama_webui:fast"  # Ollama at the root of its host (docs/node-protocols.md, Node URLs)
WORKLOAD_TYPES = (MEDIA_TYPE, VISION_TYPE)
NODE_SERVICES = ("/csm", "/whisper", "/comfyui")
REQUESTS: dict[str, int] = {}  # "POST /api/v0/launch", "node GET /", "node /csm" ... -> count
_NODE_PATH = re.compile(r"^/nodes/([A-Za-z0-9_.-]+)(/.*)?$")
_LOCK = threading.Lock()

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


@dataclass
class Node:
    """One launched workload and its node."""

    workload: str
    node: str
    type: str
    created: float
    expires: float
    up_at: float  # end of boot
    dies_at: float | None  # from the node_dies_after_s fault captured at launch
    stopped_at: float | None = None


NODES: dict[str, Node] = {}


def boot_seconds() -> float:
    """How long a fresh node answers 503 (DEVNODE_BOOT_S, default 2 s)."""
    return float(os.environ.get("DEVNODE_BOOT_S", "2"))


def node_state(node: Node, now: float | None = None) -> str:
    """booting, running, stopped, expired or dead."""
    now = time.time() if now is None else now
    if node.stopped_at is not None:
        return "stopped"
    if now >= node.expires:
        return "expired"
    if node.dies_at is not None and now >= node.dies_at:
        return "dead"
    if now < node.up_at:
        return "booting"
    return "running"


def node_gone(workload: str) -> bool:
    """True when the node is unknown, stopped, expired or dead (what hung engines watch)."""
    with _LOCK:
        node = NODES.get(workload)
    return node is None or node_state(node) not in ("booting", "running")


def stop_all_nodes(reason: str) -> int:
    """Stop every live node; return how many were stopped."""
    now = time.time()
    count = 0
    with _LOCK:
        for node in NODES.values():
            if node_state(node, now) in ("booting", "running"):
                node.stopped_at = now
                count += 1
    LOG.info("stopped %d node(s): %s", count, reason)
    return count


def _check_key(request: Request) -> JSONResponse | None:
    return _key_error(request.headers.get("x-c3-api-key"))


def _key_error(key: str | None) -> JSONResponse | None:
    expected = os.environ.get("DEVNODE_API_KEY", "")
    if not key or (expected and key != expected):
        return JSONResponse({"error": "missing or invalid X-C3-API-KEY"}, status_code=401)
    return None


async def _json_body(request: Request) -> dict | JSONResponse:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return JSONResponse({"error": "body must be JSON"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
    return body


def _public(node: Node, now: float) -> dict:
    return {
        "workload": node.workload,
        "node": node.node,
        "type": node.type,
        "status": node_state(node, now),
        "created": int(node.created),
        "expires": int(node.expires),
    }


async def _keyed_body(request: Request) -> dict | JSONResponse:
    """The JSON object of a control API call, or the 401/400 answer (the key is checked first)."""
    if (error := _check_key(request)) is not None:
        return error
    return await _json_body(request)


# --- the Comput3 control API (/api/v0) ------------------------------------------------------

control_api = APIRouter(prefix="/api/v0")


@control_api.post("/launch")
async def launch(request: Request) -> Any:
    body = await _keyed_body(request)
    if isinstance(body, JSONResponse):
        return body
    if (failure := await _launch_failure()) is not None:
        return failure
    kind = body.get("type")
    if kind not in WORKLOAD_TYPES:
        return JSONResponse({"error": f"unknown workload type {kind!r}"}, status_code=400)
    now = time.time()
    try:
        expires = float(body.get("expires") or now + 3600)
    except (TypeError, ValueError):
        return JSONResponse({"error": "expires must be unix seconds"}, status_code=400)
    node = _add_node(kind, now, expires, f"{request.app.state.host}:{request.app.state.port}")
    LOG.info("launched %s (%s, expires in %.0f s)", node.workload, kind, expires - now)
    return await _launch_answer(node)


async def _launch_failure() -> Response | None:
    """The answer of a launch_failure fault, or None: a gateway timeout after 30 s, a proxy's HTML 502,
    or Comput3's own 500."""
    mode = faults.take_launch_failure()
    if mode is None:
        return None
    if mode == "timeout":
        await asyncio.sleep(30)
        return HTMLResponse("<html><body><h1>504 Gateway Time-out</h1></body></html>", status_code=504)
    if mode == "html":
        page = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body>"
        return HTMLResponse(page, status_code=502)
    return JSONResponse({"error": "dev node fault: launch failed"}, status_code=500)


def _add_node(kind: str, now: float, expires: float, address: str) -> Node:
    """A new node in the table: booting for boot_seconds(), dying later if node_dies_after_s is set."""
    workload = uuid.uuid4().hex[:16]
    up_at = now + boot_seconds()
    dies_after = faults.snapshot().get("node_dies_after_s")
    node = Node(
        workload=workload,
        node=f"{address}/nodes/{workload}",
        type=kind,
        created=now,
        expires=expires,
        up_at=up_at,
        dies_at=None if dies_after is None else up_at + float(dies_after),
    )
    with _LOCK:
        NODES[workload] = node
    return node


async def _launch_answer(node: Node) -> Any:
    """The launch's answer, late or lost when the faults say so (the node exists either way)."""
    # Both faults are decided when the launch arrives: a held answer whose caller is gone must not
    # take a "lost answer" meant for a later launch.
    lost = faults.take_launch_answer_lost()
    delay = float(faults.snapshot().get("launch_answer_delay_s") or 0)
    if delay > 0:
        await asyncio.sleep(delay)  # the node exists; the answer is late (or read by no one)
    if lost:
        LOG.info("launch answer for %s lost (fault): answering a gateway 504", node.workload)
        page = "<html><head><title>504 Gateway Time-out</title></head><body><h1>504 Gateway Time-out</h1></body>"
        return HTMLResponse(page, status_code=504)
    return {
        "workload": node.workload,
        "node": node.node,
        "type": node.type,
        "expires": int(node.expires),
        "created": int(node.created),
    }


@control_api.get("/types")
async def types(request: Request) -> Any:
    if (error := _check_key(request)) is not None:
        return error
    return list(WORKLOAD_TYPES)


@control_api.post("/workloads")
async def workloads(request: Request) -> Any:
    body = await _keyed_body(request)
    if isinstance(body, JSONResponse):
        return body
    now = time.time()
    with _LOCK:
        nodes = list(NODES.values())
    rows = [_public(node, now) for node in nodes]
    if body.get("running", True):
        rows = [row for row in rows if row["status"] in ("booting", "running")]
    return rows


@control_api.post("/stop")
async def stop(request: Request) -> Any:
    body = await _keyed_body(request)
    if isinstance(body, JSONResponse):
        return body
    workload = str(body.get("workload") or "")
    delay = float(faults.snapshot().get("stop_answer_delay_s") or 0)
    if delay > 0:
        await asyncio.sleep(delay)  # a slow provider: the stop takes effect when it answers
    now = time.time()
    with _LOCK:
        node = NODES.get(workload)
        if node is None or node_state(node, now) not in ("booting", "running"):
            return JSONResponse({"error": f"unknown workload {workload!r}"}, status_code=404)
        node.stopped_at = now
    LOG.info("stopped %s", workload)
    return {"stopped": int(now), "refund_amount": 0.0}


# --- test-only routes: fault switches and the node table --------------------------------------

admin_routes = APIRouter(prefix="/admin")


@admin_routes.get("/faults")
async def get_faults() -> dict:
    return faults.snapshot()


@admin_routes.post("/faults")
async def set_faults(request: Request) -> Any:
    body = await _json_body(request)
    if isinstance(body, JSONResponse):
        return body
    try:
        return faults.update(body)
    except ValueError as error:
        return JSONResponse({"error": str(error)}, status_code=400)


@admin_routes.post("/reset")
async def reset_faults() -> dict:
    return faults.reset()


@admin_routes.get("/requests")
async def request_counts() -> dict:
    with _LOCK:
        return dict(REQUESTS)


@admin_routes.get("/nodes")
async def list_nodes() -> list[dict]:
    now = time.time()
    with _LOCK:
        nodes = list(NODES.values())
    return [{**asdict(node), "state": node_state(node, now), "launched_at": node.created} for node in nodes]


def add_node_apps(app: FastAPI, data_dir: Path) -> None:
    """Mount what a media:fast node serves: health at `/`, CSM, WhisperX and the ComfyUI stand-in."""
    import gradio as gr

    from devnode import stt, tts

    @app.get("/")
    async def node_health(request: Request) -> dict:
        return {"status": "ok", "workload": request.scope.get("devnode_workload"), "services": NODE_SERVICES}

    gr.mount_gradio_app(app, tts.build_blocks(), path="/csm", footer_links=[], ssr_mode=False)
    gr.mount_gradio_app(app, stt.build_blocks(), path="/whisper", footer_links=[], ssr_mode=False)
    for mount, module_name, args in (("/comfyui", "devnode.comfy", (data_dir / "comfyui",)),):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            LOG.warning("%s is missing: %s not served", module_name, mount)
            continue
        if args:
            args[0].mkdir(parents=True, exist_ok=True)
        app.mount(mount, module.create_app(*args))


async def _send_json(send: Callable[[dict], Awaitable[None]], status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _refuse(scope: dict, send: Callable[[dict], Awaitable[None]], status: int, message: str) -> None:
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 4000 + status, "reason": message})
            return  # the server answers the handshake with 403
        payload = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": payload})
        return
    await _send_json(send, status, {"error": message})


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def vision_node_app() -> ASGIApp | None:
    """What an ollama_webui node serves at the root of its host: the Ollama stand-in."""
    try:
        from devnode import vision
    except ModuleNotFoundError as error:
        if error.name != "devnode.vision":
            raise
        LOG.warning("devnode.vision is missing: ollama_webui nodes serve nothing")
        return None
    return vision.create_app()


def _count(key: str) -> None:
    with _LOCK:
        REQUESTS[key] = REQUESTS.get(key, 0) + 1


def node_scope(scope: dict, prefix: str, workload: str, rest: str) -> dict:
    """The scope a node's own app sees: mounted at /nodes/<workload>; the bare node URL is its "/"."""
    child = dict(scope, root_path=prefix, devnode_workload=workload)
    if rest == "":
        child["path"] = prefix + "/"
        child["raw_path"] = child["path"].encode()
    return child


def node_router(app: ASGIApp, vision_app: ASGIApp | None = None) -> ASGIApp:
    """Wrap `app`: route `/nodes/<id>/...` to the node apps of the node's type (media:fast: `app`;
    ollama_webui: `vision_app` at the root); keep node apps off the top level."""

    async def router(
        scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]
    ) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await app(scope, receive, send)
        root_path = scope.get("root_path", "")
        path = scope["path"]
        route = path[len(root_path) :] if root_path and path.startswith(root_path) else path
        match = _NODE_PATH.match(route)
        if match is None:
            if route.startswith("/api/v0/"):
                _count(f"{scope.get('method', 'WS')} {route}")
            if route.startswith(("/api/v0/", "/admin/")):
                return await app(scope, receive, send)
            return await _refuse(scope, send, 404, "not found")
        workload, rest = match.group(1), match.group(2) or ""
        service = "/" + rest.strip("/").split("/", 1)[0] if rest.strip("/") else ""
        _count(f"node {scope.get('method', 'WS')} /" if not service else f"node {service}")
        with _LOCK:
            node = NODES.get(workload)
        state = node_state(node) if node is not None else "unknown"
        if state not in ("booting", "running"):
            return await _refuse(scope, send, 404, f"no such node ({state})")
        if (error := _key_error(_header(scope, b"x-c3-api-key"))) is not None:
            return await _refuse(scope, send, 401, json.loads(error.body)["error"])
        if state == "booting":
            return await _refuse(scope, send, 503, "node is booting")
        prefix = f"{root_path}/nodes/{workload}"
        if node is not None and node.type != MEDIA_TYPE:
            if vision_app is None:
                return await _refuse(scope, send, 404, "not found on node")
            return await vision_app(node_scope(scope, prefix, workload, rest), receive, send)
        if (
            rest not in ("", "/")
            and not rest.startswith(tuple(s + "/" for s in NODE_SERVICES))
            and rest not in NODE_SERVICES
        ):
            return await _refuse(scope, send, 404, "not found on node")
        warmup = float(faults.snapshot().get("comfyui_warmup_s") or 0)
        if service == "/comfyui" and node is not None and time.time() < node.up_at + warmup:
            return await _refuse(scope, send, 502, "Bad Gateway: ComfyUI is still starting")
        return await app(node_scope(scope, prefix, workload, rest), receive, send)

    return router


def create_app(host: str = "127.0.0.1", port: int = 8700, data_dir: Path | None = None) -> ASGIApp:
    """The whole dev node as one ASGI app (control API, admin routes, node router and node apps)."""
    faults.load_from_env()
    faults.set_node_gone_check(node_gone)
    data_dir = data_dir or Path(os.environ.get("DEVNODE_DATA_DIR") or Path.cwd() / "var" / "devnode")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        faults.SHUTDOWN.clear()
        LOG.info("dev node up on http://%s:%d (boot %.1f s)", host, port, boot_seconds())
        yield
        faults.SHUTDOWN.set()
        stop_all_nodes("dev node shutting down")

    app = FastAPI(title="c3-render dev node", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.host, app.state.port = host, port  # the node URLs launch answers are on this address
    app.include_router(control_api)
    app.include_router(admin_routes)
    add_node_apps(app, data_dir)
    return node_router(app, vision_node_app())
