"""analyze.py against a small Ollama-like HTTP server on 127.0.0.1 (stdlib http.server in a thread)."""

import base64
import io
import json
import select
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the engines live at the repo root

from conftest import engine_job  # noqa: E402

import analyze  # noqa: E402
from engine_api import EngineError, JobStopped, NodeUrls  # noqa: E402

KEY = "ollama-key"
STATE: dict = {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        return

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        STATE["path"] = self.path
        STATE["key"] = self.headers.get("X-C3-API-KEY")
        STATE["body"] = body
        if self.headers.get("X-C3-API-KEY") != KEY:
            self._send(401, b'{"error": "unauthorized"}')
            return
        mode = STATE["mode"]
        if mode == "stream":
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece, done in (("  A red ", False), ("square on ", False), ("white.\n", False), ("", True)):
                line = json.dumps({"model": body["model"], "response": piece, "done": done}).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif mode == "single":  # a server that ignores "stream" and answers pretty-printed JSON
            self._send(200, json.dumps({"response": "One answer.", "done": True}, indent=2).encode())
        elif mode == "missing_model":
            self._send(404, b'{"error":"model \\"nope\\" not found, try pulling it first"}')
        elif mode == "error_line":
            self._send(200, b'{"error":"image could not be decoded"}\n', "application/x-ndjson")
        elif mode == "hang":  # loads the model forever; notice when the client goes away
            STATE["hang_started"] = time.monotonic()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                readable, _, _ = select.select([self.connection], [], [], 0.1)
                if readable and self.connection.recv(1) == b"":
                    STATE["client_gone"] = time.monotonic()
                    return


@pytest.fixture(scope="module")
def node():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield NodeUrls(base=base, csm="", whisper="", comfyui="", ollama=base + "/ollama", api_key=KEY)
    server.shutdown()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.new("RGBA", (64, 48), (255, 0, 0, 255)).save(path)
    return path


def _mode(mode: str) -> None:
    STATE.clear()
    STATE["mode"] = mode


def test_streamed_answer(node: NodeUrls, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_MODEL", raising=False)
    _mode("stream")
    seen: list[int] = []
    phases: list[str] = []
    text = analyze.run(engine_job({}, "a1", {"image": image}, node, tmp_path, progress=seen.append,
                                   phase=phases.append))
    assert text == "A red square on white."
    assert seen == [] and phases == ["rendering"]  # no made-up percentage: Ollama streams without a total
    assert (tmp_path / "a1.txt").read_text() == text
    assert STATE["path"] == "/ollama/api/generate"
    assert STATE["key"] == KEY
    body = STATE["body"]
    assert body["model"] == "llama3.2-vision:11b"
    assert body["prompt"] == analyze.DEFAULT_PROMPT
    assert body["stream"] is True
    sent = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert sent.format == "JPEG" and sent.mode == "RGB" and sent.size == (64, 48)
    assert (tmp_path / "a1_input.jpg").read_bytes() == base64.b64decode(body["images"][0])


def test_model_and_prompt(node: NodeUrls, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _mode("single")
    monkeypatch.setenv("OLLAMA_MODEL", "llava:7b")
    assert analyze.run(engine_job({"prompt": "Count faces."}, "a2", {"image": image}, node, tmp_path)) == "One answer."
    assert (STATE["body"]["model"], STATE["body"]["prompt"]) == ("llava:7b", "Count faces.")
    analyze.run(engine_job({"model": "m:1"}, "a3", {"image": image}, node, tmp_path))
    assert STATE["body"]["model"] == "m:1"


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("missing_model", 'vision model failed: HTTP 404: model "nope" not found, try pulling it first'),
        ("error_line", "vision model failed: image could not be decoded"),
    ],
)
def test_errors(node: NodeUrls, image: Path, tmp_path: Path, mode: str, message: str) -> None:
    _mode(mode)
    with pytest.raises(EngineError) as info:
        analyze.run(engine_job({}, "a4", {"image": image}, node, tmp_path))
    assert str(info.value) == message


def test_stop_disconnects(node: NodeUrls, image: Path, tmp_path: Path) -> None:
    _mode("hang")
    started = time.monotonic()

    def should_stop() -> str | None:
        return "cancelled" if "hang_started" in STATE and time.monotonic() - started > 1 else None

    with pytest.raises(JobStopped, match="cancelled"):
        analyze.run(engine_job({}, "a5", {"image": image}, node, tmp_path, should_stop))
    stopped = time.monotonic()
    assert stopped - started < 3
    deadline = time.monotonic() + 2
    while "client_gone" not in STATE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert STATE["client_gone"] - stopped < 1  # the node saw the client go at once


def test_unreachable_node_is_not_an_engine_error(image: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = NodeUrls(base="", csm="", whisper="", comfyui="", ollama=f"http://127.0.0.1:{port}", api_key=KEY)
    with pytest.raises(OSError):
        analyze.run(engine_job({}, "a6", {"image": image}, gone, tmp_path))
