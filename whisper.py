"""WhisperX speech-to-text engine (docs/node-protocols.md, WhisperX).

This module owns the WhisperX Gradio call (`/transcribe_audio`, input names in `WHISPER_INPUTS`) and the
files of a whisper job: work_dir/{job_id}_input.mp3 (the audio sent) and work_dir/{job_id}.txt (the
transcript). It returns the transcript text. Polling, stopping and error mapping are gradio_app.call's.

The audio input's name is unverified (deployed versions used `input_file`): it is the setting
WHISPER_AUDIO_INPUT_NAME (config.py, default `audio_file`); when the app declares its inputs and the
configured name is not among them, the other known name is used.
"""

from __future__ import annotations

import logging
from typing import Any

import config
import gradio_app
import jobspec
import mediaconv
from engine_api import EngineError, JobContext

log = logging.getLogger(__name__)

API_NAME = "/transcribe_audio"
KNOWN_AUDIO_INPUT_NAMES = ("audio_file", "input_file")
# Keyword inputs other than the audio file, with the values the public client sends (docs/node-protocols.md, WhisperX).
WHISPER_INPUTS = {
    "model": "model",
    "task": "task",
    "language": "language",
    "device": "device",
    "compute_type": "compute_type",
    "batch_size": "batch_size",
    "vad_method": "vad_method",
    "word_timestamps": "word_timestamps",
    "segment_resolution": "segment_resolution",
}
FIXED_VALUES = {
    "device": "cuda",
    "compute_type": "float16",
    "batch_size": 16,
    "vad_method": "pyannote",
    "word_timestamps": True,
    "segment_resolution": "sentence",
}
DEFAULTS = {f.name: f.default for f in jobspec.JOB_FIELDS["whisper"] if f.default is not None}  # the API's
# The app catches every exception and answers ("Error: <message>", []) instead of raising
# (docs/node-protocols.md, WhisperX).
APP_ERROR_PREFIX = "Error:"


def audio_input_name(settings: config.Settings, declared: set[str] | frozenset[str] = frozenset()) -> str:
    """The name to send the audio under: the WHISPER_AUDIO_INPUT_NAME setting, adapted to what the app declares."""
    name = settings.whisper_audio_input_name
    if declared and name not in declared:
        for other in KNOWN_AUDIO_INPUT_NAMES:
            if other in declared:
                log.warning("whisper app has no input %r; sending the audio as %r", name, other)
                return other
    return name


def build_kwargs(
    params: dict, audio: Any, settings: config.Settings, declared: set[str] | frozenset[str] = frozenset()
) -> dict:
    """The keyword inputs of /transcribe_audio for these params (audio: a handle_file value)."""
    language = str(params.get("language") or "").strip()
    if language.lower() == "auto":
        language = ""
    values = {
        "model": str(params.get("model") or DEFAULTS["model"]),
        "task": str(params.get("task") or DEFAULTS["task"]),
        # "" = detect; never a region subtag (jobs queued before the API mapped it still hold one)
        "language": jobspec.whisper_language(language) if language else "",
        **FIXED_VALUES,
    }
    kwargs = {audio_input_name(settings, declared): audio}
    kwargs.update({WHISPER_INPUTS[key]: value for key, value in values.items()})
    return kwargs


def transcript_text(result: Any) -> str:
    """The text of the app's (transcript_text, files) output; EngineError for the app's error answer.

    The app reports a failure as ("Error: <message>", []): a transcript that starts with "Error:" and
    comes with no files is that, not speech (a real transcript always comes with its files).
    """
    text = result[0] if isinstance(result, (list, tuple)) and result else result
    files = result[1] if isinstance(result, (list, tuple)) and len(result) > 1 else None
    if text is None:
        return ""
    if not isinstance(text, str):
        raise EngineError(f"Whisper failed: the app returned {type(text).__name__}, not text")
    if text.lstrip().startswith(APP_ERROR_PREFIX) and not files:
        message = text.lstrip()[len(APP_ERROR_PREFIX):].strip() or "no details"
        raise EngineError(f"Whisper failed: {message}")
    return text.strip()


def run(job: JobContext) -> str:
    """Transcribe inputs["audio"] with WhisperX on the node; return the transcript text."""
    from gradio_client import handle_file

    audio = job.inputs.get("audio")
    if audio is None:
        raise EngineError("Whisper failed: no audio input")
    sent = mediaconv.to_mp3(audio, job.file("_input.mp3"))
    log.info("job %s: whisper model %s", job.job_id, job.params.get("model") or DEFAULTS["model"])
    result = gradio_app.call(
        job,
        job.node.whisper,
        API_NAME,
        lambda declared: build_kwargs(job.params, handle_file(str(sent)), job.settings, declared),
        "Whisper",
    )
    text = transcript_text(result)
    job.file(".txt").write_text(text, encoding="utf-8")
    return text
