"""`hub-gateway watch`, the command's side: connect to the running daemon's watch socket
(gateway.watch, the daemon's side, describes the protocol), send which devices to watch, and
print each event as a line for people, or as it came with `--json`."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from gateway.watch import encode_line, socket_address


def _value(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


def format_event(event: dict[str, Any]) -> str:
    """One event as a line for people: local time, sensor, device, then what happened."""
    kind = event.get("event")
    if kind == "dropped":
        return f"... {event['count']} events dropped: this terminal is too slow"
    if kind == "error":
        return f"error from the daemon: {event.get('message')}"
    when = datetime.fromtimestamp(event["received_ms"] / 1000).strftime("%H:%M:%S")
    who = f"{when} {event.get('sensor_id') or '-'} {event.get('device') or '-'}"
    if kind == "readings":
        by_metric: dict[str, list[dict[str, Any]]] = {}
        for r in event["readings"]:
            by_metric.setdefault(r["metric"], []).append(r)
        parts = []
        for metric, rs in by_metric.items():
            last = rs[-1]
            unit = f" {last['unit']}" if last.get("unit") else ""
            many = f" ({len(rs)} samples, last shown)" if len(rs) > 1 else ""
            parts.append(f"{metric}={_value(last['value'])}{unit}{many}")
        return f"{who}  " + ("  ".join(parts) if parts else "(no readings)")
    if kind == "dead_letter":
        shown = event["payload_hex"]
        more = f"... ({event['payload_bytes']} bytes)" if event["payload_bytes"] * 2 > len(shown) else ""
        topic = f" topic {event['topic']}" if event.get("topic") else ""
        return f"{who}  DEAD LETTER: {event['reason']}{topic}  payload {shown or '(empty)'}{more}"
    if kind == "unmapped":
        near = f"; {event['near']}: a typo in the map?" if event.get("near") else ""
        return f"{who}  unmapped: no device map names it (kept for replay once mapped){near}"
    if kind == "other_tenant":
        return f"{who}  other tenant: {event.get('tenant')} (map expects {event.get('expected_tenant')}): dropped"
    if kind == "log":
        return f"{who}  ChirpStack log {event.get('level')} {event.get('code')}: {event.get('description')}"
    if kind == "duplicate":
        return f"{who}  duplicate: stored before, not again ({event.get('source')})"
    return f"{who}  {kind}"


def watch(path: Path, ids: Sequence[str], as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Connect to the daemon's socket and print its events until Ctrl-C (0) or it goes (1)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        dir_fd = None
    try:
        conn.connect(socket_address(path, dir_fd))
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"hub-gateway watch: no daemon is running (nothing listens on {path})", file=err)
        return 1
    except PermissionError:
        print(
            f"hub-gateway watch: permission denied on {path}; run it as root or as the daemon's user "
            "(sudo -u hub-gateway hub-gateway watch)",
            file=err,
        )
        return 1
    except OSError as exc:
        print(f"hub-gateway watch: cannot connect to {path}: {exc.strerror or exc}", file=err)
        return 1
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    try:
        with conn, conn.makefile("rb") as stream:
            try:
                conn.sendall(encode_line({"ids": list(ids)}))
            except OSError:
                pass  # the daemon went at once: the answer below is missing, and says so
            answer = json.loads(stream.readline() or b"{}")
            if answer.get("event") != "watching":
                print(
                    f"hub-gateway watch: the daemon refused: {answer.get('message', 'it closed the connection')}",
                    file=err,
                )
                return 1
            what = ", ".join(ids) if ids else "every device"
            print(f"watching {what} (Ctrl-C to stop)", file=err, flush=True)
            for raw in stream:
                if as_json:
                    out.write(raw.decode())
                else:
                    out.write(format_event(json.loads(raw)) + "\n")
                out.flush()
    except KeyboardInterrupt:
        return 0
    except ConnectionResetError:
        pass  # the daemon went; a BrokenPipeError is stdout's (`watch | head`): the caller's to handle
    print("hub-gateway watch: the daemon stopped", file=err)
    return 1


__all__ = ["format_event", "watch"]
