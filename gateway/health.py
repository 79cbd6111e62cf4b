"""The health message, hub.health.v1: the gateway's latest state, retained on its own topic.

SPEC 8b and issue 13. Latest state, not history, so it never goes through the readings buffer:
it is built from one `report.Snapshot` (what the metrics read too) when it is due, published
at QoS 1 with the retain flag, and replaced by the next. It is due at each connect (the
publisher's epoch changes), every `health.interval` while connected, and once at a clean stop
(`status: stopped`). The publisher carries the same topic's MQTT 5 will, `status: offline`,
which the cloud publishes only when the connection is lost for longer than `health.will_delay`.

The schema (config/schema/hub.health.v1.json) describes every field. Counts under
`since_last_report` and each device's `readings` and `decode_errors` cover the time since the
previous health message of this run (since the start for the first).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from gateway import pki
from gateway.buffer import now_ms
from gateway.cloud import Publisher, PublishResult
from gateway.config import Config
from gateway.config.settings import IotCoreCloud, Settings
from gateway.report import Reporter, Snapshot, overdue_after_s

log = structlog.get_logger("gateway.health")

SCHEMA = "hub.health.v1"
CONTENT_TYPE = "application/vnd.hub.health.v1+json"
#: Past this size (IoT Core takes 128 KiB with topic and properties) devices are left out of
#: the list, those that are silent or failing listed first, and counted in `devices.omitted`.
MAX_BYTES = 100 * 1024
#: A clean stop waits this long at most for the cloud to acknowledge the `stopped` message.
STOP_WAIT_S = 1.0


def config_digest(config: Config) -> str:
    """sha256 of the running settings and device maps as loaded (not their files' bytes: a
    comment or a reordering changes nothing the daemon does, and nothing here)."""
    devices = sorted((str(key), mapped.entry.model_dump(mode="json")) for key, mapped in config.devices.by_key.items())
    text = json.dumps(
        {"settings": config.settings.model_dump(mode="json"), "devices": devices}, sort_keys=True, default=str
    )
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _identity(settings: Settings) -> dict[str, Any]:
    g = settings.gateway
    return {"schema": SCHEMA, "gateway_id": g.id, "tenant_id": g.tenant_id, "site_id": g.site_id}


def offline_message(settings: Settings, version: str, started_ms: int) -> bytes:
    """The will: what the cloud publishes for this gateway once it vanished."""
    body = {**_identity(settings), "status": "offline", "version": version, "started_at": started_ms}
    return json.dumps(body, separators=(",", ":")).encode()


def _seconds(ms: int) -> int | float:
    """Milliseconds as seconds: whole seconds as an integer, or to a tenth."""
    return ms // 1000 if ms % 1000 == 0 else round(ms / 1000, 1)


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 3) if seconds > 0 else 0.0


class Health:
    """Builds health messages; keeps the previous report's counts for the next one's deltas."""

    def __init__(
        self,
        config: Config,
        reporter: Reporter,
        *,
        version: str,
        started_ms: int,
        before: Mapping[str, tuple[int | None, int | None]] | None = None,
        clock: Callable[[], int] = now_ms,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reporter = reporter
        self.version = version
        self.started_ms = started_ms
        #: device -> (last seen ms, usual interval ms) as the buffer kept them before this start.
        self.before = dict(before or {})
        self._clock = clock
        self._monotonic = monotonic
        # Uptime runs on the monotonic clock: a wall-clock step (NTP on a Pi without an RTC)
        # is not time the daemon ran. started_ms may lie before now (a caller's own start).
        self._started_mono = monotonic() - max(0, clock() - started_ms) / 1000
        self.use(config)
        self._previous: Snapshot | None = None
        self._previous_devices: dict[str, tuple[int, int]] = {}
        self.connected_since_ms: int | None = None

    def use(self, config: Config) -> None:
        """The running config (at start and after each reload)."""
        self.config = config
        self.digest = config_digest(config)

    def message(self, status: str) -> dict[str, Any]:
        """The health message now; the next message's counts start from here."""
        s = self.reporter.snapshot()
        settings = self.config.settings
        previous = self._previous
        period_s = max(0.0, (s.at_ms - (previous.at_ms if previous else self.started_ms)) / 1000)

        def since(name: str) -> int:
            now_value: int = getattr(s, name)
            return now_value - (getattr(previous, name) if previous else 0)

        refusals = sum(s.refusals.values()) + s.publish_failures
        refusals_before = sum(previous.refusals.values()) + previous.publish_failures if previous else 0
        uptime_s = max(0.0, self._monotonic() - self._started_mono)
        devices, listed = self._devices(s, uptime_s)
        body: dict[str, Any] = {
            **_identity(settings),
            "status": status,
            "at": s.at_ms,
            "version": self.version,
            "started_at": self.started_ms,
            "uptime_s": round(uptime_s),
            "interval_s": settings.health.interval,
            "config_digest": self.digest,
            "cloud": self._cloud(s),
            "backlog": {
                "readings": s.backlog_readings,
                "bytes": s.backlog_bytes,
                "oldest_unsent_age_s": None if s.oldest_unsent_age_s is None else round(s.oldest_unsent_age_s, 1),
            },
            "runway": {
                "hours": None if s.runway_limit is None else round(s.runway_s / 3600, 2),
                "until": s.runway_limit,
                "intake_bytes_per_s": round(s.intake_bytes_per_s, 1),
                "intake_readings_per_s": round(s.intake_readings_per_s, 3),
                "drain_needed_readings_per_s": round(s.intake_readings_per_s, 3),
            },
            "rates": {
                "intake_uplinks_per_s": _rate(since("uplinks"), period_s),
                "intake_readings_per_s": _rate(since("readings"), period_s),
                "publish_readings_per_s": _rate(since("published_readings"), period_s),
                "publish_batches_per_s": _rate(since("publishes"), period_s),
            },
            "since_last_report": {
                "seconds": round(period_s, 1),
                "uplinks": since("uplinks"),
                "readings": since("readings"),
                "dead_letters": since("dead_letters"),
                "unmapped": since("unmapped"),
                "duplicates": since("duplicates"),
                "foreign_tenant": since("foreign_tenant"),
                "dropped_readings": since("dropped_readings"),
                "published_readings": since("published_readings"),
                "publish_refusals": refusals - refusals_before,
            },
            "disk": {"free_bytes": s.disk_free_bytes, "buffer_bytes": s.buffer_bytes, "max_size_bytes": s.max_size},
            "certificate": self._certificate(),
            "devices": {
                "mapped": len(devices),
                "heard": sum(1 for d in devices if d["readings"] or d["decode_errors"]),
                "silent": sum(1 for d in devices if d["silent"]),
                "omitted": 0,
                "list": devices,
            },
        }
        self._previous = s
        self._previous_devices = listed
        return self._fit(body)

    def _cloud(self, s: Snapshot) -> dict[str, Any]:
        refusal = self.reporter.dispatcher.last_refusal
        return {
            "connected": s.cloud_connected,
            "connected_since": self.connected_since_ms if s.cloud_connected else None,
            "reconnects": max(0, s.connections - 1),
            "last_refusal": None
            if refusal is None
            else {"at": refusal["at_ms"], "reason_code": refusal.get("reason_code"), "reason": refusal["reason"]},
        }

    def _certificate(self) -> dict[str, Any] | None:
        cloud = self.config.settings.cloud
        if not isinstance(cloud, IotCoreCloud):
            return None
        try:
            validity = pki.certificate_validity(cloud.cert)
        except (OSError, ValueError) as exc:
            return {"days_left": None, "not_after": None, "error": str(exc)[:200]}
        return {
            "days_left": validity.days_left(datetime.now(UTC)),
            "not_after": int(validity.not_after.timestamp() * 1000),
            "error": None,
        }

    def _devices(self, s: Snapshot, uptime_s: float) -> tuple[list[dict[str, Any]], dict[str, tuple[int, int]]]:
        """Every mapped device, by sensor_id, with what was heard of it since the last report."""
        fallback_s = 3 * self.config.settings.health.interval
        counts: dict[str, tuple[int, int]] = {}
        entries = []
        for key, mapped in sorted(self.config.devices.by_key.items(), key=lambda item: item[1].entry.sensor_id):
            device = str(key)
            heard = s.devices.get(device)
            last_before, interval_before = self.before.get(device, (None, None))
            if heard is not None:
                readings, errors = heard.readings, heard.dead_letters
                counts[device] = (readings, errors)
                was = self._previous_devices.get(device, (0, 0))
                readings, errors = max(0, readings - was[0]), max(0, errors - was[1])
                interval_ms = heard.interval_ms or interval_before
                last_ms: int | None = heard.last_seen_ms
                limit_s = overdue_after_s(interval_ms / 1000) if interval_ms else fallback_s
                silent = (s.at_ms - heard.last_seen_ms) / 1000 > limit_s
            else:
                if device in self._previous_devices:  # counted before: the next counts go on from there
                    counts[device] = self._previous_devices[device]
                readings = errors = 0
                interval_ms, last_ms = interval_before, last_before
                # Never heard since the start: silent once the daemon has been up for longer
                # than the device takes to be overdue, so a restart does not report all silent.
                silent = uptime_s > (overdue_after_s(interval_ms / 1000) if interval_ms else fallback_s)
            entries.append(
                {
                    "sensor_id": mapped.entry.sensor_id,
                    "last_seen": last_ms,
                    "interval_s": None if interval_ms is None else _seconds(interval_ms),
                    "readings": readings,
                    "decode_errors": errors,
                    "silent": silent,
                }
            )
        return entries, counts

    def _fit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Keep the message under MAX_BYTES: list the silent and failing devices first, then
        the others, and count those left out."""
        if len(encode(body)) <= MAX_BYTES:
            return body
        devices = body["devices"]
        ranked = sorted(devices["list"], key=lambda d: (not d["silent"], not d["decode_errors"], d["sensor_id"]))
        fixed = len(encode({**body, "devices": {**devices, "list": []}}))
        kept, size = [], fixed
        for entry in ranked:
            size += len(encode(entry)) + 1
            if size > MAX_BYTES:
                break
            kept.append(entry)
        devices["omitted"] = len(ranked) - len(kept)
        devices["list"] = kept
        return body


def encode(message: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, as published."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


class HealthSender:
    """Publishes the health message when it is due; the main loop calls `tick` every turn."""

    def __init__(
        self,
        health: Health,
        publisher: Publisher,
        topic: str,
        interval_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.health = health
        self.publisher = publisher
        self.topic = topic
        self.interval_s = interval_s
        self._monotonic = monotonic
        self._epoch: int | None = None
        self._next = 0.0
        self._problem: str | None = None
        self.sent = 0
        self.failed = 0

    def due_at(self) -> float | None:
        """When the next message is due (monotonic), while connected; None while not (the
        connection coming up is what makes one due then)."""
        if not self.publisher.connected:
            return None
        return self._next if self.publisher.epoch == self._epoch else self._monotonic()

    def tick(self) -> None:
        """Publish at a new connection, and every interval while connected."""
        if not self.publisher.connected:
            return
        now = self._monotonic()
        epoch = self.publisher.epoch
        if epoch != self._epoch:
            self._epoch = epoch
            self.health.connected_since_ms = now_ms()
        elif now < self._next:
            return
        self._next = now + self.interval_s
        self.send("online")

    def send(self, status: str, answered: threading.Event | None = None) -> None:
        """Build and publish one health message; its outcome is logged, never fatal."""
        payload = encode(self.health.message(status))

        def done(result: PublishResult) -> None:
            if result.ok:
                self.sent += 1
                if self._problem is not None:
                    log.info("health message accepted again", topic=self.topic)
                    self._problem = None
            else:
                self.failed += 1
                if str(result) != self._problem:  # once per distinct reason, not once a minute
                    self._problem = str(result)
                    log.warning("health message not accepted", topic=self.topic, reason=str(result))
            if answered is not None:
                answered.set()

        self.publisher.publish_state(self.topic, payload, CONTENT_TYPE, done)

    def stop(self, deadline: float) -> bool:
        """At a clean stop: publish `stopped` and wait (until `deadline`, monotonic) for its
        answer. True when the cloud accepted it; otherwise the publisher should stop with its
        will, or the running gateway's `online` stays the retained state."""
        if not self.publisher.connected:
            return False
        answered = threading.Event()
        sent = self.sent
        try:
            self.send("stopped", answered)
        except Exception:  # the stop goes on whatever the health message does
            log.exception("cannot publish the stopped health message")
            return False
        answered.wait(max(0.0, min(STOP_WAIT_S, deadline - self._monotonic())))
        return answered.is_set() and self.sent > sent
