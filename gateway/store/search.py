"""Full-text search over filed mail: SQLite FTS5 (https://www.sqlite.org/fts5.html).

`message_search` is an external-content FTS5 table over `messages` (subject, from_header,
text), keyed by the message id: the words are indexed, the text itself is read back from
`messages` only for the snippets of the results shown, so the index does not store every
message a second time. What is indexed: incoming mail filed into a ticket (a first copy,
not a duplicate), in the transaction that files it (`index_message`, called by
`messages.insert_message` and `messages.set_filing`). Held mail is not searchable until
it is released; outgoing mail is not indexed (its text is written later, by the delivery
worker, and an external-content row must never change under the index).

A database made before the index existed is indexed by a backfill: the migration records
the range of message ids to go through (meta `search_backfill_next` .. `_end`), and the
daemon indexes one bounded batch of it per tick (`backfill_batch`, a unit of the writer's
group commit like any other, so intake keeps its turn between batches) until the range is
done and the keys are removed. Meanwhile `tickets search` says how far it got.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .writer import Writer

log = logging.getLogger("gateway")

# bm25 weights per column, in the table's column order (subject, from_header, text): a
# word in the subject says more about what a ticket is about than the same word once in a
# long text. Kept as the table's persistent `rank` (set by the migration).
RANK_WEIGHTS = (4.0, 2.0, 1.0)

# Words either side of a hit in a snippet, and the marks around each hit.
SNIPPET_TOKENS = 12
SNIPPET_OPEN = "["
SNIPPET_CLOSE = "]"
SNIPPET_ELLIPSIS = "…"

# The generic error code (https://www.sqlite.org/rescode.html#error).
SQLITE_ERROR = 1

_NEXT_KEY = "search_backfill_next"
_END_KEY = "search_backfill_end"

# Only what a ticket's history shows: incoming mail filed into a ticket, first copies.
_INDEXED = "direction = 'in' AND ticket IS NOT NULL AND duplicate_of IS NULL"

_INSERT = (
    "INSERT INTO message_search (rowid, subject, from_header, text) "
    "SELECT id, subject, from_header, text FROM messages WHERE "
)


class SearchQueryError(ValueError):
    """The query is not valid FTS5 syntax (or names a column that does not exist)."""


def index_message(conn: sqlite3.Connection, message: int) -> None:
    """Index one message filed just now (the caller's transaction), if it is searchable."""
    conn.execute(_INSERT + f"id = ? AND {_INDEXED}", (message,))


def index_released(conn: sqlite3.Connection, message: int) -> None:
    """Index a message stored earlier and filed now (a release from the quarantine),
    unless the backfill has still to reach it: it would then be indexed twice."""
    state = _backfill_range(conn)
    if state is not None and state[0] <= message <= state[1]:
        return
    index_message(conn, message)


def _backfill_range(conn: sqlite3.Connection) -> tuple[int, int] | None:
    values = dict(
        conn.execute("SELECT key, value FROM meta WHERE key IN (?, ?)", (_NEXT_KEY, _END_KEY))
    )
    if _NEXT_KEY not in values or _END_KEY not in values:
        return None
    return int(values[_NEXT_KEY]), int(values[_END_KEY])


def backfill_batch(conn: sqlite3.Connection, batch: int) -> bool:
    """Index the next `batch` message ids of the backfill (in the caller's transaction);
    True while some are left. A batch reads at most `batch` rows (an id range of the
    primary key), however few of them are searchable."""
    state = _backfill_range(conn)
    if state is None:
        return False
    start, end = state
    upper = min(end, start + batch - 1)
    conn.execute(_INSERT + f"id BETWEEN ? AND ? AND {_INDEXED}", (start, upper))
    if upper >= end:
        conn.execute("DELETE FROM meta WHERE key IN (?, ?)", (_NEXT_KEY, _END_KEY))
        return False
    conn.execute("UPDATE meta SET value = ? WHERE key = ?", (str(upper + 1), _NEXT_KEY))
    return True


async def run_backfill(writer: Writer, batch: int, interval: float) -> None:
    """The daemon's backfill task: one batch per `interval` seconds until none is left.

    Each batch is a unit of the writer's group commit: intake units queued meanwhile are
    committed in the same transaction or the next, never behind the whole backfill.
    """
    while True:
        try:
            more = await writer.write(lambda conn: backfill_batch(conn, batch))
        except Exception as exc:  # the writer's fault (logged there): try again later
            log.warning("event=search.backfill_failed error=%s", json.dumps(str(exc)))
            more = True
        if not more:
            log.info("event=search.backfill_done")
            return
        await asyncio.sleep(interval)


def backfill_pending(conn: sqlite3.Connection) -> float | None:
    """How much of the backfill is done (0.0 to 1.0), or None when there is none left."""
    state = _backfill_range(conn)
    if state is None:
        return None
    start, end = state
    return max(0.0, min(1.0, (start - 1) / end)) if end > 0 else 1.0


def rebuild(conn: sqlite3.Connection) -> None:
    """Index every searchable message from scratch (bench/preload.py's bulk path, and a
    repair): drops the index's content and any backfill left."""
    conn.execute("INSERT INTO message_search (message_search) VALUES ('delete-all')")
    conn.execute(_INSERT + _INDEXED)
    conn.execute("DELETE FROM meta WHERE key IN (?, ?)", (_NEXT_KEY, _END_KEY))


@dataclass(frozen=True)
class SearchHit:
    number: int
    subject: str
    status: str
    organisation: str | None
    rank: int  # 1 for the best match
    score: float  # -bm25: higher is a better match
    snippet: str
    message: int  # messages.id of the best-matching message of the ticket
    message_id: str | None  # its Message-ID header

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "subject": self.subject,
            "status": self.status,
            "organisation": self.organisation,
            "rank": self.rank,
            "score": self.score,
            "snippet": self.snippet,
            "message": self.message,
            "message_id": self.message_id,
        }


