"""The devices stage: who sent this uplink, which codec decodes it, what the cloud calls it.

`resolve` turns an `Uplink` into one outcome: a `DecodedUplink` ready for the buffer, a
`DeadLetter` (the codec rejected the payload), `Unmapped` (no device map names the device)
or `ForeignTenant` (the device belongs to another ChirpStack tenant than its map says, or the
uplink names no tenant while the map expects one: the check fails closed).

Tags from the map go into the series' meta; a tag named like a value the network measured
(`rssi`, `f_cnt`, ...) loses to the network's value.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from gateway.codecs import CODECS, DecodeContext
from gateway.config.devices import DeviceEntryBase, DeviceMap
from gateway.errors import DecodeError
from gateway.model import (
    DeadLetter,
    DecodedUplink,
    ForeignTenant,
    Outcome,
    Reading,
    Unmapped,
    Uplink,
    Value,
)


def _scaled(value: Value, scale: float | None, offset: float | None) -> Value:
    """value * scale + offset; integers stay exact integers when scale and offset are whole."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (scale is None and offset is None):
        return value
    s = 1.0 if scale is None else scale
    o = 0.0 if offset is None else offset
    if isinstance(value, int) and float(s).is_integer() and float(o).is_integer():
        return value * int(s) + int(o)
    # 12100 * 0.001 is 12.100000000000001 in binary; no sensor has that precision. 15
    # significant digits keep every digit a double holds exactly (a u64 counter scaled too).
    return float(f"{value * s + o:.15g}")


def apply_overrides(readings: list[Reading], entry: DeviceEntryBase, default_units: Any) -> list[Reading]:
    """Rename, scale, offset and label readings as the device map's `metrics` say."""
    overrides = entry.metrics
    if not overrides:  # the common case: nothing to rename or scale, and often no unit to add
        for r in readings:
            if r.unit is None:
                break
        else:
            return readings
    out = []
    for r in readings:
        unit = r.unit
        if unit is None and default_units is not None:
            unit = default_units.get(r.metric.removesuffix("_min").removesuffix("_max"))
        o = overrides.get(r.metric)
        if o is None:
            # An override of NAME also covers NAME_min and NAME_max.
            base = r.metric.removesuffix("_min").removesuffix("_max")
            base_o = overrides.get(base) if base != r.metric else None
            if base_o is not None:
                suffix = r.metric[len(base) :]
                name = (base_o.name + suffix) if base_o.name else r.metric
                value = _scaled(r.value, base_o.scale, base_o.offset)
                out.append(Reading(name, value, base_o.unit or unit, r.t_ms))
            else:
                out.append(r if unit == r.unit else Reading(r.metric, r.value, unit, r.t_ms))
            continue
        value = _scaled(r.value, o.scale, o.offset)
        out.append(Reading(o.name or r.metric, value, o.unit or unit, r.t_ms))
    return out


def _tenant_key(tenant: str | None) -> uuid.UUID | None:
    """A ChirpStack tenant id as a UUID; None for an absent, empty or malformed one."""
    try:
        return uuid.UUID(tenant) if tenant else None
    except ValueError:
        return None


def _same_tenant(expected: str, network_tenant: str | None) -> bool:
    """Fail closed: an uplink that names no tenant, or an unreadable one, is not the expected tenant's."""
    want = _tenant_key(expected)
    return want is not None and want == _tenant_key(network_tenant)


def resolve(uplink: Uplink, devices: DeviceMap) -> Outcome:
    """Map, check and decode one uplink. Never raises for a bad payload: that is a dead letter."""
    mapped = devices.get(uplink.device)
    if mapped is None:
        return Unmapped(uplink)
    entry = mapped.entry
    expected = mapped.network_tenant
    if expected is not None and not _same_tenant(expected, uplink.network_tenant):
        return ForeignTenant(uplink, entry.sensor_id, expected)
    codec = CODECS[entry.codec]
    ctx = DecodeContext(
        uplink_time_ms=uplink.time_ms,
        received_ms=uplink.received_ms,
        f_port=uplink.f_port,
        object=uplink.object,
        options=entry.options,
    )

    try:
        readings = codec.decode(uplink.payload, ctx)
    except DecodeError as exc:
        return _refused(uplink, codec.name, entry.sensor_id, str(exc))
    unmatched: tuple[str, ...] = ()
    produced: tuple[str, ...] = ()
    if entry.metrics:
        names = {r.metric for r in readings}
        covered = names | {n.removesuffix("_min").removesuffix("_max") for n in names}
        unmatched = tuple(key for key in entry.metrics if key not in covered)
        produced = tuple(sorted(names)) if unmatched else ()
    try:
        readings = apply_overrides(readings, entry, codec.default_units)
    except OverflowError as exc:  # a value beyond a double's range once scaled
        return _refused(uplink, codec.name, entry.sensor_id, f"a value is too large to scale: {exc}")
    for r in readings:  # a loop, not a generator: this runs for every uplink
        if isinstance(r.value, float) and not math.isfinite(r.value):
            return _refused(uplink, codec.name, entry.sensor_id, f"{r.metric} is {r.value} (not a finite number)")
    meta: dict[str, Any] = dict(entry.tags)
    meta.update(uplink.meta)  # what the network measured wins over a tag of the same name
    return DecodedUplink(
        source=uplink.source,
        sensor_id=entry.sensor_id,
        device=uplink.device,
        received_ms=uplink.received_ms,
        meta=meta,
        readings=tuple(readings),
        dedup_key=uplink.dedup_key,
        payload=uplink.payload,
        unmatched_overrides=unmatched,
        codec_metrics=produced,
    )


def _refused(uplink: Uplink, codec: str, sensor_id: str, why: str) -> DeadLetter:
    """The uplink as a dead letter, kept whole so a corrected map can decode it again."""
    return DeadLetter(
        device=uplink.device,
        source=uplink.source,
        f_port=uplink.f_port,
        reason=f"{codec}: {why}",
        payload=uplink.payload,
        received_ms=uplink.received_ms,
        sensor_id=sensor_id,
        uplink=uplink,
        dedup_key=uplink.dedup_key,
    )
