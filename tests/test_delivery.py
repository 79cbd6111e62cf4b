"""SPEC section 7 under faults, with real processes: the daemon SIGKILLed again and again while
1 Hz streams arrive, the cloud stand-in away for a long time, the local broker restarting, the
daemon away while the broker queues for its session, the buffer's bounds, a full disk (a real
tmpfs) and a damaged buffer file at start-up."""

from __future__ import annotations

import random
import struct
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import wire
from gateway.buffer import integrity_problems
from tests.chirpstack import encode, topic, uplink_event
from tests.support.brokers import Mosquitto, ReceivedMessage, Subscriber, publishing
from tests.support.certs import TestCerts
from tests.support.daemon import Daemon

pytestmark = pytest.mark.integration

T0 = 1_795_000_000_000
MAX_IN_FLIGHT = 8  # the daemon's default cloud.max_in_flight


def dev_eui(i: int) -> str:
    return f"70b3d57ed001{i:04x}"


def devices_yaml(count: int) -> str:
    lines = ["devices:"]
    for i in range(count):
        lines += [f"  - dev_eui: {dev_eui(i)}", f"    sensor_id: machine-{i:02d}-clamp", "    codec: osm-v2"]
    return "\n".join(lines) + "\n"


def frame(n: int) -> bytes:
    """An osm-v2 frame with one current reading whose value encodes n."""
    return b"\x02" + b"CC1\x00" + b"\x01" + b"\x02" + struct.pack("<H", n % 65536)


Row = tuple[str, int, str, Any]  # sensor_id, timestamp, metric, value


def row_for(device: int, n: int) -> Row:
    return (f"machine-{device:02d}-clamp", T0 + n * 1000, "CC1", n % 65536)


def rows_of(message: ReceivedMessage) -> list[Row]:
    body = wire.decode_message(message.payload)
    return [(r["sensor_id"], r["timestamp"], r["metric_name"], r["metric_value"]) for r in wire.expand_rows(body)]


def batch_id(message: ReceivedMessage) -> str:
    return dict(message.user_properties)["batch-id"]


