"""Intake throughput: the gateway against a bare aiosmtpd server, under the same client load.

Starts `gateway serve` (a real subprocess, temporary database, `synchronous=FULL`) and a
bare aiosmtpd server (another subprocess whose handler answers 250 at once, same limits),
then drives both with the same client at each concurrency and prints msgs/s, p50/p99
transaction latency and the ratio gateway / bare. It never touches a real database: all
state lives in a temporary directory that is removed at the end.

    .venv/bin/python bench/intake.py                       # 2000 messages, 1,8,32,100
    .venv/bin/python bench/intake.py --messages 500 --concurrency 32 --json
    .venv/bin/python bench/intake.py --postfix --authorise  # + a private Postfix (root)
    .venv/bin/python bench/intake.py --tiny --postfix --json  # seconds: CI's smoke run

`--postfix` adds, when Postfix is installed (and we are root), a privately started Postfix
(tests/postfix.py: its own config, queue and data directories and loopback port, never the
system instance; `default_transport = discard`, `in_flow_delay = 0`) to the same rotation:
the most trusted MTA's durable enqueue (its queue file fsynced before the 250), measured on
the same machine in the same run (issue 14 item 1).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The private Postfix harness is shared with the tests (tests/postfix.py, no pytest in it).
sys.path.insert(0, str(ROOT))
from tests import postfix as pf  # noqa: E402

# What both servers are told: the gateway's production limits, except that the connection
# caps are raised above the highest concurrency (the load comes from one address).
MAX_MESSAGE_SIZE = 26_214_400
SMTP_TIMEOUT = 300
HOSTNAME = "support.example.org"
MAIL_FROM = "alice@client.example.com"
RCPT_TO = "support@example.org"


def gateway_tables(port: int, max_connections: int, log_level: str) -> dict[str, dict[str, Any]]:
    """The gateway's config.toml as tables; `--set` overrides any key."""
    return {
        "smtp": {
            "host": "127.0.0.1",
            "port": port,
            "hostname": HOSTNAME,
            "max_message_size": MAX_MESSAGE_SIZE,
            "timeout": SMTP_TIMEOUT,
            "max_connections": max_connections,
            "max_connections_per_ip": max_connections,
            # Every bench client comes from 127.0.0.1, as all mail does from a front MTA:
            # exempt it from the per-address limits, as the README says to do for one.
            "per_ip_exempt": ["127.0.0.0/8"],
        },
        "storage": {"database": "var/gateway.db"},
        "log": {"level": log_level},
    }


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def render_config(tables: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
        lines.append("")
    lines += ["[[mailbox]]", f"address = {toml_value(RCPT_TO)}", 'unit = "support"', ""]
    return "\n".join(lines)


def override(text: str) -> tuple[str, str, Any]:
    """`--set section.key=value`: value parsed as an integer, true/false, or a string."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise argparse.ArgumentTypeError(f"expected section.key=value, got {text!r}")
    value: Any = raw.strip()
    if value in ("true", "false"):
        value = value == "true"
    else:
        try:
            value = int(value)
        except ValueError:
            pass
    return section, key, value


GATEWAY_READY = re.compile(rb"event=gateway\.ready .*listen=[^ ]*:(\d+)")
BARE_READY = re.compile(rb"bare\.ready port=(\d+)")
START_TIMEOUT = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Set to a file name to run the gateway under cProfile (main thread only; the writer
# thread and the parser workers are not in it): `python -m pstats FILE` to read it.
PROFILE_ENV = "BENCH_PROFILE_GATEWAY"


class StartError(Exception):
    pass


# --- the bare server (runs in its own process: `intake.py --serve-bare`) ---------------


class BareHandler:
    """Answers 250 at once: the cost of aiosmtpd's protocol handling and nothing else."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


# --- the store-only reference (`intake.py --serve-store-only DB`) ----------------------


class StoreOnlyHandler:
    """aiosmtpd plus a durable store and nothing else: each message is committed by one
    writer thread in group commits (WAL, synchronous=FULL) before its 250. No parsing, no
    classification, no tickets. It is the issue's reference point ("group commit about
    0.75"), measured on this machine in the same run, so the gateway's figure can be read
    against what durability alone costs."""

    def __init__(self, database: Path) -> None:
        import queue
        import threading

        self.loop = asyncio.get_running_loop()
        self.queue: queue.SimpleQueue[tuple[tuple[Any, ...], asyncio.Future[None]] | None] = (
            queue.SimpleQueue()
        )
        self.conn = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, received_at TEXT,"
            " mail_from TEXT, rcpt_to TEXT, peer TEXT, size INTEGER, sha256 TEXT, raw BLOB)"
        )
        self.thread = threading.Thread(target=self.write, name="store-only-writer", daemon=True)
        self.thread.start()

    def write(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            while not self.queue.empty():
                item = self.queue.get()
                if item is None:
                    self.queue.put(None)
                    break
                batch.append(item)
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.executemany(
                    "INSERT INTO messages (received_at, mail_from, rcpt_to, peer, size, sha256,"
                    " raw) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [row for row, _ in batch],
                )
                self.conn.execute("COMMIT")
                error: BaseException | None = None
            except sqlite3.Error as exc:
                error = exc
            for _, future in batch:
                self.loop.call_soon_threadsafe(settle, future, error)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import hashlib
        from datetime import UTC, datetime

        raw = envelope.original_content or b""
        row = (
            datetime.now(UTC).isoformat(),
            envelope.mail_from,
            json.dumps(envelope.rcpt_tos),
            str(session.peer),
            len(raw),
            hashlib.sha256(raw).hexdigest(),
            raw,
        )
        future: asyncio.Future[None] = self.loop.create_future()
        self.queue.put((row, future))
        try:
            await future
        except sqlite3.Error:
            return "451 4.3.0 Try again later"
        return "250 OK"


def settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if not future.done():
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


async def serve_reference(data_size_limit: int, database: Path | None) -> None:
    """The bare server (database None) or the store-only reference, until SIGTERM."""
    from aiosmtpd.smtp import SMTP

    loop = asyncio.get_running_loop()
    handler: Any = BareHandler() if database is None else StoreOnlyHandler(database)

    def factory() -> SMTP:
        return SMTP(
            handler,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            hostname=HOSTNAME,
            ident="ESMTP",
            timeout=SMTP_TIMEOUT,
        )

    server = await loop.create_server(factory, host="127.0.0.1", port=0)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    port = server.sockets[0].getsockname()[1]
    print(f"bare.ready port={port}", flush=True)
    await stop.wait()
    server.close()


# --- servers under test ----------------------------------------------------------------


def free_port() -> int:
    """A port nobody listens on now (the gateway logs its ready line at info level only, so
    at level "warning" it cannot tell us the port it picked: we pick it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            return conn.recv(4).startswith(b"220")
    except OSError:
        return False


class ServerProcess:
    """A server subprocess, ready once its stdout announces its port or it greets on `port`."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        *,
        ready: re.Pattern[bytes] | None = None,
        port: int = 0,
    ) -> None:
        self.name = name
        self.argv = argv
        self.ready = ready
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = port
        # Work the server still owes once the load stops (the gateway's outbox): returns
        # how many items are left; a run is measured until it is 0.
        self.backlog: Callable[[], int] = lambda: 0

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("NOTIFY_SOCKET", None)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = self.ready.search(self.log_path.read_bytes()) if self.ready else None
            if match:
                self.port = int(match.group(1))
                return
            if self.port and greets(self.port):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)  # a one-off wait for a child's first line, bounded above
        self.stop()
        output = self.log_path.read_text("utf-8", "replace")
        raise StartError(f"{self.name} did not start:\n{output}")

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and its live descendants (parser workers)."""
        if self.proc is None:
            return 0.0
        ticks = 0
        for pid in process_tree(self.proc.pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / CLOCK_TICKS

    def cpu_parts(self) -> dict[str, float]:
        """CPU seconds of the server split by where they were spent: its main thread (the
        event loop), its other threads (the gateway's writer), its child processes (parser
        workers). Per-task figures of threads that have ended are lost; the sum can be a
        little below cpu_seconds()."""
        parts = {"loop": 0.0, "threads": 0.0, "children": 0.0}
        if self.proc is None:
            return parts
        root = self.proc.pid
        for task in Path(f"/proc/{root}/task").glob("*"):
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            parts["loop" if task.name == str(root) else "threads"] += seconds
        for pid in process_tree(root)[1:]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parts["children"] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return parts

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait; the exit code (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def machine_busy_seconds() -> float:
    """CPU time all processes on the machine have used (/proc/stat, every CPU)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found.extend(process_tree(int(child)))
    return found


