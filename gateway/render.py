"""The words of outgoing mail: a subject line, a plain-text and an HTML alternative
for each event, from the Jinja2 templates in `templates/` or the admins' own folder.

It must never render unescaped user text into HTML (HTML templates are autoescaped, and a
sandbox keeps templates away from Python internals), and never fail silently on a template
typo: an undefined name, a missing file or a syntax error is a TemplateError naming the
file, and `check()` finds it when the daemon starts rather than at the first client's mail.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType

import jinja2
from jinja2 import FileSystemLoader, StrictUndefined, nodes, select_autoescape
from jinja2.meta import find_undeclared_variables
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup, escape

TEMPLATE_NAMES = (
    "acknowledgement",
    "staff_reply",
    "status_change",
    "quarantine_notice",
    "loop_notice",
    "staff_new_ticket",
    "staff_client_reply",
    "reminder",
    "escalation",
    "digest",
    "account_manager_notice",
    "page",
)

# The three files of one template, by the RenderedMail field each fills.
SUBJECT_SUFFIX = ".subject.txt"
TEXT_SUFFIX = ".txt"
HTML_SUFFIX = ".html"

# The context contract with the planner (notify.py): every key listed is given, and
# nothing else, so a template cannot depend on something the caller does not provide and
# the acknowledgement can never quote the client's message (it is not given a body).
COMMON_KEYS = frozenset({"desk", "mailbox", "reply_address", "recipient", "recipient_name"})
# Staff notices (notify.Planner.staff_notice): the client's readable text, who they are,
# the ticket's owner ("" for none) and due time (local to its unit, "" for none).
_STAFF_NOTICE_KEYS = frozenset({"ticket", "client", "organisation", "unit", "owner", "due", "text"})
CONTEXT_KEYS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        # Issue 12 item 5, what happens next (notify.Planner._what_next): `what_next` is
        # "first-response" (the desk is open: `respond_by`, the ticket's promise),
        # "on-call" (urgent, out of hours, with cover: the person on call was paged) or
        # "desk-opens" (`next_open`); times in the unit's zone ("Monday 09:00"), "" if none.
        "acknowledgement": COMMON_KEYS | {"ticket", "what_next", "next_open", "respond_by"},
        "staff_reply": COMMON_KEYS | {"ticket", "body", "staff_name"},
        "status_change": COMMON_KEYS | {"ticket", "old_status", "new_status"},
        "quarantine_notice": COMMON_KEYS | {"entry", "held_count", "cli"},
        "loop_notice": COMMON_KEYS | {"sender", "count", "threshold"},
        "staff_new_ticket": COMMON_KEYS | _STAFF_NOTICE_KEYS,
        "staff_client_reply": COMMON_KEYS | _STAFF_NOTICE_KEYS,
        # The scheduler's mail to staff (scheduler.py): a promise is about to fall due, a
        # promise was missed, a unit's digest. `due` is the promise as people read it in
        # the unit's zone; `owner` is "" when the ticket has none; `note` is "" without one.
        "reminder": COMMON_KEYS
        | {"ticket", "unit", "due", "due_in", "set_by", "note", "owner", "cli"},
        "escalation": COMMON_KEYS
        | {"ticket", "unit", "due", "late", "set_by", "note", "owner", "lead", "cli"},
        # Each section a list of {number, tag, subject, owner, due} (at most
        # scheduler.DIGEST_ITEMS); `counts` has every section's full count.
        "digest": COMMON_KEYS
        | {"unit", "day", "counts", "overdue", "due_today", "new", "unassigned", "cli"},
        # Issue 12 item 5 (notify.Planner.upset_notice): to the organisation's account
        # manager and the ticket's owner, never a client. `reasons` the rule table's (a list
        # of strings), `commitments` a list of {due, set_by, note, state} (due local to the
        # unit), `text` the client's readable words.
        "account_manager_notice": COMMON_KEYS
        | _STAFF_NOTICE_KEYS
        | {"account_manager", "reasons", "commitments", "cli"},
        # Issue 12 item 3 (notify.Planner.page): to the person on call (step 0), the
        # secondary (1) or the lead (2), never a client; no client words, only what it is
        # about. `reasons` the urgency reasons, `ack_due` local to the unit, `cli` how to
        # acknowledge from a shell (replying to the page or #take also do).
        "page": COMMON_KEYS
        | {"ticket", "organisation", "unit", "reasons", "step", "ack_due", "ack_within", "cli"},
    }
)
# The keys of the mappings inside a context.
FIELD_KEYS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "ticket": frozenset({"number", "tag", "subject", "status"}),
        "entry": frozenset({"id", "sender", "subject", "reasons", "received_at"}),
    }
)


def _frozen(values: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(dict(values))


_STAFF = {
    "desk": "Example Support",
    "mailbox": "support@example.org",
    "reply_address": "support+t12-abcdefghij@example.org",
    "recipient": "bob@example.org",
    "recipient_name": "",
}
_PROMISE = {
    "unit": "support",
    "due": "Tuesday 8 December 2026, 14:00 GMT",
    "set_by": "bob@example.org",
    "note": "waiting for the engineer's report",
    "owner": "bob@example.org",
    "cli": "gateway tickets show 12",
}


def _listed(number: int, subject: str, owner: str, due: str) -> Mapping[str, object]:
    return _frozen(
        {"number": number, "tag": f"[#{number}]", "subject": subject, "owner": owner, "due": due}
    )


_CLIENT = {
    "desk": "Example Support",
    "mailbox": "support@example.org",
    "reply_address": "support+t12-abcdefghij@example.org",
    "recipient": "alice@client.example.com",
    "recipient_name": "Alice Liddell",
}
_ADMIN = {
    "desk": "Example Support",
    "mailbox": "support@example.org",
    "reply_address": "support@example.org",
    "recipient": "admin@example.org",
    "recipient_name": "",
}


_STAFF_NOTICE = {
    **_STAFF,
    "client": "alice@client.example.com",
    "organisation": "Client Ltd",
    "unit": "support",
    "owner": "bob@example.org",
    "due": "Mon 07 Dec 2026 13:00 GMT",
    "text": "Hello,\n\nthe printer on floor 2 is on fire again.\n\nAlice",
}


def _ticket(status: str) -> Mapping[str, object]:
    return _frozen(
        {
            "number": 12,
            "tag": "[#12]",
            "subject": "The printer on floor 2 is on fire",
            "status": status,
        }
    )


# A realistic context per template, exactly as the planner builds it: check() renders
# every template with it, and the tests use it.
SAMPLE_CONTEXTS: Mapping[str, Mapping[str, object]] = MappingProxyType(
    {
        "acknowledgement": _frozen(
            {
                **_CLIENT,
                "ticket": _ticket("new"),
                "what_next": "first-response",
                "next_open": "",
                "respond_by": "Monday 13:00",
            }
        ),
        "staff_reply": _frozen(
            {
                **_CLIENT,
                "ticket": _ticket("open"),
                "body": (
                    "Hi Alice,\n\n"
                    "thanks for the photo. The fire brigade has been and gone, and the\n"
                    "new printer arrives on Monday.\n\n"
                    "Best wishes,\nBob"
                ),
                "staff_name": "Bob Baker",
            }
        ),
        "status_change": _frozen(
            {**_CLIENT, "ticket": _ticket("solved"), "old_status": "open", "new_status": "solved"}
        ),
        "quarantine_notice": _frozen(
            {
                **_ADMIN,
                "entry": _frozen(
                    {
                        "id": 7,
                        "sender": "mallory@unknown.example.net",
                        "subject": "Invoice 2024-117 overdue",
                        "reasons": ("unknown-sender",),
                        "received_at": "2024-05-02T09:14:03+00:00",
                    }
                ),
                "held_count": 3,
                "cli": "gateway quarantine show 7",
            }
        ),
        "loop_notice": _frozen(
            {**_ADMIN, "sender": "autoreply@client.example.com", "count": 24, "threshold": 20}
        ),
        "staff_new_ticket": _frozen({**_STAFF_NOTICE, "ticket": _ticket("new"), "owner": ""}),
        "staff_client_reply": _frozen({**_STAFF_NOTICE, "ticket": _ticket("open")}),
        "reminder": _frozen({**_STAFF, **_PROMISE, "ticket": _ticket("open"), "due_in": "1 hour"}),
        "escalation": _frozen(
            {
                **_STAFF,
                **_PROMISE,
                "recipient": "lead@example.org",
                "ticket": _ticket("open"),
                "late": "2 hours 5 minutes",
                "lead": "lead@example.org",
            }
        ),
        "digest": _frozen(
            {
                **_STAFF,
                "reply_address": "support@example.org",
                "unit": "support",
                "day": "Tuesday 8 December 2026",
                "counts": _frozen({"overdue": 1, "due_today": 2, "new": 1, "unassigned": 30}),
                "overdue": (
                    _listed(
                        12,
                        "The printer on floor 2 is on fire",
                        "bob@example.org",
                        "Monday 7 December 2026, 17:30 GMT",
                    ),
                ),
                "due_today": (
                    _listed(14, "VPN drops every hour", "", "Tuesday 8 December 2026, 11:00 GMT"),
                    _listed(
                        15,
                        "New starter needs a laptop",
                        "carol@example.org",
                        "Tuesday 8 December 2026, 17:30 GMT",
                    ),
                ),
                "new": (_listed(16, "Password reset", "", "Tuesday 8 December 2026, 13:00 GMT"),),
                "unassigned": (
                    _listed(14, "VPN drops every hour", "", "Tuesday 8 December 2026, 11:00 GMT"),
                    _listed(16, "Password reset", "", "Tuesday 8 December 2026, 13:00 GMT"),
                ),
                "cli": "gateway tickets list --unit support",
            }
        ),
        "account_manager_notice": _frozen(
            {
                **_STAFF_NOTICE,
                "recipient": "sam@example.org",
                "ticket": _ticket("open"),
                "text": "This is unacceptable. The printer is STILL on fire!!!",
                "account_manager": "sam@example.org",
                "reasons": ("complaint-phrase: 'unacceptable'", "shouting: 3 words in capitals"),
                "commitments": (
                    _frozen(
                        {
                            "due": "Mon 07 Dec 2026 13:00 GMT",
                            "set_by": "gateway",
                            "note": "",
                            "state": "open",
                        }
                    ),
                ),
                "cli": "gateway tickets show 12",
            }
        ),
        "page": _frozen(
            {
                **_STAFF,
                "ticket": _ticket("new"),
                "organisation": "Client Ltd",
                "unit": "support",
                "reasons": ("subject:site-down", "text:site-down"),
                "step": 0,
                "ack_due": "Sat 05 Dec 2026 22:15 GMT",
                "ack_within": "15m",
                "cli": "gateway oncall ack 12",
            }
        ),
    }
)

# Variations on the samples that check() renders too, so that the branches of the shipped
# templates (no name to greet, no staff name, each status wording, one held entry, a ticket
# without a subject) are all exercised at start, not first by a client's mail.
_VARIANTS: Mapping[str, tuple[Mapping[str, object], ...]] = MappingProxyType(
    {
        "acknowledgement": (
            {"recipient_name": ""},
            {"what_next": "on-call", "next_open": "Monday 09:00", "respond_by": "Saturday 22:30"},
            {"what_next": "desk-opens", "next_open": "Monday 09:00", "respond_by": ""},
        ),
        "page": ({"organisation": "", "step": 1}, {"step": 2, "reasons": ()}),
        "staff_reply": ({"recipient_name": "", "staff_name": ""},),
        "status_change": (
            {"recipient_name": "", "old_status": "solved", "new_status": "open"},
            {"old_status": "open", "new_status": "pending"},
        ),
        "quarantine_notice": ({"held_count": 1},),
        "loop_notice": (),
        "staff_new_ticket": ({"organisation": "", "due": "", "owner": "bob@example.org"},),
        "staff_client_reply": ({"owner": "", "organisation": "", "due": ""},),
        "reminder": ({"owner": "", "note": ""},),
        "escalation": ({"owner": "", "note": "", "lead": ""},),
        "digest": (
            {
                "counts": _frozen({"overdue": 0, "due_today": 0, "new": 0, "unassigned": 0}),
                "overdue": (),
                "due_today": (),
                "new": (),
                "unassigned": (),
            },
        ),
        "account_manager_notice": (
            # Told as the owner, with no organisation, no promise and no account manager.
            {
                "recipient": "bob@example.org",
                "organisation": "",
                "account_manager": "",
                "due": "",
                "commitments": (),
            },
        ),
    }
)
_NO_SUBJECT: Mapping[str, object] = {"subject": ""}


@dataclass(frozen=True)
class RenderedMail:
    subject: str  # one line; the caller sanitises and adds the ticket tag if missing
    text: str
    html: str


class TemplateError(Exception):
    """A template that cannot be rendered: missing, malformed, or using a name or field
    the caller does not provide. The message names the file (and line, when known)."""

    def __init__(self, path: str, problem: str, line: int | None = None) -> None:
        where = f"{path}, line {line}" if line else path
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


# Blank lines separate paragraphs; a single line break is kept as <br>.
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")


def linebreaks(value: object) -> Markup:
    """Plain text as escaped HTML paragraphs, its line breaks kept (the `linebreaks`
    filter of the HTML templates, for text written by people)."""
    text = str(value).replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    paragraphs = [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    return Markup("\n").join(
        Markup("<p>{}</p>").format(Markup("<br>\n").join(escape(line) for line in p.split("\n")))
        for p in paragraphs
    )


def wrap(value: object, width: int = 72) -> str:
    """Plain text with its long lines wrapped at `width` (the `wrap` filter of the text
    templates). Words are never broken; lines that start with a space (commands, lists
    of fields) and short lines such as the signature separator "-- " are kept as they are."""
    lines: list[str] = []
    for line in str(value).split("\n"):
        if len(line) <= width or line[:1].isspace():
            lines.append(line)
            continue
        lines.extend(
            textwrap.wrap(line, width=width, break_long_words=False, break_on_hyphens=False)
        )
    return "\n".join(lines)


def one_line(text: str) -> str:
    """All whitespace, line breaks of every kind included, collapsed to single spaces."""
    return " ".join(text.split())


def template_files(name: str) -> tuple[str, str, str]:
    """The subject, text and HTML files of template `name`."""
    return (name + SUBJECT_SUFFIX, name + TEXT_SUFFIX, name + HTML_SUFFIX)


class Templates:
    """The templates of one folder, loaded once: restart the daemon to use edited ones
    (it checks them at start, so an edit can never break mail on a running daemon)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # Admins write these templates: the sandbox is a cheap defence against one that
        # reaches for Python internals (''.__class__...), and an immutable one also keeps
        # templates from changing the context they are given.
        self._env = ImmutableSandboxedEnvironment(
            loader=FileSystemLoader(directory, encoding="utf-8"),
            undefined=StrictUndefined,
            autoescape=select_autoescape(
                enabled_extensions=("html",), default_for_string=False, default=False
            ),
            keep_trailing_newline=True,
            # Block tags on their own line leave no blank line behind in the text mail.
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,
        )
        self._env.filters["linebreaks"] = linebreaks
        self._env.filters["wrap"] = wrap

    def render(self, name: str, context: Mapping[str, object]) -> RenderedMail:
        """Render NAME.subject.txt (as one line), NAME.txt and NAME.html.

        A context that breaks the contract (CONTEXT_KEYS) is the caller's bug: ValueError.
        """
        _check_context(name, context)
        subject_file, text_file, html_file = template_files(name)
        return RenderedMail(
            subject=one_line(self._render_file(subject_file, context)),
            text=self._render_file(text_file, context),
            html=self._render_file(html_file, context),
        )

    def render_subject(self, name: str, context: Mapping[str, object]) -> str:
        """Only NAME.subject.txt, as one line: what planning needs before the mail is built."""
        _check_context(name, context)
        return one_line(self._render_file(template_files(name)[0], context))

    def check(self) -> None:
        """Check every template: it uses only what its context provides, and renders with
        the samples (and their variants); raises TemplateError on the first problem."""
        if not self.directory.is_dir():
            raise TemplateError(str(self.directory), "no such templates folder")
        for name in TEMPLATE_NAMES:
            for filename in template_files(name):
                self._check_names(name, filename)
            for context in _samples(name):
                self.render(name, context)

    # --- internals -----------------------------------------------------------------------

    def _path(self, filename: str) -> str:
        return str(self.directory / filename)

    def _render_file(self, filename: str, context: Mapping[str, object]) -> str:
        try:
            return self._env.get_template(filename).render(context)
        except jinja2.TemplateNotFound as exc:
            if not self.directory.is_dir():
                raise TemplateError(str(self.directory), "no such templates folder") from exc
            if exc.name == filename:
                raise TemplateError(self._path(filename), "no such template file") from exc
            raise TemplateError(
                self._path(filename), f"{exc.name}: no such template file to include"
            ) from exc
        except jinja2.TemplateSyntaxError as exc:
            path = exc.filename or self._path(filename)
            raise TemplateError(path, exc.message or "syntax error", exc.lineno) from exc
        # Whatever else goes wrong while rendering (an undefined name, the sandbox's
        # SecurityError, a TypeError in an expression) is the template's fault too.
        except Exception as exc:
            path, line = self._locate(exc.__traceback__, self._path(filename))
            problem = str(exc) or type(exc).__name__
            if not isinstance(exc, jinja2.TemplateError):
                problem = f"{type(exc).__name__}: {problem}"
            raise TemplateError(path, problem, line) from exc

    def _locate(self, tb: TracebackType | None, default: str) -> tuple[str, int | None]:
        """The template file and line an error was raised in. Jinja2 rewrites tracebacks
        so that template code appears as frames of the template's file and line."""
        # The loader names files by the normalised path of the folder.
        folder = os.path.normpath(self.directory) + os.sep
        path, line = default, None
        while tb is not None:
            code_file = tb.tb_frame.f_code.co_filename
            if code_file.startswith(folder):
                path, line = code_file, tb.tb_lineno
            tb = tb.tb_next
        return path, line

    def _check_names(self, name: str, filename: str) -> None:
        """Static checks that rendering the samples could miss in an untaken branch: every
        name the file uses is in its context, every field of a ticket or entry exists."""
        loader = self._env.loader
        assert loader is not None
        try:
            source, path, _ = loader.get_source(self._env, filename)
            ast = self._env.parse(source, filename, path)
            # This compiles the template, so it also finds unknown filters and tests.
            used = find_undeclared_variables(ast)
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(self._path(filename), "no such template file") from exc
        except jinja2.TemplateSyntaxError as exc:
            problem = exc.message or "syntax error"
            raise TemplateError(self._path(filename), problem, exc.lineno) from exc
        except UnicodeDecodeError as exc:
            raise TemplateError(self._path(filename), f"not UTF-8 ({exc.reason})") from exc
        allowed = CONTEXT_KEYS[name]
        unknown = sorted(used - allowed)
        if unknown:
            raise TemplateError(
                self._path(filename),
                f"uses {unknown[0]!r}, which is not given to {name} templates "
                f"(they get: {', '.join(sorted(allowed))})",
            )
        for line, variable, field in _fields_used(ast):
            keys = FIELD_KEYS[variable]
            if variable in allowed and field not in keys:
                raise TemplateError(
                    self._path(filename),
                    f"{variable}.{field}: no such field (a {variable} has: "
                    f"{', '.join(sorted(keys))})",
                    line,
                )


