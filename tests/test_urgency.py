"""The urgency rule table (gateway/urgency.py, issue 12 item 1) on its labelled set and on
the cases each rule and guard exists for.

The labelled set is tests/data/urgency/*.eml, labelled by the file name's first word; each
file goes through the real parser (quotes and signatures stripped by gateway.readable) and
the real classifier, as in the daemon.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.classify import Kind, OwnIdentity, classify
from gateway.inbound import ParseLimits, parse_message
from gateway.readable import html_to_text
from gateway.urgency import PHRASES, UrgencyFacts, Verdict, assess, phrase_table

DATA = Path(__file__).resolve().parent / "data" / "urgency"
OWN = OwnIdentity(hostname="gateway.example.org", addresses=("support@example.org",))
FILES = sorted(DATA.glob("*.eml"))
# Measured on this set (bench/rules_corpus.py, bench/README.md "Urgency rules"): precision
# 0.971 (35 flagged, 1 wrong: French "Rien d'urgent"), recall 0.944 (the German and Dutch
# reports). The floors sit at the measured figures: one more miss either way fails.
PRECISION_FLOOR = 0.97
RECALL_FLOOR = 0.94
# Files whose words sit only in quoted history, a signature or an automatic message.
NEVER_URGENT = ("quoted-", "signature-", "auto-", "ooo-", "x-autoreply-", "precedence-")


def parsed_verdict(path: Path, extra: tuple[str, ...] = ()) -> tuple[Verdict, str]:
    parsed = parse_message(path.read_bytes(), ParseLimits())
    sender = parsed.from_addresses[0][1]
    kind = classify(
        parsed.headers,
        parsed.subject,
        parsed.from_addresses,
        sender,
        parsed.content_type,
        parsed.report,
        OWN,
        parsed.text,
    ).kind
    facts = UrgencyFacts.of(parsed.subject, parsed.reply_text, parsed.headers, kind)
    return assess(facts, phrase_table(extra)), parsed.text


def facts(
    subject: str = "Question",
    text: str = "Hello,\nplease have a look.",
    headers: tuple[tuple[str, str], ...] = (),
    kind: Kind = Kind.NORMAL,
) -> UrgencyFacts:
    return UrgencyFacts.of(subject, text, headers, kind)


def label(path: Path) -> bool:
    return path.name.split("-", 1)[0] == "urgent"


def slug(path: Path) -> str:
    return path.name.split("-", 1)[1]


# --- the labelled set ----------------------------------------------------------------------


def test_the_labelled_set_has_sixty_messages_of_every_kind() -> None:
    assert len(FILES) >= 60
    assert {p.name.split("-", 1)[0] for p in FILES} == {"urgent", "normal"}
    assert sum(map(label, FILES)) >= 25 and sum(not label(p) for p in FILES) >= 25
    for prefix in NEVER_URGENT[:3]:
        assert any(slug(p).startswith(prefix) for p in FILES), prefix


def test_precision_and_recall_stay_above_the_measured_floors() -> None:
    flagged = right = 0
    for path in FILES:
        urgent = parsed_verdict(path)[0].urgent
        flagged += urgent
        right += urgent and label(path)
    positives = sum(map(label, FILES))
    assert right / flagged >= PRECISION_FLOOR, (right, flagged)
    assert right / positives >= RECALL_FLOOR, (right, positives)


@pytest.mark.parametrize(
    "path",
    [p for p in FILES if slug(p).startswith(NEVER_URGENT)],
    ids=lambda p: p.name,
)
def test_quotes_signatures_and_auto_replies_never_make_mail_urgent(path: Path) -> None:
    verdict, _ = parsed_verdict(path)
    assert not verdict.urgent, verdict.hits
    # The bait is there: the subject and marks, or any one line of the body, sent as a
    # person's new mail, is urgent (so this test fails if stripping or the skip breaks).
    parsed = parse_message(path.read_bytes(), ParseLimits())
    body = parsed.text or html_to_text(parsed.html)
    candidates = [UrgencyFacts.of(parsed.subject, "", parsed.headers, Kind.NORMAL)]
    candidates += [facts(text=line.lstrip("> ")) for line in body.splitlines()]
    assert any(assess(c).urgent for c in candidates)


def test_auto_replies_are_skipped_with_their_kind() -> None:
    verdict = assess(
        facts("Automatic reply: URGENT site down", "The site is down", (("Importance", "high"),))
    )
    assert verdict.urgent  # as a person's mail it would be...
    for kind in (Kind.AUTO_REPLY, Kind.NOTICE, Kind.BOUNCE, Kind.LOOP):
        automatic = assess(
            facts("URGENT site down", "The site is down", (("Importance", "high"),), kind)
        )
        assert automatic == Verdict(False, (), skipped=f"automatic:{kind.value}")


def test_admins_extra_phrases_catch_the_non_english_reports() -> None:
    missed = [p for p in FILES if label(p) and not parsed_verdict(p)[0].urgent]
    assert {slug(p) for p in missed} == {"dutch-storing.eml", "german-notfall.eml"}
    for path in missed:
        verdict, _ = parsed_verdict(path, ("Notfall", "  ligt   eruit ", ""))
        assert verdict.urgent
        assert {h.rule for h in verdict.hits} == {"extra_phrase"}
    dutch = DATA / "urgent-dutch-storing.eml"
    assert parsed_verdict(dutch, ("ligt eruit",))[0].reasons == ("text:ligt-eruit",)


# --- the rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("Importance", "High", "header:importance-high"),
        ("importance", " high ", "header:importance-high"),
        ("X-Priority", "1", "header:x-priority-1"),
        ("X-Priority", "1 (Highest)", "header:x-priority-1"),
        ("Priority", "Urgent", "header:priority-urgent"),
    ],
)
def test_the_senders_own_marks(name: str, value: str, reason: str) -> None:
    assert assess(facts(headers=((name, value),))).reasons == (reason,)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Importance", "normal"),
        ("Importance", "low"),
        ("X-Priority", "3 (Normal)"),
        ("X-Priority", "10"),
        ("Priority", "non-urgent"),
        ("Priority", "normal"),
        ("X-Importance", "high"),
    ],
)
def test_other_marks_are_not_urgent(name: str, value: str) -> None:
    assert not assess(facts(headers=((name, value),))).urgent


@pytest.mark.parametrize(
    ("subject", "text", "reason"),
    [
        ("Site down", "", "subject:site-down"),
        ("Help", "Our web shop has been down since 9pm.", "text:site-down"),
        ("Help", "www.client.example.com is DOWN", "text:site-down"),
        ("Help", "The portal isn't loading for anyone.", "text:not-loading"),
        ("Help", "The checkout won't load.", "text:not-loading"),
        ("Outage?", "", "subject:outage"),
        ("Help", "We get HTTP 502 on every page.", "text:http-5xx"),
        ("Help", "Status: 503", "text:http-5xx"),
        ("Help", "500 Internal Server Error everywhere", "text:http-5xx"),
        ("Help", "getting 502s since the deploy", "text:http-5xx"),
        ("Help", "Gateway Timeout on the API", "text:http-5xx"),
        ("We got hacked", "", "subject:hacked"),
        ("Help", "The homepage was defaced overnight.", "text:defaced"),
        ("Help", "We think there is a data breach.", "text:data-breach"),
        ("Help", "Our mail server has been compromised.", "text:compromised"),
        ("Help", "Ransomware on the file server!", "text:malware"),
        ("Help", "We are under a DDoS attack", "text:ddos"),
        ("URGENT", "", "subject:urgent"),
        ("Help", "Please reply urgently.", "text:urgent"),
        ("Help", "This is an emergency.", "text:emergency"),
    ],
)
def test_outage_and_incident_phrases(subject: str, text: str, reason: str) -> None:
    assert reason in assess(facts(subject, text)).reasons


@pytest.mark.parametrize(
    "text",
    [
        "Please file these in the urgent folder.",
        "This is not urgent.",
        "Non-urgent: a new logo.",
        "Nothing urgent, just a question.",
        "No emergency, just curious.",
        "Please update our emergency contact.",
        "Please colour the 'urgent' label red.",
        "We need a 500 GB disk.",
        "We have 500 users; room 503 is ours.",
        "I hacked together a script for the export.",
        "When the site was down last year it was fine.",
        "There is a planned outage next Sunday.",
        "Could you send the report on the outage two weeks ago?",
        "What happens if our site is hacked?",
        "How do we avoid a data breach?",
        "The copy should create a sense of urgency.",
        "We sent the down payment; scroll down for the details.",
        "Our post was on Hacker News and the server held up.",
        "The insurgents in the film were great.",
        "Invoice 1500 is paid.",
    ],
)
def test_harmless_mentions_are_not_urgent(text: str) -> None:
    assert not assess(facts("Question", text)).urgent, assess(facts("Question", text)).hits


def test_a_replys_subject_is_history_a_forwards_is_news() -> None:
    for subject in ("Re: Site down", "RE: Outage", "AW: Notfall urgent", "[Client] Re: hacked"):
        assert not assess(facts(subject, "Thanks, all good now.")).urgent, subject
    assert assess(facts("Fwd: site down", "See below.")).reasons == ("subject:site-down",)


def test_only_the_first_lines_of_the_text_count() -> None:
    filler = "\n".join(f"Line {i} of the changelog." for i in range(6))
    assert not assess(facts(text=f"{filler}\nThe site is down.")).urgent
    assert assess(facts(text=f"Hi,\n\n\n{filler[:40]}\nThe site is down.")).urgent
    # A quote the stripper left (interleaved answers) is context, not news.
    assert not assess(facts(text="> the site is down\nThat was fixed, thanks.")).urgent


def test_every_hit_is_kept_in_table_order() -> None:
    verdict = assess(
        facts(
            "URGENT: site down",
            "We get 502 Bad Gateway and think we were hacked. Emergency!",
            (("X-Priority", "1"), ("Importance", "high"), ("Priority", "urgent")),
        ),
        phrase_table(("bad gateway",)),
    )
    assert verdict.urgent
    assert [h.rule for h in verdict.hits] == [
        "importance_high",
        "x_priority_highest",
        "priority_urgent",
        "outage",
        "server_error",
        "security_incident",
        "urgency_word",
        "urgency_word",
        "extra_phrase",
    ]
    assert verdict.reasons[3:] == (
        "subject:site-down",
        "text:http-5xx",
        "text:hacked",
        "subject:urgent",
        "text:emergency",
        "text:bad-gateway",
    )


def test_every_built_in_phrase_is_reported_by_a_named_rule() -> None:
    rules = {"outage", "server_error", "security_incident", "urgency_word"}
    assert {p.rule for p in PHRASES} == rules
    assert all(p.label == p.label.lower() and " " not in p.label for p in PHRASES)
    # Extra phrases are words, not regexes: a dot is a dot.
    assert not assess(facts(text="the site is xdown"), phrase_table(("s.te",))).urgent
    assert assess(facts(text="the s.te thing"), phrase_table(("s.te",))).urgent


def test_a_huge_body_is_read_quickly() -> None:
    text = ("word " * 200_000 + "\n") * 5
    started = time.monotonic()
    assert not assess(facts(text=text)).urgent
    assert time.monotonic() - started < 2.0
