"""The aiosmtpd edge: every aiosmtpd (and asyncio) internal that gateway/server.py relies on.

`EDGE` below is the one list of them (server.py's docstring points here): what each is, why
server.py needs it, and what it looked like when we last read it in aiosmtpd 1.4.6, the
version pyproject.toml pins exactly. The tests fail, naming the member, when

- the installed aiosmtpd is not the pinned one (`test_installed_aiosmtpd_is_the_pinned_one`);
- a member is gone or its signature changed (parameter names, kinds and defaults; the
  annotations are left out so that a typing-only change does not count);
- the body of a method we replace whole, or copy from, changed (sha256 of its source);
- a class attribute's value, or the type of an instance attribute on a real session, changed;
- server.py overrides or uses an aiosmtpd member that is neither listed here nor public
  API documented by aiosmtpd (`test_every_member_server_py_touches_is_listed`), so the
  list cannot fall behind the code.

When one fails after an upgrade: read the member in the new aiosmtpd, adapt server.py if
needed (its tests, test_protocol.py above all, must pass), then record the new signature
or fingerprint here and move the pin in pyproject.toml.
"""

from __future__ import annotations

import ast
import asyncio
import collections
import hashlib
import inspect
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtpd
import aiosmtpd.lmtp
import aiosmtpd.smtp
import pytest
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session
from packaging.requirements import Requirement

from gateway import server
from gateway.app import Gateway

from .conftest import ROOT, RawClient, wait_for

_NOT_RECORDED = object()


@dataclass(frozen=True)
class Member:
    """One aiosmtpd/asyncio internal server.py overrides or uses, as last read."""

    owner: Any  # the class (or module) that defines it
    name: str
    why: str  # what server.py does with it
    signature: str | None = None  # methods: the signature without annotations
    source_sha256: str | None = None  # methods replaced whole or copied: their source
    value: Any = _NOT_RECORDED  # class and module attributes: the value we rely on
    instance_type: type | tuple[type, ...] | None = None  # instance attributes: their type

    @property
    def label(self) -> str:
        return f"{self.owner.__name__}.{self.name}"


