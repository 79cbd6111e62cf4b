"""The daemon: wires sources -> intake -> buffer -> batches -> cloud, and runs the main loop.

Signal handlers only set flags (STYLE point 10); stopping, reloading, publishing, bounds and
systemd notifications all happen in the main loop, in this order of priority:

1. publish results: confirm accepted batches, keep and back off on refused ones;
2. live readings first: a live batch is formed when a reading has waited `max_delay` or the
   live readings fill a message;
3. the backlog drains oldest first in the in-flight slots left, one slot always kept for live.
"""

from __future__ import annotations

import queue
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

import structlog

from gateway.buffer import (
    Buffer,
    integrity_problems,
    is_damage,
    is_disk_full,
    is_storage_failure,
    mark_damaged,
    now_ms,
)
from gateway.cloud import CONNECTION_REFUSALS, Publisher, PublishResult
from gateway.cloud.directory import DirectoryPublisher
from gateway.config import Config, ConfigError, device_map_files, load_device_maps, load_settings
from gateway.config.settings import DirectoryCloud, Settings
from gateway.errors import BufferLostError
from gateway.intake import Intake
from gateway.model import Batch
from gateway.sources import RunningSource, build_sources, source_name
from gateway.systemd import Notifier

log = structlog.get_logger("gateway.service")

STOP_BUDGET_S = 5.0
BOUNDS_EVERY_S = 5.0
STATUS_EVERY_S = 10.0
MAX_BACKOFF_S = 60.0
#: The smallest batch.max_bytes a too-large refusal may teach the buffer when the link did not
#: announce its limit: the least the config allows, since intake also measures uplinks against
#: it. A link that takes less still gets everything, by splitting each batch it refuses.
MIN_LEARNT_MAX_BYTES = 4096
#: The smallest part a refused batch is split into (bytes of message).
MIN_SPLIT_BYTES = 256
SOURCES_READY_TIMEOUT_S = 10.0
#: A worker thread died of an exception nothing expected: systemd restarts the daemon.
EXIT_WORKER_DIED = 1
#: `run` exits with this when the buffer file is damaged; systemd restarts the daemon, and the
#: new start moves the file aside (it finds the marker) and begins a new buffer. Also after the
#: file was deleted under the daemon and its content written back: the restart carries on.
EXIT_BUFFER_DAMAGED = 3
#: The buffer cannot be written (read-only filesystem, I/O errors) or was lost and could not be
#: written back: restarting cannot help, so the unit does not restart on it
#: (RestartPreventExitStatus); `status` and the journal say why.
EXIT_STORAGE_FAILED = 4
#: A wall-clock step bigger than this between two turns of the main loop is logged.
CLOCK_JUMP_S = 30.0


def open_buffer(settings: Settings) -> Buffer:
    """The buffer as gateway.yaml configures it."""
    return Buffer(
        settings.buffer.path,
        gateway_id=settings.gateway.id,
        tenant_id=settings.gateway.tenant_id,
        site_id=settings.gateway.site_id,
        max_bytes=settings.batch.max_bytes,
        gzip=settings.batch.compression == "gzip",
        max_size=settings.buffer.max_size,
        max_age_s=settings.buffer.max_age,
        when_full=settings.buffer.when_full,
    )


def build_publisher(settings: Settings) -> Publisher:
    """The cloud gateway.yaml names."""
    cloud = settings.cloud
    if isinstance(cloud, DirectoryCloud):
        return DirectoryPublisher(cloud.directory)
    from gateway.cloud.iot_core import IotCorePublisher

    return IotCorePublisher(cloud, client_id=settings.gateway.id, topic=cloud.topic_for(settings.gateway))


