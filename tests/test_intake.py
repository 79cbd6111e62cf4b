"""Intake's group commit, against a real buffer and the real ChirpStack parser (no broker)."""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path

from gateway.buffer import Buffer, now_ms
from gateway.config import load_device_maps
from gateway.intake import Intake
from gateway.sources import Delivery
from gateway.sources.events import parse_chirpstack
from gateway.sources.mqtt import RECEIVE_MAXIMUM
from tests.chirpstack import encode, topic, uplink_event
from tests.test_delivery import frame

DEV = "70b3d57ed0001234"


def test_a_source_that_handed_over_its_receive_maximum_is_committed_without_waiting_the_window(
    tmp_path: Path,
) -> None:
    """With a 30 s commit window, a burst of exactly Receive Maximum uplinks from one source
    (the broker sends no more until they are acked) is committed and acked at once, not after
    the window: a catch-up goes at the speed of commits, not one Receive Maximum per window."""
    buffer = Buffer(tmp_path / "b.db")
    (tmp_path / "site.yaml").write_text(f"devices:\n  - dev_eui: {DEV}\n    sensor_id: press\n    codec: osm-v2\n")
    devices = load_device_maps([tmp_path / "site.yaml"])
    intake = Intake(buffer, devices, {"cs": partial(parse_chirpstack, encoding="json")}, commit_interval_s=30.0)
    acked = threading.Semaphore(0)
    intake.start()
    try:
        started = time.monotonic()
        for n in range(RECEIVE_MAXIMUM):
            event = encode(uplink_event(DEV, frame(n), f_cnt=n, dedup_id=f"d-{n}"), "json")
            intake.deliver(Delivery("cs", topic(DEV), event, now_ms(), acked.release))
        for _ in range(RECEIVE_MAXIMUM):
            assert acked.acquire(timeout=25.0), "not acked within the window: intake waited it out"
        took = time.monotonic() - started
    finally:
        intake.stop(5.0)
        buffer.close()
    assert took < 15.0
    assert Buffer(tmp_path / "b.db").depth().uplinks == RECEIVE_MAXIMUM
