"""The job types, their request fields, limits and defaults, and the validator built from them.

This table is the one place where a field's type, range and default live: the API validates with
it, /openapi.json is generated from it, and the worker reads the defaults it filled in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sentences import sentences_from_params

MAX_URL_LENGTH = 2048
MAX_MONOLOGUE_CHARS = 10_000  # all sentences together
MAX_SENTENCES = 200  # as the engine will speak them: array items, or text / a monologue string as split
MAX_REFERENCE_TEXT_CHARS = 2_000
MAX_PROMPT_CHARS = 2_000
MAX_JSON_DEPTH = 16  # arrays and objects inside each other in a request body
# RFC 3986 characters only, with well-formed percent escapes
_URI_CHARS = re.compile(r"^(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*$")
# The language codes faster-whisper knows (what the WhisperX app accepts, docs/node-protocols.md,
# WhisperX). Users may send a tag with a region or script subtag, in any case (pt-BR, en_US, EN): the API
# stores the bare code.
WHISPER_LANGUAGES = (
    "af", "am", "ar", "as", "az", "ba", "be", "bg", "bn", "bo", "br", "bs", "ca", "cs", "cy", "da", "de",
    "el", "en", "es", "et", "eu", "fa", "fi", "fo", "fr", "gl", "gu", "ha", "haw", "he", "hi", "hr", "ht",
    "hu", "hy", "id", "is", "it", "ja", "jw", "ka", "kk", "km", "kn", "ko", "la", "lb", "ln", "lo", "lt",
    "lv", "mg", "mi", "mk", "ml", "mn", "mr", "ms", "mt", "my", "ne", "nl", "nn", "no", "oc", "pa", "pl",
    "ps", "pt", "ro", "ru", "sa", "sd", "si", "sk", "sl", "sn", "so", "sq", "sr", "su", "sv", "sw", "ta",
    "te", "tg", "th", "tk", "tl", "tr", "tt", "uk", "ur", "uz", "vi", "yi", "yo", "zh", "yue",
)  # fmt: skip
# Exactly the accepted values, for the OpenAPI document too (JSON Schema regexes have no (?i) flag).
LANGUAGE_PATTERN = (
    "^(?:(?:"
    + "|".join("".join(f"[{c}{c.upper()}]" for c in code) for code in sorted(WHISPER_LANGUAGES, key=len, reverse=True))
    + ")(?:[-_][A-Za-z0-9]{1,8})*)?$"
)
# "Has a visible character": neither Python's whitespace nor JSON Schema's (ECMA-262), which differ on
# \x1c-\x1f, \x85 and \ufeff, so the validator and /openapi.json accept exactly the same strings.
NOT_BLANK_PATTERN = r"[^\s\x1c-\x1f\x85\ufeff]"
URL_PATTERN = r"^https?://([^/?#@]*@)?[^/?#:@]+"  # documented form: http(s), then a host

JOB_TYPES = ("csm", "portrait", "whisper", "analyze")
MEDIA_JOB_TYPES = ("csm", "portrait")  # their result is a file (result_url); the others give text
# The result's file name per job type (SPEC.md, File Storage); text results are kept as {id}.txt too.
RESULT_NAMES = {"csm": "{id}.mp3", "portrait": "{id}.mp4", "whisper": "{id}.txt", "analyze": "{id}.txt"}
# The input URLs each job type downloads and checks before any GPU time: (role, field, kind).
INPUT_URLS = {"whisper": (("audio", "audio_url", "audio"),),
              "portrait": (("image", "image_url", "image"), ("audio", "audio_url", "audio")),
              "analyze": (("image", "image_url", "image"),)}
CLONE_INPUT = ("reference_audio", "reference_audio_url", "audio")  # csm with voice "clone"
# waiting: a pipeline step whose inputs (earlier steps' outputs) are not all there yet; it is in no queue.
# Every queued job has an entry in the queue (the queue-position scheme of jobstore.py relies on it).
STATUSES = ("waiting", "queued", "running", "success", "failed", "cancelled")
FINISHED_STATUSES = ("success", "failed", "cancelled")
# Pipelines (POST /pipelines): steps are job bodies; a string that is exactly {{<step>.<output>}} takes an
# earlier step's output. What each type gives: a media file (result_url, of this kind) or text.
MAX_PIPELINE_STEPS = 10
STEP_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"
REFERENCE_PATTERN = r"^\{\{([A-Za-z0-9_-]{1,40})\.([A-Za-z0-9_]{1,40})\}\}$"
REFERENCE_INSIDE = re.compile(r"\{\{[^{}]*\.[^{}]*\}\}")  # the shape of a reference, anywhere in a string
OUTPUTS = {"csm": {"result_url": "audio"}, "portrait": {"result_url": "video"}, "whisper": {"text": "text"},
           "analyze": {"text": "text"}}
# An earlier step's stored result as a later step's input (never its public URL): the worker reads the file in
# OUTPUT_DIR or the bucket directly. Only the service writes it: a client's URL field must be http(s).
STORED_RESULT_PREFIX = "c3-render-result:"
JOBS_PAGE_DEFAULT = 50  # GET /jobs: jobs per page unless limit says otherwise
JOBS_PAGE_MAX = 200
# GET /pipelines: smaller pages, as each pipeline carries the status objects of its steps (up to 10)
PIPELINES_PAGE_DEFAULT = 20
PIPELINES_PAGE_MAX = 100
# What a running job is doing now (shown in /status with the time it entered the phase), in the order a
# job usually goes through them (inputs are downloaded and checked before any node is asked for).
PHASES = ("downloading", "waiting_for_node", "booting_node", "uploading_inputs", "rendering", "encoding",
          "storing")
VOICES = ("random", "conversational_a", "conversational_b", "clone")
WHISPER_MODELS = ("tiny", "base", "small", "medium", "large", "large-v2", "large-v3")
WHISPER_TASKS = ("transcribe", "translate")
JOB_ID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"  # lower-case UUID4
JOBS_CURSOR_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,20})?_" + JOB_ID_PATTERN[1:]  # created_at _ job id
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_LENGTH = 255
IDEMPOTENCY_KEY_PATTERN = re.compile(rf"^[!-~]{{1,{MAX_IDEMPOTENCY_KEY_LENGTH}}}$")  # visible ASCII

# The routes that submit jobs, and the job type each one submits.
SUBMIT_ROUTES = {
    "/csm": "csm",
    "/portrait": "portrait",
    "/api/v1/jobs/whisper": "whisper",
    "/whisper": "whisper",
    "/analyze": "analyze",
}


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # string | integer | number | url | enum | monologue
    description: str
    required: bool = False
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    max_length: int | None = None
    pattern: str | None = None


COMMON_FIELDS = (
    Field("notify_url", "url", "Webhook URL called once when the job finishes."),
    Field("max_time", "integer", "Seconds the job may run once started.", default=1200, minimum=60,
          maximum=7200),
    Field("complete_in", "integer", "Seconds from submission by which the job must be finished; "
          "stored as an absolute complete_by.", default=3600, minimum=60, maximum=86400),
)
# The longest a job can take to finish: by its complete_by (at most complete_in after submission) plus a
# last run of max_time. GET /jobs index entries older than this plus RESULT_TTL belong to expired records.
INDEX_HORIZON_S = int(sum(f.maximum or 0 for f in COMMON_FIELDS if f.name in ("complete_in", "max_time")))

JOB_FIELDS: dict[str, tuple[Field, ...]] = {
    "csm": (
        Field("monologue", "monologue", "Text to speak: a string (split into sentences as text is), or an "
              f"array of non-empty sentences; at most {MAX_SENTENCES} sentences either way. Exactly one of "
              "monologue and text.", max_length=MAX_MONOLOGUE_CHARS),
        Field("text", "string", "Text to speak, split into sentences by the service: a sentence ends at a line "
              f"break, or at . ! ? or an ellipsis followed by a space; at most {MAX_SENTENCES} sentences "
              "(a 400 names the field). Exactly one of monologue and text.",
              max_length=MAX_MONOLOGUE_CHARS, pattern=NOT_BLANK_PATTERN),
        Field("voice", "enum", "Voice to speak with; clone needs reference_audio_url and reference_text.",
              default="random", choices=VOICES),
        Field("reference_audio_url", "url", "Audio of the voice to clone (voice=clone only)."),
        Field("reference_text", "string", "Transcript of the reference audio (voice=clone only).",
              max_length=MAX_REFERENCE_TEXT_CHARS),
        Field("temperature", "number", "Randomness of the output.", default=0.9, minimum=0.0, maximum=2.0),
        Field("topk", "integer", "Tokens considered at each generation step.", default=50, minimum=1,
              maximum=100),
        Field("max_audio_length", "integer", "Maximum audio length per sentence, in milliseconds.",
              default=10000, minimum=1000, maximum=30000),
        Field("pause_duration", "integer", "Pause between sentences, in milliseconds.", default=150,
              minimum=0, maximum=1000),
    ),
    "portrait": (
        Field("image_url", "url", "Portrait image (JPEG, PNG or WebP).", required=True),
        Field("audio_url", "url", "Audio the portrait speaks.", required=True),
    ),
    "whisper": (
        Field("audio_url", "url", "Audio (or video with audio) to transcribe.", required=True),
        Field("model", "enum", "Whisper model size.", default="medium", choices=WHISPER_MODELS),
        Field("task", "enum", "transcribe keeps the language; translate gives English.",
              default="transcribe", choices=WHISPER_TASKS),
        Field("language", "language", "Language code such as en or pt-BR (stored as the bare code "
              "faster-whisper knows: pt-BR -> pt); empty to detect it.", default="", max_length=16,
              pattern=LANGUAGE_PATTERN),
    ),
    "analyze": (
        Field("image_url", "url", "Image to analyze.", required=True),
        Field("prompt", "string", "What to look for in the image.", max_length=MAX_PROMPT_CHARS),
    ),
}


class ValidationError(Exception):
    """A request body that cannot become a job; str() is the message for the client."""


def check_json_shape(body: Any) -> None:
    """Refuse (ValidationError) a parsed JSON body nested deeper than MAX_JSON_DEPTH, or holding a
    string that is not valid Unicode (a lone UTF-16 surrogate such as "\\ud800", which JSON allows but
    UTF-8 cannot carry): the message names the field."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ValidationError(f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels of arrays "
                                      "and objects)")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_unicode(key, f"{path}.{key}".lstrip(".") if path else "a field name")
                    where = f"{path}.{key}" if path else key
                else:
                    where = f"{path}[{key}]"
                stack.append((item, _printable(where), depth + 1))
        elif isinstance(value, str):
            _check_unicode(value, path or "the body")


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:100]


