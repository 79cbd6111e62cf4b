"""Edge cases of the codecs and their place in the registry and in device maps."""

from __future__ import annotations

import importlib
import json
import struct

import pytest
from pydantic import ValidationError

from gateway.codecs import CODECS, DecodeContext, DecodeError
from gateway.config.devices import DeviceMap, DeviceMapFile, MappedDevice
from gateway.devices import resolve
from gateway.model import DecodedUplink, DeviceKey, Reading, Uplink

T = 1_795_000_000_000
RECEIVED = 1_795_000_000_500
MODULES = ["osm_v2", "osm_json", "cayenne_lpp", "packed_samples", "chirpstack_object"]


def _ctx(name: str, **kwargs: object) -> DecodeContext:
    options = kwargs.pop("options", {})
    return DecodeContext(
        uplink_time_ms=T,
        received_ms=RECEIVED,
        options=CODECS[name].options.model_validate(options),
        **kwargs,  # type: ignore[arg-type]
    )


# --- registry and options ---------------------------------------------------------------


def test_registry_names_every_built_in_codec() -> None:
    """The registry holds exactly the codecs of SPEC section 6, each under its map name."""
    assert sorted(CODECS) == ["cayenne-lpp", "chirpstack-object", "osm-json", "osm-v2", "packed-samples"]


@pytest.mark.parametrize("module", MODULES)
def test_codec_module_documents_vendor_devices_and_fports(module: str) -> None:
    """Each codec module's docstring names the vendor, the devices and the fPorts."""
    doc = importlib.import_module(f"gateway.codecs.{module}").__doc__ or ""
    for word in ("Vendor:", "Devices:", "fPort"):
        assert word in doc, f"{module} docstring lacks {word!r}"


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_option_has_a_description_and_typos_are_errors(name: str) -> None:
    """Every option field carries a description for the schema, and unknown keys are rejected."""
    model = CODECS[name].options
    for field, info in model.model_fields.items():
        assert info.description, f"{name}: option {field} has no description"
    with pytest.raises(ValidationError):
        model.model_validate({"no_such_option": 1})


def test_packed_samples_options_in_a_device_map() -> None:
    """A device map's `ports` keys (strings in YAML flow maps or ints) become fPort ints, and a
    bad port or a typo inside a port entry is a map error."""
    entry = {
        "dev_eui": "70b3d57ed0005678",
        "sensor_id": "lathe-07-util",
        "codec": "packed-samples",
        "options": {"ports": {10: {"metric": "current", "scale": 0.01, "unit": "A"}, "11": {"metric": "load"}}},
    }
    parsed = DeviceMapFile.model_validate({"devices": [entry]})
    ports = parsed.devices[0].options.ports
    assert sorted(ports) == [10, 11] and ports[10].scale == 0.01 and ports[11].offset == 0.0
    for bad in ({0: {"metric": "x"}}, {10: {"metric": "x", "scael": 2}}, {10: {"metric": "bad name"}}):
        with pytest.raises(ValidationError):
            DeviceMapFile.model_validate({"devices": [{**entry, "options": {"ports": bad}}]})
    with pytest.raises(ValidationError):
        DeviceMapFile.model_validate(
            {"devices": [{**entry, "options": {"ports": {10: {"metric": "x", "scale": "nan"}}}}]}
        )


# --- osm-v2 -----------------------------------------------------------------------------


def test_osm_v2_string_keeps_inner_characters_and_strips_padding() -> None:
    """An 8-byte string is NUL-stripped at the end only; a full 8-character string is kept whole."""
    frame = bytes.fromhex("02465700000120") + b"12345678"
    [reading] = CODECS["osm-v2"].decode(frame, _ctx("osm-v2", f_port=1))
    assert reading.value == "12345678" and isinstance(reading.value, str)


def test_osm_v2_non_ascii_string_is_rejected() -> None:
    """A string value with bytes above 0x7F is a dead letter, not mojibake."""
    frame = bytes.fromhex("02465700000120ff00000000000000")
    with pytest.raises(DecodeError, match="not ASCII"):
        CODECS["osm-v2"].decode(frame, _ctx("osm-v2", f_port=1))


# --- osm-json ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("23", 23),
        ("-7", -7),
        ("23.5", 23.5),
        ("23.", 23.0),
        (".5", 0.5),
        ("-0.500", -0.5),
        ("1e5", "1e5"),
        (" 12", " 12"),
        ("12 ", "12 "),
        ("0x1F", "0x1F"),
        ("nan", "nan"),
        ("Infinity", "Infinity"),
        ("", ""),
        ("9" * 65, "9" * 65),
    ],
)
def test_osm_json_numeric_strings(text: str, value: object) -> None:
    """Only plain decimal text becomes a number (int without '.', else float); exponents,
    spaces, hex, nan/inf and overlong digit runs stay text."""
    message = json.dumps({"UNIX": 1795000000, "NAME": "x", "VALUES": {"V": text}}).encode()
    [reading] = CODECS["osm-json"].decode(message, _ctx("osm-json"))
    assert (type(reading.value), reading.value) == (type(value), value)


def test_osm_json_deep_nesting_is_a_decode_error() -> None:
    """JSON nested beyond the parser's limit is a dead letter, not a RecursionError."""
    message = b'{"UNIX":1795000000,"VALUES":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(DecodeError):
        CODECS["osm-json"].decode(message, _ctx("osm-json"))


