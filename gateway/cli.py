"""The `gateway` console script: serve, check-config, and the admin commands.

Every command exits 0 on success and 1 with a message that says what is wrong (on stderr);
`--json` output goes to stdout alone, so scripts can parse it. Commands read and write the
same SQLite database as the daemon; they never talk to the running daemon.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import pwd
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from email_validator import EmailNotValidError, validate_email

from . import __version__, store
from .address import is_our_domain, match_mailbox, parse_sender
from .clock import Clock
from .config import Config, ConfigError, config_path, config_warnings, load_config
from .notify import Planner
from .render import TemplateError, Templates
from .store.events import EventAction
from .tickets import Status


class CliError(Exception):
    """A user-facing error: printed as `gateway: <message>`, exit 1."""


def main(argv: Sequence[str] | None = None, *, clock: Clock | None = None) -> int:
    """Run one command; `clock` (the one this command stamps with) is for tests."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.clock = clock or Clock()
    try:
        config = load_config(config_path(args.config))
        handler: Callable[[Config, argparse.Namespace], int] = args.handler
        return handler(config, args)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return 1
    except TemplateError as exc:
        print(f"gateway: template error: {exc}", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except (store.StoreError, sqlite3.Error) as exc:
        print(f"gateway: database error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `gateway messages list | head`
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="Support-desk mail gateway: daemon and admin commands."
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: $GATEWAY_CONFIG, else ./config.toml)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the SMTP/LMTP daemon in the foreground")
    serve.set_defaults(handler=cmd_serve)

    check = commands.add_parser("check-config", help="validate the configuration and exit")
    check.set_defaults(handler=cmd_check_config)

    messages = commands.add_parser("messages", help="stored messages")
    messages_sub = messages.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = messages_sub.add_parser("list", help="every stored message, newest first")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--limit", type=_positive_int, help="show at most N messages")
    listing.set_defaults(handler=cmd_messages_list)
    show = messages_sub.add_parser("show", help="one stored message")
    show.add_argument("id", type=_positive_int, help="the message id (from `messages list`)")
    show.add_argument("--raw", action="store_true", help="print the raw bytes as received")
    show.set_defaults(handler=cmd_messages_show)

    tickets = commands.add_parser("tickets", help="the desk's tickets")
    tickets_sub = tickets.add_subparsers(dest="action", required=True, metavar="ACTION")
    tlist = tickets_sub.add_parser("list", help="tickets, most recently updated first")
    tlist.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    tlist.add_argument("--unit", help="only this unit")
    tlist.add_argument("--json", action="store_true", help="machine-readable output")
    tlist.set_defaults(handler=cmd_tickets_list)
    tshow = tickets_sub.add_parser("show", help="one ticket with its messages")
    tshow.add_argument("number", type=_ticket_number, help="the ticket number (1234 or #1234)")
    tshow.add_argument("--json", action="store_true", help="machine-readable output")
    tshow.set_defaults(handler=cmd_tickets_show)
    treply = tickets_sub.add_parser(
        "reply", help="reply to the client as staff (the text on stdin; '#note' first: a note)"
    )
    treply.add_argument("number", type=_ticket_number, help="the ticket number")
    treply.add_argument("--from", dest="sender", required=True, help="your staff address")
    treply.add_argument(
        "--status", choices=[s.value for s in Status], help="the status afterwards (pending)"
    )
    treply.set_defaults(handler=cmd_tickets_reply)
    tstatus = tickets_sub.add_parser("status", help="change a ticket's status")
    tstatus.add_argument("number", type=_ticket_number, help="the ticket number")
    tstatus.add_argument("status", choices=[s.value for s in Status])
    tstatus.add_argument("--reason", help="why (kept in the audit trail)")
    tstatus.set_defaults(handler=cmd_tickets_status)
    add_quarantine_commands(commands)
    add_admin_commands(commands)
    add_outbox_commands(commands)
    return parser


# SQLite's INTEGER is 64-bit signed: a larger number cannot even be looked up (sqlite3
# raises OverflowError), so it is refused as a usage error like any other bad number.
MAX_NUMBER = 2**63 - 1


def _positive_int(text: str) -> int:
    digits = text.strip()
    # Checked before int(): int() refuses more than 4300 digits with a confusing message.
    if digits.isascii() and digits.isdigit() and len(digits.lstrip("0")) > len(str(MAX_NUMBER)):
        raise argparse.ArgumentTypeError(f"must be at most {MAX_NUMBER}: {text[:30]}...")
    try:
        value = int(digits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text[:30]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {value}")
    if value > MAX_NUMBER:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_NUMBER}: {value}")
    return value


def _ticket_number(text: str) -> int:
    return _positive_int(text.strip().lstrip("#"))


def open_db(config: Config) -> sqlite3.Connection:
    return store.connect(config.database_path, config.storage.busy_timeout_ms)


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from . import app, logs  # the daemon's imports are not needed by the admin commands

    logs.configure(config.log.level)
    return app.serve(config)


def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    # The templates are part of the configuration: a typo must stop a deploy here, not
    # the daemon's start (or a client's mail).
    Templates(config.templates_path).check()
    mailboxes = ", ".join(f"{m.address} ({m.unit})" for m in config.mailboxes)
    print(f"{config.path}: ok")
    print(f"  listen    {config.smtp.protocol} on {config.smtp.host}:{config.smtp.port}")
    print(f"  database  {config.database_path}")
    print(f"  mailboxes {mailboxes}")
    print(f"  tls       {'STARTTLS offered' if config.smtp.tls_enabled else 'off'}")
    print(f"  templates {config.templates_path} (checked)")
    for warning in config_warnings(config):
        print(f"gateway: WARNING: {warning}", file=sys.stderr)
    return 0


def cmd_messages_list(config: Config, args: argparse.Namespace) -> int:
    with closing(open_db(config)) as conn:
        rows = store.list_messages(conn, args.limit)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no messages")
        return 0
    table = [
        (
            str(r["id"]),
            r["received_at"][:19].replace("T", " "),
            r["mail_from"] or "<>",
            r["subject"] or "",
            r["malformed"] or "",
        )
        for r in rows
    ]
    _print_table(("ID", "RECEIVED (UTC)", "MAIL FROM", "SUBJECT", "MALFORMED"), table)
    return 0


def cmd_messages_show(config: Config, args: argparse.Namespace) -> int:
    with closing(open_db(config)) as conn:
        raw = store.read_raw(conn, args.id)
        rows = [r for r in store.list_messages(conn) if r["id"] == args.id] if raw else []
    if raw is None or not rows:
        raise CliError(f"no message with id {args.id}")
    if args.raw:
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        return 0
    row = rows[0]
    for key in (
        "id",
        "queue_id",
        "received_at",
        "mail_from",
        "rcpt_to",
        "peer",
        "helo",
        "message_id",
        "from",
        "subject",
        "size",
        "sha256",
        "malformed",
    ):
        value = row[key]
        if isinstance(value, list):
            value = ", ".join(value)
        print(f"{key + ':':<12} {'' if value is None else printable(str(value))}")
    return 0


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")


def cmd_tickets_list(config: Config, args: argparse.Namespace) -> int:
    with closing(open_db(config)) as conn:
        tickets = store.list_tickets(conn, status=args.status, unit=args.unit)
    if args.json:
        _print_json(tickets)
        return 0
    if not tickets:
        print("no tickets")
        return 0
    table = [
        (
            f"#{t['number']}",
            t["status"],
            t["unit"],
            t["requester"],
            str(t["message_count"]),
            t["updated_at"][:16].replace("T", " "),
            t["subject"],
        )
        for t in tickets
    ]
    _print_table(("TICKET", "STATUS", "UNIT", "REQUESTER", "MSGS", "UPDATED", "SUBJECT"), table)
    return 0


def _planner(config: Config, conn: sqlite3.Connection) -> Planner:
    templates = Templates(config.templates_path)
    return Planner(config, templates, store.token_secret(conn))


def _clock(args: argparse.Namespace) -> Clock:
    """The command's clock (set by main)."""
    clock: Clock = args.clock
    return clock


def cmd_tickets_reply(config: Config, args: argparse.Namespace) -> int:
    sender = parse_sender(args.sender)
    if sender is None or not config.is_staff(sender):
        raise CliError(f"{args.sender} is not a staff address (see [staff] addresses and domains)")
    body = sys.stdin.read().strip()
    if not body:
        raise CliError("the reply is empty: write it on standard input")
    note = body.lower().startswith("#note")
    with closing(open_db(config)) as conn, store.write_transaction(conn):
        if store.ticket_mail_info(conn, args.number) is None:
            raise CliError(f"no ticket #{args.number}")
        planner = _planner(config, conn)
        now = _clock(args).stamp()
        actor = cli_actor()
        if note:
            store.add_note(conn, args.number, text=body, author=sender, now=now)
            print(f"note added to #{args.number}")
            return 0
        why_not = planner.staff_reply(conn, args.number, body, sender, now)
        if why_not is not None:
            raise CliError(f"cannot send the reply to #{args.number}: {why_not}")
        status = args.status or Status.PENDING.value
        old = store.set_ticket_status(conn, args.number, status, now)
        store.record_event(
            conn,
            time=now,
            actor=actor,
            action=EventAction.TICKET_REPLIED,
            subject=f"ticket:{args.number}",
            ticket=args.number,
            detail={"from": sender, "from_status": old, "to_status": status},
        )
    print(f"reply to #{args.number} queued; status {status}")
    return 0


def cmd_tickets_status(config: Config, args: argparse.Namespace) -> int:
    with closing(open_db(config)) as conn, store.write_transaction(conn):
        now = _clock(args).stamp()
        old = store.set_ticket_status(conn, args.number, args.status, now)
        if old is None:
            raise CliError(f"no ticket #{args.number}")
        if old == args.status:
            print(f"#{args.number} is already {args.status}")
            return 0
        store.record_event(
            conn,
            time=now,
            actor=cli_actor(),
            action=EventAction.TICKET_STATUS,
            subject=f"ticket:{args.number}",
            ticket=args.number,
            detail={"from": old, "to": args.status, "reason": args.reason},
        )
        why_not = _planner(config, conn).status_change(conn, args.number, old, args.status, now)
    told = "the client is told" if why_not is None else f"no mail to the client ({why_not})"
    print(f"#{args.number}: {old} -> {args.status}; {told}")
    return 0


def cmd_tickets_show(config: Config, args: argparse.Namespace) -> int:
    with closing(open_db(config)) as conn:
        ticket = store.show_ticket(conn, args.number)
    if ticket is None:
        raise CliError(f"no ticket #{args.number}")
    if args.json:
        _print_json(ticket)
        return 0
    tag = config.tickets.tag.replace("{number}", str(ticket["number"]))
    print(f"{tag} {printable(ticket['subject'])}")
    print(f"status {ticket['status']}, unit {ticket['unit']}, requester {ticket['requester']}")
    print(f"opened {ticket['created_at'][:16]}, updated {ticket['updated_at'][:16]}")
    if ticket["follows"]:
        print(f"follows up #{ticket['follows']}")
    for message in ticket["messages"]:
        print()
        arrow = "<-" if message["direction"] == "in" else "->"
        sender = printable(message["from"] or "")
        print(f"{arrow} [{message['kind']}] {sender}  {printable(message['date'] or '')}")
        for line in message["text"].splitlines() or [""]:
            print(f"   {printable(line)}")
        for attachment in message["attachments"]:
            name = printable(attachment["name"])
            print(f"   [attachment] {name} ({attachment['size']} bytes)")
    return 0


def add_quarantine_commands(commands: Any) -> None:
    quarantine = commands.add_parser("quarantine", help="held mail: review, release, discard")
    sub = quarantine.add_subparsers(dest="action", required=True, metavar="ACTION")
    qlist = sub.add_parser("list", help="held mail, newest first")
    qlist.add_argument("--json", action="store_true", help="machine-readable output")
    qlist.add_argument(
        "--all", action="store_true", help="also released, discarded and expired entries"
    )
    qlist.set_defaults(handler=cmd_quarantine_list)
    qshow = sub.add_parser("show", help="one held message: headers, text, reasons")
    qshow.add_argument("id", type=_positive_int)
    qshow.set_defaults(handler=cmd_quarantine_show)
    qrelease = sub.add_parser("release", help="file held mail as if its sender were authorised")
    qrelease.add_argument("id", type=_positive_int)
    qrelease.add_argument(
        "--authorise",
        action="store_true",
        help="first add the sender to the organisation that owns its domain",
    )
    qrelease.add_argument("--reason", help="why (kept in the audit trail)")
    qrelease.set_defaults(handler=cmd_quarantine_release)
    qdiscard = sub.add_parser("discard", help="drop held mail (kept for audit, never filed)")
    qdiscard.add_argument("id", type=_positive_int)
    qdiscard.add_argument("--reason", help="why (kept in the audit trail)")
    qdiscard.set_defaults(handler=cmd_quarantine_discard, block=False)
    qblock = sub.add_parser("block", help="block the sender of held mail and discard it")
    qblock.add_argument("id", type=_positive_int)
    qblock.add_argument("--reason", help="why (kept in the audit trail)")
    qblock.set_defaults(handler=cmd_quarantine_discard, block=True)


def cli_actor() -> str:
    """Who runs this command, for the audit trail: cli:<OS user>."""
    try:
        return f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
    except KeyError:
        return f"cli:uid:{os.getuid()}"


def cmd_quarantine_list(config: Config, args: argparse.Namespace) -> int:
    with closing(open_db(config)) as conn:
        entries = store.list_quarantine(conn, None if args.all else "held")
    if args.json:
        _print_json(entries)
        return 0
    if not entries:
        print("the quarantine is empty")
        return 0
    table = [
        (
            str(e["id"]),
            e["received_at"][:16].replace("T", " "),
            e["sender"] or "",
            ",".join(e["reasons"]),
            e["status"],
            e["subject"] or "",
        )
        for e in entries
    ]
    _print_table(("ID", "RECEIVED", "SENDER", "REASONS", "STATUS", "SUBJECT"), table)
    return 0


def cmd_quarantine_show(config: Config, args: argparse.Namespace) -> int:
    from .quarantine import parse_held

    with closing(open_db(config)) as conn:
        row = store.held_message(conn, args.id)
    if row is None:
        raise CliError(f"no quarantine entry {args.id}")
    parsed = parse_held(config, bytes(row["raw"]))
    print(f"quarantine {row['quarantine_id']} ({row['status']}), held {row['held_at'][:19]}")
    print(f"reasons:   {', '.join(json.loads(row['held_reasons']))}")
    print(f"envelope:  from <{row['mail_from']}> to {', '.join(json.loads(row['rcpt_to']))}")
    print(f"peer:      {row['peer']} (helo {printable(row['helo'])})")
    print()
    for name, value in parsed.headers[:100]:
        print(f"{printable(name)}: {printable(value)}")
    print()
    for line in (parsed.reply_text or parsed.text).splitlines()[:200]:
        print(printable(line))
    return 0


def cmd_quarantine_release(config: Config, args: argparse.Namespace) -> int:
    from .quarantine import QuarantineError, release

    with closing(open_db(config)) as conn:
        try:
            released = release(
                config,
                conn,
                args.id,
                actor=cli_actor(),
                now=_clock(args).now(),
                authorise=args.authorise,
                reason=args.reason,
            )
        except QuarantineError as exc:
            raise CliError(str(exc)) from None
    if released.authorised:
        print(f"authorised {released.authorised}")
    where = f"ticket #{released.ticket}" if released.ticket else "no ticket"
    print(f"released quarantine entry {released.quarantine_id}: filed to {where}")
    return 0


def cmd_quarantine_discard(config: Config, args: argparse.Namespace) -> int:
    from .quarantine import QuarantineError, discard

    with closing(open_db(config)) as conn:
        try:
            blocked = discard(
                conn,
                args.id,
                actor=cli_actor(),
                now=_clock(args).now(),
                reason=args.reason,
                block=args.block,
            )
        except QuarantineError as exc:
            raise CliError(str(exc)) from None
    if blocked:
        print(f"blocked {blocked}")
    print(f"discarded quarantine entry {args.id}")
    return 0


# --- the outbox (outgoing mail) ---
#
# `retry` only changes the row (and records who asked); the running daemon sends it at its
# next poll, within [delivery] poll_interval seconds.


def add_outbox_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`outbox list` and `outbox retry`."""
    outbox = commands.add_parser("outbox", help="outgoing mail: delivery status, retry")
    sub = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    olist = sub.add_parser("list", help="outgoing mail, newest first")
    olist.add_argument("--status", choices=store.OUTBOX_STATUSES, help="only this status")
    olist.add_argument("--limit", type=_positive_int, metavar="N", help="show at most N rows")
    olist.add_argument("--json", action="store_true", help="machine-readable output")
    olist.set_defaults(handler=cmd_outbox_list)
    oretry = sub.add_parser(
        "retry", help="make a failed or waiting mail due now (attempts so far are kept)"
    )
    oretry.add_argument("id", type=_positive_int, help="the outbox row id (from `outbox list`)")
    _add_reason_option(oretry)
    oretry.set_defaults(handler=cmd_outbox_retry)


def _outbox_status(row: dict[str, Any]) -> str:
    if row["status"] == "queued" and row["attempts"]:
        return f"queued, next {row['next_attempt_at'][:16].replace('T', ' ')}"
    return str(row["status"])


def cmd_outbox_list(config: Config, args: argparse.Namespace) -> int:
    with _admin_db(config) as conn:
        rows = store.list_outbox(conn, status=args.status, limit=args.limit)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("the outbox is empty" if args.status is None else f"no {args.status} mail")
        return 0
    table = [
        (
            str(r["id"]),
            r["created_at"][:16].replace("T", " "),
            f"#{r['ticket']}" if r["ticket"] is not None else "",
            r["kind"],
            r["to"],
            _outbox_status(r),
            str(r["attempts"]),
            r["subject"],
            r["last_error"] or "",
        )
        for r in rows
    ]
    header = ("ID", "CREATED (UTC)", "TICKET", "KIND", "TO", "STATUS", "TRIES", "SUBJECT", "ERROR")
    _print_table(header, table)
    return 0


def cmd_outbox_retry(config: Config, args: argparse.Namespace) -> int:
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        row = store.find_outbox(conn, args.id)
        if row is None:
            raise CliError(f"no outbox row {args.id}")
        if row["status"] == "sent":
            raise CliError(f"outbox row {args.id} was already sent")
        store.retry_outbox(conn, args.id, now=now)
        detail: dict[str, Any] = {
            "to": row["to"],
            "status": row["status"],
            "attempts": row["attempts"],
            "last_error": row["last_error"],
        }
        if args.reason:
            detail["reason"] = args.reason
        store.record_event(
            conn,
            time=now,
            actor=cli_actor(),
            action=EventAction.OUTBOX_RETRIED,
            subject=f"outbox:{args.id}",
            ticket=row["ticket"],
            detail=detail,
        )
    print(f"outbox row {args.id} to {row['to']} is due now: the daemon sends it at its next poll")
    return 0


def printable(text: str) -> str:
    return "".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in text)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [min(60, max(len(h), *(len(r[i]) for r in rows))) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        # Mail headers are the sender's words: no control character reaches the terminal.
        cells = [printable(c) for c in cells]
        out = [
            (c if len(c) <= w else c[: w - 1] + "…").ljust(w)
            for c, w in zip(cells, widths, strict=True)
        ]
        return "  ".join(out).rstrip()

    print(line(header))
    for row in rows:
        print(line(row))


# --- organisations, senders and the audit trail (admin) ---
#
# Every mutating command makes its checks and its changes, and records their audit events,
# inside one BEGIN IMMEDIATE transaction: the checks still hold when the changes commit, and
# the daemon's writer simply waits (busy_timeout) instead of failing. The daemon reads the
# sender list for each message, so a committed change applies to the next message.

# The header of `senders import` and `senders export` files.
SENDERS_CSV_HEADER = ("address", "org", "name")
# Bad rows `senders import` names before giving up on a file.
_MAX_IMPORT_ERRORS = 50
# Events the table shows when no --limit is given (--json shows all).
_EVENTS_TABLE_LIMIT = 100


def add_admin_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`orgs`, `senders` and `events`."""
    orgs = commands.add_parser("orgs", help="client organisations")
    orgs_sub = orgs.add_subparsers(dest="action", required=True, metavar="ACTION")
    oadd = orgs_sub.add_parser("add", help="add an organisation")
    oadd.add_argument("name", metavar="NAME", help="its name (unique, any case)")
    oadd.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="D",
        help="a mail domain of the organisation (repeatable); it identifies the "
        "organisation but authorises nobody by itself",
    )
    oadd.add_argument("--unit", metavar="U", help="the desk unit its tickets go to")
    oadd.add_argument("--account-manager", metavar="ADDR", help="its account manager's address")
    _add_reason_option(oadd)
    oadd.set_defaults(handler=cmd_orgs_add)
    olist = orgs_sub.add_parser("list", help="every organisation")
    olist.add_argument("--json", action="store_true", help="machine-readable output")
    olist.set_defaults(handler=cmd_orgs_list)
    oupdate = orgs_sub.add_parser("update", help="change an organisation's domains or details")
    oupdate.add_argument("name", metavar="NAME")
    oupdate.add_argument("--add-domain", action="append", default=[], metavar="D")
    oupdate.add_argument("--remove-domain", action="append", default=[], metavar="D")
    oupdate.add_argument("--unit", metavar="U", help='the desk unit ("" for none)')
    oupdate.add_argument("--account-manager", metavar="ADDR", help='an address ("" for none)')
    _add_reason_option(oupdate)
    oupdate.set_defaults(handler=cmd_orgs_update)
    oremove = orgs_sub.add_parser(
        "remove", help="remove an organisation with no tickets, and its authorised senders"
    )
    oremove.add_argument("name", metavar="NAME")
    _add_reason_option(oremove)
    oremove.set_defaults(handler=cmd_orgs_remove)

    senders = commands.add_parser("senders", help="authorised and blocked senders")
    senders_sub = senders.add_subparsers(dest="action", required=True, metavar="ACTION")
    sadd = senders_sub.add_parser(
        "add", help="authorise an address (or, with --domain, a whole domain) for an organisation"
    )
    sadd.add_argument("address", nargs="?", metavar="ADDRESS")
    sadd.add_argument(
        "--domain", metavar="DOMAIN", help="authorise every address at DOMAIN instead"
    )
    sadd.add_argument("--org", required=True, metavar="NAME", help="the organisation")
    sadd.add_argument("--name", metavar="TEXT", help="the sender's display name")
    _add_reason_option(sadd)
    sadd.set_defaults(handler=cmd_senders_add)
    sremove = senders_sub.add_parser("remove", help="remove an address (or a domain grant)")
    sremove.add_argument("address", nargs="?", metavar="ADDRESS")
    sremove.add_argument("--domain", metavar="DOMAIN", help="remove the grant of DOMAIN")
    _add_reason_option(sremove)
    sremove.set_defaults(handler=cmd_senders_remove)
    sblock = senders_sub.add_parser("block", help="refuse all mail from an address")
    sblock.add_argument("address", metavar="ADDRESS")
    _add_reason_option(sblock)
    sblock.set_defaults(handler=cmd_senders_block)
    slist = senders_sub.add_parser("list", help="authorised and blocked senders")
    slist.add_argument("--org", metavar="NAME", help="only this organisation's")
    slist.add_argument("--json", action="store_true", help="machine-readable output")
    slist.set_defaults(handler=cmd_senders_list)
    simport = senders_sub.add_parser(
        "import", help="add or update senders from a CSV file: all rows or none"
    )
    simport.add_argument("file", metavar="FILE.csv", help="header address,org,name; - for stdin")
    _add_reason_option(simport)
    simport.set_defaults(handler=cmd_senders_import)
    sexport = senders_sub.add_parser(
        "export", help="authorised senders as CSV (what `senders import` reads)"
    )
    sexport.set_defaults(handler=cmd_senders_export)

    events = commands.add_parser("events", help="the audit trail, newest first")
    events.add_argument("--ticket", type=_ticket_number, metavar="N", help="only this ticket's")
    events.add_argument("--json", action="store_true", help="machine-readable output (all)")
    events.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help=f"show at most N events (table default {_EVENTS_TABLE_LIMIT})",
    )
    events.set_defaults(handler=cmd_events)


