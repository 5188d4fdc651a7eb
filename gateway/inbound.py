"""The [parse] stage: received bytes become an InboundMessage, after a cheap linear pre-scan
for hostile structure. `parse_message` runs in a worker process of `parserpool.ParserPool`,
which adds the CPU, memory and wall-time limits; nothing here may raise on any input, and
`salvage_message` recovers what it can of a message the worker could not parse.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email
import email.charset
import email.generator
import email.headerregistry
import email.message
import email.parser
import email.policy
import email.utils
import enum
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .bounce import DeliveryReport, extract_report
from .readable import reply_text

# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParseLimits:
    """Limits on one message; the defaults are RELIABILITY.md part 3."""

    max_header_bytes: int = 100 * 1024  # header block size
    max_header_fields: int = 1000
    max_field_bytes: int = 16 * 1024  # one (unfolded) field
    max_addresses: int = 100  # addresses in one address header
    max_mime_depth: int = 20
    max_mime_parts: int = 200
    max_boundary_length: int = 2048  # hard limit; RFC 2046 §5.1.1 says 70
    cpu_seconds: int = 10  # per message, in the worker
    memory_bytes: int = 1 << 30  # RLIMIT_AS of a worker
    wall_seconds: float = 15.0  # per message, measured by the caller


class HeaderViolation(enum.StrEnum):
    """Reasons to refuse a message at SMTP time (RFC 5322 §2.2, §2.3: CRLF only, no NUL)."""

    NUL_IN_HEADER = "nul-in-header"
    BARE_LINE_ENDING_IN_HEADER = "bare-line-ending-in-header"


@dataclass(frozen=True)
class HeaderScan:
    header_bytes: int  # size of the header block (up to and excluding the blank line)
    field_count: int  # counted in the first MiB of the block only
    received_count: int  # number of Received: fields (for the hop limit), ditto
    violation: str | None  # a HeaderViolation value, or None


class Malformed(enum.StrEnum):
    """Why a message could not be parsed normally (InboundMessage.malformed)."""

    HEADER_LIMIT = "header-limit"
    TOO_MANY_FIELDS = "too-many-fields"
    FIELD_TOO_LONG = "field-too-long"
    MIME_DEPTH = "mime-depth"
    TOO_MANY_PARTS = "too-many-parts"
    BOUNDARY_TOO_LONG = "boundary-too-long"
    TOO_MANY_ADDRESSES = "too-many-addresses"
    PARSE_TIMEOUT = "parse-timeout"
    PARSE_MEMORY = "parse-memory"
    PARSE_CRASH = "parse-crash"
    UNPARSEABLE = "unparseable"


@dataclass(frozen=True)
class Attachment:
    filename: str | None  # decoded display name, NOT sanitised here
    content_type: str
    data: bytes


@dataclass(frozen=True)
class InboundMessage:
    message_id: str | None  # as written, angle brackets included, stripped, <= 998 chars
    from_header: str | None  # decoded From value (display form), None if absent
    from_addresses: tuple[tuple[str, str], ...]  # (display name, addr-spec) per From address
    subject: str | None  # decoded (RFC 2047), unfolded, single line
    date: str | None  # the Date value as written
    in_reply_to: tuple[str, ...]  # message ids (with angle brackets) found in In-Reply-To
    references: tuple[str, ...]  # message ids found in References, in order
    # Every header field (name, decoded unfolded single-line value), bounded by the limits.
    headers: tuple[tuple[str, str], ...]
    content_type: str  # of the top-level part, lower-case
    # The first inline text/plain part decoded with its charset (unknown or lying charset:
    # replacement characters), lines ending in "\n"; "" if none.
    text: str
    html: str  # the first inline text/html part, decoded likewise; "" if none
    attachments: tuple[Attachment, ...]
    malformed: str | None  # None or a Malformed value
    defects: tuple[str, ...]  # email-package defects and fields that needed a fallback
    # What a bounce or delivery notice says (bounce.extract_report, run in the worker while
    # the parsed tree is at hand); None for other mail and for malformed results.
    report: DeliveryReport | None = None
    # The readable text (text/plain, else the HTML as text) with the quoted history and
    # the signature stripped: what a ticket shows. Computed here, off the event loop.
    reply_text: str = ""


# --- constants --------------------------------------------------------------------------------

# RFC 5322 §2.1.1: a line is at most 998 characters; longer ids and names are cut there.
_MAX_MESSAGE_ID = 998
_MAX_DEFECTS = 100
_MAX_DEFECT_CHARS = 200
_MAX_CHARSET_NAME = 64

# The headers policy.default parses with the (quadratic, RELIABILITY.md part 1) address parser.
_ADDRESS_HEADERS = frozenset(
    {
        b"from",
        b"sender",
        b"reply-to",
        b"to",
        b"cc",
        b"bcc",
        b"resent-from",
        b"resent-sender",
        b"resent-to",
        b"resent-cc",
        b"resent-bcc",
    }
)
# Headers whose value we keep as written rather than as a parser renders it.
_AS_WRITTEN = frozenset({"message-id", "date", "in-reply-to", "references"})
_UNIQUE_HEADERS = frozenset({"from", "subject", "message-id", "date"})

# Codecs that are not safe on hostile bytes: punycode decoding is quadratic, idna refuses
# errors="replace". Such a charset label is treated as unknown.
_UNSAFE_CODECS = frozenset({"idna", "punycode", "undefined"})
# Labels that mail programs write for text in a larger charset: Chinese mail programs label
# GBK text "GB2312" (GBK is its superset, and the WHATWG Encoding Standard decodes every
# GB2312 label as GBK), so names with characters outside GB2312 (U+9555 in a common
# surname) would otherwise come out as replacement characters. Keyed by Python's codec name.
_SUPERSET_CODECS = {"gb2312": "gbk"}
# The charset label of an RFC 2047 encoded word ("=?label?" or "=?label*lang?").
_ENCODED_WORD_LABEL = re.compile(r"=\?([^?\s*]{1,64})(?=[*?])")
# Raw 8-bit header bytes with no charset (RFC 5322 2.2 allows none; RFC 6532 allows UTF-8)
# are read as the first of these that decodes them: UTF-8, then the charset the message
# declares for its text (a legacy mail program writes its headers in the same code page),
# then Windows-1252, which legacy Western mail programs use unlabelled. Latin-1 decodes
# every byte, so the last resort never fails. Parts of the message looked at for the hint:
_MAX_HINT_PARTS = 20
_FALLBACK_CODECS = ("cp1252", "latin-1")

# Python-side bytes patterns: each is linear (no nested quantifiers, no lazy scans).
_BARE_LINE_ENDING = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_FIELD_SPLIT = re.compile(rb"\r\n(?![ \t])")
_BOUNDARY_PARAM = re.compile(
    rb'boundary(?:\*0?\*?)?[ \t]*=[ \t]*(?:"([^"\r\n]*)"|([^\s;"]+))', re.IGNORECASE
)
# A part the stdlib parser recurses into as a message: every message/* type except
# delivery-status (email.feedparser._parsegen). Case-insensitive inside a pattern whose
# boundaries are not.
_MESSAGE_PART = rb"(?i:content-type[ \t]*:\s*message/(?!delivery-status\b))"
_ANY_MIME_EVENT = re.compile(rb"^(?:--([^\r\n]*)|" + _MESSAGE_PART + rb")", re.MULTILINE)
_MAX_BOUNDARY_ALTERNATIVES = 64
_FOLD = re.compile(r"\r?\n(?=[ \t])|\r(?=[ \t])")
_LINE_BREAKS = re.compile("[\x00\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_MSG_ID = re.compile(r"<[^<>\s]{1,996}>")
_ENCODED_WORD = re.compile(r"=\?([^?\s*]{1,64})(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_ANGLE_ADDR = re.compile(r"<([^<>\s@]{1,256}@[^<>\s@]{1,256})>")
_BARE_ADDR = re.compile(r"[^\s<>()\[\]\",;:@]{1,256}@[^\s<>()\[\]\",;:@]{1,256}")
_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")
# A From value in one of its plainest forms: "Display Words <local@domain>", "<local@domain>",
# "local@domain". policy.default's address parser (~0.1 ms a value) reads such a value as
# exactly these parts, with no defects, and renders it back as _simple_from does; any other
# value (quotes, comments, encoded words, folding, groups, lists, spaces at either end...)
# goes through the parser. RFC 5322 atext, less "=" and "?" (which can start an encoded word).
_ATEXT = r"A-Za-z0-9!#$%&'*+/^_`{|}~-"
_SIMPLE_ADDR_SPEC = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_FROM = re.compile(
    rf"(?:([{_ATEXT}]+(?: [{_ATEXT}]+)*) )?<({_SIMPLE_ADDR_SPEC})>|({_SIMPLE_ADDR_SPEC})"
)

# scan_header_block counts fields and Received lines in this much of the header block.
_SCAN_COUNT_BYTES = 1 << 20


# --- pre-scan -------------------------------------------------------------------------------


def scan_header_block(raw: bytes) -> HeaderScan:
    """Cheap (C-speed bytes methods only, no email parser), runs on the event loop; never raises.

    raw is the DATA content with CRLF line endings as received. An empty header block or a
    message with no blank line is fine (header block = whole message).
    """
    try:
        return _scan_header_block(raw)
    except Exception:
        # Only reachable on memory exhaustion; report an empty, unremarkable block.
        return HeaderScan(header_bytes=0, field_count=0, received_count=0, violation=None)


def _scan_header_block(raw: bytes) -> HeaderScan:
    # RFC 5322 §2.1: the header ends at the first empty line, CRLF CRLF. Any bare CR or LF
    # before it makes readers disagree about where fields start, which is how headers get
    # smuggled, so the block is measured by the strict rule and such bytes are a violation.
    if raw.startswith(b"\r\n"):
        return HeaderScan(header_bytes=0, field_count=0, received_count=0, violation=None)
    end = raw.find(b"\r\n\r\n")
    header_bytes = len(raw) if end < 0 else end + 2
    violation: str | None = None
    if raw.find(b"\x00", 0, header_bytes) >= 0:
        violation = HeaderViolation.NUL_IN_HEADER.value
    else:
        crlf = raw.count(b"\r\n", 0, header_bytes)
        if raw.count(b"\r", 0, header_bytes) != crlf or raw.count(b"\n", 0, header_bytes) != crlf:
            violation = HeaderViolation.BARE_LINE_ENDING_IN_HEADER.value
    # Counting is bounded so a 10 MB header block costs the event loop a few ms; a block that
    # long is over any header limit whatever its counts.
    block = raw[: min(header_bytes, _SCAN_COUNT_BYTES)]
    lines = block.count(b"\r\n") + (0 if block.endswith(b"\r\n") else 1) if block else 0
    continuations = block.count(b"\r\n ") + block.count(b"\r\n\t")
    if block[:1] in (b" ", b"\t"):
        continuations += 1
    received_count = (b"\r\n" + block).lower().count(b"\r\nreceived:")
    return HeaderScan(
        header_bytes=header_bytes,
        field_count=lines - continuations,
        received_count=received_count,
        violation=violation,
    )


def _normalise_line_endings(raw: bytes) -> bytes:
    """Bare CR and bare LF become CRLF, so the parser and any reader see the same lines."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") == crlf and raw.count(b"\n") == crlf:
        return raw
    return _BARE_LINE_ENDING.sub(b"\r\n", raw)


