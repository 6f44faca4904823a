"""The `c3-render` command: submit, follow, list and cancel jobs from a shell (click + rich).

    c3-render --api URL [--key KEY] submit csm --text "Hello." [--voice V] [--wait] [--out hello.mp3]
    c3-render submit whisper|portrait|analyze ...   status ID   result ID   cancel ID   jobs   watch ID
    c3-render submit talk --text "Hello." --image-url URL [--voice V] --wait --out talk.mp4   (a pipeline:
    text -> speech -> talking portrait)   c3-render pipeline FILE.json [--wait]   pipeline-status ID
    pipeline-cancel ID

--api and --key default to $C3_RENDER_API and $C3_RENDER_API_KEY. With --wait (and in `watch`) a
terminal shows a live line (status, phase, progress, queue position, elapsed); without a terminal, one
plain line per change. Exit status: 0 success, 1 the job failed or was cancelled (its error on stderr)
or the service refused, 3 --timeout passed first. Built on c3_render_client.py.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

import c3_render_client as c3
from jobspec import JOB_TYPES, REFERENCE_PATTERN, STATUSES

REFERENCE = re.compile(REFERENCE_PATTERN)  # {{<step>.<output>}}: group 1 is the step
EXIT_FAILED = 1
EXIT_TIMEOUT = 3

out = Console()
err = Console(stderr=True)


def describe(job: dict[str, Any], started: float) -> str:
    """One line about a job: status, phase, progress, queue position, elapsed."""
    parts = [job["status"]]
    if job.get("phase"):
        parts.append(str(job["phase"]))
    if job.get("progress") is not None:
        parts.append(f"{job['progress']}%")
    if job.get("queue_position"):
        parts.append(f"queue position {job['queue_position']}")
    if job.get("cancel_requested"):
        parts.append("cancelling")
    if job.get("node_seconds") is not None:  # what it cost: its share of its node's time (and price)
        parts.append(f"{job['node_seconds']} node-s" + (f" (cost {job['cost']})" if job.get("cost") is not None
                                                          else ""))
    parts.append(f"{time.monotonic() - started:.0f}s elapsed")
    return " · ".join(parts)


def follow(api: c3.Api, job_id: str, timeout: float | None) -> dict[str, Any]:
    """Show the job's progress until it ends; its final status object (exits non-zero on failure)."""
    started = time.monotonic()
    try:
        if out.is_terminal:
            with out.status(f"job {job_id}: waiting", spinner="dots") as display:
                final = c3.wait(api, job_id, timeout,
                                on_update=lambda job: display.update(f"job {job_id}: {describe(job, started)}"))
        else:
            final = c3.wait(api, job_id, timeout,
                            on_update=lambda job: click.echo(f"{job_id} {describe(job, started)}"))
    except c3.JobFailed as exc:
        err.print(f"[red]job {job_id} {exc.job['status']}:[/red] {exc.job.get('error') or exc.job['status']}",
                  highlight=False)
        sys.exit(EXIT_FAILED)
    except c3.WaitTimeout as exc:
        err.print(f"[yellow]{exc}[/yellow]", highlight=False)
        sys.exit(EXIT_TIMEOUT)
    return final


def print_result(api: c3.Api, job_id: str, out_file: str | None) -> None:
    answer = c3.result(api, job_id)
    if answer.get("status") != "success":
        err.print(f"[red]job {job_id} {answer.get('status')}:[/red] {answer.get('error')}", highlight=False)
        sys.exit(EXIT_FAILED)
    if out_file and answer.get("result_url"):
        path = c3.download(api, job_id, out_file)
        err.print(f"saved {path}", highlight=False)
    elif out_file:
        with open(out_file, "w", encoding="utf-8") as handle:
            handle.write(answer.get("text", ""))
        err.print(f"saved {out_file}", highlight=False)
    click.echo(answer.get("result_url") or answer.get("text", ""))


class Context:
    def __init__(self, api: c3.Api):
        self.api = api


pass_api = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--api", "api_url", envvar="C3_RENDER_API", default=c3.DEFAULT_API_URL, show_default=True,
              help="Base URL of the c3-render API (env C3_RENDER_API).")
@click.option("--key", "api_key", envvar="C3_RENDER_API_KEY", default="", show_default=False,
              help="API key (env C3_RENDER_API_KEY).")
