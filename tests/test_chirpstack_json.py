"""The direct reader of ChirpStack's JSON events against the json_format path it replaced.

The property tests build random events with chirpstack-api's own message types, render them
as ChirpStack does (`json_format.MessageToJson`, camelCase or proto field names), and check
that `parse_chirpstack` gives exactly what the old json_format-based parser
(`tests/chirpstack_reference.py`) gives; then they break the fields the gateway reads in
random ways and check that both refuse the same documents.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from chirpstack_api.gw import gw_pb2
from chirpstack_api.integration import integration_pb2
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import EventError
from gateway.model import DeviceLog, Uplink
from gateway.sources.events import parse_chirpstack
from tests.chirpstack import encode, log_event, topic, uplink_event
from tests.chirpstack_reference import parse_chirpstack_reference

EUI = "70b3d57ed0001234"
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- building random events

#: Any time a protobuf Timestamp can hold (years 1 to 9999), with odd nanoseconds.
seconds = st.integers(min_value=-62_135_596_800, max_value=253_402_300_799)
nanos = st.one_of(st.integers(0, 999_999_999), st.sampled_from([0, 1, 999_999_999, 1_000_000, 500_000_000, 123_000]))
text = st.text(max_size=20)
uint32 = st.integers(0, 2**32 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
snrs = st.one_of(st.floats(width=32), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 7.5, 7.3]))
dev_euis = st.one_of(
    st.text("0123456789abcdefABCDEF", min_size=16, max_size=16),
    st.text("0123456789abcdef", max_size=18),
    text,
)
dedup_ids = st.one_of(st.uuids().map(str), st.text(max_size=70))
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**53), 2**53),
    text,
)
objects = st.dictionaries(
    text,
    st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3)),
    max_size=5,
)


def _stamp(stamp: Any, secs: int, ns: int) -> None:
    stamp.seconds = secs
    stamp.nanos = ns


@st.composite
def rx_infos(draw: st.DrawFn) -> Any:
    """One gateway's reception, every field of `gw.UplinkRxInfo` that ChirpStack fills."""
    rx = gw_pb2.UplinkRxInfo(
        gateway_id=draw(text),
        uplink_id=draw(uint32),
        rssi=draw(int32),
        snr=draw(snrs),
        channel=draw(st.integers(0, 15)),
        context=draw(st.binary(max_size=8)),
        crc_status=draw(st.integers(0, 3)),
    )
    for name in ("gw_time", "ns_time"):
        if draw(st.booleans()):
            _stamp(getattr(rx, name), draw(seconds), draw(nanos))
    if draw(st.booleans()):
        rx.location.latitude = draw(st.floats(-90, 90))
        rx.location.longitude = draw(st.floats(-180, 180))
    rx.metadata.update(draw(st.dictionaries(text, text, max_size=2)))
    return rx


@st.composite
def uplink_events(draw: st.DrawFn) -> Any:
    """An `integration.UplinkEvent` with random values in every field the gateway reads, and
    in many it does not."""
    ev = integration_pb2.UplinkEvent(
        deduplication_id=draw(dedup_ids),
        dev_addr=draw(st.text("0123456789abcdef", max_size=8)),
        adr=draw(st.booleans()),
        dr=draw(st.integers(0, 15)),
        f_cnt=draw(uint32),
        f_port=draw(st.one_of(st.integers(0, 255), uint32)),
        confirmed=draw(st.booleans()),
        data=draw(st.binary(max_size=64)),
        region_config_id=draw(text),
    )
    if draw(st.booleans()):
        _stamp(ev.time, draw(seconds), draw(nanos))
    info = ev.device_info
    info.dev_eui = draw(dev_euis)
    info.tenant_id = draw(st.one_of(st.uuids().map(str), text))
    info.tenant_name = draw(text)
    info.device_name = draw(text)
    info.device_class_enabled = draw(st.integers(0, 2))
    info.tags.update(draw(st.dictionaries(text, text, max_size=3)))
    if draw(st.booleans()):
        ev.object.update(draw(objects))
    ev.rx_info.extend(draw(st.lists(rx_infos(), max_size=4)))
    if draw(st.booleans()):
        ev.tx_info.frequency = draw(uint32)
        ev.tx_info.modulation.lora.bandwidth = draw(uint32)
        ev.tx_info.modulation.lora.spreading_factor = draw(st.integers(5, 12))
    return ev


