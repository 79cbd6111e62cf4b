"""The buffer's speed and size: durable intake against raw SQLite, drain, and the daemon's
resident memory and start-up time as the backlog grows to 10 million readings.

    python bench/buffer.py [--readings 10000000] [--step 1000000] [--dir DIR] [--skip-daemon]

1. intake: readings/s through `to_record` + `Buffer.store` (each uplink's series encoded, one
   durable transaction per group of uplinks: WAL, synchronous=FULL, one compressed chunk,
   idempotency keys, device counters), and as the baseline, in the same
   run, raw `executemany` of the same readings, one row each, into one table with the same
   journal mode and synchronous setting, committed in the same groups. Target: at least half.
2. drain: readings/s through `Batcher.form` + `Take.confirm` (records taken, message formed
   and gzipped, confirmed), with the deletions committed (`settle`).
3. daemon: `hub-gateway run` as a real process (local Mosquitto up, cloud unreachable so the
   backlog stays); the buffer file grows step by step to --readings (filled between runs
   through the Buffer interface, much faster than the broker); at each step the
   daemon is started, its time to READY=1 (systemd notify socket) taken, and its resident
   memory read from /proc after it has run its bounds and status work. Target: READY < 2 s
   and RSS flat (within 10 MB) from 0 to 10 million.

Prints one result line per figure. Needs the project importable and Mosquitto installed
(`make venv mosquitto`, then `.venv/bin/python bench/buffer.py`).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.batching import Batcher, Ids, to_record  # noqa: E402
from gateway.buffer import SEEN_KEPT_ROWS, Buffer, connect, now_ms  # noqa: E402
from gateway.model import DecodedUplink, DeviceKey, Reading  # noqa: E402

READINGS_PER_UPLINK = 8  # an air-quality uplink: TEMP mean/min/max, HUMI, PM25, PM10, LGHT, SND
GROUP = 500  # uplinks per durable transaction (one busy intake group)


def uplinks(start: int, count: int, received_ms: int) -> list[DecodedUplink]:
    """Realistic decoded uplinks: 8 readings each, distinct sources, 1 s apart."""
    out = []
    for n in range(start, start + count):
        t = received_ms - 1000 * (start + count - n)
        dev = DeviceKey("dev_eui", f"70b3d57ed002{n % 15:04x}")
        readings = tuple(
            Reading(metric, round(20.0 + (n % 97) * 0.137 + i, 3), "degC" if i < 3 else "", t)
            for i, metric in enumerate(("TEMP", "TEMP_min", "TEMP_max", "HUMI", "PM25", "PM10", "LGHT", "SND"))
        )
        out.append(
            DecodedUplink(
                source=f"chirpstack/{n:036d}",
                sensor_id=f"air-{n % 15:02d}",
                device=dev,
                received_ms=t,
                meta={"dev_eui": dev.id, "f_cnt": n, "f_port": 1, "rssi": -80, "snr": 7.5},
                readings=readings,
            )
        )
    return out


def bench_intake(where: Path, total_uplinks: int) -> tuple[float, float]:
    """(buffer readings/s, raw executemany readings/s) for the same readings, same durability."""
    groups = [uplinks(i, GROUP, now_ms()) for i in range(0, total_uplinks, GROUP)]
    readings = sum(len(u.readings) for g in groups for u in g)

    b = Buffer(where / "intake.db", max_size=100 * 1024**3)
    started = time.perf_counter()
    for g in groups:
        b.store([to_record(u) for u in g])
    ours = readings / (time.perf_counter() - started)
    b.close()

    raw = connect(where / "raw.db")  # the same pragmas: WAL, synchronous=FULL
    raw.execute(
        "CREATE TABLE readings (source TEXT, sensor_id TEXT, metric TEXT, unit TEXT, t INTEGER, v REAL, meta TEXT)"
    )
    rows_per_group = [
        [(u.source, u.sensor_id, r.metric, r.unit, r.t_ms, r.value, None) for u in g for r in u.readings]
        for g in groups
    ]
    started = time.perf_counter()
    for rows in rows_per_group:
        raw.execute("BEGIN")
        raw.executemany("INSERT INTO readings VALUES (?,?,?,?,?,?,?)", rows)
        raw.execute("COMMIT")
    baseline = readings / (time.perf_counter() - started)
    raw.close()
    return ours, baseline


def bench_drain(where: Path, total_uplinks: int) -> float:
    """Readings/s taken (batch formed and stored), confirmed and deleted."""
    b = Buffer(where / "drain.db", max_size=100 * 1024**3)
    for i in range(0, total_uplinks, GROUP):
        b.store([to_record(u) for u in uplinks(i, GROUP, now_ms())])
    b.mark_live()  # all of it is backlog
    batcher = Batcher(b, Ids("gw-bench-01", "acme", "leeds"))
    started = time.perf_counter()
    drained = 0
    while (batch := batcher.form(live=False)) is not None:
        batch.take.confirm()
        b.settle()
        drained += batch.readings
    b.settle(force=True)
    rate = drained / (time.perf_counter() - started)
    b.close()
    return rate


def bench_daemon(where: Path, target: int, step: int) -> list[tuple[int, float, float, int]]:
    """[(backlog readings, seconds to READY, RSS MiB, buffer file MiB)] at each step."""
    from tests.support.brokers import Mosquitto, find_mosquitto
    from tests.support.certs import make_test_certs
    from tests.support.daemon import Daemon

    certs = make_test_certs(where / "certs")
    local = Mosquitto(where / "local", persistence=True, executable=find_mosquitto()).start()
    cloud = Mosquitto(where / "cloud", executable=find_mosquitto())  # never started: cloud down
    devices = "devices:\n" + "".join(
        f"  - dev_eui: 70b3d57ed002{i:04x}\n    sensor_id: air-{i:02d}\n    codec: osm-v2\n" for i in range(15)
    )
    daemon = Daemon(where / "gw", local, cloud, certs, devices, extra_yaml="")
    # info, not debug: the log must not be what we measure
    daemon.config.write_text(daemon.config.read_text().replace("level: debug", "level: info"))
    # The default status interval, not the tests' 2 s: its heartbeat writes are part of what is measured.
    daemon.config.write_text(daemon.config.read_text().replace(", status_interval: 2s", ""))
    path = where / "gw" / "buffer.db"
    results = []
    stored = 0
    try:
        # First with nothing ever stored; then the idempotency window is filled (its 100,000
        # newest keys are held in memory, whatever the backlog) and those readings are sent,
        # so every measured step below has a full window and only the backlog differs.
        ready, cold = _start_and_measure(daemon)
        print(f"daemon never used: READY in {ready:.2f} s, RSS {cold:.1f} MiB", flush=True)
        b = Buffer(path, max_size=100 * 1024**3)
        for n in range(-SEEN_KEPT_ROWS, 0, 10_000):
            b.store([to_record(u) for u in uplinks(n, 10_000, now_ms())])
        b.mark_live()
        batcher = Batcher(b, Ids("gw-test-01", "acme", "leeds"))
        while (batch := batcher.form(live=False)) is not None:
            batch.take.confirm()
            b.settle()
        b.close()
        while True:
            ready, rss = _start_and_measure(daemon)
            results.append((stored, ready, rss, path.stat().st_size // 1024**2))
            print(
                f"daemon backlog {stored:>10,} readings (window full): READY in {ready:.2f} s, RSS {rss:.1f} MiB, "
                f"buffer {path.stat().st_size / 1024**2:.0f} MiB",
                flush=True,
            )
            if stored >= target:
                break
            b = Buffer(path, max_size=100 * 1024**3)
            goal = min(target, stored + step)
            n = stored // READINGS_PER_UPLINK
            while stored < goal:
                count = min(5000, (goal - stored) // READINGS_PER_UPLINK) or 1
                b.store([to_record(u) for u in uplinks(n, count, now_ms())])
                n += count
                stored += count * READINGS_PER_UPLINK
            b.close()
    finally:
        daemon.close()
        local.stop()
    return results


def _start_and_measure(daemon: Any) -> tuple[float, float]:
    """Start the daemon; (seconds to READY=1, RSS MiB once it has done its periodic work)."""
    started = time.monotonic()
    daemon.start(timeout=60)
    ready = time.monotonic() - started
    # Let it run its bounds (every 5 s) and status (every 10 s) work before reading RSS.
    daemon.wait_status(lambda s: s["daemon"]["running"], timeout=30)
    time.sleep(6)
    rss = _rss_mib(daemon.process.pid)
    daemon.stop()
    return ready, rss


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=10_000_000, help="backlog the daemon is measured up to")
    parser.add_argument("--step", type=int, default=1_000_000)
    parser.add_argument("--intake-uplinks", type=int, default=50_000)
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temporary dir)")
    parser.add_argument("--skip-daemon", action="store_true")
    args = parser.parse_args()
    where = args.dir or Path(tempfile.mkdtemp(prefix="bench-buffer-"))
    where.mkdir(parents=True, exist_ok=True)
    print(f"files in {where} (sqlite {sqlite3.sqlite_version}); uplinks of {READINGS_PER_UPLINK} readings")
    try:
        ours, raw = bench_intake(where, args.intake_uplinks)
        print(
            f"intake  {ours:>12,.0f} readings/s through to_record + Buffer.store, "
            f"groups of {GROUP} uplinks (WAL, FULL); "
            f"baseline raw executemany {raw:,.0f} readings/s; ratio {ours / raw:.2f} (target >= 0.50)"
        )
        drain = bench_drain(where, args.intake_uplinks)
        print(f"drain   {drain:>12,.0f} readings/s through Batcher.form + confirm (gzip messages of <= 120 KiB)")
        if not args.skip_daemon:
            results = bench_daemon(where, args.readings, args.step)
            rss = [r[2] for r in results]
            print(
                f"daemon  RSS from {results[0][0]:,} to {results[-1][0]:,} readings: min {min(rss):.1f} MiB, "
                f"max {max(rss):.1f} MiB, spread {max(rss) - min(rss):.1f} MiB (target <= 10); "
                f"READY at {results[-1][0]:,}: {results[-1][1]:.2f} s (target < 2 s); "
                f"READY with an empty buffer: {results[0][1]:.2f} s"
            )
    finally:
        if args.dir is None:
            shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
