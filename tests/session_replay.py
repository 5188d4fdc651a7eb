"""A recorded session of the whole desk: the reference for "behaviour unchanged" (issue 10).

A fixed scenario runs against the real daemon (`gateway.app.Gateway` on an ephemeral
loopback port, a real SQLite database in a temporary folder, the outbox writing `.eml`
files): 200 messages over real SMTP (`RawClient`, byte-exact) and 50 admin commands
through the real CLI (`gateway.cli.main` in this process, `--json` where the command has
it). Every SMTP reply line, and every command's exit status, stdout and stderr, is kept
as one step. What is legitimately random or time-based is replaced by the named patterns
of `NORMALISERS` (and only that), so two runs of unchanged code give identical steps.

    python -m tests.session_replay --record     # writes tests/golden/session.json
    python -m tests.session_replay              # replays and diffs against it

`tests/test_session_replay.py` replays it in the suite. Record again only when a change
of behaviour is intended, and say which steps changed and why in the commit.

Determinism: messages are sent one at a time, and after each one (and each command) the
session waits until the outbox has no queued row, so the daemon's own writes (delivery
marks) never interleave differently from one run to the next. Inputs are fixed bytes;
the only inputs read back from the daemon are the reply tokens and our Message-IDs
(random per database), taken from the mail the outbox wrote, as a client would.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import email
import email.policy
import io
import json
import os
import pwd
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import cli
from gateway.app import Gateway
from gateway.config import Config, load_config

from .conftest import RawClient, write_config

GOLDEN = Path(__file__).resolve().parent / "golden" / "session.json"
MESSAGES = 200
COMMANDS = 50

EXTRA_CONFIG = """
[staff]
addresses = ["dana@example.org", "sam@example.org", "tom@example.org"]
admins = ["admin@example.org"]

[policy]
trusted_authserv_ids = ["mx.example.org"]
loop_threshold_per_hour = 12
contact = "your account manager at Example"

[delivery]
directory = "var/outbox"
# Mail the CLI queues does not wake the daemon's worker: let it look often.
poll_interval = 0.05
"""

# Every input carries this Date: far from any day the session runs on, so the timestamp
# patterns below (which match only the days of the run) never touch it.
DATE = "Sun, 09 Sep 2001 10:00:00 +0000"
# Staff mail counts as staff only with an aligned pass from a trusted authserv-id.
AUTH_OK = "Authentication-Results: mx.example.org; dkim=pass header.d=example.org\r\n"


# --- normalisation -----------------------------------------------------------------------
#
# Each pattern names one thing that legitimately differs between two runs of the same
# code. Values that identify something (queue ids, our Message-IDs) are numbered in order
# of first appearance instead of blanked, so "the same id twice" still compares.


@dataclass
class Normaliser:
    """Rewrites one run's output into its comparable form (stateful: numbering)."""

    tmp: str
    run_days: tuple[str, ...]  # the UTC dates (YYYY-MM-DD) the run spanned
    user: str
    seen: dict[str, dict[str, int]] = field(default_factory=dict)

    def number(self, kind: str, value: str) -> int:
        table = self.seen.setdefault(kind, {})
        return table.setdefault(value, len(table) + 1)

    def __call__(self, text: str) -> str:
        for _name, apply in NORMALISERS:
            text = apply(self, text)
        return text


def _sub(pattern: re.Pattern[str], make: Callable[[Normaliser, re.Match[str]], str]) -> Any:
    return lambda n, text: pattern.sub(lambda m: make(n, m), text)


# Queue ids: secrets.token_hex(8) per message, in the 250 reply and the `queue_id` fields.
QUEUE_ID = re.compile(r"(?<=queued as )[0-9a-f]{16}\b|(?<=\"queue_id\": \")[0-9a-f]{16}(?=\")")
# The reference in a 451 reply (a random uuid fragment, README "Limits and replies").
TEMPFAIL_REF = re.compile(r"\(ref [0-9a-f]{12}\)")
# Our own Message-IDs: <gw.t<ticket>.<20 random hex>@hostname> (notify.new_message_id).
OUR_MESSAGE_ID = re.compile(r"<gw\.(t\d+|n)\.[0-9a-f]{20}@support\.example\.org>")
# A reply token's mac: HMAC under a secret made at random for each new database; the
# ticket number before it stays.
REPLY_TOKEN_MAC = re.compile(r"(\+t\d{1,12}-)[a-z2-7]{10}(?=@)")
# The client's port in `peer` (ephemeral).
PEER_PORT = re.compile(r"\b127\.0\.0\.1:\d{1,5}\b")
# Timestamps of the run: ISO 8601 (full, or cut to minutes/seconds by the text tables) and
# RFC 5322 (our outgoing Date:), only on the days the run spanned.
ISO_TIME = r"{day}[T ]\d\d:\d\d(?::\d\d(?:\.\d{{6}})?(?:\+00:00)?)?"
RFC5322_TIME = r"\w{{3}}, {day} \d\d:\d\d:\d\d [+-]\d{{4}}"


def _times(n: Normaliser, text: str) -> str:
    for day in n.run_days:
        when = datetime.strptime(day, "%Y-%m-%d")
        text = re.sub(ISO_TIME.format(day=re.escape(day)), "<time>", text)
        rfc_day = re.escape(when.strftime("%d %b %Y"))
        text = re.sub(RFC5322_TIME.format(day=rfc_day), "<date>", text)
    return text


