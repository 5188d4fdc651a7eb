"""Time-driven work of the daemon: quarantine expiry, reminders, escalations, the digest.

Every INTERVAL_SECONDS, and once at start (so what fell due while the daemon was down is
caught up, once), as of `clock.now()` (a FixedClock runs a pass for another moment, which
is what `gateway scheduler run --now` does):

- a **reminder** to the owner (or the unit's staff when it has none, or its owner is not
  staff) when an open promise falls due within the unit's `remind_before` of business
  time, unless it was made that close to its due time (a `#next 30m` is not reminded of
  straight away) or is already due (then the escalation says it all);
- an **escalation** to the unit's `lead` and the owner (the unit's staff when neither is
  set) when the due time has come with no public update: it names the promise and how
  late it is, and the promise becomes `missed` (the ticket is overdue until a public
  update);
- a **page** of the next step (issue 12: the secondary, then the lead) for an urgent
  ticket whose page was not acknowledged by its `ack_due` (`actions/paging.py`; the
  `pages` row, UNIQUE per ticket and step, is the mark);
- a **digest** per unit to its staff at the start of each business day (its opening
  time; a daemon that was down then sends it late, while the desk is open that day):
  overdue, due today, new and unassigned.

Each reminder, escalation and digest happens once: the mark (commitments.reminded_at,
escalated_at, the unit's digest day in `meta`) and the queued mail are one transaction,
and the job re-reads its promise inside it. In the daemon each job is a unit for the
Writer (one failing job is rolled back alone and tried again on the next round); the CLI
runs a pass in one write_transaction. Scheduled mail goes to staff addresses only (and a
unit's configured lead), never to a ticket's requester; a job with nobody to tell still
marks its promise, and audits the mail as withheld (`no-staff`).

A job that fails is logged and tried again on the next round; it must never stop the
daemon or the loop.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time as time_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import partial
from typing import Any, TypedDict

from . import metrics, retention, store
from .actions import mail, paging, quarantine
from .clock import Clock, iso
from .config import Config, UnitConfig
from .logs import event
from .mailbuild import quote_subject
from .notify import MailKind, Plan, Planner, Withheld
from .render import Templates
from .store import Writer
from .store import commitments as promises
from .store import pages as page_store
from .store.events import EventAction, record_event
from .tickets import SubjectTag

# How often the jobs run: a reminder or an escalation is at most this late. Quarantine
# expiry (measured in days) runs with them; it is one indexed query when nothing expires.
INTERVAL_SECONDS = 60.0

# Tickets listed per section of a digest (the counts cover them all): a digest is read
# at a glance, and `gateway tickets list` shows the rest.
DIGEST_ITEMS = 25

REMINDER = "reminder"
ESCALATION = "escalation"
DIGEST = "digest"
PAGE = "page"


@dataclass(frozen=True)
class Job:
    """Something due: a reminder or escalation of one promise, or one unit's digest."""

    action: str
    commitment: int | None = None
    unit: str | None = None
    day: str | None = None  # the digest's local date, YYYY-MM-DD
    ticket: int | None = None  # a page's escalation: its ticket


@dataclass(frozen=True)
class Done:
    """What a job did (or, in a dry run, would do)."""

    action: str
    unit: str
    to: tuple[str, ...]
    ticket: int | None = None
    commitment: int | None = None
    due: str | None = None  # ISO with the unit's offset
    late_seconds: int | None = None
    day: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    step: int | None = None  # a page: the step paged (1 secondary, 2 lead)

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"action": self.action, "unit": self.unit, "to": list(self.to)}
        if self.action == DIGEST:
            found.update(day=self.day, counts=self.counts)
        elif self.action == PAGE:
            found.update(ticket=self.ticket, step=self.step, ack_due=self.due)
        else:
            found.update(ticket=self.ticket, commitment=self.commitment, due=self.due)
        if self.action == ESCALATION:
            found["late_seconds"] = self.late_seconds
        return found

    def describe(self, dry_run: bool) -> str:
        verb = "would send" if dry_run else "sent"
        to = ", ".join(self.to) or "nobody (no staff for the unit: withheld)"
        if self.action == DIGEST:
            counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.counts.items())
            return f"{verb} digest of unit {self.unit} for {self.day} ({counts}) to {to}"
        if self.action == PAGE:
            return f"{verb} page (step {self.step}) for ticket #{self.ticket} to {to}"
        what = f"{verb} {self.action} for ticket #{self.ticket} (due {self.due}"
        if self.late_seconds is not None:
            what += f", {span(self.late_seconds)} late"
        return f"{what}) to {to}"


class ReminderDetail(TypedDict):
    due: str
    to: list[str]


