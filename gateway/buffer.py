"""The durable buffer: SQLite between intake and the cloud.

The transactional interface (STYLE point 7):

- `store(outcomes)`: one durable transaction for a group of uplinks (readings, dead letters,
  unmapped uplinks, device logs); returns only after fsync, so the caller may then ack upstream.
- `take(live=...)`: form the next batch from stored uplinks, oldest first, in one
  transaction that moves their series into an encoded message (a `batches` row).
- `confirm(seq)`: IoT Core acknowledged the batch; delete it.
- `pending_seqs()` / `batch(seq)`: formed batches not yet confirmed (to re-publish, same bytes).
- `depth()`: the backlog, for batching decisions and `status`.
- `enforce_bounds()`: `max_size` / `max_age`, dropping the oldest and recording a gap.
- `compact()`: a long backlog packed into its final (gzip) messages, a tenth of the size.

Faults it answers for: a damaged file is moved aside at open (`file_damage`, `quick_check`,
the marker a running daemon leaves), a full disk is `BufferFullError` for intake while the
drain keeps room to work (`_cap`), and every transaction restores the in-memory totals when
it fails, so they always match the file.

An uplink is one row holding its series already encoded as JSON (`wire.encode_series`), so
intake is one INSERT per uplink and forming a batch is a string join.
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import wire
from gateway.errors import BufferBusyError, BufferFullError, BufferLostError, DiskFullError
from gateway.model import (
    Batch,
    DeadLetter,
    DecodedUplink,
    DeviceKey,
    DeviceLog,
    ForeignTenant,
    Outcome,
    Unmapped,
    Uplink,
)

SCHEMA_VERSION = 1
DEAD_LETTERS_KEPT = 10_000
UNMAPPED_KEPT = 10_000
#: Dead letters and unmapped uplinks each keep at most this share of `max_size` (their bytes
#: count in it too), so evidence of bad input can never crowd out the readings.
SIDE_STORE_SHARE = 10
UNMAPPED_DEVICES_KEPT = 1_000  # rows of never-mapped devices in the `devices` table
#: Integers the cloud can store: Snowflake's NUMBER(38).
CLOUD_INT_LIMIT = 10**38
#: Room left in a message around one uplink's series (header, brackets, a gap's meta).
MESSAGE_OVERHEAD = 1024
SEEN_KEPT_MS = 2 * 86_400_000  # idempotency keys older than this are forgotten
SEEN_KEPT_ROWS = 100_000  # and at most this many are kept (about 17 MiB in memory, measured)
SQLITE_MAGIC = b"SQLite format 3\x00"
WAL_ALLOWANCE = 6 * 1024**2  # disk kept for the WAL: autocheckpoint at 1000 pages, plus a transaction
DRAIN_RESERVE = 1024**2  # disk only the drain may use, so a full disk still drains (see `_cap`)
COMPACT_ABOVE = 8 * 1024**2  # unbatched series text beyond this is packed into batches (`compact`)
QUICK_CHECK_AT_OPEN_MAX = 64 * 1024**2  # larger files are checked after READY (`integrity_problems`)
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 8, 10, 13, 14

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uplinks (
    id          INTEGER PRIMARY KEY,     -- intake order: batches take oldest first
    source      TEXT NOT NULL,
    sensor_id   TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    readings    INTEGER NOT NULL,
    series      TEXT NOT NULL            -- wire.encode_series: ready to join into a message
);
CREATE TABLE IF NOT EXISTS batches (
    seq         INTEGER PRIMARY KEY,     -- batch_id = <gateway_id>-<seq>, kept on retry
    created_ms  INTEGER NOT NULL,
    oldest_ms   INTEGER NOT NULL,        -- receive time of its oldest uplink (for max_age)
    readings    INTEGER NOT NULL,
    gzip        INTEGER NOT NULL,
    payload     BLOB NOT NULL            -- exactly the bytes published
);
-- Idempotent intake: keys of recently stored uplinks, appended in intake order. No index:
-- lookups go to the in-memory window loaded from it, so intake writes a page of keys, not one
-- random index leaf per uplink (which was most of the bytes written to flash).
CREATE TABLE IF NOT EXISTS seen_log (
    id          INTEGER PRIMARY KEY,
    key         TEXT NOT NULL,
    received_ms INTEGER NOT NULL
);
DROP TABLE IF EXISTS seen;               -- the indexed table of the first version
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,
    received_ms INTEGER NOT NULL,
    device      TEXT,
    sensor_id   TEXT,
    source      TEXT NOT NULL,
    topic       TEXT,
    f_port      INTEGER,
    reason      TEXT NOT NULL,
    payload     BLOB NOT NULL,
    uplink      TEXT                     -- the whole Uplink (JSON) when a codec refused it: re-decoded on reload
);
CREATE TABLE IF NOT EXISTS unmapped (    -- uplinks of devices in no map, for replay
    id          INTEGER PRIMARY KEY,
    received_ms INTEGER NOT NULL,
    device      TEXT NOT NULL,
    uplink      TEXT NOT NULL            -- JSON of the Uplink, payload in hex
);
CREATE TABLE IF NOT EXISTS devices (     -- per-device counters for status
    device        TEXT PRIMARY KEY,
    sensor_id     TEXT,
    last_seen_ms  INTEGER,
    uplinks       INTEGER NOT NULL DEFAULT 0,
    readings      INTEGER NOT NULL DEFAULT 0,
    dead_letters  INTEGER NOT NULL DEFAULT 0,
    log_events    INTEGER NOT NULL DEFAULT 0,
    last_log      TEXT,
    foreign_tenant INTEGER NOT NULL DEFAULT 0,
    note          TEXT                   -- what intake noticed about the device (an override never matched)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (       -- small facts: totals, next batch seq, pending gap
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""


_BATCH_COLUMNS = "seq, created_ms, readings, gzip, payload"
#: What a dead letter weighs in max_size: its payload and, when kept, the whole uplink.
_DEAD_LETTER_SIZE = "length(payload) + coalesce(length(uplink), 0)"
#: Columns added after the first release: (table, column, type), added at open when missing.
_ADDED_COLUMNS = (("dead_letters", "uplink", "TEXT"), ("devices", "note", "TEXT"))
_TOTAL_KEYS = (
    "uplinks",
    "readings",
    "bytes",
    "batches",
    "batch_readings",
    "batch_bytes",
    "dead_letter_bytes",
    "unmapped_bytes",
)


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def connect(path: Path | str, readonly: bool = False) -> sqlite3.Connection:
    """Open the buffer file with the pragmas the gateway relies on."""
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, check_same_thread=False)
    else:
        db = sqlite3.connect(str(path), timeout=5.0, isolation_level=None, check_same_thread=False)
    # Writers and `status` readers must not block each other, and appends should be sequential
    # writes on flash: write-ahead log.
    if not readonly:
        db.execute("PRAGMA journal_mode=WAL")
    # FULL: every commit fsyncs the WAL, so an uplink we acknowledged upstream survives power
    # loss (NORMAL would survive only a process crash). Group commits keep this to one fsync
    # per intake group, not per uplink.
    db.execute("PRAGMA synchronous=FULL")
    # Status runs while the daemon writes; wait for a lock instead of failing at once.
    db.execute("PRAGMA busy_timeout=5000")
    if not readonly:
        # A large transaction (a burst of big messages) grows the WAL; without a limit the file
        # keeps that size for ever. With it, each checkpoint truncates the WAL back to what the
        # disk-room rules (`_cap`) reserve for it.
        db.execute(f"PRAGMA journal_size_limit={WAL_ALLOWANCE}")
        # Debian builds SQLite with secure_delete on: every confirmed batch's pages would be
        # zeroed, a second write of each. FAST zeroes only within pages written anyway.
        db.execute("PRAGMA secure_delete=FAST")
    return db


# ---- damage -------------------------------------------------------------------------------


def is_damage(exc: BaseException) -> bool:
    """True when SQLite says the file itself is broken (corrupt, or not a database at all)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    )


