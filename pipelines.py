"""Pipelines: one request for jobs whose inputs are earlier jobs' outputs (text -> speech -> portrait).

POST /pipelines takes {"steps": {name: job body with its "type"}, "notify_url"}. A string that is exactly
`{{<step>.<output>}}` takes an earlier step's output (jobspec.OUTPUTS: result_url of csm and portrait, a
media file, only into input URL fields; text of whisper and analyze, only into text fields).
`validate_pipeline` checks every step as its job route would (jobspec.validate, with a stand-in for each
reference) and the references (no unknown step or output, no cycle, no reference inside a longer string, at
most MAX_PIPELINE_STEPS steps), naming the step and field, before anything is written. `submit` then writes
the pipeline and all its step jobs in ONE script (lua/submit_pipeline.lua): the steps whose inputs are ready
are queued, the others are `waiting`. What happens next is the transition script's (lua/lib/pipeline_step.lua):
a step's success hands its outputs on and queues the steps now ready (at the end taken next, preferring its
node); a failure or cancel fails the steps that depend on it; the last step finishes the pipeline and queues
its one final webhook. Every step is an ordinary job with `pipeline` and `step` fields.

The pipeline record (`pipeline:<id>`, config.PIPELINE_KEY) belongs to the API key that submitted it, as a
job does (another key gets 404); it and its steps' records expire RESULT_TTL after it finishes. Routes:
POST /pipelines, GET /pipelines (the caller's, newest first), GET /pipelines/<id>,
POST /pipelines/<id>/cancel, POST /pipelines/<id>/webhook (its final webhook again); GET /events/<id> streams
a pipeline too (events.py, with `snapshot`).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
from flask import Blueprint, Response, jsonify, request

import api_common
import config
import jobspec
import jobstore
import redis_conn
import redis_lua
import webhook_state
from api_common import ApiError, iso, settings, store
from jobspec import FINISHED_STATUSES, MAX_PIPELINE_STEPS, OUTPUTS, REFERENCE_INSIDE, REFERENCE_PATTERN

log = logging.getLogger("c3-render.api")

pipeline_routes = Blueprint("pipelines", __name__)

PIPELINE_FIELDS = ("steps", "notify_url")
PIPELINE_STATUSES = ("queued", "running", "success", "failed", "cancelled")
# What stands for a reference while a step is validated as its job route would validate it.
STAND_IN = {"url": "https://pipeline.invalid/reference", "text": "reference"}
REFERENCE = re.compile(REFERENCE_PATTERN)


@dataclass(frozen=True)
class Need:
    """One input of a step that an earlier step's output gives."""

    field: str
    step: str
    output: str  # result_url (a media file) or text
    ref: str = ""  # for a media file: the stored result the worker reads (jobspec.STORED_RESULT_PREFIX)


@dataclass
class Step:
    name: str
    type: str
    params: dict[str, Any]  # validated, defaults filled in, without the fields references fill
    needs: list[Need] = field(default_factory=list)
    job_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class PipelineSpec:
    steps: dict[str, Step]  # in the client's order
    order: list[str]  # the steps, each after the steps it takes outputs from
    notify_url: str | None

    def canonical(self) -> dict[str, Any]:
        """What the request asks for once validated (its Idempotency-Key compares this)."""
        return {"notify_url": self.notify_url,
                "steps": {name: {"type": s.type, "params": s.params,
                                 "needs": [[n.field, n.step, n.output] for n in s.needs]}
                          for name, s in self.steps.items()}}


# --- validation ---------------------------------------------------------------------------------

