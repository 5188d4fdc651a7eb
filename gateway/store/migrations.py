"""The schema: its migrations, its version, the mark that makes a file ours.

Each entry of MIGRATIONS moves the schema from version N to N+1 (PRAGMA user_version).
The SQL functions the migrations call (`add_sql_functions`) are registered on every
connection that migrates, so a migration and the code compute the same values.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Iterator

from ..lookalike import skeleton
from .errors import StoreError

# Each entry moves the schema from version N to N+1 (PRAGMA user_version). Never edit an
# entry that has shipped; append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE messages (
        id           INTEGER PRIMARY KEY,
        queue_id     TEXT NOT NULL UNIQUE,
        received_at  TEXT NOT NULL,          -- ISO 8601, UTC
        mail_from    TEXT NOT NULL,          -- '' for the null reverse-path
        rcpt_to      TEXT NOT NULL,          -- JSON list of addresses
        peer         TEXT NOT NULL,
        helo         TEXT NOT NULL,
        size         INTEGER NOT NULL,
        sha256       TEXT NOT NULL,
        message_id   TEXT,                   -- the header as written, brackets included
        from_header  TEXT,
        subject      TEXT,
        date_header  TEXT,
        malformed    TEXT,                   -- NULL, or why it could not be parsed
        defects      TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX messages_by_message_id ON messages (message_id);
    CREATE INDEX messages_by_received_at ON messages (received_at);
    -- Raw bytes live apart so that listing messages never reads them.
    CREATE TABLE message_raw (
        message INTEGER PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
        raw     BLOB NOT NULL
    );
    """,
    # 2: tickets, threading, attachments, the audit trail.
    """
    CREATE TABLE tickets (
        number      INTEGER PRIMARY KEY AUTOINCREMENT,
        unit        TEXT NOT NULL,
        requester   TEXT NOT NULL,               -- normalised address
        subject     TEXT NOT NULL,
        status      TEXT NOT NULL DEFAULT 'new',
        priority    TEXT NOT NULL DEFAULT 'normal',
        follows     INTEGER REFERENCES tickets (number),  -- the closed ticket it follows up
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL
    );
    CREATE INDEX tickets_by_status ON tickets (status, updated_at);
    CREATE INDEX tickets_by_unit ON tickets (unit, updated_at);
    CREATE INDEX tickets_by_updated_at ON tickets (updated_at);
    -- Who may write to a ticket by its subject tag: its requester and every address
    -- that has written to it.
    CREATE TABLE participants (
        ticket   INTEGER NOT NULL REFERENCES tickets (number),
        address  TEXT NOT NULL,
        PRIMARY KEY (ticket, address)
    ) WITHOUT ROWID;
    ALTER TABLE messages ADD COLUMN direction TEXT NOT NULL DEFAULT 'in';
    ALTER TABLE messages ADD COLUMN sender TEXT;          -- normalised From address
    ALTER TABLE messages ADD COLUMN classification TEXT NOT NULL DEFAULT 'normal';
    ALTER TABLE messages ADD COLUMN reasons TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE messages ADD COLUMN kind TEXT;            -- client, staff, auto-reply, ...
    ALTER TABLE messages ADD COLUMN ticket INTEGER REFERENCES tickets (number);
    ALTER TABLE messages ADD COLUMN threaded_via TEXT;
    ALTER TABLE messages ADD COLUMN duplicate_of INTEGER REFERENCES messages (id);
    ALTER TABLE messages ADD COLUMN text TEXT;            -- readable, quotes stripped
    CREATE INDEX messages_by_ticket ON messages (ticket, id);
    -- Attachment bytes, content-addressed: the same file sent twice is stored once, and
    -- no file name from a mail ever becomes a path.
    CREATE TABLE blobs (
        sha256  TEXT PRIMARY KEY,
        size    INTEGER NOT NULL,
        data    BLOB NOT NULL
    );
    CREATE TABLE attachments (
        message       INTEGER NOT NULL REFERENCES messages (id),
        position      INTEGER NOT NULL,
        name          TEXT NOT NULL,            -- sanitised display name
        content_type  TEXT NOT NULL,
        size          INTEGER NOT NULL,
        sha256        TEXT NOT NULL REFERENCES blobs (sha256),
        PRIMARY KEY (message, position)
    );
    CREATE TABLE undeliverable (
        address     TEXT PRIMARY KEY,
        ticket      INTEGER REFERENCES tickets (number),
        message     INTEGER REFERENCES messages (id),   -- the bounce that said so
        status      TEXT,
        reason      TEXT NOT NULL,
        updated_at  TEXT NOT NULL
    );
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY,
        time     TEXT NOT NULL,
        actor    TEXT NOT NULL,        -- the OS user for the CLI, the sender for mail
        action   TEXT NOT NULL,        -- e.g. ticket.created, message.filed
        subject  TEXT NOT NULL,        -- what it is about, e.g. ticket:12
        ticket   INTEGER,
        detail   TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_by_ticket ON events (ticket, id);
    """,
    # 3: organisations, authorised senders, the quarantine.
    """
    CREATE TABLE organisations (
        id               INTEGER PRIMARY KEY,
        name             TEXT NOT NULL UNIQUE COLLATE NOCASE,
        unit             TEXT,                 -- NULL: the unit of the mailbox written to
        account_manager  TEXT,
        created_at       TEXT NOT NULL
    );
    -- An organisation's mail domains identify it; they authorise nobody by themselves.
    CREATE TABLE org_domains (
        domain        TEXT PRIMARY KEY,         -- lower-case A-label
        organisation  INTEGER NOT NULL REFERENCES organisations (id) ON DELETE CASCADE
    );
    -- One row per authorised address, or per whole domain ("@example.com") an admin
    -- authorised explicitly, or per blocked address (organisation may then be NULL).
    CREATE TABLE senders (
        address       TEXT PRIMARY KEY,         -- normalised; "@domain" for a domain
        organisation  INTEGER REFERENCES organisations (id) ON DELETE CASCADE,
        name          TEXT,
        blocked       INTEGER NOT NULL DEFAULT 0,
        skeleton      TEXT NOT NULL,            -- look-alike key (confusables folded)
        created_at    TEXT NOT NULL
    );
    CREATE INDEX senders_by_organisation ON senders (organisation);
    CREATE INDEX senders_by_skeleton ON senders (skeleton);
    ALTER TABLE tickets ADD COLUMN organisation INTEGER REFERENCES organisations (id);
    CREATE TABLE quarantine (
        id          INTEGER PRIMARY KEY,
        message     INTEGER NOT NULL UNIQUE REFERENCES messages (id),
        reasons     TEXT NOT NULL,              -- JSON list of kebab-case reasons
        status      TEXT NOT NULL DEFAULT 'held',  -- held, released, discarded, expired
        held_at     TEXT NOT NULL,
        decided_at  TEXT,
        decided_by  TEXT
    );
    CREATE INDEX quarantine_by_status ON quarantine (status, held_at);
    CREATE INDEX messages_by_sender ON messages (sender, received_at);
    """,
    # 4: outgoing mail. Every mail we send is a messages row (direction 'out', raw bytes
    # in message_raw, so replies thread by its Message-ID) plus one outbox row per
    # recipient that the delivery worker works through.
    """
    ALTER TABLE tickets ADD COLUMN mailbox TEXT;      -- the address it came to: our From
    ALTER TABLE tickets ADD COLUMN acknowledged INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE outbox (
        id               INTEGER PRIMARY KEY,
        message          INTEGER NOT NULL REFERENCES messages (id),
        ticket           INTEGER REFERENCES tickets (number),
        kind             TEXT NOT NULL,     -- acknowledgement, staff-reply, status-change, ...
        automatic        INTEGER NOT NULL,  -- 1: counts against the per-recipient caps
        mail_from        TEXT NOT NULL,     -- envelope sender; '' for automatic mail
        rcpt_to          TEXT NOT NULL,     -- one recipient per row
        subject          TEXT NOT NULL,
        message_id       TEXT NOT NULL,
        status           TEXT NOT NULL DEFAULT 'queued',  -- queued, sent, failed
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  TEXT NOT NULL,
        last_error       TEXT,
        created_at       TEXT NOT NULL,
        sent_at          TEXT
    );
    CREATE INDEX outbox_due ON outbox (status, next_attempt_at);
    CREATE INDEX outbox_by_recipient ON outbox (rcpt_to, automatic, created_at);
    CREATE INDEX outbox_by_ticket ON outbox (ticket, kind);
    """,
    # 5: mail is built by the delivery worker, not in the intake transaction: planning
    # keeps what to build (template, context, headers) and the worker stores the bytes
    # it built before it sends them.
    """
    CREATE TABLE mail_specs (
        message  INTEGER PRIMARY KEY REFERENCES messages (id),
        spec     TEXT NOT NULL           -- JSON: template, context and header values
    );
    """,
    # 6: look-alike skeletons from Unicode's confusables data (UTS #39) instead of a
    # hand-picked table: every stored skeleton is recomputed (gateway_skeleton() is
    # gateway.lookalike.skeleton, registered by migrate()).
    """
    UPDATE senders SET skeleton = gateway_skeleton(address);
    """,
    # 7: owners and commitments (issue 11). A ticket that waits on us has at most one
    # owner (a staff address) and a next_update_due (UTC ISO): the due time of its open
    # commitment, kept on the ticket so that lists and the desk sort and filter by an
    # index. Every promise is a commitments row: set (by the gateway's first-response rule,
    # a staff member's #next or the CLI), then met, missed or replaced. reminded_at and
    # escalated_at make each reminder and escalation happen once per promise, across
    # restarts: the scheduler sets them in the transaction that queues the mail.
    """
    ALTER TABLE tickets ADD COLUMN owner TEXT;
    ALTER TABLE tickets ADD COLUMN next_update_due TEXT;
    ALTER TABLE tickets ADD COLUMN last_public_update_at TEXT;
    CREATE INDEX tickets_by_owner ON tickets (owner, next_update_due);
    CREATE INDEX tickets_by_due ON tickets (next_update_due) WHERE next_update_due IS NOT NULL;
    CREATE TABLE commitments (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        ticket        INTEGER NOT NULL REFERENCES tickets (number),
        due           TEXT NOT NULL,               -- UTC ISO, business time already applied
        set_by        TEXT NOT NULL,               -- a staff address, or 'gateway'
        note          TEXT,
        state         TEXT NOT NULL DEFAULT 'open',  -- open, met, missed, replaced
        created_at    TEXT NOT NULL,
        closed_at     TEXT,                        -- when it was met, missed or replaced
        reminded_at   TEXT,
        escalated_at  TEXT
    );
    CREATE INDEX commitments_by_ticket ON commitments (ticket, id);
    CREATE INDEX commitments_open_by_due ON commitments (due) WHERE state = 'open';
    """,
    # 8: the loop rule counts only mail a sender really sent (filed, first copies: issue
    # 9), capped at the threshold. Over messages_by_sender that count walked every row of
    # the sender's last hour, held ones included, to find the few filed ones: a looping
    # sender whose mail is held made each of its messages cost more than the one before.
    # This index holds filed first copies only, so the count reads at most `cap` entries.
    """
    CREATE INDEX messages_filed_by_sender ON messages (sender, received_at)
        WHERE direction = 'in' AND kind IS NOT NULL AND duplicate_of IS NULL;
    """,
    # 9: urgency and upset clients (issue 12). tickets.priority exists since migration 2
    # ('normal' or 'urgent'); the reasons of each signal are kept as JSON lists, and
    # upset_notified_on (the unit's local date) makes the account manager's notice once per
    # ticket per day.
    """
    ALTER TABLE tickets ADD COLUMN urgency_reasons TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE tickets ADD COLUMN upset INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tickets ADD COLUMN upset_reasons TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE tickets ADD COLUMN upset_notified_on TEXT;
    CREATE INDEX tickets_by_priority ON tickets (priority, status) WHERE priority != 'normal';
    CREATE INDEX tickets_upset ON tickets (status) WHERE upset = 1;
    """,
    # 10: who is on call, and the pages sent (issue 12). A shift is a span of UTC time for
    # one address, for one unit or (unit NULL) the whole desk; `source` says where it came
    # from ('cli', or 'ical:<UID>' for an imported event, so a re-import replaces it).
    # A page is one row per ticket and step (0: the person on call, 1: the secondary,
    # 2: the unit's lead): UNIQUE makes each step happen once, across restarts, because
    # the row is written in the transaction that queues the page.
    """
    CREATE TABLE oncall_shifts (
        id          INTEGER PRIMARY KEY,
        address     TEXT NOT NULL,
        unit        TEXT,
        starts_at   TEXT NOT NULL,
        ends_at     TEXT NOT NULL,
        source      TEXT NOT NULL DEFAULT 'cli',
        created_by  TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        CHECK (ends_at > starts_at)
    );
    CREATE INDEX oncall_by_time ON oncall_shifts (starts_at, ends_at);
    ALTER TABLE organisations ADD COLUMN out_of_hours INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE pages (
        id               INTEGER PRIMARY KEY,
        ticket           INTEGER NOT NULL REFERENCES tickets (number),
        step             INTEGER NOT NULL,
        address          TEXT NOT NULL,
        reasons          TEXT NOT NULL DEFAULT '[]',
        sent_at          TEXT NOT NULL,
        ack_due          TEXT NOT NULL,
        acknowledged_at  TEXT,
        acknowledged_by  TEXT,
        UNIQUE (ticket, step)
    );
    CREATE INDEX pages_waiting ON pages (ack_due) WHERE acknowledged_at IS NULL;
    """,
    # 11: retention (issue 13). A message whose raw bytes, readable text and attachments
    # were removed (by [storage] retain_messages_days or the quarantine's expiry) keeps
    # its row, with purged_at saying when. The partial index holds only messages not yet
    # purged, so a pass reads the old ones still to purge, not the whole history; the
    # attachments' sha256 index lets the pass find blobs no attachment refers to.
    """
    ALTER TABLE messages ADD COLUMN purged_at TEXT;
    CREATE INDEX messages_unpurged ON messages (received_at) WHERE purged_at IS NULL;
    CREATE INDEX attachments_by_sha256 ON attachments (sha256);
    """,
    # 12: indexes for a desk with years of history (issue 14, bench/preload.py): each
    # listed query of the admin CLI reads through an index, not a scan of the table.
    # `quarantine list` filters by status and orders by id (newest first); `senders list
    # --org` and `orgs list` read an organisation's domains.
    """
    CREATE INDEX quarantine_by_status_id ON quarantine (status, id);
    CREATE INDEX org_domains_by_organisation ON org_domains (organisation);
    -- `desk` counts a unit's tickets by status, owner and due time: all four in the index,
    -- it never reads the table rows (years of closed tickets) themselves.
    CREATE INDEX tickets_desk ON tickets (unit, status, owner, next_update_due);
    """,
    # 13: full-text search over filed mail (issue 14, gateway/store/search.py). An
    # external-content FTS5 table over messages, keyed by the message id: the text is not
    # stored twice. Its persistent rank weighs the subject over the sender over the text
    # (search.RANK_WEIGHTS). Mail stored before this migration is indexed by the daemon's
    # backfill in batches, ids search_backfill_next .. search_backfill_end (meta), so the
    # migration itself stays instant on a database of a million messages.
    """
    CREATE VIRTUAL TABLE message_search USING fts5 (
        subject, from_header, text,
        content = 'messages', content_rowid = 'id',
        tokenize = 'unicode61 remove_diacritics 2'
    );
    INSERT INTO message_search (message_search, rank) VALUES ('rank', 'bm25(4.0, 2.0, 1.0)');
    INSERT INTO meta (key, value)
        SELECT 'search_backfill_end', CAST(MAX(id) AS TEXT) FROM messages
        HAVING MAX(id) IS NOT NULL;
    INSERT INTO meta (key, value)
        SELECT 'search_backfill_next', CAST(MIN(id) AS TEXT) FROM messages
        HAVING MIN(id) IS NOT NULL;
    """,
)


