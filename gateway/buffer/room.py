"""Room on disk: the buffer caps its own file below what the filesystem has free.

A disk filled by the buffer's own backlog must still drain, and draining writes too (WAL
frames, a deletion) before freed pages are reused. So intake may grow the file up to what is
free less WAL_ALLOWANCE (the WAL's own growth) and DRAIN_RESERVE; the drain may use
DRAIN_RESERVE too. Intake then meets SQLITE_FULL first, is held, and the drain frees pages
that intake reuses. The free-space probe is injected, so tests can make a disk full.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from gateway.buffer.files import WAL_ALLOWANCE

DRAIN_RESERVE = 1024**2  # disk only the drain may use, so a full disk still drains

#: Bytes free for the buffer's directory (an unprivileged process's view, like `df`).
FreeSpace = Callable[[Path], int]


def disk_free(directory: Path) -> int:
    fs = os.statvfs(directory)
    return fs.f_bavail * fs.f_frsize


class Room:
    """Sets SQLite's max_page_count before each write transaction."""

    def __init__(self, path: Path, free_space: FreeSpace = disk_free) -> None:
        self.path = path
        self.free_space = free_space
        self._page_size = 0

    def pages(self, db: sqlite3.Connection) -> tuple[int, int]:
        if self._page_size == 0:
            self._page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        return int(db.execute("PRAGMA page_count").fetchone()[0]), self._page_size

    def cap(self, db: sqlite3.Connection, drain: bool) -> None:
        free = self.free_space(self.path.parent)
        wal = self.path.with_name(self.path.name + "-wal")
        wal_needs = max(0, WAL_ALLOWANCE - (wal.stat().st_size if wal.exists() else 0))
        pages, page_size = self.pages(db)
        # Pages now only in the WAL take file space when a checkpoint copies them home.
        unhomed = max(0, pages * page_size - self.path.stat().st_size)
        room = free - unhomed - wal_needs - (0 if drain else DRAIN_RESERVE)
        db.execute(f"PRAGMA max_page_count={pages + max(0, room // page_size)}")