# Due times of promises (issue 11): business time after the run's clock, so on a later day
# than the run when it ends near closing time or a weekend.
DUE_TIME = re.compile(
    r'(?<="next_update_due": ")[0-9T:.+-]{32}(?=")|(?<="due": ")[0-9T:.+-]{32}(?=")'
)

# What the acknowledgement says happens next (issue 12 item 5) depends on whether the unit
# is open at the run's clock: when the first response is due, or when the desk opens. The
# paragraph (wrapped, in JSON or as shown) up to the blank line after it.
WHAT_NEXT = re.compile(r"(?<=What happens next:)(?:(?!\\n\\n|\n\n|</p>).)*", re.DOTALL)

TABLE_DUE_TIME = re.compile(r"\b20\d\d-\d\d-\d\d \d\d:\d\d\b(?!:)")

NORMALISERS: list[tuple[str, Callable[[Normaliser, str], str]]] = [
    ("due_time", _sub(DUE_TIME, lambda n, m: "<due>")),
    ("what_next", _sub(WHAT_NEXT, lambda n, m: " <what-next>")),
    ("queue_id", _sub(QUEUE_ID, lambda n, m: f"<queue-id-{n.number('q', m.group(0))}>")),
    ("tempfail_ref", _sub(TEMPFAIL_REF, lambda n, m: "(ref <ref>)")),
    (
        "our_message_id",
        _sub(
            OUR_MESSAGE_ID,
            lambda n, m: f"<gw.{m.group(1)}.<{n.number('mid', m.group(0))}>@support.example.org>",
        ),
    ),
    ("reply_token_mac", _sub(REPLY_TOKEN_MAC, lambda n, m: f"{m.group(1)}<mac>")),
    ("peer_port", _sub(PEER_PORT, lambda n, m: "127.0.0.1:<port>")),
    ("time", _times),
    # The same due times as the text tables show them, in the unit's zone to the minute:
    # after "time" (which blanks those on the run's own days), so that a due time on the
    # day of the run and one on a later day read alike.
    ("due_time_in_tables", _sub(TABLE_DUE_TIME, lambda n, m: "<time>")),
    # The temporary folder of the run (database and outbox paths).
    ("tmp_path", lambda n, text: text.replace(n.tmp, "<tmp>")),
    # The CLI's audit actor is cli:<OS user>: whoever runs the suite.
    ("cli_user", lambda n, text: text.replace(f"cli:{n.user}", "cli:<user>")),
]


# --- the inputs --------------------------------------------------------------------------


def compose(
    n: int,
    sender: str,
    subject: str,
    body: str = "Hello,\r\n\r\nthe printer is on fire.\r\n",
    *,
    to: str = "support@example.org",
    name: str = "Client Person",
    headers: str = "",
    message_id: str | None = None,
    content_type: str = "text/plain; charset=utf-8",
) -> bytes:
    """Fixed bytes of message number `n` (its Message-ID is <sNNN@...> unless told)."""
    mid = message_id or f"<s{n:03d}@session.example.com>"
    text = (
        f"From: {name} <{sender}>\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: {mid}\r\n"
        f"Date: {DATE}\r\n"
        "MIME-Version: 1.0\r\n"
        f"Content-Type: {content_type}\r\n"
        f"{headers}"
        "\r\n"
        f"{body}"
    )
    return text.encode()


def dsn(n: int, original: str, recipient: str, action: str = "failed") -> bytes:
    status = "5.1.1" if action == "failed" else "4.4.7"
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.client.example.com>\r\n"
        "To: support@example.org\r\n"
        f"Subject: Undelivered Mail Returned to Sender ({action})\r\n"
        f"Message-ID: <s{n:03d}@mx.client.example.com>\r\n"
        f"Date: {DATE}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="dsn"\r\n'
        "\r\n--dsn\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"Your message could not be delivered to <{recipient}>.\r\n"
        "--dsn\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.client.example.com\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n"
        "\r\n--dsn\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: support@example.org\r\nTo: {recipient}\r\nMessage-ID: {original}\r\n"
        "\r\n--dsn--\r\n"
    ).encode()


SUBJECTS = [
    "The printer is on fire",
    "Invoice 2041 is wrong",
    "VPN drops every hour",
    "Cannot log in since Monday",
    "Résumé upload fails \u2013 ünïcödé",
    "Please add a user",
    "Export to CSV is empty",
    "Laptop battery swollen",
    "Where is my refund?",
    "Mailbox quota exceeded",
]
# Ten requesters (three tickets each), so no one passes the acknowledgement cap (5/hour).
REQUESTERS = [
    "alice@client.example.com",
    "alex@client.example.com",
    "amir@client.example.com",
    "anna@client.example.com",
    "arjun@client.example.com",
    "ava@client.example.com",
    "bob@other.example.net",
    "carol@other.example.net",
    "erin@acme.example",
    "abel@client.example.com",
]
ATTACHMENT = (
    "multipart/mixed; boundary=b1",
    "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nLog attached.\r\n"
    '--b1\r\nContent-Type: text/plain; name="log.txt"\r\n'
    'Content-Disposition: attachment; filename="log.txt"\r\n\r\nline 1\r\nline 2\r\n--b1--\r\n',
)
QUOTED = (
    "Still broken, see below.\r\n\r\nBest,\r\nAlice\r\n-- \r\nAlice Example, Client Ltd\r\n\r\n"
    "On Mon, 1 Sep 2001 at 10:00, Support wrote:\r\n> We are on it.\r\n> Regards\r\n"
)
HTML = "<html><body><p>Hello,</p><p>the <b>screen</b> is blank.</p></body></html>\r\n"


