"""Send a corpus of real-world mail to a gateway over SMTP and report what became of it.

    .venv/bin/python bench/corpus.py DIR...                   # starts its own gateway
    .venv/bin/python bench/corpus.py --json DIR...            # machine-readable summary
    .venv/bin/python bench/corpus.py --port 2525 --config config.toml [--daemon-log F] DIR...

Every message file under each DIR is sent to support@example.org, one SMTP transaction on
a connection of its own, with `--concurrency` (8) transactions at a time. Then the stored
rows (`gateway messages list --json`) are matched to the replies by queue id, and the
daemon log is read. Per DIR it reports: files, skipped files and why, accepted, rejected
(5xx, by reply code), temp-failed (4xx, by reply code), transactions with no reply, stored
messages flagged malformed (by reason), classification counts, duplicates, messages held
in the quarantine (by reason), tickets made (tickets whose first message came from this
DIR), and the daemon's warning and error lines (by event, first few in full). Every 4xx and
5xx is listed with its file, so a human can judge whether the refusal is right.

Mail from senders the desk does not know is held in the quarantine, so a plain run makes
no tickets. `--authorise` first adds an organisation "corpus-runner" and authorises every
From address of the corpus for it (`gateway orgs add`, `gateway senders import`), so that
the mail is threaded; with `--port`, use it only on a scratch database.

With `--start` (the default when no `--port` is given) the script runs its own gateway:
`python -m gateway.cli --config <tmp>/config.toml serve` on port 0, a fresh database in a
temporary folder, `max_message_size` 50 MiB, log level info, stdout and stderr captured
to a log file; it stops it with SIGTERM at the end and expects exit code 0. `--keep`
keeps the folder (database, log) for inspection. With `--port` it sends to a running
gateway; stored rows are read from the database named by `--config` (none without it) and
log lines from `--daemon-log` (none without it).

Which files are sent: every regular file whose name ends in .eml or .msg, or has no
extension, or whose first line is a header field (`Name: value`) or an mbox "From " line.
Skipped: LICENSE*, README*, COPYING*, SOURCE.json, expected*.json, files matched by the
`ignore_globs` of a SOURCE.json in DIR (the corpus's own list of non-mail, such as
expected-result files), and files of other extensions that do not start like a message.

What is sent: the file's bytes with its line endings converted to CRLF (SMTP requires
CRLF; a file whose lines end in bare CR, old Mac style, is converted too; a stray CR inside
an LF or CRLF file is kept as it is), a leading mbox "From " line removed, a final CRLF
added if missing, dot-stuffed. Envelope sender: the first Return-Path address; a
Return-Path of `<>` or without a domain (`<MAILER-DAEMON>`, `<null>`) means the null
sender; without a Return-Path, the first From address that is a plain addr-spec; else the
null sender. SMTPUTF8 is requested for a non-ASCII sender, BODY=8BITMIME for 8-bit content.

Exit status: 1 if the gateway crashed or did not exit 0 on SIGTERM, any transaction got a
4xx or no reply at all, an accepted message is missing from the database, or the daemon
logged a line at level error or wrote output that is not a log line (a traceback); else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

RECIPIENT = "support@example.org"
EHLO_NAME = "corpus-runner.example.net"
MAX_MESSAGE_SIZE = 50 * 1024 * 1024
START_TIMEOUT = 30.0
STOP_TIMEOUT = 90.0
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0
# The final reply waits for parse + commit: parse is bounded by parser.wall_seconds (15 s)
# and a DATA slot by smtp.data_slot_wait (30 s); this leaves plenty of room above both.
DATA_TIMEOUT = 180.0
FIRST_LOG_LINES = 3
LIST_LIMIT = 50  # files listed per section in the text report (--json lists all)
LOG_TAIL = 20  # last log lines shown when the gateway crashed

READY = re.compile(r"event=gateway\.ready .*listen=[^ ]*:(\d+)")
MAIL_SUFFIXES = frozenset({".eml", ".msg"})
# Files that are never mail, whatever their content.
PROJECT_FILES = ("LICENSE*", "README*", "COPYING*", "SOURCE.json", "expected*.json")
# RFC 5322 field name (printable ASCII but ':'), then ':'.
HEADER_LINE = re.compile(rb"^[!-9;-~]+[ \t]*:")
MBOX_FROM = b"From "
# A plain addr-spec: no spaces, brackets, quotes, commas or routes. Quoted local parts are
# not used as envelope senders (the next candidate is tried instead).
PLAIN_ADDRESS = re.compile(r"^[^\s<>()\[\],;:\\\"@]+@[^\s<>()\[\],;:\\\"@]+$")
REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")
ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")
QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")
REF = re.compile(r"\(ref ([0-9A-Za-z]+)\)")
LOG_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


# --- choosing and preparing files -------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    path: Path
    folder: int  # index of the DIR it was found under
    relative: str  # path relative to that DIR


@dataclass(frozen=True)
class Skipped:
    relative: str
    reason: str


def source_ignores(directory: Path) -> list[tuple[Path, list[str]]]:
    """(folder, ignore_globs) of every SOURCE.json under `directory`."""
    found = []
    for source in sorted(directory.rglob("SOURCE.json")):
        try:
            globs = json.loads(source.read_text("utf-8")).get("ignore_globs", [])
        except (OSError, ValueError, AttributeError):
            continue
        found.append((source.parent, [str(g) for g in globs]))
    return found


def _glob_match(relative: str, pattern: str) -> bool:
    # fnmatch's '*' crosses '/', so "**/x" also needs trying without its "**/" for top level.
    if fnmatch.fnmatchcase(relative, pattern):
        return True
    return pattern.startswith("**/") and fnmatch.fnmatchcase(relative, pattern[3:])


def starts_like_message(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(1024)
    except OSError:
        return False
    first = re.split(rb"\r\n|\r|\n", head, maxsplit=1)[0]
    return first.startswith(MBOX_FROM) or HEADER_LINE.match(first) is not None


def choose_files(
    directories: Sequence[Path],
) -> tuple[list[Candidate], list[list[Skipped]]]:
    chosen: list[Candidate] = []
    skipped: list[list[Skipped]] = [[] for _ in directories]
    for index, directory in enumerate(directories):
        ignores = source_ignores(directory)
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            relative = path.relative_to(directory).as_posix()
            reason = _skip_reason(path, ignores)
            if reason is None:
                chosen.append(Candidate(path, index, relative))
            else:
                skipped[index].append(Skipped(relative, reason))
    return chosen, skipped


def _skip_reason(path: Path, ignores: list[tuple[Path, list[str]]]) -> str | None:
    if path.is_symlink():
        return "symbolic link"
    if any(fnmatch.fnmatchcase(path.name, pattern) for pattern in PROJECT_FILES):
        return "project file (licence, readme, source or expected results)"
    for folder, globs in ignores:
        if folder not in path.parents:
            continue
        inner = path.relative_to(folder).as_posix()
        if any(_glob_match(inner, pattern) for pattern in globs):
            return "listed in SOURCE.json ignore_globs"
    suffix = path.suffix.lower()
    if suffix in MAIL_SUFFIXES or suffix == "":
        return None
    if starts_like_message(path):
        return None
    return f"{suffix} file that does not start with a header line"


@dataclass(frozen=True)
class Prepared:
    payload: bytes  # CRLF line endings, not dot-stuffed
    mail_from: str  # "" for the null sender
    sender_source: str  # return-path, return-path-null, from, none
    notes: tuple[str, ...]  # what was changed or found, for the report
    headerless: bool  # the first line is not a header field
    longest_line: int  # octets, CRLF included
    from_address: str | None  # the first From address, if it is a plain addr-spec


def prepare(data: bytes) -> Prepared:
    notes: list[str] = []
    crlf = data.count(b"\r\n")
    lf = data.count(b"\n")
    cr = data.count(b"\r")
    if lf == 0 and cr > 0:
        data = data.replace(b"\r", b"\r\n")
        notes.append("CR->CRLF")
    elif lf > crlf:
        data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
        notes.append("LF->CRLF" if crlf == 0 else "mixed->CRLF")
    if lf and cr > crlf:
        notes.append(f"stray-CR-kept:{cr - crlf}")
    if data.startswith(MBOX_FROM):
        data = data.partition(b"\r\n")[2]
        notes.append("mbox-From-stripped")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
        notes.append("final-CRLF-added")
    first = data.partition(b"\r\n")[0]
    headerless = HEADER_LINE.match(first) is None
    mail_from, source = envelope_sender(data)
    longest = max((len(line) + 2 for line in data.split(b"\r\n")), default=0)
    return Prepared(data, mail_from, source, tuple(notes), headerless, longest, from_address(data))


def _header_fields(data: bytes) -> Iterable[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field of the header block, in order."""
    end = data.find(b"\r\n\r\n")
    block = data if end < 0 else data[: end + 2]
    text = block.decode("utf-8", "replace")
    for item in re.split(r"\r\n(?![ \t])", text):
        name, sep, value = item.partition(":")
        if sep and name and " " not in name.strip():
            yield name.strip().lower(), re.sub(r"\r\n[ \t]", " ", value).strip()


