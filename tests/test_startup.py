"""Start-up integrity: only our own, sound database is used; anything else stops the start.

A corrupt database used to report ready and answer `451` forever; an empty file was taken
for a new database, silently resetting tickets, senders and the reply-token secret. Each
bad file is tried with the real daemon (`gateway serve`, which must exit non-zero naming
the file and the fault, so systemd shows it) and with the admin CLI (exit 1, no
traceback), and must be left byte for byte as it was.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from gateway import store
from gateway.config import Config, load_config

from .conftest import ROOT, make_message, run_cli, seed_senders, send_message, write_config
from .test_durability import armed, wrapped_daemon

# A daemon that should refuse at once but starts instead would run until killed.
SERVE_TIMEOUT = 20


def serve(config: Config) -> subprocess.CompletedProcess[str]:
    """`gateway serve` on a database it must refuse: it has to exit by itself."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "--config", str(config.path), "serve"],
            capture_output=True,
            text=True,
            timeout=SERVE_TIMEOUT,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout
        raise AssertionError(f"gateway served on a bad database:\n{output}") from None


def fingerprint(path: Path) -> tuple[str, ...]:
    """The file's bytes, and which SQLite side files exist beside it."""
    data = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return (data, *sorted(p.name for p in path.parent.iterdir()))


def our_database(config: Config, rows: int = 200) -> Path:
    """A real gateway database with a few pages of data in the events table, closed (so
    checkpointed: everything is in the main file, no -wal)."""
    seed_senders(config)
    with closing(store.connect(config.database_path)) as conn, store.write_transaction(conn):
        for n in range(rows):
            store.record_event(
                conn,
                time="2026-11-27T00:00:00",
                actor="test",
                action="test.filler",
                subject=f"filler:{n}",
                ticket=None,
                detail={"text": "x" * 200},
            )
    return config.database_path


