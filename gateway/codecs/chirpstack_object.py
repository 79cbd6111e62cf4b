"""`chirpstack-object`: the `object` that ChirpStack's own payload codec decoded.

Vendor: any. Devices: every device whose ChirpStack device profile has a JavaScript codec
(the vendor's `decodeUplink`, e.g. from the LoRaWAN device repository), so the gateway needs no
codec of its own for it. fPorts: all; the payload bytes and fPort are not read here, only the
decoded `object` of the uplink event.

Every number, boolean or string leaf becomes a metric named by its dotted path: `{"a": {"b":
1}}` gives `a.b`, list items are numbered, `{"t": [20, 21]}` gives `t.0` and `t.1`. Integers
stay integers where the event's JSON had them; null leaves are skipped; an empty object gives
no readings. Timestamp: the uplink's time. The names depend on the device's own codec, so this
codec has no `metric_names` and `check` cannot flag a mistyped `metrics` override.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.codecs.base import Codec, CodecOptions, DecodeContext, DecodeError
from gateway.model import Reading


class ChirpstackObjectOptions(CodecOptions):
    """Options of `chirpstack-object`: none yet."""


def decode(payload: bytes, ctx: DecodeContext) -> list[Reading]:
    """Flatten the uplink's decoded `object` into readings at the uplink's time."""
    if ctx.object is None:
        raise DecodeError("uplink has no decoded object")
    t = ctx.uplink_time_ms
    readings: list[Reading] = []
    # Depth first, in the object's own order, without recursion: a codec's object may nest
    # deeper than Python's recursion limit allows.
    stack: list[tuple[str, Any]] = [("", ctx.object)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, Mapping):
            children = [(f"{path}.{key}" if path else str(key), value) for key, value in node.items()]
        elif isinstance(node, Sequence) and not isinstance(node, str | bytes | bytearray):
            children = [(f"{path}.{i}" if path else str(i), value) for i, value in enumerate(node)]
        elif node is None:
            continue
        elif not path:
            raise DecodeError("a leaf of the object has an empty name")
        elif isinstance(node, bool | int | str):
            readings.append(Reading(path, node, None, t))
            continue
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise DecodeError(f"{path} is {node} (not a finite number)")
            readings.append(Reading(path, node, None, t))
            continue
        else:
            raise DecodeError(f"{path} is a {type(node).__name__}, not a number, boolean or string")
        stack.extend(reversed(children))
    return readings


CODEC = Codec(name="chirpstack-object", options=ChirpstackObjectOptions, decode=decode)
