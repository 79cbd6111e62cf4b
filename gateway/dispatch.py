"""The dispatcher: which formed batch goes to the cloud when, and what its answer does.

It owns the life of every batch between forming and confirmation (STYLE 15): queued, in
flight, or backing off after a refusal; confirmed, split and dropped batches are forgotten.
The service calls it from the main loop, in this order of priority:

1. publish results: confirm accepted batches, keep and back off on refused ones;
2. live readings first: a live batch is formed when a reading has waited `max_delay` or the
   live readings fill a message;
3. the backlog drains oldest first in the in-flight slots left, one slot always kept for live.

Retries and pauses are scheduled on the monotonic clock (STYLE 14; injectable for tests); how
long live readings waited is the buffer's to measure (`Buffer.live_due`).
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import structlog

from gateway.buffer import Buffer
from gateway.cloud import CONNECTION_REFUSALS, Publisher, PublishResult
from gateway.model import Batch

log = structlog.get_logger("gateway.dispatch")

MAX_BACKOFF_S = 60.0
#: The smallest batch.max_bytes a too-large refusal may teach the buffer when the link did not
#: announce its limit: the least the config allows, since intake also measures uplinks against
#: it. A link that takes less still gets everything, by splitting each batch it refuses.
MIN_LEARNT_MAX_BYTES = 4096
#: The smallest part a refused batch is split into (bytes of message).
MIN_SPLIT_BYTES = 256


class Stage(Enum):
    """Where a formed, unconfirmed batch is in its life."""

    #: On disk, sent again with the same bytes as soon as a slot is free (unconfirmed at the
    #: last stop, packed from a long backlog, a part of a split, or lost with the connection).
    QUEUED = "queued"
    #: Published; its answer is awaited.
    IN_FLIGHT = "in flight"
    #: Refused; on disk, not sent again before its `not_before`, whoever asks.
    BACKING_OFF = "backing off"


@dataclass(slots=True)
class Life:
    """One formed batch not yet confirmed, as the dispatcher knows it."""

    stage: Stage
    #: Monotonic seconds before which a batch backing off is not sent.
    not_before: float = 0.0
    #: Refusals so far (a loss with the connection is not one): its backoff and log level.
    failures: int = 0
    #: Held while in flight only: otherwise the payload stays on disk until it is sent.
    batch: Batch | None = None


class Dispatcher:
    """Sends formed batches to a Publisher and settles each answer with the Buffer."""

    def __init__(
        self,
        buffer: Buffer,
        publisher: Publisher,
        *,
        max_in_flight: int,
        max_delay_s: float,
        on_result: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.buffer = buffer
        self.publisher = publisher
        self.max_in_flight = max_in_flight
        self.max_delay_s = max_delay_s
        self._on_result = on_result
        self._clock = clock
        #: Every formed batch not yet confirmed that this run knows of, by seq.
        self._lives: dict[int, Life] = {}
        #: The seqs of `_lives` in flight (their count limits publishing).
        self._flying: set[int] = set()
        self._results: queue.Queue[tuple[int, PublishResult]] = queue.Queue()
        self._answered = threading.Event()
        self._epoch = -1
        #: Refusals in a row that concern the whole connection (CONNECTION_REFUSALS): the pause.
        self._link_refusals = 0
        #: The largest message the cloud accepted: a refusal of a smaller one is not for its size.
        self._largest_accepted = 0
        self._paused_until = 0.0
        self.published_batches = 0

    # ---- what the service asks ---------------------------------------------------------------

    def restore(self) -> int:
        """At start: the batches formed before the last stop are sent again, same bytes; how many."""
        for seq in self.buffer.pending_seqs():
            self._queue(seq)
        return len(self._lives)

    def compact(self) -> None:
        """Pack a long backlog into formed batches (`Buffer.compact`) and queue them."""
        for seq in self.buffer.compact():
            self._queue(seq)

    def in_flight_seqs(self) -> list[int]:
        """Seqs of the batches published and not yet answered (a bound must not drop them)."""
        return sorted(self._flying)

    def stage_of(self, seq: int) -> Stage | None:
        """Where batch `seq` is in its life; None once confirmed, split, dropped or unknown."""
        life = self._lives.get(seq)
        return None if life is None else life.stage

    def pause(self, seconds: float) -> None:
        """Publish nothing for `seconds` (the buffer cannot be written meanwhile)."""
        self._paused_until = self._clock() + seconds

    def publish_due(self) -> None:
        """Send what is due, live first, in the free in-flight slots."""
        if not self.publisher.connected:
            return
        if self.publisher.epoch != self._epoch:
            # A new connection: what is stored now is backlog; what arrives from now is live.
            self._epoch = self.publisher.epoch
            self.buffer.mark_live()
        now = self._clock()
        if now < self._paused_until:
            return
        limit = self.max_in_flight
        if len(self._flying) < limit and self.buffer.live_due(self.max_delay_s):
            while len(self._flying) < limit:
                batch = self.buffer.take(live=True)
                if batch is None:
                    break
                self._send(batch)
                if not self.buffer.live_due(self.max_delay_s):
                    break
        # The backlog, oldest first, may use all but one slot, so live readings never queue
        # behind it: formed batches first (same bytes again), then unbatched backlog uplinks.
        backlog_slots = max(1, limit - 1)
        for seq in self._waiting():
            if len(self._flying) >= backlog_slots:
                return
            self._send_formed(seq, now)
        while len(self._flying) < backlog_slots and self.buffer.depth(live=False).uplinks > 0:
            batch = self.buffer.take(live=False)
            if batch is None:
                break
            self._send(batch)

    def collect_results(self) -> None:
        """Settle the answers publishers gave since the last call (main loop only)."""
        while True:
            try:
                seq, result = self._results.get_nowait()
            except queue.Empty:
                break
            life = self._lives.get(seq)
            batch = life.batch if life is not None and life.stage is Stage.IN_FLIGHT else None
            if life is None or batch is None:
                continue  # not in flight: an answer nobody waits for
            if result.ok:
                try:
                    self.buffer.confirm(seq)
                except sqlite3.DatabaseError:
                    # Not confirmed yet (disk full, ...): keep it in flight and try again later.
                    self._results.put((seq, result))
                    raise
                self._forget(seq)
                self.published_batches += 1
                self._link_refusals = 0
                self._largest_accepted = max(self._largest_accepted, len(batch.payload))
                log.debug("batch published", batch_id=batch.batch_id, readings=batch.readings, bytes=len(batch.payload))
                continue
            self._refused(life, batch, result)

    def flush(self, deadline: float) -> None:
        """Stopping: everything committed goes out now, if the cloud is there to take it.

        Batches backing off and a paused connection are respected; it returns by `deadline`
        (on this dispatcher's clock) less a second for the publisher to stop.
        """
        while self._clock() < deadline - 1.0:
            self.collect_results()
            if self.publisher.connected and self._clock() >= self._paused_until:
                now = self._clock()
                for seq in self._waiting():
                    if len(self._flying) < self.max_in_flight:
                        self._send_formed(seq, now)
                while len(self._flying) < self.max_in_flight:
                    batch = self.buffer.take(live=True) or self.buffer.take(live=False)
                    if batch is None:
                        break
                    self._send(batch)
            if not self._flying and (not self.publisher.connected or self.buffer.depth().uplinks == 0):
                break
            self._answered.wait(0.05)
            self._answered.clear()
        self.collect_results()

    # ---- a batch's life -------------------------------------------------------------------------

    def _queue(self, seq: int, not_before: float | None = None) -> Life:
        """Batch `seq` waits on disk: queued, or backing off until `not_before`."""
        life = self._lives.setdefault(seq, Life(Stage.QUEUED))
        self._flying.discard(seq)
        life.batch = None
        if not_before is None:
            life.stage, life.not_before = Stage.QUEUED, 0.0
        else:
            life.stage, life.not_before = Stage.BACKING_OFF, not_before
        return life

    def _forget(self, seq: int) -> None:
        """Batch `seq` is confirmed, replaced by its parts, or gone from the buffer."""
        self._lives.pop(seq, None)
        self._flying.discard(seq)

    def _waiting(self) -> list[int]:
        """Seqs of the batches waiting on disk, oldest first."""
        return sorted(seq for seq in self._lives if seq not in self._flying)

    def _send_formed(self, seq: int, now: float) -> None:
        """Send waiting batch `seq` if its time has come, read back from disk."""
        life = self._lives[seq]
        if life.stage is Stage.BACKING_OFF and life.not_before > now:
            return
        formed = self.buffer.batch(seq)
        if formed is None:  # dropped by a bound while it waited: forgotten
            self._forget(seq)
            return
        self._send(formed)

    def _send(self, batch: Batch) -> None:
        life = self._lives.get(batch.seq)
        if life is not None and life.stage is Stage.BACKING_OFF and life.not_before > self._clock():
            return  # still backing off: it stays on disk, unsent
        if life is None:
            life = self._lives[batch.seq] = Life(Stage.IN_FLIGHT)
        life.stage, life.batch = Stage.IN_FLIGHT, batch
        self._flying.add(batch.seq)
        self.publisher.publish(batch, self._on_published)

    def _on_published(self, seq: int, result: PublishResult) -> None:
        """Publisher threads: hand the result to the main loop."""
        self._results.put((seq, result))
        self._answered.set()
        self._on_result()

    def _refused(self, life: Life, batch: Batch, result: PublishResult) -> None:
        """A batch the cloud did not take: split if too large, else retried after its own backoff.

        Only refusals that concern the connection (0x87, 0x97) pause all publishing; any other
        is this batch's, so one poisoned batch neither stops the rest nor is retried faster
        because others succeed. A batch that keeps failing is logged as a warning at attempts
        1, 2, 4, 8, ... and at debug otherwise, so it cannot flood the journal.
        """
        seq, size, now = batch.seq, len(batch.payload), self._clock()
        # Split a batch of many readings at once (it costs nothing); give up on one reading only
        # when the link's limit is known, or smaller messages are seen to pass.
        too_large = result.too_large and size > self._largest_accepted
        certain = result.limit is not None or self._largest_accepted > 0
        if too_large and (batch.readings > 1 or certain):
            self._split(batch, result)
            return
        if result.reason_code is None and not result.too_large and not self.publisher.connected:
            # Lost with the connection (the disconnect is logged): sent again once it is back.
            self._queue(seq)
            self.buffer.count("publish_failed")
            log.debug("batch lost with the connection; sent again when it is back", batch_id=batch.batch_id)
            return
        attempts = life.failures + 1
        backoff = min(MAX_BACKOFF_S, 2.0 ** min(attempts, 6))
        self._queue(seq, not_before=now + backoff).failures = attempts
        fields: dict[str, object] = {}
        if result.reason_code is not None:
            self.buffer.count(f"puback_refused_{result.reason_code:#04x}")
            if result.reason_code in CONNECTION_REFUSALS:
                # Not authorized / quota exceeded: every batch would meet it; pause them all.
                self._link_refusals += 1
                pause = min(MAX_BACKOFF_S, 2.0 ** min(self._link_refusals, 6))
                self._paused_until = max(self._paused_until, now + pause)
                fields["publishing_paused_s"] = pause
        else:
            self.buffer.count("publish_failed_too_large" if too_large else "publish_failed")
        tell = log.warning if attempts & (attempts - 1) == 0 else log.debug
        tell(
            "batch not accepted; kept for retry",
            batch_id=batch.batch_id,
            reason=str(result),
            bytes=size,
            attempt=attempts,
            retry_in_s=backoff,
            **fields,
        )

    def _split(self, batch: Batch, result: PublishResult) -> None:
        """A batch too large for the link: batches form smaller from now, and this one is
        replaced by smaller ones (or, one reading no message can carry, by a dead letter)."""
        size = len(batch.payload)
        guess = result.limit if result.limit is not None else max(size // 2, self._largest_accepted)
        fits = max(MIN_SPLIT_BYTES, min(guess, size - 1, self.buffer.max_bytes))
        # A limit the broker announced is the link's; a guess is kept from going below the config's.
        learnt = fits if result.limit is not None else max(MIN_LEARNT_MAX_BYTES, fits)
        if learnt < self.buffer.max_bytes:
            log.info("the cloud takes smaller messages: batches are formed smaller", max_bytes=learnt)
            self.buffer.max_bytes = learnt
        reason = f"too large to publish: a message of {size} bytes holding only this reading was refused ({result})"
        try:
            seqs, dead = self.buffer.split(batch.seq, fits, reason=reason)
        except sqlite3.DatabaseError:
            self._results.put((batch.seq, result))  # still in flight, as for a confirm: handled again later
            raise
        self._forget(batch.seq)
        if not seqs and not dead:
            return  # dropped by a bound meanwhile
        self.buffer.count("publish_failed_too_large")
        for seq in seqs:
            self._queue(seq)
        if dead:
            log.error(
                "reading too large for any message the cloud takes: moved to dead letters",
                batch_id=batch.batch_id,
                bytes=size,
                readings=dead,
                reason=str(result),
            )
        else:
            log.warning(
                "batch refused as too large; split into smaller batches",
                batch_id=batch.batch_id,
                bytes=size,
                readings=batch.readings,
                parts=len(seqs),
                max_bytes=fits,
                reason=str(result),
            )
