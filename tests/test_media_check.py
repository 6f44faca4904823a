"""Tests for media_check: real images made with Pillow, real audio and video made with ffmpeg."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import media_check
from media_check import AudioInfo, ImageInfo, MediaError, check_audio, check_image, ffprobe_json, sniff

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")

HTML = b"<!DOCTYPE html>\n<html><head><title>Not found</title></head><body>nope</body></html>\n"


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True, timeout=60)


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    out: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        out[name] = d / name
        out[name].write_bytes(data)

    image = Image.new("RGB", (64, 48), (200, 30, 30))
    for name, fmt in (("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.webp", "WEBP"), ("a.gif", "GIF")):
        out[name] = d / name
        image.save(out[name], fmt)
    png = out["a.png"].read_bytes()
    put("truncated.png", png[: len(png) // 2])
    jpg = out["a.jpg"].read_bytes()
    put("truncated.jpg", jpg[: len(jpg) // 2])
    put("bomb.png", _png_with_size(1, 1, 100_000, 100_000))
    put("big.png", _png_with_size(1, 1, 5000, 5000))
    put("page.jpg", HTML)
    put("data.png", b'{"error": "not found"}')
    put("note.png", b"just some words\n")
    put("doc.png", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")
    put("drawing.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    put("drawing.svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>')
    put("noise.bin", bytes((i * 7919 + 13) % 251 for i in range(4096)))
    put("empty.bin", b"")
    put("page.mp3", HTML)
    put(
        "list.m3u8",
        b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://127.0.0.1:1/x.ts\n#EXT-X-ENDLIST\n",
    )

    sine = ["-f", "lavfi", "-i", "sine=frequency=440:duration=1"]
    for name, codec in (
        ("a.wav", "pcm_s16le"),
        ("a.mp3", "libmp3lame"),
        ("a.m4a", "aac"),
        ("a.ogg", "libvorbis"),
    ):
        out[name] = d / name
        _ffmpeg(*sine, "-c:a", codec, str(out[name]))
    out["long.wav"] = d / "long.wav"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=220:duration=3", str(out["long.wav"]))
    video = ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1"]
    out["av.mp4"] = d / "av.mp4"
    _ffmpeg(*video, *sine, "-c:v", "mpeg4", "-c:a", "aac", "-shortest", str(out["av.mp4"]))
    out["silent.mp4"] = d / "silent.mp4"
    _ffmpeg(*video, "-c:v", "mpeg4", str(out["silent.mp4"]))
    out["cover.mp3"] = d / "cover.mp3"
    _ffmpeg(
        "-i",
        str(out["a.mp3"]),
        "-i",
        str(out["a.png"]),
        "-map",
        "0",
        "-map",
        "1",
        "-c",
        "copy",
        "-id3v2_version",
        "3",
        "-disposition:v",
        "attached_pic",
        str(out["cover.mp3"]),
    )
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_size(real_w: int, real_h: int, declared_w: int, declared_h: int) -> bytes:
    """A small real PNG whose header declares other dimensions (a decompression bomb's shape)."""
    buf = io.BytesIO()
    Image.new("L", (real_w, real_h)).save(buf, "PNG")
    png = buf.getvalue()
    ihdr = struct.pack(">II", declared_w, declared_h) + png[24:29]  # depth, colour, methods
    return png[:8] + _chunk(b"IHDR", ihdr) + png[33:]


# --- images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"), [("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.webp", "WEBP"), ("a.gif", "GIF")]
)
def test_real_images(name: str, fmt: str, files: dict[str, Path]) -> None:
    assert check_image(files[name], field="image_url", max_pixels=10_000) == ImageInfo(64, 48, fmt)


def test_image_over_pixel_limit(files: dict[str, Path]) -> None:
    with pytest.raises(
        MediaError, match=r"^image_url: image is 64x48 pixels; the limit is 0.003 megapixels$"
    ):
        check_image(files["a.png"], field="image_url", max_pixels=3000)