@st.composite
def log_events(draw: st.DrawFn) -> Any:
    """An `integration.LogEvent`: known and unknown codes and levels, any description."""
    ev = integration_pb2.LogEvent(
        level=draw(st.one_of(st.sampled_from(integration_pb2.LogLevel.values()), int32)),
        code=draw(st.one_of(st.sampled_from(integration_pb2.LogCode.values()), int32)),
        description=draw(st.text(max_size=600)),
    )
    if draw(st.booleans()):
        _stamp(ev.time, draw(seconds), draw(nanos))
    ev.device_info.dev_eui = draw(dev_euis)
    ev.context.update(draw(st.dictionaries(text, text, max_size=2)))
    return ev


renderings = st.fixed_dictionaries(
    {
        "preserving_proto_field_name": st.booleans(),
        "always_print_fields_with_no_presence": st.booleans(),
        "indent": st.sampled_from([None, 2]),
    }
)


def outcome(parse: Any, kind: str, payload: bytes, encoding: str = "json") -> tuple[str, str]:
    """What a parser makes of an event: ("ok", the repr of its result, which tells 1 from 1.0
    and NaN from nothing) or ("refused", the reason); anything else raised fails the test."""
    try:
        return "ok", repr(parse(topic(EUI, kind), payload, 1_795_000_000_123, encoding))
    except EventError as exc:
        return "refused", str(exc)


def assert_same(kind: str, payload: bytes, encoding: str = "json") -> None:
    """The new parser gives what the old one gave: the same result, or a refusal for both.
    Where the old one crashed inside upb (a SystemError: see the test on surrogates below)
    it is enough that the new one gave a result or a reason."""
    new = outcome(parse_chirpstack, kind, payload, encoding)
    try:
        old = outcome(parse_chirpstack_reference, kind, payload, encoding)
    except SystemError:
        return
    assert new[0] == old[0], f"new {new}, json_format {old}"
    if new[0] == "ok":
        assert new[1] == old[1]


# -- equivalence on events as ChirpStack renders them


@PROPERTY
@given(uplink_events(), renderings)
def test_random_uplink_events_parse_as_json_format_parsed_them(event: Any, rendering: dict[str, Any]) -> None:
    """Any UplinkEvent, rendered by json_format with camelCase or proto names, defaults
    printed or not, gives the same Uplink (or the same refusal) as the json_format path."""
    assert_same("up", json_format.MessageToJson(event, **rendering).encode())


@PROPERTY
@given(log_events(), renderings)
def test_random_log_events_parse_as_json_format_parsed_them(event: Any, rendering: dict[str, Any]) -> None:
    """Any LogEvent gives the same DeviceLog (code and level names, UNKNOWN_<n> for numbers
    this chirpstack-api does not know, description cut at 500) as the json_format path."""
    assert_same("log", json_format.MessageToJson(event, **rendering).encode())


@PROPERTY
@given(st.one_of(uplink_events().map(lambda e: ("up", e)), log_events().map(lambda e: ("log", e))))
def test_the_binary_encoding_parses_as_before(kind_event: tuple[str, Any]) -> None:
    """The protobuf (binary) path, now sharing the uplink's construction with the JSON reader,
    gives what it gave before."""
    kind, event = kind_event
    assert_same(kind, event.SerializeToString(), "protobuf")


def test_the_property_tests_reach_both_outcomes() -> None:
    """The random events include ones both parsers take and ones both refuse (an invalid
    devEui, an empty deduplicationId), so the comparison is not one-sided."""
    good = uplink_event(EUI, b"\x01")
    bad = uplink_event("nothex", b"\x01")
    assert outcome(parse_chirpstack, "up", encode(good, "json"))[0] == "ok"
    assert outcome(parse_chirpstack, "up", encode(bad, "json"))[0] == "refused"


# -- equivalence on broken documents

