"""Golden codec cases: one folder per case under tests/golden/<codec>/<case>/, run by one test.

A case folder holds the input and what it must decode to:

- `payload.hex` (hex digits, whitespace ignored) or `payload.json` / `payload.txt` (the
  file's bytes exactly); no payload file means an empty payload;
- `context.json` (optional): `f_port`, `uplink_time_ms`, `received_ms`, `options` (validated
  by the codec's own options model, as a device map would) and `object` (ChirpStack's);
- `expected.json`: the readings as `[metric, value, unit, t_ms]` lists, in order, or
  `{"dead_letter": "<part of the reason>"}` when the payload must be rejected.

Values compare with their JSON type: `1` is an int, `1.0` a float, `true` a boolean.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.codecs import CODECS, DecodeContext, DecodeError

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
UPLINK_TIME_MS = 1_795_000_000_000
RECEIVED_MS = 1_795_000_000_500


def _cases() -> list[Any]:
    return [
        pytest.param(case, id=f"{case.parent.name}/{case.name}")
        for codec in sorted(p for p in GOLDEN.iterdir() if p.is_dir())
        for case in sorted(p for p in codec.iterdir() if p.is_dir())
    ]


def _payload(case: Path) -> bytes:
    hex_file = case / "payload.hex"
    if hex_file.exists():
        return bytes.fromhex("".join(hex_file.read_text().split()))
    for name in ("payload.json", "payload.txt"):
        if (case / name).exists():
            return (case / name).read_bytes()
    return b""


def _typed(value: Any) -> tuple[str, Any]:
    """A value with its type, so 1, 1.0 and True never compare equal."""
    return (type(value).__name__, value)


@pytest.mark.parametrize("case", _cases())
def test_golden_case(case: Path) -> None:
    """The codec named by the case's folder decodes its input to exactly the expected readings,
    or rejects it with a reason that contains the expected text."""
    codec = CODECS[case.parent.name]
    context = json.loads((case / "context.json").read_text()) if (case / "context.json").exists() else {}
    ctx = DecodeContext(
        uplink_time_ms=context.get("uplink_time_ms", UPLINK_TIME_MS),
        received_ms=context.get("received_ms", RECEIVED_MS),
        f_port=context.get("f_port", 1),
        object=context.get("object"),
        options=codec.options.model_validate(context.get("options", {})),
    )
    expected = json.loads((case / "expected.json").read_text())
    if isinstance(expected, dict):
        with pytest.raises(DecodeError) as raised:
            codec.decode(_payload(case), ctx)
        assert expected["dead_letter"] in str(raised.value)
        return
    readings = codec.decode(_payload(case), ctx)
    got = [[r.metric, _typed(r.value), r.unit, r.t_ms] for r in readings]
    assert got == [[m, _typed(v), u, t] for m, v, u, t in expected]


def test_every_codec_has_golden_cases() -> None:
    """Each registered codec has a folder of golden cases, including a rejected payload."""
    for name in CODECS:
        cases = [p for p in (GOLDEN / name).iterdir() if p.is_dir()] if (GOLDEN / name).is_dir() else []
        assert len(cases) >= 3, f"{name} has {len(cases)} golden cases"
        rejected = [c for c in cases if isinstance(json.loads((c / "expected.json").read_text()), dict)]
        assert rejected, f"{name} has no golden case of a rejected payload"