def from_address(data: bytes) -> str | None:
    for name, value in _header_fields(data):
        if name == "from":
            for _, address in getaddresses([value]):
                if PLAIN_ADDRESS.match(address):
                    return address
            return None
    return None


def envelope_sender(data: bytes) -> tuple[str, str]:
    """(MAIL FROM address, where it came from): Return-Path, else From, else null."""
    return_path = None
    from_value = None
    for name, value in _header_fields(data):
        if name == "return-path" and return_path is None:
            return_path = value
        elif name == "from" and from_value is None:
            from_value = value
    if return_path is not None:
        inner = return_path.strip()
        if inner.startswith("<") and ">" in inner:
            inner = inner[1 : inner.index(">")]
        inner = inner.strip()
        if not inner or "@" not in inner:
            return "", "return-path-null"
        if PLAIN_ADDRESS.match(inner):
            return inner, "return-path"
    if from_value is not None:
        for _, address in getaddresses([from_value]):
            if PLAIN_ADDRESS.match(address):
                return address, "from"
    return "", "none"


def dot_stuff(payload: bytes) -> bytes:
    stuffed = re.sub(rb"(?m)^\.", b"..", payload)
    return stuffed + b".\r\n"


# --- the SMTP client ----------------------------------------------------------------------


@dataclass
class Outcome:
    """One file's transaction: the last reply it got, and what the gateway stored."""

    folder: int
    file: str
    size: int  # bytes sent (after line-ending conversion, before dot-stuffing)
    mail_from: str
    sender_source: str
    notes: list[str]
    headerless: bool
    longest_line: int
    stage: str = "connect"  # the command whose reply ended the transaction
    code: int = 0  # 0: no reply at all
    enhanced: str = ""
    reply: str = ""
    queue_id: str | None = None
    peer: str = ""  # our address as the gateway logs it (host:port)
    seconds: float = 0.0
    row: dict[str, Any] | None = None
    log_lines: list[str] = field(default_factory=list)  # its warning and error lines
    filed_reason: str = ""  # reason= of its message.stored / message.quarantined line

    @property
    def accepted(self) -> bool:
        return self.stage == "dot" and self.code == 250

    @property
    def code_key(self) -> str:
        return f"{self.code} {self.enhanced}".strip() if self.code else "no reply"


