"""The health message (hub.health.v1) as the daemon builds it: every message valid against the
shipped schema; counts since the last report; the silent flag; the runway; the size with 60 and
500 devices; what the message keeps when a site has more devices than fit."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest

from gateway.batching import to_record
from gateway.buffer import now_ms
from gateway.config import ConfigError, load_config
from gateway.config.settings import HealthSettings
from gateway.health import MAX_BYTES, Health, encode, offline_message
from gateway.model import DeadLetter, DecodedUplink, DeviceKey, Reading
from gateway.report import runway
from gateway.service import Service

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "config" / "schema" / "hub.health.v1.json").read_text())
MINUTE = 60_000
IOT_CORE_LIMIT = 128 * 1024


def site(where: Path, devices: int, extra: str = "", buffer: str = "{path: buffer.db}") -> Path:
    """A gateway.yaml (directory cloud) with `devices` LoRaWAN devices machine-001... mapped."""
    (where / "devices").mkdir(parents=True, exist_ok=True)
    entries = "".join(
        f"  - dev_eui: 70b3d57ed001{n:04x}\n    sensor_id: machine-{n:03d}-clamp\n    codec: osm-v2\n"
        f"    tags: {{machine: press-{n:03d}, line: A}}\n"
        for n in range(1, devices + 1)
    )
    (where / "devices" / "site.yaml").write_text("devices:\n" + entries if entries else "devices: []\n")
    cfg = where / "gateway.yaml"
    cfg.write_text(
        "gateway: {id: gw-acme-leeds-01, tenant_id: acme, site_id: leeds}\n"
        "sources: [{kind: chirpstack}]\n"
        "cloud: {kind: directory, directory: out}\n"
        f"buffer: {buffer}\n" + extra
    )
    return cfg


def dev(n: int) -> DeviceKey:
    return DeviceKey("dev_eui", f"70b3d57ed001{n:04x}")


def heard(service: Service, n: int, t: int, seq: int, readings: int = 1) -> None:
    """Device n sent an uplink of `readings` current readings at `t` (data and receive time)."""
    up = DecodedUplink(
        f"chirpstack/{n}-{seq}",
        f"machine-{n:03d}-clamp",
        dev(n),
        t,
        {"f_cnt": seq},
        tuple(Reading("current", 1.5 + i, "A", t) for i in range(readings)),
    )
    service.buffer.store([to_record(up, 120 * 1024, True)])


def dead_letter(service: Service, n: int, t: int, seq: int) -> None:
    letter = DeadLetter(dev(n), f"chirpstack/{n}-{seq}", 1, "bad frame", b"\xff", t, sensor_id=f"machine-{n:03d}-clamp")
    service.buffer.store([letter])


Make = Callable[..., Service]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    made: list[Service] = []

    def build(devices: int, extra: str = "", buffer: str = "{path: buffer.db}") -> Service:
        service = Service(load_config(site(tmp_path / f"site{len(made)}", devices, extra, buffer)), sources=[])
        made.append(service)
        return service

    yield build
    for service in made:
        service.buffer.close()


def health_of(service: Service, started_ms: int | None = None) -> Health:
    if started_ms is None:
        return service.health
    return Health(service.config, service.reporter, version="1.0", started_ms=started_ms)


def test_every_message_and_the_will_are_valid_against_the_shipped_schema(make: Make) -> None:
    """online, stopped and offline (the will) all validate; the will carries only who and since when."""
    service = make(3)
    t = now_ms()
    heard(service, 1, t - 30_000, 1)
    dead_letter(service, 2, t - 1000, 2)
    for status in ("online", "stopped"):
        jsonschema.validate(service.health.message(status), SCHEMA)
    will = json.loads(offline_message(service.settings, "1.0", 1_795_000_000_000))
    jsonschema.validate(will, SCHEMA)
    assert will == {
        "schema": "hub.health.v1",
        "gateway_id": "gw-acme-leeds-01",
        "tenant_id": "acme",
        "site_id": "leeds",
        "status": "offline",
        "version": "1.0",
        "started_at": 1_795_000_000_000,
    }
    with pytest.raises(jsonschema.ValidationError):  # an online message must carry its state
        jsonschema.validate({k: v for k, v in service.health.message("online").items() if k != "backlog"}, SCHEMA)


def test_counts_cover_the_time_since_the_last_report(make: Make) -> None:
    """since_last_report and each device's readings and decode errors start again after each message."""
    service = make(2)
    health = service.health
    t = now_ms()
    heard(service, 1, t - 3000, 1, readings=3)
    heard(service, 1, t - 2000, 2, readings=3)
    dead_letter(service, 2, t - 1000, 3)
    service.intake.stats.readings = 6  # what intake counts as it stores (no intake thread here)
    first = health.message("online")
    devices = {d["sensor_id"]: d for d in first["devices"]["list"]}
    assert devices["machine-001-clamp"]["readings"] == 6 and devices["machine-001-clamp"]["decode_errors"] == 0
    assert devices["machine-002-clamp"]["decode_errors"] == 1
    assert first["since_last_report"]["readings"] == 6
    service.buffer.heartbeat()  # the counters move to the file in between: nothing counted twice
    heard(service, 1, t - 500, 3, readings=2)
    service.intake.stats.readings = 8
    second = health.message("online")
    devices = {d["sensor_id"]: d for d in second["devices"]["list"]}
    assert devices["machine-001-clamp"]["readings"] == 2
    assert devices["machine-002-clamp"]["decode_errors"] == 0
    assert second["since_last_report"]["readings"] == 2
    assert second["devices"]["heard"] == 1


