"""Takes: records handed out for one message, and how a take ends.

A take hands out the oldest records not yet out, live (stored since the cloud connected) or
backlog, and lives in memory only: taking writes nothing. It ends exactly once: `confirm`
(the records leave, deleted with their chunk's last confirmation, in the next commit),
`release` (handed out again, unchanged, by a later take of its class), `reject` (the records
leave as dead letters) or `divide` (stored again in parts, which are new takes).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from gateway.buffer import side
from gateway.buffer.core import ChunkDamaged, Core, Counts, Touched
from gateway.buffer.records import Stored
from gateway.buffer.results import Depth, Gap
from gateway.model import DeadLetter

#: Chunks read per query while taking.
_READ_AHEAD = 16


class TakeState(Enum):
    """Where a take is: handed out, or how it ended."""

    OPEN = "open"
    RELEASED = "released"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    DIVIDED = "divided"


@dataclass(eq=False)
class Take:
    """Records handed out together, oldest first, for one message; ended exactly once."""

    buffer: Takes = field(repr=False)
    seq: int
    created_ms: int
    live: bool
    records: list[Stored]
    #: (chunk id, first index, end index) of the records, in order.
    spans: list[tuple[int, int, int]]
    #: Readings dropped by a bound that this message is the first to report (`meta.gap`).
    gap: Gap | None = None
    state: TakeState = TakeState.OPEN
    #: The bytes the batching stage made of it: kept with it, so a released take is sent
    #: again exactly as before.
    message: bytes | None = None
    #: Written to the file (by the first commit after `record`): only then may its message be
    #: published, and after a restart it is handed out again as it was (same seq, same bytes).
    recorded: bool = False

    @property
    def readings(self) -> int:
        return sum(r.readings for r in self.records)

    @property
    def raw(self) -> int:
        return sum(len(r.payload) for r in self.records)

    @property
    def oldest_ms(self) -> int:
        return min(r.received_ms for r in self.records)

    def confirm(self, at_ms: int | None = None) -> None:
        """The cloud acknowledged these records: they leave the buffer."""
        self.buffer._end(self, TakeState.CONFIRMED, at_ms=at_ms)

    def release(self) -> None:
        """Not sent now: handed out again, same seq and message, by a later `take`."""
        self.buffer._release(self)

    def reject(self, letters: Sequence[DeadLetter]) -> None:
        """Refused for good: the records leave the buffer as `letters` (one commit)."""
        self.buffer._reject(self, letters)

    def divide(self, parts: Sequence[Sequence[Stored]]) -> list[Take]:
        """Replace these records by `parts` (stored first, one commit): a take for each part."""
        return self.buffer._divide(self, parts)

    def shrink(self, keep: int) -> None:
        """Give back all but the first `keep` records, untaken (only the newest take of its class)."""
        self.buffer._shrink(self, keep)

    def record(self) -> None:
        """Its records are final: write it with the next commit (`recorded` says when)."""
        self.buffer._record(self)


class Takes(Core):
    """Handing records out, and the ends of a take."""

    def mark_live(self) -> None:
        """Call when the cloud (re)connects: what is stored now is backlog, what comes is live."""
        with self._lock:
            self.live_from = self._next_id
            self._cursor[True] = (self.live_from, 0)
            live = self._untaken[True]
            self._untaken[False].add(live.records, live.readings, live.raw)
            self._untaken[True] = Counts()
            for t in self._released:
                t.live = False
            self._live_since = None

    def depth(self, live: bool | None = None) -> Depth:
        """What waits: all (None), only untaken live records (True), only untaken backlog (False).

        The whole depth counts records not taken as `readings`/`uplinks`/`bytes`, and those in
        takes not yet ended (in flight, backing off, released) as `batches`/`batch_*`."""
        with self._lock:
            if live is not None:
                c = self._untaken[live]
                return Depth(
                    readings=c.readings,
                    bytes=c.raw,
                    uplinks=c.records,
                    since=self._live_since if live else None,
                )
            untaken = Counts()
            for c in self._untaken.values():
                untaken.add(c.records, c.readings, c.raw)
            return Depth(
                readings=untaken.readings,
                bytes=untaken.raw,
                uplinks=untaken.records,
                batches=self._takes,
                batch_readings=self._out.readings,
                batch_bytes=self._out.raw,
            )

    def live_waited(self, at: float | None = None) -> float | None:
        """Monotonic seconds the oldest untaken live record has waited; None when there is none."""
        with self._lock:
            if self._untaken[True].records == 0 or self._live_since is None:
                return None
            return (self._monotonic() if at is None else at) - self._live_since

    def take(self, live: bool, max_raw: int) -> Take | None:
        """The oldest records not yet taken, live or backlog, up to `max_raw` payload bytes
        (at least one record); a released take of the class comes back first, unchanged.
        None when there is nothing to take. Writes nothing."""
        with self._lock:
            while True:
                try:
                    return self._take(live, max_raw)
                except ChunkDamaged as exc:  # moved to the dead letters; the take goes on past it
                    self._lose_chunk(exc.chunk_id, exc.reason)

    def _take(self, live: bool, max_raw: int) -> Take | None:
        for t in self._released:
            if t.live == live:
                self._released.remove(t)
                t.state = TakeState.OPEN
                self._untaken[live].add(len(t.records), t.readings, t.raw, -1)
                self._out.add(len(t.records), t.readings, t.raw)
                self._takes += 1
                return t
        chosen: list[Stored] = []
        spans: list[tuple[int, int, int]] = []
        raw = 0
        chunk_id, index = self._cursor[live]
        full = False
        while not full:
            where = "id >= ?" if live else "id >= ? AND id < ?"
            args = (chunk_id,) if live else (chunk_id, self.live_from)
            rows = self._db.execute(
                f"SELECT id, records FROM chunks WHERE {where} ORDER BY id LIMIT {_READ_AHEAD}", args
            ).fetchall()
            if not rows:
                break
            for cid, count in rows:
                if cid != chunk_id:
                    chunk_id, index = cid, 0
                if cid in self._pending:
                    chunk_id, index = cid + 1, 0
                    continue
                touched = self._touched.get(cid)
                stored: list[Stored] | None = None
                lo = None
                while index < count:
                    if touched is not None and (index in touched.out or index in touched.done):
                        if lo is not None:
                            spans.append((cid, lo, index))
                            lo = None
                        index += 1
                        continue
                    if stored is None:
                        stored = self._records_of(cid)
                    r = stored[index]
                    if chosen and raw + len(r.payload) > max_raw:
                        full = True
                        break
                    chosen.append(r)
                    raw += len(r.payload)
                    lo = index if lo is None else lo
                    index += 1
                if lo is not None:
                    spans.append((cid, lo, index))
                if full:
                    break
                chunk_id, index = cid + 1, 0
        self._cursor[live] = (chunk_id, index)
        if not chosen:
            return None
        for cid, lo, hi in spans:
            touched = self._touched.get(cid)
            if touched is None:
                count = self._db.execute("SELECT records FROM chunks WHERE id=?", (cid,)).fetchone()[0]
                touched = self._touched[cid] = Touched(count)
            touched.out.update(range(lo, hi))
        created = self._clock()
        seq = max(self._next_seq, created)
        self._next_seq = seq + 1
        take = Take(self, seq, created, live, chosen, spans)
        if self._gap.readings:
            # The gap moves into this take: drops after it go to the next message. Its
            # record and the emptied gap are written by the same commit.
            take.gap, self._gap = self._gap, Gap()
            self._gap_dirty = True
        readings = take.readings
        self._untaken[live].add(len(chosen), readings, raw, -1)
        self._out.add(len(chosen), readings, raw)
        self._takes += 1
        if live:
            self._live_since_of_rest()
        return take

    def _live_since_of_rest(self) -> None:
        """Some live records left: estimate when the oldest remaining one was stored.

        Its wall-clock receive time carried onto the monotonic clock, clamped between the
        previous oldest and now, so a clock step errs by at most one max_delay.
        """
        if self._untaken[True].records == 0:
            self._live_since = None
            return
        cid, index = self._cursor[True]
        row = self._db.execute("SELECT id, first_ms FROM chunks WHERE id >= ? ORDER BY id LIMIT 1", (cid,)).fetchone()
        if row is None:
            self._live_since = None
            return
        first = self._records_of(cid)[index].received_ms if row[0] == cid and index > 0 else row[1]
        mono = self._monotonic()
        estimate = mono - max(0.0, (self._clock() - first) / 1000)
        since = self._live_since if self._live_since is not None else estimate
        self._live_since = min(mono, max(since, estimate))

    # ---- ending takes --------------------------------------------------------------------

    def _check_open(self, take: Take) -> None:
        if take.state is not TakeState.OPEN:
            raise RuntimeError(f"take {take.seq} already ended ({take.state.value})")

    def _record(self, take: Take) -> None:
        with self._lock:
            if not take.recorded and take not in self._unrecorded:
                self._unrecorded.append(take)
                self._wait()

    def _finish(self, take: Take, mark_done: bool = True) -> None:
        """The take's records are done with (confirmed, rejected, divided). Its record, if it
        has one, is marked done with the next commit (`mark_done`; or already was) and goes with
        the last of its chunks."""
        if take in self._unrecorded:
            self._unrecorded.remove(take)
        elif take.recorded:
            self._ended[take.seq] = {cid for cid, _, _ in take.spans}
            if mark_done:
                self._mark_done.append(take.seq)
                self._wait()
        self._out.add(len(take.records), take.readings, take.raw, -1)
        self._takes -= 1
        for cid, lo, hi in take.spans:
            touched = self._touched.get(cid)
            if touched is None:
                continue
            span = range(lo, hi)
            touched.out.difference_update(span)
            touched.done.update(span)
            if len(touched.done) >= touched.records:
                del self._touched[cid]
                self._unpacked.pop(cid, None)
                self._pending.append(cid)
                self._wait()

    def _end(self, take: Take, state: TakeState, at_ms: int | None = None) -> None:
        with self._lock:
            self._check_open(take)
            take.state = state
            self._finish(take)
            if state is TakeState.CONFIRMED:
                self._last_publish_ms = at_ms if at_ms is not None else self._clock()
                self.count("published_batches")
                self.count("published_readings", take.readings)

    def _release(self, take: Take) -> None:
        with self._lock:
            self._check_open(take)
            take.state = TakeState.RELEASED
            self._untaken[take.live].add(len(take.records), take.readings, take.raw)
            self._out.add(len(take.records), take.readings, take.raw, -1)
            self._takes -= 1
            # Oldest seq first among the released.
            at = next((i for i, t in enumerate(self._released) if t.seq > take.seq), len(self._released))
            self._released.insert(at, take)

    def _reject(self, take: Take, letters: Sequence[DeadLetter]) -> None:
        with self._lock:
            self._check_open(take)

            def work(db: sqlite3.Connection) -> None:
                for letter in letters:
                    self._totals["dead_letter_bytes"] += side.insert_dead_letter(db, letter)
                for name, n in side.prune(db, self._totals, self.max_size).items():
                    self.count(name, n)
                self.count("dead_letters", len(letters))
                self.count("too_large_readings", take.readings)
                db.execute("UPDATE takes SET done = 1 WHERE seq = ?", (take.seq,))
                if take.gap is not None:  # its message is never sent: the next one reports the gap
                    self._gap.merge(take.gap)
                    self._gap_dirty = True
                self._save_state()

            self._write(work, drain=True)
            take.state = TakeState.REJECTED
            self._finish(take, mark_done=False)

    def _divide(self, take: Take, parts: Sequence[Sequence[Stored]]) -> list[Take]:
        with self._lock:
            self._check_open(take)
            lists = [list(p) for p in parts if p]
            seqs = []
            for _ in lists:
                seq = max(self._next_seq, self._clock())
                self._next_seq = seq + 1
                seqs.append(seq)
            carried = take.gap

            def work(db: sqlite3.Connection) -> list[int]:
                # The parts and their takes in one commit, the original's record gone in it too:
                # after a crash the parts are sent again as they were, the original never.
                ids = [self._insert_chunk(db, part, b"") for part in lists]
                db.executemany(
                    "INSERT INTO takes (seq, created_ms, spans, gap) VALUES (?,?,?,?)",
                    [
                        (
                            seq,
                            take.created_ms,
                            json.dumps([(cid, 0, len(part))]),
                            None if i or carried is None else json.dumps(carried.__dict__),
                        )
                        for i, (seq, cid, part) in enumerate(zip(seqs, ids, lists, strict=True))
                    ],
                )
                db.execute("UPDATE takes SET done = 1 WHERE seq = ?", (take.seq,))
                self.count("split_batches")
                self._save_state()
                return ids

            ids = self._write(work, drain=True)
            take.state = TakeState.DIVIDED
            self._finish(take, mark_done=False)
            out: list[Take] = []
            for seq, cid, part in zip(seqs, ids, lists, strict=True):
                self._touched[cid] = Touched(len(part), out=set(range(len(part))))
                t = Take(self, seq, take.created_ms, take.live, part, [(cid, 0, len(part))], recorded=True)
                if carried is not None and not out:
                    t.gap = carried
                self._out.add(len(part), t.readings, t.raw)
                self._takes += 1
                out.append(t)
            return out

    def _shrink(self, take: Take, keep: int) -> None:
        with self._lock:
            self._check_open(take)
            if keep >= len(take.records) or keep < 1:
                return
            given = take.records[keep:]
            # Walk the spans to find where the kept records end.
            left, spans = keep, []
            back: tuple[int, int] | None = None
            for cid, lo, hi in take.spans:
                n = hi - lo
                if back is None and left < n:
                    if left:
                        spans.append((cid, lo, lo + left))
                    back = (cid, lo + left)
                    touched = self._touched[cid]
                    touched.out.difference_update(range(lo + left, hi))
                    left = 0
                    continue
                if back is None:
                    spans.append((cid, lo, hi))
                    left -= n
                else:
                    self._touched[cid].out.difference_update(range(lo, hi))
            assert back is not None
            take.records, take.spans = take.records[:keep], spans
            self._cursor[take.live] = back
            readings, raw = sum(r.readings for r in given), sum(len(r.payload) for r in given)
            self._out.add(len(given), readings, raw, -1)
            self._untaken[take.live].add(len(given), readings, raw)
            if take.live:  # the records given back wait for the next live message from now
                self._live_since_of_rest()
