"""Connections to Redis for every process (the API and its SSE listener, the workers and their
heartbeat, sweep and webhook threads, the benchmarks): one Redis at REDIS_URL, or the primary that
Redis Sentinel names (REDIS_SENTINELS, REDIS_SENTINEL_MASTER), and the replication check of the steps
that must survive a failover.

Following a failover without a restart:
- with Sentinel, a new connection asks the Sentinels for the primary (redis-py's SentinelConnectionPool),
  so once they have promoted a replica, new connections go to it, and idle ones to the old primary are
  dropped when the pool sees the address change;
- a command answered READONLY (it reached a demoted primary), or cut off by a connection error while the
  Sentinels already name another primary, is sent once more on a new connection to the primary
  (`PrimaryMoved`). Both mean the command did nothing that lasts (a demoted primary's writes are thrown
  away when it resyncs from the new one), so running it again cannot do it twice;
- scripts are loaded again on NOSCRIPT (redis_lua.py), and the SSE listener resubscribes (events.py).

No acknowledged write lost (REDIS_MIN_REPLICA_ACKS=N): the scripts that settle a job run with
`confirm=True` (redis_lua.run), which sends them in one pipeline with a small write to
REPLICATION_PROBE_KEY and `WAIT N timeout` on the same connection. WAIT counts the replicas that have
everything up to that connection's last write, and the probe makes that write the newest, so a
confirmation also covers writes this step only read (a job another connection finished). Fewer
replicas in time raise `NotReplicated`: the step may or may not survive a failover, so the caller
answers 503 (a submit) or retries (a worker's settle) instead of going on as if it were safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection, parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

import config

T = TypeVar("T")
SENTINEL_TIMEOUT_S = 2.0  # one Sentinel's answer; they are asked in turn until one names a primary
FIRST_PROMOTION_TTL_S = 24 * 3600  # how long PRIMARY_SINCE_KEY keeps when a promotion was first seen


class PrimaryMoved(redis.ConnectionError):
    """The command reached a demoted primary (READONLY), or lost its connection while another primary
    was named: retried once on a new connection (see the module docstring)."""


class NotReplicated(redis.RedisError):
    """Fewer than REDIS_MIN_REPLICA_ACKS replicas confirmed a step within REDIS_REPLICA_ACK_TIMEOUT_S.
    `result` is what the step answered on the primary (it may still be lost in a failover)."""

    def __init__(self, result: Any, acked: int, wanted: int) -> None:
        super().__init__(f"{acked} of {wanted} replicas confirmed the write in time")
        self.result = result
        self.acked = acked
        self.wanted = wanted


@dataclass(frozen=True)
class Durability:
    """What a client made by connect() asks of Redis: replicas that must confirm a settling step, how
    long to wait for them, how long a submit keeps retrying through a failover, and whether the
    primary is found through Sentinel."""

    replica_acks: int = 0
    ack_timeout_ms: int = 500
    failover_wait_s: float = 0.0
    sentinel: bool = False


NO_DURABILITY = Durability()


def durability(r: redis.Redis) -> Durability:
    """The requirements of a client made by connect() (a client made otherwise asks for none)."""
    return getattr(r, "c3_durability", NO_DURABILITY)


# --- connections -----------------------------------------------------------------------------------

def _command_lost_to_failover(connection: AbstractConnection, error: redis.ConnectionError) -> bool:
    """After a connection error: do the Sentinels name a primary other than the one this connection
    reached? (False without Sentinel, or when none of them answers.)"""
    pool = getattr(connection, "connection_pool", None)
    manager = getattr(pool, "sentinel_manager", None)
    if manager is None or isinstance(error, PrimaryMoved):
        return False
    try:
        return manager.discover_master(pool.service_name) != (connection.host, connection.port)
    except redis.RedisError:
        return False


class _FollowsPrimary:
    """Connection behaviour shared by both kinds below: READONLY and connection errors at a moved
    primary become PrimaryMoved, which the client's Retry sends once more on a new connection."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            AbstractConnection.send_packed_command(self, command, check_health)  # type: ignore[arg-type]
        except redis.ConnectionError as exc:
            if _command_lost_to_failover(self, exc):  # type: ignore[arg-type]
                raise PrimaryMoved(f"the primary moved ({exc})") from exc
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            # AbstractConnection's own reading: SentinelManagedConnection's would turn READONLY into a
            # plain ConnectionError, which cannot be told apart from a dead server
            return AbstractConnection.read_response(self, *args, **kwargs)  # type: ignore[arg-type]
        except redis.ReadOnlyError as exc:
            self.disconnect()  # type: ignore[attr-defined]
            raise PrimaryMoved("the primary was demoted to a replica (READONLY)") from exc
        except redis.ConnectionError as exc:
            if _command_lost_to_failover(self, exc):  # type: ignore[arg-type]
                raise PrimaryMoved(f"the primary moved ({exc})") from exc
            raise


class FollowingConnection(_FollowsPrimary, redis.Connection):
    """A connection to REDIS_URL's host (a managed Redis whose name moves to the new primary)."""


class FollowingSSLConnection(_FollowsPrimary, redis.SSLConnection):
    """The same over TLS (rediss:// URLs)."""


FOLLOWING = {redis.Connection: FollowingConnection, redis.SSLConnection: FollowingSSLConnection}


class FollowingSentinelConnection(_FollowsPrimary, SentinelManagedConnection):
    """A connection to the primary the Sentinels name."""


class BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """redis-py's Sentinel pool, blocking like BlockingConnectionPool when all connections are busy."""


