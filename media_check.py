"""Checks on downloaded inputs, run right after the download and before any GPU is used.

It owns the answer to "is this file really an image / an audio file we accept, and within
limits?": `check_image` decodes with Pillow (a fixed set of formats, pixel limit, decompression
bombs refused), `check_audio` probes with ffprobe (an audio stream, a container from a fixed set,
duration limit, no playlists that would make ffmpeg fetch other URLs). `ffprobe_json` is the one
place that runs ffprobe (`format_and_duration` is its short form); `run_tool` runs ffprobe and ffmpeg
(mediaconv.py holds the conversions); `run_isolated` runs a function in a child process, so that no
large input is ever decoded inside the worker's own memory. Errors (`MediaError`) name the field and
say what the file looked like ("got text/html"), so they can be shown to the client as they are.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

import netfetch
import storage
from config import Settings
from jobspec import CLONE_INPUT, INPUT_URLS, stored_result_name

FFPROBE_TIMEOUT_S = 30.0
DRAFT_SCALE = 8  # JPEG check: decode at 1/8 scale (DCT scaling); every byte is still decoded
# Decoded images larger than this (width x height x bands) are decoded in a child process when their
# format has no reduced decode: the worker's peak RSS stays bounded (issue 9: <= 150 MB over idle).
IN_PROCESS_DECODE_BYTES = 32 * 1024 * 1024
ISOLATED_TIMEOUT_S = 300.0
M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number (malloc.h)
SNIFF_BYTES = 4096
# Pillow decoders we accept (no EPS/PostScript: Pillow runs Ghostscript for those).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG also yields "MPO"
# ffprobe format_name parts we accept for audio inputs (never hls, concat, image or text demuxers).
AUDIO_CONTAINERS = frozenset(
    {"mp3", "wav", "w64", "ogg", "flac", "aac", "mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska",
     "webm", "aiff", "caf", "amr", "asf", "avi", "wv", "ape", "mpegts", "au"}
)  # fmt: skip


class MediaError(Exception):
    """A downloaded file is not what it should be; str() is a message fit for the client."""


class ToolKilled(Exception):
    """ffprobe or ffmpeg was ended by a signal (a stop of the worker's process group, the OOM killer):
    nothing is known about the file, so this is never reported as a bad input."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str  # Pillow's name: "PNG", "JPEG", ...


@dataclass(frozen=True)
class AudioInfo:
    duration_s: float
    codec: str  # of the first audio stream, e.g. "mp3", "aac", "pcm_s16le"
    format_name: str  # ffprobe's container name, e.g. "wav", "mov,mp4,m4a,3gp,3g2,mj2"
    has_video: bool  # a real video stream (cover art pictures do not count)


# --- sniffing -----------------------------------------------------------------------------------

_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
    (0, b"%PDF-", "application/pdf"),
    (0, b"ID3", "audio/mpeg"),
    (0, b"OggS", "audio/ogg"),
    (0, b"fLaC", "audio/flac"),
    (0, b"\x1aE\xdf\xa3", "video/webm or matroska"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"\x7fELF", "an executable"),
    (0, b"MZ", "an executable"),
    (0, b"#EXTM3U", "a playlist (m3u)"),
    (0, b"ffconcat", "a playlist (ffconcat)"),
)


def sniff(head: bytes) -> str:
    """A short description of what the first bytes of a file look like ("text/html", "image/png",
    "video/mp4", "unknown data", ...), for error messages."""
    if not head:
        return "an empty file"
    for offset, magic, label in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return label
    if head[:4] == b"RIFF" and len(head) >= 12:
        kind = head[8:12]
        return {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/avi"}.get(kind, "a RIFF file")
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "audio/aiff"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"avif"):
            return "image/heif or avif"
        return "audio/mp4" if brand.startswith(b"M4A") else "video/mp4"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xF6) == 0xF0:
        return "audio/aac"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:
        return "audio/mpeg"
    if head[:2] == b"BM" and len(head) >= 14:
        return "image/bmp"
    return _sniff_text(head)


def _sniff_text(head: bytes) -> str:
    for bom, codec in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if head.startswith(bom):
            head = head[len(bom) :].decode(codec, errors="ignore").encode("utf-8")
            break
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            return "unknown data"
        text = head[: exc.start].decode("utf-8")
    if any(ord(ch) < 0x20 and ch not in "\t\n\r\f" for ch in text):
        return "unknown data"
    start = text.lstrip().lower()
    if start.startswith(("<!doctype html", "<html", "<head", "<body")) or "<html" in start[:1024]:
        return "text/html"
    if "<svg" in start[:1024]:
        return "image/svg+xml"
    if start.startswith("<?xml") or start.startswith("<"):
        return "application/xml"
    if start.startswith(("{", "[")):
        return "application/json"
    if start.startswith("#extm3u"):
        return "a playlist (m3u)"
    return "text/plain"


def _sniff_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sniff(f.read(SNIFF_BYTES))


# --- ffprobe --------------------------------------------------------------------------------------


