"""`hub-gateway demo`: the real pipeline fed by a simulated factory site.

The site: 45 machine-utilisation sensors (OSM current clamps, one `osm-v2` uplink a second
each) and 15 OSM air-quality units (averaged temperature, humidity, particulates, light and
sound every 30 s). Their uplinks are ChirpStack v4 JSON events built with chirpstack-api's own
message types, handed to the same intake, codecs, buffer and batching as `run`, and published
to a `directory` cloud: one `hub.readings.v1` file per batch.
"""

from __future__ import annotations

import math
import random
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from chirpstack_api.integration import integration_pb2
from google.protobuf import json_format

from gateway import log
from gateway.buffer import now_ms
from gateway.config import Config
from gateway.config.devices import DeviceMap, MappedDevice, _entry_model
from gateway.config.settings import Settings
from gateway.model import DeviceKey
from gateway.sources import Delivery, parser_for

UTILISATION_SENSORS = 45
AIR_QUALITY_SENSORS = 15
AIR_QUALITY_PERIOD_S = 30
SOURCE = "chirpstack-sim"


def _value(v: float | int) -> bytes:
    """One osm-v2 value: whole numbers as the smallest unsigned type, others as thousandths."""
    if isinstance(v, int) and 0 < v < 2**16:
        return b"\x02" + struct.pack("<H", v) if v > 0xFF else b"\x01" + struct.pack("<B", v)
    return b"\x15" + struct.pack("<i", int(v * 1000))


def _record(name: str, *values: float | int) -> bytes:
    kind = b"\x01" if len(values) == 1 else b"\x02"
    return name.encode().ljust(4, b"\x00") + kind + b"".join(_value(v) for v in values)


class SimulatedSite:
    """A thread publishing the site's uplinks as ChirpStack JSON events, in real time."""

    name = SOURCE

    def __init__(self, deliver: Callable[[Delivery], None], seed: int = 7) -> None:
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulated-site", daemon=True)
        self._rng = random.Random(seed)
        self._f_cnt: dict[str, int] = {}
        self.app_id = str(uuid.UUID(int=self._rng.getrandbits(128)))

    @staticmethod
    def devices() -> list[tuple[str, str, str]]:
        """(dev_eui, sensor_id, kind) of every simulated device."""
        out = [(f"70b3d57ed001{i:04x}", f"machine-{i + 1:02d}-clamp", "util") for i in range(UTILISATION_SENSORS)]
        out += [(f"70b3d57ed002{i:04x}", f"air-{i + 1:02d}", "aq") for i in range(AIR_QUALITY_SENSORS)]
        return out

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def wait_ready(self, timeout_s: float) -> bool:
        return True

    def _event(self, dev_eui: str, payload: bytes) -> tuple[str, bytes]:
        ev = integration_pb2.UplinkEvent(deduplication_id=str(uuid.UUID(int=self._rng.getrandbits(128))))
        ev.time.FromMilliseconds(now_ms())
        ev.device_info.dev_eui = dev_eui
        ev.device_info.application_id = self.app_id
        ev.device_info.tenant_id = "52f14cd4-c6f1-4fbd-8f87-4025e1d49242"
        self._f_cnt[dev_eui] = self._f_cnt.get(dev_eui, 0) + 1
        ev.f_cnt = self._f_cnt[dev_eui]
        ev.f_port = 1
        ev.data = payload
        rx = ev.rx_info.add()
        rx.gateway_id = "0016c001ff10a235"
        rx.rssi = self._rng.randint(-110, -60)
        rx.snr = round(self._rng.uniform(-5, 10), 1)
        topic = f"application/{self.app_id}/device/{dev_eui}/event/up"
        return topic, json_format.MessageToJson(ev, indent=None).encode()

    def _run(self) -> None:
        devices = self.devices()
        tick = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            t = time.time()
            for i, (dev_eui, _, kind) in enumerate(devices):
                if kind == "util":
                    running = math.sin(t / 60 + i) > -0.3
                    current = int(self._rng.gauss(12000 if running else 150, 400 if running else 30))
                    payload = b"\x02" + _record("CC1", max(1, current))
                elif (tick + i) % AIR_QUALITY_PERIOD_S == 0:
                    temp = 19 + 3 * math.sin(t / 3600 + i)
                    payload = b"\x02" + b"".join(
                        (
                            _record("TEMP", round(temp, 3), round(temp - 0.4, 3), round(temp + 0.3, 3)),
                            _record("HUMI", round(45 + self._rng.uniform(-3, 3), 3)),
                            _record("PM25", self._rng.randint(3, 40)),
                            _record("PM10", self._rng.randint(5, 60)),
                            _record("LGHT", self._rng.randint(200, 900)),
                            _record("SND", round(self._rng.uniform(60, 85), 3)),
                        )
                    )
                else:
                    continue
                topic, body = self._event(dev_eui, payload)
                self._deliver(Delivery(SOURCE, topic, body, now_ms(), lambda: None))
            tick += 1
            next_at += 1.0
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def demo_config(out: Path) -> Config:
    """A gateway.yaml equivalent for the demo: directory cloud and buffer under `out`."""
    settings = Settings.model_validate(
        {
            "gateway": {"id": "gw-demo-01", "tenant_id": "demo", "site_id": "sim"},
            "sources": [{"kind": "chirpstack", "encoding": "json"}],
            "cloud": {"kind": "directory", "directory": str(out / "outbox")},
            "buffer": {"path": str(out / "buffer.db")},
            "batch": {"max_delay": "5s", "max_bytes": "120KiB", "compression": "gzip"},
            "log": {"level": "warning", "format": "console"},
        }
    )
    model = _entry_model("osm-v2")
    by_key = {}
    for n, (dev_eui, sensor_id, kind) in enumerate(SimulatedSite.devices()):
        fields: dict[str, object] = {"dev_eui": dev_eui, "sensor_id": sensor_id, "codec": "osm-v2"}
        if kind == "util":
            fields["metrics"] = {"CC1": {"name": "current", "scale": 0.001, "unit": "A"}}
            fields["tags"] = {"machine": sensor_id.removesuffix("-clamp")}
        entry = model.model_validate(fields)
        by_key[DeviceKey("dev_eui", dev_eui)] = MappedDevice(entry, "<demo>", n + 1, 1)
    return Config(path=out / "gateway.yaml", settings=settings, devices=DeviceMap(by_key))


