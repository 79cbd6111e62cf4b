"""Intake speed: the real daemon between two real brokers, against a bare MQTT subscriber (issue 11).

    python bench/intake.py [--uplinks 30000] [--repeat 3] [--seconds 60] [--warmup 15]
                           [--catch-up 100000] [--only a,b,c,d] [--dir DIR] [--py-spy PATH]

The real daemon (`hub-gateway run`, tests/support/daemon.py) takes ChirpStack v4 uplink events
from a plain local Mosquitto (ChirpStack's broker) and publishes to a TLS Mosquitto with client
certificates (IoT Core's stand-in), as bench/flash.py sets them up. Both run with the shipped
defaults (batch.max_delay 5s, 120 KiB gzip messages, commit_interval 1s, log level info); the
local broker as the README asks of a site (persistence, max_inflight_messages 100) with a queue
limit far above any burst here, so the broker drops nothing. Four parts, each on fresh brokers
and a fresh buffer under --dir, each printing result lines with figure and unit:

(a) a burst of --uplinks ChirpStack JSON uplink events (an osm-v2 frame of 3 readings each,
    QoS 1, 50 devices), timed from the first publish until every reading has arrived at the
    stand-in (rows counted with gateway.wire.expand_rows). The baseline, in the same run and on
    the same local broker: a bare paho MQTT v5 subscriber with what the daemon's subscription
    has (persistent session, QoS 1, Receive Maximum 1000, manual acks) that only counts and
    acknowledges the same burst. Also printed: when the daemon had committed every uplink (its
    buffer's key digests, which each commit writes) and the CPU it used. --repeat runs, each on
    fresh brokers and buffer, each printed, then the medians (a shared machine is noisy).
(b) the same with `encoding: protobuf` (binary ChirpStack events).
(c) the daemon's CPU time (utime + stime of /proc/PID/stat) as a share of one core at the seed
    site's load (gateway.demo_site.SimulatedSite: 45 current clamps at one uplink a second, 15
    air-quality units every 30 s) over --seconds after --warmup.
(d) catch-up: the daemon runs once so that its persistent session exists, stops; --catch-up
    uplinks are published and queue at the local broker; the daemon starts again. Printed: the
    seconds from its start until every uplink is committed (its buffer's key digests, polled
    read-only) and until every reading has arrived at the stand-in.

The publisher and the bare subscriber are forked processes (the publisher keeps up to 100 in
flight, 1000 queued), as the daemon is its own process,
so no two of them share a GIL; the stand-in's reader (which decodes what arrives) runs in this
process. Every count is checked: the bare subscriber must see each message exactly once, the
stand-in every reading (duplicates are counted and printed), the daemon's status no dead letter
and no unmapped uplink, and the local broker's log no "dropped". A shortfall stops the bench.

With --py-spy (path of a py-spy executable, e.g. from a scratch venv: it is not a project
dependency), (a) runs once more with the daemon sampled during the burst (`py-spy record --gil`:
where its Python CPU goes) and prints the share per thread and the top 15 functions by own
samples; that run carries the sampler's overhead and is left out of the medians. (c) then also
prints the daemon's CPU per thread over its window (/proc/PID/task, named by `py-spy dump`;
native threads such as awscrt's are unnamed), and runs once more under the sampler at 1000 Hz
(`--nonblocking`: the daemon is not paused for each sample, which at this rate would multiply
its CPU; stacks may then be slightly inconsistent).

Needs the project importable, Mosquitto installed, and --dir (default a temporary directory
under /var/tmp) on a real disk: the buffer fsyncs as in production.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from gateway import wire  # noqa: E402
from gateway.buffer import now_ms  # noqa: E402
from gateway.demo_site import SimulatedSite  # noqa: E402
from gateway.sources import Delivery  # noqa: E402
from gateway.sources.mqtt import RECEIVE_MAXIMUM  # noqa: E402
from tests.chirpstack import encode, topic, uplink_event  # noqa: E402
from tests.support.brokers import Mosquitto, ServerTLS, Subscriber, find_mosquitto, publishing  # noqa: E402
from tests.support.certs import TestCerts, make_test_certs  # noqa: E402
from tests.support.daemon import READINGS_FILTER, Daemon  # noqa: E402
from tests.test_bridge import record, u16  # noqa: E402

READINGS_PER_UPLINK = 3
BURST_DEVICES = 50
#: The daemon's chirpstack source subscribes to this (its default); the bare subscriber too.
CHIRPSTACK_FILTER = "application/+/device/+/event/+"
#: Far above any queue here: Mosquitto's default (1000) would drop what a stopped daemon misses.
LOCAL_QUEUE_LIMIT = 10_000_000
#: What the README asks of a site's broker "if bursts matter"; IoT Core's per-client limit.
LOCAL_INFLIGHT = 100
CLOUD_INFLIGHT = 100
#: Messages the publisher lets wait in paho beyond those in flight.
PUBLISH_QUEUE = 1000
#: The shipped defaults (tests/support/daemon.py's own are tuned for fast tests).
PRODUCTION_BATCH = "{max_delay: 5s, max_bytes: 120KiB, compression: gzip}"
POLL_S = 0.05
PROFILE_TOP = 15
#: (c) uses about 1% of a core: a higher rate than (a)'s for enough samples in its window.
PROFILE_RATE_C = 1000

Message = tuple[str, bytes]


class BenchError(RuntimeError):
    """A part could not be measured honestly (a count fell short, a process died)."""


# -- brokers and the daemon ---------------------------------------------------------------


class QuietMosquitto(Mosquitto):
    """Mosquitto without `log_type all`: the test helper's debug log writes lines for every
    PUBLISH, which would make the broker's own log a cost of the bench. Notices stay (they
    include "running", which start() waits for, and "Outgoing messages are being dropped")."""

    def _write_conf(self) -> None:
        super()._write_conf()
        text = self.conf_path.read_text().replace("log_type all\n", "log_type error\nlog_type warning\n"
                                                   "log_type notice\nlog_type information\n")
        self.conf_path.write_text(text)

    def check_nothing_dropped(self) -> None:
        """Fail if the broker logged dropping messages for any client."""
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        dropped = [line for line in log.splitlines() if "dropped" in line.lower()]
        if dropped:
            raise BenchError(f"local broker dropped messages: {dropped[:3]}")


@dataclass
class Rig:
    """Fresh brokers for one part: the local broker and IoT Core's stand-in."""

    where: Path
    certs: TestCerts
    local: QuietMosquitto
    cloud: QuietMosquitto


