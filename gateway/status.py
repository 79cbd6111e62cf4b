"""`hub-gateway status`: what the buffer says, read-only, whether or not the daemon runs, and how
long the cloud certificate has left."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from gateway import pki
from gateway.buffer import connect, now_ms
from gateway.config.settings import Cloud, IotCoreCloud

HEARTBEAT_STALE_MS = 60_000


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(path: Path, dead_letters: int = 5) -> dict[str, Any]:
    """The status report as data (what `--json` prints)."""
    if not path.exists():
        return {"buffer": str(path), "exists": False}
    db = Database(connect(path, readonly=True))
    state = {row["key"]: row["value"] for row in db["state"].rows}
    totals = json.loads(state.get("totals", "{}"))
    counters = {row["name"]: row["value"] for row in db["counters"].rows}
    oldest = db.execute(
        "SELECT min(t) FROM (SELECT (SELECT received_ms FROM uplinks ORDER BY id LIMIT 1) AS t"
        " UNION ALL SELECT min(oldest_ms) FROM batches)"
    ).fetchone()[0]  # uplinks are in intake order: the first row is the oldest, found without a scan
    now = now_ms()
    heartbeat = int(state["heartbeat_ms"]) if "heartbeat_ms" in state else None
    pid = int(state["pid"]) if "pid" in state else None
    running = heartbeat is not None and now - heartbeat < HEARTBEAT_STALE_MS and pid is not None and _pid_alive(pid)
    last_publish = int(state["last_publish_ms"]) if "last_publish_ms" in state else None
    letters = [
        {
            "received_ms": r["received_ms"],
            "device": r["device"],
            "sensor_id": r["sensor_id"],
            "f_port": r["f_port"],
            "reason": r["reason"],
            "payload_hex": bytes(r["payload"]).hex(),
        }
        for r in db.query(
            "SELECT received_ms, device, sensor_id, f_port, reason, payload FROM dead_letters ORDER BY id DESC LIMIT ?",
            [dead_letters],
        )
    ]
    devices = list(
        db.query(
            "SELECT device, sensor_id, last_seen_ms, uplinks, readings, dead_letters, log_events, last_log,"
            " foreign_tenant, note FROM devices ORDER BY device"
        )
    )
    unmapped = db["unmapped"].count
    kept_letters = db["dead_letters"].count
    db.conn.close()
    return {
        "buffer": str(path),
        "exists": True,
        "daemon": {"running": running, "pid": pid if running else None, "heartbeat_ms": heartbeat},
        "backlog": {
            "readings": totals.get("readings", 0) + totals.get("batch_readings", 0),
            "bytes": totals.get("bytes", 0) + totals.get("batch_bytes", 0),
            "batches_unconfirmed": totals.get("batches", 0),
            "oldest_unsent_ms": oldest,
            "oldest_unsent_age_s": None if oldest is None else round((now - oldest) / 1000, 1),
        },
        "last_publish_ms": last_publish,
        "last_publish_age_s": None if last_publish is None else round((now - last_publish) / 1000, 1),
        "dead_letters": {
            "total": counters.get("dead_letters", 0),
            "kept": kept_letters,
            "decoded_again": counters.get("dead_letters_decoded_again", 0),
            "kept_bytes": totals.get("dead_letter_bytes", 0),
            "latest": letters,
        },
        "unmapped_uplinks": unmapped,
        "unmapped_bytes": totals.get("unmapped_bytes", 0),
        "counters": counters,
        "gap_pending": json.loads(state.get("gap", "{}")),
        "recovered": json.loads(state["recovered"]) if "recovered" in state else None,
        "devices": devices,
    }


def certificate_status(cloud: Cloud) -> dict[str, Any] | None:
    """The IoT Core certificate as `status` and `check` show it: path, not_after (ISO 8601, UTC),
    days_left, expired, warning (fewer than 30 days left) and a summary; or why it cannot be read.
    None for a cloud that needs no certificate."""
    if not isinstance(cloud, IotCoreCloud):
        return None
    try:
        validity = pki.certificate_validity(cloud.cert)
    except OSError as exc:
        return {"path": str(cloud.cert), "error": f"cannot read: {exc.strerror or exc}"}
    except ValueError as exc:
        return {"path": str(cloud.cert), "error": str(exc)}
    now = pki.now_utc()
    days, expired = validity.days_left(now), validity.expired(now)
    return {
        "path": str(cloud.cert),
        "subject": validity.subject,
        "not_after": validity.not_after.isoformat(),
        "days_left": days,
        "expired": expired,
        "warning": expired or days < pki.EXPIRY_WARNING_DAYS,
        "summary": validity.describe(now),
    }


def _certificate_line(cert: dict[str, Any]) -> str:
    head = f"certificate:   {cert['path']} "
    if "error" in cert:
        return head + str(cert["error"])
    if cert["expired"]:
        return head + f"{cert['summary']}: IoT Core refuses it; renew it (sudo hub-gateway enroll --force)"
    if cert["warning"]:
        return head + f"{cert['summary']}: RENEW IT SOON (sudo hub-gateway enroll --force)"
    return head + str(cert["summary"])


def _age(ms: int | None, now: int) -> str:
    if ms is None:
        return "never"
    seconds = (now - ms) / 1000
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def format_status(report: dict[str, Any]) -> str:
    """The status report for people."""
    certificate = [_certificate_line(report["certificate"])] if report.get("certificate") else []
    if not report["exists"]:
        return "\n".join([f"buffer {report['buffer']} does not exist yet (the daemon has not run)", *certificate])
    now = now_ms()
    d = report["daemon"]
    b = report["backlog"]
    lines = [
        f"daemon:        {'running, pid ' + str(d['pid']) if d['running'] else 'not running'}",
        f"buffer:        {report['buffer']}",
        f"backlog:       {b['readings']} readings, {b['bytes']} bytes, "
        f"oldest unsent {_age(b['oldest_unsent_ms'], now) if b['oldest_unsent_ms'] else 'none'}",
        f"last publish:  {_age(report['last_publish_ms'], now)}",
        *certificate,
        _dead_letter_line(report["dead_letters"]),
        f"unmapped:      {report['unmapped_uplinks']} uplinks from devices in no map, "
        f"{report['unmapped_bytes']} bytes (kept for replay)",
    ]
    if report.get("recovered"):
        r = report["recovered"]
        lines.append(
            f"DAMAGED BUFFER moved aside {_age(r['at_ms'], now)} to {r['moved_to']} ({r['reason']}); "
            "unsent readings may be salvaged from it with `sqlite3 FILE .recover`"
        )
    for key, value in sorted(report["counters"].items()):
        if key.startswith(("puback_refused", "publish_failed", "dropped", "foreign", "duplicate", "buffer_")):
            lines.append(f"  {key}: {value}")
    for letter in report["dead_letters"]["latest"]:
        lines.append(f"  dead letter {_age(letter['received_ms'], now)} {letter['device']}: {letter['reason']}")
    if report["devices"]:
        lines.append("devices:")
        for dev in report["devices"]:
            extra = []
            if dev["dead_letters"]:
                extra.append(f"{dev['dead_letters']} dead letters")
            if dev["log_events"]:
                extra.append(f"{dev['log_events']} log events (last: {dev['last_log']})")
            if dev["foreign_tenant"]:
                extra.append(f"{dev['foreign_tenant']} from another tenant")
            if dev.get("note"):
                extra.append(dev["note"])
            lines.append(
                f"  {dev['device']:<28} {dev['sensor_id'] or '(unmapped)':<24} "
                f"last seen {_age(dev['last_seen_ms'], now)}" + (f"; {', '.join(extra)}" if extra else "")
            )
    return "\n".join(lines)


def _dead_letter_line(letters: dict[str, Any]) -> str:
    line = f"dead letters:  {letters['kept']} kept ({letters['kept_bytes']} bytes), {letters['total']} since the start"
    if letters["decoded_again"]:
        line += f", {letters['decoded_again']} decoded again after a map fix"
    return line