def validate_pipeline(body: Any) -> PipelineSpec:
    """Check a POST /pipelines body; ValidationError naming the step and field (`steps.video.audio_url: ...`)."""
    if not isinstance(body, dict):
        raise jobspec.ValidationError("request body must be a JSON object")
    unknown = sorted(set(body) - set(PIPELINE_FIELDS))
    if unknown:
        raise jobspec.ValidationError(f"unknown field(s): {', '.join(unknown)}; allowed fields are "
                                      f"{', '.join(PIPELINE_FIELDS)}")
    raw_steps = body.get("steps")
    if not isinstance(raw_steps, dict) or not raw_steps:
        raise jobspec.ValidationError("steps: required, an object of named steps (each a job body with its type)")
    if len(raw_steps) > MAX_PIPELINE_STEPS:
        raise jobspec.ValidationError(f"steps: {len(raw_steps)} steps, more than {MAX_PIPELINE_STEPS}")
    notify_url = body.get("notify_url")
    if notify_url is not None:
        jobspec.check_url("notify_url", notify_url)
    types: dict[str, str] = {}
    for name, raw in raw_steps.items():
        if not re.match(jobspec.STEP_NAME_PATTERN, name):
            raise jobspec.ValidationError(f"steps: {name[:64]!r} is not a step name (1 to 40 letters, digits, _ "
                                          "or -)")
        if not isinstance(raw, dict):
            raise jobspec.ValidationError(f"steps.{name}: must be an object (a job body with its type)")
        if raw.get("type") not in jobspec.JOB_TYPES:
            raise jobspec.ValidationError(f"steps.{name}.type: required, one of {', '.join(jobspec.JOB_TYPES)}")
        types[name] = raw["type"]
    steps = {name: validate_step(name, types[name], raw, types) for name, raw in raw_steps.items()}
    return PipelineSpec(steps=steps, order=step_order(steps), notify_url=notify_url)


def validate_step(name: str, job_type: str, raw: dict[str, Any], types: dict[str, str]) -> Step:
    """One step: its references checked, the rest validated as its job route would (stand-ins for references)."""
    body = {key: value for key, value in raw.items() if key != "type"}
    if set(body) - {f.name for f in jobspec.fields_for(job_type)}:
        validated(name, job_type, body)  # names the unknown fields
    needs = []
    for key, value in body.items():
        where = f"steps.{name}.{key}"
        if isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, str) and REFERENCE_INSIDE.search(item):
                    raise jobspec.ValidationError(f"{where}[{index}]: a reference is a whole field value, not an "
                                                  "item of an array")
            continue
        if not isinstance(value, str):
            continue
        match = REFERENCE.match(value)
        if match is None:
            if REFERENCE_INSIDE.search(value):
                raise jobspec.ValidationError(f"{where}: a reference must be the whole value ({{{{<step>.<output>}}}}"
                                              ", nothing around it)")
            continue
        needs.append(check_reference(where, job_type, key, match.group(1), match.group(2), types))
    stand_ins = {need.field: STAND_IN["text" if need.output == "text" else "url"] for need in needs}
    params = validated(name, job_type, {**body, **stand_ins})
    for need in needs:
        del params[need.field]
    return Step(name=name, type=job_type, params=params, needs=needs)


def validated(name: str, job_type: str, body: dict[str, Any]) -> dict[str, Any]:
    """jobspec.validate of one step's body, its error naming the step (`steps.speech: text: ...`)."""
    try:
        return jobspec.validate(job_type, body)
    except jobspec.ValidationError as exc:
        raise jobspec.ValidationError(f"steps.{name}: {exc}") from None


def check_reference(where: str, job_type: str, name: str, source: str, output: str, types: dict[str, str]) -> Need:
    """A reference `{{source.output}}` in field `name` of a job_type step, or ValidationError saying why not."""
    text = f"{{{{{source}.{output}}}}}"
    if source not in types:
        raise jobspec.ValidationError(f"{where}: {text} names no step of this pipeline (steps: {', '.join(types)})")
    outputs = OUTPUTS[types[source]]
    if output not in outputs:
        raise jobspec.ValidationError(f"{where}: {text}: a {types[source]} step has no output {output!r}; it gives "
                                      f"{', '.join(outputs)}")
    gives = outputs[output]  # audio, video (media files) or text
    takes = jobspec.input_kind(job_type, name)
    if takes is None and not jobspec.is_text_field(job_type, name):
        raise jobspec.ValidationError(f"{where}: takes no reference (references go into input URLs and text "
                                      "fields)")
    if gives == "text" and takes is not None:
        raise jobspec.ValidationError(f"{where}: {text} is text and {name} takes a URL of a media file; only "
                                      "result_url of a csm or portrait step goes there")
    if gives != "text" and takes is None:
        raise jobspec.ValidationError(f"{where}: {text} is a media file ({gives}) and {name} takes text; only text "
                                      "of a whisper or analyze step goes there")
    if takes == "image":
        raise jobspec.ValidationError(f"{where}: {text} is {gives} and {name} takes an image; no step type gives "
                                      "one")
    return Need(field=name, step=source, output=output)


