"""The OpenAPI 3.1 document of the c3-render API, generated from jobspec.py (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

import config
import jobspec
import pipelines
from jobspec import IDEMPOTENCY_HEADER, IDEMPOTENCY_KEY_PATTERN, JOB_ID_PATTERN

VERSION = config.VERSION


def page_params(most: int, default: int) -> list[dict[str, Any]]:
    """The limit and cursor query parameters of a listing route."""
    return [{"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": most, "default": default}},
            {"name": "cursor", "in": "query", "required": False,
             "schema": {"type": "string", "pattern": jobspec.JOBS_CURSOR_PATTERN},
             "description": "next_cursor of the previous page."}]


def page_response(items: str, schema: str, description: str) -> dict[str, Any]:
    """The 200 answer of a listing route: {items: [schema], next_cursor}."""
    return {"description": description, "content": {"application/json": {"schema": {
        "type": "object", "required": [items, "next_cursor"],
        "properties": {items: {"type": "array", "items": {"$ref": f"#/components/schemas/{schema}"}},
                       "next_cursor": {"type": ["string", "null"]}}}}}}


def resend_path(what: str, operation: str, id_param: dict[str, Any], follow: str,
                errors: dict[str, Any]) -> dict[str, Any]:
    """POST .../webhook of a job or a pipeline: its final webhook sent again."""
    return {"post": {
        "summary": f"Send a finished {what}'s final webhook again (same body and webhook-id), after it was "
                   "delivered or failed for good",
        "operationId": operation, "parameters": [id_param],
        "responses": {"202": {"description": f"Queued for delivery; follow it in {follow}.",
                              "content": {"application/json": {"schema": {
                                  "$ref": "#/components/schemas/WebhookQueued"}}}},
                      "409": _error_response("Not finished, no notify_url, or the webhook is being delivered."),
                      **errors},
    }}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_document(settings: config.Settings | None = None) -> dict[str, Any]:
    """An OpenAPI 3.1 document of every route, field, range and error."""
    ok = "application/json"
    timestamp = {"type": ["string", "null"], "format": "date-time"}
    webhook = {
        "type": "object", "required": ["status", "attempts", "last_error", "history"],
        "properties": {
            "status": {"type": "string",
                       "enum": ["waiting", "pending", "retrying", "delivered", "failed"]},
            "attempts": {"type": "integer", "minimum": 0},
            "last_error": {"type": ["string", "null"]},
            "history": {
                "type": "array", "maxItems": config.WEBHOOK_HISTORY_MAX,
                "description": "Delivery events, oldest first (the last "
                               f"{config.WEBHOOK_HISTORY_MAX} are kept).",
                "items": {"type": "object", "required": ["at", "attempt", "outcome"],
                          "properties": {
                              "at": {"type": "string", "format": "date-time"},
                              "attempt": {"type": "integer", "minimum": 0},
                              "outcome": {"type": "string",
                                          "enum": ["delivered", "retrying", "failed",
                                                   "resend requested"]},
                              "error": {"type": "string"}}},
            },
        },
    }
    schemas: dict[str, Any] = {
        "Webhook": webhook,
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "JobAccepted": {
            "type": "object", "required": ["id", "status"],
            "properties": {"id": {"type": "string", "format": "uuid"},
                           "status": {"type": "string", "enum": list(jobspec.STATUSES)}},
        },
        "JobStatus": {
            "type": "object",
            "required": ["id", "type", "status", "created_at", "started_at", "finished_at", "complete_by",
                         "attempts"],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "type": {"type": "string", "enum": list(jobspec.JOB_TYPES)},
                "status": {"type": "string", "enum": list(jobspec.STATUSES)},
                "created_at": timestamp, "started_at": timestamp, "finished_at": timestamp,
                "complete_by": timestamp,
                "attempts": {"type": "integer", "minimum": 0},
                "error": {"type": "string", "description": "Why the job failed or was cancelled."},
                "queue_position": {"type": ["integer", "null"], "minimum": 1,
                                   "description": "While queued: 1 = runs next."},
                "phase": {"type": "string", "enum": list(jobspec.PHASES),
                          "description": "While running: what the job is doing now."},
                "phase_since": {**timestamp, "description": "When the job entered its phase."},
                "progress": {"type": "integer", "minimum": 0, "maximum": 100,
                             "description": "Percent done within the phase, only where the node reports "
                                            "it (portrait: while encoding)."},
                "cancel_requested": {"type": "boolean"},
                "pipeline": {"type": "string", "format": "uuid", "description": "A pipeline's step: its pipeline."},
                "step": {"type": "string", "description": "A pipeline's step: its name."},
                "waiting_for": {"type": "array", "items": {"type": "string"},
                                "description": "While waiting (a pipeline's step): the steps whose outputs it "
                                               "takes."},
                "webhook": {"$ref": "#/components/schemas/Webhook"},
            },
        },
        "JobResult": {
            "type": "object", "required": ["id", "status"],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": list(jobspec.FINISHED_STATUSES)},
                "result_url": {"type": "string", "description": "csm and portrait: the file, valid 7 days"},
                "text": {"type": "string", "description": "whisper and analyze: the text"},
                "error": {"type": "string"},
            },
        },
        "WebhookQueued": {
            "type": "object", "required": ["id", "webhook"],
            "properties": {"id": {"type": "string", "format": "uuid"},
                           "webhook": {"type": "object", "required": ["status"],
                                       "properties": {"status": {"type": "string", "enum": ["pending"]}}}},
        },
        "CancelAnswer": {
            "type": "object", "required": ["id", "status"],
            "properties": {"id": {"type": "string", "format": "uuid"},
                           "status": {"type": "string", "enum": ["cancelled", "running"]},
                           "cancel_requested": {"type": "boolean"}},
        },
    }
    for job_type in jobspec.JOB_TYPES:
        schemas[f"{job_type.capitalize()}Request"] = jobspec.request_schema(job_type)
        schemas[f"{job_type.capitalize()}Step"] = pipelines.step_schema(job_type)
    schemas["PipelineRequest"] = pipelines.request_schema()
    step_ids = {"type": "object", "additionalProperties": {"type": "string", "format": "uuid"},
                "description": "Each step's job id (an ordinary job: /status, /events, /cancel work on it)."}
    schemas["PipelineAccepted"] = {
        "type": "object", "required": ["id", "status", "steps"],
        "properties": {"id": {"type": "string", "format": "uuid"},
                       "status": {"type": "string", "enum": list(pipelines.PIPELINE_STATUSES)},
                       "steps": step_ids},
    }
    schemas["Pipeline"] = {
        "type": "object", "required": ["id", "status", "created_at", "started_at", "finished_at", "steps"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": list(pipelines.PIPELINE_STATUSES)},
            "created_at": timestamp, "started_at": timestamp, "finished_at": timestamp,
            "error": {"type": "string", "description": "Why it failed: the step that failed first and its error."},
            "steps": {"type": "object", "description": "Each step's status object, as /status gives it, with its "
                                                       "result_url or text once it succeeded (null once expired).",
                      "additionalProperties": {"anyOf": [
                          {"allOf": [{"$ref": "#/components/schemas/JobStatus"},
                                     {"type": "object", "properties": {"result_url": {"type": "string"},
                                                                       "text": {"type": "string"}}}]},
                          {"type": "null"}]}},
            "webhook": {"$ref": "#/components/schemas/Webhook"},
        },
    }

    job_id_param = {"name": "job_id", "in": "path", "required": True,
                    "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
                    "description": "A job id as returned on submission (a lower-case UUID4)."}
    common_errors = {
        "401": _error_response("Missing or wrong API key (when C3_RENDER_API_KEYS or C3_RENDER_ADMIN_KEYS "
                               "is set)."),
        "503": _error_response("Redis cannot be reached, or (REDIS_MIN_REPLICA_ACKS) its replicas did not "
                               "confirm the change in time: send the request again (a job submitted with the "
                               "same Idempotency-Key is not queued twice)."),
    }
    paths: dict[str, Any] = {}
    for route, job_type in jobspec.SUBMIT_ROUTES.items():
        paths[route] = {"post": {
            "summary": f"Submit a {job_type} job" + (" (alias)" if route == "/whisper" else ""),
            "operationId": "submit_" + route.strip("/").replace("/", "_"),
            "parameters": [{"name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
                            "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN.pattern},
                            "description": "Same key and the same job parameters (as validated: null, left out "
                                           "and the default are the same) within 24 h: the same job, "
                                           "queued once, and not counted against the rate limit. A key "
                                           "whose job has expired is unused again."}],
            "requestBody": {"required": True, "content": {ok: {"schema": {
                "$ref": f"#/components/schemas/{job_type.capitalize()}Request"}}}},
            "responses": {
                "200": {"description": "Queued.", "content": {ok: {"schema": {
                    "$ref": "#/components/schemas/JobAccepted"}}}},
                "400": _error_response("Invalid field, unknown field, malformed JSON, JSON nested too "
                                       "deeply, a lone UTF-16 surrogate, or a bad Idempotency-Key; the "
                                       "message names the field and allowed range."),
                "413": _error_response("Body larger than MAX_CONTENT_LENGTH."),
                "415": _error_response("Body is not JSON."),
                "422": _error_response("Idempotency-Key reused with other job parameters."),
                "429": _error_response("Rate limit exceeded; see Retry-After."),
                **common_errors,
            },
        }}
    by_id = {"400": _error_response("Malformed job id."),
             "404": _error_response("Unknown job id, or (with API keys) a job another key submitted: "
                                    "answered exactly as an unknown id. Admin keys reach every job."),
             **common_errors}
    paths["/status/{job_id}"] = {"get": {
        "summary": "Status of a job", "operationId": "status", "parameters": [job_id_param],
        "responses": {"200": {"description": "The job.", "content": {ok: {"schema": {
            "$ref": "#/components/schemas/JobStatus"}}}}, **by_id},
    }}
    paths["/result/{job_id}"] = {"get": {
        "summary": "Result of a finished job", "operationId": "result", "parameters": [job_id_param],
        "responses": {"200": {"description": "Finished.", "content": {ok: {"schema": {
            "$ref": "#/components/schemas/JobResult"}}}},
            "409": _error_response("Not finished yet."), **by_id},
    }}
    cancel_responses = {"200": {"description": "Cancelled, or running and asked to stop.",
                                "content": {ok: {"schema": {"$ref": "#/components/schemas/CancelAnswer"}}}},
                        "409": _error_response("Already finished."), **by_id}
    paths["/cancel/{job_id}"] = {"post": {"summary": "Cancel a job", "operationId": "cancel",
                                          "parameters": [job_id_param], "responses": cancel_responses}}
    paths["/job/{job_id}"] = {"post": {
        "summary": 'Cancel a job (older form, body {"status": "cancelled"})', "operationId": "job_update",
        "parameters": [job_id_param],
        "requestBody": {"required": True, "content": {ok: {"schema": {
            "type": "object", "additionalProperties": False, "required": ["status"],
            "properties": {"status": {"type": "string", "enum": ["cancelled"]}}}}}},
        "responses": {**cancel_responses, "415": _error_response("Body is not JSON.")},
    }}
    paths["/jobs/{job_id}/webhook"] = resend_path("job", "resend_webhook", job_id_param, "/status", by_id)
    paths["/files/{name}"] = {"get": {
        "summary": "A result file (local storage mode), on a signed, expiring link",
        "operationId": "files",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                       {"name": "expires", "in": "query", "required": True, "schema": {"type": "string"}},
                       {"name": "sig", "in": "query", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The file."},
                      "403": _error_response("Invalid or expired link."),
                      "404": _error_response("No such file."),
                      "503": _error_response("Redis cannot be reached.")},
    }}
    paths["/jobs"] = {"get": {
        "summary": "List jobs, newest first (cursor pages)", "operationId": "list_jobs",
        "description": "With API keys: the jobs the caller's key submitted (an admin key: every job). "
                       "Without keys: every job.",
        "parameters": [
            {"name": "status", "in": "query", "required": False,
             "schema": {"type": "string", "enum": list(jobspec.STATUSES)}},
            {"name": "type", "in": "query", "required": False,
             "schema": {"type": "string", "enum": list(jobspec.JOB_TYPES)}},
            *page_params(jobspec.JOBS_PAGE_MAX, jobspec.JOBS_PAGE_DEFAULT),
        ],
        "responses": {
            "200": page_response("jobs", "JobStatus", "One page. A page filtered by status and type together (or, "
                                 "for a key that is not an admin key, by either) may be short with a "
                                 "next_cursor: follow it until it is null."),
            "400": _error_response("Unknown status or type, limit out of range, or a bad cursor."),
            **common_errors,
        },
    }}
    paths["/jobs/{job_id}"] = {"get": {
        "summary": "A job with its status history and result (the dashboard's detail view)",
        "operationId": "job_detail", "parameters": [job_id_param],
        "responses": {"200": {"description": "The job.", "content": {ok: {"schema": {"allOf": [
            {"$ref": "#/components/schemas/JobStatus"},
            {"type": "object", "required": ["history"], "properties": {
                "history": {"type": "array", "items": {
                    "type": "object", "required": ["status", "at"],
                    "properties": {"status": {"type": "string", "enum": list(jobspec.STATUSES)},
                                   "at": timestamp}}},
                "result": {"type": "object", "properties": {"result_url": {"type": "string"},
                                                            "text": {"type": "string"}}}}},
        ]}}}}, **by_id},
    }}
    paths["/events/{job_id}"] = {"get": {
        "summary": "Live status as Server-Sent Events (of a job, or of a pipeline)",
        "description": "An `event: status` with the JobStatus object as `data:` on every change (status, "
                       "phase, progress, queue position, webhook), then `event: end` with the final one, "
                       "and the stream closes. Comment lines keep it alive. Send Last-Event-ID to resume: "
                       "no repeat of the event you have, and 204 once you have the final one. Given a "
                       "pipeline's id, the data is its Pipeline object, sent on every change of it or of one "
                       "of its steps.",
        "operationId": "events", "parameters": [
            job_id_param,
            {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
        ],
        "responses": {
            "200": {"description": "The event stream.", "content": {"text/event-stream": {
                "schema": {"type": "string"}}}},
            "204": {"description": "The job is finished and Last-Event-ID is its final event."},
            **by_id,
            "503": _error_response("Redis cannot be reached, or this API process holds SSE_MAX_STREAMS "
                                   "streams already; see Retry-After."),
        },
    }}
    pipeline_id_param = {"name": "pipeline_id", "in": "path", "required": True,
                         "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
                         "description": "A pipeline id as returned on submission (a lower-case UUID4)."}
    pipeline_by_id = {"400": _error_response("Malformed pipeline id."),
                      "404": _error_response("Unknown pipeline id, or (with API keys) another key's pipeline: "
                                             "answered exactly as an unknown id."),
                      **common_errors}
    paths["/pipelines"] = {
        "post": {
            "summary": "Submit a pipeline: jobs whose inputs are earlier steps' outputs",
            "description": pipelines.REFERENCE_TEXT + " Each step is the body of one job of its type (the same "
                           "fields, limits and defaults as its route). Steps whose inputs are ready are queued "
                           "at once; the others wait (status waiting) and are queued, at the end of the queue "
                           "taken next, in the step that finishes the last step they take outputs from. A "
                           "failed or cancelled step fails every step that depends on it. One final webhook "
                           "(notify_url) with each step's result.",
            "operationId": "submit_pipeline",
            "parameters": [{"name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
                            "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN.pattern},
                            "description": "As on the job routes: the same key and the same pipeline (as "
                                           "validated) within 24 h give the same pipeline, queued once."}],
            "requestBody": {"required": True, "content": {ok: {"schema": {
                "$ref": "#/components/schemas/PipelineRequest"}}}},
            "responses": {
                "200": {"description": "Written: every step is a job.", "content": {ok: {"schema": {
                    "$ref": "#/components/schemas/PipelineAccepted"}}}},
                "400": _error_response("Refused before anything is queued, the message naming the step and field "
                                       "(steps.<step>.<field>: ...): an unknown step, a cycle, an output the step "
                                       "type does not have, text into a URL field, a media file into a text "
                                       "field, a reference inside a longer string, more than "
                                       f"{jobspec.MAX_PIPELINE_STEPS} steps, or a field its job route refuses; "
                                       "also malformed JSON and a bad Idempotency-Key."),
                "413": _error_response("Body larger than MAX_CONTENT_LENGTH."),
                "415": _error_response("Body is not JSON."),
                "422": _error_response("Idempotency-Key reused with another request."),
                "429": _error_response("Rate limit exceeded (each step counts as a submission); see Retry-After."),
                **common_errors,
            },
        },
        "get": {
            "summary": "List pipelines, newest first, with their steps (cursor pages)",
            "description": "With API keys: the caller's pipelines (an admin key: every pipeline).",
            "operationId": "list_pipelines",
            "parameters": page_params(jobspec.PIPELINES_PAGE_MAX, jobspec.PIPELINES_PAGE_DEFAULT),
            "responses": {
                "200": page_response("pipelines", "Pipeline", "One page."),
                "400": _error_response("limit out of range, or a bad cursor."),
                **common_errors,
            },
        },
    }
    paths["/pipelines/{pipeline_id}"] = {"get": {
        "summary": "A pipeline: its status and each step's status and result", "operationId": "pipeline_status",
        "parameters": [pipeline_id_param],
        "responses": {"200": {"description": "The pipeline.", "content": {ok: {"schema": {
            "$ref": "#/components/schemas/Pipeline"}}}}, **pipeline_by_id},
    }}
    paths["/pipelines/{pipeline_id}/cancel"] = {"post": {
        "summary": "Cancel every unfinished step of a pipeline (a running one as a job cancel does)",
        "operationId": "cancel_pipeline", "parameters": [pipeline_id_param],
        "responses": {"200": {"description": "Cancelled, or a step still runs and was asked to stop.",
                              "content": {ok: {"schema": {"$ref": "#/components/schemas/CancelAnswer"}}}},
                      "409": _error_response("Already finished."), **pipeline_by_id},
    }}
    paths["/pipelines/{pipeline_id}/webhook"] = resend_path("pipeline", "resend_pipeline_webhook", pipeline_id_param,
                                                            "GET /pipelines/{pipeline_id}", pipeline_by_id)
    paths["/overview"] = {"get": {
        "summary": "Operator numbers: queue, throughput, workers and their nodes, node-seconds, Redis replication",
        "description": "About every client's jobs: with API keys, for admin keys (C3_RENDER_ADMIN_KEYS) only.",
        "operationId": "overview",
        "responses": {"200": {"description": "The numbers.", "content": {ok: {"schema": {
            "type": "object",
            "required": ["queue_depth", "running", "finished_last_hour", "workers", "nodes_running",
                         "node_seconds_today", "node_seconds_total"],
            "properties": {
                "queue_depth": {"type": "integer"}, "running": {"type": "integer"},
                "finished_last_hour": {"type": "integer"}, "nodes_running": {"type": "integer"},
                "node_seconds_today": {"type": "number"}, "node_seconds_total": {"type": "number"},
                "jobs_total": {"type": "array", "items": {"type": "object"}},
                "webhook_deliveries": {"type": "object"},
                "workers": {"type": "array", "items": {"type": "object"}},
                "redis": {"type": "object", "description": "The Redis the API talks to: role (primary), "
                          "sentinel (found through Sentinel), min_replica_acks, and replicas: [{state, lag_s, "
                          "behind_bytes}]."},
            }}}}},
            "403": _error_response("The key is not an admin key (C3_RENDER_ADMIN_KEYS)."),
            **common_errors},
    }}
    text_answer = {"description": "", "content": {}}
    metrics_answer = dict(text_answer, description="Prometheus text format (prometheus_client).",
                          content={"text/plain": {"schema": {"type": "string"}}})
    paths["/metrics"] = {"get": {
        "summary": "Prometheus metrics, read from Redis (the same from every API process)",
        "operationId": "metrics",
        "responses": {"200": metrics_answer,
                      "401": _error_response("METRICS_TOKEN is set and Authorization: Bearer <it> is missing "
                                             "or wrong (or /metrics is not among PUBLIC_ROUTES and the API "
                                             "key is missing)."),
                      "503": _error_response("Redis cannot be reached.")},
    }}
    html_answer = dict(text_answer, description="An HTML page.",
                       content={"text/html": {"schema": {"type": "string"}}})
    paths["/docs"] = {"get": {"summary": "Swagger UI of this document (files served locally)",
                              "operationId": "docs", "responses": {"200": html_answer}}}
    paths["/dashboard"] = {"get": {"summary": "The operator's dashboard (HTML; its data calls need the API key)",
                                   "operationId": "dashboard", "responses": {"200": html_answer}}}

    def simple_route(summary: str, operation: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        responses = {"200": {"description": summary, "content": {ok: {"schema": {"type": "object"}}}}}
        responses.update(extra or {})
        return {"get": {"summary": summary, "operationId": operation, "responses": responses}}

    paths["/"] = simple_route("Service information", "index")
    paths["/healthz"] = simple_route("The process is alive", "healthz")
    paths["/readyz"] = simple_route("Redis answers and the output directory has room", "readyz",
                                    {"503": _error_response("Redis cannot be reached, or the disk is full "
                                                            "(less than MIN_FREE_DISK_MB free).")})
    paths["/openapi.json"] = simple_route("This OpenAPI 3.1 document", "openapi")
    return {
        "openapi": "3.1.0",
        "info": {"title": "c3-render", "version": VERSION,
                 "description": "AI render jobs on Comput3.ai GPU nodes: submit, follow, fetch results. With "
                                "API keys (C3_RENDER_API_KEYS) a job belongs to the key that submitted it: "
                                "another key gets 404 for it, as for an unknown id, and /jobs lists the "
                                "caller's own jobs; admin keys (C3_RENDER_ADMIN_KEYS) reach every job and "
                                "/overview."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "RenderKey": {"type": "apiKey", "in": "header", "name": "X-C3-RENDER-KEY"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{}, {"RenderKey": []}, {"Bearer": []}],
    }
