"""The SQLite buffer: records in, takes out, each take ended once.

Records arrive in commit groups (`store`); each group is one `chunks` row, committed with
`synchronous=FULL` before intake acknowledges anything upstream. A take (`take`) hands out
the oldest records not yet taken, live or backlog, and is ended exactly once:

- `confirm()`: the cloud acknowledged them; they leave the buffer (their chunk is deleted
  when all of its records are confirmed, in the next commit: see "Writes" below);
- `release()`: not sent now; the same take, same seq and `message`, comes back from the
  next `take` of its class (a lost connection, a stop);
- `reject(letters)`: refused for good; they leave the buffer as the given dead letters;
- `divide(parts)`: replaced by new records (a batch too large for the link, cut smaller);
  they are stored first, then handed out as new takes.

Writes, which an SD card pays for (docs/benchmarks.md): a commit appends one chunk row and
nothing else: no per-uplink rows, no index, no totals row. Taking writes nothing; a take
lives in memory until it ends. Deleting confirmed chunks, counters and totals ride on the
next commit (or `settle` after a second without one). So a crash may send again what was
confirmed in the last second, as SPEC 7 allows for batches in flight at a crash; it never
loses what was acknowledged upstream.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.buffer import core, side
from gateway.buffer import records as rec
from gateway.buffer.bounds import Bounds
from gateway.buffer.core import SETTLE_AFTER_S
from gateway.buffer.records import Record, Stored
from gateway.buffer.results import Heard, StoreResult
from gateway.errors import BufferFullError, BufferLostError
from gateway.model import DeadLetter, DeviceLog, ForeignTenant, Outcome, Unmapped


class Buffer(Bounds):
    """The SQLite store-and-forward buffer of one gateway. One writer; thread-safe."""

    def over_limit(self) -> bool:
        """True when intake must be held: the buffer is at `max_size` under `stop-intake`."""
        return self.when_full == "stop-intake" and self._total_bytes() >= self.max_size

    def store(self, outcomes: Iterable[Record | Outcome | DeviceLog]) -> StoreResult:
        """Commit a group of intake outcomes durably, in one transaction (fsync'd on return,
        so the caller may then acknowledge upstream).

        Under `stop-intake` the records that fit within `max_size` are committed, from the
        first; `taken` says how many outcomes that was (the caller acks only those). Raises
        `BufferFullError` when not even the first fits, and `DiskFullError` when the disk is
        full; nothing of the group is then stored, so nothing may be acked.
        """
        items = list(outcomes)
        with self._lock:
            if self.over_limit():
                raise BufferFullError(f"buffer full: it holds {self._total_bytes()} bytes, max_size {self.max_size}")
            result = StoreResult(taken=len(items))
            limited = self.when_full == "stop-intake"
            kept: list[Stored] = []
            keys: list[int] = []
            new_keys: set[int] = set()
            kept_raw = 0
            letters: list[DeadLetter] = []
            unmapped: list[Unmapped] = []
            devices = self._devices
            saved_devices = {k: dict(v) for k, v in devices.pending.items()}
            room = self.max_size - self._total_bytes()
            for index, o in enumerate(items):
                if isinstance(o, Record):
                    if limited and o.payload and kept_raw + len(o.payload) > room:
                        if index == 0:
                            raise BufferFullError(f"buffer full: max_size {self.max_size} bytes reached")
                        result.taken = index
                        break
                    key = rec.digest(o.key)
                    if key in self._seen or key in new_keys:
                        result.duplicates += 1
                        result.duplicate_at.append(index)
                        continue
                    keys.append(key)
                    new_keys.add(key)
                    name = str(o.device)
                    d = devices.of(name, o.sensor_id, o.received_ms)
                    d["up"] += 1
                    d["rd"] += o.readings
                    devices.outcome(d, "readings")
                    devices.readings(name, d, o.latest)
                    if o.readings:
                        kept.append(Stored(o.received_ms, o.readings, o.payload))
                        kept_raw += len(o.payload)
                        result.stored += 1
                        result.readings += o.readings
                elif isinstance(o, DeadLetter):
                    key = rec.digest(f"{o.device}|{o.dedup_key or o.source}" if o.device else o.dedup_key or o.source)
                    if key in self._seen or key in new_keys:
                        result.duplicates += 1
                        result.duplicate_at.append(index)
                        continue
                    keys.append(key)
                    new_keys.add(key)
                    letters.append(o)
                    if o.device is not None:
                        d = devices.of(str(o.device), o.sensor_id, o.received_ms)
                        d["up"] += 1  # an uplink of the device, though it gave no readings
                        d["dl"] += 1
                        devices.outcome(d, "dead letter", o.reason)
                elif isinstance(o, Unmapped):
                    unmapped.append(o)
                    d = devices.of(str(o.uplink.device), None, o.uplink.received_ms)
                    d["up"] += 1
                    devices.outcome(d, "unmapped")
                elif isinstance(o, ForeignTenant):
                    result.foreign += 1
                    # Not this device heard: its health entry (last seen, silent) is its own tenant's.
                    d = devices.of(str(o.uplink.device), o.sensor_id, o.uplink.received_ms, heard=False)
                    d["ft"] += 1
                    devices.outcome(d, "other tenant")
                elif isinstance(o, DeviceLog):
                    result.logs += 1
                    d = devices.of(str(o.device), None, o.received_ms)
                    d["log"] += 1
                    d["lastlog"] = f"{o.level} {o.code}: {o.description}"[:300]
                    devices.outcome(d, "log")
            result.dead_letters, result.unmapped = len(letters), len(unmapped)
            chunks = rec.cut(kept)

            def work(db: sqlite3.Connection) -> list[tuple[int, list[Stored]]]:
                for name, n in (
                    ("duplicate_uplinks", result.duplicates),
                    ("dead_letters", len(letters)),
                    ("unmapped_uplinks", len(unmapped)),
                    ("foreign_tenant_uplinks", result.foreign),
                ):
                    if n:
                        self.count(name, n)
                written = []
                key_blob = rec.pack_keys(keys)
                for i, chunk in enumerate(chunks):
                    written.append((self._insert_chunk(db, chunk, key_blob if i == 0 else b""), chunk))
                if keys and not chunks:
                    db.execute("INSERT INTO seen (last_ms, keys) VALUES (?, ?)", (self._clock(), key_blob))
                for letter in letters:
                    self._totals["dead_letter_bytes"] += side.insert_dead_letter(db, letter)
                for u in unmapped:
                    self._totals["unmapped_bytes"] += side.insert_unmapped(db, u.uplink)
                if letters or unmapped:
                    for name, n in side.prune(db, self._totals, self.max_size).items():
                        self.count(name, n)
                rare = bool(letters or unmapped)
                if self._pending:  # before a bound is checked: they go anyway
                    self._delete_confirmed(db)
                    self._save_totals()
                if self.when_full == "drop-oldest" and self._total_bytes() > self.max_size:
                    # Keep max_size a hard bound between the service's periodic enforce_bounds.
                    result.dropped = self._drop_to_fit(db)
                    rare = True
                if rare:
                    self._save_state()
                return written

            try:
                written = self._write(work, drain=False)
            except BaseException:
                devices.pending = saved_devices
                raise
            for key in keys:
                self._seen[key] = None
            while len(self._seen) > self._seen_kept:
                del self._seen[next(iter(self._seen))]
            for chunk_id, chunk in written:
                self._untaken[chunk_id >= self.live_from].add(
                    len(chunk), sum(r.readings for r in chunk), sum(len(r.payload) for r in chunk)
                )
            if written and self._live_since is None:
                self._live_since = self._monotonic()
            return result

    def settle(self, force: bool = False) -> bool:
        """Commit what waits for a commit (takes to record, ended ones to forget, confirmed
        chunks to delete) once it has waited SETTLE_AFTER_S without a store to ride on, or at
        once with `force`; True when it wrote."""
        with self._lock:
            since = self._waiting_since
            if since is None or not (force or self._monotonic() - since >= SETTLE_AFTER_S):
                return False
            self._write(lambda db: None, drain=True)
            return True

    def settle_due_in(self) -> float | None:
        """Seconds until `settle` would write (0: now); None while nothing waits for a commit."""
        with self._lock:
            since = self._waiting_since
            return None if since is None else max(0.0, since + SETTLE_AFTER_S - self._monotonic())

    def heartbeat(self, pid: int | None = None, details: bool = True, every_s: float = 30.0) -> None:
        """Record that the daemon is alive, with the device counters and totals (for `status`),
        and what the daemon noted (`note_state`) that changed since the last heartbeat."""
        with self._lock:
            changed = {k: v for k, v in self._notes.items() if self._notes_written.get(k) != v}

            def work(db: sqlite3.Connection) -> None:
                self._set_state("heartbeat_ms", str(self._clock()))
                self._set_state("pid", str(pid if pid is not None else os.getpid()))
                self._set_state("heartbeat_every_ms", str(int(every_s * 1000)))
                for key, text in changed.items():
                    self._set_state(f"daemon.{key}", text)
                self._devices.flush(db, details)
                self._prune_seen(db)
                self._save_state()

            self._write(work, drain=True)
            self._notes_written.update(changed)

    def note_state(self, key: str, value: Any) -> None:
        """Hold a fact of the running daemon for `status` (the cloud link, the devices it runs
        with, when it started): JSON, written with the next heartbeat and only when it changed."""
        with self._lock:
            self._notes[key] = json.dumps(value, sort_keys=True)

    def heard(self) -> dict[str, Heard]:
        """Devices heard since the start (the latest HEARD_KEPT), with their counts since the start."""
        with self._lock:
            devices = self._devices
            return {
                device: Heard(seen[0], seen[1], seen[3], *devices.since_start(device))
                for device, seen in devices.heard.items()
            }

    def heard_before(self) -> dict[str, tuple[int | None, int | None]]:
        """What the file kept of each device from earlier runs: device -> (last seen ms, usual
        interval ms). A device whose last uplink was another ChirpStack tenant's was not heard
        (no last seen). Read once at start, through the buffer's own connection."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device, last_seen_ms, interval_ms, last_outcome FROM devices"
                " LEFT JOIN device_details USING (device)"
            ).fetchall()
        return {d: (int(seen) if seen else None, iv) for d, seen, iv, outcome in rows if outcome != "other tenant"}

    def disk_free(self) -> int:
        """Bytes free on the buffer's filesystem (as the buffer's own bound sees them)."""
        return self._room.free_space(self.path.parent)

    def oldest_unsent_ms(self) -> int | None:
        """Receive time of the oldest reading not yet confirmed by the cloud (a read, no write).
        Chunks confirmed but not yet deleted (the next commit deletes them) are skipped."""
        with self._lock:
            confirmed = set(self._pending)
            for chunk_id, first_ms in self._db.execute(
                "SELECT id, first_ms FROM chunks ORDER BY id LIMIT ?", (len(confirmed) + 1,)
            ):
                if chunk_id not in confirmed:
                    return int(first_ms)
            return None

    @property
    def last_publish_ms(self) -> int | None:
        """When the cloud last confirmed a batch, since this buffer was opened."""
        return self._last_publish_ms

    @property
    def bytes_on_disk(self) -> int:
        """What `max_size` bounds: chunks, dead letters and unmapped uplinks."""
        with self._lock:
            return self._total_bytes()

    def _prune_seen(self, db: sqlite3.Connection) -> None:
        cutoff = self._clock() - core.SEEN_KEPT_MS
        # The rows holding the newest `seen_kept` keys stay; older rows go, and rows past the age.
        acc, oldest_kept = 0, None
        for rid, n in db.execute("SELECT id, length(keys) FROM seen ORDER BY id DESC"):
            acc += n // rec.KEY_BYTES
            if acc >= self._seen_kept:
                oldest_kept = rid
                break
        db.execute("DELETE FROM seen WHERE last_ms < ? OR id < ?", (cutoff, oldest_kept or -1))

    def note_device(self, device: object, sensor_id: str | None, note: str) -> None:
        """Record what intake noticed about a device (shown by `status`); "" clears it.
        Written with the next heartbeat, like the device counters."""
        with self._lock:
            self._devices.of(str(device), sensor_id)["note"] = note

    # ---- beside the readings --------------------------------------------------------------

    def unmapped(self, after_id: int = 0, max_bytes: int = 4 * 1024**2, max_rows: int = 500) -> list[tuple[int, Any]]:
        """One page of the uplinks kept because no map named their device, oldest first, from
        after `after_id`: at most `max_rows`, and no more than about `max_bytes` of them."""
        with self._lock:
            return side.page_unmapped(self._db, after_id, max_bytes, max_rows)

    def refused_uplinks(self, device: Any, after_id: int = 0, max_rows: int = 50) -> list[tuple[int, Any]]:
        """One page of a device's dead letters that a codec refused, oldest first, with their
        whole uplinks (to decode again once the device map changed)."""
        with self._lock:
            return side.page_refused(self._db, device, after_id, max_rows)

    def forget_dead_letters(self, ids: Sequence[int]) -> None:
        """Remove dead letters that decoded after all (their readings are stored)."""
        with self._lock:

            def work(db: sqlite3.Connection) -> None:
                gone = side.forget_rows(db, "dead_letters", ids)
                for size, device, sensor_id in gone:
                    self._totals["dead_letter_bytes"] -= size
                    if device is not None:  # the device's count is of letters still dead
                        d = self._devices.of(device, sensor_id)
                        d["dl"] -= 1
                        d["up"] -= 1  # its uplink counted when it came: the decoded one counted it again
                if gone:
                    self.count("dead_letters_decoded_again", len(gone))
                self._save_state()

            self._write(work, drain=True)

    def forget_unmapped(self, ids: Sequence[int]) -> None:
        """Remove replayed uplinks from the unmapped store."""
        with self._lock:

            def work(db: sqlite3.Connection) -> None:
                for size, device, _ in side.forget_rows(db, "unmapped", ids):
                    self._totals["unmapped_bytes"] -= size
                    # Counted as an uplink when it came unmapped: its replay counted it again.
                    self._devices.of(device, None)["up"] -= 1
                self._save_state()

            self._write(work, drain=True)

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

    def close(self) -> None:
        """Write what waits (takes, deletions, counters), checkpoint the WAL into the file, and
        close. Takes not ended are recorded: the next start hands them out again as they were."""
        with self._lock:
            if self._lock_fd is None:
                return  # closed already (`rescue` closes)
            try:

                def work(db: sqlite3.Connection) -> None:
                    self._devices.flush(db)
                    self._save_state()

                self._write(work, drain=True)
            except (sqlite3.Error, BufferLostError):
                pass  # deletions and counters only; the readings are committed already
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()
            self._unlock()