class Service:
    """One running gateway."""

    def __init__(
        self,
        config: Config,
        publisher: Publisher | None = None,
        sources: Sequence[RunningSource] | None = None,
        buffer: Buffer | None = None,
    ) -> None:
        self.config = config
        s = config.settings
        self.settings = s
        self.buffer = buffer or open_buffer(s)
        self.publisher = publisher or build_publisher(s)
        self.intake = Intake(self.buffer, config.devices, {}, commit_interval_s=s.buffer.commit_interval)
        if sources is None:
            built, parsers = build_sources(s, self.intake.deliver)
            for i, source in enumerate(s.sources):
                name = source_name(s, i)
                self.intake.add_parser(name, parsers[name], source.max_message_size)
            self.sources: list[RunningSource] = list(built)
        else:
            self.sources = list(sources)
        self.notifier = Notifier()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._results: queue.Queue[tuple[int, PublishResult]] = queue.Queue()
        self._in_flight: dict[int, Batch] = {}
        #: Formed batches not in flight (seq -> not before, monotonic): unconfirmed at the last
        #: stop, refused, or packed from a long backlog. Payloads stay on disk until sent.
        self._outbox: dict[int, float] = {}
        self._epoch = -1
        #: Batches that failed (seq -> failed attempts, not before (monotonic)): each backs off
        #: alone, and is not sent again before its time whoever asks (`_send`).
        self._retries: dict[int, tuple[int, float]] = {}
        #: Refusals in a row that concern the whole connection (CONNECTION_REFUSALS): the pause.
        self._link_refusals = 0
        #: The largest message the cloud accepted: a refusal of a smaller one is not for its size.
        self._largest_accepted = 0
        self._paused_until = 0.0
        self._max_delay_s = s.batch.max_delay
        self.intake.on_commit = self._wake.set
        self.intake.on_damage = self._on_damage
        self.intake.on_lost = self._on_lost
        self.intake.on_died = self._wake.set
        self.published_batches = 0
        self.stopped = threading.Event()
        #: What `run` should exit with: 0, or EXIT_BUFFER_DAMAGED.
        self.exit_code = 0
        self._damage: str | None = None
        self._lost: str | None = None
        self._disk_trouble: str | None = None
        #: Wall-clock step seen last (seconds, + forward), for the bound that drops by age.
        self._clock_jump_s: float | None = None

    # ---- control (any thread, signal handlers) ---------------------------------------------

    def request_stop(self) -> None:
        """Ask the main loop to stop (safe from a signal handler)."""
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        """Ask the main loop to reload device maps (safe from a signal handler)."""
        self._reload.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads device maps; handlers only set flags."""

        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.request_reload()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    # ---- the main loop ---------------------------------------------------------------------

    def _on_damage(self, reason: str) -> None:
        """Any thread: SQLite found the buffer damaged; the main loop stops the daemon."""
        if self._damage is None:
            self._damage = reason
        self._stop.set()
        self._wake.set()

    def _on_lost(self, reason: str) -> None:
        """Any thread: the buffer file is gone or cannot be written; the main loop stops."""
        if self._lost is None:
            self._lost = reason
        self._stop.set()
        self._wake.set()

    def _check_integrity(self) -> None:
        """Background thread after READY: SQLite's quick_check of the whole file (read-only)."""
        started = time.monotonic()
        try:
            problems = integrity_problems(self.buffer.path)
        except Exception:  # a check that fails is not damage; say so and carry on
            log.exception("buffer integrity check failed to run")
            return
        if problems:
            self._on_damage("quick_check: " + "; ".join(problems[:5]))
        else:
            log.info("buffer integrity checked", seconds=round(time.monotonic() - started, 2))

    def run(self, progress: Callable[[Service], None] | None = None) -> None:
        """Start everything, loop until asked to stop, then stop cleanly within 5 s."""
        s = self.settings
        recovered = self.buffer.recovered
        if recovered is not None:
            log.critical(
                "BUFFER FILE DAMAGED: moved aside and a new, empty buffer started; readings not yet "
                "sent are in the moved file (sqlite3 FILE .recover may salvage them)",
                moved_to=str(recovered.moved_to),
                reason=recovered.reason,
            )
        for seq in self.buffer.pending_seqs():
            self._outbox[seq] = 0.0  # formed before the last stop: sent again, same bytes
        self.publisher.start()
        self.intake.start()
        for source in self.sources:
            source.start()
        # READY=1 means sources and buffer are up: wait for the subscriptions, but not forever,
        # so a local broker that is down does not hold systemd's start-up (we reconnect later),
        # and not past a stop request (SIGTERM must stop a daemon that is still starting).
        deadline = time.monotonic() + SOURCES_READY_TIMEOUT_S
        waiting = list(self.sources)
        log.debug("waiting for the local broker's subscriptions", sources=[src.name for src in waiting])
        while waiting and not self._stop.is_set() and time.monotonic() < deadline:
            waiting = [src for src in waiting if not src.wait_ready(0)]
            if waiting:
                self._stop.wait(0.05)
        if self._stop.is_set():
            log.info("stop requested while starting")
            self._shutdown()
            return
        if waiting:
            log.warning(
                "local broker not reachable yet; starting anyway and retrying", sources=[src.name for src in waiting]
            )
        depth = self.buffer.depth()
        log.info(
            "gateway started",
            gateway_id=s.gateway.id,
            devices=len(self.config.devices),
            sources=[src.name for src in self.sources],
            backlog_readings=depth.total_readings,
            unsent_batches=len(self._outbox),
        )
        self.notifier.notify("READY=1", f"STATUS={self._status_line()}")
        if not self.buffer.checked_at_open:
            threading.Thread(target=self._check_integrity, name="integrity-check", daemon=True).start()
        next_bounds = next_status = next_watchdog = time.monotonic()
        wall_minus_mono = time.time() - time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(0.25)
            self._wake.clear()
            now = time.monotonic()
            if not self.intake.alive:
                # No more WATCHDOG=1: a daemon whose intake is dead must not look healthy.
                self._stop_worker_died()
                return
            step = (time.time() - now) - wall_minus_mono
            if abs(step) > CLOCK_JUMP_S:
                self._clock_jump_s = step
                log.warning(
                    "wall clock stepped; sending is scheduled on the monotonic clock and is not affected, "
                    "readings are stamped with the new time",
                    step_s=round(step, 1),
                )
                wall_minus_mono += step
            if self._reload.is_set():
                self._reload.clear()
                try:
                    self.reload()
                except Exception:  # a reload must never stop a running gateway
                    log.exception("reload failed; keeping the running maps")
            try:
                self._collect_results()
                for seq in self.buffer.compact():
                    self._outbox[seq] = 0.0
                self._publish_due()
                if now >= next_bounds:
                    next_bounds = now + BOUNDS_EVERY_S
                    self._enforce_bounds()
                if now >= next_status:
                    next_status = now + STATUS_EVERY_S
                    self.notifier.notify(f"STATUS={self._status_line()}")
                    self.buffer.heartbeat()
                    if self._disk_trouble is not None:
                        log.info("buffer writable again", after=self._disk_trouble)
                        self._disk_trouble = None
            except sqlite3.DatabaseError as exc:
                self._buffer_error(exc)
            except BufferLostError as exc:
                self._on_lost(str(exc))
            if self.notifier.watchdog_interval_s is not None and now >= next_watchdog:
                next_watchdog = now + self.notifier.watchdog_interval_s
                self.notifier.notify("WATCHDOG=1")
            if progress is not None:
                progress(self)
        if self._lost is not None:
            self._stop_lost(self._lost)
            return
        if self._damage is not None:
            self._stop_damaged(self._damage)
            return
        self._shutdown()

    def _buffer_error(self, exc: sqlite3.DatabaseError) -> None:
        """The main loop could not use the buffer: damaged (stop), or full/failing (retry)."""
        if is_damage(exc):
            self._on_damage(str(exc))
            return
        if is_storage_failure(exc):
            self._on_lost(f"cannot write {self.buffer.path}: {exc}")
            return
        problem = "disk full" if is_disk_full(exc) else str(exc)
        if is_disk_full(exc):
            self.buffer.checkpoint()
        if self._disk_trouble != problem:
            self._disk_trouble = problem
            log.error(
                "cannot write the buffer; publishing and bounds wait, intake holds acknowledgements",
                error=str(exc),
                path=str(self.buffer.path),
            )
        self._paused_until = time.monotonic() + 1.0

    def _stop_intake_and_sources(self) -> None:
        """Intake first (it finishes and acks the group it is committing), then the sources;
        what was not acked stays with the local broker for our session."""
        self.intake.stop(timeout_s=1.5)
        for source in self.sources:
            try:
                source.stop()
            except Exception:
                log.exception("error stopping source", source=source.name)

    def _stop_damaged(self, reason: str) -> None:
        """Damage found while running: stop without touching the file; the restart moves it aside."""
        log.critical(
            "BUFFER FILE DAMAGED: stopping; the next start moves it aside and starts a new buffer",
            reason=reason,
            path=str(self.buffer.path),
        )
        self.notifier.notify("STOPPING=1", f"STATUS=buffer damaged: {reason}"[:200])
        self._stop_intake_and_sources()
        self.publisher.stop(timeout_s=1.0)
        try:
            mark_damaged(self.buffer.path, reason)
        except OSError:
            log.exception("cannot leave the damage marker", path=str(self.buffer.path))
        self.buffer.abandon()
        self.exit_code = EXIT_BUFFER_DAMAGED
        self.stopped.set()

    def _stop_worker_died(self) -> None:
        """A worker died of an unexpected exception: stop now, with a failure exit code, so
        systemd restarts the daemon (what was not acked is redelivered by the local broker)."""
        log.critical("a worker thread died; stopping so systemd restarts the daemon", worker="intake")
        self.notifier.notify("STOPPING=1", "STATUS=intake thread died; restarting")
        self._stop_intake_and_sources()
        self.publisher.stop(timeout_s=1.0)
        try:
            self.buffer.close()
        except Exception:
            log.exception("cannot close the buffer")
        self.exit_code = EXIT_WORKER_DIED
        self.stopped.set()

    def _stop_lost(self, reason: str) -> None:
        """The buffer file was deleted or replaced, or cannot be written: nothing more is acked.

        If the open database can still be read, its content is written back to the buffer's
        path (nothing acknowledged is lost) and the daemon exits to be restarted on it;
        otherwise it exits with a code systemd does not restart on, and says so loudly.
        """
        self.notifier.notify("STOPPING=1", f"STATUS=buffer lost: {reason}"[:200])
        self._stop_intake_and_sources()
        self.publisher.stop(timeout_s=1.0)
        rescued = self.buffer.rescue()  # fails, and returns None, where nothing can be written
        if rescued == self.buffer.path:
            log.critical(
                "BUFFER FILE LOST while running; its content was written back from the open file, "
                "restarting on it (nothing acknowledged was lost)",
                reason=reason,
                path=str(rescued),
            )
            self.exit_code = EXIT_BUFFER_DAMAGED
        else:
            log.critical(
                "BUFFER FILE LOST while running; intake stopped acknowledging; not restarting until "
                "someone looks (systemctl status hub-gateway)",
                reason=reason,
                path=str(self.buffer.path),
                rescued_to=str(rescued) if rescued else None,
            )
            self.exit_code = EXIT_STORAGE_FAILED
        self.stopped.set()

    def _publish_due(self) -> None:
        if not self.publisher.connected:
            return
        if self.publisher.epoch != self._epoch:
            # A new connection: what is stored now is backlog; what arrives from now is live.
            self._epoch = self.publisher.epoch
            self.buffer.mark_live()
        now = time.monotonic()
        if now < self._paused_until:
            return
        limit = self.settings.cloud.max_in_flight
        if len(self._in_flight) < limit and self.buffer.live_due(self._max_delay_s):
            while len(self._in_flight) < limit:
                batch = self.buffer.take(live=True)
                if batch is None:
                    break
                self._send(batch)
                if not self.buffer.live_due(self._max_delay_s):
                    break
        # The backlog, oldest first, may use all but one slot, so live readings never queue
        # behind it: formed batches first (same bytes again), then unbatched backlog uplinks.
        backlog_slots = max(1, limit - 1)
        for seq in sorted(self._outbox):
            if len(self._in_flight) >= backlog_slots:
                return
            if self._outbox[seq] <= now:
                del self._outbox[seq]
                formed = self.buffer.batch(seq)
                if formed is not None:  # None: dropped by a bound meanwhile
                    self._send(formed)
        while len(self._in_flight) < backlog_slots and self.buffer.depth(live=False).uplinks > 0:
            batch = self.buffer.take(live=False)
            if batch is None:
                break
            self._send(batch)

    def _send(self, batch: Batch) -> None:
        retry_at = self._retries.get(batch.seq, (0, 0.0))[1]
        if retry_at > time.monotonic():
            self._outbox[batch.seq] = retry_at  # still backing off: back to the outbox, unsent
            return
        self._in_flight[batch.seq] = batch
        self.publisher.publish(batch, self._on_published)

    def _on_published(self, seq: int, result: PublishResult) -> None:
        """Publisher threads: hand the result to the main loop."""
        self._results.put((seq, result))
        self._wake.set()

    def _collect_results(self) -> None:
        while True:
            try:
                seq, result = self._results.get_nowait()
            except queue.Empty:
                break
            batch = self._in_flight.pop(seq, None)
            if batch is None:
                continue
            if result.ok:
                try:
                    self.buffer.confirm(seq)
                except sqlite3.DatabaseError:
                    # Not confirmed yet (disk full, ...): keep it in flight and try again later.
                    self._in_flight[seq] = batch
                    self._results.put((seq, result))
                    raise
                self.published_batches += 1
                self._retries.pop(seq, None)
                self._link_refusals = 0
                self._largest_accepted = max(self._largest_accepted, len(batch.payload))
                log.debug("batch published", batch_id=batch.batch_id, readings=batch.readings, bytes=len(batch.payload))
                continue
            self._refused(batch, result)
        # Batches a bound dropped while they waited (neither queued nor in flight): forgotten.
        for seq in [s for s in self._retries if s not in self._outbox and s not in self._in_flight]:
            del self._retries[seq]

    def _refused(self, batch: Batch, result: PublishResult) -> None:
        """A batch the cloud did not take: split if too large, else retried after its own backoff.

        Only refusals that concern the connection (0x87, 0x97) pause all publishing; any other
        is this batch's, so one poisoned batch neither stops the rest nor is retried faster
        because others succeed. A batch that keeps failing is logged as a warning at attempts
        1, 2, 4, 8, ... and at debug otherwise, so it cannot flood the journal.
        """
        seq, size, now = batch.seq, len(batch.payload), time.monotonic()
        # Split a batch of many readings at once (it costs nothing); give up on one reading only
        # when the link's limit is known, or smaller messages are seen to pass.
        too_large = result.too_large and size > self._largest_accepted
        certain = result.limit is not None or self._largest_accepted > 0
        if too_large and (batch.readings > 1 or certain):
            self._split(batch, result)
            return
        if result.reason_code is None and not result.too_large and not self.publisher.connected:
            # Lost with the connection (the disconnect is logged): sent again once it is back.
            self._outbox[seq] = now
            self.buffer.count("publish_failed")
            log.debug("batch lost with the connection; sent again when it is back", batch_id=batch.batch_id)
            return
        attempts = self._retries.get(seq, (0, 0.0))[0] + 1
        backoff = min(MAX_BACKOFF_S, 2.0 ** min(attempts, 6))
        self._retries[seq] = (attempts, now + backoff)
        self._outbox[seq] = now + backoff
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
            self._in_flight[batch.seq] = batch  # as for a confirm: handled again later
            self._results.put((batch.seq, result))
            raise
        self._retries.pop(batch.seq, None)
        if not seqs and not dead:
            return  # dropped by a bound meanwhile
        self.buffer.count("publish_failed_too_large")
        for seq in seqs:
            self._outbox[seq] = 0.0
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

    def _enforce_bounds(self) -> None:
        gap = self.buffer.enforce_bounds(in_flight=list(self._in_flight))
        if gap is not None:
            fields = gap.log_fields()
            if self._clock_jump_s is not None and "max_age" in gap.reasons:
                # A Pi without an RTC that syncs NTP jumps forward: what was stamped before the
                # jump looks old. Say so, or the log blames the readings' age alone.
                fields["clock_jump_s"] = round(self._clock_jump_s, 1)
            log.warning("buffer bound reached: oldest readings dropped", **fields)

    def reload(self) -> None:
        """Reload device maps; a map that fails validation is rejected and the old one stays.

        gateway.yaml is read too, only to say what a reload does not do: a broken file (the
        next start would refuse it) and a changed one (a restart applies it) are logged.
        """
        try:
            on_disk = load_settings(self.config.path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error(
                    "gateway.yaml has problems: the running settings stay, but the next start will refuse it",
                    problem=str(problem),
                )
        else:
            if on_disk != self.settings:
                log.warning(
                    "gateway.yaml changed: a reload applies device maps only; restart to apply it "
                    "(systemctl restart hub-gateway)",
                    path=str(self.config.path),
                )
        try:
            devices = load_device_maps(device_map_files(self.config))
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("device map rejected; keeping the running maps", problem=str(problem))
            return
        for warning in devices.warnings:
            log.warning("device map: likely mistake", problem=str(warning))
        self.config = Config(self.config.path, self.settings, devices)
        self.intake.use_devices(devices)
        # The intake thread switches between two groups, then decodes dead letters of changed
        # devices and replays kept uplinks page by page; its "device maps in use" line counts them.
        log.info("device maps reloaded", devices=len(devices))

    def _status_line(self) -> str:
        depth = self.buffer.depth()
        cloud = "connected" if self.publisher.connected else "disconnected"
        line = (
            f"cloud {cloud}; backlog {depth.total_readings} readings; "
            f"{self.intake.stats.uplinks} uplinks in; {self.published_batches} batches out"
        )
        if self.intake.stats.blocked or self._disk_trouble:
            line += f"; INTAKE HELD ({self._disk_trouble or 'buffer full'})"
        if self.buffer.recovered is not None:
            line += f"; damaged buffer moved to {self.buffer.recovered.moved_to}"
        return line

    def _shutdown(self) -> None:
        deadline = time.monotonic() + STOP_BUDGET_S - 0.5
        self.notifier.notify("STOPPING=1")
        log.info("stopping: intake first, then flushing what is committed")
        self._stop_intake_and_sources()
        try:
            self._flush(deadline)
        except sqlite3.DatabaseError as exc:
            log.error("cannot flush the buffer while stopping; unsent readings stay stored", error=str(exc))
        self.publisher.stop(timeout_s=max(0.1, deadline - time.monotonic()))
        try:
            self._collect_results()
        except sqlite3.DatabaseError as exc:
            log.error("cannot confirm the last batches; they are sent again at the next start", error=str(exc))
        depth = self.buffer.depth()
        self.buffer.close()
        log.info("stopped", unsent_readings=depth.total_readings, at_ms=now_ms())
        self.stopped.set()

    def _flush(self, deadline: float) -> None:
        """Stopping: everything committed goes out now, if the cloud is there to take it."""
        while time.monotonic() < deadline - 1.0:
            self._collect_results()
            if self.publisher.connected and time.monotonic() >= self._paused_until:
                now = time.monotonic()
                for seq in sorted(self._outbox):
                    if len(self._in_flight) < self.settings.cloud.max_in_flight and self._outbox[seq] <= now:
                        del self._outbox[seq]
                        formed = self.buffer.batch(seq)
                        if formed is not None:
                            self._send(formed)
                while len(self._in_flight) < self.settings.cloud.max_in_flight:
                    batch = self.buffer.take(live=True) or self.buffer.take(live=False)
                    if batch is None:
                        break
                    self._send(batch)
            if not self._in_flight and (not self.publisher.connected or self.buffer.depth().uplinks == 0):
                break
            self._wake.wait(0.05)
            self._wake.clear()
        self._collect_results()