def case(n: int) -> str:
    """A sender of its own for message `n` (authorised by the client.example.com grant)."""
    return f"case{n:03d}@client.example.com"


# --- running it --------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    lines: list[str]

    def as_json(self) -> dict[str, Any]:
        return {"step": self.name, "lines": self.lines}


class Session:
    """The daemon, the CLI and the recorded steps of one run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config: Config = load_config(write_config(tmp, extra=EXTRA_CONFIG))
        self.outbox_dir = tmp / "var" / "outbox"
        self.gateway: Gateway | None = None
        self.steps: list[Step] = []
        self.messages = 0
        self.commands = 0
        # message number -> (bytes, MAIL FROM, RCPTs) as sent, for the duplicates
        self.sent: dict[int, tuple[bytes, str, tuple[str, ...]]] = {}

    @property
    def port(self) -> int:
        assert self.gateway is not None
        return self.gateway.port

    # The CLI, in this process (the same parser and handlers as the console script).
    def _main(self, args: tuple[str, ...], stdin: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdin
        sys.stdin = io.StringIO(stdin)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    code = cli.main(["--config", str(self.config.path), *args])
                except SystemExit as exc:  # argparse usage errors
                    code = exc.code if isinstance(exc.code, int) else 1
                except Exception as exc:  # a crash is a step's outcome too: keep it, go on
                    print(f"crash: {type(exc).__name__}: {exc}", file=sys.stderr)
                    code = -1
        finally:
            sys.stdin = saved
        return code, out.getvalue(), err.getvalue()

    def query(self, *args: str) -> Any:
        """A read for the scenario's own bookkeeping (not recorded): parsed --json output."""
        code, out, err = self._main(args, "")
        assert code == 0, (args, err)
        return json.loads(out)

    async def command(self, *args: str, stdin: str = "") -> None:
        """One recorded admin command."""
        await self.settle()
        self.commands += 1
        # In a thread: some commands run an event loop of their own (asyncio.run).
        code, out, err = await asyncio.to_thread(self._main, args, stdin)
        lines = [f"$ gateway {' '.join(args)}" + (f"  <<< {stdin!r}" if stdin else "")]
        lines.append(f"exit {code}")
        lines += [f"out: {line}" for line in out.splitlines()]
        lines += [f"err: {line}" for line in err.splitlines()]
        self.steps.append(Step(f"C{self.commands:02d} {' '.join(args[:2])}", lines))
        await self.settle()

    async def settle(self) -> None:
        """Wait (with a deadline) until the outbox has no queued row: the daemon is idle."""
        deadline = time.monotonic() + 15
        while self.query("outbox", "list", "--status", "queued", "--json"):
            if time.monotonic() > deadline:
                raise AssertionError("the outbox did not drain within 15 s")
            await asyncio.sleep(0.01)

    async def mail(
        self,
        what: str,
        data: bytes,
        mail_from: str,
        rcpts: tuple[str, ...] = ("support@example.org",),
        *,
        smtputf8: bool = False,
        rset_first: bool = False,
    ) -> None:
        """One recorded message over SMTP: every command and every reply line."""
        self.messages += 1
        self.sent[self.messages] = (data, mail_from, rcpts)
        lines: list[str] = []
        client = await RawClient.connect(self.port)

        async def say(command: str) -> int:
            lines.append(f"C: {command}")
            code, text = await client.command(command)
            lines.extend(f"S: {line}" for line in text.splitlines())
            return code

        try:
            _, greeting = await client.reply()
            lines.append(f"S: {greeting}")
            await say("EHLO client.example.com")
            if rset_first:
                await say("MAIL FROM:<abandoned@client.example.com>")
                await say("RSET")
            option = " SMTPUTF8" if smtputf8 else ""
            if await say(f"MAIL FROM:<{mail_from}>{option}") == 250:
                accepted = [r for r in rcpts if await say(f"RCPT TO:<{r}>") == 250]
                if accepted and await say("DATA") == 354:
                    body = data.replace(b"\r\n.", b"\r\n..")
                    lines.append(f"C: <{len(data)} octets>")
                    await client.send(body + b".\r\n")
                    _, text = await client.reply(30)
                    lines.extend(f"S: {line}" for line in text.splitlines())
            await say("QUIT")
        finally:
            await client.close()
        self.steps.append(Step(f"M{self.messages:03d} {what}", lines))
        await self.settle()

    # What a client reads in the mail we sent: reply tokens and our Message-IDs.
    def _our_mail(self) -> Iterator[tuple[int, int, email.message.Message]]:
        for path in self.outbox_dir.glob("*.eml"):
            parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            found = re.match(r"<gw\.t(\d+)\.", str(parsed["Message-ID"]))
            if found:
                yield int(path.name.split("-", 1)[0]), int(found.group(1)), parsed

    def token(self, ticket: int) -> str:
        """The reply address of `ticket`, from the Reply-To of mail we sent about it."""
        for _, number, parsed in sorted(self._our_mail(), key=lambda x: x[0]):
            if number == ticket and parsed["Reply-To"]:
                reply_to: Any = parsed["Reply-To"]  # an AddressHeader (policy.default)
                return str(reply_to.addresses[0].addr_spec)
        raise AssertionError(f"no mail of ours about #{ticket} with a Reply-To")

    def our_id(self, ticket: int) -> str:
        """The Message-ID of the latest mail we sent about `ticket`."""
        mails = sorted((x for x in self._our_mail() if x[1] == ticket), key=lambda x: x[0])
        assert mails, f"no mail of ours about #{ticket}"
        return str(mails[-1][2]["Message-ID"])

    def held(self, sender: str) -> int:
        """The id of the (latest) quarantine entry of mail from `sender`."""
        for entry in self.query("quarantine", "list", "--all", "--json"):
            if entry["sender"] == sender:
                return int(entry["id"])
        raise AssertionError(f"nothing held from {sender}")

    async def run(self) -> list[Step]:
        self.gateway = Gateway(self.config)
        await self.gateway.start()
        try:
            await scenario(self)
        finally:
            await self.gateway.stop(grace=5)
        assert self.messages == MESSAGES, self.messages
        assert self.commands == COMMANDS, self.commands
        return self.steps


