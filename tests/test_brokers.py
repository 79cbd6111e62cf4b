"""The test brokers, and what the real clients do against them (SPEC sections 7 and 10).

These pin behaviour the gateway relies on: how awsiotsdk's MQTT5 client reports PUBACKs and
refused certificates, how paho's manual ack and persistent sessions redeliver, and what
Mosquitto's persistence keeps across a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from awscrt import mqtt5
from awsiot import mqtt5_client_builder

from tests.conftest import CloudReaderFactory
from tests.support.brokers import Mosquitto, ServerTLS, Subscriber, publishing
from tests.support.certs import KeyPair, TestCerts, make_ca

pytestmark = pytest.mark.integration

TOPIC = "dt/hub/acme/leeds/gw-acme-leeds-01/readings"
UPLINK_TOPIC = "application/3ac7e3c4/device/70b3d57ed0001234/event/up"
OSM_TOPIC = "osm/0A1B2C3D/measurements"
CONTENT_TYPE = "application/vnd.hub.readings.v1+json"
SEVEN_DAYS = 7 * 24 * 3600
TIMEOUT = 5.0


@dataclass
class Lifecycle:
    """The lifecycle events of an awscrt MQTT5 client, as events a test can wait on."""

    settled: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    stopped: threading.Event = field(default_factory=threading.Event)
    success: mqtt5.LifecycleConnectSuccessData | None = None
    failure: mqtt5.LifecycleConnectFailureData | None = None

    # awscrt calls these on its own event-loop thread.
    def on_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        self.success = data
        self.settled.set()

    def on_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        self.failure = data
        self.settled.set()

    def on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        self.disconnected.set()

    def on_stopped(self, data: mqtt5.LifecycleStoppedData) -> None:
        self.stopped.set()

    def wait_for_outcome(self, timeout: float = TIMEOUT) -> None:
        """Block until the first connection attempt succeeded or failed."""
        assert self.settled.wait(timeout), f"no connection outcome within {timeout}s"


@contextmanager
def iot_core_client(
    broker: Mosquitto,
    certs: TestCerts,
    client_id: str,
    *,
    pair: KeyPair | None = None,
    **options: Any,
) -> Iterator[tuple[mqtt5.Client, Lifecycle]]:
    """The awsiotsdk MQTT5 mTLS client as the gateway builds it, started; stopped on exit."""
    pair = pair or certs.client(client_id)
    lifecycle = Lifecycle()
    client = mqtt5_client_builder.mtls_from_path(
        endpoint=broker.host,  # "127.0.0.1": verified against the server cert's IP SAN
        port=broker.port,
        cert_filepath=str(pair.cert),
        pri_key_filepath=str(pair.key),
        ca_filepath=str(certs.ca_cert),
        client_id=client_id,
        # extended_validation_and_flow_control_options left out: AWS_IOT_CORE_DEFAULTS
        on_lifecycle_connection_success=lifecycle.on_success,
        on_lifecycle_connection_failure=lifecycle.on_failure,
        on_lifecycle_disconnection=lifecycle.on_disconnection,
        on_lifecycle_stopped=lifecycle.on_stopped,
        **options,
    )
    client.start()
    try:
        yield client, lifecycle
    finally:
        client.stop()
        assert lifecycle.stopped.wait(TIMEOUT), "awscrt client did not report stopped"


def readings_packet(topic: str, batch_id: str) -> mqtt5.PublishPacket:
    """A QoS 1 PUBLISH with the properties hub.readings.v1 messages carry."""
    return mqtt5.PublishPacket(
        topic=topic,
        payload=b'{"schema": "hub.readings.v1", "series": []}',
        qos=mqtt5.QoS.AT_LEAST_ONCE,
        content_type=CONTENT_TYPE,
        payload_format_indicator=mqtt5.PayloadFormatIndicator.AWS_MQTT5_PFI_UTF8,
        message_expiry_interval_sec=SEVEN_DAYS,
        user_properties=[mqtt5.UserProperty("batch-id", batch_id), mqtt5.UserProperty("readings", "0")],
    )


def test_awsiot_client_publishes_with_properties_and_gets_puback_reason(
    cloud_broker: Mosquitto, certs: TestCerts, cloud_reader: CloudReaderFactory
) -> None:
    """awsiotsdk's MQTT5 client connects to the TLS stand-in by IP, and each QoS 1 publish
    resolves to a PUBACK reason code (0x00 with a subscriber, 0x10 without) while the
    reader sees content type, user properties, format indicator and expiry intact."""
    reader = cloud_reader("dt/hub/#")
    with iot_core_client(cloud_broker, certs, "gw-acme-leeds-01") as (client, lifecycle):
        lifecycle.wait_for_outcome()
        assert lifecycle.success is not None, lifecycle.failure
        settings = lifecycle.success.negotiated_settings
        assert settings.client_id == "gw-acme-leeds-01"
        assert settings.receive_maximum_from_server == 100  # the stand-in's, as IoT Core's

        delivered = client.publish(readings_packet(TOPIC, "b-1")).result(TIMEOUT)
        unheard = client.publish(readings_packet("dt/elsewhere", "b-2")).result(TIMEOUT)

    assert delivered.puback.reason_code == mqtt5.PubackReasonCode.SUCCESS
    assert unheard.puback.reason_code == mqtt5.PubackReasonCode.NO_MATCHING_SUBSCRIBERS
    [message] = reader.wait_for_count(1)
    assert message.topic == TOPIC
    assert message.qos == 1
    assert message.content_type == CONTENT_TYPE
    assert message.user_properties == (("batch-id", "b-1"), ("readings", "0"))
    assert message.payload_format_indicator == 1
    # Mosquitto forwards the remaining lifetime, which can already be a second less.
    assert message.message_expiry_interval in (SEVEN_DAYS, SEVEN_DAYS - 1)


def test_publish_made_during_an_outage_completes_when_the_stand_in_returns(
    cloud_broker: Mosquitto, certs: TestCerts, cloud_reader: CloudReaderFactory
) -> None:
    """A QoS 1 publish made while the stand-in is down stays pending in awscrt's queue, and
    resolves with a PUBACK once the stand-in is back on the same port and the client has
    reconnected by itself."""
    reader = cloud_reader("dt/hub/#", clean_start=False, session_expiry_interval=3600)
    with iot_core_client(
        cloud_broker, certs, "gw-acme-leeds-01", min_reconnect_delay_ms=100, max_reconnect_delay_ms=500
    ) as (
        client,
        lifecycle,
    ):
        lifecycle.wait_for_outcome()
        cloud_broker.stop()
        assert lifecycle.disconnected.wait(TIMEOUT)
        pending = client.publish(readings_packet(TOPIC, "b-outage"))
        assert not pending.done()

        cloud_broker.start()
        result = pending.result(TIMEOUT)
        reader.wait_for_connections(2)

    # The reader's session (and so its subscription) survived the restart.
    assert result.puback.reason_code == mqtt5.PubackReasonCode.SUCCESS
    [message] = reader.wait_for_count(1)
    assert ("batch-id", "b-outage") in message.user_properties


def test_failing_puback_resolves_the_future_instead_of_raising(
    tmp_path: Path, certs: TestCerts, mosquitto_executable: str
) -> None:
    """A publish the broker refuses (0x87 not authorized) completes the awscrt future normally
    with that reason code in the PUBACK, so the caller must check it."""
    acl = tmp_path / "acl"
    acl.write_text("user gw-acme-leeds-01\ntopic write dt/hub/#\n")
    broker = Mosquitto(
        tmp_path / "cloud-acl",
        tls=ServerTLS(certs.ca_cert, certs.server, use_identity_as_username=True),
        acl_file=acl,
        executable=mosquitto_executable,
    )
    with broker, iot_core_client(broker, certs, "gw-acme-leeds-01") as (client, lifecycle):
        lifecycle.wait_for_outcome()
        allowed = client.publish(readings_packet(TOPIC, "b-1")).result(TIMEOUT)
        refused = client.publish(readings_packet("dt/other/x", "b-2")).result(TIMEOUT)

    assert allowed.puback.reason_code == mqtt5.PubackReasonCode.NO_MATCHING_SUBSCRIBERS
    assert refused.puback.reason_code == mqtt5.PubackReasonCode.NOT_AUTHORIZED


def test_client_cert_from_another_ca_is_refused(cloud_broker: Mosquitto, certs: TestCerts, tmp_path: Path) -> None:
    """A client cert not signed by the stand-in's CA ends the first attempt in a connection
    failure lifecycle event (quickly: the server refuses, so no client-side TLS delay)."""
    stranger = make_ca(tmp_path / "other-pki", "other-ca").issue_client("gw-stranger")
    with iot_core_client(cloud_broker, certs, "gw-stranger", pair=stranger) as (_, lifecycle):
        lifecycle.wait_for_outcome()
        assert lifecycle.success is None
        assert lifecycle.failure is not None
        # With TLS 1.3 the client finishes its handshake before the server checks its cert,
        # so the refusal shows up as a failed read, not as a negotiation failure.
        assert lifecycle.failure.exception is not None
        assert lifecycle.failure.exception.name in (
            "AWS_IO_TLS_ERROR_READ_FAILURE",  # TLS 1.3, as negotiated here
            "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE",  # TLS 1.2
        ), lifecycle.failure.exception


def test_unacked_message_is_redelivered_until_acked_from_another_thread(
    local_broker: Mosquitto,
) -> None:
    """With paho's manual_ack and a persistent session, a message not acked comes back (DUP,
    same mid) after a reconnect, and once client.ack() is called from a thread other than
    paho's network thread it does not."""
    session: dict[str, Any] = {
        "client_id": "hub-gateway-src-1",
        "manual_ack": True,
        "clean_start": False,
        "session_expiry_interval": 300,
    }
    with Subscriber(local_broker, "application/#", **session) as first:
        publish_uplink(local_broker, b"m1")
        [original] = first.wait_for_count(1)
        # closed without ack()

    with Subscriber(local_broker, "application/#", **session) as second:
        assert second.session_present
        [again] = second.wait_for_count(1)
        assert (again.payload, again.mid, again.dup) == (b"m1", original.mid, True)
        with ThreadPoolExecutor(1) as other_thread:
            other_thread.submit(second.ack, again).result(TIMEOUT)
        # close() queues DISCONNECT behind the PUBACK: the broker sees the ack first.

    with Subscriber(local_broker, "application/#", **session) as third:
        # Mosquitto resends unacked messages right after CONNACK, before it answers our
        # SUBSCRIBE, so by the SUBACK that start() waited for, m1 would be here.
        assert third.sync() == []
        publish_uplink(local_broker, b"m2")
        assert [m.payload for m in third.wait_for_count(1)] == [b"m2"]


