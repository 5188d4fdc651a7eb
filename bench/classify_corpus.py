"""Measure the [classify] stage on sisimai's set-of-emails: how many bounces, auto-replies and
look-alikes it classifies as their folder says.

    python bench/classify_corpus.py [DIR] [--verbose] [--strict-envelope]

DIR defaults to ../shared/mail/sisimai-set-of-emails next to the repository. Each file is
parsed the way the intake does (gateway.inbound.parse_message, or the stdlib parser if that is
missing), then extract_report + classify run with the Return-Path header as the envelope
sender ("" - the null sender - when there is none; --strict-envelope uses a non-null stand-in
instead, so that no verdict leans on an envelope the file does not show). Nothing is copied.
"""

from __future__ import annotations

import argparse
import email
import email.message
import email.policy
import email.utils
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.bounce import DeliveryReport, extract_report  # noqa: E402
from gateway.classify import (  # noqa: E402
    Classification,
    Kind,
    OwnIdentity,
    classify,
)

DEFAULT_DIR = ROOT.parent / "shared" / "mail" / "sisimai-set-of-emails"
# Nothing in the corpus was sent by us: an identity that matches none of it.
OWN = OwnIdentity(hostname="gateway.example.org", addresses=("support@example.org",))
UNKNOWN_SENDER = "unknown-sender@example.invalid"

# Category -> the kinds that count as right for it.
EXPECTED: dict[str, frozenset[Kind]] = {
    "bounce": frozenset({Kind.BOUNCE}),
    "auto-reply": frozenset({Kind.AUTO_REPLY}),
    "not-bounce": frozenset({Kind.NORMAL, Kind.AUTO_REPLY, Kind.NOTICE}),
    "delivery-notice": frozenset({Kind.NOTICE}),
    "delay-warning": frozenset({Kind.NOTICE}),
    "feedback-report": frozenset({Kind.AUTO_REPLY}),
    "err-sample": frozenset({Kind.BOUNCE}),
    "to-be-debugged": frozenset({Kind.BOUNCE}),
}
_RETURN_PATH = re.compile(rb"^Return-Path:[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
# sisimai counts a delay warning as a (soft) bounce; our contract calls a report whose
# recipients are only delayed a notice. A file in a bounce folder is a delay warning when its
# bytes say so in the words these MTAs use (each file checked by reading it) and no recipient
# failed. This oracle reads the raw bytes and shares no code with gateway.classify.
_DELAY_WORDS = re.compile(
    rb"^Action:[ \t]*delayed|WARNING MESSAGE ONLY|THIS IS A WARNING ONLY|has not yet been"
    rb" delivered|is delayed for more than|Warning--Could not send|Warning: could not send",
    re.IGNORECASE | re.MULTILINE,
)
_FAILED_ACTION = re.compile(rb"^Action:[ \t]*(?:failed|expired)", re.IGNORECASE | re.MULTILINE)


@dataclass
class Outcome:
    name: str
    kind: Kind
    reasons: tuple[str, ...]


@dataclass
class CategoryResult:
    category: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.outcomes)

    @property
    def misses(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind not in EXPECTED[self.category]]

    @property
    def hits(self) -> int:
        return self.count - len(self.misses)

    @property
    def percent(self) -> float:
        return 100.0 * self.hits / self.count if self.count else 100.0

    def share(self, kind: Kind) -> float:
        found = sum(1 for o in self.outcomes if o.kind == kind)
        return 100.0 * found / self.count if self.count else 0.0


def categorise(
    path: Path, root: Path, expected: dict[str, set[str]], raw: bytes = b""
) -> str | None:
    """The category a corpus file belongs to (SOURCE.json path_expectations), or None."""
    rel = path.relative_to(root)
    parts = rel.parts
    name = path.name
    if parts[0] == "to-be-debugged-because":
        return "to-be-debugged"
    if parts[0] != "maildir" or len(parts) != 3:
        return None
    folder = parts[1]
    if folder == "not":
        return "not-bounce"
    if folder == "err":
        return "err-sample"
    if name.startswith("rfc3834-"):
        return "auto-reply"
    if name.startswith("arf-"):
        return "feedback-report"
    if name.startswith(("lhost-", "rhost-", "rfc3464-")):
        # expected.sisimai.json lists bsd/ files; dos/ and mac/ hold copies under the same name.
        reasons = expected.get(name, set())
        if reasons and reasons <= {"delivered"}:
            return "delivery-notice"
        if reasons and reasons <= {"feedback"}:
            return "feedback-report"
        if reasons and reasons <= {"vacation"}:
            return "auto-reply"
        if _DELAY_WORDS.search(raw) and not _FAILED_ACTION.search(raw):
            return "delay-warning"
        return "bounce"
    return None