async def scenario(s: Session) -> None:
    """The session, in order. Message numbers (M001...) and commands (C01...) are steps."""
    # Organisations and senders (the database starts empty).
    await s.command(
        "orgs", "add", "Client Ltd", "--domain", "client.example.com", "--unit", "support",
        "--account-manager", "sam@example.org",
    )  # fmt: skip
    await s.command(
        "orgs", "add", "Other Co", "--domain", "other.example.net", "--domain", "other.example.com"
    )
    await s.command("orgs", "add", "Acme", "--domain", "acme.example", "--unit", "billing")
    await s.command("senders", "add", "--domain", "client.example.com", "--org", "Client Ltd")
    await s.command(
        "senders", "add", "bob@other.example.net", "--org", "Other Co", "--name", "Bob Other"
    )
    await s.command("senders", "add", "carol@other.example.net", "--org", "Other Co")
    await s.command("senders", "add", "erin@acme.example", "--org", "Acme", "--name", "Erin Acme")
    await s.command("senders", "block", "mallory@spam.example", "--reason", "known spammer")
    await s.command("senders", "add", "mallory@spam.example", "--org", "Acme")  # refused
    await s.command("orgs", "list", "--json")
    await s.command("senders", "list", "--json")

    # M001-M030: new tickets #1-#30 (billing for every third), some with attachments,
    # HTML only, quoted history and signature, non-ASCII subjects.
    for i in range(30):
        n = s.messages + 1
        sender = REQUESTERS[i % 10]
        to = "billing@example.org" if i % 3 == 2 else "support@example.org"
        subject = f"{SUBJECTS[i % 10]} ({i + 1})"
        if i % 7 == 0:
            data = compose(n, sender, subject, ATTACHMENT[1], to=to, content_type=ATTACHMENT[0])
        elif i % 9 == 4:
            data = compose(n, sender, subject, HTML, to=to, content_type="text/html")
        elif i % 5 == 2:
            data = compose(n, sender, subject, QUOTED, to=to)
        else:
            data = compose(n, sender, subject, f"Request number {i + 1}.\r\n", to=to)
        await s.mail(f"new ticket from {sender}", data, sender, (to,))
    await s.command("tickets", "list", "--json")
    await s.command("tickets", "show", "1", "--json")
    await s.command("outbox", "list", "--json")

    # M031-M045: the requester answers to the reply address (token) of #1-#15.
    for t in range(1, 16):
        n, sender = s.messages + 1, REQUESTERS[(t - 1) % 10]
        token = s.token(t)
        data = compose(n, sender, f"Re: your request {t}", f"Token reply to {t}.\r\n", to=token)
        await s.mail(f"reply by token to #{t}", data, sender, (token,))
    # M046-M060: the requester answers our acknowledgement (In-Reply-To) of #16-#30.
    for t in range(16, 31):
        n, sender, ours = s.messages + 1, REQUESTERS[(t - 1) % 10], s.our_id(t)
        refs = f"In-Reply-To: {ours}\r\nReferences: {ours}\r\n"
        data = compose(n, sender, "Re: acknowledgement", "Thanks.\r\n", headers=refs)
        await s.mail(f"reply by In-Reply-To to #{t}", data, sender)
    # M061-M070: the requester writes with the subject tag of #1-#10.
    for t in range(1, 11):
        n, sender = s.messages + 1, REQUESTERS[(t - 1) % 10]
        data = compose(n, sender, f"Re: [#{t}] more details", "More details.\r\n")
        await s.mail(f"reply by tag to #{t}", data, sender)
    # M071-M075: the tag from others: same organisation (joins), another organisation and
    # a stranger (neither joins).
    for t, sender in [
        (1, "alex@client.example.com"),
        (2, "anna@client.example.com"),
        (1, "bob@other.example.net"),
        (7, "carol@other.example.net"),
        (1, "stranger@elsewhere.example"),
    ]:
        n = s.messages + 1
        data = compose(n, sender, f"Re: [#{t}] me too", "Same here.\r\n")
        await s.mail(f"tag #{t} from {sender}", data, sender)

    # M076-M095: staff by mail, shared among three so none nears the flood threshold.
    dana, sam, tom = "dana@example.org", "sam@example.org", "tom@example.org"
    for t in range(1, 9):  # authenticated, by token: a reply mailed to the client
        n, token = s.messages + 1, s.token(t)
        who = dana if t % 2 else sam
        data = compose(n, who, "Re: fixed", f"We fixed it ({t}).\r\n", to=token, headers=AUTH_OK)
        await s.mail(f"staff reply by token to #{t}", data, who, (token,))
    for t in (9, 10):  # authenticated, by our Message-ID
        n, ours = s.messages + 1, s.our_id(t)
        headers = AUTH_OK + f"In-Reply-To: {ours}\r\n"
        data = compose(n, sam, "Re: ticket", "Looking into it.\r\n", headers=headers)
        await s.mail(f"staff reply by In-Reply-To to #{t}", data, sam)
    for t in (11, 12, 13):  # a note
        n, token = s.messages + 1, s.token(t)
        data = compose(n, tom, "note", f"#note the client called ({t})\r\n", to=token,
                       headers=AUTH_OK)  # fmt: skip
        await s.mail(f"staff note by token to #{t}", data, tom, (token,))
    for t in (14, 15):  # no authentication: held, security notice
        n, token = s.messages + 1, s.token(t)
        data = compose(n, dana, "Re: unauthenticated", "Unsigned.\r\n", to=token)
        await s.mail(f"unauthenticated staff to #{t}", data, dana, (token,))
    for what, result in [
        ("untrusted authserv-id", "evil.example; dkim=pass header.d=example.org"),
        ("trailing-dot authserv-id", "mx.example.org.; dkim=pass header.d=example.org"),
        ("DMARC fail", "mx.example.org; dmarc=fail header.from=example.org"),
    ]:
        header = f"Authentication-Results: {result}\r\n"
        n, token = s.messages + 1, s.token(16)
        data = compose(n, dana, f"Re: {what}", "Forged?\r\n", to=token, headers=header)
        await s.mail(f"staff, {what}", data, dana, (token,))
    n = s.messages + 1  # authenticated, by the tag only: a ticket of its own
    data = compose(n, dana, "Re: [#17] tag only", "Tag only.\r\n", headers=AUTH_OK)
    await s.mail("staff by tag only", data, dana)
    n, token = s.messages + 1, s.token(18)
    data = compose(n, tom, "Re: x", "Tom here.\r\n", to=token, headers=AUTH_OK)
    await s.mail("staff tom by token to #18", data, tom, (token,))
    await s.command("tickets", "show", "1", "--json")
    await s.command("quarantine", "list", "--json")
    await s.command("events", "--ticket", "1", "--json")

    # M096-M105: automatic mail.
    for t in (19, 20, 21):  # out of office answering our acknowledgement: a ticket event
        n, sender, ours = s.messages + 1, REQUESTERS[(t - 1) % 10], s.our_id(t)
        headers = f"Auto-Submitted: auto-replied\r\nIn-Reply-To: {ours}\r\n"
        data = compose(n, sender, "Out of Office: away", "Back Monday.\r\n", headers=headers)
        await s.mail(f"out of office about #{t}", data, sender)
    for sender, headers in [
        ("anna@client.example.com", "Auto-Submitted: auto-replied\r\n"),
        ("ava@client.example.com", "X-Autoreply: yes\r\n"),
        ("erin@acme.example", "Precedence: bulk\r\n"),
        ("carol@other.example.net", "List-Id: <news.other.example.net>\r\n"),
        ("news@elsewhere.example", "List-Unsubscribe: <mailto:u@elsewhere.example>\r\n"),
    ]:
        n = s.messages + 1
        data = compose(n, sender, "Automatic notice", "Automatic.\r\n", headers=headers)
        await s.mail(f"automatic mail from {sender}", data, sender)
    n = s.messages + 1
    data = compose(n, "mailer-daemon@mx.client.example.com", "Notice", "Hi.\r\n")
    await s.mail("null sender, no report", data, "")
    n = s.messages + 1
    data = compose(n, "alice@client.example.com", "Automatic reply: away", "Away.\r\n")
    await s.mail("out-of-office subject, no reference", data, "alice@client.example.com")

    # M106-M113: bounces and delivery notices.
    for t in (22, 23, 24):  # our acknowledgement failed: the requester is undeliverable
        n = s.messages + 1
        data = dsn(n, s.our_id(t), REQUESTERS[(t - 1) % 10])
        await s.mail(f"bounce of our mail about #{t}", data, "")
    for t in (25, 26):  # delayed: news only
        n = s.messages + 1
        data = dsn(n, s.our_id(t), REQUESTERS[(t - 1) % 10], action="delayed")
        await s.mail(f"delay notice about #{t}", data, "")
    for i in (1, 2):  # about mail that is not ours
        n = s.messages + 1
        data = dsn(n, f"<unknown{i}@elsewhere.example>", "someone@elsewhere.example")
        await s.mail("bounce of unknown mail", data, "")
    n, token = s.messages + 1, s.token(27)
    data = dsn(n, "<lost@elsewhere.example>", REQUESTERS[6])
    await s.mail("bounce to the reply address of #27", data, "", (token,))
    await s.command("tickets", "reply", "22", "--from", dana, stdin="Are you there?\n")
    await s.command("tickets", "status", "23", "solved", "--reason", "fixed")

    # M114-M128: unknown senders, held.
    strangers = [f"stranger{i:02d}@elsewhere.example" for i in range(1, 12)]
    strangers += ["zoe@acme.example", "yann@acme.example", "xavier@other.example.com"]
    strangers += ["walt@client.example.com.elsewhere.example"]
    for i, sender in enumerate(strangers):
        n = s.messages + 1
        to = "billing@example.org" if i % 4 == 3 else "support@example.org"
        data = compose(n, sender, f"Hello from {sender.split('@')[0]}", "Can you help?\r\n", to=to)
        await s.mail(f"unknown sender {sender}", data, sender, (to,))
    await s.command("quarantine", "list", "--json")
    await s.command("quarantine", "show", str(s.held("stranger01@elsewhere.example")))
    await s.command(
        "quarantine", "release", str(s.held("zoe@acme.example")), "--authorise",
        "--reason", "new Acme starter",
    )  # fmt: skip
    await s.command(
        "quarantine", "release", str(s.held("stranger02@elsewhere.example")), "--reason", "one-off"
    )
    await s.command(
        "quarantine", "discard", str(s.held("stranger03@elsewhere.example")), "--reason", "news"
    )
    await s.command(
        "quarantine", "block", str(s.held("stranger04@elsewhere.example")), "--reason", "spam"
    )
    await s.command("quarantine", "release", str(s.held("stranger04@elsewhere.example")))
    await s.command("quarantine", "release", str(s.held("stranger05@elsewhere.example")),
                    "--authorise")  # fmt: skip
    await s.command("quarantine", "list", "--all", "--json")
    await s.command("senders", "list", "--json")

    # M129-M134: blocked senders refused; the authorised starter now files.
    for i in range(3):
        n = s.messages + 1
        data = compose(n, "mallory@spam.example", f"Buy now {i}", "Cheap.\r\n")
        await s.mail("blocked sender", data, "mallory@spam.example")
    for _ in range(2):
        n, sender = s.messages + 1, "stranger04@elsewhere.example"
        await s.mail("sender blocked from the quarantine", compose(n, sender, "Again"), sender)
    n = s.messages + 1
    await s.mail("authorised from the quarantine", compose(n, "zoe@acme.example", "Hi"),
                 "zoe@acme.example")  # fmt: skip

    # M135-M144: malformed mail.
    # From here on, each case has a sender of its own (case<NNN>@, authorised by the
    # domain grant), so no one nears the flood threshold by accident.
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "bare LF").replace(b"Subject: bare LF\r\n", b"Subject: bare\nLF\r\n")
    await s.mail("bare LF in the header", raw, alice)
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "NUL").replace(b"Subject: NUL", b"Subject: N\x00UL")
    await s.mail("NUL in the header", raw, alice)
    n = s.messages + 1
    alice = case(n)
    hops = "".join(f"Received: from hop{i}.example by hop{i + 1}.example\r\n" for i in range(31))
    await s.mail("too many hops", hops.encode() + compose(n, alice, "Hops"), alice)
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "No From").replace(f"From: Client Person <{alice}>\r\n".encode(), b"")
    await s.mail("no From", raw, alice)
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "Two From", headers="From: Bob <bob@other.example.net>\r\n")
    await s.mail("two From fields", raw, alice)
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "Two addresses", name="A").replace(
        f"From: A <{alice}>".encode(), f"From: {alice}, bob@other.example.net".encode()
    )
    await s.mail("two addresses in From", raw, alice)
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "Group", name="A").replace(
        f"From: A <{alice}>".encode(), f"From: Team: {alice};".encode()
    )
    await s.mail("group syntax From", raw, alice)
    n = s.messages + 1
    alice = case(n)
    nested = "".join(f"--n{i}\r\nContent-Type: multipart/mixed; boundary=n{i + 1}\r\n\r\n"
                     for i in range(30))  # fmt: skip
    raw = compose(n, alice, "Deep", nested, content_type="multipart/mixed; boundary=n0")
    await s.mail("MIME nested too deep", raw, alice)
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "Broken base64", "@@@not base64@@@\r\n",
                  headers="Content-Transfer-Encoding: base64\r\n")  # fmt: skip
    await s.mail("broken base64", raw, alice)
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "Latin-1 \xe9", content_type="text/plain")
    await s.mail("8-bit subject without charset", raw.replace("é".encode(), b"\xe9"), alice)

    # M145-M152: look-alikes of authorised, staff and mailbox addresses.
    for sender, utf8 in [
        ("alice@c1ient.example.com", False),
        ("alice@cIient.example.com", False),
        ("b0b@other.example.net", False),
        ("dana@examp1e.org", False),
        ("support@exarnple.org", False),
        ("er\u0456n@acme.example", True),
        ("carol@other.exarnple.net", False),
        ("alice@xn--clent-3ve.example.com", False),
    ]:
        n = s.messages + 1
        alice = case(n)
        data = compose(n, sender, "Urgent: pay this invoice", "Pay now.\r\n")
        await s.mail(f"look-alike {sender}", data, sender, smtputf8=utf8)

    # M153-M160: loops and routing.
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "Loop header", headers="X-Gateway-Loop: support.example.org\r\n")
    await s.mail("our loop header", raw, alice)
    n = s.messages + 1
    alice = case(n)
    await s.mail("From our mailbox", compose(n, "support@example.org", "Ours"), "")
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "X-Loop", headers="X-Loop: support@example.org\r\n")
    await s.mail("X-Loop naming our mailbox", raw, alice)
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "Own id", message_id="<gw.n.0123456789abcdef0123@support.example.org>")
    await s.mail("our Message-ID", raw, alice)
    n = s.messages + 1
    alice = case(n)
    await s.mail("relay denied", compose(n, alice, "Relay"), alice, ("bob@elsewhere.example",))
    n = s.messages + 1
    alice = case(n)
    await s.mail("no such mailbox", compose(n, alice, "Nobody"), alice, ("nobody@example.org",))
    n = s.messages + 1
    alice = case(n)
    both: tuple[str, ...] = ("nobody@example.org", "support@example.org", "billing@example.org")
    await s.mail("one bad and two good recipients", compose(n, alice, "Both desks"), alice, both)
    n = s.messages + 1
    alice = case(n)
    await s.mail("plus address", compose(n, alice, "Plus", to="billing+urgent@example.org"),
                 alice, ("billing+urgent@example.org",))  # fmt: skip

    # M161-M166: duplicates and reused Message-IDs.
    for first in (1, 2, 31, 46):
        data, mail_from, rcpts = s.sent[first]
        await s.mail(f"copy of M{first:03d}", data, mail_from, rcpts)
    n = s.messages + 1
    alice = "alice@client.example.com"
    raw = compose(
        n, alice, "Same id, other text", "Changed.\r\n", message_id="<s001@session.example.com>"
    )
    await s.mail("same Message-ID, other bytes", raw, alice)
    n = s.messages + 1
    raw = compose(
        n, "bob@other.example.net", "Borrowed id", message_id="<s001@session.example.com>"
    )
    await s.mail("another sender reuses a Message-ID", raw, "bob@other.example.net")

    # M167-M180: one address floods the desk (threshold 12 an hour): the last two held as loop.
    flood = "flood@client.example.com"
    for i in range(14):
        n = s.messages + 1
        await s.mail(f"flood {i + 1}", compose(n, flood, f"Flood {i + 1}"), flood)
    await s.command("outbox", "list", "--json")
    await s.command("events", "--limit", "40")
    await s.command("quarantine", "list")

    # The life of a ticket, by CLI and by mail.
    # (The requesters of #2-#4 are undeliverable since the bounces above: #5-#7 here.)
    await s.command("tickets", "reply", "5", "--from", dana, stdin="We replaced the toner.\n")
    await s.command("tickets", "reply", "5", "--from", dana, stdin="#note called Arjun\n")
    await s.command("tickets", "reply", "3", "--from", alice, stdin="I am not staff\n")
    await s.command("tickets", "status", "6", "solved", "--reason", "fixed")
    await s.command("tickets", "status", "7", "closed", "--reason", "duplicate")
    await s.command("tickets", "status", "6", "solved")
    await s.command("tickets", "status", "999", "open")
    # M181-M184
    n, token = s.messages + 1, s.token(6)
    await s.mail("client reopens solved #6", compose(n, REQUESTERS[5], "Re: broken again",
                 to=token), REQUESTERS[5], (token,))  # fmt: skip
    n, token = s.messages + 1, s.token(7)
    await s.mail("client writes to closed #7", compose(n, REQUESTERS[6], "Re: closed?",
                 to=token), REQUESTERS[6], (token,))  # fmt: skip
    n = s.messages + 1
    alice = case(n)
    await s.mail("tag of closed #7", compose(n, REQUESTERS[6], "Re: [#7] again"), REQUESTERS[6])
    n, token = s.messages + 1, s.token(6)
    data = compose(n, dana, "Re: reopened", "On it again.\r\n", to=token, headers=AUTH_OK)
    await s.mail("staff answers reopened #6", data, dana, (token,))
    # M185-M190: more token replies.
    for t in range(8, 14):
        n, sender, token = s.messages + 1, REQUESTERS[(t - 1) % 10], s.token(t)
        await s.mail(f"second token reply to #{t}", compose(n, sender, "Re: again", to=token),
                     sender, (token,))  # fmt: skip

    # M191-M200: odds and ends.
    n = s.messages + 1
    alice = case(n)
    await s.mail("to both desks", compose(n, alice, "Both"), alice,
                 ("support@example.org", "billing@example.org"))  # fmt: skip
    n, intl = s.messages + 1, "j\u00fcrgen@client.example.com"
    await s.mail("internationalised requester", compose(n, intl, "Umlaut"), intl, smtputf8=True)
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "x" * 300)
    await s.mail("300-character subject", raw, alice)
    n = s.messages + 1
    alice = case(n)
    await s.mail("bidi override in subject", compose(n, alice, "Invoice \u202egpj.exe"), alice)
    n = s.messages + 1
    alice = case(n)
    await s.mail("HTML only", compose(n, alice, "HTML", HTML, content_type="text/html"), alice)
    n = s.messages + 1
    alice = case(n)
    traversal = ATTACHMENT[1].replace('"log.txt"', '"../../etc/passwd"')
    data = compose(n, alice, "Traversal", traversal, content_type=ATTACHMENT[0])
    await s.mail("attachment named ../../etc/passwd", data, alice)
    n = s.messages + 1
    alice = case(n)
    await s.mail("empty body", compose(n, alice, "Empty", ""), alice)
    n = s.messages + 1
    alice = case(n)
    await s.mail("after RSET", compose(n, alice, "After RSET"), alice, rset_first=True)
    n = s.messages + 1
    alice = case(n)
    raw = compose(n, alice, "Reply-To elsewhere", headers="Reply-To: eve@elsewhere.example\r\n")
    await s.mail("Reply-To elsewhere", raw, alice)
    n = s.messages + 1
    await s.mail("quoted history", compose(n, "alex@client.example.com", "History", QUOTED),
                 "alex@client.example.com")  # fmt: skip

    await s.command("tickets", "list", "--json")
    await s.command("tickets", "list")
    await s.command("tickets", "show", "6", "--json")
    await s.command("tickets", "show", "7")
    await s.command("outbox", "list", "--json")
    await s.command("outbox", "list", "--status", "failed")
    await s.command("senders", "list")
    await s.command("orgs", "list")
    await s.command("outbox", "list", "--limit", "5")
    await s.command("events", "--ticket", "6", "--json")
    await s.command("events", "--json")


