"""The worker's Gradio client (csm.py, whisper.py on gradio_client 2.x) against a real gradio 5 server.

The media:fast node apps run gradio 5 (docs/node-protocols.md, Gradio apps on the nodes); the project's
own environment has gradio 6 for the dev node, so tests/test_engines_gradio.py covers gradio 6 only.
This test runs tests/gradio5_node.py (two apps mounted under /csm and /whisper, like a node) with the
Python of a separate gradio-5 environment, made once by scripts/gradio5-venv.sh (or named by
GRADIO5_PYTHON); it is skipped, saying so, when that environment is missing. Tests never install
packages themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, engine_job, free_port, wait_for

sys.path.insert(0, str(ROOT))  # the engines live at the repo root

import csm  # noqa: E402
import mediaconv  # noqa: E402
import whisper  # noqa: E402
from engine_api import EngineError, NodeUrls  # noqa: E402

GRADIO5_PYTHON = Path(os.environ.get("GRADIO5_PYTHON") or ROOT / ".venv-gradio5" / "bin" / "python")

pytestmark = pytest.mark.skipif(
    not GRADIO5_PYTHON.exists(), reason="no gradio-5 environment: run scripts/gradio5-venv.sh to test against gradio 5"
)


def _answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("gradio5") / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    with log.open("wb") as out:
        proc = subprocess.Popen([str(GRADIO5_PYTHON), str(ROOT / "tests" / "gradio5_node.py"), str(port)],
                                cwd=str(ROOT / "tests"), env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _answers(base + "/csm/config"), 60, what="the gradio 5 apps")
        assert proc.poll() is None, log.read_text()
        assert log.read_text().startswith("gradio 5."), log.read_text()
        yield NodeUrls(base=base, csm=base + "/csm/", whisper=base + "/whisper/", comfyui="", ollama="",
                       api_key="k")
    finally:
        proc.terminate()
        proc.wait(10)


def _tone(path: Path) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
                    str(path)], check=True)
    return path


def test_csm_against_gradio5(node: NodeUrls, tmp_path: Path) -> None:
    out = csm.run(engine_job({"text": "Hello there."}, "g5", {}, node, tmp_path))
    assert out == tmp_path / "g5.mp3" and mediaconv.is_mp3(out)
    with pytest.raises(EngineError, match="^CSM failed: Generation failed: CUDA out of memory$"):
        csm.run(engine_job({"text": "fail"}, "g5b", {}, node, tmp_path))


def test_whisper_against_gradio5(node: NodeUrls, tmp_path: Path) -> None:
    audio = _tone(tmp_path / "a.wav")
    text = whisper.run(engine_job({"language": "pt-BR"}, "g5w", {"audio": audio}, node, tmp_path))
    assert text == "hello from gradio five in pt"  # the region subtag never reaches the node
    with pytest.raises(EngineError, match="^Whisper failed: model failed$"):
        whisper.run(engine_job({"model": "fail"}, "g5x", {"audio": audio}, node, tmp_path))