def is_storage_failure(exc: BaseException) -> bool:
    """True when the file cannot be written at all: read-only filesystem, I/O error, gone."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.DatabaseError)
        and code is not None
        and code & 0xFF
        in (
            _SQLITE_READONLY,
            _SQLITE_IOERR,
            _SQLITE_CANTOPEN,
        )
    )


def lock_path(path: Path) -> Path:
    """The lock file beside the buffer: one daemon per buffer (`flock`, released at exit)."""
    return path.with_name(path.name + ".lock")


def lock_buffer(path: Path) -> int:
    """Take the buffer's exclusive lock, or raise `BufferBusyError` naming the holder's pid.

    `flock` is released by the kernel when the process ends, however it ends (kill -9
    included), so a stale lock file never blocks a restart.
    """
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise BufferBusyError(f"already running (pid {holder}): {path} is in use by another hub-gateway") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def is_disk_full(exc: BaseException) -> bool:
    """True when SQLite could not write because the filesystem is full (SQLITE_FULL)."""
    code = getattr(exc, "sqlite_errorcode", None)
    # By SQLite's code only: an error text that merely contains "full" is something else.
    return isinstance(exc, sqlite3.OperationalError) and code is not None and code & 0xFF == _SQLITE_FULL


def file_damage(path: Path) -> str | None:
    """What is wrong with the file's SQLite header or length, or None; cheap, reads 100 bytes.

    Catches the usual damage of a power cut on an SD card: a file cut short (not a whole number
    of pages, or fewer pages than its header counts) and a header that is not SQLite's.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None  # created but never written: SQLite makes it a new database
    with path.open("rb") as f:
        header = f.read(100)
    if len(header) < 100:
        return f"truncated: {size} bytes, shorter than the 100-byte SQLite header"
    if header[:16] != SQLITE_MAGIC:
        return "not an SQLite database: the file does not start with the SQLite header"
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        # Pages may live in the WAL only (an unfinished checkpoint, e.g. on a full disk, leaves
        # the main file short of its header's count): the length says nothing; SQLite's own
        # reading and quick_check judge.
        return None
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"damaged header: page size {page_size} is impossible"
    if size % page_size:
        return f"truncated: {size} bytes is not a whole number of {page_size}-byte pages"
    pages = int.from_bytes(header[28:32], "big")
    if header[24:28] == header[92:96] and pages * page_size > size:
        return f"truncated: the header counts {pages} pages, the file holds {size // page_size}"
    return None


def integrity_problems(path: Path, quick: bool = True, limit: int = 20) -> list[str]:
    """Run SQLite's own check on the file, read-only (safe while the daemon runs).

    `quick` runs `PRAGMA quick_check` (structure, no index-content cross-check: O(file));
    otherwise `PRAGMA integrity_check`. Returns SQLite's complaints; empty when the file is sound.
    """
    damage = file_damage(path)
    if damage is not None:
        return [damage]
    try:
        db = connect(path, readonly=True)
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    try:
        pragma = "quick_check" if quick else "integrity_check"
        rows = db.execute(f"PRAGMA {pragma}({int(limit)})").fetchall()
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    finally:
        db.close()
    found = [str(r[0]) for r in rows]
    return [] if found == ["ok"] else found


def damage_marker(path: Path) -> Path:
    """The file a running daemon leaves when it finds its buffer damaged (moved aside at start)."""
    return path.with_name(path.name + ".damaged")


def mark_damaged(path: Path, reason: str) -> None:
    """Leave the damage marker, so the next start moves the file aside before using it."""
    damage_marker(path).write_text(reason + "\n")


