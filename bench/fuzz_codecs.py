"""Fuzz every built-in codec: random and mutated frames must decode or raise DecodeError.

    python bench/fuzz_codecs.py [--frames N] [--seed S]

Throws N frames (default 1,000,000) at each codec: random bytes, and valid frames with bits
flipped, bytes replaced, inserted or deleted, cut short, extended or spliced together; for
`osm-json` also random JSON documents; for `chirpstack-object` random nested objects (with
NaN, infinities, nulls, empty keys, deep nesting) and uplinks without one. Anything but a
DecodeError, or a reading that could not go on the wire (an empty metric, a non-finite float,
a value of another type, a non-int time), stops the run with the frame that caused it.

Prints one line per codec (frames, decode errors, readings, seconds) and a total. Needs the
project importable (`make venv`, or PYTHONPATH=. from the repository root).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from gateway.codecs import CODECS, DecodeContext, DecodeError
from gateway.model import Reading

T = 1_795_000_000_000
RECEIVED = T + 500
PACKED_PORTS = {1: {"metric": "current", "scale": 0.01, "unit": "A"}, 2: {"metric": "count"}}

# --- valid frames, built from SPEC section 6 --------------------------------------------


def osm_v2_frame(rng: random.Random) -> bytes:
    """A valid OSM LoRaWAN frame of up to 117 bytes."""
    out = bytearray([rng.choice((1, 2, 2, 2))])
    for _ in range(rng.randint(0, 6)):
        name = bytes(rng.randint(0x21, 0x7E) for _ in range(rng.randint(1, 4))).ljust(4, b"\x00")
        count = rng.choice((1, 3))
        record = bytearray(name + bytes([1 if count == 1 else 2]))
        for _ in range(count):
            kind = rng.choice((1, 2, 3, 4, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x20))
            if kind == 0x20:
                text = bytes(rng.randint(0x20, 0x7E) for _ in range(rng.randint(0, 8)))
                record += bytes([kind]) + text.ljust(8, b"\x00")
                break  # a string is one value, even in an averaged record
            size = {1: 1, 2: 2, 3: 4, 4: 8, 0x15: 4, 0x16: 8}[kind & 0x0F if kind < 0x15 else kind]
            record += bytes([kind]) + rng.randbytes(size)
        out += record
    return bytes(out[:117])


def osm_json_frame(rng: random.Random) -> bytes:
    """A valid OSM Wi-Fi/PoE message as the firmware prints it."""
    values = []
    for _ in range(rng.randint(0, 8)):
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(rng.randint(1, 4)))
        pick = rng.random()
        if pick < 0.4:
            thousandths = rng.randint(-(2**31), 2**31 - 1)
            sign = "-" if thousandths < 0 else ""
            text = f"{sign}{abs(thousandths) // 1000}.{abs(thousandths) % 1000:03d}"
        elif pick < 0.8:
            text = str(rng.randint(-(2**40), 2**40))
        else:
            text = json.dumps(rng.choice(["a1b2c3d4", "23.5", "17", "OK", "", "x" * 22]))
        values.append(f'"{name}":{text}')
    unix = rng.choice((rng.randint(0, 2**31), 1_795_000_000, 42))
    return f'{{"UNIX":{unix},"NAME":"0x1A2B3C4D","VALUES":{{{",".join(values)}}}}}'.encode()


_LPP_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 100: 4, 101: 2, 102: 1, 103: 2, 104: 1, 113: 6, 115: 2,
              116: 2, 117: 2, 118: 4, 120: 1, 121: 2, 125: 2, 128: 2, 130: 4, 131: 4, 132: 2,
              133: 4, 134: 6, 135: 3, 136: 9, 142: 1}  # fmt: skip


def cayenne_frame(rng: random.Random) -> bytes:
    """A valid Cayenne LPP frame."""
    out = bytearray()
    for _ in range(rng.randint(0, 8)):
        type_id = rng.choice(list(_LPP_SIZES))
        out += bytes([rng.randint(0, 255), type_id]) + rng.randbytes(_LPP_SIZES[type_id])
    return bytes(out)


def packed_frame(rng: random.Random) -> bytes:
    """A valid packed-samples frame of up to 242 bytes."""
    sample_type = rng.randint(1, 6)
    size = {1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4}[sample_type]
    count = rng.randint(1, 236 // size)
    if sample_type == 6:
        body = struct.pack(f"<{count}f", *(rng.uniform(-1e6, 1e6) for _ in range(count)))
    else:
        body = rng.randbytes(count * size)
    return struct.pack("<BBHH", 1, sample_type, rng.randint(0, 65535), rng.randint(0, 65535)) + body


def random_object(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON-like value, with the awkward leaves a JavaScript codec can produce."""
    pick = rng.random()
    if depth < 5 and pick < 0.25:
        return {_key(rng): random_object(rng, depth + 1) for _ in range(rng.randint(0, 5))}
    if depth < 5 and pick < 0.4:
        return [random_object(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return rng.choice(
        (
            None,
            True,
            False,
            rng.randint(-(2**70), 2**70),
            rng.uniform(-1e9, 1e9),
            rng.choice((math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308)),
            "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 12))),
        )
    )


def _key(rng: random.Random) -> str:
    return rng.choice(("", "a", "b.c", "0", "temperature", "x" * 40, "é", "\x00"))


def deep_object(depth: int) -> dict[str, Any]:
    obj: dict[str, Any] = {"v": 1}
    for _ in range(depth):
        obj = {"a": obj}
    return obj


# --- mutations --------------------------------------------------------------------------


def mutate(rng: random.Random, frame: bytes, other: bytes) -> bytes:
    """One to three random edits of a valid frame."""
    data = bytearray(frame)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(data)) if data else 0
        if op == 0 and data:  # flip one bit
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:  # replace a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 2:  # insert bytes
            data[pos:pos] = rng.randbytes(rng.randint(1, 4))
        elif op == 3 and data:  # delete bytes
            del data[pos : pos + rng.randint(1, 4)]
        elif op == 4:  # cut short
            del data[pos:]
        elif op == 5:  # extend
            data += rng.randbytes(rng.randint(1, 16))
        elif op == 6:  # splice with another valid frame
            data = data[:pos] + other[rng.randint(0, len(other)) :]
        else:  # an interesting byte: boundaries of types, versions, lengths
            if data:
                data[rng.randrange(len(data))] = rng.choice((0, 1, 2, 0x7F, 0x80, 0xFF, 0x20, 0x16))
    return bytes(data)


def random_json(rng: random.Random) -> bytes:
    """A JSON document in roughly the OSM shape, with wrong types and non-finite numbers."""

    def value() -> Any:
        return rng.choice((1, -1.5, "23.5", "1e999", "nan", None, True, [], {}, 10**30, "x"))

    doc: dict[str, Any] = {}
    if rng.random() < 0.9:
        doc["UNIX"] = rng.choice((1_795_000_000, 0, -1, 10**16, "1795000000", 1.5, None, True))
    if rng.random() < 0.8:
        doc["NAME"] = rng.choice(("x", 7, None))
    if rng.random() < 0.9:
        doc["VALUES"] = rng.choice(({_key(rng) or "K": value() for _ in range(rng.randint(0, 5))}, [], "v"))
    text = json.dumps(doc)
    if rng.random() < 0.2:
        text = text.replace("1.5", rng.choice(("NaN", "Infinity", "-Infinity", "1e400")))
    return text.encode()


# --- the run ----------------------------------------------------------------------------

Generator = Callable[[random.Random], bytes]
SEEDS: dict[str, Generator] = {
    "osm-v2": osm_v2_frame,
    "osm-json": osm_json_frame,
    "cayenne-lpp": cayenne_frame,
    "packed-samples": packed_frame,
}


def check(reading: Reading) -> None:
    """A reading that could go on the wire: named, typed, finite, timed."""
    assert isinstance(reading.metric, str) and reading.metric, f"bad metric {reading.metric!r}"
    assert isinstance(reading.value, bool | int | float | str), f"bad value type {type(reading.value)}"
    if isinstance(reading.value, float):
        assert math.isfinite(reading.value), f"non-finite value {reading.value}"
    assert isinstance(reading.t_ms, int) and not isinstance(reading.t_ms, bool), "bad time"
    assert -(2**63) <= reading.t_ms < 2**63, "time outside int64"


def fuzz(name: str, frames: int, rng: random.Random) -> tuple[int, int, int, float]:
    """Decode `frames` fuzzed inputs with one codec; return frames, errors, readings, seconds."""
    codec = CODECS[name]
    options = codec.options.model_validate({"ports": PACKED_PORTS} if name == "packed-samples" else {})
    seed = SEEDS.get(name)
    pool = [seed(rng) for _ in range(256)] if seed else []
    errors = readings = 0
    started = time.perf_counter()
    for i in range(frames):
        obj: Any = None
        pick = rng.random()
        if name == "chirpstack-object":
            payload = b""
            if pick < 0.02:
                obj = None
            elif pick < 0.022:
                obj = deep_object(rng.randint(200, 1200))
            else:
                obj = {_key(rng) or "k": random_object(rng) for _ in range(rng.randint(0, 6))}
        elif pick < 0.15:
            payload = rng.randbytes(rng.randint(0, 250))
        elif pick < 0.25:
            payload = pool[i % len(pool)]
        elif name == "osm-json" and pick < 0.4:
            payload = random_json(rng)
        else:
            payload = mutate(rng, pool[rng.randrange(len(pool))], pool[rng.randrange(len(pool))])
        if i % 4096 == 4095 and seed:  # fresh seeds now and then
            pool[rng.randrange(len(pool))] = seed(rng)
        f_port = rng.choice((1, 1, 1, 1, 2, 2, 2, 3, 223, None))  # mostly ports packed-samples lists
        ctx = DecodeContext(T, RECEIVED, f_port=f_port, object=obj, options=options)
        try:
            out = codec.decode(payload, ctx)
            for reading in out:
                check(reading)
        except DecodeError:
            errors += 1
            continue
        except BaseException:
            print(f"FAIL {name}: frame {i} payload={payload.hex()} f_port={f_port}", file=sys.stderr)
            if obj is not None:
                print(f"  object={obj!r:.2000}", file=sys.stderr)
            traceback.print_exc()
            raise SystemExit(1) from None
        readings += len(out)
    return frames, errors, readings, time.perf_counter() - started


def _line(name: str, frames: int, errors: int, readings: int, seconds: float) -> str:
    return (
        f"fuzz {name:<18} frames={frames:>9,} decode_errors={errors:>9,} "
        f"readings={readings:>10,} seconds={seconds:6.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames per codec")
    parser.add_argument("--seed", type=int, default=20_260_101, help="random seed, for a repeatable run")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    frames = errors = readings = 0
    seconds = 0.0
    for name in CODECS:
        result = fuzz(name, args.frames, rng)
        print(_line(name, *result), flush=True)
        frames, errors, readings = frames + result[0], errors + result[1], readings + result[2]
        seconds += result[3]
    print(_line("TOTAL", frames, errors, readings, seconds), f"(seed {args.seed}; no exception but DecodeError)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