class SmtpError(Exception):
    pass


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self, wait: float = COMMAND_TIMEOUT) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), wait)
            if not line:
                raise SmtpError("connection closed" + (": " + " | ".join(lines) if lines else ""))
            match = REPLY_LINE.match(line.rstrip(b"\r\n"))
            if match is None:
                raise SmtpError(f"not an SMTP reply: {line[:80]!r}")
            lines.append(match.group(3).decode("utf-8", "replace"))
            if match.group(2) == b" ":
                return int(match.group(1)), "\n".join(lines)

    async def command(self, line: str) -> tuple[int, str]:
        self.writer.write(line.encode("utf-8") + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def transact(host: str, port: int, candidate: Candidate, prepared: Prepared) -> Outcome:
    outcome = Outcome(
        folder=candidate.folder,
        file=candidate.relative,
        size=len(prepared.payload),
        mail_from=prepared.mail_from,
        sender_source=prepared.sender_source,
        notes=list(prepared.notes),
        headerless=prepared.headerless,
        longest_line=prepared.longest_line,
    )
    started = time.monotonic()

    def record(stage: str, code: int, text: str) -> None:
        outcome.stage, outcome.code = stage, code
        first = text.splitlines()[0] if text else ""
        match = ENHANCED.match(first)
        outcome.enhanced = match.group(1) if match else ""
        outcome.reply = f"{code} {text}".replace("\n", " | ")

    client: Client | None = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), CONNECT_TIMEOUT
        )
        client = Client(reader, writer)
        local = writer.get_extra_info("sockname")
        outcome.peer = f"[{local[0]}]:{local[1]}" if ":" in local[0] else f"{local[0]}:{local[1]}"
        code, text = await client.reply()
        record("greeting", code, text)
        if code != 220:
            return outcome
        code, text = await client.command(f"EHLO {EHLO_NAME}")
        record("ehlo", code, text)
        if code != 250:
            return outcome
        extensions = {line.split()[0].upper() for line in text.splitlines()[1:] if line.split()}
        params = []
        if "SIZE" in extensions:
            params.append(f"SIZE={len(prepared.payload)}")
        if "8BITMIME" in extensions and re.search(rb"[\x80-\xff]", prepared.payload):
            params.append("BODY=8BITMIME")
        if not prepared.mail_from.isascii() and "SMTPUTF8" in extensions:
            params.append("SMTPUTF8")
        mail = " ".join([f"MAIL FROM:<{prepared.mail_from}>", *params])
        code, text = await client.command(mail)
        record("mail", code, text)
        if code != 250:
            return outcome
        code, text = await client.command(f"RCPT TO:<{RECIPIENT}>")
        record("rcpt", code, text)
        if code != 250:
            return outcome
        code, text = await client.command("DATA")
        record("data", code, text)
        if code != 354:
            return outcome
        client.writer.write(dot_stuff(prepared.payload))
        try:
            await client.writer.drain()
        except (ConnectionError, OSError):
            pass  # the gateway may have answered and hung up: read what it said
        code, text = await client.reply(DATA_TIMEOUT)
        record("dot", code, text)
        match = QUEUED_AS.search(text)
        if code == 250 and match:
            outcome.queue_id = match.group(1)
        try:
            await client.command("QUIT")
        except (SmtpError, ConnectionError, OSError, TimeoutError):
            pass
        return outcome
    except (SmtpError, ConnectionError, OSError, TimeoutError) as exc:
        # The stage stays at the last command answered; the code becomes "no reply".
        outcome.stage = f"after {outcome.stage}" if outcome.code else outcome.stage
        outcome.code, outcome.enhanced = 0, ""
        outcome.reply = f"no reply: {type(exc).__name__}: {exc}"
        return outcome
    finally:
        outcome.seconds = time.monotonic() - started
        if client is not None:
            await client.close()