def run_demo(minutes: float | None, out: Path) -> int:
    """Run until `minutes` pass or Ctrl-C; print a live progress line."""
    from gateway.service import Service

    out.mkdir(parents=True, exist_ok=True)
    config = demo_config(out)
    log.configure(config.settings.log.level, config.settings.log.format)
    service = Service(config, sources=[])
    site = SimulatedSite(service.intake.deliver)
    service.sources.append(site)
    service.intake.add_parser(SOURCE, parser_for(config.settings.sources[0]))
    service.install_signal_handlers()
    started = time.monotonic()
    outbox = out / "outbox"
    print(
        f"hub-gateway demo: {UTILISATION_SENSORS} utilisation sensors at 1 Hz, {AIR_QUALITY_SENSORS} air-quality "
        f"sensors every {AIR_QUALITY_PERIOD_S}s -> {outbox}  (Ctrl-C to stop)"
    )
    last_print = [0.0]

    def progress(svc: Service) -> None:
        now = time.monotonic()
        if minutes is not None and now - started >= minutes * 60:
            svc.request_stop()
        if now - last_print[0] < 1.0:
            return
        last_print[0] = now
        stats = svc.intake.stats
        depth = svc.buffer.depth()
        line = (
            f"\r{now - started:6.0f}s  uplinks {stats.uplinks:>7}  readings {stats.readings:>8}  "
            f"batches out {svc.published_batches:>5}  waiting {depth.total_readings:>6} readings  "
            f"dead letters {stats.dead_letters}"
        )
        sys.stdout.write(line)
        sys.stdout.flush()

    service.run(progress=progress)
    files = sorted(outbox.glob("*.json*"))
    print(
        f"\nstopped: {len(files)} batch files in {outbox}; inspect one with: "
        f"zcat {files[-1] if files else '<file>'} | head -c 600"
    )
    return 0