def gateway_server(
    workdir: Path, max_connections: int, log_level: str, overrides: Sequence[tuple[str, str, Any]]
) -> tuple[ServerProcess, Path]:
    """The gateway in `workdir/gateway` (not started yet); returns it and its database."""
    folder = workdir / "gateway"
    folder.mkdir()
    port = free_port()
    tables = gateway_tables(port, max_connections, log_level)
    for section, key, value in overrides:
        tables.setdefault(section, {})[key] = value
    config = folder / "config.toml"
    config.write_text(render_config(tables))
    argv = [sys.executable, "-m", "gateway.cli", "--config", str(config), "serve"]
    profile = os.environ.get(PROFILE_ENV)
    if profile:
        argv[1:1] = ["-m", "cProfile", "-o", str(Path(profile).resolve())]
    server = ServerProcess("gateway", argv, workdir / "gateway.log", ready=GATEWAY_READY, port=port)
    return server, folder / "var" / "gateway.db"


def bare_server(workdir: Path) -> ServerProcess:
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-bare"]
    return ServerProcess("bare", argv, workdir / "bare.log", ready=BARE_READY)


def store_only_server(workdir: Path) -> ServerProcess:
    database = workdir / "store-only.db"
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-store-only", str(database)]
    return ServerProcess("store-only", argv, workdir / "store-only.log", ready=BARE_READY)


