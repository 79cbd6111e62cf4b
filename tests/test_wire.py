"""The hand-tuned series encoder writes exactly what the JSON encoder would."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from gateway import wire
from gateway.model import DecodedUplink, DeviceKey, Reading

names = st.text(min_size=1, max_size=8)
values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=6),
)
readings = st.lists(
    st.builds(
        Reading, st.sampled_from(["CC1", "TEMP", 'é"x']), values, st.one_of(st.none(), names), st.integers(0, 2**45)
    ),
    min_size=1,
    max_size=12,
)
#: What meta holds: the network's values (dev_eui, f_cnt, rssi, snr) and the map's tags (text,
#: numbers, booleans), under any key a tag may have; None and a list take the encoder's path.
metas = st.dictionaries(
    st.one_of(st.sampled_from(["dev_eui", "f_cnt", "snr", "machine"]), st.text(max_size=6)),
    st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.none(),
        names,
        st.lists(st.integers(), max_size=2),
    ),
    max_size=5,
)


def reference(uplink: DecodedUplink) -> str:
    """The series as json.dumps writes them (compact separators), joined by commas."""
    groups: dict[tuple[str, str | None], tuple[list[object], list[object]]] = {}
    for r in uplink.readings:
        ts, vs = groups.setdefault((r.metric, r.unit), ([], []))
        ts.append(r.t_ms)
        vs.append(r.value)
    out = []
    for (metric, unit), (ts, vs) in groups.items():
        series: dict[str, object] = {"sensor_id": uplink.sensor_id, "metric": metric}
        if unit is not None:
            series["unit"] = unit
        series["source"] = uplink.source
        if uplink.meta:
            series["meta"] = dict(uplink.meta)
        series["t"], series["v"] = ts, vs
        out.append(json.dumps(series, separators=(",", ":"), ensure_ascii=False, allow_nan=False))
    return ",".join(out)


@given(readings, metas, names, names)
def test_encode_series_equals_the_json_encoder(
    rs: list[Reading], meta: dict[str, object], sensor: str, src: str
) -> None:
    """Same text as json.dumps for any values, units, names and meta (fast paths included)."""
    uplink = DecodedUplink(f"chirpstack/{src}", sensor, DeviceKey("dev_eui", "00"), 1, meta, tuple(rs))
    assert wire.encode_series(uplink) == reference(uplink)
