"""The buffer's contract: every promise of SPEC 7 the buffer owns, through its public interface.

Durable, idempotent intake; takes handed out oldest first, live apart from backlog; a take
ended exactly once (confirm, release, reject, divide); readings leave only on confirm;
`max_size` and `max_age` with a gap reported; a full disk refuses intake whole and keeps the
drain going; damage moved aside; one writer. The suite runs against every implementation in
`IMPLEMENTATIONS` (the SQLite buffer is the one there is). It reads no private attribute and
patches nothing: the free-space probe and the clocks are injected, and what the file holds is
read through the package's read-only view.

The batching stage (`gateway.batching`) is used to turn uplinks into records and takes into
messages, as the daemon does, so the promises are checked on the messages the cloud receives.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from gateway import wire
from gateway.batching import Batcher, Ids, to_record
from gateway.buffer import (
    Buffer,
    TakeState,
    connect,
    damage_marker,
    integrity_problems,
    mark_damaged,
    now_ms,
    view,
)
from gateway.buffer.files import WAL_ALLOWANCE
from gateway.buffer.room import DRAIN_RESERVE, disk_free
from gateway.errors import BufferBusyError, BufferFullError, BufferLostError, DiskFullError
from gateway.model import Batch, DeadLetter, DecodedUplink, DeviceKey, Reading, Unmapped, Uplink

DEV = DeviceKey("dev_eui", "70b3d57ed0001234")
IMPLEMENTATIONS = [Buffer]


def uplink(n: int, readings: int = 3, received_ms: int = 1_000, sensor: str = "s1") -> DecodedUplink:
    return DecodedUplink(
        source=f"chirpstack/{n}",
        sensor_id=sensor,
        device=DEV,
        received_ms=received_ms + n,
        meta={"f_cnt": n},
        readings=tuple(Reading("CC1", n * 10 + i, "mA", received_ms + n + i) for i in range(readings)),
    )


class Rig:
    """A buffer with the batching stage in front, as the daemon wires them."""

    def __init__(self, buffer: Buffer, max_bytes: int, gzip: bool) -> None:
        self.buffer = buffer
        self.max_bytes, self.gzip = max_bytes, gzip
        self.batcher = Batcher(buffer, Ids("gw-t-01", "acme", "leeds"), max_bytes, gzip)

    def store(self, outcomes: Iterable[Any]) -> Any:
        return self.buffer.store(
            to_record(o, self.max_bytes, self.gzip) if isinstance(o, DecodedUplink) else o for o in outcomes
        )

    def take(self, live: bool = True) -> Batch | None:
        return self.batcher.form(live)

    def drain(self, live: bool = True) -> list[Batch]:
        out = []
        while (batch := self.take(live)) is not None:
            out.append(batch)
            batch.take.confirm()
        return out

    def report(self) -> dict[str, Any]:
        self.buffer.heartbeat()
        return view.read(self.buffer.path)

    def close(self) -> None:
        self.buffer.close()


Make = Callable[..., Rig]


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda c: c.__name__)
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Make:
    kind = request.param

    def build(max_bytes: int = 120 * 1024, gzip: bool = True, **kw: Any) -> Rig:
        return Rig(kind(tmp_path / "b.db", **kw), max_bytes, gzip)

    return build


def rows_of(batch: Batch) -> list[dict[str, Any]]:
    return list(wire.expand_rows(wire.decode_message(batch.payload)))


def sources(batches: Iterable[Batch]) -> list[str]:
    return [str(r["record_source"]) for b in batches for r in rows_of(b)]


# ---- intake --------------------------------------------------------------------------------


def test_store_is_idempotent_on_the_uplinks_key(make: Make) -> None:
    """The same uplink stored twice (same deduplicationId) is kept once and counted as duplicate,
    in the same group and in a later one."""
    b = make()
    first = b.store([uplink(1), uplink(2), uplink(1)])
    assert (first.stored, first.duplicates) == (2, 1)
    again = b.store([uplink(1)])
    assert again.stored == 0 and again.duplicates == 1
    assert b.buffer.depth().readings == 6


def test_keys_outlive_a_reopen_and_the_readings_being_sent(make: Make) -> None:
    """A redelivery after the readings were confirmed, and after a restart, is still a duplicate."""
    b = make()
    b.store([uplink(i, received_ms=now_ms()) for i in range(5)])
    assert len(b.drain()) >= 1
    b.close()
    b = make()
    assert b.store([uplink(3, received_ms=now_ms())]).duplicates == 1


def test_idempotency_keys_are_bounded_to_the_newest(make: Make) -> None:
    """At most `seen_kept` keys (SEEN_KEPT_ROWS by default), the newest, are kept across a
    reopen: within that window a redelivery is a duplicate, past it the key is forgotten."""
    b = make(seen_kept=50)
    for g in range(12):
        b.store([uplink(g * 10 + i, received_ms=now_ms()) for i in range(10)])
    b.drain()
    b.buffer.heartbeat()
    b.close()
    b = make(seen_kept=50)
    assert b.store([uplink(119, received_ms=now_ms())]).duplicates == 1  # recent keys still dedupe
    assert b.store([uplink(3, received_ms=now_ms())]).stored == 1  # past the window: forgotten


def test_readings_survive_a_reopen_and_a_message_keeps_its_id_and_bytes(make: Make) -> None:
    """What was stored is there after reopening; a message formed and not confirmed comes back
    first as the same message (same batch id, same bytes), then the rest, oldest first."""
    b = make(max_bytes=4096, gzip=True)
    b.store([uplink(i) for i in range(10)])
    taken = b.take()
    assert taken is not None and taken.batch_id == f"gw-t-01-{taken.seq:012d}"
    b.store([uplink(100)])
    b.close()
    b = make(max_bytes=4096, gzip=True)
    assert b.buffer.depth().readings == 33
    again = b.drain(live=False)
    assert (again[0].seq, again[0].payload) == (taken.seq, taken.payload)
    assert sources(again) == [f"chirpstack/{i}" for i in [*range(10), 100] for _ in range(3)]
    assert again[1].seq > taken.seq


def crash_copy(buffer: Buffer, where: Path) -> Path:
    """The file as a kill -9 would leave it now: what is committed, nothing of memory."""
    where.mkdir()
    with sqlite3.connect(buffer.path) as src, sqlite3.connect(where / "b.db") as dst:
        src.backup(dst)
    return where / "b.db"


def test_a_message_is_recorded_with_the_next_commit_and_survives_a_crash(make: Make, tmp_path: Path) -> None:
    """A take is written by the commit after it (a store, or `settle`), not before: the batch
    is `recorded` only then, and a crash after it hands the same message back (same id, same
    bytes); a crash before it forms the readings again under a new id, losing none."""
    b = make(max_bytes=4096, gzip=True)
    b.store([uplink(i, received_ms=now_ms()) for i in range(5)])
    batch = b.take()
    assert batch is not None and not batch.take.recorded
    early = Buffer(crash_copy(b.buffer, tmp_path / "early"))
    assert Rig(early, 4096, True).drain(live=False)[0].seq != batch.seq  # formed anew, nothing lost
    assert early.depth().total_readings == 0
    early.close()
    b.store([uplink(50, received_ms=now_ms())])  # the next commit records it
    assert batch.take.recorded
    late = Rig(Buffer(crash_copy(b.buffer, tmp_path / "late")), 4096, True)
    first = late.take(live=False)
    assert first is not None and (first.seq, first.payload) == (batch.seq, batch.payload)


def test_a_failed_store_leaves_nothing_behind(make: Make) -> None:
    """A store that fails midway leaves the file, the depth and the idempotency keys as they
    were: the same uplinks stored again are stored, not duplicates."""
    b = make()
    b.store([uplink(1)])

    class Boom(Exception):
        pass

    def bad() -> Iterable[Any]:
        yield to_record(uplink(2))
        raise Boom

    with pytest.raises(Boom):
        b.buffer.store(bad())
    assert b.buffer.depth().readings == 3
    assert b.store([uplink(2)]).stored == 1
    b.close()
    assert make().buffer.depth().readings == 6


def test_an_uplink_the_wire_cannot_carry_is_a_dead_letter_and_its_group_is_stored(make: Make) -> None:
    """A reading or meta value JSON cannot hold (NaN from a hostile event) makes its uplink a dead
    letter with the reason and raw payload; the rest of the group is stored as usual."""
    b = make()
    nan_value = DecodedUplink(
        "chirpstack/nan", "s1", DEV, 5, {}, (Reading("CC1", float("nan"), "mA", 5),), payload=b"\x02raw"
    )
    nan_meta = DecodedUplink("chirpstack/snr", "s1", DEV, 6, {"snr": float("nan")}, (Reading("CC1", 1, "mA", 6),))
    result = b.store([uplink(1), nan_value, nan_meta, uplink(2)])
    assert (result.stored, result.dead_letters) == (2, 2)
    assert b.buffer.depth().readings == 6
    letters = b.report()["dead_letters"]["latest"]
    assert [(d["reason"].split(": ", 1)[1], d["payload_hex"]) for d in reversed(letters)] == [
        ("CC1 is nan (not a finite number)", b"\x02raw".hex()),
        ("meta field 'snr' is nan (not a finite number)", ""),
    ]


@pytest.mark.parametrize(
    ("reading", "reason"),
    [
        (Reading("count", 10**38, None, 5), "count is an integer of 39 digits"),
        (Reading("name", "a\ud800b", None, 5), "surrogates not allowed"),
    ],
    ids=["beyond-number-38", "lone-surrogate"],
)
def test_a_value_the_cloud_cannot_store_makes_its_uplink_a_dead_letter(
    make: Make, reading: Reading, reason: str
) -> None:
    """A 39-digit integer (Snowflake's NUMBER holds 38) or a lone surrogate (not UTF-8) is a dead
    letter naming the problem, never a value the loader rejects; the group's rest is stored."""
    b = make()
    bad = DecodedUplink("chirpstack/bad", "s1", DEV, 5, {}, (reading,))
    fits = DecodedUplink("chirpstack/fits", "s1", DEV, 5, {}, (Reading("count", 10**38 - 1, None, 5),))
    result = b.store([bad, fits])
    assert (result.stored, result.dead_letters) == (1, 1)
    assert reason in b.report()["dead_letters"]["latest"][0]["reason"]


def test_an_uplink_too_big_for_any_message_is_a_dead_letter_at_intake(make: Make) -> None:
    """An uplink whose readings exceed batch.max_bytes even compressed can never be sent: it is a
    dead letter saying so, never a batch retried until max_age."""
    b = make(max_bytes=4096, gzip=True)
    rng = __import__("random").Random(1)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(20_000))
    huge = DecodedUplink("chirpstack/huge", "s1", DEV, 5, {}, (Reading("label", noise, None, 5),), payload=b"x")
    result = b.store([huge, uplink(1)])
    assert (result.stored, result.dead_letters) == (1, 1)
    reason = b.report()["dead_letters"]["latest"][0]["reason"]
    assert "could never be sent" in reason and "max_bytes 4096" in reason


