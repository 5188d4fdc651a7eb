"""Tell systemd about the daemon's state (READY, STOPPING, STATUS, WATCHDOG) over NOTIFY_SOCKET.

A notification is a courtesy to the service manager: sending must never raise into the
daemon and never block the event loop, so failures are logged once and otherwise ignored.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("gateway")


class SystemdNotifier:
    """Send sd_notify(3) datagrams; every call is a no-op when there is no socket to send to."""

    def __init__(self, socket_path: str | None = None) -> None:
        path = os.environ.get("NOTIFY_SOCKET") if socket_path is None else socket_path
        # sd_notify(3): a path starting with "@" names a socket in the abstract namespace,
        # which the kernel spells with a leading NUL byte.
        if path and path.startswith("@"):
            path = "\0" + path[1:]
        self._address = path or None
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str = "") -> None:
        self._send("READY=1", status)

    def stopping(self, status: str = "") -> None:
        self._send("STOPPING=1", status)

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def status(self, text: str) -> None:
        self._send(None, text)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, state: str | None, status: str = "") -> None:
        if self._address is None:
            return
        lines = [state] if state else []
        if status:
            # One assignment per line: a newline inside the text (it may quote a client)
            # would otherwise smuggle in another assignment such as READY=1.
            lines.append("STATUS=" + " ".join(status.splitlines()))
        if not lines:
            return
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full receive queue must cost us a dropped notification, not a stalled loop.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "event=sd_notify_failed socket=%r error=%r (further failures not logged)",
                    self._address,
                    exc,
                )


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Return how often to send WATCHDOG=1 (half of WatchdogSec, in seconds), or None if off.

    Follows sd_watchdog_enabled(3): WATCHDOG_PID, when set, must name this process, so a
    child that inherited the environment does not ping on the parent's behalf.
    """
    pid = env.get("WATCHDOG_PID")
    try:
        if pid is not None and int(pid) != os.getpid():
            return None
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000