def quarantine(path: Path, at: datetime | None = None) -> Path:
    """Move a damaged buffer (and its -wal/-shm) aside under a timestamped name; return it."""
    stamp = (at or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    # The -wal keeps the name SQLite looks for next to the moved file, so `sqlite3 <moved>`
    # (and `.recover`) still sees the last committed transactions.
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    if path.exists():
        path.rename(target)
    damage_marker(path).unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class Recovered:
    """A damaged buffer found at start-up and moved aside; a new, empty buffer replaced it."""

    moved_to: Path
    reason: str


@dataclass
class Depth:
    """How much is waiting: uplinks not yet batched plus batches not yet confirmed."""

    readings: int = 0
    bytes: int = 0
    uplinks: int = 0
    batches: int = 0
    batch_readings: int = 0
    batch_bytes: int = 0
    #: Live only: when (monotonic seconds) the oldest live uplink was stored. Scheduling uses
    #: this, never wall time, so a clock step cannot hold back or rush live readings.
    since: float | None = None

    @property
    def total_readings(self) -> int:
        """Every reading not yet confirmed by the cloud."""
        return self.readings + self.batch_readings

    @property
    def total_bytes(self) -> int:
        """Bytes of readings on disk (series text and batch payloads), not SQLite overhead."""
        return self.bytes + self.batch_bytes


@dataclass
class StoreResult:
    """What one `store` call did."""

    stored: int = 0
    readings: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    unmapped: int = 0
    foreign: int = 0
    logs: int = 0
    dropped: Gap | None = None  # drop-oldest made room for this group
    taken: int = 0  # how many outcomes, from the first, were committed (stop-intake: maybe not all)


@dataclass
class Gap:
    """Readings dropped to keep the buffer within its bounds, reported in the next batch."""

    readings: int = 0
    uplinks: int = 0
    from_ms: int | None = None
    to_ms: int | None = None
    reasons: list[str] = field(default_factory=list)

    def add(self, readings: int, uplinks: int, from_ms: int, to_ms: int, reason: str) -> None:
        self.readings += readings
        self.uplinks += uplinks
        self.from_ms = from_ms if self.from_ms is None else min(self.from_ms, from_ms)
        self.to_ms = to_ms if self.to_ms is None else max(self.to_ms, to_ms)
        if reason not in self.reasons:
            self.reasons.append(reason)

    def log_fields(self) -> dict[str, Any]:
        """The drop as fields of the log line that reports it."""
        return {
            "readings": self.readings,
            "uplinks": self.uplinks,
            "from_ms": self.from_ms,
            "to_ms": self.to_ms,
            "reason": ", ".join(self.reasons),
        }


def _unencodable(uplink: DecodedUplink) -> str | None:
    """Which value of the uplink JSON cannot hold (NaN, infinity), in words, or None."""
    for key, value in uplink.meta.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"meta field {key!r} is {value} (not a finite number)"
    for r in uplink.readings:
        if isinstance(r.value, float) and not math.isfinite(r.value):
            return f"{r.metric} is {r.value} (not a finite number)"
    return None


def _as_dead_letter(uplink: DecodedUplink, reason: str) -> DeadLetter:
    """A decoded uplink the cloud cannot take, kept with its raw payload and the reason."""
    return DeadLetter(
        device=uplink.device,
        source=uplink.source,
        f_port=uplink.meta.get("f_port") if isinstance(uplink.meta.get("f_port"), int) else None,
        reason=reason,
        payload=uplink.payload,
        received_ms=uplink.received_ms,
        sensor_id=uplink.sensor_id,
        dedup_key=uplink.dedup_key,
    )


def _uplink_json(uplink: Uplink) -> str:
    return json.dumps(
        {
            "source": uplink.source,
            "device": [uplink.device.kind, uplink.device.id],
            "payload": uplink.payload.hex(),
            "time_ms": uplink.time_ms,
            "received_ms": uplink.received_ms,
            "f_port": uplink.f_port,
            "meta": dict(uplink.meta),
            "object": uplink.object,
            "network_tenant": uplink.network_tenant,
            "dedup_key": uplink.dedup_key,
        }
    )


def _uplink_from_json(text: str) -> Uplink:
    d = json.loads(text)
    return Uplink(
        source=d["source"],
        device=DeviceKey(d["device"][0], d["device"][1]),
        payload=bytes.fromhex(d["payload"]),
        time_ms=d["time_ms"],
        received_ms=d["received_ms"],
        f_port=d["f_port"],
        meta=d["meta"],
        object=d["object"],
        network_tenant=d["network_tenant"],
        dedup_key=d.get("dedup_key"),
    )


class Buffer:
    """The SQLite store-and-forward buffer of one gateway. One writer; thread-safe."""

    def __init__(
        self,
        path: Path | str,
        gateway_id: str,
        tenant_id: str,
        site_id: str,
        max_bytes: int = 120 * 1024,
        gzip: bool = True,
        max_size: int = 1024**3,
        max_age_s: float = 7 * 86400.0,
        when_full: str = "drop-oldest",
    ) -> None:
        self.path = Path(path)
        self._ids = (gateway_id, tenant_id, site_id)
        self.max_bytes = max_bytes  # lowered by the dispatcher when the link refuses a message as too large
        self._configured_max_bytes = max_bytes
        self.gzip = gzip
        self.max_size = max_size
        self.max_age_ms = int(max_age_s * 1000)
        self.when_full = when_full
        self._lock = threading.RLock()
        self._totals: dict[str, int] = {}
        self._live = Depth()
        self._gap = Gap()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Before anything touches the file: a second daemon on it would corrupt it.
        self._lock_fd: int | None = lock_buffer(self.path)
        #: Set when the file was damaged at start-up and moved aside (the service says so loudly).
        self.recovered: Recovered | None = None
        #: Whether `quick_check` ran at open; if not (a large file), the service runs
        #: `integrity_problems` in the background after READY.
        self.checked_at_open = False
        self._page_size = 0
        self._seen: dict[str, None] = {}
        self._device_stats: dict[str, dict[str, Any]] = {}
        try:
            self._db = self._open()
        except BaseException:
            self._unlock()
            raise
        st = self.path.stat()
        self._identity = (st.st_dev, st.st_ino)  # to notice the file deleted or replaced under us
        # Uplinks with id >= live_from are live; older ones are backlog (see `mark_live`).
        self._next_id = self._next_uplink_id()
        self.live_from = self._next_id
        self._live = Depth()
        self._ratio = 0.2 if gzip else 1.0  # compressed / raw size, learnt from each batch

    # ---- opening -----------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        """Open the file; a damaged one is moved aside and a new buffer started in its place.

        Damage is: the marker a running daemon left (`mark_damaged`), a bad header or length
        (`file_damage`), SQLite refusing the file, or (for files up to QUICK_CHECK_AT_OPEN_MAX;
        larger ones are checked by the service after READY, to keep start-up fast)
        `PRAGMA quick_check` finding fault.
        """
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
                db.executescript(_SCHEMA)
                self._init_state()
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
        db.executescript(_SCHEMA)
        self._totals = {}
        self._init_state()
        with self._tx():
            self._set_state("recovered", json.dumps({"moved_to": str(moved), "reason": reason, "at_ms": now_ms()}))
            self._count("buffer_recovered")
        return db

    # ---- state -------------------------------------------------------------------------

    def _init_state(self) -> None:
        for table, column, kind in _ADDED_COLUMNS:
            if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        with self._tx():
            self._db.execute("INSERT OR IGNORE INTO state VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            row = self._db.execute("SELECT value FROM state WHERE key='totals'").fetchone()
            totals = json.loads(row[0]) if row is not None else {}
            totals.pop("seen", None)
            if set(totals) != set(_TOTAL_KEYS) or any(v < 0 for v in totals.values()):
                # Never trust impossible totals (a second writer once drove them negative, and a
                # negative backlog never drains): count the file again.
                totals = self._recount()
            self._set_state("totals", json.dumps(totals))
        self._totals = totals
        self._gap = Gap(**json.loads(self._get_state("gap") or "{}"))
        # The idempotency window: the newest keys, oldest first (a dict keeps insertion order).
        newest = self._db.execute("SELECT coalesce(max(id), 0) FROM seen_log").fetchone()[0]
        self._seen = dict.fromkeys(
            r[0]
            for r in self._db.execute(
                "SELECT key FROM seen_log WHERE id > ? AND received_ms >= ? ORDER BY id",
                (newest - SEEN_KEPT_ROWS, now_ms() - SEEN_KEPT_MS),
            )
        )

    def _recount(self) -> dict[str, int]:
        u = self._db.execute(
            "SELECT count(*), coalesce(sum(readings),0), coalesce(sum(length(series)),0) FROM uplinks"
        ).fetchone()
        b = self._db.execute(
            "SELECT count(*), coalesce(sum(readings),0), coalesce(sum(length(payload)),0) FROM batches"
        ).fetchone()
        dead = self._db.execute(f"SELECT coalesce(sum({_DEAD_LETTER_SIZE}),0) FROM dead_letters").fetchone()[0]
        kept = self._db.execute("SELECT coalesce(sum(length(uplink)),0) FROM unmapped").fetchone()[0]
        return {
            "uplinks": u[0],
            "readings": u[1],
            "bytes": u[2],
            "batches": b[0],
            "batch_readings": b[1],
            "batch_bytes": b[2],
            "dead_letter_bytes": dead,
            "unmapped_bytes": kept,
        }

    def _get_state(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_state(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, value))

    def _save_totals(self) -> None:
        self._set_state("totals", json.dumps(self._totals))

    def _next_uplink_id(self) -> int:
        row = self._db.execute("SELECT coalesce(max(id), 0) FROM uplinks").fetchone()
        return int(row[0]) + 1

    def _tx(self) -> _Transaction:
        return _Transaction(self)

    def _count(self, name: str, n: int = 1) -> None:
        self._db.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, n, n),
        )

    # ---- room on disk --------------------------------------------------------------------
    #
    # A disk filled by the buffer's own backlog must still drain, and draining writes too (a
    # batch row, WAL frames) before confirms free pages for reuse. So the buffer caps its own
    # file (SQLite's max_page_count) below what the filesystem has: intake may grow it up to
    # what is free less WAL_ALLOWANCE (the WAL's own growth) and DRAIN_RESERVE; the drain may
    # use DRAIN_RESERVE too. Intake then meets SQLITE_FULL first, is held, and the drain
    # frees pages that intake reuses.

    def _cap(self, drain: bool) -> None:
        self._check_file()
        fs = os.statvfs(self.path.parent)
        free = fs.f_bavail * fs.f_frsize
        wal = self.path.with_name(self.path.name + "-wal")
        wal_needs = max(0, WAL_ALLOWANCE - (wal.stat().st_size if wal.exists() else 0))
        pages, page_size = self._pages()
        # Pages now only in the WAL take file space when a checkpoint copies them home.
        unhomed = max(0, pages * page_size - self.path.stat().st_size)
        room = free - unhomed - wal_needs - (0 if drain else DRAIN_RESERVE)
        self._db.execute(f"PRAGMA max_page_count={pages + max(0, room // page_size)}")

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

    def rescue(self) -> Path | None:
        """After `BufferLostError`: write what the open database holds back to `path`.

        SQLite's backup API reads through our connection (the unlinked file and its WAL are
        still open), into a new file beside it that is then renamed into place, so the next
        start carries on with every reading that was acknowledged. If another file now stands
        at `path`, the copy keeps its own `.rescued-<UTC>` name. Returns where the copy is, or
        None if it could not be written. Closes the buffer.
        """
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        copy_path = self.path.with_name(f"{self.path.name}.rescued-{stamp}")
        with self._lock:
            try:
                target = sqlite3.connect(str(copy_path))
                try:
                    self._db.backup(target)
                finally:
                    target.close()
            except (sqlite3.Error, OSError):
                copy_path.unlink(missing_ok=True)
                self.close()
                return None
            # Closing checkpoints into the unlinked file and removes the old -wal/-shm by name,
            # which must not be applied to the copy.
            self.close()
            if not self.path.exists():
                copy_path.rename(self.path)
                return self.path
            return copy_path

    def abandon(self) -> None:
        """Give up the file without writing to it again (it is damaged): release the lock only."""
        with self._lock:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _pages(self) -> tuple[int, int]:
        if self._page_size == 0:
            self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        return int(self._db.execute("PRAGMA page_count").fetchone()[0]), self._page_size

    def checkpoint(self) -> None:
        """Copy the WAL into the file and truncate it, giving its space back (used when full)."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:
                pass  # no room yet to copy the WAL's pages home; a later try may have it

    # ---- intake ------------------------------------------------------------------------

    def _total_bytes(self) -> int:
        """What max_size bounds: readings held (series text and formed messages), and the dead
        letters and unmapped uplinks kept beside them."""
        t = self._totals
        return t["bytes"] + t["batch_bytes"] + t["dead_letter_bytes"] + t["unmapped_bytes"]

    def over_limit(self) -> bool:
        """True when intake must be held: the buffer is at `max_size` under `stop-intake`."""
        return self.when_full == "stop-intake" and self._total_bytes() >= self.max_size

    def store(self, outcomes: Iterable[Outcome | DeviceLog]) -> StoreResult:
        """Commit a group of intake outcomes durably, in one transaction.

        Under `stop-intake` the uplinks that fit within `max_size` are committed, from the
        first; `taken` says how many outcomes that was (the caller acks only those). Raises
        `BufferFullError` when not even the first fits, and when SQLite reports the disk full;
        nothing of the group is then stored, so nothing may be acked.
        """
        # The whole store under the lock: the per-device counts it adds to must be the ones the
        # next heartbeat writes (taken outside, a heartbeat in between dropped a group's counts).
        with self._lock:
            return self._store(list(outcomes))

    def _store(self, outcomes: list[Outcome | DeviceLog]) -> StoreResult:
        if self.over_limit():
            raise BufferFullError(f"buffer full: it holds {self._total_bytes()} bytes, max_size {self.max_size}")
        result = StoreResult()
        devices = self._device_stats

        def dev(key: DeviceKey, sensor_id: str | None, at: int) -> dict[str, Any]:
            d = self._device_counts(str(key), sensor_id)
            d["last"] = max(d["last"], at)
            d["sensor_id"] = sensor_id or d["sensor_id"]
            return d

        result.taken = len(outcomes)
        limited = self.when_full == "stop-intake"
        rows: list[tuple[int, str, str, int, int, str]] = []
        seen_rows: list[tuple[str, int]] = []
        new_keys: set[str] = set()

        def first_seen(key: str, received_ms: int) -> bool:
            if key in self._seen or key in new_keys:  # a second copy within this group too
                return False
            new_keys.add(key)
            seen_rows.append((key, received_ms))
            return True

        saved_devices = copy.deepcopy(devices)  # restored if the transaction fails
        try:
            with self._tx():
                self._cap(drain=False)
                db = self._db
                for index, o in enumerate(outcomes):
                    if isinstance(o, DecodedUplink):
                        series, problem = self._encode(o)
                        if problem is not None:
                            o = _as_dead_letter(o, problem)  # stored below, with its reason
                    if isinstance(o, DecodedUplink):
                        if limited and series and self._total_bytes() + len(series) > self.max_size:
                            if index == 0:
                                raise BufferFullError(f"buffer full: max_size {self.max_size} bytes reached")
                            result.taken = index
                            break
                        if not first_seen(o.dedup_key or o.source, o.received_ms):
                            result.duplicates += 1
                            continue
                        d = dev(o.device, o.sensor_id, o.received_ms)
                        d["up"] += 1
                        d["rd"] += len(o.readings)
                        if not o.readings:
                            continue
                        # Ids are given here, rising within a run even when the table empties
                        # (SQLite would reuse low ids), so every new uplink is >= live_from: live.
                        rows.append((self._next_id, o.source, o.sensor_id, o.received_ms, len(o.readings), series))
                        self._next_id += 1
                        size = len(series)
                        self._totals["uplinks"] += 1
                        self._totals["readings"] += len(o.readings)
                        self._totals["bytes"] += size
                        self._live.uplinks += 1
                        self._live.readings += len(o.readings)
                        self._live.bytes += size
                        if self._live.since is None:
                            self._live.since = time.monotonic()
                        result.stored += 1
                        result.readings += len(o.readings)
                    elif isinstance(o, DeadLetter):
                        key = o.dedup_key or o.source
                        if not first_seen(key if o.device is None else f"{o.device}|{key}", o.received_ms):
                            result.duplicates += 1
                            continue
                        whole = _uplink_json(o.uplink) if o.uplink is not None else None
                        db.execute(
                            "INSERT INTO dead_letters"
                            " (received_ms, device, sensor_id, source, topic, f_port, reason, payload, uplink)"
                            " VALUES (?,?,?,?,?,?,?,?,?)",
                            (
                                o.received_ms,
                                str(o.device) if o.device else None,
                                o.sensor_id,
                                o.source,
                                o.topic,
                                o.f_port,
                                o.reason,
                                o.payload,
                                whole,
                            ),
                        )
                        result.dead_letters += 1
                        self._totals["dead_letter_bytes"] += len(o.payload) + len(whole or "")
                        self._count("dead_letters")
                        if o.device is not None:
                            dev(o.device, o.sensor_id, o.received_ms)["dl"] += 1
                    elif isinstance(o, Unmapped):
                        kept = _uplink_json(o.uplink)
                        db.execute(
                            "INSERT INTO unmapped (received_ms, device, uplink) VALUES (?,?,?)",
                            (o.uplink.received_ms, str(o.uplink.device), kept),
                        )
                        self._totals["unmapped_bytes"] += len(kept)
                        result.unmapped += 1
                        self._count("unmapped_uplinks")
                        dev(o.uplink.device, None, o.uplink.received_ms)["up"] += 1
                    elif isinstance(o, ForeignTenant):
                        result.foreign += 1
                        self._count("foreign_tenant_uplinks")
                        dev(o.uplink.device, o.sensor_id, o.uplink.received_ms)["ft"] += 1
                    elif isinstance(o, DeviceLog):
                        result.logs += 1
                        d = dev(o.device, None, o.received_ms)
                        d["log"] += 1
                        d["lastlog"] = f"{o.level} {o.code}: {o.description}"[:300]
                db.executemany("INSERT INTO seen_log (key, received_ms) VALUES (?, ?)", seen_rows)
                db.executemany(
                    "INSERT INTO uplinks (id, source, sensor_id, received_ms, readings, series) VALUES (?,?,?,?,?,?)",
                    rows,
                )
                if result.duplicates:
                    self._count("duplicate_uplinks", result.duplicates)
                if result.dead_letters or result.unmapped:
                    self._prune_side_stores()
                if self.when_full == "drop-oldest" and self._total_bytes() > self.max_size:
                    # Keep max_size a hard bound between the service's periodic enforce_bounds:
                    # drop the oldest stored uplinks now (formed batches are left to it).
                    result.dropped = self._drop_to_fit(in_flight=None)
                self._save_totals()
                # Into the window inside the transaction (under the lock), so a store on
                # another thread cannot take the same key meanwhile; removed if it fails.
                for key, _ in seen_rows:
                    self._seen[key] = None
        except sqlite3.OperationalError as exc:
            self._forget_keys(seen_rows)
            self._device_stats = saved_devices
            if is_disk_full(exc):
                self.checkpoint()  # the WAL holds space a checkpoint gives back
                raise DiskFullError(f"the disk holding {self.path} is full ({exc})") from exc
            raise
        except BaseException:
            self._forget_keys(seen_rows)
            self._device_stats = saved_devices
            raise
        with self._lock:
            while len(self._seen) > SEEN_KEPT_ROWS:
                del self._seen[next(iter(self._seen))]
        return result

    def _encode(self, uplink: DecodedUplink) -> tuple[str, str | None]:
        """The uplink's series text, or why it can never be sent (then it is a dead letter)."""
        if not uplink.readings:
            return "", None
        for r in uplink.readings:
            if type(r.value) is int and not -CLOUD_INT_LIMIT < r.value < CLOUD_INT_LIMIT:
                digits = len(str(abs(r.value))) if abs(r.value) < 10**4000 else "thousands of"
                return "", (
                    f"{r.metric} is an integer of {digits} digits; the cloud's NUMBER holds at most 38 "
                    "(a dead letter rather than a rounded or text value)"
                )
        try:
            series = wire.encode_series(uplink)
        except (ValueError, TypeError, OverflowError) as exc:  # NaN in meta, a value JSON cannot hold
            return "", f"readings cannot be encoded for the cloud: {_unencodable(uplink) or exc}"
        # The configured size, not what the link taught `max_bytes` since: an uplink bigger than
        # the link takes is still sent, in parts (`split`), as long as each reading fits.
        if not series.isascii():
            try:
                series.encode()
            except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800"): not text the cloud takes
                return "", f"readings cannot be encoded for the cloud: {exc.reason} at character {exc.start}"
        room = self._configured_max_bytes - MESSAGE_OVERHEAD
        if len(series) * 4 <= room:  # UTF-8 takes at most 4 bytes a character: fits for sure
            return series, None
        raw = series.encode()
        if len(raw) <= room or (self.gzip and len(wire.compress(raw)) <= room):
            return series, None
        return "", (
            f"the uplink's {len(uplink.readings)} readings take {len(raw)} bytes encoded, more than one "
            f"message may carry (batch.max_bytes {self._configured_max_bytes}): it could never be sent"
        )

    def _prune_side_stores(self) -> None:
        """Keep dead letters and unmapped uplinks within their row limit and their share of
        `max_size`, oldest first; the newest of each is always kept (part of a transaction)."""
        db = self._db
        cap = max(1, self.max_size // SIDE_STORE_SHARE)
        for table, size, key, rows_kept in (
            ("dead_letters", _DEAD_LETTER_SIZE, "dead_letter_bytes", DEAD_LETTERS_KEPT),
            ("unmapped", "length(uplink)", "unmapped_bytes", UNMAPPED_KEPT),
        ):
            newest = db.execute(f"SELECT max(id) FROM {table}").fetchone()[0]
            if newest is None:
                continue
            cut = newest - rows_kept  # ids rise: rows with id <= cut go
            excess = self._totals[key] - cap
            if excess > 0:
                acc = 0
                for rid, n in db.execute(f"SELECT id, {size} FROM {table} WHERE id < ? ORDER BY id", (newest,)):
                    acc += n
                    cut = max(cut, rid)
                    if acc >= excess:
                        break
            if cut <= 0:
                continue
            count, freed = db.execute(
                f"SELECT count(*), coalesce(sum({size}),0) FROM {table} WHERE id <= ?", (cut,)
            ).fetchone()
            if count:
                db.execute(f"DELETE FROM {table} WHERE id <= ?", (cut,))
                self._totals[key] -= freed
                self._count(f"{table}_pruned", count)

    def _forget_keys(self, rows: list[tuple[str, int]]) -> None:
        with self._lock:
            for key, _ in rows:
                self._seen.pop(key, None)

    # ---- batching ----------------------------------------------------------------------

    def mark_live(self) -> None:
        """Call when the cloud (re)connects: what is stored now is backlog, what comes is live."""
        with self._lock:
            self.live_from = self._next_id
            self._live = Depth()

    def depth(self, live: bool | None = None) -> Depth:
        """The backlog: everything (None), only live uplinks (True), only older ones (False)."""
        with self._lock:
            t = self._totals
            total = Depth(
                readings=t["readings"],
                bytes=t["bytes"],
                uplinks=t["uplinks"],
                batches=t["batches"],
                batch_readings=t["batch_readings"],
                batch_bytes=t["batch_bytes"],
            )
            if live is True:
                return copy.copy(self._live)
            if live is False:
                return Depth(
                    total.readings - self._live.readings,
                    total.bytes - self._live.bytes,
                    total.uplinks - self._live.uplinks,
                )
            return total

    def live_due(self, max_delay_s: float, at: float | None = None) -> bool:
        """True when live readings should go now: one has waited max_delay or they fill a message.

        `at` is monotonic seconds (now by default): how long a reading waited is measured on
        the monotonic clock, so a wall-clock step does not change when it is sent.
        """
        with self._lock:
            live = self._live
            if live.uplinks == 0:
                return False
            at = time.monotonic() if at is None else at
            if live.since is not None and at - live.since >= max_delay_s:
                return True
            return live.bytes * self._ratio >= self.max_bytes * 0.9

    def _live_since_of_rest(self) -> None:
        """Some live uplinks left: estimate when the oldest remaining one was stored.

        Its wall-clock receive time, carried onto the monotonic clock, clamped between the
        previous oldest (the rest are newer) and now, so a clock step errs by at most one
        max_delay, never by the size of the step.
        """
        live = self._live
        nxt = self._db.execute(
            "SELECT received_ms FROM uplinks WHERE id >= ? ORDER BY id LIMIT 1", (self.live_from,)
        ).fetchone()
        if nxt is None:
            live.since = None
            return
        mono = time.monotonic()
        estimate = mono - max(0.0, (now_ms() - nxt[0]) / 1000)
        live.since = min(mono, max(live.since if live.since is not None else estimate, estimate))

    def take(self, live: bool) -> Batch | None:
        """Form the next batch from live uplinks or from the backlog, oldest first.

        In one transaction: the uplinks' series are joined into a message (with a pending gap,
        if any, in its `meta`), the message is stored as a `batches` row, and the uplinks are
        deleted. Returns None when there is nothing to take.
        """
        with self._lock:
            where = "id >= ?" if live else "id < ?"
            budget_raw = int(self.max_bytes * 0.9 / self._ratio)
            rows = self._db.execute(
                f"SELECT id, received_ms, readings, series FROM uplinks WHERE {where} ORDER BY id LIMIT 5000",
                (self.live_from,),
            )
            chosen: list[tuple[int, int, int, str]] = []
            raw = 0
            for row in rows:
                size = len(row[3]) + 1
                if chosen and raw + size > budget_raw:
                    break
                chosen.append(row)
                raw += size
            if not chosen:
                return None
            with self._tx():
                self._cap(drain=True)
                return self._form(chosen, live)

    def _form(self, chosen: list[tuple[int, int, int, str]], live: bool) -> Batch:
        gateway_id, tenant_id, site_id = self._ids
        created = now_ms()
        # Batch ids must never repeat, even when the buffer file is replaced (moved aside when
        # damaged, or deleted by hand): the sequence rises by one per batch but never lags the
        # clock in milliseconds. Batches are formed far below one per millisecond, so it cannot
        # run ahead of the clock, and a new file starts above every id an old one gave.
        seq = max(int(self._get_state("next_seq") or "1"), created)
        gap = self._gap if self._gap.readings else None
        while True:
            header = wire.Header(
                batch_id=f"{gateway_id}-{seq:012d}",
                gateway_id=gateway_id,
                tenant_id=tenant_id,
                site_id=site_id,
                created_at=created,
                meta={"gap": _gap_meta(gap)} if gap else None,
            )
            body = wire.assemble(header, [c[3] for c in chosen])
            payload = wire.compress(body) if self.gzip else body
            if len(payload) <= self.max_bytes or len(chosen) == 1:
                break
            chosen = chosen[: max(1, len(chosen) * 3 // 4)]
        if self.gzip:
            # Learn the compression ratio, leaning towards caution.
            self._ratio = max(0.02, min(1.0, 0.7 * self._ratio + 0.3 * (len(payload) / len(body)) * 1.1))
        readings = sum(c[2] for c in chosen)
        oldest = min(c[1] for c in chosen)
        self._db.execute(
            "INSERT INTO batches VALUES (?,?,?,?,?,?)",
            (seq, created, oldest, readings, int(self.gzip), payload),
        )
        ids = [c[0] for c in chosen]
        # The chosen rows are all the rows of their class (live or backlog) from ids[0] to ids[-1].
        self._db.execute("DELETE FROM uplinks WHERE id BETWEEN ? AND ?", (ids[0], ids[-1]))
        self._set_state("next_seq", str(seq + 1))
        raw_bytes = sum(len(c[3]) for c in chosen)
        t = self._totals
        t["uplinks"] -= len(chosen)
        t["readings"] -= readings
        t["bytes"] -= raw_bytes
        t["batches"] += 1
        t["batch_readings"] += readings
        t["batch_bytes"] += len(payload)
        if live:
            self._live.uplinks -= len(chosen)
            self._live.readings -= readings
            self._live.bytes -= raw_bytes
            self._live_since_of_rest()
        if gap:
            self._gap = Gap()
            self._set_state("gap", "{}")
        self._save_totals()
        return Batch(
            seq=seq, batch_id=header.batch_id, payload=payload, readings=readings, gzip=self.gzip, created_ms=created
        )

    def compact(self, max_batches: int = 4) -> list[int]:
        """Pack the oldest unbatched uplinks into formed (gzip) batches while more than
        COMPACT_ABOVE bytes of them wait; return the new batches' seqs (at most max_batches).

        A long outage then sits on disk as the messages that will be sent, about a tenth of
        the size of the series text (so a weekend fits in max_size), and the drain afterwards
        is publish and confirm only. In normal operation live batches leave within max_delay
        and this does nothing.
        """
        seqs: list[int] = []
        with self._lock:
            while len(seqs) < max_batches and self._totals["bytes"] > COMPACT_ABOVE:
                batch = self.take(live=self.depth(live=False).uplinks == 0)
                if batch is None:
                    break
                seqs.append(batch.seq)
        return seqs

    def pending_seqs(self) -> list[int]:
        """Seqs of the formed batches not yet confirmed, oldest first (payloads stay on disk)."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT seq FROM batches ORDER BY seq")]

    def batch(self, seq: int) -> Batch | None:
        """One formed batch, exactly as it will be (re)published; None if it is gone (dropped)."""
        with self._lock:
            r = self._db.execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE seq=?", (seq,)).fetchone()
        return None if r is None else self._batch_from_row(r)

    def _batch_from_row(self, r: tuple[Any, ...]) -> Batch:
        return Batch(
            seq=r[0],
            batch_id=f"{self._ids[0]}-{r[0]:012d}",
            payload=bytes(r[4]),
            readings=r[2],
            gzip=bool(r[3]),
            created_ms=r[1],
        )

    def confirm(self, seq: int, at_ms: int | None = None) -> None:
        """IoT Core acknowledged batch `seq`: delete it; record the time of the last publish."""
        with self._lock, self._tx():
            self._cap(drain=True)
            row = self._db.execute("SELECT readings, length(payload) FROM batches WHERE seq=?", (seq,)).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM batches WHERE seq=?", (seq,))
            self._totals["batches"] -= 1
            self._totals["batch_readings"] -= row[0]
            self._totals["batch_bytes"] -= row[1]
            self._save_totals()
            self._set_state("last_publish_ms", str(at_ms or now_ms()))
            self._count("published_batches")
            self._count("published_readings", row[0])

    def split(self, seq: int, max_bytes: int, reason: str = "too large to publish") -> tuple[list[int], int]:
        """Replace formed batch `seq`, refused as too large, by two or more formed batches of
        the same readings, each at most `max_bytes` where one reading allows (a reading that
        alone is larger gets a batch of its own). A batch of one reading cannot shrink: it moves
        to the dead letters with `reason`. One transaction.

        Series are divided between the parts, and a series too big for one part has its t/v
        arrays divided; the first part keeps the message's `meta` (a gap), every part its
        header fields and a new seq from the batch sequence (`_form`). Returns the new seqs,
        oldest first, and the number of readings that became dead letters; ([], 0) when `seq`
        is gone.
        """
        dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
        with self._lock, self._tx():
            self._cap(drain=True)
            row = self._db.execute(
                "SELECT created_ms, oldest_ms, readings, gzip, payload FROM batches WHERE seq=?", (seq,)
            ).fetchone()
            if row is None:
                return [], 0
            created, oldest, readings, gzipped, old = row[0], row[1], row[2], bool(row[3]), bytes(row[4])
            message = wire.decode_message(old, gzipped)
            t = self._totals
            if readings <= 1:
                for s in message["series"]:
                    meta = s.get("meta") or {}
                    letter = dumps(s).encode()
                    device = (
                        DeviceKey("dev_eui", str(meta["dev_eui"]))
                        if "dev_eui" in meta
                        else DeviceKey("osm_id", str(meta["osm_id"]))
                        if "osm_id" in meta
                        else None
                    )
                    self._db.execute(
                        "INSERT INTO dead_letters (received_ms, device, sensor_id, source, topic, f_port, reason,"
                        " payload) VALUES (?,?,?,?,?,?,?,?)",
                        (
                            oldest,
                            None if device is None else str(device),
                            s.get("sensor_id"),
                            s.get("source") or f"batch/{seq}",
                            None,
                            meta.get("f_port"),
                            reason,
                            letter,
                        ),
                    )
                    t["dead_letter_bytes"] += len(letter)
                self._db.execute("DELETE FROM batches WHERE seq=?", (seq,))
                t["batches"] -= 1
                t["batch_readings"] -= readings
                t["batch_bytes"] -= len(old)
                self._count("dead_letters", readings)
                self._count("too_large_readings", readings)
                self._save_totals()
                return [], readings

            first_seq = max(int(self._get_state("next_seq") or "1"), now_ms())
            parts: list[bytes] = []
            counts: list[int] = []

            def size_of(part: list[dict[str, Any]]) -> int:
                return sum(len(s["t"]) for s in part)

            def encode(part: list[dict[str, Any]]) -> bytes:
                header = wire.Header(
                    batch_id=f"{self._ids[0]}-{first_seq + len(parts):012d}",
                    gateway_id=message["gateway_id"],
                    tenant_id=message["tenant_id"],
                    site_id=message["site_id"],
                    created_at=message["created_at"],
                    meta=message.get("meta") if not parts else None,
                )
                body = wire.assemble(header, [dumps(s) for s in part])
                return wire.compress(body) if gzipped else body

            def halves(part: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
                if len(part) == 1:
                    s, n = part[0], len(part[0]["t"]) // 2
                    return [[{**s, "t": s["t"][:n], "v": s["v"][:n]}], [{**s, "t": s["t"][n:], "v": s["v"][n:]}]]
                cut, acc, total = 1, 0, size_of(part)
                for i, s in enumerate(part[:-1], 1):
                    acc += len(s["t"])
                    cut = i
                    if acc * 2 >= total:
                        break
                return [part[:cut], part[cut:]]

            def place(part: list[dict[str, Any]], force: bool = False) -> None:
                # Depth first, left to right, so parts keep the readings' order and seqs rise.
                payload = encode(part)
                if (force or len(payload) > max_bytes) and size_of(part) > 1:
                    for half in halves(part):
                        place(half)
                    return
                parts.append(payload)
                counts.append(size_of(part))

            # Pack series (cut along t/v where one is too big) into parts by their estimated
            # encoded size; `place` then checks each part's real size and halves what is over.
            ratio = len(old) / max(1, len(dumps(message)))
            header_bytes = len(dumps({k: v for k, v in message.items() if k != "series"}))
            room = max(1, int(max_bytes * 0.9 / ratio) - header_bytes)
            packed: list[list[dict[str, Any]]] = [[]]
            used = 0
            for s in message["series"]:
                text = len(dumps(s)) + 1
                n = len(s["t"])
                pieces = max(1, min(n, -(-text // room)))
                step = -(-n // pieces)
                for i in range(0, n, step):
                    piece = s if pieces == 1 else {**s, "t": s["t"][i : i + step], "v": s["v"][i : i + step]}
                    size = text if pieces == 1 else len(dumps(piece)) + 1
                    if packed[-1] and used + size > room:
                        packed.append([])
                        used = 0
                    packed[-1].append(piece)
                    used += size
            if len(packed) == 1:
                place(packed[0], force=True)  # refused as it is: at least two parts
            else:
                for part in packed:
                    place(part)

            self._db.execute("DELETE FROM batches WHERE seq=?", (seq,))
            seqs = [first_seq + i for i in range(len(parts))]
            self._db.executemany(
                "INSERT INTO batches VALUES (?,?,?,?,?,?)",
                [(s, created, oldest, n, int(gzipped), p) for s, n, p in zip(seqs, counts, parts, strict=True)],
            )
            self._set_state("next_seq", str(seqs[-1] + 1))
            t["batches"] += len(parts) - 1
            t["batch_bytes"] += sum(len(p) for p in parts) - len(old)
            self._count("split_batches")
            self._save_totals()
            return seqs, 0

    def heartbeat(self, pid: int | None = None) -> None:
        """Record that the daemon is alive, and the per-device counters (shown by `status`)."""
        with self._lock:
            pending = self._device_stats
            try:
                with self._tx():
                    self._cap(drain=True)
                    self._set_state("heartbeat_ms", str(now_ms()))
                    self._set_state("pid", str(pid if pid is not None else os.getpid()))
                    self._flush_device_stats()
            except BaseException:
                self._device_stats = pending  # not written: keep them for the next heartbeat
                raise

    def _flush_device_stats(self) -> None:
        """Write the per-device counters gathered since the last flush (part of a transaction).

        They are kept in memory between heartbeats so that intake does not rewrite the devices
        table's pages at every commit; a crash loses at most one heartbeat's worth of counts,
        never a reading.
        """
        db = self._db
        devices = self._device_stats
        for key, d in devices.items():
            db.execute(
                "INSERT INTO devices (device, sensor_id, last_seen_ms, uplinks, readings, dead_letters,"
                " log_events, last_log, foreign_tenant, note) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(device) DO UPDATE SET sensor_id=coalesce(excluded.sensor_id, sensor_id),"
                " last_seen_ms=max(coalesce(last_seen_ms,0), excluded.last_seen_ms),"
                " uplinks=uplinks+excluded.uplinks, readings=readings+excluded.readings,"
                " dead_letters=dead_letters+excluded.dead_letters, log_events=log_events+excluded.log_events,"
                " last_log=coalesce(excluded.last_log, last_log),"
                " foreign_tenant=foreign_tenant+excluded.foreign_tenant,"
                " note=CASE WHEN excluded.note = '' THEN NULL ELSE coalesce(excluded.note, note) END",
                (
                    key,
                    d["sensor_id"],
                    d["last"],
                    d["up"],
                    d["rd"],
                    d["dl"],
                    d["log"],
                    d["lastlog"],
                    d["ft"],
                    d.get("note"),
                ),
            )
        if devices:
            # Devices no map names (a neighbour's sensors, a typo'd dev_eui) come and go: keep
            # the most recently heard, or a stream of random ids would grow the table forever.
            db.execute(
                "DELETE FROM devices WHERE sensor_id IS NULL AND device NOT IN (SELECT device FROM devices"
                " WHERE sensor_id IS NULL ORDER BY last_seen_ms DESC LIMIT ?)",
                (UNMAPPED_DEVICES_KEPT,),
            )
        self._device_stats = {}

    def note_device(self, device: DeviceKey, sensor_id: str | None, note: str) -> None:
        """Record what intake noticed about a device (shown by `status`); "" clears it.
        Written with the next heartbeat, like the device counters."""
        with self._lock:
            self._device_counts(str(device), sensor_id)["note"] = note

    def _device_counts(self, device: str, sensor_id: str | None) -> dict[str, Any]:
        """The counters of one device gathered since the last heartbeat (`_flush_device_stats`)."""
        return self._device_stats.setdefault(
            device,
            {"sensor_id": sensor_id, "last": 0, "up": 0, "rd": 0, "dl": 0, "log": 0, "lastlog": None, "ft": 0},
        )

    def count(self, name: str, n: int = 1) -> None:
        """Add to a persistent counter (publish failures by reason code, ...)."""
        with self._lock, self._tx():
            self._count(name, n)

    # ---- bounds ------------------------------------------------------------------------

    def enforce_bounds(self, in_flight: Sequence[int] = (), at_ms: int | None = None) -> Gap | None:
        """Drop what is past `max_age`, and under `drop-oldest` the oldest beyond `max_size`.

        Batches in flight are never dropped (their fate is IoT Core's). Returns what was
        dropped, or None; the drop is recorded as a gap for the next batch's `meta`.
        """
        at = now_ms() if at_ms is None else at_ms
        with self._lock, self._tx():
            self._cap(drain=True)
            cutoff = at - self.max_age_ms
            dropped = Gap()
            # Uplinks are in intake order, so the expired ones are a prefix: find where it ends
            # by walking from the oldest (cost: the rows dropped), not by scanning the table.
            oldest = self._db.execute("SELECT received_ms FROM uplinks ORDER BY id LIMIT 1").fetchone()
            if oldest is not None and oldest[0] < cutoff:
                first_kept = self._db.execute(
                    "SELECT id FROM uplinks WHERE received_ms >= ? ORDER BY id LIMIT 1", (cutoff,)
                ).fetchone()
                if first_kept is None:
                    self._drop_uplinks("1", (), dropped, "max_age")
                else:
                    self._drop_uplinks("id < ?", (first_kept[0],), dropped, "max_age")
            self._drop_batches("oldest_ms < ?", (cutoff,), in_flight, dropped, "max_age")
            if self.when_full == "drop-oldest":
                while self._total_bytes() > self.max_size:
                    if not self._drop_oldest(self._total_bytes() - self.max_size, in_flight, dropped):
                        break
            self._record_gap(dropped)
            self._prune()
            self._save_totals()
        return dropped if dropped.readings else None

    def _record_gap(self, dropped: Gap) -> None:
        """Remember a drop for the next batch's `meta.gap`, and count it."""
        if not dropped.readings:
            return
        for i, reason in enumerate(dropped.reasons):  # each reason once, never "a, b" beside "a"
            first = i == 0
            self._gap.add(
                dropped.readings if first else 0,
                dropped.uplinks if first else 0,
                dropped.from_ms or 0,
                dropped.to_ms or 0,
                reason,
            )
        self._set_state("gap", json.dumps(self._gap.__dict__))
        self._count("dropped_readings", dropped.readings)

    def _drop_to_fit(self, in_flight: Sequence[int] | None) -> Gap | None:
        """Drop the oldest until within max_size; `in_flight` None: only unbatched uplinks."""
        dropped = Gap()
        while self._total_bytes() > self.max_size:
            if not self._drop_oldest(self._total_bytes() - self.max_size, in_flight, dropped):
                break
        self._record_gap(dropped)
        return dropped if dropped.readings else None

    def _drop_oldest(self, excess: int, in_flight: Sequence[int] | None, dropped: Gap) -> bool:
        b = None
        if in_flight is not None:
            b = self._db.execute(
                f"SELECT seq, oldest_ms FROM batches WHERE seq NOT IN ({','.join('?' * len(in_flight))})"
                " ORDER BY seq LIMIT 1",
                tuple(in_flight),
            ).fetchone()
        u = self._db.execute("SELECT id, received_ms FROM uplinks ORDER BY id LIMIT 1").fetchone()
        if b is None and u is None:
            return False
        if u is None or (b is not None and b[1] <= u[1]):
            assert b is not None and in_flight is not None
            self._drop_batches("seq = ?", (b[0],), in_flight, dropped, "max_size")
            return True
        # Drop uplinks up to about `excess` bytes in one statement.
        rows = self._db.execute("SELECT id, length(series) FROM uplinks ORDER BY id LIMIT 10000").fetchall()
        acc, last = 0, rows[0][0]
        for rid, size in rows:
            acc += size
            last = rid
            if acc >= excess:
                break
        self._drop_uplinks("id <= ?", (last,), dropped, "max_size")
        return True

    def _drop_uplinks(self, where: str, args: tuple[Any, ...], dropped: Gap, reason: str) -> None:
        row = self._db.execute(
            "SELECT count(*), coalesce(sum(readings),0), coalesce(sum(length(series)),0),"
            " min(received_ms), max(received_ms),"
            f" coalesce(sum(CASE WHEN id >= ? THEN readings ELSE 0 END),0),"
            f" coalesce(sum(CASE WHEN id >= ? THEN length(series) ELSE 0 END),0),"
            f" coalesce(sum(CASE WHEN id >= ? THEN 1 ELSE 0 END),0) FROM uplinks WHERE {where}",
            (self.live_from, self.live_from, self.live_from, *args),
        ).fetchone()
        if not row[0]:
            return
        self._db.execute(f"DELETE FROM uplinks WHERE {where}", args)
        self._totals["uplinks"] -= row[0]
        self._totals["readings"] -= row[1]
        self._totals["bytes"] -= row[2]
        self._live.readings -= row[5]
        self._live.bytes -= row[6]
        self._live.uplinks -= row[7]
        if row[7]:
            self._live_since_of_rest()
        dropped.add(row[1], row[0], row[3], row[4], reason)

    def _drop_batches(
        self, where: str, args: tuple[Any, ...], in_flight: Sequence[int], dropped: Gap, reason: str
    ) -> None:
        flight = f" AND seq NOT IN ({','.join('?' * len(in_flight))})" if in_flight else ""
        rows = self._db.execute(
            f"SELECT seq, readings, length(payload), oldest_ms, created_ms FROM batches WHERE {where}{flight}",
            (*args, *in_flight),
        ).fetchall()
        for seq, readings, size, oldest, created in rows:
            self._db.execute("DELETE FROM batches WHERE seq=?", (seq,))
            self._totals["batches"] -= 1
            self._totals["batch_readings"] -= readings
            self._totals["batch_bytes"] -= size
            dropped.add(readings, 0, oldest, created, reason)

    def _prune(self) -> None:
        """Keep the bookkeeping tables bounded; each statement costs what it deletes."""
        db = self._db
        db.execute("DELETE FROM seen_log WHERE id <= (SELECT max(id) FROM seen_log) - ?", (SEEN_KEPT_ROWS,))
        self._prune_side_stores()

    # ---- unmapped uplinks --------------------------------------------------------------

    def unmapped(
        self, after_id: int = 0, max_bytes: int = 4 * 1024**2, max_rows: int = 500
    ) -> list[tuple[int, Uplink]]:
        """One page of the uplinks kept because no map named their device, oldest first, from
        after `after_id`: at most `max_rows`, and no more than about `max_bytes` of them (a
        replay walks the store page by page, never holding it all in memory)."""
        page: list[tuple[int, Uplink]] = []
        size = 0
        with self._lock:
            rows = self._db.execute(
                "SELECT id, uplink FROM unmapped WHERE id > ? ORDER BY id LIMIT ?", (after_id, max_rows)
            )
            for row_id, text in rows:
                page.append((row_id, _uplink_from_json(text)))
                size += len(text)
                if size >= max_bytes:
                    break
        return page

    def refused_uplinks(self, device: DeviceKey, after_id: int = 0, max_rows: int = 50) -> list[tuple[int, Uplink]]:
        """One page of a device's dead letters that a codec refused, oldest first, with their
        whole uplinks (to decode again once the device map changed)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, uplink FROM dead_letters WHERE device = ? AND id > ? AND uplink IS NOT NULL"
                " ORDER BY id LIMIT ?",
                (str(device), after_id, max_rows),
            ).fetchall()
        return [(r[0], _uplink_from_json(r[1])) for r in rows]

    def forget_dead_letters(self, ids: Sequence[int]) -> None:
        """Remove dead letters that decoded after all (their readings are stored)."""
        with self._lock, self._tx():
            gone = 0
            for i in ids:
                row = self._db.execute(
                    f"SELECT {_DEAD_LETTER_SIZE}, device, sensor_id FROM dead_letters WHERE id = ?", (i,)
                ).fetchone()
                if row is not None:
                    self._db.execute("DELETE FROM dead_letters WHERE id = ?", (i,))
                    self._totals["dead_letter_bytes"] -= row[0]
                    gone += 1
                    if row[1] is not None:  # the device's count is of letters still dead
                        d = self._device_counts(row[1], row[2])
                        d["dl"] -= 1
            if gone:
                self._count("dead_letters_decoded_again", gone)
            self._save_totals()

    def forget_unmapped(self, ids: Sequence[int]) -> None:
        """Remove replayed uplinks from the unmapped store."""
        with self._lock, self._tx():
            for i in ids:
                row = self._db.execute("SELECT length(uplink) FROM unmapped WHERE id = ?", (i,)).fetchone()
                if row is not None:
                    self._db.execute("DELETE FROM unmapped WHERE id = ?", (i,))
                    self._totals["unmapped_bytes"] -= row[0]
            self._save_totals()

    def close(self) -> None:
        """Write the device counters, checkpoint the WAL into the main file, and close."""
        with self._lock:
            if self._lock_fd is None:
                return  # closed already (`rescue` closes)
            try:
                with self._tx():
                    self._flush_device_stats()
            except sqlite3.Error:
                pass  # counters only; the readings are committed already
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()
            self._unlock()


def _gap_meta(gap: Gap) -> dict[str, Any]:
    return {
        "readings": gap.readings,
        "uplinks": gap.uplinks,
        "from": gap.from_ms,
        "to": gap.to_ms,
        "reason": ", ".join(gap.reasons),
    }


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the buffer's lock; on any exception ROLLBACK, and the
    buffer's in-memory totals go back to what they were, so they always match the file.

    Re-entrant: an inner use inside an outer transaction joins it.
    """

    def __init__(self, buffer: Buffer) -> None:
        self._buffer = buffer
        self._outer = False
        self._saved: tuple[dict[str, int], Depth, Gap, int] | None = None

    def __enter__(self) -> None:
        b = self._buffer
        b._lock.acquire()
        self._outer = not b._db.in_transaction
        if self._outer:
            self._saved = (dict(b._totals), copy.copy(b._live), copy.deepcopy(b._gap), getattr(b, "_next_id", 1))
            try:
                b._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                b._lock.release()
                raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        b = self._buffer
        try:
            if self._outer:
                if exc_type is None:
                    try:
                        b._db.execute("COMMIT")  # may fail too (SQLITE_FULL appending to the WAL)
                    except BaseException:
                        self._undo()
                        raise
                else:
                    self._undo()
        finally:
            b._lock.release()

    def _undo(self) -> None:
        b = self._buffer
        if b._db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
            b._db.execute("ROLLBACK")
        assert self._saved is not None
        b._totals, b._live, b._gap, b._next_id = self._saved
