"""`hub-gateway watch` against the real daemon between real brokers: what intake did with each
uplink, streamed over the daemon's Unix socket after each commit; and the log lines that go with
it (start, reload, dead letters)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.chirpstack import encode, log_event, topic, uplink_event
from tests.support.brokers import Mosquitto, Subscriber, publishing
from tests.support.certs import TestCerts
from tests.support.daemon import ROOT, Daemon
from tests.test_bridge import AIR, DEVICES, PRESS, STRANGER, T0, air_frame, expected_rows, press_frame, wait_rows

pytestmark = pytest.mark.integration

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def watch_command(daemon: Daemon, *args: str) -> subprocess.Popen[bytes]:
    """`hub-gateway watch ARGS -c gateway.yaml` as an engineer runs it; returns once it is watching
    (its "watching" line on stderr comes after the daemon's answer)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "watch", "-c", str(daemon.config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert process.stderr is not None
    first = process.stderr.readline().decode()
    assert first.startswith("watching"), first + process.stderr.read().decode()
    return process


def lines_until(stream: IO[bytes] | None, done: Any, limit: int = 10_000) -> list[str]:
    """Read lines until done(line) holds for one (the stream ending first fails the test)."""
    assert stream is not None
    seen = []
    while len(seen) < limit:
        raw = stream.readline()
        assert raw, f"stream ended; seen: {seen}"
        seen.append(raw.decode().rstrip("\n"))
        if done(seen[-1]):
            return seen
    raise AssertionError(f"never done in {limit} lines: {seen[-20:]}")


def interrupt(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Ctrl-C, as a terminal sends it; the exit code and what it printed on stderr after it."""
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=10)
    return process.returncode, err.decode()


@pytest.fixture
def daemon(
    local_broker: Mosquitto, cloud_broker: Mosquitto, certs: TestCerts, daemons: list[Daemon], tmp_path: Path
) -> Daemon:
    """The daemon with the bridge tests' map (press with rename and scale, air, kettle), started."""
    d = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, DEVICES)
    daemons.append(d)
    return d.start()


def raw_watcher(daemon: Daemon, ids: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """A watcher speaking the socket's protocol directly; yields events (after the answer)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(daemon.workdir / "watch.sock"))
    conn.settimeout(30)
    conn.sendall(json.dumps({"ids": ids or []}).encode() + b"\n")
    with conn, conn.makefile("rb") as stream:
        for raw in stream:
            yield json.loads(raw)


def test_watch_shows_readings_with_units_dead_letters_unmapped_logs_and_duplicates(
    daemon: Daemon, local_broker: Mosquitto, reader: Subscriber
) -> None:
    """`watch --json` shows, after commit, each uplink's readings as the cloud gets them (renamed
    and scaled, with units), a dead letter with its reason and payload hex, an unmapped device, a
    ChirpStack log event and a redelivered uplink as a duplicate; Ctrl-C ends it with exit 0 and
    nothing on stderr. The dead letter's log line names the device and the reason."""
    watcher = watch_command(daemon, "--json")
    with publishing(local_broker) as send:
        send(topic(PRESS), encode(uplink_event(PRESS, press_frame(1), time_ms=T0, dedup_id="p-1"), "json"))
        send(topic(AIR), encode(uplink_event(AIR, b"\x02TEMP\x01\x15\x01", time_ms=T0, dedup_id="a-bad"), "json"))
        send(topic(STRANGER), encode(uplink_event(STRANGER, press_frame(2), dedup_id="s-1"), "json"))
        send(topic(PRESS, "log"), encode(log_event(PRESS, description="frame-counter reset"), "json"))
        send(topic(PRESS), encode(uplink_event(PRESS, press_frame(1), time_ms=T0, dedup_id="p-1"), "json"))
    lines = lines_until(watcher.stdout, lambda line: '"event":"duplicate"' in line)
    events = {e["event"]: e for e in map(json.loads, lines)}
    readings = events["readings"]
    assert (readings["sensor_id"], readings["device"]) == ("press-03-clamp", f"dev_eui:{PRESS}")
    assert readings["readings"] == [{"metric": "spindle_current", "value": 12.001, "unit": "A", "t_ms": T0}]
    letter = events["dead_letter"]
    assert letter["sensor_id"] == "hall-a-air" and "truncated" in letter["reason"].lower()
    assert letter["payload_hex"] == "0254454d50011501" and letter["payload_bytes"] == 8
    assert events["unmapped"]["device"] == f"dev_eui:{STRANGER}"
    assert events["log"]["sensor_id"] == "press-03-clamp" and events["log"]["description"] == "frame-counter reset"
    assert events["duplicate"]["sensor_id"] == "press-03-clamp"
    code, err = interrupt(watcher)
    assert (code, err) == (0, "")
    log = daemon.log_path.read_text()
    (dead,) = [json.loads(line) for line in log.splitlines() if '"event": "dead letter"' in line]
    assert dead["device"] == f"dev_eui:{AIR}" and dead["reason"] == letter["reason"]


def test_watch_by_sensor_id_shows_that_device_only_in_lines_for_people(daemon: Daemon, local_broker: Mosquitto) -> None:
    """`watch press-03-clamp` (filtered by the daemon) prints one line per uplink of that sensor,
    its reading with the unit, and nothing of the other devices sent in between."""
    watcher = watch_command(daemon, "press-03-clamp")
    with publishing(local_broker) as send:
        for n in (1, 2, 3):
            t = T0 + n * 1000
            send(topic(AIR), encode(uplink_event(AIR, air_frame(n), time_ms=t, dedup_id=f"a-{n}"), "json"))
            send(topic(PRESS), encode(uplink_event(PRESS, press_frame(n), time_ms=t, dedup_id=f"p-{n}"), "json"))
    lines = lines_until(watcher.stdout, lambda line: "spindle_current=12.003 A" in line)
    assert len(lines) == 3, lines
    for n, line in enumerate(lines, 1):
        assert f"press-03-clamp dev_eui:{PRESS}  spindle_current=12.00{n} A" in line
    assert interrupt(watcher)[0] == 0


def test_watching_a_sensor_shows_an_unmapped_id_one_digit_from_its_own(daemon: Daemon, local_broker: Mosquitto) -> None:
    """A typo'd DevEUI in the map leaves the watched sensor silent while its uplinks arrive under
    the real id: `watch press-03-clamp` shows those uplinks as unmapped, and says how near their
    id is to the sensor's, so the engineer at the machine sees the typo, not just silence.
    Devices in no map with ids far from it stay filtered out."""
    typo = PRESS[:-1] + "5"  # the device as it really is; the map says ...1234
    watcher = watch_command(daemon, "press-03-clamp")
    with publishing(local_broker) as send:
        send(topic(STRANGER), encode(uplink_event(STRANGER, press_frame(1), dedup_id="s-1"), "json"))
        send(topic(typo), encode(uplink_event(typo, press_frame(2), dedup_id="t-1"), "json"))
        send(topic(PRESS), encode(uplink_event(PRESS, press_frame(3), time_ms=T0, dedup_id="p-3"), "json"))
    lines = lines_until(watcher.stdout, lambda line: "spindle_current" in line)
    assert len(lines) == 2, lines
    assert lines[0].endswith(
        f"- dev_eui:{typo}  unmapped: no device map names it (kept for replay once mapped); "
        f"one digit from press-03-clamp's dev_eui {PRESS}: a typo in the map?"
    )
    assert interrupt(watcher)[0] == 0


def test_a_watcher_that_never_reads_does_not_hold_intake_and_is_told_what_it_missed(
    daemon: Daemon, local_broker: Mosquitto, reader: Subscriber
) -> None:
    """A watcher that connects and then stops reading (a terminal on Ctrl-S) does not slow intake:
    3,000 uplinks all reach the cloud while it sleeps; once it reads, it gets the events that
    fitted in its bounded queue and a count of the rest, which add up to all 3,000."""
    events = raw_watcher(daemon)
    assert next(events)["event"] == "watching"
    expected = set()
    with publishing(local_broker) as send:
        for n in range(1, 3001):
            t = T0 + n * 1000
            send(topic(PRESS), encode(uplink_event(PRESS, press_frame(n), time_ms=t, dedup_id=f"p-{n}"), "json"))
            expected |= {row for row in expected_rows(n, t) if row[1] == "press-03-clamp"}
    wait_rows(reader, expected, timeout=60)  # intake and publishing went on: the watcher is asleep
    shown = dropped = 0
    while shown + dropped < 3000:
        event = next(events)
        if event["event"] == "dropped":
            dropped += event["count"]
        else:
            assert event["event"] == "readings"
            shown += 1
    assert dropped > 0 and shown >= 1000  # its whole queue, and what the socket held


def test_watch_without_a_running_daemon_says_so_and_exits_1(
    local_broker: Mosquitto, cloud_broker: Mosquitto, certs: TestCerts, daemons: list[Daemon], tmp_path: Path
) -> None:
    """Before the daemon runs, and after a kill -9 left its socket behind, `watch` says that no
    daemon is running and exits 1; a clean stop removes the socket, a new start replaces a stale one."""
    d = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, DEVICES)
    daemons.append(d)
    sock = d.workdir / "watch.sock"

    def watch_once() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "watch", "-c", str(d.config)], capture_output=True, env=ENV, timeout=30
        )

    done = watch_once()
    assert done.returncode == 1 and b"no daemon is running" in done.stderr
    d.start()
    assert oct(sock.stat().st_mode & 0o777) == "0o660"
    d.kill()
    assert sock.exists()  # left behind by kill -9
    done = watch_once()
    assert done.returncode == 1 and b"no daemon is running" in done.stderr, done.stderr
    d.start()
    assert next(raw_watcher(d))["event"] == "watching"
    assert d.stop()[0] == 0
    assert not sock.exists()