def run_tool(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ffprobe or ffmpeg (command[0]) and return how it ended. Raises MediaError when it took longer
    than timeout or is not installed, ToolKilled when a signal ended it; a non-zero exit is the caller's."""
    name = command[0]
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise MediaError(f"{name} took longer than {timeout:g} s") from None
    except OSError:
        raise MediaError(f"{name} is not installed") from None
    if done.returncode < 0:
        raise ToolKilled(f"{name} was stopped by signal {-done.returncode}")
    return done


def ffprobe_json(path: Path | str, *, timeout: float = FFPROBE_TIMEOUT_S) -> dict:
    """ffprobe's JSON (format and streams) for a local file. Only the file protocol is allowed,
    so a playlist inside the file cannot make ffprobe fetch anything. Raises MediaError."""
    target = Path(path).resolve()
    command = [
        "ffprobe", "-v", "error", "-hide_banner",
        "-protocol_whitelist", "file",
        "-print_format", "json", "-show_format", "-show_streams",
        f"file:{target}",
    ]  # fmt: skip
    done = run_tool(command, timeout)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise MediaError(f"ffprobe could not read the file: {lines[-1] if lines else 'no details'}")
    try:
        data = json.loads(done.stdout or "{}")
    except ValueError:
        raise MediaError("ffprobe gave unreadable output") from None
    if not isinstance(data, dict):
        raise MediaError("ffprobe gave unreadable output")
    return data


def format_and_duration(path: Path | str) -> tuple[str, float | None]:
    """(ffprobe format_name, duration in seconds or None) of a local media file; ("", None) when ffprobe
    cannot read it."""
    try:
        fmt = ffprobe_json(path).get("format") or {}
    except MediaError:
        return "", None
    return str(fmt.get("format_name", "")), _seconds(fmt.get("duration"))


# --- images ---------------------------------------------------------------------------------------


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:g}"


