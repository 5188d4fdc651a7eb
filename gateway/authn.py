"""Sender authentication: is an authorised-looking From shown to be forged?

Reads the Authentication-Results of trusted upstreams (RFC 8601) and, when asked, verifies
DKIM signatures itself (dkimpy). It must never treat anything as a pass that was not
verified by a trusted party or by us: unknown, malformed, unaligned or undecided is never a pass.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type hints; it stays in this module.
import dns.exception
import dns.resolver
import idna
from dkim.util import InvalidTagValueList, parse_tag_value  # type: ignore[import-untyped]
from dns.rdtypes.ANY.TXT import TXT
from email_validator import EmailNotValidError, validate_email
from publicsuffixlist import PublicSuffixList

# RFC 8601 gives no limit; one header field is capped at 16 KiB elsewhere (RELIABILITY.md
# part 3), and a longer value is refused whole rather than read in part.
MAX_HEADER_VALUE = 16 * 1024
# How many DKIM-Signature fields we verify per message: each costs a DNS query and a body
# hash, and a sender cannot make us do unbounded work by adding more.
MAX_DKIM_SIGNATURES = 5

HEADER_NAME = "authentication-results"

# RFC 8601 section 2.2: a method or result is a Keyword (ALPHA / DIGIT / "-"); "_" is
# tolerated because some verifiers write it.
_KEYWORD = re.compile(r"[A-Za-z0-9_-]+\Z")
_METHOD = re.compile(r"([A-Za-z0-9_-]+)(?:/[0-9]+)?\Z")
# An authserv-id is a token (or quoted string); this is the token, minus what cannot occur.
_AUTHSERV_ID = re.compile(r'[^\s\x00-\x1f\x7f"();=\\,<>@:\[\]]{1,255}\Z')
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_REASON_ID = re.compile(r"[^a-z0-9._-]")


@dataclass(frozen=True)
class AuthResult:
    """One method's result from one Authentication-Results field."""

    method: str  # "dkim", "spf", "dmarc", "arc", ... lower-case
    result: str  # "pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", ...
    # dkim: header.d (or header.i's domain); spf: smtp.mailfrom's domain (or smtp.helo);
    # dmarc: header.from; lower-case A-labels; None when absent or not a domain.
    domain: str | None
    authserv_id: str  # lower-case


@dataclass(frozen=True)
class DkimResult:
    """Our own DKIM verification of a message (RFC 6376 section 6)."""

    result: str  # "pass", "fail", "none" (no signature), "temperror", "permerror"
    domain: str | None  # d= of the signature that passed (else of the one reported)
    detail: str  # kebab-case why: "verified", "key-too-small", "body-length-tag", "dns-timeout"
    # One result per signature tried, in header order (empty for "none" and on a result
    # built by hand). `judge` reads these to find an *aligned* pass or temperror.
    signatures: tuple[DkimResult, ...] = ()


@dataclass(frozen=True)
class AuthVerdict:
    forged: bool
    # kebab-case why forged ("dmarc-fail", "no-aligned-pass"), or why undecided
    # ("dkim-temperror"); None when neither.
    reason: str | None
    passes: tuple[str, ...]  # aligned passes, e.g. ("dkim:acme.example", "spf:acme.example")
    # A DNS temporary error prevented a decision: the caller answers 451 4.7.0.
    temperror: bool
    # Passes for other domains, e.g. ("spf:bulk-mailer.example",): with forged and
    # "no-aligned-pass", these tell "unaligned" from "unauthenticated" (RELIABILITY 16, 17).
    unaligned_passes: tuple[str, ...] = ()


class DnsFunc(Protocol):
    """dkimpy's dnsfunc: ``dnsfunc(name, timeout=timeout)`` -> the TXT record, or None.

    `name` is the absolute query name, e.g. ``b"s1._domainkey.acme.example."``. None means
    no such record (NXDOMAIN or no TXT). A lookup that could not be answered now raises
    `DnsTemporaryError` (dkimpy's own ``dkim.DnsTimeoutError`` and dnspython's exceptions
    are understood too).
    """

    def __call__(self, name: bytes, timeout: float) -> bytes | None: ...