def test_declared_size_over_limit_refused_before_decoding(files: dict[str, Path]) -> None:
    assert files["big.png"].stat().st_size < 200
    with pytest.raises(
        MediaError, match=r"^image_url: image is 5000x5000 pixels; the limit is 1 megapixels$"
    ):
        check_image(files["big.png"], field="image_url", max_pixels=1_000_000)


def test_decompression_bomb_refused(files: dict[str, Path]) -> None:
    # 10 gigapixels declared: Pillow itself raises DecompressionBombError, even with a huge limit.
    with pytest.raises(MediaError, match=r"^image_url: image is too large"):
        check_image(files["bomb.png"], field="image_url", max_pixels=10**12)
    with pytest.raises(MediaError) as err:
        check_image(files["bomb.png"], field="image_url", max_pixels=40_000_000)
    assert str(err.value) == "image_url: image is too large (the limit is 40 megapixels)"


@pytest.mark.parametrize(
    ("name", "got"),
    [
        ("page.jpg", "text/html"),
        ("data.png", "application/json"),
        ("note.png", "text/plain"),
        ("doc.png", "application/pdf"),
        ("drawing.eps", "text/plain"),
        ("drawing.svg", "image/svg+xml, a format that is not accepted"),
        ("a.mp3", "audio/mpeg"),
        ("a.wav", "audio/wav"),
        ("av.mp4", "video/mp4"),
        ("noise.bin", "unknown data"),
        ("empty.bin", "an empty file"),
    ],
)
def test_not_an_image(name: str, got: str, files: dict[str, Path]) -> None:
    with pytest.raises(MediaError) as err:
        check_image(files[name], field="image_url", max_pixels=10**6)
    assert str(err.value) == f"image_url: not an image (got {got})"


@pytest.mark.parametrize("name", ["truncated.png", "truncated.jpg"])
def test_truncated_image(name: str, files: dict[str, Path]) -> None:
    with pytest.raises(MediaError, match=r"^image_url: image could not be decoded \(image/(png|jpeg): "):
        check_image(files[name], field="image_url", max_pixels=10**6)


# --- audio ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "codec", "container"),
    [
        ("a.wav", "pcm_s16le", "wav"),
        ("a.mp3", "mp3", "mp3"),
        ("a.m4a", "aac", "mp4"),
        ("a.ogg", "vorbis", "ogg"),
    ],
)
def test_real_audio(name: str, codec: str, container: str, files: dict[str, Path]) -> None:
    info = check_audio(files[name], field="audio_url", max_seconds=600)
    assert isinstance(info, AudioInfo)
    assert info.codec == codec
    assert container in info.format_name.split(",")
    assert info.duration_s == pytest.approx(1.0, abs=0.1)
    assert info.has_video is False


def test_audio_too_long(files: dict[str, Path]) -> None:
    with pytest.raises(MediaError) as err:
        check_audio(files["long.wav"], field="audio_url", max_seconds=2)
    assert str(err.value) == "audio_url: audio is 3.0 s long; the limit is 2 s"
    assert check_audio(files["long.wav"], field="audio_url", max_seconds=3.5).duration_s == pytest.approx(3.0)


def test_video_with_audio(files: dict[str, Path]) -> None:
    info = check_audio(files["av.mp4"], field="reference_audio_url", max_seconds=600)
    assert info.has_video is True
    assert info.codec == "aac"


def test_cover_art_is_not_video(files: dict[str, Path]) -> None:
    probe = ffprobe_json(files["cover.mp3"])
    assert any(s["codec_type"] == "video" for s in probe["streams"])  # the picture is there
    assert check_audio(files["cover.mp3"], field="audio_url", max_seconds=600).has_video is False


def test_video_without_audio(files: dict[str, Path]) -> None:
    with pytest.raises(MediaError, match=r"^audio_url: not an audio file \(the file has no audio stream\)$"):
        check_audio(files["silent.mp4"], field="audio_url", max_seconds=600)


