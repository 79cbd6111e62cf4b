"""Parsing local-broker messages: ChirpStack v4 events (JSON and protobuf) and OSM topics."""

from __future__ import annotations

import json

import pytest

from gateway.errors import EventError
from gateway.model import DeviceKey, DeviceLog, Uplink
from gateway.sources.events import Ignored, parse_chirpstack, parse_osm
from tests.chirpstack import encode, log_event, topic, uplink_event

EUI = "70b3d57ed0001234"


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
def test_uplink_event_becomes_an_uplink_in_both_encodings(encoding: str) -> None:
    """Both encodings give the same uplink: source from deduplicationId, meta, tenant, payload."""
    ev = uplink_event(EUI.upper(), b"\x02abc", f_port=3, f_cnt=77, dedup_id="3ac7e3c4-4401-4b8d-9386-a5c902f9202d")
    up = parse_chirpstack(topic(EUI), encode(ev, encoding), 5, encoding)
    assert isinstance(up, Uplink)
    assert up.source == "chirpstack/3ac7e3c4-4401-4b8d-9386-a5c902f9202d"
    assert up.device == DeviceKey("dev_eui", EUI)
    assert up.payload == b"\x02abc" and up.f_port == 3 and up.time_ms == 1_795_000_000_000
    assert dict(up.meta) == {"dev_eui": EUI, "f_cnt": 77, "f_port": 3, "rssi": -80, "snr": 7.5}
    assert up.network_tenant == "52f14cd4-c6f1-4fbd-8f87-4025e1d49242"


def test_uplink_time_falls_back_to_ns_time_then_receive_time() -> None:
    """Without `time` the first rxInfo nsTime is used; without either, the receive time."""
    ev = uplink_event(EUI, b"", time_ms=None)
    ev.rx_info[0].ns_time.FromMilliseconds(1_700_000_000_123)
    assert parse_chirpstack(topic(EUI), encode(ev, "json"), 9, "json").time_ms == 1_700_000_000_123  # type: ignore[union-attr]
    ev = uplink_event(EUI, b"", time_ms=None)
    assert parse_chirpstack(topic(EUI), encode(ev, "protobuf"), 9, "protobuf").time_ms == 9  # type: ignore[union-attr]


def test_json_unknown_fields_are_ignored_and_object_integers_kept() -> None:
    """A newer ChirpStack's extra fields do not break parsing; `object` keeps JSON integers."""
    doc = json.loads(encode(uplink_event(EUI, b"\x01"), "json"))
    doc["someFutureField"] = {"x": 1}
    doc["object"] = {"count": 7, "temp": 21.5, "nested": {"ok": True}}
    up = parse_chirpstack(topic(EUI), json.dumps(doc).encode(), 0, "json")
    assert isinstance(up, Uplink) and up.object == {"count": 7, "temp": 21.5, "nested": {"ok": True}}
    assert isinstance(up.object["count"], int)


def test_protobuf_object_whole_numbers_come_back_as_ints() -> None:
    """Protobuf Struct numbers are doubles; whole ones are given back as integers."""
    up = parse_chirpstack(topic(EUI), encode(uplink_event(EUI, b"", obj={"n": 3, "t": 1.5}), "protobuf"), 0, "protobuf")
    assert isinstance(up, Uplink) and up.object == {"n": 3, "t": 1.5} and isinstance(up.object["n"], int)


def test_log_events_are_counted_not_readings_and_other_events_ignored() -> None:
    """`log` events become DeviceLog; join/ack/status are ignored."""
    got = parse_chirpstack(topic(EUI, "log"), encode(log_event(EUI, "UPLINK_F_CNT_RESET"), "json"), 4, "json")
    assert isinstance(got, DeviceLog) and got.code == "UPLINK_F_CNT_RESET" and got.device == DeviceKey("dev_eui", EUI)
    assert parse_chirpstack(topic(EUI, "join"), b"{}", 0, "json") == Ignored("join")


