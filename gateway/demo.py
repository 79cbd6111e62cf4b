"""`hub-gateway demo`: the real pipeline fed by a simulated factory site.

When Mosquitto is installed the demo starts its own on a free loopback port
(`gateway.demo_broker`); the site (`gateway.demo_site`) publishes ChirpStack v4 JSON events and
OSM JSON to it, and the daemon's own chirpstack and osm-mqtt sources subscribe, as on a
gateway. Without Mosquitto the site's messages go straight to the intake. Either way they are
parsed, mapped (the device map renames, scales and labels metrics), decoded, committed to the
buffer, batched and published to a `directory` cloud: one `hub.readings.v1` file per batch.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from gateway import log, wire
from gateway.config import Config
from gateway.config.devices import DeviceMap, MappedDevice, _entry_model
from gateway.config.settings import Settings
from gateway.demo_broker import BrokerError, DemoBroker, SitePublisher
from gateway.demo_site import (
    AIR_QUALITY_PERIOD_S,
    AIR_QUALITY_SENSORS,
    UTILISATION_SENSORS,
    SimulatedSite,
)
from gateway.errors import BufferBusyError
from gateway.service import Service
from gateway.sources import Delivery, parser_for, source_name

#: How many of the 15 air-quality units are OSM Wi-Fi units publishing JSON.
WIFI_UNITS = 5
PROGRESS_EVERY_S = 1.0
#: The device map's `metrics` for each kind of unit: names, units and scales for the cloud.
CLAMP_METRICS = {"CC1": {"name": "current", "scale": 0.001, "unit": "A"}}  # the clamps report mA
AIR_QUALITY_METRICS = {
    "TEMP": {"name": "temperature", "unit": "degC"},  # also TEMP_min, TEMP_max
    "HUMI": {"name": "humidity", "unit": "%RH"},
    "PM25": {"name": "pm2_5", "unit": "ug/m3"},
    "PM10": {"name": "pm10", "unit": "ug/m3"},
    "LGHT": {"name": "illuminance", "unit": "lx"},
    "SND": {"name": "sound_level", "unit": "dBA"},
}
#: Progress columns (title, width): 64 characters in all, for an 80-column console.
_COLUMNS = (
    ("elapsed", 8),
    ("uplinks", 10),
    ("readings", 10),
    ("batches out", 13),
    ("waiting", 9),
    ("dead letters", 14),
)
PROGRESS_HEADER = "".join(f"{name:>{width}}" for name, width in _COLUMNS)

__all__ = ["ProgressGrid", "SimulatedSite", "demo_config", "progress_row", "run_demo"]


def demo_config(out: Path, broker: DemoBroker | None = None) -> Config:
    """A gateway.yaml equivalent for the demo: its broker, directory cloud and buffer under `out`."""
    where = {"host": broker.host, "port": broker.port} if broker is not None else {}
    settings = Settings.model_validate(
        {
            "gateway": {"id": "gw-demo-01", "tenant_id": "demo", "site_id": "sim"},
            "sources": [
                {"kind": "chirpstack", "encoding": "json", "broker": where},
                {"kind": "osm-mqtt", "broker": where},
            ],
            "cloud": {"kind": "directory", "directory": str(out / "outbox")},
            "buffer": {"path": str(out / "buffer.db")},
            "batch": {"max_delay": "5s", "max_bytes": "120KiB", "compression": "gzip"},
            "log": {"level": "warning", "format": "console"},
        }
    )
    by_key = {}
    for n, device in enumerate(SimulatedSite.devices(WIFI_UNITS)):
        fields: dict[str, object] = {"sensor_id": device.sensor_id}
        if device.kind == "air-wifi":
            fields |= {"osm_id": device.device_id, "codec": "osm-json", "metrics": AIR_QUALITY_METRICS}
        else:
            fields |= {"dev_eui": device.device_id, "codec": "osm-v2"}
            if device.kind == "clamp":
                fields |= {"metrics": CLAMP_METRICS, "tags": {"machine": device.sensor_id.removesuffix("-clamp")}}
            else:
                fields["metrics"] = AIR_QUALITY_METRICS
        entry = _entry_model(str(fields["codec"])).model_validate(fields)
        by_key[entry.key] = MappedDevice(entry, "<demo>", n + 1, 1)
    return Config(path=out / "gateway.yaml", settings=settings, devices=DeviceMap(by_key))


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_row(elapsed_s: float, uplinks: int, readings: int, batches: int, waiting: int, dead: int) -> str:
    """One progress row, in the columns of `PROGRESS_HEADER` (64 characters for any demo's numbers)."""
    values = (_clock(elapsed_s), uplinks, readings, batches, waiting, dead)
    return "".join(f"{value:>{width}}" for value, (_, width) in zip(values, _COLUMNS, strict=True))


class ProgressLines:
    """Live progress: on a terminal one row rewritten in place, elsewhere a line per update."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._rows = 0

    def show(self, row: str) -> None:
        """Print the header before the first row, then the row."""
        if self._rows == 0:
            self._stream.write(PROGRESS_HEADER + "\n")
        self._stream.write(f"\r{row}" if self._tty else f"{row}\n")
        self._stream.flush()
        self._rows += 1

    def end(self) -> None:
        """Leave the terminal's last row in place."""
        if self._tty and self._rows:
            self._stream.write("\n")
        self._stream.flush()


class ProgressGrid:
    """When a progress row is due: on a fixed grid from the start, so rows never drift.

    The main loop asks on every turn. A turn that comes late (the loop was busy or the
    machine loaded) gets one row for the time it is now, not a burst of rows it missed.
    """

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._slot = 0  # the grid slot of the last row shown

    def due(self, elapsed_s: float) -> bool:
        slot = int(elapsed_s // self.every_s)
        if slot <= self._slot:
            return False
        self._slot = slot
        return True


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _series_text(series: dict[str, Any]) -> str:
    """A series as indented JSON, short values kept on one line."""
    lines = []
    for key, value in series.items():
        text = json.dumps(value, ensure_ascii=False)
        if isinstance(value, dict) and len(text) > 60:
            inner = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in value.items())
            text = "{\n" + inner + "\n  }"
        lines.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}"