EDGE: tuple[Member, ...] = (
    Member(
        SMTP,
        "_handle_client",
        "wrapped: admission (connection caps, shutdown), the session timer, the stress timeout",
        signature="(self)",
    ),
    Member(
        SMTP,
        "smtp_DATA",
        "replaced whole (same checks and replies): the per-address DATA slot, the rate and "
        "stall rules, a chunked reader instead of the per-line loop",
        signature="(self, arg)",
        source_sha256="3a33f30d3fd6d02f39c7d78a08288bffea9170525b62e2161568041ae7e018df",
    ),
    Member(
        SMTP,
        "_set_post_data_state",
        "copied into our smtp_DATA (a fresh envelope after the final dot)",
        signature="(self)",
        source_sha256="1dc8a8abca2a81644a605b8ebf427fc7472eeadf5149dd3cf2591fa86b2256e9",
    ),
    Member(
        SMTP,
        "smtp_HELO",
        "wrapped: 8-bit host names refused, the answer kept verbatim",
        signature="(self, hostname)",
    ),
    Member(
        SMTP,
        "smtp_EHLO",
        "wrapped as smtp_HELO; its additions to the class-wide command_size_limits are "
        "what our command_size_limits property neutralises",
        signature="(self, hostname)",
        source_sha256="1d91592dd954c4cd87bf365fc57f0a16e36d9ff911cda1b2b253a4981618f19f",
    ),
    Member(
        LMTP,
        "smtp_LHLO",
        "wrapped as smtp_EHLO (RFC 2033 4.1)",
        signature="(self, arg)",
    ),
    Member(
        LMTP,
        "smtp_HELO",
        "what our smtp_HELO wrapper calls on the LMTP protocol (a 500 refusal)",
        signature="(self, arg)",
    ),
    Member(
        LMTP,
        "smtp_EHLO",
        "what our smtp_EHLO wrapper calls on the LMTP protocol (a 500 refusal)",
        signature="(self, arg)",
    ),
    Member(
        SMTP,
        "_getaddr",
        "overridden: a fast path for plain paths that must parse exactly as this does, "
        "the rest delegated, its parser crashes mapped to a malformed address",
        signature="(self, arg)",
        source_sha256="0aeb21c56ac1260e784e430a340459c83c23640a85965e7b8de3e1ada74d85f5",
    ),
    Member(
        SMTP,
        "_create_session",
        "replaced whole: our Session subclass with the counters the limits need",
        signature="(self)",
        source_sha256="22b243e82ff1c7a4956a63363835200a9594c8f401894721f493b99fa2db1bc8",
    ),
    Member(
        Session,
        "__init__",
        "GatewaySession calls it with the loop",
        signature="(self, loop)",
    ),
    Member(
        SMTP,
        "command_size_limits",
        "replaced by a property: aiosmtpd's class-wide dict grows on every EHLO "
        "(RELIABILITY.md test 6); __init__ clears it, which our mapping must allow",
        instance_type=collections.defaultdict,
    ),
    Member(
        SMTP,
        "command_size_limit",
        "the default of our command_size_limits",
        value=512,
    ),
    Member(
        SMTP,
        "line_length_limit",
        "our DATA reader's longest line: this minus CRLF (RFC 5321 4.5.3.1.6, with the "
        "transparent dot)",
        value=1001,
    ),
    Member(
        SMTP,
        "local_part_limit",
        "honoured by our _getaddr fast path as by aiosmtpd's",
        value=0,
    ),
    Member(
        SMTP,
        "push",
        "wrapped: every reply passes through it (enhanced codes, budgets, out-of-sync check)",
        signature="(self, status)",
    ),
    Member(
        SMTP,
        "_reader",
        "read by our DATA reader; its buffer tells unread input",
        instance_type=asyncio.StreamReader,
    ),
    Member(
        asyncio.StreamReader,
        "_buffer",
        "unread input: the out-of-sync check, and bytes a client pipelined after the "
        "final dot are put back at its front (asyncio has no public accessor)",
        instance_type=bytearray,
    ),
    Member(
        SMTP,
        "_writer",
        "421 replies written and the connection closed outside a command",
        instance_type=asyncio.StreamWriter,
    ),
    Member(
        SMTP,
        "_timeout_duration",
        "shortened to stress_timeout while the connection gate is stressed",
        instance_type=(int, float),
    ),
    Member(
        SMTP,
        "_reset_timeout",
        "restarts the idle timer after a stress_timeout change and before handle_DATA",
        signature="(self, duration=None)",
    ),
    Member(
        SMTP,
        "_create_envelope",
        "a fresh envelope after DATA, as aiosmtpd's _set_post_data_state",
        signature="(self)",
    ),
    Member(
        SMTP,
        "_call_handler_hook",
        "our smtp_DATA calls handle_DATA through it",
        signature="(self, command, *args)",
    ),
    Member(
        SMTP,
        "check_helo_needed",
        "our smtp_DATA keeps aiosmtpd's checks",
        signature="(self, helo='HELO')",
    ),
    Member(
        SMTP,
        "check_auth_needed",
        "our smtp_DATA keeps aiosmtpd's checks",
        signature="(self, caller_method)",
    ),
    Member(
        aiosmtpd.smtp,
        "MISSING",
        "what _call_handler_hook returns when there is no hook: our smtp_DATA answers 250",
        value=MISSING,
    ),
    Member(
        Envelope,
        "smtp_utf8",
        "handle_RCPT refuses a non-ASCII address without SMTPUTF8",
        instance_type=bool,
    ),
)

# Members server.py uses that aiosmtpd documents as public API (docs/smtp.rst and
# docs/concepts.rst of 1.4.6): not listed above unless we rely on more than the docs say.
_DOCUMENTED = frozenset(
    {
        "SMTP",
        "LMTP",
        "Session",
        "Envelope",
        "data_size_limit",
        "hostname",
        "loop",
        "session",
        "envelope",
        "transport",
        "peer",
        "host_name",
        "mail_from",
        "mail_options",
        "rcpt_tos",
        "rcpt_options",
        "content",
        "original_content",
    }
)
_AIOSMTPD_CLASSES = ("SMTP", "LMTP", "Session", "Envelope")
_BY_LABEL = {member.label: member for member in EDGE}


def _bare_signature(function: Callable[..., Any]) -> str:
    signature = inspect.signature(function)
    empty = inspect.Parameter.empty
    parameters = [p.replace(annotation=empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=parameters, return_annotation=empty))


