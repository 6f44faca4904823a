"""Media conversions the worker makes before sending inputs to a node; ffmpeg and Pillow, file to file.

This module owns every conversion: `transcode_audio` and `decoded_seconds` (ffmpeg), the engines'
audio forms (`to_mp3`, `to_mono_wav`), `shrink_audio` (make audio fit an upload limit, e.g. ComfyUI's
100 MiB) and `prepare_image` (the upright RGB JPEG that analyze and portrait jobs send). ffmpeg reads
and writes files directly, so the worker never holds decoded audio in memory (a 10-minute 48 kHz stereo
WAV is 106 MiB on disk and more once decoded); a large image that has no reduced decode is prepared in
a child process (media_check.run_isolated). What a file is (ffprobe) and whether it is acceptable are
media_check's. Conversion failures are EngineError (to_mp3, to_mono_wav, prepare_image) or
media_check.MediaError, with a message fit for the client.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image, ImageOps

import media_check
from engine_api import EngineError

FFMPEG_TIMEOUT_S = 900.0  # a 600 s input at 96 kHz converts in well under a minute on one core
MAX_SAMPLE_RATE = 48_000  # nothing downstream keeps more (the portrait video's audio track is AAC)
MP3_BITRATE = "192k"  # mono speech at this rate is transparent; 10 minutes are 14 MB
UPLOAD_MARGIN_BYTES = 64 * 1024  # the multipart envelope around the file counts against the limit
MAX_INPUT_SIDE = 2048  # larger images are scaled down before upload
JPEG_QUALITIES = (95, 85, 70)  # tried in turn until the image fits the upload limit


# --- ffmpeg ---------------------------------------------------------------------------------------


def _run_ffmpeg(args: list[str], timeout: float) -> str:
    """Run ffmpeg (local files only); return its stdout. Raises MediaError with ffmpeg's last line."""
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-protocol_whitelist", "file,pipe", *args]
    done = media_check.run_tool(cmd, timeout)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise media_check.MediaError(lines[-1] if lines else f"ffmpeg exited with status {done.returncode}")
    return done.stdout


def transcode_audio(src: Path | str, dest: Path | str, *, codec: str, bitrate: str = "",
                    mono: bool = False, timeout: float = FFMPEG_TIMEOUT_S) -> Path:
    """Write the first audio stream of src to dest with `codec` ("libmp3lame", "pcm_s16le", ...), the
    sample rate kept, down-mixed to one channel when mono. ffmpeg streams file to file. Raises MediaError."""
    args = ["-y", "-i", str(src), "-map", "0:a:0", "-vn", "-sn", "-dn", "-map_metadata", "-1", "-c:a", codec]
    if bitrate:
        args += ["-b:a", bitrate]
    if mono:
        args += ["-ac", "1"]
    _run_ffmpeg([*args, str(dest)], timeout)
    return Path(dest)


def decoded_seconds(path: Path | str, *, timeout: float = FFMPEG_TIMEOUT_S) -> float:
    """How long the first audio stream plays, found by decoding it (for files whose headers do not say)."""
    out = _run_ffmpeg(["-i", str(path), "-map", "0:a:0", "-f", "null", "-progress", "pipe:1", "-"], timeout)
    micros = [line.split("=", 1)[1] for line in out.splitlines() if line.startswith("out_time_us=")]
    try:
        return max(0, int(micros[-1])) / 1e6
    except (IndexError, ValueError):
        raise media_check.MediaError("could not tell how long the audio is") from None


# --- the engines' audio forms ---------------------------------------------------------------------


def is_mp3(path: Path) -> bool:
    return media_check.format_and_duration(path)[0] == "mp3"


def to_mp3(src: Path, dest: Path, mono: bool = False) -> Path:
    """Write src as MP3 at dest (copy when it already is MP3 and no change is asked)."""
    if not mono and is_mp3(src):
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
        return dest
    try:
        return transcode_audio(src, dest, codec="libmp3lame", bitrate=MP3_BITRATE, mono=mono)
    except media_check.MediaError as exc:
        raise EngineError(f"could not convert {src.name} to MP3: {exc}") from exc


def to_mono_wav(src: Path, dest: Path) -> Path:
    """Mono WAV copy of src: voice cloning works best with one channel (docs/node-protocols.md, CSM)."""
    try:
        return transcode_audio(src, dest, codec="pcm_s16le", mono=True)
    except media_check.MediaError as exc:
        raise EngineError(f"could not read the reference audio: {exc}") from exc


