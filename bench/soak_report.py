"""The soak test's count: what happened to every job and webhook, the table, the verdict, the details."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import time
from typing import Any

from soak_chaos import CHAOS_KINDS, Chaos
from soak_common import FINISHED
from soak_jobs import Submissions
from soak_stack import Child, Stack

SUCCEEDED_LINE = re.compile(r"job ([0-9a-f-]{36}) succeeded in")


def short_reason(error: str) -> str:
    """A short name for a failure message, to group them."""
    patterns = (
        ("could not launch", "launch failed"), ("failed during the job", "node failed mid-job"),
        ("did not become healthy", "node boot timeout"), ("MAX_ATTEMPTS", "worker died MAX_ATTEMPTS times"),
        ("404", "input 404"), ("max_time", "max_time"), ("complete_by", "complete_by"),
        ("cancelled", "cancelled"), ("could not store", "storage"), ("internal error", "internal error"),
    )
    for needle, name in patterns:
        if needle in error:
            return name
    return error[:60]


@dataclasses.dataclass
class Report:
    accepted: int = 0
    succeeded: int = 0
    failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    lost: list[str] = dataclasses.field(default_factory=list)
    ran_twice: list[str] = dataclasses.field(default_factory=list)
    webhooks_missing: list[str] = dataclasses.field(default_factory=list)
    webhooks_duplicated: list[str] = dataclasses.field(default_factory=list)
    copies_differ: list[str] = dataclasses.field(default_factory=list)
    bad_signatures: int = 0
    nodes_left: list[str] = dataclasses.field(default_factory=list)
    nodes_launched: int = 0
    node_seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)


def count(stack: Stack, subs: Submissions, nodes: list[dict[str, Any]]) -> Report:
    assert stack.r is not None
    report = Report(accepted=len(subs.accepted))
    pipe = stack.r.pipeline(transaction=False)
    for job_id in subs.accepted:
        pipe.hgetall(f"job:{job_id}")
    records = dict(zip(subs.accepted, pipe.execute(), strict=True))
    got = stack.receiver.snapshot()
    for job_id, record in records.items():
        status = record.get("status")
        if status not in FINISHED:
            report.lost.append(f"{job_id} ({status or 'record missing'})")
            continue
        if status == "success":
            report.succeeded += 1
        else:
            report.failed[short_reason(record.get("error") or status)] += 1
        copies = got.get(job_id, [])
        if record.get("notify_url") and not copies:
            report.webhooks_missing.append(f"{job_id} (webhook_status {record.get('webhook_status')}, "
                                           f"{record.get('webhook_error', '')})")
        if len(copies) > 1:
            report.webhooks_duplicated.append(job_id)
        for copy in copies:
            if copy.webhook_id != job_id or copy.body != copies[0].body:
                report.copies_differ.append(f"{job_id}: webhook-id {copy.webhook_id!r}, body {copy.body}")
            report.bad_signatures += 0 if copy.signed_ok else 1
    strangers = set(got) - set(records)
    if strangers:
        report.problems.append(f"webhooks for jobs we did not submit: {sorted(strangers)[:5]}")
    successes: collections.Counter = collections.Counter()
    for child in stack.all_workers:
        successes.update(SUCCEEDED_LINE.findall(child.log_text()))
    report.ran_twice = sorted(job_id for job_id, n in successes.items() if n > 1)
    now = time.time()
    report.nodes_launched = len(nodes)
    for node in nodes:
        report.node_seconds += (node.get("stopped_at") or now) - node["launched_at"]
        if node.get("state") in ("booting", "running"):
            report.nodes_left.append(node["workload"])
    if report.bad_signatures:
        report.problems.append(f"{report.bad_signatures} webhook(s) with a bad signature")
    if subs.rejected:
        report.problems.append(f"{len(subs.rejected)} submission(s) rejected: {subs.rejected[:3]}")
    return report


def table(report: Report) -> str:
    failed = sum(report.failed.values())
    reasons = ", ".join(f"{name} {n}" for name, n in report.failed.most_common())
    failed_cell = f"{failed} ({reasons})" if failed else "0"
    head = ("accepted", "succeeded", "failed (by reason)", "lost", "ran twice to success", "webhooks missing",
            "webhooks duplicated", "nodes left running", "node-seconds billed")
    row = (report.accepted, report.succeeded, failed_cell, len(report.lost), len(report.ran_twice),
           len(report.webhooks_missing), len(report.webhooks_duplicated), len(report.nodes_left),
           f"{report.node_seconds:.0f} ({report.nodes_launched} nodes)")
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
                      "| " + " | ".join(str(cell) for cell in row) + " |"])


def verdict(report: Report, chaos: Chaos, api: Child, devnode: Child) -> list[str]:
    """What makes the run fail; empty when it passed."""
    wrong = []
    if report.lost:
        wrong.append(f"lost {len(report.lost)}: {report.lost[:5]}")
    if report.webhooks_missing:
        wrong.append(f"webhooks missing {len(report.webhooks_missing)}: {report.webhooks_missing[:5]}")
    if report.nodes_left:
        wrong.append(f"nodes left running {len(report.nodes_left)}: {report.nodes_left[:5]}")
    if report.copies_differ:
        wrong.append(f"webhook copies that differ from the first: {report.copies_differ[:3]}")
    wrong += report.problems
    wrong += [f"unexpected exit: {m}" for m in chaos.unexpected_exits]
    for child in (api, devnode):
        if child.proc is not None and child.proc.poll() is not None and not child.killed_by_us:
            wrong.append(f"{child.name} died during the run (status {child.proc.returncode})")
    return wrong


def print_details(report: Report, chaos: Chaos, subs: Submissions, wall: float, command: str,
                  args: argparse.Namespace) -> None:
    kinds = collections.Counter(event.kind for event in chaos.events)
    print(f"command: {command} --duration-limit {args.duration_limit:g} --chaos-interval {args.chaos_interval:g}"
          + (f" --spread {args.spread:g}" if args.spread else ""))
    print(f"wall time: {wall:.0f} s")
    print("chaos events: " + ", ".join(f"{kind} {kinds[kind]}" for kind in CHAOS_KINDS)
          + (f", worker_crashed {kinds['worker_crashed']}" if kinds["worker_crashed"] else ""))
    print(f"submissions retried after 503 or no answer: {subs.retries}; answered from the Idempotency-Key: "
          f"{subs.replayed}")
    print(f"webhook deliveries refused while the receiver was down: {chaos.stack.receiver.refused_while_down}")
    print("Redis runs with appendonly yes, appendfsync everysec: a crash of the host can lose up to 1 s of "
          "writes; the soak restarts it cleanly (SIGTERM), which loses nothing.")
    if report.ran_twice:
        print(f"ran twice to success: {report.ran_twice[:10]}")
    if report.webhooks_duplicated:
        print(f"webhooks duplicated (same webhook-id each copy): {report.webhooks_duplicated[:10]}")
    if chaos.errors:
        print(f"chaos actions that could not be done: {chaos.errors[:10]}")
    print("\nchaos log:")
    for event in chaos.events:
        print(f"  +{event.at:7.1f}s  {event.kind:<16} {event.detail}")
