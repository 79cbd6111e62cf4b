"""Publishing under refusals (issue 8): a PUBACK the client cannot read, a batch too large for the
link, and a reading too large for any message. (One batch that keeps failing among good ones:
tests/test_dispatch.py, against a Publisher double.)

The link's size limit comes from a real Mosquitto. With `message_size_limit` it answers a QoS 1
message over the limit with PUBACK reason 0x95 (packet too large; its log says "Sending PUBACK
to <client> (m2, rc149)"), which is not a PUBACK code in MQTT 5: awscrt 0.36.1 hands it over as
`reason_code=None` with no reason string, so the gateway cannot print 0x95 and reports "a reason
code the client cannot read". With `max_packet_size` Mosquitto announces the limit in CONNACK
and awscrt fails a larger PUBLISH itself with AWS_ERROR_MQTT5_PACKET_VALIDATION.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import wire
from gateway.batching import Batcher, Ids, to_record
from gateway.buffer import Buffer, now_ms
from gateway.cloud import PublishResult
from gateway.cloud.iot_core import IotCorePublisher
from gateway.config.settings import IotCoreCloud
from gateway.model import Batch, DecodedUplink, DeviceKey, Reading
from gateway.status import read_status
from tests.chirpstack import encode, topic, uplink_event
from tests.support.brokers import Mosquitto, ServerTLS, Subscriber, publishing
from tests.support.certs import TestCerts
from tests.support.daemon import READINGS_FILTER, Daemon
from tests.test_delivery import MAX_IN_FLIGHT, T0, burst, devices_yaml, rows_of, wait_rows

LINK_LIMIT = 4096  # the stand-in's message_size_limit: bytes of payload it takes


@pytest.fixture(params=["message_size_limit"])
def small_cloud(
    request: pytest.FixtureRequest, tmp_path: Path, certs: TestCerts, mosquitto_executable: str
) -> Iterator[Mosquitto]:
    """IoT Core's stand-in (TLS, require_certificate) that takes at most LINK_LIMIT bytes: with
    `message_size_limit` it refuses larger payloads (PUBACK 0x95); with `max_packet_size` it
    announces the limit in CONNACK and the client itself refuses larger packets."""
    broker = Mosquitto(
        tmp_path / "small-cloud",
        tls=ServerTLS(ca=certs.ca_cert, server=certs.server, require_certificate=True),
        max_inflight_messages=100,
        executable=mosquitto_executable,
        **{request.param: LINK_LIMIT},
    )
    with broker:
        yield broker


@pytest.fixture
def small_reader(small_cloud: Mosquitto, certs: TestCerts) -> Iterator[Subscriber]:
    """The cloud side of the small stand-in."""
    with Subscriber(
        small_cloud, READINGS_FILTER, client_id="small-reader", client_cert=certs.client("small-reader")
    ) as r:
        yield r


# ---- A: a PUBACK the client cannot read, with the real IotCorePublisher -----------------


@pytest.mark.integration
def test_unreadable_puback_code_is_one_refusal_marked_too_large(small_cloud: Mosquitto, certs: TestCerts) -> None:
    """A PUBACK 0x95 (which awscrt gives as reason_code None) completes the publish exactly once
    as a refusal marked too_large, and the client keeps publishing afterwards."""
    pair = certs.client("gw-pub-01")
    settings = IotCoreCloud(
        kind="iot-core", endpoint="localhost", port=small_cloud.port, ca=certs.ca_cert, cert=pair.cert, key=pair.key
    )
    publisher = IotCorePublisher(settings, client_id="gw-pub-01", topic="dt/hub/acme/leeds/gw-pub-01/readings")
    results: dict[int, list[PublishResult]] = {}
    arrived = threading.Condition()

    def done(seq: int, result: PublishResult) -> None:
        with arrived:
            results.setdefault(seq, []).append(result)
            arrived.notify_all()

    def batch(seq: int, size: int) -> Batch:
        payload = b"x" * size
        return Batch(seq=seq, batch_id=f"gw-pub-01-{seq:012d}", payload=payload, readings=2, gzip=False, created_ms=0)

    publisher.start()
    try:
        deadline = time.monotonic() + 10
        while not publisher.connected:  # the client connects in the background; nothing to wait on
            assert time.monotonic() < deadline, "the publisher never connected"
            time.sleep(0.02)
        for seq in range(1, 2 * MAX_IN_FLIGHT + 1):  # more refusals than a client has slots
            publisher.publish(batch(seq, LINK_LIMIT + 1000), done)
        publisher.publish(batch(100, 100), done)
        with arrived:
            assert arrived.wait_for(lambda: len(results) == 2 * MAX_IN_FLIGHT + 1, timeout=10), results
        assert "Sending PUBACK to gw-pub-01 (m1, rc149)" in small_cloud.log_path.read_text()
    finally:
        publisher.stop(5)
    refused = [results[seq] for seq in range(1, 2 * MAX_IN_FLIGHT + 1)]
    assert all(len(r) == 1 for r in refused), "done must be called exactly once per publish"
    assert all(not r[0].ok and r[0].too_large and r[0].reason_code is None for r in refused)
    assert "cannot read" in refused[0][0].reason
    assert [r.ok for r in results[100]] == [True]


# ---- B: split, on a real SQLite buffer --------------------------------------------------


DEV = DeviceKey("dev_eui", "70b3d57ed0001234")


def uplink(n: int, readings: int, received_ms: int, metric: str = "CC1") -> DecodedUplink:
    return DecodedUplink(
        source=f"chirpstack/{n}",
        sensor_id=f"s{n % 7}",
        device=DEV,
        received_ms=received_ms,
        meta={"dev_eui": DEV.id, "f_cnt": n, "f_port": 1},
        readings=tuple(Reading(metric, n * 1000 + i, "mA", received_ms + i) for i in range(readings)),
    )


def rig(path: Path, gzip: bool = True, **kw: Any) -> tuple[Buffer, Batcher]:
    buffer = Buffer(path, **kw)
    return buffer, Batcher(buffer, Ids("gw-t-01", "acme", "leeds"), 120 * 1024, gzip)


def store(buffer: Buffer, uplinks: list[DecodedUplink]) -> None:
    buffer.store([to_record(u) for u in uplinks])


def rows_without_job(payload: bytes) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "job_id"} for r in wire.expand_rows(wire.decode_message(payload))]


@pytest.mark.parametrize("gzip", [False, True])
def test_split_keeps_every_row(tmp_path: Path, gzip: bool) -> None:
    """Split replaces a refused batch by two or more batches within max_bytes that expand to
    exactly its rows (a series too big for one part divided along t/v), the gap `meta` on the
    first part only, the same header fields, new rising seqs; every reading stays in the buffer
    until its part is confirmed, and none after."""
    b, batcher = rig(tmp_path / "b.db", gzip, max_age_s=60)
    t = now_ms()
    store(b, [uplink(i, 2, received_ms=t - 3_600_000) for i in range(3)])  # past max_age: a gap
    assert b.enforce_bounds() is not None
    store(b, [uplink(i, 3, received_ms=t) for i in range(10, 300)] + [uplink(999, 1500, received_ms=t, metric="wave")])
    batch = batcher.form(live=True)
    assert batch is not None and b.depth().uplinks == 0
    original = wire.decode_message(batch.payload)
    assert "gap" in original["meta"] and len(batch.payload) > 2 * LINK_LIMIT

    parts, dead = batcher.split(batch, LINK_LIMIT, "too large")

    seqs = [p.seq for p in parts]
    assert dead == 0 and len(seqs) >= 2 and seqs == sorted(seqs) and seqs[0] > batch.seq
    messages = [wire.decode_message(p.payload) for p in parts]
    assert all(len(p.payload) <= LINK_LIMIT for p in parts)
    assert [m["batch_id"] for m in messages] == [f"gw-t-01-{s:012d}" for s in seqs]
    assert messages[0]["meta"] == original["meta"] and all("meta" not in m for m in messages[1:])
    for m in messages:
        assert {k: m[k] for k in ("schema", "gateway_id", "tenant_id", "site_id", "created_at")} == {
            k: original[k] for k in ("schema", "gateway_id", "tenant_id", "site_id", "created_at")
        }
    assert max(len(s["t"]) for m in messages for s in m["series"]) < 1500  # the big series was divided
    rows = [r for p in parts for r in rows_without_job(p.payload)]
    assert rows == rows_without_job(batch.payload)
    assert [p.readings for p in parts] == [sum(len(s["t"]) for s in m["series"]) for m in messages]
    assert b.depth().batch_readings == batch.readings
    store(b, [uplink(5000, 1, received_ms=t)])
    nxt = batcher.form(live=True)
    assert nxt is not None and nxt.seq > seqs[-1]  # the batch sequence went on past the parts
    for p in [*parts, nxt]:
        p.take.confirm()
    assert b.depth().total_readings == 0
    b.close()
    reopened = Buffer(tmp_path / "b.db")
    assert reopened.depth().total_readings == 0
    reopened.close()


def test_split_of_one_reading_makes_it_a_dead_letter(tmp_path: Path) -> None:
    """A batch of one reading cannot shrink: split moves it to the dead letters with the reason
    given, and nothing of it stays to be retried."""
    path = tmp_path / "b.db"
    b, batcher = rig(path, gzip=False)
    big = DecodedUplink(
        "chirpstack/big",
        "s-big",
        DEV,
        now_ms(),
        {"dev_eui": DEV.id, "f_port": 3},
        (Reading("note", "x" * 6000, None, now_ms()),),
    )
    store(b, [big])
    batch = batcher.form(live=True)
    assert batch is not None and batch.readings == 1

    assert batcher.split(batch, LINK_LIMIT, reason="too large to publish: test") == ([], 1)

    assert b.depth().total_readings == 0
    b.close()
    report = read_status(path)
    assert report["dead_letters"]["total"] == 1 and report["backlog"]["readings"] == 0
    letter = report["dead_letters"]["latest"][0]
    assert letter["reason"] == "too large to publish: test"
    assert letter["sensor_id"] == "s-big" and letter["device"] == str(DEV) and letter["f_port"] == 3
    assert report["counters"]["too_large_readings"] == 1


# ---- B: the daemon against a stand-in that refuses large messages ----------------------


REFUSAL_LOGGED = {
    "message_size_limit": "PUBACK with a reason code the client cannot read",
    "max_packet_size": "exceed the broker's Maximum Packet Size 4096",
}


@pytest.mark.integration
@pytest.mark.parametrize("small_cloud", sorted(REFUSAL_LOGGED), indirect=True)
def test_batches_too_large_for_the_link_are_split_and_everything_arrives(
    local_broker: Mosquitto,
    small_cloud: Mosquitto,
    small_reader: Subscriber,
    certs: TestCerts,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """Batches over the stand-in's limit (PUBACK 0x95 unreadable to awscrt, or the client's own
    check against the announced Maximum Packet Size) are split until they fit, so every reading
    arrives; refusals free their in-flight slots (uplinks sent afterwards still arrive; with
    PUBACK 0x95, after more refusals than max_in_flight); the log shows the refusal and why."""
    devices = 10
    daemon = Daemon(
        tmp_path / "gw",
        local_broker,
        small_cloud,
        certs,
        devices_yaml(devices),
        batch_yaml="{max_delay: 200ms, max_bytes: 120KiB, compression: none}",
    )
    daemons.append(daemon)
    daemon.start()
    daemon.stop()  # the burst waits in the local broker for the daemon's session: one big backlog
    sent = burst(local_broker, devices, range(100))
    started = time.monotonic()
    daemon.start()
    messages = wait_rows(small_reader, sent, timeout=90)
    took = time.monotonic() - started
    daemon.wait_log("batch refused as too large; split into smaller batches")
    limit_kind = "message_size_limit" if small_cloud.message_size_limit else "max_packet_size"
    daemon.wait_log(REFUSAL_LOGGED[limit_kind])
    later = burst(local_broker, devices, range(100, 130))
    wait_rows(small_reader, later, timeout=30)
    report = daemon.wait_status(lambda s: s["backlog"]["readings"] == 0)
    counters = report["counters"]
    assert counters["split_batches"] >= 1
    if limit_kind == "message_size_limit":
        assert counters["publish_failed_too_large"] > MAX_IN_FLIGHT  # every refusal gave its slot back
    assert "dead_letters" not in counters or counters["dead_letters"] == 0
    arrived = [r for m in small_reader.messages for r in rows_of(m)]
    assert set(arrived) == sent | later
    print(
        f"\ntoo large ({limit_kind}): {len(sent)} readings in {took:.1f}s, {len(messages)} messages, "
        f"{counters['publish_failed_too_large']} refused as too large, {counters['split_batches']} splits, "
        f"largest accepted {max(len(m.payload) for m in small_reader.messages)} bytes"
    )


@pytest.mark.integration
def test_a_reading_too_large_for_any_message_becomes_a_dead_letter(
    local_broker: Mosquitto,
    small_cloud: Mosquitto,
    small_reader: Subscriber,
    certs: TestCerts,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """One reading whose message alone exceeds the link's limit (a chirpstack-object string leaf
    of 6000 characters) ends as a dead letter saying why, instead of being retried forever;
    the backlog empties and uplinks after it still arrive."""
    eui = "70b3d57ed0030001"
    daemon = Daemon(
        tmp_path / "gw",
        local_broker,
        small_cloud,
        certs,
        f"devices:\n  - dev_eui: {eui}\n    sensor_id: label-printer\n    codec: chirpstack-object\n",
        batch_yaml="{max_delay: 200ms, max_bytes: 120KiB, compression: none}",
    )
    daemons.append(daemon)
    daemon.start()

    def send(n: int, obj: dict[str, Any]) -> None:
        with publishing(local_broker) as publish:
            event = uplink_event(eui, b"\x00", f_cnt=n, time_ms=T0 + n * 1000, dedup_id=f"obj-{n}", obj=obj)
            publish(topic(eui), encode(event, "json"))

    def arrived(n: int) -> bool:
        return any(r[1] == T0 + n * 1000 for m in small_reader.messages for r in rows_of(m))

    send(1, {"temperature": 21})
    small_reader.wait_for(lambda ms: arrived(1), timeout=20)
    send(2, {"label": "x" * 6000})
    send(3, {"temperature": 22})
    small_reader.wait_for(lambda ms: arrived(3), timeout=20)
    report = daemon.wait_status(lambda s: s["dead_letters"]["total"] >= 1 and s["backlog"]["readings"] == 0)
    letter = report["dead_letters"]["latest"][0]
    assert letter["sensor_id"] == "label-printer" and letter["device"] == f"dev_eui:{eui}"
    assert "too large to publish" in letter["reason"] and "cannot read" in letter["reason"]
    assert report["counters"]["too_large_readings"] == 1
    assert not arrived(2)
    daemon.wait_log("reading too large for any message the cloud takes: moved to dead letters")