def _prescan_headers(data: bytes, scan: HeaderScan, limits: ParseLimits) -> Malformed | None:
    # The field count comes from byte counts alone, so a 50,000-field header is refused before
    # anything is split. After that at most max_header_fields fields are looked at.
    if scan.field_count > limits.max_header_fields:
        return Malformed.TOO_MANY_FIELDS
    too_long = False
    for field in _FIELD_SPLIT.split(data[: scan.header_bytes]):
        name = field.partition(b":")[0].strip().lower()
        # Counting '@' (and commas, with room for "Last, First" display names) stands in for
        # the address count: the stdlib address parser is quadratic (cpython#136063).
        if name in _ADDRESS_HEADERS and (
            field.count(b"@") > limits.max_addresses or field.count(b",") > 2 * limits.max_addresses
        ):
            return Malformed.TOO_MANY_ADDRESSES
        if len(field) - 2 * field.count(b"\r\n") > limits.max_field_bytes:
            too_long = True
    if too_long:
        return Malformed.FIELD_TOO_LONG
    if scan.header_bytes > limits.max_header_bytes:
        return Malformed.HEADER_LIMIT
    return None


def _prescan_mime(data: bytes, limits: ParseLimits) -> Malformed | None:
    """Estimate MIME depth and part count from boundaries and their delimiter lines.

    Linear in the message size, it stops the inputs on which the stdlib parser recurses until
    RecursionError (2,000 nested multiparts) or goes super-linear (20,000 parts, bpo-31449).
    """
    boundaries: set[bytes] = set()
    for match in _BOUNDARY_PARAM.finditer(data):
        boundary = match.group(1) if match.group(1) is not None else match.group(2)
        if len(boundary) > limits.max_boundary_length:
            return Malformed.BOUNDARY_TOO_LONG
        boundaries.add(boundary.rstrip(b" \t"))
    # A stack of open containers: a boundary once its first delimiter line is seen, or None for
    # a message/* part. A delimiter of a boundary already open closes everything inside it.
    stack: list[bytes | None] = []
    index_of: dict[bytes, int] = {}
    parts = 0
    for boundary, closing in _mime_events(data, boundaries):
        if boundary is None:
            stack.append(None)
            parts += 1
        else:
            index = index_of.get(boundary)
            if index is None:
                index_of[boundary] = len(stack)
                stack.append(boundary)
            else:
                for inner in stack[index + 1 :]:
                    if inner is not None:
                        del index_of[inner]
                del stack[index + 1 :]
            if closing:
                del index_of[boundary]
                stack.pop()
            else:
                parts += 1
        if len(stack) > limits.max_mime_depth:
            return Malformed.MIME_DEPTH
        if parts > limits.max_mime_parts:
            return Malformed.TOO_MANY_PARTS
    return None


