"""A desk with years of history, and how fast it answers (issue 14, items 3 and 4).

Builds a realistic database through the store's own schema (`store.connect` migrates it,
then bulk `executemany` inserts in big transactions, `PRAGMA synchronous = OFF` during
the build only): organisations with domains and authorised senders, tickets over the
years (sizes skewed: most one or two messages, a few long threads; nearly all closed, the
recent ones new, open, pending, some overdue, urgent or upset), each inbound message with
small but real raw bytes and readable text, acknowledgements and staff replies as
outgoing mail with their outbox rows sent, commitments (met, and open ones for the open
tickets), the audit trail, and a quarantine of held, released, discarded and expired mail.
The search index is built at the end in one pass (`search.rebuild`).

With --measure it then times, on that database: the CLI commands an admin runs (through
`gateway.cli.main` in this process, after a warm-up, the median of --runs), with the
EXPLAIN QUERY PLAN of every SELECT they ran; one scheduler pass (dry run and real); and
intake CPU per message against an empty database (bench/intake.py's server and client).

    .venv/bin/python bench/preload.py --database /tmp/desk.db --measure
    .venv/bin/python bench/preload.py --tiny --database /tmp/tiny.db --measure
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import cli as gateway_cli  # noqa: E402
from gateway import store  # noqa: E402
from gateway.lookalike import skeleton  # noqa: E402
from gateway.store import connection as store_connection  # noqa: E402
from gateway.store import search  # noqa: E402

# The end of the history (the moment the measures run as): a Tuesday, business hours.
END = datetime(2026, 12, 1, 11, 0, tzinfo=UTC)
UNITS = ("support", "billing")
STAFF = ("bob@example.org", "carol@example.org", "dana@example.org", "erik@example.org")
# The bench's own client domain, authorised: intake measured on this database files mail.
BENCH_DOMAIN = "client.example.com"
BATCH = 20_000  # rows per executemany call; one transaction for the whole build

CONFIG = """
[smtp]
hostname = "support.example.org"

[storage]
database = "{database}"

[log]
level = "warning"

[[mailbox]]
address = "support@example.org"
unit = "support"

[[mailbox]]
address = "billing@example.org"
unit = "billing"

[[unit]]
name = "support"
staff = ["bob@example.org", "carol@example.org"]
lead = "lead@example.org"

[[unit]]
name = "billing"
staff = ["dana@example.org", "erik@example.org"]
lead = "lead@example.org"
"""

# Words of support mail, most common first (a Zipf-like draw favours the first ones).
VOCABULARY = (
    "the please printer invoice error login password account access server email vpn "
    "network slow update broken cannot since today again urgent help issue problem "
    "report screen laptop phone license renewal payment refund order delivery backup "
    "restore disk full crash meeting calendar share folder permission reset locked "
    "contract quote billing credit card expired certificate domain dns website down "
    "outage timeout sync mobile app install upgrade version windows linux mac office "
    "excel word teams zoom camera microphone headset monitor keyboard mouse dock toner "
    "paper jam scanner fax wifi router firewall proxy antivirus virus phishing spam "
    "attachment signature mailbox quota archive retention migration project deadline "
    "training onboarding offboarding user group role admin portal dashboard report "
    "export import database query api integration webhook token key secret audit "
    "compliance gdpr invoice statement balance overdue reminder discount tax vat "
    "address change cancel subscription plan seats storage bandwidth latency packet"
).split()
SUBJECTS = (
    "{a} not working",
    "Problem with {a} and {b}",
    "Question about our {a}",
    "{a} {b} broken since this morning",
    "Cannot {c} the {a}",
    "Request: new {a} for the team",
    "URGENT: {a} down",
    "Re: {a} {b}",
)
VERBS = ("open", "access", "reset", "update", "print", "find", "install", "renew")


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


class Desk:
    """Everything drawn for the build, deterministic for a seed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        weights = [1 / (rank + 1) for rank in range(len(VOCABULARY))]
        self.cum = list(_accumulate(weights))
        self.start = END - timedelta(days=365 * args.years)

    def words(self, count: int) -> str:
        return " ".join(self.rng.choices(VOCABULARY, cum_weights=self.cum, k=count))

    def subject(self) -> str:
        a, b = self.rng.choices(VOCABULARY, cum_weights=self.cum, k=2)
        return self.rng.choice(SUBJECTS).format(a=a, b=b, c=self.rng.choice(VERBS))


