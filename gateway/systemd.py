"""systemd's notify protocol (READY=1, STATUS=, WATCHDOG=1, STOPPING=1), when NOTIFY_SOCKET is set.

A datagram to a Unix socket: a few lines, not worth a dependency.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends sd_notify messages; does nothing when not run by systemd."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self._address = address
        usec = os.environ.get("WATCHDOG_USEC")
        #: How often to send WATCHDOG=1 (half the watchdog interval), or None.
        self.watchdog_interval_s = int(usec) / 2_000_000 if usec and usec.isdigit() else None

    @property
    def enabled(self) -> bool:
        """True when run under systemd with Type=notify."""
        return bool(self._address)

    def notify(self, *lines: str) -> None:
        """Send `KEY=value` lines in one datagram; errors are ignored (best effort).

        Never blocks: the main loop calls this, and a receiver that does not read (its queue
        of datagrams full) must not stop the gateway; the message is dropped instead.
        """
        if not self._address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self._address)
        except OSError:
            pass