#: Values to put where a read field belongs: wrong types, edge numbers, numbers as strings in
#: every spelling int() and float() take, times, base64, enum names, surrogates, nulls.
awkward_strings = st.sampled_from(
    [
        "", "0", "-0", "1", "+5", " 5", "\t5", "5\n", "1_0", "0x10", "1.5", "1.0", "1e3", "0.1e1", "-1",
        "4294967295", "4294967296", "2147483647", "2147483648", "-2147483648", "-2147483649", "1e400",
        "-1e400", "3.5e38", "1e-50", "NaN", "nan", "NAN", "Infinity", "-Infinity", "inf", "١٢",
        "AQ==", "AQ", "AQ===", "A", "-_8", "+/8=", "!!AQ", "AQ==AQ==", "AQ\u00e9",
        "2026-01-01T00:00:00Z", "2026-01-01T00:00:00.5+01:00", "2026-01-01T00:00:00.123456789-05:30",
        "2026-01-01T00:00:00.Z", "2026-1-1T1:2:3Z", "2026-01-01t00:00:00Z", "2026-01-01T00:00:00z",
        "2026-01-01T00:00:00+-1:00", "2026-01-01T00:00:00+99:99", "2026-01-01T00:00:60Z",
        "2026-02-29T00:00:00Z", "2024-02-29T23:59:59.999999999Z", "1999-12-31T23:59:59.999Z",
        "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59-00:01",
        "2026-01-01T00:00:00", "2026-01-01T00:00:00.1234567891Z", "2026-01-01T00:00:00+0530",
        "UPLINK_CODEC", "ERROR", "WARNING", "FOO", "devEui", "rssi", "a\ud800", "a\udc00b",
        EUI, EUI.upper(), "x" * 65,
    ]
)  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**32 - 1, 2**32, -(2**31), 2**31, 10**39, 10**400, 2**53 + 1]),
    st.floats(),
    st.sampled_from([1e39, 3.4028235e38, -0.0, 1.9, 4294967295.0, 1e300]),
    awkward_strings,
    st.text(max_size=8).filter(lambda s: not s.startswith("[")),
)
awkward = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(["rssi", "snr", "nsTime", "devEui", "tenantId", "x"]), scalars, max_size=3),
)

#: The fields the gateway reads, by path; None stands for "each item of the list".
UPLINK_PATHS: list[tuple[Any, ...]] = [
    ("deduplicationId",), ("deduplication_id",), ("time",), ("deviceInfo",), ("device_info",),
    ("deviceInfo", "devEui"), ("deviceInfo", "dev_eui"), ("deviceInfo", "tenantId"), ("deviceInfo", "tenant_id"),
    ("fCnt",), ("f_cnt",), ("fPort",), ("f_port",), ("data",), ("object",), ("object", "x"),
    ("rxInfo",), ("rx_info",), ("rxInfo", None), ("rxInfo", None, "rssi"), ("rxInfo", None, "snr"),
    ("rxInfo", None, "nsTime"), ("rxInfo", None, "ns_time"), ("rxInfo", None, "gwTime"), ("rxInfo", None, "gw_time"),
]  # fmt: skip
LOG_PATHS: list[tuple[Any, ...]] = [
    ("code",),
    ("level",),
    ("description",),
    ("deviceInfo",),
    ("deviceInfo", "devEui"),
    ("device_info", "dev_eui"),
]


def _set(document: dict[str, Any], path: tuple[Any, ...], value: Any, index: int) -> None:
    """Put `value` at `path`, making what is missing or of another type on the way (a list
    gets an item; None in the path picks item `index` modulo its length)."""
    node: Any = document
    for i, key in enumerate(path[:-1]):
        want = list if path[i + 1] is None else dict
        if key is None:
            if not node:
                node.append(want())
            key = index % len(node)
            if not isinstance(node[key], want):
                node[key] = want()
        elif not isinstance(node.get(key), want):
            node[key] = want()
        node = node[key]
    if path[-1] is None:
        if not node:
            node.append({})
        node[index % len(node)] = value
    else:
        node[path[-1]] = value


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(uplink_events().map(lambda e: ("up", e)), log_events().map(lambda e: ("log", e))),
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 100), awkward, st.integers(0, 3)), min_size=1, max_size=3),
)
def test_broken_fields_are_refused_exactly_when_json_format_refused_them(
    kind_event: tuple[str, Any], proto_names: bool, changes: list[tuple[int, Any, int]]
) -> None:
    """Any value put in a field the gateway reads (wrong types, numbers out of range or as
    strings, odd times and base64, surrogates, null, both spellings at once) is refused by
    the new reader exactly when json_format refused it, and otherwise read the same."""
    kind, event = kind_event
    document = json.loads(json_format.MessageToJson(event, preserving_proto_field_name=proto_names))
    paths = UPLINK_PATHS if kind == "up" else LOG_PATHS
    for which, value, index in changes:
        _set(document, paths[which % len(paths)], value, index)
    assert_same(kind, json.dumps(document).encode())


