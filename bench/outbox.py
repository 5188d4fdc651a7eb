"""Outbox throughput: how many mails a second the delivery worker hands on.

For each delivery mode it queues N committed outgoing mails (one recipient each) in a
temporary database, then times `OutboxWorker.deliver_due()` rounds until every row is
marked sent, and prints mails/s:

- **directory**: each mail written as an .eml file (temp file, fsync, rename, fsync of the
  folder) in the temporary directory;
- **smtp**: each mail sent to a local relay, a bare aiosmtpd server in a process of its
  own whose handler answers 250 at once. The worker runs with ``starttls = false``: the
  figure is the worker's own cost, not TLS's (``--starttls`` adds STARTTLS with a
  throwaway trustme CA, which needs the test extra).

Marking each row sent is a unit for the daemon's group-commit Writer (``synchronous=FULL``),
as in production. Logging is off (no handler), as at ``[log] level = "warning"``. Nothing
outside the temporary directory is touched; everything talks to loopback only.

    .venv/bin/python bench/outbox.py                    # 1000 mails, both modes
    .venv/bin/python bench/outbox.py --mails 5000 --mode smtp --concurrency 8 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import ssl
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from gateway import outbox, store
from gateway.clock import Clock
from gateway.config import Config, load_config
from gateway.outbox import OutboxWorker
from gateway.store import Writer
from gateway.store.reader import Reader

CONFIG = """
[smtp]
hostname = "support.example.org"

[storage]
database = "var/gateway.db"

[[mailbox]]
address = "support@example.org"

[delivery]
mode = "{mode}"
directory = "var/outbox"
relay_host = "127.0.0.1"
relay_port = {port}
starttls = {starttls}
timeout = 30
"""


def make_mail(n: int, size: int) -> tuple[str, bytes]:
    message_id = f"<bench.{n}@support.example.org>"
    line = "The quick brown fox jumps over the lazy dog, again and again.\r\n"
    body = line * max(1, size // len(line))
    raw = (
        "From: Support <support@example.org>\r\n"
        f"To: client{n}@client.example.com\r\n"
        f"Subject: [#{n}] Your request\r\n"
        f"Message-ID: {message_id}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"{body}"
    ).encode()
    return message_id, raw


def queue_mails(config: Config, count: int, size: int) -> None:
    # The tests' helper (a built mail queued directly, which no daemon path does): one copy
    # for the tests and the bench, outside the daemon's store.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.storehelpers import store_outgoing

    now = Clock().stamp()
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        for n in range(count):
            message_id, raw = make_mail(n, size)
            store_outgoing(
                conn,
                raw=raw,
                message_id=message_id,
                ticket=None,
                kind="acknowledgement",
                automatic=True,
                mail_from="",
                recipients=[f"client{n}@client.example.com"],
                subject=f"[#{n}] Your request",
                now=now,
            )


# --- the relay: bare aiosmtpd in a child process ----------------------------------------


class _Accept:
    def __init__(self, counter: Any) -> None:
        self.counter = counter

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.counter.get_lock():
            self.counter.value += 1
        return "250 2.0.0 Ok"


def run_relay(conn: multiprocessing.connection.Connection, counter: Any, cert: str | None) -> None:
    from aiosmtpd.smtp import SMTP

    async def serve() -> None:
        context = None
        if cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert)
        handler = _Accept(counter)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="relay.example.net", tls_context=context),
            host="127.0.0.1",
            port=0,
        )
        conn.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()  # until terminated

    asyncio.run(serve())


# --- one run ----------------------------------------------------------------------------


async def deliver_all(config: Config, tls_context: ssl.SSLContext | None) -> float:
    """Time rounds until nothing is due; returns the wall seconds."""
    writer = Writer(config.database_path)
    await writer.start()
    reader = Reader(config.database_path)
    await reader.open()
    worker = OutboxWorker(config, writer, reader, clock=Clock(), tls_context=tls_context)
    try:
        started = time.perf_counter()
        while await worker.deliver_due():
            pass
        return time.perf_counter() - started
    finally:
        await worker.stop()
        await reader.close()
        await writer.close()


def bench_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gateway-bench-outbox-") as tmp:
        folder = Path(tmp)
        relay: multiprocessing.Process | None = None
        counter: Any = None
        port = 587
        tls_context = None
        cert = None
        if mode == "smtp":
            if args.starttls:
                import trustme  # the test extra: a throwaway CA for the relay's certificate

                ca = trustme.CA()
                cert = str(folder / "relay.pem")
                issued = ca.issue_cert("127.0.0.1")
                issued.private_key_and_cert_chain_pem.write_to_path(cert)
                tls_context = ssl.create_default_context()
                ca.configure_trust(tls_context)
            spawn = multiprocessing.get_context("spawn")
            counter = spawn.Value("i", 0)
            parent, child = spawn.Pipe()
            relay = spawn.Process(target=run_relay, args=(child, counter, cert), daemon=True)
            relay.start()
            if not parent.poll(30):
                raise SystemExit("the relay did not start")
            port = parent.recv()
        try:
            (folder / "config.toml").write_text(
                CONFIG.format(mode=mode, port=port, starttls=str(args.starttls).lower())
            )
            config = load_config(folder / "config.toml")
            queue_mails(config, args.mails, args.size)
            cpu = time.process_time()
            wall = asyncio.run(deliver_all(config, tls_context))
            cpu = time.process_time() - cpu
            with closing(store.connect(config.database_path)) as conn:
                sent = conn.execute("SELECT COUNT(*) FROM outbox WHERE status = 'sent'").fetchone()
            handed = (
                counter.value if counter is not None else len(list(config.outbox_path.iterdir()))
            )
        finally:
            if relay is not None:
                relay.terminate()
                relay.join(10)
    if sent[0] != args.mails or handed != args.mails:
        raise SystemExit(f"{mode}: {sent[0]} rows sent and {handed} handed on of {args.mails}")
    return {
        "mode": mode + (" (STARTTLS)" if mode == "smtp" and args.starttls else ""),
        "mails": args.mails,
        "seconds": round(wall, 3),
        "mails_per_second": round(args.mails / wall, 1),
        "cpu_ms_per_mail": round(1000 * cpu / args.mails, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mails", type=int, default=1000, help="mails queued (default 1000)")
    parser.add_argument("--size", type=int, default=1000, help="body bytes (default ~1000)")
    parser.add_argument("--mode", choices=["both", "directory", "smtp"], default="both")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=outbox.CONCURRENCY,
        help=f"rows delivered at once (gateway.outbox.CONCURRENCY, {outbox.CONCURRENCY})",
    )
    parser.add_argument("--starttls", action="store_true", help="smtp mode over STARTTLS")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    outbox.CONCURRENCY = args.concurrency  # read by each round
    modes = ["directory", "smtp"] if args.mode == "both" else [args.mode]
    results = [bench_mode(mode, args) for mode in modes]
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    print(f"{args.mails} mails of ~{args.size} bytes, concurrency {args.concurrency}")
    print(f"{'mode':<18} {'mails/s':>9} {'seconds':>9} {'CPU ms/mail':>12}")
    for r in results:
        print(
            f"{r['mode']:<18} {r['mails_per_second']:>9} {r['seconds']:>9} "
            f"{r['cpu_ms_per_mail']:>12}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
