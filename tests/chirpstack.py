"""ChirpStack v4 events for tests, built with chirpstack-api's own message types."""

from __future__ import annotations

import uuid
from typing import Any

from chirpstack_api.integration import integration_pb2
from google.protobuf import json_format

TENANT = "52f14cd4-c6f1-4fbd-8f87-4025e1d49242"
APP = "0b5f3a5e-7b4a-4d6c-9a51-1e4c1c7d2f10"


def uplink_event(
    dev_eui: str,
    data: bytes,
    *,
    f_port: int = 1,
    f_cnt: int = 1,
    time_ms: int | None = 1_795_000_000_000,
    dedup_id: str | None = None,
    tenant_id: str = TENANT,
    obj: dict[str, Any] | None = None,
    rssi: int = -80,
    snr: float = 7.5,
) -> Any:
    """An `integration.UplinkEvent` as ChirpStack builds it."""
    ev = integration_pb2.UplinkEvent(deduplication_id=dedup_id or str(uuid.uuid4()))
    if time_ms is not None:
        ev.time.FromMilliseconds(time_ms)
    ev.device_info.dev_eui = dev_eui
    ev.device_info.tenant_id = tenant_id
    ev.device_info.application_id = APP
    ev.f_cnt = f_cnt
    ev.f_port = f_port
    ev.data = data
    if obj is not None:
        ev.object.update(obj)
    rx = ev.rx_info.add()
    rx.gateway_id = "0016c001ff10a235"
    rx.rssi = rssi
    rx.snr = snr
    return ev


def log_event(dev_eui: str, code: str = "UPLINK_CODEC", description: str = "js error") -> Any:
    """An `integration.LogEvent` (codec error, frame-counter reset, ...)."""
    ev = integration_pb2.LogEvent(
        level=integration_pb2.LogLevel.ERROR, code=integration_pb2.LogCode.Value(code), description=description
    )
    ev.device_info.dev_eui = dev_eui
    ev.device_info.tenant_id = TENANT
    return ev


def topic(dev_eui: str, event: str = "up") -> str:
    """The topic ChirpStack's MQTT integration publishes an event on."""
    return f"application/{APP}/device/{dev_eui}/event/{event}"


def encode(ev: Any, encoding: str) -> bytes:
    """The event as ChirpStack sends it with `json=true` (protobuf JSON mapping) or `json=false`."""
    if encoding == "json":
        return json_format.MessageToJson(ev).encode()
    return bytes(ev.SerializeToString())
