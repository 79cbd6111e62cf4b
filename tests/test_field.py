"""A field engineer's mistakes, caught while the daemon runs (real daemon, real brokers): a metric
override whose name matches nothing is flagged once in the log and in `status`, and a device
mapped with the wrong codec, once fixed and reloaded, has its dead letters decoded again."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chirpstack import encode, topic, uplink_event
from tests.support.brokers import Mosquitto, Subscriber, publishing
from tests.support.certs import TestCerts
from tests.support.daemon import Daemon
from tests.test_bridge import PRESS, T0, press_frame, wait_rows

pytestmark = pytest.mark.integration


def press_map(codec_part: str) -> str:
    return f"devices:\n  - dev_eui: {PRESS}\n    sensor_id: press-03-clamp\n{codec_part}"


def send_press(local: Mosquitto, numbers: range) -> None:
    with publishing(local) as send:
        for n in numbers:
            event = uplink_event(PRESS, press_frame(n), f_cnt=n, time_ms=T0 + n * 1000, dedup_id=f"p-{n}")
            send(topic(PRESS), encode(event, "json"))


def test_an_override_that_never_matches_is_flagged_once_in_the_log_and_status(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """`CCl` (letter l) for `CC1`: after 20 uplinks that decode but never produce it, one warning
    names the override, the metrics seen and the map's FILE:LINE, and `status` shows the same."""
    typo = "    codec: osm-v2\n    metrics:\n      CCl: {name: spindle_current, scale: 0.001, unit: A}\n"
    daemon = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, press_map(typo))
    daemons.append(daemon)
    daemon.start()
    send_press(local_broker, range(1, 26))
    daemon.wait_log("metric override never matched")
    log = daemon.log_path.read_text()
    assert log.count("metric override never matched") == 1
    assert '"metrics_seen": "CC1"' in log and "site.yaml:2:5" in log
    report = daemon.wait_status(lambda s: any(d["note"] for d in s["devices"]), timeout=30)
    (note,) = [d["note"] for d in report["devices"] if d["note"]]
    assert note.startswith("override CCl never matched; metrics seen: CC1")


def test_dead_letters_of_a_device_fixed_by_a_reload_are_decoded_again(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """A device mapped with the wrong codec makes dead letters, each logged with its device and
    reason; once its entry is fixed and the maps reloaded, those dead letters decode, their
    readings reach the cloud with their original times, and they leave the dead-letter store;
    the reload's log line says how many."""
    wrong = "    codec: packed-samples\n    options: {ports: {1: {metric: current}}}\n"
    daemon = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, press_map(wrong))
    daemons.append(daemon)
    daemon.start()
    send_press(local_broker, range(1, 6))
    daemon.wait_status(lambda s: s["dead_letters"]["total"] == 5)
    daemon.wait_log('"event": "dead letter"')  # journalctl says which device and why, without status
    assert '"sensor_id": "press-03-clamp"' in daemon.log_path.read_text()
    (daemon.workdir / "devices" / "site.yaml").write_text(press_map("    codec: osm-v2\n"))
    daemon.reload()
    expected = {("acme", "press-03-clamp", T0 + n * 1000, "CC1", 12000 + n, "mA") for n in range(1, 6)}
    wait_rows(reader, expected)
    daemon.wait_log('"dead_letters_decoded_again": 5')
    report = daemon.wait_status(lambda s: s["devices"] and s["devices"][0]["dead_letters"] == 0)
    letters = report["dead_letters"]
    assert (letters["kept"], letters["kept_bytes"], letters["decoded_again"], letters["latest"]) == (0, 0, 5, [])


def test_status_works_while_a_map_is_broken_and_a_reload_says_what_it_does_not_apply(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """A device map broken on disk does not stop `status` (it needs gateway.yaml only); a SIGHUP
    after gateway.yaml changed says that a reload applies device maps only, and after it broke,
    that the next start will refuse it."""
    daemon = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, press_map("    codec: osm-v2\n"))
    daemons.append(daemon)
    daemon.start()
    (daemon.workdir / "devices" / "site.yaml").write_text("devices:\n\t- broken\n")
    assert daemon.status()["daemon"]["running"]
    config = daemon.config.read_text()
    daemon.config.write_text(config.replace("max_delay: 200ms", "max_delay: 300ms"))
    daemon.reload()
    daemon.wait_log("gateway.yaml changed: a reload applies device maps only")
    daemon.config.write_text(config + "\tnot: yaml\n")
    daemon.reload()
    daemon.wait_log("the next start will refuse it")
