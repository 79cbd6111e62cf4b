"""The command line as a field engineer uses it: status on a stopped daemon or a damaged buffer,
schema, --version and each command's help (the demo has tests/test_demo.py)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.batching import to_record
from gateway.buffer import Buffer, mark_damaged, now_ms
from gateway.cli import main
from gateway.model import DeadLetter, DecodedUplink, DeviceKey, Reading, Unmapped, Uplink
from tests.support.site import directory_site

ROOT = Path(__file__).resolve().parent.parent


def test_status_reads_a_stopped_daemons_buffer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """status reports backlog, dead letters and devices from the file alone, in text and JSON."""
    cfg = directory_site(tmp_path)
    assert main(["status", "-c", str(cfg)]) == 0
    assert "does not exist yet" in capsys.readouterr().out
    dev = DeviceKey("dev_eui", "70b3d57ed0001234")
    b = Buffer(tmp_path / "buffer.db")
    t = now_ms() - 60_000
    b.store(
        [
            to_record(
                DecodedUplink(
                    "chirpstack/1", "press", dev, t, {}, (Reading("CC1", 1, "mA", t), Reading("CC2", 2, "mA", t))
                )
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


def checked_site(where: Path) -> Path:
    """`directory_site` with one device in its map, so `check` has no warning of its own to print."""
    cfg = directory_site(where)
    device = "  - dev_eui: 70b3d57ed0001234\n    sensor_id: s\n    codec: osm-v2\n"
    (where / "devices" / "a.yaml").write_text("devices:\n" + device)
    return cfg


def _fill(path: Path) -> None:
    dev = DeviceKey("dev_eui", "70b3d57ed0001234")
    b = Buffer(path)
    t = now_ms()
    b.store(
        [
            to_record(
                DecodedUplink(
                    f"chirpstack/{i}", "press", dev, t, {}, tuple(Reading("CC1", j, "mA", t + j) for j in range(50))
                )
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
    cfg = checked_site(tmp_path)
    _fill(tmp_path / "buffer.db")
    assert main(["check", "-c", str(cfg)]) == 0
    assert "passes PRAGMA integrity_check" in capsys.readouterr().out
    data = bytearray((tmp_path / "buffer.db").read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page : page + 12] = b"\x07" * 12  # page 2, a table's root: no such page type
    (tmp_path / "buffer.db").write_bytes(bytes(data))
    assert main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"warning: {tmp_path / 'buffer.db'}: integrity_check: ")
    assert out[-2] == (
        f"warning: {tmp_path / 'buffer.db'}: damaged; `run` will move the file aside (as "
        "buffer.db.corrupt-<time>, unsent readings stay in it) and start a new buffer"
    )
    assert out[-1].startswith(f"{cfg}: OK (") and out[-1].endswith("buffer damaged: `run` will move it aside)")


def test_check_warns_of_a_mapped_id_never_heard_one_digit_from_an_id_heard_in_no_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A field engineer who types a DevEUI one digit wrong learns it from `check`, before the
    reload: the map's device was never heard, and an id one edit from it was heard in no map.
    A warning (exit 0): the map is valid, and the device may simply not have sent yet."""
    cfg = directory_site(tmp_path)
    (tmp_path / "devices" / "a.yaml").write_text(
        "devices:\n  - dev_eui: 70b3d57ed0003e97\n    sensor_id: press-07-clamp\n    codec: osm-v2\n"
        "  - dev_eui: 70b3d57ed0001234\n    sensor_id: press-03-clamp\n    codec: osm-v2\n"
    )
    b = Buffer(tmp_path / "buffer.db")
    heard = DeviceKey("dev_eui", "70b3d57ed0003e91")
    b.store([Unmapped(Uplink("chirpstack/u1", heard, b"\x01", now_ms(), now_ms()))])
    b.heartbeat()
    b.close()
    assert main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    where = f"{tmp_path / 'devices' / 'a.yaml'}:2:5"
    assert out[0] == (
        f"warning: {where}: press-07-clamp's dev_eui 70b3d57ed0003e97 was never heard, but dev_eui "
        "70b3d57ed0003e91, one digit from it, was heard in no map: a typo? (hub-gateway status 70b3d57ed0003e91)"
    )
    assert len(out) == 2 and out[1].startswith(f"{cfg}: OK (")


