"""A node's two Gradio apps as gradio 5 serves them, for tests/test_gradio5_client.py.

Run with the Python of a throwaway gradio-5 environment (scripts/gradio5-venv.sh), never the project's:
`python tests/gradio5_node.py PORT`. It mounts two small Blocks under /csm and /whisper (path prefixes,
like a media:fast node) with the real apps' endpoint names, inputs in their order, and failure styles:
CSM raises gr.Error("Generation failed: ..."), WhisperX answers ("Error: <message>", []) (docs/node-protocols.md,
CSM and WhisperX). The engines are stand-ins: a tone for speech, a fixed sentence for a transcript.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import gradio as gr
import uvicorn
from fastapi import FastAPI


def generate_monologue_audio(speaker_voice, speaker_text, speaker_audio, monologue_json, temperature, topk,
                             max_audio_length, pause_duration):
    if "fail" in monologue_json:
        raise gr.Error("Generation failed: CUDA out of memory")
    out = Path(tempfile.mkdtemp()) / "monologue.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=300:duration=1",
                    "-ac", "1", str(out)], check=True)
    return str(out)


def transcribe_audio(audio_file, model, task, language, device, compute_type, batch_size, vad_method,
                     word_timestamps, segment_resolution):
    try:
        if model == "fail" or "-" in (language or ""):
            raise ValueError(f"'{language}' is not a valid language code" if language else "model failed")
        txt = Path(tempfile.mkdtemp()) / "transcript.txt"
        txt.write_text("hello from gradio five")
        return f"hello from gradio five in {language or 'auto'}", [str(txt)]
    except Exception as exc:  # the real app catches everything
        return f"Error: {exc}", []


def build() -> FastAPI:
    with gr.Blocks() as csm:
        inputs = [gr.Dropdown(["random_voice", "conversational_a", "conversational_b", "upload_voice"],
                              value="conversational_a"),
                  gr.Textbox(), gr.Audio(type="filepath"), gr.TextArea(),
                  gr.Slider(0.1, 2.0, value=0.9, step=0.1), gr.Slider(1, 100, value=50, step=1),
                  gr.Slider(1000, 30000, value=10000, step=1000), gr.Slider(0, 1000, value=150, step=10)]
        gr.Button().click(generate_monologue_audio, inputs, gr.Audio(type="filepath"),
                          api_name="generate_monologue_audio")
    with gr.Blocks() as whisper:
        inputs = [gr.Audio(type="filepath"),
                  gr.Dropdown(["tiny", "base", "small", "medium", "large", "large-v2", "large-v3", "fail"],
                              value="medium"),
                  gr.Dropdown(["transcribe", "translate"], value="transcribe"), gr.Textbox(),
                  gr.Dropdown(["cuda", "cpu"], value="cuda"), gr.Dropdown(["float16", "int8"], value="float16"),
                  gr.Slider(1, 64, value=16, step=1), gr.Dropdown(["pyannote", "silero"], value="pyannote"),
                  gr.Checkbox(value=True, visible=False), gr.Dropdown(["sentence", "chunk"], value="sentence")]
        gr.Button().click(transcribe_audio, inputs, [gr.Textbox(), gr.File(file_count="multiple")])
    app = FastAPI()
    app = gr.mount_gradio_app(app, csm, path="/csm")
    return gr.mount_gradio_app(app, whisper, path="/whisper")


if __name__ == "__main__":
    print("gradio", gr.__version__, flush=True)
    uvicorn.run(build(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