def _accumulate(values: Sequence[float]) -> Iterator[float]:
    total = 0.0
    for value in values:
        total += value
        yield total


def raw_message(
    sender: str, to: str, subject: str, text: str, message_id: str, when: datetime
) -> bytes:
    """Small but real RFC 5322 bytes, as a client's mail program writes them."""
    return (
        f"From: {sender.split('@')[0].title()} <{sender}>\r\n"
        f"To: {to}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n"
        f"Date: {when.strftime('%a, %d %b %Y %H:%M:%S +0000')}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"Hello,\r\n\r\n{text}\r\n\r\nRegards,\r\n{sender.split('@')[0].title()}\r\n"
    ).encode()


def ticket_sizes(desk: Desk, tickets: int, messages: int) -> list[int]:
    """Messages per ticket, at least 1, skewed (Pareto weights), summing to `messages`."""
    rng = desk.rng
    weights = [rng.paretovariate(1.3) for _ in range(tickets)]
    total = sum(weights)
    extra = messages - tickets
    sizes = [1 + int(extra * w / total) for w in weights]
    short = messages - sum(sizes)
    for i in rng.sample(range(tickets), min(tickets, max(0, short))):
        sizes[i] += 1
    return sizes


def build(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The database at `path` (a new file), built; returns the counts and the time."""
    started = time.perf_counter()
    desk = Desk(args)
    rng = desk.rng
    now = iso(desk.start)
    conn = store.connect(path)  # creates and migrates: the store's own schema
    conn.execute("PRAGMA synchronous = OFF")  # the build only; a crash means build again
    conn.execute("PRAGMA cache_size = -262144")  # 256 MB: the indexes stay in memory
    counts: dict[str, int] = {}
    with closing(conn), store.write_transaction(conn):
        # Organisations, their domains, authorised senders (and the bench's own domain).
        orgs = [(i, f"Org {i:03d}", UNITS[i % 2]) for i in range(1, args.orgs + 1)]
        conn.executemany(
            "INSERT INTO organisations (id, name, unit, account_manager, created_at) "
            "VALUES (?, ?, ?, 'am@example.org', ?)",
            [(i, name, unit, now) for i, name, unit in orgs],
        )
        conn.executemany(
            "INSERT INTO org_domains (domain, organisation) VALUES (?, ?)",
            [(f"org{i}.example.com", i) for i, _, _ in orgs],
        )
        bench_org = store.add_organisation(
            conn, name="Bench Clients", domains=[BENCH_DOMAIN], unit=None,
            account_manager=None, now=now,
        )  # fmt: skip
        store.upsert_sender(
            conn, address=f"@{BENCH_DOMAIN}", organisation=bench_org, name=None, now=now
        )
        senders = [
            (f"person{j}@org{1 + j % args.orgs}.example.com", 1 + j % args.orgs)
            for j in range(args.senders)
        ]
        conn.executemany(
            "INSERT INTO senders (address, organisation, name, blocked, skeleton, created_at) "
            "VALUES (?, ?, ?, 0, ?, ?)",
            [(a, o, a.split("@")[0].title(), skeleton(a), now) for a, o in senders],
        )
        # Who writes: a few senders write most of the mail (Pareto weights).
        sender_cum = list(_accumulate([rng.paretovariate(1.2) for _ in senders]))

        sizes = ticket_sizes(desk, args.tickets, args.messages)
        span = (END - desk.start).total_seconds()
        tickets, participants, messages, raws, outbox, events, commitments = (
            [],
            [],
            [],
            [],
            [],
            [],
            [],
        )
        message_id = 0
        event_id = 0

        def flush(final: bool = False) -> None:
            if final or len(messages) >= BATCH:
                conn.executemany(_TICKET_SQL, tickets)
                conn.executemany(
                    "INSERT OR IGNORE INTO participants (ticket, address) VALUES (?, ?)",
                    participants,
                )
                conn.executemany(_MESSAGE_SQL, messages)
                conn.executemany("INSERT INTO message_raw (message, raw) VALUES (?, ?)", raws)
                conn.executemany(_OUTBOX_SQL, outbox)
                conn.executemany(_EVENT_SQL, events)
                conn.executemany(_COMMITMENT_SQL, commitments)
                for rows in (tickets, participants, messages, raws, outbox, events, commitments):
                    rows.clear()

        # Tickets in time order; ticket n's messages spread over the days after it opened.
        opened = sorted(rng.random() for _ in range(args.tickets))
        for number, (fraction, size) in enumerate(zip(opened, sizes, strict=True), start=1):
            created = desk.start + timedelta(seconds=fraction * span)
            requester, org = rng.choices(senders, cum_weights=sender_cum)[0]
            unit = UNITS[org % 2]
            mailbox = f"{unit}@example.org"
            subject = desk.subject()
            age = (END - created).days
            status = (
                rng.choice(("new", "open", "open", "pending", "solved"))
                if age < 14
                else ("closed" if rng.random() < 0.97 else "solved")
            )
            waiting = status in ("new", "open")
            priority = "urgent" if rng.random() < 0.02 else "normal"
            upset = 1 if waiting and rng.random() < 0.05 else 0
            owner = rng.choice(STAFF) if status != "new" else None
            # Open tickets owe an update: some already overdue, most later today or soon.
            due = iso(END + timedelta(hours=rng.uniform(-30, 60))) if waiting else None
            moment = created
            last = created
            for position in range(size):
                message_id += 1
                if position:
                    moment = min(END, moment + timedelta(hours=rng.expovariate(1 / 20)))
                outgoing = position % 2 == 1  # acknowledgement or staff reply, then client
                text = desk.words(rng.randint(15, 60))
                msg_subject = subject if position == 0 else f"Re: [#{number}] {subject}"
                header_id = f"<{number}.{position}.{message_id}@{'example.org' if outgoing else requester.split('@')[1]}>"  # noqa: E501
                if outgoing:
                    sender = owner or STAFF[number % len(STAFF)]
                    kind = "staff"
                    raw = raw_message(sender, requester, msg_subject, text, header_id, moment)
                    outbox.append(
                        (message_id, number, "acknowledgement" if position == 1 else "staff-reply",
                         int(position == 1), mailbox if position > 1 else "", requester,
                         msg_subject, header_id, iso(moment), iso(moment), iso(moment))
                    )  # fmt: skip
                    via = "outgoing"
                else:
                    sender = requester
                    kind = "client"
                    raw = raw_message(sender, mailbox, msg_subject, text, header_id, moment)
                    via = "new" if position == 0 else rng.choice(("token", "references", "tag"))
                messages.append(
                    (message_id, f"pre{message_id}", iso(moment), sender, json.dumps([requester
                     if outgoing else mailbox]), "" if outgoing else "192.0.2.25",
                     "" if outgoing else "mx.client.example", len(raw),
                     hashlib.sha256(raw).hexdigest(), header_id, sender, msg_subject,
                     "out" if outgoing else "in", sender, "normal", kind, number, via, text)
                )  # fmt: skip
                raws.append((message_id, raw))
                event_id += 1
                events.append(
                    (event_id, iso(moment), sender, "ticket.created" if position == 0 else
                     "mail.queued" if outgoing else "ticket.replied", f"ticket:{number}",
                     number, json.dumps({"message": message_id}))
                )  # fmt: skip
                last = moment
            participants.append((number, requester))
            commitments.append(
                (number, iso(created + timedelta(hours=4)), "gateway", "met",
                 iso(created), iso(created + timedelta(hours=1)))
            )  # fmt: skip
            if due is not None:
                commitments.append((number, due, owner or "gateway", "open", iso(last), None))
            if status in ("solved", "closed"):
                event_id += 1
                events.append(
                    (event_id, iso(last), owner or "gateway", "ticket.status",
                     f"ticket:{number}", number, json.dumps({"old": "open", "new": status}))
                )  # fmt: skip
            tickets.append(
                (number, unit, requester, subject, status, priority, iso(created), iso(last),
                 org, mailbox, 1, owner, due, iso(last), upset)
            )  # fmt: skip
            flush()
        flush(final=True)

        # The quarantine: unknown senders' mail, mostly expired or discarded long ago.
        held = []
        for n in range(args.quarantine):
            message_id += 1
            moment = desk.start + timedelta(seconds=(n + 0.5) / args.quarantine * span)
            sender = f"stranger{rng.randrange(args.quarantine // 4 + 1)}@unknown{n % 97}.example"
            subject = desk.subject()
            text = desk.words(rng.randint(10, 40))
            header_id = f"<q{n}.{message_id}@unknown.example>"
            raw = raw_message(sender, "support@example.org", subject, text, header_id, moment)
            recent = (END - moment).days < 14
            state = "held" if recent else rng.choice(("expired", "expired", "discarded",
                                                      "released"))  # fmt: skip
            messages.append(
                (message_id, f"preq{message_id}", iso(moment), sender,
                 json.dumps(["support@example.org"]), "198.51.100.7", "mx.unknown.example",
                 len(raw), hashlib.sha256(raw).hexdigest(), header_id, sender, subject, "in",
                 sender, "normal", None, None, None, text)
            )  # fmt: skip
            raws.append((message_id, raw))
            held.append(
                (message_id, json.dumps(["unknown-sender"]), state, iso(moment),
                 None if state == "held" else iso(moment + timedelta(days=1)),
                 None if state == "held" else "gateway")
            )  # fmt: skip
            if len(messages) >= BATCH:
                flush(final=True)
        flush(final=True)
        conn.executemany(
            "INSERT INTO quarantine (message, reasons, status, held_at, decided_at, decided_by) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            held,
        )
        built = time.perf_counter()
        search.rebuild(conn)  # one pass over the filed mail, as the backfill would do
        indexed = time.perf_counter()
        counts = {
            "tickets": args.tickets,
            "messages": message_id,
            "quarantine": args.quarantine,
            "events": event_id,
        }
    conn2 = sqlite3.connect(path)
    conn2.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn2.execute("ANALYZE")  # what a long-running desk's `PRAGMA optimize` gives it
    conn2.close()
    size = path.stat().st_size
    return {
        **counts,
        "build_seconds": round(built - started, 1),
        "index_seconds": round(indexed - built, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "file_bytes": size,
        "bytes_per_message": round(size / max(1, message_id)),
    }


_TICKET_SQL = """
    INSERT INTO tickets (number, unit, requester, subject, status, priority, created_at,
                         updated_at, organisation, mailbox, acknowledged, owner,
                         next_update_due, last_public_update_at, upset)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_MESSAGE_SQL = """
    INSERT INTO messages (id, queue_id, received_at, mail_from, rcpt_to, peer, helo, size,
                          sha256, message_id, from_header, subject, direction, sender,
                          classification, kind, ticket, threaded_via, text)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_OUTBOX_SQL = """
    INSERT INTO outbox (message, ticket, kind, automatic, mail_from, rcpt_to, subject,
                        message_id, status, attempts, next_attempt_at, created_at, sent_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'sent', 1, ?, ?, ?)
"""
_EVENT_SQL = """
    INSERT INTO events (id, time, actor, action, subject, ticket, detail)
    VALUES (?, ?, ?, ?, ?, ?, ?)
"""
_COMMITMENT_SQL = """
    INSERT INTO commitments (ticket, due, set_by, state, created_at, closed_at)
    VALUES (?, ?, ?, ?, ?, ?)
"""


# --- the measures ------------------------------------------------------------------------


class Traced:
    """Every SELECT the CLI runs, captured from the connections it opens (to EXPLAIN)."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self._connect = store.connect

    def __enter__(self) -> Traced:
        def connect(*a: Any, **k: Any) -> sqlite3.Connection:
            conn = self._connect(*a, **k)
            conn.set_trace_callback(self._seen)
            return conn

        gateway_cli.store.connect = connect  # type: ignore[attr-defined]
        # Read commands open through connect_existing, which calls the module's connect.
        store_connection.connect = connect
        return self

    def _seen(self, sql: str) -> None:
        text = sql.strip()
        if text[:6].upper() in ("SELECT", "WITH  ") or text.upper().startswith("WITH"):
            self.statements.append(text)

    def __exit__(self, *exc: object) -> None:
        gateway_cli.store.connect = self._connect  # type: ignore[attr-defined]
        store_connection.connect = self._connect


def run_cli(config: Path, argv: Sequence[str], *, check: bool = True) -> tuple[int, float]:
    """One command through the CLI's entry; (exit status, ms). Without `check`, the
    open-time `PRAGMA quick_check` (which reads the whole file) is left out, to show what
    the command itself costs."""
    from gateway.store import connection

    out = io.StringIO()
    real_check = connection._check_integrity
    if not check:
        connection._check_integrity = lambda conn, path: None
    try:
        started = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = gateway_cli.main(["--config", str(config), *argv])
        return code, (time.perf_counter() - started) * 1000
    finally:
        connection._check_integrity = real_check


def plan(path: Path, sql: str) -> list[str]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return [str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]


def uses_index(lines: Sequence[str]) -> bool:
    """No full scan of a table: every SCAN goes through an index (or is the FTS5 table,
    a constant row, a subquery's result or a temporary b-tree)."""
    coroutines = {
        line.split()[1] for line in lines if line.startswith(("CO-ROUTINE ", "MATERIALIZE "))
    }
    for line in lines:
        if line.startswith("SCAN ") and line.split()[1] in coroutines:
            continue  # the rows of a subquery computed just before, not a table
        if line.startswith("SCAN ") and not any(
            part in line for part in ("USING INDEX", "USING COVERING INDEX", "VIRTUAL TABLE",
                                      "CONSTANT ROW", "SUBQUERY", "(")
        ):  # fmt: skip
            return False
    return True


def measure_cli(
    path: Path, config: Path, args: argparse.Namespace, say: Any
) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(path)) as conn:
        # A long ticket (many messages), an open one, an organisation with senders.
        long_ticket = conn.execute(
            "SELECT ticket FROM messages WHERE ticket IS NOT NULL GROUP BY ticket "
            "ORDER BY COUNT(*) DESC LIMIT 1"
        ).fetchone()[0]
    commands = [
        ("tickets list (first page)", ["tickets", "list", "--limit", "50"]),
        ("tickets list --status open", ["tickets", "list", "--status", "open", "--limit", "50"]),
        ("tickets show (longest)", ["tickets", "show", str(long_ticket)]),
        ("desk", ["desk"]),
        ("quarantine list", ["quarantine", "list"]),
        ("senders list --org", ["senders", "list", "--org", "Org 007"]),
        ("events --ticket N", ["events", "--ticket", str(long_ticket)]),
        ("tickets search (2 words)", ["tickets", "search", "printer toner"]),
        ("tickets search (phrase)", ["tickets", "search", '"paper jam"']),
        ("tickets search (prefix)", ["tickets", "search", "certif*", "--status", "open"]),
        ("tickets search --org", ["tickets", "search", "invoice", "--org", "Org 007"]),
    ]
    results = []
    for label, argv in commands:
        code, _ = run_cli(config, argv)  # warm-up: imports, page cache
        if code != 0:
            raise SystemExit(f"bench/preload: {label}: exit {code}")
        times = [run_cli(config, argv)[1] for _ in range(args.runs)]
        bare = [run_cli(config, argv, check=False)[1] for _ in range(args.runs)]
        with Traced() as traced:
            run_cli(config, argv)
        queries = [
            {"sql": " ".join(sql.split())[:160], "plan": plan(path, sql)}
            for sql in traced.statements
            # Not the FTS5 module's own reads of its shadow tables ('main'.'x_config').
            if "sqlite_schema" not in sql and "'main'." not in sql
        ]
        results.append(
            {
                "command": label,
                "argv": argv,
                "median_ms": round(statistics.median(times), 1),
                "median_ms_without_quick_check": round(statistics.median(bare), 1),
                "queries": queries,
                "all_indexed": all(uses_index(q["plan"]) for q in queries),
            }
        )
        say(
            f"  {label:<28} {statistics.median(times):8.1f} ms"
            f" ({statistics.median(bare):6.1f} ms without quick_check)"
            f"  {'indexed' if results[-1]['all_indexed'] else 'FULL SCAN'}"
        )
        if args.plans:
            for q in queries:
                say(f"      {q['sql']}")
                for line in q["plan"]:
                    say(f"        {line}")
    return results


