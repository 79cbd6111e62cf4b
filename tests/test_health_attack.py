"""Adversarial tests of the health message (hub.health.v1): what the contract promises when the
link drops, the cloud refuses, the maps change and the daemon stops; against the real daemon
and a TLS Mosquitto standing in for IoT Core."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from gateway import report
from gateway.batching import to_record
from gateway.buffer import now_ms
from gateway.buffer.side import HEARD_KEPT
from gateway.config import load_config
from gateway.devices import resolve
from gateway.health import Health
from gateway.model import DecodedUplink, DeviceKey, ForeignTenant, Reading, Unmapped, Uplink
from gateway.service import Service
from tests.support.brokers import Mosquitto, ReceivedMessage, Subscriber
from tests.support.certs import TestCerts
from tests.support.daemon import HEALTH_TOPIC, Daemon
from tests.test_bridge import DEVICES, PRESS
from tests.test_health import MINUTE, dev, heard, site


def bodies(messages: list[ReceivedMessage]) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages if m.topic == HEALTH_TOPIC]


def retained_health(cloud: Mosquitto, certs: TestCerts) -> ReceivedMessage:
    """What a subscriber arriving now is handed for the health topic (the retained message)."""
    with Subscriber(cloud, HEALTH_TOPIC, client_id="late", client_cert=certs.client("late")) as late:
        (message,) = late.wait_for_count(1)
        assert message.retain
        return message


def fill_backlog(daemon: Daemon, uplinks: int, readings: int) -> int:
    """Store `uplinks` uplinks of `readings` random (incompressible) readings each in the
    daemon's buffer before it starts, as a long outage leaves it; returns the bytes stored."""
    rng = random.Random(13)
    t0 = now_ms() - 3_600_000
    service = Service(load_config(daemon.config), sources=[])
    try:
        for n in range(uplinks):
            t = t0 + n * 1000
            up = DecodedUplink(
                f"chirpstack/backlog-{n}",
                "press-03-clamp",
                DeviceKey("dev_eui", PRESS),
                t,
                {"f_cnt": n},
                tuple(Reading("spindle_current", rng.random() * 1000, "A", t + i) for i in range(readings)),
            )
            service.buffer.store([to_record(up, 120 * 1024, True)])
        service.buffer.heartbeat()
        return service.buffer.stored_bytes_total
    finally:
        service.buffer.close()


@pytest.mark.integration
def test_a_clean_stop_during_a_backlog_drain_leaves_stopped_or_offline_never_online(
    local_broker: Mosquitto, cloud_broker: Mosquitto, certs: TestCerts, daemons: list[Daemon], tmp_path: Path
) -> None:
    """SIGTERM while a large backlog drains (the client paces publishes at IoT Core's 512 KiB/s,
    so the `stopped` message queues behind the batches in flight): what the cloud retains for
    the gateway afterwards must say it is not running, `stopped` (sent) or `offline` (the will,
    when `stopped` could not be sent), never the `online` of the running daemon."""
    daemon = Daemon(
        tmp_path / "gw", local_broker, cloud_broker, certs, DEVICES, extra_yaml="health: {will_delay: 1s}\n"
    )
    daemons.append(daemon)
    stored = fill_backlog(daemon, uplinks=300, readings=1000)
    assert stored > 2 * 1024**2  # about 4 s of IoT Core's pace at least
    with Subscriber(
        cloud_broker, HEALTH_TOPIC, client_id="health-watch", client_cert=certs.client("health-watch")
    ) as watch:
        daemon.start()
        watch.wait_for(lambda m: len(bodies(m)) >= 1, timeout=30)
        code, took = daemon.stop()
        assert code == 0 and took < 5.0
        # `stopped` is there already, or the will follows 1 s after the link ended.
        with contextlib.suppress(AssertionError):
            watch.wait_for(lambda m: bodies(m)[-1]["status"] != "online", timeout=5)
    last = json.loads(retained_health(cloud_broker, certs).payload)
    assert last["status"] in ("stopped", "offline"), (
        f"the cloud keeps '{last['status']}' for a gateway that stopped: 'stopped' was not sent and the "
        f"clean DISCONNECT discarded the will\n{daemon.log_tail(8)}"
    )


# ---- the message as built (real buffer, real config) -------------------------------------------

OURS = "11111111-2222-3333-4444-555555555555"
THEIRS = "99999999-8888-7777-6666-555555555555"


