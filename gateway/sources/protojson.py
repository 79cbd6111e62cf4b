"""The rules of protobuf's JSON mapping for single values, as json_format applies them.

Each `read_*` takes a value of a parsed JSON document where a field of that type belongs
and gives what protobuf would store, or raises `EventError` with the reason (which the
caller prefixes with the field's name). Where json_format is more lenient than the mapping's
specification, they are too, so that what the gateway took before it still takes: Python's
int() and float() spellings ("1_000", " 7.5 ", "1e3" for an integer), base64 with other
characters passed over, and the times Python protobuf's Timestamp parser takes beyond RFC
3339. `sources.chirpstack_json` reads ChirpStack's events with them.
"""

from __future__ import annotations

import binascii
import datetime
import functools
import math
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import timestamp_pb2

from gateway.errors import EventError

#: A protobuf Timestamp: seconds since the epoch and nanoseconds within the second.
Stamp = tuple[int, int]


def describe(value: Any) -> str:
    """A JSON value's type in the words of JSON, for reasons."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"the number {_digits(value)}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r:.40}"
    return "an array" if isinstance(value, list) else "an object"


def _digits(number: int) -> str:
    text = str(number)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


def read_string(value: Any) -> str:
    """A `string`: JSON text that is valid Unicode."""
    if not isinstance(value, str):
        raise EventError(f"expected a string, not {describe(value)}")
    if not value.isascii():
        _check_text(value)
    return value


def _check_text(value: str) -> None:
    """Protobuf strings are UTF-8: a surrogate (which JSON's \\ud800 escapes can make) is refused."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise EventError(f"{value[:40]!r} holds a UTF-16 surrogate, which is not Unicode text") from None


def _integer(value: Any, low: int, high: int, kind: str) -> int:
    """An integer field: a number or a decimal string (python's int() spelling, or a float's
    when that is integral), not true/false, not with a space, within [low, high]."""
    if type(value) is int:  # the usual case first
        number = value
    elif isinstance(value, bool) or not isinstance(value, float | str):
        raise EventError(f"expected an integer, not {describe(value)}")
    elif isinstance(value, float):
        if not value.is_integer():
            raise EventError(f"expected an integer, not {describe(value)}")
        number = int(value)
    else:
        if " " in value:
            raise EventError(f"expected an integer, not {describe(value)}")
        try:
            number = int(value)
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                raise EventError(f"expected an integer, not {describe(value)}") from None
            if not as_float.is_integer():
                raise EventError(f"expected an integer, not {describe(value)}") from None
            number = int(as_float)
    if not low <= number <= high:
        raise EventError(f"{_digits(number)} is out of range for {kind}")
    return number


def read_uint32(value: Any) -> int:
    """A `uint32` (fCnt, fPort)."""
    return _integer(value, 0, 2**32 - 1, "uint32")


def read_int32(value: Any) -> int:
    """An `int32` (rssi)."""
    return _integer(value, -(2**31), 2**31 - 1, "int32")


_FLOAT32 = struct.Struct("<f")
_FLOAT32_MAX = float.fromhex("0x1.fffffep+127")


def read_float32(value: Any) -> float:
    """A `float` field: a finite number within float32, or a string float() reads (with
    "NaN", "Infinity", "-Infinity", but not "nan"), rounded to 32 bits as protobuf stores it."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EventError(f'{value!r} must be quoted ("NaN", "Infinity", "-Infinity")')
        if abs(value) > _FLOAT32_MAX:
            raise EventError(f"{value!r} is out of range for a 32-bit float")
        number = value
    elif value == "nan":
        raise EventError('"nan" is spelled "NaN"')
    elif isinstance(value, dict | list) or value is None:
        raise EventError(f"expected a number, not {describe(value)}")
    else:  # int, bool (json_format takes true as 1.0) or str
        try:
            number = float(value)
        except ValueError:
            raise EventError(f"expected a number, not {describe(value)}") from None
        except OverflowError:
            raise EventError(f"{describe(value)} is too large for a float") from None
    try:
        return float(_FLOAT32.unpack(_FLOAT32.pack(number))[0])
    except OverflowError:  # past float32: protobuf keeps an infinity
        return math.copysign(math.inf, number)


_URL_SAFE = bytes.maketrans(b"-_", b"+/")


def read_bytes(value: Any) -> bytes:
    """Base64, either alphabet; padding is added (json_format pads what it is given, and
    binascii's lenient mode passes over other characters and stops at the first padding)."""
    if not isinstance(value, str):
        raise EventError(f"expected a base64 string, not {describe(value)}")
    try:
        text = value.encode()
    except UnicodeEncodeError:
        raise EventError(f"{value[:40]!r} holds a UTF-16 surrogate, which is not Unicode text") from None
    try:
        return binascii.a2b_base64(text.translate(_URL_SAFE) + b"=" * (4 - len(text) % 4))
    except binascii.Error as exc:
        raise EventError(f"not base64 ({exc})") from None


def enum_reader(names: Mapping[str, int]) -> Callable[[Any], int | None]:
    """The reader of one enum's field."""
    known = frozenset(names.values())

    def read(value: Any) -> int | None:
        """An enum: its name, or a number (or int()'s spelling of one); None for a name this
        version does not know, which json_format passes over (the value stays as it was)."""
        if isinstance(value, str):
            number = names.get(value)
            if number is not None:
                return number
        elif isinstance(value, dict | list):
            raise EventError(f"expected an enum name or number, not {describe(value)}")
        try:
            number = int(value)
        except ValueError:  # an unknown name, or NaN
            return None
        except OverflowError:
            raise EventError(f"{value!r} is not an enum number") from None
        if -(2**63) <= number < 2**63:
            # json_format looks the number up in upb's values_by_number, which keeps only the
            # low 32 bits of a 64-bit key: 2**32 + 11 is found as 11 (EXPIRED), and taken so.
            low = (number + 2**31) % 2**32 - 2**31
            if low in known:
                return low
        if not -(2**31) <= number <= 2**31 - 1:
            raise EventError(f"{_digits(number)} is out of range for an enum")
        return number

    return read


# -- times

#: RFC 3339 as protobuf writes it: 0-9 fractional digits, Z or a +hh:mm offset.
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d):(\d\d)(?:\.(\d{0,9}))?(?:Z|([+-])(\d\d):(\d\d))", re.ASCII)
_EPOCH_DAY = datetime.date(1970, 1, 1).toordinal()
#: A Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def read_timestamp(value: Any) -> Stamp:
    """A Timestamp: (seconds, nanos) of an RFC 3339 time."""
    if not isinstance(value, str):
        raise EventError(f"expected an RFC 3339 time, not {describe(value)}")
    match = _RFC3339.fullmatch(value)
    if match is None:
        return _timestamp_otherwise(value)
    minute, second, fraction, sign, offset_h, offset_m = match.groups()
    try:
        seconds = _minute_seconds(minute) + int(second)
    except ValueError as exc:
        raise EventError(f"{value!r:.60}: {exc}") from None
    if second > "59":  # no leap second: protobuf's Timestamp has none
        raise EventError(f"{value!r:.60}: second must be in 0..59")
    if sign is not None:
        offset = (int(offset_h) * 60 + int(offset_m)) * 60
        seconds += -offset if sign == "+" else offset
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise EventError(f"{value!r:.60} is outside years 1 to 9999")
    return seconds, int(fraction.ljust(9, "0")) if fraction else 0


@functools.lru_cache(maxsize=64)
def _minute_seconds(minute: str) -> int:
    """Seconds since the epoch at `YYYY-MM-DDTHH:MM` UTC; ValueError when there is no such
    minute. Cached: an uplink's times share their minute with each other and with the
    uplinks around it."""
    hour, minute_of_hour = int(minute[11:13]), int(minute[14:16])
    if hour > 23 or minute_of_hour > 59:
        raise ValueError("not a time of day")
    day = datetime.date(int(minute[:4]), int(minute[5:7]), int(minute[8:10])).toordinal() - _EPOCH_DAY
    return day * 86_400 + hour * 3600 + minute_of_hour * 60


def _timestamp_otherwise(value: str) -> Stamp:
    """Times outside RFC 3339 that Python protobuf's parser still takes (`2026-1-5T1:2:3Z`,
    `+5:00`) go to that parser, so the gateway accepts what it always did; it refuses the rest."""
    stamp = timestamp_pb2.Timestamp()
    try:
        stamp.FromJsonString(value)
    except (ValueError, OverflowError) as exc:
        raise EventError(f"{value!r:.60} is not an RFC 3339 time ({str(exc)[:120]})") from None
    return int(stamp.seconds), int(stamp.nanos)


# -- the decoded object

#: json_format's max_recursion_depth, in its levels: the event is 1, the object (a Struct)
#: 2, a value in it 3, a Struct or list that value holds 4, its values 5, and so on.
MAX_DEPTH = 100


def read_struct(value: Any) -> Mapping[str, Any]:
    """A `google.protobuf.Struct` field of the event (its levels counted from 2), as the JSON
    had it (integers stay integers); refused where a Struct could not hold it."""
    if not isinstance(value, dict):
        raise EventError(f"expected an object, not {describe(value)}")
    _check_struct(value, 2)
    return value


def _check_struct(struct_: dict[str, Any], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise EventError(f"nests deeper than protobuf's limit of {MAX_DEPTH} levels")
    for key, value in struct_.items():
        if not key.isascii():
            _check_text(key)
        _check_value(value, depth + 1)


def _check_value(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise EventError(f"nests deeper than protobuf's limit of {MAX_DEPTH} levels")
    if isinstance(value, str):
        if not value.isascii():
            _check_text(value)
    elif isinstance(value, dict):
        _check_struct(value, depth + 1)
    elif isinstance(value, list):
        if depth + 1 > MAX_DEPTH:
            raise EventError(f"nests deeper than protobuf's limit of {MAX_DEPTH} levels")
        for item in value:
            _check_value(item, depth + 2)
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)  # a Struct number is a double
        except OverflowError:
            raise EventError(f"the integer {_digits(value)} is too large for a double") from None
