"""`hub-gateway demo` as someone trying the project sees it: readable progress, the real
pipeline through its own Mosquitto, the device map's names in the batches, a clean Ctrl-C."""

from __future__ import annotations

import functools
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway import wire
from gateway.demo import PROGRESS_HEADER, ProgressGrid, progress_row

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"\s*\d+:\d\d(:\d\d)?(\s+\d+){5}")
BROKER_LINE = re.compile(r"its own Mosquitto \(pid (\d+)\) on 127\.0\.0\.1:(\d+)")


@dataclass
class DemoProcess:
    """A `hub-gateway demo` subprocess whose stdout (a pipe) is read line by line as it comes."""

    process: subprocess.Popen[bytes]
    out: Path
    tmpdir: Path
    lines: list[tuple[float, str]] = field(default_factory=list)  # (monotonic arrival, raw line)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None
    stderr: str = ""

    @classmethod
    def start(cls, work: Path, *args: str, code: str | None = None) -> DemoProcess:
        """`python -m gateway demo ARGS --out WORK/out`, or `python -c CODE WORK/out`."""
        tmpdir = work / "tmp"  # the demo's Mosquitto directory goes here (TMPDIR)
        tmpdir.mkdir(parents=True)
        out = work / "out"
        command = (
            [sys.executable, "-c", code, str(out)]
            if code
            else [sys.executable, "-m", "gateway", "demo", *args, "--out", str(out)]
        )
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmpdir)),
        )
        demo = cls(process, out, tmpdir)
        demo._reader = threading.Thread(target=demo._read, daemon=True)
        demo._reader.start()
        return demo

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in iter(self.process.stdout.readline, b""):
            with self._changed:
                self.lines.append((time.monotonic(), raw.decode()))
                self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str], count: int = 1, timeout: float = 15.0) -> list[re.Match[str]]:
        """The first `count` lines matching `pattern`, waiting for them to be printed."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for _, line in self.lines if (m := pattern.search(line))]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(f"demo never printed {pattern.pattern!r}:\n{self.text()}")
                self._changed.wait(min(remaining, 0.2))

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the demo to exit; its exit code."""
        code = self.process.wait(timeout)
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read().decode()
        assert self._reader is not None
        self._reader.join(5)  # it ends at the pipe's end, after the last line
        return code

    def close(self) -> None:
        """Make sure the demo is gone: SIGTERM first, so it still stops its Mosquitto."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def text(self) -> str:
        """Everything printed so far."""
        return "".join(line for _, line in self.lines)

    def rows(self) -> list[tuple[float, str]]:
        """Progress rows with their arrival times."""
        return [(t, line) for t, line in self.lines if ROW.fullmatch(line.rstrip("\n"))]

    def series(self) -> list[dict[str, Any]]:
        """Every series of every batch file the demo wrote."""
        files = sorted((self.out / "outbox").glob("*.json.gz"))
        assert files, self.text()
        return [s for f in files for s in wire.decode_message(f.read_bytes())["series"]]


class BrokerTap:
    """A paho client subscribed to everything on the demo's broker: proof the traffic crosses it."""

    def __init__(self, port: int) -> None:
        self.topics: list[str] = []
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-demo-tap", protocol=mqtt.MQTTv5)
        self._client.on_connect = lambda client, *_: client.subscribe("#", qos=0)
        self._client.on_message = lambda _client, _userdata, message: self.topics.append(message.topic)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@dataclass
class MqttRun:
    """One finished demo run through Mosquitto, and what crossed its broker."""

    demo: DemoProcess
    code: int
    elapsed: float
    broker_pid: int | None  # None: the demo did not say it runs its own Mosquitto
    topics: list[str]  # what the test saw cross that broker


@pytest.fixture(scope="module")
def mqtt_run(tmp_path_factory: pytest.TempPathFactory, mosquitto_executable: str) -> Iterator[MqttRun]:
    """One `demo --minutes 0.1` with stdout a pipe and Mosquitto installed, watched on its broker."""
    started = time.monotonic()
    demo = DemoProcess.start(tmp_path_factory.mktemp("demo"), "--minutes", "0.1")
    try:
        demo.wait_for(re.compile(r"Ctrl-C to stop"))  # the broker, if any, is up by then
        match = BROKER_LINE.search(demo.text())
        tap = BrokerTap(int(match.group(2))) if match else None
        try:
            code = demo.finish()
        finally:
            if tap is not None:
                tap.close()
        broker_pid = int(match.group(1)) if match else None
        yield MqttRun(demo, code, time.monotonic() - started, broker_pid, tap.topics if tap else [])
    finally:
        demo.close()


