"""Speaking to systemd: the sd_notify(3) datagrams (READY=1, WATCHDOG=1, STATUS=, RELOADING=1,
STOPPING=1) to ``$NOTIFY_SOCKET`` (a path, or an abstract name written ``@name``), and log
lines for the journal (``<N>`` priority prefixes when stderr is ``$JOURNAL_STREAM``; the
journal adds name and pid itself). A few lines of our own instead of a dependency: the
protocol is one datagram of ``KEY=value`` lines. Without ``$NOTIFY_SOCKET`` every call is a
no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["JournalFormatter", "Notifier", "journal_priority", "stderr_is_journal"]

#: syslog priorities of the logging levels (sd-daemon.h SD_DEBUG .. SD_CRIT)
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def journal_priority(levelno: int) -> int:
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


class JournalFormatter(logging.Formatter):
    """``<4>message``: journald reads the priority from the prefix (``journalctl -p``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def stderr_is_journal(env: Mapping[str, str] = os.environ, fd: int = 2) -> bool:
    """Whether ``fd`` is the stream systemd connected to the journal (``JOURNAL_STREAM`` is
    ``device:inode`` of it; a child that redirected stderr must not use the prefixes)."""
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(fd)
        return bool(value) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


class Notifier:
    """The service manager's side channel. ``watchdog_interval`` is half of
    ``WATCHDOG_USEC`` (None: no watchdog wanted, or meant for another pid)."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self.sock: socket.socket | None = None
        self.watchdog_interval: float | None = None
        self.last_watchdog = float("-inf")
        path = env.get("NOTIFY_SOCKET", "")
        if path:
            addr = "\0" + path[1:] if path.startswith("@") else path
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                s.connect(addr)
                s.setblocking(False)  # a slow service manager must never stall the loop
                self.sock = s
            except OSError:
                self.sock = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, **fields: str | int) -> bool:
        """One datagram of ``KEY=value`` lines; False if it could not be sent."""
        if self.sock is None:
            return False
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            self.sock.send(text.encode())
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def reloading(self, monotonic_usec: int) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec)

    def stopping(self) -> None:
        self.send(STOPPING=1)

    def watchdog(self, now: float) -> None:
        """WATCHDOG=1 at most every half ``WatchdogSec`` (call it from the packet loop)."""
        if self.watchdog_interval is None or now - self.last_watchdog < self.watchdog_interval:
            return
        if self.send(WATCHDOG=1):
            self.last_watchdog = now

    def next_watchdog(self) -> float | None:
        if self.watchdog_interval is None or self.sock is None:
            return None
        return self.last_watchdog + self.watchdog_interval

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
