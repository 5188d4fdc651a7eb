"""systemd/gateway.service keeps its hardening, and systemd itself accepts every line of it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_PATH = Path(__file__).resolve().parent.parent / "systemd" / "gateway.service"
INSTALLED_BINARY = "/opt/gateway/.venv/bin/gateway"
CONFIG_ARGS = "--config /etc/gateway/config.toml"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Section -> key -> every value in order (systemd allows a key more than once)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";"))):
            continue
        # systemd.syntax(7): a trailing backslash continues the line.
        if line.endswith("\\"):
            logical += line[:-1].rstrip() + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT_PATH.read_text())


# The last assignment wins for all of these, so the last value is the one that counts.
EXPECTED_SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecStartPre": f"{INSTALLED_BINARY} {CONFIG_ARGS} check-config",
    "ExecStart": f"{INSTALLED_BINARY} {CONFIG_ARGS} serve",
    "Restart": "on-failure",
    "RestartSec": "2",
    "WatchdogSec": "30",
    "TimeoutStopSec": "60",
    "KillMode": "mixed",
    "User": "gateway",
    "Group": "gateway",
    "StateDirectory": "gateway",
    "StateDirectoryMode": "0750",
    "ConfigurationDirectory": "gateway",
    "UMask": "0027",
    "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateMounts": "yes",
    "ProtectProc": "invisible",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RemoveIPC": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
    "LimitNOFILE": "65536",
    "MemoryMax": "2G",
    "TasksMax": "256",
}


@pytest.mark.parametrize(("key", "value"), sorted(EXPECTED_SERVICE.items()))
def test_service_setting(unit: Unit, key: str, value: str) -> None:
    values = unit["Service"].get(key)
    assert values, f"[Service] {key}= is missing"
    assert values[-1] == value


def test_system_call_filter_refuses_privileged_but_not_resources(unit: Unit) -> None:
    # Assignments accumulate: allow @system-service, then take @privileged away. The parser
    # workers call setrlimit(), which is in @resources, so @resources must stay allowed.
    assert unit["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged"]


def test_environment(unit: Unit) -> None:
    assignments = " ".join(unit["Service"].get("Environment", [])).split()
    assert "PYTHONUNBUFFERED=1" in assignments


def test_static_user_not_dynamic(unit: Unit) -> None:
    # systemd/README.md explains the choice; mixing both would be confusing.
    assert "DynamicUser" not in unit["Service"]


def test_install_section(unit: Unit) -> None:
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_parser_keeps_repeated_keys_and_continuations() -> None:
    parsed = parse_unit("[S]\n# c\nA=1\nA=2 \\\n  3\n; c\n[T]\nB=\n")
    assert parsed == {"S": {"A": ["1", "2 3"]}, "T": {"B": [""]}}


# systemd-analyze verify -------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def run_verify(text: str, directory: Path) -> tuple[int, str, list[str]]:
    """Verify `text` as gateway.service; return exit code, stderr and its lines about the unit.

    Verify checks that every Exec binary exists, so the installed path is pointed at this
    interpreter. A clean unit produces no output at all; systemd reports a misspelt key or
    a bad value only as a warning naming the file (exit status still 0), so any stderr
    line that names the unit is a finding. Lines about the host's own units are not ours.
    """
    path = directory / "gateway.service"
    path.write_text(text.replace(INSTALLED_BINARY, sys.executable))
    env = {
        **os.environ,
        # Warnings are what we look for: never let the caller's environment hide them,
        # or send them to the journal instead of our pipe.
        "SYSTEMD_LOG_LEVEL": "info",
        "SYSTEMD_LOG_TARGET": "console",
        "SYSTEMD_LOG_COLOR": "0",
    }
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        # --man=no: no man pages to look up; --recursive-errors=no: the host's units
        # (network.target, ...) do not decide the result.
        [SYSTEMD_ANALYZE, "verify", "--man=no", "--recursive-errors=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    findings = [line for line in proc.stderr.splitlines() if path.name in line]
    return proc.returncode, proc.stderr, findings


@pytest.fixture
def verify_dir(tmp_path: Path) -> Path:
    """A folder to verify in, once `systemd-analyze verify` is known to work on this machine."""
    if SYSTEMD_ANALYZE is None:
        # CI runs on a machine with systemd: a missing binary there is a failure.
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is not installed, and CI is set")
        pytest.skip("systemd-analyze is not installed")
    # A trivial, correct unit must pass; if it does not, the tool cannot run here (an old
    # systemd without --recursive-errors, no /usr/lib/systemd, ...), which is no verdict on
    # our unit.
    probe = tmp_path / "probe"
    probe.mkdir()
    code, stderr, findings = run_verify(
        f"[Service]\nType=oneshot\nExecStart={INSTALLED_BINARY} --version\n", probe
    )
    if code != 0 or findings:
        reason = f"systemd-analyze verify does not work here: {stderr.strip()[:500]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return tmp_path


def test_systemd_analyze_verify_accepts_the_unit(verify_dir: Path) -> None:
    code, stderr, findings = run_verify(UNIT_PATH.read_text(), verify_dir)
    assert code == 0, stderr
    assert findings == [], stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("ProtectSystem=strict", "ProtectSytem=strict"),  # Unknown key ... ignoring
        ("NoNewPrivileges=yes", "NoNewPrivileges=yess"),  # Failed to parse boolean value
        ("SystemCallFilter=~@privileged", "SystemCallFilter=~@privilegd"),  # Unknown group
        ("RestrictAddressFamilies=AF_UNIX", "RestrictAddressFamilies=AF_UNXI"),
        ("MemoryMax=2G", "MemoryMax=2Q"),
        ("[Service]", "[Servce]"),
        (f"ExecStart={INSTALLED_BINARY}", "ExecStart=/nonexistent/gateway"),
    ],
)
def test_systemd_analyze_verify_catches_mistakes(verify_dir: Path, old: str, new: str) -> None:
    # Proves the check above has teeth: each of these mistakes is silently ignored by
    # systemd at start, so the unit would run with less hardening than it says.
    # Anchored at a line start, so that a comment mentioning the setting is not the one changed.
    text = UNIT_PATH.read_text()
    assert "\n" + old in text
    code, stderr, findings = run_verify(text.replace("\n" + old, "\n" + new, 1), verify_dir)
    assert code != 0 or findings, stderr


README_PATH = UNIT_PATH.parent / "README.md"
SCORE = re.compile(r"Overall exposure level for gateway\.service: (\d+\.\d+) (\w+)")


def test_security_score_printed_in_readme(verify_dir: Path) -> None:
    # systemd/README.md prints the unit's `systemd-analyze security` score and the command;
    # a change to the hardening that moves the score must update it there.
    path = verify_dir / "gateway.service"
    path.write_text(UNIT_PATH.read_text().replace(INSTALLED_BINARY, sys.executable))
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
        check=False,
    )
    match = SCORE.search(proc.stdout)
    assert match, proc.stdout + proc.stderr
    score, verdict = match.groups()
    readme = README_PATH.read_text()
    assert "systemd-analyze security --offline=true systemd/gateway.service" in readme
    assert f"rates the unit {score} ({verdict})" in readme, (score, verdict)
