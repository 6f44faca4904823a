"""Redis with a replica and three Sentinels on loopback, for the failover tests: real redis-server
processes (Debian's redis-server; `redis-server --sentinel` is the Sentinel), on free ports, with the
Sentinels' timings made short so that a failover takes a second or two instead of half a minute.

`start_ha(tmp)` returns an `HA` whose primary is `ha.primary_port()` (as the Sentinels see it);
`kill_primary()` SIGKILLs it, `restart(port)` starts a killed server again (it comes back as a primary
with its AOF, and the Sentinels turn it into a replica of the new primary, as in production),
`switch_over()` is `SENTINEL FAILOVER`, `wait_for_primary(...)` waits until the Sentinels agree on a new
primary that has its replica online.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import redis
from conftest import free_port, wait_for
from redis.backoff import NoBackoff
from redis.retry import Retry

MASTER = "c3test"
# Sentinel timings (down-after and failover-timeout are settings; the periods are SENTINEL DEBUG knobs
# of redis-server 7, meant for tests): a dead primary is noticed after 1 s and replaced within ~2 s, and
# a primary that comes back is made a replica within ~1 s (8 s with the default periods).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
DEBUG_PERIODS = ("info-period", "500", "publish-period", "250", "ask-period", "250", "ping-period", "250",
                 "tilt-period", "3000")


def client(port: int, **kwargs) -> redis.Redis:
    """A plain client that fails at once instead of retrying (redis-py retries 10 times by default)."""
    return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0),
                       decode_responses=True, **kwargs)


def answers(port: int) -> bool:
    try:
        return bool(client(port).ping())
    except redis.RedisError:
        return False


@dataclasses.dataclass
class HA:
    root: Path
    data_ports: list[int]
    sentinel_ports: list[int]
    down_after_ms: int = DOWN_AFTER_MS
    fast_periods: bool = True  # the SENTINEL DEBUG periods above (False: redis-server's defaults)
    procs: dict[int, subprocess.Popen] = dataclasses.field(default_factory=dict)

    @property
    def sentinels(self) -> str:
        """REDIS_SENTINELS for the services."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def env(self, **extra: str) -> dict[str, str]:
        return {"REDIS_SENTINELS": self.sentinels, "REDIS_SENTINEL_MASTER": MASTER, **extra}

    def start_data(self, port: int, replica_of: int | None = None) -> None:
        directory = self.root / f"redis-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                "--appendfsync", "everysec", "--dir", str(directory), "--repl-diskless-sync-delay", "0",
                "--logfile", str(directory / "redis.log")]
        if replica_of:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: answers(port), 10, what=f"redis-server on {port}")

    def start_sentinel(self, port: int, primary: int) -> None:
        directory = self.root / f"sentinel-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "sentinel.conf"  # Sentinel rewrites it (its view of the primary and replicas)
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {directory}\nlogfile {directory / 'sentinel.log'}\n"
                        f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n"
                        f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
                        f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n")
        self.procs[port] = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        wait_for(lambda: answers(port), 10, what=f"redis sentinel on {port}")
        if self.fast_periods:
            client(port).execute_command("SENTINEL", "DEBUG", *DEBUG_PERIODS)

    def primary_port(self) -> int | None:
        """The primary the Sentinels name (the first that answers), or None."""
        for port in self.sentinel_ports:
            try:
                address = client(port).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def healthy(self, primary: int) -> bool:
        """Every Sentinel names `primary`, and it has an online replica that the Sentinels know."""
        try:
            named = {int(client(p).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)[1])
                     for p in self.sentinel_ports}
            info = client(primary).info("replication")
            known = client(self.sentinel_ports[0]).execute_command("SENTINEL", "REPLICAS", MASTER)
        except (redis.RedisError, TypeError):
            return False
        online = info.get("role") == "master" and any(
            isinstance(info.get(f"slave{i}"), dict) and info[f"slave{i}"].get("state") == "online"
            for i in range(int(info.get("connected_slaves") or 0)))
        return named == {primary} and online and bool(known)

    def wait_for_primary(self, other_than: int | None = None, timeout: float = 30.0) -> int:
        """Wait until the Sentinels agree on a primary (not `other_than`) with its replica online."""
        def settled() -> int | None:
            port = self.primary_port()
            return port if port and port != other_than and self.healthy(port) else None
        return wait_for(settled, timeout, interval=0.1, what="the Sentinels to agree on a primary with a replica")

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def kill_primary(self) -> int:
        port = self.primary_port()
        assert port is not None
        self.kill(port)
        return port

    def restart(self, port: int) -> None:
        """Start a killed data server again with its own data, as a supervisor would."""
        self.start_data(port)

    def switch_over(self) -> None:
        client(self.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", MASTER)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


def start_ha(root: Path, down_after_ms: int = DOWN_AFTER_MS, fast_periods: bool = True) -> HA:
    """A primary, its replica and three Sentinels watching them; returns once the Sentinels know both.
    (bench/redis_capacity.py also starts it with production-like timings, to measure the failover gap.)"""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    ha = HA(root, [free_port(), free_port()], [free_port(), free_port(), free_port()], down_after_ms, fast_periods)
    try:
        primary, replica = ha.data_ports
        ha.start_data(primary)
        ha.start_data(replica, replica_of=primary)
        for port in ha.sentinel_ports:
            ha.start_sentinel(port, primary)
        ha.wait_for_primary()
        # each Sentinel must know the others too (they find each other through the primary), or no quorum
        wait_for(lambda: all(client(p).sentinel_master(MASTER)["num-other-sentinels"] == 2 for p in ha.sentinel_ports),
                 20, interval=0.1, what="the Sentinels to find each other")
    except BaseException:
        ha.stop()
        raise
    return ha


def wait_switched(ha: HA, old: int, timeout: float = 30.0) -> int:
    """After the primary `old` failed: the new primary, once the Sentinels agree on it (its replica may
    not be back yet)."""
    return wait_for(lambda: (port := ha.primary_port()) and port != old and port, timeout, interval=0.05,
                    what="the Sentinels to promote the replica")