class DnsTemporaryError(Exception):
    """A DNS lookup that may succeed later (timeout, SERVFAIL): a temperror, never a pass."""

    def __init__(self, detail: str = "dns-error") -> None:
        super().__init__(detail)
        self.detail = detail


# ---------------------------------------------------------------- Authentication-Results


def parse_authentication_results(value: str) -> tuple[str, tuple[AuthResult, ...]] | None:
    """(authserv-id, results) of one Authentication-Results value, or None if unparseable.

    Tolerant reading of RFC 8601 section 2.2: comments are dropped, CFWS is allowed around
    "=", unknown ``key=value`` items (Microsoft's ``action=none``) are skipped, and so is a
    malformed resinfo when others parse. ``id; none`` gives no results. A field that starts
    with a result, as Microsoft writes it, has no authserv-id: it returns ``""`` as the id,
    which is never trusted. Never raises; values over MAX_HEADER_VALUE are refused whole.
    """
    if len(value) > MAX_HEADER_VALUE:
        return None
    text = _strip_comments(value.replace("\r", " ").replace("\n", " ").replace("\t", " "))
    if text is None:
        return None
    segments = _split_outside_quotes(text, ";")
    head = _words(segments[0])
    if not head:
        return None
    if "=" in head[0]:
        # No authserv-id: the first segment is already a result.
        authserv_id = ""
        resinfos = segments
    else:
        authserv_id = _unquote(head[0]).lower()
        if not _AUTHSERV_ID.match(authserv_id):
            return None
        if len(head) > 2 or (len(head) == 2 and not head[1].isdigit()):
            return None
        resinfos = segments[1:]
    resinfos = [s for s in resinfos if s.strip()]
    if not resinfos:
        return None
    if authserv_id and len(resinfos) == 1 and resinfos[0].strip().lower() == "none":
        return authserv_id, ()
    results = tuple(
        result
        for result in (_parse_resinfo(segment, authserv_id) for segment in resinfos)
        if result is not None
    )
    if not results:
        return None
    return authserv_id, results


def trusted_results(
    headers: Sequence[tuple[str, str]], trusted_ids: Collection[str], own_id: str
) -> tuple[tuple[AuthResult, ...], tuple[str, ...]]:
    """Results from Authentication-Results fields by a trusted authserv-id, and why others
    were ignored ("untrusted-authserv-id:mx.evil.example", "own-authserv-id-from-outside").

    A field with our own id (`own_id`, the gateway's smtp.hostname) is always ignored, even
    if listed as trusted: we add none before this runs, so one in the message was written
    by someone else (RFC 8601 section 5; RT's CVE-2023-41259 trusted its own headers).
    The trusted upstream must itself remove fields carrying its id from incoming mail.
    """
    trusted = _normalise_ids(trusted_ids)
    own = own_id.strip().lower().rstrip(".")
    results: list[AuthResult] = []
    reasons: list[str] = []
    for name, value in headers:
        if name.strip().lower() != HEADER_NAME:
            continue
        parsed, reason = _judge_field(value, trusted, own)
        if parsed is None:
            reasons.append(reason)
        else:
            results.extend(parsed)
    return tuple(results), tuple(reasons)


def strip_untrusted(
    headers: Sequence[tuple[str, str]], trusted_ids: Collection[str], own_id: str
) -> tuple[tuple[str, str], ...]:
    """The headers without every Authentication-Results field `trusted_results` ignores."""
    trusted = _normalise_ids(trusted_ids)
    own = own_id.strip().lower().rstrip(".")
    return tuple(
        (name, value)
        for name, value in headers
        if name.strip().lower() != HEADER_NAME or _judge_field(value, trusted, own)[0] is not None
    )


