"""The `hub.readings.v1` message: how series are written, how a message is put together,
and how the cloud side expands one into `sensor_readings` rows.

Series are encoded to JSON once, when an uplink is stored; a batch is then the header, the
stored series texts joined by commas, and the footer, optionally gzip-compressed. So a batch
costs a string join and a compression, not a re-encoding of every reading.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.model import DecodedUplink, Value

SCHEMA = "hub.readings.v1"
CONTENT_TYPE = "application/vnd.hub.readings.v1+json"

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def encode_series(uplink: DecodedUplink) -> str:
    """The series of one uplink as JSON objects joined by commas (no enclosing brackets).

    Readings are grouped by (metric, unit) in the order the codec produced them; each series
    carries the uplink's `source` and `meta`, so row expansion needs nothing else. This runs
    once per uplink at intake, so it is written for speed: the parts every series shares are
    encoded once, names through a cache, numbers with `repr` (what the JSON encoder uses).
    The text is the same as `json.dumps` of the series objects with compact separators.
    """
    groups: dict[tuple[str, str | None], tuple[list[int], list[Value]]] = {}
    for r in uplink.readings:
        ts, vs = groups.setdefault((r.metric, r.unit), ([], []))
        ts.append(r.t_ms)
        vs.append(r.value)
    head = '{"sensor_id":' + _name(uplink.sensor_id) + ',"metric":'
    shared = ',"source":' + _dumps(uplink.source)
    if uplink.meta:
        shared += ',"meta":' + _meta(uplink.meta)
    shared += ',"t":['
    parts = []
    for (metric, unit), (ts, vs) in groups.items():
        unit_part = "" if unit is None else ',"unit":' + _name(unit)
        if len(ts) == 1:  # the common case: one reading per metric per uplink
            t, v = ts[0], vs[0]
            times = str(t) if type(t) is int else _dumps(t)
            kind = type(v)
            values = f"[{v!r}]" if kind is int or (kind is float and math.isfinite(v)) else _dumps(vs)  # type: ignore[arg-type]
        else:
            times = ",".join(map(str, ts)) if all(type(t) is int for t in ts) else _dumps(ts)[1:-1]
            values = _values(vs)
        parts.append(f'{head}{_name(metric)}{unit_part}{shared}{times}],"v":{values}}}')
    return ",".join(parts)


@functools.lru_cache(maxsize=4096)
def _name(text: str) -> str:
    """A sensor id, metric or unit as a JSON string (they repeat: cached)."""
    return _dumps(text)


def _meta(meta: Mapping[str, Any]) -> str:
    """An uplink's meta as a JSON object: text keys with whole numbers, finite floats and
    text by the cached pieces; anything else (None, a boolean, a list) by the encoder."""
    parts = []
    for key, v in meta.items():
        kind = type(v)
        if kind is int:
            text = str(v)
        elif kind is float and math.isfinite(v):
            text = repr(v)
        elif kind is str:
            text = _name(v)
        else:
            return _dumps(dict(meta))
        if type(key) is not str:
            return _dumps(dict(meta))
        parts.append(f"{_name(key)}:{text}")
    return "{" + ",".join(parts) + "}"


def _values(vs: list[Value]) -> str:
    """A JSON array of values: plain ints and finite floats by repr, anything else by the encoder."""
    for v in vs:
        kind = type(v)
        if not (kind is int or (kind is float and math.isfinite(v))):  # type: ignore[arg-type]
            return _dumps(vs)
    return "[" + ",".join(map(repr, vs)) + "]"


@dataclass(frozen=True, slots=True)
class Header:
    """The fields of a message besides its series."""

    batch_id: str
    gateway_id: str
    tenant_id: str
    site_id: str
    created_at: int
    meta: Mapping[str, Any] | None = None


def assemble(header: Header, series_texts: Sequence[str]) -> bytes:
    """The message's JSON bytes: header fields, optional `meta`, then the series."""
    head: dict[str, Any] = {
        "schema": SCHEMA,
        "batch_id": header.batch_id,
        "gateway_id": header.gateway_id,
        "tenant_id": header.tenant_id,
        "site_id": header.site_id,
        "created_at": header.created_at,
    }
    if header.meta:
        head["meta"] = dict(header.meta)
    text = _dumps(head)[:-1] + ',"series":[' + ",".join(t for t in series_texts if t) + "]}"
    return text.encode("utf-8")


def compress(body: bytes) -> bytes:
    """gzip with a fixed mtime, so a message's bytes depend only on its content."""
    return gzip.compress(body, compresslevel=6, mtime=0)


def decode_message(payload: bytes, gzipped: bool | None = None) -> dict[str, Any]:
    """Parse a message as the cloud receives it (gzip detected by its magic if not told)."""
    if gzipped is None:
        gzipped = payload[:2] == b"\x1f\x8b"
    body = gzip.decompress(payload) if gzipped else payload
    message: dict[str, Any] = json.loads(body)
    return message


def expand_rows(message: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The `sensor_readings` rows a message expands into (SPEC section 8).

    `load_timestamp` is the loader's and is not produced here.
    """
    for series in message["series"]:
        ts, vs = series["t"], series["v"]
        if len(ts) != len(vs):
            raise ValueError(f"series {series.get('sensor_id')}/{series.get('metric')}: t and v differ in length")
        metadata = dict(series.get("meta") or {})
        if series.get("unit") is not None:
            metadata["unit"] = series["unit"]
        metadata["site_id"] = message["site_id"]
        metadata["gateway_id"] = message["gateway_id"]
        for t, v in zip(ts, vs, strict=True):
            yield {
                "tenant_id": message["tenant_id"],
                "sensor_id": series["sensor_id"],
                "timestamp": t,
                "metric_name": series["metric"],
                "metric_value": v,
                "metadata": metadata,
                "record_source": series["source"],
                "job_id": message["batch_id"],
            }