class PostfixServer:
    """The private Postfix reference, with the interface the rotation uses."""

    name = "postfix"

    def __init__(self) -> None:
        self.postfix = pf.Postfix(pf.DISCARD_SETTINGS)
        self.port = 0
        # Mail accepted but not yet through qmgr and discard: its CPU is Postfix's cost too.
        self.backlog: Callable[[], int] = self.postfix.queued_files

    def start(self) -> None:
        try:
            self.postfix.start()
        except (pf.PostfixError, OSError, subprocess.SubprocessError) as exc:
            raise StartError(f"postfix did not start: {exc}") from exc
        self.port = self.postfix.port

    def cpu_seconds(self) -> float:
        """master, smtpd, cleanup, qmgr, trivial-rewrite, discard, ... (exited ones too)."""
        return self.postfix.cpu_seconds()

    def cpu_parts(self) -> dict[str, float]:
        return {}

    def stop(self, timeout: float = 60) -> int | None:
        self.postfix.stop()
        return 0


# --- the client --------------------------------------------------------------------------


class SmtpFailure(Exception):
    pass


def make_body(size: int) -> bytes:
    """A plain-text body of about `size` bytes, lines of 76 characters, dot-safe."""
    line = b"The printer on floor 2 is on fire again, and the toner is empty as well. 0\r\n"
    lines = max(1, size // len(line))
    return line * lines


def sender_of(index: int, senders: int) -> str:
    """The envelope and From address of message `index` when the load comes from `senders`."""
    return MAIL_FROM if senders == 1 else f"client{index % senders}@client.example.com"


def make_message(tag: str, body: bytes, sender: str = MAIL_FROM) -> bytes:
    head = (
        f"From: Alice Example <{sender}>\r\n"
        f"To: {RCPT_TO}\r\n"
        f"Subject: Bench {tag}\r\n"
        f"Message-ID: <{tag}@bench.client.example.com>\r\n"
        "Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
    ).encode()
    return head + body + b".\r\n"


class Connection:
    """A lock-step SMTP client on raw asyncio streams: cheap, and the same for both servers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connection = cls(reader, writer)
        await connection.expect(b"220")
        await connection.command(b"EHLO bench.client.example.com\r\n", b"250")
        return connection

    async def expect(self, code: bytes) -> bytes:
        while True:
            line = await self.reader.readline()
            if not line:
                raise SmtpFailure(f"connection closed, expected {code.decode()}")
            if line[3:4] != b"-":
                if not line.startswith(code):
                    raise SmtpFailure(line.decode("utf-8", "replace").strip())
                return line

    async def command(self, line: bytes, code: bytes) -> bytes:
        self.writer.write(line)
        return await self.expect(code)

    async def send(self, message: bytes, sender: str = MAIL_FROM) -> None:
        await self.command(b"MAIL FROM:<" + sender.encode() + b">\r\n", b"250")
        await self.command(b"RCPT TO:<" + RCPT_TO.encode() + b">\r\n", b"250")
        await self.command(b"DATA\r\n", b"354")
        await self.command(message, b"250")

    async def close(self) -> None:
        try:
            await self.command(b"QUIT\r\n", b"221")
        except (SmtpFailure, OSError):
            pass
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


@dataclasses.dataclass
class LoadResult:
    messages: int
    failures: int
    seconds: float
    latencies: list[float]
    server_cpu: float = 0.0  # seconds, the server's whole process tree
    client_cpu: float = 0.0
    other_cpu: float = 0.0  # everything else on the machine meanwhile (other jobs)
    # The server's CPU seconds by thread or process: loop, threads, children (cpu_parts).
    server_parts: dict[str, float] = dataclasses.field(default_factory=dict)
    # After the last 250, how long the server took to finish what it still owed (the
    # gateway delivering the acknowledgements it queued); its CPU meanwhile is counted.
    drain_seconds: float = 0.0

    def cpu_per_message(self, seconds: float) -> float:
        """In ms."""
        return seconds / self.messages * 1000 if self.messages else float("nan")

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        """Transaction latency (MAIL FROM sent to the 250 after the dot), in ms."""
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0] * 1000
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return cuts[int(p) - 1] * 1000


async def drive(
    port: int,
    messages: int,
    concurrency: int,
    per_connection: int,
    body: bytes,
    run: str,
    senders: int = 1,
) -> LoadResult:
    """Send `messages` messages over `concurrency` connections; all bodies prebuilt."""
    payloads = [
        (sender_of(i, senders), make_message(f"{run}.{i}", body, sender_of(i, senders)))
        for i in range(messages)
    ]
    next_index = 0
    latencies: list[float] = []
    failures = 0

    async def worker() -> None:
        nonlocal next_index, failures
        while next_index < messages:
            try:
                connection = await Connection.open(port)
            except (SmtpFailure, OSError):
                failures += 1
                continue
            try:
                for _ in range(per_connection):
                    if next_index >= messages:
                        break
                    sender, payload = payloads[next_index]
                    next_index += 1
                    started = time.perf_counter()
                    await connection.send(payload, sender)
                    latencies.append(time.perf_counter() - started)
            except (SmtpFailure, OSError):
                failures += 1
            finally:
                await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, messages))))
    seconds = time.perf_counter() - started
    return LoadResult(len(latencies), failures, seconds, latencies)


# --- the run -----------------------------------------------------------------------------


async def measure(
    server: ServerProcess, args: argparse.Namespace, level: int, body: bytes
) -> LoadResult:
    """One measured run against `server`, with the CPU everyone used meanwhile."""
    run = f"{server.name}.c{level}.{time.monotonic_ns()}"
    server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
    parts = server.cpu_parts()
    machine = machine_busy_seconds()
    result = await drive(
        server.port, args.messages, level, args.messages_per_connection, body, run, args.senders
    )
    result.drain_seconds = await drain(server)
    result.server_cpu = server.cpu_seconds() - server_cpu
    result.server_parts = {
        name: max(0.0, seconds - parts.get(name, 0.0))
        for name, seconds in server.cpu_parts().items()
    }
    result.client_cpu = time.process_time() - client_cpu
    used = machine_busy_seconds() - machine
    result.other_cpu = max(0.0, used - result.server_cpu - result.client_cpu)
    return result


DRAIN_TIMEOUT = 300.0
DRAIN_POLL = 0.05


async def drain(server: ServerProcess) -> float:
    """Wait until the server owes no more work; the seconds it took."""
    started = time.perf_counter()
    deadline = started + DRAIN_TIMEOUT
    while server.backlog() > 0:
        if time.perf_counter() > deadline:
            raise StartError(f"{server.name} still had work after {DRAIN_TIMEOUT:.0f} s")
        await asyncio.sleep(DRAIN_POLL)  # polling the database, bounded by the deadline
    return time.perf_counter() - started


def queued_mail(database: Path) -> int:
    """Outgoing mail the gateway has queued and not yet delivered (or given up on)."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT count(*) FROM outbox WHERE status = 'queued'").fetchone()
        return int(row[0])


