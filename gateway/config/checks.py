"""Checks beyond the models: what validates but is most likely not what was meant.

A warning never stops `run` or fails `check`: a metric override for a measurement a newer firmware
sends must not block a field engineer, nor a map file kept empty on purpose.
"""

from __future__ import annotations

from typing import Any

from gateway.codecs import CODECS
from gateway.config.devices import DeviceEntryBase
from gateway.config.suggest import did_you_mean
from gateway.config.yamlfile import YamlDocument
from gateway.errors import Problem

#: A codec whose names are this few lists them when an override matches none.
_LIST_AT_MOST = 6


def unknown_override_warnings(entry: DeviceEntryBase, index: int, doc: YamlDocument) -> list[Problem]:
    """A `metrics` override whose name matches no metric the entry's codec gives (an override of
    NAME also covers NAME_min and NAME_max), with the name it was probably meant to be."""
    codec = CODECS[entry.codec]
    if codec.metric_names is None or not entry.metrics:
        return []  # the device decides its names (chirpstack-object)
    names = codec.metric_names(entry.options)
    warnings = []
    for key in entry.metrics:
        if key in names or f"{key}_min" in names or f"{key}_max" in names:
            continue
        line, col = doc.locate_key(["devices", index, "metrics", key])
        hint = did_you_mean(key, names)
        if not hint and 0 < len(names) <= _LIST_AT_MOST:
            hint = f"it gives {', '.join(repr(n) for n in sorted(names))}"
        message = f"devices.{index}.metrics: unknown metric {key!r} for codec {codec.name}"
        message += f" ({hint})" if hint else ""
        message += "; this override changes nothing unless a metric of exactly that name is decoded"
        warnings.append(Problem(str(doc.path), line, col, message))
    return warnings


def syntax_hint(value: Any) -> str:
    """Why a value YAML read as text or a mapping may not be what was written: `id:gw` (no space
    after ':') is one string; `-dev_eui: x` (no space after '-') is a key, not a list item."""
    if isinstance(value, str) and ":" in value and ": " not in value:
        key, _, rest = value.partition(":")
        if key.isidentifier() and rest and not rest.startswith("/"):
            return f" (a space is missing after ':'? write '{key}: {rest}')"
    if isinstance(value, dict):
        dashed = next((k for k in value if isinstance(k, str) and k.startswith("-") and len(k) > 1), None)
        if dashed is not None:
            return f" (a list item needs a space after '-': write '- {dashed[1:]}: ...')"
    return ""