def _mime_events(data: bytes, boundaries: set[bytes]) -> Iterator[tuple[bytes | None, bool]]:
    """(boundary, is close delimiter) per delimiter line (RFC 2046 §5.1.1, transport padding
    allowed), (None, False) per message/* part, in document order."""
    if len(boundaries) <= _MAX_BOUNDARY_ALTERNATIVES:
        # One pattern naming the declared boundaries keeps the other "--" lines in C.
        # Longest first, so a boundary that is a prefix of another cannot take its lines.
        ordered = sorted(boundaries, key=len, reverse=True)
        alternatives = b"|".join(re.escape(b) for b in ordered) or rb"(?!)"
        pattern = re.compile(
            rb"^(?:--(" + alternatives + rb")(--)?[ \t]*\r?$|" + _MESSAGE_PART + rb")",
            re.MULTILINE,
        )
        for match in pattern.finditer(data):
            yield match.group(1), match.group(2) is not None
        return
    # Thousands of boundaries (the 2,000-deep nesting): a pattern that size would be slow to
    # compile, so look every "--" line up instead; still linear.
    for match in _ANY_MIME_EVENT.finditer(data):
        line = match.group(1)
        if line is None:
            yield None, False
            continue
        rest = line.rstrip(b" \t")
        if rest in boundaries:
            yield rest, False
        elif rest.endswith(b"--") and rest[:-2] in boundaries:
            yield rest[:-2], True


