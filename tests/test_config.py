"""Configuration: each setting's default and variable are written once (config.Settings) and load() honours
both; every variable is documented in .env.example and the README."""

from __future__ import annotations

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
