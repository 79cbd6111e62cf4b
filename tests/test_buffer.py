"""The buffer's contract: durable store, idempotent intake, batches formed oldest first within
the size limit, deleted only on confirm, bounds with a recorded gap."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest

from gateway import buffer as buffer_module
from gateway import wire
from gateway.buffer import Buffer, damage_marker, integrity_problems, mark_damaged, now_ms
from gateway.errors import BufferFullError, DiskFullError
from gateway.model import DeadLetter, DecodedUplink, DeviceKey, Reading

DEV = DeviceKey("dev_eui", "70b3d57ed0001234")


def uplink(n: int, readings: int = 3, received_ms: int = 1_000, sensor: str = "s1") -> DecodedUplink:
    return DecodedUplink(
        source=f"chirpstack/{n}",
        sensor_id=sensor,
        device=DEV,
        received_ms=received_ms + n,
        meta={"f_cnt": n},
        readings=tuple(Reading("CC1", n * 10 + i, "mA", received_ms + n + i) for i in range(readings)),
    )


def make(tmp_path: Path, **kw: object) -> Buffer:
    return Buffer(tmp_path / "b.db", "gw-t-01", "acme", "leeds", **kw)  # type: ignore[arg-type]


def rows_of(batch_payload: bytes) -> list[dict[str, object]]:
    return list(wire.expand_rows(wire.decode_message(batch_payload)))


def test_store_is_idempotent_on_source(tmp_path: Path) -> None:
    """The same uplink stored twice (same deduplicationId) is kept once and counted as duplicate."""
    b = make(tmp_path)
    assert b.store([uplink(1), uplink(2)]).stored == 2
    again = b.store([uplink(1)])
    assert again.stored == 0 and again.duplicates == 1
    assert b.depth().readings == 6


def test_readings_survive_reopen_and_batches_keep_their_id(tmp_path: Path) -> None:
    """What was stored, and a formed but unconfirmed batch, are there after reopening the file."""
    b = make(tmp_path)
    b.store([uplink(i) for i in range(10)])
    batch = b.take(live=True)
    assert batch is not None and batch.batch_id == f"gw-t-01-{batch.seq:012d}" and batch.readings == 30
    b.store([uplink(100)])
    b.close()
    b = make(tmp_path)
    assert b.pending_seqs() == [batch.seq]
    pending = b.batch(batch.seq)
    assert pending is not None and pending.batch_id == batch.batch_id and pending.payload == batch.payload
    assert b.depth().readings == 3 and b.depth().total_readings == 33
    nxt = b.take(live=False)
    assert nxt is not None and nxt.seq > batch.seq and nxt.batch_id == f"gw-t-01-{nxt.seq:012d}"


def test_confirm_deletes_only_the_confirmed_batch(tmp_path: Path) -> None:
    """Readings leave the buffer only when their batch is confirmed."""
    b = make(tmp_path)
    b.store([uplink(i) for i in range(4)])
    first = b.take(live=True)
    b.store([uplink(9)])
    second = b.take(live=True)
    assert first is not None and second is not None
    b.confirm(second.seq)
    assert b.pending_seqs() == [first.seq]
    assert b.depth().total_readings == 12


def test_batches_are_oldest_first_and_never_exceed_max_bytes(tmp_path: Path) -> None:
    """Uncompressed batches stay within max_bytes and carry every reading once, in intake order."""
    b = make(tmp_path, max_bytes=4096, gzip=False)
    b.store([uplink(i, readings=5) for i in range(200)])
    seen: list[object] = []
    while (batch := b.take(live=True)) is not None:
        assert len(batch.payload) <= 4096
        seen += [r["record_source"] for r in rows_of(batch.payload)]
        b.confirm(batch.seq)
    expected = [f"chirpstack/{i}" for i in range(200) for _ in range(5)]
    assert seen == expected


def test_gzip_batches_fill_towards_max_bytes(tmp_path: Path) -> None:
    """Compressed batches stay within max_bytes yet carry many times that in raw JSON."""
    b = make(tmp_path, max_bytes=8192, gzip=True)
    b.store([uplink(i, readings=20) for i in range(2000)])
    sizes = []
    raw = []
    while (batch := b.take(live=True)) is not None:
        sizes.append(len(batch.payload))
        raw.append(len(wire.decode_message(batch.payload)["series"]))
        b.confirm(batch.seq)
    assert max(sizes) <= 8192
    assert sum(raw) == 2000
    assert len(sizes) < 40  # far fewer messages than the ~500 KB of raw JSON / 8 KiB would need


def test_live_and_backlog_are_separated_by_mark_live(tmp_path: Path) -> None:
    """After mark_live, older uplinks are backlog and new ones live; each take draws from its side."""
    b = make(tmp_path)
    b.store([uplink(i) for i in range(3)])
    b.mark_live()
    b.store([uplink(10)])
    assert b.depth(live=True).uplinks == 1 and b.depth(live=False).uplinks == 3
    live = b.take(live=True)
    assert live is not None and {r["record_source"] for r in rows_of(live.payload)} == {"chirpstack/10"}
    backlog = b.take(live=False)
    assert backlog is not None and live.readings + backlog.readings == 12


def test_live_due_after_max_delay(tmp_path: Path) -> None:
    """Live readings are due once the oldest has waited max_delay on the monotonic clock, not
    before, whatever wall-clock time they carry."""
    b = make(tmp_path)
    before = time.monotonic()
    b.store([uplink(1, received_ms=10_000)])  # stamped in 1970: its wall time does not count
    after = time.monotonic()
    assert not b.live_due(5.0, at=before + 4.9)
    assert b.live_due(5.0, at=after + 5.0)


def test_live_due_after_a_partial_take_is_not_held_back_by_a_backward_clock_step(tmp_path: Path) -> None:
    """Live uplinks left after a live batch wait at most max_delay more, even when their
    wall-clock receive times lie ten minutes in the future (the clock was stepped back)."""
    b = make(tmp_path, max_bytes=4096, gzip=False)
    future = now_ms() + 600_000
    b.store([uplink(i, readings=20, received_ms=future) for i in range(40)])
    assert b.take(live=True) is not None and b.depth(live=True).uplinks > 0
    assert b.live_due(5.0, at=time.monotonic() + 5.0)


def test_drop_oldest_keeps_size_bound_and_reports_gap(tmp_path: Path) -> None:
    """Over max_size the oldest readings go at once, and the next batch's meta says how many and when."""
    b = make(tmp_path, max_size=8_000, gzip=False)
    start = now_ms() - 10_000
    result = b.store([uplink(i, readings=5, received_ms=start) for i in range(100)])
    gap = result.dropped
    assert gap is not None and gap.readings > 0 and gap.reasons == ["max_size"]
    assert b.depth().total_bytes <= 8_000
    assert b.depth().readings + gap.readings == 500
    batch = b.take(live=True)
    assert batch is not None
    message = wire.decode_message(batch.payload)
    assert message["meta"]["gap"]["readings"] == gap.readings
    assert message["meta"]["gap"]["from"] == start  # the first uplink's receive time
    first_kept = rows_of(batch.payload)[0]["record_source"]
    assert first_kept == f"chirpstack/{gap.uplinks}"
    second = b.take(live=True)
    assert second is None or "meta" not in wire.decode_message(second.payload)