@contextmanager
def rig(where: Path, certs: TestCerts) -> Iterator[Rig]:
    """Start a local and a cloud broker under `where`; stop both at the end."""
    exe = find_mosquitto()
    local = QuietMosquitto(
        where / "local", persistence=True, max_queued_messages=LOCAL_QUEUE_LIMIT,
        max_inflight_messages=LOCAL_INFLIGHT, executable=exe,
    )
    cloud = QuietMosquitto(
        where / "cloud", tls=ServerTLS(ca=certs.ca_cert, server=certs.server, require_certificate=True),
        max_inflight_messages=CLOUD_INFLIGHT, executable=exe,
    )
    local.start()
    try:
        cloud.start()
        try:
            yield Rig(where, certs, local, cloud)
        finally:
            cloud.stop()
    finally:
        local.stop()


def make_daemon(r: Rig, devices_yaml: str, encoding: str = "json") -> Daemon:
    """A daemon with the shipped batch and log settings (not the test helper's faster ones)."""
    daemon = Daemon(r.where / "gw", r.local, r.cloud, r.certs, devices_yaml, encoding=encoding,
                    batch_yaml=PRODUCTION_BATCH)
    daemon.config.write_text(daemon.config.read_text().replace("level: debug", "level: info"))
    # The default status interval, not the tests' 2 s: its heartbeat writes are part of what is measured.
    daemon.config.write_text(daemon.config.read_text().replace(", status_interval: 2s", ""))
    return daemon


def pid_of(daemon: Daemon) -> int:
    if daemon.process is None:
        raise BenchError("daemon not started")
    return daemon.process.pid


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/PID/stat fields 14 and 15)."""
    return cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def cpu_seconds_of(stat: Path) -> float:
    """utime + stime in a /proc stat file (of a process or of one of its threads), in seconds."""
    return sum(user_system_of(stat))


def user_system_of(stat: Path) -> tuple[float, float]:
    """utime and stime in a /proc stat file, in seconds (fields 14 and 15)."""
    text = stat.read_text()
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 is fields[0]
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def committed_uplinks(buffer: Path) -> int:
    """Uplinks the daemon has committed so far: each commit writes their 8-byte key digests
    with its chunk, and they move to `seen` when the chunk is sent and deleted (pruned only past
    100,000 keys). A measurement that reads the file's tables, read-only, so it never blocks
    the writer; the daemon's own counts reach the file only with its heartbeat."""
    if not buffer.exists():
        return 0
    db = sqlite3.connect(f"file:{buffer}?mode=ro", uri=True, timeout=5)
    try:
        db.execute("BEGIN")  # one snapshot: a key is in one table or the other
        return sum(
            int(db.execute(f"SELECT coalesce(sum(length(keys)), 0) FROM {table}").fetchone()[0]) // 8
            for table in ("chunks", "seen")
        )
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        db.close()


