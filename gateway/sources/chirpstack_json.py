"""ChirpStack v4 events read straight from their protobuf JSON mapping (`json=true`).

Going through protobuf's `json_format` builds every message of an event in pure Python
(about 190 us an uplink). This module reads only the fields the gateway uses, from the
parsed JSON document, by the rules of the mapping (`sources.protojson` has those for
single values: integers as numbers or strings, base64, RFC 3339 times, enums by name or
number, the decoded object as a Struct):

- a field may be named by its JSON name (`deduplicationId`) or its proto name
  (`deduplication_id`); with both present the later one wins, and a message given twice
  is merged, as json_format does;
- `null` or no field at all means the default (0, "", empty).

For every field it reads it accepts and refuses what `json_format.ParseDict(...,
ignore_unknown_fields=True)` did and yields the same values, down to json_format's
leniencies (a string where a message belongs reads as an empty message);
`tests/test_chirpstack_json.py` checks it against json_format on random events. Fields it
does not read are not looked at, as unknown fields never were: a malformed `txInfo` no
longer makes an uplink a dead letter, and neither does a key in the `[...]` syntax of
extensions, which json_format refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from chirpstack_api.gw import gw_pb2
from chirpstack_api.integration import integration_pb2

from gateway.errors import EventError
from gateway.model import value_type
from gateway.sources.protojson import (
    Stamp,
    describe,
    enum_reader,
    read_bytes,
    read_float32,
    read_int32,
    read_string,
    read_struct,
    read_timestamp,
    read_uint32,
)

R = TypeVar("R")
D = TypeVar("D")


@value_type
class UplinkFields:
    """What the gateway reads of an `integration.UplinkEvent`, whichever the encoding."""

    dev_eui: str
    tenant_id: str
    deduplication_id: str
    f_cnt: int
    f_port: int
    data: bytes
    #: `time`, then the first rxInfo's `nsTime` and `gwTime`: those present, in that order.
    times: tuple[Stamp, ...]
    #: (rssi, snr) of each rxInfo, snr as the 32-bit float protobuf keeps.
    rx: tuple[tuple[int, float], ...]
    #: The decoded object as the JSON had it (integers stay integers), or None.
    object: Mapping[str, Any] | None


@value_type
class LogFields:
    """What the gateway reads of an `integration.LogEvent`, whichever the encoding."""

    dev_eui: str
    level: int
    code: int
    description: str


def read_uplink(event: dict[str, Any]) -> UplinkFields:
    """The fields of an UplinkEvent document; `EventError` (the reason) when one is malformed."""
    dev_eui, tenant_id = _device_info(event)
    time = _field(event, "time", "time", read_timestamp, None)
    no_rx: RxInfo = ((), ())
    rx, rx_times = _field(event, "rxInfo", "rx_info", _rx_info, no_rx)
    return UplinkFields(
        dev_eui=dev_eui,
        tenant_id=tenant_id,
        deduplication_id=_field(event, "deduplicationId", "deduplication_id", read_string, ""),
        f_cnt=_field(event, "fCnt", "f_cnt", read_uint32, 0),
        f_port=_field(event, "fPort", "f_port", read_uint32, 0),
        data=_field(event, "data", "data", read_bytes, b""),
        times=rx_times if time is None else (time, *rx_times),
        rx=rx,
        object=_field(event, "object", "object", read_struct, None),
    )


def read_log(event: dict[str, Any]) -> LogFields:
    """The fields of a LogEvent document; `EventError` (the reason) when one is malformed."""
    dev_eui, _ = _device_info(event)
    return LogFields(
        dev_eui=dev_eui,
        level=_field(event, "level", "level", _log_level, 0),
        code=_field(event, "code", "code", _log_code, 0),
        description=_field(event, "description", "description", read_string, ""),
    )


def _field(message: Mapping[str, Any], json_name: str, name: str, read: Callable[[Any], R | None], default: D) -> R | D:
    """One field of a message: `read` of its value, or `default` when absent or null.

    json_format applies every spelling present in document order, so with both the later
    one wins, and each must be well-formed. `read` returning None leaves the value as it
    was (an enum name this version does not know). A reason is prefixed with the field's
    name: `rxInfo[0].rssi: 2147483648 is out of range for int32`."""
    if name == json_name or name not in message:  # one spelling at most: the usual case, kept quick
        value = message.get(json_name)
        if value is None:
            return default
        try:
            got = read(value)
        except EventError as exc:
            raise EventError(_at(json_name, exc)) from None
        return default if got is None else got
    result: R | D = default
    for value in _spellings(message, json_name, name):
        if value is None:
            result = default
            continue
        try:
            got = read(value)
        except EventError as exc:
            raise EventError(_at(json_name, exc)) from None
        if got is not None:
            result = got
    return result


def _at(where: str, exc: EventError) -> str:
    """`where` prefixed to a reason: `where.inner: ...` when the reason already names a field."""
    reason = str(exc)
    return f"{where}{reason}" if reason[:1] in ".[" else f"{where}: {reason}"


def _spellings(message: Mapping[str, Any], json_name: str, name: str) -> tuple[Any, ...]:
    """The values of one field in document order, one for each spelling present."""
    if name == json_name or name not in message:
        return (message[json_name],) if json_name in message else ()
    if json_name not in message:
        return (message[name],)
    return tuple(value for key, value in message.items() if key in (json_name, name))


# -- messages


def _field_names(descriptor: Any) -> frozenset[str]:
    return frozenset(f.json_name for f in descriptor.fields) | frozenset(f.name for f in descriptor.fields)


_DEVICE_INFO_FIELDS = _field_names(integration_pb2.DeviceInfo.DESCRIPTOR)
_RX_INFO_FIELDS = _field_names(gw_pb2.UplinkRxInfo.DESCRIPTOR)


def _message(value: Any, fields: frozenset[str]) -> Mapping[str, Any]:
    """A message's JSON object. json_format walks a string or an array in its place as if
    it held the object's keys: strings naming no field of the message read as an empty
    message (its `[...]` extension names aside, which are passed over here)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str | list) and all(isinstance(key, str) and key not in fields for key in value):
        return {}
    raise EventError(f"expected an object, not {describe(value)}")


