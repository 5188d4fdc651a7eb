"""Readable text: HTML to text, quote and signature stripping, attachment display names.

Fixtures in tests/data/readable are our own: NAME.txt is a reply body as a mail program
writes it, NAME.expected.txt what strip_reply must leave of it. The talon corpus check
runs when the shared sample mail is present beside the repository.
"""

from __future__ import annotations

import codecs
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from gateway.readable import (
    MAX_INPUT_CHARS,
    html_to_text,
    readable_text,
    sanitise_filename,
    strip_reply,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "readable"
TALON_DIRS = (ROOT.parent / "shared" / "mail" / "talon", Path("/work/shared/mail/talon"))

REPLY_FIXTURES = sorted(
    path.stem for path in DATA.glob("*.txt") if not path.name.endswith(".expected.txt")
)


def fixture(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


# --- strip_reply: the styles of the common mail programs ------------------------------


@pytest.mark.parametrize("name", REPLY_FIXTURES)
def test_strip_reply_fixture(name: str) -> None:
    assert strip_reply(fixture(f"{name}.txt")) == fixture(f"{name}.expected.txt").strip()


def test_fixtures_cover_the_required_styles() -> None:
    assert set(REPLY_FIXTURES) >= {
        "gmail",
        "gmail_wrapped",
        "apple_mail",
        "outlook",
        "outlook_original_message",
        "outlook_underscore",
        "german",
        "french",
        "signature_dashes",
        "only_quote",
        "inline_reply",
        "bottom_post",
    }


@pytest.mark.parametrize(
    "attribution",
    [
        "El vie, 27 nov 2026 a las 10:00, Alice (<a@example.com>) escribió:",
        "Op vr 27 nov. 2026 om 10:00 schreef Alice <a@example.com>:",
        "Il giorno ven 27 nov 2026 alle ore 10:00 Alice <a@example.com> ha scritto:",
        "27.11.2026 10:00 пользователь Alice <a@example.com> написал:",
        "On Fri, Nov 27, 2026 at 10:00 AM, Alice Example\n<a@example.com> wrote:",
        "--- On Fri, 11/27/26, Alice <a@example.com> wrote:",
    ],
)
def test_attributions_in_other_forms_and_languages(attribution: str) -> None:
    text = f"Thank you, it works.\n\n{attribution}\n\n> Does it work now?\n"
    assert strip_reply(text) == "Thank you, it works."


def test_attribution_without_quote_marks_cuts_the_rest() -> None:
    # Some programs put the old message below the attribution without any ">".
    text = "Done.\n\nAm 27.11.2026 um 10:00 schrieb Alice <a@example.com>:\n\nPlease check.\n"
    assert strip_reply(text) == "Done."


def test_outlook_header_block_on_one_line() -> None:
    text = (
        "Agreed.\n\nFrom: Alice <a@example.com> Sent: Friday, November 27, 2026 10:00 "
        "To: Bob Subject: Plan\n\nHere is the plan.\n"
    )
    assert strip_reply(text) == "Agreed."


def test_forwarded_message_marker() -> None:
    text = "See below.\n\n---------- Forwarded message ---------\nFrom: Alice <a@example.com>\n"
    assert strip_reply(text) == "See below."


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("It works.\n\nSent from my iPhone", "It works."),
        ("It works.\n\nSent from my Android phone", "It works."),
        ("It works.\n\nGet Outlook for iOS", "It works."),
        ("It works.\n\nVon meinem iPhone gesendet", "It works."),
        ("It works.\n\nThanks,\nAlice", "It works."),
        ("It works.\n\nMit freundlichen Grüßen\nAlice Example\nExample GmbH", "It works."),
        ("It works.\n\nAlice Example\nalice@example.com\n+1 555 0100", "It works."),
    ],
)
def test_signatures(body: str, expected: str) -> None:
    assert strip_reply(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        # A sign-off followed by a real question keeps the question.
        "Thanks\n\nAlso, is the printer fixed?",
        # Contact details the writer introduces are content, not a signature.
        "Please call me back at:\n\nAlice Example\nalice@example.com\n+1 555 0100",
        # A rule that sets off a list is not a signature delimiter.
        "Steps:\n---\nopen the tray\nclose it",
        "Thanks, that fixed it.",
    ],
)
def test_text_that_only_looks_like_a_signature_is_kept(body: str) -> None:
    assert strip_reply(body) == body