# Step 1: the tickets, best first, each with its best message. `rank` is the table's
# configured bm25; the bare column `s.rowid` next to MIN() is the row of the minimum
# (https://www.sqlite.org/lang_select.html#bareagg).
_TICKETS_SQL = """
    SELECT m.ticket AS number, MIN(s.rank) AS best, s.rowid AS message
    FROM ({matches}) s
    JOIN messages m ON m.id = s.rowid
    JOIN tickets t ON t.number = m.ticket
    WHERE 1 {filters}
    GROUP BY m.ticket
    ORDER BY best, m.ticket DESC
    LIMIT ?
"""
# The best matching messages first: FTS5 keeps only the top N while ranking ("ORDER BY
# rank LIMIT N"), so a common word's hundred thousand matches are not each joined to
# their ticket. Only when these few give fewer tickets than asked for (filters that most
# matches fail) is every match read.
_MATCHES_SQL = "SELECT rowid, rank FROM message_search WHERE message_search MATCH ?"
_TOP_MATCHES = 50  # candidate messages per ticket asked for

# Step 2: the snippet of those messages only (snippet() costs a read of the text).
_SNIPPETS_SQL = f"""
    SELECT s.rowid AS message,
           snippet(message_search, -1, '{SNIPPET_OPEN}', '{SNIPPET_CLOSE}',
                   '{SNIPPET_ELLIPSIS}', {SNIPPET_TOKENS}) AS snippet
    FROM message_search s
    WHERE message_search MATCH ? AND s.rowid IN ({{marks}})
"""

_DETAILS_SQL = """
    SELECT t.number, t.subject, t.status, o.name AS organisation
    FROM tickets t LEFT JOIN organisations o ON o.id = t.organisation
    WHERE t.number IN ({marks})
"""


def search(
    conn: sqlite3.Connection,
    query: str,
    *,
    organisation: int | None = None,
    status: str | None = None,
    limit: int = 20,
) -> list[SearchHit]:
    """Tickets whose filed mail matches `query` (FTS5 syntax: words, "a phrase", prefix*,
    AND / OR / NOT, parentheses), best first, one hit per ticket."""
    filters = ""
    params: list[Any] = []
    if organisation is not None:
        filters += " AND t.organisation = ?"
        params.append(organisation)
    if status is not None:
        filters += " AND t.status = ?"
        params.append(status)
    params.append(limit)
    top = max(1000, limit * _TOP_MATCHES)
    try:
        capped = _TICKETS_SQL.format(
            matches=_MATCHES_SQL + " ORDER BY rank LIMIT ?", filters=filters
        )
        best = conn.execute(capped, [query, top, *params]).fetchall()
        if len(best) < limit:
            [[found]] = conn.execute(
                f"SELECT COUNT(*) FROM ({_MATCHES_SQL} LIMIT ?)", (query, top + 1)
            ).fetchall()
            if found > top:  # the cap left some out: read them all
                every = _TICKETS_SQL.format(matches=_MATCHES_SQL, filters=filters)
                best = conn.execute(every, [query, *params]).fetchall()
        if not best:
            return []
        messages = [int(r["message"]) for r in best]
        marks = ", ".join("?" * len(messages))
        snippets = {
            int(r["message"]): str(r["snippet"] or "")
            for r in conn.execute(_SNIPPETS_SQL.format(marks=marks), [query, *messages])
        }
    except sqlite3.OperationalError as exc:
        # FTS5 reports a bad query as a plain SQLITE_ERROR of the statement ("fts5: syntax
        # error near ...", "unterminated string", "no such column: x" for an `x:` column
        # filter); busy, locked or I/O errors have codes of their own and stay what they are.
        if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == SQLITE_ERROR:
            raise SearchQueryError(str(exc)) from None
        raise
    numbers = [int(r["number"]) for r in best]
    details = {
        int(r["number"]): r
        for r in conn.execute(_DETAILS_SQL.format(marks=", ".join("?" * len(numbers))), numbers)
    }
    header_ids = {
        int(r["id"]): r["message_id"]
        for r in conn.execute(
            f"SELECT id, message_id FROM messages WHERE id IN ({marks})", messages
        )
    }
    hits = []
    for position, row in enumerate(best, start=1):
        ticket = details[int(row["number"])]
        message = int(row["message"])
        hits.append(
            SearchHit(
                number=int(row["number"]),
                subject=str(ticket["subject"]),
                status=str(ticket["status"]),
                organisation=ticket["organisation"],
                rank=position,
                score=-float(row["best"]),
                snippet=snippets.get(message, ""),
                message=message,
                message_id=header_ids.get(message),
            )
        )
    return hits
