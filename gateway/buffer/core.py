"""The buffer's core: the open file, its in-memory state, and the one way to write it.

`Core` opens the file (a damaged one moved aside, a first-version one carried over), holds the
state the other parts share (totals, the idempotency window, the pending gap, what takes have
out), and runs every write through `_write`: one transaction, and on failure the in-memory
state put back as it was, so memory always matches the file. `Takes` (takes.py), `Bounds`
(bounds.py) and `Buffer` (sqlite.py) build on it.
"""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gateway.buffer import records as rec
from gateway.buffer import side
from gateway.buffer.files import (
    QUICK_CHECK_AT_OPEN_MAX,
    Recovered,
    connect,
    damage_marker,
    file_damage,
    is_damage,
    is_disk_full,
    lock_buffer,
    now_ms,
    quarantine,
)
from gateway.buffer.records import Stored
from gateway.buffer.results import Gap
from gateway.buffer.room import FreeSpace, Room, disk_free
from gateway.buffer.schema import ADDED_COLUMNS, SCHEMA, SCHEMA_VERSION, file_totals
from gateway.errors import BufferLostError, DiskFullError
from gateway.model import DeadLetter

log = structlog.get_logger("gateway.buffer")

if TYPE_CHECKING:
    from gateway.buffer.takes import Take

SEEN_KEPT_MS = 2 * 86_400_000  # idempotency keys older than this are forgotten
SEEN_KEPT_ROWS = 100_000  # and at most this many are kept
#: Confirmed chunks wait at most this long for a commit to delete them in (`settle`).
SETTLE_AFTER_S = 1.0


@dataclass
class Touched:
    """A chunk some take has handed out records of: which are out, which are confirmed."""

    records: int
    out: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)


@dataclass
class Counts:
    records: int = 0
    readings: int = 0
    raw: int = 0

    def add(self, records: int, readings: int, raw: int, sign: int = 1) -> None:
        self.records += sign * records
        self.readings += sign * readings
        self.raw += sign * raw


class ChunkDamaged(Exception):
    """A chunk's data cannot be decompressed or unpacked."""

    def __init__(self, chunk_id: int, reason: str) -> None:
        super().__init__(f"chunk {chunk_id}: {reason}")
        self.chunk_id, self.reason = chunk_id, reason


