"""`packed-samples`: this project's open format for high-rate sensors, many samples per uplink.

Vendor: open (published in docs/packed-samples.md for any device maker). Devices: 1 Hz
machine-utilisation sensors (current clamps, vibration, spindle load) that buffer samples and
send them together. fPorts: chosen by the device maker; each fPort the device uses is listed in
`options.ports` and picks the metric, scale, offset and unit of its samples.

Frame, little-endian:

    byte 0     version, 1
    byte 1     sample type: 1 u8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32
    bytes 2-3  u16 sample period in ms
    bytes 4-5  u16 delay in ms from the last sample to transmission
    then       N >= 1 samples, back to back

Sample i of N (0-based) is at `uplink_time - delay - (N-1-i) * period`. Each value is
`sample * scale + offset`; integers stay exact integers when scale and offset are whole.
"""

from __future__ import annotations

import math
import struct
from typing import Annotated

from pydantic import Field, StringConstraints

from gateway.codecs.base import Codec, CodecOptions, DecodeContext, DecodeError
from gateway.model import Reading, Value

VERSION = 1
HEADER_SIZE = 6
F32 = 6
# sample type -> struct format of one sample
SAMPLE_FORMATS: dict[int, str] = {1: "B", 2: "H", 3: "h", 4: "I", 5: "i", F32: "f"}
_HEADER = struct.Struct("<BBHH")

# The device-map rule for metric names (gateway.config.devices imports the codecs, so the
# rule is repeated here rather than imported).
MetricName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")]
FPort = Annotated[int, Field(ge=1, le=255)]


class PortOptions(CodecOptions):
    """What the samples on one fPort are."""

    metric: MetricName = Field(description="Metric name of the samples on this fPort.")
    scale: float = Field(default=1.0, allow_inf_nan=False, description="Multiply each sample by this.")
    offset: float = Field(default=0.0, allow_inf_nan=False, description="Then add this.")
    unit: str | None = Field(default=None, max_length=32, description="Unit of the scaled value.")


class PackedSamplesOptions(CodecOptions):
    """Options of `packed-samples`."""

    ports: dict[FPort, PortOptions] = Field(
        default_factory=dict,
        description="By fPort: the metric, scale, offset and unit of the samples it carries. "
        "An uplink on a port not listed here is a dead letter.",
    )


def _scaled(value: int | float, scale: float, offset: float) -> Value:
    """value * scale + offset, as gateway.devices scales device-map overrides."""
    if scale == 1 and offset == 0:
        return value
    if isinstance(value, int) and scale.is_integer() and offset.is_integer():
        return value * int(scale) + int(offset)
    # 12100 * 0.001 is 12.100000000000001 in binary; no sensor has that precision.
    return float(f"{value * scale + offset:.15g}")


def _f32(raw: bytes, value: float) -> float:
    """The shortest decimal that is the same f32: 0.1, not 0.10000000149011612."""
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == raw:
            return candidate
    return value


def decode(payload: bytes, ctx: DecodeContext) -> list[Reading]:
    """Decode one packed-samples frame into timed readings of the metric its fPort names."""
    options = ctx.options
    assert isinstance(options, PackedSamplesOptions)
    if ctx.f_port is None:
        raise DecodeError("uplink has no fPort; packed-samples picks the metric by fPort")
    port = options.ports.get(ctx.f_port)
    if port is None:
        listed = ", ".join(str(p) for p in sorted(options.ports)) or "none"
        raise DecodeError(f"fPort {ctx.f_port} is not in options.ports (listed: {listed})")
    if len(payload) < HEADER_SIZE:
        raise DecodeError(f"frame of {len(payload)} bytes is shorter than the 6-byte header")
    version, sample_type, period, delay = _HEADER.unpack_from(payload)
    if version != VERSION:
        raise DecodeError(f"unknown version {version} (expected 1)")
    fmt = SAMPLE_FORMATS.get(sample_type)
    if fmt is None:
        raise DecodeError(f"unknown sample type {sample_type} (1 u8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32)")
    size = struct.calcsize(fmt)
    body = len(payload) - HEADER_SIZE
    count, extra = divmod(body, size)
    if extra:
        raise DecodeError(f"{body} bytes of samples is not a whole number of {size}-byte samples")
    if count == 0:
        raise DecodeError("frame has no samples")
    samples = struct.unpack_from(f"<{count}{fmt}", payload, HEADER_SIZE)
    last = ctx.uplink_time_ms - delay
    first = last - (count - 1) * period
    metric, unit, scale, offset = port.metric, port.unit, port.scale, port.offset
    readings = []
    for i, sample in enumerate(samples):
        if sample_type == F32:
            if not math.isfinite(sample):
                raise DecodeError(f"sample {i} is {sample} (not a finite number)")
            at = HEADER_SIZE + i * size
            sample = _f32(payload[at : at + size], sample)
        value = _scaled(sample, scale, offset)
        if isinstance(value, float) and not math.isfinite(value):
            raise DecodeError(f"sample {i} scaled is {value} (not a finite number)")
        readings.append(Reading(metric, value, unit, first + i * period))
    return readings


def metric_names(options: CodecOptions) -> frozenset[str]:
    """The metrics `options.ports` names: the codec gives no other."""
    assert isinstance(options, PackedSamplesOptions)
    return frozenset(port.metric for port in options.ports.values())


CODEC = Codec(name="packed-samples", options=PackedSamplesOptions, decode=decode, metric_names=metric_names)
