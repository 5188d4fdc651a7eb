"""How much of talon's corpus gateway's quote and signature stripping gets right.

Usage: bench/talon_corpus.py [DIR] [--verbose] [--candidate NAME]

DIR defaults to ../shared/mail/talon beside the repository. For each entry of
DIR/expected.talon.json that has an expectation, the body is extracted the way gateway
reads a message (an .eml through the stdlib parser with policy.default, text/plain
preferred, else its HTML through html_to_text; an .html fragment through html_to_text; a
body fragment as it is), run through strip_reply, and compared with the expected reply.

How a result is compared (documented here because the figure depends on it):
- Both sides are normalised by collapsing every run of whitespace (spaces, tabs, line
  breaks, no-break spaces) to one space and trimming the ends. Upstream talon compares
  HTML results with all whitespace removed and plain results exactly; this sits between.
- talon's quotation tests expect the reply *with* its signature ("Hello\\n\\nSent from my
  iPhone", "Thanks,\\nAlex"), because talon strips signatures in a separate step, while
  gateway's contract strips both. For those entries a result also matches when it equals
  the expected text with its trailing signature removed by the rules in
  `_without_signature` below, written independently of gateway's code: a "-- " or "--"
  line and what follows, a trailing "Sent from/with/via ..." line, or a trailing sign-off
  line ("Thanks,", "Regards", ...) with at most two short lines after it.
- Signature fixtures (signature/emails/stripped/*_body) expect the body minus talon's
  signature, computed as upstream does: body.strip() minus len(signature) characters.
- reply-quotations-share-block.eml: upstream passes the whole file as plain text and
  checks that the result is not empty and has no "From"; we check the same on the body,
  which is what gateway strips.
- Entries whose check is "none" (signature training samples) are skipped.

--candidate runs a library alone instead of gateway's strip_reply, to compare them on the
same inputs: mail-parser-reply, email-reply-parser, quotequail, talon (if installed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.readable import html_to_text, strip_reply  # noqa: E402

DEFAULT_DIR = ROOT.parent / "shared" / "mail" / "talon"

_WS = re.compile(r"\s+")
_SIG_DELIMITER = re.compile(r"^-- ?$", re.MULTILINE)
_SENT_FROM = re.compile(r"\n\s*(?:Sent|Get|Envoy\u00e9) (?:from|with|via|de) [^\n]*\s*$", re.I)
_SIGN_OFF = re.compile(
    r"\n\s*(?:thanks|thank you|regards|best regards|kind regards|best|cheers)[,!.]?"
    r"(?:\s*\n[^\n]{1,40}){0,2}\s*$",
    re.I,
)


def normalise(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _without_signature(expected: str) -> str:
    """The expected reply without a trailing signature (see the module docstring)."""
    text = expected
    delimiter = _SIG_DELIMITER.search(text)
    if delimiter and delimiter.start() > 0:
        text = text[: delimiter.start()]
    text = _SENT_FROM.sub("", text)
    return _SIGN_OFF.sub("", text)


def eml_body(raw: bytes) -> str:
    """The text gateway would strip: text/plain preferred, else the HTML as text."""
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    for preference in ("plain", "html"):
        part = msg.get_body(preferencelist=(preference,))
        if part is None:
            continue
        try:
            content = part.get_content()
        except (LookupError, UnicodeError):
            # An unknown or lying charset: replacement characters, never a crash.
            payload = part.get_payload(decode=True)
            content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
        if not isinstance(content, str):
            continue
        return content if preference == "plain" else html_to_text(content)
    return ""


@dataclass(frozen=True)
class Case:
    name: str
    body: str
    expected: str | None  # None: only "non-empty, no forbidden words" is checked
    forbidden: tuple[str, ...] = ()
    signature_kept: bool = False  # talon's expectation keeps the signature


def load_cases(directory: Path) -> tuple[list[Case], list[str]]:
    data = json.loads((directory / "expected.talon.json").read_text(encoding="utf-8"))
    cases: list[Case] = []
    skipped: list[str] = []
    for name, entry in sorted(data["expected"].items()):
        path = directory / name
        kind = entry.get("kind")
        if str(entry.get("check", "")).startswith("none") or not path.is_file():
            skipped.append(name)
            continue
        if kind in ("rfc5322", "rfc5322-as-plain-text"):
            body = eml_body(path.read_bytes())
        elif kind == "html-fragment":
            body = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        else:
            body = path.read_text(encoding="utf-8", errors="replace")
        if "signature" in entry:
            stripped = body.strip()
            signature = entry["signature"]
            expected = stripped[: len(stripped) - len(signature)] if signature else stripped
            cases.append(Case(name, body, expected))
        elif "reply_text" in entry:
            cases.append(Case(name, body, entry["reply_text"], signature_kept=True))
        elif entry.get("reply_nonempty"):
            cases.append(Case(name, body, None, tuple(entry.get("reply_not_contains", ()))))
        else:
            skipped.append(name)
    return cases, skipped


def match_kind(case: Case, result: str) -> str | None:
    """How the result matched ("exact", "checks" or "minus signature"), or None."""
    got = normalise(result)
    if case.expected is None:
        passed = bool(got) and not any(word in result for word in case.forbidden)
        return "checks" if passed else None
    if got == normalise(case.expected):
        return "exact"
    if case.signature_kept and got == normalise(_without_signature(case.expected)):
        return "minus signature"
    return None


def is_match(case: Case, result: str) -> bool:
    return match_kind(case, result) is not None


def candidate(name: str) -> Callable[[str], str]:
    """A library's own reply extraction, for comparison (imported only when asked for)."""
    if name == "gateway":
        return strip_reply
    if name == "mail-parser-reply":
        from mailparser_reply import EmailReplyParser  # type: ignore[import-untyped]

        parser = EmailReplyParser(languages=["en", "de", "fr", "es", "nl"])

        def run_mpr(text: str) -> str:
            return str(parser.read(text).replies[0].body)

        return run_mpr
    if name == "email-reply-parser":
        from email_reply_parser import EmailReplyParser as Erp  # type: ignore[import-untyped]

        return lambda text: str(Erp.parse_reply(text))
    if name == "quotequail":
        import quotequail  # type: ignore[import-untyped]

        def run_quotequail(text: str) -> str:
            # unwrap() finds ">" blocks and header blocks as well as "On ... wrote:" lines;
            # the reply is the text above what it found.
            found = quotequail.unwrap(text)
            return text if found is None else str(found.get("text_top", ""))

        return run_quotequail
    if name == "talon":
        from talon import quotations  # type: ignore[import-not-found]

        return lambda text: str(quotations.extract_from_plain(text))
    raise SystemExit(f"unknown candidate {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--verbose", "-v", action="store_true", help="print every miss")
    parser.add_argument("--candidate", default="gateway", help="library to run instead")
    args = parser.parse_args(argv)
    if not (args.directory / "expected.talon.json").is_file():
        print(f"no expected.talon.json in {args.directory}", file=sys.stderr)
        return 2
    try:
        strip = candidate(args.candidate)
    except ImportError as exc:
        print(
            f"{args.candidate} is not installed ({exc}); pip install it to compare", file=sys.stderr
        )
        return 2
    cases, skipped = load_cases(args.directory)
    matched = 0
    kinds: dict[str, int] = {}
    for case in cases:
        try:
            result = strip(case.body)
        except Exception as exc:  # a candidate library may raise; that is a miss
            result = f"<raised {type(exc).__name__}: {exc}>"
        kind = match_kind(case, result)
        if kind is not None:
            matched += 1
            kinds[kind] = kinds.get(kind, 0) + 1
        elif args.verbose:
            want = "non-empty, without " + repr(case.forbidden) if case.expected is None else ""
            print(f"MISS {case.name}\n  expected: {want or repr(case.expected)}")
            print(f"  got:      {result!r}")
    total = len(cases)
    percent = 100.0 * matched / total if total else 0.0
    how = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    print(
        f"{args.candidate}: {matched}/{total} matched ({percent:.1f}%; {how}), "
        f"{len(skipped)} skipped (no expectation)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
