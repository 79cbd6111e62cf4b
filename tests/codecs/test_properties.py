"""Round trips: frames built by the SPEC-derived encoders in tests.codecs.encoders decode to
exactly the values that went in; and no input makes a codec raise anything but DecodeError."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.codecs import CODECS, DecodeContext, DecodeError
from gateway.devices import _scaled as devices_scaled
from gateway.model import Reading
from tests.codecs.encoders import (
    LPP_TYPES,
    OSM_INT_TYPES,
    PACKED_FORMATS,
    OsmRecord,
    OsmValue,
    lpp_expected,
    lpp_item,
    osm_json_message,
    osm_v2_frame,
    packed_frame,
    packed_times,
)

T = 1_795_000_000_000
RECEIVED = 1_795_000_000_500

# --- osm-v2 -----------------------------------------------------------------------------


def _int_range(kind: str) -> tuple[int, int]:
    _, size, signed = OSM_INT_TYPES[kind]
    if signed:
        return -(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1
    return 0, (1 << (8 * size)) - 1


osm_numbers = st.one_of(
    *[st.builds(OsmValue, st.just(kind), st.integers(*_int_range(kind))) for kind in OSM_INT_TYPES],
    # u64 beyond 2**53, where a float would lose the last digits
    st.builds(OsmValue, st.just("u64"), st.integers(2**53 + 1, 2**64 - 1)),
    st.builds(OsmValue, st.just("float"), st.integers(-(2**31), 2**31 - 1)),
    st.builds(OsmValue, st.just("double"), st.integers(-(2**63), 2**63 - 1)),
)
osm_strings = st.builds(
    OsmValue,
    st.just("string"),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8),
)
osm_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=4)
osm_records = st.one_of(
    st.builds(OsmRecord, osm_names, st.tuples(st.one_of(osm_numbers, osm_strings))),
    st.builds(OsmRecord, osm_names, st.tuples(osm_numbers, osm_numbers, osm_numbers)),
    # a string measurement with samplecount > 1: marked averaged, one value
    st.builds(OsmRecord, osm_names, st.tuples(osm_strings), st.just(2)),
)


def _osm_v2_expected(records: list[OsmRecord]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for record in records:
        suffixes = ("", "_min", "_max") if len(record.values) == 3 else ("",)
        for suffix, value in zip(suffixes, record.values, strict=True):
            out.append((record.name + suffix, value.decoded()))
    return out


def _pairs(readings: list[Reading]) -> list[tuple[str, Any]]:
    return [(r.metric, r.value) for r in readings]


def _typed(pairs: list[tuple[str, Any]]) -> list[tuple[str, str, Any]]:
    return [(m, type(v).__name__, v) for m, v in pairs]


@given(records=st.lists(osm_records, max_size=12), version=st.sampled_from([1, 2]))
def test_osm_v2_round_trip(records: list[OsmRecord], version: int) -> None:
    """Every value type, mixed types in averaged records and averaged strings decode exactly,
    integers as exact ints at any width, thousandths as the nearest float."""
    codec = CODECS["osm-v2"]
    ctx = DecodeContext(T, RECEIVED, f_port=1, options=codec.options())
    readings = codec.decode(osm_v2_frame(records, version), ctx)
    assert _typed(_pairs(readings)) == _typed(_osm_v2_expected(records))
    assert all(r.t_ms == T for r in readings)


@given(records=st.lists(osm_records, min_size=1, max_size=6), data=st.data())
def test_osm_v2_truncated_frame_is_rejected(records: list[OsmRecord], data: st.DataObject) -> None:
    """Cutting a valid frame anywhere inside a record makes the whole frame a dead letter."""
    frame = osm_v2_frame(records)
    ends = {1}
    for record in records:
        ends.add(max(ends) + len(record.encode()))
    cut = data.draw(st.integers(2, len(frame) - 1).filter(lambda n: n not in ends))
    codec = CODECS["osm-v2"]
    try:
        codec.decode(frame[:cut], DecodeContext(T, RECEIVED, f_port=1, options=codec.options()))
    except DecodeError:
        return
    raise AssertionError(f"frame cut at {cut} of {len(frame)} decoded")


# --- osm-json ---------------------------------------------------------------------------

json_names = st.text(st.characters(min_codepoint=0x41, max_codepoint=0x5A), min_size=1, max_size=4)
json_measurements = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1).map(lambda n: n / 1000),  # firmware floats: thousandths
)


@given(
    values=st.dictionaries(json_names.filter(lambda n: n not in ("FW", "R232")), json_measurements, max_size=10),
    fw=st.text(st.characters(min_codepoint=0x30, max_codepoint=0x39), min_size=1, max_size=22),
    unix=st.integers(0, 4_102_444_800),
    firmware=st.booleans(),
)
def test_osm_json_round_trip(values: dict[str, Any], fw: str, unix: int, firmware: bool) -> None:
    """Firmware-printed numbers and the vendor document's quoted numbers decode to the same
    values; a string measurement stays text even when all digits; time is UNIX from 2020 on."""
    message = osm_json_message(unix, "0x1A2B3C4D", {**values, "FW": fw}, firmware=firmware)
    codec = CODECS["osm-json"]
    readings = codec.decode(message, DecodeContext(T, RECEIVED, options=codec.options()))
    got = {r.metric: r.value for r in readings}
    assert got.pop("FW") == fw
    assert got.keys() == values.keys()
    for name, value in values.items():
        # A quoted integer is an int; a quoted float with no fraction still has its '.'.
        assert got[name] == value and type(got[name]) is type(value), name
    expected_t = unix * 1000 if unix >= 1_577_836_800 else RECEIVED
    assert all(r.t_ms == expected_t for r in readings)


# --- cayenne-lpp ------------------------------------------------------------------------


def _lpp_raws(type_id: int) -> st.SearchStrategy[list[int]]:
    fields = LPP_TYPES[type_id][1]
    return st.tuples(
        *[
            st.integers(-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1)
            if signed
            else st.integers(0, (1 << (8 * size)) - 1)
            for _, size, signed, _, _ in fields
        ]
    ).map(list)


lpp_items = st.sampled_from(sorted(LPP_TYPES)).flatmap(
    lambda type_id: st.tuples(st.integers(0, 255), st.just(type_id), _lpp_raws(type_id))
)


@given(items=st.lists(lpp_items, max_size=12))
def test_cayenne_lpp_round_trip(items: list[tuple[int, int, list[int]]]) -> None:
    """Every supported type at any raw value, signed or not, decodes to raw / resolution with
    its unit and the `<type>_<channel>[_axis]` name."""
    frame = b"".join(lpp_item(c, t, raws) for c, t, raws in items)
    expected = [e for c, t, raws in items for e in lpp_expected(c, t, raws)]
    codec = CODECS["cayenne-lpp"]
    readings = codec.decode(frame, DecodeContext(T, RECEIVED, options=codec.options()))
    assert [(r.metric, type(r.value).__name__, r.value, r.unit) for r in readings] == [
        (m, type(v).__name__, v, u) for m, v, u in expected
    ]
    assert all(r.t_ms == T for r in readings)


# --- packed-samples ---------------------------------------------------------------------

_PACKED_RANGES = {
    1: (0, 2**8 - 1),
    2: (0, 2**16 - 1),
    3: (-(2**15), 2**15 - 1),
    4: (0, 2**32 - 1),
    5: (-(2**31), 2**31 - 1),
}


def _packed_samples(sample_type: int) -> st.SearchStrategy[list[Any]]:
    if sample_type == 6:
        element: st.SearchStrategy[Any] = st.floats(width=32, allow_nan=False, allow_infinity=False)
    else:
        element = st.integers(*_PACKED_RANGES[sample_type])
    return st.lists(element, min_size=1, max_size=60)


@given(
    sample_type=st.shared(st.sampled_from(sorted(PACKED_FORMATS)), key="type"),
    samples=st.shared(st.sampled_from(sorted(PACKED_FORMATS)), key="type").flatmap(_packed_samples),
    period=st.integers(0, 65535),
    delay=st.integers(0, 65535),
    uplink=st.integers(1_577_836_800_000, 4_102_444_800_000),
    f_port=st.integers(1, 223),
)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_packed_samples_round_trip(
    sample_type: int, samples: list[Any], period: int, delay: int, uplink: int, f_port: int
) -> None:
    """Every sample type decodes to its samples at exactly uplink - delay - (N-1-i) * period;
    integers stay ints and an f32 decodes to a float with the very same f32 bits."""
    codec = CODECS["packed-samples"]
    options = codec.options.model_validate({"ports": {f_port: {"metric": "m", "unit": "u"}}})
    frame = packed_frame(sample_type, period, delay, samples)
    readings = codec.decode(frame, DecodeContext(uplink, RECEIVED, f_port=f_port, options=options))
    assert [r.t_ms for r in readings] == packed_times(uplink, period, delay, len(samples))
    assert all(r.metric == "m" and r.unit == "u" for r in readings)
    if sample_type == 6:
        values = [r.value for r in readings]
        assert all(isinstance(v, float) for v in values)
        assert struct.pack(f"<{len(values)}f", *values) == struct.pack(f"<{len(samples)}f", *samples)
    else:
        assert [(type(r.value), r.value) for r in readings] == [(int, s) for s in samples]


@given(
    sample=st.integers(-(2**31), 2**32 - 1),
    scale=st.one_of(st.integers(-1000, 1000).map(float), st.floats(-1e6, 1e6)),
    offset=st.one_of(st.integers(-1000, 1000).map(float), st.floats(-1e6, 1e6)),
)
def test_packed_samples_scales_like_device_map_overrides(sample: int, scale: float, offset: float) -> None:
    """An integer sample scaled by the port options equals what a device map's `metrics`
    override with the same scale and offset makes of it (gateway.devices)."""
    kind = 5 if sample < 0 else 4
    if not _PACKED_RANGES[kind][0] <= sample <= _PACKED_RANGES[kind][1]:
        kind = 4
    codec = CODECS["packed-samples"]
    options = codec.options.model_validate({"ports": {1: {"metric": "m", "scale": scale, "offset": offset}}})
    [reading] = codec.decode(packed_frame(kind, 0, 0, [sample]), DecodeContext(T, RECEIVED, f_port=1, options=options))
    expected = devices_scaled(sample, scale, offset)
    assert (type(reading.value), reading.value) == (type(expected), expected)


# --- chirpstack-object ------------------------------------------------------------------

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)
json_objects = st.dictionaries(
    st.text(st.characters(min_codepoint=0x61, max_codepoint=0x7A), min_size=1, max_size=5),
    st.recursive(
        json_leaves,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(min_size=1, max_size=5), children, max_size=4)
        ),
        max_leaves=25,
    ),
    max_size=6,
)


def _flatten(node: Any, path: str) -> list[tuple[str, Any]]:
    """The SPEC's rule, written independently: leaves by dotted path, nulls skipped."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _flatten(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _flatten(v, f"{path}.{i}")]
    return [] if node is None else [(path, node)]


