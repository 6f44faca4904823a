"""The node pool's policy: which node a job takes, when a node is launched, when an idle one is stopped.

Plain functions of the pool's state (`NodeView`s), the clock and what was measured (`Estimates`): no
Redis and no network, so the same code decides in the worker (pool.py) and in the replays of
bench/cost_sim.py. Two policies (NODE_POLICY):
- `fixed`, the reference's rule: a job takes a free slot of a node of its type or launches a node (up to
  MAX_NODES); an idle node stops after GPU_IDLE_TIMEOUT.
- `adaptive` (default): a job takes a free slot, else waits for a busy one when the expected wait is
  shorter than a boot (scale out only when waiting would cost more than booting); an idle node is kept
  for the keep-alive that would have cost least on the idle gaps seen so far for its type (the
  break-even rule, keep-alive = one boot, until enough gaps are seen; never past GPU_IDLE_TIMEOUT); and
  when the gaps are regular, a node is launched a boot ahead of the expected next job (pre-warm).
MIN_WARM_NODES nodes are never stopped for idleness, and launched when fewer run.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

MIN_GAPS = 5  # idle gaps seen before the keep-alive follows them (until then: one boot, the break-even)
MAX_GAPS = 100  # the most recent idle gaps kept per node type
PREWARM_MIN_GAPS = 8  # regular gaps seen before a node is launched ahead of the next job
PREWARM_MAX_CV = 0.3  # gaps that regular (standard deviation / mean) are predictable enough
STOP_NEAR_EXPIRY_S = 60.0  # an idle node this close to its provider expiry is stopped


@dataclass(frozen=True)
class NodeView:
    """One pool node as the policy sees it."""

    id: str
    type: str
    state: str  # launching | booting | ready (a node being stopped is not in the view)
    launched_at: float
    expires: float
    slots: dict[str, int]  # service -> jobs of that service it may run at once
    total: int  # jobs it may run at once across services (1 after an out-of-memory error)
    leases: dict[str, tuple[float, ...]] = field(default_factory=dict)  # service -> start times of its jobs
    idle_since: float | None = None  # when its last job ended (or it became ready); None while it runs one


@dataclass(frozen=True)
class PolicyConfig:
    policy: str = "adaptive"  # adaptive | fixed
    max_nodes: int = 4
    min_warm: int = 0
    idle_timeout_s: float = 300.0  # GPU_IDLE_TIMEOUT: the fixed keep-alive, and the bound of any other
    node_max_age_s: float = 3600.0
    default_type: str = "media:fast"  # what MIN_WARM_NODES keeps warm


@dataclass
class Estimates:
    """What was measured: boot-to-ready seconds per node type, job seconds per service, idle gaps per type
    (seconds from the moment no node of the type ran a job to the next job of the type)."""

    boot_s: dict[str, float] = field(default_factory=dict)
    service_s: dict[str, float] = field(default_factory=dict)
    gaps: dict[str, list[float]] = field(default_factory=dict)
    default_boot_s: float = 120.0
    default_service_s: float = 60.0

    def boot(self, node_type: str) -> float:
        return self.boot_s.get(node_type, self.default_boot_s)

    def service(self, service: str) -> float:
        return self.service_s.get(service, self.default_service_s)


@dataclass(frozen=True)
class Placement:
    """What a job does now: lease (node id), launch (a node of its type), make_room (stop idle node id
    of another type so that one can launch), or wait (for a slot; ask again shortly)."""

    action: str
    node: str = ""
    why: str = ""


def running(node: NodeView) -> int:
    return sum(len(starts) for starts in node.leases.values())


def has_free_slot(node: NodeView, service: str) -> bool:
    return len(node.leases.get(service, ())) < node.slots.get(service, 0) and running(node) < node.total


def usable_for(node: NodeView, service: str, now: float, min_life_s: float, max_age_s: float) -> bool:
    """Whether the node could run a job of this service that may last min_life_s (slots aside)."""
    return (node.slots.get(service, 0) > 0 and node.expires - now >= min_life_s
            and now - node.launched_at <= max_age_s)


def slot_holders(node: NodeView, service: str) -> list[tuple[str, float]]:
    """(service, start) of the jobs one of which must end before this service gets a slot on a busy node:
    its jobs of the service when their slots are full, else all its jobs (its total is the limit)."""
    if len(node.leases.get(service, ())) >= node.slots.get(service, 0):
        return [(service, start) for start in node.leases.get(service, ())]
    return [(held, start) for held, starts in node.leases.items() for start in starts]


def expected_wait(nodes: list[NodeView], service: str, now: float, est: Estimates, queued: int = 0) -> float:
    """Seconds a job of this service can expect to wait for a slot on these busy nodes: the soonest expected
    end of a job holding one (each job's expected length is its service's measured time), then the jobs of
    the service queued behind it at its measured time over the service's slots (so a backlog is served by
    more nodes when it would wait longer than a boot)."""
    length = est.service(service)
    ends = [max(0.0, start + est.service(held) - now) for node in nodes for held, start in slot_holders(node, service)]
    slots = sum(min(node.slots.get(service, 0), node.total) for node in nodes)
    return min(ends, default=math.inf) + queued * length / max(1, slots)


def place(nodes: list[NodeView], node_type: str, service: str, now: float, est: Estimates, cfg: PolicyConfig,
          min_life_s: float = 0.0, prefer: str = "", queued: int = 0) -> Placement:
    """Where a job of this service, that may run min_life_s, runs: a free slot of a usable node of its type
    (`prefer` first, then the busiest: a warm node's free slots fill before another node runs, then the
    newest), else wait for one or launch one (see the module docstring). queued: the jobs of the service
    waiting in the queue behind this one."""
    mine = [n for n in nodes if n.type == node_type and usable_for(n, service, now, min_life_s, cfg.node_max_age_s)]
    free = [n for n in mine if has_free_slot(n, service)]
    if free:
        chosen = next((n for n in free if n.id == prefer), None) or max(
            free, key=lambda n: (n.state == "ready", running(n), n.launched_at))
        return Placement("lease", chosen.id, "a free slot")
    if mine and cfg.policy != "fixed":
        wait = expected_wait(mine, service, now, est, queued)
        if wait <= est.boot(node_type):
            return Placement("wait", "", f"a slot frees in about {wait:.0f} s, sooner than a boot")
    if len(nodes) < cfg.max_nodes:
        return Placement("launch", "", "no free slot" if mine else f"no {node_type} node")
    idle_other = [n for n in nodes if n.type != node_type and n.state == "ready" and not running(n)]
    if idle_other:
        return Placement("make_room", min(idle_other, key=lambda n: n.idle_since or now).id,
                         f"idle; its slot is needed for a {node_type} node (MAX_NODES reached)")
    return Placement("wait", "", f"MAX_NODES ({cfg.max_nodes}) nodes are running")


def keep_alive_s(node_type: str, est: Estimates, cfg: PolicyConfig) -> float:
    """How long an idle node of this type is kept before it is stopped.

    fixed: GPU_IDLE_TIMEOUT. adaptive: the keep-alive T that would have cost least on the recent idle
    gaps g of this type, each costing min(g, T) idle seconds plus one boot when g > T (the node was
    stopped and another booted); with fewer than MIN_GAPS gaps, one boot (the break-even rule, never more
    than twice the best choice in hindsight). Ties go to the longer T (fewer cold starts). At most
    GPU_IDLE_TIMEOUT.
    """
    if cfg.policy == "fixed":
        return cfg.idle_timeout_s
    boot = est.boot(node_type)
    gaps = est.gaps.get(node_type, [])
    if len(gaps) < MIN_GAPS:
        return min(boot, cfg.idle_timeout_s)
    candidates = sorted({0.0, cfg.idle_timeout_s, *(g for g in gaps if g < cfg.idle_timeout_s)})

    def cost(keep: float) -> float:
        return sum(min(g, keep) + (boot if g > keep else 0.0) for g in gaps)

    best = min(cost(keep) for keep in candidates)
    return max(keep for keep in candidates if cost(keep) <= best * (1 + 1e-9))


def idle_nodes_to_stop(nodes: list[NodeView], now: float, est: Estimates, cfg: PolicyConfig,
                       queued: dict[str, int] | None = None) -> list[tuple[str, str]]:
    """(node id, why) of the idle nodes to stop now: past their keep-alive, too old, or near expiry. The
    MIN_WARM_NODES newest nodes stay, and so does an idle node a queued job of its services is about to take."""
    queued = queued or {}
    warm = {n.id for n in sorted(nodes, key=lambda n: n.launched_at, reverse=True)[:cfg.min_warm]}
    stops = []
    for node in nodes:
        if node.state != "ready" or running(node) or node.idle_since is None:
            continue
        if now - node.launched_at > cfg.node_max_age_s:
            stops.append((node.id, "older than NODE_MAX_AGE"))
        elif node.expires - now < STOP_NEAR_EXPIRY_S:
            stops.append((node.id, "its provider expiry is near"))
        elif node.id in warm or any(queued.get(service) for service in node.slots):
            continue
        elif now - node.idle_since >= (keep := keep_alive_s(node.type, est, cfg)):
            stops.append((node.id, f"idle for {keep:.0f} s (keep-alive, NODE_POLICY={cfg.policy})"))
    return stops


def launches_wanted(nodes: list[NodeView], now: float, est: Estimates, cfg: PolicyConfig,
                    idle_since_by_type: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """(node type, why) of the nodes to launch now without a job asking: up to MIN_WARM_NODES, and
    (adaptive) a node a boot ahead of the expected next job of a type whose idle gaps are regular and whose
    nodes were all stopped."""
    wanted: list[tuple[str, str]] = []
    if len(nodes) < cfg.min_warm:
        wanted += [(cfg.default_type, "MIN_WARM_NODES")] * (cfg.min_warm - len(nodes))
    if cfg.policy == "fixed":
        return wanted[:max(0, cfg.max_nodes - len(nodes))]
    for node_type, idle_since in (idle_since_by_type or {}).items():
        gaps = est.gaps.get(node_type, [])
        if any(n.type == node_type for n in nodes) or len(gaps) < PREWARM_MIN_GAPS:
            continue
        mean = statistics.fmean(gaps)
        if mean <= 0 or statistics.pstdev(gaps) / mean > PREWARM_MAX_CV:
            continue
        expected = idle_since + min(gaps) * 0.9  # a little before the earliest gap seen
        if expected - est.boot(node_type) <= now <= idle_since + max(gaps) * 1.1:
            wanted.append((node_type, f"pre-warm: its next job is expected in {max(0.0, expected - now):.0f} s"))
    return wanted[:max(0, cfg.max_nodes - len(nodes))]


def add_gap(est: Estimates, node_type: str, gap_s: float) -> None:
    """Note one idle gap of a node type (the most recent MAX_GAPS are kept)."""
    gaps = est.gaps.setdefault(node_type, [])
    gaps.append(max(0.0, gap_s))
    del gaps[:-MAX_GAPS]


def moving_average(old: float | None, sample: float, weight: float = 0.3) -> float:
    """The estimate after one more sample (exponentially weighted; the first sample replaces the seed)."""
    return sample if old is None else old + weight * (sample - old)