# --- small text helpers -----------------------------------------------------------------------


def _clean(text: str) -> str:
    """Drop lone surrogates (from undecodable raw header bytes) so every value is valid text."""
    if _SURROGATE.search(text) is None:
        return text
    try:
        # Surrogate escapes carry the raw bytes: most often they are UTF-8.
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _single_line(text: str, limit: int) -> str:
    """Unfolded, one line, no NUL, bounded: safe to log, store and copy into a header."""
    if text.isascii() and text.isprintable():
        # The common case, checked in C: no surrogate, control or line-break character, so
        # _clean and _LINE_BREAKS would leave it as it is (and save ~2 us a value).
        return text.strip()[:limit]
    return _LINE_BREAKS.sub(" ", _clean(text)).strip()[:limit]


def _unfold(value: str) -> str:
    return _FOLD.sub("", value)


def _add_defect(defects: list[str], text: str) -> None:
    if len(defects) < _MAX_DEFECTS and text not in defects:
        defects.append(_single_line(text, _MAX_DEFECT_CHARS))


def _codec_for(charset: str | None, defects: list[str] | None) -> str:
    """A safe text codec name for a MIME charset label; unknown labels read as UTF-8."""
    if not charset:
        return "utf-8"
    label = charset.strip().strip('"').lower()
    if label in ("us-ascii", "ascii"):
        # Real mail labelled ASCII often carries 8-bit text; UTF-8 is a superset.
        return "utf-8"
    label = email.charset.ALIASES.get(label, label)
    try:
        if len(label) > _MAX_CHARSET_NAME:
            raise LookupError(label)
        info = codecs.lookup(label)
        if info.name in _UNSAFE_CODECS or not getattr(info, "_is_text_encoding", True):
            raise LookupError(label)
    except (LookupError, ValueError, TypeError):
        if defects is not None:
            _add_defect(defects, f"unknown charset {label[:_MAX_CHARSET_NAME]!r}")
        return "utf-8"
    return _SUPERSET_CODECS.get(info.name, info.name)


def _superset_label(label: str) -> str | None:
    """The superset codec to read a charset label as (see _SUPERSET_CODECS), or None."""
    try:
        name = codecs.lookup(email.charset.ALIASES.get(label.lower(), label.lower())).name
    except (LookupError, ValueError, TypeError):
        return None
    return _SUPERSET_CODECS.get(name)


def _relabel_encoded_words(value: str) -> str:
    """Encoded words labelled with a subset charset relabelled with its superset, so that the
    header parser decodes them as _decode_bytes decodes parts."""

    def relabel(match: re.Match[str]) -> str:
        superset = _superset_label(match.group(1))
        return match.group(0) if superset is None else f"=?{superset}"

    return _ENCODED_WORD_LABEL.sub(relabel, value)


def _decode_8bit(data: bytes, hint: str | None) -> tuple[str, str]:
    """(text, codec) of raw 8-bit header bytes with no declared charset, by detection: see
    _FALLBACK_CODECS. `hint` is the charset the message declares for its text, if any."""
    candidates = ["utf-8"]
    if hint:
        codec = _codec_for(hint, None)
        # A Latin-1 label is tried as its superset Windows-1252, below, like any other
        # unlabelled Western text.
        if codec not in ("utf-8", "latin-1"):
            candidates.append(codec)
    for codec in (*candidates, *_FALLBACK_CODECS):
        try:
            return data.decode(codec), codec
        except (UnicodeDecodeError, LookupError):
            continue
    return data.decode("utf-8", "replace"), "utf-8"  # not reached: latin-1 decodes all


def _decode_bytes(data: bytes, charset: str | None, defects: list[str] | None) -> str:
    """Decode with the declared charset; unknown or lying charsets give replacement characters."""
    codec = _codec_for(charset, defects)
    try:
        try:
            return _clean(data.decode(codec))
        except UnicodeDecodeError:
            if defects is not None:
                _add_defect(defects, f"text is not valid {codec}")
            return _clean(data.decode(codec, "replace"))
    except Exception:
        if defects is not None:
            _add_defect(defects, f"charset {codec} failed to decode")
        return data.decode("utf-8", "replace")


def _decode_encoded_words(value: str, defects: list[str] | None) -> str:
    """RFC 2047 decoding in one linear pass, for values the stdlib parser could not read."""
    out: list[str] = []
    last = 0
    previous_was_word = False
    for match in _ENCODED_WORD.finditer(value):
        gap = value[last : match.start()]
        # RFC 2047 §6.2: white space between adjacent encoded-words is not displayed.
        if not (previous_was_word and gap.strip() == ""):
            out.append(gap)
        charset, encoding, encoded = match.groups()
        try:
            raw = encoded.encode("ascii")
            if encoding in "bB":
                decoded = base64.b64decode(raw + b"=" * (-len(raw) % 4))
            else:
                decoded = binascii.a2b_qp(raw, header=True)
        except (UnicodeError, ValueError):
            out.append(match.group(0))
            previous_was_word = False
        else:
            out.append(_decode_bytes(decoded, charset, defects))
            previous_was_word = True
        last = match.end()
    out.append(value[last:])
    return "".join(out)


