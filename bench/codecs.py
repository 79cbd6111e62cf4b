"""Codec throughput: decoded readings per second per codec, on one core, against the cost of
getting the uplink off the broker in the first place.

    python bench/codecs.py [--seconds S]

For each codec, a realistic uplink: its decode time per uplink and readings per second, and as
the baseline, in the same run, the time to parse the very same event as it arrives (a
ChirpStack v4 `UplinkEvent` in its JSON mapping through `parse_chirpstack`, or the OSM JSON
message through `parse_osm`) and `json.loads` of it alone. The target: decoding is never more
than half of the per-uplink cost (decode / (parse + decode) <= 50%). One line per codec.

For the ChirpStack events it also times, in the same run, the json_format path that
`parse_chirpstack` replaced (issue 11: `tests/chirpstack_reference.py`), and prints one line
comparing the two; and, where orjson or msgspec is importable (neither is a dependency),
their parse of the same events against json.loads, the part of the direct reader they could
replace. Runs against the checkout it lives in (it puts the repository root first on sys.path).
"""

from __future__ import annotations

import argparse
import importlib
import json
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chirpstack_api.integration import integration_pb2  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from gateway.codecs import CODECS, DecodeContext  # noqa: E402
from gateway.model import Uplink  # noqa: E402
from gateway.sources.events import parse_chirpstack, parse_osm  # noqa: E402
from tests.chirpstack_reference import parse_chirpstack_reference  # noqa: E402

DEV_EUI = "70b3d57ed0001234"
TOPIC = f"application/0b5f3a5e-7b4a-4d6c-9a51-1e4c1c7d2f10/device/{DEV_EUI}/event/up"
OSM_TOPIC = "osm/0A1B2C3D/measurements"
T = 1_795_000_000_000


def _osm_record(name: str, *values: tuple[int, int, int]) -> bytes:
    """name, data type, then (type byte, size, raw) per value."""
    out = name.encode().ljust(4, b"\x00") + bytes([1 if len(values) == 1 else 2])
    for kind, size, raw in values:
        out += bytes([kind]) + raw.to_bytes(size, "little", signed=kind >= 0x11)
    return out


# An OSM air-quality unit's frame: 6 averaged float records and 2 singles, 108 bytes.
OSM_V2 = (
    b"\x02"
    + b"".join(
        _osm_record(n, (0x15, 4, v), (0x15, 4, v - 900), (0x15, 4, v + 1100))
        for n, v in (("PM10", 18300), ("PM25", 12300), ("TMP5", 22125), ("HUM2", 48500), ("VOC", 101000))
    )
    + _osm_record("CC1", (0x02, 2, 1234), (0x01, 1, 200), (0x02, 2, 2100))
    + _osm_record("LGHT", (0x02, 2, 450))
    + _osm_record("BAT", (0x15, 4, 87000))
)
# An OSM Wi-Fi unit's message as its firmware prints it (under the firmware's 254-byte MTU).
OSM_JSON = (
    b'{"UNIX":1795000000,"NAME":"0x0A1B2C3D","VALUES":{"CC1":1234,"CC1_min":1180,"CC1_max":1302,'
    b'"CC2":877,"CC2_min":850,"CC2_max":912,"TEMP":23.500,"TEMP_min":23.000,"TEMP_max":24.125,'
    b'"HUMI":41.250,"LGHT":450,"SND":61.300,"CNT1":17}}'
)
# A Cayenne node: two temperatures, humidity, barometer, voltage, GPS.
CAYENNE = bytes.fromhex("03670110 056700ff 076861 0873278f 0b740e10 018806765ff2960a0003e8")
# A 1 Hz utilisation sensor: 50 u16 current samples a minute, 106 bytes.
PACKED = struct.pack("<BBHH", 1, 2, 1000, 120) + struct.pack("<50H", *range(1000, 1050))
# What a typical vendor JavaScript codec in ChirpStack makes of an uplink.
OBJECT = {
    "BatV": 3.05,
    "Bat_status": 3,
    "TempC_SHT": 22.1,
    "Hum_SHT": 45.2,
    "Ext_sensor": "Temperature Sensor",
    "TempC_DS": 21.87,
    "alarm": False,
    "position": {"lat": 53.8008, "lon": -1.5491, "fix": True},
}


def chirpstack_event(data: bytes, f_port: int, obj: dict[str, Any] | None = None) -> bytes:
    """An UplinkEvent as ChirpStack v4 publishes it with `json=true`: two gateways heard it."""
    ev = integration_pb2.UplinkEvent(deduplication_id="3ac7e3c4-4401-4b8d-9386-a5c902f9202d")
    ev.time.FromMilliseconds(T)
    info = ev.device_info
    info.tenant_id = "52f14cd4-c6f1-4fbd-8f87-4025e1d49242"
    info.tenant_name = "ACME Manufacturing"
    info.application_id = "0b5f3a5e-7b4a-4d6c-9a51-1e4c1c7d2f10"
    info.application_name = "press-shop"
    info.device_profile_id = "7a1ec2b5-4c0f-4b7b-9a77-2a1d9e0b6c11"
    info.device_profile_name = "OSM env01g LoRaWAN"
    info.device_name = "press-03-clamp"
    info.dev_eui = DEV_EUI
    info.tags["line"] = "A"
    ev.dev_addr = "01fa3b2c"
    ev.adr = True
    ev.dr = 5
    ev.f_cnt = 48213
    ev.f_port = f_port
    ev.confirmed = True
    ev.data = data
    if obj is not None:
        ev.object.update(obj)
    for n, (gateway, rssi, snr) in enumerate((("0016c001ff10a235", -80, 7.5), ("0016c001ff10a236", -97, 1.25))):
        rx = ev.rx_info.add()
        rx.gateway_id = gateway
        rx.uplink_id = 1_234_567 + n
        rx.gw_time.FromMilliseconds(T - 20)
        rx.ns_time.FromMilliseconds(T - 5)
        rx.rssi = rssi
        rx.snr = snr
        rx.channel = 2
        rx.location.latitude = 53.8008
        rx.location.longitude = -1.5491
        rx.context = b"\x01\x02\x03\x04"
        rx.metadata["region_config_id"] = "eu868"
        rx.crc_status = 1  # CRC_OK
    ev.tx_info.frequency = 868_500_000
    ev.tx_info.modulation.lora.bandwidth = 125_000
    ev.tx_info.modulation.lora.spreading_factor = 7
    ev.tx_info.modulation.lora.code_rate = 1  # CR_4_5
    ev.region_config_id = "eu868"
    return bytes(json_format.MessageToJson(ev).encode())


