"""The bridge end to end with real parts: ChirpStack events on a real Mosquitto, the daemon as a
real process, IoT Core's stand-in a TLS Mosquitto with client certificates, the real awsiotsdk
client publishing and a paho reader on the cloud side."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from gateway import wire
from tests.chirpstack import encode, log_event, topic, uplink_event
from tests.support.brokers import Mosquitto, ReceivedMessage, Subscriber, publishing
from tests.support.certs import TestCerts
from tests.support.daemon import TOPIC, Daemon

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "config" / "schema" / "hub.readings.v1.json").read_text())
PRESS = "70b3d57ed0001234"
AIR = "70b3d57ed0005678"
STRANGER = "70b3d57ed000ffff"
DEVICES = f"""\
devices:
  - dev_eui: {PRESS}
    sensor_id: press-03-clamp
    codec: osm-v2
    tags: {{machine: press-03}}
    metrics:
      CC1: {{name: spindle_current, scale: 0.001, unit: A}}
  - dev_eui: {AIR}
    sensor_id: hall-a-air
    codec: osm-v2
  - osm_id: 0A1B2C3D
    sensor_id: kettle-1
    codec: osm-v2
"""
T0 = 1_795_000_000_000


def record(name: str, kind: int, *values: bytes) -> bytes:
    """One osm-v2 record: 4-byte NUL-padded name, data type, typed values."""
    return name.encode().ljust(4, b"\0") + bytes([kind]) + b"".join(values)


def u16(v: int) -> bytes:
    return b"\x02" + struct.pack("<H", v)


def milli(v: float) -> bytes:
    return b"\x15" + struct.pack("<i", round(v * 1000))


def press_frame(n: int) -> bytes:
    return b"\x02" + record("CC1", 1, u16(12000 + n))


def air_frame(n: int) -> bytes:
    return b"\x02" + record("TEMP", 2, milli(21.5 + n), milli(-3.25), milli(23.0)) + record("LGHT", 1, u16(400 + n))


def expected_rows(n: int, t: int) -> set[tuple[Any, ...]]:
    """The rows the cloud must see for press/air uplink number n at time t."""
    return {
        ("acme", "press-03-clamp", t, "spindle_current", round((12000 + n) * 0.001, 9), "A"),
        ("acme", "hall-a-air", t, "TEMP", 21.5 + n, "degC"),
        ("acme", "hall-a-air", t, "TEMP_min", -3.25, "degC"),
        ("acme", "hall-a-air", t, "TEMP_max", 23.0, "degC"),
        ("acme", "hall-a-air", t, "LGHT", 400 + n, "lx"),
    }


def send_uplinks(local: Mosquitto, encoding: str, numbers: range) -> set[tuple[Any, ...]]:
    """Publish press and air uplinks n in `numbers` (QoS 1); return the rows they must become."""
    expected: set[tuple[Any, ...]] = set()
    with publishing(local) as send:
        for n in numbers:
            t = T0 + n * 1000
            send(
                topic(PRESS),
                encode(uplink_event(PRESS, press_frame(n), f_cnt=n, time_ms=t, dedup_id=f"p-{n}"), encoding),
            )
            send(topic(AIR), encode(uplink_event(AIR, air_frame(n), f_cnt=n, time_ms=t, dedup_id=f"a-{n}"), encoding))
            expected |= expected_rows(n, t)
    return expected


def cloud_rows(messages: list[ReceivedMessage]) -> list[tuple[Any, ...]]:
    """Every row in these cloud messages (duplicates kept)."""
    rows = []
    for message in messages:
        body = wire.decode_message(message.payload)
        for row in wire.expand_rows(body):
            rows.append(
                (
                    row["tenant_id"],
                    row["sensor_id"],
                    row["timestamp"],
                    row["metric_name"],
                    row["metric_value"],
                    row["metadata"].get("unit"),
                )
            )
    return rows


def wait_rows(reader: Subscriber, expected: set[tuple[Any, ...]], timeout: float = 30.0) -> list[tuple[Any, ...]]:
    """Wait until every expected row has arrived at the cloud; return all rows received."""
    reader.wait_for(lambda msgs: expected <= set(cloud_rows(msgs)), timeout=timeout)
    return cloud_rows(reader.messages)


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
def test_osm_frames_reach_the_cloud_decoded_exactly(
    encoding: str,
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """ChirpStack OSM uplinks (json or protobuf) arrive as hub.readings.v1 messages whose rows are
    exactly the decoded readings, with the MQTT v5 properties of SPEC section 8; bad and unknown
    uplinks are kept aside and counted; SIGTERM stops the daemon cleanly within 5 s."""
    daemon = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, DEVICES, encoding=encoding)
    daemons.append(daemon)
    daemon.start()
    expected = send_uplinks(local_broker, encoding, range(5))
    with publishing(local_broker) as send:
        send(topic(STRANGER), encode(uplink_event(STRANGER, press_frame(0), dedup_id="x-1"), encoding))
        send(topic(PRESS), encode(uplink_event(PRESS, b"\x02CC1\x00\x01\x02\x01", dedup_id="bad-1"), encoding))
        send(topic(PRESS, "log"), encode(log_event(PRESS), encoding))
        # The same uplink delivered twice is stored once.
        send(topic(PRESS), encode(uplink_event(PRESS, press_frame(0), f_cnt=0, time_ms=T0, dedup_id="p-0"), encoding))
    rows = wait_rows(reader, expected)
    assert sorted(rows) == sorted(expected), "every reading once, nothing else"

    for message in reader.messages:
        assert message.topic == TOPIC
        assert message.content_type == "application/vnd.hub.readings.v1+json"
        props = dict(message.user_properties)
        assert props["content-encoding"] == "gzip" and message.payload_format_indicator in (0, None)
        assert message.message_expiry_interval is not None and 604_700 <= message.message_expiry_interval <= 604_800
        body = wire.decode_message(message.payload, gzipped=True)
        jsonschema.validate(body, SCHEMA)
        assert props["batch-id"] == body["batch_id"] and body["batch_id"].startswith("gw-test-01-")
        assert int(props["readings"]) == sum(len(s["t"]) for s in body["series"])
        for series in body["series"]:
            if series["sensor_id"] == "press-03-clamp":
                assert series["meta"]["machine"] == "press-03" and series["meta"]["dev_eui"] == PRESS
                assert series["meta"]["rssi"] == -80 and series["source"].startswith("chirpstack/p-")

    # Per-device counters reach the file with the 10 s heartbeat.
    report = daemon.wait_status(
        lambda s: s["backlog"]["readings"] == 0 and any(d["device"] == f"dev_eui:{PRESS}" for d in s["devices"])
    )
    assert report["daemon"]["running"] and report["dead_letters"]["total"] == 1
    assert "osm-v2" in report["dead_letters"]["latest"][0]["reason"]
    assert report["unmapped_uplinks"] == 1 and report["counters"]["duplicate_uplinks"] == 1
    press = next(d for d in report["devices"] if d["device"] == f"dev_eui:{PRESS}")
    assert press["log_events"] == 1 and press["dead_letters"] == 1
    code, took = daemon.stop()
    assert code == 0 and took < 5.0


def test_kill_9_between_intake_and_publish_loses_nothing(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """Readings acknowledged upstream but not yet published survive kill -9 and are published,
    once each, after the restart."""
    cloud_broker.stop()  # nothing can be published: everything waits in the buffer
    daemon = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, DEVICES)
    daemons.append(daemon)
    daemon.start()
    expected = send_uplinks(local_broker, "json", range(20))
    daemon.wait_status(lambda s: s["backlog"]["readings"] == len(expected))
    daemon.kill()
    cloud_broker.start()
    reader.wait_for_connections(2, timeout=15)
    daemon.start()
    rows = wait_rows(reader, expected)
    assert sorted(rows) == sorted(expected)
    daemon.wait_status(lambda s: s["backlog"]["readings"] == 0)


def test_cloud_outage_and_return_loses_nothing(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """While the stand-in is away readings wait in the buffer (status shows the backlog); when it
    comes back on the same port they all arrive and the backlog empties."""
    daemon = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, DEVICES)
    daemons.append(daemon)
    daemon.start()
    before = send_uplinks(local_broker, "json", range(3))
    wait_rows(reader, before)
    cloud_broker.stop()
    during = send_uplinks(local_broker, "json", range(3, 15))
    report = daemon.wait_status(lambda s: s["backlog"]["readings"] == len(during))
    assert report["backlog"]["oldest_unsent_age_s"] is not None
    cloud_broker.start()
    rows = wait_rows(reader, before | during, timeout=60)
    assert set(rows) == before | during
    daemon.wait_status(lambda s: s["backlog"]["readings"] == 0)
    code, _ = daemon.stop()
    assert code == 0


def test_sighup_rejects_a_broken_map_and_replays_uplinks_of_newly_mapped_devices(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """A map that fails validation on SIGHUP is rejected with its FILE:LINE:COL and the old
    maps keep working; a fixed map is taken and the kept uplinks of its new device are sent."""
    daemon = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, DEVICES)
    daemons.append(daemon)
    daemon.start()
    with publishing(local_broker) as send:
        send(topic(STRANGER), encode(uplink_event(STRANGER, press_frame(7), time_ms=T0, dedup_id="s-1"), "json"))
    daemon.wait_status(lambda s: s["unmapped_uplinks"] == 1)

    site = daemon.workdir / "devices" / "site.yaml"
    site.write_text(DEVICES + "  - dev_eui: nothex\n    sensor_id: broken\n    codec: osm-v2\n")
    daemon.reload()
    daemon.wait_log(f"{site}:14:")
    expected = send_uplinks(local_broker, "json", range(1))
    wait_rows(reader, expected)  # the running maps still decode

    site.write_text(DEVICES + f"  - dev_eui: {STRANGER}\n    sensor_id: stranger\n    codec: osm-v2\n")
    daemon.reload()
    replayed = ("acme", "stranger", T0, "CC1", 12007, "mA")
    rows = wait_rows(reader, expected | {replayed})
    assert rows.count(replayed) == 1
    daemon.wait_status(lambda s: s["unmapped_uplinks"] == 0)
