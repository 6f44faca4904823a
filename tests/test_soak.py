"""The soak test at a small size: bench/soak.py with 20 jobs, 2 workers and compressed chaos.

Runs the script as a subprocess (as a person would) and checks that it passed and printed its table
with nothing lost. The full-size run is `make soak` (figures in the README's Reliability section).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.soak

ROOT = Path(__file__).resolve().parent.parent
HEADER = ("| accepted | succeeded | failed (by reason) | lost | ran twice to success | webhooks missing | "
          "webhooks duplicated | nodes left running | node-seconds billed |")


def table_row(output: str) -> dict[str, str]:
    """The printed table's one row, by column name."""
    lines = output.splitlines()
    at = lines.index(HEADER)
    names = [cell.strip() for cell in HEADER.strip("|").split("|")]
    cells = [cell.strip() for cell in lines[at + 2].strip("|").split("|")]
    return dict(zip(names, cells, strict=True))


def test_small_soak_loses_nothing():
    command = [sys.executable, "bench/soak.py", "--jobs", "20", "--workers", "2", "--seed", "20",
               "--chaos-interval", "2", "--spread", "40", "--duration-limit", "200"]
    done = subprocess.run(command, cwd=str(ROOT), capture_output=True, text=True, timeout=260)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    row = table_row(done.stdout)
    assert row["accepted"] == "20", row
    assert row["lost"] == "0" and row["webhooks missing"] == "0" and row["nodes left running"] == "0", row
    assert "PASSED" in done.stdout
    for kind in ("kill_worker", "restart_redis", "launch_failures", "kill_node", "receiver_down"):
        assert f"{kind} 0" not in done.stdout, f"no {kind} event in the small run:\n{output[-4000:]}"