def test_start_and_reload_log_what_an_engineer_needs(daemon: Daemon, local_broker: Mosquitto) -> None:
    """`gateway started` gives the version, the cloud endpoint and topic and the device count; a
    reload names the devices added, removed and changed by sensor_id and dev_eui/osm_id."""
    (started,) = [json.loads(line) for line in daemon.log_path.read_text().splitlines() if "gateway started" in line]
    assert started["version"] and started["devices"] == 3
    assert started["endpoint"].startswith("localhost:") and started["topic"] == "dt/hub/acme/leeds/gw-test-01/readings"
    new_map = DEVICES.replace("sensor_id: hall-a-air", "sensor_id: hall-b-air").replace(
        "  - osm_id: 0A1B2C3D\n    sensor_id: kettle-1\n    codec: osm-v2\n",
        f"  - dev_eui: {STRANGER}\n    sensor_id: lathe-07\n    codec: osm-v2\n",
    )
    (daemon.workdir / "devices" / "site.yaml").write_text(new_map)
    daemon.reload()
    daemon.wait_log('"event": "device maps reloaded"')
    (reloaded,) = [json.loads(line) for line in daemon.log_path.read_text().splitlines() if "maps reloaded" in line]
    assert reloaded["added"] == [f"lathe-07 (dev_eui:{STRANGER})"]
    assert reloaded["removed"] == ["kettle-1 (osm_id:0A1B2C3D)"]
    assert reloaded["changed"] == [f"hall-b-air (dev_eui:{AIR})"]


