"""CSM text-to-speech engine (docs/node-protocols.md, CSM), plus the Gradio and audio helpers the audio engines share.

This module owns:
- `split_sentences`: how a `text` parameter becomes the sentence list CSM speaks;
- the CSM Gradio call (`/generate_monologue_audio`, input names in `CSM_INPUTS`);
- `gradio_call`: submit to a Gradio app, poll, honour should_stop, report the phase from the Gradio job's
  status, map app errors, retry one HTTP 5xx when the node is healthy (whisper.py uses it);
- the conversions it needs are mediaconv's (to_mono_wav, to_mp3; ffmpeg file to file).

Result: work_dir/{job_id}.mp3. Raises JobStopped when should_stop() gives a reason, EngineError when the
app answers with an error. Transport failures (node unreachable, connection dropped) propagate unchanged
so the worker can treat them as a node problem.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jobspec
import mediaconv
from engine_api import EngineError, JobStopped, NodeUrls, Phase, Progress, ShouldStop, no_phase, node_healthy

log = logging.getLogger(__name__)

# gradio_client ignores Client(analytics_enabled=False) unless this env says so too (it ORs the two),
# and huggingface_hub reads its telemetry switch when imported: set both before gradio_client loads.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

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
POLL_INTERVAL_S = 0.5

# --- sentences ----------------------------------------------------------------------------------

# Words after which a "." never ends a sentence (titles, Latin abbreviations, initials are handled apart).
_NO_BREAK_AFTER = {
    "mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "mt", "rev", "gen", "col", "capt", "lt",
    "sgt", "gov", "sen", "rep", "hon", "e.g", "i.e", "cf", "vs", "viz",
}  # fmt: skip
# Abbreviations that may also end a sentence (or are words): break only before a capital letter.
_MAYBE_BREAK_AFTER = {
    "etc", "inc", "ltd", "co", "corp", "a.m", "p.m", "u.s", "u.k", "e.u", "no", "nos", "vol", "pp",
    "ch", "sec", "fig", "approx", "dept", "est", "ca", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec",
}  # fmt: skip
_OPENERS = "\"'“‘«([{"
_CLOSERS = "\"'”’»)]}"
_END_RE = re.compile(r"([.!?…]+)([" + re.escape(_CLOSERS) + r"]*)(?=\s|$)")


def _breaks_here(line: str, match: re.Match[str]) -> bool:
    """Decide whether the terminator in `match` ends a sentence."""
    rest = line[match.end() :].lstrip()
    rest_first = rest.lstrip(_OPENERS)[:1]
    if not rest:
        return True
    if rest_first.islower():  # '"Wow!" she said' or "Well... maybe" go on
        return False
    if match.group(1) != ".":
        return True
    word = line[: match.start()].split()[-1] if line[: match.start()].split() else ""
    word = word.lstrip(_OPENERS).lower()
    if word in _NO_BREAK_AFTER:
        return False
    if len(word) == 1 and word.isalpha():  # an initial: "J. K. Rowling"
        return False
    if word in _MAYBE_BREAK_AFTER:
        return rest_first.isupper()
    return True


def split_sentences(text: str) -> list[str]:
    """Split text into sentences for CSM.

    Line breaks always end a sentence; inside a line a sentence ends at ., !, ?, ... or an ellipsis
    (with any closing quotes) followed by a space, except after common abbreviations and initials,
    or when the next word starts in lower case. Pieces with no letter or digit are dropped.
    """
    sentences: list[str] = []
    for line in text.splitlines():
        start = 0
        for match in _END_RE.finditer(line):
            if _breaks_here(line, match):
                sentences.append(line[start : match.end()])
                start = match.end()
        sentences.append(line[start:])
    return [s.strip() for s in sentences if re.search(r"\w", s)]


def sentences_from_params(params: dict) -> list[str]:
    """The monologue list as given (strings split when it is one string), else `text` split."""
    monologue = params.get("monologue")
    if isinstance(monologue, list):
        sentences = [str(s).strip() for s in monologue if str(s).strip()]
    elif isinstance(monologue, str) and monologue.strip():
        sentences = split_sentences(monologue)
    else:
        sentences = split_sentences(str(params.get("text") or ""))
    if not sentences:
        raise EngineError("CSM failed: there is no text to speak")
    return sentences


# --- Gradio -------------------------------------------------------------------------------------


# Where a Gradio job is, from its status code: still sending its inputs, waiting in the app's queue
# behind other work on the node (e.g. a cancelled generation that Gradio could not stop), or running.
GRADIO_PHASES = {"STARTING": "uploading_inputs", "JOINING_QUEUE": "uploading_inputs",
                 "IN_QUEUE": "waiting_for_node", "SENDING_DATA": "rendering", "PROCESSING": "rendering",
                 "ITERATING": "rendering", "PROGRESS": "rendering"}


def _report_progress(job: Any, progress: Progress, phase: Phase = no_phase) -> None:
    try:
        status = job.status()
        units = status.progress_data
    except Exception:  # noqa: BLE001 - progress is best effort
        return
    code = getattr(getattr(status, "code", None), "name", "")
    if code in GRADIO_PHASES:
        phase(GRADIO_PHASES[code])
    if not units:
        return
    unit = units[-1]
    if unit.progress is not None:
        progress(max(0, min(100, int(unit.progress * 100))))
    elif unit.index is not None and unit.length:
        progress(max(0, min(100, int(100 * unit.index / unit.length))))


def endpoint_input_names(client: Any, api_name: str) -> set[str]:
    """The keyword input names an app's endpoint declares (empty when it does not say)."""
    try:
        info = client.view_api(print_info=False, return_format="dict")
        params = info["named_endpoints"][api_name]["parameters"]
    except Exception:  # noqa: BLE001 - older apps may not describe themselves; send everything
        return set()
    return {p["parameter_name"] for p in params if p.get("parameter_name")}


