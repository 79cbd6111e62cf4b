"""Hostile input and operator faults against the real daemon, with real brokers (issue: one bad
message must never stop intake, and nothing accepted is lost): a NaN in an event, a burst of
distinct garbage, oversized messages, a damaged page 1, a second daemon on the same buffer, and
the buffer file deleted under a running daemon."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chirpstack import encode, topic, uplink_event
from tests.support.brokers import Mosquitto, Subscriber, publishing
from tests.support.certs import TestCerts
from tests.support.daemon import ROOT, Daemon
from tests.test_delivery import T0, dev_eui, devices_yaml, frame, row_for, wait_rows

pytestmark = pytest.mark.integration


def make_daemon(
    tmp_path: Path, local: Mosquitto, cloud: Mosquitto, certs: TestCerts, daemons: list[Daemon], **kw: object
) -> Daemon:
    daemon = Daemon(tmp_path / "gw", local, cloud, certs, devices_yaml(2), max_delay="100ms", **kw)  # type: ignore[arg-type]
    daemons.append(daemon)
    return daemon


def send_uplinks(local: Mosquitto, numbers: range, device: int = 0) -> set[tuple[str, int, str, object]]:
    with publishing(local) as send:
        for n in numbers:
            event = uplink_event(dev_eui(device), frame(n), f_cnt=n, time_ms=T0 + n * 1000, dedup_id=f"{device}-{n}")
            send(topic(dev_eui(device)), encode(event, "json"))
    return {row_for(device, n) for n in numbers}


def test_a_nan_snr_in_an_event_does_not_stop_intake(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """An uplink event with `"snr": "NaN"` (valid protobuf JSON) is stored without the snr, and
    every uplink after it still arrives: the intake thread is never killed by one value."""
    daemon = make_daemon(tmp_path, local_broker, cloud_broker, certs, daemons).start()
    with publishing(local_broker) as send:
        poisoned = uplink_event(dev_eui(0), frame(1), f_cnt=1, time_ms=T0 + 1000, dedup_id="0-1", snr=float("nan"))
        send(topic(dev_eui(0)), encode(poisoned, "json"))
        infinite = uplink_event(dev_eui(1), frame(1), f_cnt=1, time_ms=T0 + 1000, dedup_id="1-1", snr=float("inf"))
        send(topic(dev_eui(1)), encode(infinite, "protobuf"))  # the JSON source drops it: not JSON
    expected = send_uplinks(local_broker, range(2, 12)) | {row_for(0, 1)}
    messages = wait_rows(reader, expected, timeout=30)
    metas = [s.get("meta", {}) for m in messages for s in json.loads(_plain(m.payload))["series"]]
    assert all("snr" not in meta for meta in metas if meta.get("f_cnt") == 1)
    assert daemon.process is not None and daemon.process.poll() is None


def _plain(payload: bytes) -> bytes:
    import gzip

    return gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload


@pytest.mark.parametrize(
    ("where", "count", "size"),
    [("chirpstack", 2000, 24), ("osm", 300, 24), ("oversize", 100, 300_000)],
)
def test_a_burst_of_distinct_garbage_on_one_topic_gives_one_dead_letter_each(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    daemons: list[Daemon],
    tmp_path: Path,
    where: str,
    count: int,
    size: int,
) -> None:
    """Distinct bad payloads published as fast as the broker takes them on one device topic are
    one dead letter each, none mistaken for a redelivery and acked away: ChirpStack events that
    do not parse, OSM messages a codec refuses (all within one UNIX second of the receive
    clock), and oversized messages that share their first bytes."""
    osm_map = "  - osm_id: 0A1B2C3D\n    sensor_id: kettle-1\n    codec: osm-json\n"
    daemon = make_daemon(tmp_path, local_broker, cloud_broker, certs, daemons)
    (daemon.workdir / "devices" / "site.yaml").write_text(devices_yaml(2) + osm_map)
    daemon.start()
    rng = random.Random(8)
    on = "osm/0A1B2C3D/measurements" if where == "osm" else topic(dev_eui(0))
    with publishing(local_broker) as send:
        for _ in range(count):
            send(on, b"\x83" * (size - 24) + rng.randbytes(24))  # the same first bytes, distinct tails
    report = daemon.wait_status(lambda s: s["dead_letters"]["total"] >= count, timeout=60)
    assert report["dead_letters"]["total"] == count
    assert report["counters"].get("duplicate_uplinks", 0) == 0
    sensor = "kettle-1" if where == "osm" else "machine-00-clamp"
    assert report["dead_letters"]["latest"][0]["sensor_id"] == sensor


def test_oversized_messages_are_dead_letters_with_their_size_and_never_held_whole(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """A message over max_message_size is a dead letter holding its size and first bytes; one
    beyond the Maximum Packet Size we announce is refused by the broker for us; uplinks after
    both still arrive."""
    daemon = make_daemon(
        tmp_path,
        local_broker,
        cloud_broker,
        certs,
        daemons,
        extra_yaml="",
    )
    # max_message_size 64KiB on both sources: the Daemon helper writes the sources, so set it here.
    text = daemon.config.read_text().replace("encoding: json", "encoding: json\n    max_message_size: 64KiB")
    daemon.config.write_text(text)
    daemon.start()
    with publishing(local_broker) as send:
        send(topic(dev_eui(0)), b"{" + b" " * 100_000 + b"}")  # 100 KB: a dead letter
        send(topic(dev_eui(0)), b"x" * 2_000_000)  # 2 MB: beyond 4 x 64 KiB + 64 KiB, never sent to us
    expected = send_uplinks(local_broker, range(1, 6))
    wait_rows(reader, expected, timeout=30)
    report = daemon.wait_status(lambda s: s["dead_letters"]["total"] >= 1, timeout=20)
    letter = report["dead_letters"]["latest"][0]
    assert "message of 100002 bytes exceeds max_message_size (65536 bytes)" in letter["reason"]
    assert len(bytes.fromhex(letter["payload_hex"])) == 256
    assert report["dead_letters"]["total"] == 1


def test_a_damaged_page_1_is_moved_aside_and_the_daemon_starts(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """64 random bytes at offset 100 of buffer.db (header intact, page 1 broken): the daemon
    moves the file aside, says so at CRITICAL, and starts on a new buffer: no traceback, no
    restart loop."""
    daemon = make_daemon(tmp_path, local_broker, cloud_broker, certs, daemons).start()
    assert daemon.stop()[0] == 0
    path = daemon.workdir / "buffer.db"
    with path.open("r+b") as f:
        f.seek(100)
        f.write(random.Random(6).randbytes(64))
    daemon.start()
    log = daemon.log_path.read_text()
    assert "BUFFER FILE DAMAGED" in log and "Traceback" not in log
    assert list(daemon.workdir.glob("buffer.db.corrupt-*"))
    assert daemon.status()["recovered"] is not None


def test_a_second_daemon_on_the_same_buffer_exits_2_naming_the_first(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """`run` takes an exclusive lock on its buffer before anything else: a second `run` with the
    same config exits 2 with "already running (pid N)" and the first carries on."""
    daemon = make_daemon(tmp_path, local_broker, cloud_broker, certs, daemons).start()
    assert daemon.process is not None
    second = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "-c", str(daemon.config)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=30,
    )
    assert second.returncode == 2
    assert f"already running (pid {daemon.process.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    assert daemon.process.poll() is None


def test_a_buffer_deleted_under_the_daemon_is_written_back_and_nothing_acked_is_lost(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """`rm buffer.db` while readings wait for the cloud: the daemon notices at its next write, logs
    CRITICAL, acks nothing more, writes the open database back and exits 3 for systemd to
    restart it; after the restart every reading reaches the cloud."""
    daemon = make_daemon(tmp_path, local_broker, cloud_broker, certs, daemons)
    cloud_broker.stop()
    daemon.start()
    first = send_uplinks(local_broker, range(1, 21))
    daemon.wait_status(lambda s: s["backlog"]["readings"] == len(first))
    (daemon.workdir / "buffer.db").unlink()
    later = send_uplinks(local_broker, range(21, 26))
    assert daemon.process is not None
    assert daemon.process.wait(30) == 3
    log = daemon.log_path.read_text()
    assert "BUFFER FILE LOST" in log and "deleted" in log and "Traceback" not in log
    cloud_broker.start()
    daemon.start()
    wait_rows(reader, first | later, timeout=60)


@pytest.fixture
def card(tmp_path: Path) -> Iterator[Path]:
    """An ext4 filesystem on a loop device, mounted `errors=remount-ro` as an SD card root is:
    ext4's own `trigger_fs_error` then makes the kernel remount it read-only, as it does when a
    card starts failing."""
    image, where = tmp_path / "card.img", tmp_path / "card"
    where.mkdir()
    with image.open("wb") as f:
        f.truncate(32 * 1024**2)
    made = subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True)
    mounted = subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(where)], capture_output=True)
    if made.returncode or mounted.returncode:
        pytest.skip(f"cannot mount an ext4 image here: {(made.stderr or mounted.stderr).decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fail_card(where: Path) -> None:
    """The kernel's answer to a failing card: an ext4 error, and the filesystem goes read-only."""
    source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(where)], capture_output=True, text=True).stdout
    trigger = Path("/sys/fs/ext4") / Path(source.strip()).name / "trigger_fs_error"
    if not trigger.exists():
        pytest.skip("this kernel has no ext4 trigger_fs_error")
    trigger.write_text("test: card failing\n")


