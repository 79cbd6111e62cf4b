"""One snapshot of the running daemon's state: what the Prometheus metrics read (and, later, the
health message). Built on demand from the stages' own answers (buffer, intake stats,
dispatcher, publisher), never from their internals, and never a write to the buffer.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.buffer import Buffer, now_ms

if TYPE_CHECKING:
    from gateway.cloud import Publisher
    from gateway.dispatch import Dispatcher
    from gateway.intake import IntakeStats

#: The intake rate behind the runway is measured over this window.
RATE_WINDOW_S = 300.0


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
    #: PUBACK refusals by reason code (0x87, 0x97, ...), and failures without a code.
    refusals: dict[int, int]
    publish_failures: int
    dropped_readings: int
    backlog_readings: int
    backlog_bytes: int
    oldest_unsent_age_s: float | None
    in_flight: int
    cloud_connected: bool
    last_publish_age_s: float | None
    #: Seconds until the buffer reaches max_size at the recent intake rate (inf: no intake).
    runway_s: float
    #: device ("dev_eui:..." / "osm_id:...") -> (sensor_id or None, last seen ms), heard since start.
    devices: dict[str, tuple[str | None, int]] = field(default_factory=dict)


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
        self._samples: deque[tuple[float, int]] = deque()

    def _intake_rate(self) -> float:
        """Bytes stored per second over the last RATE_WINDOW_S (0 until two samples differ in time)."""
        now, stored = self._monotonic(), self.buffer.stored_bytes_total
        with self._lock:
            self._samples.append((now, stored))
            while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
                self._samples.popleft()
            first_t, first_bytes = self._samples[0]
        return (stored - first_bytes) / (now - first_t) if now > first_t else 0.0

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
        rate = self._intake_rate()
        room = max(0, self.buffer.max_size - self.buffer.bytes_on_disk)
        return Snapshot(
            at_ms=at,
            uplinks=self.stats.uplinks,
            readings=self.stats.readings,
            dead_letters=self.stats.dead_letters,
            unmapped=self.stats.unmapped,
            duplicates=self.stats.duplicates,
            foreign_tenant=self.stats.foreign,
            publishes=self.dispatcher.published_batches,
            refusals=refusals,
            publish_failures=counted.get("publish_failed", 0) + counted.get("publish_failed_too_large", 0),
            dropped_readings=counted.get("dropped_readings", 0),
            backlog_readings=depth.total_readings,
            backlog_bytes=depth.total_bytes,
            oldest_unsent_age_s=None if oldest is None else max(0.0, (at - oldest) / 1000),
            in_flight=self.dispatcher.in_flight,
            cloud_connected=self.publisher.connected,
            last_publish_age_s=None if last_publish is None else max(0.0, (at - last_publish) / 1000),
            runway_s=room / rate if rate > 0 else math.inf,
            devices=self.buffer.last_seen(),
        )
