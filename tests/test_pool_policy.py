"""The node pool's policy (pool_policy.py) on hand-made timelines: which node a job takes, when a node is
launched or kept, when an idle one stops. Plain functions: no Redis, no clock but the one given."""

from __future__ import annotations

import pytest

import pool_policy
from pool_policy import Estimates, NodeView, PolicyConfig

SLOTS = {"csm": 1, "whisper": 1, "portrait": 1, "analyze": 1}
BOOT = 120.0


def node(node_id: str, *, state: str = "ready", launched: float = 0.0, leases: dict | None = None,
         idle_since: float | None = 0.0, total: int = 4, node_type: str = "media:fast",
         expires: float = 10_000.0) -> NodeView:
    return NodeView(node_id, node_type, state, launched, expires, SLOTS, total,
                    {k: tuple(v) for k, v in (leases or {}).items()}, None if leases else idle_since)


def est(**gaps: list[float]) -> Estimates:
    return Estimates(boot_s={"media:fast": BOOT}, service_s={"csm": 30.0, "whisper": 40.0},
                     gaps={t.replace("_", ":"): g for t, g in gaps.items()}, default_boot_s=BOOT)


ADAPTIVE = PolicyConfig(policy="adaptive", max_nodes=3, idle_timeout_s=300)
FIXED = PolicyConfig(policy="fixed", max_nodes=3, idle_timeout_s=300)


def test_a_free_slot_of_a_warm_node_comes_first_and_the_busiest_node_is_filled():
    busy = node("busy", leases={"csm": [90.0]})
    idle = node("idle")
    choice = pool_policy.place([idle, busy], "media:fast", "whisper", 100.0, est(), ADAPTIVE)
    assert choice == pool_policy.Placement("lease", "busy", "a free slot")  # packed: idle can stop
    assert pool_policy.place([idle, busy], "media:fast", "whisper", 100.0, est(), ADAPTIVE,
                             prefer="idle").node == "idle"  # a preferred node first (a pipeline's)


def test_a_busy_slot_is_waited_for_when_it_frees_sooner_than_a_boot_else_a_node_is_launched():
    busy = node("busy", leases={"csm": [90.0]})  # a 30 s CSM job started 10 s ago: ~20 s left
    wait = pool_policy.place([busy], "media:fast", "csm", 100.0, est(), ADAPTIVE)
    assert wait.action == "wait" and "20 s" in wait.why
    # a backlog behind it: 5 more CSM jobs x 30 s on one slot is longer than a boot: scale out
    assert pool_policy.place([busy], "media:fast", "csm", 100.0, est(), ADAPTIVE, queued=5).action == "launch"
    # the reference's rule (fixed): no free slot means a launch
    assert pool_policy.place([busy], "media:fast", "csm", 100.0, est(), FIXED).action == "launch"


def test_max_nodes_is_never_passed_and_an_idle_node_of_another_type_makes_room():
    nodes = [node("m1", leases={"csm": [0.0]}), node("m2", leases={"csm": [0.0]}),
             node("v1", node_type="ollama_webui:fast", idle_since=50.0)]
    choice = pool_policy.place(nodes, "media:fast", "csm", 100.0, est(), FIXED)
    assert (choice.action, choice.node) == ("make_room", "v1")
    nodes[2] = node("v1", node_type="ollama_webui:fast", leases={"analyze": [90.0]})  # busy: no room
    assert pool_policy.place(nodes, "media:fast", "csm", 100.0, est(), FIXED).action == "wait"
    assert pool_policy.place([], "media:fast", "csm", 0.0, est(),
                             PolicyConfig(max_nodes=0)).action == "wait"


def test_a_node_that_would_expire_or_is_too_old_is_not_taken():
    short = node("short", expires=100.0 + 600)
    assert pool_policy.place([short], "media:fast", "csm", 100.0, est(), ADAPTIVE, min_life_s=1200).action == "launch"
    assert pool_policy.place([short], "media:fast", "csm", 100.0, est(), ADAPTIVE, min_life_s=300).action == "lease"
    old = node("old", launched=0.0)
    cfg = PolicyConfig(max_nodes=3, node_max_age_s=3600)
    assert pool_policy.place([old], "media:fast", "csm", 3700.0, est(), cfg).action == "launch"


def test_a_node_running_one_job_at_a_time_after_an_out_of_memory_error_has_no_second_slot():
    solo = node("solo", leases={"csm": [90.0]}, total=1)
    assert pool_policy.place([solo], "media:fast", "whisper", 100.0, est(), ADAPTIVE).action == "wait"
    assert pool_policy.expected_wait([solo], "whisper", 100.0, est()) == pytest.approx(20.0)


def test_keep_alive_is_one_boot_until_enough_gaps_are_seen():
    assert pool_policy.keep_alive_s("media:fast", est(), ADAPTIVE) == BOOT
    assert pool_policy.keep_alive_s("media:fast", est(media_fast=[10.0] * 4), ADAPTIVE) == BOOT
    short_timeout = PolicyConfig(idle_timeout_s=30)
    assert pool_policy.keep_alive_s("media:fast", est(), short_timeout) == 30  # GPU_IDLE_TIMEOUT bounds it
    assert pool_policy.keep_alive_s("media:fast", est(media_fast=[1.0] * 50), FIXED) == 300


