"""Outgoing mail templates: every shipped template renders with its sample context, HTML is
autoescaped, a typo or a missing file is a TemplateError naming the file, the sandbox holds,
and each template uses only what the planner gives it (the acknowledgement never a body).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from html.parser import HTMLParser
from pathlib import Path

import jinja2
import pytest
from jinja2.exceptions import SecurityError
from jinja2.meta import find_undeclared_variables

from gateway.config import BUILTIN_TEMPLATES
from gateway.readable import html_to_text
from gateway.render import (
    COMMON_KEYS,
    CONTEXT_KEYS,
    FIELD_KEYS,
    SAMPLE_CONTEXTS,
    TEMPLATE_NAMES,
    RenderedMail,
    TemplateError,
    Templates,
    linebreaks,
    template_files,
    wrap,
)

TICKET_TEMPLATES = ("acknowledgement", "staff_reply", "status_change")
ADMIN_TEMPLATES = ("quarantine_notice", "loop_notice")
HOSTILE = "<script>alert(1)</script> & co"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co"


@pytest.fixture(scope="module")
def shipped() -> Templates:
    return Templates(BUILTIN_TEMPLATES)


@pytest.fixture
def custom(tmp_path: Path) -> Path:
    """A copy of the shipped templates that a test may break."""
    folder = tmp_path / "templates"
    shutil.copytree(BUILTIN_TEMPLATES, folder)
    return folder


def render(name: str, **changes: object) -> RenderedMail:
    return Templates(BUILTIN_TEMPLATES).render(name, {**SAMPLE_CONTEXTS[name], **changes})


def with_ticket(name: str, **changes: object) -> dict[str, object]:
    ticket = SAMPLE_CONTEXTS[name]["ticket"]
    assert isinstance(ticket, Mapping)
    return {**ticket, **changes}


def spiked(value: object, extra: str) -> object:
    """`value` with `extra` appended to every string in it (mappings and lists too)."""
    if isinstance(value, str):
        return value + extra
    if isinstance(value, Mapping):
        return {k: spiked(v, extra) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [spiked(v, extra) for v in value]
    return value


def add_line(folder: Path, filename: str, line: str) -> None:
    """Put `line` first in a text file (line 1), last in an HTML one: there it is outside
    every block of the child template, so only check()'s static checks see it."""
    path = folder / filename
    text = path.read_text(encoding="utf-8")
    path.write_text(f"{line}\n{text}" if filename.endswith(".txt") else text + line, "utf-8")


# --- the shipped templates -------------------------------------------------------------


def test_shipped_templates_pass_check(shipped: Templates) -> None:
    shipped.check()


def test_the_shipped_folder_has_every_template_file() -> None:
    for name in TEMPLATE_NAMES:
        for filename in template_files(name):
            assert (BUILTIN_TEMPLATES / filename).is_file(), filename


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_every_template_renders_its_sample(shipped: Templates, name: str) -> None:
    mail = shipped.render(name, SAMPLE_CONTEXTS[name])
    assert mail.subject and "\n" not in mail.subject
    assert mail.subject == mail.subject.strip()
    assert mail.text.strip() and mail.text.endswith("\n")
    assert mail.html.startswith("<!DOCTYPE html>")
    assert "{{" not in mail.text + mail.html and "{%" not in mail.text + mail.html


@pytest.mark.parametrize("name", TICKET_TEMPLATES)
def test_client_mail_names_the_ticket_and_says_how_to_reply(shipped: Templates, name: str) -> None:
    context = SAMPLE_CONTEXTS[name]
    mail = shipped.render(name, context)
    assert "[#12]" in mail.subject
    for part in (mail.text, html_to_text(mail.html)):
        assert "ticket [#12]" in part.lower()
        assert "reply to this mail and keep [#12] in the subject" in " ".join(part.split())
        assert str(context["reply_address"]) in part
    assert 'href="mailto:support+t12-abcdefghij@example.org"' in mail.html


