"""The intake thread's work per uplink, in process: parse, map, decode, record, store, ack.

    python bench/intake_path.py [--uplinks 20000] [--group 1000] [--repeat 3] [--against DIR]

bench/intake.py measures the daemon end to end between real brokers, where a shared machine's
noise hides a change of a few microseconds. This one takes paho and the brokers away: the same
burst as intake.py's (a) (ChirpStack v4 JSON uplink events, an osm-v2 frame of 3 readings,
50 devices), handed to a real `Intake` as `Delivery`s and committed in groups to a real SQLite
buffer under /dev/shm (no fsync wait: the CPU is what is measured). It prints the microseconds
per uplink, the best of --repeat runs after one warm-up run.

With --against DIR (a checkout of another commit, e.g. `git worktree add /tmp/base HEAD~3`),
each run alternates between this checkout and that one in fresh interpreters, so both see the
same machine, and the ratio is printed: the way to tell whether a change to the per-uplink path
pays.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(root: Path, uplinks: int, group: int, repeat: int) -> float:
    """Microseconds per uplink of the checkout at `root` (imported first on sys.path)."""
    sys.path.insert(0, str(root / "bench"))
    import intake as burst_bench  # the same burst as intake.py's (a); it puts `root` first on sys.path

    import gateway
    from gateway.batching import to_record
    from gateway.buffer import Buffer
    from gateway.config import load_device_maps
    from gateway.intake import Intake
    from gateway.sources.events import parse_chirpstack
    from gateway.sources.mqtt import Delivery

    if not Path(gateway.__file__).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"measuring {gateway.__file__}, not the checkout at {root}")
    where = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        (where / "devices.yaml").write_text(burst_bench.burst_devices_yaml())
        devices = load_device_maps([where / "devices.yaml"])
        messages = burst_bench.burst(uplinks, "json", "path")
        best = float("inf")
        for run in range(repeat + 1):  # the first warms up
            buffer = Buffer(where / f"buffer-{run}.db")
            intake = Intake(
                buffer,
                devices,
                {"chirpstack-1": functools.partial(parse_chirpstack, encoding="json")},
                encode=functools.partial(to_record, max_bytes=120 * 1024, compress=True),
            )
            acked = itertools.count()
            ack = functools.partial(next, acked)
            received = time.time_ns() // 1_000_000
            deliveries = [Delivery("chirpstack-1", topic, payload, received, ack) for topic, payload in messages]
            start = time.perf_counter()
            for i in range(0, len(deliveries), group):
                part = deliveries[i : i + group]
                while part:
                    part = intake._commit(part)
            seconds = time.perf_counter() - start
            buffer.close()
            if next(acked) != uplinks:
                raise SystemExit(f"not every one of the {uplinks} uplinks was acknowledged")
            if run:
                best = min(best, seconds)
        return best / uplinks * 1e6
    finally:
        shutil.rmtree(where, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uplinks", type=int, default=20_000)
    parser.add_argument("--group", type=int, default=1000, help="uplinks per commit (the daemon's groups)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--against", type=Path, help="another checkout to compare with, run alternately")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # a child: measure this checkout, print
    args = parser.parse_args()
    if args.one:
        print(measure(args.one, args.uplinks, args.group, args.repeat))
        return
    roots = [ROOT] + ([args.against.resolve()] if args.against else [])
    results: dict[Path, list[float]] = {root: [] for root in roots}
    for _ in range(3 if args.against else 1):
        for root in roots:
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(root), "--uplinks", str(args.uplinks),
                 "--group", str(args.group), "--repeat", str(args.repeat)],
                check=True, capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            ).stdout
            results[root].append(float(out.split()[-1]))
    here = min(results[ROOT])
    print(f"intake path  {here:6.1f} us/uplink  this checkout ({args.uplinks:,} uplinks in groups of {args.group}, "
          f"best of {len(results[ROOT]) * args.repeat} runs)")
    if args.against:
        there = min(results[roots[1]])
        print(f"intake path  {there:6.1f} us/uplink  baseline {roots[1]} (same runs, alternated)")
        print(f"intake path  {here / there:6.2f} this/baseline")


if __name__ == "__main__":
    main()