def is_aligned(domain: str | None, from_domain: str) -> bool:
    """DMARC relaxed alignment (RFC 7489 section 3.1.1): both names have the same
    organisational domain (section 3.2), found with the Public Suffix List.

    "mail.client.co.uk" aligns with "client.co.uk" (both are client.co.uk's), and so do
    two siblings of one organisation; "client.co.uk" never aligns with "other.co.uk",
    nor "a.github.io" with "b.github.io": "co.uk" and "github.io" are public suffixes,
    under which every name is its own organisation. A name that is itself a public
    suffix ("co.uk", "example", "localhost") has no organisational domain and aligns with
    nothing: no organisation owns it.
    """
    a = _normalise_domain(domain) if domain else None
    b = _normalise_domain(from_domain)
    if a is None or b is None:
        return False
    org = organisational_domain(a)
    return org is not None and org == organisational_domain(b)


def organisational_domain(domain: str) -> str | None:
    """The organisational domain (RFC 7489 section 3.2) of a normalised domain name: its
    public suffix and one more label; None when the name is a public suffix itself."""
    return _public_suffix_list().privatesuffix(domain)


@functools.cache
def _public_suffix_list() -> PublicSuffixList:
    # Parsing the list takes some tens of milliseconds: once per process, on first use.
    # The ICANN and the private section both: a private suffix ("github.io",
    # "blogspot.com") is shared by independent owners just as "co.uk" is.
    return PublicSuffixList()


def judge(
    from_domain: str,
    results: Sequence[AuthResult],
    *,
    require_authentication: bool,
    own_dkim: DkimResult | None = None,
) -> AuthVerdict:
    """Whether mail with this From domain is shown forged, given trusted results only.

    `results` must come from `trusted_results`. In order: a DMARC fail makes it forged
    (whichever header.from it names), and so does a DMARC result of any kind for another
    header.from than this From domain (the upstream then read a different From than we do).
    Then, when `require_authentication`, it is forged unless there is an aligned DKIM or
    SPF pass (or a DMARC pass for this From domain, which by RFC 7489 means one), from the
    trusted results or our own DKIM check. If our own check hit a DNS temporary error on
    an aligned signature and nothing else passed, the verdict is undecided: temperror=True,
    forged=False, and the caller answers 451 4.7.0 so the sender retries. An upstream's
    temperror is only "not a pass": its header is already written, a retry reads the same.
    """
    from_norm = _normalise_domain(from_domain)
    if any(r.method == "dmarc" and r.result == "fail" for r in results):
        return AuthVerdict(forged=True, reason="dmarc-fail", passes=(), temperror=False)
    # RFC 7489 section 6.6.1: DMARC is evaluated on the RFC5322.From domain. A result
    # (pass or anything else) naming another header.from means the verifier read a
    # different From than we do (two From fields, or one it parsed otherwise): the From
    # we are about to trust is not the one that was checked.
    if any(r.method == "dmarc" and r.domain is not None and r.domain != from_norm for r in results):
        return AuthVerdict(forged=True, reason="dmarc-other-from", passes=(), temperror=False)
    passes: list[str] = []
    unaligned: list[str] = []

    def record(method: str, domain: str | None) -> None:
        label = f"{method}:{domain or '?'}"
        target = passes if from_norm and is_aligned(domain, from_norm) else unaligned
        if label not in target:
            target.append(label)

    for r in results:
        if r.result != "pass":
            continue
        if r.method in ("dkim", "spf"):
            record(r.method, r.domain)
        elif r.method == "dmarc" and from_norm and r.domain == from_norm:
            record("dmarc", r.domain)
    own_signatures = () if own_dkim is None else (own_dkim.signatures or (own_dkim,))
    for sig in own_signatures:
        if sig.result == "pass":
            record("dkim", sig.domain)
    verdict = AuthVerdict(
        forged=False,
        reason=None,
        passes=tuple(passes),
        temperror=False,
        unaligned_passes=tuple(unaligned),
    )
    if not require_authentication or passes:
        return verdict
    # Only a signature that could align can change the answer on retry; an unknown d=
    # (no domain read) is given the benefit of a retry rather than called forged.
    if any(
        sig.result == "temperror"
        and (sig.domain is None or (from_norm is not None and is_aligned(sig.domain, from_norm)))
        for sig in own_signatures
    ):
        return AuthVerdict(
            forged=False,
            reason="dkim-temperror",
            passes=(),
            temperror=True,
            unaligned_passes=tuple(unaligned),
        )
    return AuthVerdict(
        forged=True,
        reason="no-aligned-pass",
        passes=(),
        temperror=False,
        unaligned_passes=tuple(unaligned),
    )