def _check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(f"{_printable(where)}: contains a lone UTF-16 surrogate "
                              f"(\\u{ord(text[exc.start]):04x}), which is not valid Unicode") from None


def fields_for(job_type: str) -> tuple[Field, ...]:
    return JOB_FIELDS[job_type] + COMMON_FIELDS


def range_text(field: Field) -> str:
    if field.kind == "enum":
        return "one of " + ", ".join(field.choices)
    if field.minimum is not None and field.maximum is not None:
        return f"{field.minimum:g} to {field.maximum:g}"
    return ""


def check_url(name: str, value: Any) -> str:
    """An absolute http(s) URL with a host; returns it unchanged."""
    if not isinstance(value, str):
        raise ValidationError(f"{name}: must be a string holding an http or https URL")
    if len(value) > MAX_URL_LENGTH:
        raise ValidationError(f"{name}: URL is longer than {MAX_URL_LENGTH} characters")
    if value != value.strip() or any(c.isspace() or ord(c) < 32 for c in value):
        raise ValidationError(f"{name}: URL must not contain spaces or control characters")
    if not _URI_CHARS.match(value):
        raise ValidationError(f"{name}: not a valid URL (use ASCII: percent-encode the path and query, "
                              "punycode for international host names)")
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ValidationError(f"{name}: not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValidationError(f"{name}: only http and https URLs are accepted")
    if not parts.hostname:
        raise ValidationError(f"{name}: URL has no host")
    if port == 0:
        raise ValidationError(f"{name}: not a valid URL")
    return value


def _check_number(field: Field, value: Any) -> int | float:
    wanted = "an integer" if field.kind == "integer" else "a number"
    # bool is an int in Python but never a number in JSON
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{field.name}: must be {wanted} from {range_text(field)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(f"{field.name}: must be {wanted} from {range_text(field)}")
    if field.kind == "integer" and isinstance(value, float):
        if not value.is_integer():  # 10000.0 is an integer in JSON Schema; 5.5 is not
            raise ValidationError(f"{field.name}: must be {wanted} from {range_text(field)}")
        value = int(value)
    if (field.minimum is not None and value < field.minimum) or (
        field.maximum is not None and value > field.maximum
    ):
        raise ValidationError(f"{field.name}: {value!r} is out of range; allowed {range_text(field)}")
    return value


def _check_string(field: Field, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{field.name}: must be a string")
    if field.max_length is not None and len(value) > field.max_length:
        raise ValidationError(f"{field.name}: longer than {field.max_length} characters")
    if field.pattern == NOT_BLANK_PATTERN and not re.search(field.pattern, value):
        raise ValidationError(f"{field.name}: must not be empty")
    if field.pattern is not None and not re.search(field.pattern, value):
        raise ValidationError(f"{field.name}: {value!r} is not allowed")
    return value


def whisper_language(value: str) -> str:
    """The bare faster-whisper code for a language tag (pt-BR, en_US, EN -> pt, en, en; "" stays "").

    Raises ValidationError naming the accepted codes when the primary subtag is not one of them.
    """
    primary = re.split(r"[-_]", value.strip(), maxsplit=1)[0].lower()
    if primary and primary not in WHISPER_LANGUAGES:
        raise ValidationError(
            f"language: {value!r} is not a language Whisper knows; use one of {', '.join(WHISPER_LANGUAGES)} "
            "(a region subtag such as pt-BR is accepted and dropped), or leave it empty to detect the language"
        )
    return primary


def _check_monologue(field: Field, value: Any) -> str | list[str]:
    if isinstance(value, str):
        if not re.search(NOT_BLANK_PATTERN, value):
            raise ValidationError("monologue: must not be empty")
        if len(value) > MAX_MONOLOGUE_CHARS:
            raise ValidationError(f"monologue: longer than {MAX_MONOLOGUE_CHARS} characters")
        return value
    if not isinstance(value, list) or not value:
        raise ValidationError("monologue: must be a string or a non-empty array of non-empty strings")
    if len(value) > MAX_SENTENCES:
        raise ValidationError(f"monologue: more than {MAX_SENTENCES} sentences")
    for index, sentence in enumerate(value):
        if not isinstance(sentence, str) or not re.search(NOT_BLANK_PATTERN, sentence):
            raise ValidationError(f"monologue[{index}]: must be a non-empty string")
    if sum(len(s) for s in value) > MAX_MONOLOGUE_CHARS:
        raise ValidationError(f"monologue: longer than {MAX_MONOLOGUE_CHARS} characters in all")
    return value


def check_field(field: Field, value: Any) -> Any:
    """Check one value against its field; return the value to store."""
    if field.kind == "url":
        return check_url(field.name, value)
    if field.kind in ("integer", "number"):
        return _check_number(field, value)
    if field.kind == "enum":
        if not isinstance(value, str) or value not in field.choices:
            raise ValidationError(f"{field.name}: {value!r} is not allowed; use {range_text(field)}")
        return value
    if field.kind == "monologue":
        return _check_monologue(field, value)
    if field.kind == "language":
        if not isinstance(value, str) or len(value) > (field.max_length or 16):
            raise ValidationError(f"{field.name}: must be a language code such as en or pt-BR")
        code = whisper_language(value)  # names the accepted codes when the language is unknown
        if not re.search(LANGUAGE_PATTERN, value):
            raise ValidationError(f"{field.name}: {value!r} is not a language tag such as en or pt-BR")
        return code
    return _check_string(field, value)


def _check_csm_rules(params: dict[str, Any]) -> None:
    if ("monologue" in params) == ("text" in params):
        raise ValidationError("give exactly one of monologue and text")
    # counted as the engine will split them (sentences.py), for text and a monologue string too
    spoken = len(sentences_from_params(params))
    if spoken > MAX_SENTENCES:
        given = "monologue" if "monologue" in params else "text"
        raise ValidationError(f"{given}: {spoken} sentences, more than {MAX_SENTENCES} (a sentence ends at a line "
                              "break, or at . ! ? or an ellipsis followed by a space); send fewer or split the job")
    if params["voice"] == "clone":
        for name in ("reference_audio_url", "reference_text"):
            if not params.get(name):
                raise ValidationError(f"{name}: required when voice is clone")
    else:
        for name in ("reference_audio_url", "reference_text"):
            if name in params:
                raise ValidationError(f"{name}: only used with voice=clone (voice is {params['voice']})")


def validate(job_type: str, body: Any) -> dict[str, Any]:
    """Check a request body for a job type; return its parameters with the defaults filled in.

    Raises ValidationError naming the field and the allowed values. Unknown fields are errors,
    so that a typo such as notify_ulr is never silently dropped.
    """
    if not isinstance(body, dict):
        raise ValidationError("request body must be a JSON object")
    fields = {f.name: f for f in fields_for(job_type)}
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ValidationError(
            f"unknown field(s): {', '.join(unknown)}; allowed fields are {', '.join(fields)}"
        )
    params: dict[str, Any] = {}
    for name, field in fields.items():
        if name in body and body[name] is not None:
            params[name] = check_field(field, body[name])
        elif field.required:
            raise ValidationError(f"{name}: required")
        elif field.default is not None:
            params[name] = field.default
    if job_type == "csm":
        _check_csm_rules(params)
    return params


def field_schema(field: Field) -> dict[str, Any]:
    """The JSON Schema (OpenAPI 3.1) of one field."""
    schema: dict[str, Any]
    if field.kind == "url":
        schema = {"type": "string", "format": "uri", "maxLength": MAX_URL_LENGTH,
                  "pattern": URL_PATTERN}
    elif field.kind == "integer":
        schema = {"type": "integer"}
    elif field.kind == "number":
        schema = {"type": "number"}
    elif field.kind == "enum":
        schema = {"type": "string", "enum": list(field.choices)}
    elif field.kind == "monologue":
        schema = {"oneOf": [
            {"type": "string", "pattern": NOT_BLANK_PATTERN, "maxLength": MAX_MONOLOGUE_CHARS},
            {"type": "array", "minItems": 1, "maxItems": MAX_SENTENCES,
             "items": {"type": "string", "pattern": NOT_BLANK_PATTERN}},
        ]}
    else:
        schema = {"type": "string"}
        if field.max_length is not None:
            schema["maxLength"] = field.max_length
        if field.pattern is not None:
            schema["pattern"] = field.pattern
    if not field.required:  # JSON null counts as not sent
        if "oneOf" in schema:
            schema["oneOf"].append({"type": "null"})
        else:
            schema["type"] = [schema["type"], "null"]
            if "enum" in schema:
                schema["enum"] = [*schema["enum"], None]
    if field.minimum is not None:
        schema["minimum"] = field.minimum
    if field.maximum is not None:
        schema["maximum"] = field.maximum
    if field.default is not None:
        schema["default"] = field.default
    schema["description"] = field.description
    return schema


def request_schema(job_type: str) -> dict[str, Any]:
    fields = fields_for(job_type)
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {f.name: field_schema(f) for f in fields},
        "required": [f.name for f in fields if f.required],
    }
    if job_type == "csm":
        schema.update(csm_rules_schema())
    if not schema["required"]:
        del schema["required"]
    return schema


def csm_rules_schema() -> dict[str, Any]:
    """The csm rules across fields, in JSON Schema: exactly one of monologue and text; the reference
    fields required (non-empty) with voice=clone and absent (or null) otherwise."""
    absent = {"type": "null"}  # a property constrained to null: not sent, or sent as null
    present = {"not": {"type": "null"}}
    clone_fields = ("reference_audio_url", "reference_text")
    return {
        "description": "Exactly one of monologue and text. voice=clone requires reference_audio_url and "
                       "reference_text, which are refused with other voices.",
        "oneOf": [
            {"required": ["monologue"], "properties": {"monologue": present, "text": absent}},
            {"required": ["text"], "properties": {"text": present, "monologue": absent}},
        ],
        "if": {"required": ["voice"], "properties": {"voice": {"const": "clone"}}},
        "then": {"required": list(clone_fields),
                 "properties": {"reference_audio_url": {"type": "string"},
                                "reference_text": {"type": "string", "minLength": 1}}},
        "else": {"properties": {name: absent for name in clone_fields}},
    }


def stored_result_name(value: Any) -> str | None:
    """The stored result's name (e.g. <job id>.mp3) a pipeline put into an input URL field, else None."""
    if isinstance(value, str) and value.startswith(STORED_RESULT_PREFIX):
        return value[len(STORED_RESULT_PREFIX):]
    return None


def input_kind(job_type: str, name: str) -> str | None:
    """What an input URL field of a job type takes ("audio" or "image"), or None when it is not one."""
    inputs = INPUT_URLS.get(job_type, ()) + ((CLONE_INPUT,) if job_type == "csm" else ())
    return next((kind for _role, field, kind in inputs if field == name), None)


def is_text_field(job_type: str, name: str) -> bool:
    """Whether a field of a job type holds free text (what a whisper or analyze output can fill)."""
    return any(f.name == name and f.kind in ("string", "monologue") for f in fields_for(job_type))


def validate_stored(job_type: str, params: dict[str, Any]) -> None:
    """Check a stored job's parameters again, as validate() does (ValidationError): a pipeline step's, once
    earlier steps filled in its inputs (a transcript may be empty, or longer than the field allows). A stored
    result in an input URL field stands for a URL."""
    body = {name: ("https://stored.invalid/" if stored_result_name(value) else value)
            for name, value in params.items()}
    validate(job_type, body)