@given(obj=json_objects)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_chirpstack_object_flattens_every_leaf(obj: dict[str, Any]) -> None:
    """Every number, boolean and string leaf becomes a reading named by its dotted path, in
    document order, with its JSON type; nulls and empty containers give nothing."""
    codec = CODECS["chirpstack-object"]
    readings = codec.decode(b"", DecodeContext(T, RECEIVED, object=obj, options=codec.options()))
    assert _typed(_pairs(readings)) == _typed(_flatten(obj, ""))
    # and it survives the trip through JSON the way ChirpStack's event brings it
    again = codec.decode(b"", DecodeContext(T, RECEIVED, object=json.loads(json.dumps(obj)), options=codec.options()))
    assert _typed(_pairs(again)) == _typed(_pairs(readings))


# --- robustness -------------------------------------------------------------------------


def _options(name: str) -> Any:
    if name == "packed-samples":
        return CODECS[name].options.model_validate({"ports": {1: {"metric": "m", "scale": 0.5}}})
    return CODECS[name].options()


@given(payload=st.binary(max_size=300), name=st.sampled_from(sorted(CODECS)))
def test_no_payload_raises_anything_but_decode_error(payload: bytes, name: str) -> None:
    """Any bytes at all either decode to finite readings or raise DecodeError."""
    ctx = DecodeContext(T, RECEIVED, f_port=1, object={"raw": payload.hex()}, options=_options(name))
    try:
        readings = CODECS[name].decode(payload, ctx)
    except DecodeError:
        return
    assert all(not isinstance(r.value, float) or math.isfinite(r.value) for r in readings)