class Core:
    """The open buffer file and the state its parts share. One writer; thread-safe."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_size: int = 1024**3,
        max_age_s: float = 7 * 86400.0,
        when_full: str = "drop-oldest",
        free_space: FreeSpace = disk_free,
        clock: Callable[[], int] = now_ms,
        monotonic: Callable[[], float] = time.monotonic,
        seen_kept: int = SEEN_KEPT_ROWS,
    ) -> None:
        self.path = Path(path)
        self.max_size = max_size
        self.max_age_ms = int(max_age_s * 1000)
        self.when_full = when_full
        self._clock = clock
        self._monotonic = monotonic
        #: Idempotency keys kept, the newest (SEEN_KEPT_ROWS; smaller in tests).
        self._seen_kept = seen_kept
        self._lock = threading.RLock()
        self._room = Room(self.path, free_space)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Before anything touches the file: a second daemon on it would corrupt it.
        self._lock_fd: int | None = lock_buffer(self.path)
        #: Set when the file was damaged at start-up and moved aside (the service says so loudly).
        self.recovered: Recovered | None = None
        #: Whether `quick_check` ran at open; if not (a large file), the service runs
        #: `integrity_problems` in the background after READY.
        self.checked_at_open = False
        self.migrated: str | None = None
        self._totals: dict[str, int] = {}
        self._counters: dict[str, int] = {}
        self._devices = side.DeviceCounts()
        self._seen: dict[int, None] = {}
        self._gap = Gap()  # drops no message reports yet (a take that does holds its own)
        self._gap_dirty = False
        self._last_publish_ms: int | None = None
        #: Facts of the running daemon for `status` (`note_state`), and what the file has of them.
        self._notes: dict[str, str] = {}
        self._notes_written: dict[str, str] = {}
        #: Bytes of chunks stored since open (intake's rate, for the runway).
        self.stored_bytes_total = 0
        #: Every `count` since open, never reset (the persistent ones are written and reset).
        self.counted: dict[str, int] = {}
        self._pending: list[int] = []  # confirmed chunks, deleted with the next commit
        self._unrecorded: list[Take] = []  # takes to record with the next commit
        self._unrecord: list[int] = []  # seqs of recorded takes to forget with the next commit
        self._mark_done: list[int] = []  # seqs of recorded takes that ended, marked with the next commit
        #: Recorded takes that ended, by seq: the chunks of theirs not yet deleted. The record
        #: stays (done) until the last of them goes, so a restart never hands out again records
        #: confirmed in a chunk that still holds others.
        self._ended: dict[int, set[int]] = {}
        self._waiting_since: float | None = None  # when the oldest of those began to wait
        self._touched: dict[int, Touched] = {}
        self._released: deque[Take] = deque()
        self._untaken = {True: Counts(), False: Counts()}
        self._out = Counts()  # in open or released takes
        self._takes = 0
        self._live_since: float | None = None
        self._unpacked: dict[int, list[Stored]] = {}
        self._next_seq = 0
        try:
            self._db = self._open()
        except BaseException:
            self._unlock()
            raise
        st = self.path.stat()
        self._identity = (st.st_dev, st.st_ino)  # to notice the file deleted or replaced under us
        self._next_id = self._totals["upto"] + 1
        # Chunks with id >= live_from are live; older ones are backlog (see `mark_live`).
        self.live_from = self._next_id
        self._cursor = {True: (self.live_from, 0), False: (0, 0)}
        t = self._totals
        self._untaken[False] = Counts(t["records"], t["readings"], t["raw"])
        self._next_seq = max(int(self._get_state("next_seq") or "1"), self._clock())
        self._restore_takes()

    # ---- opening -----------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        """Open the file; a damaged one is moved aside and a new buffer started in its place."""
        marker = damage_marker(self.path)
        reason = marker.read_text().strip() if marker.exists() else None
        reason = reason or file_damage(self.path)
        if reason is None:
            db = None
            try:
                # Inside the try: `PRAGMA journal_mode=WAL` is the first read of page 1, and a
                # damaged page 1 fails right there.
                db = connect(self.path)
                self._db = db
                self._prepare()
                if self.path.stat().st_size <= QUICK_CHECK_AT_OPEN_MAX:
                    self.checked_at_open = True
                    rows = db.execute("PRAGMA quick_check(5)").fetchall()
                    if [r[0] for r in rows] != ["ok"]:
                        reason = "; ".join(str(r[0]) for r in rows)
            except sqlite3.DatabaseError as exc:
                if db is not None:
                    db.close()
                if not is_damage(exc):
                    raise
                reason = str(exc)
            else:
                if reason is None:
                    return db
                db.close()
        moved = quarantine(self.path)
        self.recovered = Recovered(moved, reason)
        self.checked_at_open = True  # a new, empty file
        db = connect(self.path)
        self._db = db
        self._prepare()
        self._set_state("recovered", json.dumps({"moved_to": str(moved), "reason": reason, "at_ms": self._clock()}))
        self._counters["buffer_recovered"] = 1
        self._save_state()
        return db

    def _prepare(self) -> None:
        """Schema, a first-version file carried over, totals and the idempotency window."""
        from gateway.buffer.migrate import is_first_version, migrate_first_version

        db = self._db
        db.executescript(SCHEMA)
        if is_first_version(db):
            self.migrated = migrate_first_version(db)
        for table, column, kind in ADDED_COLUMNS:
            if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        db.execute("INSERT OR REPLACE INTO state VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        self._totals = file_totals(db)
        self._gap = Gap(**json.loads(self._get_state("gap") or "{}"))
        # The idempotency window, newest keys last: unsent chunks first, then sent ones.
        cutoff = self._clock() - SEEN_KEPT_MS
        window: list[int] = []
        for table in ("chunks", "seen"):
            for (blob,) in db.execute(f"SELECT keys FROM {table} WHERE last_ms >= ? ORDER BY id DESC", (cutoff,)):
                window.extend(reversed(rec.unpack_keys(blob)))
                if len(window) >= self._seen_kept:
                    break
            if len(window) >= self._seen_kept:
                break
        self._seen = dict.fromkeys(reversed(window[: self._seen_kept]))

    # ---- small state -------------------------------------------------------------------

    def _get_state(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_state(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, value))

    def _save_totals(self) -> None:
        """Totals, next seq and a changed gap: what must match the chunks (part of a transaction)."""
        self._set_state("totals", json.dumps(self._totals))
        self._set_state("next_seq", str(self._next_seq))
        if self._gap_dirty:
            self._set_state("gap", json.dumps(self._gap.__dict__))
            self._gap_dirty = False

    def _save_state(self) -> None:
        """`_save_totals`, and the counters and last publish time kept in memory since the last
        (heartbeat, close, rare events: never a write of their own per publish)."""
        self._save_totals()
        if self._last_publish_ms is not None:
            self._set_state("last_publish_ms", str(self._last_publish_ms))
        for name, n in self._counters.items():
            self._db.execute(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?", (name, n, n)
            )
        self._counters = {}

    def count(self, name: str, n: int = 1) -> None:
        """Add to a persistent counter (written with the next commit or heartbeat)."""
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + n
            self.counted[name] = self.counted.get(name, 0) + n

    def _write(self, work: Callable[[sqlite3.Connection], Any], drain: bool) -> Any:
        """Run `work` in one write transaction; on failure the in-memory state the transaction
        touches (totals, counters, pending deletions, gap, device counts, untaken counts) is
        restored, so it matches the file."""
        with self._lock:
            self._check_file()
            saved = (
                dict(self._totals),
                dict(self._counters),
                list(self._pending),
                list(self._unrecorded),
                list(self._unrecord),
                list(self._mark_done),
                {seq: set(cids) for seq, cids in self._ended.items()},
                copy.deepcopy(self._gap),
                self._gap_dirty,
                {k: dict(v) for k, v in self._devices.pending.items()},
                {live: copy.copy(c) for live, c in self._untaken.items()},
            )
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                self._room.cap(db, drain=drain)
                result = work(db)
                recorded = self._ride(db)
                db.execute("COMMIT")  # may fail too (SQLITE_FULL appending to the WAL)
            except BaseException as exc:
                if db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                    db.execute("ROLLBACK")
                (
                    self._totals,
                    self._counters,
                    self._pending,
                    self._unrecorded,
                    self._unrecord,
                    self._mark_done,
                    self._ended,
                    self._gap,
                    self._gap_dirty,
                    self._devices.pending,
                    self._untaken,
                ) = saved
                if isinstance(exc, sqlite3.OperationalError) and is_disk_full(exc):
                    self.checkpoint()  # the WAL holds space a checkpoint gives back
                    raise DiskFullError(f"the disk holding {self.path} is full ({exc})") from exc
                raise
            for take in recorded:
                take.recorded = True
            self._waiting_since = None
            return result

    def _wait(self) -> None:
        """Something now waits for the next commit (`_ride`)."""
        if self._waiting_since is None:
            self._waiting_since = self._monotonic()

    def _ride(self, db: sqlite3.Connection) -> list[Take]:
        """What rides on every commit (part of it): new takes recorded, ended ones forgotten,
        confirmed chunks deleted. Returns the takes it recorded."""
        recorded = self._unrecorded
        if recorded:
            db.executemany(
                "INSERT OR REPLACE INTO takes (seq, created_ms, spans, gap) VALUES (?,?,?,?)",
                [
                    (t.seq, t.created_ms, json.dumps(t.spans), json.dumps(t.gap.__dict__) if t.gap else None)
                    for t in recorded
                ],
            )
            self._unrecorded = []
        if self._unrecord:
            db.executemany("DELETE FROM takes WHERE seq = ?", [(seq,) for seq in self._unrecord])
            self._unrecord = []
        if self._mark_done:
            db.executemany("UPDATE takes SET done = 1 WHERE seq = ?", [(seq,) for seq in self._mark_done])
            self._mark_done = []
        deleting = bool(self._pending)
        if deleting:
            self._delete_confirmed(db)
        if deleting or self._gap_dirty or recorded:
            self._save_totals()  # the next seq and a gap moved into a take go with its record
        return recorded

    def _restore_takes(self) -> None:
        """The takes recorded before the last stop come back as released: handed out first, with
        the same seq, records and gap, so their messages are the same bytes as before. The
        records of takes that ended (done) are not handed out again."""
        from gateway.buffer.takes import Take, TakeState

        rows = self._db.execute("SELECT seq, created_ms, spans, gap, done FROM takes ORDER BY seq").fetchall()
        lost = []
        for seq, created, spans_text, gap_text, done in rows:
            self._next_seq = max(self._next_seq, seq + 1)
            spans = [(int(s[0]), int(s[1]), int(s[2])) for s in json.loads(spans_text)]
            present = {
                cid: count
                for cid, count in self._db.execute(
                    f"SELECT id, records FROM chunks WHERE id IN ({','.join('?' * len(spans))})",
                    [cid for cid, _, _ in spans],
                )
            }
            if done:
                for cid, lo, hi in spans:
                    if cid in present:
                        self._touched.setdefault(cid, Touched(present[cid])).done.update(range(lo, hi))
                if present:
                    self._ended[seq] = set(present)
                else:
                    lost.append(seq)
                continue
            records: list[Stored] = []
            for cid, lo, hi in spans:
                stored = self._records_or_none(cid) if cid in present else None
                if stored is None or hi > len(stored):
                    break
                records += stored[lo:hi]
            else:
                take = Take(self, seq, created, False, records, spans, state=TakeState.RELEASED)  # type: ignore[arg-type]
                take.recorded = True
                if gap_text:
                    take.gap = Gap(**json.loads(gap_text))
                for cid, lo, hi in spans:
                    self._touched.setdefault(cid, Touched(present[cid])).out.update(range(lo, hi))
                self._released.append(take)
                continue
            lost.append(seq)  # its records are no longer all there: they are handed out anew
            if gap_text:
                self._gap.merge(Gap(**json.loads(gap_text)))
        for cid, touched in list(self._touched.items()):
            if len(touched.done) >= touched.records:  # every record confirmed: it goes
                del self._touched[cid]
                self._pending.append(cid)
                self._wait()
        if lost:
            self._db.executemany("DELETE FROM takes WHERE seq = ?", [(seq,) for seq in lost])

    def _records_or_none(self, chunk_id: int) -> list[Stored] | None:
        """A chunk's records, or None (and the chunk moved to the dead letters) if it is damaged."""
        try:
            return self._records_of(chunk_id)
        except ChunkDamaged as exc:
            self._lose_chunk(chunk_id, exc.reason)
            return None

    def _records_of(self, chunk_id: int) -> list[Stored]:
        cached = self._unpacked.get(chunk_id)
        if cached is None:
            row = self._db.execute("SELECT data FROM chunks WHERE id=?", (chunk_id,)).fetchone()
            try:
                cached = rec.unpack(bytes(row[0]))
            except (zlib.error, struct.error, ValueError, IndexError) as exc:
                raise ChunkDamaged(chunk_id, f"{type(exc).__name__}: {exc}") from exc
            if len(self._unpacked) >= 4:
                self._unpacked.pop(next(iter(self._unpacked)))
            self._unpacked[chunk_id] = cached
        return cached

    def _lose_chunk(self, chunk_id: int, reason: str) -> None:
        """A chunk that cannot be read (bit rot passes SQLite's checks: it has no checksums) is
        moved to the dead letters, whole, with the reason, so the drain goes on past it."""
        row = self._db.execute(
            "SELECT first_ms, records, readings, raw, size, keys, data FROM chunks WHERE id=?", (chunk_id,)
        ).fetchone()
        if row is None:
            return
        first, records, readings, raw, size, keys, data = row
        why = (
            f"buffer chunk {chunk_id} is damaged and cannot be read ({reason}): {readings} readings of "
            f"{records} uplinks lost; its stored bytes are kept here"
        )

        def work(db: sqlite3.Connection) -> None:
            letter = DeadLetter(None, f"buffer/chunk/{chunk_id}", None, why, bytes(data), first)
            self._totals["dead_letter_bytes"] += side.insert_dead_letter(db, letter)
            if keys:
                db.execute("INSERT INTO seen (last_ms, keys) VALUES (?, ?)", (first, keys))
            db.execute("DELETE FROM chunks WHERE id=?", (chunk_id,))
            t = self._totals
            t["chunks"] -= 1
            t["records"] -= records
            t["readings"] -= readings
            t["raw"] -= raw
            t["bytes"] -= size
            self.count("damaged_chunks")
            self.count("dead_letters")
            self._save_state()

        self._write(work, drain=True)
        touched = self._touched.pop(chunk_id, None)
        out = len(touched.out) if touched else 0
        done = len(touched.done) if touched else 0
        # What was not out or done was counted untaken; takes holding the rest keep their copies.
        untaken = max(0, records - out - done)
        live = chunk_id >= self.live_from
        share = untaken / records if records else 0
        self._untaken[live].add(untaken, round(readings * share), round(raw * share), -1)
        log.critical(
            "BUFFER CHUNK DAMAGED: moved to the dead letters", chunk=chunk_id, reason=reason, readings=readings
        )

    # ---- the file under us ---------------------------------------------------------------

    def _check_file(self) -> None:
        """Raise `BufferLostError` when the file we write is no longer the one at `path`.

        `rm buffer.db` under a running daemon leaves SQLite writing to an unlinked inode: every
        commit would succeed and be acknowledged upstream, and vanish at the next start.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise BufferLostError(f"the buffer file {self.path} was deleted while the daemon ran") from None
        if (st.st_dev, st.st_ino) != self._identity:
            raise BufferLostError(f"the buffer file {self.path} was replaced by another file while the daemon ran")

    def abandon(self) -> None:
        """Give up the file without writing to it again (it is damaged): release the lock only."""
        with self._lock:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def checkpoint(self) -> None:
        """Copy the WAL into the file and truncate it, giving its space back (used when full)."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:
                pass  # no room yet to copy the WAL's pages home; a later try may have it

    def _total_bytes(self) -> int:
        """What max_size bounds: chunks, and the dead letters and unmapped uplinks beside them."""
        t = self._totals
        return t["bytes"] + t["dead_letter_bytes"] + t["unmapped_bytes"]

    def _insert_chunk(self, db: sqlite3.Connection, chunk: Sequence[Stored], key_blob: bytes) -> int:
        data = rec.pack(chunk)
        chunk_id = self._next_id
        readings = sum(r.readings for r in chunk)
        raw = sum(len(r.payload) for r in chunk)
        size = len(data) + len(key_blob)
        db.execute(
            "INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?,?)",
            (
                chunk_id,
                min(r.received_ms for r in chunk),
                max(r.received_ms for r in chunk),
                len(chunk),
                readings,
                raw,
                size,
                key_blob,
                data,
            ),
        )
        self._next_id += 1  # rises within a run even when the table empties: new chunks are live
        t = self._totals
        t["chunks"] += 1
        t["records"] += len(chunk)
        t["readings"] += readings
        t["raw"] += raw
        t["bytes"] += size
        t["upto"] = max(t["upto"], chunk_id)
        self.stored_bytes_total += size
        return chunk_id

    def _delete_confirmed(self, db: sqlite3.Connection) -> None:
        """Delete fully confirmed chunks, keeping their keys in `seen` (part of a transaction)."""
        ids = sorted(self._pending)
        marks = ",".join("?" * len(ids))
        rows = db.execute(
            f"SELECT records, readings, raw, size, last_ms, keys FROM chunks WHERE id IN ({marks})", ids
        ).fetchall()
        keys = b"".join(bytes(r[5]) for r in rows)
        if keys:
            db.execute("INSERT INTO seen (last_ms, keys) VALUES (?, ?)", (max(r[4] for r in rows), keys))
        db.execute(f"DELETE FROM chunks WHERE id IN ({marks})", ids)
        gone = set(ids)
        for seq, cids in list(self._ended.items()):
            cids -= gone
            if not cids:
                del self._ended[seq]
                db.execute("DELETE FROM takes WHERE seq = ?", (seq,))
        t = self._totals
        for records, readings, raw, size, _, _ in rows:
            t["chunks"] -= 1
            t["records"] -= records
            t["readings"] -= readings
            t["raw"] -= raw
            t["bytes"] -= size
        self._pending = []