def test_plain_text_without_quotes_is_unchanged() -> None:
    body = "Hello,\n\nthe printer on floor 2 is offline.\nCan you look at it?\n\nAlice"
    assert strip_reply(body) == body


def test_only_signature_and_quote_keeps_the_original() -> None:
    body = "> quoted\n> lines\n"
    assert strip_reply(body) == body.strip()


# --- issue 11: the text staff read in a notice -------------------------------------------

MAILMAN_FOOTER = (
    "_______________________________________________\n"
    "users mailing list\n"
    "users@lists.example.org\n"
    "https://lists.example.org/mailman/listinfo/users"
)
# Google Groups writes its footer after "--" (often without the space of RFC 3676's "-- "),
# in lines far longer than a signature's.
GROUPS_FOOTER = (
    "--\n"
    'You received this message because you are subscribed to the Google Groups "Users" group.\n'
    "To unsubscribe from this group and stop receiving emails from it, send an email to "
    "users+unsubscribe@googlegroups.com.\n"
    "To view this discussion on the web visit "
    "https://groups.google.com/d/msgid/users/abc%40mail.example.com."
)
INTERLEAVED = "> Is it on?\nYes.\n> Is it plugged in?\nAlso yes.\n> Thanks, Alice\n> Support\n\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # The last ">" block of an interleaved reply is followed only by the writer's
        # signature or the list's footer: that is not an answer, so the block is history.
        (
            INTERLEAVED + "-- \nBob Example\nACME Ltd",
            "> Is it on?\nYes.\n> Is it plugged in?\nAlso yes.",
        ),
        (INTERLEAVED + "--\nBob Example", "> Is it on?\nYes.\n> Is it plugged in?\nAlso yes."),
        (INTERLEAVED + MAILMAN_FOOTER, "> Is it on?\nYes.\n> Is it plugged in?\nAlso yes."),
        (INTERLEAVED + GROUPS_FOOTER, "> Is it on?\nYes.\n> Is it plugged in?\nAlso yes."),
        (INTERLEAVED + "-Bob", "> Is it on?\nYes.\n> Is it plugged in?\nAlso yes."),
        # A quote, the signature, then older history quoted below the signature.
        ("Works now.\n\n> Please restart it.\n\n--\nBob\n\n> > older", "Works now."),
        # Top-posted replies with a list footer after the quote, and footers on their own.
        ("Thanks.\n\n> Please restart it.\n\n" + GROUPS_FOOTER, "Thanks."),
        ("Thanks.\n\n> Please restart it.\n\n" + MAILMAN_FOOTER, "Thanks."),
        ("Thanks, will do.\n\n" + GROUPS_FOOTER, "Thanks, will do."),
        ("> Please restart it.\n\nDone, it works.\n\n" + GROUPS_FOOTER, "Done, it works."),
    ],
    ids=[
        "interleaved-sig-delimiter",
        "interleaved-bare-dashes",
        "interleaved-mailman-footer",
        "interleaved-groups-footer",
        "interleaved-dash-sign-off",
        "quote-sig-older-quote",
        "top-post-groups-footer",
        "top-post-mailman-footer",
        "groups-footer-alone",
        "bottom-post-groups-footer",
    ],
)
def test_quote_followed_by_signature_or_list_footer_is_history(body: str, expected: str) -> None:
    assert strip_reply(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        "The printer works again.\n\n-Bob",
        "The printer works again.\n-Bob",
        "The printer works again.\n--Alice",
        "The printer works again.\n\n-- Alice Example\nACME Ltd",
        "The printer works again.\n-JD",
        "The printer works again.\n\n-Zoë\nHead of IT\n+44 20 7946 0000",
        "The printer works again.\n\n-\u9648\u5586",  # a name in a script without case
    ],
)
def test_dash_sign_off_ends_the_text(body: str) -> None:
    assert strip_reply(body) == "The printer works again."


