"""A private Postfix on loopback, for the tests (tests/test_postfix.py) and the bench
(bench/intake.py --postfix): never the system instance.

Each `Postfix` gets its own temporary folder holding its config_directory (a copy of the
system's master.cf and a main.cf written with `postconf -c DIR -e`), queue_directory,
data_directory and maillog file, and listens on 127.0.0.1 on a free port. It is started
and stopped with `postfix -c DIR start/stop`, so nothing of /etc/postfix is read or changed
and no system daemon is involved. Master runs as root (Postfix's own design: it binds the
port, then its daemons drop to `mail_owner`), so a private instance needs root too;
`unavailable()` says why one cannot run here.

This module imports nothing from pytest (bench/intake.py imports it); the fixture that
skips or fails is in tests/test_postfix.py.

The README section "Behind Postfix" quotes the recipe settings below (`LMTP_RECIPE`,
`SMTP_RECIPE`, `RECIPIENT_RECIPE`, `STRIP_RECIPE`) with the placeholders filled in, and
tests/test_postfix.py checks that it still does: what the README recommends is what the
tests run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SBIN = Path("/usr/sbin")
POSTFIX = shutil.which("postfix") or str(SBIN / "postfix")
POSTCONF = shutil.which("postconf") or str(SBIN / "postconf")
POSTQUEUE = shutil.which("postqueue") or str(SBIN / "postqueue")
SYSTEM_MASTER_CF = Path("/etc/postfix/master.cf")

# The front MTA's name: its greeting, its Received lines, and the authserv-id it would
# write in Authentication-Results (so the one the gateway trusts, and the one stripped).
HOSTNAME = "mx.example.org"
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Always set: a private, loopback-only instance that never looks anything up on the
# network and delivers nothing anywhere but where a test or the bench routes it.
BASE_SETTINGS: dict[str, str] = {
    "compatibility_level": "3.6",
    "myhostname": HOSTNAME,
    "myorigin": "$myhostname",
    "mydestination": "",
    "local_recipient_maps": "",
    "alias_maps": "",
    "alias_database": "",
    "inet_interfaces": "loopback-only",
    "inet_protocols": "ipv4",
    "mynetworks": "127.0.0.0/8",
    "relay_domains": "",
    # Mail for anywhere else (a bounce to a test's sender) fails here, never leaves.
    "default_transport": "error:5.7.1 no delivery outside the test",
    "smtpd_peername_lookup": "no",
    "smtp_dns_support_level": "disabled",
    "lmtp_dns_support_level": "disabled",
    # RFC 5321 4.5.3: Postfix by default slows the 250 when its queue fills; the bench and
    # the tests measure and wait for delivery, not Postfix's self-protection.
    "in_flow_delay": "0",
    "biff": "no",
    "syslog_name": "postfix-private",
}

# --- the recipes of README "Behind Postfix" ({port}: the gateway's; {dir}: the config
# directory, where the lookup tables live; {cap}: the gateway's smtp.max_connections_per_ip).

LMTP_RECIPE: dict[str, str] = {
    "relay_domains": "example.org",
    "transport_maps": "texthash:{dir}/transport",
    # The gateway refuses a client's connection past smtp.max_connections_per_ip (421, a
    # deferral and a retry for Postfix): never open more than that to it.
    "lmtp_destination_concurrency_limit": "{cap}",
}
LMTP_TRANSPORT_TABLE = "example.org lmtp:inet:127.0.0.1:{port}\n"

SMTP_RECIPE: dict[str, str] = {
    "relay_domains": "example.org",
    "transport_maps": "texthash:{dir}/transport",
    "smtp_destination_concurrency_limit": "{cap}",
}
# Brackets: no MX lookup, the address as given (Postfix's smtp(8) "[host]:port").
SMTP_TRANSPORT_TABLE = "example.org smtp:[127.0.0.1]:{port}\n"

# Only the desk's mailboxes pass RCPT at the front: unknown addresses are refused there
# (550 5.1.1) instead of accepted and bounced later. recipient_delimiter makes
# support+anything@ (the gateway's reply tokens) match support@.
RECIPIENT_RECIPE: dict[str, str] = {
    "relay_recipient_maps": "texthash:{dir}/relay_recipients",
    "recipient_delimiter": "+",
}

# RFC 8601 section 5: remove every incoming Authentication-Results field carrying the
# authserv-id the gateway trusts (here the front's own name), before anything adds one.
STRIP_RECIPE: dict[str, str] = {"header_checks": "regexp:{dir}/header_checks"}
STRIP_TABLE = "/^Authentication-Results:\\s*mx\\.example\\.org\\b/ IGNORE\n"

# The bench's reference: Postfix's durable enqueue, then nothing (issue 14 item 1).
DISCARD_SETTINGS: dict[str, str] = {"default_transport": "discard"}


def unavailable() -> str | None:
    """Why a private Postfix cannot run here, or None if it can."""
    for tool in (POSTFIX, POSTCONF, POSTQUEUE):
        if not os.access(tool, os.X_OK):
            return (
                f"Postfix is not installed ({tool} missing; .ci/run installs it: "
                "apt-get install postfix)"
            )
    if not SYSTEM_MASTER_CF.is_file():
        return f"Postfix is installed without {SYSTEM_MASTER_CF}"
    if os.geteuid() != 0:
        return "a private Postfix needs root (its master process runs as root)"
    return None


def free_port() -> int:
    """A loopback port nobody listens on now (Postfix cannot be told to pick one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            return conn.recv(4).startswith(b"220")
    except OSError:
        return False


class PostfixError(Exception):
    pass


class Postfix:
    """One private instance. `settings` are main.cf parameters over BASE_SETTINGS,
    `tables` files written into the config directory; `{dir}` in either is replaced by
    the config directory. Use as a context manager, or start() and always stop()."""

    def __init__(
        self, settings: dict[str, str] | None = None, tables: dict[str, str] | None = None
    ) -> None:
        self.settings = dict(BASE_SETTINGS, **(settings or {}))
        self.tables = dict(tables or {})
        self.root = Path(tempfile.mkdtemp(prefix="gateway-postfix-"))
        # Postfix's daemons run as mail_owner and must reach their queue below this.
        self.root.chmod(0o755)
        self.config_directory = self.root / "etc"
        self.queue_directory = self.root / "queue"
        self.data_directory = self.root / "data"
        self.maillog = self.root / "maillog"
        self.port = 0
        self.started = False

    # --- running Postfix's own commands ---------------------------------------------

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        found = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
        if check and found.returncode != 0:
            raise PostfixError(
                f"{' '.join(argv)} exited {found.returncode}: {found.stderr or found.stdout}"
            )
        return found

    def postconf(self, *args: str) -> str:
        return self.run(POSTCONF, "-c", str(self.config_directory), *args).stdout

    def postfix(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(POSTFIX, "-c", str(self.config_directory), command, check=check)

    def fill(self, text: str) -> str:
        return text.replace("{dir}", str(self.config_directory))

    # --- life cycle ----------------------------------------------------------------------

    def configure(self) -> None:
        self.config_directory.mkdir()
        # `postfix check` creates what is inside the queue, not the queue itself.
        self.queue_directory.mkdir()
        shutil.copy(SYSTEM_MASTER_CF, self.config_directory / "master.cf")
        (self.config_directory / "main.cf").write_text("")
        for name, text in self.tables.items():
            (self.config_directory / name).write_text(self.fill(text))
        self.port = free_port()
        settings = dict(
            self.settings,
            queue_directory=str(self.queue_directory),
            data_directory=str(self.data_directory),
            maillog_file=str(self.maillog),
            maillog_file_prefixes=str(self.root),
        )
        self.postconf("-e", *(f"{key}={self.fill(value)}" for key, value in settings.items()))
        # Our own listener on loopback instead of port 25; no chroot (the system's master.cf
        # chroots some daemons, which would need a copy of /etc files in our queue).
        self.postconf("-MX", "smtp/inet")
        self.postconf(
            "-M", f"127.0.0.1:{self.port}/inet=127.0.0.1:{self.port} inet n - n - - smtpd"
        )
        self.postconf("-F", "*/*/chroot=n")

    def start(self) -> Postfix:
        try:
            self.configure()
            self.postfix("check")
            self.started = True
            self.postfix("start")
            deadline = time.monotonic() + START_TIMEOUT
            while not greets(self.port):
                if time.monotonic() > deadline:
                    raise PostfixError(
                        f"private Postfix did not greet on port {self.port}:\n{self.log_text()}"
                    )
                time.sleep(0.02)  # a one-off wait for the listener, bounded above
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the instance (if it was started) and remove its folder. Never raises for a
        Postfix that is already down."""
        if self.started:
            self.started = False
            pid = self.master_pid()
            done = self.postfix("stop", check=False)
            if done.returncode != 0 and pid:
                # `postfix stop` failed (a broken config): end our master by its pid.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            self._wait_gone(pid)
        shutil.rmtree(self.root, ignore_errors=True)

    def _wait_gone(self, pid: int | None, timeout: float = 10.0) -> None:
        if not pid:
            return
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # master exits after its children; bounded above
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what it did ---------------------------------------------------------------------

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_directory / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def log_text(self) -> str:
        try:
            return self.maillog.read_text("utf-8", "replace")
        except OSError:
            return ""

    def statuses(self) -> list[tuple[str, str, str]]:
        """(queue id, recipient, status) for every delivery attempt in the maillog:
        status is sent, deferred, bounced or discarded."""
        return [
            (m.group(1), m.group(2), m.group(3))
            for m in re.finditer(r" ([0-9A-F]+): to=<([^>]*)>.*? status=(\w+)", self.log_text())
        ]

    def queue(self) -> list[dict[str, object]]:
        """The messages in its queue (`postqueue -j`), one dict each."""
        out = self.run(POSTQUEUE, "-c", str(self.config_directory), "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        """`postqueue -f`: retry deferred mail now (and revive a destination marked dead)."""
        self.run(POSTQUEUE, "-c", str(self.config_directory), "-f")

    def queued_files(self) -> int:
        """Queue files not yet delivered (cheaper than `postqueue -j` for the bench)."""
        count = 0
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.queue_directory / name):
                count += len(files)
        return count

    def processes(self) -> list[int]:
        """Master and every process below it."""
        pid = self.master_pid()
        return [] if pid is None else _process_tree(pid)

    def cpu_seconds(self) -> float:
        """CPU time of master and its daemons (smtpd, cleanup, qmgr, trivial-rewrite,
        discard, ...), including those that have exited: master reaps them, so their time
        is in its cutime/cstime."""
        ticks = 0
        for pid in self.processes():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            ticks += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
        return ticks / CLOCK_TICKS


def _process_tree(pid: int) -> list[int]:
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found.extend(_process_tree(int(child)))
    return found
