"""Where batches go: AWS IoT Core (MQTT 5, mTLS) or a directory of files.

A publisher takes a `Batch` and later calls `done(seq, PublishResult)` from any thread; the
dispatcher (gateway.dispatch) confirms the batch in the buffer only when the result is a success.
`build_publisher` makes the one gateway.yaml names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.config.settings import DirectoryCloud, Settings
from gateway.model import Batch

#: PUBACK reason codes that mean the message was accepted: 0x00 success, and 0x10 "no
#: matching subscribers", which brokers other than IoT Core send when nobody listens.
SUCCESS_CODES = frozenset({0x00, 0x10})

#: PUBACK reason codes that concern the connection, not the message: 0x87 not authorized (the
#: policy), 0x97 quota exceeded (the account's or connection's rate). Only these pause all
#: publishing; any other refusal is the batch's own and backs off that batch alone.
CONNECTION_REFUSALS = frozenset({0x87, 0x97})


@dataclass(frozen=True, slots=True)
class PublishResult:
    """How one publish ended: accepted, or why not (MQTT reason code when there was one)."""

    ok: bool
    reason_code: int | None = None
    reason: str = ""
    #: The link refused the message for its size, or may have: the client's own check against
    #: the Maximum Packet Size the broker announced, or a PUBACK whose reason code the client
    #: cannot read (Mosquitto answers 0x95 "packet too large", which is not a PUBACK code in
    #: MQTT 5 and which awscrt turns into None, to a message over its `message_size_limit`).
    too_large: bool = False
    #: The largest payload (bytes) the link takes, when the broker announced it.
    limit: int | None = None

    def __str__(self) -> str:
        if self.ok:
            return "accepted"
        code = f"[code:{self.reason_code}] " if self.reason_code is not None else ""
        return f"{code}{self.reason}"


Done = Callable[[int, PublishResult], None]
#: How a state message (`publish_state`) ended.
StateDone = Callable[[PublishResult], None]


@dataclass(frozen=True)
class Will:
    """The MQTT 5 will the cloud publishes, retained, once the connection has been lost for
    `delay_s` (a reconnect within it sends nothing); a clean disconnect never sends it."""

    topic: str
    payload: bytes
    content_type: str
    delay_s: int


class Publisher(Protocol):
    """What the dispatcher needs of a cloud."""

    #: Incremented on every (re)connection, so the dispatcher can tell backlog from live.
    epoch: int

    def start(self) -> None:
        """Begin connecting (in the background)."""

    def stop(self, timeout_s: float, send_will: bool = False) -> None:
        """Disconnect and release resources, waiting at most `timeout_s`. A clean stop discards
        the will; `send_will` (a stop on a failure) asks the cloud to publish it after its delay."""

    @property
    def connected(self) -> bool:
        """True while batches can be published."""

    def publish(self, batch: Batch, done: Done) -> None:
        """Publish one batch; `done` is called exactly once with the outcome."""

    def publish_state(self, topic: str, payload: bytes, content_type: str, done: StateDone) -> None:
        """Publish the latest state of something (the health message): QoS 1, retained, not
        a batch; `done` is called exactly once with the outcome."""


def build_publisher(settings: Settings, will: Will | None = None) -> Publisher:
    """The cloud gateway.yaml names (awscrt is imported only for IoT Core), with the will
    its connection carries (a directory has no connection to lose, and no will)."""
    cloud = settings.cloud
    if isinstance(cloud, DirectoryCloud):
        from gateway.cloud.directory import DirectoryPublisher

        return DirectoryPublisher(cloud.directory)
    from gateway.cloud.iot_core import IotCorePublisher

    return IotCorePublisher(cloud, client_id=settings.gateway.id, topic=cloud.topic_for(settings.gateway), will=will)
