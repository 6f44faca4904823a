"""Dev node ComfyUI stand-in: ComfyUI's HTTP and websocket API for the SONIC portrait workflow.

This package of modules owns everything a media:fast node's ComfyUI does in the dev node
(docs/node-protocols.md, ComfyUI and SONIC): this module the routes (uploads, /prompt, /queue,
/interrupt, /history, /view, /object_info, the websocket); `comfy_state` the per-workload state;
`comfy_nodes` the node signatures and validation; `comfy_render` running a prompt. State is kept per
workload id (``scope["devnode_workload"]``, set by the dev node core when it mounts this app under
``/nodes/<workload>/comfyui``; "default" when absent): files live under
``data_dir/<workload>/{input,output,temp}/`` and each workload has its own queue, history, websocket
clients and one worker thread, so one workload runs one prompt at a time, like a real node.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import mimetypes
import os
import platform
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile

from devnode.comfy_nodes import _node_error, _object_info, create_model_files, validate_prompt
from devnode.comfy_render import _ensure_worker, _interrupt
from devnode.comfy_state import (
    UPLOAD_TYPES,
    Client,
    Task,
    Workload,
    _annotated,
    _broadcast_status,
    _client,
    _get_workload,
    _inside,
    _queue_info,
)

log = logging.getLogger("devnode.comfy")

DEFAULT_MAX_UPLOAD_MB = 100.0  # ComfyUI's --max-upload-size default


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


def max_upload_bytes() -> int:
    """ComfyUI's --max-upload-size (MiB, default 100): DEVNODE_COMFY_MAX_UPLOAD_MB, read per request."""
    try:
        megabytes = float(os.environ.get("DEVNODE_COMFY_MAX_UPLOAD_MB", "") or DEFAULT_MAX_UPLOAD_MB)
    except ValueError:
        megabytes = DEFAULT_MAX_UPLOAD_MB
    return int(megabytes * 1024 * 1024)


# --- routes: plain module-level handlers on one router (served at / and under /api) ------------

router = APIRouter()


def workload_of(connection: Request | WebSocket) -> Workload:
    """The workload a request is for (its state and folders, made on first use)."""
    state = connection.app.state
    return _get_workload(state.comfy_workloads, state.comfy_lock, state.comfy_data_dir, connection.scope)


async def _json_or_empty(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return {}


@router.get("/system_stats")
async def system_stats() -> dict:
    return _system_stats()


@router.get("/object_info")
async def object_info(request: Request) -> dict:
    return _object_info(workload_of(request))


@router.post("/upload/image")
async def upload_image(request: Request) -> Response:
    wl = workload_of(request)
    limit = max_upload_bytes()
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else len(await request.body())
    if size > limit:  # what aiohttp answers for a body over ComfyUI's --max-upload-size
        return PlainTextResponse(
            f"Maximum request body size {limit} exceeded, actual body size {size}", status_code=413
        )
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
    name = await asyncio.to_thread(_save_upload, folder, filename, data, overwrite)
    return JSONResponse({"name": name, "subfolder": subfolder, "type": kind})


def _save_upload(folder: Path, filename: str, data: bytes, overwrite: bool) -> str:
    """Write an upload as ComfyUI does: without overwrite, the same content keeps its name and other
    content gets "name (1).png", "name (2).png"...; the name it was saved under."""
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = os.path.splitext(filename)
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
    body = await _json_or_empty(request)
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
    body = await _json_or_empty(request)
    with wl.cond:
        if isinstance(body, dict) and body.get("clear"):
            wl.history.clear()
        if isinstance(body, dict) and isinstance(body.get("delete"), list):
            for prompt_id in body["delete"]:
                wl.history.pop(str(prompt_id), None)
    return Response(status_code=200)


@router.get("/view")
async def view(request: Request, filename: str = "", subfolder: str = "", type: str = "output") -> Response:
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
    return FileResponse(path, media_type=media_type, headers={"Content-Disposition": f'filename="{path.name}"'})


@router.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    wl = workload_of(websocket)
    await websocket.accept()
    sid = websocket.query_params.get("clientId") or uuid.uuid4().hex
    client = _join(wl, sid)

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
        _leave(wl, sid, client)


def _join(wl: Workload, sid: str) -> Client:
    """A new websocket client of `sid`, its first messages queued: the status, and what runs now when
    the running prompt is this client's (a reconnect learns where its prompt is)."""
    client = Client(asyncio.Queue(), asyncio.get_running_loop())
    client.queue.put_nowait(json.dumps({"type": "status", "data": {"status": _queue_info(wl), "sid": sid}}))
    with wl.cond:
        running = wl.running
        if running is not None and _client(running) == sid and wl.last_node is not None:
            event = {"node": wl.last_node, "display_node": wl.last_node, "prompt_id": running.prompt_id}
            client.queue.put_nowait(json.dumps({"type": "executing", "data": event}))
        wl.clients.setdefault(sid, []).append(client)
    return client


def _leave(wl: Workload, sid: str, client: Client) -> None:
    with wl.cond:
        group = wl.clients.get(sid, [])
        if client in group:
            group.remove(client)
        if not group:
            wl.clients.pop(sid, None)


def create_app(data_dir: Path) -> FastAPI:
    """The ComfyUI stand-in; serves every workload, keeping each one's files under data_dir/<workload>/."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    create_model_files(data_dir / "models")
    app = FastAPI(
        title="c3-render dev node: ComfyUI stand-in", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.comfy_workloads = {}
    app.state.comfy_lock = threading.Lock()
    app.state.comfy_data_dir = data_dir
    app.include_router(router)
    app.include_router(router, prefix="/api")  # ComfyUI serves every route under /api as well
    return app