def check_image(path: Path | str, *, field: str, max_pixels: int) -> ImageInfo:
    """Make sure `path` is an image Pillow decodes fully, of at most `max_pixels` pixels."""
    path = Path(path)
    too_big = f"{field}: image is too large (the limit is {_megapixels(max_pixels)} megapixels)"
    try:
        with warnings.catch_warnings():
            # Our own max_pixels decides (below); Pillow's global limit only warns, or raises
            # DecompressionBombError for images over twice its limit (about 179 megapixels).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                width, height = im.size
                fmt = im.format or "unknown"
                if width <= 0 or height <= 0:
                    raise MediaError(f"{field}: image has no pixels ({width}x{height})")
                if width * height > max_pixels:
                    raise MediaError(
                        f"{field}: image is {width}x{height} pixels; the limit is "
                        f"{_megapixels(max_pixels)} megapixels"
                    )
                im.verify()
            with Image.open(path, formats=IMAGE_FORMATS) as im:  # verify() leaves it unusable
                # JPEG: decode every scan, but at 1/8 scale (draft mode), so a 40 MP photo costs about
                # 2 MB here instead of 120 MB. Other formats have no reduced decode: a large one is
                # decoded in a child process, whose memory goes back to the system when it exits.
                im.draft(im.mode, (-(-width // DRAFT_SCALE), -(-height // DRAFT_SCALE)))
                if im.format == "JPEG" or decoded_bytes(im) <= IN_PROCESS_DECODE_BYTES:
                    im.load()
                else:
                    run_isolated(decode_image, str(path))
    except Image.DecompressionBombError:
        raise MediaError(too_big) from None
    except IsolatedError as exc:
        raise MediaError(f"{field}: image could not be decoded ({_sniff_file(path)}: {exc})") from None
    except UnidentifiedImageError:
        raise MediaError(f"{field}: not an image (got {_describe_non_image(path)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise MediaError(f"{field}: image could not be decoded ({_sniff_file(path)}: {exc})") from None
    return ImageInfo(width=width, height=height, format=fmt)


def return_large_frees() -> None:
    """Make glibc give large freed blocks (>= 1 MiB: decoded images, big buffers) back to the system.

    By default glibc raises its mmap threshold after such a free, so the next large blocks come from
    the heap and stay resident after the job (about 16 MB after a 40 MP JPEG). Called once by the
    worker at start; a no-op where glibc is not the C library.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1024 * 1024)
    except (OSError, AttributeError):
        pass


def decoded_bytes(im: Image.Image) -> int:
    """Bytes of an opened image once decoded at its current (possibly draft) size."""
    return im.width * im.height * len(im.getbands())


def decode_image(path: str) -> list[int]:
    """Decode an image fully (run in a child process by check_image for large non-JPEG images)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            im.load()
            return list(im.size)


class IsolatedError(Exception):
    """A function run by run_isolated failed; str() is its message."""


def run_isolated(function: Callable[..., Any], *args: Any, error: type[Exception] = IsolatedError,
                 **kwargs: Any) -> Any:
    """Run function(*args, **kwargs) in a fresh Python process; return its result (JSON).

    For work whose memory must not stay in the worker (a full-size image decode): the child's memory
    goes back to the system when it exits. The child imports the function by its module and name, so it
    must be a top-level function of a module beside this one. A failure is raised here as `error` with
    the child's message.
    """
    code = (
        "import importlib, json, sys\n"
        "call = json.loads(sys.argv[1])\n"
        "f = getattr(importlib.import_module(call['module']), call['function'])\n"
        "try:\n"
        "    result = f(*call['args'], **call['kwargs'])\n"
        "except Exception as exc:\n"
        "    print(json.dumps({'error': str(exc) or type(exc).__name__})); sys.exit(1)\n"
        "print(json.dumps({'result': result}))\n"
    )
    call = json.dumps({"module": function.__module__, "function": function.__name__, "args": list(args),
                       "kwargs": kwargs})
    here = str(Path(__file__).resolve().parent)
    try:
        done = subprocess.run([sys.executable, "-c", code, call], capture_output=True, text=True, cwd=here,
                              timeout=ISOLATED_TIMEOUT_S, check=False)
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        raise error(f"took longer than {ISOLATED_TIMEOUT_S:g} s") from None
    except (OSError, ValueError, IndexError):
        raise error("the child process gave no answer") from None
    if "error" in answer:
        raise error(answer["error"])
    return answer["result"]


def _describe_non_image(path: Path) -> str:
    label = _sniff_file(path)
    if label.startswith("image/"):
        return f"{label}, a format that is not accepted"
    if label == "unknown data":
        try:
            probe = ffprobe_json(path, timeout=10)
        except MediaError:
            return label
        kinds = {s.get("codec_type") for s in probe.get("streams", [])}
        if kinds & {"audio", "video"}:
            return f"an audio/video file ({probe.get('format', {}).get('format_name', '?')})"
    return label


# --- audio ----------------------------------------------------------------------------------------


def _seconds(raw: object) -> float | None:
    """An ffprobe duration ("12.5", "N/A", missing) in seconds, None when it gives none."""
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if value == value and value >= 0 else None  # not NaN


def _duration(probe: dict, stream: dict) -> float | None:
    """The container's duration, else the stream's."""
    for raw in (probe.get("format", {}).get("duration"), stream.get("duration")):
        if (value := _seconds(raw)) is not None:
            return value
    return None


def check_audio(path: Path | str, *, field: str, max_seconds: float) -> AudioInfo:
    """Make sure `path` holds an audio stream in an accepted container, at most `max_seconds` long.
    A video with sound passes (has_video=True); a video without sound does not."""
    path = Path(path)
    label = _sniff_file(path)
    if label.startswith(("text/", "application/", "image/", "a playlist", "an ")):
        # Text never reaches ffprobe: playlists and concat lists are text.
        raise MediaError(f"{field}: not an audio file (got {label})")
    try:
        probe = ffprobe_json(path)
    except MediaError:
        raise MediaError(f"{field}: not an audio file (got {label})") from None
    format_name = str(probe.get("format", {}).get("format_name", ""))
    if not set(format_name.split(",")) & AUDIO_CONTAINERS:
        raise MediaError(f"{field}: not an audio file (got {format_name or label})")
    streams = [s for s in probe.get("streams", []) if isinstance(s, dict)]
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    if not audio:
        raise MediaError(f"{field}: not an audio file (the file has no audio stream)")
    has_video = any(
        s.get("codec_type") == "video" and not (s.get("disposition") or {}).get("attached_pic")
        for s in streams
    )
    duration = _duration(probe, audio[0])
    if duration is None:
        raise MediaError(f"{field}: could not tell how long the audio is")
    if duration > max_seconds:
        raise MediaError(f"{field}: audio is {duration:.1f} s long; the limit is {max_seconds:g} s")
    return AudioInfo(
        duration_s=duration,
        codec=str(audio[0].get("codec_name", "unknown")),
        format_name=format_name,
        has_video=has_video,
    )


def fetch_inputs(settings: Settings, job_type: str, params: dict[str, Any], job_id: str,
                 work_dir: Path) -> dict[str, Path]:
    """Download a job's input URLs (jobspec.INPUT_URLS) into work_dir and check each, before any GPU time
    is spent; the local files by role ("audio", "image", "reference_audio"). An earlier pipeline step's
    result (jobspec.STORED_RESULT_PREFIX) is read from the result storage instead, and checked the same."""
    wanted = list(INPUT_URLS.get(job_type, ()))
    if job_type == "csm" and params.get("voice") == "clone":
        wanted.append(CLONE_INPUT)
    inputs: dict[str, Path] = {}
    for role, name, kind in wanted:
        dest = work_dir / f"{job_id}_download_{role}"
        stored = stored_result_name(params[name])
        if stored is not None:  # an earlier pipeline step's result: read where it is stored, not fetched
            storage.fetch_result(settings, stored, dest, field=name)
        else:
            netfetch.download(params[name], dest, field=name, max_bytes=settings.max_input_bytes,
                              allowlist=settings.url_allowlist, total_timeout=settings.download_timeout_s)
        if kind == "image":
            check_image(dest, field=name, max_pixels=settings.max_image_pixels)
        else:
            check_audio(dest, field=name, max_seconds=settings.max_audio_seconds)
        inputs[role] = dest
    return inputs
