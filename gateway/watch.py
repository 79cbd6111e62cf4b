"""`hub-gateway watch`: a live, read-only stream of what the running daemon does with each uplink.

The daemon listens on a Unix socket beside the buffer (`<buffer dir>/watch.sock`, mode 0660,
group `hub-gateway` when that group exists). A watcher connects and sends one JSON line,
`{"ids": [...]}` (sensor_id, dev_eui or osm_id; empty: every device); the daemon filters (server
side, so a watcher of one device is not flooded or charged drops for the others), answers
`{"event": "watching", "ids": [...]}` once events flow to it, then sends one JSON object per
line for each outcome of each committed group:

    readings      device, sensor_id, readings (metric, value, unit, t_ms) after rename and scale
    dead_letter   device, sensor_id, reason, payload_hex (the first 256 bytes), payload_bytes
    unmapped      device (kept for replay once a map names it)
    other_tenant  device, sensor_id, expected_tenant, tenant (dropped)
    log           a ChirpStack log event: device, level, code, description
    duplicate     device, sensor_id, source (stored before: not stored again)
    dropped       count: events this watcher missed because it did not read fast enough

Intake hands outcomes over only after their group is committed and acknowledged, so nothing
shown was not stored. Handing over never blocks intake: each watcher has a bounded queue and
its own sending thread; what does not fit is dropped and counted, and the count is sent when
the watcher reads again.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from gateway.model import DeadLetter, DecodedUplink, DeviceKey, DeviceLog, ForeignTenant, Outcome, Unmapped
from gateway.status import how_near

log = structlog.get_logger("gateway.watch")

SOCKET_NAME = "watch.sock"
#: The service user's group: members may watch when the socket's directory lets them reach it.
SERVICE_GROUP = "hub-gateway"
#: Events waiting for one watcher; past this they are dropped and counted.
QUEUE_EVENTS = 1000
#: Events taken off the queue at once by a watcher's thread (one write to the socket).
SEND_AT_ONCE = 100
#: The kernel's buffer for each watcher: small, so a stalled watcher holds little besides its queue.
SEND_BUFFER_BYTES = 64 * 1024
MAX_WATCHERS = 16
HELLO_TIMEOUT_S = 2.0
HELLO_MAX_BYTES = 64 * 1024
PAYLOAD_HEX_MAX = 256
#: How often an idle watcher's thread looks whether its watcher went away.
IDLE_CHECK_S = 5.0
#: The accept loop's timeout, a backstop only: stop() wakes it at once.
ACCEPT_BACKSTOP_S = 60.0
#: Unmapped ids a watcher remembers the nearness of (a flood of strangers' ids is bounded).
NEAR_KEPT = 1000

#: What intake hands over: an outcome (a dead letter where the buffer made one) and whether the
#: buffer held it already.
Happened = tuple[Outcome | DeviceLog, bool]


def socket_path(buffer_path: Path) -> Path:
    """Where the daemon of this buffer listens."""
    return buffer_path.parent / SOCKET_NAME


def socket_address(path: Path, dir_fd: int | None = None) -> str:
    """A path a socket can bind or connect to: AF_UNIX takes at most 107 bytes, so a longer one
    goes through the directory's descriptor (Linux resolves /proc/self/fd/N like a directory)."""
    if len(os.fsencode(path)) < 100 or dir_fd is None:
        return str(path)
    return f"/proc/self/fd/{dir_fd}/{path.name}"


def normalise_id(value: str) -> str:
    """An ID as the filter compares it: a dev_eui or osm_id as bare lower-case hex (labels print
    them with '-', ':' or spaces), anything else (a sensor_id) as given."""
    bare = value.strip()
    hexed = "".join(c for c in bare if c not in "-: ").lower()
    if len(hexed) in (8, 16) and all(c in "0123456789abcdef" for c in hexed):
        return hexed
    return bare