@pytest.mark.parametrize(
    "body",
    [
        # A list written with dashes, a negative number, a bullet with a space, an option.
        "Please buy:\n-Milk\n-Eggs",
        "It is cold outside\n-5 degrees",
        "Who is on call:\n- Bob",
        "Run the tool with\n-verbose",
        # A dash line that is a sentence, not a name.
        "I tried again.\n-It still jams on page two, what next?",
    ],
)
def test_dash_lines_that_are_not_a_sign_off_are_kept(body: str) -> None:
    assert strip_reply(body) == body


@pytest.mark.parametrize(
    "device",
    [
        "Sent from my iPhone",
        "Sent from my Verizon, Samsung Galaxy smartphone",
        "Sent from my BlackBerry 10 smartphone on the Verizon Wireless 4G LTE network.",
        "Sent from my iPhone, please excuse typos",
        "Sent from Yahoo Mail on Android",
        "Sent from Mail for Windows 10",
        "Sent with ProtonMail Secure Email.",
        "Get Outlook for iOS<https://aka.ms/o0ukef>",
    ],
)
def test_device_and_app_lines_at_the_end_are_removed(device: str) -> None:
    assert strip_reply(f"It works.\n\n{device}") == "It works."
    assert strip_reply(f"It works.\n\n{device}\nBob") == "It works."


@pytest.mark.parametrize(
    "body",
    [
        # "Sent from my ..." that starts a sentence of the message is the message.
        "Hello,\n\nSent from my phone because the laptop will not start, can you swap it?",
        "The report is below.\nSent from my laptop I get error 42 when I print.",
        "Hello,\nSent from my home address yesterday but it bounced.\nBob",
        # A device line with a question after it is not at the end of the text.
        "It works.\n\nSent from my iPhone\nAlso, can you check the scanner?",
    ],
)
def test_sent_from_in_a_sentence_is_kept(body: str) -> None:
    assert strip_reply(body) == body


# --- html_to_text and readable_text ----------------------------------------------------


def test_html_only_message() -> None:
    text = html_to_text(fixture("html_only.html"))
    assert "<" not in text.replace("\u2039", "")
    lowered = text.lower()
    for banned in ("<script", "javascript:", "evil.example.com", "tracker", "url(", "expression"):
        assert banned not in lowered
    # alert(5) sits in UTF-7 text that was never decoded, so it is inert and stays; every
    # other one was inside a script, style, attribute, link or comment.
    for number in ('"head"', "1", "2", "3", "4", "6"):
        assert f"alert({number})" not in text
    assert "Raw text: +ADw-script+AD4-alert(5)+ADw-/script+AD4-" in text
    assert "Printer offline" not in text  # the <title> is head matter, not body text
    assert 'Hello & good morning,\n\nthe printer says "paper jam" \u2014 again' in text
    assert "- Opened the tray\n  - removed the paper\n  - closed it again\n- Restarted" in text
    assert "Click here or see the status page [https://status.example.com/printers]." in text
    assert text.endswith("Thanks,\nBob")


def test_utf7_script_never_becomes_markup() -> None:
    raw = b"<p>Hi</p>+ADw-script+AD4-alert(1)+ADw-/script+AD4-<p>Bye</p>"
    # Read as ASCII (a lying or ignored charset) the UTF-7 stays inert text ...
    assert "<script" not in html_to_text(raw.decode("ascii")).lower()
    # ... and decoded as UTF-7 it is a real <script> element, which is dropped.
    decoded = html_to_text(codecs.decode(raw, "utf-7"))
    assert "<script" not in decoded.lower()
    assert "alert" not in decoded
    assert decoded == "Hi\n\nBye"


def test_escaped_markup_is_defused() -> None:
    text = html_to_text("<p>&lt;script&gt;alert(1)&lt;/script&gt; &lt;img src=x onerror=y&gt;</p>")
    assert "<script" not in text and "<img" not in text and "</" not in text
    # An address in angle brackets is not markup and stays as written.
    assert html_to_text("<p>Alice &lt;a@example.com&gt;</p>") == "Alice <a@example.com>"


