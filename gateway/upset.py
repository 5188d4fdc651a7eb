"""[upset] Whether a client's message shows an upset client, as an ordered table of rules.

Issue 12 item 5. Each rule is a small predicate named after what hits; every rule is asked,
each hit is kept as a reason with a weight, and the weights add up to a score: the message
is upset when the score reaches `threshold`. Rule-based on purpose (no remote service): every
reason can be shown to staff as it is.

What the rules look at (`UpsetFacts`) is the message's subject and its readable reply text,
i.e. `readable.reply_text` (what the pipeline stores as `ParsedMessage.reply_text`): quoted
history and the signature are already gone, so words in them never count; a reply's subject
("Re: ...") is the thread's, so it does not count either. Automatic mail
(auto-replies, bounces, notices, loops: `classify.Kind` other than NORMAL) never counts at
all, not even the chasing or overdue facts, since no client wrote it. Pure, no I/O; the cost
is linear in the text, of which only the first `SCAN_LIMIT` characters are read.

Weights and the default threshold (3) are chosen so that one signal alone marks a message
upset only when it says so outright (a strong complaint phrase), and the weaker signals
(a milder phrase, shouting, chasing, an overdue promise) need a second one:

    rule                 weight  hits when
    complaint_phrase     3 each  a strong phrase: "unacceptable", "disappointed",
                                 "complaint", "cancel the contract", ... or an extra
                                 phrase passed by the caller ([upset] phrases, later)
    frustration_phrase   2 each  a milder phrase: "escalate", "still waiting",
                                 "third time", "how many times", ...
    shouting             2       a line or the subject mostly in capitals (see _shouts)
    exclamations         1       "!!!" or more, or three runs like "!!" / "?!"
    chasing              2       the client wrote before since our last public update
    overdue              2       the ticket's promise to the client is overdue

A phrase preceded within three words by a negation ("not", "no", "never", "n't", "without")
does not hit: "not disappointed", "no complaints", "no need to escalate"; one that
intensifies is no negation: "never been so disappointed", "can't believe how frustrating".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .classify import Kind
from .phrasescan import may_match

# The documented default of `[upset] threshold` (the config key comes with the wiring).
DEFAULT_THRESHOLD = 3
# Only this much of the readable text is read: an upset client says so near the top, and
# the cost of one message stays bounded.
SCAN_LIMIT = 20_000

STRONG = 3
MILD = 2
SHOUTING = 2
EXCLAMATIONS = 1
CHASING = 2
OVERDUE = 2


@dataclass(frozen=True)
class UpsetFacts:
    """What the rules look at. `text` is `readable.reply_text` of the message (quotes and
    signature stripped); `chasing` and `overdue` are supplied by the caller from the ticket:
    the client wrote before on this ticket since our last public update, and a promise made
    to the client (a commitment, the first-response due time) is past when this arrives."""

    subject: str
    text: str
    kind: Kind = Kind.NORMAL
    chasing: bool = False
    overdue: bool = False


@dataclass(frozen=True)
class Hit:
    rule: str
    reason: str
    weight: int


@dataclass(frozen=True)
class UpsetVerdict:
    upset: bool
    score: int
    threshold: int
    hits: tuple[Hit, ...]

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(h.reason for h in self.hits)


# --- phrases ----------------------------------------------------------------------------
#
# The one place the built-in phrases live. Each is a regex over lower-cased text with words
# separated by any run of whitespace; inflections are spelled out here rather than guessed
# by a stemmer. A phrase may carry a "harmless after" pattern: what, following it, makes it
# a noun about something else ("the complaint form", "escalate privileges").

_STRONG_PHRASES: tuple[tuple[str, str | None], ...] = (
    (r"disappoint(?:ed|ing|ment)", None),
    (r"unacceptable", None),
    (r"not acceptable", None),
    (r"complain(?:t|ts|ed|ing)?", r"(?:form|page|field|module|button|category|handling)"),
    (r"cancel(?:l?ing)? (?:the|our|my) (?:contract|subscription|account)", None),
    (r"terminat(?:e|ing) (?:the|our|my) (?:contract|agreement)", None),
    (r"frustrat(?:ed|ing)", None),
    (r"fed up", None),
    (r"ridiculous", None),
    (r"appalling", None),
    (r"(?:poor|terrible|awful|shocking) (?:service|support)", None),
    (r"waste of (?:my|our) time", None),
    (r"legal action", None),
)

_MILD_PHRASES: tuple[tuple[str, str | None], ...] = (
    (r"escalat(?:e|ed|ing)", r"(?:privileges?|permissions?|rights)"),
    (r"still waiting", None),
    (r"still (?:not|no) (?:fixed|solved|resolved|working|answer|reply|response)", None),
    (r"(?:third|fourth|fifth|3rd|4th|5th) time", None),
    (r"how many times", None),
    (r"(?:no|nobody|no one|nobody has) (?:replied|responded|answered|got back)", None),
    (r"no (?:reply|response|answer) (?:yet|at all|from you)", None),
    (r"yet again", None),
)

# A negation this close before a phrase (in words) turns it off.
_NEGATION_WINDOW = 3
_NEGATION = re.compile(r"\b(?:not|no|never|without|nothing|hardly|cannot)\b|n't\b|n\u2019t\b")
# Negations that intensify rather than deny: "never been so disappointed", "can't believe
# how frustrating", "couldn't be more disappointed". Removed before the negation check.
_INTENSIFYING = re.compile(
    r"\bnever\s+(?:been|felt|seen|was|were)\b"
    r"|\b(?:can(?:'|\u2019)?t|cannot)\s+believe\b"
    r"|\bcould(?:n't|n\u2019t|\s+not)\s+be\b"
)
# Where a sentence ends: a negation before it does not reach the phrase. A single newline
# does not end one (mail is wrapped at ~72 characters); a blank line does.
_SENTENCE_END = re.compile(r"[.!?;:]|\n\s*\n")
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)?")


def _compile(phrases: Iterable[tuple[str, str | None]]) -> tuple[tuple[re.Pattern[str], str], ...]:
    out = []
    for pattern, harmless_after in phrases:
        words = pattern.split(" ")
        body = r"\s+".join(words)
        tail = rf"(?!\s+{harmless_after}\b)" if harmless_after else ""
        out.append((re.compile(rf"(?<![\w-]){body}(?![\w-]){tail}"), pattern))
    return tuple(out)


_STRONG = _compile(_STRONG_PHRASES)
_MILD = _compile(_MILD_PHRASES)


@functools.lru_cache(maxsize=16)
def _extra(phrases: tuple[str, ...]) -> tuple[tuple[re.Pattern[str], str], ...]:
    """The caller's phrases ([upset] phrases), matched as plain words (no regex syntax)."""
    out = []
    for phrase in phrases:
        words = phrase.lower().split()
        if not words:
            continue
        body = r"\s+".join(re.escape(w) for w in words)
        out.append((re.compile(rf"(?<![\w-]){body}(?![\w-])"), " ".join(words)))
    return tuple(out)


