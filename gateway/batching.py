"""The batching stage: uplinks become records for the buffer, takes become messages.

Beside `wire.py`, it is the only place that knows what a record's payload is (an uplink's
series text) and what a message is made of: the `hub.readings.v1` header, the batch id from
the take's seq, a pending gap in `meta`, gzip. The buffer stores and hands back opaque bytes.

- `to_record`: a decoded uplink as a buffer record, or a dead letter when the cloud could
  never take it (NaN, an integer beyond NUMBER(38), a lone surrogate, too big for a message).
- `Batcher.form`: the next take made into a message of at most `max_bytes`, learning the
  compression ratio so takes come the right size.
- `Batcher.split`: a message the link refused as too large, cut into smaller ones (series
  divided, t/v arrays cut when one series is too big), or a lone reading moved to the dead
  letters.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from typing import Any

from gateway import wire
from gateway.buffer import Buffer, Gap, Record, Stored, Take
from gateway.model import Batch, DeadLetter, DecodedUplink, DeviceKey, Reading, Value

#: Integers the cloud can store: Snowflake's NUMBER(38).
CLOUD_INT_LIMIT = 10**38
#: Room left in a message around one uplink's series (header, brackets, a gap's meta).
MESSAGE_OVERHEAD = 1024

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _unencodable(uplink: DecodedUplink) -> str | None:
    """Which value of the uplink JSON cannot hold (NaN, infinity), in words, or None."""
    for key, value in uplink.meta.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"meta field {key!r} is {value} (not a finite number)"
    for r in uplink.readings:
        if isinstance(r.value, float) and not math.isfinite(r.value):
            return f"{r.metric} is {r.value} (not a finite number)"
    return None


def as_dead_letter(uplink: DecodedUplink, reason: str) -> DeadLetter:
    """A decoded uplink the cloud cannot take, kept with its raw payload and the reason."""
    return DeadLetter(
        device=uplink.device,
        source=uplink.source,
        f_port=uplink.meta.get("f_port") if isinstance(uplink.meta.get("f_port"), int) else None,
        reason=reason,
        payload=uplink.payload,
        received_ms=uplink.received_ms,
        sensor_id=uplink.sensor_id,
        dedup_key=uplink.dedup_key,
    )


def gap_meta(gap: Gap) -> dict[str, Any]:
    """A gap the buffer reports (readings a bound dropped) as the `meta.gap` of the message."""
    return {
        "readings": gap.readings,
        "uplinks": gap.uplinks,
        "from": gap.from_ms,
        "to": gap.to_ms,
        "reason": ", ".join(gap.reasons),
    }


def series_problem(uplink: DecodedUplink, max_bytes: int, compress: bool) -> tuple[str, str | None]:
    """The uplink's series text, or why it can never be sent (then it is a dead letter)."""
    if not uplink.readings:
        return "", None
    for r in uplink.readings:
        if type(r.value) is int and not -CLOUD_INT_LIMIT < r.value < CLOUD_INT_LIMIT:
            digits = len(str(abs(r.value))) if abs(r.value) < 10**4000 else "thousands of"
            return "", (
                f"{r.metric} is an integer of {digits} digits; the cloud's NUMBER holds at most 38 "
                "(a dead letter rather than a rounded or text value)"
            )
    try:
        series = wire.encode_series(uplink)
    except (ValueError, TypeError, OverflowError) as exc:  # NaN in meta, a value JSON cannot hold
        return "", f"readings cannot be encoded for the cloud: {_unencodable(uplink) or exc}"
    if not series.isascii():
        try:
            series.encode()
        except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800"): not text the cloud takes
            return "", f"readings cannot be encoded for the cloud: {exc.reason} at character {exc.start}"
    # The configured size, not what the link taught the batcher since: an uplink bigger than the
    # link takes is still sent, in parts (`split`), as long as each reading fits.
    room = max_bytes - MESSAGE_OVERHEAD
    if len(series) * 4 <= room:  # UTF-8 takes at most 4 bytes a character: fits for sure
        return series, None
    raw = series.encode()
    if len(raw) <= room or (compress and len(wire.compress(raw)) <= room):
        return series, None
    return "", (
        f"the uplink's {len(uplink.readings)} readings take {len(raw)} bytes encoded, more than one "
        f"message may carry (batch.max_bytes {max_bytes}): it could never be sent"
    )