def test_dead_letters_and_device_counts_are_kept(make: Make) -> None:
    """Dead letters keep raw bytes and reason; device counts of uplinks, readings and dead
    letters are written by the heartbeat and shown by the read-only view."""
    b = make()
    b.store([uplink(1), DeadLetter(DEV, "chirpstack/dl1", 1, "osm-v2: truncated", b"\x02\x43", 5, "s1")])
    report = b.report()
    assert [(d["reason"], d["payload_hex"]) for d in report["dead_letters"]["latest"]] == [
        ("osm-v2: truncated", "0243")
    ]
    # Two uplinks heard: one gave 3 readings, the other is the dead letter.
    assert [(d["uplinks"], d["readings"], d["dead_letters"]) for d in report["devices"]] == [(2, 3, 1)]


def test_a_heartbeat_during_stores_loses_no_device_counts(make: Make) -> None:
    """Heartbeats that write the per-device counts while another thread stores groups never drop
    a group's counts: the view ends with every uplink counted once."""
    b = make()
    done = threading.Event()

    def beat() -> None:
        while not done.is_set():
            b.buffer.heartbeat()

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        for g in range(300):
            b.store([uplink(g * 10 + i, readings=1) for i in range(10)])
    finally:
        done.set()
        beater.join()
    assert b.report()["devices"][0]["uplinks"] == 3000


