"""[urgency] Whether a client's mail is urgent, as an ordered table of rules (issue 12, item 1).

Like `policy.py` and `classify.py`: each rule is a small predicate named after what hits,
every rule is asked, every hit is kept with its reason, and the mail is urgent when any rule
hits. It is pure: no I/O, no config, no clock; the caller builds `UrgencyFacts` and passes
the admins' extra phrases (`[urgency] phrases`, later) through `phrase_table`.

What counts, and what never does:

- the sender's own marks: `Importance: high` and `Priority: urgent` (RFC 2156 section 5.3,
  the fields RFC 4021 registers), `X-Priority: 1` (Outlook and Thunderbird: 1 is highest);
- phrases meaning an outage or a security incident, or the client's "urgent"/"emergency",
  in the subject or the first lines (`FIRST_LINES`) of the readable text. The built-in
  list is `PHRASES`, in English (the one place it lives); a match does not count when the
  clause it is in says it is negated ("not urgent"), hypothetical ("if our site is
  hacked"), past ("when the site was down last year") or planned ("planned outage"), when
  the word is quoted as a name (the "urgent" label) or names a thing ("the urgent folder",
  "emergency contact");
- the readable text is the reply text (`readable.reply_text`, what the pipeline stores as
  the message text): quoted history and the signature are already gone. Lines that still
  start with ">" are skipped, and a reply's subject ("Re: Site down") is the history of
  the thread, not news: only a subject without a reply prefix counts (a forward's does);
- automatic mail (an auto-reply, a delivery notice, a bounce, our own mail) is never
  urgent, whatever it carries: out-of-office replies copy the subject and importance of
  the mail they answer.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .classify import Kind
from .phrasescan import may_match

# The text rules read the subject and this many non-blank lines at the start of the readable
# text, each cut to _MAX_LINE characters: an outage is said at the top, and a long body
# (a pasted log, a newsletter) must neither cost time nor match by chance.
FIRST_LINES = 6
_MAX_LINE = 1000
_MAX_SUBJECT = 1000

# --- facts and verdict ---------------------------------------------------------------------


@dataclass(frozen=True)
class UrgencyFacts:
    """What the rules look at; build it with `UrgencyFacts.of`."""

    subject: str
    text: str  # the readable text, quotes and signature stripped (readable.reply_text)
    importance: tuple[str, ...]  # Importance values, stripped, lower-case
    x_priority: tuple[str, ...]  # X-Priority values, stripped, lower-case
    priority: tuple[str, ...]  # Priority values, stripped, lower-case
    kind: Kind  # what classify made of it

    @classmethod
    def of(
        cls,
        subject: str | None,
        text: str,
        headers: Iterable[tuple[str, str]],
        kind: Kind,
    ) -> UrgencyFacts:
        """subject: decoded (InboundMessage.subject); text: InboundMessage.reply_text or the
        stored message text; headers: the top-level (name, value) pairs (only the three
        priority fields are kept)."""
        wanted: dict[str, list[str]] = {"importance": [], "x-priority": [], "priority": []}
        for name, value in headers:
            values = wanted.get(str(name).strip().lower())
            if values is not None:
                values.append(str(value).strip().lower()[:100])
        return cls(
            subject=(subject or "")[:_MAX_SUBJECT],
            text=text,
            importance=tuple(wanted["importance"]),
            x_priority=tuple(wanted["x-priority"]),
            priority=tuple(wanted["priority"]),
            kind=kind,
        )


@dataclass(frozen=True)
class Hit:
    rule: str  # the rule's name
    reason: str  # kebab-case, e.g. "header:importance-high", "subject:site-down"


@dataclass(frozen=True)
class Verdict:
    urgent: bool
    hits: tuple[Hit, ...]  # every rule that hit, in table order
    # Why nothing was asked: "automatic:<kind>" for automatic mail, else None.
    skipped: str | None = None

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(h.reason for h in self.hits)


# --- phrases -------------------------------------------------------------------------------

# Things whose being down, offline or unreachable is an outage (and host names).
_THING = (
    r"(?:(?:web\s?)?site|website|web\s?shop|(?:online\s)?(?:shop|store)|servers?|apps?"
    r"|applications?|services?|portal|checkout|home\s?page|pages|api|database|db|e-?mail"
    r"|mail|systems?|platform|everything|intranet|back-?end|front-?end|cms|wordpress|vpn"
    r"|hosting|network|[a-z0-9-]+(?:\.[a-z0-9-]+)+)"
)
_STATE = r"(?:down|offline|unreachable|unavailable|inaccessible)"
# "is down", "has been down since", "went down", "Site down": now, not "was down".
_NOW = (
    r"(?:(?:is|are|'s|has\s+been|have\s+been|has\s+gone|have\s+gone|went|goes|seems(?:\s+to\s+be)?"
    r"|appears(?:\s+to\s+be)?|keeps\s+going)\s+)?(?:(?:still|completely|totally|all|again)\s+)?"
)
_5XX = r"50[0-4]"


@dataclass(frozen=True)
class Phrase:
    rule: str  # the rule that reports it
    label: str  # kebab-case, in the reason
    pattern: str  # a regex, matched case-insensitively on word boundaries


# The built-in phrases, in table order: the one place they live.
PHRASES: tuple[Phrase, ...] = (
    Phrase("outage", "site-down", rf"{_THING}\s+{_NOW}{_STATE}"),
    Phrase(
        "outage", "not-loading", r"(?:not|isn't|aren't|no\s+longer|stopped)\s+(?:be\s+)?loading"
    ),
    Phrase("outage", "not-loading", r"(?:won't|will\s+not|doesn't|does\s+not|can't|cannot)\s+load"),
    Phrase("outage", "outage", r"outages?"),
    Phrase("server_error", "http-5xx", rf"(?:http|error|status|code)\s*(?:code\s*)?[:#]?\s*{_5XX}"),
    Phrase(
        "server_error",
        "http-5xx",
        rf"{_5XX}s?\s*(?:-\s*)?(?:errors?|internal\s+server|bad\s+gateway|service\s+unavailable"
        r"|gateway\s+time-?out|status|response)",
    ),
    Phrase("server_error", "http-5xx", rf"getting\s+{_5XX}s"),
    Phrase(
        "server_error",
        "http-5xx",
        r"internal\s+server\s+error|bad\s+gateway|service\s+(?:temporarily\s+)?unavailable"
        r"|gateway\s+time-?out",
    ),
    # "hacked", but not "hacked together a script", "hacked up", "hacked around it".
    Phrase("security_incident", "hacked", r"hacked(?!\s+(?:together|up|around|on|away|at)\b)"),
    Phrase("security_incident", "defaced", r"defaced|defacement"),
    Phrase("security_incident", "data-breach", r"(?:data|security)\s+breach(?:es)?"),
    Phrase(
        "security_incident",
        "compromised",
        r"(?:been|was|were|is|are|got|get)\s+compromised",
    ),
    Phrase("security_incident", "malware", r"malware|ransomware"),
    Phrase("security_incident", "ddos", r"d?dos\s+attack|ddos(?:ed)?"),
    Phrase("urgency_word", "urgent", r"urgent(?:ly)?"),
    Phrase("urgency_word", "emergency", r"emergenc(?:y|ies)"),
)

# Before a match, in its clause: a negation ("not urgent", "no emergency", "non-urgent")
# within three words, or a conditional or preventive frame anywhere ("if our site is
# hacked", "to avoid a data breach", "how can we avoid the site going down").
_NEGATED = re.compile(
    r"\b(?:not|no|non|never|nothing|without|hardly|isn't|aren't|wasn't|don't|doesn't|nor)"
    r"[\s-]+(?:[\w'-]+[\s-]+){0,2}$",
    re.IGNORECASE,
)
_HYPOTHETICAL = re.compile(
    r"\b(?:if|in\s+case|whether|what\s+happens|avoid|avoiding|prevent|preventing|protect"
    r"|against|sense\s+of|should\s+(?:the|our|we))\b",
    re.IGNORECASE,
)
# Anywhere in the clause: it is about the past, or about planned work.
_PAST_OR_PLANNED = re.compile(
    r"\b(?:last\s+(?:year|month|week|time|summer|winter|spring|autumn|fall)"
    r"|(?:years?|months?|weeks?)\s+ago|back\s+in"
    r"|in\s+(?:19|20)\d\d|previously|in\s+the\s+past|post-?mortem|planned|scheduled"
    r"|maintenance\s+window|announced)\b",
    re.IGNORECASE,
)
# After a match: the word names a thing ("the urgent folder", "emergency contact"), or the
# word is quoted as a name ("the "urgent" label").
_NAMES_A_THING = re.compile(
    r"[\s-]*(?:folder|label|tag|category|flag|filter|rule|column|queue|mailbox|contact|number"
    r"|line|phone|exit|drill|kit|plan|procedure|template|report|page\s+design)s?\b",
    re.IGNORECASE,
)
_QUOTES = "\"'\u2018\u2019\u201c\u201d\u00ab\u00bb"
# A clause ends at a sentence's end, a semicolon, a colon or a comma, or a line break.
_CLAUSE_END = re.compile(r"[.!?;:,\n(\[]|\s-\s")

# A reply's subject carries the thread's history (RFC 5322 section 3.6.5 "Re:", and the
# prefixes of localised clients); a forward's is counted, it is often the news itself.
_REPLY_PREFIX = re.compile(
    r"^\s*(?:\[[^\]]{0,40}\]\s*)?(?:re|aw|sv|vs|antw|odp|r|res|ynt|\u0432\u0456\u0434\u043f"
    r"|\u043e\u0442\u0432)\s*(?:\[\d+\])?\s*:",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class PhraseTable:
    """PHRASES and the admins' extra phrases, compiled once (see `phrase_table`)."""

    entries: tuple[tuple[str, str, re.Pattern[str]], ...]  # (rule, label, compiled)
    extra: tuple[str, ...]


