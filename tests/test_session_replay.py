"""Behaviour unchanged (issue 10's check): the recorded session replays byte for byte.

`tests/session_replay.py` runs 200 messages over real SMTP and 50 admin commands through
the real CLI against the real daemon; `tests/golden/session.json` is its recording on the
code before the restructuring. Every SMTP reply line and every command's exit status,
stdout and stderr must come out the same, after normalising only what is random or
time-based (queue ids, our Message-IDs, reply-token macs, times, ports, the tmp folder,
the OS user). On a difference the test prints a unified diff of the first differing
steps. After an intended change of behaviour: `python -m tests.session_replay --record`,
and say in the commit which steps changed and why.
"""

from __future__ import annotations

from pathlib import Path

from .session_replay import (
    COMMANDS,
    MESSAGES,
    NORMALISERS,
    Normaliser,
    differences,
    load_golden,
    run_session,
)


def test_the_recorded_session_replays_byte_for_byte(tmp_path: Path) -> None:
    recorded = load_golden()
    assert sum(s["step"].startswith("M") for s in recorded) == MESSAGES
    assert sum(s["step"].startswith("C") for s in recorded) == COMMANDS
    replayed = run_session(tmp_path)
    diff = differences(recorded, replayed)
    assert not diff, "the session differs from its recording:\n" + diff


def test_normalisation_blanks_only_what_is_random() -> None:
    """Each named pattern rewrites its own kind of value and leaves its neighbours alone."""
    n = Normaliser(tmp="/tmp/gateway-session-x", run_days=("2030-01-02",), user="someone")
    assert [name for name, _ in NORMALISERS] == [
        "due_time", "what_next", "queue_id", "tempfail_ref", "our_message_id", "reply_token_mac",
        "peer_port", "time", "due_time_in_tables", "tmp_path", "cli_user",
    ]  # fmt: skip
    text = (
        "250 2.0.0 Ok: queued as 0123456789abcdef | queued as fedcba9876543210 | "
        '"queue_id": "0123456789abcdef" | (ref 0123456789ab) | '
        "<gw.t12.0123456789abcdef0123@support.example.org> | support+t12-abcdefgh23@example.org | "
        "127.0.0.1:40123 | 2030-01-02T10:11:12.123456+00:00 | 2030-01-02 10:11 | "
        "Wed, 02 Jan 2030 10:11:12 +0000 | Sun, 09 Sep 2001 10:00:00 +0000 | "
        "2001-09-09T10:00:00.000000+00:00 | /tmp/gateway-session-x/var | cli:someone | "
        "<s001@session.example.com> | sha 0123456789abcdef0123456789abcdef"
    )
    assert n(text) == (
        "250 2.0.0 Ok: queued as <queue-id-1> | queued as <queue-id-2> | "
        '"queue_id": "<queue-id-1>" | (ref <ref>) | '
        "<gw.t12.<1>@support.example.org> | support+t12-<mac>@example.org | "
        "127.0.0.1:<port> | <time> | <time> | "
        "<date> | Sun, 09 Sep 2001 10:00:00 +0000 | "
        "2001-09-09T10:00:00.000000+00:00 | <tmp>/var | cli:<user> | "
        "<s001@session.example.com> | sha 0123456789abcdef0123456789abcdef"
    )
    # A time on a day the run did not span is an input, not the run's clock: kept.
    assert n("2030-01-03T00:00:00.000000+00:00") == "2030-01-03T00:00:00.000000+00:00"
    # A promise's due time is business time after the run's clock, on any day: blanked.
    due = '"next_update_due": "2030-01-07T13:00:00.000000+00:00", "due": '
    assert n(due + '"2030-01-07T13:00:00.000000+00:00"') == (
        '"next_update_due": "<due>", "due": "<due>"'
    )
    # In a text table, to the minute: a due time on a later day reads as one on the day.
    assert n("#37  new  2030-01-07 13:00  a@b") == "#37  new  <time>  a@b"
    # Seconds are not a table's due time: kept.
    assert n("2030-01-07 13:00:05") == "2030-01-07 13:00:05"
    # What the acknowledgement says happens next depends on the clock: up to its blank line.
    assert n("ok.\\n\\nWhat happens next: our desk is closed now;\\nit opens.\\n\\nWant") == (
        "ok.\\n\\nWhat happens next: <what-next>\\n\\nWant"
    )


def test_a_difference_is_shown_as_a_diff_of_the_first_steps() -> None:
    recorded = [{"step": f"M{i:03d}", "lines": ["S: 250 2.0.0 Ok"]} for i in range(5)]
    replayed = [dict(s) for s in recorded]
    replayed[3] = {"step": "M003", "lines": ["S: 250 2.0.0 OK"]}
    diff = differences(recorded, replayed)
    assert diff.startswith("1 of 5 recorded steps differ; the first 1:")
    assert "-S: 250 2.0.0 Ok\n+S: 250 2.0.0 OK" in diff
    assert differences(recorded, recorded) == ""