def median_run(results: list[LoadResult]) -> LoadResult:
    """The run with the median rate (the lower middle one for an even count)."""
    ordered = sorted(results, key=lambda r: r.rate)
    return ordered[(len(ordered) - 1) // 2]


@dataclasses.dataclass
class Row:
    concurrency: int
    bare: LoadResult
    gateway: LoadResult
    store_only: LoadResult | None = None
    postfix: LoadResult | None = None

    @property
    def ratio(self) -> float:
        return self.gateway.rate / self.bare.rate if self.bare.rate else 0.0

    def as_dict(self) -> dict[str, Any]:
        def part(result: LoadResult) -> dict[str, Any]:
            return {
                "messages": result.messages,
                "failures": result.failures,
                "seconds": round(result.seconds, 3),
                "msgs_per_s": round(result.rate, 1),
                "p50_ms": round(result.percentile(50), 2),
                "p99_ms": round(result.percentile(99), 2),
                "server_cpu_ms_per_msg": round(result.cpu_per_message(result.server_cpu), 3),
                "client_cpu_ms_per_msg": round(result.cpu_per_message(result.client_cpu), 3),
                "server_cpu_ms_per_msg_by_part": {
                    name: round(result.cpu_per_message(seconds), 3)
                    for name, seconds in result.server_parts.items()
                },
                "other_cpu_share": round(result.other_cpu / result.seconds, 3),
                "drain_seconds": round(result.drain_seconds, 3),
            }

        found: dict[str, Any] = {
            "concurrency": self.concurrency,
            "bare": part(self.bare),
            "gateway": part(self.gateway),
            "ratio": round(self.ratio, 3),
        }
        if self.store_only is not None:
            found["store_only"] = part(self.store_only)
            found["store_only_ratio"] = round(self.store_only.rate / self.bare.rate, 3)
        if self.postfix is not None:
            found["postfix"] = part(self.postfix)
            found["gateway_postfix_ratio"] = round(self.gateway.rate / self.postfix.rate, 3)
        return found


PRELOAD_QUEUE_PREFIX = "preload-"


def count_stored(database: Path) -> int:
    """Messages the gateway received during the bench (not preloaded, not sent by it)."""
    with closing(sqlite3.connect(database)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM messages WHERE direction = 'in' AND queue_id NOT LIKE ?",
            (PRELOAD_QUEUE_PREFIX + "%",),
        ).fetchone()
        return int(row[0])


def preload(database: Path, *, authorise: bool, tickets: int, senders: int) -> None:
    """Fill the database before the gateway starts, so intake is measured against a desk
    with history: `tickets` tickets (one received message each), `senders` authorised
    senders, and - with `authorise` - the bench's own client domain authorised, so that
    every message takes the whole path (ticket, acknowledgement) instead of the quarantine.
    """
    from gateway import store
    from gateway.lookalike import skeleton

    now = "2026-01-01T00:00:00.000000+00:00"
    with closing(store.connect(database)) as conn, store.write_transaction(conn):
        org = store.add_organisation(
            conn,
            name="Bench Clients",
            domains=["client.example.com"],
            unit=None,
            account_manager=None,
            now=now,
        )
        if authorise:
            store.upsert_sender(
                conn, address="@client.example.com", organisation=org, name=None, now=now
            )
        conn.executemany(
            "INSERT INTO senders (address, organisation, name, blocked, skeleton, created_at)"
            " VALUES (?, ?, NULL, 0, ?, ?)",
            (
                (
                    f"user{i}@org{i % 500}.example.net",
                    org,
                    skeleton(f"user{i}@org{i % 500}.example.net"),
                    now,
                )
                for i in range(senders)
            ),
        )
        conn.executemany(
            "INSERT INTO tickets (number, unit, requester, subject, status, created_at,"
            " updated_at, mailbox) VALUES (?, 'support', ?, ?, 'open', ?, ?, ?)",
            (
                (n, f"old{n}@history.example.net", f"old request {n}", now, now, RCPT_TO)
                for n in range(1, tickets + 1)
            ),
        )
        conn.executemany(
            "INSERT INTO messages (queue_id, received_at, mail_from, rcpt_to, peer, helo, size,"
            " sha256, message_id, sender, ticket, kind) VALUES (?, ?, ?, '[]', '', '', 0, '',"
            " ?, ?, ?, 'client')",
            (
                (
                    f"{PRELOAD_QUEUE_PREFIX}{n}",
                    now,
                    f"old{n}@history.example.net",
                    f"<old{n}@history.example.net>",
                    f"old{n}@history.example.net",
                    n,
                )
                for n in range(1, tickets + 1)
            ),
        )


def print_table(rows: Sequence[Row], say: Callable[[str], None]) -> None:
    say(
        f"{'conc':>5}  {'bare msg/s':>10} {'p50 ms':>7} {'p99 ms':>7}  "
        f"{'gw msg/s':>9} {'p50 ms':>7} {'p99 ms':>7}  {'ratio':>5}  "
        f"{'CPU ms/msg: bare':>16} {'gw':>5} {'client':>6}"
    )
    for row in rows:
        bare, gw = row.bare, row.gateway
        say(
            f"{row.concurrency:>5}  {bare.rate:>10.0f} {bare.percentile(50):>7.1f} "
            f"{bare.percentile(99):>7.1f}  {gw.rate:>9.0f} "
            f"{gw.percentile(50):>7.1f} {gw.percentile(99):>7.1f}  "
            f"{row.ratio:>5.2f}  {bare.cpu_per_message(bare.server_cpu):>16.2f} "
            f"{gw.cpu_per_message(gw.server_cpu):>5.2f} "
            f"{gw.cpu_per_message(gw.client_cpu):>6.2f}"
        )
    references = [row for row in rows if row.store_only is not None]
    if references:
        say("")
        say(
            f"{'conc':>5}  {'store-only msg/s':>16} {'p50 ms':>7} {'p99 ms':>7}  "
            f"{'ratio':>5}  {'CPU ms/msg':>10}   (aiosmtpd + group commit, no parsing)"
        )
        for row in references:
            ref = row.store_only
            assert ref is not None
            say(
                f"{row.concurrency:>5}  {ref.rate:>16.0f} {ref.percentile(50):>7.1f} "
                f"{ref.percentile(99):>7.1f}  {ref.rate / row.bare.rate:>5.2f}  "
                f"{ref.cpu_per_message(ref.server_cpu):>10.2f}"
            )
    with_postfix = [row for row in rows if row.postfix is not None]
    if with_postfix:
        say("")
        say(
            f"{'conc':>5}  {'postfix msg/s':>13} {'p50 ms':>7} {'p99 ms':>7}  "
            f"{'gw / postfix':>12}  {'CPU ms/msg: postfix':>19} {'gw':>5}"
            "   (durable enqueue, then discard)"
        )
        for row in with_postfix:
            ref = row.postfix
            assert ref is not None
            gw = row.gateway
            say(
                f"{row.concurrency:>5}  {ref.rate:>13.0f} {ref.percentile(50):>7.1f} "
                f"{ref.percentile(99):>7.1f}  {gw.rate / ref.rate:>12.2f}  "
                f"{ref.cpu_per_message(ref.server_cpu):>19.2f} "
                f"{gw.cpu_per_message(gw.server_cpu):>5.2f}"
            )
    say("")
    say(
        f"{'conc':>5}  gateway CPU ms/msg by part: {'loop':>5} {'threads':>7} {'workers':>7}"
        f"   outbox drained in"
    )
    for row in rows:
        parts, per = row.gateway.server_parts, row.gateway.cpu_per_message
        say(
            f"{row.concurrency:>5}  {'':>27}{per(parts.get('loop', 0.0)):>5.2f} "
            f"{per(parts.get('threads', 0.0)):>7.2f} {per(parts.get('children', 0.0)):>7.2f}"
            f"   {row.gateway.drain_seconds:>8.2f} s"
        )


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    levels = args.concurrency
    gateway, database = gateway_server(
        workdir,
        max_connections=max(100, 2 * max(levels)),
        log_level=args.log_level,
        overrides=args.set,
    )
    preload(
        database,
        authorise=args.authorise,
        tickets=args.preload_tickets,
        senders=args.preload_senders,
    )
    gateway.backlog = lambda: queued_mail(database)
    bare = bare_server(workdir)
    references: list[Any] = [bare, store_only_server(workdir)] if args.store_only else [bare]
    if args.postfix:
        missing = pf.unavailable()
        if missing:
            print(f"bench/intake: no Postfix reference: {missing}", file=sys.stderr)
        else:
            references.append(PostfixServer())
    servers = [*references, gateway]
    body = make_body(args.size)
    rows: list[Row] = []
    acknowledged = 0
    try:
        # Both start at once; wait for both before giving up, so none is left behind.
        started = await asyncio.gather(
            *(asyncio.to_thread(server.start) for server in servers), return_exceptions=True
        )
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        say(
            f"bench/intake: {args.messages} messages of ~{len(body)} bytes per level, "
            f"{args.messages_per_connection} per connection, {args.senders} sender(s); "
            f"{os.cpu_count()} CPUs"
        )
        # Warm up each (imports, parser workers, SQLite page cache) outside the figures.
        for server in servers:
            warm = await drive(
                server.port,
                min(100, args.messages),
                8,
                args.messages_per_connection,
                body,
                "warm",
                args.senders,
            )
            if server is gateway:
                acknowledged += warm.messages
        for level in levels:
            runs: dict[str, list[LoadResult]] = {server.name: [] for server in servers}
            # Alternating the servers spreads any outside load over all of them.
            for _ in range(args.repeat):
                for server in servers:
                    result = await measure(server, args, level, body)
                    runs[server.name].append(result)
                    if server is gateway:
                        acknowledged += result.messages
            results = {name: median_run(found) for name, found in runs.items()}
            rows.append(
                Row(
                    level,
                    results["bare"],
                    results["gateway"],
                    results.get("store-only"),
                    results.get("postfix"),
                )
            )
            say(
                f"  concurrency {level}: "
                + ", ".join(f"{name} {result.rate:.0f} msg/s" for name, result in results.items())
            )
    finally:
        exits = {server.name: server.stop() for server in servers}
        bare_exit, gateway_exit = exits["bare"], exits["gateway"]
    stored = count_stored(database)
    say("")
    print_table(rows, say)
    say("")
    say(
        f"gateway: acknowledged {acknowledged}, stored {stored} "
        f"({'ok' if stored == acknowledged else 'MISMATCH'}); exit code {gateway_exit}"
    )
    measured = [run for r in rows for run in (r.bare, r.gateway, r.store_only, r.postfix) if run]
    other = sum(run.other_cpu for run in measured)
    wall = sum(run.seconds for run in measured)
    if wall and other / wall > 0.1:
        say(
            f"warning: other processes used {other / wall:.0%} of a CPU during the runs; "
            "msg/s figures suffer (CPU ms/msg much less so)"
        )
    elif wall:
        say(f"other processes used {other / wall:.0%} of a CPU during the runs")
    failures = sum(run.failures for run in measured)
    if failures:
        say(f"client failures (transactions that did not end in 250): {failures}")
    return {
        "messages": args.messages,
        "size": len(body),
        "messages_per_connection": args.messages_per_connection,
        "senders": args.senders,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "rows": [row.as_dict() for row in rows],
        "gateway_config": [f"{sec}.{key}={value}" for sec, key, value in args.set],
        "gateway_acknowledged": acknowledged,
        "gateway_stored": stored,
        "gateway_exit": gateway_exit,
        "bare_exit": bare_exit,
        "postfix": any(server.name == "postfix" for server in servers),
    }


def levels(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be 1 or more")
    return values


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=positive, default=2000, help="per level (2000)")
    parser.add_argument(
        "--concurrency", type=levels, default=[1, 8, 32, 100], help="levels (1,8,32,100)"
    )
    parser.add_argument(
        "--messages-per-connection", type=positive, default=20, help="before QUIT (20)"
    )
    parser.add_argument("--size", type=positive, default=1024, help="body bytes (1024)")
    parser.add_argument(
        "--senders",
        type=positive,
        default=1,
        help="distinct senders (MAIL FROM and From), round robin (1: all from alice@)",
    )
    parser.add_argument(
        "--repeat", type=positive, default=1, help="runs per level and server; the median counts"
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        help="the gateway's [log] level (warning)",
    )
    parser.add_argument(
        "--set",
        type=override,
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a gateway config key, e.g. smtp.data_slots=32 (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--authorise",
        action="store_true",
        help="authorise the bench's sender domain: every message opens a ticket and is "
        "acknowledged (without it, unknown senders are quarantined)",
    )
    parser.add_argument(
        "--preload-tickets", type=int, default=0, help="tickets already in the database (0)"
    )
    parser.add_argument(
        "--preload-senders", type=int, default=0, help="authorised senders already listed (0)"
    )
    parser.add_argument(
        "--store-only",
        action="store_true",
        help="also measure the store-only reference: aiosmtpd plus group commit, no parsing",
    )
    parser.add_argument(
        "--postfix",
        action="store_true",
        help="also measure a privately started Postfix (durable enqueue, then discard), "
        "when Postfix is installed and we are root",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"a run of seconds so CI keeps the bench working: {TINY_MESSAGES} messages, "
        "concurrency 1,8,32, 5 per connection (figures meaningless)",
    )
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-store-only", type=Path, help=argparse.SUPPRESS)
    return parser


TINY_MESSAGES = 40


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.messages, args.concurrency = TINY_MESSAGES, [1, 8, 32]
        args.messages_per_connection, args.repeat = 5, 1
    if args.serve_bare or args.serve_store_only:
        asyncio.run(serve_reference(MAX_MESSAGE_SIZE, args.serve_store_only))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as folder:
        try:
            report = asyncio.run(bench(args, Path(folder)))
        except StartError as exc:
            print(f"bench/intake: {exc}", file=sys.stderr)
            return 2
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    ok = report["gateway_stored"] == report["gateway_acknowledged"]
    return 0 if ok and report["gateway_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
