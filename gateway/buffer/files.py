"""The buffer file itself: opening it with the right pragmas, one daemon per file, and damage.

Everything here works on a path or a connection, never on buffer state: the lock that keeps a
second daemon off the file, the cheap header checks and SQLite's own check that tell a damaged
file, moving a damaged file aside, and what SQLite's error codes mean for the service.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway.errors import BufferBusyError

SQLITE_MAGIC = b"SQLite format 3\x00"
WAL_ALLOWANCE = 6 * 1024**2  # disk kept for the WAL: autocheckpoint at 2000 pages (1 MiB), plus a transaction
#: Small pages: every commit appends to the WAL the pages it changed (one leaf, page 1, a few
#: overflow pages of one compressed chunk); with 512-byte pages that is about 4 KiB a commit,
#: with SQLite's default 4096 about 12 KiB (measured, docs/benchmarks.md).
PAGE_SIZE = 512
#: WAL frames before SQLite copies them into the file (its default is 1000). A checkpoint writes
#: each page changed since the last one once, however often it changed: at 2000 (1 MiB of
#: 512-byte pages, about 2 minutes at the seed load) the pages every commit touches (page 1,
#: the takes, the totals) are written home half as often. With a 4 MiB group on top the WAL
#: stays within WAL_ALLOWANCE (4000 measured better, 10 bytes a reading, but overran it).
AUTOCHECKPOINT_PAGES = 2000
QUICK_CHECK_AT_OPEN_MAX = 16 * 1024**2  # larger files are checked after READY (`integrity_problems`): 0.35 s here
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 8, 10, 13, 14


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
    # writes on flash: write-ahead log. The page size applies to a new, empty file only (before
    # WAL mode writes its first page); an older file keeps its own.
    if not readonly:
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
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
        db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
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
