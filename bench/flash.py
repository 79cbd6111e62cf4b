"""Bytes written to disk per reading at the seed site's load: what the buffer costs an SD card.

    python bench/flash.py [--seconds 120] [--commit-intervals 5s,1s,1ms]
    python bench/flash.py --breakdown [--seconds 600]

The real daemon (`hub-gateway run`) against a real local Mosquitto fed by the demo's simulated
site (45 current clamps at one uplink a second, 15 air-quality units every 30 s: 49 readings
a second, ChirpStack JSON events) and a TLS Mosquitto as IoT Core's stand-in, so batches are
formed, published and confirmed as in production. After a warm-up, the daemon's
`write_bytes` from /proc/PID/io (bytes it caused to be written to the block device: WAL
appends, checkpoints) is read over --seconds, against the readings it took in over the same
time. One run per commit interval; the baseline is `commit_interval: 1ms` (a commit, so an
fsync, for every group however small: at this load, about one per uplink).

`--breakdown` says where the bytes go: the buffer alone, in this process, fed the seed load on
a simulated clock (a group of 45 clamp uplinks and an air-quality uplink every other second;
a live message taken and confirmed every 5 s, as `max_delay: 5s`; a heartbeat every 30 s, the default
`buffer.status_interval`),
with SQLite's automatic checkpoint replaced by the same checkpoint run explicitly, so that
each kind of write is measured on its own (write_bytes of this process before and after it).

Needs the project importable, Mosquitto installed, and the buffer directory (--dir, default a
temporary directory) on a block device (not tmpfs, which /proc does not count).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.demo import SimulatedSite  # noqa: E402
from gateway.sources import Delivery  # noqa: E402
from tests.support.brokers import Mosquitto, ServerTLS, Subscriber, find_mosquitto, publishing  # noqa: E402
from tests.support.certs import make_test_certs  # noqa: E402
from tests.support.daemon import READINGS_FILTER, Daemon  # noqa: E402


def devices_yaml() -> str:
    lines = ["devices:"]
    for dev_eui, sensor_id, _ in SimulatedSite.devices():
        lines += [f"  - dev_eui: {dev_eui}", f"    sensor_id: {sensor_id}", "    codec: osm-v2"]
    return "\n".join(lines) + "\n"


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/PID/io")


def readings_in(cloud: Subscriber) -> int:
    """Readings the daemon took in, as the IoT Core stand-in received them (each message's
    `readings` property): over a window of minutes the max_delay at either end cancels out."""
    return sum(int(dict(m.user_properties)["readings"]) for m in cloud.messages)


def run(where: Path, interval: str, seconds: float, warmup: float) -> tuple[float, float, float]:
    """(bytes per reading, readings per second, bytes per second) for one commit interval."""
    certs = make_test_certs(where / "certs")
    exe = find_mosquitto()
    local = Mosquitto(where / "local", persistence=True, max_queued_messages=100_000, executable=exe).start()
    cloud = Mosquitto(
        where / "cloud",
        tls=ServerTLS(ca=certs.ca_cert, server=certs.server, require_certificate=True),
        max_inflight_messages=100,
        executable=exe,
    ).start()
    daemon = Daemon(where / "gw", local, cloud, certs, devices_yaml(), buffer_yaml=f"commit_interval: {interval}")
    daemon.config.write_text(daemon.config.read_text().replace("max_delay: 200ms", "max_delay: 5s"))
    daemon.config.write_text(daemon.config.read_text().replace("level: debug", "level: info"))
    # The default status interval, not the tests' 2 s: its heartbeat writes are part of what is measured.
    daemon.config.write_text(daemon.config.read_text().replace(", status_interval: 2s", ""))
    reader = Subscriber(cloud, READINGS_FILTER, client_cert=certs.client("flash-reader"))  # batches, not health
    try:
        reader.start()
        daemon.start()
        assert daemon.process is not None
        with publishing(local) as send:

            def deliver(d: Delivery) -> None:
                send(d.topic, d.payload)

            site = SimulatedSite(deliver)
            site.start()
            time.sleep(warmup)  # the site runs in real time: this is its load, not a hope
            w0, r0, t0 = write_bytes(daemon.process.pid), readings_in(reader), time.monotonic()
            time.sleep(seconds)
            w1, r1, t1 = write_bytes(daemon.process.pid), readings_in(reader), time.monotonic()
            site.stop()
        daemon.stop()
    finally:
        reader.close()
        daemon.close()
        local.stop()
        cloud.stop()
    readings = r1 - r0
    return (w1 - w0) / readings, readings / (t1 - t0), (w1 - w0) / (t1 - t0)


def wal_frames(shm: Path) -> int:
    """Frames in the WAL now: mxFrame of the WAL-index header (the -shm file, native order)."""
    with shm.open("rb") as f:
        header = f.read(48)
    return int.from_bytes(header[16:20], sys.byteorder)


def breakdown(where: Path, seconds: int) -> None:
    """Bytes written per kind of write, for `seconds` of the seed load on a simulated clock."""
    import os
    import random
    import uuid

    from gateway.batching import Batcher, Ids, to_record
    from gateway.buffer import Buffer
    from gateway.buffer.files import AUTOCHECKPOINT_PAGES
    from gateway.model import DecodedUplink, DeviceKey, Reading

    rng = random.Random(1)
    clock = [1_795_000_000_000]
    mono = [0.0]
    buffer = Buffer(where / "buffer.db", clock=lambda: clock[0], monotonic=lambda: mono[0])
    db = buffer._db  # measurement only: the checkpoint is taken out of the commits to be counted apart
    db.execute("PRAGMA wal_autocheckpoint=0")
    batcher = Batcher(buffer, Ids("gw-bench-01", "acme", "leeds"))
    own = os.getpid()
    spent = {
        "commit of a group": 0,
        "commit, with takes": 0,
        "take and confirm": 0,
        "heartbeat": 0,
        "checkpoint": 0,
    }
    counts = dict.fromkeys(spent, 0)

    def measured(kind: str, work: Any) -> Any:
        before = write_bytes(own)
        result = work()
        spent[kind] += write_bytes(own) - before
        counts[kind] += 1
        return result

    def clamp(n: int, t: int) -> DecodedUplink:
        dev = DeviceKey("dev_eui", f"70b3d57ed001{n:04x}")
        return DecodedUplink(
            f"chirpstack/{uuid.UUID(int=rng.getrandbits(128))}",
            f"press-{n:02d}-clamp",
            dev,
            t,
            {
                "dev_eui": dev.id,
                "f_cnt": t // 1000 % 65536,
                "f_port": 1,
                "rssi": rng.randint(-110, -60),
                "snr": round(rng.uniform(-5, 10), 1),
            },
            (Reading("CC1", round(rng.uniform(0, 30), 2), "A", t),),
        )

    def air(n: int, t: int) -> DecodedUplink:
        dev = DeviceKey("dev_eui", f"70b3d57ed002{n:04x}")
        metrics = ("TEMP", "TEMP_min", "TEMP_max", "HUMI", "PM25", "PM10", "LGHT", "SND")
        return DecodedUplink(
            f"chirpstack/{uuid.UUID(int=rng.getrandbits(128))}",
            f"air-{n:02d}",
            dev,
            t,
            {
                "dev_eui": dev.id,
                "f_cnt": t // 30000 % 65536,
                "f_port": 1,
                "rssi": rng.randint(-110, -60),
                "snr": round(rng.uniform(-5, 10), 1),
            },
            tuple(Reading(m, round(rng.uniform(0, 100), 1), "", t) for m in metrics),
        )

    readings = 0
    formed: list[Any] = []
    for second in range(seconds):
        clock[0] += 1000
        mono[0] += 1.0
        group = [clamp(n, clock[0]) for n in range(45)]
        if second % 2 == 0:
            group.append(air(second // 2 % 15, clock[0]))
        readings += sum(len(u.readings) for u in group)
        kind = "commit, with takes" if second % 5 in (0, 1) and second > 1 else "commit of a group"
        measured(kind, lambda g=group: buffer.store([to_record(u) for u in g]))
        if second % 5 == 4:  # a live message: formed now, recorded by the next commit, published
            formed = measured("take and confirm", lambda: list(iter(lambda: batcher.form(live=True), None)))
        elif second % 5 == 0 and second:  # its PUBACK: confirmed, deleted with the next commit
            measured("take and confirm", lambda out=formed: [batch.take.confirm() for batch in out])
        if second % 30 == 29:  # the default status_interval; devices' details once a minute
            measured("heartbeat", lambda s=second: buffer.heartbeat(details=s % 60 == 59))
        if wal_frames(where / "buffer.db-shm") >= AUTOCHECKPOINT_PAGES:  # the buffer's wal_autocheckpoint, run apart
            measured("checkpoint", lambda: db.execute("PRAGMA wal_checkpoint(PASSIVE)"))
    buffer.close()
    total = sum(spent.values())
    print(f"{seconds} s of the seed load, {readings} readings ({readings / seconds:.1f} a second):")
    for kind, n in spent.items():
        print(
            f"  {kind:<28} {counts[kind]:>5} times, {n / max(1, counts[kind]):>8,.0f} bytes each, "
            f"{n / readings:>6.1f} bytes per reading"
        )
    print(f"  {'total':<28} {total / readings:>6.1f} bytes per reading")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--commit-intervals", default="5s,1s,1ms", help="comma-separated; the last is the baseline")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--breakdown", action="store_true", help="where the bytes go, the buffer alone")
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="bench-flash-", dir="/var/tmp"))
    if args.breakdown:
        try:
            breakdown(base, int(args.seconds))
        finally:
            if args.dir is None:
                shutil.rmtree(base, ignore_errors=True)
        return
    try:
        for interval in args.commit_intervals.split(","):
            where = base / interval
            where.mkdir(parents=True, exist_ok=True)
            per_reading, rate, per_s = run(where, interval, args.seconds, args.warmup)
            print(
                f"commit_interval {interval:>5}: {per_reading:,.0f} bytes written per reading "
                f"({rate:.1f} readings/s, {per_s / 1024:,.1f} KiB/s, {per_s * 86400 / 1024**3:.2f} GiB/day) "
                f"over {args.seconds:.0f} s",
                flush=True,
            )
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