def test_enforce_bounds_drops_formed_batches_but_never_one_in_flight(tmp_path: Path) -> None:
    """A formed batch counts towards max_size and goes oldest first, unless it is in flight."""
    b = make(tmp_path, gzip=False)
    b.store([uplink(i, readings=5, received_ms=now_ms()) for i in range(10)])
    old = b.take(live=True)
    b.store([uplink(i, readings=5, received_ms=now_ms()) for i in range(10, 20)])
    flying = b.take(live=True)
    assert old is not None and flying is not None
    b.max_size = len(flying.payload)
    gap = b.enforce_bounds(in_flight=[flying.seq])
    assert gap is not None and gap.readings == old.readings
    assert b.pending_seqs() == [flying.seq]


def test_max_age_drops_old_readings_but_not_batches_in_flight(tmp_path: Path) -> None:
    """Readings past max_age go; a batch in flight is IoT Core's to answer for and stays."""
    b = make(tmp_path, max_age_s=60)
    b.store([uplink(1, received_ms=0)])
    in_flight = b.take(live=True)
    assert in_flight is not None
    b.store([uplink(2, received_ms=0), uplink(3, received_ms=100_000)])
    gap = b.enforce_bounds(in_flight=[in_flight.seq], at_ms=100_000)
    assert gap is not None and gap.readings == 3 and gap.reasons == ["max_age"]
    assert b.pending_seqs() == [in_flight.seq]
    assert b.depth().readings == 3