def check_daemon_counts(daemon: Daemon, uplinks: int) -> None:
    """After the daemon stopped (its per-device counters are flushed then): every uplink stored,
    each with its readings, nothing set aside."""
    report = daemon.status()
    stored = sum(d["uplinks"] for d in report["devices"])
    readings = sum(d["readings"] for d in report["devices"])
    problems = []
    if stored != uplinks or readings != uplinks * READINGS_PER_UPLINK:
        problems.append(f"status counts {stored} uplinks / {readings} readings, expected {uplinks}")
    if report["dead_letters"]["total"] or report["unmapped_uplinks"]:
        problems.append(f"dead letters {report['dead_letters']['total']}, unmapped {report['unmapped_uplinks']}")
    if problems:
        raise BenchError("; ".join(problems) + f"\n{daemon.log_tail(20)}")


# -- what is sent -----------------------------------------------------------------------


def burst_devices() -> list[str]:
    return [f"70b3d57ed003{i:04x}" for i in range(BURST_DEVICES)]


def burst_devices_yaml() -> str:
    lines = ["devices:"]
    for i, dev_eui in enumerate(burst_devices()):
        lines += [f"  - dev_eui: {dev_eui}", f"    sensor_id: bench-clamp-{i:02d}", "    codec: osm-v2"]
    return "\n".join(lines) + "\n"


def site_devices_yaml() -> str:
    """The seed site's map, as bench/flash.py writes it."""
    lines = ["devices:"]
    for dev_eui, sensor_id, _ in SimulatedSite.devices():
        lines += [f"  - dev_eui: {dev_eui}", f"    sensor_id: {sensor_id}", "    codec: osm-v2"]
    return "\n".join(lines) + "\n"


