"""Actions: what a person or the daemon does, one module per aggregate.

Mail (the pipeline), the CLI and the scheduler call the same function for the same deed,
and that function writes the deed's audit event, with its `EventAction` and the one shape
of detail its builder gives. Actions take explicit arguments (the connection, the config
pieces they need, the clock's stamp, the actor), run inside the caller's transaction, and
raise `ActionError` with a message the CLI prints as it is.

- `tickets`: a staff reply or note, a status change, a new or reopened ticket.
- `senders`: organisations and senders (authorise, update, remove, block, grant, import).
- `quarantine`: release, discard, block and expiry of held mail.
- `mail`: writing the mail and withheld notices a plan returns (notify.Planner plans only).
"""

from .errors import ActionError

__all__ = ["ActionError"]