def foreign_database(path: Path, *pragmas: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE moz_places (id INTEGER PRIMARY KEY, url TEXT)")
        conn.execute("INSERT INTO moz_places (url) VALUES ('https://example.org/')")
        for pragma in pragmas:
            conn.execute(pragma)
        conn.commit()


def page_of(path: Path, table: str) -> tuple[int, int]:
    """(offset, size) of the root page of `table`."""
    with closing(sqlite3.connect(path)) as conn:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute(
            "SELECT rootpage FROM sqlite_schema WHERE name = ?", (table,)
        ).fetchone()[0]
    return (root - 1) * size, size


def corrupt_page(path: Path, table: str) -> None:
    offset, size = page_of(path, table)
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(bytes([0xA5]) * size)


def make_empty(config: Config) -> str:
    config.database_path.parent.mkdir(parents=True, exist_ok=True)
    config.database_path.write_bytes(b"")
    return "empty (0 bytes)"


def make_not_sqlite(config: Config) -> str:
    config.database_path.parent.mkdir(parents=True, exist_ok=True)
    config.database_path.write_bytes(b"From: a backup script that wrote the wrong file\n" * 50)
    return "not an SQLite database"


def make_other_application(config: Config) -> str:
    foreign_database(config.database_path, "PRAGMA application_id = 1598903374")
    return "another application (application_id 0x5f4d544e"


def make_unmarked_foreign(config: Config) -> str:
    foreign_database(config.database_path)
    return "not a gateway database (its tables are moz_places)"


def make_foreign_with_a_version(config: Config) -> str:
    # Another application that also counts its schema in user_version.
    foreign_database(config.database_path, "PRAGMA user_version = 3")
    return "not a gateway database (schema version 3, but no"


def make_truncated(config: Config) -> str:
    path = our_database(config)
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.truncate(size // 2 // 4096 * 4096)
    return "truncated"


def make_truncated_header(config: Config) -> str:
    path = our_database(config)
    with path.open("r+b") as file:
        file.truncate(60)
    return "truncated (60 bytes"


def make_corrupt(config: Config) -> str:
    # A data page, not the schema: SQLite opens the file happily, and only a check (or
    # the first write that needs the page) finds the damage.
    corrupt_page(our_database(config), "events")
    return "corrupt (quick_check:"


def make_newer(config: Config) -> str:
    path = our_database(config)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    return f"schema version {store.SCHEMA_VERSION + 1}, newer than this gateway knows"


def make_directory(config: Config) -> str:
    config.database_path.mkdir(parents=True)
    return "not a regular file"


BAD_FILES = [
    make_empty,
    make_not_sqlite,
    make_other_application,
    make_unmarked_foreign,
    make_foreign_with_a_version,
    make_truncated,
    make_truncated_header,
    make_corrupt,
    make_newer,
    make_directory,
]


@pytest.mark.parametrize("make", BAD_FILES, ids=lambda f: f.__name__.removeprefix("make_"))
def test_a_bad_database_stops_the_daemon_and_the_cli(
    config: Config, make: Callable[[Config], str]
) -> None:
    problem = make(config)
    path = config.database_path
    before = fingerprint(path)

    result = serve(config)
    assert result.returncode != 0
    # One line on stderr that names the file and what is wrong; the log says it too.
    assert f"gateway: {path}:" in result.stderr and problem in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "event=gateway.failed" in result.stdout
    assert "event=gateway.ready" not in result.stdout

    cli = run_cli(config, "tickets", "list")
    assert cli.returncode == 1, cli.stdout
    assert f"{path}:" in cli.stderr and problem in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr

    assert fingerprint(path) == before, "a refused database was changed"


async def test_a_new_database_is_made_only_where_no_file_exists(
    config: Config, start_gateway: Callable[..., Any]
) -> None:
    folder = config.database_path.parent
    assert not folder.exists()
    gateway = await start_gateway(config, seed=False)
    code, text = (
        await send_message(
            gateway.port, make_message(message_id="<first@client.example.com>"), check=False
        )
    ).reply
    assert code == 250, text
    with closing(sqlite3.connect(config.database_path)) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == store.APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    # Built under a temporary name and linked into place: nothing else is left behind.
    names = {p.name for p in folder.iterdir()}
    assert names <= {"gateway.db", "gateway.db-wal", "gateway.db-shm", "outbox"}, names


@pytest.mark.parametrize("version", range(1, store.SCHEMA_VERSION + 1))
def test_a_database_made_before_the_application_id_is_still_ours(
    config: Config, version: int
) -> None:
    # What every earlier gateway made: the migrations up to `version`, application_id 0.
    path = config.database_path
    path.parent.mkdir(parents=True)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        store.add_sql_functions(conn)
        for number in range(version):
            conn.executescript(store.MIGRATIONS[number])
        conn.execute(f"PRAGMA user_version = {version}")
    with closing(store.connect(path)) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == store.APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION


def test_two_processes_creating_the_database_at_once_share_one(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    script = (
        "import sys; from pathlib import Path; from gateway import store; "
        "c = store.connect(Path(sys.argv[1])); "
        "print(store.token_secret(c).hex()); c.commit(); c.close()"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(config.database_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=60) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    # One database, so one reply-token secret, whichever process made the file.
    assert len({out.strip() for out, _ in outputs}) == 1, outputs


@pytest.mark.parametrize("damage", ["corrupt", "gone"])
async def test_a_database_found_bad_while_running_stops_the_daemon(
    tmp_path: Path, damage: str
) -> None:
    # The daemon starts on a sound database; then a page it has cached goes bad on disk,
    # or the file is moved away. The next I/O error (injected: SIGUSR1) makes the writer
    # open the file again, which now fails the checks (or is not there, and must not be
    # made anew): the daemon must stop with exit 1, not answer 451 for ever.
    # No authorised senders: the mail is held, so no acknowledgement is planned and the
    # outbox worker makes no commit that could take the injected fault instead.
    config_path = write_config(tmp_path)
    config = load_config(config_path)
    wrapper = ["env", "GATEWAY_TEST_HOOKS=1"]
    log_path = tmp_path / "gateway.log"
    with wrapped_daemon(wrapper, config_path, log_path, exits_itself=True) as (proc, port, pid):
        code, text = (
            await send_message(
                port, make_message(message_id="<before@client.example.com>"), check=False
            )
        ).reply
        assert code == 250, text
        # The senders table is read, never written, by the intake: its page is not in
        # the WAL, so the damage is what a reopened connection reads.
        if damage == "corrupt":
            corrupt_page(config.database_path, "senders")
        else:
            config.database_path.rename(config.database_path.with_suffix(".moved"))
        await armed(log_path, pid)
        code, text = (
            await send_message(
                port, make_message(message_id="<fault@client.example.com>"), check=False
            )
        ).reply
        assert text.startswith("451 4.3.0"), text
        code, text = (
            await send_message(
                port, make_message(message_id="<after@client.example.com>"), check=False
            )
        ).reply
        assert text.startswith("451 4.3.0"), text
        exit_code = await asyncio.to_thread(proc.wait, 60)
    log = log_path.read_text("utf-8", "replace")
    assert exit_code == 1, log
    assert "event=gateway.database_failed" in log
    fault = {
        "corrupt": "refusing to use this database: it is corrupt",
        "gone": "the database file is gone",
    }[damage]
    assert f'error="{config.database_path}: {fault}' in log
    if damage == "gone":
        assert not config.database_path.exists(), "a new database was made while running"