def _look_up(member: Member) -> Any:
    try:
        return inspect.getattr_static(member.owner, member.name)
    except AttributeError:
        pytest.fail(
            f"aiosmtpd {aiosmtpd.__version__} has no {member.label} any more; server.py "
            f"relies on it ({member.why}). Re-read aiosmtpd and adapt server.py."
        )


def test_installed_aiosmtpd_is_the_pinned_one() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [Requirement(d) for d in project["dependencies"] if d.startswith("aiosmtpd")]
    assert len(pins) == 1, pins
    (pin,) = pins
    assert pin.specifier.contains(aiosmtpd.__version__), (
        f"aiosmtpd {aiosmtpd.__version__} is installed but pyproject.toml pins {pin}: "
        "the records in EDGE were read for the pinned version"
    )
    # Patch releases changed exactly what we replaced (1.4.5: the DATA loop; 1.4.6: the
    # reader's buffer at STARTTLS), so the pin admits no release nobody has read.
    others = [v for v in ("1.4.5", "1.4.7", "1.5.0") if pin.specifier.contains(v)]
    assert not others, f"pyproject.toml's {pin} also admits aiosmtpd {others}"


@pytest.mark.parametrize(
    "member", [m for m in EDGE if m.signature is not None], ids=lambda m: m.label
)
def test_signature_unchanged(member: Member) -> None:
    found = _look_up(member)
    assert callable(found), f"{member.label} is no longer a method ({member.why})"
    now = _bare_signature(found)
    assert now == member.signature, (
        f"aiosmtpd {aiosmtpd.__version__} changed {member.label}{now} (was "
        f"{member.signature}); server.py: {member.why}. Re-read it, then record the new one."
    )


@pytest.mark.parametrize(
    "member", [m for m in EDGE if m.source_sha256 is not None], ids=lambda m: m.label
)
def test_replaced_or_copied_body_unchanged(member: Member) -> None:
    source = inspect.getsource(_look_up(member))
    now = hashlib.sha256(source.encode()).hexdigest()
    assert now == member.source_sha256, (
        f"aiosmtpd {aiosmtpd.__version__} changed the body of {member.label}, which "
        f"server.py {member.why}. Re-read it (a security fix there does not reach us), "
        f"then record sha256 {now}."
    )


@pytest.mark.parametrize(
    "member", [m for m in EDGE if m.value is not _NOT_RECORDED], ids=lambda m: m.label
)
def test_attribute_value_unchanged(member: Member) -> None:
    now = _look_up(member)
    assert now is member.value or now == member.value, (
        f"aiosmtpd {aiosmtpd.__version__} changed {member.label} to {now!r} (was "
        f"{member.value!r}); server.py: {member.why}"
    )


def test_class_wide_command_size_limits_still_what_our_property_replaces() -> None:
    member = _BY_LABEL["SMTP.command_size_limits"]
    found = _look_up(member)
    assert isinstance(found, collections.defaultdict), (
        f"aiosmtpd {aiosmtpd.__version__}: {member.label} is now {type(found).__name__}, "
        f"not the class-wide dict our property replaces ({member.why})"
    )


def test_overridden_private_hooks_are_still_called_by_aiosmtpd() -> None:
    """An override aiosmtpd no longer calls would be dead code that passes every test above."""
    source = inspect.getsource(aiosmtpd.smtp)
    for name in ("_handle_client", "_create_session", "_getaddr", "command_size_limits"):
        found = inspect.getattr_static(SMTP, name)
        definition = inspect.getsource(found) if inspect.isfunction(found) else ""
        uses = source.replace(definition, "").count(f"self.{name}")
        assert uses > 0, (
            f"aiosmtpd {aiosmtpd.__version__} no longer calls SMTP.{name}: our override "
            "in server.py is dead"
        )


async def test_no_hook_answer_is_missing() -> None:
    protocol = SMTP(object(), loop=asyncio.get_running_loop())
    assert await protocol._call_handler_hook("DATA") is MISSING, (
        "SMTP._call_handler_hook no longer returns MISSING without a hook: our smtp_DATA "
        "would answer a handler-less DATA with that object"
    )


