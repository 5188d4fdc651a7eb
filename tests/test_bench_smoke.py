"""CI's smoke run of the benches (issue 14: "CI runs each bench once in a tiny
configuration (seconds) so it cannot rot"). Figures are not checked, only that the bench
runs to its end, measures every server it was given and loses no message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from . import postfix as pf

ROOT = Path(__file__).resolve().parent.parent


def test_intake_bench_tiny_with_postfix_reference() -> None:
    """bench/intake.py --tiny, with the private Postfix reference when Postfix can run
    here (always under CI=true, where .ci/run installs it)."""
    missing = pf.unavailable()
    if missing and os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI must provide this: {missing}")
    argv = [sys.executable, str(ROOT / "bench" / "intake.py"), "--tiny", "--json"]
    if not missing:
        argv.append("--postfix")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(done.stdout)
    assert [row["concurrency"] for row in report["rows"]] == [1, 8, 32]
    assert report["gateway_stored"] == report["gateway_acknowledged"] > 0
    assert report["postfix"] is (missing is None)
    for row in report["rows"]:
        servers = ["bare", "gateway"] + (["postfix"] if not missing else [])
        for name in servers:
            assert row[name]["messages"] == report["messages"], (name, row[name])
            assert row[name]["failures"] == 0, (name, row[name])
        if not missing:
            assert row["gateway_postfix_ratio"] > 0
    if not missing:
        # Postfix's CPU is read (a level's share may round to 0 clock ticks, not all three).
        assert sum(row["postfix"]["server_cpu_ms_per_msg"] for row in report["rows"]) > 0
