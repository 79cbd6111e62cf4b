"""The per-uplink values: cheap to make, yet compared and hashed by their fields as frozen
dataclasses are (`model.value_type`, `Reading` a named tuple)."""

from __future__ import annotations

from gateway.buffer.records import Record
from gateway.model import DeviceKey, Reading, Uplink


def test_value_types_compare_and_hash_by_their_fields() -> None:
    """Two DeviceKeys with the same fields are one dict key; Uplinks equal by fields; a slots
    class takes no attribute it does not declare (no __dict__ to hide a typo in)."""
    counts = {DeviceKey("dev_eui", "70b3d57ed0001234"): 1}
    assert counts[DeviceKey("dev_eui", "70b3d57ed0001234")] == 1
    assert DeviceKey("dev_eui", "a") != DeviceKey("osm_id", "a")
    a = Uplink("chirpstack/1", DeviceKey("dev_eui", "a"), b"\x01", 5, 6)
    assert a == Uplink("chirpstack/1", DeviceKey("dev_eui", "a"), b"\x01", 5, 6)
    assert a != Uplink("chirpstack/2", DeviceKey("dev_eui", "a"), b"\x01", 5, 6)
    assert not hasattr(a, "__dict__")
    r = Record("k", DeviceKey("dev_eui", "a"), "s", 1, 1, b"x")
    assert hash(r) == hash(Record("k", DeviceKey("dev_eui", "a"), "s", 1, 1, b"x"))


def test_a_reading_is_the_metric_value_unit_time_tuple_that_latest_values_use() -> None:
    """`Record.latest` holds (metric, value, unit, t_ms): a Reading is exactly that tuple."""
    r = Reading("CC1", 12.5, "A", 1_700_000_000_000)
    metric, value, unit, t_ms = r
    assert (metric, value, unit, t_ms) == ("CC1", 12.5, "A", 1_700_000_000_000)
    assert r == ("CC1", 12.5, "A", 1_700_000_000_000)
    assert r._replace(value=1) == Reading("CC1", 1, "A", 1_700_000_000_000)
