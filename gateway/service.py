"""The daemon: wires sources -> intake -> buffer -> dispatcher -> cloud, and runs the main loop.

Signal handlers only set flags (STYLE point 10); stopping, reloading, publishing, bounds and
systemd notifications all happen in the main loop. Each turn settles publish results, forms
and sends what is due (the dispatcher: live first, then the backlog oldest first), then keeps
the bounds, the status line and the watchdog.
"""

from __future__ import annotations

import functools
import math
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

import structlog

from gateway.batching import Batcher, Ids, to_record
from gateway.buffer import (
    Buffer,
    integrity_problems,
    is_damage,
    is_disk_full,
    is_storage_failure,
    mark_damaged,
    now_ms,
)
from gateway.cli import version
from gateway.cloud import Publisher, Will, build_publisher
from gateway.config import Config, ConfigError, device_map_files, load_device_maps, load_settings
from gateway.config.settings import IotCoreCloud, Settings
from gateway.dispatch import Dispatcher
from gateway.errors import BufferLostError, DiskFullError
from gateway.health import CONTENT_TYPE as HEALTH_CONTENT_TYPE
from gateway.health import Health, HealthSender, offline_message
from gateway.intake import Intake
from gateway.metrics import MetricsServer
from gateway.model import DeviceKey
from gateway.report import Reporter
from gateway.sources import RunningSource, build_sources, source_name
from gateway.systemd import Notifier
from gateway.watch import WatchServer, socket_path

log = structlog.get_logger("gateway.service")

STOP_BUDGET_S = 5.0
#: The main loop sleeps at most this long: what it polls (the cloud link coming up, a clock
#: step) is seen within it; everything else wakes it or has a deadline it sleeps until.
MAX_TURN_S = 1.0
#: The sleep when something is due that the last turn could not do.
RETRY_TURN_S = 0.25
BOUNDS_EVERY_S = 5.0
STATUS_EVERY_S = 10.0
#: The buffer's heartbeat (device counters and totals for `status`) is a write to flash: once a
#: minute, not with every status line.
#: Devices' latest values, intervals and last outcomes are written with every other heartbeat,
#: and at least this often (and at stop): with every heartbeat they would cost several times
#: the counters (docs/benchmarks.md).
DETAILS_EVERY_S = 60.0
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
#: A reload's log line names this many added, removed and changed devices each.
RELOAD_NAMED = 50


def open_buffer(settings: Settings) -> Buffer:
    """The buffer as gateway.yaml configures it."""
    return Buffer(
        settings.buffer.path,
        max_size=settings.buffer.max_size,
        max_age_s=settings.buffer.max_age,
        when_full=settings.buffer.when_full,
    )