def _device_info(event: Mapping[str, Any]) -> tuple[str, str]:
    """(devEui, tenantId). A message given in both spellings is merged, as json_format
    does: the later sets what it names over the earlier; null clears the message."""
    dev_eui, tenant_id = "", ""
    for info in _spellings(event, "deviceInfo", "device_info"):
        if info is None:
            dev_eui, tenant_id = "", ""
            continue
        try:
            fields = _message(info, _DEVICE_INFO_FIELDS)
        except EventError as exc:
            raise EventError(_at("deviceInfo", exc)) from None
        try:
            if "devEui" in fields or "dev_eui" in fields:
                dev_eui = _field(fields, "devEui", "dev_eui", read_string, "")
            if "tenantId" in fields or "tenant_id" in fields:
                tenant_id = _field(fields, "tenantId", "tenant_id", read_string, "")
        except EventError as exc:
            raise EventError(f"deviceInfo.{exc}") from None
    return dev_eui, tenant_id


RxInfo = tuple[tuple[tuple[int, float], ...], tuple[Stamp, ...]]


def _rx_info(value: Any) -> RxInfo:
    """rxInfo: (rssi, snr) of each, and the first one's nsTime and gwTime where present
    (every item's times are read, and must be well-formed)."""
    if not isinstance(value, list):
        raise EventError(f"expected an array, not {describe(value)}")
    rx = []
    times: list[Stamp] = []
    for i, item in enumerate(value):
        if item is None:
            raise EventError(f"[{i}]: null, which an array of messages cannot hold")
        try:
            fields = _message(item, _RX_INFO_FIELDS)
        except EventError as exc:
            raise EventError(_at(f"[{i}]", exc)) from None
        try:
            rx.append((_field(fields, "rssi", "rssi", read_int32, 0), _field(fields, "snr", "snr", read_float32, 0.0)))
            ns_time = _field(fields, "nsTime", "ns_time", read_timestamp, None)
            gw_time = _field(fields, "gwTime", "gw_time", read_timestamp, None)
        except EventError as exc:
            raise EventError(f"[{i}].{exc}") from None
        if i == 0:  # the uplink's time when the event has none: only the first gateway's
            times = [stamp for stamp in (ns_time, gw_time) if stamp is not None]
    return tuple(rx), tuple(times)


_log_level = enum_reader(dict(integration_pb2.LogLevel.items()))
_log_code = enum_reader(dict(integration_pb2.LogCode.items()))
