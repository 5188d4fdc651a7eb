"""The `gateway` console script: serve, check-config, and the admin commands.

Every command exits 0 on success and 1 with a message that says what is wrong (on stderr);
`--json` output goes to stdout alone, so scripts can parse it. Commands read and write the
same SQLite database as the daemon; they never talk to the running daemon.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from typing import Any

from . import __version__, store
from .config import Config, ConfigError, config_path, load_config
from .tickets import Status


class CliError(Exception):
    """A user-facing error: printed as `gateway: <message>`, exit 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(config_path(args.config))
        handler: Callable[[Config, argparse.Namespace], int] = args.handler
        return handler(config, args)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
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
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {value}")
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
    mailboxes = ", ".join(f"{m.address} ({m.unit})" for m in config.mailboxes)
    print(f"{config.path}: ok")
    print(f"  listen    {config.smtp.protocol} on {config.smtp.host}:{config.smtp.port}")
    print(f"  database  {config.database_path}")
    print(f"  mailboxes {mailboxes}")
    print(f"  tls       {'STARTTLS offered' if config.smtp.tls_enabled else 'off'}")
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


if __name__ == "__main__":
    sys.exit(main())