def burst(n: int, encoding: str, label: str) -> list[Message]:
    """n uplink events round-robin over the burst devices, each an osm-v2 frame of three
    current-clamp channels (3 readings), distinct times and deduplication ids, as ChirpStack
    publishes them (tests/chirpstack.py: chirpstack-api's own message types)."""
    devices = burst_devices()
    t0 = now_ms() - n  # recent, one millisecond apart: every row (sensor, time, metric) is distinct
    out = []
    for k in range(n):
        dev_eui = devices[k % BURST_DEVICES]
        frame = b"\x02" + record("CC1", 1, u16(1000 + k % 9000)) + record("CC2", 1, u16(2000)) + record(
            "CC3", 1, u16(3000)
        )
        ev = uplink_event(dev_eui, frame, f_cnt=k // BURST_DEVICES + 1, time_ms=t0 + k, dedup_id=f"{label}-{k}")
        out.append((topic(dev_eui), encode(ev, encoding)))
    return out


# -- forked helpers: the publisher and the bare subscriber --------------------------------


def _connect(client: mqtt.Client, broker: Mosquitto, properties: Properties | None = None,
             clean_start: bool = True) -> None:
    client.connect(broker.host, broker.port, keepalive=30, clean_start=clean_start, properties=properties)
    client.loop_start()


def _publisher(broker: Mosquitto, messages: Sequence[Message], conn: multiprocessing.connection.Connection) -> None:
    """Child: publish everything at QoS 1 as fast as the broker takes it; send back
    (first publish, all PUBACKs in, refused) on the monotonic clock, which all processes share."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(LOCAL_INFLIGHT)
    # paho keys unacknowledged messages by their 16-bit packet id: more than 65,535 queued in it
    # at once overwrite each other and are never sent. So at most PUBLISH_QUEUE wait in paho.
    room = threading.Semaphore(PUBLISH_QUEUE)
    connected, done = threading.Event(), threading.Event()
    acked = refused = 0
    lock = threading.Lock()

    def on_publish(c: mqtt.Client, u: Any, mid: int, reason: Any, props: Any) -> None:
        nonlocal acked, refused
        room.release()
        with lock:
            acked += 1
            refused += int(reason.is_failure)
            if acked == len(messages):
                done.set()

    client.on_connect = lambda *a: connected.set()
    client.on_publish = on_publish
    _connect(client, broker)
    if not connected.wait(10):
        conn.send(("error", "publisher: no CONNACK"))
        return
    first = time.monotonic()
    for t, payload in messages:
        if not room.acquire(timeout=60):
            conn.send(("error", f"publisher: no PUBACK for 60 s after {acked} of {len(messages)}"))
            return
        client.publish(t, payload, qos=1)
    if not done.wait(600):
        conn.send(("error", f"publisher: {acked} of {len(messages)} PUBACKs in 600 s"))
        return
    conn.send(("ok", (first, time.monotonic(), refused)))
    client.disconnect()
    client.loop_stop()


def publish_all(broker: Mosquitto, messages: Sequence[Message]) -> tuple[float, float]:
    """Publish from a forked process; return its (first publish, last PUBACK) times."""
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_publisher, args=(broker, messages, theirs), daemon=True)
    child.start()
    if not mine.poll(660):
        child.kill()
        raise BenchError("publisher: no word in 660 s")
    status, value = mine.recv()
    child.join(10)
    if status != "ok":
        raise BenchError(value)
    first, last, refused = value
    if refused:
        raise BenchError(f"the local broker refused {refused} publishes")
    return first, last


def _bare_subscriber(broker: Mosquitto, n: int, conn: multiprocessing.connection.Connection) -> None:
    """Child: what the daemon's subscription is (persistent session, QoS 1, Receive Maximum,
    manual acks), doing nothing but count and acknowledge each message at once."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=mqtt.MQTTv5, manual_ack=True)
    ready, done, barrier = threading.Event(), threading.Event(), threading.Event()
    count = 0
    last = 0.0
    sub_mid = -1

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        nonlocal sub_mid
        _, sub_mid = c.subscribe(CHIRPSTACK_FILTER, qos=1)

    def on_subscribe(c: mqtt.Client, u: Any, mid: int, reasons: Any, props: Any) -> None:
        (ready if mid == sub_mid else barrier).set()

    def on_message(c: mqtt.Client, u: Any, message: mqtt.MQTTMessage) -> None:
        nonlocal count, last
        c.ack(message.mid, message.qos)
        count += 1
        if count == n:
            last = time.monotonic()
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    _connect(client, broker, props, clean_start=False)
    if not ready.wait(10):
        conn.send(("error", "bare subscriber: no SUBACK"))
        return
    conn.send(("ready", None))
    if not done.wait(600):
        conn.send(("error", f"bare subscriber: {count} of {n} messages in 600 s"))
        return
    # A SUBACK on the same connection comes after every PUBLISH the broker wrote before it:
    # once it is here, any duplicate would have been counted.
    client.subscribe("bench/barrier", qos=1)
    barrier.wait(10)
    client.unsubscribe(CHIRPSTACK_FILTER)  # the daemon's burst must not queue for this session
    time.sleep(0.2)
    conn.send(("ok", (last, count)))
    client.disconnect()
    client.loop_stop()


@dataclass
class Drain:
    """One drain of a burst: from the first publish to the last uplink or reading in."""

    uplinks: int
    first_publish: float
    published: float  # the publisher's last PUBACK
    finished: float

    @property
    def seconds(self) -> float:
        return self.finished - self.first_publish

    @property
    def rate(self) -> float:
        return self.uplinks / self.seconds


def bare_drain(broker: Mosquitto, messages: Sequence[Message]) -> Drain:
    """The baseline: the bare subscriber draining the burst from `broker`."""
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_bare_subscriber, args=(broker, len(messages), theirs), daemon=True)
    child.start()
    try:
        if not mine.poll(15) or mine.recv()[0] != "ready":
            raise BenchError("bare subscriber never subscribed")
        first, published = publish_all(broker, messages)
        if not mine.poll(620):
            raise BenchError("bare subscriber: no word in 620 s")
        status, value = mine.recv()
        if status != "ok":
            raise BenchError(value)
        last, count = value
        if count != len(messages):
            raise BenchError(f"bare subscriber got {count} messages for {len(messages)} published")
        return Drain(len(messages), first, published, last)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


# -- the stand-in's side -----------------------------------------------------------------