async def send_all(
    host: str, port: int, files: Sequence[tuple[Candidate, Prepared]], concurrency: int
) -> list[Outcome]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(files)):
        queue.put_nowait(index)
    results: list[Outcome | None] = [None] * len(files)

    async def worker() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            candidate, prepared = files[index]
            results[index] = await transact(host, port, candidate, prepared)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in results if r is not None]


# --- the gateway under test ---------------------------------------------------------------


CONFIG = """\
[smtp]
host = "127.0.0.1"
port = 0
hostname = "support.example.org"
max_message_size = {max_message_size}
max_connections = {max_connections}
max_connections_per_ip = {max_connections}
timeout = 300

[storage]
database = "gateway.db"

[log]
level = "info"

[[mailbox]]
address = "{recipient}"
unit = "support"
"""


class Daemon:
    """`python -m gateway.cli --config X serve` in a folder of its own."""

    def __init__(self, folder: Path, concurrency: int) -> None:
        self.folder = folder
        self.config = folder / "config.toml"
        self.log = folder / "gateway.log"
        self.config.write_text(
            CONFIG.format(
                max_message_size=MAX_MESSAGE_SIZE,
                max_connections=max(100, 2 * concurrency),
                recipient=RECIPIENT,
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.crashed: str | None = None  # why, if it exited on its own or badly

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("NOTIFY_SOCKET", None)
        argv = [sys.executable, "-m", "gateway.cli", "--config", str(self.config), "serve"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = READY.search(self.log.read_text("utf-8", "replace"))
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)  # waiting for a child's first line, bounded by the deadline
        self.stop()
        raise RuntimeError("gateway did not start:\n" + self.log.read_text("utf-8", "replace"))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            self.crashed = self.crashed or f"died during the run (exit code {self.proc.returncode})"
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.crashed = f"did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM (killed)"
            return None
        if code != 0:
            self.crashed = f"exited {code} on SIGTERM"
        return code


def gateway_json(config: Path, *command: str) -> list[dict[str, Any]]:
    """`gateway --config X <command> --json`, parsed: the CLI is the read interface."""
    argv = [sys.executable, "-m", "gateway.cli", "--config", str(config), *command, "--json"]
    done = subprocess.run(argv, capture_output=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        error = done.stderr.decode("utf-8", "replace").strip()
        raise RuntimeError(f"{' '.join(command)} failed: {error}")
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


AUTHORISED_ORG = "corpus-runner"


def authorise_senders(config: Path, addresses: Iterable[str]) -> tuple[int, list[str]]:
    """Add organisation `corpus-runner` and authorise these addresses for it, through the
    CLI (`orgs add`, `senders import`). Rows the CLI refuses are dropped and the import is
    retried (it imports all rows or none). Returns (authorised, refused with reasons)."""
    argv = [sys.executable, "-m", "gateway.cli", "--config", str(config)]
    reason = ["--reason", "bench/corpus.py --authorise"]
    done = subprocess.run(
        [*argv, "orgs", "add", AUTHORISED_ORG, *reason], capture_output=True, cwd=ROOT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"orgs add failed: {done.stderr.decode('utf-8', 'replace').strip()}")
    rows = sorted({a.lower() for a in addresses})
    refused: list[str] = []
    for _ in range(20):
        if not rows:
            return 0, refused
        text = "address,org,name\n" + "".join(f"{a},{AUTHORISED_ORG},\n" for a in rows)
        done = subprocess.run(
            [*argv, "senders", "import", "-", *reason],
            input=text.encode(),
            capture_output=True,
            cwd=ROOT,
            check=False,
        )
        if done.returncode == 0:
            return len(rows), refused
        errors = done.stderr.decode("utf-8", "replace")
        bad = {int(n): why for n, why in re.findall(r":(\d+): (.*)", errors)}
        if not bad:
            raise RuntimeError(f"senders import failed: {errors.strip()}")
        refused += [f"{rows[n - 2]}: {why}" for n, why in sorted(bad.items()) if n >= 2]
        rows = [a for i, a in enumerate(rows) if i + 2 not in bad]
    raise RuntimeError("senders import kept failing")


# --- the daemon log -----------------------------------------------------------------------


@dataclass(frozen=True)
class LogLine:
    level: str  # "" for lines that are not in the gateway's format (tracebacks on stderr)
    event: str
    fields: dict[str, str]
    text: str


def parse_log(text: str) -> list[LogLine]:
    lines = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        fields: dict[str, str] = {}
        for match in LOG_FIELD.finditer(raw):
            key, value = match.group(1), match.group(2)
            if value.startswith('"'):
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            fields.setdefault(key, value)
        level = fields.get("level", "") if raw.startswith("level=") else ""
        lines.append(LogLine(level, fields.get("event", "") if level else "", fields, raw))
    return lines


def attribute_log(lines: Sequence[LogLine], outcomes: Sequence[Outcome]) -> list[LogLine]:
    """Attach each warning/error line to its file's outcome; return those that fit none."""
    by_peer: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        if outcome.peer:
            by_peer.setdefault(outcome.peer, []).append(outcome)
    by_queue: dict[str, Outcome] = {}
    by_ref: dict[str, Outcome] = {}
    for outcome in outcomes:
        if outcome.queue_id:
            by_queue[outcome.queue_id] = outcome
        match = REF.search(outcome.reply)
        if match:
            by_ref[match.group(1)] = outcome
    # message.received carries queue id, peer and size: how a refused message (whose reply
    # has no queue id) is tied to its file.
    for line in lines:
        if line.event != "message.received":
            continue
        queue_id = line.fields.get("queue_id", "")
        for outcome in by_peer.get(line.fields.get("peer", ""), []):
            if str(outcome.size) == line.fields.get("size") and outcome.queue_id in (
                None,
                queue_id,
            ):
                by_queue.setdefault(queue_id, outcome)
                break
    unattributed = []
    for line in lines:
        if line.event in ("message.stored", "message.quarantined"):
            filed = by_queue.get(line.fields.get("queue_id", ""))
            if filed is not None:
                filed.filed_reason = line.fields.get("reason", "")
        if line.level in ("info", "debug"):
            continue
        target = (
            by_queue.get(line.fields.get("queue_id", ""))
            or by_ref.get(line.fields.get("ref", ""))
            or next(iter(by_peer.get(line.fields.get("peer", ""), [])), None)
        )
        if target is None:
            unattributed.append(line)
        else:
            target.log_lines.append(line.text)
    return unattributed


def _level_of(text: str) -> str:
    return text.partition(" ")[0].removeprefix("level=") if text.startswith("level=") else ""


def _event_of(text: str) -> str:
    match = re.search(r"\bevent=(\S+)", text)
    return match.group(1) if match and text.startswith("level=") else "(not a log line)"


# --- the report -----------------------------------------------------------------------------


def summarise(
    directory: Path, skipped: Sequence[Skipped], outcomes: Sequence[Outcome], tickets: set[int]
) -> dict[str, Any]:
    accepted = [o for o in outcomes if o.accepted]
    stored = [o.row for o in accepted if o.row is not None]
    log_lines = [line for o in outcomes for line in o.log_lines]
    warnings = Counter(_event_of(t) for t in log_lines if _level_of(t) == "warning")
    errors = Counter(_event_of(t) for t in log_lines if _level_of(t) in ("error", "critical"))
    other = [t for t in log_lines if _level_of(t) not in ("warning", "error", "critical")]

    def refusal(o: Outcome) -> dict[str, Any]:
        return {
            "file": o.file,
            "stage": o.stage,
            "reply": o.reply,
            "mail_from": o.mail_from or "<>",
            "size": o.size,
            "longest_line": o.longest_line,
            "log": o.log_lines,
        }

    return {
        "folder": str(directory),
        "files": len(outcomes) + len(skipped),
        "skipped": dict(Counter(s.reason for s in skipped)),
        "skipped_files": [asdict(s) for s in skipped],
        "sent": len(outcomes),
        "sent_headerless": sum(o.headerless for o in outcomes),
        "conversions": dict(Counter(n.partition(":")[0] for o in outcomes for n in o.notes)),
        "envelope_senders": dict(Counter(o.sender_source for o in outcomes)),
        "accepted": len(accepted),
        "rejected": dict(Counter(o.code_key for o in outcomes if 500 <= o.code < 600)),
        "temp_failed": dict(Counter(o.code_key for o in outcomes if 400 <= o.code < 500)),
        "no_reply": sum(o.code == 0 for o in outcomes),
        "other_replies": dict(
            Counter(o.code_key for o in outcomes if o.code and o.code < 400 and not o.accepted)
        ),
        "stored": len(stored),
        "missing_from_database": [o.file for o in accepted if o.row is None],
        "malformed": dict(Counter(r["malformed"] for r in stored if r["malformed"])),
        "malformed_files": [
            {"file": o.file, "reason": o.row["malformed"]}
            for o in accepted
            if o.row is not None and o.row["malformed"]
        ],
        "headerless_files": [o.file for o in outcomes if o.headerless],
        "classification": dict(Counter(r["classification"] for r in stored)),
        "kind": dict(Counter(r["kind"] or "none" for r in stored)),
        "duplicates": sum(r["duplicate_of"] is not None for r in stored),
        # Held for review (mail from senders the desk does not know), by the log's reason.
        "quarantined": dict(
            Counter(
                o.filed_reason or "?"
                for o in accepted
                if o.row is not None and o.row.get("quarantine") is not None
            )
        ),
        "tickets_made": len(tickets),
        "log_warnings": dict(warnings),
        "log_errors": dict(errors),
        "log_first": {
            level: [t for t in log_lines if _level_of(t) in names][:FIRST_LOG_LINES]
            for level, names in (("error", ("error", "critical")), ("warning", ("warning",)))
        },
        "log_other": other[:FIRST_LOG_LINES],
        "tempfail_files": [refusal(o) for o in outcomes if 400 <= o.code < 500],
        "no_reply_files": [refusal(o) for o in outcomes if o.code == 0],
        "rejected_files": [refusal(o) for o in outcomes if 500 <= o.code < 600],
        "seconds_max": round(max((o.seconds for o in outcomes), default=0.0), 3),
    }


def tickets_made(rows: Sequence[dict[str, Any]], queue_ids: set[str]) -> set[int]:
    """Tickets whose first message (the one that created it) has one of these queue ids."""
    first: dict[int, dict[str, Any]] = {}
    for row in rows:
        number = row.get("ticket")
        if number is not None and (number not in first or row["id"] < first[number]["id"]):
            first[number] = row
    return {n for n, row in first.items() if row["queue_id"] in queue_ids}


def _short(text: str, width: int = 200) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render(report: dict[str, Any]) -> str:
    folders: list[dict[str, Any]] = report["folders"]
    names = [Path(f["folder"]).name or f["folder"] for f in folders]
    out: list[str] = []
    run = report["run"]
    out.append(
        f"corpus run: {len(folders)} folder(s), {run['sent']} files sent, "
        f"{run['skipped']} skipped, {run['seconds']:.1f} s, concurrency {run['concurrency']}"
    )
    out.append(f"gateway: {run['gateway']}")
    out.append(f"database: {run['database_messages']} messages, {run['database_tickets']} tickets")
    if run["authorised"]:
        auth = run["authorised"]
        out.append(
            f"authorised first: {auth['senders']} From addresses (organisation "
            f"{auth['organisation']}), {len(auth['refused'])} refused by the CLI"
        )
        out.extend(f"  refused: {line}" for line in auth["refused"][:10])
    else:
        out.append("authorised senders: none added by this run (see --authorise)")
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, key: str, sub: str | None = None) -> None:
        values = []
        for f in folders:
            value = f[key] if sub is None else f[key].get(sub, 0)
            values.append(str(len(value) if isinstance(value, list) else value))
        rows.append((label, values))

    def add_group(label: str, key: str, total: Any = None) -> None:
        subs = sorted({k for f in folders for k in f[key]})
        if total is None:
            rows.append((label, [str(sum(f[key].values())) for f in folders]))
        else:
            rows.append((label, [str(total(f)) for f in folders]))
        for sub in subs:
            add(f"  {sub}", key, sub)

    add("files", "files")
    add_group("skipped", "skipped")
    add("sent", "sent")
    add("  of which headerless", "sent_headerless")
    add("accepted (250)", "accepted")
    add_group("rejected (5xx)", "rejected")
    add_group("temp-failed (4xx)", "temp_failed")
    add("no reply", "no_reply")
    if any(f["other_replies"] for f in folders):
        add_group("other replies", "other_replies")
    add("stored (matched by queue id)", "stored")
    add("missing from database", "missing_from_database")
    add_group("malformed", "malformed")
    add_group("classification", "classification")
    add_group("kind (filing)", "kind")
    add("duplicates (filed once)", "duplicates")
    add_group("quarantined (held)", "quarantined")
    add("tickets made", "tickets_made")
    add_group("daemon warnings", "log_warnings")
    add_group("daemon errors", "log_errors")
    add_group("line endings changed", "conversions", total=lambda f: "")
    add_group("envelope sender from", "envelope_senders")

    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    out.append("")
    out.append(
        " " * label_width + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True))
    )
    for label, values in rows:
        cells = "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))
        out.append(f"{label.ljust(label_width)}  {cells}".rstrip())

    for f, name in zip(folders, names, strict=True):
        out.append("")
        out.append(f"== {name} ({f['folder']})")
        if f["skipped_files"]:
            out.append(f"skipped ({len(f['skipped_files'])}):")
            for s in f["skipped_files"]:
                out.append(f"  {s['relative']}: {s['reason']}")
        for title, key in (
            ("TEMP-FAILED (4xx): suspicious, our own error", "tempfail_files"),
            ("NO REPLY: crash or hang-up?", "no_reply_files"),
            ("rejected (5xx): judge whether each refusal is right", "rejected_files"),
        ):
            if not f[key]:
                continue
            out.append(f"{title} ({len(f[key])}):")
            for item in f[key][:LIST_LIMIT]:
                out.append(f"  {item['file']}  [{item['stage']}] {_short(item['reply'])}")
                out.append(
                    f"      MAIL FROM:<{item['mail_from'].strip('<>')}>, {item['size']} octets, "
                    f"longest line {item['longest_line']} octets with CRLF"
                )
                for line in item["log"][:FIRST_LOG_LINES]:
                    out.append(f"      log: {_short(line, 300)}")
        if f["malformed_files"]:
            out.append(f"stored as malformed ({len(f['malformed_files'])}):")
            out.extend(f"  {m['file']}: {m['reason']}" for m in f["malformed_files"])
        if f["headerless_files"]:
            out.append(f"sent without a header line first ({len(f['headerless_files'])}):")
            out.extend(f"  {name}" for name in f["headerless_files"])
        if f["missing_from_database"]:
            out.append("ACCEPTED BUT NOT IN THE DATABASE: " + ", ".join(f["missing_from_database"]))
        for level in ("error", "warning"):
            if f["log_first"][level]:
                out.append(f"first daemon {level} lines:")
                out.extend(f"  {_short(t, 400)}" for t in f["log_first"][level])
    if report["unattributed_log"]:
        out.append("")
        count = len(report["unattributed_log"])
        out.append(f"daemon warning/error/other output tied to no file ({count}):")
        out.extend(f"  {_short(t, 400)}" for t in report["unattributed_log"][:10])
    if report["log_tail"]:
        out.append("")
        out.append("last lines of the gateway's log:")
        out.extend(f"  {_short(t, 400)}" for t in report["log_tail"])
    out.append("")
    out.append(f"result: {'FAIL' if report['failures'] else 'ok'}")
    out.extend(f"  - {reason}" for reason in report["failures"])
    return "\n".join(out)


