"""`status` per device and for all devices, read from a buffer file as a daemon leaves it: every
mapped device listed with a verdict, `status DEVICE` diagnosing one, and a broken map on disk
answered with the devices the running daemon uses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gateway.batching import to_record
from gateway.buffer import Buffer, now_ms, view
from gateway.cli import main
from gateway.model import (
    DeadLetter,
    DecodedUplink,
    DeviceKey,
    DeviceLog,
    ForeignTenant,
    Reading,
    Unmapped,
    Uplink,
)
from gateway.status import _clock, edit_distance, format_device
from tests.support.site import directory_site

MAP = """\
devices:
  - dev_eui: 70b3d57ed0001234
    sensor_id: press
    codec: osm-v2
  - dev_eui: 70b3d57ed0005678
    sensor_id: lathe
    codec: osm-v2
  - dev_eui: 70b3d57ed0009999
    sensor_id: fresh
    codec: osm-v2
  - dev_eui: 70b3d57ed000aaaa
    sensor_id: broken-codec
    codec: osm-v2
  - dev_eui: 70b3d57ed000bbbb
    sensor_id: neighbour
    codec: osm-v2
  - dev_eui: 70b3d57ed000cccc
    sensor_id: rejoined
    codec: osm-v2
  - osm_id: 0A1B2C3D
    sensor_id: quiet
    codec: osm-json
