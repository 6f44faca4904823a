"""The dev node's node types, /types, the lost-launch-answer faults and the request counter."""

from __future__ import annotations

import base64
import io
import time

import pytest
from devnode_helpers import call, wait_node_up
from PIL import Image


@pytest.fixture(autouse=True)
def _reset(devnode: str):
    call(devnode, "POST", "/admin/reset")
    yield
    call(devnode, "POST", "/admin/reset")


def launch(devnode: str, node_type: str) -> dict:
    status, answer = call(devnode, "POST", "/api/v0/launch", {"type": node_type, "expires": int(time.time()) + 600})
    assert status == 200, answer
    return answer


def test_types_lists_both_node_types(devnode: str) -> None:
    status, types = call(devnode, "GET", "/api/v0/types")
    assert status == 200 and set(types) == {"media:fast", "ollama_webui:fast"}
    assert call(devnode, "GET", "/api/v0/types", key=None)[0] == 401


def test_vision_node_serves_ollama_at_its_root(devnode: str) -> None:
    vision = launch(devnode, "ollama_webui:fast")
    wait_node_up(vision["node"])
    base = f"http://{vision['node']}"
    status, text = call(base, "GET", "/")
    assert status == 200 and text == "Ollama is running"
    status, tags = call(base, "GET", "/api/tags")
    assert status == 200 and tags["models"][0]["name"] == "llama3.2-vision:11b"
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(buffer, format="PNG")
    status, answer = call(base, "POST", "/api/generate", {"model": "llama3.2-vision:11b", "prompt": "Describe",
                                                          "images": [base64.b64encode(buffer.getvalue()).decode()],
                                                          "stream": False}, timeout=60)
    assert status == 200 and answer["done"] and "0 faces" in answer["response"]
    assert call(base, "GET", "/csm/config")[0] == 404  # a vision node has no media apps
    assert call(base, "GET", "/api/tags", key=None)[0] == 401
    call(devnode, "POST", "/api/v0/stop", {"workload": vision["workload"]})


def test_media_node_has_no_ollama(devnode: str) -> None:
    media = launch(devnode, "media:fast")
    wait_node_up(media["node"])
    base = f"http://{media['node']}"
    assert call(base, "GET", "/csm/config")[0] == 200
    assert call(base, "GET", "/ollama/api/tags")[0] == 404
    assert call(base, "GET", "/api/tags")[0] == 404
    call(devnode, "POST", "/api/v0/stop", {"workload": media["workload"]})


def running(devnode: str) -> set[str]:
    return {row["workload"] for row in call(devnode, "POST", "/api/v0/workloads", {"running": True})[1]}


def test_lost_launch_answer_still_creates_the_node(devnode: str) -> None:
    before = running(devnode)
    call(devnode, "POST", "/admin/faults", {"launch_answer_lost": 1}, key=None)
    status, page = call(devnode, "POST", "/api/v0/launch", {"type": "media:fast", "expires": int(time.time()) + 60})
    assert status == 504 and "Gateway Time-out" in page
    created = running(devnode) - before
    assert len(created) == 1  # the node runs although the client never heard of it
    assert launch(devnode, "media:fast")["workload"] not in created  # the fault was used up
    for workload in running(devnode) - before:
        call(devnode, "POST", "/api/v0/stop", {"workload": workload})


def test_slow_launch_answer_node_exists_meanwhile(devnode: str) -> None:
    before = running(devnode)
    call(devnode, "POST", "/admin/faults", {"launch_answer_delay_s": 3}, key=None)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        call(devnode, "POST", "/api/v0/launch", {"type": "media:fast", "expires": int(time.time()) + 60}, timeout=1)
    assert len(running(devnode) - before) == 1 and time.monotonic() - started < 3
    for workload in running(devnode) - before:
        call(devnode, "POST", "/api/v0/stop", {"workload": workload})


def test_requests_are_counted_per_route(devnode: str) -> None:
    status, first = call(devnode, "GET", "/admin/requests", key=None)
    assert status == 200
    media = launch(devnode, "media:fast")
    wait_node_up(media["node"])
    call(devnode, "POST", "/api/v0/workloads", {"running": True})
    call(f"http://{media['node']}", "GET", "/csm/config")
    _, after = call(devnode, "GET", "/admin/requests", key=None)
    assert after["POST /api/v0/launch"] == first.get("POST /api/v0/launch", 0) + 1
    assert after["POST /api/v0/workloads"] == first.get("POST /api/v0/workloads", 0) + 1
    assert after["node GET /"] > first.get("node GET /", 0)
    assert after["node /csm"] == first.get("node /csm", 0) + 1
    call(devnode, "POST", "/api/v0/stop", {"workload": media["workload"]})
