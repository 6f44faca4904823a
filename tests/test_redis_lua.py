"""The Lua scripts (lua/) and their one loader and call path (redis_lua.py), on a real redis-server: every
script loads and compiles, names only library pieces that exist, documents its KEYS, ARGV, result and the
names it uses; calls survive SCRIPT FLUSH (as after a Redis restart); no other Python file runs or holds Lua."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import redis
from conftest import ROOT

import config
import redis_lua

LUA = ROOT / "lua"
SCRIPTS = sorted(path.stem for path in LUA.glob("*.lua"))
PIECES = sorted(path.stem for path in (LUA / "lib").glob("*.lua"))
ALL_FILES = sorted([*LUA.glob("*.lua"), *(LUA / "lib").glob("*.lua")])


def section(head: list[str], label: str) -> str:
    """The text of one header entry (`-- KEYS: ...` and its indented continuation lines)."""
    lines: list[str] = []
    for line in head:
        if line.startswith(f"-- {label}:"):
            lines.append(line)
        elif lines and line.startswith("--    "):
            lines.append(line)
        elif lines:
            break
    return " ".join(lines)


def test_the_scripts_and_pieces_are_there():
    assert {"submit", "transition", "requeue", "put_back", "position", "record_with_position", "set_progress",
            "set_phase", "notify_changed", "flag_cancel", "settle_webhook", "resend_webhook", "return_inflight",
            "pool_reserve", "pool_lease", "own_node", "move_due_webhooks"} <= set(SCRIPTS)
    assert {"job_changed", "job_finished", "queue_slots", "position_of", "add_history"} <= set(PIECES)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_loads_and_compiles(r, name):
    loaded = redis_lua.script(name)
    assert "${" not in loaded.text
    assert r.script_load(loaded.text) == loaded.sha  # Redis compiles it (a syntax error raises)


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda path: str(path.relative_to(LUA)))
def test_every_file_names_existing_pieces_and_the_names_it_uses(path: Path):
    text = path.read_text(encoding="utf-8")
    head = redis_lua.header(text)
    assert head, "begins with a comment block"
    body = text.splitlines()[len(head):]
    assert not [line for line in body if line.startswith("--!")], "a `--! uses:` line outside the header is ignored"
    assert set(redis_lua.uses(text)) <= set(PIECES)
    assert path.stem not in redis_lua.uses(text)
    used = set(re.findall(r"\$\{(\w+)\}", text))
    assert used <= set(redis_lua.NAMES)
    names = section(head, "Names")
    assert names, "a `-- Names:` line (none when it uses none)"
    declared = set(re.findall(r"\w+", names.replace("/", " "))) - {"Names"}
    assert used <= declared, f"{sorted(used - declared)} used but not named in the header"
    if not used:
        assert names == "-- Names: none"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_header_declares_its_keys_argv_and_result(name):
    text = redis_lua.source(name)
    head = redis_lua.header(text)
    body = "\n".join(text.splitlines()[len(head):])
    keys, argv = section(head, "KEYS"), section(head, "ARGV")
    assert keys and argv and section(head, "Returns")
    assert {int(n) for n in re.findall(r"KEYS\[(\d+)\]", body)} <= {int(n) for n in re.findall(r"\[(\d+)\]", keys)}
    declared_argv = {int(n) for n in re.findall(r"\[(\d+)(?:\.\.\.)?\]", argv)}
    assert {int(n) for n in re.findall(r"ARGV\[(\d+)\]", body)} <= declared_argv
    # the config.py key names the KEYS line gives exist
    assert all(hasattr(config, key) for key in re.findall(r"\(([A-Z_]+_KEY)", keys))


@pytest.mark.parametrize("name", PIECES)
def test_library_pieces_get_what_they_need_as_arguments(name):
    text = redis_lua.source(name, lib=True)
    assert "KEYS[" not in text and "ARGV[" not in text


def test_pieces_are_joined_once_and_before_what_uses_them():
    text = redis_lua.script("record_with_position").text
    assert text.count("local function queue_right(") == 1
    assert text.index("local function queue_right(") < text.index("local function position_of(") < \
        text.index("redis.call('HGETALL'")
    text = redis_lua.script("transition").text
    for piece in ("job_changed", "job_finished", "push_front"):
        assert text.count(f"local function {piece}(") == 1


def test_key_names_come_from_config():
    text = redis_lua.script("submit").text
    assert f"'{config.JOBS_INDEX_KEY}'" in text
    assert f"'{config.JOBS_BY_STATUS_KEY.format(status='')}' .. status" in text  # (new_job: queued or waiting)
    assert str(config.DURATION_BUCKETS[-1]) in redis_lua.script("transition").text


def test_a_call_loads_the_script_again_after_script_flush(r):
    inflight, outbox = config.WEBHOOK_INFLIGHT_KEY.format(worker="w"), config.WEBHOOK_OUTBOX_KEY
    sha = redis_lua.script("return_inflight").sha
    r.rpush(inflight, "a", "b")
    r.script_flush()  # as after a Redis restart
    assert r.script_exists(sha) == [False]
    assert redis_lua.run(r, "return_inflight", (inflight, outbox)) == 2
    assert r.script_exists(sha) == [True]
    assert r.lrange(outbox, 0, -1) == ["a", "b"]
    r.rpush(inflight, "c")
    r.config_resetstat()
    assert redis_lua.run(r, "return_inflight", (inflight, outbox)) == 1
    stats = r.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1 and "cmdstat_eval" not in stats  # loaded: no text sent


def test_the_pipeline_form_loads_the_script_again_after_script_flush(r):
    r.script_flush()
    def reserve(node: str, max_nodes: object) -> tuple[tuple[str, ...], tuple[object, ...]]:
        keys = (config.POOL_NODES_KEY, config.POOL_NODE_KEY.format(id=node), config.POOL_LEASES_KEY.format(id=node))
        return keys, (node, "media", "w", "1.0", max_nodes, "", "{}")

    assert redis_lua.run_many(r, "pool_reserve", [reserve(f"n{n}", 2) for n in range(3)]) == [1, 1, 0]
    assert r.script_exists(redis_lua.script("pool_reserve").sha) == [True]
    assert r.smembers(config.POOL_NODES_KEY) == {"n0", "n1"}
    # an error comes back as its exception, in its place
    results = redis_lua.run_many(r, "pool_reserve", [reserve("n9", "many"), reserve("n0", 3)])
    assert isinstance(results[0], redis.ResponseError) and results[1] == 1


def python_files() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("var", "build", "__pycache__")]
        found += [Path(folder) / name for name in files if name.endswith(".py")]
    return found


def test_no_python_file_but_the_loader_runs_or_holds_lua():
    allowed = {ROOT / "redis_lua.py", Path(__file__).resolve()}  # the loader, and this test of it
    patterns = (".eval(", ".evalsha(", "redis.call(", "redis.pcall(", "script_load(", "register_script(")
    files = python_files()
    assert ROOT / "jobstore.py" in files and ROOT / "tests" / "test_jobstore.py" in files
    offenders = [f"{path.relative_to(ROOT)}: {pattern}" for path in files if path.resolve() not in allowed
                 for pattern in patterns if pattern in path.read_text(encoding="utf-8")]
    assert offenders == []