def _message_ids(value: str) -> tuple[str, ...]:
    return tuple(_MSG_ID.findall(_clean(_unfold(value))))


def _as_written(value: str, limit: int) -> str:
    return _single_line(_unfold(value), limit)


# --- salvage: cheap recovery without the email parser ---------------------------------------


def salvage_message(
    raw: bytes, limits: ParseLimits, reason: str, defects: Sequence[str] = ()
) -> InboundMessage:
    """The essential fields read from the header block with regexes only; never raises.

    Cheap enough for the event loop (it looks at no more than max_header_bytes), it stands in
    for parse_message when a message hits a limit or its worker dies.
    """
    try:
        return _salvage(raw, limits, reason, list(defects))
    except Exception as exc:
        return _empty_message(reason, (*defects, f"salvage failed: {type(exc).__name__}"))


def _empty_message(reason: str | None, defects: Iterable[str]) -> InboundMessage:
    return InboundMessage(
        message_id=None,
        from_header=None,
        from_addresses=(),
        subject=None,
        date=None,
        in_reply_to=(),
        references=(),
        headers=(),
        content_type="text/plain",
        text="",
        html="",
        attachments=(),
        malformed=reason,
        defects=tuple(defects)[:_MAX_DEFECTS],
    )


def _salvage(raw: bytes, limits: ParseLimits, reason: str, defects: list[str]) -> InboundMessage:
    head = _normalise_line_endings(raw[: limits.max_header_bytes])
    end = head.find(b"\r\n\r\n")
    if head.startswith(b"\r\n"):
        block = b""
    elif end >= 0:
        block = head[: end + 2]
    else:
        block = head
    headers: list[tuple[str, str]] = []
    first: dict[str, str] = {}
    for field in _FIELD_SPLIT.split(block)[: limits.max_header_fields]:
        name_bytes, colon, value_bytes = field.partition(b":")
        name = _single_line(name_bytes.decode("utf-8", "replace"), _MAX_MESSAGE_ID)
        if not colon or not name:
            continue
        value = _decode_8bit(value_bytes.replace(b"\r\n", b""), None)[0].strip()
        value = value[: limits.max_field_bytes]
        first.setdefault(name.lower(), value)
        shown = value if name.lower() in _AS_WRITTEN else _decode_encoded_words(value, None)
        headers.append((name, _single_line(shown, limits.max_field_bytes)))
    from_value = first.get("from")
    addresses: list[tuple[str, str]] = []
    if from_value is not None:
        found = _ANGLE_ADDR.findall(from_value) or _BARE_ADDR.findall(from_value)
        addresses = [("", _single_line(a, _MAX_MESSAGE_ID)) for a in found]
    content_type = first.get("content-type", "").partition(";")[0].strip().lower()
    _add_defect(defects, "salvaged from the header block only")
    return InboundMessage(
        message_id=_optional(first.get("message-id"), _MAX_MESSAGE_ID),
        from_header=_optional_decoded(from_value, limits),
        from_addresses=tuple(addresses[: limits.max_addresses]),
        subject=_optional_decoded(first.get("subject"), limits),
        date=_optional(first.get("date"), limits.max_field_bytes),
        in_reply_to=_message_ids(first.get("in-reply-to", "")),
        references=_message_ids(first.get("references", "")),
        headers=tuple(headers),
        content_type=content_type if _MIME_TYPE.fullmatch(content_type) else "text/plain",
        text="",
        html="",
        attachments=(),
        malformed=reason,
        defects=tuple(defects),
    )


def _optional(value: str | None, limit: int) -> str | None:
    return None if value is None else _as_written(value, limit)


def _optional_decoded(value: str | None, limits: ParseLimits) -> str | None:
    if value is None:
        return None
    return _single_line(_decode_encoded_words(value, None), limits.max_field_bytes)


# --- parse ------------------------------------------------------------------------------------


def parse_message(raw: bytes, limits: ParseLimits) -> InboundMessage:
    """Pure function, runs INSIDE a worker process: MIME pre-scan first, then the stdlib parser.

    Never raises.
    """
    defects: list[str] = []
    try:
        return _parse(raw, limits, defects)
    except MemoryError:
        return salvage_message(raw, limits, Malformed.PARSE_MEMORY.value, defects)
    except RecursionError:
        # Nesting the pre-scan could not see (e.g. RFC 2231 continued boundaries).
        return salvage_message(raw, limits, Malformed.MIME_DEPTH.value, defects)
    except Exception as exc:
        _add_defect(defects, f"parser: {type(exc).__name__}")
        return salvage_message(raw, limits, Malformed.UNPARSEABLE.value, defects)


# The header classes _CachingHeaderRegistry made, by (header kind, base class): at most one
# per kind in the registry, whatever the names in the mail.
_HEADER_CLASSES: dict[tuple[type[object], type[object]], type[email.headerregistry.BaseHeader]] = {}