def test_acknowledgement_says_what_happens_next() -> None:
    mail = render("acknowledgement")
    assert mail.subject == "[#12] The printer on floor 2 is on fire"
    text = " ".join(mail.text.split())
    assert text.startswith("Hello Alice Liddell,")
    assert "We have opened ticket [#12] about “The printer on floor 2 is on fire”" in text
    assert "a real person on our team will read your message" in text
    # No promise of a time: the context gives none.
    assert not re.search(r"\b(hours?|minutes?|days?|today|tomorrow)\b", text, re.IGNORECASE)


def test_no_name_means_a_greeting_without_one() -> None:
    for name in ("acknowledgement", "status_change", *ADMIN_TEMPLATES):
        mail = render(name, recipient_name="")
        assert mail.text.startswith("Hello,\n"), name
        assert "<p>Hello,</p>" in mail.html, name


def test_ticket_without_a_subject_reads_well() -> None:
    mail = render("acknowledgement", ticket=with_ticket("acknowledgement", subject=""))
    assert "We have opened ticket [#12] for you." in " ".join(mail.text.split())
    assert "“”" not in mail.text + mail.html
    status = render("status_change", ticket=with_ticket("status_change", subject=""))
    assert status.subject == "Ticket [#12] is solved"


def test_staff_reply_carries_the_body_and_the_staff_name() -> None:
    mail = render("staff_reply")
    assert mail.subject == "Re: [#12] The printer on floor 2 is on fire"
    assert mail.text.startswith("Hi Alice,\n\nthanks for the photo.")
    assert "\n-- \nBob Baker, Example Support\n" in mail.text
    assert "<p>Hi Alice,</p>" in mail.html and "Bob Baker, Example Support" in mail.html
    anonymous = render("staff_reply", staff_name="")
    assert "\n-- \nExample Support\n" in anonymous.text
    assert "Bob Baker" not in anonymous.text + anonymous.html


def test_staff_reply_keeps_line_breaks_in_html() -> None:
    mail = render("staff_reply", body="line one\nline two\n\n\nnext paragraph\n")
    assert "<p>line one<br>\nline two</p>\n<p>next paragraph</p>" in mail.html
    assert mail.text.startswith("line one\nline two\n\n\nnext paragraph\n\n-- \n")


@pytest.mark.parametrize(
    ("old", "new", "subject", "words"),
    [
        ("open", "solved", "Ticket [#12] is solved", "we have marked ticket [#12]"),
        ("solved", "open", "Ticket [#12] is open again", "is open again"),
        ("pending", "open", "Ticket [#12] is open again", "is open again"),
        ("open", "pending", "Ticket [#12] is now pending", "has changed from open to pending"),
    ],
)
def test_status_change_wording(old: str, new: str, subject: str, words: str) -> None:
    mail = render("status_change", old_status=old, new_status=new)
    assert mail.subject == f"{subject}: The printer on floor 2 is on fire"
    assert words in " ".join(mail.text.split())
    assert words in " ".join(html_to_text(mail.html).split())


def test_quarantine_notice_tells_the_admin_what_to_do() -> None:
    mail = render("quarantine_notice")
    # The held message's subject is the sender's words: never in our own subject line.
    assert mail.subject == "Held for review: mail from mallory@unknown.example.net (quarantine #7)"
    for part in (mail.text, html_to_text(mail.html)):
        for expected in (
            "Invoice 2024-117 overdue",
            "unknown-sender: the sender is not authorised",
            "gateway quarantine show 7",
            "gateway quarantine release 7",
            "gateway quarantine discard 7",
            "gateway quarantine block 7",
            "3 messages are held right now",
        ):
            assert expected in part
    one = render("quarantine_notice", held_count=1)
    assert "This is the only message held right now." in one.text
    unknown = render(
        "quarantine_notice",
        entry={**SAMPLE_CONTEXTS["quarantine_notice"]["entry"], "reasons": ["new-reason"]},  # type: ignore[dict-item]
    )
    assert "  - new-reason\n" in unknown.text