def from_identity(addr_spec: str) -> str | None:
    """The From addr-spec as authorisation compares it, or None if it is not valid.

    email-validator without DNS; lower-case, domain as IDNA A-labels (as the sender and
    mailbox lists store them). Never Reply-To or Sender: the caller passes From's addr-spec.
    """
    if len(addr_spec) > 320:
        return None
    try:
        valid = validate_email(addr_spec.strip(), check_deliverability=False)
    except EmailNotValidError:
        return None
    return f"{valid.local_part.lower()}@{valid.ascii_domain.lower()}"


# ---------------------------------------------------------------- our own DKIM check


def resolve_txt(name: bytes, timeout: float = 5.0) -> bytes | None:
    """The default DnsFunc: real DNS through dnspython (never used in tests).

    dkimpy's own ``get_txt`` turns SERVFAIL (dnspython's NoNameservers) into "no record",
    which would make a DNS outage read as a permanent failure; here it is a temperror.
    """
    try:
        qname = name.decode("ascii")
    except UnicodeDecodeError:
        return None
    try:
        answer = dns.resolver.resolve(
            qname, "TXT", lifetime=timeout, raise_on_no_answer=False, search=False
        )
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.Timeout as exc:
        raise DnsTemporaryError("dns-timeout") from exc
    except dns.exception.DNSException as exc:
        raise DnsTemporaryError("dns-servfail") from exc
    for rdata in answer:
        # RFC 6376 section 3.6.2.2: several TXT records give undefined results; like
        # dkimpy, read the first.
        if isinstance(rdata, TXT):
            return b"".join(rdata.strings)
    return None


def verify_dkim(
    raw: bytes,
    *,
    dnsfunc: DnsFunc | None = None,
    min_key_bits: int = 1024,
    timeout: float = 5.0,
) -> DkimResult:
    """Verify the message's DKIM signatures (up to MAX_DKIM_SIGNATURES) with dkimpy.

    Synchronous and blocking on DNS: run it in a thread. Pass if any signature verifies.
    Never a pass: a signature with an ``l=`` body length (content may be appended after
    it, RELIABILITY 23), an RSA key under `min_key_bits`, a missing or bad key, or a DNS
    temporary error (result "temperror": the caller answers 451 4.7.0). dkimpy's
    exceptions never escape. `dnsfunc` None means real DNS (`resolve_txt`).
    """
    lookup: DnsFunc = resolve_txt if dnsfunc is None else dnsfunc
    try:
        headers: list[tuple[bytes, bytes]] = dkim.DKIM(raw).headers
    except Exception:
        # dkimpy's header reader refuses what it cannot split; nothing was verified.
        return DkimResult("permerror", None, "malformed-message")
    count = sum(1 for name, _value in headers if name.lower() == b"dkim-signature")
    if count == 0:
        return DkimResult("none", None, "no-signature")
    signatures = tuple(
        _verify_signature(raw, index, lookup, min_key_bits, timeout)
        for index in range(min(count, MAX_DKIM_SIGNATURES))
    )
    chosen = (
        next((s for s in signatures if s.result == "pass"), None)
        or next((s for s in signatures if s.result == "temperror"), None)
        or signatures[0]
    )
    return DkimResult(chosen.result, chosen.domain, chosen.detail, signatures)


