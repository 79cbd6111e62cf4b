"""Field types shared by gateway.yaml and device maps: ids, durations, sizes, relative paths."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
)


class Strict(BaseModel):
    """Base of every config model: frozen, and an unknown key is an error, never a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# Matched with fullmatch: `$` would also accept a trailing newline (a YAML `|` block scalar).
# Spaces only, and ASCII digits only (`\d` would take any Unicode digit, which float() reads).
_DURATION = re.compile(r" *([0-9]+(?:\.[0-9]+)?) *(ms|s|m|h|d) *")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r" *([0-9]+(?:\.[0-9]+)?) *(B|KiB|MiB|GiB) *")
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
# A number with some other unit, to say which one was meant: sizes are binary (SPEC section 4),
# so `1GB` is refused with "did you mean 1GiB?" rather than read as 10^9 or 2^30 bytes.
_SIZE_ANY_UNIT = re.compile(r" *([0-9]+(?:\.[0-9]+)?) *([A-Za-z]*) *")
_SIZE_UNIT_MEANT = {
    **{u: "B" for u in ("b", "byte", "bytes")},
    **{u: "KiB" for u in ("k", "kb", "kib", "kbyte", "kbytes")},
    **{u: "MiB" for u in ("m", "mb", "mib", "mbyte", "mbytes")},
    **{u: "GiB" for u in ("g", "gb", "gib", "gbyte", "gbytes")},
}


def parse_duration(value: Any) -> float:
    """`500ms`, `5s`, `10m`, `2h`, `7d` (or a number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 5s, 10m, 2h or 7d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration: write 500ms, 5s, 10m, 2h or 7d")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a duration: write 500ms, 5s, 10m, 2h or 7d")
    if seconds <= 0:
        raise ValueError("a duration must be greater than zero")
    return seconds


def _unit_hint(number: str) -> str:
    """How to write a bare number as a size: in bytes, and the same in the largest whole unit."""
    try:
        n = int(float(number))
    except ValueError:
        return f"write e.g. {number}B, {number}KiB or {number}MiB"
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"if it is bytes, write {n}B (= {n // factor}{unit})"
    return f"if it is bytes, write {n}B; else {n}KiB or {n}MiB"


def parse_size(value: Any) -> int:
    """`512KiB`, `120KiB`, `1GiB`, `4096B` -> bytes.

    A unit is required: a bare `1024` could mean bytes, KiB or MiB, and guessing wrong sizes
    the buffer a million times off. Units are binary (B, KiB, MiB, GiB); `GB`, `MB`, `KB` and
    other spellings are refused with the binary unit they most likely meant.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("expected a size such as 120KiB, 64MiB or 1GiB")
    text = str(value)
    match = _SIZE.fullmatch(text)
    if match:
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
        if size <= 0:
            raise ValueError("a size must be greater than zero")
        return size
    other = _SIZE_ANY_UNIT.fullmatch(text)
    if other and not other.group(2):
        n = other.group(1)
        raise ValueError(f"size {n} has no unit: {_unit_hint(n)} (sizes take B, KiB, MiB, GiB)")
    meant = _SIZE_UNIT_MEANT.get(other.group(2).casefold()) if other else None
    if other and meant:
        raise ValueError(
            f"{text.strip()!r} is not a size: did you mean {other.group(1)}{meant}? "
            "(sizes take the binary units B, KiB, MiB, GiB)"
        )
    raise ValueError(f"{value!r} is not a size: write e.g. 120KiB, 64MiB or 1GiB")


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        return (Path(base) / value).resolve()
    return value


def schema_pattern(pattern: re.Pattern[str]) -> str:
    """The JSON-Schema (ECMA-262) form of a pattern used with `fullmatch`: anchored at both ends."""
    return f"^(?:{pattern.pattern})$"


def _id_pattern(max_len: int) -> re.Pattern[str]:
    return re.compile(rf"[a-z0-9][a-z0-9-]{{0,{max_len - 1}}}")


def _id_rule(max_len: int, what: str) -> Any:
    pattern = _id_pattern(max_len)

    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(
                f"{what} {value!r} must be 1-{max_len} lower-case ASCII letters (a-z), digits or '-', "
                "starting with a letter or digit"
            )
        return value

    return check


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(lambda s: f"{s:g}s", return_type=str),
    WithJsonSchema({"type": ["string", "number"], "pattern": schema_pattern(_DURATION)}),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"type": "string", "pattern": schema_pattern(_SIZE)}),
]
RelPath = Annotated[Path, AfterValidator(_resolve_path)]
GatewayId = Annotated[
    str,
    AfterValidator(_id_rule(63, "gateway id")),
    WithJsonSchema({"type": "string", "pattern": schema_pattern(_id_pattern(63))}),
]
TenantId = Annotated[
    str,
    AfterValidator(_id_rule(50, "id")),
    WithJsonSchema({"type": "string", "pattern": schema_pattern(_id_pattern(50))}),
]