def test_queued_messages_survive_a_local_broker_restart(local_broker: Mosquitto) -> None:
    """QoS 1 messages queued for an offline persistent session are saved at SIGTERM and
    delivered after Mosquitto restarts on the same port."""
    session: dict[str, Any] = {"client_id": "hub-gateway-src-2", "clean_start": False, "session_expiry_interval": 3600}
    Subscriber(local_broker, "osm/+/measurements", **session).start().close()
    with publishing(local_broker) as send:
        for n in range(3):
            send(OSM_TOPIC, f"reading {n}".encode())
    port = local_broker.port

    local_broker.restart()

    assert local_broker.port == port
    with Subscriber(local_broker, "osm/+/measurements", **session) as reader:
        assert reader.session_present
        received = reader.wait_for_count(3)
    assert [m.payload for m in received] == [b"reading 0", b"reading 1", b"reading 2"]


def test_queued_messages_are_lost_when_the_broker_crashes_before_autosave(
    local_broker: Mosquitto,
) -> None:
    """Mosquitto writes persistence only at shutdown and every autosave_interval, so a
    SIGKILL loses the offline session and its queue (the site's broker must stop cleanly)."""
    session: dict[str, Any] = {"client_id": "hub-gateway-src-3", "clean_start": False, "session_expiry_interval": 3600}
    Subscriber(local_broker, "osm/+/measurements", **session).start().close()
    with publishing(local_broker) as send:
        send(OSM_TOPIC, b"reading 0")

    local_broker.restart(kill=True)

    with Subscriber(local_broker, "osm/+/measurements", **session) as reader:
        assert reader.session_present is False


