"""The soak test's count: what happened to every job and webhook, the tables, the verdict, the details.

A webhook is *delivered* when a copy reached the job's receiver during the run, *redelivered* when it
arrived only after the soak asked for it again with `POST /jobs/<id>/webhook`, and *missing* when
neither happened (the API has no such route, refused it, or the copy never came).

A healthy receiver's webhook is *starved* when it arrived more than STARVED_AFTER_S after its job
finished, unless a fault that delays deliveries on purpose explains it (Redis down, or a worker
SIGKILLed with a delivery in flight, until the sweep gives it back): the job finished during the fault
or at most STARVED_AFTER_S before it began, and the webhook arrived at most EXCUSED_AFTER_S after the
fault ended. Those are listed as "late, excused".
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any

from soak_chaos import CHAOS_KINDS, Chaos
from soak_common import FINISHED
from soak_jobs import Submissions
from soak_receivers import HOSTILE, Delivery, all_deliveries
from soak_stack import Child, Stack

SUCCEEDED_LINE = re.compile(r"job ([0-9a-f-]{36}) succeeded in")
STARVED_AFTER_S = 5.0
# A fault excuses a late webhook whose job finished while it was under way (or at most STARVED_AFTER_S
# before it began: the webhook was not late yet) and that arrived within this long after it ended: the
# delivery threads back off up to 10 s while Redis is down, and a SIGKILLed worker's in-flight delivery
# comes back with the sweep once its heartbeat expired (HEARTBEAT_TTL 3 s + sweep 1 s).
EXCUSED_AFTER_S = 8.0


def short_reason(error: str) -> str:
    """A short name for a failure message, to group them."""
    patterns = (
        ("could not launch", "launch failed"), ("failed during the job", "node failed mid-job"),
        ("did not become healthy", "node boot timeout"), ("MAX_ATTEMPTS", "worker died MAX_ATTEMPTS times"),
        ("404", "input 404"), ("max_time", "max_time"), ("complete_by", "complete_by"),
        ("cancelled", "cancelled"), ("engine hung", "engine hang"), ("dev node fault", "engine error"),
        ("vision model failed: HTTP 500", "engine error"),
        ("could not store", "storage"), ("internal error", "internal error"),
    )
    for needle, name in patterns:
        if needle in error:
            return name
    return error[:60]


@dataclasses.dataclass
class Redelivery:
    """What the soak's `POST /jobs/<id>/webhook` calls did, by job id."""

    asked_at: dict[str, float] = dataclasses.field(default_factory=dict)  # accepted (2xx) requests
    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # why it could not be asked
    route: str = "not tried"  # "answered" or why not (e.g. "HTTP 404: the API has no such route")


@dataclasses.dataclass
class Report:
    accepted: int = 0
    succeeded: int = 0
    failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    lost: list[str] = dataclasses.field(default_factory=list)
    ran_twice: list[str] = dataclasses.field(default_factory=list)
    webhooks_delivered: int = 0
    webhooks_redelivered: list[str] = dataclasses.field(default_factory=list)
    webhooks_missing: list[str] = dataclasses.field(default_factory=list)
    webhooks_duplicated: list[str] = dataclasses.field(default_factory=list)
    copies_differ: list[str] = dataclasses.field(default_factory=list)
    bad_signatures: int = 0
    healthy_latencies: list[float] = dataclasses.field(default_factory=list)
    starved: list[str] = dataclasses.field(default_factory=list)
    late_excused: list[str] = dataclasses.field(default_factory=list)
    nodes_left: list[str] = dataclasses.field(default_factory=list)
    nodes_launched: int = 0
    node_seconds: float = 0.0
    cancels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    problems: list[str] = dataclasses.field(default_factory=list)


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (share 0..1) of values; 0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered) + 0.5) - 1))]


