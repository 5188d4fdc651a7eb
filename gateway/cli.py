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
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

from . import __version__, businesstime, scheduler, store
from .actions import ActionError
from .actions import oncall as oncall_actions
from .actions import outbox as outbox_actions
from .actions import quarantine as quarantine_actions
from .actions import senders as sender_actions
from .actions import tickets as ticket_actions
from .actions.senders import printable, valid_address, valid_domain
from .address import parse_sender
from .clock import Clock, FixedClock, iso
from .config import (
    Config,
    ConfigError,
    check_writable,
    config_path,
    config_warnings,
    load_config,
)
from .model import MessageKind
from .notify import Planner
from .render import TemplateError, Templates
from .store import messages as store_messages
from .store import oncall as store_oncall
from .store.connection import DatabaseMissing, connect_existing
from .tickets import Status

# A user-facing error: printed as `gateway: <message>`, exit 1 (an action's error is one).
CliError = ActionError


def main(argv: Sequence[str] | None = None, *, clock: Clock | None = None) -> int:
    """Run one command; `clock` (the one this command stamps with) is for tests."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.clock = clock or Clock()
    _operator.set(args.operator)
    standalone: Callable[[argparse.Namespace], int] | None = getattr(args, "standalone", None)
    if standalone is not None:  # generated from the parser: needs no configuration
        return standalone(args)
    try:
        config = load_config(config_path(args.config))
        handler: Callable[[Config, argparse.Namespace], int] = args.handler
        args.database_path = config.database_path
        return _run_paged(handler, config, args)
    except DatabaseMissing as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
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
        print(f"gateway: database error: {_database_problem(args, exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `gateway messages list | head`
        return 0
    except KeyboardInterrupt:
        return 130  # 128 + SIGINT, as a shell reports it
    except OSError as exc:
        # A file the command had to read or write: name it, never a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"gateway: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # A bug of ours: still one line (exit 1); GATEWAY_DEBUG=1 shows the traceback.
        if os.environ.get("GATEWAY_DEBUG"):
            raise
        print(
            f"gateway: internal error: {type(exc).__name__}: {exc} "
            "(GATEWAY_DEBUG=1 shows where; please report it)",
            file=sys.stderr,
        )
        return 1


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
    parser.add_argument(
        "--as",
        dest="operator",
        metavar="ADDRESS",
        help="who runs this command, for the audit trail (default: $GATEWAY_OPERATOR, "
        "else $SUDO_USER, else the login name)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the SMTP/LMTP daemon in the foreground")
    serve.set_defaults(handler=cmd_serve)

    check = commands.add_parser("check-config", help="validate the configuration and exit")
    check.add_argument("--json", action="store_true", help="machine-readable output")
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
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=cmd_messages_show)

    tickets = commands.add_parser("tickets", help="the desk's tickets")
    tickets_sub = tickets.add_subparsers(dest="action", required=True, metavar="ACTION")
    tlist = tickets_sub.add_parser("list", help="tickets, most recently updated first")
    tlist.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    tlist.add_argument("--unit", help="only this unit")
    tlist.add_argument("--owner", metavar="ADDRESS", help="only this staff member's")
    tlist.add_argument(
        "--unassigned", action="store_true", help="only tickets waiting on us with no owner"
    )
    tlist.add_argument("--overdue", action="store_true", help="only tickets past their due time")
    tlist.add_argument(
        "--due-before", metavar="WHEN", help="only tickets due before WHEN (2h, tomorrow, ...)"
    )
    tlist.add_argument("--organisation", metavar="NAME", help="only this organisation's")
    tlist.add_argument("--urgent", action="store_true", help="only urgent tickets")
    tlist.add_argument(
        "--upset", action="store_true", help="only tickets whose client reads as upset"
    )
    tlist.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help=f"show at most N (default {_TICKETS_TABLE_LIMIT} on a terminal; --json: all)",
    )
    tlist.add_argument("--json", action="store_true", help="machine-readable output")
    tlist.set_defaults(handler=cmd_tickets_list)
    tassign = tickets_sub.add_parser("assign", help="give a ticket an owner (a staff address)")
    tassign.add_argument("number", type=_ticket_number, help="the ticket number")
    tassign.add_argument("address", nargs="?", metavar="ADDRESS", help="the new owner")
    tassign.add_argument("--none", action="store_true", help="leave the ticket without owner")
    tassign.set_defaults(handler=cmd_tickets_assign)
    tcommit = tickets_sub.add_parser("commit", help="promise the client's next update by WHEN")
    tcommit.add_argument("number", type=_ticket_number, help="the ticket number")
    tcommit.add_argument("when", metavar="WHEN", help="2h, 1d, tomorrow, friday, 2026-12-01T15:00")
    tcommit.add_argument("--note", metavar="TEXT", help="what was promised (kept with it)")
    tcommit.add_argument("--json", action="store_true", help="machine-readable output")
    tcommit.set_defaults(handler=cmd_tickets_commit)
    desk = commands.add_parser("desk", help="per unit: open, unassigned, overdue, due today")
    desk.add_argument("--unit", metavar="U", help="only this unit")
    desk.add_argument("--json", action="store_true", help="machine-readable output")
    desk.set_defaults(handler=cmd_desk)
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
        "--status",
        choices=[s.value for s in Status],
        help="the status afterwards (pending; open with --next)",
    )
    treply.add_argument(
        "--next", dest="next_when", metavar="WHEN", help="promise the next update by WHEN"
    )
    treply.set_defaults(handler=cmd_tickets_reply)
    tstatus = tickets_sub.add_parser("status", help="change a ticket's status")
    tstatus.add_argument("number", type=_ticket_number, help="the ticket number")
    tstatus.add_argument("status", choices=[s.value for s in Status])
    tstatus.add_argument("--reason", help="why (kept in the audit trail)")
    tstatus.set_defaults(handler=cmd_tickets_status)
    tpriority = tickets_sub.add_parser("priority", help="mark a ticket urgent, or normal again")
    tpriority.add_argument("number", type=_ticket_number, help="the ticket number")
    tpriority.add_argument("priority", choices=["urgent", "normal"])
    tpriority.set_defaults(handler=cmd_tickets_priority)
    tcalm = tickets_sub.add_parser("calm", help="clear a ticket's upset mark")
    tcalm.add_argument("number", type=_ticket_number, help="the ticket number")
    tcalm.set_defaults(handler=cmd_tickets_calm)
    add_search_command(tickets_sub)
    add_quarantine_commands(commands)
    add_admin_commands(commands)
    add_outbox_commands(commands)
    add_scheduler_commands(commands)
    add_oncall_ack_command(add_oncall_commands(commands))
    add_status_command(commands)
    add_backup_commands(commands)
    add_polish_commands(commands)
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

    logs.configure(config.log.level, syslog_prefix=config.log.syslog_prefix)
    return app.serve(config)


def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    # The templates are part of the configuration: a typo must stop a deploy here, not
    # the daemon's start (or a client's mail).
    Templates(config.templates_path).check()
    # Every folder the daemon writes (database, outbox), as this user: run it as the
    # service user (the unit's ExecStartPre= does) for an answer that holds for serve.
    check_writable(config)
    if args.json:
        _print_json(_check_config_json(config))
        return 0
    mailboxes = ", ".join(f"{m.address} ({m.unit})" for m in config.mailboxes)
    print(f"{config.path}: ok")
    print(f"  listen    {config.smtp.protocol} on {config.smtp.host}:{config.smtp.port}")
    print(f"  database  {config.database_path}")
    if config.delivery.mode == "directory":
        print(f"  outbox    {config.outbox_path}")
    print(f"  mailboxes {mailboxes}")
    print(f"  tls       {'STARTTLS offered' if config.smtp.tls_enabled else 'off'}")
    print(f"  templates {config.templates_path} (checked)")
    for warning in config_warnings(config):
        print(f"gateway: WARNING: {warning}", file=sys.stderr)
    for warning in _rota_warnings(config):
        print(f"gateway: WARNING: {warning}", file=sys.stderr)
    return 0


def _rota_warnings(config: Config) -> list[str]:
    """On-call addresses on the rota (now or later) that are not staff (issue 12): they are
    paged but cannot acknowledge by mail. Read only if the database exists already."""
    if not config.database_path.exists():
        return []
    with closing(open_db(config)) as conn:
        found = conn.execute(
            "SELECT DISTINCT address FROM oncall_shifts WHERE ends_at > ? ORDER BY address",
            (Clock().stamp(),),
        ).fetchall()
    return [
        f"on-call address {row[0]} (gateway oncall list) is not a staff address: it is "
        "paged, but cannot acknowledge a page by mail"
        for row in found
        if not config.is_staff(row[0])
    ]


def cmd_messages_list(config: Config, args: argparse.Namespace) -> int:
    with _read_db(config) as conn:
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
    with _read_db(config) as conn:
        raw = store.read_raw(conn, args.id)
        rows = [r for r in store.list_messages(conn) if r["id"] == args.id] if raw else []
        purged = store_messages.purged_at(conn, args.id) if raw is None else None
    if when := purged:
        raise CliError(f"message {args.id} was purged on {when[:10]} (retention)")
    if raw is None or not rows:
        raise CliError(f"no message with id {args.id}")
    if args.json:
        if args.raw:
            raise CliError("--raw and --json: choose one")
        _print_json(rows[0])
        return 0
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
    value = _windowed(value)
    json.dump(value, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")


# Rows `tickets list` prints on a terminal unless told (--limit); --json lists all.
_TICKETS_TABLE_LIMIT = 50


def _local(config: Config, unit: str, stamp: str | None) -> str:
    """A stored UTC stamp as the unit's local time, for tables."""
    if not stamp:
        return ""
    moment = config.unit(unit).hours.local(datetime.fromisoformat(stamp))
    return moment.strftime("%Y-%m-%d %H:%M")


