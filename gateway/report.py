"""One snapshot of the running daemon's state: what the Prometheus metrics and the health
message read. Built on demand from the stages' own answers (buffer, intake stats, dispatcher,
publisher), never from their internals, and never a write to the buffer.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.buffer import Buffer, Heard, now_ms
from gateway.buffer.files import WAL_ALLOWANCE
from gateway.buffer.room import DRAIN_RESERVE

if TYPE_CHECKING:
    from gateway.cloud import Publisher
    from gateway.dispatch import Dispatcher
    from gateway.intake import IntakeStats

#: The intake rate behind the runway is measured over this window (issue 13: 15 minutes).
RATE_WINDOW_S = 900.0
#: A device is overdue (`status`: late; health: silent) when not heard for this many of its
#: usual intervals, and for at least LATE_MIN_S more than one.
LATE_INTERVALS = 3
LATE_MIN_S = 60


def overdue_after_s(interval_s: float) -> float:
    """Seconds without an uplink after which a device that usually sends every `interval_s` is
    overdue: three intervals, and at least a minute more than one (1 Hz clamps are not overdue
    after 3 s of radio noise)."""
    return max(LATE_INTERVALS * interval_s, interval_s + LATE_MIN_S)


@dataclass(frozen=True)
class Snapshot:
    """The daemon's state at one moment. Counts are since the daemon started; ages in seconds."""

    at_ms: int
    uplinks: int
    readings: int
    dead_letters: int
    unmapped: int
    duplicates: int
    foreign_tenant: int
    publishes: int
    published_readings: int
    #: PUBACK refusals by reason code (0x87, 0x97, ...), and failures without a code.
    refusals: dict[int, int]
    publish_failures: int
    dropped_readings: int
    backlog_readings: int
    backlog_bytes: int
    oldest_unsent_age_s: float | None
    in_flight: int
    cloud_connected: bool
    #: Connections made to the cloud since start (the first one and each reconnect).
    connections: int
    last_publish_age_s: float | None
    #: What `max_size` bounds (stored chunks, dead letters, unmapped uplinks), and the bound.
    buffer_bytes: int
    max_size: int
    disk_free_bytes: int
    #: Intake over the last RATE_WINDOW_S: bytes stored and readings a second.
    intake_bytes_per_s: float
    intake_readings_per_s: float
    #: Seconds until the buffer reaches max_size or fills the disk, whichever comes first, if
    #: intake went on at its recent rate and nothing drained (inf: no intake).
    runway_s: float
    #: Which comes first: "max_size" or "disk" (None with no intake).
    runway_limit: str | None
    #: device ("dev_eui:..." / "osm_id:...") -> what was heard of it since start.
    devices: dict[str, Heard] = field(default_factory=dict)


def runway(room: int, disk_room: int, bytes_per_s: float) -> tuple[float, str | None]:
    """Seconds until `room` (to max_size) or `disk_room` runs out at `bytes_per_s`, and which."""
    if bytes_per_s <= 0:
        return math.inf, None
    if disk_room < room:
        return disk_room / bytes_per_s, "disk"
    return room / bytes_per_s, "max_size"


class Reporter:
    """Builds snapshots; keeps the few intake samples the runway needs. Thread-safe."""

    def __init__(
        self,
        buffer: Buffer,
        stats: IntakeStats,
        dispatcher: Dispatcher,
        publisher: Publisher,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.buffer = buffer
        self.stats = stats
        self.dispatcher = dispatcher
        self.publisher = publisher
        self._monotonic = monotonic
        self._lock = threading.Lock()
        #: (monotonic s, bytes stored since open, readings stored since start)
        self._samples: deque[tuple[float, int, int]] = deque()

    def _intake_rates(self) -> tuple[float, float]:
        """Bytes and readings stored a second over the last RATE_WINDOW_S (0 until two samples
        differ in time). Every snapshot is a sample; the oldest kept is at most the window old."""
        now, stored, readings = self._monotonic(), self.buffer.stored_bytes_total, self.stats.readings
        with self._lock:
            self._samples.append((now, stored, readings))
            while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
                self._samples.popleft()
            first_t, first_bytes, first_readings = self._samples[0]
        if now <= first_t:
            return 0.0, 0.0
        return (stored - first_bytes) / (now - first_t), (readings - first_readings) / (now - first_t)

    def snapshot(self) -> Snapshot:
        """The state now."""
        at = now_ms()
        depth = self.buffer.depth()
        counted = dict(self.buffer.counted)
        refusals = {
            int(name.removeprefix("puback_refused_"), 16): n
            for name, n in counted.items()
            if name.startswith("puback_refused_")
        }
        oldest = self.buffer.oldest_unsent_ms()
        last_publish = self.buffer.last_publish_ms
        bytes_per_s, readings_per_s = self._intake_rates()
        held = self.buffer.bytes_on_disk
        free = self.buffer.disk_free()
        # The buffer keeps the WAL's growth and the drain's reserve free (gateway.buffer.room).
        seconds, limit = runway(
            max(0, self.buffer.max_size - held), max(0, free - WAL_ALLOWANCE - DRAIN_RESERVE), bytes_per_s
        )
        return Snapshot(
            at_ms=at,
            uplinks=self.stats.uplinks,
            readings=self.stats.readings,
            dead_letters=self.stats.dead_letters,
            unmapped=self.stats.unmapped,
            duplicates=self.stats.duplicates,
            foreign_tenant=self.stats.foreign,
            publishes=self.dispatcher.published_batches,
            published_readings=self.dispatcher.published_readings,
            refusals=refusals,
            publish_failures=counted.get("publish_failed", 0) + counted.get("publish_failed_too_large", 0),
            dropped_readings=counted.get("dropped_readings", 0),
            backlog_readings=depth.total_readings,
            backlog_bytes=depth.total_bytes,
            oldest_unsent_age_s=None if oldest is None else max(0.0, (at - oldest) / 1000),
            in_flight=self.dispatcher.in_flight,
            cloud_connected=self.publisher.connected,
            connections=self.publisher.epoch,
            last_publish_age_s=None if last_publish is None else max(0.0, (at - last_publish) / 1000),
            buffer_bytes=held,
            max_size=self.buffer.max_size,
            disk_free_bytes=free,
            intake_bytes_per_s=bytes_per_s,
            intake_readings_per_s=readings_per_s,
            runway_s=seconds,
            runway_limit=limit,
            devices=self.buffer.heard(),
        )