def measure_open(path: Path, runs: int) -> float:
    """What every CLI command pays before its query: store.connect (quick_check)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        store.connect(path).close()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def measure_scheduler(config: Path) -> dict[str, float]:
    moment = END.isoformat()
    dry_argv = ["scheduler", "run", "--now", moment, "--dry-run"]
    _, dry = run_cli(config, dry_argv)
    _, dry_bare = run_cli(config, dry_argv, check=False)
    _, real = run_cli(config, ["scheduler", "run", "--now", moment], check=False)
    return {
        "dry_run_ms": round(dry, 1),
        "dry_run_ms_without_quick_check": round(dry_bare, 1),
        "real_ms_without_quick_check": round(real, 1),
    }


def _intake_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_intake", ROOT / "bench" / "intake.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_intake"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def _intake_cpu(intake: Any, database: Path, workdir: Path, messages: int) -> float:
    """CPU ms per message of a gateway serving `database`: bench/intake.py's server
    process and client, every message from the authorised bench domain (a new ticket and
    its acknowledgement each), concurrency 8, after a warm-up."""
    port = intake.free_port()
    tables = intake.gateway_tables(port, 100, "warning")
    tables["storage"]["database"] = str(database)
    config = workdir / f"{database.stem}.toml"
    config.write_text(intake.render_config(tables))
    argv = [sys.executable, "-m", "gateway.cli", "--config", str(config), "serve"]
    server = intake.ServerProcess(
        "gateway", argv, workdir / f"{database.stem}.log", ready=intake.GATEWAY_READY, port=port
    )
    server.backlog = lambda: intake.queued_mail(database)
    body = intake.make_body(1024)
    load = argparse.Namespace(messages=messages, messages_per_connection=20, senders=50)
    server.start()
    try:
        await intake.drive(server.port, 50, 8, 20, body, "warm", 50)
        result = await intake.measure(server, load, 8, body)
    finally:
        server.stop()
    cpu: float = result.cpu_per_message(result.server_cpu)
    return cpu


def measure_intake(path: Path, messages: int) -> dict[str, float]:
    import asyncio

    intake = _intake_module()
    with tempfile.TemporaryDirectory(prefix="bench-preload-") as folder:
        workdir = Path(folder)
        empty = workdir / "empty.db"
        with closing(store.connect(empty)) as conn, store.write_transaction(conn):
            org = store.add_organisation(
                conn, name="Bench Clients", domains=[BENCH_DOMAIN], unit=None,
                account_manager=None, now=iso(END),
            )  # fmt: skip
            store.upsert_sender(
                conn, address=f"@{BENCH_DOMAIN}", organisation=org, name=None, now=iso(END)
            )
        empty_cpu = asyncio.run(_intake_cpu(intake, empty, workdir, messages))
        full_cpu = asyncio.run(_intake_cpu(intake, path, workdir, messages))
    return {
        "empty_cpu_ms_per_msg": round(empty_cpu, 2),
        "preloaded_cpu_ms_per_msg": round(full_cpu, 2),
        "ratio": round(full_cpu / empty_cpu, 3) if empty_cpu else float("nan"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", type=Path, required=True, help="where to build (new file)")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--tickets", type=int, default=300_000)
    parser.add_argument("--years", type=int, default=3)
    parser.add_argument("--orgs", type=int, default=200)
    parser.add_argument("--senders", type=int, default=5000)
    parser.add_argument("--quarantine", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--tiny", action="store_true", help="CI size: 2,000 messages, 600 tickets (seconds)"
    )
    parser.add_argument("--reuse", action="store_true", help="measure an existing database")
    parser.add_argument("--measure", action="store_true", help="time the CLI, scheduler, intake")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (median)")
    parser.add_argument("--intake-messages", type=int, default=1000, help="per database (1000)")
    parser.add_argument("--no-intake", action="store_true", help="skip the intake measure")
    parser.add_argument("--plans", action="store_true", help="print every EXPLAIN QUERY PLAN")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.messages, args.tickets, args.orgs, args.senders, args.quarantine = (
            2000, 600, 10, 100, 200,
        )  # fmt: skip
        args.runs, args.intake_messages = min(args.runs, 3), min(args.intake_messages, 100)
    if args.messages < args.tickets or min(args.tickets, args.orgs, args.senders) < 1:
        print("bench/preload: need messages >= tickets >= 1, orgs and senders >= 1",
              file=sys.stderr)  # fmt: skip
        return 2
    path = args.database.resolve()

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    report: dict[str, Any] = {}
    if not args.reuse:
        if path.exists():
            print(f"bench/preload: {path} exists; remove it or pass --reuse", file=sys.stderr)
            return 2
        say(f"bench/preload: building {args.messages} messages in {args.tickets} tickets ...")
        report["build"] = build(path, args)
        b = report["build"]
        say(
            f"  built in {b['total_seconds']} s (search index {b['index_seconds']} s): "
            f"{b['messages']} messages, {b['file_bytes'] / 1e6:.0f} MB, "
            f"{b['bytes_per_message']} bytes per message"
        )
    if args.measure:
        with tempfile.TemporaryDirectory(prefix="bench-preload-cfg-") as folder:
            config = Path(folder) / "config.toml"
            config.write_text(CONFIG.format(database=path))
            report["open_ms"] = measure_open(path, args.runs)
            say(f"  store.connect (quick_check) {report['open_ms']:8.1f} ms, in every command")
            report["commands"] = measure_cli(path, config, args, say)
            report["scheduler"] = measure_scheduler(config)
            s = report["scheduler"]
            say(
                f"  scheduler pass: dry run {s['dry_run_ms']} ms "
                f"({s['dry_run_ms_without_quick_check']} ms without quick_check), "
                f"real {s['real_ms_without_quick_check']} ms without quick_check"
            )
        if not args.no_intake:
            report["intake"] = measure_intake(path, args.intake_messages)
            i = report["intake"]
            say(
                f"  intake CPU: empty {i['empty_cpu_ms_per_msg']} ms/msg, preloaded "
                f"{i['preloaded_cpu_ms_per_msg']} ms/msg (x{i['ratio']})"
            )
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    os.environ.pop("GATEWAY_CONFIG", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