def test_osm_json_unix_far_beyond_any_date_is_rejected() -> None:
    """A UNIX after the year 9999 is not a time (and would overflow a 64-bit millisecond field)."""
    message = b'{"UNIX":1000000000000000,"NAME":"x","VALUES":{"CC1":1}}'
    with pytest.raises(DecodeError, match="after the year 9999"):
        CODECS["osm-json"].decode(message, _ctx("osm-json"))


def test_osm_json_min_max_get_units_and_overrides_through_the_device_map() -> None:
    """Through the devices stage, an override of CC1 also renames and scales CC1_min/CC1_max."""
    entry = DeviceMapFile.model_validate(
        {
            "devices": [
                {
                    "osm_id": "0A1B2C3D",
                    "sensor_id": "kettle-1",
                    "codec": "osm-json",
                    "metrics": {"CC1": {"name": "current", "scale": 0.001, "unit": "A"}},
                }
            ]
        }
    ).devices[0]
    devices = DeviceMap({entry.key: MappedDevice(entry, "m.yaml", 1, 1)})
    payload = (
        b'{"UNIX":1795000000,"NAME":"0x0A1B2C3D","VALUES":{"CC1":1500,"CC1_min":1200,"CC1_max":1800,"HUMI":40.000}}'
    )
    uplink = Uplink("osm/0A1B2C3D/1795000000", DeviceKey("osm_id", "0A1B2C3D"), payload, RECEIVED, RECEIVED)
    outcome = resolve(uplink, devices)
    assert isinstance(outcome, DecodedUplink)
    t = 1_795_000_000_000
    assert list(outcome.readings) == [
        Reading("current", 1.5, "A", t),
        Reading("current_min", 1.2, "A", t),
        Reading("current_max", 1.8, "A", t),
        Reading("HUMI", 40.0, "%RH", t),
    ]


# --- cayenne-lpp ------------------------------------------------------------------------


def test_cayenne_lpp_ignores_the_fport() -> None:
    """The same frame decodes the same on any fPort, and without one."""
    frame = bytes.fromhex("03670110056700ff")
    results = [CODECS["cayenne-lpp"].decode(frame, _ctx("cayenne-lpp", f_port=p)) for p in (None, 1, 2, 99)]
    assert all(r == results[0] for r in results) and len(results[0]) == 2


# --- packed-samples ---------------------------------------------------------------------


def test_packed_samples_without_fport_is_rejected() -> None:
    """An uplink without an fPort (an OSM JSON source) cannot pick a metric: dead letter."""
    with pytest.raises(DecodeError, match="no fPort"):
        CODECS["packed-samples"].decode(
            bytes.fromhex("010100000000 01"), _ctx("packed-samples", options={"ports": {1: {"metric": "m"}}})
        )


def test_packed_samples_scale_overflow_is_rejected() -> None:
    """A scale that pushes an f32 sample past the float range is a dead letter, not infinity."""
    frame = bytes.fromhex("010600000000") + struct.pack("<f", 3.0e38)
    with pytest.raises(DecodeError, match="not a finite number"):
        CODECS["packed-samples"].decode(
            frame, _ctx("packed-samples", f_port=1, options={"ports": {1: {"metric": "m", "scale": 1e300}}})
        )


def test_packed_samples_unlisted_port_names_the_listed_ones() -> None:
    """The dead letter for an unknown fPort names it and the ports the map does list."""
    with pytest.raises(DecodeError, match=r"fPort 7 is not in options.ports \(listed: 2, 10\)"):
        CODECS["packed-samples"].decode(
            bytes.fromhex("01010000000001"),
            _ctx("packed-samples", f_port=7, options={"ports": {10: {"metric": "a"}, 2: {"metric": "b"}}}),
        )


# --- chirpstack-object ------------------------------------------------------------------


def test_chirpstack_object_nested_beyond_the_recursion_limit() -> None:
    """An object nested 100,000 deep still flattens (no RecursionError) to its one leaf."""
    obj: dict[str, object] = {"v": 1}
    for _ in range(100_000):
        obj = {"a": obj}
    readings = CODECS["chirpstack-object"].decode(b"", _ctx("chirpstack-object", object=obj))
    assert len(readings) == 1 and readings[0].metric == "a." * 100_000 + "v"


def test_chirpstack_object_empty_key_is_rejected() -> None:
    """A top-level empty key would give a metric with no name: dead letter."""
    with pytest.raises(DecodeError, match="empty name"):
        CODECS["chirpstack-object"].decode(b"", _ctx("chirpstack-object", object={"": 1}))


def test_chirpstack_object_takes_any_sequence_and_rejects_non_json_leaves() -> None:
    """A tuple flattens like a list; a leaf of a type JSON cannot hold is a dead letter, not a crash."""
    readings = CODECS["chirpstack-object"].decode(b"", _ctx("chirpstack-object", object={"a": (1, 2.5)}))
    assert [(r.metric, r.value) for r in readings] == [("a.0", 1), ("a.1", 2.5)]
    with pytest.raises(DecodeError, match="a is a bytes"):
        CODECS["chirpstack-object"].decode(b"", _ctx("chirpstack-object", object={"a": b"\x01"}))