@click.option("--request-timeout", default=30.0, show_default=True, help="Seconds per HTTP request.")
@click.pass_context
def cli(ctx: click.Context, api_url: str, api_key: str, request_timeout: float) -> None:
    """Submit and follow c3-render jobs."""
    ctx.obj = Context(c3.connect(api_url, api_key, timeout_s=request_timeout))


def submit_options(what: str = "job"):
    """The options every `submit` command shares; `what` it submits (a job, or for `talk` a pipeline)."""
    each = "each step" if what == "pipeline" else "the job"
    decorators = [
        click.option("--notify-url", help=f"Webhook URL called once when the {what} finishes."),
        click.option("--max-time", type=int, help=f"Seconds {each} may run once started."),
        click.option("--complete-in", type=int, help=f"Seconds from now by which {each} must be done."),
        click.option("--idempotency-key", help=f"Same key and body within 24 h: the same {what}, queued once."),
        click.option("--wait", "wait_", is_flag=True, help=f"Follow the {what} to its end and print its result."),
        click.option("--out", "out_file", type=click.Path(dir_okay=False),
                     help="With --wait: save the result (file, or text) here."),
        click.option("--timeout", type=float, help="With --wait: give up after this many seconds (exit 3)."),
    ]

    def decorate(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return decorate


def run_submit(api: c3.Api, job_type: str, fields: dict[str, Any], common: dict[str, Any]) -> None:
    params = {**fields, "notify_url": common["notify_url"], "max_time": common["max_time"],
              "complete_in": common["complete_in"]}
    job_id = c3.submit(api, job_type, params, idempotency_key=common["idempotency_key"])
    if not common["wait_"]:
        click.echo(job_id)
        return
    err.print(f"queued {job_type} job {job_id}", highlight=False)
    follow(api, job_id, common["timeout"])
    print_result(api, job_id, common["out_file"])


@cli.group()
def submit() -> None:
    """Queue a job (prints its id, or with --wait its result)."""


@submit.command("csm")
@click.option("--text", help="Text to speak (split into sentences by the service).")
@click.option("--sentence", "sentences", multiple=True, help="One sentence of a monologue (repeat it).")
@click.option("--voice", help="random, conversational_a, conversational_b or clone.")
@click.option("--reference-audio-url", help="voice=clone: audio of the voice.")
@click.option("--reference-text", help="voice=clone: what the reference audio says.")
@submit_options()
@pass_api
def submit_csm(ctx: Context, text: str | None, sentences: tuple[str, ...], voice: str | None,
               reference_audio_url: str | None, reference_text: str | None, **common: Any) -> None:
    """Text to speech (result: an MP3)."""
    run_submit(ctx.api, "csm", {"text": text, "monologue": list(sentences) or None, "voice": voice,
                                "reference_audio_url": reference_audio_url, "reference_text": reference_text},
               common)


@submit.command("whisper")
@click.option("--audio-url", required=True, help="Audio (or video) to transcribe.")
@click.option("--model", help="Whisper model size.")
@click.option("--task", type=click.Choice(["transcribe", "translate"]))
@click.option("--language", help="Language code such as en; empty to detect it.")
@submit_options()
@pass_api
def submit_whisper(ctx: Context, audio_url: str, model: str | None, task: str | None, language: str | None,
                   **common: Any) -> None:
    """Speech to text (result: text)."""
    run_submit(ctx.api, "whisper", {"audio_url": audio_url, "model": model, "task": task, "language": language},
               common)


@submit.command("portrait")
@click.option("--image-url", required=True, help="Portrait image (JPEG, PNG or WebP).")
@click.option("--audio-url", required=True, help="Audio the portrait speaks.")
@submit_options()
@pass_api
def submit_portrait(ctx: Context, image_url: str, audio_url: str, **common: Any) -> None:
    """Talking-portrait video (result: an MP4)."""
    run_submit(ctx.api, "portrait", {"image_url": image_url, "audio_url": audio_url}, common)


@submit.command("analyze")
@click.option("--image-url", required=True, help="Image to analyze.")
@click.option("--prompt", help="What to look for in the image.")
@submit_options()
@pass_api
def submit_analyze(ctx: Context, image_url: str, prompt: str | None, **common: Any) -> None:
    """Image analysis (result: text)."""
    run_submit(ctx.api, "analyze", {"image_url": image_url, "prompt": prompt}, common)


@submit.command("talk")
@click.option("--text", required=True, help="What the portrait says (spoken by CSM first).")
@click.option("--image-url", required=True, help="Portrait image (JPEG, PNG or WebP).")
@click.option("--voice", help="random, conversational_a or conversational_b.")
@submit_options("pipeline")
@pass_api
def submit_talk(ctx: Context, text: str, image_url: str, voice: str | None, **common: Any) -> None:
    """Text to a talking portrait in one request: a pipeline of a CSM step and a portrait step that speaks
    its audio (result: an MP4). --notify-url is the pipeline's webhook; --max-time and --complete-in hold
    for each step."""
    limits = {"max_time": common["max_time"], "complete_in": common["complete_in"]}
    steps = {"speech": {"type": "csm", "text": text, "voice": voice, **limits},
             "video": {"type": "portrait", "image_url": image_url, "audio_url": "{{speech.result_url}}", **limits}}
    run_pipeline(ctx.api, steps, common["notify_url"], common)


def final_step(steps: dict[str, Any]) -> str:
    """The step whose result a pipeline ends with: the one step no other step takes an output from, or
    (when several are) the one listed last."""
    used = {match.group(1) for step in steps.values() if isinstance(step, dict) for value in step.values()
            if isinstance(value, str) and (match := REFERENCE.match(value))}
    ends = [name for name in steps if name not in used]
    return ends[0] if len(ends) == 1 else list(steps)[-1]


def run_pipeline(api: c3.Api, steps: dict[str, Any], notify_url: str | None, common: dict[str, Any]) -> None:
    """Submit a pipeline; print its id, or with --wait follow it and print each step's result (--out saves
    the final step's result: final_step)."""
    answer = c3.submit_pipeline(api, steps, notify_url=notify_url, idempotency_key=common.get("idempotency_key"))
    pipeline_id = answer["id"]
    if not common.get("wait_"):
        click.echo(pipeline_id)
        return
    err.print(f"queued pipeline {pipeline_id} ({', '.join(answer['steps'])})", highlight=False)
    final = follow_pipeline(api, pipeline_id, common.get("timeout"))
    names = list(final["steps"])
    for name in names:
        step = final["steps"][name] or {}
        click.echo(f"{name}: {step.get('result_url') or step.get('text', '')}")
    if common.get("out_file"):
        print_result_file(api, final["steps"][final_step(steps)]["id"], common["out_file"])


def follow_pipeline(api: c3.Api, pipeline_id: str, timeout: float | None) -> dict[str, Any]:
    """Show the pipeline's steps live until it ends; its final object (exits non-zero on failure)."""
    started = time.monotonic()

    def line(pipeline: dict[str, Any]) -> str:
        steps = ", ".join(f"{name} {describe(step, started).rsplit(' · ', 1)[0]}" for name, step in
                          pipeline["steps"].items() if step)
        return f"pipeline {pipeline_id}: {pipeline['status']} · {steps} · {time.monotonic() - started:.0f}s elapsed"

    try:
        if out.is_terminal:
            with out.status(f"pipeline {pipeline_id}: waiting", spinner="dots") as display:
                final = c3.wait_pipeline(api, pipeline_id, timeout, on_update=lambda p: display.update(line(p)))
        else:
            final = c3.wait_pipeline(api, pipeline_id, timeout, on_update=lambda p: click.echo(line(p)))
    except c3.PipelineFailed as exc:
        err.print(f"[red]pipeline {pipeline_id} {exc.job['status']}:[/red] {exc.job.get('error') or ''}",
                  highlight=False)
        for name, step in exc.job["steps"].items():
            if step and step.get("error"):
                err.print(f"  {name}: {step['status']}: {step['error']}", highlight=False)
        sys.exit(EXIT_FAILED)
    except c3.WaitTimeout as exc:
        err.print(f"[yellow]{exc}[/yellow]", highlight=False)
        sys.exit(EXIT_TIMEOUT)
    return final


def print_result_file(api: c3.Api, job_id: str, out_file: str) -> None:
    """Save a succeeded step's result: the file, or its text."""
    answer = c3.result(api, job_id)
    if answer.get("result_url"):
        c3.download(api, job_id, out_file)
    else:
        with open(out_file, "w", encoding="utf-8") as handle:
            handle.write(answer.get("text", ""))
    err.print(f"saved {out_file}", highlight=False)


@cli.command()
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--idempotency-key", help="Same key and body within 24 h: the same pipeline, queued once.")
@click.option("--wait", "wait_", is_flag=True, help="Follow the pipeline to its end and print each step's result.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="With --wait: save the final step's result (file, or text) here: the step no other "
                   "step takes an output from (if several, the one listed last).")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds (exit 3).")
@pass_api
def pipeline(ctx: Context, file: Any, **common: Any) -> None:
    """Submit a pipeline from FILE.json (the POST /pipelines body: {"steps": {...}, "notify_url": ...}; - is
    stdin): jobs whose inputs are earlier steps' outputs ("{{speech.result_url}}")."""
    try:
        body = json.load(file)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="FILE") from None
    if not isinstance(body, dict) or not isinstance(body.get("steps"), dict) or set(body) - {"steps", "notify_url"}:
        raise click.BadParameter('expected {"steps": {name: job body with its "type"}, "notify_url": ...}',
                                 param_hint="FILE")
    run_pipeline(ctx.api, body["steps"], body.get("notify_url"), common)


