"""Where batches go: AWS IoT Core (MQTT 5, mTLS) or a directory of files.

A publisher takes a `Batch` and later calls `done(seq, PublishResult)` from any thread; the
service confirms the batch in the buffer only when the result is a success.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.model import Batch

#: PUBACK reason codes that mean the message was accepted: 0x00 success, and 0x10 "no
#: matching subscribers", which brokers other than IoT Core send when nobody listens.
SUCCESS_CODES = frozenset({0x00, 0x10})


@dataclass(frozen=True, slots=True)
class PublishResult:
    """How one publish ended: accepted, or why not (MQTT reason code when there was one)."""

    ok: bool
    reason_code: int | None = None
    reason: str = ""

    def __str__(self) -> str:
        if self.ok:
            return "accepted"
        code = f"[code:{self.reason_code}] " if self.reason_code is not None else ""
        return f"{code}{self.reason}"


Done = Callable[[int, PublishResult], None]


class Publisher(Protocol):
    """What the service needs of a cloud."""

    #: Incremented on every (re)connection, so the service can tell backlog from live.
    epoch: int

    def start(self) -> None:
        """Begin connecting (in the background)."""

    def stop(self, timeout_s: float) -> None:
        """Disconnect and release resources, waiting at most `timeout_s`."""

    @property
    def connected(self) -> bool:
        """True while batches can be published."""

    def publish(self, batch: Batch, done: Done) -> None:
        """Publish one batch; `done` is called exactly once with the outcome."""