class _CachingHeaderRegistry(email.headerregistry.HeaderRegistry):
    """policy.default's header factory, remembering what it parsed for one message.

    HeaderRegistry builds a new class on every access and the feedparser alone parses each
    Content-Type four or five times; this halves the parse cost of a small message.
    """

    def __init__(self) -> None:
        super().__init__()
        self._parsed: dict[tuple[str, str], email.headerregistry.BaseHeader] = {}

    def __getitem__(self, name: str) -> type[email.headerregistry.BaseHeader]:
        # HeaderRegistry builds the same class anew (type(), ~10 us) for every header it
        # parses. The class is stateless, one per header kind: make each kind once.
        kind = self.registry.get(name.lower(), self.default_class)
        key = (kind, self.base_class)
        made = _HEADER_CLASSES.get(key)
        if made is None:
            made = _HEADER_CLASSES[key] = super().__getitem__(name)
        return made

    def __call__(self, name: str, value: Any) -> email.headerregistry.BaseHeader:
        if not isinstance(value, str):
            return super().__call__(name, value)
        key = (name.lower(), value)
        header = self._parsed.get(key)
        if header is None:
            header = self._parsed[key] = super().__call__(name, value)
        return header


def _parse(raw: bytes, limits: ParseLimits, defects: list[str]) -> InboundMessage:
    violation = scan_header_block(raw).violation
    if violation is not None:
        _add_defect(defects, violation)
    data = _normalise_line_endings(raw)
    scan = scan_header_block(data)
    reason = _prescan_headers(data, scan, limits) or _prescan_mime(data, limits)
    if reason is not None:
        return salvage_message(data, limits, reason.value, defects)
    # Per message, so nothing is shared between messages or kept at module level.
    policy = email.policy.default.clone(header_factory=_CachingHeaderRegistry())
    message: email.message.Message
    try:
        message = email.message_from_bytes(data, policy=policy)
    except (MemoryError, RecursionError):
        raise
    except Exception as exc:
        # A Content-Type the new parser chokes on (cpython#151857) fails the whole parse;
        # compat32 keeps headers as strings and still finds the structure.
        _add_defect(defects, f"parser: {type(exc).__name__}; reparsed with compat32")
        message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data)
    return _extract(message, policy, limits, defects)


def _extract(
    message: email.message.Message,
    policy: email.policy.EmailPolicy[email.message.EmailMessage],
    limits: ParseLimits,
    defects: list[str],
) -> InboundMessage:
    headers: list[tuple[str, str]] = []
    decoded_first: dict[str, str] = {}
    raw_first: dict[str, str] = {}
    from_addresses: tuple[tuple[str, str], ...] = ()
    hint: list[str | None] = []  # the message's text charset, looked up once if needed
    for name, raw_value in message.raw_items():
        key = name.lower()
        value = _header_text(name, raw_value, message, hint, defects)
        if key in raw_first and key in _UNIQUE_HEADERS:
            _add_defect(defects, f"duplicate {name} field")
        simple = _simple_from(value, limits) if key == "from" else None
        if simple is None:
            decoded, parsed = _decode_header(name, value, policy, limits, defects)
        else:
            decoded, parsed = simple[0], None
        headers.append((_single_line(name, _MAX_MESSAGE_ID), decoded))
        if key in raw_first:
            continue
        raw_first[key] = value
        decoded_first[key] = decoded
        if key == "from":
            if simple is None:
                from_addresses = _from_addresses(parsed, value, limits, defects)
            else:
                from_addresses = simple[1]
    content_type, text, html, attachments = _walk(message, limits, defects)
    try:
        report = extract_report(message)
    except MemoryError:
        raise
    except Exception as exc:
        _add_defect(defects, f"delivery report: {type(exc).__name__}")
        report = None
    try:
        readable = reply_text(text, html)
    except MemoryError:
        raise
    except Exception as exc:
        _add_defect(defects, f"readable text: {type(exc).__name__}")
        readable = text
    return InboundMessage(
        message_id=_optional(raw_first.get("message-id"), _MAX_MESSAGE_ID),
        from_header=decoded_first.get("from"),
        from_addresses=from_addresses,
        subject=decoded_first.get("subject"),
        date=_optional(raw_first.get("date"), limits.max_field_bytes),
        in_reply_to=_message_ids(raw_first.get("in-reply-to", "")),
        references=_message_ids(raw_first.get("references", "")),
        headers=tuple(headers),
        content_type=content_type,
        text=text,
        html=html,
        attachments=attachments,
        malformed=None,
        defects=tuple(defects),
        report=report,
        reply_text=readable,
    )


def _header_text(
    name: str,
    value: str,
    message: email.message.Message,
    hint: list[str | None],
    defects: list[str],
) -> str:
    """A raw header value with its raw 8-bit bytes decoded by detection (the parser hands
    them over as surrogate escapes, which would otherwise end as replacement characters)
    and its encoded words' subset labels relabelled (see _SUPERSET_CODECS)."""
    if not value.isascii():
        if not hint:
            hint.append(_charset_hint(message))
        try:
            # From bytes, the parser gives ASCII and surrogate escapes only; anything else
            # is already text.
            data = value.encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            return _clean(value)
        value, codec = _decode_8bit(data, hint[0])
        if codec != "utf-8":
            _add_defect(defects, f"header {name}: raw 8-bit text read as {codec}")
    if "=?" in value:
        value = _relabel_encoded_words(value)
    return value


