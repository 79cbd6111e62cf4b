"""What the buffer stores, and how a group of records becomes one compressed chunk row.

Storage does not read payloads: to it a record is bytes with a reading count, a receive time
and an idempotency key. A commit group becomes one `chunks` row: the records' index and
payloads compressed together, and the 8-byte digests of their keys beside them. One row per
commit, rather than one per uplink, is what keeps the bytes written to flash near the floor
(see docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence

from gateway.model import DeviceKey, Value, value_type

#: A commit group is cut into chunks of at most this many payload bytes (uncompressed), so a
#: catch-up burst of thousands of uplinks is several rows a take can read one at a time.
CHUNK_RAW_MAX = 64 * 1024
CHUNK_RECORDS_MAX = 2000
KEY_BYTES = 8
_LEVEL = 6


@value_type
class Record:
    """One uplink's readings, as intake hands them to storage.

    `payload` is opaque here (the gateway stores an uplink's series text, `wire.encode_series`);
    `key` makes intake idempotent: a second record with the same key is a duplicate.
    """

    key: str
    device: DeviceKey
    sensor_id: str | None
    received_ms: int
    readings: int
    payload: bytes
    #: The newest reading of each metric in the uplink, (metric, value, unit, t_ms): the device's
    #: latest values for `status`, kept beside the counters and written with the heartbeat only.
    latest: tuple[tuple[str, Value, str | None, int], ...] = ()


@value_type
class Stored:
    """A record as a take hands it back: what the batching stage needs to form a message."""

    received_ms: int
    readings: int
    payload: bytes


def digest(key: str) -> int:
    """An idempotency key as a 64-bit integer (collisions: about 1 in 10^9 at 100,000 keys)."""
    return int.from_bytes(hashlib.blake2b(key.encode(errors="surrogatepass"), digest_size=KEY_BYTES).digest(), "little")


def pack_keys(digests: Sequence[int]) -> bytes:
    return b"".join(d.to_bytes(KEY_BYTES, "little") for d in digests)


def unpack_keys(blob: bytes) -> list[int]:
    return [int.from_bytes(blob[i : i + KEY_BYTES], "little") for i in range(0, len(blob), KEY_BYTES)]


def cut(records: Sequence[Stored]) -> list[list[Stored]]:
    """A group's records in chunks of at most CHUNK_RAW_MAX payload bytes (one record at least)."""
    chunks: list[list[Stored]] = [[]]
    size = 0
    for r in records:
        if chunks[-1] and (size + len(r.payload) > CHUNK_RAW_MAX or len(chunks[-1]) >= CHUNK_RECORDS_MAX):
            chunks.append([])
            size = 0
        chunks[-1].append(r)
        size += len(r.payload)
    return [c for c in chunks if c]


def pack(records: Sequence[Stored]) -> bytes:
    """Records as one compressed blob: their lengths, reading counts and times, then payloads."""
    n = len(records)
    index = struct.pack(
        f"<I{n}I{n}I{n}q",
        n,
        *(len(r.payload) for r in records),
        *(r.readings for r in records),
        *(r.received_ms for r in records),
    )
    return zlib.compress(index + b"".join(r.payload for r in records), _LEVEL)


def unpack(blob: bytes) -> list[Stored]:
    """The records of a blob made by `pack`, in order."""
    raw = zlib.decompress(blob)
    (n,) = struct.unpack_from("<I", raw)
    fields = struct.unpack_from(f"<{n}I{n}I{n}q", raw, 4)
    lengths, readings, times = fields[:n], fields[n : 2 * n], fields[2 * n :]
    at = 4 + struct.calcsize(f"<{n}I{n}I{n}q")
    out = []
    for size, count, ms in zip(lengths, readings, times, strict=True):
        out.append(Stored(received_ms=ms, readings=count, payload=raw[at : at + size]))
        at += size
    return out
