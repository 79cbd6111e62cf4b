"""Intake: local-broker messages in, durable commits, then acknowledgements upstream.

One thread takes deliveries off a queue in groups: whatever queued while the previous group
was being committed forms the next group, so at low rates an uplink waits for nobody and at
high rates one fsync covers many uplinks (group commit). A message is acknowledged only after
the transaction holding what it carried has committed.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from gateway.buffer import Buffer, StoreResult
from gateway.config.devices import DeviceMap
from gateway.devices import resolve
from gateway.errors import BufferFullError, EventError
from gateway.model import DeadLetter, DeviceKey, DeviceLog, Outcome, Unmapped
from gateway.sources import Delivery, Parser
from gateway.sources.events import Ignored

log = structlog.get_logger("gateway.intake")

MAX_GROUP = 2000
_DEV_EUI_IN_TOPIC = re.compile(r"/device/([0-9a-fA-F]{16})/")


@dataclass
class IntakeStats:
    """Counters since start, for status lines and tests."""

    messages: int = 0
    uplinks: int = 0
    readings: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    unmapped: int = 0
    foreign: int = 0
    logs: int = 0
    ignored: int = 0
    groups: int = 0
    blocked: bool = False

    def add(self, result: StoreResult) -> None:
        self.uplinks += result.stored
        self.readings += result.readings
        self.duplicates += result.duplicates
        self.dead_letters += result.dead_letters
        self.unmapped += result.unmapped
        self.foreign += result.foreign
        self.logs += result.logs


class Intake:
    """Parses, maps, decodes and commits deliveries; acks each after its commit."""

    def __init__(self, buffer: Buffer, devices: DeviceMap, parsers: Mapping[str, Parser]) -> None:
        self.buffer = buffer
        self.devices = devices
        self._parsers = dict(parsers)
        self._queue: queue.Queue[Delivery] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)
        self.stats = IntakeStats()
        #: Called after each committed group (the service wakes its loop).
        self.on_commit: Callable[[], None] = lambda: None

    def add_parser(self, name: str, parser: Parser) -> None:
        """Register the parser of a source added after construction (the demo's site)."""
        self._parsers[name] = parser

    def deliver(self, delivery: Delivery) -> None:
        """Called by sources from their network threads: queue the message."""
        if not self._stopping.is_set():
            self._queue.put(delivery)

    def start(self) -> None:
        """Start the intake thread."""
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Finish the group being committed (and ack it), leave the rest to the broker."""
        self._stopping.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            group = [first]
            while len(group) < MAX_GROUP:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit(group)

    def _commit(self, group: list[Delivery]) -> None:
        outcomes: list[Outcome | DeviceLog] = []
        for delivery in group:
            try:
                outcomes.extend(self._outcomes(delivery))
            except Exception as exc:  # the one broad catch: a bug must not stop other devices
                log.exception("cannot process message", source=delivery.source_name, topic=delivery.topic)
                outcomes.append(self._dead_letter(delivery, f"internal error: {type(exc).__name__}: {exc}"))
        warned = False
        while True:
            try:
                result = self.buffer.store(outcomes)
                break
            except BufferFullError as exc:
                # stop-intake: do not ack; the broker keeps what we have not acknowledged.
                self.stats.blocked = True
                if not warned:
                    log.error("buffer refuses intake; holding acknowledgements", reason=str(exc))
                    warned = True
                if self._stopping.wait(1.0):
                    return
        if self.stats.blocked:
            log.info("buffer takes intake again")
            self.stats.blocked = False
        for delivery in group:
            delivery.ack()
        self.stats.add(result)
        self.stats.messages += len(group)
        self.stats.groups += 1
        if result.dead_letters:
            log.warning("dead letters stored", count=result.dead_letters)
        self.on_commit()

    def _outcomes(self, delivery: Delivery) -> list[Outcome | DeviceLog]:
        parser = self._parsers[delivery.source_name]
        try:
            event = parser(delivery.topic, delivery.payload, delivery.received_ms)
        except EventError as exc:
            return [self._dead_letter(delivery, str(exc))]
        if isinstance(event, Ignored):
            self.stats.ignored += 1
            return []
        if isinstance(event, DeviceLog):
            return [event]
        outcome = resolve(event, self.devices)
        if isinstance(outcome, Unmapped):
            log.info("uplink from a device in no map", device=str(event.device), source=event.source)
        return [outcome]

    def _dead_letter(self, delivery: Delivery, reason: str) -> DeadLetter:
        match = _DEV_EUI_IN_TOPIC.search(delivery.topic)
        device = DeviceKey("dev_eui", match.group(1).lower()) if match else None
        return DeadLetter(
            device=device,
            source=f"{delivery.source_name}/{delivery.topic}/{delivery.received_ms}",
            f_port=None,
            reason=reason,
            payload=delivery.payload,
            received_ms=delivery.received_ms,
            topic=delivery.topic,
        )

    def replay_unmapped(self) -> int:
        """Store kept uplinks whose device a map now names; return how many were replayed."""
        replayed: list[Outcome | DeviceLog] = []
        ids = []
        for row_id, uplink in self.buffer.unmapped():
            outcome = resolve(uplink, self.devices)
            if not isinstance(outcome, Unmapped):
                replayed.append(outcome)
                ids.append(row_id)
        if replayed:
            self.buffer.store(replayed)
            self.buffer.forget_unmapped(ids)
            log.info("replayed uplinks of newly mapped devices", uplinks=len(ids))
        return len(ids)


__all__ = ["Intake", "IntakeStats"]