def test_stop_intake_refuses_when_full(tmp_path: Path) -> None:
    """Under stop-intake a full buffer raises BufferFullError and stores nothing of the group."""
    b = make(tmp_path, max_size=2_000, when_full="stop-intake")
    b.store([uplink(i, received_ms=now_ms()) for i in range(20)])
    before = b.depth()
    with pytest.raises(BufferFullError):
        b.store([uplink(99)])
    assert b.depth() == before
    assert b.enforce_bounds() is None  # stop-intake never drops


def test_dead_letters_and_device_stats_are_kept(tmp_path: Path) -> None:
    """Dead letters keep raw bytes and reason; device rows count uplinks, readings, dead letters."""
    b = make(tmp_path)
    b.store(
        [
            uplink(1),
            DeadLetter(DEV, "chirpstack/dl1", 1, "osm-v2: truncated", b"\x02\x43", 5, "s1"),
        ]
    )
    b.close()
    db = sqlite3.connect(tmp_path / "b.db")
    assert db.execute("SELECT reason, payload FROM dead_letters").fetchall() == [("osm-v2: truncated", b"\x02\x43")]
    assert db.execute("SELECT uplinks, readings, dead_letters FROM devices").fetchall() == [(1, 3, 1)]


def test_totals_match_the_file_after_a_failed_transaction(tmp_path: Path) -> None:
    """A store that fails midway rolls back the file, the in-memory totals and the idempotency
    keys it had taken."""
    b = make(tmp_path)
    b.store([uplink(1)])

    class Boom(Exception):
        pass

    def bad() -> object:
        yield uplink(2)
        raise Boom

    with pytest.raises(Boom):
        b.store(bad())  # type: ignore[arg-type]
    assert b.depth().readings == 3
    assert b.store([uplink(2)]).stored == 1  # its key was not kept: it is no duplicate
    assert b.depth().readings == 6
    b.close()
    state = sqlite3.connect(tmp_path / "b.db").execute("SELECT value FROM state WHERE key='totals'").fetchone()[0]
    assert json.loads(state)["readings"] == 6


def test_batch_ids_never_repeat_when_the_file_is_replaced(tmp_path: Path) -> None:
    """A new buffer file (the old one moved aside or deleted) never reuses an earlier batch id."""
    b = make(tmp_path)
    b.store([uplink(1)])
    first = b.take(live=True)
    assert first is not None
    b.close()
    for side in tmp_path.glob("b.db*"):
        side.unlink()
    b = make(tmp_path)
    b.store([uplink(2)])
    again = b.take(live=True)
    assert again is not None and again.seq > first.seq


def filled(tmp_path: Path, uplinks: int = 200) -> Path:
    b = make(tmp_path)
    b.store([uplink(i, readings=10) for i in range(uplinks)])
    b.close()
    return tmp_path / "b.db"