def test_keep_alive_follows_the_gaps_seen():
    # jobs every 20-60 s: keeping the node through every gap costs less than a boot per gap; a longer
    # keep-alive costs the same on these gaps and saves a cold start on a longer one: GPU_IDLE_TIMEOUT
    assert pool_policy.keep_alive_s("media:fast", est(media_fast=[20.0, 35.0, 60.0, 25.0, 40.0]), ADAPTIVE) == 300
    # gaps of 15 minutes: keeping would cost 900 s a gap, a boot costs 120: stop at once
    assert pool_policy.keep_alive_s("media:fast", est(media_fast=[900.0] * 10), ADAPTIVE) == 0
    # bursts (gaps of a few seconds) and long pauses between them: keep through the short gaps only
    gaps = [3.0, 5.0, 2.0, 4.0, 600.0, 3.0, 5.0, 700.0, 2.0, 6.0]
    assert pool_policy.keep_alive_s("media:fast", est(media_fast=gaps), ADAPTIVE) == 6


def test_the_keep_alive_chosen_costs_least_on_the_gaps_seen():
    gaps = [5.0, 50.0, 130.0, 200.0, 250.0, 8.0, 90.0]

    def cost(keep: float) -> float:
        return sum(min(g, keep) + (BOOT if g > keep else 0.0) for g in gaps)

    chosen = pool_policy.keep_alive_s("media:fast", est(media_fast=gaps), ADAPTIVE)
    assert all(cost(chosen) <= cost(other) for other in [0.0, 10.0, 60.0, 100.0, 140.0, 220.0, 300.0])


def test_idle_nodes_stop_after_their_keep_alive_unless_kept_warm_or_wanted():
    idle = node("idle", idle_since=0.0)
    busy = node("busy", leases={"csm": [0.0]})
    assert pool_policy.idle_nodes_to_stop([idle, busy], BOOT - 1, est(), ADAPTIVE) == []
    [(stopped, why)] = pool_policy.idle_nodes_to_stop([idle, busy], BOOT + 1, est(), ADAPTIVE)
    assert stopped == "idle" and "keep-alive" in why
    warm = PolicyConfig(min_warm=1, idle_timeout_s=300)
    assert pool_policy.idle_nodes_to_stop([idle], 3000, est(), warm) == []  # MIN_WARM_NODES
    assert pool_policy.idle_nodes_to_stop([idle], BOOT + 1, est(), ADAPTIVE, {"csm": 1}) == []  # a job will take it
    booting = node("booting", state="booting", idle_since=None)
    assert pool_policy.idle_nodes_to_stop([booting], 3000, est(), ADAPTIVE) == []


def test_old_nodes_and_nodes_near_expiry_stop_when_idle_whatever_the_keep_alive():
    cfg = PolicyConfig(node_max_age_s=3600, idle_timeout_s=300)
    [(_, why)] = pool_policy.idle_nodes_to_stop([node("old", launched=0.0, idle_since=3650.0)], 3700, est(), cfg)
    assert why == "older than NODE_MAX_AGE"
    [(_, why)] = pool_policy.idle_nodes_to_stop([node("late", expires=1030.0, idle_since=1000.0)], 1001, est(), cfg)
    assert why == "its provider expiry is near"


def test_min_warm_nodes_are_launched_and_regular_gaps_are_pre_warmed():
    warm = PolicyConfig(min_warm=2, max_nodes=3)
    assert pool_policy.launches_wanted([node("a")], 0.0, est(), warm) == [("media:fast", "MIN_WARM_NODES")]
    regular = est(media_fast=[600.0, 610.0, 590.0, 605.0, 595.0, 600.0, 602.0, 598.0])
    # the type went idle at t=0; its next job is due ~530 s later (0.9 x the shortest gap): a boot before
    assert pool_policy.launches_wanted([], 300.0, regular, ADAPTIVE, {"media:fast": 0.0}) == []
    [(kind, why)] = pool_policy.launches_wanted([], 420.0, regular, ADAPTIVE, {"media:fast": 0.0})
    assert kind == "media:fast" and "pre-warm" in why
    assert pool_policy.launches_wanted([node("up")], 420.0, regular, ADAPTIVE, {"media:fast": 0.0}) == []
    scattered = est(media_fast=[60.0, 900.0, 30.0, 1500.0, 200.0, 50.0, 700.0, 300.0])
    assert pool_policy.launches_wanted([], 420.0, scattered, ADAPTIVE, {"media:fast": 0.0}) == []
    assert pool_policy.launches_wanted([], 420.0, regular, FIXED, {"media:fast": 0.0}) == []


def test_estimates_move_with_each_measurement():
    assert pool_policy.moving_average(None, 90.0) == 90.0
    assert pool_policy.moving_average(100.0, 50.0) == pytest.approx(85.0)
    gaps = Estimates()
    for n in range(pool_policy.MAX_GAPS + 5):
        pool_policy.add_gap(gaps, "media:fast", float(n))
    assert len(gaps.gaps["media:fast"]) == pool_policy.MAX_GAPS and gaps.gaps["media:fast"][0] == 5.0