class Streams:
    """ChirpStack's side of a site: one uplink a second from each device, published QoS 1 to
    the local broker (each send returns once the broker has acknowledged it). Records what was
    acknowledged, and when."""

    def __init__(self, local: Mosquitto, devices: int, first: int = 0, rate_hz: float = 1.0) -> None:
        self.local = local
        self.devices = devices
        self.period = 1.0 / rate_hz
        self.next_n = first
        self.sent: dict[Row, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streams", daemon=True)
        self._lock = threading.Lock()

    def _run(self) -> None:
        with publishing(self.local) as send:
            tick = time.monotonic()
            while not self._stop.is_set():
                n = self.next_n
                for d in range(self.devices):
                    event = uplink_event(dev_eui(d), frame(n), f_cnt=n, time_ms=T0 + n * 1000, dedup_id=f"{d}-{n}")
                    send(topic(dev_eui(d)), encode(event, "json"))
                    with self._lock:
                        self.sent[row_for(d, n)] = time.monotonic()
                self.next_n += 1
                tick += self.period
                self._stop.wait(max(0.0, tick - time.monotonic()))

    def __enter__(self) -> Streams:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def rows(self) -> dict[Row, float]:
        with self._lock:
            return dict(self.sent)


def burst(local: Mosquitto, devices: int, numbers: range) -> set[Row]:
    """Publish uplinks n in `numbers` for every device as fast as the broker acks them."""
    expected: set[Row] = set()
    with publishing(local) as send:
        for n in numbers:
            for d in range(devices):
                event = uplink_event(dev_eui(d), frame(n), f_cnt=n, time_ms=T0 + n * 1000, dedup_id=f"{d}-{n}")
                send(topic(dev_eui(d)), encode(event, "json"))
                expected.add(row_for(d, n))
    return expected


def wait_rows(reader: Subscriber, expected: set[Row], timeout: float = 60.0) -> list[ReceivedMessage]:
    """Wait until every expected row has reached the cloud; return every message received."""

    got: set[Row] = set()
    read = 0

    def arrived(messages: list[ReceivedMessage]) -> bool:
        # Called on every arrival while the reader's thread waits: only look at new messages,
        # or the reader itself becomes the bottleneck and delays what we measure.
        nonlocal read
        for m in messages[read:]:
            got.update(rows_of(m))
        read = len(messages)
        return expected <= got

    return reader.wait_for(arrived, timeout=timeout)


def test_kill_9_twenty_times_under_1hz_streams_loses_nothing_and_bounds_duplicates(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """SIGKILL 20 times while ten 1 Hz streams arrive (half at random moments, half the moment a
    batch reaches the cloud, so batches are in flight):
    every reading the local broker accepted reaches the cloud; a reading is only ever sent in
    one batch (idempotent intake), and the only duplicates are whole batches re-sent with the
    same id and bytes, at most max_in_flight per kill."""
    devices, kills = 10, 20
    rng = random.Random(20261126)
    daemon = Daemon(
        tmp_path / "gw",
        local_broker,
        cloud_broker,
        certs,
        devices_yaml(devices),
        max_delay="100ms",
        buffer_yaml="commit_interval: 100ms",
    )
    daemons.append(daemon)
    daemon.start()
    with Streams(local_broker, devices) as streams:
        for i in range(kills):
            if i % 2:
                # A random moment: in intake's commit window, a batch's flight, or idle.
                time.sleep(rng.uniform(0.2, 2.5))
            else:
                # The moment a batch reaches the cloud: its PUBACK is on the way back and its
                # confirm not yet committed (on loopback a random moment rarely hits this).
                count = len(reader.messages)
                reader.wait_for(lambda ms, count=count: len(ms) > count, timeout=20)  # type: ignore[misc]
            daemon.kill()
            daemon.start()
    expected = set(streams.rows())
    messages = wait_rows(reader, expected, timeout=90)

    payloads: dict[str, set[bytes]] = defaultdict(set)
    copies: dict[str, int] = defaultdict(int)
    batches_of_row: dict[Row, set[str]] = defaultdict(set)
    for m in messages:
        payloads[batch_id(m)].add(m.payload)
        copies[batch_id(m)] += 1
        for row in rows_of(m):
            batches_of_row[row].add(batch_id(m))
    assert set(batches_of_row) == expected  # nothing lost, nothing invented
    assert all(len(p) == 1 for p in payloads.values()), "a re-sent batch must carry the same bytes"
    assert all(len(ids) == 1 for ids in batches_of_row.values()), "a reading stored twice"
    resent = sum(n - 1 for n in copies.values())
    duplicate_rows = sum(len(rows_of(m)) for m in messages) - len(expected)
    assert resent <= kills * MAX_IN_FLIGHT
    print(
        f"\nkill -9 loop: {kills} kills, {len(expected)} readings, {len(copies)} batches, "
        f"{resent} batches re-sent ({duplicate_rows} duplicate rows), "
        f"bound {kills * MAX_IN_FLIGHT} batches ({MAX_IN_FLIGHT} in flight per kill)"
    )


def test_long_cloud_outage_drains_oldest_first_while_live_readings_keep_their_delay(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """With the stand-in away, a backlog of 20,000 readings builds up; when it returns the
    backlog drains completely, oldest first, and live readings published during the drain
    arrive within their normal delay, long before the drain ends (live-first)."""
    devices = 10
    daemon = Daemon(
        tmp_path / "gw",
        local_broker,
        cloud_broker,
        certs,
        devices_yaml(devices),
        max_delay="200ms",
        batch_yaml="{max_delay: 200ms, max_bytes: 4KiB, compression: none}",
    )
    daemons.append(daemon)
    daemon.start()
    cloud_broker.stop()
    backlog = burst(local_broker, devices, range(2000))
    daemon.wait_status(lambda s: s["backlog"]["readings"] == len(backlog), timeout=60)
    with Streams(local_broker, devices, first=100_000, rate_hz=2.0) as streams:
        cloud_broker.start()
        returned = time.monotonic()
        messages = wait_rows(reader, backlog, timeout=120)
        drained = max(m.received_at for m in messages if set(rows_of(m)) & backlog)
    live = streams.rows()
    messages = wait_rows(reader, set(live), timeout=30)

    arrival: dict[Row, float] = {}
    for m in messages:
        for row in rows_of(m):
            arrival.setdefault(row, m.received_at)
    during = {row: sent for row, sent in live.items() if returned + 1.0 < sent and arrival[row] < drained}
    assert during, "the drain was over before live readings could overtake it"
    delays = sorted(arrival[row] - sent for row, sent in during.items())
    assert delays[-1] < 3.0, f"live readings waited behind the backlog: worst {delays[-1]:.2f}s"
    assert drained - returned > 2 * delays[-1]  # the drain was long enough to tell
    # Oldest first: backlog batches, in the order they were formed, carry ever newer readings.
    firsts = [min(r[1] for r in rows_of(m)) for m in sorted(messages, key=batch_id) if set(rows_of(m)) <= backlog]
    assert firsts == sorted(firsts)
    daemon.wait_status(lambda s: s["backlog"]["readings"] == 0)
    print(
        f"\noutage: {len(backlog)} readings drained in {drained - returned:.1f}s; "
        f"{len(during)} live readings during the drain, delay median {delays[len(delays) // 2]:.2f}s, "
        f"worst {delays[-1]:.2f}s"
    )


def test_local_broker_restart_intake_resumes_by_itself(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """The local broker stops and starts again (same port) under the running daemon: uplinks
    published after its return reach the cloud without anyone touching the daemon."""
    daemon = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, devices_yaml(2))
    daemons.append(daemon)
    daemon.start()
    wait_rows(reader, burst(local_broker, 2, range(5)))
    pid = daemon.process.pid if daemon.process else None
    local_broker.restart()
    after = burst(local_broker, 2, range(5, 15))
    wait_rows(reader, after, timeout=30)
    assert daemon.process is not None and daemon.process.poll() is None and daemon.process.pid == pid
    daemon.wait_log("lost local broker, reconnecting")


def test_daemon_restart_takes_what_the_broker_queued_for_its_session_and_acks_it_once(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """Uplinks published while the daemon is stopped wait in the broker (persistent session,
    QoS 1); at start they are stored, acknowledged and sent; a further restart brings none of
    them again (they were acked, not merely received)."""
    daemon = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, devices_yaml(3))
    daemons.append(daemon)
    daemon.start()
    daemon.stop()
    queued = burst(local_broker, 3, range(40))
    daemon.start()
    wait_rows(reader, queued)
    daemon.stop()
    daemon.start()
    # The broker sends what it still holds before anything newer: once this newer uplink is
    # through, any redelivery would have been counted.
    marker = burst(local_broker, 1, range(1000, 1001))
    wait_rows(reader, marker)
    counters = daemon.status()["counters"]
    assert counters.get("duplicate_uplinks", 0) == 0, counters
    rows = [r for m in reader.messages for r in rows_of(m)]
    assert sorted(rows) == sorted(queued | marker)


def test_drop_oldest_keeps_max_size_and_reports_the_gap(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """Over max_size the oldest readings are deleted: the log says so, the counter counts them,
    the next batch's meta.gap gives count and time range, and the rest arrive intact."""
    cloud_broker.stop()
    daemon = Daemon(
        tmp_path / "gw",
        local_broker,
        cloud_broker,
        certs,
        devices_yaml(2),
        buffer_yaml="max_size: 4KiB, when_full: drop-oldest",
    )
    daemons.append(daemon)
    daemon.start()
    sent = burst(local_broker, 2, range(300))
    report = daemon.wait_status(lambda s: s["devices"] and sum(d["readings"] for d in s["devices"]) == len(sent))
    assert report["backlog"]["stored_bytes"] <= 4 * 1024  # max_size counts bytes as stored (compressed)
    dropped = report["counters"]["dropped_readings"]
    assert 0 < dropped < len(sent)
    daemon.wait_log("buffer bound reached: oldest readings dropped")
    cloud_broker.start()  # the daemon's next try may be up to its 60 s reconnect backoff away
    kept_expected = len(sent) - dropped
    messages = reader.wait_for(lambda ms: sum(len(rows_of(m)) for m in ms) >= kept_expected, timeout=90)
    rows = {r for m in messages for r in rows_of(m)}
    assert rows <= sent and len(rows) == kept_expected
    # The dropped ones are the oldest: whatever arrived is newer than all that did not.
    assert min(r[1] for r in rows) > max(r[1] for r in sent - rows)
    bodies = [wire.decode_message(m.payload) for m in messages]
    gaps = [body["meta"]["gap"] for body in bodies if "gap" in body.get("meta", {})]
    assert len(gaps) == 1 and gaps[0]["readings"] == dropped and gaps[0]["reason"] == "max_size"
    assert gaps[0]["from"] <= gaps[0]["to"]


def test_stop_intake_holds_acks_and_resumes_when_room_returns(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """Under stop-intake a full buffer stops acknowledging, so the local broker keeps the rest;
    when the cloud takes the backlog and room returns, intake resumes by itself and nothing is
    lost."""
    cloud_broker.stop()
    daemon = Daemon(
        tmp_path / "gw",
        local_broker,
        cloud_broker,
        certs,
        devices_yaml(2),
        buffer_yaml="max_size: 8KiB, when_full: stop-intake",
    )
    daemons.append(daemon)
    daemon.start()
    sent = burst(local_broker, 2, range(300))
    daemon.wait_log("buffer refuses intake; holding acknowledgements")
    held = daemon.status()
    assert held["backlog"]["readings"] < len(sent)
    assert "dropped_readings" not in held["counters"]
    cloud_broker.start()
    messages = wait_rows(reader, sent, timeout=90)
    assert {r for m in messages for r in rows_of(m)} == sent
    daemon.wait_log("buffer takes intake again")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs: a filesystem that really fills up."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_holds_intake_without_crash_or_corruption_and_recovers(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
    small_disk: Path,
) -> None:
    """The buffer's filesystem fills up with its own backlog: the daemon says so clearly, holds
    acks (the broker keeps the data), stays up (no crash loop), the file stays sound. When the
    cloud returns, the backlog drains from the full disk (through the room only the drain may
    use), the room it frees lets intake resume by itself, and everything arrives."""
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (24 * 1024 * 1024 + 960 * 1024))  # WAL allowance, drain reserve, 64 KiB left
    cloud_broker.stop()
    daemon = Daemon(
        tmp_path / "gw", local_broker, cloud_broker, certs, devices_yaml(4), buffer_path=small_disk / "buffer.db"
    )
    daemons.append(daemon)
    daemon.start()
    assert daemon.process is not None
    pid = daemon.process.pid
    sent = burst(local_broker, 4, range(3000))
    daemon.wait_log("is full", timeout=60)
    assert daemon.process.poll() is None and daemon.process.pid == pid
    assert integrity_problems(small_disk / "buffer.db") == []
    stored = daemon.status()["backlog"]["readings"]
    assert 0 < stored < len(sent)
    cloud_broker.start()
    messages = wait_rows(reader, sent, timeout=90)
    daemon.wait_log("buffer takes intake again")
    assert {r for m in messages for r in rows_of(m)} == sent
    assert daemon.process.poll() is None and daemon.process.pid == pid
    assert "Traceback" not in daemon.log_path.read_text()


def test_a_disk_filled_by_another_process_holds_the_daemon_it_does_not_stop_it(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
    small_disk: Path,
) -> None:
    """Something else fills the buffer's filesystem: every write of the main loop (heartbeat,
    recording a message, deleting confirmed readings) meets a full disk, not only intake's. The
    daemon says so and waits (found by attacking the redesign: it used to exit 1); with room
    again, everything arrives."""
    cloud_broker.stop()
    daemon = Daemon(
        tmp_path / "gw", local_broker, cloud_broker, certs, devices_yaml(4), buffer_path=small_disk / "buffer.db"
    )
    daemons.append(daemon)
    daemon.start()
    assert daemon.process is not None
    pid = daemon.process.pid
    first = burst(local_broker, 4, range(200))
    daemon.wait_status(lambda s: s["backlog"]["readings"] == len(first))
    filler = small_disk / "filler"
    with filler.open("wb") as f:  # another process takes the rest of the disk
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    later = burst(local_broker, 4, range(200, 400))
    daemon.wait_log("cannot write the buffer", timeout=30)
    assert daemon.process.poll() is None and daemon.process.pid == pid
    filler.unlink()
    cloud_broker.start()
    wait_rows(reader, first | later, timeout=90)
    assert daemon.process.poll() is None and daemon.process.pid == pid


def test_damaged_buffer_at_start_is_moved_aside_and_a_new_one_serves(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """A buffer.db cut short (as a power cut on an SD card can leave it) is renamed with a
    timestamp, reported loudly in the log and by status, and a new buffer carries on."""
    cloud_broker.stop()
    daemon = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, devices_yaml(2))
    daemons.append(daemon)
    daemon.start()
    lost = burst(local_broker, 2, range(200))
    daemon.wait_status(lambda s: s["backlog"]["readings"] == len(lost))
    daemon.stop()
    path = tmp_path / "gw" / "buffer.db"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 1000])
    cloud_broker.start()
    daemon.start()
    daemon.wait_log("BUFFER FILE DAMAGED: moved aside")
    report = daemon.status()
    moved = Path(report["recovered"]["moved_to"])
    assert moved.exists() and moved.name.startswith("buffer.db.corrupt-")
    assert "truncated" in report["recovered"]["reason"]
    fresh = burst(local_broker, 2, range(200, 210))
    messages = wait_rows(reader, fresh)
    assert {r for m in messages for r in rows_of(m)} == fresh
