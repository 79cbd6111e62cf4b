"""Parsing what arrives on the local broker into `Uplink`s: ChirpStack v4 events and OSM JSON.

Pure functions of (topic, payload, receive time); the MQTT client lives in `sources.mqtt`.
ChirpStack publishes `application/<app>/device/<devEui>/event/<type>` with the protobuf
`integration.UplinkEvent` / `LogEvent` either as protobuf JSON mapping (`json=true`), read
directly by `sources.chirpstack_json`, or binary, read by protobuf. Both give the same
`UplinkFields` / `LogFields`, which become the `Uplink` or `DeviceLog` here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from chirpstack_api.integration import integration_pb2
from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError

from gateway.errors import EventError
from gateway.model import DeviceKey, DeviceLog, Uplink
from gateway.sources.chirpstack_json import LogFields, UplinkFields, read_log, read_uplink
from gateway.sources.protojson import Stamp

_OSM_TOPIC = re.compile(r"osm/([0-9A-Fa-f]{8})/measurements")
_DEV_EUI = re.compile(r"[0-9a-fA-F]{16}")
#: ChirpStack's deduplicationId is a UUID (36 characters); a longer one is not ChirpStack's.
MAX_DEDUPLICATION_ID = 64


@dataclass(frozen=True, slots=True)
class Ignored:
    """An event of a type the gateway has no use for (join, ack, txack, status, ...)."""

    event_type: str


Event = Uplink | DeviceLog | Ignored


def event_type(topic: str) -> str:
    """The ChirpStack event type, the last level of `.../event/<type>`."""
    levels = topic.split("/")
    if len(levels) >= 2 and levels[-2] == "event":
        return levels[-1]
    raise EventError(f"topic {topic!r} is not a ChirpStack event topic (.../event/<type>)")


#: Uplink times outside these (ms since the epoch: 2000-01-01, 9999-12-31) are not times a
#: network server gives; such a field is passed over as if absent.
EARLIEST_MS, LATEST_MS = 946_684_800_000, 253_402_300_799_999


def _uplink_time_ms(times: tuple[Stamp, ...], received_ms: int) -> int:
    """Event `time`; else the first rxInfo `nsTime`, then `gwTime`; else the receive time. A
    time outside years 2000-9999 (the binary encoding carries any int64) is passed over."""
    for seconds, nanos in times:
        ms = seconds * 1000 + nanos // 1_000_000
        if EARLIEST_MS <= ms <= LATEST_MS:
            return ms
    return received_ms


def _integral(value: Any) -> Any:
    """Protobuf Struct numbers are doubles; give whole ones back as ints."""
    if isinstance(value, float) and value.is_integer() and math.isfinite(value) and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def parse_chirpstack(topic: str, payload: bytes, received_ms: int, encoding: Literal["json", "protobuf"]) -> Event:
    """Parse one ChirpStack event; raise `EventError` when it is not a well-formed event."""
    kind = event_type(topic)
    if kind not in ("up", "log"):
        return Ignored(kind)
    fields = _read_json(kind, payload) if encoding == "json" else _read_protobuf(kind, payload)
    dev_eui = fields.dev_eui.lower()
    if not _DEV_EUI.fullmatch(dev_eui):
        raise EventError(
            f"{kind} event has no valid deviceInfo.devEui ({dev_eui[:40]!r}){_encoding_hint(kind, payload, encoding)}"
        )
    device = DeviceKey("dev_eui", dev_eui)
    if isinstance(fields, LogFields):
        return DeviceLog(
            device=device,
            code=_enum_name(integration_pb2.LogCode, fields.code),
            level=_enum_name(integration_pb2.LogLevel, fields.level),
            description=fields.description[:500],
            received_ms=received_ms,
        )
    dedup_id = fields.deduplication_id
    if not dedup_id:
        raise EventError("uplink event has no deduplicationId")
    if len(dedup_id) > MAX_DEDUPLICATION_ID:
        raise EventError(
            f"uplink event's deduplicationId is {len(dedup_id)} characters long; "
            f"ChirpStack's are UUIDs (at most {MAX_DEDUPLICATION_ID} accepted)"
        )
    meta: dict[str, Any] = {"dev_eui": dev_eui, "f_cnt": fields.f_cnt, "f_port": fields.f_port}
    if fields.rx:
        # The strongest gateway's (most uplinks have one: no key function to call then).
        rssi, snr = fields.rx[0] if len(fields.rx) == 1 else max(fields.rx, key=_rssi)
        meta["rssi"] = rssi
        if math.isfinite(snr):  # "NaN" and "Infinity" are valid protobuf JSON: never on the wire
            meta["snr"] = round(snr, 2)
    return Uplink(
        source=f"chirpstack/{dedup_id}",
        # Scoped by device: two devices' events that happen to share an id are both stored.
        dedup_key=f"chirpstack/{dev_eui}/{dedup_id}",
        device=device,
        payload=fields.data,
        time_ms=_uplink_time_ms(fields.times, received_ms),
        received_ms=received_ms,
        f_port=fields.f_port,
        meta=meta,
        object=fields.object,
        network_tenant=fields.tenant_id or None,
    )


def _rssi(rx: tuple[int, float]) -> int:
    return rx[0]


_TOO_DEEP = (
    "{kind} event nests deeper than protobuf's limit of 100 levels (ChirpStack's decoded "
    "object is too deep to be an event ChirpStack itself could have sent)"
)


def _read_json(kind: str, payload: bytes) -> UplinkFields | LogFields:
    """The event's fields from its protobuf JSON mapping (`json=true`), read directly."""
    try:
        document = json.loads(payload)
    except RecursionError:
        raise EventError(_TOO_DEEP.format(kind=kind)) from None
    except ValueError as exc:
        raise EventError(
            f"{kind} event does not parse as json: {_short(exc)}{_encoding_hint(kind, payload, 'json')}"
        ) from None
    if not isinstance(document, dict):
        raise EventError(f"{kind} event is not a JSON object")
    try:
        return read_uplink(document) if kind == "up" else read_log(document)
    except EventError as exc:
        raise EventError(
            f"{kind} event does not parse as json: {_short(exc)}{_encoding_hint(kind, payload, 'json')}"
        ) from None


