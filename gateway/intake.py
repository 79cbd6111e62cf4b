"""Intake: local-broker messages in, durable commits, then acknowledgements upstream.

One thread takes deliveries off a queue in groups: a group is what arrives within
`commit_interval` of its first message, plus whatever queued while the previous group was
being committed, so one fsync covers many uplinks (group commit: at a site's 1 Hz streams,
one fsync a second instead of one per uplink, which is what wears an SD card). A message is
acknowledged only after the transaction holding what it carried has committed.
"""

from __future__ import annotations

import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from gateway.buffer import Buffer, StoreResult, is_damage
from gateway.config.devices import DeviceMap
from gateway.devices import resolve
from gateway.errors import BufferFullError, DiskFullError, EventError
from gateway.model import DeadLetter, DeviceKey, DeviceLog, Outcome, Unmapped
from gateway.sources import Delivery, Parser
from gateway.sources.events import Ignored

log = structlog.get_logger("gateway.intake")

MAX_GROUP = 2000
RETRY_S = 1.0
_WAKE = object()  # queued by stop(): end the commit window now
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

    def __init__(
        self, buffer: Buffer, devices: DeviceMap, parsers: Mapping[str, Parser], commit_interval_s: float = 0.0
    ) -> None:
        self.buffer = buffer
        self.devices = devices
        self.commit_interval_s = commit_interval_s
        self._parsers = dict(parsers)
        self._queue: queue.Queue[Delivery | object] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)
        self.stats = IntakeStats()
        #: Called after each committed group (the service wakes its loop).
        self.on_commit: Callable[[], None] = lambda: None
        #: Called once if SQLite reports the buffer file damaged; intake then holds every ack.
        self.on_damage: Callable[[str], None] = lambda reason: None

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
        self._queue.put(_WAKE)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if first is _WAKE:
                continue
            group: list[Delivery] = [first]  # type: ignore[list-item]
            window_ends = time.monotonic() + self.commit_interval_s
            while len(group) < MAX_GROUP:
                wait = window_ends - time.monotonic()
                try:
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _WAKE:
                    break
                group.append(item)  # type: ignore[arg-type]
            self._commit(group)

    def _commit(self, group: list[Delivery]) -> None:
        pending: list[tuple[Delivery, list[Outcome | DeviceLog]]] = []
        for delivery in group:
            try:
                pending.append((delivery, self._outcomes(delivery)))
            except Exception as exc:  # the one broad catch: a bug must not stop other devices
                log.exception("cannot process message", source=delivery.source_name, topic=delivery.topic)
                pending.append(
                    (delivery, [self._dead_letter(delivery, f"internal error: {type(exc).__name__}: {exc}")])
                )
        warned = ""
        size = len(pending)  # how many messages to commit at once: halved while the disk is full
        while pending:
            # What is not committed is not acked: the broker keeps it for us.
            problem = None
            part = pending[:size]
            try:
                result = self.buffer.store([o for _, outcomes in part for o in outcomes])
            except DiskFullError as exc:
                if size > 1:
                    size //= 2  # a smaller transaction may still fit in what room there is
                    continue
                problem = str(exc)
            except BufferFullError as exc:
                problem = str(exc)
            except sqlite3.DatabaseError as exc:
                if is_damage(exc):
                    log.critical("buffer file is damaged; intake holds all acknowledgements", error=str(exc))
                    self.stats.blocked = True
                    self.on_damage(str(exc))
                    self._stopping.wait()
                    return
                problem = f"cannot write the buffer: {exc}"
            if problem is None:
                rest = self._acknowledge(part, result)
                pending = rest + pending[size:]
                if not pending:
                    break
                if not rest:
                    size = min(len(pending), size * 2)
                    continue
                problem = "buffer full: max_size reached (stop-intake)"
            self.stats.blocked = True
            if problem.split(":")[0] != warned:
                warned = problem.split(":")[0]
                log.error("buffer refuses intake; holding acknowledgements and retrying", reason=problem)
            if self._stopping.wait(RETRY_S):
                return
        if self.stats.blocked:
            log.info("buffer takes intake again; acknowledging the held messages")
            self.stats.blocked = False

    def _acknowledge(
        self, pending: list[tuple[Delivery, list[Outcome | DeviceLog]]], result: StoreResult
    ) -> list[tuple[Delivery, list[Outcome | DeviceLog]]]:
        """Ack the messages whose outcomes the store committed (a prefix); return the rest."""
        done = covered = 0
        for _, outcomes in pending:
            if covered + len(outcomes) > result.taken:
                break
            covered += len(outcomes)
            done += 1
        for delivery, _ in pending[:done]:
            delivery.ack()
        if result.dropped is not None:
            log.warning("buffer bound reached: oldest readings dropped", **result.dropped.log_fields())
        if result.dead_letters:
            log.warning("dead letters stored", count=result.dead_letters)
        self.stats.add(result)
        self.stats.messages += done
        self.stats.groups += 1
        self.on_commit()
        return pending[done:]

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
        if not replayed:
            return 0
        try:
            result = self.buffer.store(replayed)
        except (BufferFullError, sqlite3.OperationalError) as exc:
            log.warning("replay of kept uplinks postponed to the next reload", reason=str(exc))
            return 0
        done = ids[: result.taken]  # stop-intake may have taken only the first ones
        self.buffer.forget_unmapped(done)
        log.info("replayed uplinks of newly mapped devices", uplinks=len(done), left=len(ids) - len(done))
        return len(done)


__all__ = ["Intake", "IntakeStats"]