def test_loop_notice() -> None:
    mail = render("loop_notice")
    assert mail.subject == "Possible mail loop: 24 messages from autoreply@client.example.com"
    for part in (mail.text, html_to_text(mail.html)):
        assert "24 messages" in part and "limit of 20" in part
        assert "gateway senders block autoreply@client.example.com" in part


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_text_lines_are_short(shipped: Templates, name: str) -> None:
    mail = shipped.render(name, SAMPLE_CONTEXTS[name])
    for line in mail.text.splitlines():
        assert len(line) <= 76, line


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_text_and_html_say_the_same(shipped: Templates, name: str) -> None:
    mail = shipped.render(name, SAMPLE_CONTEXTS[name])

    def words(text: str) -> set[str]:
        return set(re.findall(r"[\w'@.+#-]*\w", text.lower()))

    assert words(mail.text) == words(html_to_text(mail.html))


class _Balance(HTMLParser):
    """Checks that every element is closed, in order, and that nothing is fetched or run."""

    VOID = frozenset({"meta", "br", "hr", "img", "link", "input"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"script", "img", "link", "style", "iframe", "object", "form"}:
            self.problems.append(f"<{tag}>")
        for key, value in attrs:
            if key in {"src", "srcset", "background"} or key.startswith("on"):
                self.problems.append(f"{tag} {key}")
            if key == "href" and not (value or "").startswith("mailto:"):
                self.problems.append(f"{tag} href={value}")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(f"</{tag}> out of order")


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_html_is_a_simple_self_contained_document(shipped: Templates, name: str) -> None:
    html = shipped.render(name, SAMPLE_CONTEXTS[name]).html
    checker = _Balance()
    checker.feed(html)
    checker.close()
    assert checker.problems == [] and checker.stack == []
    assert '<html lang="en">' in html and '<meta charset="utf-8">' in html
    assert "http:" not in html and "https:" not in html and "url(" not in html


# --- escaping and one-line subjects -----------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_html_escapes_every_value_and_text_keeps_it(shipped: Templates, name: str) -> None:
    context = {key: spiked(value, HOSTILE) for key, value in SAMPLE_CONTEXTS[name].items()}
    mail = shipped.render(name, context)
    assert "<script" not in mail.html
    assert ESCAPED in mail.html
    assert HOSTILE in mail.text
    assert "&lt;" not in mail.text and "&amp;" not in mail.text


def test_escaped_subject_body_and_staff_name() -> None:
    mail = render(
        "staff_reply",
        ticket=with_ticket("staff_reply", subject=HOSTILE),
        body=f"Hello\n{HOSTILE}",
        staff_name=HOSTILE,
    )
    assert mail.html.count(ESCAPED) == 4  # title, body, staff name, ticket line
    assert f"<p>Hello<br>\n{ESCAPED}</p>" in mail.html
    assert mail.subject == f"Re: [#12] {HOSTILE}"  # a header: the caller sanitises it
    assert mail.text.count(HOSTILE) == 3


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
@pytest.mark.parametrize("breaker", ["\n", "\r\n", "\r", "\u2028", "\x85", "\t\v\f"])
def test_subject_is_one_line_whatever_the_values_hold(
    shipped: Templates, name: str, breaker: str
) -> None:
    context = {
        key: spiked(value, f"{breaker}Bcc: x@example.com{breaker}")
        for key, value in SAMPLE_CONTEXTS[name].items()
    }
    subject = shipped.render(name, context).subject
    assert subject.splitlines() == [subject]
    assert "  " not in subject and subject == subject.strip()


# --- typos, missing files and the sandbox ------------------------------------------------


def test_a_typo_fails_render_and_check_naming_the_file(custom: Path) -> None:
    add_line(custom, "acknowledgement.txt", "Ticket {{ tiket.number }}")
    templates = Templates(custom)
    with pytest.raises(TemplateError, match=r"acknowledgement\.txt, line 1: 'tiket' is undefined"):
        templates.render("acknowledgement", SAMPLE_CONTEXTS["acknowledgement"])
    with pytest.raises(TemplateError, match=r"acknowledgement\.txt") as caught:
        templates.check()
    assert "tiket" in str(caught.value)
    assert caught.value.path == str(custom / "acknowledgement.txt")


def test_render_wraps_the_jinja_error(custom: Path) -> None:
    add_line(custom, "staff_reply.txt", "{{ ticket.numbr }}")
    with pytest.raises(TemplateError, match=r"staff_reply\.txt, line 1: .*numbr") as caught:
        Templates(custom).render("staff_reply", SAMPLE_CONTEXTS["staff_reply"])
    assert isinstance(caught.value.__cause__, jinja2.UndefinedError)


def test_check_finds_typos_in_branches_the_samples_never_take(custom: Path) -> None:
    add_line(
        custom, "status_change.txt", '{% if new_status == "escalated" %}{{ tiket }}{% endif %}'
    )
    with pytest.raises(
        TemplateError, match=r"status_change\.txt: uses 'tiket', which is not given"
    ):
        Templates(custom).check()


def test_check_finds_unknown_fields_in_branches_the_samples_never_take(custom: Path) -> None:
    add_line(
        custom, "status_change.html", '{% if new_status == "x" %}{{ ticket["owner"] }}{% endif %}'
    )
    with pytest.raises(
        TemplateError, match=r"status_change\.html, line \d+: ticket\.owner: no such"
    ):
        Templates(custom).check()


def test_a_template_cannot_use_what_its_context_lacks(custom: Path) -> None:
    # The acknowledgement is never given the client's message: a template that wants it
    # fails the check at start instead of rendering an empty quote.
    add_line(custom, "acknowledgement.html", "{% if body is defined %}{{ body }}{% endif %}")
    with pytest.raises(TemplateError, match=r"acknowledgement\.html: uses 'body'"):
        Templates(custom).check()


def test_a_syntax_error_names_file_and_line(custom: Path) -> None:
    add_line(custom, "loop_notice.txt", "{% if count > %}")
    with pytest.raises(TemplateError, match=r"loop_notice\.txt, line 1: ") as caught:
        Templates(custom).render("loop_notice", SAMPLE_CONTEXTS["loop_notice"])
    assert isinstance(caught.value.__cause__, jinja2.TemplateSyntaxError)
    with pytest.raises(TemplateError, match=r"loop_notice\.txt, line 1: "):
        Templates(custom).check()


def test_an_error_in_the_layout_names_the_layout(custom: Path) -> None:
    layout = custom / "_layout.html"
    layout.write_text(
        layout.read_text("utf-8").replace("{% block content", "{{ dsk }}{% block content"), "utf-8"
    )
    with pytest.raises(TemplateError, match=r"_layout\.html, line \d+: 'dsk' is undefined"):
        Templates(custom).check()


@pytest.mark.parametrize("filename", ["loop_notice.html", "staff_reply.subject.txt"])
def test_a_missing_template_file(custom: Path, filename: str) -> None:
    (custom / filename).unlink()
    name = filename.split(".")[0]
    with pytest.raises(TemplateError, match=re.escape(f"{filename}: no such template file")):
        Templates(custom).render(name, SAMPLE_CONTEXTS[name])
    with pytest.raises(TemplateError, match=re.escape(f"{filename}: no such template file")):
        Templates(custom).check()


def test_an_unknown_filter_or_include(custom: Path) -> None:
    add_line(custom, "loop_notice.txt", "{{ sender | shout }}")
    with pytest.raises(TemplateError, match=r"loop_notice\.txt, line 1: No filter named 'shout'"):
        Templates(custom).check()
    with pytest.raises(TemplateError, match=r"loop_notice\.txt, line 1: No filter named 'shout'"):
        Templates(custom).render("loop_notice", SAMPLE_CONTEXTS["loop_notice"])
    add_line(custom, "staff_reply.txt", '{% include "signature.txt" %}')
    with pytest.raises(TemplateError, match=r"staff_reply\.txt: signature\.txt: no such template"):
        Templates(custom).render("staff_reply", SAMPLE_CONTEXTS["staff_reply"])


def test_errors_are_located_in_a_folder_given_with_dotdot(custom: Path) -> None:
    (custom.parent / "elsewhere").mkdir()
    add_line(custom, "acknowledgement.txt", "{{ tiket }}")
    templates = Templates(custom.parent / "elsewhere" / ".." / custom.name)
    with pytest.raises(TemplateError, match=r"acknowledgement\.txt, line 1: 'tiket' is undefined"):
        templates.render("acknowledgement", SAMPLE_CONTEXTS["acknowledgement"])


def test_a_missing_folder(tmp_path: Path) -> None:
    templates = Templates(tmp_path / "nowhere")
    with pytest.raises(TemplateError, match="nowhere: no such templates folder"):
        templates.check()
    with pytest.raises(TemplateError, match="nowhere: no such templates folder"):
        templates.render("loop_notice", SAMPLE_CONTEXTS["loop_notice"])


def test_a_template_that_is_not_utf8(custom: Path) -> None:
    (custom / "loop_notice.txt").write_bytes(b"Hello \xff\n")
    with pytest.raises(TemplateError, match=r"loop_notice\.txt: .*UTF-8|loop_notice\.txt: .*utf-8"):
        Templates(custom).check()


@pytest.mark.parametrize(
    "expression",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ticket.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_the_sandbox_keeps_templates_from_python_internals(custom: Path, expression: str) -> None:
    add_line(custom, "acknowledgement.txt", expression)
    with pytest.raises(TemplateError, match=r"acknowledgement\.txt, line 1: .*unsafe") as caught:
        Templates(custom).render("acknowledgement", SAMPLE_CONTEXTS["acknowledgement"])
    assert isinstance(caught.value.__cause__, SecurityError)


def test_templates_cannot_change_their_context(custom: Path) -> None:
    add_line(custom, "quarantine_notice.txt", "{{ entry.reasons.append('released') }}")
    context = {**SAMPLE_CONTEXTS["quarantine_notice"]}
    context["entry"] = {**context["entry"], "reasons": ["unknown-sender"]}  # type: ignore[dict-item]
    with pytest.raises(TemplateError, match=r"quarantine_notice\.txt, line 1: .*unsafe"):
        Templates(custom).render("quarantine_notice", context)
    assert context["entry"]["reasons"] == ["unknown-sender"]  # type: ignore[index]


def test_a_runtime_error_in_an_expression_is_a_template_error(custom: Path) -> None:
    add_line(custom, "loop_notice.txt", "{{ count / 0 }}")
    with pytest.raises(TemplateError, match=r"loop_notice\.txt, line 1: ZeroDivisionError"):
        Templates(custom).check()


# --- the context contract ----------------------------------------------------------------


def test_the_context_contract() -> None:
    # The keys the planner provides (a contract with gateway/notify.py): pinned here.
    assert COMMON_KEYS == {"desk", "mailbox", "reply_address", "recipient", "recipient_name"}
    assert {name: keys - COMMON_KEYS for name, keys in CONTEXT_KEYS.items()} == {
        "acknowledgement": {"ticket", "what_next", "next_open", "respond_by"},
        "page": {
            "ticket",
            "organisation",
            "unit",
            "reasons",
            "step",
            "ack_due",
            "ack_within",
            "cli",
        },
        "staff_reply": {"ticket", "body", "staff_name"},
        "status_change": {"ticket", "old_status", "new_status"},
        "quarantine_notice": {"entry", "held_count", "cli"},
        "loop_notice": {"sender", "count", "threshold"},
        "staff_new_ticket": {"ticket", "client", "organisation", "unit", "owner", "due", "text"},
        "staff_client_reply": {"ticket", "client", "organisation", "unit", "owner", "due", "text"},
        "reminder": {"ticket", "unit", "due", "due_in", "set_by", "note", "owner", "cli"},
        "escalation": {"ticket", "unit", "due", "late", "set_by", "note", "owner", "lead", "cli"},
        "digest": {"unit", "day", "counts", "overdue", "due_today", "new", "unassigned", "cli"},
        "account_manager_notice": {
            "ticket",
            "client",
            "organisation",
            "unit",
            "owner",
            "due",
            "text",
            "account_manager",
            "reasons",
            "commitments",
            "cli",
        },
    }
    assert FIELD_KEYS == {
        "ticket": {"number", "tag", "subject", "status"},
        "entry": {"id", "sender", "subject", "reasons", "received_at"},
    }
    assert tuple(CONTEXT_KEYS) == TEMPLATE_NAMES == tuple(SAMPLE_CONTEXTS)
    for name, context in SAMPLE_CONTEXTS.items():
        assert set(context) == CONTEXT_KEYS[name]
        for variable, keys in FIELD_KEYS.items():
            value = context.get(variable)
            if value is not None:
                assert isinstance(value, Mapping) and set(value) == keys


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_shipped_templates_use_only_their_contract(name: str) -> None:
    env = jinja2.Environment()
    env.filters.update(wrap=wrap, linebreaks=linebreaks)
    for filename in template_files(name):
        source = (BUILTIN_TEMPLATES / filename).read_text("utf-8")
        used = find_undeclared_variables(env.parse(source))
        assert used <= CONTEXT_KEYS[name], filename
        if name == "acknowledgement":
            assert "body" not in used and "body" not in source, filename
    layout = (BUILTIN_TEMPLATES / "_layout.html").read_text("utf-8")
    assert find_undeclared_variables(env.parse(layout)) <= COMMON_KEYS


def test_render_refuses_a_context_off_the_contract(shipped: Templates) -> None:
    sample = SAMPLE_CONTEXTS["acknowledgement"]
    with pytest.raises(ValueError, match="unexpected: body"):
        shipped.render("acknowledgement", {**sample, "body": "the client's words"})
    with pytest.raises(ValueError, match="missing: recipient_name"):
        shipped.render(
            "acknowledgement", {k: v for k, v in sample.items() if k != "recipient_name"}
        )
    with pytest.raises(ValueError, match=r"ticket: context .* unexpected: body"):
        shipped.render(
            "acknowledgement", {**sample, "ticket": with_ticket("acknowledgement", body="x")}
        )
    with pytest.raises(ValueError, match="ticket must be a mapping"):
        shipped.render("acknowledgement", {**sample, "ticket": 12})
    with pytest.raises(ValueError, match="no such template"):
        shipped.render("no_such_template", sample)


# --- filters ------------------------------------------------------------------------------


def test_linebreaks_escapes_and_keeps_paragraphs() -> None:
    assert linebreaks("a & b\r\nc\n \n\nd<e>\n") == "<p>a &amp; b<br>\nc</p>\n<p>d&lt;e&gt;</p>"
    assert linebreaks("") == ""


def test_wrap_wraps_prose_and_leaves_the_rest() -> None:
    prose = "word " * 30 + "https://example.org/a-very-long-address-that-must-not-be-broken-at-all"
    wrapped = wrap(f"{prose}\n\n-- \n  gateway quarantine show 7 {'x' * 80}\n")
    lines = wrapped.split("\n")
    assert all(len(line) <= 72 for line in lines[:3])
    assert "https://example.org/a-very-long-address-that-must-not-be-broken-at-all" in lines
    assert wrapped.endswith("\n\n-- \n  gateway quarantine show 7 " + "x" * 80 + "\n")