def _fields_used(ast: nodes.Template) -> Iterator[tuple[int, str, str]]:
    """(line, variable, field) for every `ticket.x`, `entry["x"]` and the like."""
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        assert isinstance(node, nodes.Getattr | nodes.Getitem)
        target = node.node
        if not isinstance(target, nodes.Name) or target.name not in FIELD_KEYS:
            continue
        if isinstance(node, nodes.Getattr):
            yield node.lineno, target.name, node.attr
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            yield node.lineno, target.name, node.arg.value


def _check_context(name: str, context: Mapping[str, object]) -> None:
    if name not in CONTEXT_KEYS:
        raise ValueError(f"{name!r}: no such template (expected one of {TEMPLATE_NAMES})")
    _check_keys(name, set(context), CONTEXT_KEYS[name])
    for variable, keys in FIELD_KEYS.items():
        if variable not in context:
            continue
        value = context[variable]
        if not isinstance(value, Mapping):
            raise ValueError(f"{name}: {variable} must be a mapping, not {type(value).__name__}")
        _check_keys(f"{name}: {variable}", set(value), keys)


def _check_keys(what: str, given: set[str], expected: frozenset[str]) -> None:
    missing = sorted(expected - given)
    extra = sorted(given - expected)
    if missing or extra:
        raise ValueError(
            f"{what}: context does not match the contract "
            f"(missing: {', '.join(missing) or '-'}; unexpected: {', '.join(extra) or '-'})"
        )


def _samples(name: str) -> Iterator[Mapping[str, object]]:
    """The sample context of `name`, then its variants."""
    sample = SAMPLE_CONTEXTS[name]
    yield sample
    for overrides in _VARIANTS[name]:
        yield {**sample, **overrides}
    ticket = sample.get("ticket")
    if isinstance(ticket, Mapping):
        yield {**sample, "ticket": {**ticket, **_NO_SUBJECT}}
