"""Real Mosquitto brokers for integration tests, and a paho client that reads from them.

`Mosquitto` runs `mosquitto -c <generated conf>` on a free loopback port: plain (ChirpStack's
broker) or TLS with `require_certificate true` (IoT Core's stand-in). It can stop, be killed
and start again on the same port, with its persistence directory intact.

`Subscriber` is the test's reader: a paho-mqtt 2.x MQTT v5 client that subscribes at QoS 1
and collects what arrives, properties included, for `wait_for` to wait on.

Things about Mosquitto 2.0.11 these helpers work around (each one found the hard way):

- Started as root, it switches to user `mosquitto` *before* it opens the log file, the
  cafile/certfile/keyfile and the persistence directory, so files under pytest's 0700 tmp
  dirs fail with "Unable to load CA certificates ... Permission denied". The generated conf
  says `user root` when we are root; as anyone else Mosquitto never switches user.
- `allow_anonymous` defaults to false in 2.x; the conf turns it on (the TLS listener still
  demands a client certificate signed by the CA).
- Persistence is written at clean shutdown (SIGTERM) and every `autosave_interval` seconds
  (default 1800), so `kill()` loses whatever arrived since the last save.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.certs import KeyPair

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
# How long start() keeps retrying a port that is still held by the previous process.
PORT_RETRY_TIMEOUT = 5.0
STOP_TIMEOUT = 10.0
_POLL = 0.02
# What Mosquitto logs once all its listeners are open.
_RUNNING = " running"


# Every broker process still running, so that a test run that dies without its fixtures'
# teardown (an exception in a script, sys.exit) does not leave brokers behind.
_live: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_live):
        process.kill()
        process.wait()


class MosquittoNotFound(RuntimeError):
    """No mosquitto executable on this machine."""


class BrokerError(RuntimeError):
    """Mosquitto did not start, or exited when it should not have."""


def find_mosquitto() -> str:
    """The mosquitto executable: $MOSQUITTO, then PATH, then /usr/sbin (not on a user's PATH)."""
    for candidate in (
        os.environ.get("MOSQUITTO"),
        shutil.which("mosquitto"),
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MosquittoNotFound(
        "mosquitto is not installed (looked at $MOSQUITTO, PATH, /usr/sbin, /usr/local/sbin); "
        "run `make test`, which installs it, or set MOSQUITTO=/path/to/mosquitto"
    )


def free_port(host: str = HOST) -> int:
    """A TCP port on host that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class ServerTLS:
    """The TLS side of a listener: what Mosquitto presents and whom it trusts."""

    ca: Path
    server: KeyPair
    require_certificate: bool = True
    use_identity_as_username: bool = False


class Mosquitto:
    """One Mosquitto process on a loopback port that stays the same across restarts."""

    def __init__(
        self,
        workdir: Path,
        *,
        tls: ServerTLS | None = None,
        persistence: bool = False,
        autosave_interval: int | None = None,
        max_queued_messages: int | None = None,
        max_inflight_messages: int | None = None,
        message_size_limit: int | None = None,
        max_packet_size: int | None = None,
        acl_file: Path | None = None,
        extra_config: Sequence[str] = (),
        port: int | None = None,
        executable: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.tls = tls
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        # Payloads over this many bytes are refused: to MQTT v5 clients at QoS 1 with PUBACK
        # reason 0x95 (packet too large), which awscrt cannot read (it gives reason_code None).
        self.message_size_limit = message_size_limit
        # Announced as Maximum Packet Size in CONNACK: MQTT v5 clients refuse larger packets
        # themselves (awscrt: AWS_ERROR_MQTT5_PACKET_VALIDATION).
        self.max_packet_size = max_packet_size
        self.acl_file = acl_file
        self.extra_config = tuple(extra_config)
        self.executable = executable or find_mosquitto()
        self.host = HOST
        # Once a port was chosen by the caller or has been listened on, it never changes.
        self._port_pinned = port is not None
        self.port = port if port is not None else free_port()
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        # Mosquitto's own stdout/stderr: where it complains before the log file is open.
        self.output_path = workdir / "mosquitto.out"
        self.persistence_dir = workdir / "persistence"
        self._process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id, while there is a process."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = START_TIMEOUT) -> Mosquitto:
        """Start Mosquitto and return once its port accepts TCP connections."""
        if self.running:
            raise BrokerError(f"mosquitto on port {self.port} is already running")
        deadline = time.monotonic() + timeout
        port_deadline = time.monotonic() + PORT_RETRY_TIMEOUT
        while True:
            self._write_conf()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            outcome = self._wait_until_listening(deadline, log_offset)
            if outcome == "listening":
                self._port_pinned = True
                return self
            self._terminate(signal.SIGKILL)
            in_use = "Address already in use" in _read_from(self.log_path, log_offset)
            if outcome == "exited" and in_use and time.monotonic() < port_deadline:
                if not self._port_pinned:
                    # Someone took the port between free_port() and bind: pick another.
                    self.port = free_port()
                else:
                    # A restart: clients know this port, so wait for the old socket to go.
                    time.sleep(0.1)
                continue
            raise BrokerError(
                f"mosquitto did not start listening on {self.host}:{self.port} ({outcome}).\n{self.diagnostics()}"
            )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (Mosquitto saves its persistence file), wait; SIGKILL if it hangs."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash; nothing is saved since the last autosave."""
        self._terminate(signal.SIGKILL)

    def restart(self, *, kill: bool = False, timeout: float = START_TIMEOUT) -> Mosquitto:
        """Stop (or kill) and start again on the same port with the same persistence dir."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start(timeout)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- diagnostics -------------------------------------------------------------------

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of Mosquitto's log file (empty if there is none yet)."""
        return _tail(self.log_path, lines)

    def output_tail(self, lines: int = 20) -> str:
        """The last lines Mosquitto wrote to stdout/stderr."""
        return _tail(self.output_path, lines)

    def diagnostics(self) -> str:
        """Where the files are and what they end with, for a failing test's message."""
        return (
            f"conf: {self.conf_path}\nlog: {self.log_path}\n--- log tail ---\n{self.log_tail()}"
            f"\n--- stdout/stderr ---\n{self.output_tail()}"
        )

    def __repr__(self) -> str:
        kind = "tls" if self.tls else "plain"
        return f"<Mosquitto {kind} {self.host}:{self.port} pid={self.pid} log={self.log_path}>"

    # -- internals ---------------------------------------------------------------------

    def _write_conf(self) -> None:
        lines = [
            f"# generated by tests/support/brokers.py for {self.workdir}",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"log_dest file {self.log_path}",
            "log_type all",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # Otherwise Mosquitto switches to user `mosquitto` before reading certs and logs.
            lines.append("user root")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server.cert}",
                f"keyfile {self.tls.server.key}",
                f"require_certificate {str(self.tls.require_certificate).lower()}",
                f"use_identity_as_username {str(self.tls.use_identity_as_username).lower()}",
            ]
        if self.persistence:
            self.persistence_dir.mkdir(exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {self.persistence_dir}/",  # the trailing / is required
            ]
            if self.autosave_interval is not None:
                lines.append(f"autosave_interval {self.autosave_interval}")
        if self.max_queued_messages is not None:
            lines.append(f"max_queued_messages {self.max_queued_messages}")
        if self.max_inflight_messages is not None:
            lines.append(f"max_inflight_messages {self.max_inflight_messages}")
        if self.message_size_limit is not None:
            lines.append(f"message_size_limit {self.message_size_limit}")
        if self.max_packet_size is not None:
            lines.append(f"max_packet_size {self.max_packet_size}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        lines += self.extra_config
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _spawn(self) -> None:
        with self.output_path.open("ab") as output:
            self._process = subprocess.Popen(
                [self.executable, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        _live.add(self._process)

    def _wait_until_listening(self, deadline: float, log_offset: int) -> str:
        # A TCP connect alone could reach whoever else holds the port, so first wait for
        # Mosquitto's own word that every listener is open, then check the port answers.
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return "exited"
            if _RUNNING in _read_from(self.log_path, log_offset):
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.5):
                        return "listening"
                except OSError:
                    pass
            time.sleep(_POLL)
        return "timed out"

    def _terminate(self, sig: signal.Signals, timeout: float = STOP_TIMEOUT) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        _live.discard(process)
        if process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


# -- the reader ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMessage:
    """One PUBLISH as a subscriber saw it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int
    user_properties: tuple[tuple[str, str], ...]
    content_type: str | None
    payload_format_indicator: int | None
    message_expiry_interval: int | None
    properties: Properties | None = field(compare=False, repr=False)
    received_at: float = field(default=0.0, compare=False, repr=False)  # time.monotonic() on arrival


_client_numbers = itertools.count(1)


class Subscriber:
    """A paho MQTT v5 client that subscribes at QoS 1 and collects what it receives.

    With `manual_ack=True` nothing is acknowledged until `ack()` is called, which is safe from
    any thread while the client's network thread runs (see test_brokers for why).
    """

    def __init__(
        self,
        broker: Mosquitto,
        topic_filter: str = "#",
        *,
        client_id: str | None = None,
        client_cert: KeyPair | None = None,
        ca: Path | None = None,
        qos: int = 1,
        manual_ack: bool = False,
        clean_start: bool = True,
        session_expiry_interval: int | None = None,
        receive_maximum: int | None = None,
    ) -> None:
        if broker.tls is not None and client_cert is None:
            raise ValueError("a TLS broker needs client_cert")
        self.broker = broker
        self.topic_filter = topic_filter
        self.client_id = client_id or f"test-reader-{os.getpid()}-{next(_client_numbers)}"
        self.qos = qos
        self.clean_start = clean_start
        self.session_expiry_interval = session_expiry_interval
        self.receive_maximum = receive_maximum
        self.session_present: bool | None = None
        self._condition = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._subscribed = False
        self._subscribe_mid: int | None = None
        self._subscriptions = 0
        self._barriers = itertools.count(1)
        self._acked_barriers: set[int] = set()
        self._connect_reason: ReasonCode | None = None
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
        )
        if broker.tls is not None:
            assert client_cert is not None
            self._client.tls_set(
                ca_certs=str(ca or broker.tls.ca),
                certfile=str(client_cert.cert),
                keyfile=str(client_cert.key),
            )
        # paho reconnects by itself (after a broker restart); keep the wait short for tests.
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect

    def start(self, timeout: float = 5.0) -> Subscriber:
        """Connect, subscribe, and return once the SUBACK has granted the QoS."""
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.session_expiry_interval is not None:
            properties.SessionExpiryInterval = self.session_expiry_interval
        if self.receive_maximum is not None:
            properties.ReceiveMaximum = self.receive_maximum
        self._client.connect(
            self.broker.host,
            self.broker.port,
            keepalive=30,
            clean_start=self.clean_start,
            properties=properties,
        )
        self._client.loop_start()
        with self._condition:
            if not self._condition.wait_for(lambda: self._subscribed or self._connect_reason is not None, timeout):
                self.close()
                raise TimeoutError(
                    f"{self.client_id}: no SUBACK within {timeout}s from {self.broker!r}\n{self.broker.log_tail()}"
                )
            if not self._subscribed:
                self.close()
                raise ConnectionError(f"{self.client_id}: {self._connect_reason}")
        return self

    def close(self) -> None:
        """Disconnect cleanly (what was acked stays acked) and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A copy of everything received so far, in arrival order."""
        with self._condition:
            return list(self._messages)

    def wait_for(
        self,
        predicate: Callable[[list[ReceivedMessage]], bool],
        timeout: float = 5.0,
    ) -> list[ReceivedMessage]:
        """Block until predicate(messages so far) is true; return them, or fail after timeout."""
        with self._condition:
            if self._condition.wait_for(lambda: predicate(self._messages), timeout):
                return list(self._messages)
            seen = [(m.topic, m.payload[:80]) for m in self._messages]
        raise AssertionError(f"{self.client_id}: condition not met within {timeout}s; received {seen}")

    def wait_for_count(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Block until at least count messages have arrived; return them."""
        return self.wait_for(lambda messages: len(messages) >= count, timeout)

    @property
    def connections(self) -> int:
        """How many connections have had the subscription confirmed (1 after start())."""
        with self._condition:
            return self._subscriptions

    def wait_for_connections(self, count: int, timeout: float = 10.0) -> None:
        """Block until paho has reconnected and resubscribed, e.g. after broker.restart()."""
        with self._condition:
            if not self._condition.wait_for(lambda: self._subscriptions >= count, timeout):
                raise TimeoutError(f"{self.client_id}: {self._subscriptions} of {count} connections within {timeout}s")

    def sync(self, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Round-trip to the broker; return everything it had sent before that.

        A SUBSCRIBE to a topic nobody uses is answered in order on the same connection, so
        once its SUBACK is here, every PUBLISH the broker wrote earlier has been collected.
        This is how a test shows that something did *not* arrive, without sleeping.
        """
        result, mid = self._client.subscribe(f"test-sync/{self.client_id}/{next(self._barriers)}")
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"sync subscribe failed: {mqtt.error_string(result)}")
        with self._condition:
            if not self._condition.wait_for(lambda: mid in self._acked_barriers, timeout):
                raise TimeoutError(f"{self.client_id}: no SUBACK for sync within {timeout}s")
            return list(self._messages)

    def ack(self, message: ReceivedMessage) -> None:
        """Send the PUBACK for a message received with manual_ack=True."""
        result = self._client.ack(message.mid, message.qos)
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"ack of mid {message.mid} failed: {mqtt.error_string(result)}")

    # paho callbacks, run on paho's network thread

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            with self._condition:
                self._connect_reason = reason
                self._condition.notify_all()
            return
        self.session_present = flags.session_present
        _, self._subscribe_mid = client.subscribe(self.topic_filter, qos=self.qos)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Properties | None
    ) -> None:
        with self._condition:
            self._acked_barriers.add(mid)
            if any(r.is_failure for r in reasons):
                self._connect_reason = reasons[0]
            elif mid == self._subscribe_mid:
                self._subscribed = True
                self._subscriptions += 1
            self._condition.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        props = message.properties
        received = ReceivedMessage(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            dup=bool(message.dup),
            mid=message.mid,
            user_properties=tuple(getattr(props, "UserProperty", ())),
            content_type=getattr(props, "ContentType", None),
            payload_format_indicator=getattr(props, "PayloadFormatIndicator", None),
            message_expiry_interval=getattr(props, "MessageExpiryInterval", None),
            properties=props,
            received_at=time.monotonic(),
        )
        with self._condition:
            self._messages.append(received)
            self._condition.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._condition:
            if not self._subscribed and reason.is_failure:
                self._connect_reason = reason
            self._condition.notify_all()


def publish(
    broker: Mosquitto,
    topic: str,
    payload: bytes | str,
    *,
    qos: int = 1,
    client_cert: KeyPair | None = None,
    properties: Properties | None = None,
    timeout: float = 5.0,
) -> None:
    """Publish one message from a throwaway MQTT v5 client and wait for it to be sent/acked."""
    with publishing(broker, client_cert=client_cert, timeout=timeout) as send:
        send(topic, payload, qos=qos, properties=properties)


@contextlib.contextmanager
def publishing(
    broker: Mosquitto,
    *,
    client_cert: KeyPair | None = None,
    timeout: float = 5.0,
) -> Iterator[Callable[..., None]]:
    """A connected paho v5 client as a send(topic, payload, qos=1, properties=None) function.

    Each send returns once the broker has acknowledged it (QoS 1) or it was written (QoS 0).
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"test-publisher-{os.getpid()}-{next(_client_numbers)}",
        protocol=mqtt.MQTTv5,
    )
    if broker.tls is not None:
        if client_cert is None:
            raise ValueError("a TLS broker needs client_cert")
        client.tls_set(ca_certs=str(broker.tls.ca), certfile=str(client_cert.cert), keyfile=str(client_cert.key))
    connected = threading.Event()
    connack: list[ReasonCode] = []

    def on_connect(
        client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason: ReasonCode, properties: Properties | None
    ) -> None:
        connack.append(reason)
        connected.set()

    client.on_connect = on_connect
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise TimeoutError(f"publisher: no CONNACK within {timeout}s from {broker!r}")
        if connack[0].is_failure:
            raise ConnectionError(f"publisher: CONNACK {connack[0]} from {broker!r}")

        def send(topic: str, payload: bytes | str, *, qos: int = 1, properties: Properties | None = None) -> None:
            info = client.publish(topic, payload, qos=qos, properties=properties)
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise TimeoutError(f"publisher: {topic} not acknowledged within {timeout}s")

        yield send
    finally:
        client.disconnect()
        client.loop_stop()