def test_a_card_remounted_read_only_stops_the_daemon_loudly_and_acks_nothing_more(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
    card: Path,
) -> None:
    """The buffer's filesystem goes read-only under the daemon: it logs CRITICAL, acknowledges
    nothing it could not store (the local broker keeps those), and exits 4, which the unit does
    not restart on; once the card is writable again a start delivers every reading."""
    daemon = make_daemon(tmp_path, local_broker, cloud_broker, certs, daemons, buffer_path=card / "buffer.db")
    cloud_broker.stop()
    daemon.start()
    first = send_uplinks(local_broker, range(1, 11))
    daemon.wait_status(lambda s: s["backlog"]["readings"] == len(first))
    fail_card(card)
    later = send_uplinks(local_broker, range(11, 16))
    assert daemon.process is not None
    assert daemon.process.wait(30) == 4
    log = daemon.log_path.read_text()
    assert "BUFFER FILE LOST" in log and "cannot write" in log and "Traceback" not in log
    subprocess.run(["umount", str(card)], check=True)
    subprocess.run(["mount", "-o", "loop", str(tmp_path / "card.img"), str(card)], check=True)
    cloud_broker.start()
    daemon.start()
    wait_rows(reader, first | later, timeout=60)


def test_sigterm_while_waiting_for_an_unreachable_local_broker_stops_within_5_s(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """A stop request ends the start-up wait for the local broker at once: the daemon exits 0
    within the 5 s the README promises and never logs "gateway started" after the signal."""
    daemon = make_daemon(tmp_path, local_broker, cloud_broker, certs, daemons)
    local_broker.stop()
    daemon.launch()
    daemon.wait_log("waiting for the local broker's subscriptions")
    code, took = daemon.stop()
    assert code == 0 and took < 5.0, (code, took, daemon.log_tail())
    assert "gateway started" not in daemon.log_path.read_text()


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


def test_a_flood_of_heavy_valid_uplinks_keeps_memory_bounded(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """100 uplinks of 12,000 decoded leaves each (210 KB, under max_message_size), queued at once:
    intake decodes and commits them in bounded parts, so the daemon's peak memory stays far
    below what holding them all would take, and another device's uplink still arrives."""
    heavy = "  - dev_eui: 70b3d57ed00fffff\n    sensor_id: heavy\n    codec: chirpstack-object\n"
    daemon = make_daemon(tmp_path, local_broker, cloud_broker, certs, daemons)
    (daemon.workdir / "devices" / "site.yaml").write_text(devices_yaml(2) + heavy)
    daemon.start()
    assert daemon.process is not None
    leaves = {f"m{i}": i * 1.5 for i in range(12_000)}
    with publishing(local_broker) as send:
        for i in range(100):
            body = json.loads(encode(uplink_event("70b3d57ed00fffff", b"", dedup_id=f"heavy-{i}"), "json"))
            body["object"] = leaves
            send(topic("70b3d57ed00fffff"), json.dumps(body).encode())
    wait_rows(reader, send_uplinks(local_broker, range(1, 2)), timeout=120)
    assert peak_rss_mib(daemon.process.pid) < 250


def test_a_flood_of_big_bad_messages_keeps_the_buffer_file_near_max_size(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """With max_size 4MiB, 200 distinct 200 KB garbage messages and 200 unmapped 150 KB OSM
    messages leave the buffer file and its WAL within max_size, the WAL's allowance (6 MiB) and
    one group as stored (4 MiB of messages; an unmapped OSM message is kept as hex and parsed
    JSON, about 3x), not hundreds of MB: dead letters and unmapped uplinks are pruned per group
    and the WAL is truncated at checkpoints."""
    daemon = make_daemon(tmp_path, local_broker, cloud_broker, certs, daemons, buffer_yaml="max_size: 4MiB")
    daemon.start()
    rng = random.Random(15)
    with publishing(local_broker) as send:
        for i in range(200):
            send(topic(dev_eui(0)), b"\x83" + rng.randbytes(200_000))
            unix = 1_795_000_000 + i
            send("osm/0B0B0B0B/measurements", json.dumps({"UNIX": unix, "VALUES": {"X": "y" * 150_000}}))
    report = daemon.wait_status(lambda s: s["dead_letters"]["total"] == 200 and s["unmapped_uplinks"] > 0, timeout=60)
    files = [daemon.workdir / name for name in ("buffer.db", "buffer.db-wal")]
    on_disk = sum(f.stat().st_size for f in files if f.exists())
    assert on_disk < (4 + 6 + 3 * 4) * 1024**2, on_disk
    assert report["dead_letters"]["kept_bytes"] <= 4 * 1024**2 // 10 + 200_001


def test_a_qos0_flood_of_empty_payloads_on_long_topics_keeps_memory_bounded(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """While the buffer refuses intake, 6,000 QoS 0 messages with empty payloads on 32 KB topics
    (QoS 0 is not held back by Receive Maximum): the intake queue counts topics and per-message
    overhead too, so the source waits and memory stays bounded."""
    daemon = make_daemon(
        tmp_path, local_broker, cloud_broker, certs, daemons, buffer_yaml="when_full: stop-intake, max_size: 1KiB"
    )
    cloud_broker.stop()
    daemon.start()
    assert daemon.process is not None
    send_uplinks(local_broker, range(1, 40))  # fills the 1 KiB: intake holds from here
    daemon.wait_log("buffer refuses intake")
    long_topic = "application/" + "y" * 32_000 + f"/device/{dev_eui(0)}/event/up"
    with publishing(local_broker) as send:
        for _ in range(6000):
            send(long_topic, b"", qos=0)
    assert peak_rss_mib(daemon.process.pid) < 150
    assert daemon.process.poll() is None