def load_expected(root: Path) -> dict[str, set[str]]:
    try:
        data = json.loads((root / "expected.sisimai.json").read_text())
    except (OSError, ValueError):
        return {}
    found: dict[str, set[str]] = {}
    for key, value in data.get("expected", {}).items():
        found[Path(key).name] = {r.get("reason", "") for r in value.get("recipients", [])}
    return found


def envelope_sender(raw: bytes, strict: bool) -> str:
    # Only the message's own header block: a returned message further down has its own.
    head = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n", 1)[0]
    match = _RETURN_PATH.search(head)
    if match is None:
        return UNKNOWN_SENDER if strict else ""
    return match.group(1).decode("utf-8", "replace").strip()


def classify_bytes(raw: bytes, mail_from: str) -> tuple[Classification, DeliveryReport | None]:
    """Parse as the intake does, then classify (extract_report runs inside the parse)."""
    try:
        from gateway.inbound import ParseLimits, parse_message
    except ImportError:
        return _classify_stdlib(_stdlib_message(raw), mail_from)
    parsed = parse_message(raw, ParseLimits())
    if hasattr(parsed, "report"):
        report: DeliveryReport | None = parsed.report
    else:
        # An InboundMessage from before the report field: extract it here, as the worker would.
        report = extract_report(_stdlib_message(raw))
    result = classify(
        headers=parsed.headers,
        subject=parsed.subject,
        from_addresses=parsed.from_addresses,
        mail_from=mail_from,
        content_type=parsed.content_type,
        report=report,
        own=OWN,
        text=parsed.text,
    )
    return result, report


def parser_used() -> str:
    try:
        from gateway.inbound import parse_message  # noqa: F401
    except ImportError:
        return "the stdlib parser (gateway.inbound did not import)"
    return "gateway.inbound.parse_message"


def _stdlib_message(raw: bytes) -> email.message.Message:
    # The intake hands the parser CRLF lines (inbound normalises bare CR and LF first).
    data = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    try:
        return email.message_from_bytes(data, policy=email.policy.default)
    except Exception:
        return email.message.EmailMessage()


def _classify_stdlib(
    message: email.message.Message, mail_from: str
) -> tuple[Classification, DeliveryReport | None]:
    headers = [(k, " ".join(str(v).split())) for k, v in message.raw_items()]
    froms: list[tuple[str, str]] = []
    try:
        froms = email.utils.getaddresses(message.get_all("from", []))
    except Exception:
        pass
    text = ""
    try:
        if isinstance(message, email.message.EmailMessage):
            body = message.get_body(preferencelist=("plain",))
            if isinstance(body, email.message.EmailMessage):
                text = str(body.get_content())
    except Exception:
        pass
    report = extract_report(message)
    result = classify(
        headers=headers,
        subject=str(message.get("subject", "") or ""),
        from_addresses=froms,
        mail_from=mail_from,
        content_type=message.get_content_type(),
        report=report,
        own=OWN,
        text=text,
    )
    return result, report


def evaluate(root: Path, strict_envelope: bool = False) -> dict[str, CategoryResult]:
    expected = load_expected(root)
    results = {name: CategoryResult(name) for name in EXPECTED}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix != ".eml":
            continue
        raw = path.read_bytes()
        category = categorise(path, root, expected, raw)
        if category is None:
            continue
        result, _report = classify_bytes(raw, envelope_sender(raw, strict_envelope))
        rel = str(path.relative_to(root))
        results[category].outcomes.append(Outcome(rel, result.kind, result.reasons))
    return results


def report_lines(results: dict[str, CategoryResult], verbose: bool) -> list[str]:
    lines = [f"{'category':<16} {'files':>5} {'as expected':>11} {'%':>6}   also"]
    for result in results.values():
        extra = ""
        if result.category == "bounce":
            notice = result.share(Kind.NOTICE)
            extra = f"notice {notice:.1f}% (bounce or notice {result.percent + notice:.1f}%)"
        elif result.category == "delay-warning":
            extra = f"classified bounce {result.share(Kind.BOUNCE):.1f}%"
        elif result.category == "not-bounce":
            extra = f"classified bounce {result.share(Kind.BOUNCE):.1f}%"
        lines.append(
            f"{result.category:<16} {result.count:>5} {result.hits:>11} {result.percent:>5.1f}%"
            f"   {extra}"
        )
        if verbose:
            for miss in result.misses:
                lines.append(f"    miss {miss.name}: {miss.kind} {','.join(miss.reasons)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--verbose", "-v", action="store_true", help="list every miss")
    parser.add_argument(
        "--strict-envelope",
        action="store_true",
        help="no Return-Path means an unknown (non-null) sender, not the null sender",
    )
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"no corpus at {args.dir}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = evaluate(args.dir, strict_envelope=args.strict_envelope)
    for line in report_lines(results, args.verbose):
        print(line)
    elapsed = time.perf_counter() - started
    files = sum(r.count for r in results.values())
    print(f"{files} files in {elapsed:.1f}s, parsed by {parser_used()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