def cmd_tickets_list(config: Config, args: argparse.Namespace) -> int:
    now = _clock(args).now()
    due_before = None
    if args.due_before is not None:
        # WHEN is read in the listed unit's zone (else the first mailbox's unit).
        unit = config.unit(args.unit or config.mailboxes[0].unit)
        try:
            due_before = iso(businesstime.when(args.due_before, now, unit.hours))
        except businesstime.BusinessTimeError as exc:
            raise CliError(f"--due-before: {exc}") from None
    owner = None
    if args.owner is not None:
        owner = parse_sender(args.owner)
        if owner is None:
            raise CliError(f"--owner: {args.owner!r} is not an address")
    limit = args.limit
    if limit is None and not args.json and sys.stdout.isatty():
        limit = _TICKETS_TABLE_LIMIT
    with _read_db(config) as conn:
        tickets = store.list_tickets(
            conn,
            now=iso(now),
            status=args.status,
            unit=args.unit,
            owner=owner,
            unassigned=args.unassigned,
            overdue=args.overdue,
            due_before=due_before,
            organisation=args.organisation,
            urgent=args.urgent,
            upset=args.upset,
            limit=limit,
        )
    if args.json:
        _print_json(tickets)
        return 0
    if not tickets:
        print("no tickets")
        return 0
    table = [
        (
            f"#{t['number']}",
            t["status"]
            + (" URGENT" if t["priority"] == "urgent" else "")
            + (" OVERDUE" if t["overdue"] else "")
            + (" UPSET" if t["upset"] else ""),
            t["unit"],
            t["owner"] or "-",
            _local(config, t["unit"], t["next_update_due"]) or "-",
            t["requester"],
            str(t["message_count"]),
            t["updated_at"][:16].replace("T", " "),
            t["subject"],
        )
        for t in tickets
    ]
    header = ("TICKET", "STATUS", "UNIT", "OWNER", "DUE (LOCAL)", "REQUESTER", "MSGS", "UPDATED")
    _print_table((*header, "SUBJECT"), table)
    return 0


def cmd_tickets_assign(config: Config, args: argparse.Namespace) -> int:
    if args.none == (args.address is not None):
        raise CliError("name the new owner (ADDRESS) or --none, not both")
    owner = None
    if args.address is not None:
        owner = parse_sender(args.address)
        if owner is None:
            raise CliError(f"{args.address!r} is not an address")
    with closing(open_db(config)) as conn, store.write_transaction(conn):
        old = ticket_actions.assign(
            conn,
            _planner(config, conn),
            ticket=args.number,
            owner=owner,
            actor=cli_actor(),
            now=_clock(args).stamp(),
        )
    if old == owner:
        print(f"#{args.number} is already {'unowned' if owner is None else owner + chr(39) + 's'}")
    else:
        print(f"#{args.number}: owner {old or '-'} -> {owner or '-'}")
    return 0


def cmd_tickets_commit(config: Config, args: argparse.Namespace) -> int:
    actor = cli_actor()
    with closing(open_db(config)) as conn, store.write_transaction(conn):
        due = ticket_actions.commit(
            conn,
            _planner(config, conn),
            ticket=args.number,
            when_text=args.when,
            note=args.note,
            set_by=actor,
            actor=actor,
            now=_clock(args).stamp(),
        )
        unit = store.ticket_desk_info(conn, args.number)
    if args.json:
        _print_json({"ticket": args.number, "next_update_due": due})
        return 0
    where = unit["unit"] if unit else config.mailboxes[0].unit
    print(f"#{args.number}: next update due {_local(config, where, due)} ({where} time)")
    return 0


def cmd_desk(config: Config, args: argparse.Namespace) -> int:
    now = _clock(args).now()
    with _read_db(config) as conn:
        names = (
            [args.unit]
            if args.unit
            else list(dict.fromkeys([*(u.name for u in config.units), *store.ticket_units(conn)]))
        )
        desks: list[dict[str, Any]] = []
        for name in names:
            hours = config.unit(name).hours
            today = hours.local(now).date()
            # The end of the unit's business day (or of the local day when it is closed).
            if hours.is_business_day(today):
                end = hours.end_of_day(today)
            else:
                end = datetime.combine(today, time(23, 59, 59), hours.zone).astimezone(UTC)
            counts = store.desk_counts(conn, unit=name, now=iso(now), end_of_today=iso(end))
            # Who is paged for this unit now (issue 12): the rota, else the secondary.
            cover = _on_call_now(config, conn, name, iso(now))
            desks.append(
                {
                    "unit": name,
                    **counts,
                    "on_call": cover.addresses,
                    "on_call_rota": cover.from_rota,
                }
            )
    if args.json:
        _print_json(desks)
        return 0
    table = [
        (
            str(d["unit"]),
            str(d["open"]),
            str(d["unassigned"]),
            str(d["overdue"]),
            str(d["due_today"]),
            str(d["waiting_on_client"]),
            str(d["urgent"]),
            str(d["upset"]),
            ", ".join(d["on_call"])
            + ("" if d["on_call_rota"] or not d["on_call"] else " (secondary)")
            or "no one",
        )
        for d in desks
    ]
    header = ("UNIT", "OPEN", "UNASSIGNED", "OVERDUE", "DUE TODAY", "WAITING ON CLIENT")
    _print_table((*header, "URGENT", "UPSET", "ON CALL"), table)
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
    with closing(open_db(config)) as conn, store.write_transaction(conn):
        wrote = ticket_actions.staff_wrote(
            conn,
            _planner(config, conn),
            ticket=args.number,
            text=body,
            staff=sender,
            actor=cli_actor(),
            now=_clock(args).stamp(),
            status=args.status,
            next_when=args.next_when,
        )
    promised = f"; next update due {wrote.due}" if wrote.due else ""
    if wrote.kind is MessageKind.NOTE:
        print(f"note added to #{args.number}{promised}")
    else:
        print(f"reply to #{args.number} queued; status {wrote.status}{promised}")
    return 0


