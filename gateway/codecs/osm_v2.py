"""`osm-v2`: DevTank OpenSmartMonitor LoRaWAN measurement frames.

Vendor: DevTank Ltd (devtank-ltd/osm_firmware_v2, `src/protocols/hexblob.c`). Devices: OSM
units on LoRaWAN (current clamps CC1-CC3, temperature/humidity, particulates, light, sound,
pulse counters, ...). Units with the RAK3172 radio send on fPort 1; the older RAK4270 radio
steps its fPort from 1 to 223 on every send, so every port is accepted unless `options.ports`
narrows it.

Frame: byte 0 is the protocol version (2; 1 accepted). Then records to the end of the frame:

    name    4 bytes ASCII, NUL padded
    type    1 byte: 1 single (one value), 2 averaged (mean, min, max)
    value   1 byte value type + its bytes, little-endian, once or three times

Value types: 0x01-0x04 u8/u16/u32/u64, 0x11-0x14 i8/i16/i32/i64, 0x15 i32 thousandths,
0x16 i64 thousandths, 0x20 an 8-byte NUL-padded string. Mean, min and max each carry their own
type. Metrics: `NAME` (single or mean), `NAME_min`, `NAME_max`. The 2-byte alive frame
`12 34` and a frame with no records (the RAK4270 sends an empty one after joining) give no
readings.

Where the vendor's JavaScript decoders and docs disagree with the firmware, this follows the
firmware: version 2 is current; each of mean/min/max has its own type byte; an "averaged"
string record carries a single string value (the firmware cannot average strings); strings
are NUL-stripped; u32/u64/i8 are decoded at full range.
"""

from __future__ import annotations

import functools

from pydantic import Field

from gateway.codecs.base import Codec, CodecOptions, DecodeContext, DecodeError
from gateway.codecs.osm_units import OSM_METRICS, OSM_UNITS
from gateway.model import Reading, Value

ALIVE_FRAME = b"\x12\x34"
VERSIONS = (1, 2)
SINGLE, AVERAGED = 1, 2

# value type -> (size in bytes, signed, divisor); strings are handled apart.
_INTEGERS: dict[int, tuple[int, bool, int]] = {
    0x01: (1, False, 1),
    0x02: (2, False, 1),
    0x03: (4, False, 1),
    0x04: (8, False, 1),
    0x11: (1, True, 1),
    0x12: (2, True, 1),
    0x13: (4, True, 1),
    0x14: (8, True, 1),
    0x15: (4, True, 1000),
    0x16: (8, True, 1000),
}
STRING = 0x20
STRING_SIZE = 8
NAME_SIZE = 4


class OsmV2Options(CodecOptions):
    """Options of `osm-v2`."""

    ports: list[int] | None = Field(
        default=None,
        description="fPorts that carry measurement frames (default: all; RAK4270 radios cycle "
        "1-223); uplinks on other ports give no readings.",
    )


def _read_value(frame: bytes, pos: int, name: str) -> tuple[Value, int]:
    """Read one typed value at `pos`; return it and the position after it."""
    if pos >= len(frame):
        raise DecodeError(f"record {name!r}: frame ends where a value type was expected (byte {pos})")
    kind = frame[pos]
    pos += 1
    if kind == STRING:
        end = pos + STRING_SIZE
        if end > len(frame):
            raise DecodeError(f"record {name!r}: string value truncated at byte {len(frame)}")
        raw = frame[pos:end].rstrip(b"\x00")
        try:
            return raw.decode("ascii"), end
        except UnicodeDecodeError:
            raise DecodeError(f"record {name!r}: string value is not ASCII") from None
    try:
        size, signed, divisor = _INTEGERS[kind]
    except KeyError:
        raise DecodeError(f"record {name!r}: unknown value type 0x{kind:02x} at byte {pos - 1}") from None
    end = pos + size
    if end > len(frame):
        raise DecodeError(f"record {name!r}: {size}-byte value truncated at byte {len(frame)}")
    number = int.from_bytes(frame[pos:end], "little", signed=signed)
    if divisor != 1:
        return number / divisor, end
    return number, end


def _read_name(frame: bytes, pos: int) -> str:
    raw = frame[pos : pos + NAME_SIZE]
    if len(raw) < NAME_SIZE:
        raise DecodeError(f"record name truncated at byte {len(frame)}")
    name = _name(raw)
    if name is None:
        raise DecodeError(f"record name {raw.hex()} at byte {pos} is not printable ASCII")
    return name


@functools.lru_cache(maxsize=1024)
def _name(raw: bytes) -> str | None:
    """A record's 4 name bytes as text, or None if they are not a name (cached: a site's
    units send the same few names in every frame, at 1 Hz each)."""
    name = raw.rstrip(b"\x00")
    if not name or b"\x00" in name or not all(0x21 <= b < 0x7F for b in name):
        return None
    return name.decode("ascii")


def decode(payload: bytes, ctx: DecodeContext) -> list[Reading]:
    """Decode one OSM LoRaWAN measurement frame into readings at the uplink's time."""
    options = ctx.options
    assert isinstance(options, OsmV2Options)
    if options.ports is not None and ctx.f_port is not None and ctx.f_port not in options.ports:
        return []
    if payload == ALIVE_FRAME or not payload:
        return []
    if payload[0] not in VERSIONS:
        raise DecodeError(f"unknown protocol version {payload[0]} (expected 1 or 2)")
    t = ctx.uplink_time_ms
    readings: list[Reading] = []
    pos = 1
    while pos < len(payload):
        name = _read_name(payload, pos)
        pos += NAME_SIZE
        if pos >= len(payload):
            raise DecodeError(f"record {name!r}: frame ends before its data type")
        data_type = payload[pos]
        pos += 1
        unit = OSM_UNITS.get(name)
        if data_type == SINGLE:
            value, pos = _read_value(payload, pos, name)
            readings.append(Reading(name, value, unit, t))
        elif data_type == AVERAGED:
            value, pos = _read_value(payload, pos, name)
            readings.append(Reading(name, value, unit, t))
            if isinstance(value, str):
                continue  # the firmware sends one value for a string, even when "averaged"
            for suffix in ("_min", "_max"):
                value, pos = _read_value(payload, pos, name)
                readings.append(Reading(name + suffix, value, unit, t))
        else:
            raise DecodeError(f"record {name!r}: unknown data type {data_type} (1 single, 2 averaged)")
    return readings


def metric_names(options: CodecOptions) -> frozenset[str]:
    """The names of the firmware's measurements (a unit may be set up to send others)."""
    return OSM_METRICS


CODEC = Codec(name="osm-v2", options=OsmV2Options, decode=decode, default_units=OSM_UNITS, metric_names=metric_names)
