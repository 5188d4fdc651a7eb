"""gateway.authn: Authentication-Results trust, alignment, the forged-From verdict, and our
own DKIM check (RELIABILITY.md 2.2, tests 15-17, 19, 20, 23).

DKIM keys are made here, messages signed with dkimpy, and every key is served by a stub DNS
function that records each name asked for; sockets are closed off, so nothing reaches the
network.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import dns.exception
import dns.rdata
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.authn import (
    MAX_DKIM_SIGNATURES,
    AuthResult,
    DkimResult,
    DnsTemporaryError,
    from_identity,
    is_aligned,
    judge,
    parse_authentication_results,
    resolve_txt,
    strip_untrusted,
    trusted_results,
    verify_dkim,
)

DATA = Path(__file__).resolve().parent / "data" / "authn"
OWN_ID = "support.example.org"  # the gateway's smtp.hostname in conftest
FRONT_MX = "mx.front.example.org"  # the trusted upstream
TRUSTED = (FRONT_MX,)

GMAIL = (
    "mx.google.com; dkim=pass header.i=@acme.example header.s=s1 header.b=AbC+/12x;"
    " spf=pass (google.com: domain of alice@acme.example designates 192.0.2.7 as permitted"
    " sender) smtp.mailfrom=alice@acme.example;"
    " dmarc=pass (p=NONE sp=NONE dis=NONE) header.from=acme.example"
)
MICROSOFT = (
    "spf=pass (sender IP is 192.0.2.7) smtp.mailfrom=acme.example; dkim=pass (signature was"
    " verified) header.d=acme.example;dmarc=pass action=none header.from=acme.example;"
    "compauth=pass reason=100"
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every attempt to reach a resolver or a host is refused and fails the test.

    dnspython catches a socket's exception and retries, so the attempts are also counted.
    """
    attempts: list[str] = []

    def refuse(*_args: object, **_kwargs: object) -> None:
        attempts.append("network")
        raise AssertionError("network access in test_authn")

    for name in ("connect", "connect_ex", "sendto", "sendmsg"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert attempts == []


# ---------------------------------------------------------------- keys, signing, stub DNS


@dataclass(frozen=True)
class Key:
    private_pem: bytes
    record: bytes  # the TXT record a domain publishes


def _key_from(private: Any) -> Key:
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der))


