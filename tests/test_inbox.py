"""The inbox between the sources' network threads and the intake thread: groups, limits, wake-ups."""

from __future__ import annotations

import threading
import time

from gateway.inbox import Inbox, Limits
from gateway.sources import Delivery

LIMITS = Limits(messages=100, bytes=10_000, per_source=10)


def message(n: int, source: str = "cs", size: int = 10) -> Delivery:
    return Delivery(source, f"t/{n}", b"x" * size, n, lambda: None)


def weight(d: Delivery) -> int:
    return len(d.payload)


def inbox(limits: Limits = LIMITS, max_bytes: int = 1_000_000) -> Inbox:
    return Inbox(limits, max_bytes, weight)


def test_a_group_collected_over_the_window_wakes_the_taker_once_not_per_message() -> None:
    """Messages arriving one by one within the commit window form one group, and the thread
    taking it is woken at most once (for the first), not once a message."""
    box = inbox(Limits(messages=100, bytes=10_000, per_source=100))
    got: list[list[Delivery]] = []
    taker = threading.Thread(target=lambda: got.append(box.take(window_s=1.5, wait_s=10)[0]))
    taker.start()
    time.sleep(0.1)  # the taker waits for a first message
    for n in range(20):
        box.put(message(n))
        time.sleep(0.005)
    taker.join(10)
    assert [d.received_ms for d in got[0]] == list(range(20))
    assert box.wakeups <= 1


def test_a_group_ends_at_the_per_source_limit_without_waiting_the_window() -> None:
    """A source that reached its limit of unacked messages ends the group at once (a 30 s
    window is not waited out); the messages after the limit stay for the next group."""
    box = inbox()
    result: list[tuple[list[Delivery], object | None]] = []
    taker = threading.Thread(target=lambda: result.append(box.take(window_s=30, wait_s=10)))
    taker.start()
    time.sleep(0.05)
    started = time.monotonic()
    for n in range(5):
        box.put(message(n, "other"))
    for n in range(12):
        box.put(message(100 + n, "cs"))
    taker.join(10)
    assert time.monotonic() - started < 5
    group, control = result[0]
    assert control is None
    assert [d.received_ms for d in group] == [0, 1, 2, 3, 4, *range(100, 110)]
    assert [d.received_ms for d in box.take(window_s=0, wait_s=0)[0]] == [110, 111]


def test_a_group_ends_at_the_message_and_byte_limits() -> None:
    """Groups are cut at `messages` and at `bytes` (the message that reaches the bound is the
    group's last), in arrival order, without waiting out the window."""
    box = inbox(Limits(messages=3, bytes=250, per_source=100))
    for n in range(4):
        box.put(message(n))
    assert [d.received_ms for d in box.take(window_s=30, wait_s=0)[0]] == [0, 1, 2]
    box.put(message(5, size=300))
    box.put(message(6))
    started = time.monotonic()
    assert [d.received_ms for d in box.take(window_s=30, wait_s=0)[0]] == [3, 5]  # 310 bytes
    assert time.monotonic() - started < 5
    assert [d.received_ms for d in box.take(window_s=0, wait_s=0)[0]] == [6]


def test_a_control_item_ends_the_group_and_comes_back_with_it() -> None:
    """A control item (a reload) queued during the window ends the group at once and is
    returned with it; one that comes first is returned alone."""
    box = inbox()
    reload = object()
    box.put_control(reload)
    assert box.take(window_s=30, wait_s=0) == ([], reload)
    box.put(message(1))
    box.put_control(reload)
    box.put(message(2))
    started = time.monotonic()
    group, control = box.take(window_s=30, wait_s=0)
    assert time.monotonic() - started < 5
    assert [d.received_ms for d in group] == [1]
    assert control is reload
    assert [d.received_ms for d in box.take(window_s=0, wait_s=0)[0]] == [2]


def test_close_ends_the_window_and_refuses_later_messages() -> None:
    """Closing (the daemon stops) ends the window being waited at once, with what came so far;
    a message put after that is refused (not queued, so never acked: the broker keeps it)."""
    box = inbox()
    result: list[tuple[list[Delivery], object | None]] = []
    box.put(message(1))
    taker = threading.Thread(target=lambda: result.append(box.take(window_s=30, wait_s=10)))
    taker.start()
    time.sleep(0.1)
    box.close()
    taker.join(5)
    assert not taker.is_alive()
    assert [d.received_ms for d in result[0][0]] == [1]
    assert box.put(message(2)) is False
    assert box.take(window_s=30, wait_s=None) == ([], None)


def test_a_full_inbox_holds_the_source_until_a_group_is_taken() -> None:
    """Past `max_bytes` queued, `put` waits (the source's network thread stops reading, and its
    broker keeps the rest) until a group is taken."""
    box = inbox(max_bytes=100)
    for n in range(11):  # 110 bytes: over the bound
        box.put(message(n))
    done = threading.Event()
    threading.Thread(target=lambda: (box.put(message(99)), done.set()), daemon=True).start()
    assert not done.wait(0.3)
    box.take(window_s=0, wait_s=0)
    assert done.wait(5)
