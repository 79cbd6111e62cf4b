"""A subscription on the local broker: paho-mqtt 2.x, MQTT v5, QoS 1, persistent session,
manual acknowledgement.

Each message becomes a `Delivery` handed to the intake; the intake calls `Delivery.ack()` only
after what the message carried is committed to the buffer. A message not acked before the
connection drops is redelivered by the broker on the next connection of the same session, so
an ack is sent only on the connection the message arrived on (a stale packet id could
otherwise acknowledge a different message).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.config.settings import Broker
from gateway.model import value_type

log = structlog.get_logger("gateway.sources")

# How many unacknowledged QoS 1 messages the broker may push to us at once. While the buffer
# refuses intake (stop-intake, disk full) this many wait in memory; the broker keeps the rest.
RECEIVE_MAXIMUM = 1000
#: Bytes of an oversized message kept in its dead letter.
OVERSIZE_KEPT = 256
#: The MQTT v5 Maximum Packet Size we announce is this many times `max_message_size`: messages
#: up to it reach us and become dead letters (size and first bytes) that say what happened;
#: beyond it the broker discards them itself (Mosquitto logs it), so a hostile publisher cannot
#: make us read a giant packet into memory.
PACKET_SIZE_FACTOR = 4
PACKET_OVERHEAD = 64 * 1024  # topic, properties and header around the payload
MQTT_MAX_PACKET = 268_435_455  # the protocol's own limit


@value_type
class Delivery:
    """One message from the local broker, to be acknowledged once its content is stored."""

    source_name: str
    topic: str
    payload: bytes
    received_ms: int
    ack: Callable[[], None]
    #: The message's real size when it exceeded `max_message_size`: `payload` then holds only
    #: its first bytes (kept in the dead letter), never the whole of it.
    oversize: int | None = None
    #: Digest of the whole oversized message (its dead letter's key; `payload` is cut short).
    digest: str | None = None


class ClientFactory(Protocol):
    """Makes the paho client (injected so tests and the demo can supply their own)."""

    def __call__(self, client_id: str) -> mqtt.Client: ...


def paho_client(client_id: str) -> mqtt.Client:
    """A paho MQTT v5 client with manual acks, the gateway's default."""
    return mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=True,
    )


class MqttSource:
    """One persistent QoS 1 subscription on the local broker."""

    def __init__(
        self,
        name: str,
        broker: Broker,
        topic: str,
        client_id: str,
        session_expiry_s: float,
        deliver: Callable[[Delivery], None],
        client_factory: ClientFactory = paho_client,
        max_message_size: int = 256 * 1024,
    ) -> None:
        self.name = name
        self.max_message_size = max_message_size
        self.topic = topic
        self.client_id = client_id
        self._broker = broker
        self._deliver = deliver
        self._session_expiry = int(session_expiry_s)
        self._generation = 0
        self._lock = threading.Lock()
        #: Set once the broker has acknowledged our subscription (SUBACK), cleared on a drop.
        self.subscribed = threading.Event()
        self._client = client_factory(client_id)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        if broker.username is not None:
            password = None
            if broker.password_file is not None:
                password = broker.password_file.read_text(encoding="utf-8").strip()
            self._client.username_pw_set(broker.username, password)
        if broker.tls is not None:
            tls = broker.tls
            self._client.tls_set(
                ca_certs=str(tls.ca),
                certfile=str(tls.cert) if tls.cert else None,
                keyfile=str(tls.key) if tls.key else None,
            )

    def start(self) -> None:
        """Connect in the background; paho reconnects by itself after any drop."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        props.MaximumPacketSize = min(MQTT_MAX_PACKET, self.max_message_size * PACKET_SIZE_FACTOR + PACKET_OVERHEAD)
        self._client.connect_async(
            self._broker.host,
            self._broker.port,
            keepalive=max(5, int(self._broker.keepalive)),
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect; unacknowledged messages stay with the broker for our session."""
        with self._lock:
            self._generation += 1  # acks still owed are now stale: the broker will redeliver
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("local broker refused connection", source=self.name, reason=str(reason))
            return
        with self._lock:
            self._generation += 1
        client.subscribe(self.topic, options=SubscribeOptions(qos=1))
        log.info(
            "connected to local broker",
            source=self.name,
            broker=f"{self._broker.host}:{self._broker.port}",
            topic=self.topic,
            session_present=bool(getattr(flags, "session_present", False)),
        )

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if all(not r.is_failure for r in reasons):
            self.subscribed.set()
        else:
            log.error(
                "local broker refused our subscription",
                source=self.name,
                topic=self.topic,
                reasons=[str(r) for r in reasons],
            )

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until subscribed; False if the broker did not get there in time."""
        return self.subscribed.wait(timeout_s)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.subscribed.clear()
        with self._lock:
            self._generation += 1
        if reason.is_failure:
            log.warning("lost local broker, reconnecting", source=self.name, reason=str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        generation = self._generation
        mid, qos = message.mid, message.qos

        def ack() -> None:
            with self._lock:
                if generation != self._generation:
                    return  # arrived on an earlier connection: the broker redelivers it
                if qos > 0:
                    client.ack(mid, qos)

        payload = message.payload
        oversize = digest = None
        if len(payload) > self.max_message_size:
            oversize = len(payload)
            digest = hashlib.sha256(payload).hexdigest()[:16]  # of the whole message: tells them apart
            payload = payload[:OVERSIZE_KEPT]
        received_ms = time.time_ns() // 1_000_000
        self._deliver(Delivery(self.name, message.topic, bytes(payload), received_ms, ack, oversize, digest))


__all__ = ["Delivery", "MqttSource", "paho_client"]