def _compile(pattern: str) -> re.Pattern[str]:
    # Whole words only: "urgent" is not in "insurgent", "500" is not in "1500".
    return re.compile(rf"(?<![\w-])(?:{pattern})(?![\w-])", re.IGNORECASE)


@functools.lru_cache(maxsize=16)
def phrase_table(extra: tuple[str, ...] = ()) -> PhraseTable:
    """The built-in PHRASES and `extra` (plain words or phrases, not regexes: what admins
    write in `[urgency] phrases`; blank ones are ignored), compiled. Cached per `extra`."""
    entries = [(p.rule, p.label, _compile(p.pattern)) for p in PHRASES]
    cleaned = tuple(dict.fromkeys(" ".join(e.split()).lower() for e in extra if e.strip()))
    for phrase in cleaned:
        words = r"\s+".join(re.escape(w) for w in phrase.split())
        label = re.sub(r"[^\w]+", "-", phrase).strip("-")[:40] or "phrase"
        entries.append(("extra_phrase", label, _compile(words)))
    return PhraseTable(tuple(entries), cleaned)


DEFAULT_TABLE = phrase_table()


def _counts(line: str, match: re.Match[str]) -> bool:
    """Whether a phrase's match means what it says, judged on its clause."""
    start, end = match.span()
    clause_start = max((m.end() for m in _CLAUSE_END.finditer(line, 0, start)), default=0)
    tail = _CLAUSE_END.search(line, end)
    clause_end = tail.start() if tail else len(line)
    before, after = line[clause_start:start], line[end:clause_end]
    if _NEGATED.search(before) or _HYPOTHETICAL.search(before):
        return False
    if _PAST_OR_PLANNED.search(line[clause_start:clause_end]):
        return False
    if _NAMES_A_THING.match(after):
        return False
    quoted_before = start > 0 and line[start - 1] in _QUOTES
    quoted_after = end < len(line) and line[end] in _QUOTES
    return not (quoted_before and quoted_after)


