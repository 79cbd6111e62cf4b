"""`cayenne-lpp`: Cayenne Low Power Payload (myDevices), as sent by many off-the-shelf devices.

Vendor: myDevices (the format; IPSO Smart Object ids). Devices: anything built with a
CayenneLPP library (Arduino/PlatformIO nodes with the ElectronicCats or TTN libraries,
RAKwireless WisBlock examples, many LoRaWAN dev kits and demo firmwares). fPorts: any (devices
commonly use 1 or 2); the payload does not depend on it.

Frame: items to the end of the frame, each `channel (1 byte) | type (1 byte) | data`, data
big-endian. Types are IPSO object ids minus 3200. Standard LPP v1: digital in/out (0/1), analog
in/out (2/3), illuminance (101), presence (102), temperature (103), humidity (104),
accelerometer (113), barometer (115), gyrometer (134), GPS (136); and the common extended ones:
generic (100), voltage (116), current (117), frequency (118), percentage (120), altitude (121),
concentration (125), power (128), distance (130), energy (131), direction (132), unix time
(133), colour (135), switch (142). Metric `<type>_<channel>` (e.g. `temperature_3`);
multi-value types add the axis: `accelerometer_6_x`, `gps_1_latitude`, `colour_2_r`.
Timestamp: the uplink's time.

Where references disagree (see docs/codecs.md) this follows the IPSO-minus-3200 numbering and
the myDevices resolutions: concentration is 125 and colour 135 (ElectronicCats' decoder.js uses
143 "ppm" and 144 "rgb"), direction is 2 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from gateway.codecs.base import Codec, CodecOptions, DecodeContext, DecodeError
from gateway.model import Reading, Value


@dataclass(frozen=True, slots=True)
class _Field:
    """One value inside an item: its name suffix, size, signedness, divisor and unit."""

    suffix: str
    size: int
    signed: bool
    divisor: int
    unit: str | None


@dataclass(frozen=True, slots=True)
class _Type:
    """An LPP data type: its metric prefix and the fields of its data, in order."""

    name: str
    fields: tuple[_Field, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.fields)


def _one(name: str, size: int, signed: bool, divisor: int, unit: str | None) -> _Type:
    return _Type(name, (_Field("", size, signed, divisor, unit),))


def _axes(name: str, divisor: int, unit: str) -> _Type:
    return _Type(name, tuple(_Field("_" + axis, 2, True, divisor, unit) for axis in "xyz"))


TYPES: dict[int, _Type] = {
    0: _one("digital_in", 1, False, 1, None),
    1: _one("digital_out", 1, False, 1, None),
    2: _one("analog_in", 2, True, 100, None),
    3: _one("analog_out", 2, True, 100, None),
    100: _one("generic", 4, False, 1, None),
    101: _one("illuminance", 2, False, 1, "lx"),
    102: _one("presence", 1, False, 1, None),
    103: _one("temperature", 2, True, 10, "degC"),
    104: _one("humidity", 1, False, 2, "%RH"),
    113: _axes("accelerometer", 1000, "G"),
    115: _one("barometer", 2, False, 10, "hPa"),
    116: _one("voltage", 2, False, 100, "V"),
    117: _one("current", 2, False, 1000, "A"),
    118: _one("frequency", 4, False, 1, "Hz"),
    120: _one("percentage", 1, False, 1, "%"),
    121: _one("altitude", 2, True, 1, "m"),
    125: _one("concentration", 2, False, 1, "ppm"),
    128: _one("power", 2, False, 1, "W"),
    130: _one("distance", 4, False, 1000, "m"),
    131: _one("energy", 4, False, 1000, "kWh"),
    132: _one("direction", 2, False, 1, "deg"),
    133: _one("unixtime", 4, False, 1, "s"),
    134: _axes("gyrometer", 100, "deg/s"),
    135: _Type("colour", tuple(_Field("_" + c, 1, False, 1, None) for c in "rgb")),
    136: _Type(
        "gps",
        (
            _Field("_latitude", 3, True, 10000, "deg"),
            _Field("_longitude", 3, True, 10000, "deg"),
            _Field("_altitude", 3, True, 100, "m"),
        ),
    ),
    142: _one("switch", 1, False, 1, None),
}


class CayenneLppOptions(CodecOptions):
    """Options of `cayenne-lpp`: none yet."""


def decode(payload: bytes, ctx: DecodeContext) -> list[Reading]:
    """Decode one Cayenne LPP frame into readings at the uplink's time."""
    t = ctx.uplink_time_ms
    readings: list[Reading] = []
    pos = 0
    end = len(payload)
    while pos < end:
        if pos + 2 > end:
            raise DecodeError(f"item at byte {pos} truncated: channel without a type")
        channel, type_id = payload[pos], payload[pos + 1]
        kind = TYPES.get(type_id)
        if kind is None:
            raise DecodeError(f"unknown data type {type_id} on channel {channel} at byte {pos + 1}")
        pos += 2
        if pos + kind.size > end:
            raise DecodeError(f"{kind.name} on channel {channel} truncated: needs {kind.size} bytes, {end - pos} left")
        prefix = f"{kind.name}_{channel}"
        for field in kind.fields:
            number = int.from_bytes(payload[pos : pos + field.size], "big", signed=field.signed)
            pos += field.size
            value: Value = number if field.divisor == 1 else number / field.divisor
            readings.append(Reading(prefix + field.suffix, value, field.unit, t))
    return readings


@cache
def _all_metric_names() -> frozenset[str]:
    return frozenset(
        f"{kind.name}_{channel}{field.suffix}"
        for kind in TYPES.values()
        for channel in range(256)
        for field in kind.fields
    )


def metric_names(options: CodecOptions) -> frozenset[str]:
    """`<type>_<channel>[_<axis>]` for every type this codec decodes and every channel 0-255."""
    return _all_metric_names()


CODEC = Codec(name="cayenne-lpp", options=CayenneLppOptions, decode=decode, metric_names=metric_names)
