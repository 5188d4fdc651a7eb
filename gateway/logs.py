"""One log line per event on stdout, as ``key=value`` fields, for journald.

A message's story is told by lines that all carry its ``queue_id``. Values with spaces,
quotes or control characters are JSON-quoted, so a hostile Subject cannot forge a line.

Under systemd (stdout is the journal stream named by ``$JOURNAL_STREAM``) each line starts
with its syslog priority, ``<N>`` (sd-daemon(3)), so that journald stores it as the
line's PRIORITY and ``journalctl -p warning`` shows retries, failures and floods.
"""

from __future__ import annotations

import json
import logging
import os
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


# sd-daemon(3) / syslog(3) priorities of our levels: debug 7, info 6, warning 4, error 3,
# critical 2.
_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between ours round to the lower)."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITIES[level]
    return 7


class _Formatter(logging.Formatter):
    def __init__(self, syslog_prefix: bool = False) -> None:
        super().__init__()
        self.syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        line = f"level={record.levelname.lower()} {record.getMessage()}"
        if record.exc_info:
            # Tracebacks stay one event: the lines are joined into one quoted field.
            line += " traceback=" + format_value(self.formatException(record.exc_info))
        if self.syslog_prefix:
            line = f"<{syslog_priority(record.levelno)}>{line}"
        return line


def on_journal(stream: IO[str], environ: dict[str, str] | None = None) -> bool:
    """Whether `stream` is the journal's: sd-daemon(3) says to compare the device and
    inode in $JOURNAL_STREAM ("DEV:INO") with the stream's, because a child whose output
    was redirected elsewhere inherits the variable too."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


def configure(
    level: str = "info", stream: IO[str] | None = None, syslog_prefix: str = "auto"
) -> None:
    """Log to `stream` (stdout); `syslog_prefix` ([log] syslog_prefix): "auto" prefixes
    each line with its ``<N>`` priority when the stream is the journal's, "always" and
    "never" decide regardless."""
    out = stream or sys.stdout
    prefix = syslog_prefix == "always" or (syslog_prefix == "auto" and on_journal(out))
    handler = logging.StreamHandler(out)
    handler.setFormatter(_Formatter(prefix))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