def test_check_passes_a_first_version_buffer_that_run_will_carry_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After an upgrade, `check` (systemd's ExecStartPre) meets the buffer in its first format,
    which `run` migrates at open: no typo hints from it, no traceback, exit 0."""
    cfg = checked_site(tmp_path)
    db = sqlite3.connect(tmp_path / "buffer.db")
    db.executescript(
        "CREATE TABLE uplinks (id INTEGER PRIMARY KEY, source TEXT NOT NULL, sensor_id TEXT NOT NULL,"
        " received_ms INTEGER NOT NULL, readings INTEGER NOT NULL, series TEXT NOT NULL);"
        "CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
    )
    db.close()
    assert main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].endswith("buffer passes PRAGMA integrity_check)")


def test_check_warns_about_the_damage_marker_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The buffer.db.damaged marker a daemon left before exiting 3 is a warning in `check`, not a failure."""
    cfg = checked_site(tmp_path)
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
    b = Buffer(tmp_path / "buffer.db")
    t = now_ms()
    reading = Reading("CC1", 1, "mA", t)
    b.store(
        [
            to_record(
                DecodedUplink(f"chirpstack/{i}", f"sensor-{i}", DeviceKey("dev_eui", f"{i:016x}"), t, {}, (reading,))
            )
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
    assert proc.wait(timeout=30) == 0  # the reader chose to stop: not an error
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_status_says_loudly_that_a_damaged_buffer_was_moved_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a damaged buffer was replaced, `status` names the moved file and why."""
    cfg = directory_site(tmp_path)
    (tmp_path / "buffer.db").write_bytes(b"\0" * 5000)
    Buffer(tmp_path / "buffer.db").close()
    assert main(["status", "-c", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "DAMAGED BUFFER moved aside" in text and "buffer.db.corrupt-" in text and "not an SQLite database" in text


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    """`hub-gateway --version` prints the installed distribution's version and exits 0."""
    assert help_of(["--version"], capsys) == f"hub-gateway {importlib.metadata.version('hub-gateway')}\n"


def test_version_falls_back_to_the_package_attribute(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from a source tree (no distribution metadata), --version prints gateway.__version__."""
    import gateway

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.setattr(gateway, "__version__", "9.8.7", raising=False)
    assert help_of(["--version"], capsys) == "hub-gateway 9.8.7\n"


def test_run_help_lists_exit_codes_and_signals(capsys: pytest.CaptureFixture[str]) -> None:
    """`run --help` says what each exit status 0-4 means (which ones systemd restarts) and what
    SIGTERM/SIGINT and SIGHUP do."""
    text = help_of(["run", "--help"], capsys)
    lines = [line.strip() for line in text.splitlines()]
    assert "0  stopped cleanly after SIGTERM or SIGINT" in lines
    assert "1  a worker thread died of an unexpected error (systemd restarts the daemon)" in lines
    assert any(line.startswith("2  configuration error, or another daemon holds the buffer") for line in lines)
    assert any(line.startswith("3  the buffer file was found damaged, or deleted and written back") for line in lines)
    assert any(line.startswith("4  the buffer cannot be written") and "(not restarted)" in line for line in lines)
    assert "SIGTERM, SIGINT  stop intake, flush what is committed, exit within 5 s" in lines
    assert any(line.startswith("SIGHUP           reload the device maps") for line in lines)


@pytest.mark.parametrize("command", ["run", "check", "status", "enroll", "schema", "demo"])
def test_every_command_help_has_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each command's --help ends with an example of the command itself, laid out as written."""
    text = help_of([command, "--help"], capsys)
    example = text.split("\nexample:\n" if "\nexample:\n" in text else "\nexamples:\n")[1]
    assert example.splitlines()[0].startswith(f"  hub-gateway {command}")


def _cli(*argv: str, stdout: object = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *argv],
        stdout=stdout,  # type: ignore[arg-type]
        stderr=subprocess.PIPE,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


@pytest.mark.parametrize("damage", ["garbage", "page-1", "directory"])
def test_status_on_an_unreadable_buffer_says_so_without_a_traceback(tmp_path: Path, damage: str) -> None:
    """`status` on a buffer that is not SQLite, has a broken page 1, or is a directory (what an
    operator may meet after an exit 3) prints what is wrong and what to do, exit 1, no traceback."""
    cfg = directory_site(tmp_path)
    path = tmp_path / "buffer.db"
    if damage == "directory":
        path.mkdir()
    else:
        _fill(path)
        with path.open("r+b") as f:
            f.seek(0 if damage == "garbage" else 100)
            f.write(b"\x07" * 64)
    out = _cli("status", "-c", str(cfg))
    assert out.returncode == 1
    assert "cannot be read" in out.stderr and "hub-gateway check" in out.stderr
    assert "Traceback" not in out.stderr


def test_output_to_a_full_disk_is_an_error_line_not_a_traceback(tmp_path: Path) -> None:
    """`hub-gateway schema > /dev/full`: one line saying the output cannot be written, exit 1."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        out = _cli("schema", stdout=full)
    assert out.returncode == 1
    assert "cannot write the output" in out.stderr and "Traceback" not in out.stderr
