"""Default units of OSM measurements by the name the firmware gives them.

From the firmware's measurement definitions (devtank-ltd/osm_firmware_v2); a device map's
`metrics` entry overrides any of them. `_min`/`_max` metrics take the unit of their measurement.
`OSM_METRICS` are the names the firmware gives (an averaged measurement adds `_min`/`_max`); a
unit can be configured with others (Modbus registers, renamed inputs), so they are the known
names, not the only possible ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

_UNITS = {
    "CC1": "mA",  # current clamps, RMS
    "CC2": "mA",
    "CC3": "mA",
    "TEMP": "degC",  # HTU21D (RevC and earlier)
    "HUMI": "%RH",
    "TMP2": "degC",  # DS18B20 1-Wire probes
    "TMP3": "degC",
    "TMP5": "degC",  # SEN5x/SEN6x (RevD and later)
    "HUM2": "%RH",
    "TMP6": "degC",  # PoE module, local and remote
    "TMP7": "degC",
    "PM1": "ug/m3",
    "PM4": "ug/m3",
    "PM10": "ug/m3",
    "PM25": "ug/m3",
    "VOC": "index",  # Sensirion VOC / NOx index, no physical unit
    "NOX": "index",
    "CO2": "ppm",
    "HCHO": "ppb",
    "LGHT": "lx",
    "SND": "dBA",
    "BAT": "%",
    "FTA1": "mA",  # 4-20 mA inputs (renamable on the unit)
    "FTA2": "mA",
    "FTA3": "mA",
    "FTA4": "mA",
    "CNT1": "pulses",  # pulse count since the last acknowledged send (a delta)
    "CNT2": "pulses",
    "PCNT": "pulses",
}

OSM_UNITS: Mapping[str, str] = MappingProxyType(_UNITS)

# Measurements of the firmware's table that have no unit: the firmware's git hash, the
# config revision counter and an RS232 response.
_WITHOUT_UNIT = ("FW", "CREV", "R232")

#: Every metric name the firmware's own measurements give, `_min`/`_max` included.
OSM_METRICS: frozenset[str] = frozenset(
    name + suffix for name in (*_UNITS, *_WITHOUT_UNIT) for suffix in ("", "_min", "_max")
)


def osm_unit(metric: str) -> str | None:
    """The unit of an OSM metric, `_min`/`_max` included; None when the vendor gives none."""
    base = metric.removesuffix("_min").removesuffix("_max")
    return _UNITS.get(base)
