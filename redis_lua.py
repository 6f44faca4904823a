"""The one loader and call path of c3-render's Lua scripts: the files in lua/.

A script is `lua/<name>.lua`. Its header (the comment lines it begins with) says what it does, its KEYS
and ARGV, what it returns, which of the NAMES below it uses, and, in a line `--! uses: a, b`, the library
pieces of `lua/lib/` it needs (a piece may name pieces of its own). Loading puts those pieces in front of
the script, each once and before what uses it, and substitutes the key and channel names of config.py
for `${name}` (NAMES): key names are written in config.py only.

Every call is an EVALSHA, so a script's text crosses the wire only when Redis answers NOSCRIPT (it was
restarted, or SCRIPT FLUSH ran): then the call is sent again with the text (EVAL), which caches it anew.
`run()` calls one script; `run_many()` calls one script for many key/argument sets in one pipeline.
`run(..., confirm=True)` is the call of a step that settles a job: with REDIS_MIN_REPLICA_ACKS it goes in
one pipeline with the replication check (redis_conn.py) and raises NotReplicated when too few replicas
have it.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any

import redis

import config
import redis_conn
from jobspec import INDEX_HORIZON_S

# `${name}` in a script -> the text put in (names of keys with one {field} become the part before it,
# the prefix a script completes with `..`).
NAMES: dict[str, str] = {
    "by_status": config.JOBS_BY_STATUS_KEY.format(status=""),
    "by_type": config.JOBS_BY_TYPE_KEY.format(type=""),
    "by_owner": config.JOBS_BY_OWNER_KEY.format(owner=""),
    "index": config.JOBS_INDEX_KEY,
    "job_prefix": config.JOB_KEY.format(id=""),
    "history_prefix": config.JOB_HISTORY_KEY.split("{id}")[0],
    "history_suffix": config.JOB_HISTORY_KEY.split("{id}")[1],
    "jobs_total": config.JOBS_TOTAL_KEY,
    "duration": config.JOB_DURATION_KEY.format(type=""),
    "recent": config.FINISHED_RECENT_KEY,
    "queue_channel": config.QUEUE_EVENTS_CHANNEL,
    "job_channel": config.JOB_EVENTS_CHANNEL.format(id=""),
    "buckets": ", ".join(str(b) for b in config.DURATION_BUCKETS),
    "horizon": str(INDEX_HORIZON_S),
    "pool_node": config.POOL_NODE_KEY.format(id=""),
    "pool_leases": config.POOL_LEASES_KEY.format(id=""),
    "node_time": config.NODE_TIME_KEY,
    "pipeline_prefix": config.PIPELINE_KEY.format(id=""),
    "pipeline_channel": config.PIPELINE_EVENTS_CHANNEL.format(id=""),
    "pipelines_index": config.PIPELINES_INDEX_KEY,
    "pipelines_by_owner": config.PIPELINES_BY_OWNER_KEY.format(owner=""),
}

_USES = re.compile(r"^--! uses:(.*)$")


@dataclass(frozen=True)
class Script:
    name: str
    text: str  # as sent to Redis: library pieces and names put in
    sha: str  # Redis' id of the text (SHA-1)


def source(name: str, lib: bool = False) -> str:
    """The text of `lua/<name>.lua` (or `lua/lib/<name>.lua`) as written."""
    folder = resources.files("lua") / "lib" if lib else resources.files("lua")
    return (folder / f"{name}.lua").read_text(encoding="utf-8")


def header(text: str) -> list[str]:
    """The comment lines a script or piece begins with."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return lines


def uses(text: str) -> list[str]:
    """The library pieces a header names in its `--! uses:` lines, in order."""
    names = []
    for line in header(text):
        match = _USES.match(line)
        if match:
            names += [name.strip() for name in match.group(1).split(",") if name.strip()]
    return names


def _pieces(names: list[str], joined: list[str], seen: set[str]) -> None:
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        text = source(name, lib=True)
        _pieces(uses(text), joined, seen)
        joined.append(text)


@functools.cache
def script(name: str) -> Script:
    """The script `lua/<name>.lua` as Redis runs it (read once per process)."""
    own = source(name)
    joined: list[str] = []
    _pieces(uses(own), joined, set())
    text = Template("\n".join([*joined, own])).substitute(NAMES)
    return Script(name, text, hashlib.sha1(text.encode()).hexdigest())  # noqa: S324 (Redis' script id)


def run(r: redis.Redis, name: str, keys: Sequence[str], *args: Any, confirm: bool = False) -> Any:
    """Run one script (one round trip; the text is sent only after NOSCRIPT). With confirm, the client's
    REDIS_MIN_REPLICA_ACKS replicas must have its effect (and all before it) within the timeout, or
    NotReplicated is raised (carrying the script's answer)."""
    loaded = script(name)
    if confirm and redis_conn.durability(r).replica_acks:
        return _run_confirmed(r, loaded, keys, args)
    try:
        return r.evalsha(loaded.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        return r.eval(loaded.text, len(keys), *keys, *args)


def _run_confirmed(r: redis.Redis, loaded: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """The script, the probe write and WAIT in one pipeline on one connection (WAIT counts the replicas
    that have that connection's writes)."""
    for call in ("evalsha", "eval"):
        pipe = r.pipeline(transaction=False)
        getattr(pipe, call)(loaded.sha if call == "evalsha" else loaded.text, len(keys), *keys, *args)
        redis_conn.add_confirmation(r, pipe)
        result, _probe, acked = pipe.execute(raise_on_error=False)
        if not isinstance(result, redis.exceptions.NoScriptError):
            break
    if isinstance(result, Exception):
        raise result
    if isinstance(acked, Exception):
        raise acked
    redis_conn.check_confirmed(r, result, int(acked))
    return result


def run_many(r: redis.Redis, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
    """Run one script once per (keys, args) in one pipeline (one round trip); the results in order, an
    error as its exception. After a NOSCRIPT the script is loaded and the pipeline sent once more."""
    loaded = script(name)

    def send() -> list[Any]:
        pipe = r.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(loaded.sha, len(keys), *keys, *args)
        return pipe.execute(raise_on_error=False)

    results = send()
    if any(isinstance(result, redis.exceptions.NoScriptError) for result in results):
        r.script_load(loaded.text)  # Redis restarted or was flushed since this process loaded it
        results = send()
    return results
