"""Validation of job requests (jobspec.validate), table-driven, and its OpenAPI document kept in step."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import app as api
import jobspec
from jobspec import ValidationError, validate
from sentences import split_sentences

BASE = {
    "csm": {"text": "Hello there."},
    "portrait": {"image_url": "https://example.com/a.jpg", "audio_url": "https://example.com/a.mp3"},
    "whisper": {"audio_url": "https://example.com/a.mp3"},
    "analyze": {"image_url": "https://example.com/a.jpg"},
}


def with_(job_type: str, **changes) -> dict:
    body = dict(BASE[job_type])
    body.update(changes)
    return body


def numeric_fields():
    for job_type in jobspec.JOB_TYPES:
        for field in jobspec.fields_for(job_type):
            if field.kind in ("integer", "number"):
                yield job_type, field


@pytest.mark.parametrize(("job_type", "field"), list(numeric_fields()),
                         ids=lambda v: v if isinstance(v, str) else v.name)
def test_both_edges_of_every_range(job_type, field):
    assert validate(job_type, with_(job_type, **{field.name: field.minimum}))[field.name] == field.minimum
    assert validate(job_type, with_(job_type, **{field.name: field.maximum}))[field.name] == field.maximum
    step = 1 if field.kind == "integer" else 0.01
    for outside in (field.minimum - step, field.maximum + step):
        with pytest.raises(ValidationError) as info:
            validate(job_type, with_(job_type, **{field.name: outside}))
        assert field.name in str(info.value)
        assert f"{field.minimum:g} to {field.maximum:g}" in str(info.value)


@pytest.mark.parametrize(("job_type", "field"), list(numeric_fields()),
                         ids=lambda v: v if isinstance(v, str) else v.name)
@pytest.mark.parametrize("wrong", ["10", True, "abc", [1], {"a": 1}, float("nan"), float("inf")])
def test_wrong_types_for_numbers(job_type, field, wrong):
    with pytest.raises(ValidationError) as info:
        validate(job_type, with_(job_type, **{field.name: wrong}))
    assert field.name in str(info.value)


def test_integer_fields_refuse_floats_and_number_fields_take_ints():
    with pytest.raises(ValidationError, match="topk: must be an integer"):
        validate("csm", with_("csm", topk=5.5))
    assert validate("csm", with_("csm", topk=5.0))["topk"] == 5 and isinstance(
        validate("csm", with_("csm", topk=5.0))["topk"], int)
    assert validate("csm", with_("csm", temperature=1))["temperature"] == 1


def test_defaults_filled():
    params = validate("csm", {"text": "Hi."})
    assert params == {"text": "Hi.", "voice": "random", "temperature": 0.9, "topk": 50,
                      "max_audio_length": 10000, "pause_duration": 150, "max_time": 1200,
                      "complete_in": 3600}
    assert validate("whisper", BASE["whisper"])["model"] == "medium"
    assert validate("whisper", BASE["whisper"])["task"] == "transcribe"
    assert validate("whisper", BASE["whisper"])["language"] == ""


@pytest.mark.parametrize("job_type", jobspec.JOB_TYPES)
def test_unknown_fields_are_named(job_type):
    with pytest.raises(ValidationError) as info:
        validate(job_type, with_(job_type, notify_ulr="https://example.com/hook"))
    assert "notify_ulr" in str(info.value)


@pytest.mark.parametrize("body", [[], "text", 3, None])
def test_body_must_be_object(body):
    with pytest.raises(ValidationError, match="JSON object"):
        validate("csm", body)


@pytest.mark.parametrize(("job_type", "name"), [
    ("portrait", "image_url"), ("portrait", "audio_url"), ("whisper", "audio_url"), ("analyze", "image_url"),
])
def test_required_urls(job_type, name):
    body = dict(BASE[job_type])
    del body[name]
    with pytest.raises(ValidationError, match=f"{name}: required"):
        validate(job_type, body)


@pytest.mark.parametrize("url", [
    "ftp://example.com/a.mp3", "file:///etc/passwd", "javascript:alert(1)", "example.com/a.mp3",
    "http://", "https:///path", " https://example.com/a", "https://exa mple.com/", "http://h:99999/",
    "https://example.com/" + "a" * 2100, 42, ["https://example.com"],
])
def test_bad_urls(url):
    with pytest.raises(ValidationError) as info:
        validate("whisper", {"audio_url": url})
    assert "audio_url" in str(info.value)


def test_notify_url_checked_like_inputs():
    with pytest.raises(ValidationError, match="notify_url: only http and https"):
        validate("analyze", with_("analyze", notify_url="gopher://example.com"))
    assert validate("analyze", with_("analyze", notify_url="http://example.com/h"))["notify_url"]


@pytest.mark.parametrize(("body", "message"), [
    ({}, "exactly one of monologue and text"),
    ({"text": "a", "monologue": ["b"]}, "exactly one of monologue and text"),
    ({"text": "   "}, "text: must not be empty"),
    ({"monologue": []}, "monologue"),
    ({"monologue": ["ok", ""]}, r"monologue\[1\]"),
    ({"monologue": ["ok", 3]}, r"monologue\[1\]"),
    ({"monologue": ""}, "monologue: must not be empty"),
    ({"monologue": "x" * (jobspec.MAX_MONOLOGUE_CHARS + 1)}, "longer than"),
    ({"monologue": ["x"] * (jobspec.MAX_SENTENCES + 1)}, "more than"),
    ({"monologue": ["x" * 6000, "y" * 6000]}, "in all"),
    ({"text": 5}, "text: must be a string"),
])
def test_text_vs_monologue_rules(body, message):
    with pytest.raises(ValidationError, match=message):
        validate("csm", body)


@pytest.mark.parametrize("name", ["text", "monologue"])
def test_text_and_a_monologue_string_are_limited_to_200_sentences_as_the_engine_splits_them(name):
    at_limit = " ".join(f"Sentence {n}." for n in range(jobspec.MAX_SENTENCES))
    assert len(split_sentences(at_limit)) == jobspec.MAX_SENTENCES
    assert validate("csm", {name: at_limit})[name] == at_limit
    with pytest.raises(ValidationError, match=rf"^{name}: 201 sentences, more than 200"):
        validate("csm", {name: at_limit + " One more."})
    with pytest.raises(ValidationError, match=rf"^{name}: 2500 sentences, more than 200"):
        validate("csm", {name: "Hi. " * 2499 + "Go."})  # 9,999 characters: within the length limit
    lines = "\n".join(["a line without a full stop"] * 201)  # a line break ends a sentence too
    with pytest.raises(ValidationError, match=rf"^{name}: 201 sentences"):
        validate("csm", {name: lines})
    # abbreviations and initials do not end a sentence, so they do not count as one
    assert validate("csm", {name: "Dr. J. K. Smith met Mr. Jones. " * 150})


def test_monologue_string_and_list_accepted():
    assert validate("csm", {"monologue": "One. Two."})["monologue"] == "One. Two."
    assert validate("csm", {"monologue": ["One.", "Two."]})["monologue"] == ["One.", "Two."]


def test_clone_requirements():
    clone = {"text": "Hi.", "voice": "clone"}
    with pytest.raises(ValidationError, match="reference_audio_url: required when voice is clone"):
        validate("csm", clone)
    with pytest.raises(ValidationError, match="reference_text: required when voice is clone"):
        validate("csm", {**clone, "reference_audio_url": "https://example.com/ref.wav"})
    ok = validate("csm", {**clone, "reference_audio_url": "https://example.com/ref.wav",
                          "reference_text": "this is me"})
    assert ok["voice"] == "clone"
    with pytest.raises(ValidationError, match="only used with voice=clone"):
        validate("csm", {"text": "Hi.", "reference_text": "x"})


@pytest.mark.parametrize(("name", "value"), [
    ("voice", "robot"), ("model", "huge"), ("task", "summarise"), ("language", "English"),
    ("language", "e"), ("voice", 1),
])
def test_enums_and_language(name, value):
    job_type = "csm" if name == "voice" else "whisper"
    with pytest.raises(ValidationError) as info:
        validate(job_type, with_(job_type, **{name: value}))
    assert name in str(info.value)


def test_language_tags_become_the_bare_code_whisper_knows():
    # The WhisperX app refuses region subtags (docs/node-protocols.md, WhisperX): the API stores the bare code.
    for sent, stored in (("pt-BR", "pt"), ("en-US", "en"), ("EN", "en"), ("zh_Hans", "zh"), ("HAW", "haw")):
        assert validate("whisper", with_("whisper", language=sent))["language"] == stored
    for bad in ("zz", "xx-YY", "pt-", "english"):
        with pytest.raises(ValidationError) as info:
            validate("whisper", with_("whisper", language=bad))
        assert "language" in str(info.value)
    with pytest.raises(ValidationError, match="use one of af, am, .* pt, .* zh, yue"):
        validate("whisper", with_("whisper", language="zz"))


def test_language_codes_and_prompt_limit():
    for code in ("", "en", "yue"):
        assert validate("whisper", with_("whisper", language=code))["language"] == code
    assert validate("analyze", with_("analyze", prompt="p" * 2000))["prompt"] == "p" * 2000
    with pytest.raises(ValidationError, match="prompt: longer than 2000"):
        validate("analyze", with_("analyze", prompt="p" * 2001))


# --- the OpenAPI document follows the same table ----------------------------------------------

def test_openapi_matches_validation_rules():
    doc = api.openapi_document()
    schemas = doc["components"]["schemas"]
    for job_type in jobspec.JOB_TYPES:
        schema = schemas[f"{job_type.capitalize()}Request"]
        assert schema["additionalProperties"] is False
        assert set(schema["properties"]) == {f.name for f in jobspec.fields_for(job_type)}
        assert set(schema.get("required", [])) == {f.name for f in jobspec.fields_for(job_type) if f.required}
        for field in jobspec.fields_for(job_type):
            prop = schema["properties"][field.name]
            if field.minimum is not None:
                assert prop["minimum"] == field.minimum and prop["maximum"] == field.maximum
                # the documented edges are accepted, one step beyond is refused
                step = 1 if "integer" in prop["type"] else 0.5
                validate(job_type, with_(job_type, **{field.name: prop["minimum"]}))
                with pytest.raises(ValidationError):
                    validate(job_type, with_(job_type, **{field.name: prop["maximum"] + step}))
            if field.choices:
                assert prop["enum"] == [*field.choices, None]  # null: not sent
                for choice in field.choices:
                    body = with_(job_type, **{field.name: choice})
                    if choice == "clone":
                        body.update(reference_audio_url="https://e.com/r.wav", reference_text="t")
                    validate(job_type, body)
            if field.default is not None:
                assert prop["default"] == field.default
                assert validate(job_type, BASE[job_type])[field.name] == field.default
            if field.max_length is not None and field.kind == "string":
                assert prop["maxLength"] == field.max_length
    for route in jobspec.SUBMIT_ROUTES:
        assert "post" in doc["paths"][route]
    for route in ("/status/{job_id}", "/result/{job_id}", "/cancel/{job_id}", "/job/{job_id}",
                  "/files/{name}", "/", "/healthz", "/readyz", "/openapi.json"):
        assert route in doc["paths"]


# --- property tests --------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-10**6, max_value=10**6))
def test_topk_accepted_exactly_in_range(value):
    accepted = True
    try:
        validate("csm", with_("csm", topk=value))
    except ValidationError:
        accepted = False
    assert accepted == (1 <= value <= 100)


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_temperature_accepted_exactly_in_range(value):
    accepted = True
    try:
        validate("csm", with_("csm", temperature=value))
    except ValidationError:
        accepted = False
    assert accepted == (0.0 <= value <= 2.0)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), st.none() | st.integers() | st.text(), max_size=4))
def test_any_body_is_accepted_or_refused_cleanly(extra):
    body = {**BASE["whisper"], **extra}
    try:
        params = validate("whisper", body)
    except ValidationError as exc:
        assert str(exc)
    else:
        assert set(params) <= {f.name for f in jobspec.fields_for("whisper")}


@pytest.mark.parametrize("text", ["\u001c", " \u001f ", "\u0085", "\ufeff", "\t\n"])
def test_text_of_only_separators_is_blank_for_the_validator_and_the_schema(text):
    """Python and JSON Schema (ECMA-262) disagree on what whitespace is; both must call these blank."""
    import re as python_re

    assert not python_re.search(jobspec.NOT_BLANK_PATTERN, text)
    with pytest.raises(jobspec.ValidationError, match="must not be empty"):
        jobspec.validate("csm", {"monologue": text})
    with pytest.raises(jobspec.ValidationError, match="non-empty"):
        jobspec.validate("csm", {"monologue": ["ok", text]})