@settings(max_examples=300, deadline=None)
@given(st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4)))
def test_any_json_at_all_is_an_event_or_an_event_error(document: Any) -> None:
    """Whatever JSON arrives, the parser returns an event or raises EventError (a dead letter
    with a reason), never another exception."""
    for kind in ("up", "log"):
        outcome(parse_chirpstack, kind, json.dumps(document).encode())


# -- the mapping's spellings, pinned one by one


def parse_json(document: dict[str, Any], kind: str = "up") -> Any:
    return parse_chirpstack(topic(EUI, kind), json.dumps(document).encode(), 5, "json")


def base(**fields: Any) -> dict[str, Any]:
    """A minimal uplink event document with `fields` added."""
    return {"deduplicationId": "d-1", "deviceInfo": {"devEui": EUI}, **fields}


def test_missing_fields_read_as_their_defaults() -> None:
    """An event with only devEui and deduplicationId is an uplink: fCnt and fPort 0, no
    payload, no object, no rssi or snr, the receive time, no tenant."""
    up = parse_json(base())
    assert isinstance(up, Uplink)
    assert (up.payload, up.f_port, up.object, up.time_ms, up.network_tenant) == (b"", 0, None, 5, None)
    assert dict(up.meta) == {"dev_eui": EUI, "f_cnt": 0, "f_port": 0}


def test_proto_field_names_are_read_like_json_names() -> None:
    """`deduplication_id`, `device_info.dev_eui`, `f_cnt`, `rx_info[].ns_time`: the original
    field names read as the camelCase ones."""
    up = parse_json(
        {
            "deduplication_id": "d-1",
            "device_info": {"dev_eui": EUI, "tenant_id": "t-1"},
            "f_cnt": 7,
            "f_port": 2,
            "rx_info": [{"rssi": -90, "snr": 2.5, "ns_time": "2026-01-01T00:00:00.250Z"}],
        }
    )
    assert isinstance(up, Uplink) and up.source == "chirpstack/d-1" and up.network_tenant == "t-1"
    assert dict(up.meta) == {"dev_eui": EUI, "f_cnt": 7, "f_port": 2, "rssi": -90, "snr": 2.5}
    assert up.time_ms == 1_767_225_600_250


def test_with_both_spellings_the_later_wins_and_null_means_the_default() -> None:
    """Both spellings of a field: the later in the document wins, as in json_format; a later
    null resets the field to its default."""
    assert parse_json(base(fCnt=3, f_cnt=4)).meta["f_cnt"] == 4
    assert parse_json(base(f_cnt=4, fCnt=3)).meta["f_cnt"] == 3
    assert parse_json(base(fCnt=3, f_cnt=None)).meta["f_cnt"] == 0


def test_a_message_given_in_both_spellings_is_merged() -> None:
    """deviceInfo and device_info both present: the later sets the fields it names over the
    earlier (json_format merges into one message), so devEui from one and tenantId from the
    other are both read."""
    up = parse_json({"deduplicationId": "d", "device_info": {"devEui": EUI}, "deviceInfo": {"tenantId": "t"}})
    assert isinstance(up, Uplink) and up.device.id == EUI and up.network_tenant == "t"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(7, 7), ("7", 7), ("1e3", 1000), (4294967295, 4294967295), ("4294967295", 4294967295), (12.0, 12), ("-0", 0)],
)
def test_integers_are_numbers_or_decimal_strings(value: Any, expected: int) -> None:
    """uint32/int64-style fields take numbers, integral floats and decimal strings (the JSON
    mapping's way of carrying 64-bit integers), exponents included."""
    assert parse_json(base(fCnt=value)).meta["f_cnt"] == expected


