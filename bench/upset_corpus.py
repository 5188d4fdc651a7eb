"""Precision and recall of the [upset] rule table (gateway/upset.py) on the labelled set.

    python bench/upset_corpus.py [--threshold N] [--phrase WORDS ...] [-v]

The labelled set is `tests/test_upset.py` LABELLED (written for the tests; each body goes
through `readable.reply_text` as the pipeline stores it). Prints the confusion counts,
precision and recall, the figures per category, every miss with -v, and the cost per message.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import upset  # noqa: E402
from tests.test_upset import LABELLED, measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threshold", type=int, default=upset.DEFAULT_THRESHOLD)
    ap.add_argument("--phrase", action="append", default=[], help="an extra phrase")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every miss")
    args = ap.parse_args()
    phrases = tuple(args.phrase)

    figures = measure(LABELLED, phrases=phrases, threshold=args.threshold)
    labelled_upset = sum(c.labelled_upset for c in LABELLED)
    print(
        f"{len(LABELLED)} messages ({labelled_upset} labelled upset), threshold "
        f"{args.threshold}: tp {figures.tp} fp {figures.fp} fn {figures.fn} tn {figures.tn}; "
        f"precision {figures.precision:.3f}, recall {figures.recall:.3f}"
    )
    for category in sorted({c.category for c in LABELLED}):
        cases = tuple(c for c in LABELLED if c.category == category)
        f = measure(cases, phrases=phrases, threshold=args.threshold)
        print(f"  {category:12} {len(cases):3} messages, {f.fp} false positives, {f.fn} missed")
    if args.verbose:
        for miss in figures.misses:
            print(f"  miss: {miss}")

    facts = [c.facts() for c in LABELLED]
    rounds = 200
    start = time.perf_counter()
    for _ in range(rounds):
        for fact in facts:
            upset.decide(fact, phrases=phrases, threshold=args.threshold)
    per = (time.perf_counter() - start) / (rounds * len(facts))
    print(f"decide: {per * 1e6:.1f} us a message (readable text already stripped)")


if __name__ == "__main__":
    main()
