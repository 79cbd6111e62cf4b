"""A small site to commission a device against, by hand, as a field engineer would (issue 12).

    python bench/commissioning_site.py up DIR [--every S]
    python bench/commissioning_site.py sensor DIR DEV_EUI [--every S]

`up` lays out DIR as a gateway would have it (DIR/etc/hub-gateway/gateway.yaml with a device map
in devices/, the buffer under DIR/var/lib/hub-gateway), makes test certificates, starts two real
Mosquitto brokers (tests/support/brokers.py): the site's plain broker, where "ChirpStack"
publishes, and a TLS broker with client certificates standing in for IoT Core; then publishes
ChirpStack v4 JSON uplink events (built with chirpstack-api's types, tests/chirpstack.py) for the
devices already mapped, one each every --every seconds, and appends every row that reaches the
stand-in to DIR/cloud-rows.log ("HH:MM:SS.mmm sensor_id metric=value unit"). It runs until
SIGTERM/SIGINT, then stops the brokers. Start the daemon yourself:

    export HUB_GATEWAY_CONFIG=DIR/etc/hub-gateway/gateway.yaml
    hub-gateway run &

`sensor` powers up one new OSM current clamp (osm-v2, CC1 in mA, a slowly changing current)
with the given DevEUI: its uplinks go to the site's broker every --every seconds until killed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import wire  # noqa: E402
from tests.chirpstack import encode, topic, uplink_event  # noqa: E402
from tests.support.brokers import Mosquitto, ServerTLS, Subscriber, publishing  # noqa: E402
from tests.support.certs import make_test_certs  # noqa: E402
from tests.test_bridge import milli, record, u16  # noqa: E402  (the osm-v2 frame builders)

GATEWAY_ID = "gw-acme-leeds-01"
#: The devices mapped before the engineer arrives: (dev_eui, sensor_id, kind).
MAPPED = (
    ("70b3d57ed0001234", "press-03-clamp", "clamp"),
    ("70b3d57ed0001240", "press-05-clamp", "clamp"),
    ("70b3d57ed0005678", "hall-a-air", "air"),
)
DEVICE_MAP = """\
# yaml-language-server: $schema=../schema/devices.schema.json
devices:
  - dev_eui: 70b3d57ed0001234
    sensor_id: press-03-clamp
    codec: osm-v2
    tags: {machine: press-03, line: A}
    metrics:
      CC1: {name: spindle_current, scale: 0.001, unit: A}
  - dev_eui: 70b3d57ed0001240
    sensor_id: press-05-clamp
    codec: osm-v2
    tags: {machine: press-05, line: A}
    metrics:
      CC1: {name: spindle_current, scale: 0.001, unit: A}
  - dev_eui: 70B3D57ED0005678
    sensor_id: hall-a-air
    codec: osm-v2
    tags: {area: hall-a}
"""


def frame(kind: str, n: int) -> bytes:
    """An osm-v2 uplink: a clamp's current in mA, or an air unit's temperature and light."""
    if kind == "clamp":
        return b"\x02" + record("CC1", 1, u16(11800 + (n * 37) % 900))
    return (
        b"\x02"
        + record("TEMP", 2, milli(21.0 + n % 10 / 10), milli(20.5), milli(21.9))
        + record("LGHT", 1, u16(400 + n % 50))
    )


def gateway_yaml(local: Mosquitto, cloud: Mosquitto, etc: Path, var: Path, metrics_port: int) -> str:
    return f"""\
# yaml-language-server: $schema=schema/gateway.schema.json
gateway:
  id: {GATEWAY_ID}
  tenant_id: acme
  site_id: leeds
sources:
  - kind: chirpstack
    broker: {{host: 127.0.0.1, port: {local.port}}}
    encoding: json
  - kind: osm-mqtt
    broker: {{host: 127.0.0.1, port: {local.port}}}
cloud:
  kind: iot-core
  endpoint: localhost             # the site's IoT Core stand-in (a TLS Mosquitto)
  port: {cloud.port}
  ca: {etc}/certs/ca.pem
  cert: {etc}/certs/device.pem.crt
  key: {etc}/certs/private.pem.key
  topic: "dt/hub/{{tenant_id}}/{{site_id}}/{{gateway_id}}/readings"