def _negated(text: str, start: int) -> bool:
    before = text[max(0, start - 80) : start]
    # The last few words before the phrase, within its sentence.
    before = _INTENSIFYING.sub(" ", _SENTENCE_END.split(before)[-1])
    words = _WORD.findall(before)[-_NEGATION_WINDOW:]
    return any(_NEGATION.search(w) for w in words)


def _phrase_hits(
    text: str, table: Sequence[tuple[re.Pattern[str], str]], rule: str, weight: int
) -> list[Hit]:
    hits = []
    for pattern, _name in table:
        if not may_match(pattern, text):  # text is lower-cased
            continue
        for m in pattern.finditer(text):
            if not _negated(text, m.start()):
                said = " ".join(m.group(0).split())
                hits.append(Hit(rule, f"{rule.replace('_', '-')}: {said!r}", weight))
                break
    return hits


# --- shouting ---------------------------------------------------------------------------
#
# A line shouts when most of its words are in capitals, there are several of them and they
# are not just acronyms: at least _SHOUT_WORDS all-capital words of two or more letters,
# making at least _SHOUT_SHARE of the line's words and _SHOUT_LETTERS capital letters, of
# which at least _SHOUT_LONG_WORDS have _LONG_WORD letters or more. So "SSL DNS MX SPF",
# "URGENT: VPN down" and "ASAP" do not shout; "PLEASE FIX THIS NOW" does.
# Code and log lines are skipped: they are full of capitals nobody shouted.
_SHOUT_WORDS = 3
_SHOUT_SHARE = 0.6
_SHOUT_LETTERS = 12
_SHOUT_LONG_WORDS = 2
_LONG_WORD = 4
_CAPS_WORD = re.compile(r"[^\W\d_]{2,}")
_CODE_OR_LOG = re.compile(
    r"^(?:\s{4}|\t)"  # indented: code or a pasted block
    r"|^\s*(?:```|[\[$#>|])"  # a fence, a log prefix, a prompt, a table
    r"|\d{1,2}:\d{2}:\d{2}"  # a time stamp
    r"|\b(?:ERROR|WARN(?:ING)?|INFO|DEBUG|FATAL|CRITICAL|TRACE|NOTICE)\b\s*[:\]]"
    r"|[{};=<>\\]|\w\(|\bHTTP/\d|/\w+/"  # code, markup, paths
)


