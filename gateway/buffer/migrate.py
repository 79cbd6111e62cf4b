"""A buffer file of the first version (one row per uplink, formed batches) carried over.

The first version kept each uplink's series text in an `uplinks` row and formed messages in
`batches`. At the first open by this version, in one transaction, both become chunks in the
same order (formed batches first: they are older), their idempotency keys become `seen` rows,
and the old tables go. Nothing acknowledged upstream is left behind. The file keeps its page
size (4096): changing it would rewrite the whole file, so a carried-over buffer writes more
per commit than a new one until it is next replaced.
"""

from __future__ import annotations

import json
import sqlite3
import time
from itertools import groupby

from gateway import wire
from gateway.buffer import records as rec
from gateway.buffer.records import Stored
from gateway.systemd import Notifier

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def is_first_version(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='uplinks'").fetchone() is not None


def migrate_first_version(db: sqlite3.Connection) -> str:
    """Carry a first-version file over (the new tables must exist); says what it carried."""
    db.execute("BEGIN IMMEDIATE")
    next_id = 1 + (db.execute("SELECT coalesce(max(id), 0) FROM chunks").fetchone()[0])
    batches = uplinks = readings = 0
    pending: list[Stored] = []

    def flush() -> None:
        nonlocal next_id
        for chunk in rec.cut(pending):
            data = rec.pack(chunk)
            db.execute(
                "INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    next_id,
                    min(r.received_ms for r in chunk),
                    max(r.received_ms for r in chunk),
                    len(chunk),
                    sum(r.readings for r in chunk),
                    sum(len(r.payload) for r in chunk),
                    len(data),
                    b"",
                    data,
                ),
            )
            next_id += 1
        pending.clear()

    gap = json.loads((db.execute("SELECT value FROM state WHERE key='gap'").fetchone() or ["{}"])[0])
    notifier = Notifier()
    extended = time.monotonic()
    # Row by row (a first-version backlog may be a gigabyte of formed messages), telling systemd
    # the start takes longer while it goes (a Pi may need minutes, past the start timeout).
    for oldest, gzipped, payload in db.execute("SELECT oldest_ms, gzip, payload FROM batches ORDER BY seq"):
        if time.monotonic() - extended > 10:
            notifier.notify("EXTEND_TIMEOUT_USEC=60000000", "STATUS=carrying the buffer over to the new format")
            extended = time.monotonic()
        message = wire.decode_message(bytes(payload), bool(gzipped))
        batches += 1
        if message.get("meta", {}).get("gap"):
            g = message["meta"]["gap"]
            gap = {
                "readings": gap.get("readings", 0) + g.get("readings", 0),
                "uplinks": gap.get("uplinks", 0) + g.get("uplinks", 0),
                "from_ms": min(x for x in (gap.get("from_ms"), g.get("from")) if x is not None),
                "to_ms": max(x for x in (gap.get("to_ms"), g.get("to")) if x is not None),
                "reasons": sorted(set(gap.get("reasons", [])) | set(str(g.get("reason", "")).split(", "))),
            }
        for _, group in groupby(message["series"], key=lambda s: s.get("source")):
            series = list(group)
            count = sum(len(s["t"]) for s in series)
            pending.append(Stored(oldest, count, ",".join(_dumps(s) for s in series).encode()))
            readings += count
        if len(pending) >= 2000:
            flush()
    last = 0
    while True:
        rows = db.execute(
            "SELECT id, received_ms, readings, series FROM uplinks WHERE id > ? ORDER BY id LIMIT 5000", (last,)
        ).fetchall()
        if not rows:
            break
        for row_id, received, count, series in rows:
            pending.append(Stored(received, count, series.encode()))
            uplinks += 1
            readings += count
            last = row_id
        flush()
    flush()
    keys = [rec.digest(k) for (k,) in db.execute("SELECT key FROM seen_log ORDER BY id")]
    newest = db.execute("SELECT coalesce(max(received_ms), 0) FROM seen_log").fetchone()[0]
    for i in range(0, len(keys), 10_000):
        db.execute("INSERT INTO seen (last_ms, keys) VALUES (?, ?)", (newest, rec.pack_keys(keys[i : i + 10_000])))
    if gap:
        db.execute("INSERT OR REPLACE INTO state VALUES ('gap', ?)", (json.dumps(gap),))
    db.execute("DROP TABLE uplinks")
    db.execute("DROP TABLE batches")
    db.execute("DROP TABLE seen_log")
    db.execute("DELETE FROM state WHERE key = 'totals'")  # counted again at open
    db.execute("COMMIT")
    return (
        f"{readings} readings carried over from the first buffer format ({uplinks} uplinks, {batches} formed batches)"
    )
