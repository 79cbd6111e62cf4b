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
    mark_damaged,
    now_ms,
)
from gateway.cloud import Publisher, PublishResult
from gateway.cloud.directory import DirectoryPublisher
from gateway.config import Config, ConfigError, device_map_files, load_device_maps
from gateway.config.settings import DirectoryCloud, Settings
from gateway.intake import Intake
from gateway.model import Batch
from gateway.sources import RunningSource, build_sources
from gateway.systemd import Notifier

log = structlog.get_logger("gateway.service")

STOP_BUDGET_S = 5.0
BOUNDS_EVERY_S = 5.0
STATUS_EVERY_S = 10.0
MAX_BACKOFF_S = 60.0
SOURCES_READY_TIMEOUT_S = 10.0
#: `run` exits with this when the buffer file is damaged; systemd restarts the daemon, and the
#: new start moves the file aside (it finds the marker) and begins a new buffer.
EXIT_BUFFER_DAMAGED = 3


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
            for name, parser in parsers.items():
                self.intake.add_parser(name, parser)
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
        self._failures = 0
        self._paused_until = 0.0
        self._max_delay_ms = int(s.batch.max_delay * 1000)
        self.intake.on_commit = self._wake.set
        self.intake.on_damage = self._on_damage
        self.published_batches = 0
        self.stopped = threading.Event()
        #: What `run` should exit with: 0, or EXIT_BUFFER_DAMAGED.
        self.exit_code = 0
        self._damage: str | None = None
        self._disk_trouble: str | None = None

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

    def _check_integrity(self) -> None:
        """Background thread after READY: SQLite's quick_check of the whole file (read-only)."""
        started = time.monotonic()
        problems = integrity_problems(self.buffer.path)
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
        # so a local broker that is down does not hold systemd's start-up (we reconnect later).
        deadline = time.monotonic() + SOURCES_READY_TIMEOUT_S
        waiting = [src.name for src in self.sources if not src.wait_ready(max(0.0, deadline - time.monotonic()))]
        if waiting:
            log.warning("local broker not reachable yet; starting anyway and retrying", sources=waiting)
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
        while not self._stop.is_set():
            self._wake.wait(0.25)
            self._wake.clear()
            now = time.monotonic()
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
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
            if self.notifier.watchdog_interval_s is not None and now >= next_watchdog:
                next_watchdog = now + self.notifier.watchdog_interval_s
                self.notifier.notify("WATCHDOG=1")
            if progress is not None:
                progress(self)
        if self._damage is not None:
            self._stop_damaged(self._damage)
            return
        self._shutdown()

    def _buffer_error(self, exc: sqlite3.DatabaseError) -> None:
        """The main loop could not use the buffer: damaged (stop), or full/failing (retry)."""
        if is_damage(exc):
            self._on_damage(str(exc))
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
        self.exit_code = EXIT_BUFFER_DAMAGED
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
        if len(self._in_flight) < limit and self.buffer.live_due(self._max_delay_ms):
            while len(self._in_flight) < limit:
                batch = self.buffer.take(live=True)
                if batch is None:
                    break
                self._send(batch)
                if not self.buffer.live_due(self._max_delay_ms):
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
                return
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
                self._failures = 0
                log.debug("batch published", batch_id=batch.batch_id, readings=batch.readings, bytes=len(batch.payload))
                continue
            self._failures += 1
            backoff = min(MAX_BACKOFF_S, 2.0 ** min(self._failures, 6))
            self._outbox[seq] = time.monotonic() + backoff
            if result.reason_code is not None:
                # IoT Core said no (not authorized, quota exceeded, ...): pause all publishing.
                self._paused_until = time.monotonic() + backoff
                self.buffer.count(f"puback_refused_{result.reason_code:#04x}")
            else:
                self.buffer.count("publish_failed")
            log.warning(
                "batch not accepted; kept for retry",
                batch_id=batch.batch_id,
                reason=str(result),
                retry_in_s=backoff,
            )

    def _enforce_bounds(self) -> None:
        gap = self.buffer.enforce_bounds(in_flight=list(self._in_flight))
        if gap is not None:
            log.warning("buffer bound reached: oldest readings dropped", **gap.log_fields())

    def reload(self) -> None:
        """Reload device maps; a map that fails validation is rejected and the old one stays."""
        try:
            devices = load_device_maps(device_map_files(self.config))
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("device map rejected; keeping the running maps", problem=str(problem))
            return
        self.intake.devices = devices
        self.config = Config(self.config.path, self.settings, devices)
        log.info("device maps reloaded", devices=len(devices))
        self.intake.replay_unmapped()

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
                for seq in sorted(self._outbox):
                    if len(self._in_flight) < self.settings.cloud.max_in_flight:
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