@pytest.mark.parametrize(
    ("topic_", "payload", "needle"),
    [
        (topic(EUI), b"not json", "does not parse as json"),
        (topic(EUI), b"[1,2]", "not a JSON object"),
        (topic(EUI), b'{"deduplicationId": "x", "fCnt": "many"}', "does not parse as json"),
        (topic(EUI), b'{"deduplicationId": "x"}', "no valid deviceInfo.devEui"),
        ("application/x/device/y", b"{}", "not a ChirpStack event topic"),
    ],
)
def test_malformed_events_raise_event_error(topic_: str, payload: bytes, needle: str) -> None:
    """A malformed event is an EventError with a reason (it becomes a dead letter), never a crash."""
    with pytest.raises(EventError, match=needle):
        parse_chirpstack(topic_, payload, 0, "json")


def test_garbage_protobuf_is_an_event_error() -> None:
    """Bytes that are not an UplinkEvent protobuf give an EventError."""
    with pytest.raises(EventError):
        parse_chirpstack(topic(EUI), b"\xff\xff\xff\xff", 0, "protobuf")


def test_osm_topic_names_the_device_and_unix_names_the_record() -> None:
    """osm/<HWID>/measurements: HWID upper-cased; source osm/<HWID>/<UNIX>, or the receive time."""
    up = parse_osm("osm/0a1b2c3d/measurements", b'{"UNIX": 1795000000, "VALUES": {}}', 5)
    assert up.device == DeviceKey("osm_id", "0A1B2C3D") and up.source == "osm/0A1B2C3D/1795000000"
    assert parse_osm("osm/0A1B2C3D/measurements", b"garbage", 5).source == "osm/0A1B2C3D/received-5"
    with pytest.raises(EventError):
        parse_osm("osm/0A1B2C3/measurements", b"{}", 0)


