"""The service's answer to a buffer found damaged while it runs: stop with exit 3 and leave a
marker, so the restart (systemd's) moves the file aside instead of using it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from gateway import wire
from gateway.batching import to_record
from gateway.buffer import Buffer, damage_marker, now_ms
from gateway.buffer import core as buffer_core
from gateway.config import load_config
from gateway.model import DecodedUplink, DeviceKey, Reading
from gateway.service import EXIT_BUFFER_DAMAGED, Service
from tests.support.site import directory_site


def test_damage_found_by_the_background_check_stops_with_exit_3_and_a_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file too large for the check at open (here: any) is checked after READY; damage found
    then stops the daemon (exit code 3) with the marker that makes the next open move it aside."""
    cfg = directory_site(tmp_path)
    path = tmp_path / "buffer.db"
    b = Buffer(path)
    dev = DeviceKey("dev_eui", "70b3d57ed0001234")
    t = now_ms()
    b.store(
        [
            to_record(
                DecodedUplink(
                    f"chirpstack/{i}", "s", dev, t, {}, tuple(Reading("CC1", j, "mA", t + j) for j in range(40))
                )
            )
            for i in range(200)
        ]
    )
    b.close()
    monkeypatch.setattr(buffer_core, "QUICK_CHECK_AT_OPEN_MAX", 0)
    service = Service(load_config(cfg), sources=[])
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page : page + 12] = b"\x07" * 12  # page 2 (a table's root), under its feet
    path.write_bytes(bytes(data))
    runner = threading.Thread(target=service.run)
    runner.start()
    assert service.stopped.wait(30)
    runner.join(10)
    assert service.exit_code == EXIT_BUFFER_DAMAGED
    assert damage_marker(path).exists()
    reopened = Buffer(path)
    assert reopened.recovered is not None and "quick_check" in reopened.recovered.reason
    reopened.close()


def test_a_dead_intake_thread_stops_the_daemon_with_a_failure_exit(tmp_path: Path) -> None:
    """An exception nothing expected ends the intake thread (here: the local broker client's ack
    raising): the main loop sees the dead worker, stops feeding the watchdog and exits 1, so
    systemd restarts the daemon rather than leaving it deaf and "running"."""
    from functools import partial

    from gateway.service import EXIT_WORKER_DIED
    from gateway.sources import Delivery
    from gateway.sources.events import parse_chirpstack
    from tests.chirpstack import encode, topic, uplink_event

    service = Service(load_config(directory_site(tmp_path)), sources=[])
    service.intake.add_parser("test", partial(parse_chirpstack, encoding="json"))

    def broken_ack() -> None:
        raise RuntimeError("client gone")

    runner = threading.Thread(target=service.run)
    runner.start()
    event = encode(uplink_event("70b3d57ed0001234", b"\x02"), "json")
    service.intake.deliver(Delivery("test", topic("70b3d57ed0001234"), event, now_ms(), broken_ack))
    assert service.stopped.wait(30)
    runner.join(10)
    assert service.exit_code == EXIT_WORKER_DIED
    assert isinstance(service.intake.died, RuntimeError)


def test_an_idle_main_loop_sleeps_until_its_next_deadline_and_still_stops_at_once(tmp_path: Path) -> None:
    """With nothing to do, the main loop turns about once a second (MAX_TURN_S), not four
    times, since every turn costs the daemon CPU; a stop request still wakes it at once."""
    import itertools
    import time

    from gateway.service import MAX_TURN_S

    service = Service(load_config(directory_site(tmp_path)), sources=[])
    turns: list[float] = []
    runner = threading.Thread(target=service.run, kwargs={"progress": lambda s: turns.append(time.monotonic())})
    runner.start()
    try:
        time.sleep(4.0)
    finally:
        asked = time.monotonic()
        service.request_stop()
        assert service.stopped.wait(10)
        runner.join(10)
    stopped_in = time.monotonic() - asked
    gaps = [b - a for a, b in itertools.pairwise(turns[1:])]  # after the first turns at start
    assert len(turns) <= 4.0 / MAX_TURN_S + 3
    assert gaps and min(gaps) >= 0.2, gaps
    assert stopped_in < 3.0


def test_a_commit_wakes_the_main_loop_only_when_it_brings_the_dispatcher_work(tmp_path: Path) -> None:
    """Uplinks committed every 0.025 s do not each cost a turn of the main loop: a commit wakes it
    only when it records a formed batch, fills a message, or starts live readings due before
    the loop's next deadline; yet every live batch still leaves within max_delay (plus the
    commit that records it) and every reading is sent."""
    import time
    from functools import partial

    from gateway.sources import Delivery
    from gateway.sources.events import parse_chirpstack
    from tests.chirpstack import encode, topic, uplink_event
    from tests.test_delivery import frame

    dev = "70b3d57ed0001234"
    cfg = directory_site(tmp_path)
    (tmp_path / "devices" / "a.yaml").write_text(
        f"devices:\n  - dev_eui: {dev}\n    sensor_id: press\n    codec: osm-v2\n"
    )
    cfg.write_text(
        cfg.read_text().replace("buffer: {path: buffer.db}", "buffer: {path: buffer.db, commit_interval: 0.02s}")
        + "batch: {max_delay: 3s}\n"
    )
    service = Service(load_config(cfg), sources=[])
    service.intake.add_parser("test", partial(parse_chirpstack, encoding="json"))
    turns: list[tuple[float, int]] = []
    runner = threading.Thread(
        target=service.run, kwargs={"progress": lambda s: turns.append((time.monotonic(), s.published_batches))}
    )
    runner.start()
    try:
        time.sleep(0.5)
        first = time.monotonic()
        for n in range(160):  # 4 s, one uplink every 0.025 s
            event = encode(uplink_event(dev, frame(n), f_cnt=n, dedup_id=f"d-{n}"), "json")
            service.intake.deliver(Delivery("test", topic(dev), event, now_ms(), lambda: None))
            time.sleep(0.025)
        sent_by = [t for t, published in turns if published >= 1]
    finally:
        service.request_stop()
        assert service.stopped.wait(10)
        runner.join(10)
    commits = service.intake.stats.groups
    during = [t for t, _ in turns if first <= t <= first + 4.0]
    # The loop's own deadlines (MAX_TURN_S, the heartbeat, settle) and the batch's events make
    # 10 to 25 turns in these 4 s whatever intake does; a turn per commit would make 40 to 160.
    assert commits >= 30  # enough commits for the count of turns to say something (a loaded machine groups more)
    assert len(during) < commits / 2, (len(during), commits)
    assert sent_by and sent_by[0] - first <= 3.0 + 0.5
    batches = (tmp_path / "out").glob("*.json*")  # the batch files; the health message is in state/
    rows = sum(len(list(wire.expand_rows(wire.decode_message(p.read_bytes())))) for p in batches)
    assert rows == 160