def test_entities_and_whitespace() -> None:
    html = "<div>caf&eacute; &#x263A; &#169;&nbsp;2026 &amp;&amp; <b>bold</b>\n\n  text</div>"
    assert html_to_text(html) == "café ☺ © 2026 && bold text"


def test_blockquote_becomes_quoted_lines() -> None:
    html = (
        "<div>Yes.</div><div>On Fri, Nov 27, 2026 at 10:00 AM Alice wrote:<br>"
        "<blockquote>Is it fixed?<br>Alice</blockquote></div>"
    )
    text = html_to_text(html)
    assert "> Is it fixed?\n> Alice" in text
    assert strip_reply(text) == "Yes."


def test_links_only_safe_schemes() -> None:
    html = (
        '<a href="https://example.com/a">docs</a> <a href="mailto:a@example.com">a@example.com</a>'
        ' <a href=" JaVaScRiPt:alert(1)">x</a> <a href="data:text/html,hi">y</a>'
        ' <a href="https://example.com/b">https://example.com/b</a>'
    )
    assert html_to_text(html) == (
        "docs [https://example.com/a] a@example.com x y https://example.com/b"
    )


@pytest.mark.parametrize("html", ["", "   ", "<!-- only a comment -->", "<script>x</script>"])
def test_html_with_no_text(html: str) -> None:
    assert html_to_text(html) == ""


def test_readable_text_prefers_plain_text() -> None:
    assert readable_text("plain body\n", "<p>html body</p>") == "plain body\n"
    assert readable_text(" \n\t", "<p>html body</p>") == "html body"
    assert readable_text("", "") == ""


def test_replacement_characters_never_exceptions() -> None:
    # A lone surrogate (what a surrogateescape decode of a lying charset leaves) cannot be
    # stored as UTF-8: it must come out as U+FFFD, and NUL and other controls not at all.
    body = "caf\udce9 \x00ok\x1b[31m"
    for text in (readable_text(body, ""), strip_reply(body), html_to_text(body)):
        text.encode("utf-8")
        assert "\ufffd" in text and "\x00" not in text and "\x1b" not in text


@pytest.mark.parametrize("bad", [None, 42, b"bytes"])
def test_never_raises_on_the_wrong_type(bad: object) -> None:
    assert html_to_text(bad) == ""  # type: ignore[arg-type]
    assert strip_reply(bad) == ""  # type: ignore[arg-type]
    assert readable_text(bad, bad) == ""  # type: ignore[arg-type]
    assert sanitise_filename(bad) == "attachment"  # type: ignore[arg-type]


# --- sanitise_filename -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("/etc/cron.d/x", "x"),
        ("..\\..\\win.ini", "win.ini"),
        ("a\x00b.txt", "ab.txt"),
        ("invoice\u202efdp.exe", "invoicefdp.exe"),
        ("report\u2066.pdf\u2069.exe", "report.pdf.exe"),
        ("  quarterly \t report .xlsx ", "quarterly report .xlsx"),
        (".htaccess", "htaccess"),
        ("dir/", "dir"),
        ("", "attachment"),
        (None, "attachment"),
        (".", "attachment"),
        ("..", "attachment"),
        ("../..", "attachment"),
        ("\u202e", "attachment"),
    ],
)
def test_sanitise_filename(name: str | None, expected: str) -> None:
    assert sanitise_filename(name) == expected


def test_sanitise_filename_long_names_keep_their_extension() -> None:
    long_ascii = sanitise_filename("a" * 1000 + ".pdf")
    assert len(long_ascii.encode("utf-8")) == 255 and long_ascii.endswith(".pdf")
    # Multi-byte characters are never cut in half.
    long_utf8 = sanitise_filename("é" * 1000 + ".docx")
    assert len(long_utf8.encode("utf-8")) <= 255 and long_utf8.endswith(".docx")
    assert "\ufffd" not in long_utf8


def test_sanitise_filename_fallback_is_sanitised_too() -> None:
    assert sanitise_filename("..", fallback="../part-2.txt") == "part-2.txt"
    assert sanitise_filename(None, fallback="..") == "attachment"