SCHEMA_VERSION = len(MIGRATIONS)

# "GWAY": marks the file as this gateway's database in the SQLite header
# (https://www.sqlite.org/fileformat.html#application_id), so that the file of another
# application is refused, never migrated into. Files made before it was set carry 0 and
# are recognised by their schema version and tables instead (`connection._check_identity`).
APPLICATION_ID = 0x47574159


def add_sql_functions(conn: sqlite3.Connection) -> None:
    # Migrations that recompute look-alike keys call the same function as the code.
    conn.create_function("gateway_skeleton", 1, skeleton, deterministic=True)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the database has not seen, and mark the file as ours, in one
    transaction; returns the schema version."""
    add_sql_functions(conn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database schema version {version} is newer than this gateway "
                f"({SCHEMA_VERSION}); upgrade gateway"
            )
        for number in range(version, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION


def _statements(script: str) -> Iterator[str]:
    # executescript() would COMMIT our transaction; split on complete statements instead.
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer
            buffer = ""


@functools.cache
def tables_of_version(version: int) -> frozenset[str]:
    """The tables a database of this schema version has: the migrations, run in memory."""
    with contextlib.closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        add_sql_functions(conn)
        for number in range(version):
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
        names = conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
        return frozenset(row[0] for row in names if not row[0].startswith("sqlite_"))
