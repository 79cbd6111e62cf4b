"""Device-map models: which device is which sensor, decoded by which codec, named how.

Each codec owns its options model; a device entry is a discriminated union on `codec`, built
from the codec registry, so `options` are validated against the codec the entry names.
"""

from __future__ import annotations

import math
import re
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from gateway.codecs import CODECS
from gateway.config.types import Strict, schema_pattern
from gateway.errors import Problem
from gateway.model import DeviceKey

# Matched with fullmatch (`$` would also accept a trailing newline); schema_pattern anchors
# them for editors.
# 16 hex digits, or 8 hex pairs separated by '-', ':' or ' ' as consoles and labels print them
# (70-B3-D5-7E-D0-00-12-34, 70:b3:..., TTN's "70 B3 D5 ..."); stored as 16 lower-case digits.
_DEV_EUI = re.compile(r"[0-9A-Fa-f]{2}(?:[-: ]?[0-9A-Fa-f]{2}){7}")
_OSM_ID = re.compile(r"[0-9A-Fa-f]{8}")
_SENSOR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_METRIC = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}")
_TAG_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_TENANT_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
TAG_TEXT_MAX = 256
# Tags end up in Snowflake's metadata; an integer there must fit NUMBER(38).
TAG_INT_LIMIT = 10**38


def _matching(pattern: re.Pattern[str], what: str) -> Any:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(what + _first_foreign(value))
        return value

    return AfterValidator(check)


def _first_foreign(value: str) -> str:
    """Names the first non-ASCII character of `value`: `é` looks like a letter but is not one here."""
    char = next((c for c in value if not c.isascii()), None)
    if char is None:
        return ""
    return f" ({value!r} has {char!r}, {unicodedata.name(char, 'a character')}, which is not ASCII)"


def _dev_eui(value: str) -> str:
    """A DevEUI as 16 lower-case hex digits, whichever way it was written."""
    if not _DEV_EUI.fullmatch(value):
        raise ValueError(
            "dev_eui must be 16 hex digits, e.g. 70b3d57ed0001234 (or 8 pairs separated by '-', ':' or spaces)"
        )
    return re.sub(r"[-: ]", "", value).lower()


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, not {value}")
    return value


def _tag_value(value: str | int | float | bool) -> str | int | float | bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) >= TAG_INT_LIMIT:
        raise ValueError("integer tag is too large: the cloud stores at most 38 digits (NUMBER(38))")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"tag value {value} is not a finite number")
    if isinstance(value, str) and len(value) > TAG_TEXT_MAX:
        raise ValueError(f"tag value is {len(value)} characters long; at most {TAG_TEXT_MAX} are allowed")
    return value


def _tenant_uuid(value: str) -> str:
    """A ChirpStack tenant id: a UUID written 8-4-4-4-12, any case; kept in canonical lower case."""
    if not _TENANT_UUID.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a UUID (ChirpStack shows the tenant id as xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
        )
    return str(uuid.UUID(value))


DevEui = Annotated[
    str,
    AfterValidator(_dev_eui),
    WithJsonSchema({"type": "string", "pattern": schema_pattern(_DEV_EUI)}),
]
OsmId = Annotated[
    str,
    _matching(_OSM_ID, "osm_id must be the 8 hex digits of the unit's HWID, e.g. 0A1B2C3D"),
    AfterValidator(str.upper),
    WithJsonSchema({"type": "string", "pattern": schema_pattern(_OSM_ID)}),
]
SensorId = Annotated[
    str,
    _matching(
        _SENSOR_ID,
        "sensor_id must be 1-128 ASCII letters (a-z, A-Z), digits, '.', '_', ':' or '-', starting with a "
        "letter or digit",
    ),
    WithJsonSchema({"type": "string", "pattern": schema_pattern(_SENSOR_ID)}),
]
MetricName = Annotated[
    str,
    _matching(_METRIC, "metric names are 1-128 ASCII letters (a-z, A-Z), digits, '_', '.', ':' or '-'"),
    WithJsonSchema({"type": "string", "pattern": schema_pattern(_METRIC)}),
]
FiniteFloat = Annotated[float, AfterValidator(_finite)]
TagKey = Annotated[
    str,
    _matching(_TAG_KEY, "tag names are 1-64 ASCII letters (a-z, A-Z), digits, '_', '.', ':' or '-'"),
]