def _add_reason_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", metavar="TEXT", help="why (kept in the audit trail)")


@contextmanager
def _admin_db(config: Config, *, write: bool = False) -> Iterator[sqlite3.Connection]:
    """The database for one command; with `write`, one transaction committed at the end."""
    try:
        with closing(open_db(config)) as conn:
            if write:
                with store.write_transaction(conn):
                    yield conn
            else:
                yield conn
    except sqlite3.OperationalError as exc:
        code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
        if code not in (store.SQLITE_BUSY, store.SQLITE_LOCKED):
            raise
        raise CliError(
            f"the database is locked by another process (waited "
            f"{config.storage.busy_timeout_ms} ms); nothing was changed, try again"
        ) from None


def _record(
    conn: sqlite3.Connection,
    args: argparse.Namespace,
    *,
    now: str,
    action: EventAction,
    subject: str,
    detail: dict[str, Any],
) -> None:
    if args.reason:
        detail = {**detail, "reason": args.reason}
    store.record_event(
        conn, time=now, actor=cli_actor(), action=action, subject=subject, detail=detail
    )


def valid_address(text: str) -> str:
    """An address as senders are stored: valid, lower-case, IDNA (A-label) domain."""
    try:
        valid = validate_email(text.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        raise CliError(f"invalid address '{text}': {exc}") from None
    return f"{valid.local_part.lower()}@{valid.ascii_domain.lower()}"


def valid_domain(text: str) -> str:
    """A mail domain as stored: lower-case A-label (a leading "@" is allowed)."""
    candidate = text.strip().removeprefix("@")
    try:
        valid = validate_email(f"postmaster@{candidate}", check_deliverability=False)
    except EmailNotValidError as exc:
        raise CliError(f"invalid domain '{text}': {exc}") from None
    return valid.ascii_domain.lower()


def _org_name(text: str) -> str:
    name = text.strip()
    if not name:
        raise CliError("the organisation name is empty")
    if not name.isprintable() or len(name) > 200:
        raise CliError(f"invalid organisation name '{printable(name)}': printable, 200 at most")
    return name


def _display_name(text: str | None) -> str | None:
    # Line breaks and tabs (a spreadsheet cell's, say) become single spaces.
    name = " ".join((text or "").split())
    if not name:
        return None
    if not name.isprintable():
        raise CliError(f"invalid name '{printable(name)}': control characters")
    return name


def _unit(config: Config, text: str) -> str | None:
    if not text.strip():
        return None
    units = sorted({m.unit for m in config.mailboxes})
    if text.strip() not in units:
        raise CliError(f"unknown unit '{text}' (the mailboxes' units: {', '.join(units)})")
    return text.strip()


def _check_not_ours(config: Config, domain: str) -> None:
    if is_our_domain(f"x@{domain}", config.mailboxes) or domain in config.staff.domains:
        raise CliError(f"domain '{domain}' is one of our own (a mailbox or staff domain)")


def _find_org(conn: sqlite3.Connection, name: str) -> store.Organisation:
    org = store.find_organisation(conn, name.strip())
    if org is None:
        raise CliError(f"no organisation '{name}'")
    return org


def _sender_key(address: str | None, domain: str | None, *, at_domain: bool = False) -> str:
    """The senders row an ADDRESS or --domain argument names ("@domain" for a domain).

    Only with `at_domain` does an ADDRESS "@domain" name a domain: authorising a whole
    domain must always be asked for by name (--domain).
    """
    if (address is None) == (domain is None):
        raise CliError("give either an ADDRESS or --domain DOMAIN")
    if domain is not None:
        return "@" + valid_domain(domain)
    assert address is not None
    if at_domain and address.strip().startswith("@"):
        return "@" + valid_domain(address)
    return valid_address(address)


def _check_domain_grant(
    conn: sqlite3.Connection, address: str, org: store.Organisation
) -> str | None:
    """Why `org` may not be granted this "@domain", or None if it may."""
    domain = address[1:]
    if domain in org.domains:
        return None
    owner = store.organisation_for_domain(conn, domain)
    if owner is not None:
        return f"domain '{domain}' belongs to organisation '{owner.name}', not '{org.name}'"
    return (
        f"domain '{domain}' is not one of {org.name}'s domains "
        f"(add it first: gateway orgs update '{org.name}' --add-domain {domain})"
    )


def _domain_grant_warning(address: str, org: str) -> None:
    print(
        f"gateway: warning: every address at {address[1:]} is now authorised for {org}",
        file=sys.stderr,
    )


def _org_json(org: store.Organisation) -> dict[str, Any]:
    return {
        "name": org.name,
        "domains": list(org.domains),
        "unit": org.unit,
        "account_manager": org.account_manager,
        "senders": org.senders,
        "created_at": org.created_at,
    }


def cmd_orgs_add(config: Config, args: argparse.Namespace) -> int:
    name = _org_name(args.name)
    domains = list(dict.fromkeys(valid_domain(d) for d in args.domain))
    for domain in domains:
        _check_not_ours(config, domain)
    unit = _unit(config, args.unit) if args.unit is not None else None
    manager = valid_address(args.account_manager) if args.account_manager else None
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        existing = store.find_organisation(conn, name)
        if existing is not None:
            raise CliError(f"organisation '{existing.name}' exists")
        for domain in domains:
            owner = store.organisation_for_domain(conn, domain)
            if owner is not None:
                raise CliError(f"domain '{domain}' belongs to organisation '{owner.name}'")
        store.add_organisation(
            conn, name=name, domains=domains, unit=unit, account_manager=manager, now=now
        )
        _record(
            conn,
            args,
            now=now,
            action=EventAction.ORG_ADDED,
            subject=f"org:{name}",
            detail={"domains": domains, "unit": unit, "account_manager": manager},
        )
    print(f"added organisation {name} (domains: {', '.join(domains) or 'none'})")
    return 0


def cmd_orgs_list(config: Config, args: argparse.Namespace) -> int:
    with _admin_db(config) as conn:
        orgs = store.list_organisations(conn)
    if args.json:
        _print_json([_org_json(org) for org in orgs])
        return 0
    if not orgs:
        print("no organisations")
        return 0
    table = [
        (o.name, " ".join(o.domains), o.unit or "", o.account_manager or "", str(o.senders))
        for o in orgs
    ]
    _print_table(("NAME", "DOMAINS", "UNIT", "ACCOUNT MANAGER", "SENDERS"), table)
    return 0


def cmd_orgs_update(config: Config, args: argparse.Namespace) -> int:
    if not (args.add_domain or args.remove_domain) and (
        args.unit is None and args.account_manager is None
    ):
        raise CliError(
            "nothing to change: give --add-domain, --remove-domain, --unit or --account-manager"
        )
    added = list(dict.fromkeys(valid_domain(d) for d in args.add_domain))
    removed = list(dict.fromkeys(valid_domain(d) for d in args.remove_domain))
    for domain in added:
        _check_not_ours(config, domain)
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        org = _find_org(conn, args.name)
        changes: dict[str, Any] = {}
        for domain in added:
            owner = store.organisation_for_domain(conn, domain)
            if owner is not None and owner.id == org.id:
                raise CliError(f"domain '{domain}' is already one of {org.name}'s domains")
            if owner is not None:
                raise CliError(f"domain '{domain}' belongs to organisation '{owner.name}'")
            store.add_org_domain(conn, org.id, domain)
        for domain in removed:
            if store.find_sender(conn, f"@{domain}") is not None:
                raise CliError(
                    f"every address at {domain} is authorised: "
                    f"`gateway senders remove --domain {domain}` first"
                )
            if not store.remove_org_domain(conn, org.id, domain):
                raise CliError(f"domain '{domain}' is not one of {org.name}'s domains")
        if added:
            changes["domains_added"] = added
        if removed:
            changes["domains_removed"] = removed
        unit, manager = org.unit, org.account_manager
        if args.unit is not None:
            unit = _unit(config, args.unit)
        if args.account_manager is not None:
            manager = valid_address(args.account_manager) if args.account_manager else None
        if unit != org.unit:
            changes["unit"] = {"from": org.unit, "to": unit}
        if manager != org.account_manager:
            changes["account_manager"] = {"from": org.account_manager, "to": manager}
        if not changes:
            print(f"organisation {org.name} unchanged")
            return 0
        store.update_organisation(conn, org.id, unit=unit, account_manager=manager)
        _record(
            conn,
            args,
            now=now,
            action=EventAction.ORG_UPDATED,
            subject=f"org:{org.name}",
            detail=changes,
        )
    print(f"updated organisation {org.name}: {', '.join(changes)}")
    return 0


def cmd_orgs_remove(config: Config, args: argparse.Namespace) -> int:
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        org = _find_org(conn, args.name)
        tickets = store.count_organisation_tickets(conn, org.id)
        if tickets:
            raise CliError(
                f"organisation '{org.name}' has {tickets} ticket(s) and cannot be removed"
            )
        removed = store.remove_organisation(conn, org.id)
        for address in removed:
            _record(
                conn,
                args,
                now=now,
                action=EventAction.SENDER_REMOVED,
                subject=f"sender:{address}",
                detail={"organisation": org.name, "via": "orgs remove"},
            )
        _record(
            conn,
            args,
            now=now,
            action=EventAction.ORG_REMOVED,
            subject=f"org:{org.name}",
            detail={"domains": list(org.domains), "senders_removed": removed},
        )
    print(f"removed organisation {org.name} and {len(removed)} authorised sender(s)")
    return 0


def cmd_senders_add(config: Config, args: argparse.Namespace) -> int:
    address = _sender_key(args.address, args.domain)
    if not address.startswith("@") and match_mailbox(address, config.mailboxes) is not None:
        raise CliError(f"{address} is one of our own mailboxes")
    name = _display_name(args.name)
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        org = _find_org(conn, args.org)
        if address.startswith("@"):
            problem = _check_domain_grant(conn, address, org)
            if problem is not None:
                raise CliError(problem)
        existing = store.find_sender(conn, address)
        if existing is not None and existing.blocked:
            raise CliError(f"{address} is blocked; `gateway senders remove {address}` it first")
        if existing is not None and args.name is None:
            name = existing.name
        if existing is not None and (existing.organisation, existing.name) == (org.name, name):
            print(f"{address} is already authorised for {org.name}; nothing changed")
            return 0
        store.upsert_sender(conn, address=address, organisation=org.id, name=name, now=now)
        if existing is None:
            action, verb = EventAction.SENDER_ADDED, "authorised"
            detail: dict[str, Any] = {"organisation": org.name, "name": name}
        else:
            action, verb = EventAction.SENDER_UPDATED, "updated"
            detail = _sender_changes(existing, org.name, name)
        if address.startswith("@"):
            detail["domain"] = True
        _record(conn, args, now=now, action=action, subject=f"sender:{address}", detail=detail)
        owner = None
        if not address.startswith("@"):
            owner = store.organisation_for_domain(conn, address.rpartition("@")[2])
    print(f"{verb} {address} for {org.name}" + (f" ({name})" if name else ""))
    if address.startswith("@"):
        _domain_grant_warning(address, org.name)
    elif owner is not None and owner.id != org.id:
        print(
            f"gateway: note: {address.rpartition('@')[2]} is a domain of organisation "
            f"{owner.name}, not {org.name}",
            file=sys.stderr,
        )
    return 0


def _sender_changes(old: store.SenderEntry, org: str, name: str | None) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if old.organisation != org:
        changes["organisation"] = {"from": old.organisation, "to": org}
    if old.name != name:
        changes["name"] = {"from": old.name, "to": name}
    return changes


def cmd_senders_remove(config: Config, args: argparse.Namespace) -> int:
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        try:
            address = _sender_key(args.address, args.domain, at_domain=True)
        except CliError:
            # A row stored under rules that have since changed must stay removable.
            raw = (args.address or "").strip().lower()
            if not raw or args.domain is not None or store.find_sender(conn, raw) is None:
                raise
            address = raw
        existing = store.find_sender(conn, address)
        if existing is None or not store.remove_sender(conn, address):
            raise CliError(f"no sender '{address}'")
        _record(
            conn,
            args,
            now=now,
            action=EventAction.SENDER_REMOVED,
            subject=f"sender:{address}",
            detail={
                "organisation": existing.organisation,
                "name": existing.name,
                "blocked": existing.blocked,
            },
        )
    was = "blocked" if existing.blocked else "authorised"
    if existing.organisation:
        was += f" for {existing.organisation}"
    print(f"removed {address} (was {was})")
    return 0


def cmd_senders_block(config: Config, args: argparse.Namespace) -> int:
    address = valid_address(args.address)
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        existing = store.find_sender(conn, address)
        if existing is not None and existing.blocked:
            print(f"{address} is already blocked; nothing changed")
            return 0
        store.block_sender(conn, address, now=now)
        _record(
            conn,
            args,
            now=now,
            action=EventAction.SENDER_BLOCKED,
            subject=f"sender:{address}",
            detail={
                "organisation": existing.organisation if existing else None,
                "was": "authorised" if existing else "unknown",
            },
        )
    print(f"blocked {address}: all its mail is refused")
    return 0


def _sender_json(sender: store.SenderEntry) -> dict[str, Any]:
    return {
        "address": sender.address,
        "organisation": sender.organisation,
        "name": sender.name,
        "blocked": sender.blocked,
        "domain": sender.is_domain,
    }


def cmd_senders_list(config: Config, args: argparse.Namespace) -> int:
    with _admin_db(config) as conn:
        org_id = _find_org(conn, args.org).id if args.org is not None else None
        senders = store.list_senders(conn, organisation=org_id)
    if args.json:
        _print_json([_sender_json(s) for s in senders])
        return 0
    if not senders:
        print("no senders")
        return 0
    table = [
        (
            s.address,
            s.organisation or "",
            s.name or "",
            "blocked" if s.blocked else "whole domain" if s.is_domain else "authorised",
        )
        for s in senders
    ]
    _print_table(("ADDRESS", "ORGANISATION", "NAME", "STATUS"), table)
    return 0


@dataclass(frozen=True)
class _ImportRow:
    line: int  # physical line in the file, the header being line 1
    address: str  # normalised, or "@domain"
    org: str
    name: str | None


def cmd_senders_import(config: Config, args: argparse.Namespace) -> int:
    label, records = _read_csv(args.file)
    errors: list[tuple[int, str]] = []
    rows: list[_ImportRow] = []
    first_line: dict[str, int] = {}
    for line, record in records:
        try:
            row = _import_row(config, line, record)
        except CliError as exc:
            errors.append((line, str(exc)))
            continue
        if row.address in first_line:
            errors.append((line, f"{row.address} is already on line {first_line[row.address]}"))
            continue
        first_line[row.address] = line
        rows.append(row)
    now = _clock(args).stamp()
    added = updated = unchanged = 0
    granted: list[tuple[str, str]] = []  # the domain grants this import adds or changes
    with _admin_db(config, write=True) as conn:
        orgs: dict[str, store.Organisation] = {}
        plans: list[tuple[_ImportRow, store.Organisation, store.SenderEntry | None]] = []
        for row in rows:
            key = row.org.casefold()
            if key not in orgs:
                found = store.find_organisation(conn, row.org)
                if found is None:
                    errors.append((row.line, f"no organisation '{row.org}'"))
                    continue
                orgs[key] = found
            org = orgs[key]
            existing = store.find_sender(conn, row.address)
            if existing is not None and existing.blocked:
                errors.append((row.line, f"{row.address} is blocked"))
                continue
            if row.address.startswith("@"):
                problem = _check_domain_grant(conn, row.address, org)
                if problem is not None:
                    errors.append((row.line, problem))
                    continue
            plans.append((row, org, existing))
        if errors:
            errors.sort()
            for line, reason in errors[:_MAX_IMPORT_ERRORS]:
                print(f"gateway: {label}:{line}: {reason}", file=sys.stderr)
            if len(errors) > _MAX_IMPORT_ERRORS:
                more = len(errors) - _MAX_IMPORT_ERRORS
                print(f"gateway: {label}: ... and {more} more", file=sys.stderr)
            raise CliError(f"{label}: nothing imported ({len(errors)} bad row(s))")
        for row, org, existing in plans:
            if existing is not None and (existing.organisation, existing.name) == (
                org.name,
                row.name,
            ):
                unchanged += 1
                continue
            store.upsert_sender(
                conn, address=row.address, organisation=org.id, name=row.name, now=now
            )
            detail: dict[str, Any] = {"via": "import", "file": label, "line": row.line}
            if existing is None:
                added += 1
                action = EventAction.SENDER_ADDED
                detail.update(organisation=org.name, name=row.name)
            else:
                updated += 1
                action = EventAction.SENDER_UPDATED
                detail.update(_sender_changes(existing, org.name, row.name))
            _record(
                conn, args, now=now, action=action, subject=f"sender:{row.address}", detail=detail
            )
            if row.address.startswith("@"):
                granted.append((row.address, org.name))
        if added or updated:
            _record(
                conn,
                args,
                now=now,
                action=EventAction.SENDERS_IMPORTED,
                subject="senders",
                detail={"file": label, "added": added, "updated": updated, "unchanged": unchanged},
            )
    for address, org_name in granted:
        _domain_grant_warning(address, org_name)
    print(f"imported {label}: {added} added, {updated} updated, {unchanged} unchanged")
    return 0


def _read_csv(file: str) -> tuple[str, list[tuple[int, list[str]]]]:
    """The records of a senders CSV file after its header, each with its first line number."""
    if file == "-":
        label, data = "<stdin>", sys.stdin.buffer.read()
    else:
        label = file
        try:
            data = Path(file).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {file}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not data
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CliError(f"{label}:{line}: not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for record in reader:
            records.append((start, record))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise CliError(f"{label}:{start}: {exc}") from None
    header = tuple(cell.strip() for cell in records[0][1]) if records else ()
    if header != SENDERS_CSV_HEADER:
        raise CliError(f"{label}:1: the header must be exactly {','.join(SENDERS_CSV_HEADER)}")
    return label, [(line, r) for line, r in records[1:] if any(cell.strip() for cell in r)]


def _import_row(config: Config, line: int, record: list[str]) -> _ImportRow:
    if len(record) not in (2, 3):
        raise CliError(f"expected 3 fields ({','.join(SENDERS_CSV_HEADER)}), found {len(record)}")
    address_text, org = record[0].strip(), record[1].strip()
    if address_text.startswith("@"):
        address = "@" + valid_domain(address_text)
    else:
        address = valid_address(address_text)
        if match_mailbox(address, config.mailboxes) is not None:
            raise CliError(f"{address} is one of our own mailboxes")
    if not org:
        raise CliError("the org field is empty")
    name = _display_name(record[2] if len(record) == 3 else None)
    return _ImportRow(line, address, org, name)


def cmd_senders_export(config: Config, args: argparse.Namespace) -> int:
    with _admin_db(config) as conn:
        senders = store.list_senders(conn)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(SENDERS_CSV_HEADER)
    blocked = 0
    for sender in senders:
        if sender.blocked or sender.organisation is None:
            blocked += sender.blocked
            continue
        writer.writerow((sender.address, sender.organisation, sender.name or ""))
    sys.stdout.flush()
    if blocked:
        # The file format has no column for a block: say what it leaves out.
        print(
            f"gateway: note: {blocked} blocked address(es) not exported (`senders list`)",
            file=sys.stderr,
        )
    return 0


def _detail_text(detail: dict[str, Any]) -> str:
    # The reason first: the column is cut at the table's width, and "why" matters most.
    ordered = sorted(detail.items(), key=lambda item: item[0] != "reason")
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in ordered)


def cmd_events(config: Config, args: argparse.Namespace) -> int:
    limit = args.limit
    if limit is None and not args.json:
        limit = _EVENTS_TABLE_LIMIT
    with _admin_db(config) as conn:
        events = store.list_events(conn, ticket=args.ticket, limit=limit)
    if args.json:
        _print_json(events)
        return 0
    if not events:
        print("no events")
        return 0
    table = [
        (
            e["time"][:19].replace("T", " "),
            e["actor"],
            e["action"],
            e["subject"],
            _detail_text(e["detail"]),
        )
        for e in events
    ]
    _print_table(("TIME (UTC)", "ACTOR", "ACTION", "SUBJECT", "DETAIL"), table)
    if args.limit is None and len(events) == limit:
        print(f"(the newest {limit}; --limit N for more)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
