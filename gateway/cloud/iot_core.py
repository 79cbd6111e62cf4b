"""AWS IoT Core over MQTT 5 with X.509 mutual TLS, through awsiotsdk's MQTT5 client.

The client keeps IoT Core's flow limits on (100 publishes/s, 512 KiB/s, 128 KiB a message per
connection), so the backlog drains as fast as IoT Core allows and no faster. Operations in
flight fail on a disconnect (`FAIL_ALL_ON_DISCONNECT`): the buffer, not the client's offline
queue, is the one place unacknowledged batches live, and the service republishes them (same
batch id, same bytes) when the connection is back, live readings first.

Whatever a publish ends in, `done` is called once: a PUBACK the client cannot fully read, or an
exception while reading it, is a refusal, never a slot that stays in flight. Messages too large
for the link are marked so (`PublishResult.too_large`) for the service to split:

- the client checks each PUBLISH against the Maximum Packet Size of the broker's CONNACK and
  fails it with AWS_ERROR_MQTT5_PACKET_VALIDATION; the limit is then known;
- Mosquitto answers a QoS 1 message over its `message_size_limit` with PUBACK reason 0x95
  (packet too large), which is not a PUBACK reason code in MQTT 5: awscrt 0.36 gives such a
  code as `reason_code=None` (no reason string either), so the code itself is lost and an
  unreadable PUBACK code is read as "perhaps too large".
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import structlog
from awscrt import mqtt5
from awsiot import mqtt5_client_builder

from gateway.buffer import now_ms
from gateway.cloud import SUCCESS_CODES, Done, PublishResult, StateDone, Will
from gateway.config.settings import IotCoreCloud
from gateway.model import Batch
from gateway.wire import CONTENT_TYPE

log = structlog.get_logger("gateway.cloud")

#: What the size estimate of a PUBLISH may miss; kept off the limit a refusal reports.
_SIZE_MARGIN = 32
#: awscrt's error for a packet the client itself refuses to send (size, topic, properties).
_PACKET_VALIDATION = "AWS_ERROR_MQTT5_PACKET_VALIDATION"


def _reason_name(code: int) -> str:
    try:
        return str(mqtt5.PubackReasonCode(code).name).lower().replace("_", " ")
    except ValueError:
        return "unknown reason"


class IotCorePublisher:
    """Publishes batches to IoT Core (or a TLS broker standing in for it)."""

    def __init__(self, settings: IotCoreCloud, client_id: str, topic: str, will: Will | None = None) -> None:
        self._settings = settings
        self._topic = topic
        self._client_id = client_id
        self._connected = threading.Event()
        self._stopped = threading.Event()
        self.epoch = 0
        self.last_error: str | None = None
        #: The MQTT reason code of that error (CONNACK or DISCONNECT), and when it came.
        self.last_error_code: int | None = None
        self.last_error_ms: int | None = None
        #: When the connection last came up or went down (None: not yet either).
        self.link_changed_ms: int | None = None
        #: Maximum Packet Size from the broker's CONNACK (MQTT's own maximum when it sets none).
        self.max_packet_size: int | None = None
        connect = mqtt5.ConnectPacket()
        if will is not None:
            connect.will = mqtt5.PublishPacket(
                payload=will.payload,
                qos=mqtt5.QoS.AT_LEAST_ONCE,
                retain=True,
                topic=will.topic,
                payload_format_indicator=mqtt5.PayloadFormatIndicator.AWS_MQTT5_PFI_UTF8,
                content_type=will.content_type,
            )
            connect.will_delay_interval_sec = will.delay_s
            # The broker sends the will when the delay is over or the session ends, whichever
            # is first: the session must outlive the delay. A reconnect still starts clean.
            connect.session_expiry_interval_sec = will.delay_s
        self._client = mqtt5_client_builder.mtls_from_path(
            endpoint=settings.endpoint,
            port=settings.port,
            cert_filepath=str(settings.cert),
            pri_key_filepath=str(settings.key),
            ca_filepath=str(settings.ca),
            client_id=client_id,
            connect_options=connect,
            keep_alive_interval_sec=60,
            session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
            offline_queue_behavior=mqtt5.ClientOperationQueueBehaviorType.FAIL_ALL_ON_DISCONNECT,
            min_reconnect_delay_ms=1000,
            max_reconnect_delay_ms=60_000,
            ack_timeout_sec=60,
            on_lifecycle_connection_success=self._on_success,
            on_lifecycle_connection_failure=self._on_failure,
            on_lifecycle_disconnection=self._on_disconnection,
            on_lifecycle_stopped=self._on_stopped,
        )

    def start(self) -> None:
        """Begin connecting; the client reconnects by itself with jittered backoff."""
        self._client.start()

    def stop(self, timeout_s: float, send_will: bool = False) -> None:
        """Disconnect and wait for the client to stop. The DISCONNECT says why explicitly
        (awscrt's default sends no reason the broker takes as normal): "normal", and the broker
        discards the will, for a clean stop; "with will message" for a stop on a failure, so the
        cloud hears `offline` unless the restarted daemon is back within the will delay."""
        reason = (
            mqtt5.DisconnectReasonCode.DISCONNECT_WITH_WILL_MESSAGE
            if send_will
            else mqtt5.DisconnectReasonCode.NORMAL_DISCONNECTION
        )
        self._client.stop(mqtt5.DisconnectPacket(reason_code=reason))
        self._stopped.wait(timeout_s)

    @property
    def connected(self) -> bool:
        """True while the MQTT connection is up."""
        return self._connected.is_set()

    def publish(self, batch: Batch, done: Done) -> None:
        """Publish one batch at QoS 1 with the hub.readings.v1 properties."""
        props = [
            mqtt5.UserProperty("batch-id", batch.batch_id),
            mqtt5.UserProperty("readings", str(batch.readings)),
        ]
        if batch.gzip:
            props.append(mqtt5.UserProperty("content-encoding", "gzip"))
        packet = mqtt5.PublishPacket(
            payload=batch.payload,
            qos=mqtt5.QoS.AT_LEAST_ONCE,
            topic=self._topic,
            payload_format_indicator=(
                mqtt5.PayloadFormatIndicator.AWS_MQTT5_PFI_BYTES
                if batch.gzip
                else mqtt5.PayloadFormatIndicator.AWS_MQTT5_PFI_UTF8
            ),
            message_expiry_interval_sec=int(self._settings.message_expiry),
            content_type=CONTENT_TYPE,
            user_properties=props,
        )
        overhead = _packet_size(self._topic, props, batch.payload) - len(batch.payload)
        try:
            future = self._client.publish(packet)
        except Exception as exc:  # the client refuses at once (e.g. offline): a normal failure
            done(batch.seq, PublishResult(False, None, f"publish refused: {exc}"))
            return
        future.add_done_callback(lambda f: self._complete(batch, overhead, f, done))

    def publish_state(self, topic: str, payload: bytes, content_type: str, done: StateDone) -> None:
        """Publish a retained QoS 1 message (the health message) outside the batches' flow."""
        packet = mqtt5.PublishPacket(
            payload=payload,
            qos=mqtt5.QoS.AT_LEAST_ONCE,
            retain=True,
            topic=topic,
            payload_format_indicator=mqtt5.PayloadFormatIndicator.AWS_MQTT5_PFI_UTF8,
            content_type=content_type,
        )
        try:
            future = self._client.publish(packet)
        except Exception as exc:
            done(PublishResult(False, None, f"publish refused: {exc}"))
            return

        def complete(f: Future[Any]) -> None:
            try:
                exc = f.exception()
                if exc is not None:
                    result = PublishResult(False, None, f"publish failed: {exc}")
                else:
                    puback = getattr(f.result(), "puback", None)
                    if puback is None or puback.reason_code is None:
                        result = PublishResult(False, None, "no readable PUBACK")
                    elif int(puback.reason_code) in SUCCESS_CODES:
                        result = PublishResult(True, int(puback.reason_code))
                    else:
                        code = int(puback.reason_code)
                        result = PublishResult(False, code, puback.reason_string or _reason_name(code))
            except Exception as exc:  # an outcome we cannot read is a failure, never an escape
                result = PublishResult(False, None, f"unreadable publish outcome: {exc!r}")
            try:
                done(result)
            except Exception:
                log.exception("state publish outcome not handed on", topic=topic)

        future.add_done_callback(complete)

    def _complete(self, batch: Batch, overhead: int, future: Future[Any], done: Done) -> None:
        """awscrt's thread: read the outcome and call `done` exactly once; nothing escapes."""
        try:
            result = self._result(batch, overhead, future)
        except Exception as exc:  # an outcome we cannot read is a refusal, not a lost slot
            result = PublishResult(False, None, f"unreadable publish outcome: {exc!r}")
        try:
            done(batch.seq, result)
        except Exception:
            log.exception("publish outcome not handed on", batch_id=batch.batch_id)

    def _result(self, batch: Batch, overhead: int, future: Future[Any]) -> PublishResult:
        size = len(batch.payload)
        exc = future.exception()
        if exc is not None:
            limit = self.max_packet_size
            if getattr(exc, "name", None) == _PACKET_VALIDATION and limit is not None and size + overhead > limit:
                return PublishResult(
                    False,
                    None,
                    f"publish refused by the client: {size + overhead} bytes exceed the broker's "
                    f"Maximum Packet Size {limit} ({exc})",
                    too_large=True,
                    limit=max(0, limit - overhead - _SIZE_MARGIN),
                )
            return PublishResult(False, None, f"publish failed: {exc}")
        completion = future.result()
        puback = getattr(completion, "puback", None)
        if puback is None:
            return PublishResult(False, None, "no PUBACK received")
        if puback.reason_code is None:
            text = f" ({puback.reason_string})" if puback.reason_string else ""
            return PublishResult(
                False,
                None,
                f"PUBACK with a reason code the client cannot read{text} for a message of {size} bytes "
                "(Mosquitto sends 0x95 packet too large so)",
                too_large=True,
            )
        code = int(puback.reason_code)
        if code in SUCCESS_CODES:
            return PublishResult(True, code)
        text = puback.reason_string or _reason_name(code)
        return PublishResult(False, code, text)

    # ---- lifecycle (awscrt's threads) ----------------------------------------------------

    def _on_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        settings = getattr(data, "negotiated_settings", None)
        self.max_packet_size = getattr(settings, "maximum_packet_size_to_server", None)
        self.epoch += 1
        self.link_changed_ms = now_ms()
        self._connected.set()
        log.info(
            "connected to cloud", endpoint=self._settings.endpoint, port=self._settings.port, client_id=self._client_id
        )

    def _on_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        reason = describe_lifecycle(data)
        if reason != self.last_error:
            log.warning("cannot connect to cloud", endpoint=self._settings.endpoint, reason=reason)
        self._note_error(reason, data)

    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        self._connected.clear()
        self.link_changed_ms = now_ms()
        reason = describe_lifecycle(data)
        self._note_error(reason, data)
        log.warning("disconnected from cloud", reason=reason)

    def _note_error(self, reason: str, data: Any) -> None:
        packet = getattr(data, "connack_packet", None) or getattr(data, "disconnect_packet", None)
        code = getattr(packet, "reason_code", None) if packet is not None else None
        self.last_error = reason
        self.last_error_code = None if code is None else int(code)
        self.last_error_ms = now_ms()

    def _on_stopped(self, data: mqtt5.LifecycleStoppedData) -> None:
        self._connected.clear()
        self._stopped.set()


def _packet_size(topic: str, props: list[mqtt5.UserProperty], payload: bytes) -> int:
    """Bytes of the QoS 1 PUBLISH `publish` sends, as MQTT 5 encodes it (what the client
    compares with the broker's Maximum Packet Size)."""

    def string(text: str) -> int:
        return 2 + len(text.encode())

    properties = (
        2  # payload format indicator
        + 5  # message expiry interval
        + 1
        + string(CONTENT_TYPE)
        + sum(1 + string(p.name) + string(p.value) for p in props)
    )
    remaining = string(topic) + 2 + _varint_size(properties) + properties + len(payload)
    return 1 + _varint_size(remaining) + remaining


def _varint_size(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def describe_lifecycle(data: Any) -> str:
    """What a connection failure or disconnection says: reason code, reason string, error."""
    packet = getattr(data, "connack_packet", None) or getattr(data, "disconnect_packet", None)
    code = getattr(packet, "reason_code", None) if packet is not None else None
    reason = getattr(packet, "reason_string", None) if packet is not None else None
    err = getattr(data, "exception", None)
    parts = []
    if code is not None:
        parts.append(f"[code:{int(code)}] {getattr(code, 'name', '')}".strip())
    if reason:
        parts.append(str(reason))
    if err is not None:
        parts.append(str(err))
    return " ".join(parts) or "unknown"