"""
MINUTE = 60_000


def key(ident: str) -> DeviceKey:
    return DeviceKey("osm_id" if len(ident) == 8 else "dev_eui", ident)


def uplink(ident: str, sensor: str, t: int, n: int, metric: str = "CC1") -> DecodedUplink:
    return DecodedUplink(f"c/{ident}/{n}", sensor, key(ident), t, {}, (Reading(metric, n, "mA", t),))


def site(tmp_path: Path) -> Path:
    """A site whose buffer holds one device of each kind of trouble, heartbeat written."""
    cfg = directory_site(tmp_path)
    (tmp_path / "devices" / "a.yaml").write_text(MAP)
    b = Buffer(tmp_path / "buffer.db")
    start = now_ms() - 30 * MINUTE
    b.note_state("started_ms", start)
    late = [to_record(uplink("70b3d57ed0005678", "lathe", start + i * MINUTE, i)) for i in range(5)]
    now = now_ms()
    fresh = [to_record(uplink("70b3d57ed0009999", "fresh", now - (5 - i) * 1000, i)) for i in range(5)]
    other = Uplink("c/n", key("70b3d57ed000bbbb"), b"\x01", now, now, network_tenant="x")
    b.store(
        [
            *late,
            *fresh,
            Unmapped(Uplink("c/stray", key("70b3d57ed0001243"), b"\x01", now, now)),
            DeadLetter(
                key("70b3d57ed000aaaa"), "c/bad", 1, "osm-v2: truncated record CC1", b"\x02", now, "broken-codec"
            ),
            ForeignTenant(other, "neighbour", "11111111-1111-1111-1111-111111111111"),
            to_record(uplink("70b3d57ed000cccc", "rejoined", now - 10 * MINUTE, 1)),
            DeviceLog(key("70b3d57ed000cccc"), "UPLINK_F_CNT_RESET", "ERROR", "frame-counter reset", now),
        ]
    )
    b.heartbeat()
    b.close()
    return cfg


def test_status_lists_every_mapped_device_with_a_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """All mapped devices appear, heard or not, each with its verdict; an unmapped device heard is
    listed too; the near-miss names the unmapped id heard and the mapped one it is near, on both
    lines (an engineer may ask by the id on the label or by the sensor_id in the map)."""
    cfg = site(tmp_path)
    assert main(["status", "--json", "-c", str(cfg)]) == 0
    table = {e["id"]: e for e in json.loads(capsys.readouterr().out)["device_table"]}
    assert table["70b3d57ed0001234"]["verdict"] == (
        "unmapped dev_eui 70b3d57ed0001243 was heard: two neighbouring digits swapped from this device's "
        "70b3d57ed0001234"
    )
    assert table["70b3d57ed0005678"]["verdict"] == "late: last seen 26 min ago, usually every 60 s"
    assert table["70b3d57ed0009999"]["verdict"] == "ok"
    assert table["70b3d57ed000aaaa"]["verdict"] == "decode errors"
    assert table["70b3d57ed000bbbb"]["verdict"] == "other tenant"
    assert table["70b3d57ed000cccc"]["verdict"] == "frame-counter reset"
    assert table["0A1B2C3D"]["verdict"].startswith("never heard since ")
    assert table["70b3d57ed0001243"]["verdict"] == (
        "heard but in no map: two neighbouring digits swapped from 70b3d57ed0001234 (press), never heard"
    )
    assert not table["70b3d57ed0001243"]["mapped"]
    assert main(["status", "-c", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "cloud link:    unknown" in text
    assert sum(1 for line in text.splitlines() if line.startswith("  quiet ")) == 1


def test_status_device_diagnoses_one_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`status DEVICE` by sensor_id or dev_eui (any case, with separators): where it is mapped,
    last seen and usual interval, latest value with unit and time, counts, last dead-letter reason,
    verdict."""
    cfg = site(tmp_path)
    assert main(["status", "lathe", "-c", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"lathe (dev_eui 70b3d57ed0005678): mapped at {tmp_path / 'devices' / 'a.yaml'}:5:5")
    assert "usually every 60 s" in text and "CC1           4 mA  at " in text
    assert "5 uplinks, 5 readings, 0 dead letters" in text and "verdict:      late: last seen 26 min" in text
    assert main(["status", "70-B3-D5-7E-D0-00-AA-AA", "-c", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "last dead letter: osm-v2: truncated record CC1" in text and "verdict:      decode errors" in text


def test_status_of_an_unknown_device_exits_1_with_a_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A device in no map and never heard: exit 1, and the known id one digit from it is suggested."""
    cfg = site(tmp_path)
    assert main(["status", "70b3d57ed0005679", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "unknown device '70b3d57ed0005679'" in err and "did you mean 70b3d57ed0005678?" in err


def test_a_broken_map_shows_the_devices_the_daemon_runs_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a device map broken on disk, `status` names the problem and lists the devices the daemon
    recorded that it runs with, instead of hiding them."""
    cfg = directory_site(tmp_path)
    (tmp_path / "devices" / "a.yaml").write_text("devices:\n\t- broken\n")
    b = Buffer(tmp_path / "buffer.db")
    running = [{"device": "dev_eui:70b3d57ed0001234", "sensor_id": "press", "codec": "osm-v2", "where": "a.yaml:2:5"}]
    b.note_state("devices", running)
    b.heartbeat()
    b.close()
    assert main(["status", "-c", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert f"DEVICE MAP BROKEN: {tmp_path / 'devices' / 'a.yaml'}:2:" in text
    assert "the devices below are those the running daemon uses" in text
    assert any(line.startswith("  press ") for line in text.splitlines())


def test_latest_values_and_notes_reach_the_file_only_with_the_heartbeat(tmp_path: Path) -> None:
    """A store does not write a device's latest values or the daemon's notes: the heartbeat does
    (flash writes); at most side.LATEST_METRICS_KEPT metrics are kept per device, newest first."""
    b = Buffer(tmp_path / "buffer.db")
    t = now_ms()
    many = tuple(Reading(f"m{i:02d}", i, "V", t + i) for i in range(40))
    b.store([to_record(DecodedUplink("c/1", "s", key("70b3d57ed0001234"), t, {}, many))])
    b.note_state("cloud", {"connected": True, "since_ms": t, "last_error": None})
    assert view.read(b.path)["devices"] == [] and view.read(b.path)["cloud"] is None
    b.heartbeat()
    report = view.read(b.path)
    (device,) = report["devices"]
    latest = device["latest"]
    assert len(latest) == 32 and latest["m39"] == [39, "V", t + 39] and "m07" not in latest
    assert report["cloud"]["connected"] is True
    b.close()


def test_edit_distance_counts_a_swap_as_one_edit() -> None:
    """Near-miss ids: a swap of neighbours is one edit, as are an insertion, a deletion, a change."""
    assert edit_distance("1234", "1243") == 1
    assert edit_distance("1234", "1235") == 1
    assert edit_distance("1234", "12345") == 1
    assert edit_distance("1234", "2143") == 2
    assert edit_distance("abcd", "wxyz") == 4


def test_a_metric_name_longer_than_its_column_is_kept_apart_from_its_value() -> None:
    """`status DEVICE` lists the latest values in a column; a name longer than the column (a
    renamed metric such as spindle_current) still has a space before its value."""
    entry = {
        "sensor_id": "press-07-clamp",
        "kind": "dev_eui",
        "id": "70b3d57ed0003e91",
        "mapped": True,
        "where": "devices/a.yaml:2:5",
        "codec": "osm-v2",
        "last_seen_ms": now_ms(),
        "interval_ms": 10_000,
        "latest": {"spindle_current": [12.096, "A", now_ms()], "CC1": [4, "mA", now_ms()]},
        "uplinks": 1,
        "readings": 1,
        "dead_letters": 0,
        "log_events": 0,
        "foreign_tenant": 0,
        "last_dead_letter": None,
        "last_log": None,
        "verdict": "ok",
    }
    lines = format_device(entry, {}).splitlines()
    assert any(line.startswith("  spindle_current 12.096 A  at ") for line in lines), lines
    assert any(line.startswith("  CC1           4 mA  at ") for line in lines), lines


def test_a_device_mapped_on_disk_but_not_reloaded_is_not_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Commissioning: a new device was heard while in no map, then added to the map on disk. Until
    the running daemon reloads, `status` must not call it "ok" (its uplinks are still kept as
    unmapped): it says to reload; once the daemon runs with the new map it says no uplink of it has
    been decoded yet, until one is."""
    cfg = directory_site(tmp_path)
    (tmp_path / "devices" / "a.yaml").write_text(
        "devices:\n  - {dev_eui: 70b3d57ed0003e91, sensor_id: new, codec: osm-v2}\n"
        "  - {dev_eui: 70b3d57ed0003e00, sensor_id: unpowered, codec: osm-v2}\n"
    )
    b = Buffer(tmp_path / "buffer.db")
    now = now_ms()
    b.note_state("started_ms", now - 10 * MINUTE)
    b.note_state("devices", [])  # the daemon runs with the map before the edit
    b.store([Unmapped(Uplink("c/new", key("70b3d57ed0003e91"), b"\x01", now, now))])
    b.heartbeat(pid=os.getpid())  # a running daemon: this process

    def verdicts() -> dict[str, str]:
        assert main(["status", "--json", "-c", str(cfg)]) == 0
        return {e["sensor_id"]: e["verdict"] for e in json.loads(capsys.readouterr().out)["device_table"]}

    assert verdicts() == {
        "new": "heard, but in none of the running daemon's maps: reload (systemctl reload hub-gateway)",
        "unpowered": "never heard since "
        + _clock(now - 10 * MINUTE)
        + "; the running daemon has not loaded it: reload (systemctl reload hub-gateway)",
    }
    b.note_state(
        "devices",
        [
            {"device": "dev_eui:70b3d57ed0003e91", "sensor_id": "new", "codec": "osm-v2", "where": "a.yaml:2:5"},
            {"device": "dev_eui:70b3d57ed0003e00", "sensor_id": "unpowered", "codec": "osm-v2", "where": "a.yaml:3:5"},
        ],
    )
    b.heartbeat(pid=os.getpid())
    assert verdicts()["new"] == "heard while in no map; mapped since: no uplink of it decoded yet"
    assert verdicts()["unpowered"].startswith("never heard since ") and "reload" not in verdicts()["unpowered"]
    b.store([to_record(uplink("70b3d57ed0003e91", "new", now + 1000, 1))])
    b.heartbeat(pid=os.getpid())
    assert verdicts()["new"] == "ok"
    b.close()