def test_lines_for_people_name_the_drop_and_cut_a_long_payload() -> None:
    """A drop count reads as a sentence a field engineer understands; a dead letter shows its
    reason and payload hex, cut at 256 bytes with the real size."""
    from gateway.watch import normalise_id
    from gateway.watch_client import format_event

    assert format_event({"event": "dropped", "count": 37}) == "... 37 events dropped: this terminal is too slow"
    line = format_event(
        {
            "event": "dead_letter",
            "received_ms": T0,
            "sensor_id": "s",
            "device": "dev_eui:x",
            "reason": "truncated",
            "payload_hex": "ab" * 256,
            "payload_bytes": 4000,
        }
    )
    assert "DEAD LETTER: truncated" in line and line.endswith("ab... (4000 bytes)")
    assert normalise_id("70-B3-D5-7E-D0-00-12-34") == PRESS and normalise_id("press-03-clamp") == "press-03-clamp"


def test_the_watch_socket_waits_for_watchers_without_polling_and_stops_at_once(tmp_path: Path) -> None:
    """The accept loop sleeps until someone connects (its timeout is only a backstop of a
    minute, so an idle daemon is not woken four times a second); stop wakes it at once, ends
    the thread and removes the socket."""
    import time

    from gateway.watch import ACCEPT_BACKSTOP_S, WatchServer

    assert ACCEPT_BACKSTOP_S >= 30
    server = WatchServer(tmp_path / "watch.sock")
    server.start()
    assert (tmp_path / "watch.sock").exists()
    time.sleep(0.2)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 0.9  # stop waits up to 1 s for the thread to end
    assert not (tmp_path / "watch.sock").exists()
