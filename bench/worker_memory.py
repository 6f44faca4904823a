"""Worker memory on the largest inputs the limits allow: idle, peak and after RSS of each conversion.

Generates, in a temporary directory: a 200 MiB WAV (96 kHz, stereo, 24-bit, 364 s: a whisper input at
MAX_INPUT_BYTES), a 600 s stereo WAV (a CSM clone reference at MAX_AUDIO_SECONDS), a 600 s AAC in
M4A (a portrait audio that needs converting), a 40-megapixel JPEG and a 40-megapixel PNG (analyze /
portrait images at MAX_IMAGE_PIXELS). Each case runs the worker's real functions in a fresh Python
process that has imported the worker's modules; the child reports its RSS when idle, its peak during
the case (VmHWM, reset first through /proc/self/clear_refs) and its RSS after, and what it wrote.
Issue 9's targets: peak - idle <= 150 MB, after - idle <= 20 MB.

    python bench/worker_memory.py [--code DIR] [--case NAME ...]

--code runs another checkout's modules (e.g. the commit before the change) on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ROOT, machine

MIB = 1024 * 1024

# name -> (what it stands for, the code run in the child; `src` and `out` are paths)
CASES = {
    "whisper_wav_200mib": ("whisper input, 200 MiB WAV -> MP3 (mediaconv.to_mp3)",
                           "media_check.check_audio(src, field='audio_url', max_seconds=600)\n"
                           "mediaconv.to_mp3(src, out / 'sent.mp3')"),
    "clone_reference_600s": ("CSM clone reference, 600 s WAV -> mono WAV (mediaconv.to_mono_wav)",
                             "media_check.check_audio(src, field='reference_audio_url', max_seconds=600)\n"
                             "mediaconv.to_mono_wav(src, out / 'ref.wav')"),
    "portrait_audio_m4a_600s": ("portrait audio, 600 s M4A -> MP3 (comfyui.prepare_audio)",
                                "media_check.check_audio(src, field='audio_url', max_seconds=600)\n"
                                "comfyui.prepare_audio(src, out, 'job')"),
    "image_jpeg_40mp": ("analyze/portrait image, 40 MP JPEG (check_image + mediaconv.prepare_image)",
                        "media_check.check_image(src, field='image_url', max_pixels=40_000_000)\n"
                        "mediaconv.prepare_image(src, out / 'img.jpg')"),
    "image_png_40mp": ("analyze/portrait image, 40 MP PNG (check_image + mediaconv.prepare_image)",
                       "media_check.check_image(src, field='image_url', max_pixels=40_000_000)\n"
                       "mediaconv.prepare_image(src, out / 'img.jpg')"),
}

CHILD = r"""
import gc, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import csm, comfyui, media_check, mediaconv, whisper, analyze  # the worker's modules, loaded as in a worker
import PIL.Image, pydub  # noqa: F401

def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
getattr(media_check, 'return_large_frees', lambda: None)()  # as the worker's main() does
src, out = Path(sys.argv[2]), Path(sys.argv[3])
gc.collect()
idle = rss('VmRSS')
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset VmHWM (the peak) to the current RSS
exec(sys.argv[4])
peak = rss('VmHWM')
gc.collect()
print(json.dumps({'idle': idle, 'peak': peak, 'after': rss('VmRSS')}))
"""


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def make_inputs(tmp: Path) -> dict[str, Path]:
    inputs = {
        "whisper_wav_200mib": tmp / "whisper.wav",
        "clone_reference_600s": tmp / "reference.wav",
        "portrait_audio_m4a_600s": tmp / "portrait.m4a",
        "image_jpeg_40mp": tmp / "photo.jpg",
        "image_png_40mp": tmp / "photo.png",
    }
    seconds = int(200 * MIB / (96_000 * 2 * 3))  # 364 s: just under 200 MiB
    ffmpeg("-f", "lavfi", "-i", f"sine=f=440:r=96000:d={seconds}", "-ac", "2", "-c:a", "pcm_s24le",
           str(inputs["whisper_wav_200mib"]))
    ffmpeg("-f", "lavfi", "-i", "sine=f=330:r=48000:d=600", "-ac", "2", "-c:a", "pcm_s16le",
           str(inputs["clone_reference_600s"]))
    ffmpeg("-f", "lavfi", "-i", "sine=f=220:r=44100:d=600", "-ac", "2", "-c:a", "aac", "-b:a", "64k",
           str(inputs["portrait_audio_m4a_600s"]))
    size = "7744x5164"  # 39.99 megapixels
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=s={size}:d=1", "-frames:v", "1", "-q:v", "3",
           str(inputs["image_jpeg_40mp"]))
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=s={size}:d=1", "-frames:v", "1", str(inputs["image_png_40mp"]))
    return inputs


def describe_output(out: Path) -> str:
    parts = []
    for path in sorted(out.iterdir()):
        if path.suffix in (".mp3", ".wav"):
            probe = json.loads(subprocess.run(
                ["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=sample_rate,channels",
                 "-of", "json", str(path)], capture_output=True, text=True, check=True).stdout)
            stream = probe["streams"][0]
            parts.append(f"{path.name} {float(probe['format']['duration']):.1f} s {stream['sample_rate']} Hz "
                         f"{stream['channels']} ch")
        else:
            from PIL import Image

            with Image.open(path) as im:
                parts.append(f"{path.name} {im.size[0]}x{im.size[1]}")
    return ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose modules run")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only these cases")
    args = parser.parse_args()
    code = args.code.resolve()
    print(f"code: {code}\nmachine: {machine()}")
    print(f"{'case':<26} {'input':>9} {'idle':>7} {'peak':>7} {'after':>7} {'growth':>7} {'kept':>6}  output")
    with tempfile.TemporaryDirectory(prefix="c3-worker-memory-") as tmp_name:
        tmp = Path(tmp_name)
        inputs = make_inputs(tmp)
        for name in args.case or list(CASES):
            out = tmp / f"out-{name}"
            out.mkdir()
            done = subprocess.run([sys.executable, "-c", CHILD, str(code), str(inputs[name]), str(out),
                                   CASES[name][1]], capture_output=True, text=True, cwd=code)
            if done.returncode != 0:
                print(f"{name:<26} FAILED: {done.stderr.strip().splitlines()[-1:]}")
                continue
            m = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name:<26} {inputs[name].stat().st_size / MIB:7.0f}Mi {m['idle'] / MIB:6.0f}M "
                  f"{m['peak'] / MIB:6.0f}M {m['after'] / MIB:6.0f}M {(m['peak'] - m['idle']) / MIB:6.0f}M "
                  f"{(m['after'] - m['idle']) / MIB:5.0f}M  {describe_output(out)}", flush=True)
    print("targets: growth (peak - idle) <= 150 MB, kept (after - idle) <= 20 MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