@pytest.mark.parametrize(
    "damage",
    ["truncate-mid-page", "truncate-pages", "garbage", "zeroed-page"],
)
def test_a_damaged_file_is_moved_aside_and_a_new_buffer_starts(tmp_path: Path, damage: str) -> None:
    """Truncated, overwritten or non-SQLite buffer files are detected at open, renamed with a
    timestamp, and replaced by an empty buffer that records what happened."""
    path = filled(tmp_path)
    data = path.read_bytes()
    if damage == "truncate-mid-page":
        path.write_bytes(data[: len(data) // 2 + 100])
    elif damage == "truncate-pages":
        path.write_bytes(data[: (len(data) // 4096 // 2) * 4096])
    elif damage == "garbage":
        path.write_bytes(b"this is not a database\n" * 500)
    else:  # a page of the uplinks table zeroed, as a failing SD card might leave it
        path.write_bytes(data[: 4096 * 3] + bytes(4096) + data[4096 * 4 :])
    b = make(tmp_path)
    assert b.recovered is not None
    moved = b.recovered.moved_to
    assert re.fullmatch(r"b\.db\.corrupt-\d{8}T\d{6}Z", moved.name)
    assert moved.exists() and moved.stat().st_size > 0
    assert b.depth().total_readings == 0
    b.store([uplink(1)])
    assert b.depth().readings == 3
    b.close()
    status = sqlite3.connect(path).execute("SELECT value FROM state WHERE key='recovered'").fetchone()
    assert json.loads(status[0])["moved_to"] == str(moved)


def test_a_sound_file_is_not_moved(tmp_path: Path) -> None:
    """A file that passes the checks is opened as it is, backlog intact."""
    filled(tmp_path)
    b = make(tmp_path)
    assert b.recovered is None and b.depth().readings == 2000
    assert integrity_problems(tmp_path / "b.db", quick=False) == []


def test_the_damage_marker_moves_the_file_aside_at_next_open(tmp_path: Path) -> None:
    """Damage a running daemon found (it leaves a marker and exits) is acted on at the next start."""
    path = filled(tmp_path)
    mark_damaged(path, "database disk image is malformed")
    b = make(tmp_path)
    assert b.recovered is not None and b.recovered.reason == "database disk image is malformed"
    assert not damage_marker(path).exists()


def test_integrity_problems_reports_what_sqlite_finds(tmp_path: Path) -> None:
    """`check`'s integrity check names the damage in a file that still opens."""
    path = filled(tmp_path)
    data = bytearray(path.read_bytes())
    data[4096 * 1 : 4096 * 1 + 12] = b"\x07" * 12  # page 2 (the uplinks table's root): no such page type
    path.write_bytes(bytes(data))
    problems = integrity_problems(path, quick=False)
    assert problems and all(isinstance(p, str) for p in problems)


def test_a_full_disk_refuses_intake_whole_but_leaves_the_drain_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the filesystem (as statvfs reports it) nearly full, a group that does not fit is
    refused whole (DiskFullError, nothing stored); the drain may still use the room held back
    for it; with room again the group is taken."""
    b = make(tmp_path)
    b.store([uplink(i, received_ms=now_ms()) for i in range(10)])
    free = {"bytes": buffer_module.WAL_ALLOWANCE + buffer_module.DRAIN_RESERVE + 8192}
    real = os.statvfs

    class Fs:
        f_frsize = 1

        @property
        def f_bavail(self) -> int:
            return free["bytes"]

    monkeypatch.setattr(buffer_module.os, "statvfs", lambda path: Fs())
    before = b.depth()
    with pytest.raises(DiskFullError, match="full"):
        b.store([uplink(100 + i, readings=200) for i in range(50)])
    assert b.depth() == before
    batch = b.take(live=True)  # the drain has DRAIN_RESERVE more
    assert batch is not None
    b.confirm(batch.seq)
    free["bytes"] = real(tmp_path).f_bavail * real(tmp_path).f_frsize
    assert b.store([uplink(100 + i, readings=200) for i in range(50)]).stored == 50


def test_idempotency_keys_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most SEEN_KEPT_ROWS keys (the newest) are kept, in memory and in the file, and they
    survive a reopen; within that window a redelivery is a duplicate."""
    monkeypatch.setattr(buffer_module, "SEEN_KEPT_ROWS", 50)
    b = make(tmp_path)
    b.store([uplink(i, received_ms=now_ms()) for i in range(120)])
    b.enforce_bounds()
    assert next(iter(b._seen)) == "chirpstack/70" and len(b._seen) == 50
    assert b._db.execute("SELECT count(*) FROM seen_log").fetchone()[0] == 50
    b.close()
    b = make(tmp_path)
    assert len(b._seen) == 50
    assert b.store([uplink(119, received_ms=now_ms())]).duplicates == 1  # recent keys still dedupe
    assert b.store([uplink(3, received_ms=now_ms())]).stored == 1  # past the window: forgotten


def test_uplinks_after_the_table_empties_are_still_live(tmp_path: Path) -> None:
    """Once every stored uplink has left in a batch, new ones still count as live (SQLite alone
    would give them low, reused ids and they would pass for backlog)."""
    b = make(tmp_path)
    b.mark_live()
    b.store([uplink(1, received_ms=now_ms())])
    batch = b.take(live=True)
    assert batch is not None
    b.confirm(batch.seq)
    b.store([uplink(2, received_ms=now_ms())])
    assert b.depth(live=True).uplinks == 1 and b.depth(live=False).uplinks == 0


def test_compact_packs_a_long_backlog_into_batches_and_keeps_every_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past COMPACT_ABOVE bytes of unbatched series, the oldest are packed into formed batches
    (far smaller on disk); the batches hold exactly the readings, oldest first."""
    monkeypatch.setattr(buffer_module, "COMPACT_ABOVE", 20_000)
    b = make(tmp_path)
    b.store([uplink(i, readings=5, received_ms=now_ms()) for i in range(400)])
    raw = b.depth().bytes
    seqs = b.compact(max_batches=100)
    assert seqs and b.depth().bytes <= 20_000
    assert b.depth().total_bytes < raw / 2
    packed = [b.batch(seq) for seq in seqs]
    sources = [row["record_source"] for batch in packed if batch for row in rows_of(batch.payload)]
    numbers = [int(s.split("/")[1]) for s in dict.fromkeys(sources)]
    assert numbers == list(range(len(numbers)))  # the oldest, in order, none twice
    assert b.depth().total_readings == 2000
    assert b.pending_seqs() == seqs


def test_an_uplink_the_wire_cannot_carry_is_a_dead_letter_and_its_group_is_stored(tmp_path: Path) -> None:
    """A reading or meta value JSON cannot hold (NaN from a hostile event) makes its uplink a dead
    letter with the reason and raw payload; the rest of the group is stored as usual."""
    b = make(tmp_path)
    nan_value = DecodedUplink(
        "chirpstack/nan", "s1", DEV, 5, {}, (Reading("CC1", float("nan"), "mA", 5),), payload=b"\x02raw"
    )
    nan_meta = DecodedUplink("chirpstack/snr", "s1", DEV, 6, {"snr": float("nan")}, (Reading("CC1", 1, "mA", 6),))
    result = b.store([uplink(1), nan_value, nan_meta, uplink(2)])
    assert (result.stored, result.dead_letters) == (2, 2)
    assert b.depth().readings == 6
    rows = sqlite3.connect(tmp_path / "b.db").execute("SELECT source, reason, payload FROM dead_letters").fetchall()
    assert [(r[0], bytes(r[2])) for r in rows] == [("chirpstack/nan", b"\x02raw"), ("chirpstack/snr", b"")]
    assert [r[1].split(": ", 1)[1] for r in rows] == [
        "CC1 is nan (not a finite number)",
        "meta field 'snr' is nan (not a finite number)",
    ]


def test_an_uplink_too_big_for_any_message_is_a_dead_letter_at_intake(tmp_path: Path) -> None:
    """An uplink whose readings exceed batch.max_bytes even compressed can never be sent: it is a
    dead letter saying so, never a batch retried until max_age."""
    b = make(tmp_path, max_bytes=4096, gzip=True)
    rng = __import__("random").Random(1)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(20_000))
    huge = DecodedUplink("chirpstack/huge", "s1", DEV, 5, {}, (Reading("label", noise, None, 5),), payload=b"x")
    result = b.store([huge, uplink(1)])
    assert (result.stored, result.dead_letters) == (1, 1)
    reason = sqlite3.connect(tmp_path / "b.db").execute("SELECT reason FROM dead_letters").fetchone()[0]
    assert "could never be sent" in reason and "max_bytes 4096" in reason


def test_dead_letters_and_unmapped_uplinks_count_in_max_size_and_keep_their_share(tmp_path: Path) -> None:
    """Dead letters and unmapped uplinks are bounded in bytes (a tenth of max_size each, oldest
    pruned first) and counted in max_size, so bad input cannot grow the file past its bound."""
    from gateway.model import Unmapped, Uplink

    b = make(tmp_path, max_size=1_000_000)
    big = b"\xff" * 50_000
    letters = [DeadLetter(DEV, f"bad/{i}", 1, "nope", big, 1_000 + i) for i in range(30)]
    kept = [Unmapped(Uplink(f"osm/0A1B2C3D/{i}", DeviceKey("osm_id", "0A1B2C3D"), big, 1, 1)) for i in range(30)]
    b.store(letters + kept)  # type: ignore[arg-type]
    db = sqlite3.connect(tmp_path / "b.db")
    dead_bytes = db.execute("SELECT sum(length(payload)) FROM dead_letters").fetchone()[0]
    unmapped_bytes = db.execute("SELECT sum(length(uplink)) FROM unmapped").fetchone()[0]
    assert dead_bytes <= 100_000 and unmapped_bytes <= 100_000 + 101_000  # the newest row is always kept
    assert db.execute("SELECT source FROM dead_letters ORDER BY id DESC").fetchone()[0] == "bad/29"  # newest kept
    b.store([uplink(i, readings=1) for i in range(5)])
    b.close()
    totals = json.loads(db.execute("SELECT value FROM state WHERE key='totals'").fetchone()[0])
    assert (totals["dead_letter_bytes"], totals["unmapped_bytes"]) == (dead_bytes, unmapped_bytes)


def test_unmapped_uplinks_are_read_in_pages(tmp_path: Path) -> None:
    """A replay reads the unmapped store page by page, bounded in bytes, never all at once."""
    from gateway.model import Unmapped, Uplink

    b = make(tmp_path)
    device = DeviceKey("osm_id", "0A1B2C3D")
    b.store([Unmapped(Uplink(f"osm/0A1B2C3D/{i}", device, b"x" * 1000, 1, 1)) for i in range(50)])
    pages, after = [], 0
    while page := b.unmapped(after_id=after, max_bytes=10_000):
        pages.append(len(page))
        after = page[-1][0]
    assert sum(pages) == 50 and max(pages) <= 5


def test_negative_saved_totals_are_recounted_at_open(tmp_path: Path) -> None:
    """Totals that are impossible (negative, left by two writers) are counted again from the file
    at open, so a backlog can always drain."""
    b = make(tmp_path)
    b.store([uplink(i) for i in range(4)])
    b.close()
    db = sqlite3.connect(tmp_path / "b.db")
    totals = json.loads(db.execute("SELECT value FROM state WHERE key='totals'").fetchone()[0])
    db.execute("UPDATE state SET value=? WHERE key='totals'", (json.dumps(dict(totals, readings=-65)),))
    db.commit()
    db.close()
    b = make(tmp_path)
    assert b.depth().readings == 12


def test_a_second_buffer_on_the_same_file_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    """Only one writer: a second open of the same buffer fails, naming the pid that holds it,
    and succeeds once the first is closed."""
    from gateway.errors import BufferBusyError

    b = make(tmp_path)
    with pytest.raises(BufferBusyError, match=rf"already running \(pid {os.getpid()}\)"):
        make(tmp_path)
    b.close()
    make(tmp_path).close()


def test_a_deleted_buffer_file_is_noticed_and_its_content_written_back(tmp_path: Path) -> None:
    """`rm buffer.db` under a running daemon: the next write raises BufferLostError instead of
    committing to an unlinked file, and rescue() puts every stored reading back at the path."""
    from gateway.errors import BufferLostError

    b = make(tmp_path)
    b.store([uplink(i) for i in range(5)])
    (tmp_path / "b.db").unlink()
    with pytest.raises(BufferLostError, match="deleted"):
        b.store([uplink(9)])
    assert b.rescue() == tmp_path / "b.db"
    b = make(tmp_path)
    assert b.depth().readings == 15


def test_the_devices_table_keeps_only_the_newest_unmapped_devices(tmp_path: Path) -> None:
    """A stream of distinct unmapped dev_euis cannot grow the per-device table without bound:
    the most recently heard 1,000 are kept, mapped devices always."""
    from gateway.model import Unmapped, Uplink

    b = make(tmp_path)
    b.store([uplink(1)])
    strays = [
        Unmapped(Uplink(f"chirpstack/u{i}", DeviceKey("dev_eui", f"{i:016x}"), b"", 1, 1_000 + i)) for i in range(1500)
    ]
    b.store(strays)  # type: ignore[arg-type]
    b.heartbeat()
    db = sqlite3.connect(tmp_path / "b.db")
    assert db.execute("SELECT count(*) FROM devices WHERE sensor_id IS NULL").fetchone()[0] == 1000
    assert db.execute("SELECT min(last_seen_ms) FROM devices WHERE sensor_id IS NULL").fetchone()[0] == 1_500
    assert db.execute("SELECT count(*) FROM devices WHERE sensor_id = 's1'").fetchone()[0] == 1


def test_an_integer_the_cloud_cannot_store_makes_its_uplink_a_dead_letter(tmp_path: Path) -> None:
    """A reading of 39 or more digits (Snowflake's NUMBER holds 38) is a dead letter naming the
    metric and its size, never a value the loader rejects or rounds."""
    b = make(tmp_path)
    big = DecodedUplink("chirpstack/big", "s1", DEV, 5, {}, (Reading("count", 10**38, None, 5),))
    fits = DecodedUplink("chirpstack/fits", "s1", DEV, 5, {}, (Reading("count", 10**38 - 1, None, 5),))
    result = b.store([big, fits])
    assert (result.stored, result.dead_letters) == (1, 1)
    reason = sqlite3.connect(tmp_path / "b.db").execute("SELECT reason FROM dead_letters").fetchone()[0]
    assert "count is an integer of 39 digits" in reason


def test_a_heartbeat_during_stores_loses_no_device_counts(tmp_path: Path) -> None:
    """Heartbeats that write the per-device counts while another thread stores groups never drop
    a group's counts: the table ends with every uplink counted once."""
    import threading

    b = make(tmp_path)
    done = threading.Event()

    def beat() -> None:
        while not done.is_set():
            b.heartbeat()

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        for g in range(300):
            b.store([uplink(g * 10 + i, readings=1) for i in range(10)])
    finally:
        done.set()
        beater.join()
    b.heartbeat()
    counted = sqlite3.connect(tmp_path / "b.db").execute("SELECT uplinks FROM devices").fetchone()[0]
    assert counted == 3000


def test_a_gap_names_each_reason_once(tmp_path: Path) -> None:
    """Drops for age and size, then for size again, give meta.gap the reasons "max_age" and
    "max_size" once each, not "max_age, max_size" beside "max_size"."""
    now = now_ms()
    b = make(tmp_path, gzip=False)
    b.store([uplink(i, readings=5, received_ms=now - 120_000) for i in range(3)])
    b.store([uplink(100 + i, readings=5, received_ms=now) for i in range(30)])
    b.close()
    b = make(tmp_path, max_size=3_000, gzip=False, max_age_s=60.0)  # both bounds now exceeded
    b.enforce_bounds(at_ms=now)
    b.store([uplink(200 + i, readings=5, received_ms=now) for i in range(30)])  # max_size again
    batch = b.take(live=True)
    assert batch is not None
    reasons = wire.decode_message(batch.payload)["meta"]["gap"]["reason"].split(", ")
    assert sorted(reasons) == ["max_age", "max_size"]


def test_disk_full_is_known_by_sqlites_code_not_by_the_word_full(tmp_path: Path) -> None:
    """An error whose text merely contains "full" (a table named full_history) is not a full disk."""
    from gateway.buffer import is_disk_full

    db = sqlite3.connect(tmp_path / "x.db")
    with pytest.raises(sqlite3.OperationalError) as raised:
        db.execute("SELECT * FROM full_history")
    assert not is_disk_full(raised.value)


def test_a_lone_surrogate_in_a_reading_is_a_dead_letter(tmp_path: Path) -> None:
    """A string with a lone surrogate (JSON "\\ud800" from an OSM unit) is not UTF-8: its uplink
    is a dead letter with the reason, and the rest of the group is stored."""
    b = make(tmp_path)
    odd = DecodedUplink("osm/1", "s1", DEV, 5, {}, (Reading("name", "a\ud800b", None, 5),))
    result = b.store([odd, uplink(1)])
    assert (result.stored, result.dead_letters) == (1, 1)
    reason = sqlite3.connect(tmp_path / "b.db").execute("SELECT reason FROM dead_letters").fetchone()[0]
    assert "surrogates not allowed" in reason
