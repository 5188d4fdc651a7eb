"""The [classify] stage: fixture mails written for these tests, then sisimai's corpus.

Each fixture is parsed the way the intake parses it (gateway.inbound.parse_message for the
fields, the stdlib parser for extract_report), then classified with an envelope sender.
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import importlib.util
import pickle
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from gateway.bounce import DeliveryReport, extract_report
from gateway.classify import (
    RULES,
    Classification,
    Kind,
    OwnIdentity,
    classify,
)
from gateway.inbound import InboundMessage, ParseLimits, parse_message

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "classify"
CORPUS = ROOT.parent / "shared" / "mail" / "sisimai-set-of-emails"

OWN = OwnIdentity(
    hostname="support.example.org", addresses=("support@example.org", "billing@example.org")
)
PERSON = "alice@client.example.com"


def parse(name: str) -> tuple[InboundMessage, DeliveryReport | None]:
    raw = (DATA / name).read_bytes()
    parsed = parse_message(raw, ParseLimits())
    report = getattr(parsed, "report", None)
    if not hasattr(parsed, "report"):
        report = extract_report(email.message_from_bytes(raw, policy=email.policy.default))
    return parsed, report


def run(name: str, mail_from: str = PERSON, **override: object) -> Classification:
    parsed, report = parse(name)
    fields: dict[str, object] = {
        "headers": parsed.headers,
        "subject": parsed.subject,
        "from_addresses": parsed.from_addresses,
        "mail_from": mail_from,
        "content_type": parsed.content_type,
        "report": report,
        "own": OWN,
        "text": parsed.text,
    }
    fields.update(override)
    return classify(**fields)  # type: ignore[arg-type]


# --- people -----------------------------------------------------------------------------------


def test_a_person_asking_for_help_is_normal() -> None:
    result = run("person.eml")
    assert result == Classification(Kind.NORMAL, ())


def test_a_person_who_writes_about_failed_delivery_is_normal() -> None:
    # The subject and words of a bounce, from a person with a real envelope sender.
    result = run("mentions-delivery-failed.eml")
    assert result.kind is Kind.NORMAL
    assert not any(r.endswith("-failed") for r in result.reasons)


def test_a_forwarded_bounce_is_the_persons_mail() -> None:
    result = run("forwarded-bounce.eml")
    assert result.kind is Kind.NORMAL


def test_a_delivery_report_attached_by_a_person_is_the_persons_mail() -> None:
    # The structure alone counts only at the top level (RFC 6522); buried in a person's mail
    # it needs an automated sender.
    _parsed, report = parse("attached-status.eml")
    assert report is not None and not report.is_report
    assert run("attached-status.eml").kind is Kind.NORMAL


def test_auto_submitted_no_is_normal() -> None:
    # RFC 3834 section 5: "no" says a person sent it.
    assert run("auto-submitted-no.eml").kind is Kind.NORMAL


# --- auto-replies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("auto-submitted.eml", "auto-submitted:auto-replied"),
        ("precedence-bulk.eml", "precedence:bulk"),
        ("auto-response-suppress.eml", "x-auto-response-suppress:all"),
        ("x-autoreply.eml", "header:x-autoreply"),
        ("x-autorespond.eml", "header:x-autorespond"),
        ("list-header.eml", "list-header:list-id"),
        ("sender-mailer-daemon.eml", "sender:mailer-daemon"),
        ("sender-postmaster.eml", "sender:postmaster"),
        ("sender-list-request.eml", "sender:list-request"),
        ("sender-list-owner.eml", "sender:list-owner"),
        ("challenge-response.eml", "challenge-response"),
        ("read-receipt.eml", "content-type:multipart/report"),
    ],
)
def test_auto_reply_signal(name: str, reason: str) -> None:
    result = run(name)
    assert result.kind is Kind.AUTO_REPLY
    assert reason in result.reasons


@pytest.mark.parametrize("mail_from", ["", "<>"])
def test_null_envelope_sender_is_an_auto_reply(mail_from: str) -> None:
    # aiosmtpd hands MAIL FROM:<> over as "<>"; the pipeline's Envelope uses "".
    result = run("person.eml", mail_from=mail_from)
    assert result == Classification(Kind.AUTO_REPLY, ("null-sender",))


@pytest.mark.parametrize("lang", ["en", "de", "fr", "es", "nl", "it"])
def test_out_of_office_subject(lang: str) -> None:
    result = run(f"out-of-office-{lang}.eml")
    assert result == Classification(Kind.AUTO_REPLY, ("subject:out-of-office",))


@pytest.mark.parametrize(
    "subject",
    [
        "Re: Automatic reply not working on my laptop",
        "Absence of invoice for March",
        "Our out of office settings are broken",
    ],
)
def test_a_subject_about_out_of_office_is_not_one(subject: str) -> None:
    assert run("person.eml", subject=subject).kind is Kind.NORMAL


def test_a_challenge_from_the_null_sender_is_an_auto_reply_not_a_bounce() -> None:
    # It talks about an undelivered, held message; answering it would verify us.
    _parsed, report = parse("challenge-response.eml")
    assert report is None
    result = run("challenge-response.eml", mail_from="")
    assert result.kind is Kind.AUTO_REPLY
    assert "challenge-response" in result.reasons


def test_header_values_become_safe_reason_tokens() -> None:
    headers = [("Auto-Submitted", "Auto-Generated (failure); x=1"), ("List-Id", "<a.b>")]
    result = run("person.eml", headers=headers)
    assert result.reasons == ("auto-submitted:auto-generated", "list-header:list-id")
    odd = run("person.eml", headers=[("Auto-Submitted", "!!! key=value\r\nX-Evil: 1")])
    assert odd.reasons == ("auto-submitted:other",)


def test_x_auto_response_suppress_for_receipts_only_is_not_an_auto_reply() -> None:
    # DR/RN only turn off delivery and read receipts, which a person's client may ask for.
    result = run("person.eml", headers=[("X-Auto-Response-Suppress", "DR, RN")])
    assert result.kind is Kind.NORMAL


# --- bounces and notices ----------------------------------------------------------------------


def test_standard_dsn_failure_is_a_bounce_of_our_mail() -> None:
    _parsed, report = parse("dsn-failed.eml")
    assert report == DeliveryReport(
        is_report=True,
        actions=("failed",),
        failed_recipients=("bob@client.example.com",),
        status_codes=("5.1.1",),
        original_message_id="<t1234.5d41402a@support.example.org>",
        reason="dsn-failed",
    )
    result = run("dsn-failed.eml", mail_from="")
    assert result.kind is Kind.BOUNCE
    # Every signal is kept; the returned header's loop header and Message-ID are not ours
    # coming back, they are what the bounce is about.
    assert result.reasons == (
        "dsn-failed",
        "auto-submitted:auto-replied",
        "null-sender",
        "sender:mailer-daemon",
        "content-type:multipart/report",
    )


def test_dsn_with_only_delayed_recipients_is_a_notice() -> None:
    _parsed, report = parse("dsn-delayed.eml")
    assert report is not None
    assert report.actions == ("delayed",)
    assert report.failed_recipients == ()
    assert report.status_codes == ("4.4.1",)
    result = run("dsn-delayed.eml", mail_from="")
    assert result.kind is Kind.NOTICE
    assert result.reasons[0] == "dsn-delayed"


def test_qmail_bounce_without_dsn_structure() -> None:
    _parsed, report = parse("qmail-bounce.eml")
    assert report is not None
    assert report.is_report
    assert report.reason == "qmail-failed"
    assert report.failed_recipients == ("carol@client.example.com",)
    assert report.status_codes == ("5.1.1",)
    assert report.original_message_id == "<t1235.7815696e@support.example.org>"
    assert run("qmail-bounce.eml", mail_from="").kind is Kind.BOUNCE


def test_exchange_ndr() -> None:
    _parsed, report = parse("exchange-ndr.eml")
    assert report is not None
    assert report.reason == "exchange-failed"
    assert report.original_message_id == "<t1236.eccbc87e@support.example.org>"
    # The Exchange fingerprint and postmaster@ agree: a bounce even with a non-null sender.
    result = run("exchange-ndr.eml", mail_from="postmaster@client.example.com")
    assert result.kind is Kind.BOUNCE


def test_exim_delay_warning_is_a_notice() -> None:
    _parsed, report = parse("exim-delay.eml")
    assert report is not None
    assert report.reason == "exim-delayed"
    assert run("exim-delay.eml", mail_from="").kind is Kind.NOTICE


def test_bounce_text_alone_needs_an_automated_sender() -> None:
    # Content that only looks like a bounce (is_report False) counts from the null sender,
    # never from a person's envelope.
    _parsed, report = parse("mentions-delivery-failed.eml")
    assert report is not None and not report.is_report
    assert run("mentions-delivery-failed.eml", mail_from="").kind is Kind.BOUNCE
    assert run("mentions-delivery-failed.eml").kind is Kind.NORMAL


# --- loops ------------------------------------------------------------------------------------


def test_our_own_message_id_coming_back_is_a_loop() -> None:
    result = run("own-message-id.eml")
    assert result.kind is Kind.LOOP
    assert "own-message-id" in result.reasons


def test_our_loop_header_coming_back_is_a_loop() -> None:
    result = run("own-loop-header.eml", headers=[*parse("own-loop-header.eml")[0].headers])
    assert result == Classification(Kind.LOOP, ("loop-header:x-gateway-loop",))


def test_x_loop_naming_our_mailbox_is_a_loop() -> None:
    result = run("person.eml", headers=[("X-Loop", "Support@Example.org")])
    assert result == Classification(Kind.LOOP, ("x-loop:own-address",))


def test_mail_from_our_own_address_is_a_loop() -> None:
    result = run("person.eml", from_addresses=[("Support", "Support@example.org")])
    assert result == Classification(Kind.LOOP, ("from:own-address",))
    envelope = run("person.eml", mail_from="<billing@example.org>")
    assert envelope == Classification(Kind.LOOP, ("mail-from:own-address",))


def test_loop_outranks_auto_reply_and_keeps_both_reasons() -> None:
    headers = [("X-Gateway-Loop", "support.example.org"), ("Auto-Submitted", "auto-replied")]
    result = run("person.eml", headers=headers)
    assert result.kind is Kind.LOOP
    assert result.reasons == ("loop-header:x-gateway-loop", "auto-submitted:auto-replied")


# --- robustness -------------------------------------------------------------------------------


def test_rules_are_an_ordered_table_by_kind() -> None:
    order = [Kind.LOOP, Kind.BOUNCE, Kind.NOTICE, Kind.AUTO_REPLY]
    kinds = [kind for _rule, kind in RULES]
    assert kinds == sorted(kinds, key=order.index)


def test_delivery_report_survives_the_worker_boundary() -> None:
    _parsed, report = parse("dsn-failed.eml")
    assert pickle.loads(pickle.dumps(report)) == report


def test_only_the_first_64_kb_of_text_is_read() -> None:
    filler = ("All is well here. " * 4000).encode()  # ~72 KB
    raw = (
        b"From: MAILER-DAEMON@mx.client.example.com\r\nSubject: hello\r\n\r\n"
        + filler
        + b"\r\nHi. This is the qmail-send program at mx.client.example.com.\r\n"
    )
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert extract_report(message) is None


@pytest.mark.parametrize(("at_start", "found"), [(True, True), (False, False)])
def test_a_huge_encoded_part_is_decoded_only_at_its_start(at_start: bool, found: bool) -> None:
    fingerprint = b"Hi. This is the qmail-send program at mx.client.example.com.\n"
    filler = b"All is well here.\n" * 20000  # ~360 KB, ~480 KB as base64
    text = fingerprint + filler if at_start else filler + fingerprint
    raw = (
        b"From: MAILER-DAEMON@mx.client.example.com\r\nSubject: failure notice\r\n"
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(text)
    )
    report = extract_report(email.message_from_bytes(raw, policy=email.policy.default))
    assert (report is not None and report.reason == "qmail-failed") is found


@pytest.mark.parametrize("char", ["-", " ", ">", "@", "<", "a", ".", "\n"])
def test_pathological_text_is_read_in_linear_time(char: str) -> None:
    # 64 KB of one character once took minutes through an unbounded "-{3,}" prefix.
    body = (char * 70000).encode()
    raw = b"From: MAILER-DAEMON@x.example\r\nSubject: Undeliverable: x\r\n\r\n" + body
    message = email.message_from_bytes(raw, policy=email.policy.default)
    started = time.perf_counter()
    report = extract_report(message)
    classify([("Subject", "x")], "x", [], "", "text/plain", report, OWN, body.decode())
    assert time.perf_counter() - started < 2.0


class _Hostile(email.message.EmailMessage):
    def get_payload(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        raise RuntimeError("boom")

    def raw_items(self) -> object:  # type: ignore[override]
        raise RuntimeError("boom")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe",
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n--x\r\n",
        b"Content-Type: message/delivery-status\r\n\r\nAction: failed\r\nStatus: 5.1.1\r\n",
        b"Content-Type: text/plain; charset=punycode\r\nSubject: failure notice\r\n\r\n" * 3,
        b"Subject: =?bogus?q?x?=\r\nFrom: MAILER-DAEMON\r\n\r\n<a@b.example>:\r\n",
    ],
)
def test_extract_report_never_raises(raw: bytes) -> None:
    for policy in (email.policy.default, email.policy.compat32):
        extract_report(email.message_from_bytes(raw, policy=policy))
    assert extract_report(_Hostile()) is None


# --- sisimai's corpus ---------------------------------------------------------------------------


def _bench() -> ModuleType:
    path = ROOT / "bench" / "classify_corpus.py"
    spec = importlib.util.spec_from_file_location("classify_corpus", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first: its dataclasses look their module up while being defined.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS.is_dir(), reason="no sisimai corpus at ../shared/mail")
def test_sisimai_corpus() -> None:
    results = _bench().evaluate(CORPUS)
    assert results["bounce"].percent >= 95.0
    assert results["auto-reply"].percent >= 95.0
    assert results["delay-warning"].share(Kind.BOUNCE) == 0.0
    # One file in not/ is a real mailbox-full rejection (postmaster@, null sender,
    # Auto-Submitted, "your message was rejected"); see the bench's README line.
    not_bounce = {o.name for o in results["not-bounce"].outcomes if o.kind is Kind.BOUNCE}
    assert not_bounce <= {"maildir/not/rb-issue-368-bug.eml"}