def test_another_tenants_uplinks_do_not_make_a_silent_device_look_heard(tmp_path: Path) -> None:
    """A device entry bound to its ChirpStack tenant (chirpstack_tenant_id): an uplink with the
    same dev_eui from another tenant is dropped. It must not show in this tenant's health message:
    the device, never heard from its own tenant and the daemon up an hour, stays `silent` with
    no `last_seen` (the other tenant's traffic neither hides the silence nor tells when it sent)."""
    cfg = site(tmp_path, 1)
    maps = tmp_path / "devices" / "site.yaml"
    maps.write_text(
        maps.read_text().replace("    codec: osm-v2\n", f"    codec: osm-v2\n    chirpstack_tenant_id: {OURS}\n")
    )
    service = Service(load_config(cfg), sources=[])
    try:
        t = now_ms()
        theirs = Uplink(
            "chirpstack/other-1", dev(1), b"\x02CC1\x00\x01\x02\x01\x00", t, t, f_port=1, network_tenant=THEIRS
        )
        outcome = resolve(theirs, service.config.devices)
        assert isinstance(outcome, ForeignTenant)
        service.buffer.store([outcome])
        body = Health(service.config, service.reporter, version="1", started_ms=t - 60 * MINUTE).message("online")
        (entry,) = body["devices"]["list"]
        assert entry["last_seen"] is None, "another tenant's uplink time is in this tenant's health message"
        assert entry["silent"], "another tenant's traffic hides that this tenant's device is silent"
    finally:
        service.buffer.close()


def test_after_a_restart_another_tenants_uplink_is_still_not_this_device_heard(tmp_path: Path) -> None:
    """What the buffer kept from before a restart: a device whose last uplink was another
    tenant's has no last_seen in the new run's health message, and is silent once overdue."""
    cfg = site(tmp_path, 1)
    maps = tmp_path / "devices" / "site.yaml"
    maps.write_text(
        maps.read_text().replace("    codec: osm-v2\n", f"    codec: osm-v2\n    chirpstack_tenant_id: {OURS}\n")
    )
    service = Service(load_config(cfg), sources=[])
    t = now_ms()
    theirs = Uplink("chirpstack/other-2", dev(1), b"\x02CC1\x00\x01\x02\x01\x00", t, t, f_port=1, network_tenant=THEIRS)
    service.buffer.store([resolve(theirs, service.config.devices)])
    service.buffer.heartbeat()
    service.buffer.close()
    again = Service(load_config(cfg), sources=[])
    try:
        late = Health(again.config, again.reporter, version="1", started_ms=t - 60 * MINUTE, before=again.health.before)
        (entry,) = late.message("online")["devices"]["list"]
        assert entry["last_seen"] is None and entry["silent"]
    finally:
        again.buffer.close()


def test_a_flood_of_unmapped_devices_does_not_forget_a_mapped_one(tmp_path: Path) -> None:
    """The buffer remembers the last HEARD_KEPT devices heard; unmapped ones (other applications'
    devices on the same ChirpStack, random ids) count too. Over 5000 of them heard since a mapped
    device's last uplink must not make the health message forget it: its last_seen stays, it is
    not called silent within its interval, and its readings are not counted a second time in the
    next message once it is heard again."""
    service = Service(load_config(site(tmp_path, 1)), sources=[])
    try:
        t = now_ms()
        health = Health(service.config, service.reporter, version="1", started_ms=t - 3 * 60 * MINUTE)
        heard(service, 1, t - 10 * MINUTE, 1)
        heard(service, 1, t - 5 * MINUTE, 2)
        (first,) = health.message("online")["devices"]["list"]
        assert first["readings"] == 2 and first["last_seen"] == t - 5 * MINUTE and not first["silent"]
        junk = [
            Unmapped(Uplink(f"chirpstack/j-{i}", DeviceKey("dev_eui", f"ffff{i:012x}"), b"\x00", t, t))
            for i in range(HEARD_KEPT + 1)
        ]
        for i in range(0, len(junk), 500):
            service.buffer.store(junk[i : i + 500])
        (second,) = health.message("online")["devices"]["list"]
        assert second["last_seen"] == t - 5 * MINUTE, "the device heard 5 min ago is reported as never heard"
        assert not second["silent"], "a device on time (every 5 min) is reported silent"
        heard(service, 1, t, 3)
        (third,) = health.message("online")["devices"]["list"]
        assert third["readings"] == 1, "readings reported in the first message are counted again"
    finally:
        service.buffer.close()


def test_uptime_and_silence_follow_the_time_running_not_a_wall_clock_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Pi without a real-time clock starts the daemon, then NTP steps the wall clock forward
    (by the hours it was off). The daemon has run seconds: uptime_s must say so, and a device
    not heard since the start must not be called silent because the clock moved (the silent
    rule for it is "once the daemon has been up that long")."""
    service = Service(load_config(site(tmp_path, 1)), sources=[])
    try:
        real = report.now_ms
        step_ms = 6 * 60 * MINUTE
        monkeypatch.setattr(report, "now_ms", lambda: real() + step_ms)
        body = service.health.message("online")
        assert body["uptime_s"] < 60, f"uptime {body['uptime_s']} s after a 6 h clock step, seconds after the start"
        assert not body["devices"]["list"][0]["silent"], "a device is silent because the wall clock stepped"
    finally:
        service.buffer.close()
