"""ffmpeg file-to-file conversions the worker needs before sending media to a node.

This module owns `shrink_audio` (make an audio file fit an upload limit, e.g. ComfyUI's 100 MiB) and
the `ffmpeg` helper it runs on. ffmpeg reads and writes files directly, so the worker never holds the
decoded audio in memory (a 10-minute 48 kHz stereo WAV is 106 MiB on disk and more once decoded).
Reusable by any engine: give it a source file, a destination stem and a byte limit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

FFMPEG_TIMEOUT_S = 600
MAX_SAMPLE_RATE = 48_000  # nothing downstream keeps more (the portrait video's audio track is AAC)
MP3_BITRATE = "192k"  # mono speech at this rate is transparent; 10 minutes are 14 MB
UPLOAD_MARGIN_BYTES = 64 * 1024  # the multipart envelope around the file counts against the limit


class ConversionError(Exception):
    """ffmpeg could not convert the file; str() says why (its last error lines)."""


def ffmpeg(args: list[str], timeout_s: float = FFMPEG_TIMEOUT_S) -> None:
    """Run ffmpeg with these arguments (inputs and outputs are files); raise ConversionError on failure."""
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-y", "-v", "error", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConversionError(f"ffmpeg could not run: {exc}") from exc
    if done.returncode != 0:
        raise ConversionError(f"ffmpeg failed: {done.stderr.strip()[-300:] or done.returncode}")


def fits(path: Path, max_bytes: int) -> bool:
    """Whether the file, wrapped in a multipart upload, stays within max_bytes."""
    return path.stat().st_size + UPLOAD_MARGIN_BYTES <= max_bytes


def shrink_audio(src: Path, dest_stem: Path, max_bytes: int, sample_rate: int = MAX_SAMPLE_RATE) -> Path:
    """An audio file that fits max_bytes: src itself when it does, else a mono copy next to dest_stem.

    Tries lossless FLAC first (mono, at src's rate capped at sample_rate), then MP3 (mono, 192 kbit/s);
    returns the first that fits (dest_stem.flac or dest_stem.mp3). Raises ConversionError when neither
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
        ffmpeg(["-i", str(src), "-vn", "-map", "0:a:0", "-ac", "1", *rate, *codec, str(dest)])
        if fits(dest, max_bytes):
            return dest
        dest.unlink(missing_ok=True)
    raise ConversionError(f"{src.name} does not fit in {max_bytes} bytes even as mono MP3")


def _rate_args(src: Path, cap: int) -> list[str]:
    """-ar cap when src's rate is above it (or unknown), else nothing (keep the rate)."""
    cmd = ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=sample_rate",
           "-of", "default=nw=1:nk=1", str(src)]
    try:
        rate = int(subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False).stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        rate = 0
    return [] if 0 < rate <= cap else ["-ar", str(cap)]