def count(stack: Stack, subs: Submissions, nodes: list[dict[str, Any]], chaos: Chaos,
          redelivery: Redelivery) -> Report:
    assert stack.r is not None
    report = Report(accepted=len(subs.accepted))
    pipe = stack.r.pipeline(transaction=False)
    for job_id in subs.accepted:
        pipe.hgetall(f"job:{job_id}")
    records = dict(zip(subs.accepted, pipe.execute(), strict=True))
    got = all_deliveries(stack.receivers)
    for job_id, record in records.items():
        status = record.get("status")
        if status not in FINISHED:
            report.lost.append(f"{job_id} ({status or 'record missing'})")
            continue
        if status == "success":
            report.succeeded += 1
        else:
            report.failed[short_reason(record.get("error") or status)] += 1
        if job_id in chaos.cancelled:
            report.cancels[f"{chaos.cancelled[job_id]} -> {status}"] += 1
            if chaos.cancelled[job_id] == "queued" and status != "cancelled":
                report.problems.append(f"job {job_id} was cancelled while queued but ended {status}")
        copies = got.get(job_id, [])
        if record.get("notify_url"):
            count_webhook(report, job_id, record, copies, subs.receiver_of.get(job_id, ""), chaos, redelivery)
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


def count_webhook(report: Report, job_id: str, record: dict[str, str], copies: list[Delivery], receiver: str,
                  chaos: Chaos, redelivery: Redelivery) -> None:
    """Delivered, redelivered or missing; duplicates, differing copies, latency and starvation."""
    asked_at = redelivery.asked_at.get(job_id)
    before = [copy for copy in copies if asked_at is None or copy.at < asked_at]
    if before:
        report.webhooks_delivered += 1
    elif copies:
        report.webhooks_redelivered.append(job_id)
    else:
        why = redelivery.refused.get(job_id) or ("asked again, never arrived" if asked_at else "never asked again")
        report.webhooks_missing.append(f"{job_id} ({receiver}; webhook_status {record.get('webhook_status')}, "
                                       f"{record.get('webhook_error', '')}; redelivery: {why})")
    if len(copies) > 1:
        report.webhooks_duplicated.append(job_id)
    for copy in copies:
        if copy.webhook_id != job_id or copy.body != copies[0].body:
            report.copies_differ.append(f"{job_id}: webhook-id {copy.webhook_id!r}, body {copy.body}")
        if copy.receiver != receiver:
            report.problems.append(f"webhook of {job_id} reached {copy.receiver}, not {receiver}")
        report.bad_signatures += 0 if copy.signed_ok else 1
    if not receiver.startswith("healthy") or not record.get("finished_at"):
        return
    finished = float(record["finished_at"])
    arrived = copies[0].at if copies else time.time()
    latency = arrived - finished
    if copies:
        report.healthy_latencies.append(latency)
    if latency <= STARVED_AFTER_S:
        return
    excuses = sorted({why for start, end, why in chaos.excused
                      if start - STARVED_AFTER_S <= finished <= end and start <= arrived <= end + EXCUSED_AFTER_S})
    line = f"{job_id} ({receiver}) {latency:.1f} s after its job finished" + (" (never arrived)" if not copies else "")
    if excuses and copies:
        report.late_excused.append(f"{line}: {', '.join(excuses)}")
    else:
        report.starved.append(line)


def markdown(head: tuple[str, ...], row: tuple[Any, ...]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
                      "| " + " | ".join(str(cell) for cell in row) + " |"])


def table(report: Report) -> str:
    failed = sum(report.failed.values())
    reasons = ", ".join(f"{name} {n}" for name, n in report.failed.most_common())
    failed_cell = f"{failed} ({reasons})" if failed else "0"
    head = ("accepted", "succeeded", "failed (by reason)", "lost", "ran twice to success", "webhooks delivered",
            "webhooks redelivered", "webhooks missing", "webhooks duplicated", "starved healthy webhooks",
            "nodes left running", "node-seconds billed")
    row = (report.accepted, report.succeeded, failed_cell, len(report.lost), len(report.ran_twice),
           report.webhooks_delivered, len(report.webhooks_redelivered), len(report.webhooks_missing),
           len(report.webhooks_duplicated), len(report.starved), len(report.nodes_left),
           f"{report.node_seconds:.0f} ({report.nodes_launched} nodes)")
    return markdown(head, row)


