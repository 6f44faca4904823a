"""Dev node vision stand-in: Ollama's generate API answering with a factual image report.

This module owns the dev node's "vision model" (docs/node-protocols.md, Ollama): ``POST /api/generate`` with
Ollama's request and answer shapes, plus ``GET /api/tags``, ``GET /api/version`` and ``GET /``.
There is no language model here. The answer is a report computed on the CPU with OpenCV and NumPy:
size and format, faces (OpenCV's Haar cascade; with an OpenCV build that lacks it, scikit-image's LBP
cascade when installed), dominant colours (k-means), brightness (mean luma) and sharpness (variance
of the Laplacian). The first line of every answer says so; the prompt is echoed, never answered.
Faults: ``faults.engine_fault("ollama")`` "error" answers 500, "hang" holds the request (checked every
quarter second) until the fault is cleared (then it answers normally), or answers 500 when the node is
gone, the dev node shuts down or HANG_LIMIT_S (10 min) passes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from devnode import faults

DEFAULT_MODEL = "llama3.2-vision:11b"
HANG_LIMIT_S = faults.HANG_LIMIT_S
HANG_STEP_S = 0.25
MAX_ANALYSIS_SIDE = 1024  # larger images are scaled down before detection (positions are scaled back)
PROMPT_ECHO_CHARS = 300

# Named colours for the dominant-colour report (sRGB).
COLOUR_NAMES: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "dark grey": (64, 64, 64),
    "grey": (128, 128, 128),
    "light grey": (192, 192, 192),
    "white": (255, 255, 255),
    "red": (200, 30, 30),
    "dark red": (120, 20, 20),
    "orange": (240, 140, 30),
    "brown": (120, 75, 40),
    "beige": (225, 200, 160),
    "skin tone": (210, 160, 130),
    "yellow": (240, 220, 40),
    "olive": (120, 120, 40),
    "green": (40, 160, 60),
    "dark green": (20, 80, 30),
    "teal": (30, 130, 130),
    "cyan": (60, 210, 220),
    "light blue": (140, 190, 240),
    "blue": (40, 80, 200),
    "navy": (20, 30, 90),
    "purple": (120, 50, 150),
    "pink": (240, 150, 180),
    "magenta": (210, 40, 170),
}


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _normalise_model(name: str) -> str:
    name = name.strip()
    return name if ":" in name else f"{name}:latest"


# --- analysis -------------------------------------------------------------------------------


_DETECTORS = threading.local()


def _face_detector() -> tuple[str, Any]:
    """This thread's (description, detector), loaded once per thread: a cascade keeps scratch buffers
    sized for the last image, so one shared cascade used by concurrent requests with images of different
    sizes failed OpenCV assertions or crashed the process."""
    if not hasattr(_DETECTORS, "value"):
        _DETECTORS.value = _load_face_detector()
    return _DETECTORS.value


def _load_face_detector() -> tuple[str, Any]:
    """(description, detector). OpenCV's Haar cascade when this OpenCV has it, else scikit-image's LBP."""
    if hasattr(cv2, "CascadeClassifier") and hasattr(cv2, "data"):
        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        if os.path.isfile(path):
            cascade = cv2.CascadeClassifier(path)
            if not cascade.empty():
                return "OpenCV Haar cascade haarcascade_frontalface_default", ("haar", cascade)
    try:
        from skimage import data as sk_data
        from skimage.feature import Cascade
    except ImportError:
        return "no face detector available in this OpenCV build", ("none", None)
    cascade = Cascade(sk_data.lbp_frontal_face_cascade_filename())
    note = f"scikit-image LBP frontal-face cascade; OpenCV {cv2.__version__} has no Haar cascades"
    return note, ("lbp", cascade)


def detect_faces(gray: np.ndarray) -> tuple[list[tuple[int, int, int, int]], str]:
    """Frontal faces in a grayscale uint8 image as (x, y, w, h), largest first; and the detector used."""
    description, (kind, detector) = _face_detector()
    height, width = gray.shape[:2]
    scale = min(1.0, MAX_ANALYSIS_SIDE / max(height, width))
    small = cv2.resize(gray, (round(width * scale), round(height * scale))) if scale < 1.0 else gray
    min_side = max(30, min(small.shape[:2]) // 12)
    boxes: list[tuple[int, int, int, int]] = []
    if kind == "haar":
        found = detector.detectMultiScale(
            cv2.equalizeHist(small), scaleFactor=1.1, minNeighbors=6, minSize=(min_side, min_side)
        )
        boxes = [tuple(int(v) for v in box) for box in found]
    elif kind == "lbp":
        found = detector.detect_multi_scale(
            img=small.astype(np.float32) / 255.0,
            scale_factor=1.2,
            step_ratio=1,
            min_size=(min_side, min_side),
            max_size=small.shape[:2],
            min_neighbor_number=8,
        )
        boxes = [(int(f["c"]), int(f["r"]), int(f["width"]), int(f["height"])) for f in found]
    boxes = [tuple(round(v / scale) for v in box) for box in boxes]
    boxes.sort(key=lambda b: b[2] * b[3], reverse=True)
    return boxes, description


def _colour_name(rgb: np.ndarray) -> str:
    names = list(COLOUR_NAMES)
    palette = np.array([COLOUR_NAMES[n] for n in names], dtype=np.uint8).reshape(-1, 1, 3)
    palette_lab = cv2.cvtColor(palette, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    lab = cv2.cvtColor(rgb.astype(np.uint8).reshape(1, 1, 3), cv2.COLOR_RGB2LAB).reshape(3).astype(np.float32)
    return names[int(np.argmin(((palette_lab - lab) ** 2).sum(axis=1)))]


def dominant_colours(rgb: np.ndarray, k: int = 5) -> list[tuple[str, str, float]]:
    """(name, hex, share) of the k-means colour clusters of an RGB image, largest share first."""
    small = cv2.resize(rgb, (96, 96), interpolation=cv2.INTER_AREA) if max(rgb.shape[:2]) > 96 else rgb
    pixels = small.reshape(-1, 3).astype(np.float32)
    k = max(1, min(k, len(np.unique(pixels, axis=0))))
    cv2.setRNGSeed(12345)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1.0)
    _, labels, centres = cv2.kmeans(pixels, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    counts = np.bincount(labels.reshape(-1), minlength=k)
    result = []
    for index in np.argsort(-counts):
        centre = np.clip(centres[index], 0, 255).round().astype(np.uint8)
        hex_code = "#{:02x}{:02x}{:02x}".format(*(int(c) for c in centre))
        result.append((_colour_name(centre), hex_code, float(counts[index]) / float(counts.sum())))
    return result


def _brightness_word(luma: float) -> str:
    if luma < 60:
        return "dark"
    if luma < 110:
        return "dim"
    if luma < 170:
        return "medium"
    return "bright"


def _sharpness_word(variance: float) -> str:
    if variance < 20:
        return "very blurry or flat"
    if variance < 100:
        return "soft"
    if variance < 500:
        return "moderately sharp"
    return "sharp"


def analyse_image(data: bytes, index: int = 1) -> list[str]:
    """Report lines for one encoded image; raises ValueError when it is not a decodable image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "unknown"
            mode = img.mode
            frames = getattr(img, "n_frames", 1)
            img.load()
            if img.mode in ("RGBA", "LA", "P"):
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                background.alpha_composite(img.convert("RGBA"))
                rgb_img = background.convert("RGB")
            else:
                rgb_img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"image {index} is not a decodable image: {exc}") from None
    rgb = np.asarray(rgb_img)
    height, width = rgb.shape[:2]
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    faces, detector = detect_faces(gray)
    luma = float(gray.mean())
    sharpness = float(cv2.Laplacian(gray, cv2.CV_64F).var())
    size_line = f"Image {index}: {width}x{height} pixels, {fmt}, mode {mode}"
    if frames > 1:
        size_line += f", {frames} frames (first analysed)"
    noun = "face" if len(faces) == 1 else "faces"
    lines = [size_line, f"Faces: {len(faces)} {noun} found ({detector})"]
    for number, (x, y, w, h) in enumerate(faces, start=1):
        lines.append(f"  face {number}: x={x}, y={y}, w={w}, h={h}")
    colours = ", ".join(f"{name} {hex_code} ({share:.0%})" for name, hex_code, share in dominant_colours(rgb))
    lines.append(f"Dominant colours: {colours}")
    lines.append(f"Brightness: mean luma {luma:.1f} of 255 ({_brightness_word(luma)})")
    lines.append(f"Sharpness: variance of Laplacian {sharpness:.1f} ({_sharpness_word(sharpness)})")
    return lines