def test_a_store_failing_after_a_heartbeat_does_not_count_again_what_the_heartbeat_wrote(make: Make) -> None:
    """store copies the per-device counts it restores on failure under the lock, not before it: a
    heartbeat that writes the counts while a store waits for the lock is not undone when that
    store's commit then fails, so no uplink is counted twice (issue 10 item 5)."""
    mode = ["normal"]
    heartbeat_in, go_on = threading.Event(), threading.Event()

    def free_space(directory: Path) -> int:
        if mode[0] == "hold":  # the heartbeat's commit, holding the lock: a store comes meanwhile
            mode[0] = "fail"
            heartbeat_in.set()
            go_on.wait(5)
        elif mode[0] == "fail":  # the store's commit, after the heartbeat
            raise OSError("the store's commit fails")
        return disk_free(directory)

    b = make(free_space=free_space)
    b.store([uplink(1)])  # counted, not yet written
    mode[0] = "hold"
    beat = threading.Thread(target=b.buffer.heartbeat)
    beat.start()
    assert heartbeat_in.wait(5)
    failed: list[BaseException] = []

    def store() -> None:
        try:
            b.store([uplink(2)])
        except OSError as exc:
            failed.append(exc)

    storing = threading.Thread(target=store)
    storing.start()
    time.sleep(0.2)  # the store is now waiting for the heartbeat's lock
    go_on.set()
    beat.join()
    storing.join()
    mode[0] = "normal"
    assert len(failed) == 1
    assert [d["uplinks"] for d in b.report()["devices"]] == [1]


def test_dead_letters_and_unmapped_uplinks_count_in_max_size_and_keep_their_share(make: Make) -> None:
    """Dead letters and unmapped uplinks are bounded in bytes (a tenth of max_size each, oldest
    pruned first, the newest always kept) and counted in max_size."""
    b = make(max_size=1_000_000)
    big = b"\xff" * 50_000
    letters = [DeadLetter(DEV, f"bad/{i}", 1, "nope", big, 1_000 + i) for i in range(30)]
    kept = [Unmapped(Uplink(f"osm/0A1B2C3D/{i}", DeviceKey("osm_id", "0A1B2C3D"), big, 1, 1)) for i in range(30)]
    b.store(letters + kept)
    report = b.report()
    assert report["dead_letters"]["kept_bytes"] <= 100_000
    assert report["unmapped_bytes"] <= 100_000 + 101_000  # the newest row is always kept
    assert report["dead_letters"]["latest"][0]["reason"] == "nope" and report["dead_letters"]["kept"] == 2
    b.close()
    reopened = make(max_size=1_000_000).report()
    assert reopened["dead_letters"]["kept_bytes"] == report["dead_letters"]["kept_bytes"]
    assert reopened["unmapped_bytes"] == report["unmapped_bytes"]


def test_unmapped_uplinks_are_read_in_pages(make: Make) -> None:
    """A replay reads the unmapped store page by page, bounded in bytes, never all at once."""
    b = make()
    device = DeviceKey("osm_id", "0A1B2C3D")
    b.store([Unmapped(Uplink(f"osm/0A1B2C3D/{i}", device, b"x" * 1000, 1, 1)) for i in range(50)])
    pages, after = [], 0
    while page := b.buffer.unmapped(after_id=after, max_bytes=10_000):
        pages.append(len(page))
        after = page[-1][0]
    assert sum(pages) == 50 and max(pages) <= 5


def test_a_device_counts_each_uplink_once_through_dead_letters_and_replays(make: Make) -> None:
    """A device's `uplinks` counts every uplink it sent once: a dead letter is one, an uplink
    kept while unmapped is one, and neither counts again when a reload decodes it after all
    (its readings are counted then). Seen in commissioning: 9 uplinks sent showed as 14."""
    b = make()
    device = DeviceKey("dev_eui", "70b3d57ed0003e91")
    kept = [Unmapped(Uplink(f"chirpstack/k{i}", device, b"\x01", 1_000 + i, 1_000 + i)) for i in range(3)]
    letter = DeadLetter(DEV, "chirpstack/bad", 1, "osm-v2: truncated", b"\x02", 2_000)
    b.store([*kept, letter, uplink(1)])
    counts = {d["device"]: d for d in b.report()["devices"]}
    assert counts[str(device)]["uplinks"] == 3
    assert (counts[str(DEV)]["uplinks"], counts[str(DEV)]["dead_letters"]) == (2, 1)

    # A reload maps the device (its kept uplinks decode) and mends DEV's codec (the letter decodes).
    page = b.buffer.unmapped()
    replayed = [
        DecodedUplink(u.source, "s9", device, u.received_ms, {}, (Reading("CC1", 1, "mA", u.time_ms),)) for _, u in page
    ]
    b.store(replayed)
    b.buffer.forget_unmapped([row for row, _ in page])
    b.store([DecodedUplink("chirpstack/bad", "s1", DEV, 2_000, {}, (Reading("CC1", 2, "mA", 2_000),))])
    b.buffer.forget_dead_letters([1])
    counts = {d["device"]: d for d in b.report()["devices"]}
    assert (counts[str(device)]["uplinks"], counts[str(device)]["readings"]) == (3, 3)
    assert (counts[str(DEV)]["uplinks"], counts[str(DEV)]["dead_letters"]) == (2, 0)


def test_the_devices_table_keeps_only_the_newest_unmapped_devices(make: Make) -> None:
    """A stream of distinct unmapped dev_euis cannot grow the per-device counts without bound:
    the most recently heard 1,000 are kept, mapped devices always."""
    b = make()
    b.store([uplink(1)])
    strays = [
        Unmapped(Uplink(f"chirpstack/u{i}", DeviceKey("dev_eui", f"{i:016x}"), b"", 1, 1_000 + i)) for i in range(1500)
    ]
    b.store(strays)
    devices = b.report()["devices"]
    unmapped = [d for d in devices if d["sensor_id"] is None]
    assert len(unmapped) == 1000 and min(d["last_seen_ms"] for d in unmapped) == 1_500
    assert [d["sensor_id"] for d in devices if d["sensor_id"]] == ["s1"]


# ---- takes ---------------------------------------------------------------------------------


def test_readings_leave_only_when_their_take_is_confirmed(make: Make) -> None:
    """Confirming one take removes its readings only; the other take's stay until confirmed."""
    b = make(max_bytes=4096, gzip=False)
    b.store([uplink(i) for i in range(4)])
    first = b.take()
    b.store([uplink(9)])
    second = b.take()
    assert first is not None and second is not None
    second.take.confirm()
    assert b.buffer.depth().total_readings == 12
    first.take.confirm()
    assert b.buffer.depth().total_readings == 0
    b.close()
    assert make().buffer.depth().total_readings == 0