def _first_lines(text: str) -> list[str]:
    lines: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        # A quote the stripper left (an interleaved answer's context) is not news.
        if not stripped or stripped.startswith(">"):
            continue
        lines.append(stripped[:_MAX_LINE])
        if len(lines) >= FIRST_LINES:
            break
    return lines


def _phrase_hits(facts: UrgencyFacts, table: PhraseTable) -> list[Hit]:
    places: list[tuple[str, str]] = []
    if facts.subject and not _REPLY_PREFIX.match(facts.subject):
        places.append(("subject", " ".join(facts.subject.split())))
    places.extend(("text", line) for line in _first_lines(facts.text))
    hits: dict[tuple[str, str], Hit] = {}
    lowered = "\n".join(line for _, line in places).lower()
    for rule, label, pattern in table.entries:
        if not may_match(pattern, lowered):
            continue
        for where, line in places:
            if any(_counts(line, m) for m in pattern.finditer(line)):
                key = (rule, f"{where}:{label}")
                hits.setdefault(key, Hit(rule, f"{where}:{label}"))
    return list(hits.values())


# --- header rules --------------------------------------------------------------------------

HeaderRule = Callable[[UrgencyFacts], str | None]


def importance_high(facts: UrgencyFacts) -> str | None:
    # RFC 2156 section 5.3: Importance is "low", "normal" or "high".
    return "header:importance-high" if "high" in facts.importance else None


def x_priority_highest(facts: UrgencyFacts) -> str | None:
    # Not standardised: Outlook and Thunderbird write "1 (Highest)" ... "5 (Lowest)".
    if any(re.match(r"1(?!\d)", v) for v in facts.x_priority):
        return "header:x-priority-1"
    return None


def priority_urgent(facts: UrgencyFacts) -> str | None:
    # RFC 2156 section 5.3: Priority is "normal", "urgent" or "non-urgent".
    return "header:priority-urgent" if "urgent" in facts.priority else None


# The table, in order. The phrase rules (outage, server_error, security_incident,
# urgency_word, extra_phrase) come after the headers, one hit per phrase label and place.
HEADER_RULES: tuple[HeaderRule, ...] = (importance_high, x_priority_highest, priority_urgent)
PHRASE_RULES = ("outage", "server_error", "security_incident", "urgency_word", "extra_phrase")


def assess(facts: UrgencyFacts, table: PhraseTable = DEFAULT_TABLE) -> Verdict:
    """The urgency verdict of one message: every rule asked, every hit kept."""
    if facts.kind is not Kind.NORMAL:
        # An auto-reply copies what it answers (subject, importance); a bounce quotes it.
        return Verdict(False, (), skipped=f"automatic:{facts.kind.value}")
    hits = [Hit(rule.__name__, reason) for rule in HEADER_RULES if (reason := rule(facts))]
    hits.extend(_phrase_hits(facts, table))
    return Verdict(bool(hits), tuple(hits))