def _tag_given(value: Any) -> Any:
    if value is None:
        raise ValueError("this tag has no value (empty or null): give it one, or remove the tag")
    return value


TagValue = Annotated[str | int | float | bool, BeforeValidator(_tag_given), AfterValidator(_tag_value)]
Tags = Annotated[
    dict[TagKey, TagValue],
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": schema_pattern(_TAG_KEY)},
            "additionalProperties": {
                "anyOf": [
                    {"type": "string", "maxLength": TAG_TEXT_MAX},
                    {"type": "integer", "exclusiveMinimum": -TAG_INT_LIMIT, "exclusiveMaximum": TAG_INT_LIMIT},
                    {"type": "number"},
                    {"type": "boolean"},
                ]
            },
        }
    ),
]
ChirpStackTenantId = Annotated[
    str,
    AfterValidator(_tenant_uuid),
    WithJsonSchema({"type": "string", "pattern": schema_pattern(_TENANT_UUID)}),
]


class MetricOverride(Strict):
    """How one decoded metric is renamed, scaled and labelled for the cloud."""

    name: MetricName | None = Field(default=None, description="Name the cloud sees instead of the codec's.")
    scale: FiniteFloat | None = Field(default=None, description="Multiply the value by this.")
    offset: FiniteFloat | None = Field(default=None, description="Then add this.")
    unit: str | None = Field(default=None, max_length=32, description="Unit the cloud sees.")


class DeviceEntryBase(Strict):
    """Fields every device entry has, whatever its codec."""

    dev_eui: DevEui | None = Field(
        default=None,
        description="LoRaWAN DevEUI: 16 hex digits, any case; pairs may be separated by '-', ':' or "
        "spaces (70-B3-D5-7E-D0-00-12-34). Stored as 16 lower-case digits.",
    )
    osm_id: OsmId | None = Field(default=None, description="OSM Wi-Fi/PoE unit: the 8-hex HWID in its topic.")
    sensor_id: SensorId = Field(
        description="What the cloud sees; unique within the tenant. 1-128 ASCII letters, digits, '.', '_', "
        "':' or '-', starting with a letter or digit."
    )
    tags: Tags = Field(
        default_factory=dict,
        description="Copied into every series' meta (what the network measured wins over a tag of "
        "the same name). Names: 1-64 letters, digits, '_', '.', ':' or '-'; values: text of at most "
        "256 characters, finite numbers, integers of at most 38 digits, or true/false.",
    )
    metrics: dict[str, MetricOverride] = Field(
        default_factory=dict, description="Per decoded metric: rename, scale, offset, unit."
    )
    chirpstack_tenant_id: ChirpStackTenantId | None = Field(
        default=None,
        description="ChirpStack tenant (UUID) the LoRaWAN device must belong to; uplinks from another "
        "tenant, or that name none, are dropped and counted. Defaults to the file's chirpstack_tenant_id.",
    )

    @model_validator(mode="after")
    def _one_identity(self) -> DeviceEntryBase:
        if (self.dev_eui is None) == (self.osm_id is None):
            raise ValueError("give exactly one of dev_eui (LoRaWAN) or osm_id (OSM Wi-Fi/PoE)")
        if self.osm_id is not None and self.chirpstack_tenant_id is not None:
            # OSM units publish directly, not through ChirpStack: none of their uplinks would pass.
            raise ValueError(
                "chirpstack_tenant_id is for LoRaWAN devices (dev_eui); an OSM unit has no ChirpStack tenant"
            )
        return self

    @property
    def key(self) -> DeviceKey:
        """The identity uplinks of this device carry."""
        if self.dev_eui is not None:
            return DeviceKey("dev_eui", self.dev_eui)
        assert self.osm_id is not None
        return DeviceKey("osm_id", self.osm_id)

    if TYPE_CHECKING:  # every variant built by _entry_model has these
        codec: str
        options: Any