@pytest.mark.integration
def test_progress_is_plain_lines_of_at_most_80_columns_as_the_run_goes(mqtt_run: MqttRun) -> None:
    """Through a pipe, progress is newline-terminated rows within 80 columns, their clocks rising.

    When rows are due is `ProgressGrid`'s, pinned without a wall clock below: on a loaded
    machine the main loop may turn late, and this test must not depend on it.
    """
    demo = mqtt_run.demo
    assert mqtt_run.code == 0, demo.stderr
    text = demo.text()
    assert "\r" not in text
    assert all(line.endswith("\n") for _, line in demo.lines)
    assert PROGRESS_HEADER + "\n" in text
    # Lines naming the --out directory are as long as the path; every other line fits.
    too_wide = [line for _, line in demo.lines if len(line.rstrip("\n")) > 80 and str(demo.out) not in line]
    assert not too_wide, text
    rows = demo.rows()
    assert len(rows) >= 5, text
    seconds = [functools.reduce(lambda a, b: a * 60 + int(b), line.split()[0].split(":"), 0) for _, line in rows]
    assert all(a < b for a, b in itertools.pairwise(seconds)), text


@pytest.mark.integration
def test_batches_use_the_demo_maps_names_and_units(mqtt_run: MqttRun) -> None:
    """The demo's device map renames, scales and labels metrics: the batches carry no firmware names."""
    series = mqtt_run.demo.series()
    units = {s["metric"]: s.get("unit") for s in series}
    assert units["current"] == "A" and units["temperature"] == "degC" and units["pm2_5"] == "ug/m3"
    assert {"TEMP", "PM25", "CC1", "HUMI"}.isdisjoint(units)
    currents = [v for s in series if s["metric"] == "current" for v in s["v"]]
    assert 0 < max(currents) < 100  # amperes, not the clamps' milliamperes


@pytest.mark.integration
def test_demo_runs_through_its_own_mosquitto(mqtt_run: MqttRun) -> None:
    """With Mosquitto installed the site publishes ChirpStack and OSM JSON to the demo's own broker,
    the daemon's sources take them from it, and the broker and its files are gone at exit."""
    demo = mqtt_run.demo
    assert mqtt_run.broker_pid is not None, demo.text()
    assert any(re.fullmatch(r"application/[-0-9a-f]+/device/[0-9a-f]{16}/event/up", t) for t in mqtt_run.topics)
    assert any(re.fullmatch(r"osm/[0-9A-F]{8}/measurements", t) for t in mqtt_run.topics)
    series = demo.series()
    clamp = next(s for s in series if s["sensor_id"] == "machine-01-clamp")
    assert clamp["meta"]["dev_eui"] == "70b3d57ed0010000" and clamp["meta"]["f_cnt"] >= 1
    assert any("osm_id" in s["meta"] for s in series)  # a Wi-Fi unit, through the osm-mqtt source
    assert _gone(mqtt_run.broker_pid)
    assert list(demo.tmpdir.iterdir()) == []
    assert mqtt_run.elapsed < 20


@pytest.mark.integration
def test_demo_stops_cleanly_on_sigint(tmp_path: Path, mosquitto_executable: str) -> None:
    """Ctrl-C (SIGINT) stops the demo with exit 0, its Mosquitto stopped and its directory removed."""
    demo = DemoProcess.start(tmp_path)
    try:
        (match,) = demo.wait_for(BROKER_LINE)
        demo.wait_for(ROW, count=2)
        demo.process.send_signal(signal.SIGINT)
        assert demo.finish(timeout=10) == 0, demo.stderr
    finally:
        demo.close()
    assert _gone(int(match.group(1)))
    assert list(demo.tmpdir.iterdir()) == []
    assert "stopped after" in demo.text() and "Traceback" not in demo.stderr


@pytest.mark.integration
def test_demo_without_mosquitto_feeds_intake_directly(tmp_path: Path) -> None:
    """Without Mosquitto the demo says so and feeds the intake directly, with the same device map."""
    code = (
        "import sys; from pathlib import Path; from gateway.demo import run_demo; "
        "sys.exit(run_demo(0.05, Path(sys.argv[1]), mosquitto=None))"
    )
    demo = DemoProcess.start(tmp_path, code=code)
    assert demo.finish() == 0, demo.stderr
    assert "mosquitto not found: feeding intake directly" in demo.text()
    assert "its own Mosquitto" not in demo.text()
    metrics = {s["metric"] for s in demo.series()}
    assert {"current", "temperature"} <= metrics and "TEMP" not in metrics


def test_progress_rows_fall_on_a_one_second_grid_without_drift_or_bursts() -> None:
    """A row for every second the loop is on time; after a late turn, one row for now, never a burst."""
    grid = ProgressGrid(1.0)
    turns = [i * 0.1 + 0.03 for i in range(100)]  # ten turns a second for 10 s, a little off the grid
    shown = [t for t in turns if grid.due(t)]
    assert [int(t) for t in shown] == list(range(1, 10))  # one row a second, each in its own second
    assert not grid.due(9.99)
    assert grid.due(14.2)  # the loop was stuck for 4 s: one row now...
    assert not grid.due(14.3)  # ...not the four it missed
    assert grid.due(15.0)  # and the grid is where it was: no drift from the late turn


def test_progress_rows_fit_80_columns_for_any_demo() -> None:
    """The progress header and a row of a week-long demo's counts fit an 80-column console."""
    assert len(PROGRESS_HEADER) <= 80
    row = progress_row(7 * 86400, 99_999_999, 999_999_999, 9_999_999, 99_999_999, 9_999_999)
    assert len(row) <= 80 and row.split() == ["168:00:00", "99999999", "999999999", "9999999", "99999999", "9999999"]