# --- hostile input ---------------------------------------------------------------------


def timed(function: object, *args: str) -> float:
    start = time.perf_counter()
    function(*args)  # type: ignore[operator]
    return time.perf_counter() - start


def test_a_megabyte_of_quote_lines_is_fast() -> None:
    body = "> quoted line\n" * (MAX_INPUT_CHARS // 14)
    assert timed(strip_reply, body) < 1.0


def test_pathological_attribution_line_is_fast() -> None:
    # Nested or unbounded quantifiers over "On ... On ... wrote" take minutes in some
    # libraries (see the module comments); ours look at a bounded window of each line.
    line = "On " + "Mon, 1 Jan 2026 at 10:00 On " * 40_000 + "wrote"
    assert timed(strip_reply, line) < 1.0
    assert timed(strip_reply, line + ":\n> x\n" + line + ":\n") < 1.0


# Other shapes that are quadratic or worse in naive line scanners and regexes. The bound
# is loose (a regression to quadratic takes minutes, not seconds) so CI is not flaky.
HOSTILE = {
    "blank lines": "\n" * MAX_INPUT_CHARS,
    "colon lines": "a:\n" * (MAX_INPUT_CHARS // 3),
    "header-like lines": "x: y\n" * (MAX_INPUT_CHARS // 5),
    "From lines": "From: x\n" * (MAX_INPUT_CHARS // 8),
    "attribution lines": "On x wrote:\n> q\na\n" * (MAX_INPUT_CHARS // 18),
    "date colon lines": "2026/1/1 <a@example.com>:\n" * (MAX_INPUT_CHARS // 26),
    "signature delimiters": "-- \n" * (MAX_INPUT_CHARS // 4),
    "rules": "---\n" * (MAX_INPUT_CHARS // 4),
    # Every text between quotes is checked for being only a signature or a list footer.
    "quotes and signatures": "> q\n-- \nBob\n" * (MAX_INPUT_CHARS // 13),
    "quotes and dash sign-offs": "> q\n\n-Bob\n" * (MAX_INPUT_CHARS // 11),
    "quotes and footers": "> q\n--\nunsubscribe\n" * (MAX_INPUT_CHARS // 20),
    "device lines": "Sent from my phone\n" * (MAX_INPUT_CHARS // 19),
    "one long line": "On " * (MAX_INPUT_CHARS // 3),
    "over the cap": "x" * (MAX_INPUT_CHARS * 3),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_text_is_bounded(name: str) -> None:
    assert timed(strip_reply, HOSTILE[name]) < 3.0


@pytest.mark.parametrize(
    "html",
    [
        "</" * (MAX_INPUT_CHARS // 2),  # quadratic in CPython 3.11's html.parser
        "<!" * (MAX_INPUT_CHARS // 2),
        "<div>" * (MAX_INPUT_CHARS // 5),
        "<blockquote>" * (MAX_INPUT_CHARS // 12),
        "&gt; a<br>" * (MAX_INPUT_CHARS // 10),
        "<a href='https://example.com'>x</a>" * (MAX_INPUT_CHARS // 35),
    ],
    ids=["end tags", "bang", "div nesting", "blockquote nesting", "quote lines", "links"],
)
def test_hostile_html_is_bounded(html: str) -> None:
    assert timed(lambda h: strip_reply(html_to_text(h)), html) < 3.0


# --- the talon corpus ------------------------------------------------------------------


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "talon_corpus", ROOT / "bench" / "talon_corpus.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first: its dataclasses look their module up while being defined.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_talon_corpus_at_least_90_percent() -> None:
    directory = next((d for d in TALON_DIRS if (d / "expected.talon.json").is_file()), None)
    if directory is None:
        pytest.skip("shared/mail/talon is not present")
    bench = load_bench()
    cases, _skipped = bench.load_cases(directory)
    matched = [case.name for case in cases if bench.is_match(case, strip_reply(case.body))]
    assert len(cases) >= 30
    assert len(matched) / len(cases) >= 0.90, sorted({c.name for c in cases} - set(matched))