@pytest.fixture(scope="module")
def key() -> Key:
    return _key_from(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def other_key() -> Key:
    return _key_from(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def key_1024() -> Key:
    return _key_from(rsa.generate_private_key(public_exponent=65537, key_size=1024))


@pytest.fixture(scope="module")
def key_512() -> Key:
    # cryptography refuses to generate keys under 1024 bits; OpenSSL still makes them.
    pem = subprocess.run(
        ["openssl", "genrsa", "512"], capture_output=True, check=True, timeout=30
    ).stdout
    return _key_from(serialization.load_pem_private_key(pem, password=None))


def message(body_extra: bytes = b"") -> bytes:
    raw = (DATA / "request.eml").read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return raw + body_extra


def sign(
    raw: bytes,
    key: Key,
    domain: str = "acme.example",
    selector: str = "s1",
    *,
    length: bool = False,
) -> bytes:
    header = dkim.sign(
        raw,
        selector.encode(),
        domain.encode(),
        key.private_pem,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        length=length,
    )
    assert isinstance(header, bytes)
    return header + raw


@dataclass
class StubDns:
    """dkimpy-shaped DNS: (name, timeout) -> TXT bytes or None; records every name asked."""

    records: dict[bytes, bytes] = field(default_factory=dict)
    error: BaseException | None = None
    asked: list[bytes] = field(default_factory=list)

    def __call__(self, name: bytes, timeout: float) -> bytes | None:
        self.asked.append(name)
        assert 0 < timeout <= 5
        if self.error is not None:
            raise self.error
        return self.records.get(name)


def dns_for(key: Key, domain: str = "acme.example", selector: str = "s1") -> StubDns:
    return StubDns({f"{selector}._domainkey.{domain}.".encode(): key.record})


def dns_error(cls: type[dns.exception.DNSException], **kwargs: Any) -> BaseException:
    """dnspython's exception classes have untyped constructors."""
    make: Any = cls
    error: BaseException = make(**kwargs)
    return error


def ar(value: str) -> tuple[str, str]:
    return ("Authentication-Results", value)


def results_of(*values: str) -> tuple[AuthResult, ...]:
    return trusted_results([ar(v) for v in values], TRUSTED, OWN_ID)[0]


# ---------------------------------------------------------------- parsing (RFC 8601)


def test_parses_gmail_shape() -> None:
    parsed = parse_authentication_results(GMAIL)
    assert parsed == (
        "mx.google.com",
        (
            AuthResult("dkim", "pass", "acme.example", "mx.google.com"),
            AuthResult("spf", "pass", "acme.example", "mx.google.com"),
            AuthResult("dmarc", "pass", "acme.example", "mx.google.com"),
        ),
    )


def test_parses_microsoft_shape_with_and_without_authserv_id() -> None:
    expected = (
        ("spf", "pass", "acme.example"),
        ("dkim", "pass", "acme.example"),
        ("dmarc", "pass", "acme.example"),
        ("compauth", "pass", None),
    )
    with_id = parse_authentication_results("mx.microsoft.example; " + MICROSOFT)
    assert with_id is not None
    assert with_id[0] == "mx.microsoft.example"
    assert tuple((r.method, r.result, r.domain) for r in with_id[1]) == expected
    # Microsoft writes no authserv-id at all: read, but with an id nobody can trust.
    without_id = parse_authentication_results(MICROSOFT)
    assert without_id is not None
    assert without_id[0] == ""
    assert tuple((r.method, r.result, r.domain) for r in without_id[1]) == expected
    assert trusted_results([ar(MICROSOFT)], ["", FRONT_MX], OWN_ID) == (
        (),
        ("missing-authserv-id",),
    )


@pytest.mark.parametrize(
    "value", ["mx.example.org; none", "mx.example.org 1; none", "MX.Example.org;NONE"]
)
def test_none_means_no_results(value: str) -> None:
    assert parse_authentication_results(value) == ("mx.example.org", ())


@pytest.mark.parametrize(
    ("value", "method", "result", "domain"),
    [
        # CFWS around "=", a method version, a quoted reason holding ";" and "=".
        (
            'mx.example.org; dkim/1 = pass reason="ok; sig=1" header.d = Acme.Example.',
            "dkim",
            "pass",
            "acme.example",
        ),
        # Comments, nested and holding ";", are dropped.
        (
            "mx.example.org (x; (y; z)) ; spf=fail (a; b) smtp.mailfrom=<bob@Mail.Acme.Example>",
            "spf",
            "fail",
            "mail.acme.example",
        ),
        # dkim falls back to header.i's domain; spf to smtp.helo.
        (
            "mx.example.org; dkim=pass header.i=alice@sub.acme.example",
            "dkim",
            "pass",
            "sub.acme.example",
        ),
        (
            "mx.example.org; spf=none smtp.helo=relay.acme.example",
            "spf",
            "none",
            "relay.acme.example",
        ),
        # IDN domains compare as A-labels; a folded value reads as one line.
        (
            "mx.example.org;\r\n\tdmarc=fail header.from=bücher.example",
            "dmarc",
            "fail",
            "xn--bcher-kva.example",
        ),
        ("mx.example.org; dkim=pass header.d=not_a<domain>", "dkim", "pass", None),
        ("mx.example.org; arc=pass header.d=acme.example", "arc", "pass", None),
    ],
)
def test_parses_tolerantly(value: str, method: str, result: str, domain: str | None) -> None:
    parsed = parse_authentication_results(value)
    assert parsed is not None
    assert parsed[0] == "mx.example.org"
    assert parsed[1] == (AuthResult(method, result, domain, "mx.example.org"),)


def test_skips_a_malformed_resinfo_and_keeps_the_rest() -> None:
    parsed = parse_authentication_results("mx.example.org; ???; dkim=pass header.d=acme.example")
    assert parsed == (
        "mx.example.org",
        (AuthResult("dkim", "pass", "acme.example", "mx.example.org"),),
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "mx.example.org",  # no result, no "none"
        "mx.example.org;",
        "hello world; dkim=pass",  # junk after the id
        "; dkim=pass",  # empty id
        "mx.example.org; garbage",
        "mx.example.org (unterminated; dkim=pass",
        "mx.example.org ) ; dkim=pass",
        'mx.example.org; dkim=pass reason="unterminated',
        "mx.example.org; =pass",
        "mx.example.org; dkim=",
        "\x00\x01\x02",
        "\x01mx.example.org; dkim=pass",  # control characters in the id
        "mx@evil; dkim=pass",  # "@" is no authserv-id
    ],
)
def test_garbage_is_unparseable(value: str) -> None:
    assert parse_authentication_results(value) is None


def test_huge_and_pathological_values_are_bounded() -> None:
    started = time.monotonic()
    many = "mx.example.org" + "; dkim=pass header.d=acme.example" * 400  # ~13 KB: read
    parsed = parse_authentication_results(many)
    assert parsed is not None
    assert len(parsed[1]) == 400
    assert parse_authentication_results(many + " " * 4000) is None  # over 16 KB: refused
    assert parse_authentication_results("mx.example.org; dkim=pass " + "(" * 16_000) is None
    assert parse_authentication_results("mx.example.org; " + "x" * 100_000) is None
    assert parse_authentication_results("a; " + '"\\' * 8000) is None
    assert time.monotonic() - started < 2


# ---------------------------------------------------------------- trust (RELIABILITY 19)


def test_untrusted_authserv_id_is_ignored() -> None:
    results, reasons = trusted_results(
        [ar("mx.evil.example; dkim=pass header.d=acme.example")], TRUSTED, OWN_ID
    )
    assert results == ()
    assert reasons == ("untrusted-authserv-id:mx.evil.example",)


def test_our_own_authserv_id_is_ignored_even_when_listed_as_trusted() -> None:
    forged = ar("Support.Example.ORG.; dkim=pass header.d=acme.example")
    results, reasons = trusted_results([forged], (*TRUSTED, OWN_ID), OWN_ID.upper())
    assert results == ()
    assert reasons == ("own-authserv-id-from-outside",)


def test_trusted_authserv_id_is_used_case_insensitively() -> None:
    headers = [
        ("Received", "from mx.front.example.org by support.example.org"),
        ("AUTHENTICATION-RESULTS", "MX.Front.Example.Org; dkim=pass header.d=acme.example"),
        ar("mx.front.example.org; spf=fail smtp.mailfrom=acme.example"),
        ar("garbage"),
    ]
    results, reasons = trusted_results(headers, ["mx.FRONT.example.org"], OWN_ID)
    assert results == (
        AuthResult("dkim", "pass", "acme.example", FRONT_MX),
        AuthResult("spf", "fail", "acme.example", FRONT_MX),
    )
    assert reasons == ("unparseable",)


@pytest.mark.parametrize(
    "authserv_id",
    [
        f'"{FRONT_MX}"',  # a quoted-string (RFC 8601's grammar allows it; strips miss it)
        f'"{FRONT_MX.replace(".", chr(92) + ".", 1)}"',  # with a quoted-pair
        f"(front) {FRONT_MX}",  # a comment before the id
        f"{FRONT_MX}.",  # a trailing dot
        f"\t(x)\r\n {FRONT_MX}",
    ],
    ids=["quoted", "quoted-pair", "comment-first", "trailing-dot", "folded-comment"],
)
def test_only_the_exact_authserv_id_token_is_trusted(authserv_id: str) -> None:
    """Issue 9 item 8: the front MTA strips fields whose first token is its id; any other
    spelling of that id survives the strip, so it is no word of the front MTA's."""
    value = f"{authserv_id}; dkim=pass header.d=acme.example"
    results, reasons = trusted_results([ar(value)], TRUSTED, OWN_ID)
    assert results == ()
    assert reasons[0].startswith("inexact-authserv-id:")
    stripped = strip_untrusted([ar(value)], TRUSTED, OWN_ID)
    assert stripped == ()
    # The exact token, with a comment or a version after it, is trusted.
    for exact in (FRONT_MX, f"{FRONT_MX} (comment)", f"  {FRONT_MX} 1"):
        found, _ = trusted_results(
            [ar(f"{exact}; dkim=pass header.d=acme.example")], TRUSTED, OWN_ID
        )
        assert found == (AuthResult("dkim", "pass", "acme.example", FRONT_MX),)


def test_reasons_cannot_carry_hostile_ids() -> None:
    _results, reasons = trusted_results(
        [ar("\u0435vil.EXAMPLE/\u202e; dkim=pass")], TRUSTED, OWN_ID
    )
    assert reasons == ("untrusted-authserv-id:?vil.example??",)


def test_strip_untrusted_removes_every_ignored_field_and_keeps_the_rest() -> None:
    headers = [
        ar("support.example.org; dkim=pass header.d=acme.example"),
        ("Received", "from a by b"),
        ar("mx.front.example.org; dkim=fail header.d=acme.example"),
        ar("mx.evil.example; dmarc=pass header.from=acme.example"),
        ("Subject", "hi"),
        ar(MICROSOFT),
        ar("nonsense"),
    ]
    assert strip_untrusted(headers, TRUSTED, OWN_ID) == (
        ("Received", "from a by b"),
        ar("mx.front.example.org; dkim=fail header.d=acme.example"),
        ("Subject", "hi"),
    )


def test_forged_own_authserv_id_from_outside_changes_nothing() -> None:
    """RELIABILITY 19: a sender adds "<our id>; dkim=pass"; the verdict is the same."""
    genuine = [
        ar(
            "mx.front.example.org; dkim=fail header.d=acme.example; spf=softfail"
            " smtp.mailfrom=acme.example; dmarc=none header.from=acme.example"
        )
    ]
    forged = [
        ar(f"{OWN_ID}; dkim=pass header.d=acme.example; dmarc=pass header.from=acme.example"),
        *genuine,
    ]
    for trusted in (TRUSTED, (*TRUSTED, OWN_ID)):
        without, _ = trusted_results(genuine, trusted, OWN_ID)
        with_forged, reasons = trusted_results(forged, trusted, OWN_ID)
        assert with_forged == without
        assert reasons == ("own-authserv-id-from-outside",)
        verdict = judge("acme.example", with_forged, require_authentication=True)
        assert verdict == judge("acme.example", without, require_authentication=True)
        assert verdict.forged
        assert verdict.reason == "no-aligned-pass"
        assert strip_untrusted(forged, trusted, OWN_ID) == tuple(genuine)


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize(
    ("domain", "from_domain", "aligned"),
    [
        ("acme.example", "acme.example", True),
        ("ACME.example.", "acme.EXAMPLE", True),
        ("mail.acme.example", "acme.example", True),
        ("acme.example", "eu.acme.example", True),
        ("a.acme.example", "b.acme.example", True),  # siblings: one organisational domain
        ("evilacme.example", "acme.example", False),  # a suffix, not a subdomain
        ("acme.example", "acme.example.evil.example", False),
        ("example", "acme.example", False),  # shorter has one label
        ("localhost", "localhost", False),
        ("other.example", "acme.example", False),
        (None, "acme.example", False),
        ("", "acme.example", False),
        ("acme.example", "", False),
        ("bücher.example", "xn--bcher-kva.example", True),
        ("acme..example", "acme.example", False),
    ],
)
def test_is_aligned(domain: str | None, from_domain: str, aligned: bool) -> None:
    assert is_aligned(domain, from_domain) is aligned


# ---------------------------------------------------------------- judge (RELIABILITY 16, 17)


def test_dmarc_fail_is_forged_whatever_else_passed() -> None:
    results = results_of(
        "mx.front.example.org; dkim=pass header.d=acme.example;"
        " dmarc=fail action=none header.from=acme.example"
    )
    for required in (False, True):
        verdict = judge("acme.example", results, require_authentication=required)
        assert verdict.forged
        assert verdict.reason == "dmarc-fail"
        assert not verdict.temperror


def test_aligned_dkim_pass_is_authenticated() -> None:
    results = results_of(GMAIL.replace("mx.google.com", FRONT_MX))
    verdict = judge("acme.example", results, require_authentication=True)
    assert not verdict.forged
    assert verdict.reason is None
    assert verdict.passes == ("dkim:acme.example", "spf:acme.example", "dmarc:acme.example")


def test_subdomain_dkim_pass_aligns() -> None:
    results = results_of("mx.front.example.org; dkim=pass header.d=mail.acme.example")
    verdict = judge("acme.example", results, require_authentication=True)
    assert not verdict.forged
    assert verdict.passes == ("dkim:mail.acme.example",)


def test_spf_pass_on_unaligned_mail_from_is_forged() -> None:
    """RELIABILITY 17: SPF passes for the bulk mailer's domain, not for the From domain."""
    results = results_of(
        "mx.front.example.org; spf=pass smtp.mailfrom=bounces@bulk-mailer.example; dkim=none"
    )
    verdict = judge("acme.example", results, require_authentication=True)
    assert verdict.forged
    assert verdict.reason == "no-aligned-pass"
    assert verdict.passes == ()
    assert verdict.unaligned_passes == ("spf:bulk-mailer.example",)


def test_dkim_and_spf_fail_is_forged() -> None:
    """RELIABILITY 16: nothing passed at all (the lead's "unauthenticated")."""
    results = results_of(
        "mx.front.example.org; dkim=fail header.d=acme.example; spf=fail smtp.mailfrom=acme.example"
    )
    verdict = judge("acme.example", results, require_authentication=True)
    assert verdict.forged
    assert verdict.reason == "no-aligned-pass"
    assert verdict.unaligned_passes == ()


def test_dkim_pass_for_another_organisation_is_not_aligned() -> None:
    results = results_of("mx.front.example.org; dkim=pass header.d=evil.example")
    verdict = judge("acme.example", results, require_authentication=True)
    assert verdict.forged
    assert verdict.unaligned_passes == ("dkim:evil.example",)


def test_dmarc_pass_counts_only_for_the_from_domain() -> None:
    ok = results_of("mx.front.example.org; dmarc=pass header.from=acme.example")
    assert judge("acme.example", ok, require_authentication=True).passes == ("dmarc:acme.example",)
    other = results_of("mx.front.example.org; dmarc=pass header.from=mail.acme.example")
    assert judge("acme.example", other, require_authentication=True).forged


@pytest.mark.parametrize("result", ["pass", "fail", "none", "temperror"])
def test_dmarc_result_for_another_from_domain_is_forged(result: str) -> None:
    """Issue 9 item 3: the verifier read another From than ours (a second From field, or
    one it parsed otherwise): its verdict, even a pass, is about some other message."""
    results = results_of(
        f"mx.front.example.org; dkim=pass header.d=evil.example; dmarc={result} "
        "header.from=evil.example"
    )
    for required in (False, True):
        verdict = judge("acme.example", results, require_authentication=required)
        assert verdict.forged
        assert verdict.reason == ("dmarc-fail" if result == "fail" else "dmarc-other-from")
    # The same results for the From the verifier saw are not forged.
    assert not judge("evil.example", results, require_authentication=True).forged or (
        result == "fail"
    )


def test_without_require_authentication_nothing_is_not_forged() -> None:
    verdict = judge("acme.example", (), require_authentication=False)
    assert verdict == judge("acme.example", (), require_authentication=False)
    assert not verdict.forged
    assert verdict.reason is None
    assert not verdict.temperror
    assert judge("acme.example", (), require_authentication=True).forged


def test_upstream_temperror_is_not_a_pass_and_not_a_retry() -> None:
    results = results_of("mx.front.example.org; dkim=temperror header.d=acme.example")
    verdict = judge("acme.example", results, require_authentication=True)
    assert verdict.forged
    assert not verdict.temperror


def test_results_only_count_when_they_pass() -> None:
    results = results_of(
        "mx.front.example.org; dkim=neutral header.d=acme.example; dkim=policy"
        " header.d=acme.example; spf=softfail smtp.mailfrom=acme.example"
    )
    assert judge("acme.example", results, require_authentication=True).forged


# ---------------------------------------------------------------- our own DKIM check


def test_dkim_aligned_pass_with_stub_dns(key: Key) -> None:
    """RELIABILITY 15 (authentication half): a good signature, the key from stub DNS."""
    stub = dns_for(key)
    result = verify_dkim(sign(message(), key), dnsfunc=stub, timeout=3)
    assert (result.result, result.domain, result.detail) == ("pass", "acme.example", "verified")
    assert stub.asked == [b"s1._domainkey.acme.example."]
    verdict = judge("acme.example", (), require_authentication=True, own_dkim=result)
    assert not verdict.forged
    assert verdict.passes == ("dkim:acme.example",)


def test_dkim_key_at_the_minimum_size_passes(key_1024: Key) -> None:
    result = verify_dkim(sign(message(), key_1024), dnsfunc=dns_for(key_1024))
    assert result.result == "pass"


def test_dkim_tampered_body_fails(key: Key) -> None:
    signed = sign(message(), key).replace(b"error E42", b"error E43")
    result = verify_dkim(signed, dnsfunc=dns_for(key))
    assert (result.result, result.detail) == ("fail", "body-hash-mismatch")
    verdict = judge("acme.example", (), require_authentication=True, own_dkim=result)
    assert verdict.forged
    assert verdict.reason == "no-aligned-pass"


def test_dkim_tampered_header_fails(key: Key) -> None:
    signed = sign(message(), key).replace(b"Subject: Printer", b"Subject: Pay this invoice")
    result = verify_dkim(signed, dnsfunc=dns_for(key))
    assert (result.result, result.detail) == ("fail", "bad-signature")


def test_dkim_signature_under_someone_elses_key_fails(key: Key, other_key: Key) -> None:
    result = verify_dkim(sign(message(), other_key), dnsfunc=dns_for(key))
    assert (result.result, result.detail) == ("fail", "bad-signature")


def test_dkim_512_bit_key_is_a_fail(key_512: Key) -> None:
    """RELIABILITY 23: a valid signature under a 512-bit key is treated as fail."""
    result = verify_dkim(sign(message(), key_512), dnsfunc=dns_for(key_512))
    assert (result.result, result.detail) == ("fail", "key-too-small")
    assert judge("acme.example", (), require_authentication=True, own_dkim=result).forged
    # Policy can lower the bar, and then the same signature verifies.
    lowered = verify_dkim(sign(message(), key_512), dnsfunc=dns_for(key_512), min_key_bits=512)
    assert lowered.result == "pass"


def test_dkim_body_length_signature_is_never_a_pass(key: Key) -> None:
    """RELIABILITY 23: with l=, content appended after the signed length would ride along."""
    signed = sign(message(), key, length=True)
    appended = signed + b"\r\nPS: wire the money to IBAN XX00 0000 today.\r\n"
    for raw in (appended, signed):
        stub = dns_for(key)
        result = verify_dkim(raw, dnsfunc=stub)
        assert (result.result, result.detail) == ("fail", "body-length-tag")
        assert result.domain == "acme.example"
        assert stub.asked == []
    assert dkim.verify(appended, dnsfunc=dns_for(key))  # dkimpy alone would call it a pass


@pytest.mark.parametrize(
    ("error", "detail"),
    [
        (dkim.DnsTimeoutError("timed out"), "dns-timeout"),
        (dns_error(dns.exception.Timeout), "dns-timeout"),
        (TimeoutError(), "dns-timeout"),
        (DnsTemporaryError("dns-timeout"), "dns-timeout"),
        (dns_error(dns.resolver.NoNameservers), "dns-servfail"),  # SERVFAIL from every server
        (OSError("network unreachable"), "dns-error"),
    ],
)
def test_dkim_dns_temporary_error_is_temperror_never_a_pass(
    key: Key, error: BaseException, detail: str
) -> None:
    """RELIABILITY 20: the stub raises a timeout; the answer is 451 4.7.0, not a pass."""
    stub = dns_for(key)
    stub.error = error
    result = verify_dkim(sign(message(), key), dnsfunc=stub)
    assert (result.result, result.domain, result.detail) == ("temperror", "acme.example", detail)
    assert stub.asked == [b"s1._domainkey.acme.example."]
    verdict = judge("acme.example", (), require_authentication=True, own_dkim=result)
    assert verdict.temperror
    assert not verdict.forged
    assert verdict.reason == "dkim-temperror"
    assert verdict.passes == ()
    # Without require_authentication our own check decides nothing, so nothing waits on it.
    relaxed = judge("acme.example", (), require_authentication=False, own_dkim=result)
    assert not relaxed.temperror
    assert not relaxed.forged


def test_dkim_temperror_does_not_override_a_trusted_pass_or_a_dmarc_fail(key: Key) -> None:
    stub = dns_for(key)
    stub.error = dkim.DnsTimeoutError("timed out")
    result = verify_dkim(sign(message(), key), dnsfunc=stub)
    passed = results_of("mx.front.example.org; spf=pass smtp.mailfrom=acme.example")
    verdict = judge("acme.example", passed, require_authentication=True, own_dkim=result)
    assert (verdict.forged, verdict.temperror) == (False, False)
    failed = results_of("mx.front.example.org; dmarc=fail header.from=acme.example")
    verdict = judge("acme.example", failed, require_authentication=True, own_dkim=result)
    assert (verdict.forged, verdict.reason, verdict.temperror) == (True, "dmarc-fail", False)


def test_dkim_temperror_for_an_unaligned_signature_is_no_reason_to_wait(key: Key) -> None:
    stub = dns_for(key, domain="bulk-mailer.example")
    stub.error = dns_error(dns.exception.Timeout)
    result = verify_dkim(sign(message(), key, domain="bulk-mailer.example"), dnsfunc=stub)
    assert result.result == "temperror"
    verdict = judge("acme.example", (), require_authentication=True, own_dkim=result)
    assert (verdict.forged, verdict.temperror) == (True, False)


@pytest.mark.parametrize(
    "error",
    [None, dns_error(dns.resolver.NXDOMAIN), dns_error(dns.resolver.NoAnswer)],
    ids=["none", "nx", "noans"],
)
def test_dkim_missing_key_is_a_permerror(key: Key, error: BaseException | None) -> None:
    stub = StubDns(error=error)
    result = verify_dkim(sign(message(), key), dnsfunc=stub)
    assert (result.result, result.detail) == ("permerror", "no-key")
    assert stub.asked == [b"s1._domainkey.acme.example."]


@pytest.mark.parametrize(
    "record",
    [b"v=DKIM1; k=rsa; p=bm90IGEga2V5", b"v=DKIM1; k=rsa; p=", b"v=DKIM2; p=abc", b"\xff=;;"],
)
def test_dkim_unreadable_key_is_a_permerror(key: Key, record: bytes) -> None:
    stub = StubDns({b"s1._domainkey.acme.example.": record})
    result = verify_dkim(sign(message(), key), dnsfunc=stub)
    assert (result.result, result.detail) == ("permerror", "bad-key")  # "p=": revoked


def test_dkim_no_signature_is_none_and_asks_nothing() -> None:
    stub = StubDns()
    assert verify_dkim(message(), dnsfunc=stub) == DkimResult("none", None, "no-signature")
    assert stub.asked == []


def test_dkim_any_verified_signature_passes_and_judge_picks_the_aligned_one(
    key: Key, other_key: Key
) -> None:
    raw = sign(sign(message(), key, domain="acme.example"), other_key, domain="bulk.example")
    stub = StubDns(
        {
            b"s1._domainkey.acme.example.": key.record,
            b"s1._domainkey.bulk.example.": other_key.record,
        }
    )
    result = verify_dkim(raw, dnsfunc=stub)
    assert (result.result, result.domain) == ("pass", "bulk.example")  # the first that passed
    assert [(s.result, s.domain) for s in result.signatures] == [
        ("pass", "bulk.example"),
        ("pass", "acme.example"),
    ]
    verdict = judge("acme.example", (), require_authentication=True, own_dkim=result)
    assert not verdict.forged
    assert verdict.passes == ("dkim:acme.example",)
    assert verdict.unaligned_passes == ("dkim:bulk.example",)


def test_dkim_unaligned_pass_and_aligned_temperror_waits(key: Key, other_key: Key) -> None:
    raw = sign(sign(message(), key, domain="acme.example"), other_key, domain="bulk.example")

    def lookup(name: bytes, timeout: float) -> bytes | None:
        if name == b"s1._domainkey.acme.example.":
            raise dkim.DnsTimeoutError("timed out")
        return other_key.record

    result = verify_dkim(raw, dnsfunc=lookup)
    verdict = judge("acme.example", (), require_authentication=True, own_dkim=result)
    assert (verdict.forged, verdict.temperror) == (False, True)


def test_dkim_verifies_at_most_the_first_signatures(key: Key) -> None:
    raw = message()
    for i in range(MAX_DKIM_SIGNATURES + 3):
        raw = sign(raw, key, selector=f"s{i}")
    stub = StubDns()  # no keys: every signature is a permerror
    result = verify_dkim(raw, dnsfunc=stub)
    assert result.result == "permerror"
    assert len(stub.asked) == len(result.signatures) == MAX_DKIM_SIGNATURES


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe",
        b"no header at all\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=acme.example\r\nFrom: a@acme.example\r\n\r\nx\r\n",
        b"DKIM-Signature: \xff\xfe==;;\r\nFrom: a@acme.example\r\n\r\nx\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=acme.example; s=s1; h=from; bh=!!; b=!!\r\n"
        b"From: a@acme.example\r\n\r\nx\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=a;b; s=s1; h=from; bh=AA==; b=AA==\r\n"
        b"From: a@acme.example\r\n\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=acme.example; s=s1; h=from; bh=AA==; b=AA==;"
        b" x=1\r\nFrom: a@acme.example\r\n\r\n",
        b"From: a@acme.example\r\n bad continuation\r\n\tDKIM-Signature: v=1\r\n\r\n",
    ],
)
def test_dkim_hostile_input_never_raises_and_never_passes(key: Key, raw: bytes) -> None:
    result = verify_dkim(raw, dnsfunc=dns_for(key))
    assert result.result in ("none", "fail", "permerror")