def _entry_model(name: str) -> type[DeviceEntryBase]:
    """The device-entry model of one codec: `codec` is its name, `options` its options model."""
    codec = CODECS[name]
    model: type[DeviceEntryBase] = create_model(
        "Device_" + re.sub(r"\W", "_", name),
        __base__=DeviceEntryBase,
        __doc__=f"A device decoded by the {name} codec.",
        codec=(Literal[name], Field(description="The codec that decodes this device's payloads.")),  # type: ignore[arg-type]
        options=(codec.options, Field(default_factory=codec.options, description=f"Options of {name}.")),
    )
    return model


# A discriminated union on `codec`, one variant per registered codec. Type checkers see the
# common base, which is what the rest of the code relies on.
if TYPE_CHECKING:
    DeviceEntry = DeviceEntryBase
else:
    DeviceEntry = Annotated[
        Union[tuple(_entry_model(name) for name in CODECS)],  # noqa: UP007
        Field(discriminator="codec"),
    ]


class DeviceMapFile(Strict):
    """One device-map file."""

    chirpstack_tenant_id: ChirpStackTenantId | None = Field(
        default=None,
        description="ChirpStack tenant (UUID) every LoRaWAN (dev_eui) device in this file must belong to.",
    )
    devices: list[DeviceEntry] = Field(default_factory=list, description="The devices.")

    @field_validator("devices", mode="before")
    @classmethod
    def _no_entries_yet(cls, value: Any) -> Any:
        """`devices:` with nothing under it is an empty list (check warns), not a type error."""
        return [] if value is None else value


@dataclass(frozen=True)
class MappedDevice:
    """A device entry with where it was defined."""

    entry: DeviceEntryBase
    file: str
    line: int
    col: int

    @property
    def where(self) -> str:
        """FILE:LINE:COL of the entry."""
        return f"{self.file}:{self.line}:{self.col}"

    @property
    def network_tenant(self) -> str | None:
        """The ChirpStack tenant this device must belong to, if the map says."""
        return self.entry.chirpstack_tenant_id


@dataclass(frozen=True)
class DeviceMap:
    """All devices of all map files, looked up by the identity an uplink carries."""

    by_key: Mapping[DeviceKey, MappedDevice]
    #: What validates but is most likely a mistake (an override of a metric the codec never
    #: gives, a file with no devices); a reload may log them, they never reject the map.
    warnings: tuple[Problem, ...] = ()

    def get(self, key: DeviceKey) -> MappedDevice | None:
        """The device for this identity, or None when no map names it."""
        return self.by_key.get(key)

    def __len__(self) -> int:
        return len(self.by_key)

    def changes_from(self, old: DeviceMap) -> dict[str, list[str]]:
        """What a reload from `old` to this map does, device by device: `added`, `removed` and
        `changed` (any key of its entry), each device named `sensor_id (dev_eui:...)`. A sensor
        whose id changed (a typo corrected) is one change, `sensor_id (old id -> new id)`."""

        def named(key: DeviceKey, mapped: MappedDevice) -> str:
            return f"{mapped.entry.sensor_id} ({key})"

        added = {k: m for k, m in self.by_key.items() if k not in old.by_key}
        removed = {k: m for k, m in old.by_key.items() if k not in self.by_key}
        gone_by_sensor = {m.entry.sensor_id: k for k, m in removed.items()}
        moved = {k: gone_by_sensor[m.entry.sensor_id] for k, m in added.items() if m.entry.sensor_id in gone_by_sensor}
        return {
            "added": [named(k, m) for k, m in added.items() if k not in moved],
            "removed": [named(k, m) for k, m in removed.items() if k not in moved.values()],
            "changed": [
                named(k, m) for k, m in self.by_key.items() if k in old.by_key and old.by_key[k].entry != m.entry
            ]
            + [f"{added[k].entry.sensor_id} ({was} -> {k})" for k, was in moved.items()],
        }