class CloudRows:
    """A reader on IoT Core's stand-in counting the rows (gateway.wire.expand_rows) of what the
    daemon publishes: distinct (sensor, time, metric), all rows, and when a count was reached."""

    def __init__(self, r: Rig, name: str) -> None:
        # Batches only: the health message has its own topic.
        self.reader = Subscriber(r.cloud, READINGS_FILTER, client_id=name, client_cert=r.certs.client(name)).start()
        self.keys: set[tuple[str, int, str]] = set()
        self.rows = 0
        self.messages = 0
        self.arrivals: list[tuple[float, int]] = []  # (arrival time, rows in the message)
        self.reached_at: float | None = None

    def poll(self, target: int | None = None) -> int:
        """Take in what arrived since the last poll; return the distinct rows so far."""
        new = self.reader.messages[self.messages:]
        for message in new:
            n = 0
            for row in wire.expand_rows(wire.decode_message(message.payload)):
                self.keys.add((row["sensor_id"], row["timestamp"], row["metric_name"]))
                n += 1
            self.rows += n
            self.arrivals.append((message.received_at, n))
            if target is not None and self.reached_at is None and len(self.keys) >= target:
                self.reached_at = message.received_at
        self.messages += len(new)
        return len(self.keys)

    def rows_between(self, start: float, end: float) -> int:
        return sum(n for at, n in self.arrivals if start <= at < end)

    @property
    def duplicates(self) -> int:
        return self.rows - len(self.keys)

    def close(self) -> None:
        self.reader.close()


def wait_until(what: str, done: Any, timeout: float, daemon: Daemon | None = None) -> None:
    """Call done() every POLL_S until it is true; fail after timeout (with the daemon's log)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            tail = daemon.log_tail(20) if daemon is not None else ""
            raise BenchError(f"{what}: not within {timeout:.0f} s\n{tail}")
        if daemon is not None and daemon.process is not None and daemon.process.poll() is not None:
            raise BenchError(f"{what}: the daemon exited\n{daemon.log_tail(20)}")
        time.sleep(POLL_S)


# -- py-spy -----------------------------------------------------------------------------


class Sampler:
    """`py-spy record --gil` attached to the daemon: only the thread holding the GIL is sampled,
    so the samples are where the daemon's Python CPU goes (waits, fsync and select release it),
    per function (its first line), per thread, raw (collapsed stacks) output."""

    RATE = 200

    def __init__(self, py_spy: str, pid: int, out: Path, rate: int = RATE, nonblocking: bool = False) -> None:
        self.out = out
        self.rate = rate
        self.process = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--gil",
             "--threads", "--function", "--output", str(out), *(["--nonblocking"] if nonblocking else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # attached before the burst starts
        if self.process.poll() is not None:
            raise BenchError(f"py-spy failed: {self.process.stderr.read().decode() if self.process.stderr else ''}")
        self.started = time.monotonic()

    def stop(self) -> list[str]:
        """Stop sampling; the report lines (per thread, then the top functions by own samples)."""
        seconds = time.monotonic() - self.started
        self.process.send_signal(signal.SIGINT)
        self.process.wait(60)
        own: collections.Counter[str] = collections.Counter()
        total: collections.Counter[str] = collections.Counter()
        threads: collections.Counter[str] = collections.Counter()
        samples = 0
        for line in self.out.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")
            samples += count
            threads[frames[0].partition("): ")[2] or frames[0]] += count
            own[_short(frames[-1])] += count
            for frame in {_short(f) for f in frames[1:]}:
                total[frame] += count
        if not samples:
            return ["py-spy: no samples"]
        lines = [f"py-spy --gil: {samples:,} samples over {seconds:.1f} s at {self.rate} Hz: the GIL was held "
                 f"{samples / (seconds * self.rate):.1%} of the time; by thread:"]
        lines += [f"  thread {name:<44} {n / samples:6.1%}" for name, n in threads.most_common()]
        lines.append(f"  {'own':>6} {'total':>6}  function (file:first line), top {PROFILE_TOP} by own samples")
        for frame, n in own.most_common(PROFILE_TOP):
            lines.append(f"  {n / samples:6.1%} {total[frame] / samples:6.1%}  {frame}")
        return lines


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """utime and stime of each thread of a process, in seconds, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = user_system_of(task / "stat")
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
    return out


def thread_names(py_spy: str, pid: int) -> dict[int, str]:
    """Python thread names by thread id (`py-spy dump` prints both); native threads are absent."""
    text = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
    return {int(tid): name for tid, name in re.findall(r'^Thread (\d+) \(\w+\): "(.*)"', text, re.MULTILINE)}