def cmd_tickets_status(config: Config, args: argparse.Namespace) -> int:
    with closing(open_db(config)) as conn, store.write_transaction(conn):
        changed = ticket_actions.set_status(
            conn,
            _planner(config, conn),
            ticket=args.number,
            status=args.status,
            actor=cli_actor(),
            now=_clock(args).stamp(),
            reason=args.reason,
        )
    if not changed.changed:
        print(f"#{args.number} is already {args.status}")
        return 0
    why_not = changed.why_not
    told = "the client is told" if why_not is None else f"no mail to the client ({why_not})"
    print(f"#{args.number}: {changed.old} -> {args.status}; {told}")
    return 0


def cmd_tickets_priority(config: Config, args: argparse.Namespace) -> int:
    with closing(open_db(config)) as conn, store.write_transaction(conn):
        changed = ticket_actions.set_priority(
            conn,
            _planner(config, conn),
            ticket=args.number,
            priority=args.priority,
            actor=cli_actor(),
            now=_clock(args).stamp(),
        )
    print(f"#{args.number}: {'now' if changed else 'already'} {args.priority}")
    return 0


def cmd_tickets_calm(config: Config, args: argparse.Namespace) -> int:
    with closing(open_db(config)) as conn, store.write_transaction(conn):
        was_upset = ticket_actions.calm(
            conn, ticket=args.number, actor=cli_actor(), now=_clock(args).stamp()
        )
    print(f"#{args.number}: " + ("calmed" if was_upset else "not upset"))
    return 0


def cmd_tickets_show(config: Config, args: argparse.Namespace) -> int:
    with _read_db(config) as conn:
        ticket = store.show_ticket(conn, args.number, now=_clock(args).stamp())
    if ticket is None:
        raise CliError(f"no ticket #{args.number}")
    if args.json:
        _print_json(ticket)
        return 0
    tag = config.tickets.tag.replace("{number}", str(ticket["number"]))
    print(f"{tag} {printable(ticket['subject'])}")
    print(f"status {ticket['status']}, unit {ticket['unit']}, requester {ticket['requester']}")
    due = _local(config, ticket["unit"], ticket["next_update_due"])
    late = " (OVERDUE)" if ticket["overdue"] else ""
    print(f"owner {ticket['owner'] or '-'}, next update due {due or '-'}{late}")
    print(f"opened {ticket['created_at'][:16]}, updated {ticket['updated_at'][:16]}")
    if ticket["priority"] == "urgent":
        print(f"URGENT: {', '.join(ticket['urgency_reasons']) or '-'}")
    if ticket["follows"]:
        print(f"follows up #{ticket['follows']}")
    with closing(open_db(config)) as conn:
        purged = {m["id"]: store_messages.purged_at(conn, m["id"]) for m in ticket["messages"]}
    for message in ticket["messages"]:
        print()
        arrow = "<-" if message["direction"] == "in" else "->"
        sender = printable(message["from"] or "")
        print(f"{arrow} [{message['kind']}] {sender}  {printable(message['date'] or '')}")
        if when := purged[message["id"]]:
            print(f"   (purged on {when[:10]})")
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
    qshow.add_argument("--json", action="store_true", help="machine-readable output")
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


# The person `--as` named for this command (set by main; None: not given).
_operator: ContextVar[str | None] = ContextVar("gateway_operator", default=None)


def operator_name(flag: str | None, environ: Mapping[str, str]) -> str:
    """Who runs a command (issue 13): `--as ADDRESS`, else $GATEWAY_OPERATOR, else
    $SUDO_USER (the person behind `sudo -u gateway`, not the service account), else the
    login name. The first one given and not blank wins; one with a control character or
    white space is refused, so the audit trail cannot be forged with a line break."""
    sources = (
        ("--as", flag),
        ("$GATEWAY_OPERATOR", environ.get("GATEWAY_OPERATOR")),
        ("$SUDO_USER", environ.get("SUDO_USER")),
    )
    for source, value in sources:
        if value is None or not value.strip():
            continue
        value = value.strip()
        if any(c.isspace() or not c.isprintable() for c in value) or len(value) > 254:
            raise CliError(f"{source}: not a usable name for the audit trail: {value!r}")
        return value
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid:{os.getuid()}"


def cli_actor() -> str:
    """Who runs this command, for the audit trail: cli:<person> (see operator_name)."""
    return f"cli:{operator_name(_operator.get(), os.environ)}"


def cmd_quarantine_list(config: Config, args: argparse.Namespace) -> int:
    with _read_db(config) as conn:
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
    with _read_db(config) as conn:
        row = store.held_message(conn, args.id)
    if row is None:
        raise CliError(f"no quarantine entry {args.id}")
    if row["raw"] is None:  # expired or past retention: the row and reasons stay
        print(f"quarantine {row['quarantine_id']} ({row['status']}), held {row['held_at'][:19]}")
        print(f"reasons:   {', '.join(json.loads(row['held_reasons']))}")
        print(f"purged on {(row['purged_at'] or '')[:10]}")
        return 0
    parsed = quarantine_actions.parse_held(config, bytes(row["raw"]))
    if args.json:
        _print_json(_held_json(row, parsed))
        return 0
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
    with closing(open_db(config)) as conn:
        released = quarantine_actions.release(
            config,
            conn,
            args.id,
            actor=cli_actor(),
            now=_clock(args).stamp(),
            authorise=args.authorise,
            reason=args.reason,
        )
    if released.authorised:
        print(f"authorised {released.authorised}")
    where = f"ticket #{released.ticket}" if released.ticket else "no ticket"
    print(f"released quarantine entry {released.quarantine_id}: filed to {where}")
    return 0


def cmd_quarantine_discard(config: Config, args: argparse.Namespace) -> int:
    with closing(open_db(config)) as conn:
        blocked = quarantine_actions.discard(
            conn,
            args.id,
            actor=cli_actor(),
            now=_clock(args).stamp(),
            reason=args.reason,
            block=args.block,
        )
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
        row = outbox_actions.retry(conn, args.id, actor=cli_actor(), now=now, reason=args.reason)
    print(f"outbox row {args.id} to {row['to']} is due now: the daemon sends it at its next poll")
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    rows = _windowed(rows)
    widths = [min(60, max([len(h), *(len(r[i]) for r in rows)])) for i, h in enumerate(header)]
    if sys.stdout.isatty():  # on a terminal, lines fit its width (never when piped)
        widths = _fit_widths(widths)

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
SENDERS_CSV_HEADER = sender_actions.CSV_FIELDS
# Bad rows `senders import` names before giving up on a file.
_MAX_IMPORT_ERRORS = 50
# Events the table shows when no --limit is given (--json shows all).
_EVENTS_TABLE_LIMIT = 100


# --- scheduler run (issue 11) --------------------------------------------------------------


def add_scheduler_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    scheduler_cmd = commands.add_parser("scheduler", help="reminders, escalations, digests")
    sub = scheduler_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    srun = sub.add_parser(
        "run",
        help="run one pass of reminders, escalations and digests, as if at --now",
    )
    srun.add_argument(
        "--now",
        type=_moment,
        metavar="ISO",
        help="the moment to run as, ISO 8601 with an offset (default: now)",
    )
    srun.add_argument(
        "--dry-run", action="store_true", help="show what would be sent; write nothing"
    )
    srun.add_argument("--json", action="store_true", help="machine-readable output")
    srun.set_defaults(handler=cmd_scheduler_run)


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date and time: {text!r}") from None
    if moment.tzinfo is None:
        # A bare local time names a different instant in every unit's zone.
        raise argparse.ArgumentTypeError(f"give the offset too (e.g. {text}+00:00)")
    return moment


