"""The devices stage: mapping an uplink to its device, tenant check, decode, overrides."""

from __future__ import annotations

from gateway.config.devices import DeviceMap, MappedDevice, _entry_model
from gateway.devices import resolve
from gateway.model import (
    DeadLetter,
    DecodedUplink,
    DeviceKey,
    ForeignTenant,
    Reading,
    Unmapped,
    Uplink,
)

EUI = "70b3d57ed0001234"
TENANT = "52f14cd4-c6f1-4fbd-8f87-4025e1d49242"


def devices(**fields: object) -> DeviceMap:
    entry = _entry_model("osm-v2").model_validate({"dev_eui": EUI, "sensor_id": "press", "codec": "osm-v2", **fields})
    return DeviceMap({entry.key: MappedDevice(entry, "m.yaml", 1, 1)})


def up(payload: bytes, tenant: str | None = TENANT) -> Uplink:
    return Uplink(
        "chirpstack/1", DeviceKey("dev_eui", EUI), payload, 1000, 2000, 1, {"dev_eui": EUI, "rssi": -80}, None, tenant
    )


# CC1 single u16 12100, TEMP averaged (i32 thousandths) 21.5 / 20.0 / 23.25
FRAME = bytes.fromhex("02434331000102442f54454d500215fc53000015204e000015d25a0000")


def test_overrides_rename_scale_and_relabel_including_min_max() -> None:
    """metrics: CC1 -> spindle_current in A; an override of TEMP covers TEMP_min and TEMP_max."""
    m = devices(
        metrics={"CC1": {"name": "spindle_current", "scale": 0.001, "unit": "A"}, "TEMP": {"offset": 1}},
        tags={"machine": "press-03", "rssi": "tag-loses"},
    )
    out = resolve(up(FRAME), m)
    assert isinstance(out, DecodedUplink)
    assert out.readings == (
        Reading("spindle_current", 12.1, "A", 1000),
        Reading("TEMP", 22.5, "degC", 1000),
        Reading("TEMP_min", 21.0, "degC", 1000),
        Reading("TEMP_max", 24.25, "degC", 1000),
    )
    assert out.meta == {"machine": "press-03", "rssi": -80, "dev_eui": EUI}


def test_integer_scaling_stays_exact() -> None:
    """A whole scale and offset keep integers exact, even beyond 2**53."""
    big = bytes.fromhex("02434331000104") + (2**60 + 1).to_bytes(8, "little")
    out = resolve(up(big), devices(metrics={"CC1": {"scale": 2, "offset": 1}}))
    assert isinstance(out, DecodedUplink) and out.readings[0].value == 2 * (2**60 + 1) + 1


def test_unmapped_foreign_tenant_and_dead_letter_outcomes() -> None:
    """No map -> Unmapped; another ChirpStack tenant -> ForeignTenant; bad payload -> DeadLetter."""
    assert isinstance(resolve(up(FRAME), DeviceMap({})), Unmapped)
    m = devices(chirpstack_tenant_id=TENANT)
    assert isinstance(resolve(up(FRAME, tenant="00000000-0000-0000-0000-000000000000"), m), ForeignTenant)
    assert isinstance(resolve(up(FRAME), m), DecodedUplink)
    dead = resolve(up(FRAME[:-2]), m)
    assert isinstance(dead, DeadLetter) and dead.reason.startswith("osm-v2: ") and dead.payload == FRAME[:-2]


def test_tenant_check_fails_closed_when_the_uplink_names_no_tenant() -> None:
    """A map that expects a tenant drops an uplink whose tenant is absent, empty or not a UUID."""
    m = devices(chirpstack_tenant_id=TENANT)
    for tenant in (None, "", "not-a-uuid"):
        out = resolve(up(FRAME, tenant=tenant), m)
        assert isinstance(out, ForeignTenant) and out.expected == TENANT, tenant
    assert isinstance(resolve(up(FRAME, tenant=None), devices()), DecodedUplink)  # no tenant expected


def test_tenant_ids_compare_case_insensitively() -> None:
    """A tenant written in upper case, in the map or in the uplink, is the same tenant."""
    assert isinstance(resolve(up(FRAME), devices(chirpstack_tenant_id=TENANT.upper())), DecodedUplink)
    assert isinstance(resolve(up(FRAME, tenant=TENANT.upper()), devices(chirpstack_tenant_id=TENANT)), DecodedUplink)


def test_a_value_too_large_to_scale_is_a_dead_letter() -> None:
    """An OSM JSON integer of 400 digits under a scale override cannot become a double: the uplink
    is a dead letter saying so, never an exception out of the devices stage."""
    entry = _entry_model("osm-json").model_validate(
        {"osm_id": "0A1B2C3D", "sensor_id": "kettle", "codec": "osm-json", "metrics": {"X": {"scale": 0.5}}}
    )
    m = DeviceMap({entry.key: MappedDevice(entry, "m.yaml", 1, 1)})
    payload = b'{"UNIX": 1795000000, "VALUES": {"X": ' + b"9" * 400 + b"}}"
    uplink = Uplink("osm/0A1B2C3D/1795000000", DeviceKey("osm_id", "0A1B2C3D"), payload, 1000, 2000)
    out = resolve(uplink, m)
    assert isinstance(out, DeadLetter) and "too large to scale" in out.reason


def test_scaling_keeps_fifteen_significant_digits() -> None:
    """A u64 counter scaled by 0.001 keeps 15 significant digits (a double's exact ones), not 12."""
    frame = b"\x02" + b"CNT\x00" + b"\x01" + b"\x04" + (2**64 - 1).to_bytes(8, "little")
    out = resolve(up(frame), devices(metrics={"CNT": {"scale": 0.001}}))
    assert isinstance(out, DecodedUplink)
    assert out.readings[0].value == 1.84467440737096e16


def test_a_reload_names_a_corrected_id_as_a_change_of_that_sensor() -> None:
    """A field engineer who fixes a typo'd DevEUI reads one change of that sensor's id in the
    reload's log line, not a sensor added and the same sensor removed."""

    def mapped(*entries: tuple[str, str]) -> DeviceMap:
        by_key = {}
        for dev_eui, sensor in entries:
            entry = _entry_model("osm-v2").model_validate({"dev_eui": dev_eui, "sensor_id": sensor, "codec": "osm-v2"})
            by_key[entry.key] = MappedDevice(entry, "m.yaml", 1, 1)
        return DeviceMap(by_key)

    old = mapped(("70b3d57ed0003e97", "press-07-clamp"), ("70b3d57ed0001234", "press-03-clamp"))
    new = mapped(("70b3d57ed0003e91", "press-07-clamp"), ("70b3d57ed0005678", "hall-a-air"))
    assert new.changes_from(old) == {
        "added": ["hall-a-air (dev_eui:70b3d57ed0005678)"],
        "removed": ["press-03-clamp (dev_eui:70b3d57ed0001234)"],
        "changed": ["press-07-clamp (dev_eui:70b3d57ed0003e97 -> dev_eui:70b3d57ed0003e91)"],
    }