def _short(frame: str) -> str:
    """'func (/long/path/pkg/mod.py:12)' -> 'func (pkg/mod.py:12)'."""
    name, _, where = frame.partition(" (")
    parts = where.rstrip(")").split("/")
    return f"{name} ({'/'.join(parts[-2:])})" if where else name


# -- the parts ---------------------------------------------------------------------------


@dataclass
class BurstRun:
    """One repetition of (a) or (b): the same burst through the bare subscriber, then the daemon."""

    bare: Drain
    daemon: Drain  # finished: every reading at the stand-in
    committed: float  # seconds from the first publish until every uplink was committed
    cpu: float  # the daemon's CPU seconds over its drain
    messages: int  # at the stand-in
    duplicates: int  # rows at the stand-in more than once
    profile: list[str]

    @property
    def ratio(self) -> float:
        return self.daemon.rate / self.bare.rate


def burst_once(where: Path, certs: TestCerts, messages: list[Message], encoding: str, py_spy: str | None) -> BurstRun:
    """Fresh brokers and buffer; the bare subscriber drains the burst, then the daemon does."""
    n = len(messages)
    with rig(where, certs) as r:
        bare = bare_drain(r.local, messages)
        daemon = make_daemon(r, burst_devices_yaml(), encoding)
        cloud = CloudRows(r, "cloud-reader")
        buffer = daemon.workdir / "buffer.db"
        try:
            daemon.start()
            pid = pid_of(daemon)
            sampler = Sampler(py_spy, pid, where / "py-spy.txt") if py_spy else None
            cpu0 = cpu_seconds(pid)
            committed_at: list[float] = []

            def all_in() -> bool:
                if not committed_at and committed_uplinks(buffer) >= n:
                    committed_at.append(time.monotonic())
                return cloud.poll(n * READINGS_PER_UPLINK) >= n * READINGS_PER_UPLINK

            first, published = publish_all(r.local, messages)
            wait_until("every reading at the stand-in", all_in, max(120.0, n / 50), daemon)
            assert cloud.reached_at is not None
            cpu = cpu_seconds(pid) - cpu0
            profile = sampler.stop() if sampler else []
            if not committed_at:  # the poll missed it between two stand-in messages
                wait_until("committed keys", lambda: committed_uplinks(buffer) >= n, 30, daemon)
                committed_at.append(time.monotonic())
            time.sleep(1.0)  # a duplicate, if any, would come now
            cloud.poll()
            daemon.stop()
            check_daemon_counts(daemon, n)
            r.local.check_nothing_dropped()
        finally:
            cloud.close()
            daemon.close()
    drained = Drain(n, first, published, cloud.reached_at)
    return BurstRun(bare, drained, committed_at[0] - first, cpu, cloud.messages, cloud.duplicates, profile)


def part_burst(where: Path, certs: TestCerts, n: int, encoding: str, repeat: int, py_spy: str | None) -> None:
    """(a) or (b): `repeat` runs, each line printed, then the medians; with py_spy one more run
    under the sampler, printed apart and left out of the medians."""
    part = "a" if encoding == "json" else "b"
    tag = f"({part}) {encoding:<8}"
    messages = burst(n, encoding, part)
    size = sum(len(p) for _, p in messages) / n
    print(f"{tag} burst of {n:,} uplinks of {size:,.0f} B ({n * READINGS_PER_UPLINK:,} readings), "
          f"{repeat} runs on fresh brokers and buffer", flush=True)
    runs = []
    for i in range(repeat):
        run = burst_once(where / f"run{i + 1}", certs, messages, encoding, None)
        runs.append(run)
        _print_run(f"{tag} run {i + 1}", run)
    bare = statistics.median(r.bare.rate for r in runs)
    daemon = statistics.median(r.daemon.rate for r in runs)
    committed = statistics.median(n / r.committed for r in runs)
    cpu = statistics.median(r.cpu / r.daemon.seconds for r in runs)
    ratio = statistics.median(r.ratio for r in runs)
    print(f"{tag} bare subscriber {bare:10,.0f} uplinks/s  median of {repeat} (first publish to last message)",
          flush=True)
    print(f"{tag} daemon          {daemon:10,.0f} uplinks/s  median, end to end (first publish to the last "
          f"reading at the stand-in)", flush=True)
    print(f"{tag} daemon commits  {committed:10,.0f} uplinks/s  median (first publish to every uplink committed)",
          flush=True)
    print(f"{tag} daemon CPU      {cpu:10.0%} of one core  median, over its drain", flush=True)
    print(f"{tag} ratio           {ratio:10.2f} daemon/bare  median of the runs' ratios (target >= 0.6: "
          f"{'met' if ratio >= 0.6 else 'MISSED'})", flush=True)
    if py_spy:
        run = burst_once(where / "profiled", certs, messages, encoding, py_spy)
        _print_run(f"{tag} under py-spy", run)
        for line in run.profile:
            print(f"{tag} {line}", flush=True)


