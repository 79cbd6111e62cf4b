"""AWS IoT Core over MQTT 5 with X.509 mutual TLS, through awsiotsdk's MQTT5 client.

The client keeps IoT Core's flow limits on (100 publishes/s, 512 KiB/s, 128 KiB a message per
connection), so the backlog drains as fast as IoT Core allows and no faster. Operations in
flight fail on a disconnect (`FAIL_ALL_ON_DISCONNECT`): the buffer, not the client's offline
queue, is the one place unacknowledged batches live, and the service republishes them (same
batch id, same bytes) when the connection is back, live readings first.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import structlog
from awscrt import mqtt5
from awsiot import mqtt5_client_builder

from gateway.cloud import SUCCESS_CODES, Done, PublishResult
from gateway.config.settings import IotCoreCloud
from gateway.model import Batch
from gateway.wire import CONTENT_TYPE

log = structlog.get_logger("gateway.cloud")


def _reason_name(code: int) -> str:
    try:
        return str(mqtt5.PubackReasonCode(code).name).lower().replace("_", " ")
    except ValueError:
        return "unknown reason"


class IotCorePublisher:
    """Publishes batches to IoT Core (or a TLS broker standing in for it)."""

    def __init__(self, settings: IotCoreCloud, client_id: str, topic: str) -> None:
        self._settings = settings
        self._topic = topic
        self._client_id = client_id
        self._connected = threading.Event()
        self._stopped = threading.Event()
        self.epoch = 0
        self.last_error: str | None = None
        self._client = mqtt5_client_builder.mtls_from_path(
            endpoint=settings.endpoint,
            port=settings.port,
            cert_filepath=str(settings.cert),
            pri_key_filepath=str(settings.key),
            ca_filepath=str(settings.ca),
            client_id=client_id,
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

    def stop(self, timeout_s: float) -> None:
        """Disconnect cleanly and wait for the client to stop."""
        self._client.stop()
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
        try:
            future = self._client.publish(packet)
        except Exception as exc:  # the client refuses at once (e.g. offline): a normal failure
            done(batch.seq, PublishResult(False, None, f"publish refused: {exc}"))
            return
        future.add_done_callback(lambda f: done(batch.seq, self._result(f)))

    @staticmethod
    def _result(future: Future[Any]) -> PublishResult:
        exc = future.exception()
        if exc is not None:
            return PublishResult(False, None, f"publish failed: {exc}")
        completion = future.result()
        puback = getattr(completion, "puback", None)
        if puback is None:
            return PublishResult(False, None, "no PUBACK received")
        code = int(puback.reason_code)
        if code in SUCCESS_CODES:
            return PublishResult(True, code)
        text = puback.reason_string or _reason_name(code)
        return PublishResult(False, code, text)

    # ---- lifecycle (awscrt's threads) ----------------------------------------------------

    def _on_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        self.epoch += 1
        self.last_error = None
        self._connected.set()
        log.info(
            "connected to cloud", endpoint=self._settings.endpoint, port=self._settings.port, client_id=self._client_id
        )

    def _on_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        reason = _describe(data)
        if reason != self.last_error:
            log.warning("cannot connect to cloud", endpoint=self._settings.endpoint, reason=reason)
        self.last_error = reason

    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        self._connected.clear()
        reason = _describe(data)
        self.last_error = reason
        log.warning("disconnected from cloud", reason=reason)

    def _on_stopped(self, data: mqtt5.LifecycleStoppedData) -> None:
        self._connected.clear()
        self._stopped.set()


def _describe(data: Any) -> str:
    packet = getattr(data, "connack_packet", None) or getattr(data, "disconnect_packet", None)
    code = getattr(packet, "reason_code", None) if packet is not None else None
    err = getattr(data, "exception", None)
    parts = []
    if code is not None:
        parts.append(f"[code:{int(code)}] {getattr(code, 'name', '')}".strip())
    if err is not None:
        parts.append(str(err))
    return " ".join(parts) or "unknown"
