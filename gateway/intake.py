"""Intake: local-broker messages in, durable commits, then acknowledgements upstream.

One thread takes deliveries off a queue in groups: a group is what arrives within
`commit_interval` of its first message, plus whatever queued while the previous group was
being committed, so one fsync covers many uplinks (group commit: at a site's 1 Hz streams,
one fsync a second instead of one per uplink, which is what wears an SD card). A message is
acknowledged only after the transaction holding what it carried has committed.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import structlog

from gateway.batching import to_record
from gateway.buffer import Buffer, Record, StoreResult, is_damage, is_storage_failure
from gateway.config.devices import DeviceMap
from gateway.devices import resolve
from gateway.errors import BufferFullError, BufferLostError, DiskFullError, EventError
from gateway.inbox import Inbox, Limits
from gateway.model import DeadLetter, DecodedUplink, DeviceKey, DeviceLog, ForeignTenant, Outcome, Unmapped
from gateway.sources import Delivery, Parser
from gateway.sources.events import Ignored
from gateway.sources.mqtt import RECEIVE_MAXIMUM

log = structlog.get_logger("gateway.intake")

MAX_GROUP = 2000
#: A source with this many deliveries unacked is committed at once: a quarter of its broker's
#: Receive Maximum, so the broker always has room to send while we commit (a burst or a
#: catch-up is a pipeline, not stop-and-go at one Receive Maximum per commit window).
COMMIT_AT_UNACKED = RECEIVE_MAXIMUM // 4
#: A group also ends at this many bytes of messages, and its decoding at this many readings, so
#: one transaction (and the memory that holds it) stays small whatever the messages weigh.
MAX_GROUP_BYTES = 4 * 1024**2
MAX_GROUP_READINGS = 50_000
#: Messages waiting for intake are bounded in bytes: past this, a source's network thread waits
#: (the broker holds what it has not sent us; QoS 0 floods are the broker's to drop).
MAX_QUEUED_BYTES = 32 * 1024**2
MESSAGE_OVERHEAD = 512  # bytes of Python objects per queued message besides payload and topic
GROUP_LIMITS = Limits(messages=MAX_GROUP, bytes=MAX_GROUP_BYTES, per_source=COMMIT_AT_UNACKED)
RETRY_S = 1.0
#: Devices no map names, or of another tenant, are logged by name the first time (up to this
#: many); after that only a summary line every SUMMARY_EVERY_S says how many more came.
NAMED_IN_LOG = 1000
SUMMARY_EVERY_S = 60.0
DEAD_LETTERS_NAMED = 5  # per commit group, each with its device and reason; the rest counted
#: A metric override that no decoded uplink of its device matched this many times in a row,
#: since start or reload, is flagged (a typo such as CCl for CC1 would otherwise pass for ever).
OVERRIDE_FLAG_AFTER = 20


@dataclass(frozen=True)
class _Reload:
    """Queued by `use_devices`: switch to these maps between two groups."""

    devices: DeviceMap


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
        self,
        buffer: Buffer,
        devices: DeviceMap,
        parsers: Mapping[str, Parser],
        commit_interval_s: float = 0.0,
        encode: Callable[[DecodedUplink], Record | DeadLetter] = to_record,
    ) -> None:
        self.buffer = buffer
        #: A decoded uplink as the buffer stores it (the batching stage's `to_record`).
        self.encode = encode
        self.devices = devices
        self.commit_interval_s = commit_interval_s
        self._parsers = dict(parsers)
        #: max_message_size by source name, for the dead letter of an oversized message.
        self._max_sizes: dict[str, int] = {}
        #: Deliveries waiting, taken in groups: the intake thread wakes once a group.
        self._inbox = Inbox(GROUP_LIMITS, MAX_QUEUED_BYTES, _weight)
        #: Messages of the group being committed still to commit after the current part.
        self._rest = 0
        self._stopping = threading.Event()
        #: Reload work in steps of one page (`_after_reload`), done between groups.
        self._jobs: deque[Iterator[None]] = deque()
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)
        self.stats = IntakeStats()
        #: Called after each committed group (the service wakes its loop).
        self.on_commit: Callable[[], None] = lambda: None
        #: Called once if SQLite reports the buffer file damaged; intake then holds every ack.
        self.on_damage: Callable[[str], None] = lambda reason: None
        #: Called once if the buffer file is gone or cannot be written (deleted, read-only
        #: filesystem, I/O errors); intake then holds every ack.
        self.on_lost: Callable[[str], None] = lambda reason: None
        #: The exception that ended the intake thread, if one did (the service stops on it).
        self.died: BaseException | None = None
        self.on_died: Callable[[], None] = lambda: None
        #: Called on the intake thread after a group is committed and acked, with what each of its
        #: outcomes became: (outcome, True if it was stored before). Feeds `hub-gateway watch`;
        #: it must not block.
        self.on_stored: Callable[[list[tuple[Outcome | DeviceLog, bool]]], None] = lambda happened: None
        self._named: set[str] = set()
        self._hinted: set[str] = set()
        #: (device, override key) -> decoded uplinks in a row that did not produce it; None
        #: once it matched or was flagged (nothing more to watch).
        self._override_misses: dict[tuple[DeviceKey, str], int | None] = {}
        self._unnamed = 0
        self._next_summary = time.monotonic() + SUMMARY_EVERY_S

    def add_parser(self, name: str, parser: Parser, max_message_size: int | None = None) -> None:
        """Register the parser of a source added after construction (the demo's site)."""
        self._parsers[name] = parser
        if max_message_size is not None:
            self._max_sizes[name] = max_message_size

    def deliver(self, delivery: Delivery) -> None:
        """Called by sources from their network threads: queue the message, waiting while the
        queue holds MAX_QUEUED_BYTES already (back-pressure instead of unbounded memory)."""
        self._inbox.put(delivery)

    def start(self) -> None:
        """Start the intake thread."""
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Finish the group being committed (and ack it), leave the rest to the broker."""
        self._stopping.set()
        self._inbox.close()  # ends the commit window now
        self._thread.join(timeout_s)

    @property
    def idle(self) -> bool:
        """True when intake has nothing queued and no part of a group left to commit (any
        thread; from `on_commit`, it means the group just committed was the last for now)."""
        return self._rest == 0 and self._inbox.queued == 0

    @property
    def alive(self) -> bool:
        """True while the intake thread runs (or has not been started)."""
        return self.died is None

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the supervisor must learn of any death
            log.critical("intake thread died; the daemon stops so systemd restarts it", exc_info=True)
            self.died = exc
            self.on_died()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            # A group is what arrives within the commit window of its first message, ended early
            # by a reload or a limit: a source with COMMIT_AT_UNACKED deliveries unacked gets
            # nothing more once they reach its Receive Maximum, so waiting out the window would
            # only idle.
            group, control = self._inbox.take(self.commit_interval_s, wait_s=0 if self._jobs else None)
            while group:  # decoded and committed in parts of at most MAX_GROUP_READINGS
                group = self._commit(group)
            if isinstance(control, _Reload):
                self._switch(control.devices)  # after the group: it was taken under the maps it came with
            self._step_jobs()  # reload work, one page between groups

    def _commit(self, group: list[Delivery]) -> list[Delivery]:
        """Decode messages of the group until MAX_GROUP_READINGS, commit and ack them; return
        the messages not yet decoded (the caller commits them next)."""
        pending: list[tuple[Delivery, list[Outcome | DeviceLog]]] = []
        readings = 0
        for i, delivery in enumerate(group):
            if readings >= MAX_GROUP_READINGS:
                rest = group[i:]
                break
            try:
                outcomes = self._outcomes(delivery)
            except Exception as exc:  # the one broad catch: a bug must not stop other devices
                log.exception("cannot process message", source=delivery.source_name, topic=delivery.topic)
                outcomes = [self._dead_letter(delivery, f"internal error: {type(exc).__name__}: {exc}")]
            pending.append((delivery, outcomes))
            readings += sum(len(o.readings) for o in outcomes if isinstance(o, DecodedUplink))
        else:
            rest = []
        self._rest = len(rest)  # read by `idle` from the commit's callbacks
        self._commit_decoded(pending)
        return [] if self._stopping.is_set() else rest

    def _commit_decoded(self, pending: list[tuple[Delivery, list[Outcome | DeviceLog]]]) -> None:
        warned = ""
        size = len(pending)  # how many messages to commit at once: halved while the disk is full
        while pending:
            # What is not committed is not acked: the broker keeps it for us.
            problem = None
            part = pending[:size]
            try:
                result, stored = self._store([o for _, outcomes in part for o in outcomes])
            except DiskFullError as exc:
                if size > 1:
                    size //= 2  # a smaller transaction may still fit in what room there is
                    continue
                problem = str(exc)
            except BufferFullError as exc:
                problem = str(exc)
            except BufferLostError as exc:
                self._hold_all(str(exc), self.on_lost)
                return
            except sqlite3.DatabaseError as exc:
                if is_damage(exc):
                    self._hold_all(str(exc), self.on_damage)
                    return
                if is_storage_failure(exc):
                    self._hold_all(f"cannot write {self.buffer.path}: {exc}", self.on_lost)
                    return
                problem = f"cannot write the buffer: {exc}"
            except Exception:  # a fault storing one message must not stop the others
                log.exception("cannot store a group of messages; storing them one by one")
                pending = self._store_singly(part) + pending[size:]
                size = 1
                continue
            if problem is None:
                rest = self._acknowledge(part, result, stored)
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

    def _store(self, outcomes: list[Outcome | DeviceLog]) -> tuple[StoreResult, list[Record | Outcome | DeviceLog]]:
        """Commit outcomes, decoded uplinks as the records (or dead letters) `encode` makes;
        return what the buffer said and what it was given."""
        stored: list[Record | Outcome | DeviceLog] = [
            self.encode(o) if isinstance(o, DecodedUplink) else o for o in outcomes
        ]
        return self.buffer.store(stored), stored

    def _hold_all(self, reason: str, tell: Callable[[str], None]) -> None:
        """The buffer cannot be trusted any more: ack nothing from now on, tell the service."""
        log.critical("buffer unusable; intake holds all acknowledgements", error=reason)
        self.stats.blocked = True
        tell(reason)
        self._stopping.wait()

    def _store_singly(
        self, part: list[tuple[Delivery, list[Outcome | DeviceLog]]]
    ) -> list[tuple[Delivery, list[Outcome | DeviceLog]]]:
        """Store each message of a group that failed as a whole on its own: those that store
        are acked; one that still fails becomes a dead letter with the error (left pending, for
        the caller's loop to store); buffer trouble leaves the rest pending as they are."""
        rest: list[tuple[Delivery, list[Outcome | DeviceLog]]] = []
        for i, (delivery, outcomes) in enumerate(part):
            try:
                result, stored = self._store(outcomes)
            except (BufferFullError, BufferLostError, sqlite3.DatabaseError):
                return rest + part[i:]
            except Exception as exc:
                if len(outcomes) == 1 and isinstance(outcomes[0], DeadLetter):
                    raise  # not even its dead letter stores: a fault the supervisor must see
                log.exception("cannot store a message; kept as a dead letter", topic=delivery.topic)
                rest.append((delivery, [self._dead_letter(delivery, f"internal error: {type(exc).__name__}: {exc}")]))
                continue
            rest += self._acknowledge([(delivery, outcomes)], result, stored)
        return rest

    def _acknowledge(
        self,
        pending: list[tuple[Delivery, list[Outcome | DeviceLog]]],
        result: StoreResult,
        stored: list[Record | Outcome | DeviceLog],
    ) -> list[tuple[Delivery, list[Outcome | DeviceLog]]]:
        """Ack the messages whose outcomes the store committed (a prefix); return the rest.
        `stored` is what the buffer was given for them (a decoded uplink may have become a dead
        letter there: too big for any message)."""
        done = covered = 0
        for _, outcomes in pending:
            if covered + len(outcomes) > result.taken:
                break
            covered += len(outcomes)
            done += 1
        for delivery, _ in pending[:done]:
            delivery.ack()
        # What each acked outcome became (a decoded uplink too big for any message became a dead
        # letter in `stored`), and whether the buffer had it already.
        duplicates = set(result.duplicate_at)
        happened: list[tuple[Outcome | DeviceLog, bool]] = []
        for outcome, given in zip((o for _, outcomes in pending[:done] for o in outcomes), stored, strict=False):
            shown = given if isinstance(given, DeadLetter) else outcome
            happened.append((shown, len(happened) in duplicates))
        if result.dropped is not None:
            log.warning("buffer bound reached: oldest readings dropped", **result.dropped.log_fields())
        if result.dead_letters:
            # Say what and why for the first few (journalctl shows it without `status`), then count.
            named = [o for o, duplicate in happened if isinstance(o, DeadLetter) and not duplicate]
            for letter in named[:DEAD_LETTERS_NAMED]:
                log.warning(
                    "dead letter",
                    device=str(letter.device) if letter.device else None,
                    sensor_id=letter.sensor_id,
                    reason=letter.reason[:300],
                    # No device in it (an event that does not parse): its topic is the best name.
                    **({"topic": letter.topic} if letter.device is None else {}),
                )
            if result.dead_letters > min(len(named), DEAD_LETTERS_NAMED):
                log.warning("dead letters stored", count=result.dead_letters)
        self.stats.add(result)
        self.stats.messages += done
        self.stats.groups += 1
        self.on_commit()
        if happened:
            self.on_stored(happened)
        return pending[done:]

    def _outcomes(self, delivery: Delivery) -> list[Outcome | DeviceLog]:
        if delivery.oversize is not None:
            limit = self._max_sizes.get(delivery.source_name)
            return [
                self._dead_letter(
                    delivery,
                    f"message of {delivery.oversize} bytes exceeds max_message_size"
                    + (f" ({limit} bytes)" if limit else "")
                    + f"; only its first {len(delivery.payload)} bytes are kept",
                )
            ]
        parser = self._parsers[delivery.source_name]
        try:
            event = parser(delivery.topic, delivery.payload, delivery.received_ms)
        except EventError as exc:
            if "this looks like" in str(exc) and delivery.source_name not in self._hinted:
                # A site-wide setting, not one bad message: every event fails until it is fixed.
                self._hinted.add(delivery.source_name)
                log.error("events do not parse: encoding mismatch", source=delivery.source_name, reason=str(exc))
            return [self._dead_letter(delivery, str(exc))]
        if isinstance(event, Ignored):
            self.stats.ignored += 1
            return []
        if isinstance(event, DeviceLog):
            return [event]
        outcome = resolve(event, self.devices)
        if isinstance(outcome, DecodedUplink) and outcome.unmatched_overrides:
            self._watch_overrides(outcome)
        if isinstance(outcome, Unmapped):
            self._tell("uplink from a device in no map (kept for replay once mapped)", str(event.device))
        elif isinstance(outcome, ForeignTenant):
            self._tell(
                "uplink from another ChirpStack tenant than the device map expects: dropped",
                str(event.device),
                sensor_id=outcome.sensor_id,
                expected_tenant=outcome.expected,
                tenant=event.network_tenant,
            )
        return [outcome]

    def _watch_overrides(self, uplink: DecodedUplink) -> None:
        """Count the uplinks an override missed; flag it once, in the log and in `status`."""
        mapped = self.devices.get(uplink.device)
        if mapped is None:
            return
        for key in mapped.entry.metrics:
            watch = (uplink.device, key)
            misses = self._override_misses.get(watch, 0)
            if misses is None:
                continue
            if key not in uplink.unmatched_overrides:
                self._override_misses[watch] = None  # it matched: fine for good
                continue
            misses += 1
            self._override_misses[watch] = misses
            if misses >= OVERRIDE_FLAG_AFTER:
                self._override_misses[watch] = None
                seen = ", ".join(uplink.codec_metrics) or "none"
                note = f"override {key} never matched; metrics seen: {seen}"
                log.warning(
                    "metric override never matched: check its name in the device map",
                    device=str(uplink.device),
                    sensor_id=uplink.sensor_id,
                    override=key,
                    metrics_seen=seen,
                    where=mapped.where,
                    uplinks=misses,
                )
                self.buffer.note_device(uplink.device, uplink.sensor_id, f"{note} ({mapped.where})")

    def _tell(self, what: str, device: str, **fields: object) -> None:
        """Log an unmapped or foreign device by name once; then only count it for the summary."""
        if device not in self._named and len(self._named) < NAMED_IN_LOG:
            self._named.add(device)
            log.warning(what, device=device, **fields)
        else:
            self._unnamed += 1
        if self._unnamed and time.monotonic() >= self._next_summary:
            log.info(
                "more uplinks from unmapped or other-tenant devices", uplinks=self._unnamed, seconds=SUMMARY_EVERY_S
            )
            self._unnamed = 0
            self._next_summary = time.monotonic() + SUMMARY_EVERY_S

    def _dead_letter(self, delivery: Delivery, reason: str) -> DeadLetter:
        match = _DEV_EUI_IN_TOPIC.search(delivery.topic)
        device = DeviceKey("dev_eui", match.group(1).lower()) if match else None
        mapped = self.devices.get(device) if device is not None else None
        # Distinct payloads are distinct dead letters, however close their arrival; the same
        # message redelivered is recognised (the digest covers its bytes and its real size).
        digest = delivery.digest or hashlib.sha256(delivery.payload).hexdigest()[:16]
        return DeadLetter(
            device=device,
            sensor_id=mapped.entry.sensor_id if mapped is not None else None,
            source=f"{delivery.source_name}/{delivery.topic}/{digest}",
            f_port=None,
            reason=reason,
            payload=delivery.payload,
            received_ms=delivery.received_ms,
            topic=delivery.topic,
        )

    def use_devices(self, devices: DeviceMap) -> None:
        """Take new device maps (a reload). Returns at once: the intake thread switches maps
        between two groups (a group is never half old map, half new), then decodes again the
        dead letters of every device whose entry changed and replays kept uplinks of newly
        mapped devices, a page at a time between groups, so intake and the main loop never
        wait for it and a stop ends it."""
        self._inbox.put_control(_Reload(devices))

    def _switch(self, devices: DeviceMap) -> None:
        """On the intake thread, between groups: the new maps, and the work they bring."""
        old, self.devices = self.devices, devices
        self._override_misses.clear()
        changed = [
            key for key, mapped in devices.by_key.items() if key in old.by_key and old.by_key[key].entry != mapped.entry
        ]
        for key in changed:
            self.buffer.note_device(key, devices.by_key[key].entry.sensor_id, "")  # a note about the old entry
        self._jobs.clear()  # an earlier reload's unfinished work: this one redoes what is still due
        self._jobs.append(self._after_reload(changed))

    def _step_jobs(self) -> None:
        """Do one page of reload work, if any is waiting."""
        if not self._jobs:
            return
        try:
            next(self._jobs[0])
        except StopIteration:
            self._jobs.popleft()

    def _after_reload(self, changed: list[DeviceKey]) -> Iterator[None]:
        """The reload's work, one page per step; its log line says how much was done."""
        counts = {"dead_letters_decoded_again": 0, "unmapped_uplinks_replayed": 0}
        for device in changed:
            after = 0
            while page := self.buffer.refused_uplinks(device, after_id=after):
                after = page[-1][0]
                counts["dead_letters_decoded_again"] += self._store_page(
                    [
                        (r, o)
                        for r, o in ((r, resolve(u, self.devices)) for r, u in page)
                        if isinstance(o, DecodedUplink)
                    ],
                    self.buffer.forget_dead_letters,
                )
                yield
        after = 0
        while page := self.buffer.unmapped(after_id=after):
            after = page[-1][0]
            counts["unmapped_uplinks_replayed"] += self._store_page(
                [(r, o) for r, o in ((r, resolve(u, self.devices)) for r, u in page) if not isinstance(o, Unmapped)],
                self.buffer.forget_unmapped,
            )
            yield
        log.info("device maps in use", devices=len(self.devices), **counts)

    def _store_page(self, page: list[tuple[int, Outcome]], forget: Callable[[list[int]], None]) -> int:
        """Store what a page of kept rows became under the new maps; forget the rows stored.
        Returns how many; 0 (the rows stay for the next reload) when the buffer refuses them."""
        if not page:
            return 0
        try:
            result, _ = self._store([o for _, o in page])
        except (BufferFullError, sqlite3.OperationalError) as exc:
            log.warning("kept uplinks not stored again yet: the buffer refuses them", reason=str(exc))
            return 0
        done = [row_id for row_id, _ in page[: result.taken]]  # stop-intake may take only the first
        forget(done)
        return len(done)


def _weight(delivery: Delivery) -> int:
    """What a queued message costs in memory: payload, topic, and the objects around them."""
    return len(delivery.payload) + len(delivery.topic) + MESSAGE_OVERHEAD


__all__ = ["Intake", "IntakeStats"]