def _print_run(tag: str, run: BurstRun) -> None:
    print(f"{tag}: bare {run.bare.rate:,.0f} uplinks/s ({run.bare.seconds:.2f} s; publisher done at "
          f"{run.bare.published - run.bare.first_publish:.2f} s); daemon {run.daemon.rate:,.0f} uplinks/s "
          f"end to end ({run.daemon.seconds:.2f} s; publisher done at "
          f"{run.daemon.published - run.daemon.first_publish:.2f} s; all committed at {run.committed:.2f} s; "
          f"{run.messages} messages, {run.duplicates} duplicate rows; CPU {run.cpu:.1f} s, "
          f"{run.cpu / run.daemon.seconds:.0%} of a core); ratio {run.ratio:.2f}", flush=True)


def part_cpu(where: Path, certs: TestCerts, seconds: float, warmup: float, py_spy: str | None) -> None:
    """(c): the daemon's CPU at the seed site's load; with py_spy, also its CPU per thread over
    the same window, then one more run under the sampler (printed apart)."""
    cpu_once(where / "run", certs, seconds, warmup, py_spy, profile=False)
    if py_spy:
        cpu_once(where / "profiled", certs, seconds, warmup, py_spy, profile=True)


def cpu_once(where: Path, certs: TestCerts, seconds: float, warmup: float, py_spy: str | None,
             profile: bool) -> None:
    """One run of (c); `profile`: under `py-spy record --gil` (its overhead included)."""
    tag = "(c) under py-spy" if profile else "(c) seed site   "
    with rig(where, certs) as r:
        daemon = make_daemon(r, site_devices_yaml())
        cloud = CloudRows(r, "cloud-reader-c")
        buffer = daemon.workdir / "buffer.db"
        try:
            daemon.start()
            pid = pid_of(daemon)
            with publishing(r.local) as send:

                def deliver(d: Delivery) -> None:
                    send(d.topic, d.payload)

                site = SimulatedSite(deliver)
                site.start()
                time.sleep(warmup)
                sampler = None
                if profile and py_spy:
                    sampler = Sampler(py_spy, pid, where / "py-spy.txt", rate=PROFILE_RATE_C, nonblocking=True)
                threads0 = thread_cpu(pid)
                cpu0, up0, t0 = cpu_seconds(pid), committed_uplinks(buffer), time.monotonic()
                end = t0 + seconds
                while time.monotonic() < end:
                    cloud.poll()
                    time.sleep(min(1.0, max(0.0, end - time.monotonic())))
                cpu1, up1, t1 = cpu_seconds(pid), committed_uplinks(buffer), time.monotonic()
                threads1 = thread_cpu(pid)
                profile_lines = sampler.stop() if sampler else []
                names = thread_names(py_spy, pid) if py_spy and not profile else {}
                site.stop()
            time.sleep(6.0)  # the last readings of the window leave within max_delay
            cloud.poll()
            if daemon.process is None or daemon.process.poll() is not None:
                raise BenchError(f"(c) the daemon exited\n{daemon.log_tail(20)}")
            daemon.stop()
            report = daemon.status()
            if report["dead_letters"]["total"] or report["unmapped_uplinks"]:
                raise BenchError(f"(c) dead letters or unmapped uplinks: {report['dead_letters']}")
            r.local.check_nothing_dropped()
        finally:
            cloud.close()
            daemon.close()
    share = (cpu1 - cpu0) / (t1 - t0)
    print(f"{tag} daemon CPU      {share:10.2%} of one core  (target <= 1%: "
          f"{'met' if share <= 0.01 else 'MISSED'}; {cpu1 - cpu0:.2f} s CPU over {t1 - t0:.0f} s after "
          f"{warmup:.0f} s warm-up; {(up1 - up0) / (t1 - t0):.1f} uplinks/s committed, "
          f"{cloud.rows_between(t0, t1) / (t1 - t0):.1f} readings/s at the stand-in)", flush=True)
    if names:
        used = {
            tid: (user - threads0.get(tid, (0.0, 0.0))[0], system - threads0.get(tid, (0.0, 0.0))[1])
            for tid, (user, system) in threads1.items()
        }
        print(f"{tag} CPU by thread over the window (native threads unnamed):", flush=True)
        for tid, (user, system) in sorted(used.items(), key=lambda item: -sum(item[1])):
            if user + system > 0:
                print(f"{tag}   {names.get(tid, f'native {tid}'):<40} {(user + system) / (t1 - t0):7.2%} of one "
                      f"core (user {user / (t1 - t0):.2%}, system {system / (t1 - t0):.2%})", flush=True)
    for line in profile_lines:
        print(f"{tag} {line}", flush=True)