@pytest.mark.parametrize(
    ("snr", "expected"),
    [(7.5, 7.5), ("7.5", 7.5), (7.3, 7.3), (-20, -20.0), ("1e-50", 0.0), ("NaN", None), ("Infinity", None),
     ("-Infinity", None), ("3.5e38", None)],
)  # fmt: skip
def test_snr_is_a_32_bit_float_and_non_finite_ones_are_left_out(snr: Any, expected: float | None) -> None:
    """snr is read as protobuf keeps a `float`: rounded to 32 bits (7.3 stays 7.3 in meta after
    rounding to 2 places); "NaN", "Infinity" and a value past float32 (an infinity) leave snr
    out of meta."""
    up = parse_json(base(rxInfo=[{"rssi": -70, "snr": snr}]))
    assert isinstance(up, Uplink) and up.meta.get("snr") == expected and up.meta["rssi"] == -70


def test_the_best_rssi_gives_rssi_and_snr() -> None:
    """meta's rssi and snr come from the gateway that heard the uplink loudest (the first of
    equals)."""
    rx = [{"rssi": -100, "snr": 1.0}, {"rssi": "-60", "snr": 9.25}, {"rssi": -60, "snr": 3.0}]
    assert {k: parse_json(base(rxInfo=rx)).meta[k] for k in ("rssi", "snr")} == {"rssi": -60, "snr": 9.25}


@pytest.mark.parametrize(
    ("time", "ms"),
    [
        ("2026-01-01T00:00:00Z", 1_767_225_600_000),
        ("2026-01-01T00:00:00.5Z", 1_767_225_600_500),
        ("2026-01-01T00:00:00.123456789Z", 1_767_225_600_123),
        ("2026-01-01T00:00:00.999999999Z", 1_767_225_600_999),
        ("2026-01-01T01:00:00+01:00", 1_767_225_600_000),
        ("2025-12-31T19:30:00.25-04:30", 1_767_225_600_250),
        ("2024-02-29T12:00:00Z", 1_709_208_000_000),
        ("2026-1-1T0:0:0Z", 1_767_225_600_000),  # not RFC 3339, but json_format took it
    ],
)
def test_times_are_rfc_3339_with_fractions_and_offsets(time: str, ms: int) -> None:
    """`time` in RFC 3339: 0 to 9 fractional digits (cut to the millisecond), Z or an offset."""
    assert parse_json(base(time=time)).time_ms == ms


def test_time_falls_back_to_the_first_gateways_ns_time_then_gw_time() -> None:
    """Without `time` (or with one before 2000), the first rxInfo's nsTime, then gwTime."""
    rx = {"gwTime": "2026-01-01T00:00:02Z", "nsTime": "2026-01-01T00:00:01Z"}
    assert parse_json(base(rxInfo=[rx])).time_ms == 1_767_225_601_000
    assert parse_json(base(time="1999-01-01T00:00:00Z", rxInfo=[{"gwTime": rx["gwTime"]}])).time_ms == 1_767_225_602_000


@pytest.mark.parametrize(
    ("data", "payload"),
    [("AQID", b"\x01\x02\x03"), ("AQ==", b"\x01"), ("AQ", b"\x01"), ("-_8", b"\xfb\xff"), ("", b"")],
)
def test_data_is_base64_in_either_alphabet_padded_or_not(data: str, payload: bytes) -> None:
    """`data` is base64, standard or URL-safe, with or without padding."""
    assert parse_json(base(data=data)).payload == payload


@pytest.mark.parametrize(
    ("code", "level", "expected"),
    [
        ("UPLINK_CODEC", "ERROR", ("UPLINK_CODEC", "ERROR")),
        (5, "1", ("UPLINK_F_CNT_RESET", "WARNING")),
        (9999, 0, ("UNKNOWN_9999", "INFO")),
        ("SOME_NEWER_CODE", "ERROR", ("UNKNOWN", "ERROR")),
    ],
)
def test_log_enums_are_names_or_numbers(code: Any, level: Any, expected: tuple[str, str]) -> None:
    """code and level are enum names or numbers; an unknown number is UNKNOWN_<n>, an unknown
    name leaves the default (json_format ignored it), so the log event is still counted."""
    log = parse_json({"deviceInfo": {"devEui": EUI}, "code": code, "level": level}, "log")
    assert isinstance(log, DeviceLog) and (log.code, log.level) == expected


