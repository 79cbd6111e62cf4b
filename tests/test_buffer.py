"""The buffer's contract: durable store, idempotent intake, batches formed oldest first within
the size limit, deleted only on confirm, bounds with a recorded gap."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from gateway import wire
from gateway.buffer import Buffer, now_ms
from gateway.errors import BufferFullError
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
    assert batch is not None and batch.batch_id == "gw-t-01-000000000001" and batch.readings == 30
    b.store([uplink(100)])
    b.close()
    b = make(tmp_path)
    (pending,) = b.pending()
    assert pending.batch_id == batch.batch_id and pending.payload == batch.payload
    assert b.depth().readings == 3 and b.depth().total_readings == 33
    nxt = b.take(live=False)
    assert nxt is not None and nxt.batch_id == "gw-t-01-000000000002"


def test_confirm_deletes_only_the_confirmed_batch(tmp_path: Path) -> None:
    """Readings leave the buffer only when their batch is confirmed."""
    b = make(tmp_path)
    b.store([uplink(i) for i in range(4)])
    first = b.take(live=True)
    b.store([uplink(9)])
    second = b.take(live=True)
    assert first is not None and second is not None
    b.confirm(second.seq)
    assert [p.seq for p in b.pending()] == [first.seq]
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
    """Live readings are due once the oldest has waited max_delay, not before."""
    b = make(tmp_path)
    b.store([uplink(1, received_ms=10_000)])
    assert not b.live_due(5_000, at_ms=14_000)
    assert b.live_due(5_000, at_ms=15_001)


def test_drop_oldest_keeps_size_bound_and_reports_gap(tmp_path: Path) -> None:
    """Over max_size the oldest readings go, and the next batch's meta says how many and when."""
    b = make(tmp_path, max_size=8_000, gzip=False)
    start = now_ms() - 10_000
    b.store([uplink(i, readings=5, received_ms=start) for i in range(100)])
    assert b.depth().total_bytes > 8_000
    gap = b.enforce_bounds()
    assert gap is not None and gap.readings > 0 and "max_size" in gap.reasons
    assert b.depth().total_bytes <= 8_000
    batch = b.take(live=True)
    assert batch is not None
    message = wire.decode_message(batch.payload)
    assert message["meta"]["gap"]["readings"] == gap.readings
    assert message["meta"]["gap"]["from"] == start  # the first uplink's receive time
    first_kept = rows_of(batch.payload)[0]["record_source"]
    assert first_kept == f"chirpstack/{gap.uplinks}"
    second = b.take(live=True)
    assert second is None or "meta" not in wire.decode_message(second.payload)


def test_max_age_drops_old_readings_but_not_batches_in_flight(tmp_path: Path) -> None:
    """Readings past max_age go; a batch in flight is IoT Core's to answer for and stays."""
    b = make(tmp_path, max_age_s=60)
    b.store([uplink(1, received_ms=0)])
    in_flight = b.take(live=True)
    assert in_flight is not None
    b.store([uplink(2, received_ms=0), uplink(3, received_ms=100_000)])
    gap = b.enforce_bounds(in_flight=[in_flight.seq], at_ms=100_000)
    assert gap is not None and gap.readings == 3 and gap.reasons == ["max_age"]
    assert [p.seq for p in b.pending()] == [in_flight.seq]
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
    """A store that fails midway rolls back both the file and the in-memory totals."""
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
    b.close()
    state = sqlite3.connect(tmp_path / "b.db").execute("SELECT value FROM state WHERE key='totals'").fetchone()[0]
    assert json.loads(state)["readings"] == 3