def test_a_device_is_silent_after_three_of_its_intervals_or_never_heard(make: Make) -> None:
    """Silent: heard, then nothing for more than 3 usual intervals (and a minute more than one);
    never heard since the start, once the daemon has been up that long (3 health intervals
    when the interval is unknown). A device on time is not silent."""
    service = make(3)
    t = now_ms()
    for seq, at in enumerate((t - 20 * MINUTE, t - 19 * MINUTE, t - 18 * MINUTE)):  # every minute, then quiet
        heard(service, 1, at, seq)
    for seq, at in enumerate((t - 90_000, t - 60_000, t - 30_000)):  # every 30 s, on time
        heard(service, 2, at, 10 + seq)
    fresh = {d["sensor_id"]: d for d in health_of(service, started_ms=t - 1000).message("online")["devices"]["list"]}
    assert fresh["machine-001-clamp"]["silent"] and fresh["machine-001-clamp"]["interval_s"] == 60
    assert not fresh["machine-002-clamp"]["silent"]
    assert not fresh["machine-003-clamp"]["silent"]  # just started: not yet
    assert fresh["machine-003-clamp"]["last_seen"] is None
    later = {
        d["sensor_id"]: d for d in health_of(service, started_ms=t - 60 * MINUTE).message("online")["devices"]["list"]
    }
    assert later["machine-003-clamp"]["silent"]  # up an hour, never heard


def test_after_a_restart_a_device_is_judged_by_what_the_buffer_kept_of_it(make: Make, tmp_path: Path) -> None:
    """A device heard before the restart keeps its last_seen and interval in the first messages
    after it; it is not silent at once, and it is silent once overdue by its own interval."""
    service = make(1)
    t = now_ms()
    for seq, at in enumerate((t - 3 * MINUTE, t - 2 * MINUTE)):
        heard(service, 1, at, seq)
    service.buffer.heartbeat()  # what the daemon writes before it stops
    cfg = service.config.path
    service.buffer.close()
    again = Service(load_config(cfg), sources=[])
    try:
        entry = again.health.message("online")["devices"]["list"][0]
        assert entry["last_seen"] == t - 2 * MINUTE and entry["interval_s"] == 60
        assert not entry["silent"]  # two minutes: not yet 3 intervals and a minute
        late = Health(again.config, again.reporter, version="1", started_ms=t - 10 * MINUTE, before=again.health.before)
        assert late.message("online")["devices"]["list"][0]["silent"]
    finally:
        again.buffer.close()


def test_the_runway_is_the_nearer_of_max_size_and_a_full_disk() -> None:
    """Hours until max_size or the disk is full at the intake rate, whichever is first; none without intake."""
    assert runway(3600, 10**9, 1.0) == (3600.0, "max_size")
    assert runway(10**9, 7200, 2.0) == (3600.0, "disk")
    assert runway(3600, 10**9, 0.0)[1] is None


