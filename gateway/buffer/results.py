"""The buffer's answers: what a store did, how much waits, and what a bound dropped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Heard(NamedTuple):
    """A device heard since the start: what health and metrics report of it."""

    sensor_id: str | None
    last_seen_ms: int
    #: Its usual interval, learned from the data's own times (None until two uplinks).
    interval_ms: int | None
    readings: int
    dead_letters: int


@dataclass
class Depth:
    """How much is waiting: records not yet taken, plus those taken and not yet confirmed."""

    readings: int = 0
    bytes: int = 0
    uplinks: int = 0
    batches: int = 0
    batch_readings: int = 0
    batch_bytes: int = 0
    #: Live only: when (monotonic seconds) the oldest live uplink was stored. Scheduling uses
    #: this, never wall time, so a clock step cannot hold back or rush live readings.
    since: float | None = None

    @property
    def total_readings(self) -> int:
        """Every reading not yet confirmed by the cloud."""
        return self.readings + self.batch_readings

    @property
    def total_bytes(self) -> int:
        """Payload bytes waiting (uncompressed), taken or not."""
        return self.bytes + self.batch_bytes


@dataclass
class StoreResult:
    """What one `store` call did."""

    stored: int = 0
    readings: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    unmapped: int = 0
    foreign: int = 0
    logs: int = 0
    dropped: Gap | None = None  # drop-oldest made room for this group
    taken: int = 0  # how many outcomes, from the first, were committed (stop-intake: maybe not all)
    #: Positions (in the stored list) of the outcomes already stored before: what `duplicates` counts.
    duplicate_at: list[int] = field(default_factory=list)


@dataclass
class Gap:
    """Readings dropped to keep the buffer within its bounds, reported in the next batch."""

    readings: int = 0
    uplinks: int = 0
    from_ms: int | None = None
    to_ms: int | None = None
    reasons: list[str] = field(default_factory=list)

    def add(self, readings: int, uplinks: int, from_ms: int, to_ms: int, reason: str) -> None:
        self.readings += readings
        self.uplinks += uplinks
        self.from_ms = from_ms if self.from_ms is None else min(self.from_ms, from_ms)
        self.to_ms = to_ms if self.to_ms is None else max(self.to_ms, to_ms)
        if reason not in self.reasons:
            self.reasons.append(reason)

    def merge(self, other: Gap) -> None:
        """Add another gap's drops to this one, each reason once."""
        for i, reason in enumerate(other.reasons):
            first = i == 0
            self.add(
                other.readings if first else 0,
                other.uplinks if first else 0,
                other.from_ms or 0,
                other.to_ms or 0,
                reason,
            )

    def log_fields(self) -> dict[str, Any]:
        """The drop as fields of the log line that reports it."""
        return {
            "readings": self.readings,
            "uplinks": self.uplinks,
            "from_ms": self.from_ms,
            "to_ms": self.to_ms,
            "reason": ", ".join(self.reasons),
        }