def _identity(outcome: Outcome | DeviceLog) -> tuple[DeviceKey | None, str | None]:
    if isinstance(outcome, DecodedUplink | DeadLetter):
        return outcome.device, outcome.sensor_id
    if isinstance(outcome, Unmapped):
        return outcome.uplink.device, None
    if isinstance(outcome, ForeignTenant):
        return outcome.uplink.device, outcome.sensor_id
    return outcome.device, None


def describe(
    outcome: Outcome | DeviceLog, duplicate: bool, sensor_of: Callable[[DeviceKey], str | None] = lambda key: None
) -> dict[str, Any]:
    """One event of the stream, as the JSON object a watcher receives; `sensor_of` names the
    sensor of a device the outcome does not name it for (a ChirpStack log event)."""
    device, sensor = _identity(outcome)
    if sensor is None and device is not None:
        sensor = sensor_of(device)
    received = outcome.uplink.received_ms if isinstance(outcome, Unmapped | ForeignTenant) else outcome.received_ms
    event: dict[str, Any] = {
        "time": datetime.fromtimestamp(received / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "received_ms": received,
        "event": "",
        "device": str(device) if device else None,
        "sensor_id": sensor,
    }
    if duplicate:
        event["event"] = "duplicate"
        event["source"] = getattr(outcome, "source", None)
    elif isinstance(outcome, DecodedUplink):
        event["event"] = "readings"
        event["source"] = outcome.source
        event["readings"] = [
            {"metric": r.metric, "value": r.value, "unit": r.unit, "t_ms": r.t_ms} for r in outcome.readings
        ]
    elif isinstance(outcome, DeadLetter):
        event["event"] = "dead_letter"
        event["reason"] = outcome.reason
        event["f_port"] = outcome.f_port
        event["payload_hex"] = outcome.payload[:PAYLOAD_HEX_MAX].hex()
        event["payload_bytes"] = len(outcome.payload)
        if outcome.device is None:
            event["topic"] = outcome.topic
    elif isinstance(outcome, Unmapped):
        event["event"] = "unmapped"
    elif isinstance(outcome, ForeignTenant):
        event["event"] = "other_tenant"
        event["expected_tenant"] = outcome.expected
        event["tenant"] = outcome.uplink.network_tenant
    else:
        event["event"] = "log"
        event.update(level=outcome.level, code=outcome.code, description=outcome.description)
    return event


class _Watcher:
    """One connected watcher: its filter, its bounded queue and the thread that writes to it."""

    def __init__(
        self,
        conn: socket.socket,
        sensor_of: Callable[[DeviceKey], str | None],
        device_of: Callable[[str], DeviceKey | None] = lambda sensor: None,
    ) -> None:
        self.conn = conn
        self.sensor_of = sensor_of
        self.device_of = device_of
        #: Unmapped ids heard -> how near a watched device's they are (None: not near).
        self._near: dict[DeviceKey, str | None] = {}
        self.ids: frozenset[str] = frozenset()
        self._queue: deque[Happened] = deque()
        self._ready = threading.Condition()
        self.dropped = 0
        self.closed = False
        #: Set once the request is read: events flow to it from then on, filtered as it asked.
        self.ready = False
        self.thread = threading.Thread(target=self._run, name="watcher", daemon=True)

    def wants(self, outcome: Outcome | DeviceLog) -> bool:
        """True when this watcher asked for the outcome's device (or for every device)."""
        if not self.ids:
            return True
        device, sensor = _identity(outcome)
        if device is not None and sensor is None:
            sensor = self.sensor_of(device)
        if (sensor is not None and sensor in self.ids) or (device is not None and device.id.lower() in self.ids):
            return True
        return self.near(outcome) is not None

    def near(self, outcome: Outcome | DeviceLog) -> str | None:
        """For an uplink from a device in no map whose id is one or two edits from a watched
        device's: how (a typo in the map or on the label is why the watched device is silent)."""
        if not isinstance(outcome, Unmapped) or not self.ids:
            return None
        heard = outcome.uplink.device
        if heard in self._near:  # a stranger repeats: the edit distances run once per id heard
            return self._near[heard]
        if len(self._near) >= NEAR_KEPT:
            self._near.clear()
        self._near[heard] = found = self._near_uncached(heard)
        return found

    def _near_uncached(self, heard: DeviceKey) -> str | None:
        for watched in sorted(self.ids):
            key = self.device_of(watched)
            if key is None and normalise_id(watched) == watched and len(watched) in (8, 16):
                key = DeviceKey(heard.kind, watched)  # an id as given, mapped or not
            if key is None or key.kind != heard.kind:
                continue
            how = how_near(heard.id, key.id)
            if how:
                sensor = self.sensor_of(key)
                owner = f"{sensor}'s " if sensor else ""
                return f"{how} {owner}{key.kind} {key.id}"
        return None

    def offer(self, happened: Happened) -> None:
        """Queue an event, or count it dropped when the queue is full (never waits)."""
        with self._ready:
            if len(self._queue) >= QUEUE_EVENTS:
                self.dropped += 1
                return
            self._queue.append(happened)
            self._ready.notify()

    def close(self) -> None:
        """End the watcher: its thread sends nothing more and goes; a send under way is cut."""
        with self._ready:
            self.closed = True
            self._ready.notify()
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)

    def _hello(self) -> None:
        self.conn.settimeout(HELLO_TIMEOUT_S)
        data = b""
        while b"\n" not in data and len(data) < HELLO_MAX_BYTES:
            more = self.conn.recv(4096)
            if not more:
                break
            data += more
        request = json.loads(data.split(b"\n", 1)[0] or b"{}")
        ids = request.get("ids", []) if isinstance(request, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError('expected {"ids": [ID, ...]}')
        self.ids = frozenset(i.strip() for i in ids) | frozenset(normalise_id(i) for i in ids)
        self.conn.settimeout(None)  # a stalled watcher blocks only this thread; close() cuts it
        self.ready = True
        self.conn.sendall(encode_line({"event": "watching", "ids": ids}))

    def _event(self, outcome: Outcome | DeviceLog, duplicate: bool) -> dict[str, Any]:
        event = describe(outcome, duplicate, self.sensor_of)
        if event["event"] == "unmapped":
            near = self.near(outcome)
            if near is not None:
                event["near"] = near
        return event

    def _gone(self) -> bool:
        """True when the watcher closed its end (checked while idle, without reading its data)."""
        try:
            return self.conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _run(self) -> None:
        try:
            try:
                self._hello()
            except (OSError, ValueError) as exc:
                with contextlib.suppress(OSError):
                    self.conn.sendall(encode_line({"event": "error", "message": f"bad request: {exc}"}))
                return
            while True:
                with self._ready:
                    while not (self._queue or self.dropped or self.closed):
                        if not self._ready.wait(IDLE_CHECK_S) and self._gone():
                            return
                    if self.closed:
                        return
                    taken = [self._queue.popleft() for _ in range(min(SEND_AT_ONCE, len(self._queue)))]
                    dropped = 0 if self._queue else self.dropped
                    self.dropped -= dropped
                lines = [encode_line(self._event(o, duplicate)) for o, duplicate in taken]
                if dropped:
                    lines.append(encode_line({"event": "dropped", "count": dropped}))
                self.conn.sendall(b"".join(lines))
        except OSError:
            pass  # the watcher went away (Ctrl-C) or the daemon stops: nothing to say
        finally:
            with self._ready:
                self.closed = True
                self._queue.clear()
            with contextlib.suppress(OSError):
                self.conn.close()


def encode_line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), default=str).encode() + b"\n"