# --- fitting an upload limit ----------------------------------------------------------------------


def fits(path: Path, max_bytes: int) -> bool:
    """Whether the file, wrapped in a multipart upload, stays within max_bytes."""
    return path.stat().st_size + UPLOAD_MARGIN_BYTES <= max_bytes


def shrink_audio(src: Path, dest_stem: Path, max_bytes: int, sample_rate: int = MAX_SAMPLE_RATE) -> Path:
    """An audio file that fits max_bytes: src itself when it does, else a mono copy next to dest_stem.

    Tries lossless FLAC first (mono, at src's rate capped at sample_rate), then MP3 (mono, 192 kbit/s);
    returns the first that fits (dest_stem.flac or dest_stem.mp3). Raises MediaError when neither
    fits or ffmpeg fails.
    """
    if fits(src, max_bytes):
        return src
    rate = _rate_args(src, sample_rate)
    attempts = (
        (dest_stem.with_suffix(".flac"), ["-c:a", "flac"]),
        (dest_stem.with_suffix(".mp3"), ["-c:a", "libmp3lame", "-b:a", MP3_BITRATE]),
    )
    for dest, codec in attempts:
        _run_ffmpeg(["-y", "-i", str(src), "-vn", "-map", "0:a:0", "-ac", "1", *rate, *codec, str(dest)],
                    FFMPEG_TIMEOUT_S)
        if fits(dest, max_bytes):
            return dest
        dest.unlink(missing_ok=True)
    raise media_check.MediaError(f"{src.name} does not fit in {max_bytes} bytes even as mono MP3")


def _rate_args(src: Path, cap: int) -> list[str]:
    """-ar cap when src's rate is above it (or unknown), else nothing (keep the rate)."""
    try:
        streams = media_check.ffprobe_json(src).get("streams") or []
        rate = int(next(s for s in streams if s.get("codec_type") == "audio")["sample_rate"])
    except (media_check.MediaError, StopIteration, KeyError, TypeError, ValueError):
        rate = 0
    return [] if 0 < rate <= cap else ["-ar", str(cap)]


# --- images ---------------------------------------------------------------------------------------


def prepare_image(src: Path, dest: Path, max_bytes: int | None = None, isolate: bool = True) -> tuple[int, int]:
    """Write src as an RGB JPEG at dest, upright, at most MAX_INPUT_SIDE px a side, within max_bytes
    (lower JPEG quality when needed); return its size.

    A large image in a format without reduced decoding (PNG, WebP...) is done in a child process
    (isolate), so the worker's own memory never holds it at full size.
    """
    try:
        with Image.open(src) as opened:
            # A JPEG decodes straight at the smallest 1/2, 1/4 or 1/8 scale still >= MAX_INPUT_SIDE
            # (draft mode), not at full size: a 40 MP photo then needs ~30 MB instead of ~120 MB.
            opened.draft("RGB", (MAX_INPUT_SIDE, MAX_INPUT_SIDE))
            large = media_check.decoded_bytes(opened) > media_check.IN_PROCESS_DECODE_BYTES
            if isolate and large and opened.format != "JPEG":
                # no reduced decode for this format: the full-size decode happens in a child process
                width, height = media_check.run_isolated(prepare_image, str(src), str(dest), max_bytes=max_bytes,
                                                         error=EngineError, isolate=False)
                return width, height
            return _save_jpeg(opened, dest, max_bytes)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise EngineError(f"could not read the image: {exc}") from exc


def _save_jpeg(img: Image.Image, dest: Path, max_bytes: int | None) -> tuple[int, int]:
    """The opened image, upright, flattened on white, scaled to MAX_INPUT_SIDE, as a JPEG within max_bytes."""
    ImageOps.exif_transpose(img, in_place=True)  # no full-size copies: every step below is in place
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))  # transparency -> white, not black
        del rgba
    if img.mode != "RGB":
        img = img.convert("RGB")
    if max(img.size) > MAX_INPUT_SIDE:
        img.thumbnail((MAX_INPUT_SIDE, MAX_INPUT_SIDE), Image.Resampling.LANCZOS)
    for quality in JPEG_QUALITIES:
        img.save(dest, "JPEG", quality=quality)
        if max_bytes is None or fits(dest, max_bytes):
            return img.size
    raise EngineError(f"the image does not fit ComfyUI's upload limit of {max_bytes} bytes")