def step_order(steps: dict[str, Step]) -> list[str]:
    """The steps, each after those it takes outputs from (the client's order otherwise); ValidationError
    naming the step and field where a cycle closes."""
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "visiting"
        for need in steps[name].needs:
            if state.get(need.step) == "visiting":
                cycle = " -> ".join([*stack[stack.index(need.step):], need.step])
                raise jobspec.ValidationError(f"steps.{name}.{need.field}: {{{{{need.step}.{need.output}}}}} "
                                              f"makes a cycle ({cycle})")
            if need.step not in state:
                visit(need.step, [*stack, need.step])
        state[name] = "done"
        order.append(name)

    for name in steps:
        if name not in state:
            visit(name, [name])
    return order


# --- the record ---------------------------------------------------------------------------------

def pipeline_key(pipeline_id: str) -> str:
    return config.PIPELINE_KEY.format(id=pipeline_id)


def submit(r: redis.Redis, spec: PipelineSpec, now: float | None = None, *, idempotency_key: str = "",
           request_hash: str = "", idempotency_ttl_s: int = 24 * 3600, owner: str = "", rate_key: str = "",
           rate_limit: int = 0) -> tuple[str, bool]:
    """Write the pipeline and all its step jobs in one script; (pipeline id, created). The Idempotency-Key
    and rate limit work as jobstore.submit's (each step counts as one submission): a replay gives the first
    pipeline's id (created False); jobstore.IdempotencyConflict, jobstore.RateLimited; with
    REDIS_MIN_REPLICA_ACKS, redis_conn.NotReplicated as jobstore.submit."""
    now = time.time() if now is None else now
    pipeline_id = str(uuid.uuid4())
    graph = {name: {"job": s.job_id, "type": s.type,
                    "needs": [{"field": n.field, "step": n.step, "output": n.output,
                               "ref": stored_result_ref(spec.steps[n.step]) if n.output != "text" else ""}
                              for n in s.needs]}
             for name, s in spec.steps.items()}
    argv: list[Any] = [json.dumps({"pipeline_id": pipeline_id, "request_hash": request_hash}) if idempotency_key
                       else "", idempotency_ttl_s, pipeline_id, repr(now), owner, spec.notify_url or "",
                       json.dumps(graph), json.dumps({name: s.job_id for name, s in spec.steps.items()}),
                       rate_limit if rate_key else 0, jobstore.RATE_WINDOW_TTL_S]
    for name in spec.order:
        step = spec.steps[name]
        params = step.params
        stored = {k: v for k, v in params.items() if k not in ("notify_url", "max_time", "complete_in")}
        argv += [step.job_id, step.type, json.dumps(stored), repr(now + params["complete_in"]), str(params["max_time"]),
                 params.get("notify_url") or "", name, len(step.needs),
                 json.dumps({n.field: n.step for n in step.needs})]
    keys = (pipeline_key(pipeline_id), config.QUEUE_KEY, config.QUEUE_PUSHES_KEY,
            idempotency_key or config.QUEUE_PUSHES_KEY, rate_key or config.QUEUE_PUSHES_KEY)
    # sent again with the same ids through a failover (a record with this id is this submit's own)
    first = redis_conn.through_failover(r, lambda: redis_lua.run(r, "submit_pipeline", keys, *argv, confirm=True))
    if not first:
        return pipeline_id, True
    if first == "rate_limited":
        raise jobstore.RateLimited()
    first = json.loads(first)
    if first.get("request_hash") != request_hash or "pipeline_id" not in first:
        raise jobstore.IdempotencyConflict(first.get("pipeline_id") or first.get("job_id"))
    return first["pipeline_id"], first["pipeline_id"] == pipeline_id


def stored_result_ref(step: Step) -> str:
    """How a later step names this step's stored result (the worker reads it from OUTPUT_DIR or the bucket)."""
    return jobspec.STORED_RESULT_PREFIX + jobspec.RESULT_NAMES[step.type].format(id=step.job_id)


def get_pipeline(r: redis.Redis, pipeline_id: str) -> dict[str, str] | None:
    return r.hgetall(pipeline_key(pipeline_id)) or None


