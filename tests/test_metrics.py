"""Prometheus metrics and the cloud link in `status`, from the real daemon (real brokers): the
endpoint is scraped over HTTP and parsed with prometheus_client's own text parser."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.settings import MetricsSettings
from gateway.metrics import is_loopback
from tests.chirpstack import encode, topic, uplink_event
from tests.support.brokers import Mosquitto, Subscriber, publishing
from tests.support.certs import TestCerts
from tests.support.daemon import Daemon
from tests.test_bridge import DEVICES, PRESS, STRANGER, T0, expected_rows, press_frame, wait_rows

pytestmark = pytest.mark.integration


def metrics_port(daemon: Daemon) -> int:
    """The port the daemon logged for `listen: 127.0.0.1:0` (any free port)."""
    daemon.wait_log('"event": "metrics served"')
    for line in daemon.log_path.read_text().splitlines():
        if '"metrics served"' in line:
            return int(json.loads(line)["listen"].rpartition(":")[2])
    raise AssertionError("no metrics line")


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """One scrape, as {sample name: {labels: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_are_scraped_from_the_running_daemon(
    local_broker: Mosquitto,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    reader: Subscriber,
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """With `metrics: {listen: ...}` the daemon serves counters (uplinks, readings, unmapped,
    publishes), gauges (backlog, cloud connected, in flight, runway) and per-device last-seen
    timestamps, named hub_gateway_*; `status` shows the cloud link connected, as the daemon wrote it."""
    daemon = Daemon(
        tmp_path / "gw", local_broker, cloud_broker, certs, DEVICES, extra_yaml="metrics: {listen: 127.0.0.1:0}\n"
    )
    daemons.append(daemon)
    daemon.start()
    port = metrics_port(daemon)
    with publishing(local_broker) as send:
        for n in range(1, 4):
            event = uplink_event(PRESS, press_frame(n), f_cnt=n, time_ms=T0 + n * 1000, dedup_id=f"m-{n}")
            send(topic(PRESS), encode(event, "json"))
        send(topic(STRANGER), encode(uplink_event(STRANGER, b"\x01", dedup_id="s-1"), "json"))
    press = {r for n in range(1, 4) for r in expected_rows(n, T0 + n * 1000) if r[1] == "press-03-clamp"}
    wait_rows(reader, press)
    deadline = time.monotonic() + 20
    while True:  # the HTTP endpoint is another process's state: polled until it shows the publish
        samples = scrape(port)
        published = samples["hub_gateway_publishes_total"][()] >= 1 and samples["hub_gateway_backlog_readings"][()] == 0
        if published and samples["hub_gateway_unmapped_uplinks_total"][()] == 1:
            break
        assert time.monotonic() < deadline, samples
        time.sleep(0.2)
    assert samples["hub_gateway_uplinks_total"][()] == 3  # with readings stored; the unmapped one apart
    assert samples["hub_gateway_readings_total"][()] >= 3
    assert samples["hub_gateway_unmapped_uplinks_total"][()] == 1
    assert samples["hub_gateway_dead_letters_total"][()] == 0
    assert samples["hub_gateway_cloud_connected"][()] == 1
    assert samples["hub_gateway_in_flight_batches"][()] == 0
    assert samples["hub_gateway_runway_seconds"][()] > 0
    assert 0 <= samples["hub_gateway_last_publish_age_seconds"][()] < 60
    seen = samples["hub_gateway_device_last_seen_timestamp_seconds"]
    assert abs(seen[(("device", f"dev_eui:{PRESS}"), ("sensor_id", "press-03-clamp"))] - time.time()) < 60
    assert (("device", f"dev_eui:{STRANGER}"), ("sensor_id", "")) in seen
    report = daemon.wait_status(lambda s: s["cloud"] is not None and s["cloud"]["connected"])
    assert report["cloud"]["since_ms"] <= time.time() * 1000
    assert {d["sensor_id"] for d in report["devices_in_use"]} >= {"press-03-clamp"}
    code, _ = daemon.stop()
    assert code == 0


def test_metrics_listen_takes_host_and_port_and_knows_loopback() -> None:
    """`listen` is host:port (IPv6 in brackets); loopback addresses are told from the others, for
    the warning a non-loopback address gets."""
    m = MetricsSettings(listen="[::1]:9464")
    assert (m.host, m.port) == ("::1", 9464)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(ValueError, match="host:port"):
        MetricsSettings(listen="9464")


def test_status_says_since_when_the_cloud_link_is_up_to_the_moment_it_connected(
    local_broker: Mosquitto, cloud_broker: Mosquitto, certs: TestCerts, daemons: list[Daemon], tmp_path: Path
) -> None:
    """`status` shows the cloud link "connected since" the connection itself (the log's
    "connected to cloud"), not since the heartbeat that first wrote it: with a 10 s
    status_interval those differ by up to 10 s."""
    from datetime import datetime

    daemon = Daemon(tmp_path / "gw", local_broker, cloud_broker, certs, DEVICES)
    daemon.config.write_text(daemon.config.read_text().replace("status_interval: 2s", "status_interval: 10s"))
    daemons.append(daemon)
    daemon.start()
    report = daemon.wait_status(lambda s: s["cloud"] is not None and s["cloud"]["connected"], timeout=30)
    (line,) = [json.loads(x) for x in daemon.log_path.read_text().splitlines() if '"connected to cloud"' in x]
    connected_ms = datetime.fromisoformat(line["timestamp"]).timestamp() * 1000
    assert abs(report["cloud"]["since_ms"] - connected_ms) < 1000, (report["cloud"], line["timestamp"])
    assert daemon.stop()[0] == 0
