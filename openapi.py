"""The OpenAPI 3.1 document of the c3-render API, generated from jobspec.py (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

import config
import jobspec
from jobspec import IDEMPOTENCY_HEADER, IDEMPOTENCY_KEY_PATTERN, JOB_ID_PATTERN

VERSION = config.VERSION


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_document(settings: config.Settings | None = None) -> dict[str, Any]:
    """An OpenAPI 3.1 document of every route, field, range and error."""
    ok = "application/json"
    timestamp = {"type": ["string", "null"], "format": "date-time"}
    schemas: dict[str, Any] = {
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
                "progress": {"type": "integer", "minimum": 0, "maximum": 100},
                "cancel_requested": {"type": "boolean"},
                "webhook": {
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
                },
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

    job_id_param = {"name": "job_id", "in": "path", "required": True,
                    "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
                    "description": "A job id as returned on submission (a lower-case UUID4)."}
    common_errors = {
        "401": _error_response("Missing or wrong API key (when C3_RENDER_API_KEYS is set)."),
        "503": _error_response("Redis cannot be reached."),
    }
    paths: dict[str, Any] = {}
    for route, job_type in jobspec.SUBMIT_ROUTES.items():
        paths[route] = {"post": {
            "summary": f"Submit a {job_type} job" + (" (alias)" if route == "/whisper" else ""),
            "operationId": "submit_" + route.strip("/").replace("/", "_"),
            "parameters": [{"name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
                            "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN.pattern},
                            "description": "Same key and body within 24 h: the same job, queued once."}],
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
                "422": _error_response("Idempotency-Key reused with a different body."),
                "429": _error_response("Rate limit exceeded; see Retry-After."),
                **common_errors,
            },
        }}
    by_id = {"400": _error_response("Malformed job id."), "404": _error_response("Unknown job id."),
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
    paths["/jobs/{job_id}/webhook"] = {"post": {
        "summary": "Send a finished job's final webhook again (same body and webhook-id), after it was "
                   "delivered or failed for good",
        "operationId": "resend_webhook", "parameters": [job_id_param],
        "responses": {"202": {"description": "Queued for delivery; follow it in /status.",
                              "content": {ok: {"schema": {"$ref": "#/components/schemas/WebhookQueued"}}}},
                      "409": _error_response("Not finished, no notify_url, or the webhook is being "
                                             "delivered."),
                      **by_id},
    }}
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
                 "description": "AI render jobs on Comput3.ai GPU nodes: submit, follow, fetch results."},
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