# --- main -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Send every message file under DIR... to a gateway and report per folder."
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    parser.add_argument("--host", default="127.0.0.1", help="gateway address (with --port)")
    parser.add_argument("--port", type=int, help="send to a running gateway on this port")
    parser.add_argument("--config", type=Path, help="its config.toml, to read stored rows")
    parser.add_argument("--daemon-log", type=Path, help="its log file, to read its warnings")
    parser.add_argument(
        "--start", action="store_true", help="start a gateway of our own (default without --port)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="transactions at once (8)")
    parser.add_argument(
        "--authorise",
        action="store_true",
        help="first authorise every From address of the corpus (organisation "
        f"{AUTHORISED_ORG!r}), so that mail is threaded into tickets instead of held; it "
        "writes to the database: with --port, only for a scratch one",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    directories: list[Path] = [d.resolve() for d in args.dirs]
    for directory in directories:
        if not directory.is_dir():
            print(f"corpus.py: not a folder: {directory}", file=sys.stderr)
            return 2
    start = args.start or args.port is None
    if args.concurrency < 1:
        print("corpus.py: --concurrency must be 1 or more", file=sys.stderr)
        return 2

    if args.authorise and not start and args.config is None:
        print("corpus.py: --authorise needs --config (or --start)", file=sys.stderr)
        return 2

    candidates, skipped = choose_files(directories)
    files = [(c, prepare(c.path.read_bytes())) for c in candidates]
    authorised: dict[str, Any] | None = None
    workdir = Path(tempfile.mkdtemp(prefix="gateway-corpus-")) if start else None
    daemon: Daemon | None = None
    failures: list[str] = []
    log_text = ""
    config: Path | None = args.config
    log_offset = 0
    log_tail: list[str] = []
    if not start and args.daemon_log is not None and args.daemon_log.exists():
        log_offset = args.daemon_log.stat().st_size
    began = time.monotonic()
    try:
        if workdir is not None:
            daemon = Daemon(workdir, args.concurrency)
            config = daemon.config
        if args.authorise and config is not None:
            senders = (p.from_address for _, p in files if p.from_address)
            count, refused = authorise_senders(config, senders)
            authorised = {"organisation": AUTHORISED_ORG, "senders": count, "refused": refused}
        if daemon is not None:
            daemon.start()
            host, port = "127.0.0.1", daemon.port
        else:
            host, port = args.host, args.port
        outcomes = asyncio.run(send_all(host, port, files, args.concurrency))
        seconds = time.monotonic() - began
        if daemon is not None:
            code = daemon.stop()
            gateway = f"started by corpus.py (port {port}), exit code {code} on SIGTERM"
            if daemon.crashed:
                gateway = f"started by corpus.py (port {port}), {daemon.crashed}"
                failures.append(f"the gateway {daemon.crashed}")
            log_text = daemon.log.read_text("utf-8", "replace")
            if daemon.crashed:
                log_tail = log_text.splitlines()[-LOG_TAIL:]
        else:
            gateway = f"running at {host}:{port}"
            if args.daemon_log is not None:
                with args.daemon_log.open("rb") as fh:
                    fh.seek(log_offset)
                    log_text = fh.read().decode("utf-8", "replace")

        rows = gateway_json(config, "messages", "list") if config is not None else []
        tickets = gateway_json(config, "tickets", "list") if config is not None else []
        by_queue = {row["queue_id"]: row for row in rows}
        for outcome in outcomes:
            if outcome.queue_id is not None:
                outcome.row = by_queue.get(outcome.queue_id)
        unattributed = attribute_log(parse_log(log_text), outcomes)
        unattributed_text = [line.text for line in unattributed]

        folders = []
        for index, directory in enumerate(directories):
            mine = [o for o in outcomes if o.folder == index]
            queue_ids = {o.queue_id for o in mine if o.queue_id}
            made = tickets_made(rows, queue_ids)
            folders.append(summarise(directory, skipped[index], mine, made))

        if any(400 <= o.code < 500 for o in outcomes):
            failures.append("4xx replies (see TEMP-FAILED)")
        if any(o.code == 0 for o in outcomes):
            failures.append("transactions without a reply (see NO REPLY)")
        if any(f["missing_from_database"] for f in folders):
            failures.append("accepted messages missing from the database")
        errors = [t for t in unattributed_text if _level_of(t) in ("error", "critical")]
        if errors or any(f["log_errors"] for f in folders):
            failures.append("the daemon logged error lines")
        if any(not t.startswith("level=") for t in unattributed_text):
            failures.append("the daemon wrote output that is not a log line (a traceback?)")
        if config is None:
            gateway += " (no --config: stored rows not read)"
        report = {
            "run": {
                "seconds": round(seconds, 2),
                "sent": len(outcomes),
                "skipped": sum(len(s) for s in skipped),
                "concurrency": args.concurrency,
                "gateway": gateway,
                "workdir": str(workdir) if workdir is not None and args.keep else None,
                "database_messages": len(rows),
                "database_tickets": len(tickets),
                "authorised": authorised,
            },
            "folders": folders,
            "unattributed_log": unattributed_text,
            "log_tail": log_tail,
            "failures": failures,
        }
    finally:
        if daemon is not None and daemon.alive():
            daemon.stop()
        if workdir is not None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    if args.json:
        json.dump(report, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(report))
        if workdir is not None and args.keep:
            print(f"kept: {workdir} (config.toml, gateway.db, gateway.log)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
