# ruff: noqa: RUF001, RUF002, RUF003  (confusable characters are this module's subject)
"""Look-alike addresses: a "skeleton" under which confusable spellings coincide.

After Unicode TS #39 section 4 (skeletons): two addresses that render alike - a Cyrillic
"о" for a Latin "o", an IDN homograph domain, "rn" for "m" - get the same skeleton. It is
a key for finding impostors of authorised senders, never an identity: it must never be used
to authorise anyone.
"""

from __future__ import annotations

import functools
import unicodedata

# The confusables a forger reaches for first: Cyrillic and Greek letters that render as
# Latin ones, Latin letters from other blocks, and digits that pass for letters. (TS #39's
# full table is far larger; these cover the homograph attacks seen against helpdesks.)
_CONFUSABLES = str.maketrans(
    {
        # Cyrillic
        "а": "a",
        "в": "b",
        "с": "c",
        "ԁ": "d",
        "е": "e",
        "һ": "h",
        "і": "i",
        "ј": "j",
        "к": "k",
        "ӏ": "l",
        "м": "m",
        "н": "h",
        "о": "o",
        "р": "p",
        "ԛ": "q",
        "ѕ": "s",
        "т": "t",
        "у": "y",
        "ԝ": "w",
        "х": "x",
        "ү": "y",
        "ѵ": "v",
        "ɡ": "g",
        "ԍ": "g",
        "ո": "n",
        "ս": "u",
        "ց": "g",
        "օ": "o",
        # Greek
        "α": "a",
        "β": "b",
        "ε": "e",
        "η": "n",
        "ι": "i",
        "κ": "k",
        "ν": "v",
        "ο": "o",
        "ρ": "p",
        "τ": "t",
        "υ": "u",
        "χ": "x",
        "ω": "w",
        "ϲ": "c",
        "ϳ": "j",
        # Latin look-alikes and dotless forms
        "ı": "i",
        "ȷ": "j",
        "ł": "l",
        "ƚ": "l",
        "ɩ": "i",
        "ɑ": "a",
        "ʋ": "v",
        "ꞵ": "b",
        # Digits and symbols that pass for letters
        "0": "o",
        "1": "l",
        "|": "l",
        "5": "s",
    }
)
# Letter pairs that read as one letter in most fonts.
_DIGRAPHS = (("rn", "m"), ("vv", "w"), ("cl", "d"))


def _fold(text: str) -> str:
    # NFKD folds compatibility forms (fullwidth "ｓ", ligatures) and splits off accents,
    # which are then dropped: "ѕupроrt" and "support" must meet.
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    folded = stripped.translate(_CONFUSABLES)
    # "i" and "l" are confusable with each other and with "1" in most typefaces.
    folded = folded.replace("i", "l")
    for pair, single in _DIGRAPHS:
        folded = folded.replace(pair, single)
    return folded


def _unicode_domain(domain: str) -> str:
    labels = []
    for label in domain.split("."):
        if label.startswith("xn--"):
            try:
                label = label.encode("ascii").decode("idna")
            except UnicodeError:
                pass
        labels.append(label)
    return ".".join(labels)


# A pure function of a short string, called on the event loop for every message: for the
# sender and for each staff address and mailbox it is compared with (which never change).
@functools.lru_cache(maxsize=1024)
def skeleton(address: str) -> str:
    """The look-alike key of an address (or of "@domain")."""
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return _fold(address)
    return f"{_fold(local)}@{_fold(_unicode_domain(domain))}"


def is_lookalike(address: str, authorised: str) -> bool:
    """True if `address` differs from `authorised` but renders confusably alike."""
    return address != authorised and skeleton(address) == skeleton(authorised)
