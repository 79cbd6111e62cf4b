"""Beside the readings: dead letters, uplinks of devices in no map, per-device counters.

These are evidence for the field engineer (`status`, a replay once a map is fixed), written
only when they happen, and bounded: each side store keeps at most a tenth of `max_size` and a
row limit, oldest dropped first, so bad input can never crowd out the readings. Device
counters are gathered in memory and written with the heartbeat, never per commit.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from gateway.model import DeadLetter, DeviceKey, Uplink

DEAD_LETTERS_KEPT = 10_000
UNMAPPED_KEPT = 10_000
#: Dead letters and unmapped uplinks each keep at most this share of `max_size`.
SIDE_STORE_SHARE = 10
UNMAPPED_DEVICES_KEPT = 1_000  # rows of never-mapped devices in the `devices` table
#: What a dead letter weighs in max_size: its payload and, when kept, the whole uplink.
DEAD_LETTER_SIZE = "length(payload) + coalesce(length(uplink), 0)"
#: Latest values kept per device (the newest metrics win), and the characters of a text value.
LATEST_METRICS_KEPT = 32
LATEST_TEXT_MAX = 64
#: Devices whose last uplink and interval are held in memory (for intervals and metrics).
HEARD_KEPT = 5_000


def uplink_json(uplink: Uplink) -> str:
    return json.dumps(
        {
            "source": uplink.source,
            "device": [uplink.device.kind, uplink.device.id],
            "payload": uplink.payload.hex(),
            "time_ms": uplink.time_ms,
            "received_ms": uplink.received_ms,
            "f_port": uplink.f_port,
            "meta": dict(uplink.meta),
            "object": uplink.object,
            "network_tenant": uplink.network_tenant,
            "dedup_key": uplink.dedup_key,
        }
    )


def uplink_from_json(text: str) -> Uplink:
    d = json.loads(text)
    return Uplink(
        source=d["source"],
        device=DeviceKey(d["device"][0], d["device"][1]),
        payload=bytes.fromhex(d["payload"]),
        time_ms=d["time_ms"],
        received_ms=d["received_ms"],
        f_port=d["f_port"],
        meta=d["meta"],
        object=d["object"],
        network_tenant=d["network_tenant"],
        dedup_key=d.get("dedup_key"),
    )


def insert_dead_letter(db: sqlite3.Connection, letter: DeadLetter) -> int:
    """Store one dead letter (part of a transaction); returns the bytes it weighs."""
    whole = uplink_json(letter.uplink) if letter.uplink is not None else None
    db.execute(
        "INSERT INTO dead_letters (received_ms, device, sensor_id, source, topic, f_port, reason, payload, uplink)"
        " VALUES (?,?,?,?,?,?,?,?,?)",
        (
            letter.received_ms,
            str(letter.device) if letter.device else None,
            letter.sensor_id,
            letter.source,
            letter.topic,
            letter.f_port,
            letter.reason,
            letter.payload,
            whole,
        ),
    )
    return len(letter.payload) + len(whole or "")


def insert_unmapped(db: sqlite3.Connection, uplink: Uplink) -> int:
    kept = uplink_json(uplink)
    db.execute(
        "INSERT INTO unmapped (received_ms, device, uplink) VALUES (?,?,?)",
        (uplink.received_ms, str(uplink.device), kept),
    )
    return len(kept)


def prune(db: sqlite3.Connection, totals: dict[str, int], max_size: int) -> dict[str, int]:
    """Keep dead letters and unmapped uplinks within their row limit and share of `max_size`,
    oldest first; the newest of each is always kept. Returns rows pruned per table."""
    cap = max(1, max_size // SIDE_STORE_SHARE)
    pruned: dict[str, int] = {}
    for table, size, key, rows_kept in (
        ("dead_letters", DEAD_LETTER_SIZE, "dead_letter_bytes", DEAD_LETTERS_KEPT),
        ("unmapped", "length(uplink)", "unmapped_bytes", UNMAPPED_KEPT),
    ):
        newest = db.execute(f"SELECT max(id) FROM {table}").fetchone()[0]
        if newest is None:
            continue
        cut = newest - rows_kept  # ids rise: rows with id <= cut go
        excess = totals[key] - cap
        if excess > 0:
            acc = 0
            for rid, n in db.execute(f"SELECT id, {size} FROM {table} WHERE id < ? ORDER BY id", (newest,)):
                acc += n
                cut = max(cut, rid)
                if acc >= excess:
                    break
        if cut <= 0:
            continue
        count, freed = db.execute(
            f"SELECT count(*), coalesce(sum({size}),0) FROM {table} WHERE id <= ?", (cut,)
        ).fetchone()
        if count:
            db.execute(f"DELETE FROM {table} WHERE id <= ?", (cut,))
            totals[key] -= freed
            pruned[f"{table}_pruned"] = count
    return pruned


def page_unmapped(db: sqlite3.Connection, after_id: int, max_bytes: int, max_rows: int) -> list[tuple[int, Uplink]]:
    page: list[tuple[int, Uplink]] = []
    size = 0
    for row_id, text in db.execute(
        "SELECT id, uplink FROM unmapped WHERE id > ? ORDER BY id LIMIT ?", (after_id, max_rows)
    ):
        page.append((row_id, uplink_from_json(text)))
        size += len(text)
        if size >= max_bytes:
            break
    return page


def page_refused(db: sqlite3.Connection, device: DeviceKey, after_id: int, max_rows: int) -> list[tuple[int, Uplink]]:
    rows = db.execute(
        "SELECT id, uplink FROM dead_letters WHERE device = ? AND id > ? AND uplink IS NOT NULL ORDER BY id LIMIT ?",
        (str(device), after_id, max_rows),
    ).fetchall()
    return [(r[0], uplink_from_json(r[1])) for r in rows]


class DeviceCounts:
    """Per-device counters gathered since the last heartbeat, written by `flush`; and, held
    across heartbeats, when each device was last heard and its usual interval."""

    def __init__(self) -> None:
        self.pending: dict[str, dict[str, Any]] = {}
        #: Details gathered since the last flush with details (see `flush`).
        self.held: dict[str, dict[str, Any]] = {}
        #: device -> [sensor_id, last seen (receive ms), last data time (ms), interval ms or None]
        self.heard: dict[str, list[Any]] = {}
        #: device -> [readings, dead letters] flushed since start (add `pending` for the count now):
        #: summed at the heartbeat, never per uplink.
        self.flushed: dict[str, list[int]] = {}

    def of(self, device: str, sensor_id: str | None, at: int = 0, heard: bool = True) -> dict[str, Any]:
        """The device's counters gathered since the last flush; `at` (receive ms) marks it heard,
        unless `heard` is False (another ChirpStack tenant's uplink: not this device heard)."""
        d = self.pending.get(device)  # (runs for every uplink: no dict made when there is one)
        if d is None:
            d = self.pending[device] = {
                "sensor_id": sensor_id,
                "last": 0,
                "up": 0,
                "rd": 0,
                "dl": 0,
                "log": 0,
                "lastlog": None,
                "ft": 0,
            }
        if at > d["last"]:
            d["last"] = at
        if sensor_id:
            d["sensor_id"] = sensor_id
        if at and heard:
            seen = self.heard.pop(device, None)
            if seen is None:
                seen = [sensor_id, 0, 0, None]
            elif sensor_id:
                seen[0] = sensor_id
            if at > seen[1]:
                seen[1] = at
            self.heard[device] = seen  # most recently heard last: the oldest go first
            if len(self.heard) > HEARD_KEPT:
                self._forget_one()
        return d

    def _forget_one(self) -> None:
        """Past HEARD_KEPT: forget the device heard longest ago that no map names (a flood of
        strangers' ids must not push out the site's own devices), else the oldest of all. The
        site's devices are few, so the scan passes over at most that many."""
        victim = next(iter(self.heard))
        for device, seen in self.heard.items():
            if seen[0] is None:
                victim = device
                break
        del self.heard[victim]

    def outcome(self, d: dict[str, Any], what: str, dead_letter: str | None = None) -> None:
        """What the device's newest uplink became (and, for a dead letter, why)."""
        d["outcome"] = what
        if dead_letter is not None:
            d["lastdl"] = dead_letter[:300]

    def readings(self, device: str, d: dict[str, Any], latest: Sequence[tuple[str, Any, str | None, int]]) -> None:
        """Keep the newest value of each metric, and learn the interval from the data's own
        times (not receive times: a backlog redelivered after a restart arrives all at once)."""
        if not latest:
            return
        values = d.get("latest")
        if values is None:
            values = d["latest"] = {}
        data_ms = latest[0][3]
        for metric, value, unit, t_ms in latest:
            if t_ms > data_ms:
                data_ms = t_ms
            if isinstance(value, str):
                value = value[:LATEST_TEXT_MAX]
            held = values.get(metric)
            if held is None or t_ms >= held[2]:
                values[metric] = [value, unit, t_ms]
        if len(values) > LATEST_METRICS_KEPT:
            d["latest"] = _newest(values)
        seen = self.heard.get(device)
        if seen is None:
            return
        gap = data_ms - seen[2]
        if seen[2] and gap > 0:
            seen[3] = gap if seen[3] is None else round(0.75 * seen[3] + 0.25 * gap)
            d["iv"] = seen[3]
        seen[2] = max(seen[2], data_ms)

    def flush(self, db: sqlite3.Connection, details: bool = True) -> None:
        """Write the counters gathered (part of a transaction); a crash loses at most one
        heartbeat's worth of counts, never a reading. The details (latest values, interval,
        last outcome and dead letter) are the bulk of a device's row: without `details` they are
        kept for a later flush, so a frequent heartbeat does not rewrite them each time."""
        for key, d in self.pending.items():
            held = self.held.setdefault(key, {})
            if d.get("latest"):
                merged = held.setdefault("latest", {})
                for metric, v in d.pop("latest").items():
                    if metric not in merged or v[2] >= merged[metric][2]:
                        merged[metric] = v
            for field in ("iv", "outcome", "lastdl"):
                if field in d:
                    held[field] = d.pop(field)
        if details:
            for key, held in self.held.items():
                d = self.pending.setdefault(
                    key,
                    {"sensor_id": None, "last": 0, "up": 0, "rd": 0, "dl": 0, "log": 0, "lastlog": None, "ft": 0},
                )
                d.update(held)
            self.held = {}
        for key, d in self.pending.items():
            counts = self.flushed.setdefault(key, [0, 0])
            counts[0] += d["rd"]
            counts[1] += d["dl"]
            db.execute(
                "INSERT INTO devices (device, sensor_id, last_seen_ms, uplinks, readings, dead_letters,"
                " log_events, last_log, foreign_tenant, note) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(device) DO UPDATE SET sensor_id=coalesce(excluded.sensor_id, sensor_id),"
                " last_seen_ms=max(coalesce(last_seen_ms,0), excluded.last_seen_ms),"
                " uplinks=uplinks+excluded.uplinks, readings=readings+excluded.readings,"
                " dead_letters=dead_letters+excluded.dead_letters, log_events=log_events+excluded.log_events,"
                " last_log=coalesce(excluded.last_log, last_log),"
                " foreign_tenant=foreign_tenant+excluded.foreign_tenant,"
                " note=CASE WHEN excluded.note = '' THEN NULL ELSE coalesce(excluded.note, note) END",
                (
                    key,
                    d["sensor_id"],
                    d["last"],
                    d["up"],
                    d["rd"],
                    d["dl"],
                    d["log"],
                    d["lastlog"],
                    d["ft"],
                    d.get("note"),
                ),
            )
            if not any(field in d for field in ("latest", "iv", "lastdl", "outcome")):
                continue
            # The details live in their own table: a counters row stays small, so the frequent
            # heartbeat rewrites few pages.
            latest = None
            if d.get("latest"):
                row = db.execute("SELECT latest FROM device_details WHERE device = ?", (key,)).fetchone()
                merged = json.loads(row[0]) if row is not None and row[0] else {}
                for metric, v in d["latest"].items():
                    if metric not in merged or v[2] >= merged[metric][2]:
                        merged[metric] = v
                latest = json.dumps(_newest(merged))
            db.execute(
                "INSERT INTO device_details (device, latest, interval_ms, last_dead_letter, last_outcome)"
                " VALUES (?,?,?,?,?) ON CONFLICT(device) DO UPDATE SET"
                " latest=coalesce(excluded.latest, latest), interval_ms=coalesce(excluded.interval_ms, interval_ms),"
                " last_dead_letter=coalesce(excluded.last_dead_letter, last_dead_letter),"
                " last_outcome=coalesce(excluded.last_outcome, last_outcome)",
                (key, latest, d.get("iv"), d.get("lastdl"), d.get("outcome")),
            )
        if self.pending:
            # Devices no map names (a neighbour's sensors, a typo'd dev_eui) come and go: keep
            # the most recently heard, or a stream of random ids would grow the table forever.
            db.execute(
                "DELETE FROM devices WHERE sensor_id IS NULL AND device NOT IN (SELECT device FROM devices"
                " WHERE sensor_id IS NULL ORDER BY last_seen_ms DESC LIMIT ?)",
                (UNMAPPED_DEVICES_KEPT,),
            )
            db.execute("DELETE FROM device_details WHERE device NOT IN (SELECT device FROM devices)")
        self.pending = {}

    def since_start(self, device: str) -> tuple[int, int]:
        """Readings stored and dead letters of a device since the start (a dead letter decoded
        again after a map fix counts as a reading, not a dead letter)."""
        flushed = self.flushed.get(device, (0, 0))
        pending = self.pending.get(device)
        if pending is None:
            return flushed[0], max(0, flushed[1])
        return flushed[0] + pending["rd"], max(0, flushed[1] + pending["dl"])


def _newest(values: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """At most LATEST_METRICS_KEPT metrics, the most recent ones, in name order."""
    kept = sorted(values.items(), key=lambda item: item[1][2], reverse=True)[:LATEST_METRICS_KEPT]
    return dict(sorted(kept))


def forget_rows(db: sqlite3.Connection, table: str, ids: Sequence[int]) -> list[tuple[Any, ...]]:
    """Delete rows by id; returns (size, device, sensor_id) of each row that existed."""
    size = DEAD_LETTER_SIZE if table == "dead_letters" else "length(uplink)"
    extra = "device, sensor_id" if table == "dead_letters" else "device, NULL"
    gone = []
    for i in ids:
        row = db.execute(f"SELECT {size}, {extra} FROM {table} WHERE id = ?", (i,)).fetchone()
        if row is not None:
            db.execute(f"DELETE FROM {table} WHERE id = ?", (i,))
            gone.append(tuple(row))
    return gone