def _server_error(exc: BaseException) -> bool:
    """Whether exc is an HTTP 5xx answer (httpx, as gradio_client raises it)."""
    response = getattr(exc, "response", None)
    return isinstance(getattr(response, "status_code", None), int) and response.status_code >= 500


def gradio_call(
    url: str,
    headers: dict[str, str],
    api_name: str,
    kwargs: dict[str, Any] | Callable[[set[str]], dict[str, Any]],
    should_stop: ShouldStop,
    progress: Progress,
    label: str,
    download_dir: Path,
    phase: Phase = no_phase,
    health_node: NodeUrls | None = None,
) -> Any:
    """Submit one call to a Gradio app and wait for it while honouring should_stop.

    kwargs may be a function of the endpoint's declared input names (to adapt to app versions).
    Returns the app's output. Raises JobStopped (after cancelling the Gradio job) or
    EngineError(f"{label} failed: <app message>"). An HTTP 5xx answer (a transient app error) is
    retried once when health_node still answers its health check.
    """
    try:
        return _gradio_call_once(url, headers, api_name, kwargs, should_stop, progress, label, download_dir, phase)
    except Exception as exc:
        if not (health_node and _server_error(exc) and node_healthy(health_node)):
            raise
        log.warning("%s: the app answered HTTP %s on a healthy node; retrying once", label,
                    exc.response.status_code)  # type: ignore[attr-defined]
    return _gradio_call_once(url, headers, api_name, kwargs, should_stop, progress, label, download_dir, phase)


def _gradio_call_once(
    url: str,
    headers: dict[str, str],
    api_name: str,
    kwargs: dict[str, Any] | Callable[[set[str]], dict[str, Any]],
    should_stop: ShouldStop,
    progress: Progress,
    label: str,
    download_dir: Path,
    phase: Phase,
) -> Any:
    reason = should_stop()
    if reason:
        raise JobStopped(reason)
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    download_dir.mkdir(parents=True, exist_ok=True)
    client = Client(url, headers=headers, verbose=False, download_files=str(download_dir), analytics_enabled=False)
    try:
        if callable(kwargs):
            kwargs = kwargs(endpoint_input_names(client, api_name))
        try:
            phase("uploading_inputs")
            job = client.submit(api_name=api_name, **kwargs)
        except (ValueError, TypeError) as exc:  # unknown api_name or input names: the app differs
            raise EngineError(f"{label} failed: {exc}") from exc
        while not job.done():
            reason = should_stop()
            if reason:
                try:
                    # Removes the job from the app's queue and cancels its task; a function already
                    # running in a worker thread on the node is not interrupted (see tests).
                    job.cancel()
                except Exception as exc:  # noqa: BLE001 - we stop anyway
                    log.warning("%s: cancelling the Gradio job failed: %s", label, exc)
                raise JobStopped(reason)
            _report_progress(job, progress, phase)
            time.sleep(POLL_INTERVAL_S)
        try:
            return job.result()
        except AppError as exc:
            raise EngineError(f"{label} failed: {exc.message or exc}") from exc
        except (ValueError, TypeError, KeyError) as exc:  # gradio_client's own "bad answer" errors
            raise EngineError(f"{label} failed: {exc}") from exc
    finally:
        try:
            client.close()
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            log.debug("closing the Gradio client failed: %s", exc)


def first_path(result: Any) -> Path:
    """The first file path in a Gradio output (a path, a tuple/list of outputs, or a FileData dict)."""
    if isinstance(result, (list, tuple)):
        for item in result:
            try:
                return first_path(item)
            except EngineError:
                continue
    if isinstance(result, dict):
        result = result.get("path") or result.get("name")
    if isinstance(result, (str, os.PathLike)) and Path(result).is_file():
        return Path(result)
    raise EngineError(f"the app returned no audio file (got {type(result).__name__})")


# --- the engine ---------------------------------------------------------------------------------


def run(
    params: dict,
    job_id: str,
    inputs: dict[str, Path],
    node: NodeUrls,
    work_dir: Path,
    should_stop: ShouldStop,
    progress: Progress,
    phase: Phase = no_phase,
) -> Path:
    """Speak the monologue with CSM on the node; return work_dir/{job_id}.mp3."""
    sentences = sentences_from_params(params)
    voice = str(params.get("voice") or "random")
    if voice not in VOICE_MAP:
        raise EngineError(f"CSM failed: unknown voice {voice!r}")
    speaker_audio = None
    speaker_text = ""
    if voice == "clone":
        reference = inputs.get("reference_audio")
        if reference is None:
            raise EngineError("CSM failed: voice 'clone' needs reference audio")
        from gradio_client import handle_file

        speaker_audio = handle_file(str(mediaconv.to_mono_wav(reference, work_dir / f"{job_id}_reference.wav")))
        speaker_text = str(params.get("reference_text") or "")

    def value(name: str, cast: Callable[[Any], Any]) -> Any:
        raw = params.get(name)
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
    log.info("job %s: CSM with %d sentences, voice %s", job_id, len(sentences), voice)
    result = gradio_call(
        node.csm, node.headers(), API_NAME, kwargs, should_stop, progress, "CSM", work_dir / "gradio", phase, node,
    )
    phase("encoding")
    return mediaconv.to_mp3(first_path(result), work_dir / f"{job_id}.mp3")