class WatchServer:
    """The daemon's side: the socket, the watchers, and `publish` for intake."""

    def __init__(
        self,
        path: Path,
        sensor_of: Callable[[DeviceKey], str | None] = lambda key: None,
        device_of: Callable[[str], DeviceKey | None] = lambda sensor: None,
    ) -> None:
        self.path = path
        self.sensor_of = sensor_of
        self.device_of = device_of
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._watchers: tuple[_Watcher, ...] = ()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="watch", daemon=True)
        self._failed = False

    def start(self) -> None:
        """Listen (replacing a stale socket: the caller holds the buffer's lock, so no other
        daemon of this buffer runs); a socket that cannot be made is logged, never fatal."""
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            listener.bind(socket_address(temp, dir_fd))
            # Set the mode before the socket gets its name: no moment where anyone may connect.
            os.chmod(temp, 0o660)
            with contextlib.suppress(KeyError, PermissionError):
                os.chown(temp, -1, grp.getgrnam(SERVICE_GROUP).gr_gid)
            os.replace(temp, self.path)
            self._inode = os.stat(self.path).st_ino
            listener.listen(8)
            # The accept loop sleeps until someone connects; stop() wakes it by connecting. The
            # timeout is only a backstop: polling the stop flag would wake the daemon for nothing.
            listener.settimeout(ACCEPT_BACKSTOP_S)
        except OSError as exc:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(temp)
            log.warning("hub-gateway watch is not available: cannot listen", path=str(self.path), error=str(exc))
            return
        finally:
            os.close(dir_fd)
        self._listener = listener
        self._thread.start()
        log.debug("watch socket listening", path=str(self.path))

    def publish(self, happened: Sequence[Happened]) -> None:
        """Intake's thread, after a commit: hand each outcome to the watchers that want it."""
        watchers = self._watchers
        if not watchers:
            return
        try:
            for item in happened:
                for watcher in watchers:
                    if watcher.ready and not watcher.closed and watcher.wants(item[0]):
                        watcher.offer(item)
        except Exception:  # the watch stream must never cost intake anything
            if not self._failed:
                self._failed = True
                log.exception("watch: cannot hand an event to a watcher")

    def stop(self) -> None:
        """Stop listening, end every watcher, remove the socket if it is still ours."""
        self._stopping.set()
        if self._listener is None:
            return
        self._wake_accept()
        self._thread.join(1.0)
        self._listener.close()
        watchers = list(self._drop_closed(all_=True))
        for watcher in watchers:
            watcher.close()
        for watcher in watchers:
            watcher.thread.join(0.2)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def _wake_accept(self) -> None:
        """Connect to our own socket, so that the accept loop wakes and sees the stop flag."""
        waker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                waker.connect(socket_address(self.path, dir_fd))
            finally:
                os.close(dir_fd)
        except OSError:
            pass  # the socket is gone: the loop ends at its backstop timeout (a daemon thread)
        finally:
            waker.close()

    def _drop_closed(self, all_: bool = False) -> Iterable[_Watcher]:
        """Forget closed watchers (all of them when stopping); return those forgotten."""
        with self._lock:
            gone = [w for w in self._watchers if all_ or w.closed]
            self._watchers = tuple(w for w in self._watchers if w not in gone)
        return gone

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                self._drop_closed()
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("watch: accept failed")
                continue
            if self._stopping.is_set():  # stop() woke us
                conn.close()
                return
            self._drop_closed()
            conn.setblocking(True)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            if len(self._watchers) >= MAX_WATCHERS:
                with contextlib.suppress(OSError):
                    conn.sendall(
                        encode_line({"event": "error", "message": f"too many watchers (at most {MAX_WATCHERS})"})
                    )
                conn.close()
                continue
            watcher = _Watcher(conn, self.sensor_of, self.device_of)
            with self._lock:
                self._watchers += (watcher,)
            watcher.thread.start()


__all__ = ["WatchServer", "describe", "encode_line", "normalise_id", "socket_address", "socket_path"]