def build_report(prompt: str, images: list[bytes]) -> str:
    lines = [
        f"c3-render dev node image report (OpenCV {cv2.__version__} on CPU, not a vision-language model)"
    ]
    echo = prompt.strip().replace("\n", " ")
    if len(echo) > PROMPT_ECHO_CHARS:
        echo = echo[:PROMPT_ECHO_CHARS] + "..."
    lines.append(f"Prompt: {echo!r} (received; this report does not answer it)")
    for index, data in enumerate(images, start=1):
        lines.extend(analyse_image(data, index))
    return "\n".join(lines)


def decode_images(raw: Any) -> list[bytes]:
    """The base64 images of a request; raises ValueError with Ollama-like messages."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("images are required: this dev node only analyses images")
    decoded = []
    for index, item in enumerate(raw, start=1):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"image {index} is not a base64 string")
        text = item.strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            decoded.append(base64.b64decode("".join(text.split()), validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"illegal base64 data in image {index}: {exc}") from None
    return decoded


# --- HTTP -----------------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _wait_out_hang(workload: str | None) -> bool:
    """Hold while the "hang" fault is set; False when the node is gone, shutdown or the limit came first."""
    started = time.monotonic()
    while faults.engine_fault("ollama") == "hang":
        if time.monotonic() - started >= HANG_LIMIT_S or faults._should_stop(workload):
            return False
        await asyncio.sleep(HANG_STEP_S)
    return True


# --- routes: plain module-level handlers; the served model is the app's (app.state.ollama_model) --

routes = APIRouter()


@routes.get("/")
async def root() -> Response:
    return PlainTextResponse("Ollama is running")


@routes.get("/api/version")
async def version() -> dict:
    return {"version": "0.0.0-c3-render-devnode"}


@routes.get("/api/tags")
async def tags(request: Request) -> dict:
    served = request.app.state.ollama_model
    family = served.split(":", 1)[0]
    return {
        "models": [
            {
                "name": served,
                "model": served,
                "modified_at": _now_rfc3339(),
                "size": 0,
                "digest": "0" * 64,
                "details": {
                    "format": "none",
                    "family": family,
                    "families": [family],
                    "parameter_size": "0 (dev node: OpenCV report, no model)",
                    "quantization_level": "none",
                },
            }
        ]
    }


@routes.post("/api/generate")
async def generate(request: Request) -> Response:
    started = time.monotonic_ns()
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "invalid JSON body")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name.strip():
        return _error(400, "model is required")
    if _normalise_model(name) != request.app.state.ollama_model:
        return _error(404, f'model "{name}" not found, try pulling it first')
    prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
    try:
        images = decode_images(body.get("images"))
    except ValueError as exc:
        return _error(400, str(exc))
    fault = faults.engine_fault("ollama")
    if fault == "hang" and not await _wait_out_hang(faults.workload_of(request)):
        return _error(500, "dev node fault injection: the engine hung and gave up")
    if faults.engine_fault("ollama") == "error":
        return _error(500, "dev node fault injection: ollama engine_error is set")
    try:
        text = await run_in_threadpool(build_report, prompt, images)
    except ValueError as exc:
        return _error(400, str(exc))
    final = _final_record(name, prompt, text, time.monotonic_ns() - started)
    if body.get("stream", True) is False:
        return JSONResponse(final)
    return StreamingResponse(_ndjson(final), media_type="application/x-ndjson")


def _final_record(name: str, prompt: str, text: str, total_ns: int) -> dict[str, Any]:
    """Ollama's final generate record (done: true) with its counts and durations."""
    return {
        "model": name,
        "created_at": _now_rfc3339(),
        "response": text,
        "done": True,
        "done_reason": "stop",
        "context": [],
        "total_duration": total_ns,
        "load_duration": 0,
        "prompt_eval_count": len(prompt.split()),
        "prompt_eval_duration": 0,
        "eval_count": len(text.split()),
        "eval_duration": total_ns,
    }


def _ndjson(final: dict[str, Any]) -> Iterator[bytes]:
    """Ollama streams by default: one chunk with the whole text, then the final record without it."""
    chunk = {"model": final["model"], "created_at": final["created_at"], "response": final["response"],
             "done": False}
    yield (json.dumps(chunk) + "\n").encode()
    yield (json.dumps({**final, "response": ""}) + "\n").encode()


def create_app(model: str | None = None) -> FastAPI:
    """The Ollama stand-in. Serves `model` (default: $DEVNODE_OLLAMA_MODEL or llama3.2-vision:11b)."""
    app = FastAPI(
        title="c3-render dev node: Ollama stand-in", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.ollama_model = _normalise_model(model or os.environ.get("DEVNODE_OLLAMA_MODEL") or DEFAULT_MODEL)
    app.include_router(routes)
    return app
