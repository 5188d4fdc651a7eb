"""Install as systemd/README.md says, from the built wheel, and run from there (issue 13.1).

The wheel is built from a copy of the source, installed into a fresh venv whose
dependencies come from the test venv's site-packages (a .pth line: no network, and the
editable gateway there is never activated, its .pth is not read). An /etc-style config
folder and a /var/lib-style state folder are laid out in a temporary root, and the
installed `gateway` runs check-config, serve and an admin command with STATE_DIRECTORY set
as the unit sets it. The config folder is read-only: chmod 0555, and as root (CI), for
whom modes do not count, a read-only bind mount in a private mount namespace around each
command, which is what the unit's ProtectSystem=strict makes of /etc (EROFS).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from gateway.config import ConfigError, check_writable, parse_config

from .clients import send_message
from .conftest import ROOT, DaemonProcess, make_message, wait_for

# Warnings a build backend emits by class name (SetuptoolsDeprecationWarning,
# BuildBackendWarning, ...): the license metadata and the rest must not cause any.
WARNING = re.compile(r"\b\w*Warning\b")

CONFIG = """
[smtp]
host = "127.0.0.1"
port = 0
hostname = "support.example.org"

[parser]
workers = 1

[delivery]
poll_interval = 0.2

[[mailbox]]
address = "support@example.org"
unit = "support"
"""


@dataclass
class Installed:
    root: Path
    venv: Path
    etc: Path
    state: Path
    build_log: str
    prefix: list[str]

    @property
    def config(self) -> Path:
        return self.etc / "config.toml"

    def env(self, state: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL"))}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("STATE_DIRECTORY", None)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        if state:
            env["STATE_DIRECTORY"] = str(self.state)
        return env

    def gateway(self, *args: str, state: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command("gateway", "--config", str(self.config), *args),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.root,
            env=self.env(state),
            check=False,
        )

    def command(self, program: str, *args: str) -> list[str]:
        return [*self.prefix, str(self.venv / "bin" / program), *args]


def _copy_source(target: Path) -> None:
    shutil.copytree(
        ROOT,
        target,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "var", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )


def _read_only_mount(folder: Path) -> list[str]:
    """A command prefix that runs the command with `folder` mounted read-only."""
    unshare = shutil.which("unshare")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    prefix = [str(unshare), "--mount", "--propagation", "private", "sh", "-c", script, str(folder)]
    probe = subprocess.run(
        [*prefix, "sh", "-c", f'test ! -w "{folder}"'], capture_output=True, timeout=30, check=False
    )
    if unshare is None or probe.returncode != 0:
        reason = f"as root, and no read-only mount is possible: {probe.stderr!r}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return prefix


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    # Not pytest's tmp_path: its parents are 0700 root, which `nobody` cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="gateway-install-"))
    root.chmod(0o755)
    try:
        src = root / "src"
        _copy_source(src)
        build = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "wheel", "-v", "--no-deps"),
                *("--no-build-isolation", "--no-index", "-w", str(root / "dist"), str(src)),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert build.returncode == 0, build.stdout + build.stderr
        (wheel,) = (root / "dist").glob("gateway-*.whl")

        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        install = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")),
                *("install", "--no-deps", "--no-index", str(wheel)),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert install.returncode == 0, install.stdout + install.stderr
        # The dependencies: the test venv's site-packages, after the fresh venv's own.
        (site,) = (venv / "lib").glob("python3*/site-packages")
        deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (site / "zz-deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))

        etc = root / "etc" / "gateway"
        etc.mkdir(parents=True)
        (etc / "config.toml").write_text(CONFIG)
        state = root / "var" / "lib" / "gateway"
        state.mkdir(parents=True)
        state.chmod(0o750)
        etc.chmod(0o555)
        prefix: list[str] = []
        if os.geteuid() == 0:
            prefix = _read_only_mount(etc)
        yield Installed(root, venv, etc, state, build.stdout + build.stderr, prefix)
    finally:
        for folder in (root / "etc" / "gateway",):
            if folder.exists():
                folder.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def test_wheel_builds_without_packaging_warnings(installed: Installed) -> None:
    found = [line for line in installed.build_log.splitlines() if WARNING.search(line)]
    assert found == [], "\n".join(found)


def test_installed_gateway_is_the_wheel_with_its_templates(installed: Installed) -> None:
    code = "import gateway, gateway.config as c; print(gateway.__file__, c.BUILTIN_TEMPLATES)"
    probe = subprocess.run(
        installed.command("python", "-c", code),
        capture_output=True,
        text=True,
        cwd=installed.root,
        env=installed.env(),
        check=True,
    )
    module, templates = (Path(line) for line in probe.stdout.split())
    assert module.is_relative_to(installed.venv), module
    assert templates.is_relative_to(installed.venv), templates
    assert (templates / "acknowledgement.txt").is_file()
    # Every module of the source tree is in the wheel (pyproject.toml lists the packages).
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*.py")}
    shipped = {p.relative_to(module.parent.parent).as_posix() for p in module.parent.rglob("*.py")}
    assert source <= shipped, sorted(source - shipped)


def test_python_dash_m_gateway(installed: Installed) -> None:
    result = subprocess.run(
        installed.command("python", "-m", "gateway", "--version"),
        capture_output=True,
        text=True,
        cwd=installed.root,
        env=installed.env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gateway ")


def test_check_config_without_state_directory_names_the_key(installed: Installed) -> None:
    # The failure: the defaults beside a config in read-only /etc.
    result = installed.gateway("check-config", state=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "storage.database: cannot write to" in result.stderr
    assert str(installed.etc) in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_without_state_directory_refuses_before_binding(installed: Installed) -> None:
    result = installed.gateway("serve", state=False)
    assert result.returncode == 1
    assert "storage.database: cannot write to" in result.stderr
    assert "gateway.ready" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def _start_daemon(installed: Installed, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            installed.command("gateway", "--config", str(installed.config), "serve"),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=installed.root,
            env=installed.env(),
        )


async def test_serve_from_the_install_delivers_and_reads_back(installed: Installed) -> None:
    check = installed.gateway("check-config")
    assert check.returncode == 0, check.stderr
    assert f"database  {installed.state / 'gateway.db'}" in check.stdout
    assert f"outbox    {installed.state / 'outbox'}" in check.stdout
    for argv in (
        ("orgs", "add", "Client Ltd", "--domain", "client.example.com"),
        ("senders", "add", "--domain", "client.example.com", "--org", "Client Ltd"),
    ):
        done = installed.gateway(*argv)
        assert done.returncode == 0, done.stderr

    log = installed.root / "serve.log"
    proc = _start_daemon(installed, log)
    try:
        ready = await wait_for(
            lambda: (
                DaemonProcess.READY.search(log.read_text("utf-8", "replace"))
                or proc.poll() is not None
            ),
            timeout=20,
        )
        assert isinstance(ready, re.Match), log.read_text("utf-8", "replace")
        delivery = await send_message(int(ready.group(1)), make_message(subject="Installed"))
        assert delivery.accepted

        listed = installed.gateway("messages", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        received = [m for m in json.loads(listed.stdout) if m["direction"] == "in"]
        assert [m["subject"] for m in received] == ["Installed"]
        # The acknowledgement lands in the outbox under the state folder.
        await wait_for(lambda: list((installed.state / "outbox").glob("*.eml")), timeout=10)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text("utf-8", "replace")
    # Nothing was written beside the config.
    assert sorted(p.name for p in installed.etc.iterdir()) == ["config.toml"]


def test_constraints_pin_every_dependency_within_its_range() -> None:
    # constraints.txt is what a deployment installs with (-c); a dependency added to
    # pyproject.toml without regenerating it, or a pin outside the declared range, would
    # make that install differ from the tested one or fail.
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name]), (text, str(pins[name]))


# The state rule, in-process: the same function the installed daemon runs above.


def test_state_directory_is_the_default_only_for_keys_not_given(tmp_path: Path) -> None:
    state = tmp_path / "state"
    environ = {"STATE_DIRECTORY": f"{state}:{tmp_path / 'second'}"}
    mailbox = {"mailbox": [{"address": "support@example.org", "unit": "support"}]}
    config = parse_config(mailbox, tmp_path / "etc" / "config.toml", environ)
    assert config.database_path == state / "gateway.db"
    assert config.outbox_path == state / "outbox"
    given = {**mailbox, "storage": {"database": "db/x.db"}}
    config = parse_config(given, tmp_path / "etc" / "config.toml", environ)
    assert config.database_path == tmp_path / "etc" / "db" / "x.db"
    assert config.outbox_path == state / "outbox"
    config = parse_config(mailbox, tmp_path / "etc" / "config.toml", {})
    assert config.database_path == tmp_path / "etc" / "var" / "gateway.db"
    with pytest.raises(ConfigError, match="STATE_DIRECTORY: must be an absolute path"):
        parse_config(mailbox, tmp_path / "config.toml", {"STATE_DIRECTORY": "relative"})


def test_check_writable_names_the_outbox_key(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    data = {
        "mailbox": [{"address": "support@example.org", "unit": "support"}],
        "delivery": {"directory": str(blocker / "outbox")},
    }
    config = parse_config(data, tmp_path / "config.toml", {})
    with pytest.raises(ConfigError, match=r"delivery\.directory: .*file is not a folder"):
        check_writable(config)