# --- record and compare ------------------------------------------------------------------


def run_session(folder: Path | None = None) -> list[dict[str, Any]]:
    """Run the scenario in `folder` (else a fresh temporary one); its normalised steps."""
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="gateway-session-") as tmp:
            return run_session(Path(tmp))
    start = datetime.now(UTC).strftime("%Y-%m-%d")
    steps = asyncio.run(Session(folder).run())
    end = datetime.now(UTC).strftime("%Y-%m-%d")
    normalise = Normaliser(
        tmp=str(folder),
        run_days=tuple(sorted({start, end})),
        user=pwd.getpwuid(os.getuid()).pw_name,
    )
    return [
        {"step": s.name, "lines": _fold_what_next([normalise(line) for line in s.lines])}
        for s in steps
    ]


def _fold_what_next(lines: list[str]) -> list[str]:
    """The shown acknowledgement's "What happens next" paragraph is wrapped over lines whose
    words depend on the clock (WHAT_NEXT): its continuation lines are dropped, up to the
    blank line that ends it."""
    kept: list[str] = []
    folding = False
    for line in lines:
        if folding and line.strip() not in ("out:", ""):
            continue
        folding = line.rstrip().endswith("What happens next: <what-next>")
        kept.append(line)
    return kept


def load_golden() -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = json.loads(GOLDEN.read_text("utf-8"))["steps"]
    return steps


