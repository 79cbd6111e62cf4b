"""`hub-gateway status`: what the buffer says, read-only, whether or not the daemon runs, and how
long the cloud certificate has left."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gateway import pki
from gateway.buffer import now_ms, view
from gateway.config.settings import Cloud, IotCoreCloud
from gateway.config.suggest import close_names
from gateway.report import overdue_after_s


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
        who = letter["device"] or "(device unknown)"
        lines.append(f"  dead letter {_age(letter['received_ms'], now)} {who}: {letter['reason']}")
    lines.insert(4, format_cloud(report.get("cloud"), now))
    maps = report.get("maps") or {}
    for problem in maps.get("problems", []):
        lines.append(f"DEVICE MAP BROKEN: {problem}")
    if maps.get("from") == "daemon":
        lines.append("  (the devices below are those the running daemon uses; fix the map, then reload)")
    lines += format_devices(report.get("device_table", []), now)
    return "\n".join(lines)


def _dead_letter_line(letters: dict[str, Any]) -> str:
    line = f"dead letters:  {letters['kept']} kept ({letters['kept_bytes']} bytes), {letters['total']} since the start"
    if letters["decoded_again"]:
        line += f", {letters['decoded_again']} decoded again after a map fix"
    return line


# ---- devices: what is mapped, what was heard, and a verdict on each ----------------------------


def _span(seconds: float) -> str:
    """A duration as people say it: 45 s, 14 min, 3.5 h, 2.0 d."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _clock(ms: int | None) -> str:
    if ms is None:
        return "unknown"
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def edit_distance(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) that turn `a` into `b`."""
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            row[j] = min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def how_near(heard: str, mapped: str) -> str | None:
    """How an id heard differs from a mapped one, when it is a likely typo of it."""
    heard, mapped = heard.lower(), mapped.lower()
    distance = edit_distance(heard, mapped)
    if distance == 0 or distance > 2:
        return None
    if len(heard) == len(mapped):
        diff = [i for i in range(len(heard)) if heard[i] != mapped[i]]
        if len(diff) == 2 and diff[1] == diff[0] + 1 and heard[diff[0]] == mapped[diff[1]]:
            return "two neighbouring digits swapped from"
    return "one digit from" if distance == 1 else "two digits from"


def near_misses(device: str, heard: list[str]) -> list[str]:
    """For a mapped device ("dev_eui:..."), the unmapped devices heard whose id is one or two
    edits from its id, each as a sentence."""
    kind, _, ident = device.partition(":")
    found = []
    for other in heard:
        how = _near_key(other, device)
        if how:
            found.append(f"unmapped {kind} {other.partition(':')[2]} was heard: {how} this device's {ident}")
    return found


RELOAD = "reload (systemctl reload hub-gateway)"


def verdict(
    mapped: dict[str, Any] | None,
    row: dict[str, Any] | None,
    strays: list[str],
    started_ms: int | None,
    now: int,
    loaded: bool | None = None,
) -> str:
    """One line on why a device is silent, or "ok". `loaded`: whether the running daemon has the
    device in its maps (False: only the map on disk names it; None: not known, no daemon runs)."""
    if mapped is None:
        return "heard but in no map"
    heard = row is not None and bool(row.get("last_seen_ms"))
    if not heard:
        near = near_misses(mapped["device"], strays)
        if near:
            return near[0]
        never = f"never heard since {_clock(started_ms)}" if started_ms else "never heard"
        return f"{never}; the running daemon has not loaded it: {RELOAD}" if loaded is False else never
    assert row is not None
    outcome, last_log = row.get("last_outcome"), row.get("last_log") or ""
    if outcome == "unmapped":
        # Its uplinks are kept for replay, not decoded: never "ok", however recent.
        if loaded is False:
            return f"heard, but in none of the running daemon's maps: {RELOAD}"
        return "heard while in no map; mapped since: no uplink of it decoded yet"
    if outcome == "other tenant" or (row["foreign_tenant"] and not row["uplinks"]):
        return "other tenant"
    if outcome == "dead letter" or (outcome == "log" and "UPLINK_CODEC" in last_log):
        return "decode errors"
    if outcome == "log" and "F_CNT_RESET" in last_log:
        return "frame-counter reset"
    interval = row.get("interval_ms")
    age_s = (now - row["last_seen_ms"]) / 1000
    if interval and age_s > overdue_after_s(interval / 1000):
        return f"late: last seen {_span(age_s)} ago, usually every {_span(interval / 1000)}"
    return "ok"


def device_table(report: dict[str, Any], maps: dict[str, Any]) -> list[dict[str, Any]]:
    """Every mapped device (heard or not) and every device heard but not mapped, with its
    counters and verdict. `maps`: what `maps_in_use` returns."""
    now = now_ms()
    rows = {d["device"]: d for d in report.get("devices", [])}
    mapped = {m["device"]: m for m in maps["devices"]}
    strays = [key for key in rows if key not in mapped]
    daemon = report.get("daemon") or {}
    started = daemon.get("started_ms")
    # What the running daemon has loaded (a map edited on disk applies only after a reload).
    in_use = report.get("devices_in_use")
    loaded = {d["device"] for d in in_use} if daemon.get("running") and in_use is not None else None
    unheard = [key for key in mapped if not (rows.get(key) or {}).get("last_seen_ms")]
    table = []
    for key in sorted(mapped, key=lambda k: mapped[k]["sensor_id"]):
        row = rows.get(key)
        says = verdict(mapped[key], row, strays, started, now, None if loaded is None else key in loaded)
        table.append(_device_entry(key, mapped[key], row, says))
    for key in sorted(strays):
        says = verdict(None, rows[key], strays, started, now)
        near = [(how, other) for other in unheard if (how := _near_key(key, other))]
        if near:
            how, other = near[0]
            says += f": {how} {other.partition(':')[2]} ({mapped[other]['sensor_id']}), never heard"
        table.append(_device_entry(key, None, rows[key], says))
    return table


def _near_key(heard: str, mapped: str) -> str | None:
    """How a heard device key is a likely typo of a mapped one of the same kind (or None)."""
    kind, _, ident = heard.partition(":")
    other_kind, _, other_id = mapped.partition(":")
    return how_near(ident, other_id) if kind == other_kind else None


def likely_typos(on_disk: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """For `check`: each device of the maps never heard whose id is one or two edits from an id
    heard in no map, as a sentence (a typo in the map, or on the label)."""
    rows = {d["device"]: d for d in report.get("devices", [])}
    mapped = {m["device"] for m in on_disk}
    strays = [key for key, row in rows.items() if key not in mapped and row.get("last_seen_ms")]
    found = []
    for m in on_disk:
        if (rows.get(m["device"]) or {}).get("last_seen_ms"):
            continue
        kind, _, ident = m["device"].partition(":")
        for stray in strays:
            how = _near_key(stray, m["device"])
            if how:
                heard = stray.partition(":")[2]
                found.append(
                    f"{m['where']}: {m['sensor_id']}'s {kind} {ident} was never heard, but {kind} {heard}, "
                    f"{how} it, was heard in no map: a typo? (hub-gateway status {heard})"
                )
    return found


def _device_entry(key: str, mapped: dict[str, Any] | None, row: dict[str, Any] | None, says: str) -> dict[str, Any]:
    kind, _, ident = key.partition(":")
    row = row or {}
    return {
        "device": key,
        "kind": kind,
        "id": ident,
        "sensor_id": mapped["sensor_id"] if mapped else row.get("sensor_id"),
        "mapped": mapped is not None,
        "where": mapped.get("where") if mapped else None,
        "codec": mapped.get("codec") if mapped else None,
        "last_seen_ms": row.get("last_seen_ms") or None,
        "interval_ms": row.get("interval_ms"),
        "uplinks": row.get("uplinks", 0),
        "readings": row.get("readings", 0),
        "dead_letters": row.get("dead_letters", 0),
        "log_events": row.get("log_events", 0),
        "last_log": row.get("last_log"),
        "foreign_tenant": row.get("foreign_tenant", 0),
        "last_dead_letter": row.get("last_dead_letter"),
        "latest": row.get("latest") or {},
        "note": row.get("note"),
        "verdict": says,
    }


def maps_in_use(report: dict[str, Any], on_disk: list[dict[str, Any]], problems: list[str]) -> dict[str, Any]:
    """Which device list `status` shows: the maps on disk when they load, else (a map broken)
    the list the running daemon recorded, so a broken file hides no device."""
    in_use = report.get("devices_in_use")
    if problems and in_use is not None:
        return {"from": "daemon", "devices": in_use, "problems": problems}
    return {"from": "disk", "devices": on_disk, "problems": problems}


def find_device(query: str, table: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The device a `status DEVICE` argument names: sensor_id, dev_eui or osm_id (any case,
    with or without separators or a "dev_eui:" prefix)."""
    ident = query.split(":", 1)[1] if query.startswith(("dev_eui:", "osm_id:")) else query
    bare = re.sub(r"[-: ]", "", ident).lower()
    for entry in table:
        if entry["sensor_id"] == query or entry["id"].lower() == bare:
            return entry
    return None