def cmd_scheduler_run(config: Config, args: argparse.Namespace) -> int:
    # The one clock, fixed at --now: everything the pass stamps is stamped as of then.
    clock = FixedClock(args.now) if args.now is not None else _clock(args)
    now = clock.now()
    with _admin_db(config, create=True) as conn:
        done = scheduler.run_pass(config, conn, now, dry_run=args.dry_run)
    if args.json:
        _print_json(
            {
                "now": iso(now),
                "dry_run": args.dry_run,
                "actions": [d.to_json() for d in done],
            }
        )
        return 0
    if not done:
        print(f"nothing due at {iso(now)}")
    for d in done:
        print(d.describe(args.dry_run))
    return 0


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
    oadd.add_argument(
        "--out-of-hours",
        action="store_true",
        help="it has out-of-hours cover: its urgent mail pages the person on call",
    )
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
    oupdate.add_argument(
        "--out-of-hours",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="out-of-hours cover on (or, --no-out-of-hours, off)",
    )
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
    sblock = senders_sub.add_parser(
        "block", help="refuse all mail from an address (or, with --domain, a whole domain)"
    )
    sblock.add_argument("address", nargs="?", metavar="ADDRESS")
    sblock.add_argument("--domain", metavar="DOMAIN", help="refuse mail from every address at it")
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
def _admin_db(
    config: Config, *, write: bool = False, create: bool = False
) -> Iterator[sqlite3.Connection]:
    """The database for one command; with `write`, one transaction committed at the end.
    Without `write` or `create` it must exist: a read never creates an empty desk."""
    try:
        opened = open_db(config) if write or create else _open_existing(config)
        with closing(opened) as conn:
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
        "out_of_hours": org.out_of_hours,
    }


def _our_domains(config: Config, domains: list[str]) -> None:
    for domain in domains:
        sender_actions.check_not_ours(config.mailboxes, config.staff.domains, domain)


def cmd_orgs_add(config: Config, args: argparse.Namespace) -> int:
    name = sender_actions.org_name(args.name)
    domains = list(dict.fromkeys(valid_domain(d) for d in args.domain))
    _our_domains(config, domains)
    unit = sender_actions.unit(config.mailboxes, args.unit) if args.unit is not None else None
    manager = valid_address(args.account_manager) if args.account_manager else None
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        sender_actions.add_org(
            conn,
            name=name,
            domains=domains,
            unit=unit,
            account_manager=manager,
            actor=cli_actor(),
            now=now,
            reason=args.reason,
            out_of_hours=args.out_of_hours,
        )
    cover = ", out-of-hours cover" if args.out_of_hours else ""
    print(f"added organisation {name} (domains: {', '.join(domains) or 'none'}{cover})")
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
        (
            o.name,
            " ".join(o.domains),
            o.unit or "",
            o.account_manager or "",
            str(o.senders),
            "yes" if o.out_of_hours else "no",
        )
        for o in orgs
    ]
    header = ("NAME", "DOMAINS", "UNIT", "ACCOUNT MANAGER", "SENDERS", "OUT OF HOURS")
    _print_table(header, table)
    return 0


def cmd_orgs_update(config: Config, args: argparse.Namespace) -> int:
    if not (args.add_domain or args.remove_domain) and (
        args.unit is None and args.account_manager is None and args.out_of_hours is None
    ):
        raise CliError(
            "nothing to change: give --add-domain, --remove-domain, --unit, "
            "--account-manager or --out-of-hours/--no-out-of-hours"
        )
    added = list(dict.fromkeys(valid_domain(d) for d in args.add_domain))
    removed = list(dict.fromkeys(valid_domain(d) for d in args.remove_domain))
    _our_domains(config, added)
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        org, changes = sender_actions.update_org(
            conn,
            name=args.name,
            add_domains=added,
            remove_domains=removed,
            mailboxes=config.mailboxes,
            unit_text=args.unit,
            account_manager_text=args.account_manager,
            actor=cli_actor(),
            now=now,
            reason=args.reason,
            out_of_hours=args.out_of_hours,
        )
    if not changes:
        print(f"organisation {org.name} unchanged")
        return 0
    print(f"updated organisation {org.name}: {', '.join(changes)}")
    return 0


def cmd_orgs_remove(config: Config, args: argparse.Namespace) -> int:
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        org, removed = sender_actions.remove_org(
            conn, name=args.name, actor=cli_actor(), now=now, reason=args.reason
        )
    print(f"removed organisation {org.name} and {len(removed)} authorised sender(s)")
    return 0


def cmd_senders_add(config: Config, args: argparse.Namespace) -> int:
    address = sender_actions.sender_key(args.address, args.domain)
    sender_actions.check_not_own_mailbox(config.mailboxes, address)
    name = sender_actions.display_name(args.name)
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        org = sender_actions.find_org(conn, args.org)
        state, name = sender_actions.authorise(
            conn,
            address=address,
            org=org,
            name=name,
            keep_name=args.name is None,
            mailboxes=config.mailboxes,
            source=sender_actions.Source("senders add"),
            actor=cli_actor(),
            now=now,
            reason=args.reason,
        )
        owner = None
        if not address.startswith("@"):
            owner = store.organisation_for_domain(conn, address.rpartition("@")[2])
    if state is sender_actions.Authorised.UNCHANGED:
        print(f"{address} is already authorised for {org.name}; nothing changed")
        return 0
    verb = "authorised" if state is sender_actions.Authorised.ADDED else "updated"
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


def cmd_senders_remove(config: Config, args: argparse.Namespace) -> int:
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        address, existing = sender_actions.remove(
            conn,
            address=args.address,
            domain=args.domain,
            actor=cli_actor(),
            now=now,
            reason=args.reason,
        )
    was = "blocked" if existing.blocked else "authorised"
    if existing.organisation:
        was += f" for {existing.organisation}"
    print(f"removed {address} (was {was})")
    return 0


def cmd_senders_block(config: Config, args: argparse.Namespace) -> int:
    address = sender_actions.sender_key(args.address, args.domain)
    if args.domain is not None:
        # Our own domain blocked would refuse our staff and our own mail.
        _our_domains(config, [address[1:]])
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        blocked = sender_actions.block(
            conn,
            address=address,
            via="senders block",
            actor=cli_actor(),
            now=now,
            reason=args.reason,
        )
    if not blocked:
        print(f"{address} is already blocked; nothing changed")
        return 0
    if address.startswith("@"):
        print(f"blocked every address at {address[1:]}: all their mail is refused")
        return 0
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
        org_id = sender_actions.find_org(conn, args.org).id if args.org is not None else None
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


def cmd_senders_import(config: Config, args: argparse.Namespace) -> int:
    label, records = _read_csv(args.file)
    errors: list[tuple[int, str]] = []
    rows: list[sender_actions.ImportRow] = []
    first_line: dict[str, int] = {}
    for line, record in records:
        try:
            row = sender_actions.import_row(config.mailboxes, line, record)
        except ActionError as exc:
            errors.append((line, str(exc)))
            continue
        if row.address in first_line:
            errors.append((line, f"{row.address} is already on line {first_line[row.address]}"))
            continue
        first_line[row.address] = line
        rows.append(row)
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        try:
            imported = sender_actions.import_senders(
                conn,
                label=label,
                rows=rows,
                errors=errors,
                mailboxes=config.mailboxes,
                actor=cli_actor(),
                now=now,
                reason=args.reason,
            )
        except sender_actions.ImportRefused as refused:
            for line, reason in refused.errors[:_MAX_IMPORT_ERRORS]:
                print(f"gateway: {label}:{line}: {reason}", file=sys.stderr)
            if len(refused.errors) > _MAX_IMPORT_ERRORS:
                more = len(refused.errors) - _MAX_IMPORT_ERRORS
                print(f"gateway: {label}: ... and {more} more", file=sys.stderr)
            raise
    for address, org_name in imported.granted:
        _domain_grant_warning(address, org_name)
    added, updated, unchanged = imported.added, imported.updated, imported.unchanged
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


