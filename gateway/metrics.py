"""Prometheus metrics: the text exposition format over HTTP, read from one `report.Snapshot`.

Off unless gateway.yaml has `metrics: {listen: ...}`. The server runs on prometheus_client's
own thread; each scrape builds one snapshot (a read of the buffer, no write), so every metric
of a scrape describes the same moment.
"""

from __future__ import annotations

import ipaddress
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from gateway.report import Snapshot

log = structlog.get_logger("gateway.metrics")

PREFIX = "hub_gateway_"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: only this machine can scrape them."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SnapshotCollector(Collector):
    """Turns a snapshot into metric families, named by Prometheus conventions."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # unchecked registration: the families are built per scrape

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        yield counter("uplinks", "Uplinks whose readings were stored, since the daemon started.", s.uplinks)
        yield counter("readings", "Readings stored since the daemon started.", s.readings)
        yield counter("dead_letters", "Payloads that did not decode (dead letters).", s.dead_letters)
        yield counter("unmapped_uplinks", "Uplinks from devices in no map (kept for replay).", s.unmapped)
        yield counter("duplicate_uplinks", "Uplinks delivered again and stored once.", s.duplicates)
        yield counter("foreign_tenant_uplinks", "Uplinks of another ChirpStack tenant, dropped.", s.foreign_tenant)
        yield counter("publishes", "Batches the cloud accepted (PUBACK success).", s.publishes)
        refused = CounterMetricFamily(
            PREFIX + "puback_refusals", "Publishes the cloud refused, by PUBACK reason code.", labels=["reason_code"]
        )
        for code, n in sorted(s.refusals.items()):
            refused.add_metric([f"0x{code:02x}"], n)
        yield refused
        yield counter("publish_failures", "Publishes that failed without a PUBACK reason code.", s.publish_failures)
        yield counter(
            "dropped_readings", "Readings dropped to keep the buffer within max_size/max_age.", s.dropped_readings
        )
        yield gauge("backlog_readings", "Readings not yet confirmed by the cloud.", s.backlog_readings)
        yield gauge("backlog_bytes", "Payload bytes (uncompressed) not yet confirmed by the cloud.", s.backlog_bytes)
        yield gauge(
            "oldest_unsent_age_seconds",
            "Age of the oldest reading not yet confirmed (0: none).",
            s.oldest_unsent_age_s or 0.0,
        )
        yield gauge("in_flight_batches", "Batches published and not yet answered.", s.in_flight)
        yield gauge("cloud_connected", "1 while the cloud connection is up.", 1.0 if s.cloud_connected else 0.0)
        yield gauge(
            "last_publish_age_seconds",
            "Seconds since the cloud last accepted a batch (NaN: none yet).",
            math.nan if s.last_publish_age_s is None else s.last_publish_age_s,
        )
        yield gauge(
            "runway_seconds",
            "Seconds until the buffer reaches max_size or fills the disk at the last "
            "15 minutes' intake rate if nothing drained (+Inf: no intake).",
            s.runway_s,
        )
        seen = GaugeMetricFamily(
            PREFIX + "device_last_seen_timestamp_seconds",
            "When each device heard since the start last sent an uplink (Unix time).",
            labels=["device", "sensor_id"],
        )
        for device, heard in sorted(s.devices.items()):
            seen.add_metric([device, heard.sensor_id or ""], heard.last_seen_ms / 1000)
        yield seen


class MetricsServer:
    """The HTTP endpoint; started and stopped by the service."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], Snapshot]) -> None:
        self.host, self.port = host, port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen (raises OSError when the address cannot be bound)."""
        if not is_loopback(self.host):
            log.warning(
                "metrics listen on a non-loopback address: anyone who reaches it can read them",
                listen=f"{self.host}:{self.port}",
            )
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._server.server_port
        log.info("metrics served", listen=f"{self.host}:{self.port}", path="/metrics")

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(1.0)