class MissedDetail(TypedDict):
    due: str
    late_seconds: int
    to: list[str]


class DigestDetail(TypedDict):
    day: str
    to: list[str]
    counts: dict[str, int]


# --- what is due ------------------------------------------------------------------------


def due_jobs(config: Config, conn: sqlite3.Connection, now: datetime) -> list[Job]:
    """Everything due at `now`: escalations first, then reminders, then the digests (so
    a digest counts the promises its own pass found missed). Reads only."""
    stamp = iso(now)
    jobs = [
        Job(ESCALATION, c.id)
        for c in promises.due_for_escalation(conn, now=stamp)
        if not c.answered
    ]
    # A page not acknowledged in time goes to the next step (before reminders: it is the
    # most pressing thing a pass does).
    jobs.extend(Job(PAGE, ticket=t) for t in page_store.due_for_escalation(conn, now=stamp))
    configured = [unit.name for unit in config.units]
    # Tickets of a unit nobody configured (since removed from the file) get the defaults,
    # as Config.unit gives them; "" is never a unit's name.
    groups: list[tuple[UnitConfig, Sequence[str] | None, Sequence[str]]] = [
        (unit, [unit.name], ()) for unit in config.units
    ]
    groups.append((config.unit(""), None, configured))
    for unit, names, other_than in groups:
        hours, before = unit.hours, unit.remind_before_duration
        horizon = iso(hours.add(now, before))
        for c in promises.due_for_reminder(
            conn, now=stamp, horizon=horizon, units=names, other_than=other_than
        ):
            made = datetime.fromisoformat(c.created_at)
            if not c.answered and hours.add(made, before) < datetime.fromisoformat(c.due):
                jobs.append(Job(REMINDER, c.id))
    for unit in config.units:
        day = _digest_day(unit, now)
        if day is not None and unit.staff and promises.digest_sent_on(conn, unit.name) != day:
            jobs.append(Job(DIGEST, unit=unit.name, day=day))
    return jobs


def _digest_day(unit: UnitConfig, now: datetime) -> str | None:
    """The unit's business day whose digest is due at `now` (it is open), or None."""
    day = unit.hours.local(now).date()
    hours = unit.hours.opening_hours(day)
    if hours is None or not hours[0] <= now < hours[1]:
        return None
    return day.isoformat()


# --- doing it -----------------------------------------------------------------------------


def do_job(
    config: Config, templates: Templates, conn: sqlite3.Connection, job: Job, now: datetime
) -> Done | None:
    """One job in the caller's transaction (a Writer unit, or the CLI's): re-reads what it
    is about, marks it and queues its mail together; None if it was done meanwhile."""
    planner = Planner(config, templates, store.token_secret(conn))
    if job.action == DIGEST:
        assert job.unit is not None and job.day is not None
        return _digest(config, planner, conn, config.unit(job.unit), job.day, now)
    if job.action == PAGE:
        assert job.ticket is not None
        paged = paging.escalate(conn, planner, job.ticket, iso(now))
        if paged is None:
            return None
        unit = config.unit(paged.unit)
        return Done(
            PAGE,
            unit.name,
            paged.to,
            paged.ticket,
            due=_shown(unit, paged.ack_due),
            step=paged.step,
        )
    assert job.commitment is not None
    promise = promises.open_commitment(conn, job.commitment)
    if promise is None or promise.answered:
        return None
    if job.action == REMINDER:
        return _remind(config, planner, conn, promise, now)
    return _escalate(config, planner, conn, promise, now)


def _remind(
    config: Config,
    planner: Planner,
    conn: sqlite3.Connection,
    promise: promises.DueCommitment,
    now: datetime,
) -> Done | None:
    stamp = iso(now)
    if not promises.mark_reminded(conn, promise.id, now=stamp):
        return None
    unit = config.unit(promise.unit)
    due = datetime.fromisoformat(promise.due)
    owner = _staff(config, promise, [promise.owner] if promise.owner else [])
    to = owner or _staff(config, promise, unit.staff)
    context = {
        **_promise_context(config, unit, promise),
        "due_in": span((due - now).total_seconds()),
    }
    _send(conn, planner, MailKind.REMINDER, promise.ticket, to, stamp, context)
    done = Done(
        REMINDER, unit.name, tuple(to), promise.ticket, promise.id, _shown(unit, promise.due)
    )
    detail: ReminderDetail = {"due": promise.due, "to": list(to)}
    _commitment_event(conn, EventAction.COMMITMENT_REMINDED, promise, stamp, detail)
    return done


