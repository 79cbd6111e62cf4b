"""The small typed values that pass between stages: uplinks in, readings, batches out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import Field, dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar, dataclass_transform

#: A decoded value as it goes on the wire: numbers, strings or booleans.
Value = int | float | str | bool

#: How a device is known to the gateway: by LoRaWAN DevEUI or by OSM hardware id.
DeviceKind = Literal["dev_eui", "osm_id"]

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(field, Field))
def value_type(cls: type[_T]) -> type[_T]:
    """A dataclass for the values made once or more per uplink: frozen to the type checker,
    plain slots at run time, and hashable by its fields as a frozen dataclass is.

    A frozen dataclass's `__init__` sets each field through `object.__setattr__`, four times
    the cost of plain assignment (1.0 against 0.24 us for four fields here). An uplink makes
    about ten of these values on its way to the buffer, which made their construction 6 to 9%
    of the daemon's CPU during a burst (docs/benchmarks.md, intake). mypy still refuses any
    assignment to a field, which is the immutability the code relies on.
    """
    made: type[_T] = dataclass(slots=True, unsafe_hash=True)(cls)
    return made


@value_type
class DeviceKey:
    """The identity an uplink carries: a DevEUI (lower-case hex) or an OSM HWID (upper-case)."""

    kind: DeviceKind
    id: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


@value_type
class Uplink:
    """One message from a device, as a source received it, before any decoding.

    `source` is the record's natural name (`chirpstack/<deduplicationId>`,
    `osm/<HWID>/<UNIX>`): it makes intake idempotent and becomes the series' `source`.
    """

    source: str
    device: DeviceKey
    payload: bytes
    time_ms: int
    received_ms: int
    f_port: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: ChirpStack's own decoded `object`, when its device profile has a codec.
    object: Mapping[str, Any] | None = None
    #: The ChirpStack tenant the device belongs to, when the source knows it.
    network_tenant: str | None = None
    #: What makes a redelivery recognisable, when `source` alone does not (OSM fragments).
    dedup_key: str | None = None


class Reading(NamedTuple):
    """One decoded value of one metric at one time, as a codec produces it.

    A named tuple: a codec makes one per value, several per uplink, and a tuple is the
    cheapest immutable value to make (0.4 us against 1.0 for a frozen dataclass); it is also
    the (metric, value, unit, t_ms) shape of a device's latest values (`Record.latest`).
    """

    metric: str
    value: Value
    unit: str | None
    t_ms: int


@value_type
class DecodedUplink:
    """An uplink resolved to its device and decoded: what the buffer stores."""

    source: str
    sensor_id: str
    device: DeviceKey
    received_ms: int
    meta: Mapping[str, Any]
    readings: tuple[Reading, ...]
    #: Key of idempotent intake; `source` when None.
    dedup_key: str | None = None
    #: The raw payload, kept in case the buffer must make the uplink a dead letter after all.
    payload: bytes = b""
    #: The device map's metric overrides that no reading of this uplink matched, and then the
    #: metric names the codec did produce (to flag an override that never matches: a typo).
    unmatched_overrides: tuple[str, ...] = ()
    codec_metrics: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A payload that could not be decoded, kept with the reason so it can be looked at."""

    device: DeviceKey | None
    source: str
    f_port: int | None
    reason: str
    payload: bytes
    received_ms: int
    sensor_id: str | None = None
    topic: str | None = None
    #: The uplink the codec refused, kept whole so a corrected device map can decode it again.
    uplink: Uplink | None = None
    #: What makes a redelivery recognisable when `source` alone does not (the uplink's key,
    #: which for OSM holds a digest of the message: two bad fragments of one second differ).
    dedup_key: str | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """One encoded `hub.readings.v1` message, ready to publish; `seq` names it for retries."""

    seq: int
    batch_id: str
    payload: bytes
    readings: int
    gzip: bool
    created_ms: int
    #: The buffer's take the message was made of: ended once, by confirm, reject or divide.
    take: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Unmapped:
    """An uplink from a device in no map: kept (bounded) for replay once the map is fixed."""

    uplink: Uplink


@dataclass(frozen=True, slots=True)
class ForeignTenant:
    """An uplink whose ChirpStack tenant is not the one its device map expects: dropped."""

    uplink: Uplink
    sensor_id: str
    expected: str


@dataclass(frozen=True, slots=True)
class DeviceLog:
    """A ChirpStack `log` event (codec error, frame-counter reset, ...): counted per device."""

    device: DeviceKey
    code: str
    level: str
    description: str
    received_ms: int


#: What the devices stage makes of one uplink.
Outcome = DecodedUplink | DeadLetter | Unmapped | ForeignTenant
