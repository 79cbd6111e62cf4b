"""The codec contract: `decode(payload, ctx) -> list[Reading]`, pure, raising `DecodeError`."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from gateway.errors import DecodeError
from gateway.model import Reading, value_type

__all__ = ["Codec", "CodecOptions", "DecodeContext", "DecodeError", "NoOptions"]


class CodecOptions(BaseModel):
    """Base of every codec's `options` model: frozen, and a typo is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(CodecOptions):
    """For codecs that take no options."""


@value_type
class DecodeContext:
    """What a codec may know besides the payload bytes."""

    uplink_time_ms: int
    received_ms: int
    f_port: int | None = None
    #: ChirpStack's decoded `object`, for the `chirpstack-object` codec.
    object: Mapping[str, Any] | None = None
    options: CodecOptions = field(default_factory=NoOptions)


@dataclass(frozen=True, slots=True)
class Codec:
    """A registered codec: its name in device maps, its options model, its decode function."""

    name: str
    options: type[CodecOptions]
    decode: Callable[[bytes, DecodeContext], list[Reading]]
    #: Units by the metric name the codec produces, applied when it gives none.
    default_units: Mapping[str, str] | None = None
    #: The metric names the codec gives for a device with these options (`NAME_min` and
    #: `NAME_max` included where it gives them), so `check` can flag a device-map override
    #: that matches none of them; None where the device decides (chirpstack-object).
    metric_names: Callable[[CodecOptions], Collection[str]] | None = None