def write_golden(steps: list[dict[str, Any]]) -> None:
    GOLDEN.parent.mkdir(exist_ok=True)
    text = json.dumps({"messages": MESSAGES, "commands": COMMANDS, "steps": steps},
                      ensure_ascii=False, indent=1)  # fmt: skip
    GOLDEN.write_text(text + "\n", "utf-8")


def differences(
    expected: list[dict[str, Any]], actual: list[dict[str, Any]], limit: int = 3
) -> str:
    """A unified diff of the first `limit` differing steps ("" when all are the same)."""
    out: list[str] = []
    shown = 0
    for i in range(max(len(expected), len(actual))):
        none: dict[str, Any] = {"step": "(none)", "lines": []}
        want = expected[i] if i < len(expected) else none
        got = actual[i] if i < len(actual) else none
        if want == got:
            continue
        out.extend(
            difflib.unified_diff(
                [want["step"], *want["lines"]],
                [got["step"], *got["lines"]],
                fromfile=f"recorded step {i + 1}: {want['step']}",
                tofile=f"replayed step {i + 1}: {got['step']}",
                lineterm="",
            )
        )
        shown += 1
        if shown == limit:
            break
    if shown:
        total = sum(
            1
            for i in range(max(len(expected), len(actual)))
            if (expected[i] if i < len(expected) else None)
            != (actual[i] if i < len(actual) else None)
        )
        out.insert(0, f"{total} of {len(expected)} recorded steps differ; the first {shown}:")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Replay (or --record) the session of tests/golden."
    )
    parser.add_argument("--record", action="store_true", help=f"write {GOLDEN}")
    args = parser.parse_args(argv)
    steps = run_session()
    if args.record:
        write_golden(steps)
        print(f"recorded {len(steps)} steps in {GOLDEN}")
        return 0
    diff = differences(load_golden(), steps)
    print(diff or f"all {len(steps)} steps as recorded")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