def test_the_runway_is_reported_in_hours_from_the_intake_of_the_window(make: Make) -> None:
    """Bytes stored between two snapshots give the rate; the runway is the room left at that rate."""
    service = make(1, buffer="{path: buffer.db, max_size: 10MiB}")
    clock = [1000.0]
    service.reporter._monotonic = lambda: clock[0]
    service.health.message("online")
    t = now_ms()
    for seq in range(50):
        heard(service, 1, t + seq, seq, readings=20)
    clock[0] += 100.0
    body = service.health.message("online")
    stored = service.buffer.stored_bytes_total
    rate = stored / 100.0
    expected_h = (10 * 1024**2 - service.buffer.bytes_on_disk) / rate / 3600
    assert body["runway"]["until"] == "max_size"
    assert body["runway"]["hours"] == pytest.approx(expected_h, rel=0.01)
    assert body["runway"]["intake_bytes_per_s"] == pytest.approx(rate, abs=0.1)


@pytest.mark.parametrize("devices", [60, 500])
def test_size_with_a_site_of_60_and_of_500_devices_stays_well_under_iot_cores_limit(make: Make, devices: int) -> None:
    """Every device heard, with long sensor ids and a refusal on record: the message stays under
    half of IoT Core's 128 KiB at 500 devices, and lists every device."""
    service = make(devices)
    t = now_ms()
    for n in range(1, devices + 1):
        heard(service, n, t - 60_000, 2 * n)
        heard(service, n, t - 30_000, 2 * n + 1)
    service.dispatcher.last_refusal = {"at_ms": t, "reason": "[code:151] quota exceeded", "reason_code": 151}
    body = service.health.message("online")
    size = len(encode(body))
    print(f"health message with {devices} devices: {size} bytes")
    assert body["devices"]["omitted"] == 0 and len(body["devices"]["list"]) == devices
    assert size < IOT_CORE_LIMIT // 2
    jsonschema.validate(body, SCHEMA)


def test_a_site_with_more_devices_than_fit_lists_the_silent_first_and_counts_the_rest(make: Make) -> None:
    """Past MAX_BYTES the list is cut: silent and failing devices first, the number left out said."""
    service = make(1200)
    t = now_ms()
    for n in range(2, 1201):
        heard(service, n, t - 1000, n)
    dead_letter(service, 1200, t, 99_999)
    body = health_of(service, started_ms=t - 60 * MINUTE).message("online")
    assert len(encode(body)) <= MAX_BYTES
    listed = body["devices"]["list"]
    assert listed[0]["sensor_id"] == "machine-001-clamp" and listed[0]["silent"]  # never heard, up an hour
    assert listed[1]["sensor_id"] == "machine-1200-clamp"  # decode errors next
    assert body["devices"]["omitted"] == 1200 - len(listed) > 0
    assert body["devices"]["mapped"] == 1200
    jsonschema.validate(body, SCHEMA)


def test_the_config_digest_follows_what_runs_not_the_files_comments(make: Make, tmp_path: Path) -> None:
    """A comment in a device map leaves the digest; a changed sensor_id changes it (after reload)."""
    service = make(2)
    first = service.health.digest
    maps = service.config.path.parent / "devices" / "site.yaml"
    maps.write_text("# the press shop\n" + maps.read_text())
    service.reload()
    assert service.health.digest == first
    maps.write_text(maps.read_text().replace("machine-002-clamp", "machine-002-spindle"))
    service.reload()
    assert service.health.digest != first
    assert service.health.message("online")["config_digest"] == service.health.digest


def test_health_topic_must_be_a_real_topic_apart_from_the_readings(tmp_path: Path) -> None:
    """A retained message needs a broker topic (not Basic Ingest), and the cloud tells health from
    readings by topic: the two must differ."""
    with pytest.raises(ValueError, match=r"Basic Ingest"):
        HealthSettings(topic="$aws/rules/health/{gateway_id}")
    with pytest.raises(ConfigError, match=r"health\.topic"):
        load_config(site(tmp_path, 1, 'health: {topic: "dt/hub/{tenant_id}/{site_id}/{gateway_id}/readings"}\n'))


def test_a_topic_too_long_once_the_ids_are_filled_in_is_refused(tmp_path: Path) -> None:
    """The template is checked alone; with a 63-character gateway id and 50-character tenant and
    site ids it may pass IoT Core's 256 bytes: `check` says so before a connection is refused."""
    cfg = site(tmp_path, 1, 'health: {topic: "' + "h" * 150 + '/{tenant_id}/{site_id}/{gateway_id}"}\n')
    long_ids = f"{{id: {'g' * 63}, tenant_id: {'t' * 50}, site_id: {'s' * 50}}}"
    cfg.write_text(cfg.read_text().replace("{id: gw-acme-leeds-01, tenant_id: acme, site_id: leeds}", long_ids))
    with pytest.raises(ConfigError, match=r"health\.topic is 316 bytes"):
        load_config(cfg)