# --- the on-call rota (issue 12) ------------------------------------------------------------
#
# Times are read in the unit's zone (the desk's default, the first mailbox's unit, for the
# desk-wide rota) unless they carry an offset, and shown in it; JSON carries UTC.


def add_oncall_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """`oncall add/list/remove/now/import`; returns the subcommands so that paging's
    `oncall ack` is one more `sub.add_parser(...)` block (see the end of this function)."""
    oncall = commands.add_parser("oncall", help="the on-call rota: who is paged out of hours")
    sub = oncall.add_subparsers(dest="action", required=True, metavar="ACTION")
    oadd = sub.add_parser("add", help="put ADDRESS on call from --from until --until")
    oadd.add_argument("address", metavar="ADDRESS", help="who is paged (a staff address)")
    oadd.add_argument("--from", dest="starts", required=True, metavar="ISO", help=_ONCALL_ISO)
    oadd.add_argument("--until", dest="ends", required=True, metavar="ISO", help=_ONCALL_ISO)
    oadd.add_argument("--unit", metavar="U", help="for this unit only (default: the whole desk)")
    oadd.set_defaults(handler=cmd_oncall_add)
    olist = sub.add_parser("list", help="current and future shifts, by start time")
    olist.add_argument("--unit", metavar="U", help="only this unit's own shifts")
    olist.add_argument("--all", action="store_true", help="past shifts too")
    olist.add_argument("--json", action="store_true", help="machine-readable output (UTC)")
    olist.set_defaults(handler=cmd_oncall_list)
    oremove = sub.add_parser("remove", help="remove a shift (its ID from `oncall list`)")
    oremove.add_argument("id", type=_positive_int, metavar="ID")
    oremove.set_defaults(handler=cmd_oncall_remove)
    onow = sub.add_parser("now", help="who is on call now, per unit (else the secondary)")
    onow.add_argument("--unit", metavar="U", help="only this unit")
    onow.add_argument("--json", action="store_true", help="machine-readable output")
    onow.set_defaults(handler=cmd_oncall_now)
    oimport = sub.add_parser(
        "import", help="shifts from an iCalendar (.ics) file; a re-import replaces them"
    )
    oimport.add_argument("file", metavar="FILE", help="the .ics file; - for stdin")
    oimport.add_argument("--unit", metavar="U", help="for this unit only (default: the whole desk)")
    oimport.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="A",
        help="import only the shifts of this address (repeatable); a SUMMARY also names "
        "it by its local part",
    )
    oimport.set_defaults(handler=cmd_oncall_import)
    return sub


_ONCALL_ISO = "ISO 8601 date-time; without an offset, in the unit's zone"


def _oncall_zone_unit(config: Config, unit: str | None) -> str:
    """The unit whose zone a shift's times are read and shown in."""
    return unit if unit is not None else config.mailboxes[0].unit


def _oncall_local(config: Config, unit: str | None, stamp: str) -> str:
    hours = config.unit(_oncall_zone_unit(config, unit)).hours
    return hours.local(datetime.fromisoformat(stamp)).strftime("%Y-%m-%d %H:%M %Z")


def cmd_oncall_add(config: Config, args: argparse.Namespace) -> int:
    unit = oncall_actions.known_unit(config.units, args.unit)
    address = oncall_actions.rota_address(args.address)
    zone = config.unit(_oncall_zone_unit(config, unit)).hours.zone
    starts = oncall_actions.parse_moment(args.starts, zone, "--from")
    ends = oncall_actions.parse_moment(args.ends, zone, "--until")
    with _admin_db(config, write=True) as conn:
        shift = oncall_actions.add(
            conn,
            mailboxes=config.mailboxes,
            address=address,
            unit=unit,
            starts=starts,
            ends=ends,
            actor=cli_actor(),
            now=_clock(args).stamp(),
        )
    where = unit or "the whole desk"
    print(
        f"shift {shift.id}: {address} on call for {where} from "
        f"{_oncall_local(config, unit, shift.starts_at)} until "
        f"{_oncall_local(config, unit, shift.ends_at)}"
    )
    if not config.is_staff(address):
        print(
            f"gateway: note: {address} is not a staff address ([staff] or a unit's staff)",
            file=sys.stderr,
        )
    return 0


def cmd_oncall_list(config: Config, args: argparse.Namespace) -> int:
    unit = oncall_actions.known_unit(config.units, args.unit)
    with _admin_db(config) as conn:
        shifts = store_oncall.list_shifts(
            conn, ending_after=None if args.all else _clock(args).stamp(), unit=unit
        )
    if args.json:
        _print_json([oncall_actions.shift_json(s) for s in shifts])
        return 0
    if not shifts:
        print("no shifts" if args.all else "no current or future shifts (--all for past ones)")
        return 0
    table = [
        (
            str(s.id),
            s.address,
            s.unit or "(desk)",
            _oncall_local(config, s.unit, s.starts_at),
            _oncall_local(config, s.unit, s.ends_at),
            s.source,
        )
        for s in shifts
    ]
    _print_table(("ID", "ADDRESS", "UNIT", "FROM (LOCAL)", "UNTIL (LOCAL)", "SOURCE"), table)
    return 0


def cmd_oncall_remove(config: Config, args: argparse.Namespace) -> int:
    with _admin_db(config, write=True) as conn:
        shift = oncall_actions.remove(
            conn, shift_id=args.id, actor=cli_actor(), now=_clock(args).stamp()
        )
    print(f"removed shift {shift.id} ({shift.address}, {shift.unit or 'the whole desk'})")
    return 0


def _on_call_now(
    config: Config, conn: sqlite3.Connection, unit: str, now: str
) -> oncall_actions.OnCall:
    secondary = oncall_actions.secondary_for(config.unit(unit), config.oncall.secondary)
    return oncall_actions.who_is_on_call(conn, unit=unit, secondary=secondary, at=now)


def cmd_oncall_now(config: Config, args: argparse.Namespace) -> int:
    unit = oncall_actions.known_unit(config.units, args.unit)
    names = [unit] if unit is not None else [u.name for u in config.units]
    now = _clock(args).stamp()
    with _admin_db(config) as conn:
        found = [_on_call_now(config, conn, name, now) for name in names]
    if args.json:
        _print_json([o.to_json() for o in found])
        return 0
    table = [
        (
            str(o.unit),
            o.describe(),
            ", ".join(
                f"{s.address} until {_oncall_local(config, o.unit, s.ends_at)}"
                + ("" if s.unit else " (desk-wide)")
                for s in o.shifts
            )
            or "-",
        )
        for o in found
    ]
    _print_table(("UNIT", "ON CALL", "SHIFTS"), table)
    return 0


