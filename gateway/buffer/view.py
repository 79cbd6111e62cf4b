"""The buffer as `status` sees it: read-only, whether or not the daemon runs.

`status` reads the buffer through `read`, never its tables, so the storage may change without
it (the running daemon's own reports, health and metrics, ask the open `Buffer`). The daemon's
heartbeat (every `buffer.status_interval`, 30 s by default) writes the device counters and
totals that this reads, and what the daemon noted (`Buffer.note_state`: the cloud link, the
devices it runs with, its start); readings are counted from the file itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from gateway.buffer.files import connect, now_ms
from gateway.buffer.schema import file_totals

#: A daemon that missed this many heartbeats (its interval is in the file) is not running.
HEARTBEATS_MISSED = 3


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read(path: Path, dead_letters: int = 5) -> dict[str, Any]:
    """What the buffer at `path` holds and says, as data (what `status --json` prints)."""
    if not path.exists():
        return {"buffer": str(path), "exists": False}
    db = connect(path, readonly=True)
    try:
        db.execute("BEGIN")  # one snapshot: totals and chunks as one commit left them
        state = {str(k): str(v) for k, v in db.execute("SELECT key, value FROM state")}
        totals = file_totals(db)
        counters = {str(k): int(v) for k, v in db.execute("SELECT name, value FROM counters")}
        oldest = db.execute("SELECT first_ms FROM chunks ORDER BY id LIMIT 1").fetchone()
        letters = [
            {
                "received_ms": r[0],
                "device": r[1],
                "sensor_id": r[2],
                "f_port": r[3],
                "reason": r[4],
                "payload_hex": bytes(r[5]).hex(),
            }
            for r in db.execute(
                "SELECT received_ms, device, sensor_id, f_port, reason, payload FROM dead_letters"
                " ORDER BY id DESC LIMIT ?",
                (dead_letters,),
            )
        ]
        columns = (
            "device",
            "sensor_id",
            "last_seen_ms",
            "uplinks",
            "readings",
            "dead_letters",
            "log_events",
            "last_log",
            "foreign_tenant",
            "note",
            "latest",
            "interval_ms",
            "last_dead_letter",
            "last_outcome",
        )
        devices = list(
            Database(db).query(
                f"SELECT {', '.join(columns)} FROM devices LEFT JOIN device_details USING (device) ORDER BY device"
            )
        )
        for dev in devices:
            dev["latest"] = json.loads(dev["latest"]) if dev["latest"] else {}
        unmapped = db.execute("SELECT count(*) FROM unmapped").fetchone()[0]
        kept_letters = db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    finally:
        db.close()
    now = now_ms()
    oldest_ms = None if oldest is None else int(oldest[0])
    heartbeat = int(state["heartbeat_ms"]) if "heartbeat_ms" in state else None
    pid = int(state["pid"]) if "pid" in state else None
    stale_ms = HEARTBEATS_MISSED * int(state.get("heartbeat_every_ms", "30000")) + 5_000
    running = heartbeat is not None and now - heartbeat < stale_ms and pid is not None and _pid_alive(pid)
    last_publish = int(state["last_publish_ms"]) if "last_publish_ms" in state else None
    notes = {k.removeprefix("daemon."): json.loads(v) for k, v in state.items() if k.startswith("daemon.")}
    return {
        "buffer": str(path),
        "exists": True,
        "daemon": {
            "running": running,
            "pid": pid if running else None,
            "heartbeat_ms": heartbeat,
            "started_ms": notes.get("started_ms"),
        },
        #: The cloud link as the daemon last wrote it: connected, since_ms, last_error.
        "cloud": notes.get("cloud"),
        #: The devices the daemon runs with (its maps as loaded or last reloaded), with FILE:LINE:COL.
        "devices_in_use": notes.get("devices"),
        "backlog": {
            "readings": totals["readings"],
            "bytes": totals["raw"],
            "stored_bytes": totals["bytes"],
            "oldest_unsent_ms": oldest_ms,
            "oldest_unsent_age_s": None if oldest_ms is None else round((now - oldest_ms) / 1000, 1),
        },
        "last_publish_ms": last_publish,
        "last_publish_age_s": None if last_publish is None else round((now - last_publish) / 1000, 1),
        "dead_letters": {
            "total": counters.get("dead_letters", 0),
            "kept": kept_letters,
            "decoded_again": counters.get("dead_letters_decoded_again", 0),
            "kept_bytes": totals["dead_letter_bytes"],
            "latest": letters,
        },
        "unmapped_uplinks": unmapped,
        "unmapped_bytes": totals["unmapped_bytes"],
        "counters": counters,
        "gap_pending": json.loads(state.get("gap", "{}")),
        "recovered": json.loads(state["recovered"]) if "recovered" in state else None,
        "devices": devices,
    }