@cli.command()
@click.argument("job_id")
@pass_api
def status(ctx: Context, job_id: str) -> None:
    """Print a job's status object (JSON)."""
    click.echo(json.dumps(c3.status(ctx.api, job_id), indent=2))


@cli.command()
@click.argument("job_id")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Save the result here.")
@pass_api
def result(ctx: Context, job_id: str, out_file: str | None) -> None:
    """Print a finished job's result URL or text (exit 1 if it failed)."""
    print_result(ctx.api, job_id, out_file)


@cli.command()
@click.argument("job_id")
@pass_api
def cancel(ctx: Context, job_id: str) -> None:
    """Cancel a waiting, queued or running job."""
    answer = c3.cancel(ctx.api, job_id)
    click.echo("cancelling (the worker stops it within seconds)" if answer.get("cancel_requested") else "cancelled")


@cli.command("pipeline-status")
@click.argument("pipeline_id")
@pass_api
def pipeline_status(ctx: Context, pipeline_id: str) -> None:
    """Print a pipeline's status object with its steps (JSON)."""
    click.echo(json.dumps(c3.pipeline_status(ctx.api, pipeline_id), indent=2))


@cli.command("pipeline-cancel")
@click.argument("pipeline_id")
@pass_api
def pipeline_cancel(ctx: Context, pipeline_id: str) -> None:
    """Cancel every unfinished step of a pipeline."""
    answer = c3.cancel_pipeline(ctx.api, pipeline_id)
    click.echo("cancelling (a running step stops within seconds)" if answer.get("cancel_requested") else "cancelled")