def cmd_oncall_import(config: Config, args: argparse.Namespace) -> int:
    unit = oncall_actions.known_unit(config.units, args.unit)
    wanted = [oncall_actions.rota_address(a) for a in args.address]
    if args.file == "-":
        label, data = "<stdin>", sys.stdin.buffer.read()
    else:
        label = args.file
        try:
            data = Path(args.file).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
    zone = config.unit(_oncall_zone_unit(config, unit)).hours.zone
    now = _clock(args).now()
    try:
        read = oncall_actions.read_calendar(data, zone=zone, wanted=wanted, now=now)
    except ActionError as exc:
        raise CliError(f"{label}: {exc}; nothing was imported") from None
    try:
        with _admin_db(config, write=True) as conn:
            imported = oncall_actions.import_shifts(
                conn,
                mailboxes=config.mailboxes,
                read=read,
                file=label,
                unit=unit,
                actor=cli_actor(),
                now=iso(now),
            )
    except ActionError as exc:
        raise CliError(f"{label}: {exc}; nothing was imported") from None
    print(
        f"imported {label} for {unit or 'the whole desk'}: {imported.added} shift(s) from "
        f"{len(read.uids)} event(s), {imported.replaced} replaced"
    )
    skipped = [
        (len(read.unnamed), "name no one on call"),
        (read.past, "ended before now"),
        (read.cancelled, "are cancelled"),
    ]
    for count, why in skipped:
        if count:
            print(f"gateway: note: {count} event(s) {why}: not imported", file=sys.stderr)
    return 0


# --- issue 12: acknowledging a page ------------------------------------------------------


