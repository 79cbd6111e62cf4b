"""The demo's simulated factory site: what its sensors send, in real time.

45 machine-utilisation sensors (OSM LoRaWAN current clamps, one `osm-v2` uplink a second each,
`CC1` in mA) and 15 OSM air-quality units (averaged temperature, humidity, particulates, light
and sound every 30 s, staggered 2 s apart). LoRaWAN units reach the gateway as ChirpStack v4
JSON uplink events, built with chirpstack-api's own message types; Wi-Fi units publish OSM
JSON on `osm/<HWID>/measurements`. Each message is handed to `deliver` as a `Delivery`: the
demo either publishes it to its own Mosquitto or gives it straight to the intake.
"""

from __future__ import annotations

import json
import math
import random
import struct
import threading
import time
import uuid
from collections.abc import Callable
from typing import Literal, NamedTuple

from chirpstack_api.integration import integration_pb2
from google.protobuf import json_format

from gateway.buffer import now_ms
from gateway.sources import Delivery

UTILISATION_SENSORS = 45
AIR_QUALITY_SENSORS = 15
AIR_QUALITY_PERIOD_S = 30
#: Source names of the demo's gateway.yaml (`source_name`: the chirpstack source first, then
#: osm-mqtt), so a message fed to the intake directly parses as its subscription would parse it.
CHIRPSTACK_SOURCE = "chirpstack-1"
OSM_SOURCE = "osm-mqtt-2"
TENANT_ID = "52f14cd4-c6f1-4fbd-8f87-4025e1d49242"

Kind = Literal["clamp", "air-lorawan", "air-wifi"]


class SiteDevice(NamedTuple):
    """One simulated unit: its network identity (DevEUI or OSM HWID), sensor_id, and kind."""

    device_id: str
    sensor_id: str
    kind: Kind


def _value(v: float | int) -> bytes:
    """One osm-v2 value: whole numbers as the smallest unsigned type, others as thousandths."""
    if isinstance(v, int) and 0 < v < 2**16:
        return b"\x02" + struct.pack("<H", v) if v > 0xFF else b"\x01" + struct.pack("<B", v)
    return b"\x15" + struct.pack("<i", int(v * 1000))


def _record(name: str, *values: float | int) -> bytes:
    kind = b"\x01" if len(values) == 1 else b"\x02"
    return name.encode().ljust(4, b"\x00") + kind + b"".join(_value(v) for v in values)


class SimulatedSite:
    """A thread sending the site's uplinks, in real time, to `deliver`.

    `wifi_units`: how many air-quality units are OSM Wi-Fi units publishing JSON (every third
    unit, up to five: the demo's mix); 0 keeps them all on LoRaWAN.
    """

    name = "simulated-site"

    def __init__(self, deliver: Callable[[Delivery], None], seed: int = 7, *, wifi_units: int = 0) -> None:
        self._deliver = deliver
        self._devices = self.devices(wifi_units)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulated-site", daemon=True)
        self._rng = random.Random(seed)
        self._f_cnt: dict[str, int] = {}
        self.app_id = str(uuid.UUID(int=self._rng.getrandbits(128)))

    @staticmethod
    def devices(wifi_units: int = 0) -> list[SiteDevice]:
        """Every simulated unit, clamps first."""
        out = [
            SiteDevice(f"70b3d57ed001{i:04x}", f"machine-{i + 1:02d}-clamp", "clamp")
            for i in range(UTILISATION_SENSORS)
        ]
        wifi = set(range(2, AIR_QUALITY_SENSORS, 3)[:wifi_units])
        for i in range(AIR_QUALITY_SENSORS):
            sensor_id = f"air-{i + 1:02d}"
            if i in wifi:
                out.append(SiteDevice(f"5EED{i:04X}", sensor_id, "air-wifi"))
            else:
                out.append(SiteDevice(f"70b3d57ed002{i:04x}", sensor_id, "air-lorawan"))
        return out

    def start(self) -> None:
        """Start sending."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sending (the thread ends within a second)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)

    def wait_ready(self, timeout_s: float) -> bool:
        """The site needs nothing to be ready."""
        return True

    def _chirpstack_event(self, dev_eui: str, payload: bytes) -> Delivery:
        """An uplink as ChirpStack's MQTT integration publishes it with `json=true`."""
        ev = integration_pb2.UplinkEvent(deduplication_id=str(uuid.UUID(int=self._rng.getrandbits(128))))
        ev.time.FromMilliseconds(now_ms())
        ev.device_info.dev_eui = dev_eui
        ev.device_info.application_id = self.app_id
        ev.device_info.tenant_id = TENANT_ID
        self._f_cnt[dev_eui] = self._f_cnt.get(dev_eui, 0) + 1
        ev.f_cnt = self._f_cnt[dev_eui]
        ev.f_port = 1
        ev.data = payload
        rx = ev.rx_info.add()
        rx.gateway_id = "0016c001ff10a235"
        rx.rssi = self._rng.randint(-110, -60)
        rx.snr = round(self._rng.uniform(-5, 10), 1)
        topic = f"application/{self.app_id}/device/{dev_eui}/event/up"
        body = json_format.MessageToJson(ev, indent=None).encode()
        return Delivery(CHIRPSTACK_SOURCE, topic, body, now_ms(), lambda: None)

    def _air_quality(self, i: int, t: float) -> dict[str, float | int]:
        temp = 19 + 3 * math.sin(t / 3600 + i)
        return {
            "TEMP": round(temp, 3),
            "TEMP_min": round(temp - 0.4, 3),
            "TEMP_max": round(temp + 0.3, 3),
            "HUMI": round(45 + self._rng.uniform(-3, 3), 3),
            "PM25": self._rng.randint(3, 40),
            "PM10": self._rng.randint(5, 60),
            "LGHT": self._rng.randint(200, 900),
            "SND": round(self._rng.uniform(60, 85), 3),
        }

    def _message(self, i: int, device: SiteDevice, tick: int, t: float) -> Delivery | None:
        """What unit `i` sends at this tick, if anything."""
        if device.kind == "clamp":
            running = math.sin(t / 60 + i) > -0.3
            current = int(self._rng.gauss(12000 if running else 150, 400 if running else 30))
            return self._chirpstack_event(device.device_id, b"\x02" + _record("CC1", max(1, current)))
        n = i - UTILISATION_SENSORS
        if tick % AIR_QUALITY_PERIOD_S != (2 * n) % AIR_QUALITY_PERIOD_S:
            return None
        values = self._air_quality(i, t)
        if device.kind == "air-wifi":
            document = {"UNIX": int(t), "NAME": device.sensor_id, "VALUES": values}
            topic = f"osm/{device.device_id}/measurements"
            return Delivery(OSM_SOURCE, topic, json.dumps(document).encode(), now_ms(), lambda: None)
        temp = values["TEMP"], values["TEMP_min"], values["TEMP_max"]
        payload = b"\x02" + b"".join(
            (
                _record("TEMP", *temp),
                _record("HUMI", values["HUMI"]),
                _record("PM25", values["PM25"]),
                _record("PM10", values["PM10"]),
                _record("LGHT", values["LGHT"]),
                _record("SND", values["SND"]),
            )
        )
        return self._chirpstack_event(device.device_id, payload)

    def _run(self) -> None:
        tick = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            t = time.time()
            for i, device in enumerate(self._devices):
                message = self._message(i, device, tick, t)
                if message is not None:
                    self._deliver(message)
            tick += 1
            next_at += 1.0
            self._stop.wait(max(0.0, next_at - time.monotonic()))
