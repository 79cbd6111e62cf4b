"""Bounds: `max_age` and `max_size`, and the gap a drop leaves for the next message.

Records out in a take (in flight, backing off) are never dropped: their fate is the cloud's
answer. Chunks go whole, oldest first; one past `max_age` goes when its newest record is.
"""

from __future__ import annotations

import sqlite3

from gateway.buffer.results import Gap
from gateway.buffer.takes import Takes


class Bounds(Takes):
    """Dropping what is past max_age, or beyond max_size under drop-oldest."""

    def enforce_bounds(self, at_ms: int | None = None) -> Gap | None:
        """Drop what is past `max_age`, and under `drop-oldest` the oldest beyond `max_size`.

        Records in takes not yet ended (in flight, backing off) are never dropped: their fate is
        the cloud's answer. Returns what was dropped, or None; the drop is recorded as a gap for
        the next message's `meta`.
        """
        at = self._clock() if at_ms is None else at_ms
        with self._lock:
            self._drop_released(at)

            def work(db: sqlite3.Connection) -> Gap:
                dropped = Gap()
                cutoff = at - self.max_age_ms
                # Chunks are in intake order: the expired ones are a prefix, walked from the oldest.
                # A chunk goes when its newest record is past max_age: a record may stay up to one
                # commit interval longer, never go earlier.
                while True:
                    row = self._oldest_droppable(db)
                    if row is None or row[2] >= cutoff:
                        break
                    self._drop_chunk(db, row, dropped, "max_age")
                if self.when_full == "drop-oldest":
                    self._drop_to_fit(db, dropped)
                if dropped.readings:
                    self._record_gap(dropped)
                    self._save_state()
                return dropped

            dropped = self._write(work, drain=True)
        return dropped if dropped.readings else None

    def _drop_released(self, at: int) -> None:
        """Released takes past max_age go back to their chunks, which a bound may then drop."""
        for t in list(self._released):
            if t.oldest_ms < at - self.max_age_ms:
                self._released.remove(t)  # its records are counted untaken already
                if t.recorded:
                    self._unrecord.append(t.seq)
                    self._wait()
                elif t in self._unrecorded:
                    self._unrecorded.remove(t)
                for cid, lo, hi in t.spans:
                    touched = self._touched.get(cid)
                    if touched is not None:
                        touched.out.difference_update(range(lo, hi))
                        if not touched.out and not touched.done:
                            del self._touched[cid]
                if t.gap is not None:  # its message is never sent: the next one reports the gap
                    self._gap.merge(t.gap)
                    self._gap_dirty = True
                self._cursor[t.live] = min(self._cursor[t.live], (t.spans[0][0], t.spans[0][1]))

    def _oldest_droppable(self, db: sqlite3.Connection) -> tuple[int, int, int, int, int, int] | None:
        """The oldest chunk no take has handed out records of."""
        after = 0
        while True:
            rows = db.execute(
                "SELECT id, first_ms, last_ms, records, readings, raw FROM chunks WHERE id > ? ORDER BY id LIMIT 64",
                (after,),
            ).fetchall()
            if not rows:
                return None
            for row in rows:
                if row[0] not in self._touched and row[0] not in self._pending:
                    return (row[0], row[1], row[2], row[3], row[4], row[5])
            after = rows[-1][0]

    def _drop_chunk(self, db: sqlite3.Connection, row: tuple[int, ...], dropped: Gap, reason: str) -> None:
        cid, first, last, records, readings, raw = row
        size, keys = db.execute("SELECT size, keys FROM chunks WHERE id=?", (cid,)).fetchone()
        if keys:  # a redelivery of a dropped uplink is still a duplicate
            db.execute("INSERT INTO seen (last_ms, keys) VALUES (?, ?)", (last, keys))
        db.execute("DELETE FROM chunks WHERE id=?", (cid,))
        self._unpacked.pop(cid, None)
        t = self._totals
        t["chunks"] -= 1
        t["records"] -= records
        t["readings"] -= readings
        t["raw"] -= raw
        t["bytes"] -= size
        live = cid >= self.live_from
        self._untaken[live].add(records, readings, raw, -1)
        if live and self._cursor[True] <= (cid, 0):
            self._live_since_of_rest()
        dropped.add(readings, records, first, last, reason)

    def _drop_to_fit(self, db: sqlite3.Connection, dropped: Gap | None = None) -> Gap | None:
        """Drop the oldest chunks until within max_size (part of a transaction)."""
        own = dropped is None
        dropped = Gap() if dropped is None else dropped
        while self._total_bytes() > self.max_size:
            row = self._oldest_droppable(db)
            if row is None:
                break
            self._drop_chunk(db, row, dropped, "max_size")
        if own:
            self._record_gap(dropped)
        return dropped if dropped.readings else None

    def _record_gap(self, dropped: Gap) -> None:
        """Remember a drop for the next message's `meta.gap`, and count it."""
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
        self._gap_dirty = True
        self.count("dropped_readings", dropped.readings)
