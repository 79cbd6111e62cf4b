"""The dispatcher: which formed batch goes to the cloud when, and what its answer does.

It owns the life of every batch between forming and confirmation (STYLE 15): queued, in
flight, or backing off after a refusal; confirmed, split and dropped batches are forgotten.
The service calls it from the main loop, in this order of priority:

1. publish results: confirm accepted batches, keep and back off on refused ones;
2. live readings first: a live batch is formed when a reading has waited `max_delay` or the
   live readings fill a message;
3. the backlog drains oldest first in the in-flight slots left, one slot always kept for live.

Retries and pauses are scheduled on the monotonic clock (STYLE 14; injectable for tests); how
long live readings waited is the buffer's to measure (`Batcher.live_due`).

Each batch holds the buffer's take it was made of, and ends it exactly once: confirm on
PUBACK success, divide (by `Batcher.split`) or reject when too large. A batch waiting for a
retry is held here with its bytes; at most `held_max` batches are held, so a cloud that
refuses everything leaves the readings on disk, not in memory.
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

from gateway.batching import Batcher
from gateway.buffer import Buffer, now_ms
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
#: Successful publishes are logged as one info line per this many seconds (each batch only at debug).
SUMMARY_EVERY_S = 60.0


class Stage(Enum):
    """Where a formed, unconfirmed batch is in its life."""

    #: Sent again with the same bytes as soon as a slot is free (a part of a split, or lost
    #: with the connection).
    QUEUED = "queued"
    #: Published; its answer is awaited.
    IN_FLIGHT = "in flight"
    #: Refused; not sent again before its `not_before`.
    BACKING_OFF = "backing off"


@dataclass(slots=True)
class Life:
    """One formed batch not yet confirmed, as the dispatcher knows it."""

    stage: Stage
    batch: Batch
    #: Monotonic seconds before which a batch backing off is not sent.
    not_before: float = 0.0
    #: Refusals so far (a loss with the connection is not one): its backoff and log level.
    failures: int = 0


class Dispatcher:
    """Sends formed batches to a Publisher and settles each answer with the Buffer."""

    def __init__(
        self,
        batcher: Batcher,
        publisher: Publisher,
        *,
        max_in_flight: int,
        max_delay_s: float,
        on_result: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        held_max: int | None = None,
        intake_idle: Callable[[], bool] = lambda: False,
    ) -> None:
        self.batcher = batcher
        #: True when intake has nothing queued or in hand (see `live_due_now`).
        self._intake_idle = intake_idle
        #: A live message went out full: a burst is under way; its remainder leaves as soon as
        #: intake is idle, without waiting out max_delay (see `live_due_now`).
        self._burst = False
        self.buffer: Buffer = batcher.buffer
        self.publisher = publisher
        self.held_max = held_max if held_max is not None else 4 * max_in_flight
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
        self.published_readings = 0
        #: Since the last summary line: batches, readings and message bytes the cloud accepted.
        self._summary = [0, 0, 0]
        self._summary_from = clock()
        #: The last publish the cloud did not accept: at_ms, reason, reason_code (for `status`).
        self.last_refusal: dict[str, object] | None = None
        #: True from before a live batch is formed until every formed batch is recorded: a
        #: commit then has given `publish_due` something to send. Read by intake's thread.
        self.awaiting_commit = False

    # ---- what the service asks ---------------------------------------------------------------

    def in_flight_seqs(self) -> list[int]:
        """Seqs of the batches published and not yet answered (a bound must not drop them)."""
        return sorted(self._flying)

    def stage_of(self, seq: int) -> Stage | None:
        """Where batch `seq` is in its life; None once confirmed, split, dropped or unknown."""
        life = self._lives.get(seq)
        return None if life is None else life.stage

    @property
    def in_flight(self) -> int:
        """Batches published and not yet answered."""
        return len(self._flying)

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
        backlog_slots = max(1, limit - 1)
        # Form: live batches when due, backlog batches to fill all slots but one, so live
        # readings never queue behind the backlog. A new batch is sent once its take is
        # recorded: live ones ride on intake's next commit (or `settle`, a second later); a
        # drain waits for nobody and records its batches at once.
        if self.live_due_now():
            # The end of a burst: intake is idle, so no commit of its will record the take soon.
            burst_end = not self.batcher.live_due(self.max_delay_s)
            self.awaiting_commit = True  # before the take exists: a commit may record it at once
            while self._unsent(live=True) + len(self._flying) < limit and len(self._lives) < self.held_max:
                full = self.batcher.live_full()
                batch = self.batcher.form(live=True)
                if batch is None:
                    break
                self._burst = full  # a full message: more may follow; a partial one ends the burst
                burst_end = burst_end or (full and self._intake_idle())  # its last commit came
                self._queue(batch)
                if not self.live_due_now():
                    break
            if burst_end:
                self.buffer.settle(force=True)  # record it now, as a drain does, and send it
        formed = False
        while (
            self._unsent(live=False) + len(self._flying) < backlog_slots
            and len(self._lives) < self.held_max
            and self.buffer.depth(live=False).uplinks > 0
        ):
            batch = self.batcher.form(live=False)
            if batch is None:
                break
            self._queue(batch)
            formed = True
        if formed:
            self.buffer.settle(force=True)
        # Send: live first, then the backlog oldest first (batches held for a retry, same bytes).
        for seq in self._waiting():
            life = self._lives[seq]
            if len(self._flying) < (limit if life.batch.take.live else backlog_slots):
                self._send_waiting(seq, now)
        self.awaiting_commit = any(not life.batch.take.recorded for life in self._lives.values())

    def live_due_now(self) -> bool:
        """True when live readings should be formed into a message now: one has waited
        `max_delay`, they fill a message, or a burst filled the last live message and intake has
        gone idle. That last case sends a burst's remainder at once: readings never wait longer
        than `max_delay`, and at a site's steady load (no message ever full) nothing changes."""
        if self.batcher.live_due(self.max_delay_s):
            return True
        return self._burst and self.buffer.live_waited() is not None and self._intake_idle()

    def due_in(self) -> float | None:
        """Seconds until `publish_due` has work that no event brings (0: now): live readings
        reaching `max_delay`, a refused batch's backoff or the pause ending. None when only an
        event can bring work: a commit (new readings, a take recorded), a publish result, or the
        link coming up (the caller looks at it now and then)."""
        if not self.publisher.connected or len(self._flying) >= self.max_in_flight:
            return None  # a result frees a slot, and wakes the caller
        now = self._clock()
        due: list[float | None] = [
            life.not_before - now for life in self._lives.values() if life.stage is Stage.BACKING_OFF
        ]
        if self._unsent(live=True) + len(self._flying) < self.max_in_flight and len(self._lives) < self.held_max:
            due.append(0.0 if self.live_due_now() else self.batcher.live_due_in(self.max_delay_s))
        times = [t for t in due if t is not None]
        if not times:
            return None
        return max(0.0, min(times), self._paused_until - now)

    def _unsent(self, live: bool) -> int:
        """Batches formed and queued, not yet sent (backing off ones are not counted)."""
        return sum(
            1
            for seq, life in self._lives.items()
            if life.stage is Stage.QUEUED and seq not in self._flying and life.batch.take.live == live
        )

    def collect_results(self) -> None:
        """Settle the answers publishers gave since the last call (main loop only)."""
        while True:
            try:
                seq, result = self._results.get_nowait()
            except queue.Empty:
                break
            life = self._lives.get(seq)
            if life is None or life.stage is not Stage.IN_FLIGHT:
                continue  # not in flight: an answer nobody waits for
            batch = life.batch
            if result.ok:
                batch.take.confirm()
                self._forget(seq)
                self.published_batches += 1
                self.published_readings += batch.readings
                self._link_refusals = 0
                self._largest_accepted = max(self._largest_accepted, len(batch.payload))
                log.debug("batch published", batch_id=batch.batch_id, readings=batch.readings, bytes=len(batch.payload))
                self._summary[0] += 1
                self._summary[1] += batch.readings
                self._summary[2] += len(batch.payload)
                continue
            self._refused(life, batch, result)
        self.summarise()

    def summarise(self, force: bool = False) -> None:
        """Log what the cloud accepted since the last summary, once every SUMMARY_EVERY_S (or
        now, with `force`: the stop); nothing when nothing was published."""
        now = self._clock()
        if not force and now - self._summary_from < SUMMARY_EVERY_S:
            return
        batches, readings, size = self._summary
        if batches:
            log.info(
                "published", batches=batches, readings=readings, bytes=size, seconds=round(now - self._summary_from)
            )
        self._summary = [0, 0, 0]
        self._summary_from = now

    def flush(self, deadline: float) -> None:
        """Stopping: everything committed goes out now, if the cloud is there to take it.

        Batches backing off and a paused connection are respected; it returns by `deadline`
        (on this dispatcher's clock) less a second for the publisher to stop.
        """
        while self._clock() < deadline - 1.0:
            self.collect_results()
            if self.publisher.connected and self._clock() >= self._paused_until:
                formed = False
                while (
                    self._unsent(live=True) + self._unsent(live=False) + len(self._flying) < self.max_in_flight
                    and len(self._lives) < self.held_max
                ):
                    batch = self.batcher.form(live=True) or self.batcher.form(live=False)
                    if batch is None:
                        break
                    self._queue(batch)
                    formed = True
                # Intake has stopped: no commit of its will record what is formed, new or not.
                if formed or any(not life.batch.take.recorded for life in self._lives.values()):
                    self.buffer.settle(force=True)
                now = self._clock()
                for seq in self._waiting():
                    if len(self._flying) < self.max_in_flight:
                        self._send_waiting(seq, now)
            if not self._flying and (not self.publisher.connected or self.buffer.depth().uplinks == 0):
                break
            self._answered.wait(0.05)
            self._answered.clear()
        self.collect_results()
        self.summarise(force=True)

    # ---- a batch's life -------------------------------------------------------------------------

    def _queue(self, batch: Batch, not_before: float | None = None) -> Life:
        """The batch waits: queued, or backing off until `not_before`."""
        seq = batch.seq
        life = self._lives.setdefault(seq, Life(Stage.QUEUED, batch))
        self._flying.discard(seq)
        if not_before is None:
            life.stage, life.not_before = Stage.QUEUED, 0.0
        else:
            life.stage, life.not_before = Stage.BACKING_OFF, not_before
        return life

    def _forget(self, seq: int) -> None:
        """Batch `seq` is confirmed, or replaced by its parts or dead letters."""
        self._lives.pop(seq, None)
        self._flying.discard(seq)

    def _waiting(self) -> list[int]:
        """Seqs of the batches waiting to be sent: live first, then oldest first."""
        waiting = [seq for seq in self._lives if seq not in self._flying]
        return sorted(waiting, key=lambda seq: (not self._lives[seq].batch.take.live, seq))

    def _send_waiting(self, seq: int, now: float) -> None:
        """Send waiting batch `seq` if it is recorded and its time has come."""
        life = self._lives[seq]
        if not life.batch.take.recorded:
            return  # formed, not yet written: sent after the next commit
        if life.stage is Stage.BACKING_OFF and life.not_before > now:
            return
        self._send(life.batch)

    def _send(self, batch: Batch) -> None:
        life = self._lives.get(batch.seq)
        if life is None:
            life = self._lives[batch.seq] = Life(Stage.IN_FLIGHT, batch)
        life.stage = Stage.IN_FLIGHT
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
        size, now = len(batch.payload), self._clock()
        # Split a batch of many readings at once (it costs nothing); give up on one reading only
        # when the link's limit is known, or smaller messages are seen to pass.
        too_large = result.too_large and size > self._largest_accepted
        certain = result.limit is not None or self._largest_accepted > 0
        if too_large and (batch.readings > 1 or certain):
            self._split(batch, result)
            return
        if result.reason_code is None and not result.too_large and not self.publisher.connected:
            # Lost with the connection (the disconnect is logged): sent again once it is back.
            self._queue(batch)
            self.buffer.count("publish_failed")
            log.debug("batch lost with the connection; sent again when it is back", batch_id=batch.batch_id)
            return
        self.last_refusal = {"at_ms": now_ms(), "reason": str(result), "reason_code": result.reason_code}
        attempts = life.failures + 1
        backoff = min(MAX_BACKOFF_S, 2.0 ** min(attempts, 6))
        self._queue(batch, not_before=now + backoff).failures = attempts
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
        fits = max(MIN_SPLIT_BYTES, min(guess, size - 1, self.batcher.max_bytes))
        # A limit the broker announced is the link's; a guess is kept from going below the config's.
        learnt = fits if result.limit is not None else max(MIN_LEARNT_MAX_BYTES, fits)
        if learnt < self.batcher.max_bytes:
            log.info("the cloud takes smaller messages: batches are formed smaller", max_bytes=learnt)
            self.batcher.max_bytes = learnt
        reason = f"too large to publish: a message of {size} bytes holding only this reading was refused ({result})"
        try:
            parts, dead = self.batcher.split(batch, fits, reason=reason)
        except sqlite3.DatabaseError:
            self._results.put((batch.seq, result))  # still in flight: handled again later
            raise
        self._forget(batch.seq)
        self.buffer.count("publish_failed_too_large")
        for part in parts:
            self._queue(part)
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
                parts=len(parts),
                max_bytes=fits,
                reason=str(result),
            )