def test_oldest_unsent_skips_what_the_cloud_confirmed_before_its_deletion_is_committed(make: Make) -> None:
    """A confirmed chunk is deleted by the next commit; until then it is not "unsent": the oldest
    unsent age (health, metrics) is the next chunk's, or none."""
    b = make(max_bytes=4096, gzip=False)
    b.store([uplink(1, received_ms=1_000)])
    first = b.take()
    b.store([uplink(2, received_ms=5_000)])
    assert first is not None and b.buffer.oldest_unsent_ms() == 1_001
    first.take.confirm()
    assert b.buffer.oldest_unsent_ms() == 5_002
    second = b.take()
    assert second is not None
    second.take.confirm()
    assert b.buffer.oldest_unsent_ms() is None


def test_a_take_ends_exactly_once(make: Make) -> None:
    """A take that was confirmed cannot be confirmed, released or rejected again."""
    b = make()
    b.store([uplink(1)])
    batch = b.take()
    assert batch is not None
    batch.take.confirm()
    assert batch.take.state is TakeState.CONFIRMED
    for end in (batch.take.confirm, batch.take.release, lambda: batch.take.reject([])):
        with pytest.raises(RuntimeError, match="already ended"):
            end()


def test_a_released_take_comes_back_with_the_same_bytes(make: Make) -> None:
    """Release hands the same take back, same seq and message, before any newer readings."""
    b = make()
    b.store([uplink(1)])
    batch = b.take()
    assert batch is not None
    b.store([uplink(2)])
    batch.take.release()
    again = b.take()
    assert again is not None and (again.seq, again.payload) == (batch.seq, batch.payload)
    later = b.take()
    assert later is not None and sources([later]) == ["chirpstack/2"] * 3


def test_messages_are_oldest_first_and_never_exceed_max_bytes(make: Make) -> None:
    """Uncompressed messages stay within max_bytes and carry every reading once, in intake order."""
    b = make(max_bytes=4096, gzip=False)
    b.store([uplink(i, readings=5) for i in range(200)])
    batches = b.drain()
    assert max(len(x.payload) for x in batches) <= 4096
    assert sources(batches) == [f"chirpstack/{i}" for i in range(200) for _ in range(5)]


def test_gzip_messages_fill_towards_max_bytes(make: Make) -> None:
    """Compressed messages stay within max_bytes yet carry many times that in raw JSON."""
    b = make(max_bytes=8192, gzip=True)
    b.store([uplink(i, readings=20) for i in range(2000)])
    batches = b.drain()
    assert max(len(x.payload) for x in batches) <= 8192
    assert sum(len(wire.decode_message(x.payload)["series"]) for x in batches) == 2000
    assert len(batches) < 40  # far fewer messages than ~500 KB of raw JSON / 8 KiB would need


def test_takes_in_flight_are_skipped_by_the_next_take(make: Make) -> None:
    """Several takes may be out at once (in flight together); each record is in exactly one,
    however the takes end."""
    b = make(max_bytes=4096, gzip=False)
    b.store([uplink(i, readings=5) for i in range(60)])
    out = []
    while (x := b.take()) is not None:
        out.append(x)
    assert len(out) >= 3
    for x in out[1::2]:
        x.take.confirm()
    for x in out[0::2]:
        x.take.release()
    rest = b.drain()
    assert sorted(sources(out[1::2]) + sources(rest)) == sorted(f"chirpstack/{i}" for i in range(60) for _ in range(5))


def test_live_and_backlog_are_separated_by_mark_live(make: Make) -> None:
    """After mark_live, older uplinks are backlog and new ones live; each take draws from its side."""
    b = make()
    b.store([uplink(i) for i in range(3)])
    b.buffer.mark_live()
    b.store([uplink(10)])
    assert b.buffer.depth(live=True).uplinks == 1 and b.buffer.depth(live=False).uplinks == 3
    live = b.take(live=True)
    assert live is not None and set(sources([live])) == {"chirpstack/10"}
    backlog = b.take(live=False)
    assert backlog is not None and live.readings + backlog.readings == 12


def test_uplinks_after_the_buffer_empties_are_still_live(make: Make) -> None:
    """Once every stored uplink has been confirmed and deleted, new ones still count as live."""
    b = make()
    b.buffer.mark_live()
    b.store([uplink(1, received_ms=now_ms())])
    b.drain()
    b.buffer.settle(force=True)
    b.store([uplink(2, received_ms=now_ms())])
    assert b.buffer.depth(live=True).uplinks == 1 and b.buffer.depth(live=False).uplinks == 0


def test_live_is_due_after_max_delay_on_the_monotonic_clock(tmp_path: Path) -> None:
    """Live readings are due once the oldest has waited max_delay on the (injected) monotonic
    clock, not before, whatever wall-clock time they carry."""
    mono = [100.0]
    b = Rig(Buffer(tmp_path / "b.db", monotonic=lambda: mono[0]), 120 * 1024, True)
    b.store([uplink(1, received_ms=10_000)])  # stamped in 1970: its wall time does not count
    mono[0] = 104.9
    assert not b.batcher.live_due(5.0)
    mono[0] = 105.0
    assert b.batcher.live_due(5.0)


def test_live_after_a_partial_take_is_not_held_back_by_a_backward_clock_step(tmp_path: Path) -> None:
    """Live uplinks left after a live batch wait at most max_delay more, even when their
    wall-clock receive times lie ten minutes in the future (the clock was stepped back)."""
    mono = [100.0]
    b = Rig(Buffer(tmp_path / "b.db", monotonic=lambda: mono[0]), 4096, False)
    future = now_ms() + 600_000
    b.store([uplink(i, readings=20, received_ms=future) for i in range(40)])
    assert b.take() is not None and b.buffer.depth(live=True).uplinks > 0
    mono[0] = 105.0
    assert b.batcher.live_due(5.0)


def test_batch_ids_never_repeat_when_the_file_is_replaced(make: Make, tmp_path: Path) -> None:
    """A new buffer file (the old one moved aside or deleted) never reuses an earlier batch id."""
    b = make()
    b.store([uplink(1)])
    first = b.take()
    assert first is not None
    b.close()
    for leftover in tmp_path.glob("b.db*"):
        leftover.unlink()
    b = make()
    b.store([uplink(2)])
    again = b.take()
    assert again is not None and again.seq > first.seq