def _read_protobuf(kind: str, payload: bytes) -> UplinkFields | LogFields:
    """The event's fields from its binary protobuf encoding (`json=false`)."""
    message: Any = integration_pb2.UplinkEvent() if kind == "up" else integration_pb2.LogEvent()
    try:
        message.ParseFromString(payload)
    except (ValueError, ProtobufDecodeError, RecursionError) as exc:
        if "too deep" in str(exc) or isinstance(exc, RecursionError):
            raise EventError(_TOO_DEEP.format(kind=kind)) from None
        raise EventError(
            f"{kind} event does not parse as protobuf: {_short(exc)}{_encoding_hint(kind, payload, 'protobuf')}"
        ) from None
    if kind == "log":
        return LogFields(
            dev_eui=message.device_info.dev_eui,
            level=message.level,
            code=message.code,
            description=message.description,
        )
    times = [message.time] if message.HasField("time") else []
    for rx in message.rx_info[:1]:
        times += [getattr(rx, name) for name in ("ns_time", "gw_time") if rx.HasField(name)]
    raw_object = None
    if message.HasField("object"):
        try:
            raw_object = _integral(json_format.MessageToDict(message.object))
        except (ValueError, json_format.Error) as exc:  # NaN or infinity in a Struct
            raise EventError(f"uplink event's decoded object cannot be read: {_short(exc)}") from None
    return UplinkFields(
        dev_eui=message.device_info.dev_eui,
        tenant_id=message.device_info.tenant_id,
        deduplication_id=message.deduplication_id,
        f_cnt=message.f_cnt,
        f_port=message.f_port,
        data=bytes(message.data),
        times=tuple((int(t.seconds), int(t.nanos)) for t in times),
        rx=tuple((rx.rssi, rx.snr) for rx in message.rx_info),
        object=raw_object,
    )


def parse_osm(topic: str, payload: bytes, received_ms: int) -> Uplink:
    """Parse an OSM Wi-Fi/PoE message on `osm/<HWID>/measurements`.

    Only the `UNIX` field is read here (it names the record, for idempotent intake); the
    `osm-json` codec decodes the rest (from the document parsed here, passed as `object`), so
    a malformed body still reaches the device's dead letters rather than vanishing.
    """
    match = _OSM_TOPIC.fullmatch(topic)
    if not match:
        raise EventError(f"topic {topic!r} is not osm/<8 hex HWID>/measurements")
    hwid = match.group(1).upper()
    unix: Any = None
    parsed: dict[str, Any] | None = None
    try:
        document = json.loads(payload)
        if isinstance(document, dict):
            parsed = document
            unix = document.get("UNIX")
    except (ValueError, RecursionError):
        pass
    if isinstance(unix, int) and not isinstance(unix, bool) and unix >= 0:
        source = f"osm/{hwid}/{unix}"
    else:
        source = f"osm/{hwid}/received-{received_ms}"
    return Uplink(
        source=source,
        device=DeviceKey("osm_id", hwid),
        payload=bytes(payload),
        time_ms=received_ms,
        received_ms=received_ms,
        meta={"osm_id": hwid},
        object=parsed,  # parsed once here; the osm-json codec takes it instead of parsing again
        # The firmware splits a full measurement set into several messages, which may share a
        # UNIX second: the payload's digest keeps a second fragment from passing as a redelivery.
        dedup_key=f"{source}#{hashlib.sha256(payload).hexdigest()[:16]}",
    )


def _enum_name(enum: Any, value: int) -> str:
    """The enum value's name, or UNKNOWN_<n> for a value newer than the installed chirpstack-api."""
    try:
        return str(enum.Name(value))
    except ValueError:
        return f"UNKNOWN_{value}"


def _encoding_hint(kind: str, payload: bytes, encoding: str) -> str:
    """ "; this looks like protobuf: set ..." when the message is a well-formed event in the
    other encoding: ChirpStack's `json` setting and the source's `encoding` disagree, and every
    event of the site fails until they match."""
    if encoding == "json":
        other: Any = integration_pb2.UplinkEvent() if kind == "up" else integration_pb2.LogEvent()
        try:
            other.ParseFromString(payload)
        except (ProtobufDecodeError, ValueError, RecursionError):
            return ""
        if not _DEV_EUI.fullmatch(other.device_info.dev_eui):
            return ""
        return (
            "; this looks like protobuf: set `encoding: protobuf` on the chirpstack source "
            "(or json=true in ChirpStack's [integration.mqtt])"
        )
    if payload.lstrip()[:1] != b"{":
        return ""
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return ""
    if not isinstance(document, dict) or "deviceInfo" not in document:
        return ""
    return (
        "; this looks like JSON: set `encoding: json` on the chirpstack source "
        "(or json=false in ChirpStack's [integration.mqtt])"
    )


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
