"""Encoders for the codec formats, written from SPEC section 6 (and the vendor facts in
docs/codecs.md), never from the gateway's decoders: a round trip through both checks that
they agree about the format, not that the decoder agrees with itself.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

# --- osm-v2 -----------------------------------------------------------------------------

#: value type byte -> (bytes, signed) for the integer kinds of the OSM LoRaWAN protocol.
OSM_INT_TYPES = {
    "u8": (0x01, 1, False),
    "u16": (0x02, 2, False),
    "u32": (0x03, 4, False),
    "u64": (0x04, 8, False),
    "i8": (0x11, 1, True),
    "i16": (0x12, 2, True),
    "i32": (0x13, 4, True),
    "i64": (0x14, 8, True),
}
OSM_FLOAT = 0x15  # i32 thousandths
OSM_DOUBLE = 0x16  # i64 thousandths
OSM_STRING = 0x20  # exactly 8 bytes, NUL padded


@dataclass(frozen=True)
class OsmValue:
    """One typed value: kind is u8..i64, "float" or "double" (raw thousandths), or "string"."""

    kind: str
    raw: int | str

    def encode(self) -> bytes:
        if self.kind in OSM_INT_TYPES:
            code, size, signed = OSM_INT_TYPES[self.kind]
            assert isinstance(self.raw, int)
            return bytes([code]) + self.raw.to_bytes(size, "little", signed=signed)
        if self.kind == "float":
            assert isinstance(self.raw, int)
            return bytes([OSM_FLOAT]) + self.raw.to_bytes(4, "little", signed=True)
        if self.kind == "double":
            assert isinstance(self.raw, int)
            return bytes([OSM_DOUBLE]) + self.raw.to_bytes(8, "little", signed=True)
        assert self.kind == "string" and isinstance(self.raw, str)
        text = self.raw.encode("ascii")
        assert len(text) <= 8
        return bytes([OSM_STRING]) + text.ljust(8, b"\x00")

    def decoded(self) -> int | float | str:
        """What a decoder must give for this value."""
        if self.kind in ("float", "double"):
            assert isinstance(self.raw, int)
            return self.raw / 1000
        if self.kind == "string":
            assert isinstance(self.raw, str)
            return self.raw.rstrip("\x00")
        return self.raw


@dataclass(frozen=True)
class OsmRecord:
    """A record: a name of 1-4 ASCII characters and one value (single) or three (averaged).

    `data_type` overrides the data type byte: the firmware marks a string record averaged (2)
    when its sample count is above one, yet sends a single value.
    """

    name: str
    values: tuple[OsmValue, ...]
    data_type: int | None = None

    def encode(self) -> bytes:
        name = self.name.encode("ascii")
        assert 1 <= len(name) <= 4
        data_type = self.data_type or (2 if len(self.values) == 3 else 1)
        return name.ljust(4, b"\x00") + bytes([data_type]) + b"".join(v.encode() for v in self.values)


def osm_v2_frame(records: Sequence[OsmRecord], version: int = 2) -> bytes:
    """Version byte, then each record."""
    return bytes([version]) + b"".join(r.encode() for r in records)


# --- osm-json ---------------------------------------------------------------------------


def osm_json_message(unix: int, name: str, values: dict[str, object], *, firmware: bool = True) -> bytes:
    """The Wi-Fi/PoE message: as the firmware prints it (no spaces, floats with 3 decimals)
    or, with firmware=False, as the vendor document shows it (spaces, values quoted)."""
    if not firmware:
        return json.dumps(
            {"UNIX": unix, "NAME": name, "VALUES": {k: str(v) for k, v in values.items()}},
            separators=(", ", " : "),
        ).encode()
    parts = []
    for key, value in values.items():
        if isinstance(value, float):
            thousandths = round(value * 1000)
            sign = "-" if thousandths < 0 else ""
            text = f"{sign}{abs(thousandths) // 1000}.{abs(thousandths) % 1000:03d}"
        elif isinstance(value, int):
            text = str(value)
        else:
            text = json.dumps(value)
        parts.append(f"{json.dumps(key)}:{text}")
    return f'{{"UNIX":{unix},"NAME":{json.dumps(name)},"VALUES":{{{",".join(parts)}}}}}'.encode()


# --- cayenne-lpp ------------------------------------------------------------------------

#: type id -> (name, [(suffix, bytes, signed, divisor, unit), ...]) from the LPP tables.
LPP_TYPES: dict[int, tuple[str, list[tuple[str, int, bool, int, str | None]]]] = {
    0: ("digital_in", [("", 1, False, 1, None)]),
    1: ("digital_out", [("", 1, False, 1, None)]),
    2: ("analog_in", [("", 2, True, 100, None)]),
    3: ("analog_out", [("", 2, True, 100, None)]),
    100: ("generic", [("", 4, False, 1, None)]),
    101: ("illuminance", [("", 2, False, 1, "lx")]),
    102: ("presence", [("", 1, False, 1, None)]),
    103: ("temperature", [("", 2, True, 10, "degC")]),
    104: ("humidity", [("", 1, False, 2, "%RH")]),
    113: (
        "accelerometer",
        [("_x", 2, True, 1000, "G"), ("_y", 2, True, 1000, "G"), ("_z", 2, True, 1000, "G")],
    ),
    115: ("barometer", [("", 2, False, 10, "hPa")]),
    116: ("voltage", [("", 2, False, 100, "V")]),
    117: ("current", [("", 2, False, 1000, "A")]),
    118: ("frequency", [("", 4, False, 1, "Hz")]),
    120: ("percentage", [("", 1, False, 1, "%")]),
    121: ("altitude", [("", 2, True, 1, "m")]),
    125: ("concentration", [("", 2, False, 1, "ppm")]),
    128: ("power", [("", 2, False, 1, "W")]),
    130: ("distance", [("", 4, False, 1000, "m")]),
    131: ("energy", [("", 4, False, 1000, "kWh")]),
    132: ("direction", [("", 2, False, 1, "deg")]),
    133: ("unixtime", [("", 4, False, 1, "s")]),
    134: (
        "gyrometer",
        [
            ("_x", 2, True, 100, "deg/s"),
            ("_y", 2, True, 100, "deg/s"),
            ("_z", 2, True, 100, "deg/s"),
        ],
    ),
    135: (
        "colour",
        [("_r", 1, False, 1, None), ("_g", 1, False, 1, None), ("_b", 1, False, 1, None)],
    ),
    136: (
        "gps",
        [
            ("_latitude", 3, True, 10000, "deg"),
            ("_longitude", 3, True, 10000, "deg"),
            ("_altitude", 3, True, 100, "m"),
        ],
    ),
    142: ("switch", [("", 1, False, 1, None)]),
}


def lpp_item(channel: int, type_id: int, raws: Sequence[int]) -> bytes:
    """One item: channel, type, then each raw (already scaled) field big-endian."""
    _, fields = LPP_TYPES[type_id]
    assert len(raws) == len(fields)
    data = b"".join(
        raw.to_bytes(size, "big", signed=signed) for raw, (_, size, signed, _, _) in zip(raws, fields, strict=True)
    )
    return bytes([channel, type_id]) + data


def lpp_expected(channel: int, type_id: int, raws: Sequence[int]) -> list[tuple[str, int | float, str | None]]:
    """(metric, value, unit) a decoder must give for one item."""
    name, fields = LPP_TYPES[type_id]
    out: list[tuple[str, int | float, str | None]] = []
    for raw, (suffix, _, _, divisor, unit) in zip(raws, fields, strict=True):
        out.append((f"{name}_{channel}{suffix}", raw if divisor == 1 else raw / divisor, unit))
    return out


# --- packed-samples ---------------------------------------------------------------------

#: sample type -> struct format, little-endian.
PACKED_FORMATS = {1: "B", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f"}


def packed_frame(
    sample_type: int,
    period_ms: int,
    delay_ms: int,
    samples: Sequence[int | float],
    version: int = 1,
) -> bytes:
    """Header (version, type, u16 period, u16 delay) then the samples, all little-endian."""
    fmt = PACKED_FORMATS[sample_type]
    return struct.pack("<BBHH", version, sample_type, period_ms, delay_ms) + struct.pack(
        f"<{len(samples)}{fmt}", *samples
    )


def packed_times(uplink_ms: int, period_ms: int, delay_ms: int, n: int) -> list[int]:
    """Sample i of n is at uplink - delay - (n-1-i) * period."""
    return [uplink_ms - delay_ms - (n - 1 - i) * period_ms for i in range(n)]
