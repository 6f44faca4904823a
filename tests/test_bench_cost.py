"""bench/cost.py's pure parts: the bill and the most nodes at once from a dev node table, the arrivals
handed to the simulator, the --traces argument. (The replay itself is a benchmark: bench/README.md.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import cost  # noqa: E402


def node(created: float, stopped_at: float | None, expires: float = 10_000.0) -> dict:
    return {"created": created, "stopped_at": stopped_at, "expires": expires}


def test_the_bill_runs_from_launch_to_stop_or_expiry_or_now():
    nodes = [node(100.0, 130.5), node(200.0, None), node(300.0, None, expires=320.0), node(400.0, 900.0, expires=450.0)]
    # 30.5 stopped; 300 still running at now=500; 20 expired before anyone stopped it; 50 stopped after expiry
    assert cost.billed_seconds(nodes, now=500.0) == pytest.approx(30.5 + 300.0 + 20.0 + 50.0)


def test_most_at_once_counts_overlaps_but_not_a_stop_followed_by_a_launch_at_the_same_second():
    back_to_back = [node(0.0, 10.0), node(10.0, 20.0), node(20.0, 30.0)]
    assert cost.most_at_once(back_to_back, now=100.0) == 1
    overlapping = [node(0.0, 10.0), node(5.0, 15.0), node(8.0, None), node(40.0, 41.0)]
    assert cost.most_at_once(overlapping, now=100.0) == 3


def test_measured_jobs_keep_arrivals_and_give_a_job_without_engine_time_its_types_median():
    t0 = 1000.0
    records = [
        {"type": "csm", "created_at": "1012.0", "engine_seconds": "2.0"},
        {"type": "whisper", "created_at": "1001.5", "engine_seconds": "5.0"},
        {"type": "csm", "created_at": "1020.0", "engine_seconds": "4.0"},
        {"type": "csm", "created_at": "1030.0"},  # failed before its engine ran
    ]
    jobs, fallbacks = cost.measured_jobs(records, t0)
    assert fallbacks == 1
    assert [(j.at, j.type, j.seconds) for j in jobs] == [
        (1.5, "whisper", 5.0), (12.0, "csm", 2.0), (20.0, "csm", 4.0), (30.0, "csm", 3.0)]


def test_traces_take_their_own_length_or_the_default():
    assert cost.parse_traces("steady:5,bursty,sparse:16.5", 20) == [("steady", 5.0), ("bursty", 20.0),
                                                                    ("sparse", 16.5)]
    for bad in ("weekly", "steady:five", "steady:0"):
        with pytest.raises(ValueError):
            cost.parse_traces(bad, 20)