def _shouts(line: str) -> int:
    """The number of all-capital words on the line if it shouts, else 0."""
    if len(line) < _SHOUT_LETTERS or line.lower() == line:
        return 0  # too short, or no capital at all: most lines, at no regex's cost
    words = _CAPS_WORD.findall(line)
    caps = [w for w in words if w.isupper()]
    if len(caps) < _SHOUT_WORDS or len(caps) < _SHOUT_SHARE * len(words):
        return 0
    # Acronyms are short: a line of them ("SSL DNS MX SPF") is not a sentence in capitals.
    if sum(len(w) >= _LONG_WORD for w in caps) < _SHOUT_LONG_WORDS:
        return 0
    if sum(len(w) for w in caps) < _SHOUT_LETTERS:
        return 0
    if _CODE_OR_LOG.search(line):
        return 0
    return len(caps)


_BANG_RUN = re.compile(r"[!?\u203c\u2049]{2,}")


# A reply's or forward's subject is the thread's, written by whoever started it (often us:
# "Re: your complaint"): like quoted history, it does not count. The prefixes are the common
# ones (RFC 5322 3.6.5 names only "Re: "; mail clients localise it).
_REPLY_PREFIX = re.compile(
    r"^\s*(?:re|aw|sv|vs|antw|odp|wg|fw|fwd|tr|rif|r)\s*(?:\[\d+\])?\s*:", re.I
)


def _own_subject(subject: str) -> str:
    return "" if _REPLY_PREFIX.match(subject) else subject


# --- rules ------------------------------------------------------------------------------

Rule = Callable[["_Scan", UpsetFacts], list[Hit]]


@dataclass(frozen=True)
class _Scan:
    lowered: str  # subject and text, lower-cased, for the phrases
    lines: tuple[str, ...]  # subject and text lines, as written, for shouting
    extra: tuple[tuple[re.Pattern[str], str], ...]


def complaint_phrase(scan: _Scan, facts: UpsetFacts) -> list[Hit]:
    return _phrase_hits(scan.lowered, _STRONG + scan.extra, "complaint_phrase", STRONG)


def frustration_phrase(scan: _Scan, facts: UpsetFacts) -> list[Hit]:
    return _phrase_hits(scan.lowered, _MILD, "frustration_phrase", MILD)


def shouting(scan: _Scan, facts: UpsetFacts) -> list[Hit]:
    words = sum(_shouts(line) for line in scan.lines)
    return [Hit("shouting", f"shouting: {words} words in capitals", SHOUTING)] if words else []


def exclamations(scan: _Scan, facts: UpsetFacts) -> list[Hit]:
    runs = [r for r in _BANG_RUN.findall("\n".join(scan.lines)) if "!" in r]
    if any(r.count("!") >= 3 for r in runs) or len(runs) >= 3:
        return [Hit("exclamations", f"exclamations: {max(runs, key=len)!r}", EXCLAMATIONS)]
    return []


def chasing(scan: _Scan, facts: UpsetFacts) -> list[Hit]:
    if facts.chasing:
        return [Hit("chasing", "chasing: wrote again since our last public update", CHASING)]
    return []


def overdue(scan: _Scan, facts: UpsetFacts) -> list[Hit]:
    if facts.overdue:
        return [Hit("overdue", "overdue: our promise was past due when the client wrote", OVERDUE)]
    return []


# The table, in the order reasons are shown; every rule is asked.
RULES: tuple[Rule, ...] = (
    complaint_phrase,
    frustration_phrase,
    shouting,
    exclamations,
    chasing,
    overdue,
)


def decide(
    facts: UpsetFacts,
    *,
    phrases: Sequence[str] = (),
    threshold: int = DEFAULT_THRESHOLD,
) -> UpsetVerdict:
    """Ask every rule; the message is upset when the weights of the hits reach `threshold`.

    phrases: extra complaint phrases (weight STRONG), plain words matched case-insensitively
    at word boundaries; they will come from `[upset] phrases`. threshold: `[upset] threshold`.
    """
    if threshold < 1:
        raise ValueError(f"threshold: must be at least 1, got {threshold}")
    if facts.kind is not Kind.NORMAL:
        # No client wrote an auto-reply, a bounce or a notice: nothing in it counts.
        return UpsetVerdict(False, 0, threshold, ())
    subject = _own_subject(facts.subject[:1000])
    text = facts.text[:SCAN_LIMIT]
    scan = _Scan(
        lowered=f"{subject}\n{text}".lower(),
        lines=(subject, *text.splitlines()),
        extra=_extra(tuple(phrases)),
    )
    hits = tuple(hit for rule in RULES for hit in rule(scan, facts))
    score = sum(h.weight for h in hits)
    return UpsetVerdict(score >= threshold, score, threshold, hits)