def pipeline_answer(r: redis.Redis, record: dict[str, str]) -> dict[str, Any]:
    """A pipeline as GET /pipelines/<id> shows it: its status and times, and each step's status object (as
    /status gives it, with its result_url or text once it succeeded; null once its record is gone)."""
    names = json.loads(record.get("steps") or "{}")
    steps = jobstore.get_jobs_with_positions(r, list(names.values()))
    answer: dict[str, Any] = {
        "id": record["id"],
        "status": record["status"],
        "created_at": iso(record.get("created_at")),
        "started_at": iso(record.get("started_at")),
        "finished_at": iso(record.get("finished_at")),
    }
    if record["status"] != "success" and record.get("error"):
        answer["error"] = record["error"]
    answer["steps"] = {name: step_answer(step) for name, step in zip(names, steps, strict=True)}
    if record.get("webhook_status", "none") != "none":
        answer["webhook"] = api_common.webhook_answer(record)
    return answer


def step_answer(record: dict[str, str] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    answer = api_common.status_answer(record)
    if record["status"] == "success":
        answer.update(api_common.result_of(record))
    return answer


def pipeline_or_error(pipeline_id: str) -> dict[str, str]:
    """The pipeline's record, or the 400/404 answer (another API key's pipeline is a 404, as an unknown id)."""
    return api_common.owned_or_error("pipeline", pipeline_id, get_pipeline)


def snapshot(r: redis.Redis, pipeline_id: str) -> tuple[dict[str, Any], str, bool] | None:
    """For GET /events/<id>: the pipeline's answer, its event id (its change number, plus its queued steps'
    queue positions, which move without a change) and whether it is finished; None once it expired."""
    record = get_pipeline(r, pipeline_id)
    if record is None:
        return None
    answer = pipeline_answer(r, record)
    positions = [str(step["queue_position"]) for step in answer["steps"].values()
                 if step and step["status"] == "queued" and step.get("queue_position")]
    ident = record.get("events") or "0"
    if positions:
        ident += ".q" + ".".join(positions)
    return answer, ident, record["status"] in FINISHED_STATUSES


def cancel(r: redis.Redis, app_settings: config.Settings, record: dict[str, str]) -> str:
    """Cancel every unfinished step, the later ones first (so each is cancelled by request rather than failed
    by its upstream); a running one as a job cancel does. 'cancelled', 'cancelling' (a step still runs; its
    worker stops it within seconds) or 'finished:<status>'."""
    if record["status"] in FINISHED_STATUSES:
        return f"finished:{record['status']}"
    r.hset(pipeline_key(record["id"]), "cancel_requested", "1")  # its end is then 'cancelled'
    names = json.loads(record["steps"])
    graph = json.loads(record["graph"])
    later_first = sorted(names, key=lambda name: -depth(graph, name))
    outcomes = [jobstore.cancel(r, app_settings, names[name]) for name in later_first]
    if "cancelling" in outcomes:
        return "cancelling"
    return "cancelled"


def depth(graph: dict[str, Any], name: str) -> int:
    """How many steps lie upstream of a step on its longest path (the graph has no cycle)."""
    return max((1 + depth(graph, need["step"]) for need in graph[name]["needs"]), default=0)


def list_pipelines(r: redis.Redis, *, limit: int, cursor: str | None, owner: str | None
                   ) -> tuple[list[dict[str, str]], str | None]:
    """Pipeline records newest first from the index (the owner's with owner), and the next page's cursor;
    entries whose record expired are dropped from the index on the way (jobstore.BadCursor)."""
    index = config.PIPELINES_INDEX_KEY if owner is None else config.PIPELINES_BY_OWNER_KEY.format(owner=owner)
    return jobstore.read_index(r, index, pipeline_key, limit=limit, cursor=cursor)


# --- the OpenAPI schema of a pipeline request ----------------------------------------------------

REFERENCE_TEXT = ("A string that is exactly {{<step>.<output>}} takes an earlier step's output: result_url of a "
                  "csm or portrait step (a media file, read by the worker from the result storage directly) "
                  "into an audio input URL, text of a whisper or analyze step into a text field.")


def step_schema(job_type: str) -> dict[str, Any]:
    """A step of a job type: that type's request body, with its type, where input URLs and text fields may
    hold a reference instead."""
    schema = jobspec.request_schema(job_type)
    reference = {"type": "string", "pattern": REFERENCE_PATTERN, "description": REFERENCE_TEXT}
    for name, prop in list(schema["properties"].items()):
        if jobspec.input_kind(job_type, name) == "audio" or jobspec.is_text_field(job_type, name):
            schema["properties"][name] = {"anyOf": [prop, reference], "description": prop.get("description", "")}
    schema["properties"] = {"type": {"type": "string", "const": job_type}, **schema["properties"]}
    schema["required"] = ["type", *schema.get("required", [])]
    return schema


def request_schema() -> dict[str, Any]:
    """The POST /pipelines body."""
    return {
        "type": "object", "additionalProperties": False, "required": ["steps"],
        "description": "Jobs chained by their outputs. " + REFERENCE_TEXT + " Refused with a 400 naming the step "
                       "and field, before anything is queued: an unknown step, a cycle, an output the step type "
                       "does not have, text into a URL field or a media file into a text field, a reference "
                       f"inside a longer string, more than {MAX_PIPELINE_STEPS} steps, and any field a job route "
                       "would refuse.",
        "properties": {
            "steps": {"type": "object", "minProperties": 1, "maxProperties": MAX_PIPELINE_STEPS,
                      "propertyNames": {"pattern": jobspec.STEP_NAME_PATTERN},
                      "additionalProperties": {"oneOf": [{"$ref": f"#/components/schemas/{t.capitalize()}Step"}
                                                         for t in jobspec.JOB_TYPES]}},
            "notify_url": {**jobspec.field_schema(next(f for f in jobspec.COMMON_FIELDS if f.name == "notify_url")),
                           "description": "Webhook URL called once when the pipeline finishes, with each step's "
                                          "result (steps may have their own notify_url too)."},
        },
    }


# --- routes -------------------------------------------------------------------------------------

@pipeline_routes.post("/pipelines")
def submit_route() -> Response:
    body = api_common.json_body()
    try:
        spec = validate_pipeline(body)
    except jobspec.ValidationError as exc:
        raise ApiError(400, str(exc)) from None
    idem_key, request_hash = api_common.idempotency("pipeline", spec.canonical())
    r = store()

    def write(rate_key: str, limit: int) -> tuple[str, bool]:
        return submit(r, spec, idempotency_key=idem_key, request_hash=request_hash, owner=api_common.caller_owner(),
                      rate_key=rate_key, rate_limit=limit)

    def created(pipeline_id: str) -> dict[str, Any]:
        log.info("pipeline %s (%s) queued", pipeline_id, ", ".join(f"{n}: {s.type}" for n, s in spec.steps.items()))
        return {"id": pipeline_id, "status": "queued",
                "steps": {name: step.job_id for name, step in spec.steps.items()}}

    def replayed(pipeline_id: str) -> dict[str, Any] | None:
        record = get_pipeline(r, pipeline_id)
        return None if record is None else {"id": pipeline_id, "status": record["status"],
                                            "steps": json.loads(record["steps"])}

    return api_common.submit_answer(write, created, replayed, "")


@pipeline_routes.get("/pipelines")
def list_route() -> Response:
    """The caller's pipelines, newest first, with their steps (an admin key, or no keys: every pipeline)."""
    limit = api_common.page_limit(jobspec.PIPELINES_PAGE_DEFAULT, jobspec.PIPELINES_PAGE_MAX)
    owner = None if api_common.sees_every_job() else api_common.caller_owner()
    try:
        records, next_cursor = list_pipelines(store(), limit=limit, cursor=request.args.get("cursor") or None,
                                              owner=owner)
    except jobstore.BadCursor:
        raise ApiError(400, "cursor: not a cursor from a previous page (use next_cursor as given)") from None
    return jsonify({"pipelines": [pipeline_answer(store(), record) for record in records], "next_cursor": next_cursor})


@pipeline_routes.get("/pipelines/<pipeline_id>")
def status_route(pipeline_id: str) -> Response:
    return jsonify(pipeline_answer(store(), pipeline_or_error(pipeline_id)))


@pipeline_routes.post("/pipelines/<pipeline_id>/cancel")
def cancel_route(pipeline_id: str) -> Response:
    record = pipeline_or_error(pipeline_id)
    outcome = cancel(store(), settings(), record)
    return api_common.cancel_answer("pipeline", pipeline_id, outcome)


@pipeline_routes.post("/pipelines/<pipeline_id>/webhook")
def resend_webhook_route(pipeline_id: str) -> Response:
    """Send a finished pipeline's final webhook again (same body and webhook-id), as POST /jobs/<id>/webhook."""
    pipeline_or_error(pipeline_id)
    return api_common.resend_answer("pipeline", pipeline_id,
                                    webhook_state.resend_webhook(store(), pipeline_id, pipeline=True))