@pytest.mark.parametrize(
    ("name", "got"),
    [
        ("page.mp3", "text/html"),
        ("data.png", "application/json"),
        ("doc.png", "application/pdf"),
        ("a.png", "image/png"),
        ("a.jpg", "image/jpeg"),
        ("list.m3u8", "a playlist (m3u)"),
        ("noise.bin", "unknown data"),
        ("empty.bin", "an empty file"),
    ],
)
def test_not_audio(name: str, got: str, files: dict[str, Path]) -> None:
    with pytest.raises(MediaError) as err:
        check_audio(files[name], field="audio_url", max_seconds=600)
    assert str(err.value) == f"audio_url: not an audio file (got {got})"


def test_text_never_reaches_ffprobe(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("ffprobe ran")

    monkeypatch.setattr(media_check.subprocess, "run", no_run)
    for name in ("list.m3u8", "page.mp3"):
        with pytest.raises(MediaError, match="not an audio file"):
            check_audio(files[name], field="audio_url", max_seconds=600)


# --- ffprobe_json ---------------------------------------------------------------------------------


def test_ffprobe_json(files: dict[str, Path]) -> None:
    probe = ffprobe_json(files["av.mp4"])
    assert {s["codec_type"] for s in probe["streams"]} == {"audio", "video"}
    assert "mp4" in probe["format"]["format_name"]


def test_ffprobe_playlist_cannot_fetch(files: dict[str, Path]) -> None:
    # Only the file protocol is allowed: the http URL inside the playlist is never opened.
    with pytest.raises(MediaError, match="^ffprobe could not read the file"):
        ffprobe_json(files["list.m3u8"])


def test_ffprobe_timeout(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(*args: object, **kwargs: object) -> None:
        raise subprocess.TimeoutExpired("ffprobe", 30)

    monkeypatch.setattr(media_check.subprocess, "run", slow)
    with pytest.raises(MediaError, match="took longer than 30 s"):
        ffprobe_json(files["a.wav"])


def test_ffprobe_odd_file_name(files: dict[str, Path], tmp_path: Path) -> None:
    odd = tmp_path / "-i weird|name.wav"
    odd.write_bytes(files["a.wav"].read_bytes())
    assert ffprobe_json(odd)["format"]["format_name"] == "wav"


# --- sniffing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "label"),
    [
        (b"  \n<html lang=en>", "text/html"),
        (b"\xef\xbb\xbf<!doctype HTML>", "text/html"),
        (b"[1, 2]", "application/json"),
        (b"<?xml version='1.0'?><rss/>", "application/xml"),
        (b"\x00\x00\x00\x20ftypM4A \x00", "audio/mp4"),
        (b"\x00\x00\x00\x20ftypisom\x00", "video/mp4"),
        (b"\x00\x00\x00\x1cftypheic", "image/heif or avif"),
        (b"\xff\xf1\x50\x80", "audio/aac"),
        (b"\xff\xfb\x90\x64", "audio/mpeg"),
        (b"OggS\x00\x02", "audio/ogg"),
        (b"\x1aE\xdf\xa3\x01", "video/webm or matroska"),
        (b"caf\xc3\xa9 au lait", "text/plain"),
    ],
)
def test_sniff(head: bytes, label: str) -> None:
    assert sniff(head) == label


@given(st.binary(max_size=64))
def test_prop_sniff_always_answers(head: bytes) -> None:
    assert isinstance(sniff(head), str) and sniff(head)


def test_an_ffprobe_killed_by_a_signal_is_not_blamed_on_the_input(files, tmp_path, monkeypatch):
    """A stop of the worker's process group kills ffprobe too; the job must not fail as 'not an audio
    file' (the worker puts it back when it is stopping, else fails it saying what happened)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "ffprobe").write_text("#!/bin/sh\nkill -TERM $$\n")
    (fake_bin / "ffprobe").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    with pytest.raises(media_check.ToolKilled, match="signal 15"):
        check_audio(files["long.wav"], field="audio_url", max_seconds=600)
