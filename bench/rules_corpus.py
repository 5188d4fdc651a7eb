"""Precision and recall of the issue-12 rule tables on their labelled sets.

    python bench/rules_corpus.py [--verbose] [--json]

Urgency: tests/data/urgency/*.eml, labelled by the file name's first word (`urgent-...`,
`normal-...`). Each file goes the intake's way: gateway.inbound.parse_message (in this
process), classify (the From address as the envelope sender), then urgency.assess on
UrgencyFacts.of(subject, reply_text, headers, kind): quoted history and signatures are
stripped by the same code as in the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.classify import OwnIdentity, classify  # noqa: E402
from gateway.inbound import ParseLimits, parse_message  # noqa: E402
from gateway.urgency import UrgencyFacts, Verdict, assess, phrase_table  # noqa: E402

URGENCY_DIR = ROOT / "tests" / "data" / "urgency"
OWN = OwnIdentity(hostname="gateway.example.org", addresses=("support@example.org",))


@dataclass
class Figures:
    messages: int = 0
    positives: int = 0  # labelled positive
    true_positives: int = 0
    false_positives: list[str] = field(default_factory=list)
    false_negatives: list[str] = field(default_factory=list)

    @property
    def precision(self) -> float:
        flagged = self.true_positives + len(self.false_positives)
        return self.true_positives / flagged if flagged else 1.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.positives if self.positives else 1.0


def urgency_verdict(path: Path, extra: tuple[str, ...] = ()) -> Verdict:
    parsed = parse_message(path.read_bytes(), ParseLimits())
    sender = parsed.from_addresses[0][1] if parsed.from_addresses else ""
    kind = classify(
        parsed.headers,
        parsed.subject,
        parsed.from_addresses,
        sender,
        parsed.content_type,
        parsed.report,
        OWN,
        parsed.text,
    ).kind
    facts = UrgencyFacts.of(parsed.subject, parsed.reply_text, parsed.headers, kind)
    return assess(facts, phrase_table(extra))


def urgency_figures(extra: tuple[str, ...] = (), directory: Path = URGENCY_DIR) -> Figures:
    figures = Figures()
    for path in sorted(directory.glob("*.eml")):
        labelled = path.name.split("-", 1)[0] == "urgent"
        urgent = urgency_verdict(path, extra).urgent
        figures.messages += 1
        figures.positives += labelled
        if urgent and labelled:
            figures.true_positives += 1
        elif urgent:
            figures.false_positives.append(path.name)
        elif labelled:
            figures.false_negatives.append(path.name)
    return figures


def _print(title: str, f: Figures, verbose: bool) -> None:
    print(
        f"{title}: {f.messages} messages, {f.positives} labelled positive: "
        f"precision {f.precision:.3f}, recall {f.recall:.3f} "
        f"({len(f.false_positives)} false positives, {len(f.false_negatives)} false negatives)"
    )
    if verbose:
        for name in f.false_positives:
            print(f"  FP {name}")
        for name in f.false_negatives:
            print(f"  FN {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="name the misses")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = {
        "urgency": urgency_figures(),
        # What admins' [urgency] phrases add for the German and Dutch reports.
        "urgency+extra": urgency_figures(("notfall", "dringend", "ligt eruit")),
    }
    if args.json:
        out = {
            k: {**asdict(f), "precision": f.precision, "recall": f.recall} for k, f in runs.items()
        }
        print(json.dumps(out, indent=2))
    else:
        for title, figures in runs.items():
            _print(title, figures, args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