class _Lookup:
    """Wraps a DnsFunc for dkimpy: remembers whether a key was found, and turns every
    temporary DNS failure into DnsTemporaryError, which dkimpy does not catch.

    dkimpy catches its own DnsTimeoutError inside verify and returns False, the same
    answer as a bad signature; it would turn a DNS outage into a permanent failure.
    """

    def __init__(self, lookup: DnsFunc) -> None:
        self._lookup = lookup
        self.asked = False
        self.answer: bytes | None = None

    def __call__(self, name: bytes, timeout: float = 5.0) -> bytes | None:
        self.asked = True
        try:
            answer = self._lookup(name, timeout=timeout)
        except DnsTemporaryError:
            raise
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            answer = None
        except (dkim.DnsTimeoutError, dns.exception.Timeout, TimeoutError) as exc:
            raise DnsTemporaryError("dns-timeout") from exc
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError("dns-servfail") from exc
        except Exception as exc:
            # Whatever else went wrong, the key was not read: a retry may succeed.
            raise DnsTemporaryError("dns-error") from exc
        self.answer = answer
        return answer


def _verify_signature(
    raw: bytes, index: int, lookup: DnsFunc, min_key_bits: int, timeout: float
) -> DkimResult:
    """One DKIM-Signature, on a fresh dkimpy object so no state leaks between them."""
    try:
        verifier = dkim.DKIM(raw, minkey=min_key_bits, timeout=timeout)
        value = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"][index]
        tags: dict[bytes, bytes] = parse_tag_value(value)
    except (dkim.DKIMException, InvalidTagValueList, ValueError, IndexError):
        return DkimResult("permerror", None, "malformed-signature")
    domain = _tag_domain(tags)
    if b"l" in tags:
        # RFC 6376 section 8.2: content appended after l= bytes is unsigned, so the body
        # we would show is not the body that was signed.
        return DkimResult("fail", domain, "body-length-tag")
    probe = _Lookup(lookup)
    try:
        verified = bool(verifier.verify(index, dnsfunc=probe))
    except DnsTemporaryError as exc:
        return DkimResult("temperror", domain, exc.detail)
    except dkim.KeyFormatError:
        # dkimpy raises this when a valid signature's key is under minkey.
        if _is_small_rsa_key(verifier, min_key_bits):
            return DkimResult("fail", domain, "key-too-small")
        return DkimResult("permerror", domain, "bad-key")
    except dkim.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            return DkimResult("fail", domain, "body-hash-mismatch")
        return DkimResult("permerror", domain, "invalid-signature")
    except dkim.DKIMException:
        return DkimResult("permerror", domain, "malformed-signature")
    except Exception:
        # A verifier error on hostile input is not a verification.
        return DkimResult("permerror", domain, "verifier-error")
    if probe.asked and probe.answer is None:
        return DkimResult("permerror", domain, "no-key")
    if _is_small_rsa_key(verifier, min_key_bits):
        return DkimResult("fail", domain, "key-too-small")
    if not verified:
        if not verifier.keysize:
            # The record was there but dkimpy could not read a key from it.
            return DkimResult("permerror", domain, "bad-key")
        return DkimResult("fail", domain, "bad-signature")
    return DkimResult("pass", domain, "verified")


def _is_small_rsa_key(verifier: object, min_key_bits: int) -> bool:
    keysize = getattr(verifier, "keysize", 0)
    ktag = getattr(verifier, "ktag", None)
    return ktag == b"rsa" and isinstance(keysize, int) and 0 < keysize < min_key_bits