def _charset_hint(message: email.message.Message) -> str | None:
    """The charset the message declares for its first text part that has one, if any."""
    try:
        for index, part in enumerate(message.walk()):
            if index >= _MAX_HINT_PARTS:
                break
            if part.get_content_maintype() == "text":
                charset = part.get_content_charset()
                if charset:
                    return str(charset)
    except MemoryError:
        raise
    except Exception:
        return None
    return None


def _decode_header(
    name: str,
    value: str,
    policy: email.policy.EmailPolicy[email.message.EmailMessage],
    limits: ParseLimits,
    defects: list[str],
) -> tuple[str, object]:
    """(decoded single-line value, the policy.default header object or None).

    Plain ASCII without encoded-words reads the same either way, so only the fields that need
    it (and From, for its addresses) go through the header parser: it costs ~0.1 ms a field.
    """
    key = name.lower()
    if key in _AS_WRITTEN:
        return _as_written(value, limits.max_field_bytes), None
    if key != "from" and value.isascii() and "=?" not in value:
        return _as_written(value, limits.max_field_bytes), None
    try:
        parsed = policy.header_fetch_parse(name, value)
        for defect in parsed.defects:
            _add_defect(defects, f"header {name}: {type(defect).__name__}")
        return _single_line(str(parsed), limits.max_field_bytes), parsed
    except MemoryError:
        raise
    except Exception as exc:
        # IndexError/ValueError/RecursionError from the new header parser (RELIABILITY.md
        # part 1): fall back to compat32's view, a plain string, and decode it ourselves.
        _add_defect(defects, f"header {name}: {type(exc).__name__}; read with compat32")
        fallback = _decode_encoded_words(_clean(_unfold(value)), defects)
        return _single_line(fallback, limits.max_field_bytes), None


def _simple_from(value: str, limits: ParseLimits) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """(decoded value, addresses) of a From value in a plainest form (see _SIMPLE_FROM), just
    as _decode_header and _from_addresses give them through policy.default; None otherwise."""
    match = _SIMPLE_FROM.fullmatch(value)
    if match is None:
        return None
    display_name, angle_addr, bare_addr = match.groups()
    addr_spec = angle_addr or bare_addr
    # headerregistry.Address.__str__: "name <addr-spec>", or the bare addr-spec without a name.
    rendered = f"{display_name} <{addr_spec}>" if display_name else addr_spec
    address = (
        _single_line(display_name or "", limits.max_field_bytes),
        _single_line(addr_spec, _MAX_MESSAGE_ID),
    )
    return _single_line(rendered, limits.max_field_bytes), (address,)[: limits.max_addresses]


def _from_addresses(
    parsed: object, value: str, limits: ParseLimits, defects: list[str]
) -> tuple[tuple[str, str], ...]:
    if isinstance(parsed, email.headerregistry.AddressHeader):
        try:
            return tuple(
                (
                    _single_line(address.display_name, limits.max_field_bytes),
                    _single_line(address.addr_spec, _MAX_MESSAGE_ID),
                )
                for address in parsed.addresses[: limits.max_addresses]
            )
        except MemoryError:
            raise
        except Exception as exc:
            _add_defect(defects, f"From addresses: {type(exc).__name__}; read with compat32")
    try:
        # compat32's address parser, on the raw value so encoded commas cannot split names.
        pairs = email.utils.getaddresses([_clean(_unfold(value))])
    except MemoryError:
        raise
    except Exception as exc:
        _add_defect(defects, f"From addresses: {type(exc).__name__}")
        return ()
    return tuple(
        (
            _single_line(_decode_encoded_words(display, defects), limits.max_field_bytes),
            _single_line(addr, _MAX_MESSAGE_ID),
        )
        for display, addr in pairs[: limits.max_addresses]
        if addr
    )


@dataclass(frozen=True)
class _PartInfo:
    content_type: str
    charset: str | None
    disposition: str | None
    filename: str | None


def _part_info(part: email.message.Message, limits: ParseLimits, defects: list[str]) -> _PartInfo:
    """The MIME parameters of one part, read with compat32 if the default policy fails."""
    try:
        return _read_part_info(part, limits)
    except MemoryError:
        raise
    except Exception as exc:
        _add_defect(defects, f"part headers: {type(exc).__name__}; read with compat32")
    view = email.message.Message(policy=email.policy.compat32)
    for name, value in part.raw_items():
        if name.lower() in ("content-type", "content-disposition"):
            view[name] = value
    try:
        return _read_part_info(view, limits)
    except MemoryError:
        raise
    except Exception as exc:
        # RFC 2045 §5.2: an unreadable Content-Type is taken as text/plain.
        _add_defect(defects, f"part headers: {type(exc).__name__}")
        return _PartInfo("text/plain", None, None, None)


