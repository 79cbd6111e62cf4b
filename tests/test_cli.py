"""The command line as a field engineer uses it: demo, status on a stopped daemon, schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import wire
from gateway.buffer import Buffer, mark_damaged, now_ms
from gateway.cli import main
from gateway.model import DeadLetter, DecodedUplink, DeviceKey, Reading
from tests.support.site import directory_site

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_demo_runs_the_simulated_site_into_batch_files(tmp_path: Path) -> None:
    """`hub-gateway demo --minutes` publishes the 60 simulated sensors as hub.readings.v1 files and exits 0."""
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--minutes", "0.12", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "outbox").glob("*.json.gz"))
    assert files, out.stdout
    sensors = set()
    for f in files:
        for row in wire.expand_rows(wire.decode_message(f.read_bytes())):
            sensors.add(row["sensor_id"])
    assert {f"machine-{i:02d}-clamp" for i in range(1, 46)} <= sensors  # every 1 Hz sensor
    assert any(s.startswith("air-") for s in sensors)  # air sensors report staggered over 30 s
    assert "batch files" in out.stdout


def test_status_reads_a_stopped_daemons_buffer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """status reports backlog, dead letters and devices from the file alone, in text and JSON."""
    cfg = directory_site(tmp_path)
    assert main(["status", "-c", str(cfg)]) == 0
    assert "does not exist yet" in capsys.readouterr().out
    dev = DeviceKey("dev_eui", "70b3d57ed0001234")
    b = Buffer(tmp_path / "buffer.db", "gw-t-01", "acme", "leeds")
    t = now_ms() - 60_000
    b.store(
        [
            DecodedUplink(
                "chirpstack/1", "press", dev, t, {}, (Reading("CC1", 1, "mA", t), Reading("CC2", 2, "mA", t))
            ),
            DeadLetter(dev, "chirpstack/2", 1, "osm-v2: truncated", b"\x02", t, "press"),
        ]
    )
    b.close()
    assert main(["status", "--json", "-c", str(cfg)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["daemon"]["running"] is False
    assert report["backlog"]["readings"] == 2 and 59 <= report["backlog"]["oldest_unsent_age_s"] < 120
    assert report["dead_letters"]["latest"][0]["payload_hex"] == "02"
    assert report["devices"][0]["sensor_id"] == "press" and report["devices"][0]["dead_letters"] == 1
    assert main(["status", "-c", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "backlog:       2 readings" in text and "osm-v2: truncated" in text


def test_schema_prints_both_schemas(capsys: pytest.CaptureFixture[str]) -> None:
    """`hub-gateway schema` prints JSON Schemas that reject unknown keys."""
    assert main(["schema"]) == 0
    schemas = json.loads(capsys.readouterr().out)
    assert set(schemas) == {"gateway", "devices"}
    assert schemas["gateway"]["additionalProperties"] is False


def _fill(path: Path) -> None:
    dev = DeviceKey("dev_eui", "70b3d57ed0001234")
    b = Buffer(path, "gw-t-01", "acme", "leeds")
    t = now_ms()
    b.store(
        [
            DecodedUplink(
                f"chirpstack/{i}", "press", dev, t, {}, tuple(Reading("CC1", j, "mA", t + j) for j in range(50))
            )
            for i in range(100)
        ]
    )
    b.close()


def test_check_reports_buffer_damage_as_a_warning_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` passes a sound buffer; for a damaged one it prints what SQLite found as warnings that
    say `run` will move the file aside, and still exits 0 (systemd's ExecStartPre must not block that)."""
    cfg = directory_site(tmp_path)
    _fill(tmp_path / "buffer.db")
    assert main(["check", "-c", str(cfg)]) == 0
    assert "passes PRAGMA integrity_check" in capsys.readouterr().out
    data = bytearray((tmp_path / "buffer.db").read_bytes())
    data[4096:4108] = b"\x07" * 12  # the root page of the uplinks table: no such page type
    (tmp_path / "buffer.db").write_bytes(bytes(data))
    assert main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"warning: {tmp_path / 'buffer.db'}: integrity_check: ")
    assert out[-2] == (
        f"warning: {tmp_path / 'buffer.db'}: damaged; `run` will move the file aside (as "
        "buffer.db.corrupt-<time>, unsent readings stay in it) and start a new buffer"
    )
    assert out[-1].startswith(f"{cfg}: OK (") and out[-1].endswith("buffer damaged: `run` will move it aside)")


def test_check_warns_about_the_damage_marker_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The buffer.db.damaged marker a daemon left before exiting 3 is a warning in `check`, not a failure."""
    cfg = directory_site(tmp_path)
    _fill(tmp_path / "buffer.db")
    mark_damaged(tmp_path / "buffer.db", "database disk image is malformed")
    assert main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"warning: {tmp_path / 'buffer.db'}: the daemon found this file damaged (database disk image is malformed)"
    )
    assert "`run` will move the file aside" in out[1] and "OK" in out[2]


def test_status_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`hub-gateway status --json | head -1`: the reader goes away early; no BrokenPipeError traceback."""
    cfg = directory_site(tmp_path)
    b = Buffer(tmp_path / "buffer.db", "gw-t-01", "acme", "leeds")
    t = now_ms()
    reading = Reading("CC1", 1, "mA", t)
    b.store(
        [
            DecodedUplink(f"chirpstack/{i}", f"sensor-{i}", DeviceKey("dev_eui", f"{i:016x}"), t, {}, (reading,))
            for i in range(3000)
        ]
    )
    b.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "status", "--json", "-c", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"{\n"
    proc.stdout.close()  # as `head -1` does: far more than a pipe's 64 KiB is still unwritten
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_status_says_loudly_that_a_damaged_buffer_was_moved_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a damaged buffer was replaced, `status` names the moved file and why."""
    cfg = directory_site(tmp_path)
    (tmp_path / "buffer.db").write_bytes(b"\0" * 5000)
    Buffer(tmp_path / "buffer.db", "gw-t-01", "acme", "leeds").close()
    assert main(["status", "-c", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "DAMAGED BUFFER moved aside" in text and "buffer.db.corrupt-" in text and "not an SQLite database" in text
