"""[plan] Outgoing mail: which events earn a mail, and to whom.

Planning runs inside the transaction of the event that causes it, so a mail is queued
exactly when its ticket change commits (transactional outbox). A plan only reads (the
caps, undeliverable addresses, the ticket): it returns the mail to write, each with its
`MailSpec`, or why it is withheld, and the caller writes them (`actions.mail.write`); the
outbox worker builds the bytes from the spec (`mailbuild.py`) and delivers them. The guards
here are the last word on automatic mail: it must never go to the null sender, an
auto-reply, a bounce, a list, a loop, a held or refused sender, our own addresses, an
undeliverable address, or anyone more often than the configured caps; and no header we
write may carry a line break from the sender's words (CVE-2024-6923: every value goes
through `mailbuild.sanitise_header`).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.headerregistry import Address
from enum import StrEnum

from . import store
from .businesstime import BusinessHours
from .classify import Kind as Classification
from .config import Config, MailboxConfig
from .mailbuild import MAX_SUBJECT, MailSpec, quote_subject, sanitise_header
from .render import Templates
from .store import Filing, StoredMessage
from .store.commitments import list_commitments
from .tickets import Kind as MessageKind
from .tickets import SubjectTag, make_token

# References we copy from a ticket into a mail (the newest ones).
MAX_REFERENCES = 20


class MailKind(StrEnum):
    ACKNOWLEDGEMENT = "acknowledgement"
    STAFF_REPLY = "staff-reply"
    STATUS_CHANGE = "status-change"
    QUARANTINE_NOTICE = "quarantine-notice"
    # A held message that claims an identity it could not prove, or imitates one
    # (reasons `unauthenticated`, `lookalike`): the quarantine notice's template, with a
    # cap of its own so that junk held mail can never use up the admins' attention.
    SECURITY_NOTICE = "security-notice"
    LOOP_NOTICE = "loop-notice"
    # Staff notices: staff mail about a client's mail, to the ticket's owner or its unit's
    # staff only (`Planner.staff_notice`).
    STAFF_NEW_TICKET = "staff-new-ticket"
    STAFF_CLIENT_REPLY = "staff-client-reply"
    # The scheduler's mail to staff (never to a client): a promise about to fall due, a
    # missed one, a unit's digest at the start of a business day.
    REMINDER = "reminder"
    ESCALATION = "escalation"
    DIGEST = "digest"
    # Issue 12 item 5: a client reads as upset; to the organisation's account manager and
    # the ticket's owner (staff side), never to a client (`Planner.upset_notice`).
    ACCOUNT_MANAGER_NOTICE = "account-manager-notice"
    # Issue 12 item 3: an urgent ticket out of hours, to the person on call (then the
    # secondary, then the lead), never to a client (`Planner.page`).
    PAGE = "page"


STAFF_NOTICES = frozenset({MailKind.STAFF_NEW_TICKET, MailKind.STAFF_CLIENT_REPLY})


# Quarantine reasons that make a held message's notice a security notice.
SECURITY_REASONS = frozenset({"unauthenticated", "lookalike"})


def new_message_id(hostname: str, ticket: int | None) -> str:
    """Our Message-IDs name the ticket (for people reading headers) and are unguessable;
    threading trusts only IDs we stored, never the number written in one."""
    where = f"t{ticket}" if ticket is not None else "n"
    return f"<gw.{where}.{secrets.token_hex(10)}@{hostname}>"


@dataclass(frozen=True)
class PlannedMail:
    """One mail to queue: its outgoing row, its outbox entry, and its spec."""

    kind: MailKind
    ticket: int | None
    automatic: bool
    spec: MailSpec
    record: StoredMessage  # the outgoing message row (direction "out"), at the planning time
    filing: Filing
    acknowledges: bool = False  # writing it marks the ticket acknowledged (RFC 3834: once)


@dataclass(frozen=True)
class Withheld:
    """A mail the guards keep back, and why (audited as `mail.withheld`)."""

    kind: MailKind
    why: str
    subject: str  # the audit subject: "ticket:N", or what an admin notice is about
    ticket: int | None
    time: str
    # Admin notices only: the admins a cap held back, the cap, the held mail's reasons.
    to: tuple[str, ...] | None = None
    cap: int | None = None
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What an event earns: mail to queue, and what is withheld (if anything)."""

    mail: tuple[PlannedMail, ...] = ()
    withheld: Withheld | None = None

    @property
    def why_not(self) -> str | None:
        """Why the mail is not sent, or None when it is queued."""
        return self.withheld.why if self.withheld is not None else None