@dataclass(frozen=True)
class Case:
    """One codec's realistic uplink: the message as it arrives and how it is parsed."""

    codec: str
    message: bytes
    parse: Callable[[], Any]
    options: dict[str, Any]
    #: The same event through the json_format path it replaced (ChirpStack events only).
    parse_before: Callable[[], Any] | None = None


def _per_call(fn: Callable[[], Any], seconds: float) -> float:
    """Seconds per call: the best of five timed runs of about seconds/5 each."""
    calls = 1
    while True:  # calibrate
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start > 0.02:
            break
        calls *= 2
    rate = (time.perf_counter() - start) / calls
    n = max(1, int(seconds / 5 / rate))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def _time_json_libraries(messages: list[bytes], seconds: float) -> None:
    """json.loads against orjson.loads and msgspec.json.decode on the same events, where installed."""
    loaders: dict[str, Callable[[bytes], Any]] = {"json.loads": json.loads}
    for module, attribute in (("orjson", "loads"), ("msgspec.json", "decode")):
        try:
            loaders[f"{module}.{attribute}"] = getattr(importlib.import_module(module), attribute)
        except ImportError:
            continue
    if len(loaders) == 1:
        return
    means = {
        name: sum(_per_call(partial(load, message), seconds) for message in messages) / len(messages)
        for name, load in loaders.items()
    }
    print(
        f"parse {'json libraries':<18} "
        + ", ".join(f"{name} {mean * 1e6:5.1f} us" for name, mean in means.items())
        + f" (mean of the same {len(messages)} events)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    args = parser.parse_args(argv)
    cases = []
    for name, data, f_port, obj, options in (
        ("osm-v2", OSM_V2, 1, None, {}),
        ("cayenne-lpp", CAYENNE, 2, None, {}),
        ("packed-samples", PACKED, 10, None, {"ports": {10: {"metric": "current", "scale": 0.01, "unit": "A"}}}),
        ("chirpstack-object", b"\xcb\xf6\x0b\x8d\x01\x7c\x0d\xc7\x7f\xff", 2, OBJECT, {}),
    ):
        message = chirpstack_event(data, f_port, obj)
        cases.append(
            Case(
                name,
                message,
                partial(parse_chirpstack, TOPIC, message, T, "json"),
                options,
                partial(parse_chirpstack_reference, TOPIC, message, T, "json"),
            )
        )
    cases.insert(1, Case("osm-json", OSM_JSON, partial(parse_osm, OSM_TOPIC, OSM_JSON, T), {}))

    worst = 0.0
    parses: list[tuple[float, float]] = []
    for case in cases:
        codec = CODECS[case.codec]
        uplink = case.parse()
        assert isinstance(uplink, Uplink)
        ctx = DecodeContext(
            uplink_time_ms=uplink.time_ms,
            received_ms=uplink.received_ms,
            f_port=uplink.f_port,
            object=uplink.object,
            options=codec.options.model_validate(case.options),
        )
        payload = uplink.payload
        readings = len(codec.decode(payload, ctx))
        decode = _per_call(partial(codec.decode, payload, ctx), args.seconds)
        parse = _per_call(case.parse, args.seconds)
        loads = _per_call(partial(json.loads, case.message), args.seconds)
        before = ""
        if case.parse_before is not None:
            assert case.parse_before() == uplink  # the same uplink either way
            parse_before = _per_call(case.parse_before, args.seconds)
            parses.append((parse, parse_before))
            before = f" (json_format path {parse_before * 1e6:6.1f} us)"
        share = decode / (decode + parse)
        worst = max(worst, share)
        source = "parse_osm" if case.codec == "osm-json" else "parse_chirpstack"
        print(
            f"codec {case.codec:<18} {readings / decode:>12,.0f} readings/s "
            f"({readings} readings, decode {decode * 1e6:6.1f} us/uplink); "
            f"baseline {source} {parse * 1e6:6.1f} us/uplink{before} of {len(case.message)} B, "
            f"json.loads alone {loads * 1e6:5.1f} us; decode is {share:4.0%} of per-uplink cost",
            flush=True,
        )
    now = sum(p for p, _ in parses) / len(parses)
    then = sum(b for _, b in parses) / len(parses)
    print(
        f"parse {'chirpstack-json':<18} direct reader {now * 1e6:6.1f} us/uplink, json_format path "
        f"{then * 1e6:6.1f} us/uplink (mean of the {len(parses)} ChirpStack events above, same run): "
        f"{then / now:4.1f}x faster",
        flush=True,
    )
    _time_json_libraries([case.message for case in cases if case.parse_before is not None], args.seconds)
    verdict = "met" if worst <= 0.5 else "MISSED"
    print(f"codec {'ALL':<18} worst decode share {worst:.0%} of per-uplink cost; target <= 50%: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