def test_a_rejected_take_becomes_dead_letters(make: Make) -> None:
    """Reject ends a take for good: its readings leave the buffer as the dead letters given."""
    b = make()
    b.store([uplink(1, readings=1)])
    batch = b.take()
    assert batch is not None
    batch.take.reject([DeadLetter(DEV, "chirpstack/1", 1, "refused for good", b"{}", 1_001, "s1")])
    assert b.buffer.depth().total_readings == 0
    assert b.report()["dead_letters"]["latest"][0]["reason"] == "refused for good"
    b.close()
    assert make().buffer.depth().total_readings == 0


def test_a_divided_take_is_stored_again_in_parts_and_survives_a_crash(make: Make, tmp_path: Path) -> None:
    """Divide stores the parts (one commit) before the original's records are let go: the parts
    are new takes with new seqs, and after a restart every reading is still there."""
    b = make(max_bytes=8192, gzip=False)
    b.store([uplink(i) for i in range(6)])
    batch = b.take()
    assert batch is not None
    parts, dead = b.batcher.split(batch, 600, "too large")
    assert dead == 0 and len(parts) >= 2 and all(len(p.payload) <= 600 for p in parts)
    assert len({p.seq for p in parts} | {batch.seq}) == len(parts) + 1
    assert sorted(sources(parts)) == sorted(sources([batch]))
    # A crash now (no close): the parts were committed; the original's chunk is still there too.
    copy = tmp_path / "copy"
    copy.mkdir()
    with sqlite3.connect(tmp_path / "b.db") as src, sqlite3.connect(copy / "b.db") as dst:
        src.backup(dst)
    reopened = Buffer(copy / "b.db")
    assert reopened.depth().readings >= 18  # nothing lost; what was split may be sent twice
    reopened.close()


# ---- bounds --------------------------------------------------------------------------------


def test_drop_oldest_keeps_size_bound_and_reports_gap(make: Make) -> None:
    """Over max_size the oldest readings go at once, and the next message's meta says how many
    and from when; the message after it has no gap."""
    b = make(max_size=3_000, gzip=False, max_bytes=4096)
    start = now_ms() - 10_000
    dropped = 0
    for g in range(20):
        result = b.store([uplink(g * 5 + i, readings=5, received_ms=start) for i in range(5)])
        dropped += result.dropped.readings if result.dropped else 0
    assert dropped > 0
    assert b.report()["backlog"]["stored_bytes"] <= 3_000
    assert b.buffer.depth().readings + dropped == 500
    batch = b.take()
    assert batch is not None
    gap = wire.decode_message(batch.payload)["meta"]["gap"]
    assert gap["readings"] == dropped and gap["from"] == start and gap["reason"] == "max_size"
    batch.take.confirm()
    second = b.take()
    assert second is None or "meta" not in wire.decode_message(second.payload)


def test_a_gap_stays_pending_until_its_message_is_confirmed(make: Make) -> None:
    """A message reporting a gap that is released (not sent) keeps the gap: it is reported when
    sent, and only once."""
    b = make(max_size=3_000, gzip=False, max_bytes=4096)
    for g in range(20):
        b.store([uplink(g * 5 + i, readings=5, received_ms=now_ms()) for i in range(5)])
    batch = b.take()
    assert batch is not None and "gap" in wire.decode_message(batch.payload)["meta"]
    batch.take.release()
    again = b.take()
    assert again is not None and again.payload == batch.payload
    again.take.confirm()
    rest = b.drain()
    assert all("meta" not in wire.decode_message(x.payload) for x in rest)


def test_bounds_never_drop_readings_out_in_a_take(make: Make) -> None:
    """Records handed out (in flight, backing off) are the cloud's to answer for: max_age and
    max_size drop only what is not out."""
    b = make(max_age_s=60)
    b.store([uplink(1, received_ms=0)])
    out = b.take()
    assert out is not None
    b.store([uplink(2, received_ms=0)])
    b.store([uplink(3, received_ms=100_000)])
    gap = b.buffer.enforce_bounds(at_ms=100_000)
    assert gap is not None and gap.readings == 3 and gap.reasons == ["max_age"]
    assert b.buffer.depth().total_readings == 6
    out.take.confirm()
    assert sources(b.drain()) == ["chirpstack/3"] * 3


def test_a_gap_names_each_reason_once(make: Make) -> None:
    """Drops for age and size, then for size again, give meta.gap the reasons "max_age" and
    "max_size" once each, not "max_age, max_size" beside "max_size"."""
    now = now_ms()
    b = make(gzip=False)
    b.store([uplink(i, readings=5, received_ms=now - 120_000) for i in range(3)])
    for g in range(6):
        b.store([uplink(100 + g * 5 + i, readings=5, received_ms=now) for i in range(5)])
    b.close()
    b = make(max_size=1_500, gzip=False, max_age_s=60.0)  # both bounds now exceeded
    b.buffer.enforce_bounds(at_ms=now)
    for g in range(6):
        b.store([uplink(200 + g * 5 + i, readings=5, received_ms=now) for i in range(5)])  # max_size again
    batch = b.take()
    assert batch is not None
    reasons = wire.decode_message(batch.payload)["meta"]["gap"]["reason"].split(", ")
    assert sorted(reasons) == ["max_age", "max_size"]


def test_a_drop_is_counted_as_well_as_reported_in_the_gap(make: Make) -> None:
    """drop-oldest says so with a counter too: `dropped_readings` counts every reading a bound
    dropped, for age and for size, and is kept across a reopen."""
    now = now_ms()
    b = make(max_size=3_000, gzip=False, max_age_s=60.0)
    b.store([uplink(i, readings=5, received_ms=now - 120_000) for i in range(3)])
    aged = b.buffer.enforce_bounds(at_ms=now)
    assert aged is not None and aged.reasons == ["max_age"]
    sized = 0
    for g in range(20):
        result = b.store([uplink(100 + g * 5 + i, readings=5, received_ms=now) for i in range(5)])
        sized += result.dropped.readings if result.dropped else 0
    assert sized > 0
    assert b.report()["counters"]["dropped_readings"] == aged.readings + sized
    b.close()
    assert make().report()["counters"]["dropped_readings"] == aged.readings + sized