def test_osm_fragments_of_one_second_are_distinct_but_redeliveries_are_not() -> None:
    """Two OSM messages with the same UNIX but different bodies (firmware fragments) get
    different idempotency keys; the same bytes again get the same key."""
    a = parse_osm("osm/0A1B2C3D/measurements", b'{"UNIX": 1795000000, "VALUES": {"CC1": 1}}', 5)
    b = parse_osm("osm/0A1B2C3D/measurements", b'{"UNIX": 1795000000, "VALUES": {"TEMP": 2}}', 6)
    again = parse_osm("osm/0A1B2C3D/measurements", b'{"UNIX": 1795000000, "VALUES": {"CC1": 1}}', 7)
    assert a.source == b.source == "osm/0A1B2C3D/1795000000"
    assert a.dedup_key != b.dedup_key and a.dedup_key == again.dedup_key


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
@pytest.mark.parametrize("snr", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_snr_is_left_out_of_meta(encoding: str, snr: float) -> None:
    """ "snr": "NaN" (or Infinity) is valid protobuf JSON and binary: the uplink parses and the
    field is left out of its meta, so no non-finite number can reach the wire."""
    up = parse_chirpstack(topic(EUI), encode(uplink_event(EUI, b"\x02", snr=snr), encoding), 5, encoding)
    assert isinstance(up, Uplink) and "snr" not in up.meta and up.meta["rssi"] == -80


def test_the_idempotency_key_of_a_chirpstack_uplink_is_scoped_by_device() -> None:
    """Two devices' events that share a deduplicationId are different uplinks to intake."""
    a = parse_chirpstack(topic(EUI), encode(uplink_event(EUI, b"\x02", dedup_id="same"), "json"), 5, "json")
    other = "70b3d57ed0005678"
    b = parse_chirpstack(topic(other), encode(uplink_event(other, b"\x02", dedup_id="same"), "json"), 5, "json")
    assert isinstance(a, Uplink) and isinstance(b, Uplink)
    assert a.source == b.source == "chirpstack/same" and a.dedup_key != b.dedup_key


def test_an_object_nested_past_protobufs_limit_says_so() -> None:
    """A decoded object nested 60 levels deep is an EventError that names the nesting limit,
    not protobuf's internal words."""
    deep: dict[str, object] = {"v": 1}
    for _ in range(60):
        deep = {"a": deep}
    document = json.loads(encode(uplink_event(EUI, b"\x02"), "json"))
    document["object"] = deep
    with pytest.raises(EventError, match="nests deeper than protobuf's limit of 100 levels"):
        parse_chirpstack(topic(EUI), json.dumps(document).encode(), 5, "json")


def test_a_giant_deduplication_id_is_an_event_error() -> None:
    """A 400 KB deduplicationId is not ChirpStack's (it sends UUIDs): a dead letter, not an
    idempotency key that bloats every batch."""
    event = uplink_event(EUI, b"\x02", dedup_id="x" * 400_000)
    with pytest.raises(EventError, match="deduplicationId is 400000 characters long"):
        parse_chirpstack(topic(EUI), encode(event, "json"), 5, "json")


def test_a_4000_digit_integer_in_an_event_is_an_event_error_not_a_crash() -> None:
    """A 4,000-digit fCnt parses as JSON but not as the protobuf field: EventError, never an
    exception out of the parser."""
    document = json.loads(encode(uplink_event(EUI, b"\x02"), "json"))
    document["fCnt"] = int("9" * 4000)
    with pytest.raises(EventError):
        parse_chirpstack(topic(EUI), json.dumps(document).encode(), 5, "json")


@pytest.mark.parametrize(
    ("sent", "configured", "hint"), [("protobuf", "json", "encoding: protobuf"), ("json", "protobuf", "encoding: json")]
)
def test_an_encoding_mismatch_says_which_encoding_to_set(sent: str, configured: str, hint: str) -> None:
    """An event in the other encoding than the source's says so and names the setting to change,
    instead of only the parser's words ("'utf-8' codec can't decode byte 0x83")."""
    payload = encode(uplink_event(EUI, b"\x02abc"), sent)
    with pytest.raises(
        EventError, match=f"this looks like {'protobuf' if sent == 'protobuf' else 'JSON'}: set `{hint}`"
    ):
        parse_chirpstack(topic(EUI), payload, 5, configured)  # type: ignore[arg-type]


def test_garbage_gets_no_encoding_hint() -> None:
    """Bytes that are neither encoding get the parser's reason and no misleading hint."""
    with pytest.raises(EventError) as raised:
        parse_chirpstack(topic(EUI), b"\x83\x00garbage", 5, "json")
    assert "looks like" not in str(raised.value)


def test_an_uplink_time_outside_years_2000_to_9999_is_passed_over() -> None:
    """The binary encoding carries any int64 time: 2**62 s in `time` is passed over for the next
    source (here the receive time), never sent as a timestamp the cloud cannot store."""
    ev = uplink_event(EUI, b"\x02", time_ms=None)
    ev.time.seconds = 2**62
    up = parse_chirpstack(topic(EUI), encode(ev, "protobuf"), 1_795_000_000_123, "protobuf")
    assert isinstance(up, Uplink) and up.time_ms == 1_795_000_000_123


def test_a_log_code_newer_than_chirpstack_api_is_named_unknown() -> None:
    """A log event whose code this chirpstack-api does not know is still counted, as UNKNOWN_<n>."""
    ev = log_event(EUI)
    ev.code = 9999
    out = parse_chirpstack(topic(EUI, "log"), encode(ev, "protobuf"), 5, "protobuf")
    assert isinstance(out, DeviceLog) and out.code == "UNKNOWN_9999"


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
def test_an_object_json_cannot_carry_is_an_event_error(encoding: str) -> None:
    """A decoded object holding NaN (binary) or a 400-digit integer (JSON) is an EventError, a
    dead letter with a reason, not an internal error with a traceback."""
    ev = uplink_event(EUI, b"\x02", obj={"x": 1.0})
    if encoding == "protobuf":
        ev.object["x"] = float("nan")
        payload = encode(ev, "protobuf")
    else:
        document = json.loads(encode(ev, "json"))
        document["object"]["x"] = int("9" * 400)
        payload = json.dumps(document).encode()
    with pytest.raises(EventError):
        parse_chirpstack(topic(EUI), payload, 5, encoding)  # type: ignore[arg-type]