def to_record(uplink: DecodedUplink, max_bytes: int = 120 * 1024, compress: bool = True) -> Record | DeadLetter:
    """A decoded uplink as the buffer stores it, or a dead letter with the reason."""
    series, problem = series_problem(uplink, max_bytes, compress)
    if problem is not None:
        return as_dead_letter(uplink, problem)
    return Record(
        key=uplink.dedup_key or uplink.source,
        device=uplink.device,
        sensor_id=uplink.sensor_id,
        received_ms=uplink.received_ms,
        readings=len(uplink.readings),
        payload=series.encode(),
        latest=latest_readings(uplink),
    )


def latest_readings(uplink: DecodedUplink) -> tuple[tuple[str, Value, str | None, int], ...]:
    """The newest reading of each metric of an uplink, as `Record.latest` carries it."""
    readings = uplink.readings
    newest: dict[str, Reading] = {}
    for r in readings:
        held = newest.get(r.metric)
        if held is None or r.t_ms >= held.t_ms:
            newest[r.metric] = r
    if len(newest) == len(readings):  # each metric once (the usual uplink): all are the newest
        return readings
    return tuple(newest.values())


@dataclass(frozen=True)
class Ids:
    """Who the messages are from (every header carries them)."""

    gateway_id: str
    tenant_id: str
    site_id: str


