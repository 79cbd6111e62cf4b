"""`osm-json`: DevTank OpenSmartMonitor measurements published as JSON over Wi-Fi or PoE.

Vendor: DevTank Ltd (devtank-ltd/osm_firmware_v2, `src/protocols/jsonblob.c`). Devices: OSM
units with the Wi-Fi or PoE comms module (the same measurements as the LoRaWAN units: CC1-CC3,
TEMP/HUMI, PM*, LGHT, SND, CNT1/CNT2, FTA1-FTA4, ...). No fPort: they publish straight to the
gateway's broker on `osm/<HWID>/measurements`.

Message: `{"UNIX": <seconds>, "NAME": "<unit name>", "VALUES": {"<NAME>": <value>, ...}}`. The
firmware prints numbers unquoted (floats with three decimals, e.g. `23.500`); the vendor's
protocol document shows them quoted (`"23.5"`), so a string that is a plain decimal number is
read as that number (an int when it has no '.'); any other string, and every value of a string
measurement (FW, R232), stays a string. An averaged measurement arrives as three keys, `NAME`,
`NAME_min` and `NAME_max`, each its own metric. Timestamp: `UNIX` seconds, unless they are
before 2020-01-01 (a unit without network time), then the time the message was received.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from gateway.codecs.base import Codec, CodecOptions, DecodeContext, DecodeError
from gateway.codecs.osm_units import OSM_METRICS, OSM_UNITS
from gateway.model import Reading, Value

#: 2020-01-01T00:00:00Z; a UNIX before it means the unit has no network time yet.
EARLIEST_UNIX = 1_577_836_800
#: 9999-12-31T23:59:59Z; beyond it the field is not a time at all (and would overflow storage).
LATEST_UNIX = 253_402_300_799
#: Measurements whose values are text, whatever their characters (a FW hash may be all digits).
STRING_MEASUREMENTS = frozenset({"FW", "R232"})

_INTEGER_TEXT = re.compile(r"-?[0-9]+")
_DECIMAL_TEXT = re.compile(r"-?(?:[0-9]+\.[0-9]*|\.[0-9]+)")


class OsmJsonOptions(CodecOptions):
    """Options of `osm-json`: none yet."""


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number")


# One decoder for every message (json.loads with an option builds a new one each call).
_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def _number_or_text(text: str) -> Value:
    """A plain decimal string as the number it spells; any other string as it is."""
    if len(text) <= 64:  # no sensor prints more digits; longer text is text
        if _INTEGER_TEXT.fullmatch(text):
            return int(text)
        if _DECIMAL_TEXT.fullmatch(text):
            return float(text)
    return text


def decode(payload: bytes, ctx: DecodeContext) -> list[Reading]:
    """Decode one OSM JSON message into readings at its `UNIX` time (or the receive time)."""
    try:
        # The osm-mqtt source has parsed the message already; bytes alone are parsed here.
        document = ctx.object if ctx.object is not None else _JSON.decode(payload.decode("utf-8-sig"))
    except RecursionError:
        raise DecodeError("message is not JSON: nested too deeply") from None
    except ValueError as exc:  # also UnicodeDecodeError and our NaN/Infinity rejection
        raise DecodeError(f"message is not JSON: {str(exc)[:120]}") from None
    if not isinstance(document, dict):
        raise DecodeError(f"message is {_kind(document)}, expected a JSON object")
    unix = document.get("UNIX")
    if isinstance(unix, bool) or not isinstance(unix, int):
        raise DecodeError(f"UNIX is {_kind(unix, 'UNIX' in document)}, expected integer seconds")
    if unix > LATEST_UNIX:
        raise DecodeError(f"UNIX {unix} is after the year 9999")
    name = document.get("NAME")
    if name is not None and not isinstance(name, str):
        raise DecodeError(f"NAME is {_kind(name)}, expected a string")
    values = document.get("VALUES")
    if not isinstance(values, dict):
        raise DecodeError(f"VALUES is {_kind(values, 'VALUES' in document)}, expected an object")
    t = unix * 1000 if unix >= EARLIEST_UNIX else ctx.received_ms
    readings = []
    for metric, raw in values.items():
        if not metric:
            raise DecodeError("VALUES has an empty measurement name")
        measurement = metric.removesuffix("_min").removesuffix("_max")
        kind = type(raw)
        if kind is float:
            if not math.isfinite(raw):
                raise DecodeError(f"VALUES[{metric!r}] is {raw} (not a finite number)")
        elif kind is str:
            if measurement not in STRING_MEASUREMENTS:
                raw = _number_or_text(raw)
        elif kind is not int:  # bool, null, array, object
            raise DecodeError(f"VALUES[{metric!r}] is {_kind(raw)}, expected a number or a string")
        readings.append(Reading(metric, raw, OSM_UNITS.get(measurement), t))
    return readings


_KINDS = {bool: "a boolean", int: "an integer", float: "a decimal number", str: "a string"}


def _kind(value: Any, present: bool = True) -> str:
    """What a JSON value is, in JSON's words, for a dead letter's reason."""
    if not present:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return _KINDS.get(type(value), type(value).__name__)


def metric_names(options: CodecOptions) -> frozenset[str]:
    """The names of the firmware's measurements (a unit may be set up to send others)."""
    return OSM_METRICS


CODEC = Codec(
    name="osm-json", options=OsmJsonOptions, decode=decode, default_units=OSM_UNITS, metric_names=metric_names
)
