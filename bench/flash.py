"""Bytes written to disk per reading at the seed site's load: what the buffer costs an SD card.

    python bench/flash.py [--seconds 120] [--commit-intervals 5s,1s,1ms]

The real daemon (`hub-gateway run`) against a real local Mosquitto fed by the demo's simulated
site (45 current clamps at one uplink a second, 15 air-quality units every 30 s: 49 readings
a second, ChirpStack JSON events) and a TLS Mosquitto as IoT Core's stand-in, so batches are
formed, published and confirmed as in production. After a warm-up, the daemon's
`write_bytes` from /proc/PID/io (bytes it caused to be written to the block device: WAL
appends, checkpoints) is read over --seconds, against the readings it took in over the same
time. One run per commit interval; the baseline is `commit_interval: 1ms` (a commit, so an
fsync, for every group however small: at this load, about one per uplink).

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.demo import SimulatedSite  # noqa: E402
from gateway.sources import Delivery  # noqa: E402
from tests.support.brokers import Mosquitto, ServerTLS, find_mosquitto, publishing  # noqa: E402
from tests.support.certs import make_test_certs  # noqa: E402
from tests.support.daemon import Daemon  # noqa: E402


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


def readings_in(daemon: Daemon) -> int:
    return sum(d["readings"] for d in daemon.status()["devices"])


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
    try:
        daemon.start()
        assert daemon.process is not None
        with publishing(local) as send:

            def deliver(d: Delivery) -> None:
                send(d.topic, d.payload)

            site = SimulatedSite(deliver)
            site.start()
            time.sleep(warmup)  # the site runs in real time: this is its load, not a hope
            w0, r0, t0 = write_bytes(daemon.process.pid), readings_in(daemon), time.monotonic()
            time.sleep(seconds)
            w1, r1, t1 = write_bytes(daemon.process.pid), readings_in(daemon), time.monotonic()
            site.stop()
        daemon.stop()
    finally:
        daemon.close()
        local.stop()
        cloud.stop()
    readings = r1 - r0
    return (w1 - w0) / readings, readings / (t1 - t0), (w1 - w0) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--commit-intervals", default="5s,1s,1ms", help="comma-separated; the last is the baseline")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="bench-flash-", dir="/var/tmp"))
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