def _withheld(kind: MailKind, ticket: int, why: str, now: str) -> Plan:
    return Plan(withheld=Withheld(kind, why, f"ticket:{ticket}", ticket, now))


class Planner:
    """Plans outgoing mail inside a store transaction (runs on the writer thread); it
    reads through the store but writes nothing."""

    def __init__(self, config: Config, templates: Templates, secret: bytes) -> None:
        self.config = config
        self.templates = templates
        self.secret = secret
        self.tag = SubjectTag(config.tickets.tag)
        self.own = {m.address for m in config.mailboxes} | set(config.staff.addresses)

    # --- guards --------------------------------------------------------------------------

    def refusal(self, conn: sqlite3.Connection, to: str | None, now: str) -> str | None:
        """Why automatic mail must not go to `to` now, or None if it may."""
        if not to:
            return "no-recipient"
        if to in self.own or self.config.is_staff(to):
            return "own-address"
        if store.is_undeliverable(conn, to):
            return "undeliverable"
        policy = self.config.policy
        hour = _before(now, hours=1)
        day = _before(now, hours=24)
        if store.count_automatic_mail(conn, to, since=hour) >= policy.max_auto_replies_per_hour:
            return "hourly-cap"
        if store.count_automatic_mail(conn, to, since=day) >= policy.max_auto_replies_per_day:
            return "daily-cap"
        return None

    @staticmethod
    def inbound_refusal(record: StoredMessage) -> str | None:
        """Why the message that caused an event must not be answered automatically."""
        if not record.mail_from:
            return "null-sender"  # RFC 3834 section 2: never answer a null reverse-path
        if record.classification != Classification.NORMAL:
            return record.classification  # auto-reply, notice, bounce, loop (and lists)
        return None

    # --- what to send --------------------------------------------------------------------

    def acknowledge(
        self,
        conn: sqlite3.Connection,
        ticket: int,
        record: StoredMessage,
        now: str,
        references: Sequence[str] = (),
        *,
        alerted: bool = False,
    ) -> Plan:
        """The acknowledgement of a new ticket, or why not. `alerted`: the person on call
        was paged for it (an urgent ticket out of hours, with cover), which is what the
        client is told happens next (`what_next`)."""
        why = self.inbound_refusal(record) or self.refusal(conn, record.sender, now)
        if why is None and store.ticket_acknowledged(conn, ticket):
            why = "already-acknowledged"  # RFC 3834 section 2: at most one per ticket
        if why is not None:
            return _withheld(MailKind.ACKNOWLEDGEMENT, ticket, why, now)
        assert record.sender is not None
        mail = self._plan(
            conn,
            MailKind.ACKNOWLEDGEMENT,
            ticket,
            to=record.sender,
            now=now,
            in_reply_to=record.message_id,
            template="acknowledgement",
            extra=self._what_next(conn, ticket, now, alerted),
            # RFC 5322 section 3.6.4: the client's References, then its Message-ID.
            references=[*references, *([record.message_id] if record.message_id else [])],
            acknowledges=True,
        )
        return Plan((mail,))

    def _what_next(
        self, conn: sqlite3.Connection, ticket: int, now: str, alerted: bool
    ) -> dict[str, object]:
        """What the acknowledgement truthfully says happens next (issue 12 item 5):
        "first-response" while the unit is open (`respond_by`: the ticket's promise),
        "on-call" when the person on call was paged, else "desk-opens" (`next_open`). Times
        are the unit's local ones ("Monday 09:00")."""
        info = store.ticket_desk_info(conn, ticket)
        hours = self.config.unit(info["unit"] if info else "").hours
        moment = datetime.fromisoformat(now)
        opens = hours.next_open(moment)
        due = info["next_update_due"] if info else None
        if alerted:
            what = "on-call"
        elif hours.is_open(moment):
            what = "first-response"
        else:
            what = "desk-opens"
        return {
            "what_next": what,
            "next_open": "" if hours.is_open(moment) else shown_time(hours, opens, moment),
            "respond_by": shown_time(hours, datetime.fromisoformat(due), moment) if due else "",
        }

    def page(
        self,
        conn: sqlite3.Connection,
        ticket: int,
        to: Sequence[str],
        *,
        step: int,
        reasons: Sequence[str],
        ack_due: str,
        now: str,
    ) -> Plan:
        """The page of an urgent ticket out of hours to `to` (the people on call, the
        secondary or the lead: the caller's choice by step), or why not.

        The guards are the last word: never a client (the ticket's requester, a
        participant), never one of our own mailboxes, never an address that bounced. The
        page carries no client words, only what it is about; its Reply-To is the ticket's
        reply token, so a reply threads, and intake reads a reply to a page as its
        acknowledgement (filed as a note, never sent on: `actions/paging.py`)."""
        kind = MailKind.PAGE
        info = store.ticket_desk_info(conn, ticket)
        if info is None:
            return _withheld(kind, ticket, "no-ticket", now)
        clients = {info["requester"], *store.ticket_participants(conn, ticket)}
        recipients = [
            a
            for a in dict.fromkeys(to)
            if a
            and a not in clients
            and a not in {m.address for m in self.config.mailboxes}
            and not store.is_undeliverable(conn, a)
        ]
        if not recipients:
            return _withheld(kind, ticket, "no-recipient", now)
        unit = self.config.unit(info["unit"])
        due = datetime.fromisoformat(ack_due)
        extra = {
            "organisation": sanitise_header(info["organisation"] or "", 200),
            "unit": info["unit"],
            "reasons": list(reasons),
            "step": step,
            "ack_due": unit.hours.local(due).strftime("%a %d %b %Y %H:%M %Z"),
            "ack_within": self.config.oncall.ack_within,
            "cli": f"gateway oncall ack {ticket}",
        }
        mail = tuple(
            self._plan(
                conn, kind, ticket, to=a, now=now, in_reply_to=None, template="page", extra=extra
            )
            for a in recipients
        )
        return Plan(mail)

    def staff_reply(
        self, conn: sqlite3.Connection, ticket: int, body: str, staff: str | None, now: str
    ) -> Plan:
        """A staff member's public reply to the ticket's requester (human mail: no caps,
        but never to our own or an undeliverable address), or why not."""
        info = store.ticket_mail_info(conn, ticket)
        to = info["requester"] if info else None
        if not to or to in self.own or self.config.is_staff(to):
            return _withheld(MailKind.STAFF_REPLY, ticket, "no-client", now)
        if store.is_undeliverable(conn, to):
            return _withheld(MailKind.STAFF_REPLY, ticket, "undeliverable", now)
        show = self.config.staff.show_staff_address and staff
        mail = self._plan(
            conn,
            MailKind.STAFF_REPLY,
            ticket,
            to=to,
            now=now,
            in_reply_to=None,
            template="staff_reply",
            extra={"body": body, "staff_name": staff if show else ""},
            automatic=False,
        )
        return Plan((mail,))

    def staff_notice(
        self,
        conn: sqlite3.Connection,
        kind: MailKind,
        ticket: int,
        record: StoredMessage,
        now: str,
    ) -> Plan:
        """Tell the ticket's owner, or its unit's staff when it has none, of a client's
        mail (`record`): a new ticket or a reply. Only mail a person wrote and that was
        filed is news (held mail never reaches here; an auto-reply, bounce or list mail
        is refused below); the notice goes to staff addresses only, never to the one who
        wrote the mail, and its Reply-To is the ticket's reply token, so answering it is
        a staff reply (authenticated like any, issue 9)."""
        assert kind in STAFF_NOTICES
        if record.classification != Classification.NORMAL:
            return _withheld(kind, ticket, record.classification, now)
        info = store.ticket_desk_info(conn, ticket)
        if info is None:
            return _withheld(kind, ticket, "no-ticket", now)
        unit = self.config.unit(info["unit"])
        owner = info["owner"]
        candidates = [owner] if owner else list(unit.staff)
        author = record.sender
        recipients = [
            to
            for to in dict.fromkeys(candidates)
            # Never a client, never the one who wrote it (a staff member told of their
            # own mail), never an address that bounced.
            if self.config.is_staff(to) and to != author and not store.is_undeliverable(conn, to)
        ]
        if not recipients:
            return _withheld(kind, ticket, "no-staff", now)
        due = ""
        if info["next_update_due"]:
            local = unit.hours.local(datetime.fromisoformat(info["next_update_due"]))
            due = local.strftime("%a %d %b %Y %H:%M %Z")
        extra = {
            "client": sanitise_header(author or record.mail_from or "", 998),
            "organisation": sanitise_header(info["organisation"] or "", 200),
            "unit": info["unit"],
            "owner": owner or "",
            "due": due,
            "text": record.text or "",
        }
        template = "staff_new_ticket" if kind is MailKind.STAFF_NEW_TICKET else "staff_client_reply"
        mail = tuple(
            self._plan(
                conn,
                kind,
                ticket,
                to=to,
                now=now,
                in_reply_to=None,
                template=template,
                extra=extra,
            )
            for to in recipients
        )
        return Plan(mail)

    def status_change(
        self, conn: sqlite3.Connection, ticket: int, old: str, new: str, now: str
    ) -> Plan:
        """The client's mail about a solved or reopened ticket, or why not."""
        solved = new == "solved" and old != "solved"
        reopened = new == "open" and old in ("solved", "closed")
        if not (solved or reopened):
            return _withheld(MailKind.STATUS_CHANGE, ticket, "not-notified", now)
        info = store.ticket_mail_info(conn, ticket)
        to = info["requester"] if info else None
        why = self.refusal(conn, to, now)
        if why is not None:
            return _withheld(MailKind.STATUS_CHANGE, ticket, why, now)
        assert to is not None
        mail = self._plan(
            conn,
            MailKind.STATUS_CHANGE,
            ticket,
            to=to,
            now=now,
            in_reply_to=None,
            template="status_change",
            extra={"old_status": old, "new_status": new},
        )
        return Plan((mail,))

    def upset_notice(
        self,
        conn: sqlite3.Connection,
        ticket: int,
        record: StoredMessage,
        reasons: Sequence[str],
        now: str,
    ) -> Plan:
        """Tell the organisation's account manager and the ticket's owner that the client
        who wrote `record` reads as upset (`reasons`), with the ticket's summary, its
        promises and the client's words (the readable text: no quoted history).

        Staff side only: the account manager is the one an admin set on the organisation
        (`orgs --account-manager`), the owner a staff address; neither may be the ticket's
        requester, a participant (client addresses on the ticket) or the author, nor an
        address that bounced. Once per ticket per day is the caller's (it keeps the day)."""
        kind = MailKind.ACCOUNT_MANAGER_NOTICE
        info = store.ticket_desk_info(conn, ticket)
        if info is None:
            return _withheld(kind, ticket, "no-ticket", now)
        manager = store.ticket_account_manager(conn, ticket)
        owner = info["owner"]
        clients = {info["requester"], record.sender, *store.ticket_participants(conn, ticket)}
        recipients = [
            to
            for to in dict.fromkeys([manager, owner if self.config.is_staff(owner) else None])
            if to
            and to not in clients
            and to not in self.own
            and not store.is_undeliverable(conn, to)
        ]
        if not recipients:
            return _withheld(kind, ticket, "no-recipient", now)
        unit = self.config.unit(info["unit"])

        def local(stamp: str | None) -> str:
            if not stamp:
                return ""
            return unit.hours.local(datetime.fromisoformat(stamp)).strftime("%a %d %b %Y %H:%M %Z")

        extra = {
            "client": sanitise_header(record.sender or record.mail_from or "", 998),
            "organisation": sanitise_header(info["organisation"] or "", 200),
            "unit": info["unit"],
            "owner": owner or "",
            "account_manager": manager or "",
            "due": local(info["next_update_due"]),
            "reasons": list(reasons),
            "commitments": [
                {
                    "due": local(c["due"]),
                    "set_by": c["set_by"],
                    "note": c["note"] or "",
                    "state": c["state"],
                }
                for c in list_commitments(conn, ticket)
            ],
            "text": record.text or "",
            "cli": f"gateway tickets show {ticket}",
        }
        mail = tuple(
            self._plan(
                conn,
                kind,
                ticket,
                to=to,
                now=now,
                in_reply_to=None,
                template="account_manager_notice",
                extra=extra,
            )
            for to in recipients
        )
        return Plan(mail)

    def tell_admins(
        self,
        conn: sqlite3.Connection,
        kind: MailKind,
        context: Callable[[], Mapping[str, object]],
        now: str,
        *,
        reasons: Sequence[str] = (),
        about: str | None = None,
    ) -> Plan:
        """A notice to every configured admin (within the caps).

        Each kind of notice has its own hourly cap per admin, so a flood of one kind (junk
        held as unknown senders) never silences another (a look-alike of a client, forged
        staff mail, a loop): a quarantine notice about a held message whose `reasons`
        include `unauthenticated` or `lookalike` is a security notice. The notices a cap
        holds back are one `Withheld` (one `mail.withheld` event, naming the admins).

        `context` is called once, and only if some admin is to be told: what it looks up
        (the count of held mail, say) costs nothing for the notices the caps hold back.
        """
        if kind is MailKind.QUARANTINE_NOTICE and SECURITY_REASONS.intersection(reasons):
            kind = MailKind.SECURITY_NOTICE
        template = "loop_notice" if kind is MailKind.LOOP_NOTICE else "quarantine_notice"
        found: Mapping[str, object] | None = None
        mail: list[PlannedMail] = []
        # Nothing is written while planning: an admin named twice counts what this plan
        # already gives them against the cap.
        planned: Counter[str] = Counter()
        withheld: list[str] = []
        for admin in self.config.staff.admins:
            if self._admin_refusal(conn, admin, kind, now, planned[admin]) is not None:
                withheld.append(admin)
                continue
            if found is None:
                found = _quoted(context())
            mail.append(
                self._plan(
                    conn,
                    kind,
                    None,
                    to=admin,
                    now=now,
                    in_reply_to=None,
                    template=template,
                    extra=dict(found),
                )
            )
            planned[admin] += 1
        held_back = None
        if withheld:
            held_back = Withheld(
                kind,
                "hourly-cap",
                about or f"notice:{kind.value}",
                None,
                now,
                to=tuple(withheld),
                cap=self.admin_cap(kind),
                reasons=tuple(reasons),
            )
        return Plan(tuple(mail), held_back)

    def to_staff(
        self,
        conn: sqlite3.Connection,
        kind: MailKind,
        ticket: int | None,
        to: str,
        now: str,
        template: str,
        extra: Mapping[str, object],
    ) -> PlannedMail:
        """The scheduler's mail to a staff address the caller chose (no caps: a reminder
        or an escalation must not be lost to a flood); the caller checks it is staff."""
        return self._plan(
            conn, kind, ticket, to=to, now=now, in_reply_to=None, template=template, extra=extra
        )

    def admin_cap(self, kind: MailKind) -> int:
        """The hourly cap of one kind of admin notice, per admin."""
        policy = self.config.policy
        if kind is MailKind.SECURITY_NOTICE:
            return policy.max_security_notices_per_hour
        if kind is MailKind.LOOP_NOTICE:
            return policy.max_loop_notices_per_hour
        return policy.max_quarantine_notices_per_hour

    def _admin_refusal(
        self, conn: sqlite3.Connection, admin: str, kind: MailKind, now: str, planned: int = 0
    ) -> str | None:
        sent = store.count_admin_notices(conn, admin, (kind.value,), since=_before(now, hours=1))
        if sent + planned >= self.admin_cap(kind):
            return "hourly-cap"
        return None

    # --- building ------------------------------------------------------------------------

    def _mailbox(self, address: str | None) -> MailboxConfig:
        for mailbox in self.config.mailboxes:
            if mailbox.address == address:
                return mailbox
        return self.config.mailboxes[0]

    def _plan(
        self,
        conn: sqlite3.Connection,
        kind: MailKind,
        ticket: int | None,
        *,
        to: str,
        now: str,
        in_reply_to: str | None,
        template: str,
        extra: Mapping[str, object],
        automatic: bool = True,
        references: Sequence[str] | None = None,
        acknowledges: bool = False,
    ) -> PlannedMail:
        # The last word on staff notices: they carry a client's words and a reply token
        # that speaks to the client, so they go to staff and nobody else.
        assert kind not in STAFF_NOTICES or self.config.is_staff(to), f"staff notice to {to}"
        info = store.ticket_mail_info(conn, ticket) if ticket is not None else None
        mailbox = self._mailbox(info["mailbox"] if info else None)
        reply_to = mailbox.address
        chain = list(references or [])
        context: dict[str, object] = {
            "desk": mailbox.desk,
            "mailbox": mailbox.address,
            "recipient": to,
            "recipient_name": "",
        }
        if info is not None and ticket is not None:
            reply_to = f"{mailbox.local_part}+{make_token(self.secret, ticket)}@{mailbox.domain}"
            if references is None:
                chain = info["message_ids"][-MAX_REFERENCES:]
            in_reply_to = in_reply_to or (chain[-1] if chain else None)
            context["ticket"] = {
                "number": ticket,
                "tag": self.tag.format(ticket),
                "subject": quote_subject(info["subject"] or ""),
                "status": info["status"],
            }
        context["reply_address"] = reply_to
        context.update(extra)
        # Only the subject is rendered now; the mail itself is built by the delivery
        # worker from this spec, so building MIME never runs inside the intake transaction.
        subject = sanitise_header(self.templates.render_subject(template, context), MAX_SUBJECT)
        if ticket is not None:
            subject = sanitise_header(self.tag.add(subject, ticket), MAX_SUBJECT)
        display = mailbox.desk
        if kind is MailKind.STAFF_REPLY and extra.get("staff_name"):
            display = f"{extra['staff_name']} ({mailbox.desk})"
        sender = Address(display_name=sanitise_header(display, 80), addr_spec=mailbox.address)
        spec = MailSpec(
            template=template,
            context=context,
            sender_name=sender.display_name,
            sender=mailbox.address,
            to=to,
            subject=subject,
            message_id=new_message_id(self.config.smtp.hostname, ticket),
            date=now,
            hostname=self.config.smtp.hostname,
            reply_to=reply_to,
            in_reply_to=in_reply_to,
            references=tuple(chain[-MAX_REFERENCES:]),
            auto_submitted=_AUTO_SUBMITTED.get(kind) if automatic else None,
        )
        mail_from = "" if automatic else spec.sender
        record = StoredMessage(
            queue_id=f"out-{secrets.token_hex(8)}",
            received_at=now,
            mail_from=mail_from,
            rcpt_to=(spec.to,),
            peer="",
            helo="",
            raw=b"",
            sha256="",
            message_id=spec.message_id,
            from_header=str(sender),
            subject=spec.subject,
            date_header=None,
            malformed=None,
            defects=(),
            direction="out",
            classification="auto-reply" if automatic else "normal",
            reasons=(kind.value,),
        )
        message_kind = MessageKind.STAFF if kind is MailKind.STAFF_REPLY else MessageKind.AUTO_REPLY
        filing = Filing(ticket, message_kind, "outgoing")
        return PlannedMail(kind, ticket, automatic, spec, record, filing, acknowledges)