def chaos_table(chaos: Chaos) -> str:
    """How many times each kind of chaos happened ("n/a": the dev node lacks its switch)."""
    kinds = collections.Counter(event.kind for event in chaos.events)
    cells = tuple("n/a" if kind in chaos.unsupported else "skipped" if kind in chaos.skipped else kinds[kind]
                  for kind in CHAOS_KINDS)
    return markdown(CHAOS_KINDS, cells)


def latency_line(report: Report) -> str:
    values = report.healthy_latencies
    return (f"healthy-receiver webhook latency (job finished -> webhook arrived), {len(values)} webhooks: "
            f"p50 {percentile(values, 0.5):.2f} s, p99 {percentile(values, 0.99):.2f} s, "
            f"max {max(values, default=0.0):.2f} s")


def verdict(report: Report, chaos: Chaos, api: Child, devnode: Child) -> list[str]:
    """What makes the run fail; empty when it passed."""
    wrong = []
    if report.lost:
        wrong.append(f"lost {len(report.lost)}: {report.lost[:5]}")
    if report.webhooks_missing:
        wrong.append(f"webhooks missing {len(report.webhooks_missing)}: {report.webhooks_missing[:5]}")
    if report.starved:
        wrong.append(f"starved healthy webhooks {len(report.starved)} (later than {STARVED_AFTER_S:g} s): "
                     f"{report.starved[:5]}")
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


def print_details(report: Report, chaos: Chaos, subs: Submissions, redelivery: Redelivery, wall: float,
                  command: str) -> None:
    kinds = collections.Counter(event.kind for event in chaos.events)
    receivers = chaos.stack.receivers
    print(f"command: {command}")
    print(f"wall time: {wall:.0f} s")
    if kinds["worker_crashed"]:
        print(f"workers that crashed by themselves: {kinds['worker_crashed']}")
    print(f"rolling restarts: {kinds['worker_sigterm']} workers stopped with SIGTERM; cancels (was -> ended): "
          + (", ".join(f"{k} {n}" for k, n in sorted(report.cancels.items())) or "none"))
    print(f"submissions retried after 503 or no answer: {subs.retries}; answered from the Idempotency-Key: "
          f"{subs.replayed}; jobs the chaos submitted (to cancel them, or for an outage): {subs.extra}")
    jobs_by_receiver = collections.Counter(subs.receiver_of.values())
    print("webhook receivers (jobs): " + ", ".join(f"{name} {jobs_by_receiver[name]}" for name in receivers)
          + f"; deliveries refused by the flaky one while down: {receivers['flaky'].refused_while_down}; "
          f"hostile answers: " + ", ".join(f"{name} {receivers[name].hostile_answers}" for name in HOSTILE))
    early = len(redelivery.asked_at) - len(report.webhooks_redelivered) - sum(
        "asked again, never arrived" in line for line in report.webhooks_missing)
    print(f"redelivery (POST /jobs/<id>/webhook): {redelivery.route}; {len(redelivery.asked_at)} asked, "
          f"{len(report.webhooks_redelivered)} arrived after the ask"
          + (f", {early} had arrived by themselves just before it" if early else ""))
    print(latency_line(report))
    print("Redis runs with appendonly yes, appendfsync everysec: SIGKILL of redis-server loses nothing it "
          "wrote (the kernel keeps it); only a crash of the host could lose up to 1 s of writes.")
    if report.late_excused:
        print(f"healthy webhooks late but excused ({len(report.late_excused)}): {report.late_excused[:5]}")
    if report.ran_twice:
        print(f"ran twice to success: {report.ran_twice[:10]}")
    if report.webhooks_duplicated:
        print(f"webhooks duplicated (same webhook-id each copy): {report.webhooks_duplicated[:10]}")
    if chaos.errors:
        print(f"chaos actions that could not be done: {chaos.errors[:10]}")
    print("\nchaos log:")
    for event in chaos.events:
        print(f"  +{event.at:7.1f}s  {event.kind:<22} {event.detail}")