def suggest(query: str, table: list[dict[str, Any]]) -> list[str]:
    """Known sensor ids and device ids one or two edits from an unknown `query`."""
    names = {e["sensor_id"] for e in table if e["sensor_id"]} | {e["id"] for e in table}
    bare = re.sub(r"[-: ]", "", query).lower()
    near = sorted(n for n in names if min(edit_distance(query.lower(), n.lower()), edit_distance(bare, n.lower())) <= 2)
    return near or close_names(query, names)


def format_devices(table: list[dict[str, Any]], now: int) -> list[str]:
    """The devices section of `status`: one line each, the verdict last."""
    if not table:
        return []
    row = "  {:<24} {:<18} {:>10} {:>8} {:>8} {:>5}  {}"
    lines = ["devices:", row.format("sensor_id", "id", "last seen", "uplinks", "readings", "dead", "verdict")]
    for e in table:
        seen = _age(e["last_seen_ms"], now) if e["last_seen_ms"] else "never"
        label = e["sensor_id"] if e["mapped"] else "(unmapped)"
        lines.append(row.format(label, e["id"], seen, e["uplinks"], e["readings"], e["dead_letters"], e["verdict"]))
        if e.get("note"):
            lines.append(f"    note: {e['note']}")
    return lines


def format_cloud(cloud: dict[str, Any] | None, now: int) -> str:
    """The cloud link line: connected or not, since when, the last error and its reason code."""
    if not cloud:
        return "cloud link:    unknown (no daemon has recorded it)"
    state = "connected" if cloud["connected"] else "DISCONNECTED"
    line = f"cloud link:    {state} since {_clock(cloud['since_ms'])} ({_span((now - cloud['since_ms']) / 1000)})"
    error = cloud.get("last_error")
    if error:
        code = error.get("reason_code")
        coded = f"reason code 0x{code:02x} " if code is not None else ""
        line += f"; last error {_age(error.get('at_ms'), now)}: {coded}{error['reason']}"
    return line


