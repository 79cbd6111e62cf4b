"""The inbox: messages the sources delivered, waiting for the intake thread, taken in groups.

Sources' network threads `put` each message; the intake thread `take`s a group: the first
message, then what arrives within the commit window, ending early at a group's limits (messages,
bytes, messages of one source) or at a control item (a reload). The intake thread sleeps through
the window and is woken once, when the window ends or a limit is reached, not for every message:
at a site's 45 uplinks a second, a wake-up per message (a lock handed from a network thread to
the intake thread and back) was the largest single cost of both threads (docs/benchmarks.md).

What waits is bounded in bytes: past `max_bytes`, `put` waits until a group is taken
(back-pressure: the broker keeps what it has not sent us).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.sources import Delivery

#: `put` rechecks that the inbox is open this often while it waits for room.
ROOM_RECHECK_S = 0.5


@dataclass(frozen=True)
class Limits:
    """Where a group ends before its window does."""

    #: Messages in one group.
    messages: int
    #: Bytes (`weight`) of the messages in one group.
    bytes: int
    #: Messages of one source in one group: its broker sends no more while they are unacked.
    per_source: int


class Inbox:
    """Deliveries and control items in arrival order; groups of deliveries out."""

    def __init__(self, limits: Limits, max_bytes: int, weight: Callable[[Delivery], int]) -> None:
        self.limits = limits
        self.max_bytes = max_bytes
        self._weight = weight
        lock = threading.Lock()
        self._ready = threading.Condition(lock)  # the intake thread waits here
        self._room = threading.Condition(lock)  # sources wait here while the inbox is full
        self._items: deque[Delivery | object] = deque()
        #: Of what is queued: the bytes of the messages, messages by source, control items.
        self._bytes = 0
        self._by_source: dict[str, int] = {}
        self._controls = 0
        #: What the intake thread waits for: None (it is busy), "first" (any item), "cut" (the
        #: end of its group: a limit or a control item; the window's end it times itself).
        self._waiting: str | None = None
        self._closed = False
        #: Times a `put` woke the intake thread (for tests and benches: once a group, not once a message).
        self.wakeups = 0

    @property
    def queued(self) -> int:
        """Items waiting (deliveries and control items)."""
        with self._ready:
            return len(self._items)

    def put(self, delivery: Delivery) -> bool:
        """Queue a message, waiting while the inbox holds `max_bytes` already; False when the
        inbox was closed (the message is not queued and will not be acked)."""
        size = self._weight(delivery)
        with self._ready:
            while self._bytes > self.max_bytes and not self._closed:
                self._room.wait(ROOM_RECHECK_S)
            if self._closed:
                return False
            self._items.append(delivery)
            self._bytes += size
            n = self._by_source[delivery.source_name] = self._by_source.get(delivery.source_name, 0) + 1
            if self._waiting == "first" or (
                self._waiting == "cut"
                and (
                    len(self._items) >= self.limits.messages
                    or self._bytes >= self.limits.bytes
                    or n >= self.limits.per_source
                )
            ):
                self._waiting = None
                self.wakeups += 1
                self._ready.notify()
        return True

    def put_control(self, item: object) -> None:
        """Queue a control item: it ends the group being collected, and `take` returns it."""
        with self._ready:
            self._items.append(item)
            self._controls += 1
            self._waiting = None
            self._ready.notify()

    def close(self) -> None:
        """No more puts; the group being collected ends now (what is queued stays unacked)."""
        with self._ready:
            self._closed = True
            self._waiting = None
            self._ready.notify_all()
            self._room.notify_all()

    def take(self, window_s: float, wait_s: float | None) -> tuple[list[Delivery], object | None]:
        """The next group and the control item that ended it, if one did.

        Waits up to `wait_s` (None: for ever) for a first item; a control item first comes
        alone, with no group. A group is the first message and what follows it within
        `window_s`, up to the first limit reached or control item; what queued meanwhile is
        taken at once. Returns ([], None) when nothing came or the inbox was closed empty.
        """
        with self._ready:
            deadline = None if wait_s is None else time.monotonic() + wait_s
            while not self._items and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._waiting = "first"
                self._ready.wait(left)
            self._waiting = None
            if not self._items:
                return [], None
            if not isinstance(self._items[0], Delivery):
                self._controls -= 1
                return [], self._items.popleft()
            window_ends = time.monotonic() + window_s
            while not self._cut():
                left = window_ends - time.monotonic()
                if left <= 0:
                    break
                self._waiting = "cut"
                self._ready.wait(left)
            self._waiting = None
            return self._group()

    def _cut(self) -> bool:
        """True when the group to take ends before its window: a limit or a control item is
        queued, or the inbox is closed. Counts over the whole queue: each limit grows with a
        group's length, so the queue reaches one exactly when some group of its head does."""
        limits = self.limits
        return (
            self._closed
            or self._controls > 0
            or len(self._items) >= limits.messages
            or self._bytes >= limits.bytes
            or max(self._by_source.values(), default=0) >= limits.per_source
        )

    def _group(self) -> tuple[list[Delivery], object | None]:
        """Pop the head's group (under the lock): messages up to a limit or a control item."""
        group: list[Delivery] = []
        weight = 0
        by_source: dict[str, int] = {}
        control = None
        limits = self.limits
        while self._items:
            item = self._items.popleft()
            if not isinstance(item, Delivery):
                self._controls -= 1
                control = item
                break
            group.append(item)
            size = self._weight(item)
            weight += size
            self._bytes -= size
            name = item.source_name
            left = self._by_source[name] - 1
            if left:
                self._by_source[name] = left
            else:
                del self._by_source[name]
            n = by_source[name] = by_source.get(name, 0) + 1
            if len(group) >= limits.messages or weight >= limits.bytes or n >= limits.per_source:
                break
        self._room.notify_all()
        return group, control


__all__ = ["Inbox", "Limits"]
