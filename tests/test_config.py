"""Configuration: each setting's default and variable are written once (config.Settings) and load() honours
both; every variable is documented in .env.example and the README."""

from __future__ import annotations

import base64
import dataclasses
import re
import tomllib
import typing

import pytest
from conftest import ROOT

import config

SETTINGS = dataclasses.fields(config.Settings)
REDIS_FALLBACK = ["REDIS_HOST", "REDIS_PORT"]  # read by the REDIS_URL setting when REDIS_URL is unset
ENV_NAMES = sorted({f.metadata["env"] for f in SETTINGS} | set(REDIS_FALLBACK))
TYPES = typing.get_type_hints(config.Settings)


def other_value(name: str, default: typing.Any) -> tuple[str, typing.Any]:
    """A valid value different from the default, as (environment text, the value load() must give)."""
    if name == "log_level":  # a level name, in any case
        return "debug", "DEBUG"
    special = {"node_policy": ("FIXED", "fixed"), "node_slots": ("csm:2, 3", "csm:2,3"),
               "price_per_hour": ("media:fast=1.5, 2", "media:fast=1.5,2")}  # checked, blanks dropped
    if name in special:
        return special[name]
    if name in ("minio_endpoint", "minio_public_url"):  # host[:port] or http(s)://host[:port]
        return "https://s3.example:9000", "https://s3.example:9000"
    kind = TYPES[name]
    if kind is bool:
        return ("false", False) if default else ("true", True)
    if kind is int:
        return str(default + 7), default + 7
    if kind is float:
        return str(default + 1.5), default + 1.5
    if kind is str:
        return f"set-{name}", f"set-{name}"
    if kind == tuple[str, ...]:
        return " a.example, b.example ,", ("a.example", "b.example")
    if kind == tuple[float, ...]:
        return "1,2.5", (1.0, 2.5)
    raise AssertionError(f"Settings.{name}: no test value for type {kind}; add one to other_value()")


def clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_settings_are_found():
    assert {"REDIS_URL", "C3_API_KEY", "GPU_IDLE_TIMEOUT", "WHISPER_AUDIO_INPUT_NAME"} <= set(ENV_NAMES)
    assert len({f.metadata["env"] for f in SETTINGS}) == len(SETTINGS), "two settings read the same variable"


def test_config_reads_no_variable_outside_the_settings():
    source = (ROOT / "config.py").read_text()
    read = set(re.findall(r"""(?:_env|environ\.get|environ)[(\[]['"]([A-Z0-9_]+)['"]""", source))
    assert read <= set(ENV_NAMES), f"read directly, not as a setting: {read - set(ENV_NAMES)}"


@pytest.mark.parametrize("name", ENV_NAMES)
def test_every_setting_is_documented(name):
    assert re.search(rf"^#?\s*{name}=", (ROOT / ".env.example").read_text(), re.M), f"{name} not in .env.example"
    whole_name = rf"(?<![A-Z0-9_]){name}(?![A-Z0-9_])"  # LOG_LEVEL is not documented by DEVNODE_LOG_LEVEL
    assert re.search(whole_name, (ROOT / "README.md").read_text()), f"{name} not in README.md"


@pytest.mark.parametrize("setting", SETTINGS, ids=[f.metadata["env"] for f in SETTINGS])
def test_unset_gives_the_field_default_and_set_gives_the_value(setting, monkeypatch):
    clear_env(monkeypatch)
    assert getattr(config.load(), setting.name) == setting.default
    text, expected = other_value(setting.name, setting.default)
    assert expected != setting.default
    if setting.name == "require_api_keys":  # on, it needs keys to load
        monkeypatch.setenv("C3_RENDER_API_KEYS", "k1")
    monkeypatch.setenv(setting.metadata["env"], text)
    assert getattr(config.load(), setting.name) == expected
    monkeypatch.setenv(setting.metadata["env"], f"  {text}  ")  # surrounding blanks are ignored
    assert getattr(config.load(), setting.name) == expected