def _read_part_info(part: email.message.Message, limits: ParseLimits) -> _PartInfo:
    ctype = part.get("content-type")
    cdisp = part.get("content-disposition")
    if isinstance(ctype, email.headerregistry.ContentTypeHeader | None) and isinstance(
        cdisp, email.headerregistry.ContentDispositionHeader | None
    ):
        # policy.default re-parses a header on every access, and get_content_type,
        # get_content_charset, get_filename... each access it: read each header once.
        content_type = part.get_default_type() if ctype is None else ctype.content_type
        params: dict[str, str] = {} if ctype is None else dict(ctype.params)
        disposition = None if cdisp is None else cdisp.content_disposition
        filename = None if cdisp is None else cdisp.params.get("filename")
        filename = filename or params.get("name")
        charset = params.get("charset")
    else:
        content_type = part.get_content_type()
        charset = part.get_content_charset()
        disposition = part.get_content_disposition()
        filename = part.get_filename()
    if not filename:
        filename = None
    else:
        # Many mailers put RFC 2047 words in filename="..." although RFC 2047 §5 forbids it.
        # Only bounded here: the attachment stage sanitises and needs to see what was sent.
        filename = _clean(_decode_encoded_words(str(filename), None))[: limits.max_field_bytes]
    content_type = str(content_type).lower()
    if not _MIME_TYPE.fullmatch(content_type):
        # RFC 2045 §5.2: an invalid Content-Type is taken as text/plain.
        content_type = "text/plain"
    return _PartInfo(
        content_type=content_type,
        charset=None if charset is None else str(charset),
        disposition=None if disposition is None else str(disposition).lower(),
        filename=filename,
    )


def _walk(
    message: email.message.Message, limits: ParseLimits, defects: list[str]
) -> tuple[str, str, str, tuple[Attachment, ...]]:
    """(top-level content type, body text, HTML, attachments), depth-first in document order,
    without recursion."""
    top_type = "text/plain"
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = []
    stack: list[email.message.Message] = [message]
    visited = 0
    while stack:
        part = stack.pop()
        visited += 1
        # The pre-scan bounds parts already; this keeps the walk bounded if it was fooled.
        if visited > 2 * limits.max_mime_parts + 2:
            _add_defect(defects, "part limit reached while walking")
            break
        for defect in part.defects:
            _add_defect(defects, type(defect).__name__)
        info = _part_info(part, limits, defects)
        if visited == 1:
            top_type = info.content_type
        payload = _payload(part, defects)
        if isinstance(payload, list):
            if info.content_type == "message/delivery-status":
                data = b"".join(_header_block_bytes(block) for block in payload)
                attachments.append(Attachment(info.filename, info.content_type, data))
            elif info.content_type.startswith("message/") and visited > 1:
                # A forwarded or returned message stays one attachment, headers included
                # (a bounce is matched to its ticket by them); its text is not our text.
                data = _message_bytes(payload, defects)
                attachments.append(Attachment(info.filename, info.content_type, data))
            else:
                subparts = (p for p in reversed(payload) if isinstance(p, email.message.Message))
                stack.extend(subparts)
            continue
        inline = info.disposition != "attachment"
        if info.content_type == "text/plain" and inline and text is None:
            text = _readable(_decode_bytes(payload, info.charset, defects))
        elif info.content_type == "text/html" and inline and html is None:
            html = _readable(_decode_bytes(payload, info.charset, defects))
        else:
            attachments.append(Attachment(info.filename, info.content_type, payload))
    return top_type, text or "", html or "", tuple(attachments)


def _readable(text: str) -> str:
    """Python's own line ending: the payload keeps the CRLF of the wire."""
    return text.replace("\r\n", "\n")


def _payload(part: email.message.Message, defects: list[str]) -> bytes | list[object]:
    """Decoded payload bytes of a leaf part, or the list of sub-messages of a container."""
    try:
        if part.is_multipart():
            subparts = part.get_payload()
            return list(subparts) if isinstance(subparts, list) else []
        data = part.get_payload(decode=True)
    except MemoryError:
        raise
    except Exception as exc:
        _add_defect(defects, f"payload: {type(exc).__name__}")
        return b""
    return data if isinstance(data, bytes) else b""


def _message_bytes(payload: list[object], defects: list[str]) -> bytes:
    """An embedded message as bytes again. compat32 with no line limit rewrites nothing and
    avoids the new folding code (cpython#138223: an infinite loop); depth is pre-scanned."""
    buffer = io.BytesIO()
    policy = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)
    try:
        for message in payload:
            if isinstance(message, email.message.Message):
                email.generator.BytesGenerator(buffer, mangle_from_=False, policy=policy).flatten(
                    message
                )
    except MemoryError:
        raise
    except Exception as exc:
        _add_defect(defects, f"embedded message: {type(exc).__name__}; headers only")
        return b"".join(_header_block_bytes(message) for message in payload)
    return buffer.getvalue()


def _header_block_bytes(block: object) -> bytes:
    if not isinstance(block, email.message.Message):
        return b""
    lines = [f"{name}: {_unfold(value)}\r\n" for name, value in block.raw_items()]
    return ("".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
