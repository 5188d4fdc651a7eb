"""CI runs bench/preload.py once in its tiny configuration (issue 14: a bench that is never
run rots): the database it builds is a valid, searchable gateway database, and every
query of the commands it measures reads through an index."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import closing
from pathlib import Path

from gateway import store

ROOT = Path(__file__).resolve().parent.parent


def test_preload_tiny_builds_and_measures(tmp_path: Path) -> None:
    database = tmp_path / "desk.db"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "preload.py"), "--tiny", "--database",
         str(database), "--measure", "--json", "--runs", "1", "--intake-messages", "20"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    build = report["build"]
    assert build["tickets"] == 600 and build["messages"] == 2000 + 200
    assert build["bytes_per_message"] > 0
    measured = {c["command"]: c for c in report["commands"]}
    listed = {"tickets list (first page)", "tickets show (longest)", "desk", "quarantine list",
              "senders list --org", "events --ticket N", "tickets search (2 words)"}  # fmt: skip
    assert listed <= set(measured)
    for command in measured.values():
        assert command["queries"], command["command"]
        assert command["all_indexed"], command
    assert report["scheduler"]["real_ms_without_quick_check"] > 0
    assert report["intake"]["empty_cpu_ms_per_msg"] > 0
    assert report["intake"]["preloaded_cpu_ms_per_msg"] > 0
    # The database is the gateway's own, whole, and its search index covers the filed mail.
    with closing(store.connect(database)) as conn:
        [indexed] = conn.execute("SELECT COUNT(*) FROM message_search_docsize").fetchone()
        [filed] = conn.execute(
            "SELECT COUNT(*) FROM messages WHERE direction = 'in' AND ticket IS NOT NULL"
        ).fetchone()
        assert indexed == filed > 0
        assert (
            conn.execute("SELECT COUNT(*) FROM quarantine WHERE status = 'held'").fetchone()[0] > 0
        )