buffer:
  path: {var}/buffer.db
  max_size: 1GiB
  status_interval: 5s             # while commissioning (README); back to 30s afterwards
batch:
  max_delay: 5s
devices:
  - devices/*.yaml
log:
  level: info
  format: console
metrics:
  listen: 127.0.0.1:{metrics_port}
"""


def up(where: Path, every: float) -> int:
    etc, var = where / "etc" / "hub-gateway", where / "var" / "lib" / "hub-gateway"
    (etc / "devices").mkdir(parents=True, exist_ok=True)
    (etc / "certs").mkdir(exist_ok=True)
    var.mkdir(parents=True, exist_ok=True)
    pki = make_test_certs(where / "pki")
    device = pki.client(GATEWAY_ID)
    for source, name in ((pki.ca_cert, "ca.pem"), (device.cert, "device.pem.crt"), (device.key, "private.pem.key")):
        target = etc / "certs" / name
        target.write_bytes(source.read_bytes())
        target.chmod(0o600 if name.endswith(".key") else 0o644)
    local = Mosquitto(where / "brokers" / "site", persistence=True, max_queued_messages=100_000).start()
    cloud = Mosquitto(
        where / "brokers" / "iot-core",
        tls=ServerTLS(ca=pki.ca_cert, server=pki.server),
        persistence=True,
        max_inflight_messages=100,
    ).start()
    (where / "site.json").write_text(json.dumps({"site_broker_port": local.port, "cloud_port": cloud.port}))
    config = etc / "gateway.yaml"
    config.write_text(gateway_yaml(local, cloud, etc, var, 9464))  # new ports each time; the map is kept
    if not (etc / "devices" / "press-shop.yaml").exists():
        (etc / "devices" / "press-shop.yaml").write_text(DEVICE_MAP)
    rows = (where / "cloud-rows.log").open("a", buffering=1)

    reader = Subscriber(cloud, "dt/hub/+/+/+/readings", client_id="cloud-side", client_cert=pki.client("cloud-side"))
    reader.start()
    stop = threading.Event()

    def log_rows() -> None:
        done = 0
        while not stop.wait(0.2):
            messages = reader.messages
            for message in messages[done:]:
                at = time.time() - (time.monotonic() - message.received_at)
                clock = datetime.fromtimestamp(at).strftime("%H:%M:%S.%f")[:-3]
                for row in wire.expand_rows(wire.decode_message(message.payload)):
                    unit = row["metadata"].get("unit") or ""
                    rows.write(f"{clock} {row['sensor_id']} {row['metric_name']}={row['metric_value']} {unit}\n")
            done = len(messages)

    threading.Thread(target=log_rows, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"site broker 127.0.0.1:{local.port}, IoT Core stand-in localhost:{cloud.port}, config {config}", flush=True)
    try:
        with publishing(local) as send:
            n = 0
            while not stop.is_set():
                n += 1
                for dev_eui, _, kind in MAPPED:
                    event = uplink_event(dev_eui, frame(kind, n), f_cnt=n, time_ms=int(time.time() * 1000))
                    send(topic(dev_eui), encode(event, "json"))
                stop.wait(every)
    except KeyboardInterrupt:
        pass
    finally:
        reader.close()
        local.stop()
        cloud.stop()
        rows.close()
    return 0


def sensor(where: Path, dev_eui: str, every: float) -> int:
    port = json.loads((where / "site.json").read_text())["site_broker_port"]
    local = Mosquitto(where / "brokers" / "sensor-unused", port=port)  # only its host and port are used
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with publishing(local) as send:
            n = 0
            while not stop.is_set():
                n += 1
                event = uplink_event(dev_eui, frame("clamp", n), f_cnt=n, time_ms=int(time.time() * 1000))
                send(topic(dev_eui), encode(event, "json"))
                stop.wait(every)
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up")
    p.add_argument("dir", type=Path)
    p.add_argument("--every", type=float, default=10.0)
    p = sub.add_parser("sensor")
    p.add_argument("dir", type=Path)
    p.add_argument("dev_eui")
    p.add_argument("--every", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.command == "up":
        return up(args.dir.resolve(), args.every)
    return sensor(args.dir.resolve(), args.dev_eui, args.every)


if __name__ == "__main__":
    sys.exit(main())