def test_a_released_take_past_max_age_is_dropped_and_reported(make: Make) -> None:
    """max_age holds for records handed out and given back too: a released take whose records
    are past max_age is dropped by the next bound, the gap says so, and it does not come back
    after a restart. Only records out in a take not ended wait for the cloud's answer."""
    b = make(max_age_s=60, gzip=False)
    b.store([uplink(1, received_ms=0)])
    old = b.take()
    assert old is not None
    old.take.release()
    b.store([uplink(2, received_ms=100_000)])  # the commit that records the take
    gap = b.buffer.enforce_bounds(at_ms=100_000)
    assert gap is not None and (gap.readings, gap.reasons) == (3, ["max_age"])
    b.close()
    b = make(max_age_s=60, gzip=False)
    sent = b.drain(live=False)
    assert sources(sent) == ["chirpstack/2"] * 3
    assert wire.decode_message(sent[0].payload)["meta"]["gap"]["readings"] == 3


def test_stop_intake_refuses_when_full(make: Make) -> None:
    """Under stop-intake a full buffer raises BufferFullError and stores nothing of the group."""
    b = make(max_size=2_000, when_full="stop-intake")
    with pytest.raises(BufferFullError):
        for i in range(200):
            b.store([uplink(i, received_ms=now_ms())])
    before = b.buffer.depth()
    with pytest.raises(BufferFullError):
        b.store([uplink(999)])
    assert b.buffer.depth() == before
    assert b.buffer.enforce_bounds() is None  # stop-intake never drops


def test_stop_intake_stores_a_groups_first_uplinks_that_fit_and_says_how_many(make: Make) -> None:
    """Under stop-intake a group larger than the room left is committed from its first uplink as
    far as it fits, and `taken` says how many (intake acknowledges only those); the rest is not
    stored, so its redelivery is stored once there is room, not counted a duplicate."""
    group = [uplink(i, received_ms=now_ms()) for i in range(40)]
    b = make(max_size=2_000, when_full="stop-intake")
    result = b.store(group)
    assert 0 < result.taken < len(group) and result.stored == result.taken
    assert b.buffer.depth().uplinks == result.taken
    b.close()
    b = make(max_size=1_000_000, when_full="stop-intake")
    rest = b.store(group[result.taken :])
    assert (rest.stored, rest.duplicates) == (len(group) - result.taken, 0)
    assert b.store(group[: result.taken]).duplicates == result.taken


def test_a_full_disk_refuses_intake_whole_but_leaves_the_drain_room(make: Make, tmp_path: Path) -> None:
    """With the filesystem nearly full (the injected free-space probe says so), a group that
    does not fit is refused whole (DiskFullError, nothing stored); the drain still works in the
    room held back for it; with room again the group is taken."""
    free = {"bytes": WAL_ALLOWANCE + DRAIN_RESERVE + 8192}
    b = make(free_space=lambda directory: free["bytes"])
    b.store([uplink(i, received_ms=now_ms()) for i in range(10)])
    before = b.buffer.depth()
    rng = __import__("random").Random(2)
    noisy = [
        DecodedUplink(f"chirpstack/n{i}", "s1", DEV, now_ms(), {}, (Reading("x", rng.random(), None, i),) * 1)
        for i in range(2000)
    ]
    with pytest.raises(DiskFullError, match="full"):
        b.store(noisy)
    assert b.buffer.depth() == before
    batch = b.take()  # the drain has DRAIN_RESERVE more
    assert batch is not None
    batch.take.confirm()
    b.buffer.settle(force=True)
    free["bytes"] = disk_free(tmp_path)
    assert b.store(noisy).stored == 2000


# ---- the file ------------------------------------------------------------------------------