def _tag_domain(tags: dict[bytes, bytes]) -> str | None:
    try:
        return _normalise_domain(tags[b"d"].decode("ascii"))
    except (KeyError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------- helpers


def _judge_field(
    value: str, trusted: frozenset[str], own: str
) -> tuple[tuple[AuthResult, ...] | None, str]:
    """(results, "") for a trusted field, else (None, why it is ignored).

    Trust is given to the exact authserv-id token only, written first in the field: the
    front MTA removes fields "carrying its own authserv-id" (RFC 8601 section 5) by
    comparing that token, so any other spelling the grammar or a tolerant reader allows
    (a quoted string, a quoted-pair, a comment before it, a trailing dot) survives the
    strip and must not be read as its word.
    """
    parsed = parse_authentication_results(value)
    if parsed is None:
        return None, "unparseable"
    authserv_id, results = parsed
    if not authserv_id:
        return None, "missing-authserv-id"
    if authserv_id.rstrip(".") == own:
        return None, "own-authserv-id-from-outside"
    token = _leading_token(value)
    exact = token is not None and token.lower() == authserv_id
    if exact and authserv_id in trusted:
        return results, ""
    shown = _REASON_ID.sub("?", authserv_id[:64])
    if authserv_id.rstrip(".") in trusted:
        # A trusted id, spelled so that the front MTA's strip would not have matched it.
        return None, f"inexact-authserv-id:{shown}"
    return None, f"untrusted-authserv-id:{shown}"


# RFC 2045 token characters (the authserv-id "value" of RFC 8601 section 2.2, unquoted):
# any printable ASCII but SPACE and tspecials. It must end where CFWS, ";" or the end of
# the field begins (a version number may follow after CFWS).
_LEADING_TOKEN = re.compile(r"[ \t\r\n]*([!#$%&'*+\-.0-9A-Z^_`a-z{|}~]{1,255})(?=[ \t\r\n;(]|\Z)")


def _leading_token(value: str) -> str | None:
    """The authserv-id exactly as written first in the field, if it is a plain token."""
    match = _LEADING_TOKEN.match(value)
    return match.group(1) if match else None


def _normalise_ids(ids: Collection[str]) -> frozenset[str]:
    return frozenset(i.strip().lower().rstrip(".") for i in ids if i.strip())


def _strip_comments(text: str) -> str | None:
    """`text` with (nested) comments replaced by a space; None if unbalanced."""
    out: list[str] = []
    depth = 0
    quoted = False
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if quoted:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                quoted = False
        elif depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if not depth:
                    out.append(" ")
        elif c == '"':
            quoted = True
            out.append(c)
        elif c == "(":
            depth = 1
        elif c == ")":
            return None
        else:
            out.append(c)
        i += 1
    if quoted or depth:
        return None
    return "".join(out)


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    start = 0
    quoted = False
    escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _words(segment: str) -> list[str]:
    """Whitespace-separated words (quoted strings kept whole), with CFWS around "=" joined:
    ``dkim = pass`` becomes ``dkim=pass``."""
    raw = [w for w in _split_outside_quotes(segment, " ") if w]
    words: list[str] = []
    for word in raw:
        if words and (word.startswith("=") and "=" not in words[-1]):
            words[-1] += word
        elif words and words[-1].find("=") == len(words[-1]) - 1:
            words[-1] += word
        else:
            words.append(word)
    return words


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _parse_resinfo(segment: str, authserv_id: str) -> AuthResult | None:
    words = _words(segment)
    if not words:
        return None
    method_word, eq, result = words[0].partition("=")
    method_match = _METHOD.match(method_word)
    if not eq or method_match is None or not _KEYWORD.match(result):
        return None
    method = method_match.group(1).lower()
    props: dict[str, str] = {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        key = key.lower()
        if eq and "." in key and key not in props:
            props[key] = _unquote(value)
    return AuthResult(method, result.lower(), _result_domain(method, props), authserv_id)


def _result_domain(method: str, props: dict[str, str]) -> str | None:
    if method == "dkim":
        value = props.get("header.d") or _domain_part(props.get("header.i"))
    elif method == "spf":
        value = _domain_part(props.get("smtp.mailfrom")) or props.get("smtp.helo")
    elif method == "dmarc":
        value = props.get("header.from")
    else:
        return None
    return _normalise_domain(value) if value else None


def _domain_part(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip().strip("<>")
    return value.rpartition("@")[2] or None


def _normalise_domain(domain: str | None) -> str | None:
    """Lower-case A-label form, no trailing dot; None if it is not a domain name."""
    if not domain:
        return None
    name = domain.strip().rstrip(".").lower()
    if not name or len(name) > 253:
        return None
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii").lower()
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    return name if _DOMAIN.match(name) else None
