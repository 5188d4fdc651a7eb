"""config.toml: defaults, path resolution, and errors that name the key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, config_path, load_config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


MINIMAL = '[[mailbox]]\naddress = "support@example.org"\n'


def test_shipped_config_is_valid_and_matches_the_contract() -> None:
    config = load_config(ROOT / "config.toml")
    assert (config.smtp.host, config.smtp.port) == ("127.0.0.1", 2525)
    assert config.smtp.protocol == "smtp"
    assert config.smtp.max_message_size == 26_214_400
    assert config.smtp.max_recipients == 100
    assert (config.smtp.max_connections, config.smtp.max_connections_per_ip) == (100, 10)
    assert config.smtp.max_hops == 30
    assert config.database_path == ROOT / "var" / "gateway.db"
    assert [m.address for m in config.mailboxes] == ["support@example.org"]


def test_defaults_fill_a_minimal_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.smtp.timeout == 300
    assert config.smtp.tls_enabled is False
    assert config.mailboxes[0].unit == "support"
    assert config.storage.busy_timeout_ms == 5000


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[storage]\ndatabase = "state/x.db"\n')
    assert load_config(path).database_path == tmp_path / "state" / "x.db"


def test_config_path_precedence(tmp_path: Path) -> None:
    assert config_path("a.toml", {"GATEWAY_CONFIG": "b.toml"}).name == "a.toml"
    assert config_path(None, {"GATEWAY_CONFIG": "b.toml"}).name == "b.toml"
    assert config_path(None, {}).name == "config.toml"


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("[smtp]\nprot = 25\n" + MINIMAL, "smtp.prot", "unknown key"),
        ("[smpt]\nport = 25\n" + MINIMAL, "smpt", "unknown section"),
        ('[smtp]\nport = "25"\n' + MINIMAL, "smtp.port", "must be an integer"),
        ("[smtp]\nport = 70000\n" + MINIMAL, "smtp.port", "between 0 and 65535"),
        ('[smtp]\nprotocol = "esmtp"\n' + MINIMAL, "smtp.protocol", '"smtp" or "lmtp"'),
        ("[smtp]\nmax_recipients = 0\n" + MINIMAL, "smtp.max_recipients", "at least 1"),
        ('[smtp]\ntls_cert = "c.pem"\n' + MINIMAL, "smtp.tls_cert", "set together"),
        (
            '[smtp]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n' + MINIMAL,
            "smtp.tls_cert",
            "no such file",
        ),
        ("[smtp.command_limits]\nNOPE = 3\n" + MINIMAL, "smtp.command_limits.NOPE", "unknown"),
        ("", "mailbox", "at least one"),
        ('[[mailbox]]\naddress = "not an address"\n', "mailbox[0].address", "not a valid"),
        ('[[mailbox]]\naddress = "support+x@example.org"\n', "mailbox[0].address", "'+'"),
        (MINIMAL + MINIMAL.replace("support", "SUPPORT"), "mailbox[1].address", "twice"),
        ('[[mailbox]]\nunit = "x"\n', "mailbox[0].address", "required"),
        ("[smtp\n", "config.toml", "not valid TOML"),
    ],
)
def test_errors_name_the_key_and_the_reason(tmp_path: Path, text: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert key in str(info.value)
    assert why in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_mailbox_addresses_are_normalised(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[[mailbox]]\naddress = "Help@Example.ORG"\n'))
    assert config.mailboxes[0].address == "help@example.org"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = run_cli("--config", str(ROOT / "config.toml"), "check-config", cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert "ok" in good.stdout
    bad = write(tmp_path, "[smtp]\nhots = 'x'\n" + MINIMAL)
    result = run_cli("--config", str(bad), "check-config", cwd=tmp_path)
    assert result.returncode == 1
    assert "smtp.hots: unknown key" in result.stderr


def test_config_from_environment_and_working_directory(tmp_path: Path) -> None:
    write(tmp_path, '[smtp]\nport = "x"\n' + MINIMAL)
    # ./config.toml in the working directory is used when nothing else is given...
    result = run_cli("check-config", cwd=tmp_path)
    assert result.returncode == 1 and "smtp.port" in result.stderr
    # ...and $GATEWAY_CONFIG wins over it.
    env_result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"GATEWAY_CONFIG": str(ROOT / "config.toml"), "PATH": "/usr/bin:/bin"},
    )
    assert env_result.returncode == 0, env_result.stderr


def test_check_config_checks_the_templates(tmp_path: Path) -> None:
    folder = tmp_path / "mytemplates"
    shutil.copytree(ROOT / "templates", folder)
    path = write(tmp_path, MINIMAL + '[templates]\ndirectory = "mytemplates"\n')
    assert run_cli("--config", str(path), "check-config", cwd=tmp_path).returncode == 0
    target = folder / "acknowledgement.txt"
    target.write_text(target.read_text().replace("ticket.tag", "tiket.tag", 1))
    result = run_cli("--config", str(path), "check-config", cwd=tmp_path)
    assert result.returncode == 1
    assert "template error" in result.stderr and "acknowledgement.txt" in result.stderr
    assert "Traceback" not in result.stderr