@cli.command()
@click.option("--status", "status_", type=click.Choice(STATUSES), help="Only jobs in this status.")
@click.option("--type", "job_type", type=click.Choice(JOB_TYPES), help="Only jobs of this type.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@pass_api
def jobs(ctx: Context, status_: str | None, job_type: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    found = []
    for job in c3.iter_jobs(ctx.api, status=status_, job_type=job_type, page_size=min(limit, 200)):
        found.append(job)
        if len(found) >= limit:
            break
    if as_json or not out.is_terminal:
        for job in found:
            click.echo(json.dumps(job))
        return
    table = Table("id", "type", "status", "created", "finished", "detail")
    for job in found:
        detail = job.get("error") or (f"queue position {job['queue_position']}" if job.get("queue_position")
                                      else (f"{job['progress']}%" if job.get("progress") is not None else ""))
        table.add_row(job["id"], job["type"], job["status"], job["created_at"] or "", job["finished_at"] or "",
                      detail)
    out.print(table)


@cli.command()
@click.argument("job_id")
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 3).")
@pass_api
def watch(ctx: Context, job_id: str, timeout: float | None) -> None:
    """Follow a job live until it ends; print its result."""
    follow(ctx.api, job_id, timeout)
    print_result(ctx.api, job_id, None)


def main() -> None:
    try:
        cli(prog_name="c3-render", standalone_mode=True)
    except c3.ApiError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