def connect(where: config.Settings | str, timeout_s: float = 5.0, max_connections: int = 100) -> redis.Redis:
    """The client every c3-render process uses: settings (REDIS_SENTINELS / REDIS_SENTINEL_MASTER, else
    REDIS_URL, with REDIS_PASSWORD; and what settling steps must wait for), or a plain redis:// URL (tools
    and tests). Timeouts make a dead Redis an error instead of a hang; the pool makes a thread wait (up
    to timeout_s) for a free connection when all max_connections are busy, as a burst of woken /events
    streams can make them."""
    settings = config.Settings(redis_url=where) if isinstance(where, str) else where
    retry = Retry(NoBackoff(), 1, supported_errors=(PrimaryMoved,))  # only a command lost to a failover
    common: dict[str, Any] = {"decode_responses": True, "socket_connect_timeout": timeout_s,
                              "socket_timeout": timeout_s, "health_check_interval": 30, "retry": retry}
    if settings.redis_password:
        common["password"] = settings.redis_password
    if settings.redis_sentinels:
        sentinel_side = {"socket_timeout": min(timeout_s, SENTINEL_TIMEOUT_S),
                         "socket_connect_timeout": min(timeout_s, SENTINEL_TIMEOUT_S),
                         "retry": Retry(NoBackoff(), 0), "decode_responses": True}
        if settings.redis_sentinel_password:
            sentinel_side["password"] = settings.redis_sentinel_password
        addresses = [config.sentinel_address(entry) for entry in settings.redis_sentinels]
        manager = Sentinel(addresses, sentinel_kwargs=sentinel_side)
        client = manager.master_for(settings.redis_sentinel_master, connection_pool_class=BlockingSentinelPool,
                                    connection_class=FollowingSentinelConnection, max_connections=max_connections,
                                    timeout=timeout_s, **common)
    else:
        kind = parse_url(settings.redis_url).get("connection_class", redis.Connection)  # unix:// stays as it is
        pool = redis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=max_connections,
                                                     timeout=timeout_s, connection_class=FOLLOWING.get(kind, kind),
                                                     **common)
        client = redis.Redis(connection_pool=pool)
    client.c3_durability = Durability(  # type: ignore[attr-defined]
        replica_acks=max(0, settings.redis_min_replica_acks),
        ack_timeout_ms=max(1, int(settings.redis_replica_ack_timeout_s * 1000)),
        failover_wait_s=settings.redis_failover_wait_s, sentinel=bool(settings.redis_sentinels))
    return client


def find_primary_again(r: redis.Redis) -> None:
    """Ask the Sentinels for the primary now (not at the next new connection): when it moved, the
    pool drops its idle connections to the old one, and busy ones as they come back."""
    pool = r.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        try:
            pool.get_master_address()
        except redis.RedisError:
            pass  # no Sentinel answers: the next connection asks again


# --- the replication check -------------------------------------------------------------------------

def add_confirmation(r: redis.Redis, pipe: Any) -> None:
    """Add the probe write and WAIT for the client's REDIS_MIN_REPLICA_ACKS to a pipeline
    (transaction=False), after the commands they confirm; the WAIT's answer comes last."""
    wanted = durability(r)
    pipe.set(config.REPLICATION_PROBE_KEY, "1")
    pipe.execute_command("WAIT", wanted.replica_acks, wanted.ack_timeout_ms)


def check_confirmed(r: redis.Redis, result: Any, acked: int) -> None:
    """Raise NotReplicated (after asking the Sentinels where the primary is) unless `acked` replicas are
    enough for the client's REDIS_MIN_REPLICA_ACKS."""
    wanted = durability(r).replica_acks
    if acked < wanted:
        find_primary_again(r)
        raise NotReplicated(result, acked, wanted)


def through_failover(r: redis.Redis, step: Callable[[], T]) -> T:
    """Run an idempotent step again while a failover is under way, for up to REDIS_FAILOVER_WAIT_S:
    after NotReplicated (the Sentinels may be promoting a replica, or a new primary waits for its
    replica), and with Sentinel after a connection error (the primary is gone and not yet replaced).
    The last error is raised when the time is up."""
    wanted = durability(r)
    deadline = time.monotonic() + wanted.failover_wait_s
    pause = 0.1
    while True:
        try:
            return step()
        except (NotReplicated, redis.ConnectionError) as exc:
            retry = isinstance(exc, NotReplicated) or wanted.sentinel
            if not retry or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


# --- what the sweep reads --------------------------------------------------------------------------

def primary_age_s(r: redis.Redis, now: float | None = None) -> float:
    """Seconds this Redis has been the primary: its uptime, or less when it was promoted from a replica
    (a failover) since it started. The promotion's time is noted in Redis by the first caller to see
    it (PRIMARY_SINCE_KEY, per replication id), since Redis itself does not say."""
    now = time.time() if now is None else now
    uptime = float(r.info("server").get("uptime_in_seconds") or 0)
    info = r.info("replication")  # (one section per INFO: Redis before 7 takes no more)
    if int(info.get("second_repl_offset", -1)) == -1:
        return uptime  # never promoted
    key = config.PRIMARY_SINCE_KEY.format(replid=info.get("master_replid", ""))
    pipe = r.pipeline(transaction=False)
    pipe.set(key, repr(now), nx=True, ex=FIRST_PROMOTION_TTL_S)
    pipe.get(key)
    _, since = pipe.execute()
    return min(uptime, max(0.0, now - float(since or now)))
