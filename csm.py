"""CSM text-to-speech engine (docs/node-protocols.md, CSM).

This module owns the CSM Gradio call (`/generate_monologue_audio`, input names in `CSM_INPUTS`, voices in
`VOICE_MAP`) and the files of a csm job: work_dir/{job_id}_reference.wav (a clone reference, as mono WAV)
and the result work_dir/{job_id}.mp3. The sentences come from sentences.py; calling the app (polling,
stopping, error mapping, the 5xx retry) is gradio_app.call's; conversions are mediaconv's.

Raises JobStopped when should_stop() gives a reason, EngineError when the app answers with an error.
Transport failures (node unreachable, connection dropped) propagate unchanged so the worker can treat
them as a node problem.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio_app
import jobspec
import mediaconv
from engine_api import EngineError, JobContext
from sentences import sentences_from_params

log = logging.getLogger(__name__)

API_NAME = "/generate_monologue_audio"
# The app's keyword input names, in one place (docs/node-protocols.md, CSM).
CSM_INPUTS = {
    "voice": "speaker_voice",
    "speaker_text": "speaker_text",
    "speaker_audio": "speaker_audio",
    "monologue": "monologue_json",
    "temperature": "temperature",
    "topk": "topk",
    "max_audio_length": "max_audio_length",
    "pause_duration": "pause_duration",
}
VOICE_MAP = {
    "random": "random_voice",
    "conversational_a": "conversational_a",
    "conversational_b": "conversational_b",
    "clone": "upload_voice",
}
DEFAULTS = {f.name: f.default for f in jobspec.JOB_FIELDS["csm"] if f.default is not None}
# The API takes temperature 0.0-2.0 (as existing clients send it); the CSM app's slider starts at 0.1.
NODE_MIN_TEMPERATURE = 0.1


def run(job: JobContext) -> Path:
    """Speak the monologue with CSM on the node; return work_dir/{job_id}.mp3."""
    sentences = sentences_from_params(job.params)
    if not sentences:
        raise EngineError("CSM failed: there is no text to speak")
    voice = str(job.params.get("voice") or "random")
    if voice not in VOICE_MAP:
        raise EngineError(f"CSM failed: unknown voice {voice!r}")
    speaker_audio = None
    speaker_text = ""
    if voice == "clone":
        reference = job.inputs.get("reference_audio")
        if reference is None:
            raise EngineError("CSM failed: voice 'clone' needs reference audio")
        from gradio_client import handle_file

        speaker_audio = handle_file(str(mediaconv.to_mono_wav(reference, job.file("_reference.wav"))))
        speaker_text = str(job.params.get("reference_text") or "")

    def value(name: str, cast: Callable[[Any], Any]) -> Any:
        raw = job.params.get(name)
        return cast(DEFAULTS[name] if raw is None else raw)

    kwargs = {
        CSM_INPUTS["voice"]: VOICE_MAP[voice],
        CSM_INPUTS["speaker_text"]: speaker_text,
        CSM_INPUTS["speaker_audio"]: speaker_audio,
        CSM_INPUTS["monologue"]: json.dumps(sentences, ensure_ascii=False),
        CSM_INPUTS["temperature"]: max(NODE_MIN_TEMPERATURE, value("temperature", float)),
        CSM_INPUTS["topk"]: value("topk", int),
        CSM_INPUTS["max_audio_length"]: value("max_audio_length", int),
        CSM_INPUTS["pause_duration"]: value("pause_duration", int),
    }
    log.info("job %s: CSM with %d sentences, voice %s", job.job_id, len(sentences), voice)
    result = gradio_app.call(job, job.node.csm, API_NAME, kwargs, "CSM")
    job.phase("encoding")
    return mediaconv.to_mp3(gradio_app.first_path(result), job.file(".mp3"))