def _summary(outbox: Path, stream: TextIO) -> None:
    """What was written, one series as the cloud gets it, and how to look at a whole batch."""
    files = sorted(outbox.glob("*.json.gz"))
    if not files:
        stream.write(f"no batch files in {outbox} yet: the first is written after 5 s\n")
        return
    stream.write(f"{_count(len(files), 'batch file', 'batch files')} in {outbox}\n")
    first = files[0]
    series = wire.decode_message(first.read_bytes()).get("series") or []
    if series:
        example = next((s for s in series if s.get("metric") == "temperature"), series[0])
        stream.write(f"one series of {first.name}, as the cloud receives it:\n{_series_text(example)}\n")
    stream.write(f"the whole batch:\n  zcat {shlex.quote(str(first))} | python3 -m json.tool | head -40\n")


def _start_broker(mosquitto: str | None, stream: TextIO) -> tuple[DemoBroker, SitePublisher] | None:
    """The demo's own Mosquitto and the site's client on it; None (and why) to feed the intake."""
    if mosquitto is None:
        stream.write("mosquitto not found: feeding intake directly\n")
        return None
    broker = DemoBroker(mosquitto)
    try:
        broker.start()
        publisher = SitePublisher(broker)
        publisher.start()
    except (BrokerError, OSError, subprocess.SubprocessError) as exc:
        broker.stop()
        stream.write(f"mosquitto did not start ({str(exc)[:200]}): feeding intake directly\n")
        return None
    stream.write(f"local broker: its own Mosquitto (pid {broker.pid}) on {broker.host}:{broker.port}\n")
    return broker, publisher


def run_demo(minutes: float | None, out: Path, mosquitto: str | None, stream: TextIO = sys.stdout) -> int:
    """Run until `minutes` pass or Ctrl-C, through its own Mosquitto when `mosquitto` names one."""
    # Until the service's own handlers are in place, Ctrl-C and SIGTERM only note that they came.
    early_stop = threading.Event()

    def on_early_stop(signum: int, frame: FrameType | None) -> None:
        early_stop.set()

    signal.signal(signal.SIGINT, on_early_stop)
    signal.signal(signal.SIGTERM, on_early_stop)
    stream.write(
        f"hub-gateway demo: {UTILISATION_SENSORS} current clamps (LoRaWAN, 1 Hz) and "
        f"{AIR_QUALITY_SENSORS} air-quality units\n({AIR_QUALITY_SENSORS - WIFI_UNITS} LoRaWAN, "
        f"{WIFI_UNITS} Wi-Fi, every {AIR_QUALITY_PERIOD_S} s) through the real pipeline\n"
    )
    stream.flush()
    local = _start_broker(mosquitto, stream)
    try:
        return _run_site(minutes, out, local, early_stop, stream)
    finally:
        if local is not None:
            broker, publisher = local
            publisher.stop()
            broker.stop()
        stream.flush()


def _run_site(
    minutes: float | None,
    out: Path,
    local: tuple[DemoBroker, SitePublisher] | None,
    early_stop: threading.Event,
    stream: TextIO,
) -> int:
    """The daemon with the site feeding it, until stopped; then what it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    config = demo_config(out, local[0] if local is not None else None)
    log.configure(config.settings.log.level, config.settings.log.format)
    try:
        # Through the broker the daemon builds its real sources; directly, none, and each of
        # the site's messages is parsed as the source it names would parse it.
        service = Service(config) if local is not None else Service(config, sources=[])
    except BufferBusyError as exc:
        stream.write(f"hub-gateway demo: {exc}\n")
        return 2
    deliver: Callable[[Delivery], None]
    if local is not None:
        deliver = local[1].send
    else:
        for i, source in enumerate(config.settings.sources):
            service.intake.add_parser(source_name(config.settings, i), parser_for(source), source.max_message_size)
        deliver = service.intake.deliver
    site = SimulatedSite(deliver, wifi_units=WIFI_UNITS)
    stream.write(f"batches: {out / 'outbox'}  (Ctrl-C to stop)\n")
    service.install_signal_handlers()
    if early_stop.is_set():
        service.request_stop()
    lines = ProgressLines(stream)
    grid = ProgressGrid(PROGRESS_EVERY_S)
    started: float | None = None

    def progress(svc: Service) -> None:
        # Called from the main loop, so only once the sources are subscribed: the site starts
        # then, and nothing it publishes goes to a broker with no subscriber yet.
        nonlocal started
        now = time.monotonic()
        if started is None:
            started = now
            site.start()
            return
        elapsed = now - started
        if grid.due(elapsed):
            stats = svc.intake.stats
            waiting = svc.buffer.depth().total_readings
            lines.show(
                progress_row(elapsed, stats.uplinks, stats.readings, svc.published_batches, waiting, stats.dead_letters)
            )
        if minutes is not None and elapsed >= minutes * 60:
            svc.request_stop()

    try:
        service.run(progress=progress)
    finally:
        site.stop()
        lines.end()
    stats = service.intake.stats
    ran = _clock(time.monotonic() - started) if started is not None else "0:00"
    stream.write(
        f"stopped after {ran}: {stats.uplinks} uplinks, {stats.readings} readings, "
        f"{_count(service.published_batches, 'batch', 'batches')} out\n"
    )
    _summary(out / "outbox", stream)
    return service.exit_code
