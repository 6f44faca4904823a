"""Pipeline hand-off latency: how soon a pipeline's second step starts after its first finishes.

Starts the soak's stack (soak_stack.py: redis-server, the dev node, gunicorn, --workers worker processes,
a file server with a face image) and runs --pipelines text -> speech -> talking portrait pipelines
(POST /pipelines: a csm step and a portrait step taking `{{speech.result_url}}`), --concurrency at a time.
For each it reads the gap from the speech step's finished_at to the portrait step's started_at (both set
in Redis by the transitions, from the workers' clocks on this machine): the hand-off is the transition
that finishes the speech, the portrait queued at the end taken next, a worker taking it and claiming it.

    python bench/pipeline_latency.py [--pipelines 20] [--workers 2] [--concurrency 1]

One warm-up pipeline runs first (it launches the node). Prints the gap's p50 / p90 / max (target p90 <=
1 s), how many portraits ran on the node their speech ran on, and how many nodes the dev node launched
during the measured pipelines (target 0: none while one is warm).
Exit status 1 when a target is missed or a pipeline did not succeed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

from soak_common import http, log, wait_until
from soak_stack import devnode_nodes, start_stack, stop_all_started

TEXT = "Hello there. This sentence becomes speech, and the speech a talking portrait."


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def make_face(inputs: Path) -> None:
    from PIL import Image
    from skimage import data as sample_data

    face = Image.fromarray(sample_data.astronaut())
    face.thumbnail((256, 256))
    face.save(inputs / "face.jpg", quality=88)


def run_pipeline(api_url: str, face_url: str, timeout_s: float) -> str:
    status, answer = http("POST", api_url + "/pipelines", {"steps": {
        "speech": {"type": "csm", "text": TEXT, "voice": "conversational_a"},
        "video": {"type": "portrait", "image_url": face_url, "audio_url": "{{speech.result_url}}"}}})
    if status != 200:
        raise RuntimeError(f"POST /pipelines answered HTTP {status}: {answer}")

    def finished() -> bool:
        code, now = http("GET", f"{api_url}/pipelines/{answer['id']}")
        return code == 200 and now["status"] in ("success", "failed", "cancelled")

    wait_until(finished, timeout_s, f"pipeline {answer['id']}", interval_s=0.2)
    return answer["id"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipelines", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1, help="pipelines running at once")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one pipeline may take")
    parser.add_argument("--target", type=float, default=1.0, help="p90 gap target (s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pipeline-latency-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            stack = start_stack(tmp, args.workers)
            make_face(tmp / "inputs")
            face_url = f"{stack.files_url}/face.jpg"
            run_pipeline(stack.api_url, face_url, args.timeout)  # the warm-up: it launches the node
            warm_nodes = len(devnode_nodes(stack.devnode_url))
            started = time.time()
            ids: list[str] = []
            errors: list[str] = []
            lock = threading.Lock()
            todo = list(range(args.pipelines))

            def runner() -> None:
                while True:
                    with lock:
                        if not todo:
                            return
                        todo.pop()
                    try:
                        pipeline_id = run_pipeline(stack.api_url, face_url, args.timeout)
                        with lock:
                            ids.append(pipeline_id)
                    except Exception as exc:  # noqa: BLE001 - reported below
                        with lock:
                            errors.append(str(exc))

            threads = [threading.Thread(target=runner) for _ in range(args.concurrency)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.time() - started
            assert stack.r is not None
            gaps, same_node, failed = [], 0, 0
            for pipeline_id in ids:
                record = stack.r.hgetall(f"pipeline:{pipeline_id}")
                steps = json.loads(record["steps"])
                speech = stack.r.hgetall(f"job:{steps['speech']}")
                video = stack.r.hgetall(f"job:{steps['video']}")
                if record["status"] != "success":
                    failed += 1
                    errors.append(f"pipeline {pipeline_id} {record['status']}: {record.get('error')}")
                    continue
                gaps.append(float(video["started_at"]) - float(speech["finished_at"]))
                same_node += video.get("node_id") == speech.get("node_id") != ""
            launched = [n for n in devnode_nodes(stack.devnode_url) if n.get("launched_at", 0) >= started]
        finally:
            stop_all_started()

    print(f"pipelines: {len(ids)} finished of {args.pipelines} ({failed} not successful), {args.workers} workers, "
          f"{args.concurrency} at a time, {elapsed:.1f} s")
    for error in errors[:5]:
        print(f"  error: {error}")
    ok = not errors and len(gaps) == args.pipelines
    if gaps:
        p90 = percentile(gaps, 90)
        print(f"speech finished -> portrait started: p50 {percentile(gaps, 50) * 1000:.0f} ms, "
              f"p90 {p90 * 1000:.0f} ms, max {max(gaps) * 1000:.0f} ms (target p90 <= {args.target:g} s)")
        print(f"portrait on the speech's node: {same_node} of {len(gaps)}")
        ok = ok and p90 <= args.target
    print(f"nodes launched: {warm_nodes} by the warm-up pipeline, {len(launched)} during the {args.pipelines} "
          "(target 0: none while one is warm)")
    ok = ok and len(launched) == 0
    log("done" if ok else "a target was missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
