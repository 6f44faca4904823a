"""Input conversions done without holding the input in the worker: ffmpeg file to file for audio,
JPEG draft decoding, large non-JPEG images decoded in a child process. Checks the outputs (duration,
sample rate, channels, image size) and, in a fresh process, the peak and retained memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image

import comfyui
import media_check
import mediaconv
from engine_api import EngineError

MIB = 1024 * 1024


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def tone(path: Path, seconds: float, rate: int = 44100, channels: int = 2, codec: str = "pcm_s16le") -> Path:
    ffmpeg("-f", "lavfi", "-i", f"sine=f=440:r={rate}:d={seconds}", "-ac", str(channels), "-c:a", codec, str(path))
    return path


def audio_facts(path: Path) -> tuple[str, float, int, int]:
    probe = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=codec_name,sample_rate,channels",
         "-of", "json", str(path)], capture_output=True, text=True, check=True).stdout)
    stream = probe["streams"][0]
    return stream["codec_name"], float(probe["format"]["duration"]), int(stream["sample_rate"]), stream["channels"]


def test_to_mp3_keeps_rate_channels_and_duration(tmp_path: Path) -> None:
    out = mediaconv.to_mp3(tone(tmp_path / "in.wav", 3.0, 44100, 2), tmp_path / "out.mp3")
    codec, seconds, rate, channels = audio_facts(out)
    assert (codec, rate, channels) == ("mp3", 44100, 2)
    assert seconds == pytest.approx(3.0, abs=0.08)
    mono = mediaconv.to_mp3(tone(tmp_path / "in.flac", 2.0, 22050, 2, "flac"), tmp_path / "mono.mp3", mono=True)
    assert audio_facts(mono)[2:] == (22050, 1)


def test_to_mono_wav_for_the_clone_reference(tmp_path: Path) -> None:
    out = mediaconv.to_mono_wav(tone(tmp_path / "ref.ogg", 2.5, 48000, 2, "libvorbis"), tmp_path / "ref.wav")
    codec, seconds, rate, channels = audio_facts(out)
    assert (codec, rate, channels) == ("pcm_s16le", 48000, 1)
    assert seconds == pytest.approx(2.5, abs=0.05)


def test_prepare_audio_converts_m4a_and_measures_it(tmp_path: Path) -> None:
    src = tone(tmp_path / "in.m4a", 4.0, 44100, 2, "aac")
    out, seconds = comfyui.prepare_audio(src, tmp_path, "job")
    assert out.name == "job_input.mp3" and audio_facts(out)[0] == "mp3"
    assert seconds == pytest.approx(4.0, abs=0.1)
    assert mediaconv.decoded_seconds(src) == pytest.approx(4.0, abs=0.1)


def test_conversion_errors_say_what_went_wrong(tmp_path: Path) -> None:
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF" + b"\0" * 100)
    with pytest.raises(EngineError, match=r"^could not convert junk.wav to MP3: "):
        mediaconv.to_mp3(junk, tmp_path / "out.mp3")
    with pytest.raises(EngineError, match=r"^could not read the reference audio: "):
        mediaconv.to_mono_wav(junk, tmp_path / "out.wav")


def test_large_truncated_png_is_refused_by_the_child_decode(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=4000x3000:d=1", "-frames:v", "1", str(big))
    with Image.open(big) as im:
        assert media_check.decoded_bytes(im) > media_check.IN_PROCESS_DECODE_BYTES  # the child path
    assert media_check.check_image(big, field="image_url", max_pixels=40_000_000).width == 4000
    data = big.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(media_check.MediaError, match=r"^image_url: image could not be decoded \(image/png: "):
        media_check.check_image(cut, field="image_url", max_pixels=40_000_000)
    assert mediaconv.prepare_image(big, tmp_path / "out.jpg") == (2048, 1536)
    with Image.open(tmp_path / "out.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (2048, 1536))


# --- memory, measured in a fresh process as the worker would run ---------------------------------

CHILD = r"""
import gc, json, sys
sys.path.insert(0, sys.argv[1])
import comfyui, csm, media_check, mediaconv
from pathlib import Path
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
getattr(media_check, 'return_large_frees', lambda: None)()
src, out = Path(sys.argv[2]), Path(sys.argv[3])
gc.collect()
idle = rss('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
exec(sys.argv[4])
peak = rss('VmHWM')
gc.collect()
print(json.dumps({'growth': peak - idle, 'kept': rss('VmRSS') - idle}))
"""


def memory_of(code: str, src: Path, out: Path) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(src), str(out), code],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_audio_conversion_does_not_load_the_input(tmp_path: Path) -> None:
    src = tone(tmp_path / "big.wav", 60, 96000, 2, "pcm_s24le")  # 33 MB
    used = memory_of("mediaconv.to_mp3(src, out)", src, tmp_path / "out.mp3")
    assert used["growth"] < 0.5 * src.stat().st_size, used  # pydub held it decoded: several times its size
    assert audio_facts(tmp_path / "out.mp3")[1] == pytest.approx(60, abs=0.1)


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_40_megapixel_image_stays_within_the_memory_budget(tmp_path: Path, ext: str) -> None:
    src = tmp_path / f"photo.{ext}"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=7744x5164:d=1", "-frames:v", "1", "-q:v", "3", str(src))
    code = ("media_check.check_image(src, field='image_url', max_pixels=40_000_000)\n"
            "mediaconv.prepare_image(src, out)")
    used = memory_of(code, src, tmp_path / "out.jpg")
    # a full-size decode alone is 120 MB, and the old path made three full-size copies
    assert used["growth"] <= 150 * MIB and used["kept"] <= 20 * MIB, used
    with Image.open(tmp_path / "out.jpg") as im:
        assert im.size == (2048, 1366)