def test_dkim_default_resolver_is_dnspython_with_servfail_as_temperror(
    key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dnsfunc=None goes through resolve_txt; here dnspython itself is stubbed."""
    asked: list[str] = []
    outcome: dict[str, Any] = {}

    def resolve(qname: str, rdtype: str, **kwargs: Any) -> Any:
        asked.append(qname)
        assert rdtype == "TXT"
        assert kwargs["lifetime"] == 2
        if "error" in outcome:
            raise outcome["error"]
        return outcome["answer"]

    monkeypatch.setattr(dns.resolver, "resolve", resolve)
    txt = key.record.decode()
    chunks = " ".join(f'"{txt[i : i + 200]}"' for i in range(0, len(txt), 200))
    outcome["answer"] = [dns.rdata.from_text("IN", "TXT", chunks)]
    signed = sign(message(), key)
    assert verify_dkim(signed, timeout=2).result == "pass"
    assert asked == ["s1._domainkey.acme.example."]
    outcome["error"] = dns_error(dns.resolver.NoNameservers)
    assert verify_dkim(signed, timeout=2).detail == "dns-servfail"
    outcome["error"] = dns_error(dns.resolver.LifetimeTimeout, timeout=2.0, errors={})
    assert verify_dkim(signed, timeout=2).detail == "dns-timeout"
    outcome["error"] = dns_error(dns.resolver.NXDOMAIN)
    assert verify_dkim(signed, timeout=2).detail == "no-key"
    assert resolve_txt(b"\xff._domainkey.acme.example.", 2) is None
    with pytest.raises(DnsTemporaryError):
        outcome["error"] = dns_error(dns.exception.Timeout)
        resolve_txt(b"s1._domainkey.acme.example.", 2)


# ---------------------------------------------------------------- the From identity


@pytest.mark.parametrize(
    ("address", "identity"),
    [
        ("Alice@Client.Example.COM", "alice@client.example.com"),
        ("bob@Bücher.example.com", "bob@xn--bcher-kva.example.com"),
        ("not an address", None),
        ("a@b@example.com", None),
        ("alice@", None),
        ("x" * 400 + "@example.com", None),
    ],
)
def test_from_identity(address: str, identity: str | None) -> None:
    assert from_identity(address) == identity