async def test_instance_attributes_on_a_real_session(
    gateway: Gateway, raw_client: Callable[[int], Any]
) -> None:
    """`_reader`, `_writer` and `_timeout_duration` exist only on a connected protocol: look
    at a real one, serving a real client."""
    client: RawClient = await raw_client(gateway.port)
    code, _ = await client.reply()
    assert code == 220
    protocol = await wait_for(lambda: next(iter(gateway.state.sessions), None))
    instances: dict[Any, Any] = {
        SMTP: protocol,
        asyncio.StreamReader: protocol._reader,
        Envelope: Envelope(),
    }
    problems = []
    for member in EDGE:
        if member.instance_type is None or member.owner not in instances:
            continue
        found = getattr(instances[member.owner], member.name, _NOT_RECORDED)
        if found is _NOT_RECORDED:
            problems.append(f"{member.label} is gone ({member.why})")
        elif not isinstance(found, member.instance_type):
            problems.append(f"{member.label} is a {type(found).__name__} now ({member.why})")
    assert not problems, f"aiosmtpd {aiosmtpd.__version__}: " + "; ".join(problems)
    assert protocol._timeout_duration == gateway.config.smtp.timeout
    # Putting bytes back at the front of the buffer is what server.py's _unread does:
    # they must be what the next read returns.
    reader = asyncio.StreamReader()
    reader.feed_data(b"QUIT\r\n")
    reader._buffer[0:0] = b"NOOP\r\n"  # type: ignore[attr-defined]
    assert await reader.readuntil(b"\r\n") == b"NOOP\r\n", "StreamReader._buffer put-back"


def test_stock_replies_we_rewrite_are_still_sent_by_aiosmtpd() -> None:
    """server.py rewrites some aiosmtpd replies by their exact text; a reworded one would
    pass through without an enhanced code."""
    texts = {
        node.value
        for module in (aiosmtpd.smtp, aiosmtpd.lmtp)
        for node in ast.walk(ast.parse(inspect.getsource(module)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    missing = [text for text in server._STOCK_REPLIES if text not in texts]
    missing += [
        prefix
        for prefix, _ in server._STOCK_PREFIXES
        if not any(text.startswith(prefix) for text in texts)
    ]
    assert not missing, f"aiosmtpd {aiosmtpd.__version__} no longer sends {missing}"


def _aiosmtpd_names() -> set[str]:
    """Every attribute aiosmtpd's protocol, session and envelope classes define or set."""
    names: set[str] = set()
    for module in (aiosmtpd.smtp, aiosmtpd.lmtp):
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:
            if not isinstance(node, ast.ClassDef) or node.name not in _AIOSMTPD_CLASSES:
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(inner.name)
                elif isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name):
                    if inner.value.id == "self":
                        names.add(inner.attr)
            for item in node.body:
                if isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
    return names


async def test_every_member_server_py_touches_is_listed() -> None:
    """The list above cannot fall behind server.py: everything it overrides, everything
    private (or undocumented) of aiosmtpd or asyncio's StreamReader it reads, calls or
    imports, is in EDGE or is documented aiosmtpd API."""
    listed = {member.name for member in EDGE} | _DOCUMENTED
    tree = ast.parse(Path(server.__file__).read_text())
    touched: set[str] = set()
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            touched.add(node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
        ):
            touched.add(str(node.args[1].value))  # getattr(reader, "_buffer", ...)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiosmtpd"):
            imported.update(alias.name for alias in node.names)
    stream_private = {n for n in vars(asyncio.StreamReader()) if n.startswith("_")}
    used = imported | (touched & (_aiosmtpd_names() | stream_private))
    # Overrides, through the MRO of each class server.py derives from aiosmtpd's.
    ours = (server.GatewaySMTP, server.GatewayLMTP, server.GatewaySession)
    for cls in ours:
        for klass in cls.__mro__:
            if klass.__module__ != server.__name__:
                continue
            for name in vars(klass):
                if name.startswith("__") and name != "__init__":
                    continue
                for base in cls.__mro__:
                    if base.__module__.startswith("aiosmtpd") and name in vars(base):
                        used.add(name)
    unlisted = sorted(used - listed)
    assert not unlisted, (
        f"server.py overrides or uses aiosmtpd members that EDGE in {Path(__file__).name} "
        f"does not list: {unlisted}. Add each (why, signature, fingerprint if replaced)."
    )
