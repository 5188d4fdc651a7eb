"""The one error every action raises."""

from __future__ import annotations


class ActionError(Exception):
    """An action cannot be done; the message says why, for the person who asked (the CLI
    prints it as `gateway: <message>` and exits 1)."""