class Batcher:
    """Makes takes of the buffer into messages no larger than `max_bytes`."""

    def __init__(self, buffer: Buffer, ids: Ids, max_bytes: int = 120 * 1024, compress: bool = True) -> None:
        self.buffer = buffer
        self.ids = ids
        #: Lowered by the dispatcher when the link refuses a message as too large.
        self.max_bytes = max_bytes
        self.configured_max_bytes = max_bytes
        self.gzip = compress
        self._ratio = 0.2 if compress else 1.0  # compressed / raw size, learnt from each message

    def batch_id(self, seq: int) -> str:
        return f"{self.ids.gateway_id}-{seq:012d}"

    def live_due(self, max_delay_s: float, at: float | None = None) -> bool:
        """True when live readings should go now: one has waited max_delay, or they fill a message.

        Waiting is measured on the monotonic clock, so a wall-clock step does not change when
        readings are sent.
        """
        waited = self.buffer.live_waited(at)
        if waited is None:
            return False
        return waited >= max_delay_s or self.live_full()

    def live_full(self) -> bool:
        """True when the live readings waiting fill a message."""
        return self.buffer.depth(live=True).bytes * self._ratio >= self.max_bytes * 0.9

    def live_due_in(self, max_delay_s: float) -> float | None:
        """Seconds until the oldest live reading has waited `max_delay_s` (0: it has); None when
        no live reading waits. (Live readings that fill a message are due at the commit that
        brought them, which the caller learns of by itself.)"""
        waited = self.buffer.live_waited()
        return None if waited is None else max(0.0, max_delay_s - waited)

    def form(self, live: bool) -> Batch | None:
        """The next message, live or backlog; a released take comes back with its same bytes.

        Its take is recorded with the buffer's next commit: publish it only once
        `batch.take.recorded` (the dispatcher waits), so that after a crash it is sent again
        with the same id and bytes.
        """
        take = self.buffer.take(live, max_raw=max(1, int(self.max_bytes * 0.9 / self._ratio)))
        if take is None:
            return None
        if take.message is None:
            self._encode(take)
        take.record()
        return self._batch(take)

    def _batch(self, take: Take) -> Batch:
        assert take.message is not None
        return Batch(
            seq=take.seq,
            batch_id=self.batch_id(take.seq),
            payload=take.message,
            readings=take.readings,
            gzip=self.gzip,
            created_ms=take.created_ms,
            take=take,
        )

    def _message(self, take: Take, texts: list[str]) -> tuple[bytes, bytes]:
        header = wire.Header(
            batch_id=self.batch_id(take.seq),
            gateway_id=self.ids.gateway_id,
            tenant_id=self.ids.tenant_id,
            site_id=self.ids.site_id,
            created_at=take.created_ms,
            meta={"gap": gap_meta(take.gap)} if take.gap else None,
        )
        body = wire.assemble(header, texts)
        return body, wire.compress(body) if self.gzip else body

    def _encode(self, take: Take) -> None:
        while True:
            body, payload = self._message(take, [r.payload.decode() for r in take.records])
            if len(payload) <= self.max_bytes or len(take.records) == 1 or take.recorded:
                break  # a recorded take is sent as it was formed (a refusal splits it)
            take.shrink(max(1, len(take.records) * 3 // 4))
        if self.gzip:
            # Learn the compression ratio, leaning towards caution.
            self._ratio = max(0.02, min(1.0, 0.7 * self._ratio + 0.3 * (len(payload) / len(body)) * 1.1))
        take.message = payload

    def split(self, batch: Batch, max_bytes: int, reason: str) -> tuple[list[Batch], int]:
        """Replace `batch`, refused as too large, by two or more of the same readings, each at
        most `max_bytes` where one reading allows; a batch of one reading cannot shrink: it moves
        to the dead letters with `reason`. Returns the new batches, oldest first, and the number
        of readings that became dead letters. One commit either way.
        """
        take = batch.take
        assert take is not None
        series = [(r, s) for r in take.records for s in json.loads("[" + r.payload.decode() + "]")]
        if take.readings <= 1:
            take.reject([_letter(r, s, reason, batch.seq) for r, s in series])
            return [], take.readings
        parts = _pack(series, max_bytes, lambda texts: len(self._message(take, texts)[1]), self._ratio_of(batch))
        takes = take.divide(
            [
                [
                    Stored(
                        min(r.received_ms for r, _ in part),
                        sum(len(s["t"]) for _, s in part),
                        ",".join(_dumps(s) for _, s in part).encode(),
                    )
                ]
                for part in parts
            ]
        )
        out = []
        for t in takes:
            _, t.message = self._message(t, [r.payload.decode() for r in t.records])
            out.append(self._batch(t))
        return out, 0

    def _ratio_of(self, batch: Batch) -> float:
        """Compressed / raw size of a message."""
        return len(batch.payload) / max(1, len(gzip.decompress(batch.payload))) if batch.gzip else 1.0


Piece = tuple[Stored, dict[str, Any]]


def _letter(r: Stored, s: dict[str, Any], reason: str, seq: int) -> DeadLetter:
    meta = s.get("meta") or {}
    device = (
        DeviceKey("dev_eui", str(meta["dev_eui"]))
        if "dev_eui" in meta
        else DeviceKey("osm_id", str(meta["osm_id"]))
        if "osm_id" in meta
        else None
    )
    return DeadLetter(
        device=device,
        source=s.get("source") or f"batch/{seq}",
        f_port=meta.get("f_port") if isinstance(meta.get("f_port"), int) else None,
        reason=reason,
        payload=_dumps(s).encode(),
        received_ms=r.received_ms,
        sensor_id=s.get("sensor_id"),
    )


def _pack(series: list[Piece], max_bytes: int, size_of_message: Any, ratio: float) -> list[list[Piece]]:
    """Series packed into parts by estimated encoded size, cut along t/v where one is too big;
    each part's real size is then checked and halved while over `max_bytes`."""

    def readings(part: list[Piece]) -> int:
        return sum(len(s["t"]) for _, s in part)

    def halves(part: list[Piece]) -> list[list[Piece]]:
        if len(part) == 1:
            r, s = part[0]
            n = len(s["t"]) // 2
            return [[(r, {**s, "t": s["t"][:n], "v": s["v"][:n]})], [(r, {**s, "t": s["t"][n:], "v": s["v"][n:]})]]
        cut, acc, total = 1, 0, readings(part)
        for i, (_, s) in enumerate(part[:-1], 1):
            acc += len(s["t"])
            cut = i
            if acc * 2 >= total:
                break
        return [part[:cut], part[cut:]]

    parts: list[list[Piece]] = []

    def place(part: list[Piece], force: bool = False) -> None:
        # Depth first, left to right, so parts keep the readings' order.
        if (force or size_of_message([_dumps(s) for _, s in part]) > max_bytes) and readings(part) > 1:
            for half in halves(part):
                place(half)
            return
        parts.append(part)

    room = max(1, int(max_bytes * 0.9 / max(ratio, 0.02)) - 512)
    packed: list[list[Piece]] = [[]]
    used = 0
    for r, s in series:
        text = len(_dumps(s)) + 1
        n = len(s["t"])
        pieces = max(1, min(n, -(-text // room)))
        step = -(-n // pieces)
        for i in range(0, n, step):
            piece = s if pieces == 1 else {**s, "t": s["t"][i : i + step], "v": s["v"][i : i + step]}
            size = text if pieces == 1 else len(_dumps(piece)) + 1
            if packed[-1] and used + size > room:
                packed.append([])
                used = 0
            packed[-1].append((r, piece))
            used += size
    if len(packed) == 1:
        place(packed[0], force=True)  # refused as it is: at least two parts
    else:
        for part in packed:
            place(part)
    return parts