def _commitment_event(
    conn: sqlite3.Connection,
    action: EventAction,
    promise: promises.DueCommitment,
    stamp: str,
    detail: Mapping[str, Any],
) -> None:
    """Audit what the scheduler did about a promise: its subject is the commitment, and it
    is listed under the promise's ticket."""
    record_event(
        conn,
        time=stamp,
        actor="gateway",
        action=action,
        subject=f"commitment:{promise.id}",
        ticket=promise.ticket,
        detail=dict(detail),
    )


def _escalate(
    config: Config,
    planner: Planner,
    conn: sqlite3.Connection,
    promise: promises.DueCommitment,
    now: datetime,
) -> Done | None:
    stamp = iso(now)
    if not promises.mark_missed(conn, promise.id, now=stamp):
        return None
    unit = config.unit(promise.unit)
    late = int((now - datetime.fromisoformat(promise.due)).total_seconds())
    wanted = [unit.lead] if unit.lead else []
    if promise.owner:
        wanted.append(promise.owner)
    to = _staff(config, promise, wanted, lead=unit.lead) or _staff(config, promise, unit.staff)
    context = {**_promise_context(config, unit, promise), "late": span(late), "lead": unit.lead}
    _send(conn, planner, MailKind.ESCALATION, promise.ticket, to, stamp, context)
    shown = _shown(unit, promise.due)
    done = Done(ESCALATION, unit.name, tuple(to), promise.ticket, promise.id, shown, late)
    detail: MissedDetail = {"due": promise.due, "late_seconds": late, "to": list(to)}
    _commitment_event(conn, EventAction.COMMITMENT_MISSED, promise, stamp, detail)
    return done


def _digest(
    config: Config,
    planner: Planner,
    conn: sqlite3.Connection,
    unit: UnitConfig,
    day: str,
    now: datetime,
) -> Done | None:
    stamp = iso(now)
    if not promises.mark_digest_sent(conn, unit.name, day):
        return None
    to = [a for a in dict.fromkeys(unit.staff) if config.is_staff(a)]
    local_day = date.fromisoformat(day)
    start = datetime.combine(local_day, time(0), tzinfo=unit.hours.zone).astimezone(UTC)
    end = datetime.combine(local_day + timedelta(days=1), time(0), tzinfo=unit.hours.zone)
    sections = {
        "overdue": promises.overdue_tickets(conn, unit.name, limit=DIGEST_ITEMS),
        "due_today": promises.due_between(
            conn,
            unit.name,
            start=iso(start),
            end=iso(end.astimezone(UTC)),
            limit=DIGEST_ITEMS,
        ),
        "new": promises.new_tickets(conn, unit.name, limit=DIGEST_ITEMS),
        "unassigned": promises.unassigned_tickets(conn, unit.name, limit=DIGEST_ITEMS),
    }
    counts = {name: count for name, (count, _) in sections.items()}
    tag = SubjectTag(config.tickets.tag)
    context: dict[str, object] = {
        "unit": unit.name,
        "day": _day(local_day),
        "counts": counts,
        "cli": f"gateway tickets list --unit {unit.name}",
    }
    for name, (_, tickets) in sections.items():
        context[name] = [
            {
                "number": t.number,
                "tag": tag.format(t.number),
                "subject": quote_subject(t.subject),
                "owner": t.owner or "",
                "due": _shown_text(unit, t.due) if t.due else "",
            }
            for t in tickets
        ]
    _send(conn, planner, MailKind.DIGEST, None, to, stamp, context, about=f"unit:{unit.name}")
    detail: DigestDetail = {"day": day, "to": to, "counts": counts}
    record_event(
        conn,
        time=stamp,
        actor="gateway",
        action=EventAction.DIGEST_SENT,
        subject=f"unit:{unit.name}",
        detail=dict(detail),
    )
    return Done(DIGEST, unit.name, tuple(to), day=day, counts=counts)


def _staff(
    config: Config,
    promise: promises.DueCommitment,
    addresses: Sequence[str],
    *,
    lead: str = "",
) -> list[str]:
    """The addresses that may get scheduled mail: staff (or the unit's configured lead),
    never the ticket's requester; in order, each once."""
    return [
        a
        for a in dict.fromkeys(addresses)
        if a and a != promise.requester and (config.is_staff(a) or (lead and a == lead))
    ]


def _send(
    conn: sqlite3.Connection,
    planner: Planner,
    kind: MailKind,
    ticket: int | None,
    to: Sequence[str],
    now: str,
    context: dict[str, object],
    about: str | None = None,
) -> None:
    if not to:
        subject = about or f"ticket:{ticket}"
        mail.write(conn, Plan(withheld=Withheld(kind, "no-staff", subject, ticket, now)))
        return
    planned = tuple(
        planner.to_staff(conn, kind, ticket, address, now, kind.value, context) for address in to
    )
    mail.write(conn, Plan(planned))