def test_defaults_and_overrides(monkeypatch):
    clear_env(monkeypatch)
    defaults = config.load()
    assert defaults == config.Settings()
    assert defaults.redis_url == "redis://localhost:6379/0"
    assert defaults.gpu_idle_timeout_s == 300 and defaults.max_attempts == 3
    monkeypatch.setenv("REDIS_HOST", "cache.internal")
    monkeypatch.setenv("REDIS_PORT", "6380")
    assert config.load().redis_url == "redis://cache.internal:6380/0"
    monkeypatch.setenv("REDIS_URL", "redis://other:1/2")
    assert config.load().redis_url == "redis://other:1/2"
    monkeypatch.setenv("C3_RENDER_API_KEYS", " a, b ,,")
    assert config.load().api_keys == ("a", "b")
    monkeypatch.setenv("MAX_NODES", "many")
    with pytest.raises(SystemExit, match="MAX_NODES must be an integer"):
        config.load()


def test_clean_up_of_values(monkeypatch):
    clear_env(monkeypatch)
    monkeypatch.setenv("PUBLIC_ROUTES", "")  # set but empty: no route is open
    monkeypatch.setenv("C3_API_URL", "http://127.0.0.1:8700/api/v0/")
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://render.example//")
    monkeypatch.setenv("WEBHOOK_CONCURRENCY", "0")
    monkeypatch.setenv("WEBHOOK_PER_HOST", "-2")
    monkeypatch.setenv("MAX_NODES", " ")  # blank: the default
    settings = config.load()
    assert settings.public_routes == ()
    assert settings.c3_api_url == "http://127.0.0.1:8700/api/v0"
    assert settings.public_base_url == "https://render.example"
    assert (settings.webhook_concurrency, settings.webhook_per_host) == (1, 1)
    assert settings.max_nodes == config.Settings().max_nodes
    monkeypatch.setenv("GPU_IDLE_TIMEOUT", "soon")
    with pytest.raises(SystemExit, match="GPU_IDLE_TIMEOUT must be a number, got 'soon'"):
        config.load()
    monkeypatch.delenv("GPU_IDLE_TIMEOUT")
    monkeypatch.setenv("WEBHOOK_SCHEDULE", "5,x")
    with pytest.raises(SystemExit, match="WEBHOOK_SCHEDULE must be comma-separated seconds"):
        config.load()
    monkeypatch.delenv("WEBHOOK_SCHEDULE")
    monkeypatch.setenv("LOG_LEVEL", "loud")  # was a traceback from logging.basicConfig in the worker
    with pytest.raises(SystemExit, match="LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        config.load()


def test_secrets_stay_out_of_repr(monkeypatch):
    monkeypatch.setenv("C3_API_KEY", "very-secret-key")
    monkeypatch.setenv("MINIO_SECRET_KEY", "very-secret-s3")
    monkeypatch.setenv("WEBHOOK_SECRET", "very-secret-hook")
    monkeypatch.setenv("C3_RENDER_API_KEYS", "very-secret-api")
    text = repr(config.load())
    assert "very-secret" not in text


def test_a_retired_variable_is_named_with_its_replacement(monkeypatch):
    clear_env(monkeypatch)
    assert config.retired_variables_set() == []
    monkeypatch.setenv("COMFYUI_READY_TIMEOUT", "900")
    monkeypatch.setenv("SERVICE_READY_TIMEOUT", "600")
    assert config.retired_variables_set() == [
        "COMFYUI_READY_TIMEOUT is no longer read (since 0.2.0); set SERVICE_READY_TIMEOUT instead (now 600)"]
    assert config.load().service_ready_timeout_s == 600


def test_version_matches_pyproject():
    assert config.VERSION == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# --- values that cannot work stop the start (tests/test_startup_checks.py runs the processes) ----------

KEY = (bytes([0xFB, 0xFF, 0xFE]) * 11)[:32]  # base64 "+//+...=": padded, with "+" and "/"
STANDARD = base64.b64encode(KEY).decode()  # has '+' and '/': the URL-safe alphabet writes them '-' and '_'


@pytest.mark.parametrize(("secret", "key"), [
    ("whsec_" + STANDARD, KEY),
    ("whsec_" + STANDARD.rstrip("="), KEY),  # unpadded: the Python library adds the padding itself
    ("plain text secret", b"plain text secret"),  # no prefix: the text's bytes
])
def test_a_webhook_secret_gives_the_key_the_standard_webhooks_libraries_use(secret, key, monkeypatch):
    monkeypatch.setenv("WEBHOOK_SECRET", secret)
    assert config.load().webhook_secret == secret
    assert config.webhook_secret_key(secret) == key
    import webhooks
    assert webhooks.secret_bytes(secret) == key  # the signer reads it by the same rule


@pytest.mark.parametrize(("body", "why"), [
    (base64.urlsafe_b64encode(KEY).decode(), "not standard base64"),  # Python's decoder drops '-' '_': another key
    ("c2VjcmV0 c2VjcmV0", "not standard base64"),
    ("abcde", "length is wrong"),
    ("", "no key bytes"),
])
def test_a_whsec_secret_the_libraries_would_not_read_alike_is_a_configuration_error(body, why, monkeypatch):
    monkeypatch.setenv("WEBHOOK_SECRET", "whsec_" + body)
    with pytest.raises(SystemExit) as stopped:
        config.load()
    message = str(stopped.value.code)
    assert message.startswith("configuration error: WEBHOOK_SECRET ") and why in message
    assert not body or body not in message
    with pytest.raises(ValueError):
        config.webhook_secret_key("whsec_" + body)


@pytest.mark.parametrize("name", ["MINIO_PUBLIC_URL", "MINIO_ENDPOINT"])
@pytest.mark.parametrize(("value", "why"), [
    ("https://cdn.example.com/media", "has a path"),
    ("https://cdn.example.com/media/", "has a path"),
    ("http://s3.example:9000/?x=1", "query"),
    ("ftp://s3.example", "is not host:port"),
    ("http://s3.example:ninety", "invalid port"),
])
def test_an_s3_address_with_a_path_or_no_host_is_a_configuration_error(name, value, why, monkeypatch):
    clear_env(monkeypatch)
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        config.load()
    assert str(stopped.value.code).startswith(f"configuration error: {name} ") and why in str(stopped.value.code)


def test_an_s3_address_with_a_password_is_refused_without_repeating_it(monkeypatch):
    monkeypatch.setenv("MINIO_PUBLIC_URL", "https://user:pa55word@cdn.example.com")
    with pytest.raises(SystemExit) as stopped:
        config.load()
    assert "user info" in str(stopped.value.code) and "pa55word" not in str(stopped.value.code)


@pytest.mark.parametrize("value", ["cdn.example.com", "https://cdn.example.com/", "http://127.0.0.1:9000"])
def test_an_s3_address_of_host_and_port_loads(value, monkeypatch):
    monkeypatch.setenv("MINIO_PUBLIC_URL", value)
    assert config.load().minio_public_url == value.rstrip("/")


def test_require_api_keys_needs_keys(monkeypatch):
    clear_env(monkeypatch)
    monkeypatch.setenv("REQUIRE_API_KEYS", "1")
    with pytest.raises(SystemExit, match="^configuration error: C3_RENDER_API_KEYS is empty and REQUIRE_API_KEYS"):
        config.load()
    monkeypatch.setenv("C3_RENDER_API_KEYS", " , ")  # set, but no key in it
    with pytest.raises(SystemExit):
        config.load()
    monkeypatch.setenv("C3_RENDER_API_KEYS", "k1,k2")
    assert config.load().api_keys == ("k1", "k2")


@pytest.mark.parametrize(("addresses", "warned"), [
    (["127.0.0.1:8000"], []), (["[::1]:8000", "localhost:5000", "127.0.0.2"], []),
    (["0.0.0.0:8000"], ["0.0.0.0:8000"]), (["127.0.0.1:8000", "[::]:8000"], ["[::]:8000"]),
    (["192.168.1.20:8000"], ["192.168.1.20:8000"]), (["render.example"], ["render.example"]),
])
def test_the_keyless_warning_names_the_addresses_beyond_loopback(addresses, warned):
    warning = config.keyless_exposure_warning(config.Settings(), addresses)
    if not warned:
        assert warning is None
    else:
        assert warning.startswith("API keys are off (C3_RENDER_API_KEYS is empty)")
        assert all(address in warning for address in warned)
        assert not any(address in warning for address in addresses if address not in warned)
    with_keys = dataclasses.replace(config.Settings(), api_keys=("k",))
    assert config.keyless_exposure_warning(with_keys, addresses) is None