def part_catch_up(where: Path, certs: TestCerts, n: int) -> None:
    """(d): n uplinks queued for the stopped daemon's session, then its start."""
    messages = burst(n, "json", "d")
    with rig(where, certs) as r:
        daemon = make_daemon(r, burst_devices_yaml())
        buffer = daemon.workdir / "buffer.db"
        cloud = CloudRows(r, "cloud-reader-d")
        try:
            daemon.start()  # subscribes: the broker now keeps a session for it
            code, _ = daemon.stop()
            if code != 0:
                raise BenchError(f"(d) first stop exited {code}")
            first, published = publish_all(r.local, messages)
            started = time.monotonic()
            daemon.start(timeout=120)
            ready = time.monotonic()
            committed_at: list[float] = []

            def all_committed() -> bool:
                cloud.poll(n * READINGS_PER_UPLINK)
                return committed_uplinks(buffer) >= n

            wait_until("(d) every uplink committed", all_committed, max(600.0, n / 50), daemon)
            committed_at.append(time.monotonic())
            wait_until("(d) every reading at the stand-in",
                       lambda: cloud.poll(n * READINGS_PER_UPLINK) >= n * READINGS_PER_UPLINK, 600, daemon)
            assert cloud.reached_at is not None
            time.sleep(1.0)
            cloud.poll()
            daemon.stop()
            check_daemon_counts(daemon, n)
            r.local.check_nothing_dropped()
        finally:
            cloud.close()
            daemon.close()
    took = committed_at[0] - started
    print(f"(d) catch-up     queued {n:,} uplinks in {published - first:.1f} s while the daemon was stopped",
          flush=True)
    print(f"(d) catch-up     all committed   {took:10.1f} s  from the daemon's start "
          f"(READY at {ready - started:.1f} s; "
          f"{n / took:,.0f} uplinks/s; buffer's key digests polled every {POLL_S * 1000:.0f} ms; target <= 60 s: "
          f"{'met' if took <= 60 else 'MISSED'})", flush=True)
    print(f"(d) catch-up     all at stand-in {cloud.reached_at - started:10.1f} s  from the daemon's start "
          f"({n * READINGS_PER_UPLINK:,} readings, {cloud.duplicates} duplicate rows)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--uplinks", type=int, default=30_000, help="burst size for (a) and (b)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of (a) and (b); medians are printed")
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring window of (c)")
    parser.add_argument("--warmup", type=float, default=15.0, help="warm-up before (c)'s window")
    parser.add_argument("--catch-up", type=int, default=100_000, help="uplinks queued for (d)")
    parser.add_argument("--only", default="a,b,c,d", help="comma-separated parts to run")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (kept if given)")
    parser.add_argument("--py-spy", default=None, help="py-spy executable: profile the daemon during (a) and (c)")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if not parts <= {"a", "b", "c", "d"}:
        parser.error("--only takes a, b, c, d")
    base = args.dir or Path(tempfile.mkdtemp(prefix="bench-intake-", dir="/var/tmp"))
    try:
        certs = make_test_certs(base / "certs")
        if "a" in parts:
            part_burst(base / "a", certs, args.uplinks, "json", args.repeat, args.py_spy)
        if "b" in parts:
            part_burst(base / "b", certs, args.uplinks, "protobuf", args.repeat, None)
        if "c" in parts:
            part_cpu(base / "c", certs, args.seconds, args.warmup, args.py_spy)
        if "d" in parts:
            part_catch_up(base / "d", certs, args.catch_up)
    except BenchError as error:
        print(f"bench failed: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