_AUTO_SUBMITTED = {
    MailKind.ACKNOWLEDGEMENT: "auto-replied",
    MailKind.STATUS_CHANGE: "auto-generated",
    MailKind.QUARANTINE_NOTICE: "auto-generated",
    MailKind.SECURITY_NOTICE: "auto-generated",
    MailKind.LOOP_NOTICE: "auto-generated",
    MailKind.STAFF_NEW_TICKET: "auto-generated",
    MailKind.STAFF_CLIENT_REPLY: "auto-generated",
    MailKind.REMINDER: "auto-generated",
    MailKind.ESCALATION: "auto-generated",
    MailKind.DIGEST: "auto-generated",
    MailKind.ACCOUNT_MANAGER_NOTICE: "auto-generated",
    MailKind.PAGE: "auto-generated",
}


def shown_time(hours: BusinessHours, moment: datetime, now: datetime) -> str:
    """A time as the acknowledgement says it, in the unit's zone: "Monday 09:00" within
    the coming week, with the date further out ("Monday 4 January 09:00")."""
    local = hours.local(moment)
    if moment - now < timedelta(days=6):
        return f"{local:%A %H:%M}"
    return f"{local:%A} {local.day} {local:%B %H:%M}"


def _quoted(context: Mapping[str, object]) -> dict[str, object]:
    """An admin notice's context with the held sender's words made safe to quote: its
    subject cut to MAX_QUOTED_SUBJECT, no bidi or other format characters in it or in
    the addresses shown."""
    values = dict(context)
    entry = values.get("entry")
    if isinstance(entry, Mapping):
        entry = dict(entry)
        entry["subject"] = quote_subject(str(entry.get("subject") or ""))
        entry["sender"] = sanitise_header(str(entry.get("sender") or ""), 998)
        values["entry"] = entry
    if isinstance(values.get("sender"), str):
        values["sender"] = sanitise_header(str(values["sender"]), 998)
    return values


def _before(now: str, *, hours: int) -> str:
    return (datetime.fromisoformat(now) - timedelta(hours=hours)).isoformat(timespec="microseconds")


def describe(reasons: Sequence[str]) -> str:
    return json.dumps(list(reasons))
