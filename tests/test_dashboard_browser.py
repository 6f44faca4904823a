"""The whole stack in a real browser: redis-server, the dev node, the API (gunicorn), a worker; jobs
submitted with the `c3-render` CLI (including `submit portrait ... --wait --out talk.mp4`), and the
dashboard opened in headless Chromium (Debian's `chromium`, driven by Playwright with the system
browser; never `playwright install`). Checks, with an admin key, the jobs, their states, the detail
view, the workers and that the Cancel button cancels; then, with the ordinary key that submitted them,
that the page shows that key's jobs only and says why the numbers and workers are not shown. Saves a
screenshot in the test's tmp dir (and in /work/wt/notes when that directory exists, for the team to look
at)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from conftest import ROOT, RedisServer, clean_env, free_port, wait_for
from devnode_helpers import start_devnode, stop_devnode
from PIL import Image
from system import ffprobe, http_json, running_nodes, service_env, start_api, start_file_server, start_worker

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
KEY = "dashboard-test-key"  # the CLI's and the submissions' (an ordinary key)
OTHER = "dashboard-other-key"  # another client's
ADMIN = "dashboard-admin-key"  # the operator's: every job, the numbers, the workers
NOTES_DIR = Path("/work/wt/notes")


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    tmp = tmp_path_factory.mktemp("dashboard")
    redis.Redis.from_url(redis_server.url).flushall()
    devnode_proc, devnode_url = start_devnode(tmp)
    env = service_env(redis_server.url, devnode_url, tmp, GPU_IDLE_TIMEOUT="30", C3_RENDER_API_KEYS=f"{KEY},{OTHER}",
                      C3_RENDER_ADMIN_KEYS=ADMIN)
    api, api_url = start_api(env, tmp)
    inputs = tmp / "inputs"
    inputs.mkdir()
    from skimage import data as sample_data

    Image.fromarray(sample_data.astronaut()).save(inputs / "astronaut.jpg", quality=90)
    (inputs / "page.jpg").write_text("<html>not an image</html>")
    files, files_url = start_file_server(inputs)
    workers: list = []  # the test starts the worker once it has cancelled a job while it was queued
    yield {"api": api_url, "files": files_url, "tmp": tmp, "env": env, "workers": workers}
    for worker in workers:
        worker.stop()
    api.stop()
    files.shutdown()
    nodes_left = running_nodes(devnode_url)
    stop_devnode(devnode_proc)
    assert not nodes_left, nodes_left


def cli(stack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "c3_render_cli.py"), *args], cwd=str(ROOT),
                          env=clean_env(C3_RENDER_API=stack["api"], C3_RENDER_API_KEY=KEY),
                          capture_output=True, text=True, timeout=timeout)


def submit(stack, route: str, body: dict, key: str = KEY) -> str:
    status, answer = http_json("POST", stack["api"] + route, body, {"X-C3-RENDER-KEY": key})
    assert status == 200, answer
    return answer["id"]


def status_of(page, job_id: str):
    return page.locator(f'tr[data-job-id="{job_id}"] [data-status]')


def test_cli_and_dashboard_on_the_whole_stack(stack):
    from playwright.sync_api import expect, sync_playwright

    tmp = stack["tmp"]
    target = submit(stack, "/csm", {"text": "This job is cancelled from the dashboard."})
    failing = submit(stack, "/analyze", {"image_url": stack["files"] + "/page.jpg"})

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        outside = []
        page.on("request", lambda request: None if request.url.startswith(stack["api"])
                else outside.append(request.url))
        page.goto(stack["api"] + "/dashboard")
        expect(page.locator("#problem")).to_contain_text("API key")  # no key yet: the data routes say 401
        page.fill("#api-key", ADMIN)
        page.click("#key-form button")
        rows = page.locator("#jobs tbody tr")
        expect(rows).to_have_count(2)
        expect(status_of(page, target)).to_have_text("queued")
        expect(page.locator(f'tr[data-job-id="{target}"] .progress')).to_have_text("#1 in queue")
        expect(page.locator("#queue-depth")).to_have_text("2")
        expect(page.locator("#redis-role")).to_have_text("primary, 0 replicas")  # one Redis, no replica

        # no worker yet, so the job is still queued when the button is pressed
        page.locator(f'tr[data-job-id="{target}"] button.cancel').click()
        expect(status_of(page, target)).to_have_text("cancelled")
        expect(page.locator(f'tr[data-job-id="{target}"] button.cancel')).to_have_count(0)
        expect(page.locator("#queue-depth")).to_have_text("1")

        stack["workers"].append(start_worker(stack["env"], tmp, "dashboard-worker"))
        speech = tmp / "speech.mp3"
        done = cli(stack, "submit", "csm", "--text", "Hello from the dashboard test. Two sentences.",
                   "--voice", "conversational_a", "--wait", "--out", str(speech))
        assert done.returncode == 0, done.stderr
        assert ffprobe(speech)["format"]["format_name"] == "mp3"
        talk = tmp / "talk.mp4"
        portrait = cli(stack, "submit", "portrait", "--image-url", stack["files"] + "/astronaut.jpg",
                       "--audio-url", done.stdout.strip().splitlines()[-1], "--wait", "--out", str(talk))
        assert portrait.returncode == 0, portrait.stderr
        video = [s for s in ffprobe(talk)["streams"] if s["codec_type"] == "video"]
        assert video and video[0]["codec_name"] == "h264"

        expect(rows).to_have_count(4)
        expect(status_of(page, failing)).to_have_text("failed")
        expect(page.locator(f'tr[data-job-id="{failing}"] .error')).to_contain_text("not an image")
        expect(page.locator("#failures")).to_contain_text("not an image")
        expect(page.locator('#jobs tbody [data-status="success"]')).to_have_count(2)
        expect(page.locator('#workers tbody tr[data-worker="dashboard-worker"]')).to_contain_text("s ago")
        expect(page.locator("#throughput")).to_have_text("4")

        page.locator(f'tr[data-job-id="{failing}"]').click()
        expect(page.locator('#detail-fields [data-field="error"]')).to_contain_text("not an image")
        expect(page.locator("#detail-history tbody tr")).to_have_count(3)  # queued, running, failed

        page.select_option("#filter-status", "cancelled")
        expect(rows).to_have_count(1)
        expect(rows.first).to_have_attribute("data-job-id", target)
        page.select_option("#filter-status", "")
        expect(rows).to_have_count(4)

        portrait_id = rows.first.get_attribute("data-job-id")  # newest first
        rows.first.click()
        expect(page.locator('#detail-fields [data-field="type"]')).to_have_text("portrait")
        expect(page.locator('#detail-fields [data-field="result"] a')).to_have_text("result file")
        shot = tmp / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)

        # another client's job: the admin sees it, the key that submitted the others does not
        foreign = submit(stack, "/analyze", {"image_url": stack["files"] + "/page.jpg"}, key=OTHER)
        expect(rows).to_have_count(5)
        expect(page.locator(f'tr[data-job-id="{foreign}"]')).to_have_count(1)
        expect(page.locator("#scope")).to_be_hidden()
        page.fill("#api-key", KEY)
        page.click("#key-form button")
        expect(page.locator("#scope")).to_contain_text("admin keys (C3_RENDER_ADMIN_KEYS)")
        expect(page.locator("#numbers")).to_be_hidden()
        expect(page.locator("#workers-section")).to_be_hidden()
        expect(rows).to_have_count(4)
        expect(page.locator(f'tr[data-job-id="{foreign}"]')).to_have_count(0)
        expect(page.locator("#problem")).to_be_hidden()
        page.locator(f'tr[data-job-id="{failing}"]').click()
        expect(page.locator('#detail-fields [data-field="error"]')).to_contain_text("not an image")
        page.screenshot(path=str(tmp / "dashboard-own-jobs.png"), full_page=True)
        assert http_json("GET", f"{stack['api']}/status/{foreign}", headers={"X-C3-RENDER-KEY": KEY})[0] == 404

        page.goto(stack["api"] + "/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("c3-render", timeout=15_000)
        expect(page.locator(".opblock-summary-path").filter(has_text="/events/")).to_have_count(1)
        page.screenshot(path=str(tmp / "docs.png"))
        browser.close()
    assert not outside, f"the pages fetched from elsewhere: {outside}"  # no CDN
    assert shot.stat().st_size > 10_000
    if NOTES_DIR.is_dir():
        shutil.copy(shot, NOTES_DIR / "dashboard.png")
    status, record = http_json("GET", f"{stack['api']}/jobs/{portrait_id}", headers={"X-C3-RENDER-KEY": KEY})
    assert status == 200 and record["result"]["result_url"]
    wait_for(lambda: http_json("GET", f"{stack['api']}/status/{foreign}", headers={"X-C3-RENDER-KEY": OTHER})[1]
             .get("status") == "failed", 60, what="the other client's job to fail")
    metrics = http_text(stack["api"] + "/metrics")
    assert 'c3_render_jobs_total{status="cancelled",type="csm"} 1.0' in metrics
    assert 'c3_render_jobs_total{status="success",type="portrait"} 1.0' in metrics
    assert 'c3_render_jobs_total{status="failed",type="analyze"} 2.0' in metrics  # with the other client's


def http_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_the_dashboard_lists_pipelines_with_their_steps_to_their_owner(stack):
    """A talk pipeline from the CLI (the ordinary key's) and a failing one of another client's: the admin
    sees both with their steps, the ordinary key only its own; a step opens as a job in the detail view."""
    from playwright.sync_api import expect, sync_playwright

    if not stack["workers"]:  # run on its own
        stack["workers"].append(start_worker(stack["env"], stack["tmp"], "dashboard-worker"))
    done = cli(stack, "submit", "talk", "--text", "Hello from a pipeline.", "--image-url",
               stack["files"] + "/astronaut.jpg", "--wait")
    assert done.returncode == 0, done.stderr
    mine = done.stderr.split("queued pipeline ", 1)[1].split()[0]
    status, foreign = http_json("POST", stack["api"] + "/pipelines", {"steps": {
        "look": {"type": "analyze", "image_url": stack["files"] + "/page.jpg"},
        "say": {"type": "csm", "text": "{{look.text}}"}}}, {"X-C3-RENDER-KEY": OTHER})
    assert status == 200, foreign
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(stack["api"] + "/dashboard")
        page.fill("#api-key", ADMIN)
        page.click("#key-form button")
        rows = page.locator("#pipelines tbody tr")
        expect(rows).to_have_count(2)
        theirs = page.locator(f'tr[data-pipeline-id="{foreign["id"]}"]')
        expect(theirs.locator("td [data-status]").first).to_have_text("failed", timeout=60_000)
        expect(theirs.locator(".error")).to_contain_text('step "look" failed')
        expect(theirs.locator('[data-step="say"] [data-status]')).to_have_text("failed")
        talk = page.locator(f'tr[data-pipeline-id="{mine}"]')
        expect(talk.locator("td [data-status]").first).to_have_text("success")
        expect(talk.locator('[data-step="speech"] [data-status]')).to_have_text("success")
        talk.locator('[data-step="video"]').click()
        expect(page.locator('#detail-fields [data-field="type"]')).to_have_text("portrait")
        expect(page.locator('#detail-fields [data-field="pipeline"]')).to_have_text(mine)
        page.screenshot(path=str(stack["tmp"] / "dashboard-pipelines.png"), full_page=True)

        page.fill("#api-key", KEY)
        page.click("#key-form button")
        expect(rows).to_have_count(1)
        expect(rows.first).to_have_attribute("data-pipeline-id", mine)
        expect(page.locator("#problem")).to_be_hidden()
        browser.close()


def test_a_waiting_step_has_a_cancel_button_that_cancels_it(tmp_path):
    """API and a Redis of its own only (no worker, so nothing moves; the module's stack keeps its own Redis
    and nodes): a pipeline's second step is waiting for the first; its row has a Cancel button, as the
    queued one has, and the API cancels it."""
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    own_redis = RedisServer(port=free_port(), data_dir=tmp_path / "redis")
    own_redis.start()
    api, api_url = start_api(clean_env(REDIS_URL=own_redis.url, OUTPUT_DIR=str(tmp_path / "output")), tmp_path)
    try:
        status, answer = http_json("POST", api_url + "/pipelines", {"steps": {
            "speech": {"type": "csm", "text": "Hello."},
            "video": {"type": "portrait", "image_url": "https://example.com/face.jpg",
                      "audio_url": "{{speech.result_url}}"}}})
        assert status == 200, answer
        waiting = answer["steps"]["video"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(api_url + "/dashboard")
            expect(status_of(page, waiting)).to_have_text("waiting")
            page.locator(f'tr[data-job-id="{waiting}"] button.cancel').click()
            expect(status_of(page, waiting)).to_have_text("cancelled")
            expect(page.locator(f'tr[data-job-id="{waiting}"] button.cancel')).to_have_count(0)
            browser.close()
        assert http_json("GET", f"{api_url}/status/{waiting}")[1]["status"] == "cancelled"
    finally:
        api.stop()
        own_redis.stop()