def add_oncall_ack_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`oncall ack NUMBER`, in the `oncall` group of add_oncall_commands."""
    ack = sub.add_parser("ack", help="acknowledge the pages of an urgent ticket")
    ack.add_argument("number", type=_ticket_number, help="the ticket number")
    ack.set_defaults(handler=cmd_oncall_ack)


def cmd_oncall_ack(config: Config, args: argparse.Namespace) -> int:
    from .actions import paging

    actor = cli_actor()
    with closing(open_db(config)) as conn, store.write_transaction(conn):
        if store.ticket_desk_info(conn, args.number) is None:
            raise CliError(f"no ticket #{args.number}")
        steps = paging.acknowledge(
            conn, ticket=args.number, by=actor, how="cli", actor=actor, now=_clock(args).stamp()
        )
    if not steps:
        print(f"#{args.number}: no page waiting for acknowledgement")
    else:
        print(f"#{args.number}: acknowledged (steps {', '.join(map(str, steps))})")
    return 0


# --- status (issue 13) ---------------------------------------------------------------------


def add_status_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser(
        "status",
        help="is the daemon up, and the desk's health; exit 1 when down or the outbox is stuck",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)


def _daemon_state(config: Config, now: datetime) -> dict[str, Any]:
    """The daemon's status file (see app._write_status): up when the file names a live
    process and was refreshed within three status intervals (a hung daemon stops
    refreshing it)."""
    path = config.status_path
    try:
        data = json.loads(path.read_text())
        pid = int(data["pid"])
        updated = datetime.fromisoformat(data["updated_at"])
    except FileNotFoundError:
        return {"running": False, "why": f"no status file {path} (not running)"}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {"running": False, "why": f"{path}: unreadable status file: {exc}"}
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return {"running": False, "why": f"process {pid} is gone", "pid": pid}
    except PermissionError:
        pass  # alive, under another user (the service account)
    age = (now - updated).total_seconds()
    if age > 3 * config.metrics.status_interval:
        return {"running": False, "why": f"status not refreshed for {age:.0f} s", "pid": pid}
    return {
        "running": True,
        "pid": pid,
        "started_at": data.get("started_at"),
        "updated_at": data.get("updated_at"),
        "listen": data.get("listen"),
    }


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    from .metrics import health, open_read_only  # the daemon's imports

    now = _clock(args).now()
    path = config.database_path
    if not path.exists():
        raise CliError(f"{path}: no database (never created; is storage.database right?)")
    daemon = _daemon_state(config, now)
    conn = open_read_only(path)
    try:
        found = health(conn, now)
    finally:
        conn.close()
    age = found["outbox_oldest_age_seconds"]
    stuck = age is not None and age > config.metrics.stuck_after
    problems = [] if daemon["running"] else [f"daemon down: {daemon['why']}"]
    if stuck:
        problems.append(
            f"outbox stuck: oldest queued mail waits {age:.0f} s "
            f"(> metrics.stuck_after {config.metrics.stuck_after} s)"
        )
    if args.json:
        _print_json(
            {"daemon": daemon, **found, "outbox_stuck": stuck, "ok": not problems, "now": iso(now)}
        )
        return 1 if problems else 0
    overdue = ", ".join(f"{u} {n}" for u, n in found["overdue_by_unit"].items()) or "none"
    up = f"up since {daemon['started_at']} (pid {daemon['pid']})" if daemon["running"] else "DOWN"
    lines = [
        ("daemon", up),
        ("messages today", str(found["messages_today"])),
        ("quarantine", f"{found['quarantine_held']} held"),
        (
            "outbox",
            f"{found['outbox_waiting']} waiting, {found['outbox_failed']} failed, oldest "
            f"{found['outbox_oldest_queued_at'] or '-'}",
        ),
        ("overdue tickets", overdue),
        ("last commit", found["last_message_at"] or "-"),
    ]
    for label, value in lines:
        print(f"{label + ':':17} {value}")
    for problem in problems:
        print(f"gateway: {problem}", file=sys.stderr)
    return 1 if problems else 0


# --- backup and restore (issue 13) ---


def add_backup_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bk = commands.add_parser(
        "backup", help="copy the live database (the daemon may run) into a new folder"
    )
    bk.add_argument("path", metavar="PATH", help="a folder that does not exist or is empty")
    bk.set_defaults(handler=cmd_backup)
    rs = commands.add_parser("restore", help="put a backup back (the daemon must be stopped)")
    rs.add_argument("path", metavar="PATH", help="a folder written by `gateway backup`")
    rs.set_defaults(handler=cmd_restore)


def cmd_backup(config: Config, args: argparse.Namespace) -> int:
    from . import backup

    made = backup.backup(config, Path(args.path), now=_clock(args).stamp())
    print(f"backup of {config.database_path} written to {args.path}: {made.summary()}")
    return 0


def cmd_restore(config: Config, args: argparse.Namespace) -> int:
    from . import backup

    restored = backup.restore(config, Path(args.path), actor=cli_actor(), now=_clock(args).stamp())
    if restored.moved_aside is not None:
        print(f"the database that was there is kept as {restored.moved_aside}")
    print(f"restored {config.database_path} from {args.path}: {restored.summary()}")
    return 0


# --- issue 13 item 7: an admin CLI that does not surprise -------------------------------------
#
# Reads never create the database; every failure is one line naming the path or key (exit
# 1; argparse's usage errors exit 2); lists page on a terminal and fit its width; `senders
# show`, `orgs show`, `senders unblock` and domain blocks; shell completion and a man page
# generated from this parser, so they list every command whoever adds it.

# Shells `gateway completion` writes a script for (shtab's).
COMPLETION_SHELLS = ("bash", "zsh")
# The pager for long output on a terminal when $PAGER is unset, as git uses it: -F quits
# at once when the text fits the screen, -R passes colours, -X leaves the text on screen.
DEFAULT_PAGER = "less -FRX"
# Narrowest a table column is cut to when fitting the terminal: a letter and the ellipsis.
_MIN_COLUMN = 3
# Commands that only read and print lists or one record: paged on a terminal.
_PAGED_ACTIONS = frozenset({"list", "show"})
_PAGED_COMMANDS = frozenset({"events", "desk"})


def _open_existing(config: Config) -> sqlite3.Connection:
    return connect_existing(config.database_path, config.storage.busy_timeout_ms)


@contextmanager
def _read_db(config: Config) -> Iterator[sqlite3.Connection]:
    """The database of a read command: it must exist (DatabaseMissing otherwise)."""
    with closing(_open_existing(config)) as conn:
        yield conn


def _database_problem(args: argparse.Namespace, exc: Exception) -> str:
    """An SQLite error as one line that names the database file."""
    text = str(exc)
    path = getattr(args, "database_path", None)
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    if path is None or str(path) in text:
        return text
    if code in (store.SQLITE_BUSY, store.SQLITE_LOCKED):
        return f"{path}: the database is locked by another process; nothing was changed, try again"
    return f"{path}: {text}"


class _TerminalBuffer(io.StringIO):
    """Collects a command's output for the pager; tells the command it writes to a
    terminal, as it finally does (a table then fits the terminal's width)."""

    def isatty(self) -> bool:
        return True


def _is_paged(args: argparse.Namespace) -> bool:
    if getattr(args, "json", False) or getattr(args, "raw", False):
        return False
    if args.command not in _PAGED_COMMANDS and getattr(args, "action", None) not in _PAGED_ACTIONS:
        return False
    return sys.stdout.isatty()


def _run_paged(
    handler: Callable[[Config, argparse.Namespace], int], config: Config, args: argparse.Namespace
) -> int:
    """Run a command; a list on a terminal goes through $PAGER when it is longer than
    the screen. Piped output and --json are never paged nor cut."""
    global _WINDOW
    _WINDOW = _window(args)
    try:
        if not _is_paged(args):
            return handler(config, args)
        buffer = _TerminalBuffer()
        real, sys.stdout = sys.stdout, buffer
        try:
            code = handler(config, args)
        finally:
            sys.stdout = real
            _page(buffer.getvalue())
        return code
    finally:
        _WINDOW = None


# The rows a list shows, as a slice (--offset/--limit), while a list command runs: applied
# where every list is printed (_print_table, _print_json), so each list command pages
# alike, whether its store query takes a limit or not.
_WINDOW: tuple[int, int | None] | None = None


def _window(args: argparse.Namespace) -> tuple[int, int | None] | None:
    if not hasattr(args, "offset"):
        return None
    offset: int = args.offset
    limit: int | None = args.limit
    if limit is None and offset and not getattr(args, "json", False):
        # The table's own default page, counted from the offset.
        if args.command == "events":
            limit = _EVENTS_TABLE_LIMIT
        elif args.command == "tickets" and sys.stdout.isatty():
            limit = _TICKETS_TABLE_LIMIT
    if not offset and limit is None:
        return None
    if limit is not None:
        args.limit = offset + limit  # a store query with a limit fetches the skipped rows too
    return offset, None if limit is None else offset + limit


def _windowed(rows: Any) -> Any:
    if _WINDOW is None or not isinstance(rows, list):
        return rows
    start, stop = _WINDOW
    return rows[start:stop]


def _add_list_paging(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """--offset N on every list (and --limit N where a list lacks it)."""

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
        try:
            sub = _subcommands(parser)
        except LookupError:
            if words[-1] != "list" and words != ["events"]:
                return
            options = {o for a in parser._actions for o in a.option_strings}
            if "--limit" not in options:
                parser.add_argument(
                    "--limit", type=_positive_int, metavar="N", help="show at most N"
                )
            if "--offset" not in options:
                parser.add_argument(
                    "--offset",
                    type=_offset,
                    default=0,
                    metavar="N",
                    help="skip the first N (with --limit: one page after another)",
                )
            return
        for name, child in sub.choices.items():
            walk(child, [*words, name])

    for name, parser in commands.choices.items():
        walk(parser, [name])


def _offset(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _page(text: str) -> None:
    lines = shutil.get_terminal_size().lines
    pager = os.environ.get("PAGER", DEFAULT_PAGER).strip()
    if not text or text.count("\n") < lines - 1 or pager in ("", "cat"):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    # Through the shell, as git and man run $PAGER: it may hold options ("less -S").
    try:
        done = subprocess.run(pager, shell=True, input=text.encode(), check=False)
    except OSError:
        done = None
    if done is None or done.returncode in (126, 127):  # the pager could not run
        sys.stdout.write(text)
        sys.stdout.flush()


def _fit_widths(widths: list[int]) -> list[int]:
    """Column widths cut (widest first) so that a table line fits the terminal."""
    columns = shutil.get_terminal_size().columns
    fitted = list(widths)
    while sum(fitted) + 2 * (len(fitted) - 1) > columns:
        widest = max(range(len(fitted)), key=lambda i: fitted[i])
        if fitted[widest] <= _MIN_COLUMN:
            break  # a terminal this narrow gets what fits least badly
        fitted[widest] -= 1
    return fitted


def _check_config_json(config: Config) -> dict[str, Any]:
    """check-config --json: what it checked, the resolved paths by key, the warnings."""
    return {
        "config": str(config.path),
        "ok": True,
        "listen": {
            "protocol": config.smtp.protocol,
            "host": config.smtp.host,
            "port": config.smtp.port,
        },
        "mailboxes": [{"address": m.address, "unit": m.unit} for m in config.mailboxes],
        "tls": config.smtp.tls_enabled,
        "paths": {
            "storage.database": str(config.database_path),
            "templates.directory": str(config.templates_path),
            "delivery.directory": str(config.outbox_path),
            "smtp.tls_cert": str(config.resolve(config.smtp.tls_cert))
            if config.smtp.tls_cert
            else None,
            "smtp.tls_key": str(config.resolve(config.smtp.tls_key))
            if config.smtp.tls_key
            else None,
        },
        "warnings": config_warnings(config),
    }


def _held_json(row: Any, parsed: Any) -> dict[str, Any]:
    return {
        "id": row["quarantine_id"],
        "status": row["status"],
        "held_at": row["held_at"],
        "reasons": json.loads(row["held_reasons"]),
        "mail_from": row["mail_from"],
        "rcpt_to": json.loads(row["rcpt_to"]),
        "peer": row["peer"],
        "helo": row["helo"],
        "headers": [[name, value] for name, value in parsed.headers],
        "text": parsed.reply_text or parsed.text,
    }


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError(f"{parser.prog} has no subcommands")


def add_polish_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`senders unblock|show`, `orgs show`, `completion`, `manpage`."""
    senders_sub = _subcommands(commands.choices["senders"])
    sunblock = senders_sub.add_parser(
        "unblock", help="lift a block (a grant blocked later is authorised again)"
    )
    sunblock.add_argument("address", nargs="?", metavar="ADDRESS")
    sunblock.add_argument("--domain", metavar="DOMAIN", help="lift the block of a whole domain")
    _add_reason_option(sunblock)
    sunblock.set_defaults(handler=cmd_senders_unblock)
    sshow = senders_sub.add_parser(
        "show", help="one address: its grants, blocks and the last mail from it"
    )
    sshow.add_argument("address", metavar="ADDRESS")
    sshow.add_argument("--json", action="store_true", help="machine-readable output")
    sshow.set_defaults(handler=cmd_senders_show)

    orgs_sub = _subcommands(commands.choices["orgs"])
    oshow = orgs_sub.add_parser(
        "show", help="one organisation: domains, unit, senders, open tickets"
    )
    oshow.add_argument("name", metavar="NAME")
    oshow.add_argument("--json", action="store_true", help="machine-readable output")
    oshow.set_defaults(handler=cmd_orgs_show)

    completion = commands.add_parser(
        "completion", help="print a shell completion script (bash or zsh)"
    )
    completion.add_argument("shell", choices=COMPLETION_SHELLS)
    completion.set_defaults(standalone=cmd_completion)
    manpage = commands.add_parser("manpage", help="print the gateway(1) manual page (roff)")
    manpage.set_defaults(standalone=cmd_manpage)
    _add_list_paging(commands)


def cmd_senders_unblock(config: Config, args: argparse.Namespace) -> int:
    now = _clock(args).stamp()
    with _admin_db(config, write=True) as conn:
        key, authorised = sender_actions.unblock(
            conn,
            address=args.address,
            domain=args.domain,
            actor=cli_actor(),
            now=now,
            reason=args.reason,
        )
    print(f"unblocked {key}" + ("; authorised again as before" if authorised else ""))
    return 0


def cmd_senders_show(config: Config, args: argparse.Namespace) -> int:
    with _admin_db(config) as conn:
        view = sender_actions.sender_view(conn, args.address)
    if args.json:
        _print_json(view)
        return 0
    print(f"{view['address']}: {view['status']}")
    if view["domain_organisation"]:
        print(f"  domain of   {view['domain_organisation']}")
    for grant in view["grants"]:
        name = f" ({printable(grant['name'])})" if grant["name"] else ""
        what = "whole domain" if grant["domain"] else "address"
        print(f"  granted     {grant['address']} ({what}) for {grant['organisation']}{name}")
    for block in view["blocks"]:
        what = "whole domain" if block["domain"] else "address"
        print(f"  blocked     {block['address']} ({what}) since {block['since'][:16]}")
    last = view["last_mail"]
    if last is None:
        print("  last mail   none received")
    else:
        ticket = f"#{last['ticket']}" if last["ticket"] is not None else "no ticket"
        print(
            f"  last mail   {last['time'][:19].replace('T', ' ')} UTC, {ticket}, "
            f"{last['disposition']} (message {last['message']})"
        )
    return 0


def cmd_orgs_show(config: Config, args: argparse.Namespace) -> int:
    with _admin_db(config) as conn:
        view = sender_actions.org_view(conn, args.name)
    if args.json:
        _print_json(view)
        return 0
    print(view["name"])
    print(f"  domains          {' '.join(view['domains']) or '-'}")
    print(f"  unit             {view['unit'] or '-'}")
    print(f"  account manager  {view['account_manager'] or '-'}")
    print(f"  out of hours     {'yes' if view['out_of_hours'] else 'no'}")
    print(f"  open tickets     {view['open_tickets']}")
    print(f"  senders          {len(view['senders'])}")
    for sender in view["senders"]:
        state = "blocked" if sender["blocked"] else "whole domain" if sender["domain"] else ""
        name = printable(sender["name"] or "")
        print(f"    {sender['address']}  {name}  {state}".rstrip())
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab  # only this command needs it

    print(shtab.complete(build_parser(), shell=args.shell), end="")
    return 0


def cmd_manpage(args: argparse.Namespace) -> int:
    sys.stdout.write(manpage(build_parser()))
    return 0


def _roff(text: str) -> str:
    """Text safe in a roff line: backslashes escaped, no line taken for a request."""
    text = " ".join(text.split()).replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def manpage(parser: argparse.ArgumentParser) -> str:
    """gateway(1) in roff (man(7) macros), generated from the parser: every command."""
    out = [
        f'.TH GATEWAY 1 "" "gateway {__version__}" "User Commands"',
        ".SH NAME",
        f"gateway \\- {_roff(parser.description or '')}",
        ".SH SYNOPSIS",
        ".B gateway",
        "[\\fB\\-\\-config\\fR \\fIPATH\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        _roff(__doc__.split("\n\n", 1)[1] if __doc__ else ""),
        ".SH OPTIONS",
    ]
    out += _roff_options(parser)
    out.append(".SH COMMANDS")

    def walk(p: argparse.ArgumentParser, words: list[str], help_text: str) -> None:
        try:
            sub = _subcommands(p)
        except LookupError:
            usage = p.format_usage().removeprefix("usage: ").strip()
            out.append(f'.SS "{_roff(" ".join(words))}"')
            out.append(_roff(help_text))
            out.append(".PP")
            out.append(f"\\fB{_roff(usage)}\\fR")
            out.extend(_roff_options(p))
            return
        helps = {a.dest: a.help or "" for a in sub._choices_actions}
        for name, child in sub.choices.items():
            walk(child, [*words, name], helps.get(name, ""))

    walk(parser, ["gateway"], "")
    out += [
        ".SH EXIT STATUS",
        "0 on success; 1 with a one\\-line message on standard error naming what is wrong "
        "(a path, a key, a record); 2 for a usage error (an unknown option, a missing "
        "argument), as argparse reports it.",
        ".SH ENVIRONMENT",
        ".TP",
        ".B GATEWAY_CONFIG",
        "the configuration file when \\fB\\-\\-config\\fR is not given (else ./config.toml)",
        ".TP",
        ".B PAGER",
        f"the pager for long lists on a terminal (default \\fB{_roff(DEFAULT_PAGER)}\\fR)",
        ".TP",
        ".B GATEWAY_DEBUG",
        "set to show the Python traceback of an internal error",
        ".SH SEE ALSO",
        "The README of the gateway project: configuration reference and command reference.",
    ]
    return "\n".join(out) + "\n"


def _roff_options(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings)
            if action.nargs != 0:
                metavar = action.metavar or action.dest.upper()
                if isinstance(metavar, tuple):
                    metavar = " ".join(metavar)
                names += f" \\fI{_roff(metavar)}\\fR"
        else:
            names = f"\\fI{_roff(str(action.metavar or action.dest))}\\fR"
        lines += [".TP", names, _roff(action.help or "")]
    return lines


# --- tickets search (issue 14) -------------------------------------------------------------

# Tickets `tickets search` shows unless told (--limit).
_SEARCH_LIMIT = 20


def add_search_command(tickets_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tsearch = tickets_sub.add_parser(
        "search",
        help="full-text search of filed mail (subject, sender, text), best tickets first",
        description='QUERY is FTS5 syntax: words (all must match), "a phrase", prefix*, '
        "AND, OR, NOT and parentheses; subject: or text: limits a word to that field.",
    )
    tsearch.add_argument("query", metavar="QUERY", help='e.g. printer, "on fire", print*')
    tsearch.add_argument("--org", metavar="NAME", help="only this organisation's tickets")
    tsearch.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    tsearch.add_argument(
        "--limit",
        type=_positive_int,
        default=_SEARCH_LIMIT,
        metavar="N",
        help=f"show at most N tickets (default {_SEARCH_LIMIT})",
    )
    tsearch.add_argument("--json", action="store_true", help="machine-readable output")
    tsearch.set_defaults(handler=cmd_tickets_search)


def cmd_tickets_search(config: Config, args: argparse.Namespace) -> int:
    from .store import search  # only this command needs it

    if not args.query.strip():
        raise CliError("the search query is empty")
    with closing(open_db(config)) as conn:
        org_id = sender_actions.find_org(conn, args.org).id if args.org is not None else None
        try:
            hits = search.search(
                conn, args.query, organisation=org_id, status=args.status, limit=args.limit
            )
        except search.SearchQueryError as exc:
            raise CliError(
                f"not a valid search query: {args.query!r} ({exc}); use words, "
                '"a phrase", prefix*, AND, OR, NOT and parentheses'
            ) from None
        done = search.backfill_pending(conn)
    if done is not None:
        # On stderr: --json output stays one document.
        print(
            f"gateway: index incomplete: {done:.0%} of the older mail is indexed yet; "
            "results may miss older tickets",
            file=sys.stderr,
        )
    if args.json:
        _print_json([hit.to_json() for hit in hits])
        return 0
    if not hits:
        print("no tickets match")
        return 0
    for hit in hits:
        org = f", {hit.organisation}" if hit.organisation else ""
        print(f"#{hit.number} [{hit.status}{org}] {printable(hit.subject)}")
        print(f"   {printable(' '.join(hit.snippet.split()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