def _at_most(names: list[str], count: int) -> list[str]:
    """The first `count` names, and how many more there are."""
    return names if len(names) <= count else [*names[:count], f"... and {len(names) - count} more"]


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
        self.started_ms = now_ms()
        health_topic = s.health.topic_for(s.gateway)
        will = Will(
            health_topic, offline_message(s, version(), self.started_ms), HEALTH_CONTENT_TYPE, int(s.health.will_delay)
        )
        self.publisher = publisher or build_publisher(s, will)
        gzip = s.batch.compression == "gzip"
        self.batcher = Batcher(
            self.buffer, Ids(s.gateway.id, s.gateway.tenant_id, s.gateway.site_id), s.batch.max_bytes, gzip
        )
        self.intake = Intake(
            self.buffer,
            config.devices,
            {},
            commit_interval_s=s.buffer.commit_interval,
            encode=functools.partial(to_record, max_bytes=s.batch.max_bytes, compress=gzip),
        )
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
        self.dispatcher = Dispatcher(
            self.batcher,
            self.publisher,
            max_in_flight=s.cloud.max_in_flight,
            max_delay_s=s.batch.max_delay,
            on_result=self._wake.set,
            intake_idle=lambda: self.intake.idle,
        )
        self.intake.on_commit = self._after_commit
        #: When the main loop's current sleep ends (monotonic; inf while it works out the next).
        self._sleep_until = math.inf
        self.intake.on_damage = self._on_damage
        self.intake.on_lost = self._on_lost
        self.intake.on_died = self._wake.set
        # `hub-gateway watch`: what intake committed, streamed to whoever watches.
        self.watch = WatchServer(socket_path(s.buffer.path), sensor_of=self._sensor_of, device_of=self._device_of)
        self.intake.on_stored = self.watch.publish
        self.stopped = threading.Event()
        #: What `run` should exit with: 0, or EXIT_BUFFER_DAMAGED.
        self.exit_code = 0
        self._damage: str | None = None
        self._lost: str | None = None
        self._disk_trouble: str | None = None
        #: Wall-clock step seen last (seconds, + forward), for the bound that drops by age.
        self._clock_jump_s: float | None = None
        self.reporter = Reporter(self.buffer, self.intake.stats, self.dispatcher, self.publisher)
        # A device not heard since this start is judged silent by its usual interval from before.
        self.health = Health(
            config, self.reporter, version=version(), started_ms=self.started_ms, before=self.buffer.heard_before()
        )
        self.health_sender = HealthSender(self.health, self.publisher, health_topic, s.health.interval)
        self.metrics: MetricsServer | None = None
        if s.metrics is not None:
            self.metrics = MetricsServer(s.metrics.host, s.metrics.port, self.reporter.snapshot)
        #: The cloud link as `status` shows it: up or down, and since when (wall ms).
        self._link: tuple[bool, int] | None = None
        self._health_failed = False

    def _after_commit(self) -> None:
        """Intake's thread, after each commit: wake the main loop only when the commit gave the
        dispatcher work before the loop's own next deadline (a formed batch is now recorded,
        live readings fill a message, or live readings began waiting and are due sooner than
        the loop sleeps). At a site's steady load most commits need no turn of the loop."""
        d = self.dispatcher
        if d.awaiting_commit or d.live_due_now():
            self._wake.set()
            return
        due = self.batcher.live_due_in(d.max_delay_s)
        if due is not None and time.monotonic() + due < self._sleep_until:
            self._wake.set()

    def _sensor_of(self, device: DeviceKey) -> str | None:
        """The sensor_id the running maps give a device (for watch events that do not say)."""
        mapped = self.intake.devices.get(device)
        return mapped.entry.sensor_id if mapped is not None else None

    def _device_of(self, sensor_id: str) -> DeviceKey | None:
        """The device the running maps give a sensor_id (for watch's near-miss hint; rare)."""
        for key, mapped in self.intake.devices.by_key.items():
            if mapped.entry.sensor_id == sensor_id:
                return key
        return None

    @property
    def published_batches(self) -> int:
        """Batches the cloud accepted since start."""
        return self.dispatcher.published_batches

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
        self.buffer.note_state("started_ms", self.started_ms)
        self._note_devices()
        self._note_cloud()
        if self.metrics is not None:
            try:
                self.metrics.start()
            except OSError as exc:  # metrics are for people watching; the data flows without them
                log.error("cannot serve metrics", listen=s.metrics.listen if s.metrics else None, error=str(exc))
                self.metrics = None
        self.publisher.start()
        self.watch.start()
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
        cloud = s.cloud
        log.info(
            "gateway started",
            version=version(),
            gateway_id=s.gateway.id,
            devices=len(self.config.devices),
            sources=[src.name for src in self.sources],
            cloud=cloud.kind,
            endpoint=f"{cloud.endpoint}:{cloud.port}" if isinstance(cloud, IotCoreCloud) else str(cloud.directory),
            topic=cloud.topic_for(s.gateway),
            backlog_readings=depth.total_readings,
        )
        if self.buffer.migrated:
            log.info("buffer carried over to the new format", detail=self.buffer.migrated)
        self.notifier.notify("READY=1", f"STATUS={self._status_line()}")
        if not self.buffer.checked_at_open:
            threading.Thread(target=self._check_integrity, name="integrity-check", daemon=True).start()
        next_bounds = next_status = next_watchdog = next_heartbeat = next_details = time.monotonic()
        wall_minus_mono = time.time() - time.monotonic()
        wait_s = 0.0
        while not self._stop.is_set():
            self._wake.wait(wait_s)
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
                self.dispatcher.collect_results()
                self.buffer.settle()
                self.dispatcher.publish_due()
                self._health()
                if now >= next_bounds:
                    next_bounds = now + BOUNDS_EVERY_S
                    self._enforce_bounds()
                if now >= next_status:
                    next_status = now + STATUS_EVERY_S
                    self.notifier.notify(f"STATUS={self._status_line()}")
                # While the buffer could not be written, try every status turn to learn it can again.
                if now >= next_heartbeat or (self._disk_trouble is not None and now + STATUS_EVERY_S >= next_status):
                    next_heartbeat = now + self.settings.buffer.status_interval
                    self._note_cloud()
                    details = now >= next_details
                    if details:
                        next_details = now + min(DETAILS_EVERY_S, 2 * self.settings.buffer.status_interval)
                    self.buffer.heartbeat(details=details, every_s=self.settings.buffer.status_interval)
                    if self._disk_trouble is not None:
                        log.info("buffer writable again", after=self._disk_trouble)
                        self._disk_trouble = None
            except (sqlite3.DatabaseError, DiskFullError) as exc:
                # Disk full: every write of the main loop (heartbeat, recording a message,
                # deleting confirmed readings) may meet it, not only intake's.
                self._buffer_error(exc)
            except BufferLostError as exc:
                self._on_lost(str(exc))
            if self.notifier.watchdog_interval_s is not None and now >= next_watchdog:
                next_watchdog = now + self.notifier.watchdog_interval_s
                self.notifier.notify("WATCHDOG=1")
            if progress is not None:
                progress(self)
            timers = [next_bounds, next_status, next_heartbeat]
            if self.notifier.watchdog_interval_s is not None:
                timers.append(next_watchdog)
            health_at = self.health_sender.due_at()
            if health_at is not None:
                timers.append(health_at)
            self._sleep_until = math.inf  # a commit meanwhile wakes the loop if it brought live readings
            wait_s = self._sleep_for(timers)
            self._sleep_until = time.monotonic() + wait_s
        if self._lost is not None:
            self._stop_lost(self._lost)
            return
        if self._damage is not None:
            self._stop_damaged(self._damage)
            return
        self._shutdown()

    def _health(self) -> None:
        """The health message when due. What it cannot read of the buffer is the buffer's
        trouble (raised); anything else is logged and the data flows on without it."""
        try:
            self.health_sender.tick()
        except (sqlite3.DatabaseError, DiskFullError, BufferLostError):
            raise
        except Exception:
            if not self._health_failed:
                log.exception("cannot build or publish the health message")
            self._health_failed = True
        else:
            self._health_failed = False

    def _sleep_for(self, timers: list[float]) -> float:
        """Seconds the main loop may sleep: until the first of its timers (monotonic times) or
        of the dispatcher's and the buffer's own deadlines, at most MAX_TURN_S. Commits, publish
        results, signals and a dead worker wake it sooner; at a site's steady load it turns
        about once a commit, not four times a second."""
        now = time.monotonic()
        waits = [MAX_TURN_S, *(t - now for t in timers)]
        for due in (self.dispatcher.due_in(), self.buffer.settle_due_in()):
            if due is not None:
                waits.append(due)
        wait = min(waits)
        # Due already: what this turn could not do (a write the disk refused, a batch with no
        # slot). Retried after a short sleep, not in a busy loop.
        return wait if wait > 0 else RETRY_TURN_S

    def _buffer_error(self, exc: sqlite3.DatabaseError | DiskFullError) -> None:
        """The main loop could not use the buffer: damaged (stop), or full/failing (retry)."""
        if isinstance(exc, sqlite3.DatabaseError) and is_damage(exc):
            self._on_damage(str(exc))
            return
        if isinstance(exc, sqlite3.DatabaseError) and is_storage_failure(exc):
            self._on_lost(f"cannot write {self.buffer.path}: {exc}")
            return
        full = isinstance(exc, DiskFullError) or is_disk_full(exc)
        problem = "disk full" if full else str(exc)
        if full:
            self.buffer.checkpoint()
        if self._disk_trouble != problem:
            self._disk_trouble = problem
            log.error(
                "cannot write the buffer; publishing and bounds wait, intake holds acknowledgements",
                error=str(exc),
                path=str(self.buffer.path),
            )
        self.dispatcher.pause(1.0)

    def _stop_intake_and_sources(self) -> None:
        """Intake first (it finishes and acks the group it is committing), then the sources;
        what was not acked stays with the local broker for our session."""
        self.intake.stop(timeout_s=1.5)
        self.watch.stop()
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
        self.publisher.stop(timeout_s=1.0, send_will=True)
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
        self.publisher.stop(timeout_s=1.0, send_will=True)
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
        self.publisher.stop(timeout_s=1.0, send_will=True)
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

    def _enforce_bounds(self) -> None:
        gap = self.buffer.enforce_bounds()
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
        changes = devices.changes_from(self.config.devices)
        self.config = Config(self.config.path, self.settings, devices)
        self.intake.use_devices(devices)
        self.health.use(self.config)
        self._note_devices()
        # The intake thread switches between two groups, then decodes dead letters of changed
        # devices and replays kept uplinks page by page; its "device maps in use" line counts them.
        log.info(
            "device maps reloaded",
            devices=len(devices),
            # Named up to RELOAD_NAMED each (a site's whole map replaced would flood the line).
            **{what: _at_most(names, RELOAD_NAMED) for what, names in changes.items()},
        )

    def _note_devices(self) -> None:
        """The devices this daemon runs with, for `status` while a map on disk is broken."""
        self.buffer.note_state(
            "devices",
            [
                {"device": str(key), "sensor_id": m.entry.sensor_id, "codec": m.entry.codec, "where": m.where}
                for key, m in sorted(self.config.devices.by_key.items(), key=lambda item: str(item[0]))
            ],
        )

    def _note_cloud(self) -> None:
        """The cloud link for `status`: up or down and since when, and the last error with its
        reason code (a connection refused or dropped, or a publish refused)."""
        connected = self.publisher.connected
        if self._link is None or self._link[0] != connected:
            # Since the change itself where the publisher knows it, not since this heartbeat.
            changed = getattr(self.publisher, "link_changed_ms", None)
            self._link = (connected, changed if changed is not None else now_ms())
        errors = []
        if getattr(self.publisher, "last_error", None):
            errors.append(
                {
                    "at_ms": getattr(self.publisher, "last_error_ms", None),
                    "reason": self.publisher.last_error,  # type: ignore[attr-defined]
                    "reason_code": getattr(self.publisher, "last_error_code", None),
                }
            )
        if self.dispatcher.last_refusal is not None:
            errors.append(dict(self.dispatcher.last_refusal))
        last = max(errors, key=lambda e: e["at_ms"] or 0) if errors else None
        self.buffer.note_state("cloud", {"connected": connected, "since_ms": self._link[1], "last_error": last})

    def _status_line(self) -> str:
        depth = self.buffer.depth()
        cloud = "connected" if self.publisher.connected else "disconnected"
        line = (
            f"cloud {cloud}; backlog {depth.total_readings} readings; "
            f"{self.intake.stats.uplinks} uplinks in; {self.dispatcher.published_batches} batches out"
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
            self.dispatcher.flush(deadline)
        except (sqlite3.DatabaseError, DiskFullError) as exc:
            log.error("cannot flush the buffer while stopping; unsent readings stay stored", error=str(exc))
        stopped_said = False
        try:  # the retained health message says the gateway stopped on purpose
            stopped_said = self.health_sender.stop(deadline)
        except Exception:
            log.exception("cannot publish the stopped health message")
        # Unless `stopped` was accepted (a backlog drain may hold it behind paced batches), the
        # DISCONNECT asks for the will (`offline`): a clean DISCONNECT would discard it and leave
        # the running gateway's `online` retained.
        self.publisher.stop(timeout_s=max(0.1, deadline - time.monotonic()), send_will=not stopped_said)
        try:
            self.dispatcher.collect_results()
        except sqlite3.DatabaseError as exc:
            log.error("cannot confirm the last batches; they are sent again at the next start", error=str(exc))
        depth = self.buffer.depth()
        try:  # what `status` shows after the stop: the link as it ended
            self._note_cloud()
            self.buffer.heartbeat()
        except (sqlite3.Error, BufferLostError) as exc:
            log.error("cannot write the last heartbeat", error=str(exc))
        self.buffer.close()
        if self.metrics is not None:
            self.metrics.stop()
        log.info("stopped", unsent_readings=depth.total_readings, at_ms=now_ms())
        self.stopped.set()
