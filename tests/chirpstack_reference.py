"""The ChirpStack event parser as it was before issue 11: everything through protobuf.

JSON events went through `json_format.ParseDict` into chirpstack-api's message types, binary
ones through `ParseFromString`; the fields were then read from the message. Kept as the
reference that `gateway.sources.chirpstack_json` is checked against (tests/test_chirpstack_json.py)
and timed against (bench/codecs.py). Its reasons leave out the encoding hint; what is compared
is the result, or that both refuse.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from chirpstack_api.integration import integration_pb2
from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError

from gateway.errors import EventError
from gateway.model import DeviceKey, DeviceLog, Uplink
from gateway.sources.events import EARLIEST_MS, LATEST_MS, MAX_DEDUPLICATION_ID, Event, Ignored, event_type

_DEV_EUI = re.compile(r"[0-9a-fA-F]{16}")


def _ms(timestamp: Any) -> int | None:
    ms = int(timestamp.seconds) * 1000 + int(timestamp.nanos) // 1_000_000
    return ms if EARLIEST_MS <= ms <= LATEST_MS else None


def _uplink_time_ms(event: Any, received_ms: int) -> int:
    candidates = [event.time] if event.HasField("time") else []
    for rx in event.rx_info[:1]:
        candidates += [getattr(rx, name) for name in ("ns_time", "gw_time") if rx.HasField(name)]
    for timestamp in candidates:
        ms = _ms(timestamp)
        if ms is not None:
            return ms
    return received_ms


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and math.isfinite(value) and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _enum_name(enum: Any, value: int) -> str:
    try:
        return str(enum.Name(value))
    except ValueError:
        return f"UNKNOWN_{value}"


def parse_chirpstack_reference(
    topic: str, payload: bytes, received_ms: int, encoding: Literal["json", "protobuf"]
) -> Event:
    """Parse one ChirpStack event the old way; raise `EventError` when it is not well-formed."""
    kind = event_type(topic)
    if kind not in ("up", "log"):
        return Ignored(kind)
    raw_object: Mapping[str, Any] | None = None
    message = integration_pb2.UplinkEvent() if kind == "up" else integration_pb2.LogEvent()
    try:
        if encoding == "json":
            document = json.loads(payload)
            if not isinstance(document, dict):
                raise EventError(f"{kind} event is not a JSON object")
            json_format.ParseDict(document, message, ignore_unknown_fields=True)
            if isinstance(document.get("object"), dict):
                raw_object = document["object"]  # keeps integers that the JSON had
        else:
            message.ParseFromString(payload)
    except (ValueError, OverflowError, json_format.ParseError, ProtobufDecodeError, RecursionError) as exc:
        raise EventError(f"{kind} event does not parse as {encoding}: {exc}") from None
    dev_eui = message.device_info.dev_eui.lower()
    if not _DEV_EUI.fullmatch(dev_eui):
        raise EventError(f"{kind} event has no valid deviceInfo.devEui ({dev_eui[:40]!r})")
    device = DeviceKey("dev_eui", dev_eui)
    if isinstance(message, integration_pb2.LogEvent):
        return DeviceLog(
            device=device,
            code=_enum_name(integration_pb2.LogCode, message.code),
            level=_enum_name(integration_pb2.LogLevel, message.level),
            description=message.description[:500],
            received_ms=received_ms,
        )
    if not message.deduplication_id:
        raise EventError("uplink event has no deduplicationId")
    if len(message.deduplication_id) > MAX_DEDUPLICATION_ID:
        raise EventError("uplink event's deduplicationId is too long")
    if raw_object is None and message.HasField("object"):
        try:
            raw_object = _integral(json_format.MessageToDict(message.object))
        except (ValueError, json_format.Error) as exc:
            raise EventError(f"uplink event's decoded object cannot be read: {exc}") from None
    meta: dict[str, Any] = {"dev_eui": dev_eui, "f_cnt": message.f_cnt, "f_port": message.f_port}
    if message.rx_info:
        best = max(message.rx_info, key=lambda rx: rx.rssi)
        meta["rssi"] = best.rssi
        if math.isfinite(best.snr):
            meta["snr"] = round(best.snr, 2)
    return Uplink(
        source=f"chirpstack/{message.deduplication_id}",
        dedup_key=f"chirpstack/{dev_eui}/{message.deduplication_id}",
        device=device,
        payload=bytes(message.data),
        time_ms=_uplink_time_ms(message, received_ms),
        received_ms=received_ms,
        f_port=message.f_port,
        meta=meta,
        object=raw_object,
        network_tenant=message.device_info.tenant_id or None,
    )