def test_the_object_keeps_the_integers_the_json_had() -> None:
    """The decoded object is the JSON's own: 7 stays an int, 7.0 a float, nesting kept."""
    up = parse_json(base(object={"n": 7, "f": 7.0, "nested": {"list": [1, "a", None, True]}}))
    assert isinstance(up, Uplink) and repr(up.object) == repr(
        {"n": 7, "f": 7.0, "nested": {"list": [1, "a", None, True]}}
    )


def test_fields_the_gateway_does_not_read_are_not_checked() -> None:
    """A malformed field the gateway never reads (txInfo, tenantName) no longer makes the
    uplink a dead letter: it is passed over like an unknown field. The one place the new
    reader takes what json_format refused."""
    document = base(txInfo="garbage", deviceInfo={"devEui": EUI, "tenantName": 5})
    assert isinstance(parse_json(document), Uplink)
    with pytest.raises(EventError):
        parse_chirpstack_reference(topic(EUI), json.dumps(document).encode(), 5, "json")


# -- refusals


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"fCnt": "many"}, "fCnt: expected an integer, not the string 'many'"),
        ({"fCnt": 1.5}, "fCnt: expected an integer, not the number 1.5"),
        ({"fCnt": True}, "fCnt: expected an integer, not true"),
        ({"fCnt": " 5"}, "fCnt: expected an integer, not the string ' 5'"),
        ({"fCnt": 2**32}, "fCnt: 4294967296 is out of range for uint32"),
        ({"fPort": -1}, "fPort: -1 is out of range for uint32"),
        ({"rxInfo": [{"rssi": 2**31}]}, r"rxInfo\[0\].rssi: 2147483648 is out of range for int32"),
        ({"rxInfo": [{}, {"snr": "loud"}]}, r"rxInfo\[1\].snr: expected a number, not the string 'loud'"),
        ({"rxInfo": [{"snr": 1e39}]}, r"rxInfo\[0\].snr: 1e\+39 is out of range for a 32-bit float"),
        ({"rxInfo": [{"snr": "nan"}]}, r'rxInfo\[0\].snr: "nan" is spelled "NaN"'),
        ({"rxInfo": [None]}, r"rxInfo\[0\]: null, which an array of messages cannot hold"),
        ({"rxInfo": {"rssi": 1}}, "rxInfo: expected an array, not an object"),
        ({"rxInfo": [{"nsTime": "yesterday"}]}, r"rxInfo\[0\].nsTime: 'yesterday' is not an RFC 3339 time"),
        ({"time": "2026-02-30T00:00:00Z"}, "time: '2026-02-30T00:00:00Z': day is out of range for month"),
        ({"time": "2026-01-01T00:00:60Z"}, "time: '2026-01-01T00:00:60Z': second must be in 0..59"),
        ({"time": "2026-01-01T00:00:00"}, "time: '2026-01-01T00:00:00' is not an RFC 3339 time"),
        ({"time": "9999-12-31T23:59:59-01:00"}, "time: '9999-12-31T23:59:59-01:00' is outside years 1 to 9999"),
        ({"time": 1795000000}, "time: expected an RFC 3339 time, not the number 1795000000"),
        ({"data": "A"}, "data: not base64"),
        ({"data": 12}, "data: expected a base64 string, not the number 12"),
        ({"deduplicationId": 5}, "deduplicationId: expected a string, not the number 5"),
        ({"deduplicationId": "a\ud800"}, "deduplicationId: 'a\\\\ud800' holds a UTF-16 surrogate"),
        ({"deviceInfo": {"devEui": EUI, "tenantId": ["t"]}}, "deviceInfo.tenantId: expected a string, not an array"),
        ({"deviceInfo": 7}, "deviceInfo: expected an object, not the number 7"),
        ({"object": [1, 2]}, "object: expected an object, not an array"),
        ({"object": {"x": 10**400}}, "object: the integer 100000000000...\\(401 digits\\) is too large for a double"),
        ({"object": {"k": "\udc00"}}, "object: .* holds a UTF-16 surrogate"),
    ],
)
def test_a_malformed_field_is_an_event_error_that_names_it(fields: dict[str, Any], reason: str) -> None:
    """A field the gateway reads that the JSON mapping does not allow is an EventError (a dead
    letter) whose reason names the field and what is wrong with it; json_format refused the
    same document."""
    document = base(**fields)
    with pytest.raises(EventError, match=f"up event does not parse as json: {reason}"):
        parse_json(document)
    with pytest.raises(EventError):
        parse_chirpstack_reference(topic(EUI), json.dumps(document).encode(), 5, "json")