def filled(make: Make, uplinks: int = 200) -> Path:
    b = make()
    for g in range(uplinks // 20):
        b.store([uplink(g * 20 + i, readings=10) for i in range(20)])
    b.close()
    return b.buffer.path


@pytest.mark.parametrize("damage", ["truncate-mid-page", "truncate-pages", "garbage", "zeroed-page"])
def test_a_damaged_file_is_moved_aside_and_a_new_buffer_starts(make: Make, damage: str) -> None:
    """Truncated, overwritten or non-SQLite buffer files are detected at open, renamed with a
    timestamp, and replaced by an empty buffer that records what happened."""
    path = filled(make)
    data = path.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    if damage == "truncate-mid-page":
        path.write_bytes(data[: len(data) // 2 + 100])
    elif damage == "truncate-pages":
        path.write_bytes(data[: (len(data) // page // 2) * page])
    elif damage == "garbage":
        path.write_bytes(b"this is not a database\n" * 500)
    else:  # pages of the chunks zeroed, as a failing SD card might leave them
        path.write_bytes(data[: page * 3] + bytes(page * 8) + data[page * 11 :])
    b = make()
    assert b.buffer.recovered is not None
    moved = b.buffer.recovered.moved_to
    assert re.fullmatch(r"b\.db\.corrupt-\d{8}T\d{6}Z", moved.name)
    assert moved.exists() and moved.stat().st_size > 0
    assert b.buffer.depth().total_readings == 0
    b.store([uplink(1)])
    assert b.buffer.depth().readings == 3
    assert b.report()["recovered"]["moved_to"] == str(moved)


def test_a_sound_file_is_not_moved(make: Make) -> None:
    """A file that passes the checks is opened as it is, backlog intact."""
    path = filled(make)
    b = make()
    assert b.buffer.recovered is None and b.buffer.depth().readings == 2000
    assert integrity_problems(path, quick=False) == []


def test_the_damage_marker_moves_the_file_aside_at_next_open(make: Make) -> None:
    """Damage a running daemon found (it leaves a marker and exits) is acted on at the next start."""
    path = filled(make)
    mark_damaged(path, "database disk image is malformed")
    b = make()
    assert b.buffer.recovered is not None and b.buffer.recovered.reason == "database disk image is malformed"
    assert not damage_marker(path).exists()


def test_integrity_problems_reports_what_sqlite_finds(make: Make) -> None:
    """`check`'s integrity check names the damage in a file that still opens."""
    path = filled(make)
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page : page + 12] = b"\x07" * 12  # page 2 (a table's root): no such page type
    path.write_bytes(bytes(data))
    problems = integrity_problems(path, quick=False)
    assert problems and all(isinstance(p, str) for p in problems)


def test_impossible_saved_totals_are_recounted_at_open(make: Make) -> None:
    """Totals that are impossible (negative, left by two writers) are counted again from the file
    at open, so a backlog can always drain."""
    path = filled(make, uplinks=40)
    db = sqlite3.connect(path)
    db.execute("UPDATE state SET value=json_set(value, '$.readings', -65) WHERE key='totals'")
    db.commit()
    db.close()
    assert make().buffer.depth().readings == 400


def test_a_second_buffer_on_the_same_file_is_refused_with_the_holders_pid(make: Make) -> None:
    """Only one writer: a second open of the same buffer fails, naming the pid that holds it,
    and succeeds once the first is closed."""
    b = make()
    with pytest.raises(BufferBusyError, match=rf"already running \(pid {os.getpid()}\)"):
        make()
    b.close()
    make().close()


def test_a_deleted_buffer_file_is_noticed_and_its_content_written_back(make: Make, tmp_path: Path) -> None:
    """`rm buffer.db` under a running daemon: the next write raises BufferLostError instead of
    committing to an unlinked file, and rescue() puts every stored reading back at the path."""
    b = make()
    b.store([uplink(i) for i in range(5)])
    (tmp_path / "b.db").unlink()
    with pytest.raises(BufferLostError, match="deleted"):
        b.store([uplink(9)])
    assert b.buffer.rescue() == tmp_path / "b.db"
    assert make().buffer.depth().readings == 15


def test_every_commit_is_fsynced_before_store_returns(tmp_path: Path) -> None:
    """Intake acknowledges upstream once `store` returns, so a commit must survive a power cut,
    not only a crash of the process: the buffer's connections run in WAL mode with
    synchronous=FULL (NORMAL would leave the last commits in the page cache)."""
    db = connect(tmp_path / "x.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        db.close()


def test_disk_full_is_known_by_sqlites_code_not_by_the_word_full(tmp_path: Path) -> None:
    """An error whose text merely contains "full" (a table named full_history) is not a full disk."""
    from gateway.buffer import is_disk_full

    db = sqlite3.connect(tmp_path / "x.db")
    with pytest.raises(sqlite3.OperationalError) as raised:
        db.execute("SELECT * FROM full_history")
    assert not is_disk_full(raised.value)


def test_a_commit_writes_one_row_not_one_per_uplink(make: Make) -> None:
    """A group of uplinks is one chunk: the file grows by about its compressed size, not by a
    row and index entry per uplink (what spares the SD card)."""
    b = make()
    b.store([uplink(i, readings=1, received_ms=now_ms()) for i in range(45)])
    stored = b.report()["backlog"]["stored_bytes"]
    raw = b.buffer.depth().bytes
    assert stored < raw / 3


def test_a_first_version_buffer_is_carried_over_with_every_reading(tmp_path: Path) -> None:
    """A buffer file of the first format (a row per uplink, formed batches) opens with every
    reading in it, formed batches first, and its idempotency keys still dedupe."""
    path = tmp_path / "b.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE uplinks (id INTEGER PRIMARY KEY, source TEXT NOT NULL, sensor_id TEXT NOT NULL,
            received_ms INTEGER NOT NULL, readings INTEGER NOT NULL, series TEXT NOT NULL);
        CREATE TABLE batches (seq INTEGER PRIMARY KEY, created_ms INTEGER NOT NULL, oldest_ms INTEGER NOT NULL,
            readings INTEGER NOT NULL, gzip INTEGER NOT NULL, payload BLOB NOT NULL);
        CREATE TABLE seen_log (id INTEGER PRIMARY KEY, key TEXT NOT NULL, received_ms INTEGER NOT NULL);
        CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        """
    )
    old = [uplink(i, readings=2, received_ms=now_ms()) for i in range(6)]
    header = wire.Header("gw-t-01-000000000001", "gw-t-01", "acme", "leeds", 1, None)
    message = wire.compress(wire.assemble(header, [wire.encode_series(u) for u in old[:2]]))
    db.execute("INSERT INTO batches VALUES (1, 1, ?, 4, 1, ?)", (old[0].received_ms, message))
    for i, u in enumerate(old[2:], 1):
        db.execute(
            "INSERT INTO uplinks VALUES (?,?,?,?,?,?)", (i, u.source, "s1", u.received_ms, 2, wire.encode_series(u))
        )
    db.executemany("INSERT INTO seen_log (key, received_ms) VALUES (?, ?)", [(u.source, u.received_ms) for u in old])
    db.commit()
    db.close()
    b = Rig(Buffer(path), 120 * 1024, True)
    assert b.buffer.migrated is not None and "12 readings" in b.buffer.migrated
    assert b.store([old[5]]).duplicates == 1
    assert sources(b.drain(live=False)) == [f"chirpstack/{i}" for i in range(6) for _ in range(2)]


def test_status_reads_a_running_buffer_without_blocking_it(make: Make) -> None:
    """The read-only view reads the file while the buffer is open and writing, and counts the
    readings committed since the last heartbeat too."""
    b = make()
    b.store([uplink(1)])
    b.buffer.heartbeat()
    b.store([uplink(2)])
    report = view.read(b.buffer.path)
    assert report["backlog"]["readings"] == 6
    started = time.monotonic()
    b.store([uplink(3)])
    assert time.monotonic() - started < 2.0


# ---- found by attacking the redesign (each failed before its fix) ----------------------------


def test_records_confirmed_in_a_chunk_still_partly_out_are_not_sent_again_after_a_restart(make: Make) -> None:
    """One message of a chunk confirmed while another from the same chunk is still out: after a
    restart (clean or not) the confirmed readings are not handed out again; the other message
    comes back as it was."""
    b = make(max_bytes=4096, gzip=False)
    b.store([uplink(i, received_ms=now_ms()) for i in range(200)])  # one group, one chunk
    first, second = b.take(), b.take()
    assert first is not None and second is not None
    b.buffer.settle(force=True)  # both recorded
    first.take.confirm()
    b.buffer.settle(force=True)
    b.close()
    b = make(max_bytes=4096, gzip=False)
    again = b.drain(live=False)
    assert not set(sources(again)) & set(sources([first]))
    assert (again[0].seq, again[0].payload) == (second.seq, second.payload)
    assert sorted(sources([first, *again])) == sorted(f"chirpstack/{i}" for i in range(200) for _ in range(3))


def test_a_chunk_damaged_by_bit_rot_becomes_a_dead_letter_and_the_drain_goes_on(make: Make, tmp_path: Path) -> None:
    """A flipped bit inside a chunk's compressed data passes SQLite's checks (it has no
    checksums): opening and taking never fail on it; the chunk goes to the dead letters with the
    reason and the count it held, and every other reading is sent."""
    b = make()
    b.store([uplink(i) for i in range(50)])
    b.store([uplink(100 + i) for i in range(50)])
    recorded = b.take()
    assert recorded is not None
    b.buffer.settle(force=True)
    b.close()
    with sqlite3.connect(tmp_path / "b.db") as db:
        data = bytearray(db.execute("SELECT data FROM chunks ORDER BY id LIMIT 1").fetchone()[0])
        data[len(data) // 2] ^= 0x10
        db.execute("UPDATE chunks SET data=? WHERE id=(SELECT min(id) FROM chunks)", (bytes(data),))
    b = make()
    sent = sources(b.drain(live=False))
    assert sent == [f"chirpstack/{100 + i}" for i in range(50) for _ in range(3)]
    letter = b.report()["dead_letters"]["latest"][0]
    assert "damaged" in letter["reason"] and "150 readings of 50 uplinks lost" in letter["reason"]
    assert b.buffer.depth().total_readings == 0


def test_a_drop_while_the_message_reporting_an_earlier_gap_is_out_is_reported_too(make: Make) -> None:
    """Confirming the message that reports a gap does not forget drops made while it was out:
    the next message reports those."""
    b = make(max_age_s=60, gzip=False)
    b.store([uplink(1, received_ms=0)])
    b.store([uplink(2, received_ms=200_000)])
    assert b.buffer.enforce_bounds(at_ms=100_000) is not None
    first = b.take()
    assert first is not None and wire.decode_message(first.payload)["meta"]["gap"]["readings"] == 3
    b.store([uplink(3, received_ms=250_000)])
    b.store([uplink(4, received_ms=400_000)])
    second_drop = b.buffer.enforce_bounds(at_ms=320_000)
    assert second_drop is not None
    first.take.confirm()
    later = [wire.decode_message(m.payload).get("meta") for m in b.drain(live=False) + b.drain()]
    assert sum((m or {}).get("gap", {}).get("readings", 0) for m in later) == second_drop.readings


def test_a_batch_id_is_never_given_to_other_readings_when_the_clock_comes_back_behind(tmp_path: Path) -> None:
    """A power cut, and the clock restored a minute behind (a Pi without a real-time clock):
    the sequence starts above every id recorded, so an acknowledged batch id is never reused
    for a different message."""
    clock = [1_800_000_000_000]
    b = Rig(Buffer(tmp_path / "b.db", clock=lambda: clock[0]), 4096, False)
    for g in range(10):
        b.store([uplink(g * 200 + i, received_ms=clock[0]) for i in range(200)])
    b.buffer.heartbeat()
    clock[0] += 20
    first = b.take()
    assert first is not None
    b.buffer.settle(force=True)
    first.take.confirm()
    b.buffer.settle(force=True)
    copy = crash_copy(b.buffer, tmp_path / "cut")
    b.buffer.abandon()
    clock[0] -= 60_000
    after = Rig(Buffer(copy, clock=lambda: clock[0]), 4096, False)
    batches = after.drain(live=False)
    assert all(m.seq > first.seq for m in batches)


def test_live_records_given_back_by_a_shrink_are_due_by_themselves(tmp_path: Path) -> None:
    """A live take that took every live record and was shrunk to fit a message gives records
    back: they are due after max_delay like any live record, without waiting for new intake."""
    import random

    mono = [1000.0]
    b = Rig(Buffer(tmp_path / "b.db", monotonic=lambda: mono[0]), 4096, True)
    rng = random.Random(3)
    now = now_ms()
    b.store(
        DecodedUplink(
            f"chirpstack/{n}",
            "s1",
            DEV,
            now + n,
            {"f_cnt": n},
            tuple(Reading(f"m{i}", rng.randbytes(24).hex(), None, now + n + i) for i in range(16)),
        )
        for n in range(7)
    )
    mono[0] += 1.0
    sent = b.take()
    assert sent is not None and b.buffer.depth(live=True).uplinks > 0
    mono[0] += 3600.0
    assert b.batcher.live_due(0.2)


def test_a_dropped_uplink_redelivered_after_a_restart_is_still_a_duplicate(tmp_path: Path) -> None:
    """A bound that drops a chunk keeps its idempotency keys: a redelivery of one of its uplinks
    after a restart is a duplicate, not stored again."""
    now = [10_000_000]
    b = Rig(Buffer(tmp_path / "b.db", clock=lambda: now[0], max_age_s=60), 120 * 1024, True)
    u = uplink(7, received_ms=now[0])
    b.store([u])
    now[0] += 120_000
    assert b.buffer.enforce_bounds() is not None
    b.close()
    again = Rig(Buffer(tmp_path / "b.db", clock=lambda: now[0], max_age_s=60), 120 * 1024, True)
    assert again.store([u]).duplicates == 1


def test_a_split_message_is_not_sent_again_whole_after_a_crash(make: Make, tmp_path: Path) -> None:
    """A crash right after a refused message was divided: its parts come back with their ids
    and bytes, and the original's readings are not handed out a second time."""
    b = make(max_bytes=8192, gzip=False)
    b.store([uplink(i) for i in range(6)])
    whole = b.take()
    assert whole is not None
    b.buffer.settle(force=True)
    parts, _ = b.batcher.split(whole, 600, "too large")
    copy = crash_copy(b.buffer, tmp_path / "crash")
    after = Rig(Buffer(copy), 8192, False)
    again = after.drain(live=False)
    assert sorted((m.seq, m.payload) for m in again) == sorted((p.seq, p.payload) for p in parts)


def test_a_batch_confirmed_just_before_a_crash_comes_back_only_as_itself(make: Make, tmp_path: Path) -> None:
    """Deleting what the cloud confirmed may wait for the next commit. A crash in between may
    send the confirmed batch again, but only as itself (same id, same bytes: a duplicate the
    batch id shows), never its readings in another message; after that commit, nothing."""
    b = make(max_bytes=4096, gzip=True)
    b.store([uplink(i, received_ms=now_ms()) for i in range(5)])
    batch = b.take()
    assert batch is not None
    b.buffer.settle(force=True)  # recorded: from now it may be published
    batch.take.confirm()
    early = Rig(Buffer(crash_copy(b.buffer, tmp_path / "early")), 4096, True)
    for again in early.drain(live=False):
        assert again.seq == batch.seq and again.payload == batch.payload
    early.close()
    b.buffer.settle(force=True)
    late = Buffer(crash_copy(b.buffer, tmp_path / "late"))
    assert late.depth().total_readings == 0
    late.close()
