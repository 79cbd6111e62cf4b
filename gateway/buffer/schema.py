"""The buffer file's tables, and its totals as the file holds them.

One `chunks` row per commit group (the readings), `seen` for the idempotency keys of chunks
already sent, and beside them dead letters, unmapped uplinks, device counters, counters and a
few small facts. Totals are saved in the `state` row `totals` up to a chunk id, never
rewritten by an append: chunks after it are added when the totals are read.
"""

from __future__ import annotations

import json
import sqlite3

from gateway.buffer import side

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (      -- one commit group of records, in intake order
    id        INTEGER PRIMARY KEY,
    first_ms  INTEGER NOT NULL,          -- receive time of its oldest record (max_age)
    last_ms   INTEGER NOT NULL,
    records   INTEGER NOT NULL,
    readings  INTEGER NOT NULL,
    raw       INTEGER NOT NULL,          -- payload bytes, uncompressed
    size      INTEGER NOT NULL,          -- bytes it holds on disk (keys and data): max_size counts these
    keys      BLOB NOT NULL,             -- 8-byte digests of the idempotency keys its group brought
    data      BLOB NOT NULL              -- records.pack: index and payloads, compressed
);
-- Takes handed out and not yet ended: a message formed from them is sent again after a
-- restart with the same batch id and bytes. Recorded with the next commit after the take.
CREATE TABLE IF NOT EXISTS takes (
    seq       INTEGER PRIMARY KEY,       -- the batch id's sequence
    created_ms INTEGER NOT NULL,
    spans     TEXT NOT NULL,             -- JSON [[chunk id, first index, end index], ...]
    gap       TEXT,                      -- JSON of the gap its message reports, if any
    done      INTEGER NOT NULL DEFAULT 0 -- ended (confirmed, rejected, divided): its records are
                                         -- not handed out again; gone with its last chunk
);
-- Idempotency keys of chunks already sent, so a late duplicate is still known (no index:
-- the window is held in memory, loaded at open).
CREATE TABLE IF NOT EXISTS seen (
    id        INTEGER PRIMARY KEY,
    last_ms   INTEGER NOT NULL,
    keys      BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,
    received_ms INTEGER NOT NULL,
    device      TEXT,
    sensor_id   TEXT,
    source      TEXT NOT NULL,
    topic       TEXT,
    f_port      INTEGER,
    reason      TEXT NOT NULL,
    payload     BLOB NOT NULL,
    uplink      TEXT                     -- the whole Uplink (JSON) when a codec refused it: re-decoded on reload
);
CREATE TABLE IF NOT EXISTS unmapped (    -- uplinks of devices in no map, for replay
    id          INTEGER PRIMARY KEY,
    received_ms INTEGER NOT NULL,
    device      TEXT NOT NULL,
    uplink      TEXT NOT NULL            -- JSON of the Uplink, payload in hex
);
CREATE TABLE IF NOT EXISTS devices (     -- per-device counters for status
    device        TEXT PRIMARY KEY,
    sensor_id     TEXT,
    last_seen_ms  INTEGER,
    uplinks       INTEGER NOT NULL DEFAULT 0,
    readings      INTEGER NOT NULL DEFAULT 0,
    dead_letters  INTEGER NOT NULL DEFAULT 0,
    log_events    INTEGER NOT NULL DEFAULT 0,
    last_log      TEXT,
    foreign_tenant INTEGER NOT NULL DEFAULT 0,
    note          TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device_details (  -- written once a minute: apart, so counters rows stay small
    device        TEXT PRIMARY KEY,
    latest        TEXT,                  -- JSON {metric: [value, unit, t_ms]}, bounded (side.LATEST_METRICS_KEPT)
    interval_ms   INTEGER,               -- the usual time between its uplinks (smoothed)
    last_dead_letter TEXT,               -- reason of its newest dead letter
    last_outcome  TEXT                   -- what its newest uplink became: readings, dead letter, unmapped, other tenant
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (       -- small facts: totals, next seq, pending gap
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""
#: Columns added after the first release: (table, column, type), added at open when missing.
ADDED_COLUMNS = (
    ("dead_letters", "uplink", "TEXT"),
    ("devices", "note", "TEXT"),
)
#: What the file holds, as saved in the `totals` state row up to chunk `upto` (later chunks
#: are added at open: appends never rewrite the row).
TOTAL_KEYS = ("chunks", "records", "readings", "raw", "bytes", "dead_letter_bytes", "unmapped_bytes", "upto")


def file_totals(db: sqlite3.Connection) -> dict[str, int]:
    """What a buffer file holds: its saved totals plus the chunks appended since (read-only)."""
    row = db.execute("SELECT value FROM state WHERE key='totals'").fetchone()
    saved = json.loads(row[0]) if row is not None else {}
    if set(saved) != set(TOTAL_KEYS) or any(v < 0 for v in saved.values()):
        # Never trust impossible totals: count the file again.
        dead = db.execute(f"SELECT coalesce(sum({side.DEAD_LETTER_SIZE}),0) FROM dead_letters").fetchone()[0]
        kept = db.execute("SELECT coalesce(sum(length(uplink)),0) FROM unmapped").fetchone()[0]
        saved = dict.fromkeys(TOTAL_KEYS, 0) | {"dead_letter_bytes": dead, "unmapped_bytes": kept}
    after = db.execute(
        "SELECT count(*), coalesce(sum(records),0), coalesce(sum(readings),0), coalesce(sum(raw),0),"
        " coalesce(sum(size),0), coalesce(max(id),0) FROM chunks WHERE id > ?",
        (saved["upto"],),
    ).fetchone()
    for key, value in zip(("chunks", "records", "readings", "raw", "bytes"), after[:5], strict=True):
        saved[key] += value
    saved["upto"] = max(saved["upto"], after[5])
    return saved
