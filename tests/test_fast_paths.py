"""The shortcuts taken for intake speed give exactly what the long way gives.

Each fast path (the keyword gates before the body regexes, the plain-From reader, the
one-line fast path, reply_text, the log value test) is checked against the code it stands in
for, on fixtures, on every character where that is cheap, and on generated values.
"""

from __future__ import annotations

import email.policy
import itertools
import random
import re
import string
from pathlib import Path

import pytest

from gateway import bounce, inbound, logs, readable
from gateway.address import parse_sender
from gateway.lookalike import skeleton

DATA = Path(__file__).resolve().parent / "data"
CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "mail"

GATED = (
    *(pair for pair in zip(bounce._FINGERPRINTS, bounce._FINGERPRINT_GATES, strict=True)),
    (("generic-failure", bounce._GENERIC_FAILURE), bounce._GENERIC_FAILURE_GATE),
    (("challenge-text", bounce._CHALLENGE_TEXT), bounce._CHALLENGE_TEXT_GATE),
)


# --- keyword gates ----------------------------------------------------------------------


def test_every_gate_is_derived() -> None:
    # None would be safe (the pattern always runs) but slow: a Python upgrade that changes
    # re's parse tree should be noticed here, not in the intake figures.
    for (name, _pattern), gate in GATED:
        assert gate, name


def test_fold_matches_ignorecase_on_every_character() -> None:
    # Every character re.IGNORECASE takes for an ASCII letter folds to that letter.
    letters = re.compile("[a-z]", re.IGNORECASE)
    for code in range(0x80, 0x110000):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF or not letters.fullmatch(char):
            continue
        folded = bounce._folded(char)
        assert len(folded) == 1 and folded.isascii(), hex(code)
        assert re.fullmatch(re.escape(folded), char, re.IGNORECASE), hex(code)


def test_fold_keeps_length() -> None:
    text = "\u0130stanbul \u212aelvin \u017fome \u0131 \u03a3\u03a3 \u00df"
    assert len(bounce._folded(text)) == len(text)
    assert bounce._folded(text).startswith("istanbul kelvin some i")


def _texts() -> list[str]:
    """Bodies to try the gates on: the fixtures' texts, and the corpus if it is there."""
    files = sorted((DATA / "classify").glob("*.eml"))
    if CORPUS.is_dir():
        files += sorted(CORPUS.rglob("*"))[:3000]
    texts = []
    for path in files:
        if not path.is_file() or path.stat().st_size > 1_000_000:
            continue
        parsed = inbound.parse_message(path.read_bytes(), inbound.ParseLimits())
        texts.append(parsed.text)
    return texts


def _case_variants(text: str, rng: random.Random) -> list[str]:
    swapped = "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in text)
    special = text.replace("i", "\u0131").replace("s", "\u017f").replace("k", "\u212a")
    dotted = text.replace("I", "\u0130").replace("i", "\u0130")
    return [text, text.upper(), text.lower(), swapped, special, dotted]


def test_gates_never_hide_a_match() -> None:
    rng = random.Random(7)
    texts = _texts()
    # Every match the patterns find in the texts, in other cases and with the characters
    # re.IGNORECASE folds, inside some filler.
    snippets = []
    for text in texts:
        for (_name, pattern), _gate in GATED:
            snippets += [m.group(0) for m in pattern.finditer(text[:65536])][:3]
    assert snippets
    for snippet in snippets:
        for variant in _case_variants(snippet, rng):
            sample = f"Hello,\n{variant}\nbye"
            for (name, pattern), gate in GATED:
                if pattern.search(sample):
                    assert bounce._may_match(gate, bounce._folded(sample)), (name, variant)
    for text in texts:
        folded = bounce._folded(text)
        for (name, pattern), gate in GATED:
            if pattern.search(text):
                assert bounce._may_match(gate, folded), name


def test_gated_scans_agree_with_the_patterns() -> None:
    subject = "Re: your question"
    for text in _texts():
        found = next((n for n, p in bounce._FINGERPRINTS if p.search(text)), None)
        assert bounce._fingerprint(text) == found
        assert bounce._fingerprint(text, bounce._folded(text)) == found
        challenge = bool(
            bounce._CHALLENGE_SUBJECT.search(subject) or bounce._CHALLENGE_TEXT.search(text[:8192])
        )
        assert bounce.is_challenge(subject, text) is challenge
        assert bounce._generic_failure(text, bounce._folded(text)) is bool(
            bounce._GENERIC_FAILURE.search(text)
        )


def test_may_match_is_any_alternative_with_all_clauses() -> None:
    gate = ((frozenset({"abc", "xyz"}), frozenset({"def"})), (frozenset({"ghi"}),))
    assert bounce._may_match(gate, "-- xyz -- def --")
    assert bounce._may_match(gate, "ghi")
    assert not bounce._may_match(gate, "abc only")
    assert not bounce._may_match(gate, "")
    assert bounce._may_match(None, "")


def test_gate_of_a_pattern_without_required_words_is_none() -> None:
    assert bounce._gate(re.compile(r"\w+@\w+")) is None
    assert bounce._gate(re.compile(r"abc|x")) is None  # one alternative needs only "x"
    assert bounce._gate(re.compile(r"(?:abc)?def")) == ((frozenset({"def"}),),)


# --- From values read without the header parser -----------------------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/^_`{|}~-"
NOISE = ATEXT + ' ."()<>@,;:\\[]=?\t\r\n\u00e9'


def _slow_from(value: str) -> tuple[str, tuple[tuple[str, str], ...], list[str]]:
    limits = inbound.ParseLimits()
    policy = email.policy.default.clone(header_factory=inbound._CachingHeaderRegistry())
    defects: list[str] = []
    decoded, parsed = inbound._decode_header("From", value, policy, limits, defects)
    return decoded, inbound._from_addresses(parsed, value, limits, defects), defects


