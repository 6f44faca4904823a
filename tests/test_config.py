"""Configuration: every setting read from the environment is documented in .env.example and the README."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import ROOT

import config

ENV_NAMES = sorted(set(re.findall(r'(?:_env|_int|_float|_bool|_list|environ\.get|environ)[(\[]"([A-Z0-9_]+)"',
                                  (ROOT / "config.py").read_text())))


def test_settings_are_found():
    assert {"REDIS_URL", "C3_API_KEY", "MINIO_ENDPOINT", "GPU_IDLE_TIMEOUT"} <= set(ENV_NAMES)


@pytest.mark.parametrize("name", ENV_NAMES)
def test_every_setting_is_documented(name):
    assert re.search(rf"^#?\s*{name}=", (ROOT / ".env.example").read_text(), re.M), f"{name} not in .env.example"
    assert name in (ROOT / "README.md").read_text(), f"{name} not in README.md"


def test_defaults_and_overrides(monkeypatch):
    for name in ENV_NAMES + ["REDIS_HOST", "REDIS_PORT"]:
        monkeypatch.delenv(name, raising=False)
    defaults = config.load()
    assert defaults == dataclasses.replace(config.Settings())
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


def test_secrets_stay_out_of_repr(monkeypatch):
    monkeypatch.setenv("C3_API_KEY", "very-secret-key")
    monkeypatch.setenv("MINIO_SECRET_KEY", "very-secret-s3")
    monkeypatch.setenv("WEBHOOK_SECRET", "very-secret-hook")
    text = repr(config.load())
    assert "very-secret" not in text
