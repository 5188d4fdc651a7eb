"""One log line per event on stdout, as ``key=value`` fields, for journald.

A message's story is told by lines that all carry its ``queue_id``. Values with spaces,
quotes or control characters are JSON-quoted, so a hostile Subject cannot forge a line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import IO

LOGGER_NAME = "gateway"
log = logging.getLogger(LOGGER_NAME)

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:/@+<>[],#")
# The same test as `text and all(c in _PLAIN for c in text)`, in C: a dozen values a message
# at level info, where the generator cost ~1 us each.
_PLAIN_TEXT = re.compile(r"[a-zA-Z0-9.\-_:/@+<>\[\],#]+")


def format_value(value: object) -> str:
    text = str(value)
    if _PLAIN_TEXT.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def event(name: str, level: int = logging.INFO, /, **fields: object) -> None:
    """Log one event: ``event=name key=value ...`` (None values are left out)."""
    if not log.isEnabledFor(level):
        return
    parts = [f"event={name}"]
    parts.extend(f"{k}={format_value(v)}" for k, v in fields.items() if v is not None)
    log.log(level, " ".join(parts))


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"level={record.levelname.lower()} {record.getMessage()}"
        if record.exc_info:
            # Tracebacks stay one event: the lines are joined into one quoted field.
            line += " traceback=" + format_value(self.formatException(record.exc_info))
        return line


def configure(level: str = "info", stream: IO[str] | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