@pytest.mark.parametrize(
    "value",
    [
        "alice@example.com",
        "<alice@example.com>",
        "Alice Example <alice@example.com>",
        "Mail Delivery System <MAILER-DAEMON@mx.example.net>",
        "O'Brien-Smith <o.brien+tag@sub.example.co.uk>",
        "{a}|b ~ <c!#$%&'*+/^_`{|}~-@d-e>",
    ],
)
def test_simple_from_reads_as_the_header_parser(value: str) -> None:
    simple = inbound._simple_from(value, inbound.ParseLimits())
    assert simple is not None
    decoded, addresses, defects = _slow_from(value)
    assert simple == (decoded, addresses) and defects == []


@pytest.mark.parametrize(
    "value",
    [
        '"Alice" <a@b>',
        "Alice  Example <a@b>",
        " Alice <a@b>",
        "Alice <a@b> ",
        "Alice <a@b>, Bob <c@d>",
        "a@b (Alice)",
        "=?utf-8?q?Alice?= <a@b>",
        "J. Smith <a@b>",
        "Alice\r\n <a@b>",
        "a..b@c",
        "a@b.",
        "Team: a@b;",
        "Al\u00e9 <a@b>",
    ],
)
def test_simple_from_leaves_other_values_to_the_parser(value: str) -> None:
    assert inbound._simple_from(value, inbound.ParseLimits()) is None


def test_simple_from_agrees_on_generated_values() -> None:
    rng = random.Random(11)

    def word(chars: str = ATEXT) -> str:
        return "".join(rng.choice(chars) for _ in range(rng.randint(1, 6)))

    def value() -> str:
        local = ".".join(word() for _ in range(rng.randint(1, 3)))
        domain = ".".join(
            word(string.ascii_letters + string.digits + "-") for _ in range(rng.randint(1, 3))
        )
        address = f"{local}@{domain}"
        named = " ".join(word() for _ in range(rng.randint(1, 4))) + f" <{address}>"
        text = rng.choice([address, f"<{address}>", named])
        if rng.random() < 0.5:
            chars = list(text)
            chars.insert(rng.randint(0, len(chars)), rng.choice(NOISE))
            text = "".join(chars)
        return text

    checked = 0
    for _ in range(3000):
        text = value()
        simple = inbound._simple_from(text, inbound.ParseLimits())
        if simple is None:
            continue
        decoded, addresses, defects = _slow_from(text)
        assert simple == (decoded, addresses) and defects == [], text
        checked += 1
    assert checked > 1500


def test_simple_from_keeps_the_address_limit() -> None:
    limits = inbound.ParseLimits(max_addresses=0)
    assert inbound._simple_from("Alice <a@b>", limits) == ("Alice <a@b>", ())


def test_header_classes_are_made_once_per_kind() -> None:
    first, second = inbound._CachingHeaderRegistry(), inbound._CachingHeaderRegistry()
    assert first["From"] is second["from"]
    assert first["X-One"] is first["X-Anything"]  # both unstructured
    assert first["From"] is not first["Subject"]
    assert email.headerregistry.ContentTypeHeader in first["Content-Type"].__mro__


# --- one-line values, readable text, log values -----------------------------------------


def _slow_single_line(text: str, limit: int) -> str:
    return inbound._LINE_BREAKS.sub(" ", inbound._clean(text)).strip()[:limit]


def test_single_line_fast_path_on_every_ascii_pair() -> None:
    chars = [chr(code) for code in range(128)]
    for a, b in itertools.product(chars, chars):
        for text in (a + b, f"{a}x {b}", f" {a}{b} "):
            assert inbound._single_line(text, 3) == _slow_single_line(text, 3), repr(text)


def test_single_line_slow_path_still_cleans() -> None:
    assert inbound._single_line("a\u2028b\x85c\udcff", 50) == "a b c\ufffd"


def test_reply_text_is_strip_reply_of_readable_text() -> None:
    rng = random.Random(5)
    pieces = [
        "a",
        " ",
        "\n",
        "\r",
        "\r\n",
        "\t",
        "\x00",
        "\x0b",
        "\x85",
        "\ud800",
        "\u00e9",
        "> quoted",
        "On Mon, 1 Jan 2024, Bob <b@c> wrote:",
        "-- ",
        "Thanks,",
        "Sent from my iPhone",
        "-----Original Message-----",
        "From: x",
        "Subject: s",
        "<p>",
        "&lt;b&gt;",
        "www.example.com",
    ]
    samples = [(p.read_text("utf-8"), "") for p in sorted((DATA / "readable").glob("*.txt"))]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        html = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        samples.append((text if rng.random() < 0.8 else rng.choice(["", " \n", "\x00"]), html))
    for text, html in samples:
        assert readable.reply_text(text, html) == readable.strip_reply(
            readable.readable_text(text, html)
        ), (text, html)


def test_plain_log_values_on_every_character() -> None:
    def slow(text: str) -> bool:
        return bool(text) and all(c in logs._PLAIN for c in text)

    for code in range(0x10000):
        char = chr(code)
        for text in (char, f"a{char}", f"{char}:b"):
            assert bool(logs._PLAIN_TEXT.fullmatch(text)) is slow(text), hex(code)
    assert logs.format_value("") == '""'
    assert logs.format_value("a b") == '"a b"'
    assert logs.format_value("<id@host>") == "<id@host>"


def test_cached_address_functions_answer_as_before() -> None:
    for _ in range(2):
        assert parse_sender("Alice@Example.COM") == "alice@example.com"
        assert parse_sender("not an address") is None
        assert skeleton("supp0rt@examp1e.org") == skeleton("support@example.org")