def format_device(e: dict[str, Any], report: dict[str, Any]) -> str:
    """`status DEVICE`: a diagnosis in a few lines."""
    now = now_ms()
    name = f"{e['sensor_id'] or '(no sensor_id)'} ({e['kind']} {e['id']})"
    where = f"mapped at {e['where']}, codec {e['codec']}" if e["mapped"] else "in no device map"
    lines = [f"{name}: {where}"]
    if e["last_seen_ms"]:
        usual = f", usually every {_span(e['interval_ms'] / 1000)}" if e["interval_ms"] else ""
        lines.append(f"  last seen:    {_age(e['last_seen_ms'], now)} ({_clock(e['last_seen_ms'])}){usual}")
    else:
        started = (report.get("daemon") or {}).get("started_ms")
        lines.append("  last seen:    never" + (f" since {_clock(started)}" if started else ""))
    for metric, (value, unit, t_ms) in sorted(e["latest"].items()):
        lines.append(f"  {metric:<13} {value}{' ' + unit if unit else ''}  at {_clock(t_ms)}")
    lines.append(
        f"  counts:       {e['uplinks']} uplinks, {e['readings']} readings, {e['dead_letters']} dead letters, "
        f"{e['log_events']} log events, {e['foreign_tenant']} from another tenant"
    )
    if e["last_dead_letter"]:
        lines.append(f"  last dead letter: {e['last_dead_letter']}")
    if e["last_log"]:
        lines.append(f"  last log event:   {e['last_log']}")
    if e.get("note"):
        lines.append(f"  note:         {e['note']}")
    lines.append(f"  verdict:      {e['verdict']}")
    return "\n".join(lines)