@pytest.mark.parametrize(("max_inflight_messages", "receive_maximum", "window"), [(3, None, 3), (3, 5, 5)])
def test_unacked_window_is_receive_maximum_else_max_inflight_messages(
    tmp_path: Path,
    mosquitto_executable: str,
    max_inflight_messages: int,
    receive_maximum: int | None,
    window: int,
) -> None:
    """Mosquitto stops sending to a manual-ack subscriber once `window` messages are unacked
    (the client's Receive Maximum if it sends one, else max_inflight_messages), and an ack
    lets more through."""
    broker = Mosquitto(
        tmp_path / "local-window", max_inflight_messages=max_inflight_messages, executable=mosquitto_executable
    )
    with broker, Subscriber(broker, "application/#", manual_ack=True, receive_maximum=receive_maximum) as reader:
        for n in range(window + 2):
            publish_uplink(broker, f"m{n}".encode())
        received = reader.wait_for_count(window)
        assert len(reader.sync()) == window
        reader.ack(received[0])
        # 2.0.11 may release two messages for one ack (here m{window} and m{window + 1}).
        reader.wait_for_count(window + 1)


def publish_uplink(broker: Mosquitto, payload: bytes) -> None:
    """Publish one QoS 1 message on an uplink topic and wait for the broker's PUBACK."""
    with publishing(broker) as send:
        send(UPLINK_TOPIC, payload)
