"""`hub-gateway status`: what the buffer says, read-only, whether or not the daemon runs, and how
long the cloud certificate has left."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway import pki
from gateway.buffer import now_ms, view
from gateway.config.settings import Cloud, IotCoreCloud


def read_status(path: Path, dead_letters: int = 5) -> dict[str, Any]:
    """The status report as data (what `--json` prints): the buffer's read-only view."""
    return view.read(path, dead_letters)


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
