"""The notify protocol as the main loop uses it."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from gateway.systemd import Notifier


def test_notify_never_blocks_when_nobody_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the receiver's datagram queue full, notify drops the message and returns at once
    (a blocking send froze the main loop of a daemon whose notify socket was not read)."""
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notifier = Notifier()

    def flood() -> None:
        for n in range(2000):  # far beyond net.unix.max_dgram_qlen
            notifier.notify(f"STATUS=line {n}")

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(10)
    assert not sender.is_alive(), "notify blocked on a full datagram queue"
    assert receiver.recv(100) == b"STATUS=line 0"
    receiver.close()
