"""A fast necessary condition for the whole-word phrase regexes of urgency.py and upset.py.

Their patterns start with a lookbehind, `(?<![\\w-])` (a phrase starts a word), and that
first item keeps CPython's regex engine from its literal-prefix search: it tries the
lookbehind at every position of the text. A 1 KB message took 20 us per phrase, 0.6 ms
for upset.py's table and 0.4 ms for urgency.py's, which was a fifth of the CPU of a whole
intake on the full path (bench/README.md, issue 14). The same pattern without the
lookbehind, on lower-cased text and without IGNORECASE where it has no capital letter of
its own, finds the same matches and more (it also accepts a match inside a word), in about
1 us when the phrase is absent, which is nearly always. So each phrase is first searched
for this way, and only text that passes is read by the exact pattern.
"""

from __future__ import annotations

import functools
import re

_LOOKBEHIND = r"(?<![\w-])"
_ESCAPE = re.compile(r"\\.")
_CAPITAL = re.compile(r"[A-Z]")


@functools.lru_cache(maxsize=1024)
def _quick(pattern: re.Pattern[str]) -> re.Pattern[str]:
    source = pattern.pattern.removeprefix(_LOOKBEHIND)
    flags = pattern.flags
    # On lower-cased text, case only matters for a capital in the pattern itself (outside
    # escapes such as \W and \S).
    if flags & re.IGNORECASE and not _CAPITAL.search(_ESCAPE.sub("", source)):
        flags &= ~re.IGNORECASE
    return re.compile(source, flags)


def may_match(pattern: re.Pattern[str], lowered: str) -> bool:
    """False only when `pattern` cannot match the text whose `str.lower()` is `lowered`."""
    return _quick(pattern).search(lowered) is not None
