"""The only SQL in gateway, one module per aggregate.

- `connection`: opening the database, the start-up checks; `migrations`: the schema and
  the SQL functions it calls; `errors`: StoreError and SQLite's result codes; `writer`:
  the group-commit Writer thread and the CLI's `write_transaction`; `reader`: the daemon's
  read-only aiosqlite connection, which the async read functions (`outbox.due_mail`,
  `messages.fetch_raw`, ...) take.
- The aggregates: `messages` (stored messages, attachments, duplicates, filing),
  `tickets` (tickets, participants, notes, TicketQueries, the reply-token secret),
  `senders` (senders and organisations, grants, blocks, look-alike search), `quarantine`,
  `outbox` (and undeliverable addresses), `events` (the audit trail).

No module here imports a stage (tests/test_layering.py): only `model` and the pure text
helper `lookalike`. This module re-exports what the rest of the code base used as
`store.X` when the store was one file.
"""

# Re-exports for existing callers: new code should import from the submodule.
from .connection import (
    connect,
)
from .errors import (
    SQLITE_BUSY,
    SQLITE_LOCKED,
    DatabaseRefused,
    StoreError,
    StoreFull,
)
from .events import (
    EventAction,
    list_events,
    record_event,
)
from .messages import (
    Filing,
    StoredAttachment,
    StoredMessage,
    count_inbound_from,
    find_duplicate,
    first_inbound_with_message_id,
    insert_message,
    insert_planned_mail,
    list_messages,
    outgoing_message,
    read_raw,
    set_filing,
    store_built_mail,
    stored_message_from_row,
)
from .migrations import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    add_sql_functions,
)
from .outbox import (
    OUTBOX_STATUSES,
    OutboxMail,
    count_admin_notices,
    count_automatic_mail,
    find_outbox,
    is_undeliverable,
    list_outbox,
    mark_outbox_failed,
    mark_outbox_retry,
    mark_outbox_sent,
    mark_undeliverable,
    queue_mail,
    retry_outbox,
)
from .quarantine import (
    count_held,
    decide_held,
    expire_held,
    held_for_loop_since,
    held_message,
    hold_message,
    list_quarantine,
)
from .senders import (
    Organisation,
    SenderEntry,
    add_org_domain,
    add_organisation,
    block_sender,
    count_organisation_tickets,
    find_lookalike,
    find_organisation,
    find_sender,
    list_organisations,
    list_senders,
    organisation_for_domain,
    organisation_unit,
    remove_org_domain,
    remove_organisation,
    remove_sender,
    sender_record,
    update_organisation,
    upsert_sender,
)
from .tickets import (
    TicketQueries,
    UpsetState,
    add_participant,
    calm_ticket,
    create_ticket,
    desk_counts,
    list_tickets,
    mark_upset,
    set_acknowledged,
    set_last_public_update,
    set_ticket_organisation,
    set_ticket_owner,
    set_ticket_status,
    set_upset_notified,
    show_ticket,
    ticket_account_manager,
    ticket_acknowledged,
    ticket_desk_info,
    ticket_mail_info,
    ticket_participants,
    ticket_units,
    token_secret,
    update_ticket,
    upset_state,
)
from .writer import (
    Writer,
    write_transaction,
)

# Grouped by submodule (like the imports above), not in one alphabetical run.
__all__ = [  # noqa: RUF022
    # .errors
    "DatabaseRefused",
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "StoreError",
    "StoreFull",
    # .migrations
    "APPLICATION_ID",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "add_sql_functions",
    # .connection
    "connect",
    # .writer
    "Writer",
    "write_transaction",
    # .messages
    "Filing",
    "StoredAttachment",
    "StoredMessage",
    "count_inbound_from",
    "find_duplicate",
    "first_inbound_with_message_id",
    "insert_message",
    "insert_planned_mail",
    "list_messages",
    "outgoing_message",
    "read_raw",
    "set_filing",
    "store_built_mail",
    "stored_message_from_row",
    # .tickets
    "TicketQueries",
    "add_participant",
    "create_ticket",
    "desk_counts",
    "list_tickets",
    "set_acknowledged",
    "set_last_public_update",
    "UpsetState",
    "calm_ticket",
    "mark_upset",
    "set_upset_notified",
    "upset_state",
    "ticket_account_manager",
    "ticket_participants",
    "set_ticket_organisation",
    "set_ticket_owner",
    "set_ticket_status",
    "show_ticket",
    "ticket_acknowledged",
    "ticket_desk_info",
    "ticket_mail_info",
    "ticket_units",
    "token_secret",
    "update_ticket",
    # .senders
    "Organisation",
    "SenderEntry",
    "add_org_domain",
    "add_organisation",
    "block_sender",
    "count_organisation_tickets",
    "find_lookalike",
    "find_organisation",
    "find_sender",
    "list_organisations",
    "list_senders",
    "organisation_for_domain",
    "organisation_unit",
    "remove_org_domain",
    "remove_organisation",
    "remove_sender",
    "sender_record",
    "update_organisation",
    "upsert_sender",
    # .quarantine
    "count_held",
    "decide_held",
    "expire_held",
    "held_for_loop_since",
    "held_message",
    "hold_message",
    "list_quarantine",
    # .outbox
    "OUTBOX_STATUSES",
    "OutboxMail",
    "count_admin_notices",
    "count_automatic_mail",
    "find_outbox",
    "is_undeliverable",
    "list_outbox",
    "mark_outbox_failed",
    "mark_outbox_retry",
    "mark_outbox_sent",
    "mark_undeliverable",
    "queue_mail",
    "retry_outbox",
    # .events
    "EventAction",
    "list_events",
    "record_event",
]