@pytest.mark.parametrize(("depth", "refused"), [(49, False), (50, True)])
def test_the_object_may_nest_as_deep_as_protobufs_limit(depth: int, refused: bool) -> None:
    """json_format's limit of 100 message levels holds for the decoded object (each JSON
    level is a Struct and a Value, the event is the first): 49 nested objects pass, 50 are
    refused as too deep."""
    nested: dict[str, Any] = {"v": 1}
    for _ in range(depth - 1):
        nested = {"a": nested}
    payload = json.dumps(base(object=nested)).encode()
    assert outcome(parse_chirpstack, "up", payload)[0] == outcome(parse_chirpstack_reference, "up", payload)[0]
    if refused:
        with pytest.raises(EventError, match="nests deeper than protobuf's limit of 100 levels"):
            parse_chirpstack(topic(EUI), payload, 5, "json")
    else:
        assert isinstance(parse_chirpstack(topic(EUI), payload, 5, "json"), Uplink)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"deduplicationId": "d", "deviceInfo": {"devEui": "70b3d57ed0001234"}, "rxInfo": [{"snr": NaN}]}',
        b'{"deduplicationId": "d", "deviceInfo": {"devEui": "70b3d57ed0001234"}, "fCnt": Infinity}',
        b"\xef\xbb\xbf" + json.dumps(base()).encode(),
        json.dumps(base()).encode("utf-16"),
        json.dumps(base(object={"x": float("nan")})).encode(),
    ],
)
def test_json_outside_the_standard_is_treated_as_before(payload: bytes) -> None:
    """What Python's json module takes beyond standard JSON (a BOM, UTF-16, bare NaN and
    Infinity) is parsed by the same json module as before and then judged as json_format
    judged it: a bare NaN snr is refused, an object holding NaN is kept."""
    assert_same("up", payload)


def test_a_surrogate_where_upb_looked_up_a_name_is_handled_not_an_internal_error() -> None:
    """A lone surrogate in an enum name or in a string where a message belongs made upb's name
    lookup raise SystemError out of json_format (a dead letter saying "internal error", with a
    traceback in the log); now the name is one this version does not know (the default) and
    the string an empty message (so no devEui: a reason)."""
    log = parse_json({"deviceInfo": {"devEui": EUI}, "code": "a\ud800"}, "log")
    assert isinstance(log, DeviceLog) and log.code == "UNKNOWN"
    with pytest.raises(EventError, match=r"no valid deviceInfo\.devEui"):
        parse_json({"deduplicationId": "d", "deviceInfo": "a\ud800"})
    payload = json.dumps({"deviceInfo": {"devEui": EUI}, "code": "a\ud800"}).encode()
    with pytest.raises(SystemError):
        parse_chirpstack_reference(topic(EUI, "log"), payload, 5, "json")


def test_a_log_event_with_a_malformed_read_field_is_an_event_error() -> None:
    """A log event's code must be an enum name or number: an array is refused with a reason."""
    with pytest.raises(EventError, match=r"log event does not parse as json: code: expected an enum name or number"):
        parse_json({"deviceInfo": {"devEui": EUI}, "code": [1]}, "log")


def test_a_log_event_json_renders_as_json_format_reads_it() -> None:
    """The helper events of tests/chirpstack.py parse the same through both paths."""
    assert_same("log", encode(log_event(EUI, "UPLINK_F_CNT_RESET"), "json"))
    assert_same("up", encode(uplink_event(EUI, b"\x01\x02", obj={"a": 1}), "json"))
