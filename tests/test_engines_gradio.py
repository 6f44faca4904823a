"""csm.py, whisper.py, sentences.py and gradio_app.py: pure helpers, and the engines against real Gradio
apps on 127.0.0.1.

The apps are mounted in one FastAPI app (as /csm and /whisper, like a node) served by uvicorn in a
thread; a middleware refuses any request without the node key, so every request the engines and
gradio_client make must carry it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engines live at the repo root
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from conftest import engine_job, serve_asgi  # noqa: E402

import config  # noqa: E402
import csm  # noqa: E402
import mediaconv  # noqa: E402
import sentences  # noqa: E402
import whisper  # noqa: E402
from engine_api import EngineError, JobStopped, NodeUrls  # noqa: E402

KEY = "test-node-key"


# --- pure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello there. How are you? I am fine!", ["Hello there.", "How are you?", "I am fine!"]),
        ("Mr. Smith met Dr. Jones. They talked.", ["Mr. Smith met Dr. Jones.", "They talked."]),
        ("Use tools, e.g. hammers. Then rest.", ["Use tools, e.g. hammers.", "Then rest."]),
        ("Wait... What?! No way.", ["Wait...", "What?!", "No way."]),
        ("Well... maybe not.", ["Well... maybe not."]),
        ("Hello…  World", ["Hello…", "World"]),
        ('"Hi there," she said. "Bye." Then left.', ['"Hi there," she said.', '"Bye."', "Then left."]),
        ('"Wow!" she said.', ['"Wow!" she said.']),
        ("Line one\nLine two.\n\n  \nThree", ["Line one", "Line two.", "Three"]),
        ("I said no. Then I left.", ["I said no.", "Then I left."]),
        ("Item No. 5 is here.", ["Item No. 5 is here."]),
        (
            "At 5 p.m. we ate. Apples, pears, etc. Then home.",
            ["At 5 p.m. we ate.", "Apples, pears, etc.", "Then home."],
        ),
        ("J. K. Rowling wrote it. Pi is 3.14 roughly.", ["J. K. Rowling wrote it.", "Pi is 3.14 roughly."]),
        ("No terminator at all", ["No terminator at all"]),
        ("...", []),
        ("", []),
        ("  \n\n ", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert sentences.split_sentences(text) == expected


def test_voice_map() -> None:
    assert csm.VOICE_MAP == {
        "random": "random_voice",
        "conversational_a": "conversational_a",
        "conversational_b": "conversational_b",
        "clone": "upload_voice",
    }


def test_sentences_from_params(tmp_path: Path) -> None:
    assert sentences.sentences_from_params({"monologue": ["One. Two.", " ", "Three"]}) == ["One. Two.", "Three"]
    assert sentences.sentences_from_params({"monologue": "One. Two."}) == ["One.", "Two."]
    assert sentences.sentences_from_params({"text": "One! Two?"}) == ["One!", "Two?"]
    assert sentences.sentences_from_params({"text": "  "}) == []
    # the engine refuses a job with nothing to speak before it asks the node for anything
    nowhere = NodeUrls(base="", csm="", whisper="", comfyui="", ollama="", api_key=KEY)
    with pytest.raises(EngineError, match="^CSM failed: there is no text to speak$"):
        csm.run(engine_job({"text": "  "}, "empty", {}, nowhere, tmp_path))


def test_whisper_kwargs_and_input_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WHISPER_AUDIO_INPUT_NAME", raising=False)
    kwargs = whisper.build_kwargs({"model": "small", "language": None}, "AUDIO", config.load())
    assert kwargs == {
        "audio_file": "AUDIO",
        "model": "small",
        "task": "transcribe",
        "language": "",
        "device": "cuda",
        "compute_type": "float16",
        "batch_size": 16,
        "vad_method": "pyannote",
        "word_timestamps": True,
        "segment_resolution": "sentence",
    }
    monkeypatch.setenv("WHISPER_AUDIO_INPUT_NAME", "input_file")
    assert whisper.audio_input_name(config.load()) == "input_file"
    assert whisper.audio_input_name(config.load(), {"audio_file", "model"}) == "audio_file"  # the app knows better
    assert whisper.transcript_text(("  hi there \n", [])) == "hi there"
    assert whisper.transcript_text((None, None)) == ""
    with pytest.raises(EngineError, match=r"^Whisper failed: CUDA out of memory$"):
        whisper.transcript_text(("Error: CUDA out of memory", []))
    # speech that happens to start with the word is a transcript: it comes with its files
    assert whisper.transcript_text(("Error: none found.", ["/tmp/a.srt"])) == "Error: none found."
    for sent, bare in (("pt-BR", "pt"), ("EN", "en"), ("auto", ""), ("", "")):
        assert whisper.build_kwargs({"language": sent}, "AUDIO", config.load())["language"] == bare


# --- the apps -----------------------------------------------------------------------------------

RECEIVED: dict[str, dict] = {}
RELEASE = threading.Event()  # ends a hanging app function
HANG_STARTED = threading.Event()
HANG_STATE: dict[str, object] = {}
SEEN_PATHS: list[str] = []
FAIL_NEXT: dict[str, int] = {}  # path suffix -> how many more requests answer 502


def _tone(path: Path, seconds: float = 1.0, channels: int = 2, fmt: str = "wav") -> Path:
    from pydub.generators import Sine

    tone = Sine(440).to_audio_segment(duration=int(seconds * 1000)).set_frame_rate(16000)
    tone.set_channels(channels).export(str(path), format=fmt)
    return path


def _build_apps(tmp: Path):
    import gradio as gr

    def generate_monologue_audio(
        speaker_voice, speaker_text, speaker_audio, monologue_json, temperature, topk, max_audio_length, pause_duration
    ):
        from pydub import AudioSegment

        got = {
            "speaker_voice": speaker_voice,
            "speaker_text": speaker_text,
            "speaker_audio": speaker_audio,
            "monologue_json": monologue_json,
            "temperature": temperature,
            "topk": topk,
            "max_audio_length": max_audio_length,
            "pause_duration": pause_duration,
        }
        if speaker_audio:
            got["speaker_audio_channels"] = AudioSegment.from_file(speaker_audio).channels
        RECEIVED["csm"] = got
        first = json.loads(monologue_json)[0]
        if first == "hang":
            HANG_STARTED.set()
            start = time.monotonic()
            while not RELEASE.is_set() and time.monotonic() - start < 20:
                time.sleep(0.05)
                HANG_STATE["last_tick"] = time.monotonic()
            HANG_STATE["ended"] = time.monotonic()
        if first == "fail":
            raise gr.Error("GPU out of memory")
        fmt = "mp3" if first == "mp3" else "wav"
        return str(_tone(tmp / f"csm_out_{time.monotonic_ns()}.{fmt}", 0.5, 1, fmt))

    def record_transcription(audio_name, audio, model, task, language, *rest):
        from media_check import format_and_duration

        names = ("device", "compute_type", "batch_size", "vad_method", "word_timestamps", "segment_resolution")
        RECEIVED["whisper"] = {
            audio_name: audio,
            "audio_format": format_and_duration(Path(audio))[0],
            "model": model,
            "task": task,
            "language": language,
            **dict(zip(names, rest, strict=True)),
        }
        # the real app never raises: it answers with the error text (docs/node-protocols.md, WhisperX)
        if model == "fail":
            return "Error: model not found: fail", []
        srt = tmp / "out.srt"
        srt.write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n")
        return f"  hello from {model} in {language or 'auto'}  \n", [str(srt)]

    # gradio names the API inputs after the function's parameters: one function per naming
    def transcribe_audio_file(
        audio_file, model, task, language, device, compute_type, batch_size, vad_method, word_timestamps,
        segment_resolution,
    ):  # fmt: skip
        return record_transcription(
            "audio_file", audio_file, model, task, language, device, compute_type, batch_size, vad_method,
            word_timestamps, segment_resolution,
        )  # fmt: skip

    def transcribe_input_file(
        input_file, model, task, language, device, compute_type, batch_size, vad_method, word_timestamps,
        segment_resolution,
    ):  # fmt: skip
        return record_transcription(
            "input_file", input_file, model, task, language, device, compute_type, batch_size, vad_method,
            word_timestamps, segment_resolution,
        )  # fmt: skip

    with gr.Blocks() as csm_app:
        inputs = [
            gr.Dropdown(["random_voice", "conversational_a", "conversational_b", "upload_voice"]),
            gr.Textbox(),
            gr.Audio(type="filepath"),
            gr.Textbox(),
            gr.Number(),
            gr.Number(precision=0),
            gr.Number(precision=0),
            gr.Number(precision=0),
        ]
        gr.Button().click(
            generate_monologue_audio, inputs, gr.Audio(type="filepath"), api_name="generate_monologue_audio"
        )

    def whisper_blocks(fn):
        with gr.Blocks() as app:
            inputs = [
                gr.Audio(type="filepath"),
                gr.Dropdown(["tiny", "base", "small", "medium", "large", "fail"]),
                gr.Dropdown(["transcribe", "translate"]),
                gr.Textbox(),
                gr.Textbox(),
                gr.Textbox(),
                gr.Number(precision=0),
                gr.Textbox(),
                gr.Checkbox(),
                gr.Textbox(),
            ]
            gr.Button().click(
                fn,
                inputs,
                [gr.Textbox(), gr.File(file_count="multiple")],
                api_name="transcribe_audio",
            )
        return app

    return csm_app, whisper_blocks(transcribe_audio_file), whisper_blocks(transcribe_input_file)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    import gradio as gr
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    tmp = tmp_path_factory.mktemp("gradio_apps")
    csm_app, whisper_app, whisper_old_app = _build_apps(tmp)
    app = FastAPI()

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        SEEN_PATHS.append(request.url.path)
        if request.headers.get("x-c3-api-key") != KEY:
            return JSONResponse({"error": "missing key"}, status_code=401)
        for suffix, left in FAIL_NEXT.items():
            if request.url.path.endswith(suffix) and left > 0:
                FAIL_NEXT[suffix] = left - 1
                return JSONResponse({"error": "bad gateway"}, status_code=502)
        return await call_next(request)

    @app.get("/")
    async def health() -> dict:  # the node's health check
        return {"status": "ok"}

    app = gr.mount_gradio_app(app, csm_app, path="/csm")
    app = gr.mount_gradio_app(app, whisper_app, path="/whisper")
    app = gr.mount_gradio_app(app, whisper_old_app, path="/whisper-old")
    with serve_asgi(app) as base:
        yield NodeUrls(base=base, csm=base + "/csm/", whisper=base + "/whisper/", comfyui="", ollama="", api_key=KEY)
        RELEASE.set()


def _never() -> None:
    return None


# --- CSM ----------------------------------------------------------------------------------------


def test_csm_text_to_mp3(node: NodeUrls, tmp_path: Path) -> None:
    seen: list[int] = []
    phases: list[str] = []
    params = {"text": "Hello there. How are you?", "voice": "conversational_b", "temperature": 1.2, "topk": 20}
    out = csm.run(engine_job(params, "job1", {}, node, tmp_path, _never, seen.append, phases.append))
    assert out == tmp_path / "job1.mp3"
    assert mediaconv.is_mp3(out)  # the app answered WAV: converted
    got = RECEIVED["csm"]
    assert got["speaker_voice"] == "conversational_b"
    assert got["speaker_text"] == ""
    assert got["speaker_audio"] is None
    assert json.loads(got["monologue_json"]) == ["Hello there.", "How are you?"]
    assert got["temperature"] == 1.2
    assert got["topk"] == 20
    assert got["max_audio_length"] == 10000
    assert got["pause_duration"] == 150
    # The app reports no progress: no percentage is made up; the phases say what happened.
    assert seen == []
    assert phases[0] == "uploading_inputs" and phases[-1] == "encoding"
    assert set(phases) <= {"uploading_inputs", "waiting_for_node", "rendering", "encoding"}
    assert any(p.startswith("/csm/") for p in SEEN_PATHS)


def test_csm_clone_sends_mono_reference(node: NodeUrls, tmp_path: Path) -> None:
    ref = _tone(tmp_path / "ref.wav", 1.0, channels=2)
    params = {"monologue": ["mp3", "Second line."], "voice": "clone", "reference_text": "what the reference says"}
    out = csm.run(engine_job(params, "job2", {"reference_audio": ref}, node, tmp_path))
    assert mediaconv.is_mp3(out)
    got = RECEIVED["csm"]
    assert got["speaker_voice"] == "upload_voice"
    assert got["speaker_text"] == "what the reference says"
    assert got["speaker_audio_channels"] == 1
    assert json.loads(got["monologue_json"]) == ["mp3", "Second line."]


def test_csm_app_error(node: NodeUrls, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"^CSM failed: GPU out of memory$"):
        csm.run(engine_job({"monologue": ["fail"]}, "job3", {}, node, tmp_path))


def test_5xx_from_a_healthy_node_is_retried_once(node: NodeUrls, tmp_path: Path) -> None:
    joins = lambda: sum(p.endswith("/csm/gradio_api/queue/join") for p in SEEN_PATHS)  # noqa: E731
    before = joins()
    FAIL_NEXT["/csm/gradio_api/queue/join"] = 1
    out = csm.run(engine_job({"monologue": ["Hi."]}, "retry1", {}, node, tmp_path))
    assert out.is_file() and joins() - before == 2
    FAIL_NEXT["/csm/gradio_api/queue/join"] = 2  # still failing after the retry: the job fails
    with pytest.raises(Exception, match="502"):  # noqa: PT011 - gradio_client's HTTP error, for the worker
        csm.run(engine_job({"monologue": ["Hi."]}, "retry2", {}, node, tmp_path))
    assert joins() - before == 4
    FAIL_NEXT.clear()


def test_csm_wrong_key_is_not_an_engine_error(node: NodeUrls, tmp_path: Path) -> None:
    bad = NodeUrls(base=node.base, csm=node.csm, whisper=node.whisper, comfyui="", ollama="", api_key="wrong")
    with pytest.raises(Exception) as info:  # noqa: PT011 - whatever gradio_client raises, not ours
        csm.run(engine_job({"monologue": ["x"]}, "job4", {}, bad, tmp_path))
    assert not isinstance(info.value, (EngineError, JobStopped))
    assert "wrong" not in str(info.value)


def test_csm_stop_cancels(node: NodeUrls, tmp_path: Path) -> None:
    HANG_STARTED.clear()
    RELEASE.clear()
    HANG_STATE.clear()
    stop_at: list[float] = []

    def should_stop() -> str | None:
        if HANG_STARTED.is_set():
            stop_at.append(time.monotonic())
            return "cancelled by client"
        return None

    with pytest.raises(JobStopped, match="cancelled by client"):
        csm.run(engine_job({"monologue": ["hang"]}, "job5", {}, node, tmp_path, should_stop))
    assert time.monotonic() - stop_at[0] < 3
    # gradio_client's cancel does not stop a function already running in the app's thread:
    time.sleep(0.5)
    assert "ended" not in HANG_STATE and time.monotonic() - float(HANG_STATE["last_tick"]) < 0.5
    # ...but the queue moved on: the next job runs at once.
    started = time.monotonic()
    csm.run(engine_job({"monologue": ["after"]}, "job6", {}, node, tmp_path))
    assert time.monotonic() - started < 10
    RELEASE.set()


# --- Whisper ------------------------------------------------------------------------------------


def test_whisper_transcribes(node: NodeUrls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WHISPER_AUDIO_INPUT_NAME", raising=False)
    audio = _tone(tmp_path / "speech.wav", 1.0)
    params = {"model": "small", "task": "translate", "language": "de"}
    text = whisper.run(engine_job(params, "w1", {"audio": audio}, node, tmp_path))
    assert text == "hello from small in de"
    assert (tmp_path / "w1.txt").read_text() == text
    assert mediaconv.is_mp3(tmp_path / "w1_input.mp3")
    got = RECEIVED["whisper"]
    assert got["audio_format"] == "mp3"
    assert (got["model"], got["task"], got["language"]) == ("small", "translate", "de")
    assert (got["device"], got["compute_type"], got["batch_size"]) == ("cuda", "float16", 16)
    assert (got["vad_method"], got["word_timestamps"], got["segment_resolution"]) == ("pyannote", True, "sentence")


def test_whisper_mp3_input_is_copied(node: NodeUrls, tmp_path: Path) -> None:
    audio = _tone(tmp_path / "speech.mp3", 1.0, fmt="mp3")
    text = whisper.run(engine_job({}, "w2", {"audio": audio}, node, tmp_path))
    assert text == "hello from medium in auto"
    assert (tmp_path / "w2_input.mp3").read_bytes() == audio.read_bytes()


@pytest.mark.parametrize("env_name", ["input_file", ""])
def test_whisper_input_file_name(
    node: NodeUrls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env_name: str
) -> None:
    monkeypatch.setenv("WHISPER_AUDIO_INPUT_NAME", env_name)
    old = NodeUrls(
        base=node.base, csm=node.csm, whisper=node.base + "/whisper-old/", comfyui="", ollama="", api_key=KEY
    )
    audio = _tone(tmp_path / "speech.wav", 0.5)
    assert whisper.run(engine_job({}, "w3", {"audio": audio}, old, tmp_path)).startswith("hello")
    assert RECEIVED["whisper"]["audio_format"] == "mp3"
    assert "input_file" in RECEIVED["whisper"]


def test_whisper_app_error(node: NodeUrls, tmp_path: Path) -> None:
    audio = _tone(tmp_path / "speech.wav", 0.5)
    with pytest.raises(EngineError, match=r"^Whisper failed: model not found: fail$"):
        whisper.run(engine_job({"model": "fail"}, "w4", {"audio": audio}, node, tmp_path))


def test_whisper_stop_before_start(node: NodeUrls, tmp_path: Path) -> None:
    audio = _tone(tmp_path / "speech.wav", 0.5)
    with pytest.raises(JobStopped, match="max_time"):
        whisper.run(engine_job({}, "w5", {"audio": audio}, node, tmp_path, lambda: "max_time"))