def _promise_context(
    config: Config, unit: UnitConfig, promise: promises.DueCommitment
) -> dict[str, object]:
    return {
        "unit": unit.name,
        "due": _shown_text(unit, promise.due),
        "set_by": promise.set_by,
        "note": promise.note or "",
        "owner": promise.owner if promise.owner and config.is_staff(promise.owner) else "",
        "cli": f"gateway tickets show {promise.ticket}",
    }


def _shown(unit: UnitConfig, stamp: str) -> str:
    """A stored UTC stamp as ISO in the unit's zone (for JSON)."""
    return unit.hours.local(datetime.fromisoformat(stamp)).isoformat(timespec="minutes")


def _shown_text(unit: UnitConfig, stamp: str) -> str:
    """A stored UTC stamp as people read it, in the unit's zone:
    "Tuesday 8 December 2026, 14:00 GMT"."""
    local = unit.hours.local(datetime.fromisoformat(stamp))
    return f"{_day(local.date())}, {local:%H:%M} {local.tzname()}"


def _day(day: date) -> str:
    return f"{day:%A} {day.day} {day:%B %Y}"


def span(seconds: float) -> str:
    """A length of time as people say it: "30 minutes", "2 hours 5 minutes", "3 days 1
    hour" (wall-clock time, to the minute; two units at most)."""
    minutes = max(0, int(seconds) // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    parts = [
        f"{n} {word}{'' if n == 1 else 's'}"
        for n, word in ((days, "day"), (hours, "hour"), (minutes, "minute"))
        if n
    ]
    return " ".join(parts[:2]) or "less than a minute"


# --- running a pass -------------------------------------------------------------------------


def run_pass(
    config: Config, conn: sqlite3.Connection, now: datetime, *, dry_run: bool = False
) -> list[Done]:
    """One pass of the commitments' jobs in one transaction (the CLI): committed, or with
    `dry_run` rolled back, so it shows what would happen and writes nothing."""
    templates = Templates(config.templates_path)

    def run(conn: sqlite3.Connection) -> list[Done]:
        jobs = due_jobs(config, conn, now)
        return [d for job in jobs if (d := do_job(config, templates, conn, job, now))]

    if not dry_run:
        with store.write_transaction(conn):
            return run(conn)
    # The same transaction, taken the same way (the reads hold), never committed.
    conn.execute("BEGIN IMMEDIATE")
    try:
        return run(conn)
    finally:
        conn.execute("ROLLBACK")


async def run_commitments(config: Config, writer: Writer, now: datetime) -> list[Done]:
    """One pass through the daemon's Writer: each job its own unit (committed with the
    others in a group commit), so a failing one is rolled back alone."""
    jobs = await writer.write(partial(due_jobs, config, now=now))
    if not jobs:
        return []
    templates = Templates(config.templates_path)
    results = await asyncio.gather(
        *(writer.write(partial(do_job, config, templates, job=job, now=now)) for job in jobs),
        return_exceptions=True,
    )
    done: list[Done] = []
    for job, result in zip(jobs, results, strict=True):
        if isinstance(result, BaseException):
            event(
                "scheduler.job_failed",
                logging.ERROR,
                action=job.action,
                commitment=job.commitment,
                ticket=job.ticket,
                unit=job.unit,
                error=str(result) or type(result).__name__,
            )
        elif result is not None:
            done.append(result)
            event(
                f"scheduler.{result.action}",
                ticket=result.ticket,
                unit=result.unit,
                to=",".join(result.to),
            )
    return done


async def run_jobs(config: Config, writer: Writer, clock: Clock) -> None:
    """One round of every job, as of clock.now() (a FixedClock runs them for another time)."""
    now = clock.now()
    expired = await writer.write(
        partial(quarantine.expire, days=config.policy.quarantine_days, now=now)
    )
    if expired:
        event("quarantine.expired", count=len(expired), ids=",".join(map(str, expired)))
    # Issue 13: old mail's content and orphan attachment blobs, in bounded batches.
    purged = await retention.run_retention(config, writer.write, now)
    if purged.messages or purged.blobs:
        event("messages.purged", messages=purged.messages, blobs=purged.blobs)
    await run_commitments(config, writer, now)


async def run_scheduler(
    config: Config,
    writer: Writer,
    clock: Clock,
    interval: float = INTERVAL_SECONDS,
) -> None:
    due = time_module.monotonic()
    while True:
        metrics.SCHEDULER_LAG.set(max(0.0, time_module.monotonic() - due))
        try:
            await run_jobs(config, writer, clock)
        except asyncio.CancelledError:
            raise
        except Exception:
            logging.getLogger("gateway").exception("event=scheduler.failed")
        due = time_module.monotonic() + interval
        await asyncio.sleep(interval)
