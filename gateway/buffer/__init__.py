"""The durable buffer: SQLite between intake and the cloud.

The interface::

    intake ──store(records, dead letters, ...)──▶ Buffer ◀──take(live, max_raw)── batching stage
             (returns after fsync: ack upstream)    │          │ a Take: records, seq, gap
                                                    │          ▼
                                                    │   take.record()   written by the next commit:
                                                    │                   only then is it published
                                                    │   then ended exactly once:
                                                    │   take.confirm()  PUBACK success: gone
                                                    │   take.release()  later, same seq and bytes
                                                    │   take.reject(ls) refused for good: dead letters
                                                    │   take.divide(ps) too large: stored again in parts
                                                    │   (take.shrink(n) before its message is formed)
                                                    │
             mark_live() · depth() · live_waited() · enforce_bounds() · settle() · heartbeat() · close()
             `status` reads the file, closed or running, through `view.read`; the daemon's health
             and metrics through the open Buffer's read methods; neither through its tables

The life of a reading: intake decodes an uplink and the batching stage (`gateway.batching`)
makes it a `Record` (its series text, opaque here). `store` commits a group of records as one
compressed chunk and only then may intake acknowledge upstream. The record waits, live (stored
since the cloud connected, `mark_live`) or backlog, until `take` hands it out, oldest first, in
a `Take`; the batching stage makes the take a message, the next commit records the take
(`take.record()`: after a crash the same message goes again, same id and bytes), and only then
does the dispatcher publish it. IoT Core's PUBACK confirms the take and the record leaves the
buffer with its chunk's last confirmation (deleted by the next commit). A bound (`max_age`,
`max_size` under `drop-oldest`) may drop records not out in a take (a released take past
`max_age` included); the drop is counted and reported in the `meta.gap` of the next message.

The files, one job each:

- `files.py`: the file: pragmas, one daemon per file (flock), damage found and moved aside;
- `records.py`: what is stored, and a group as one compressed chunk;
- `schema.py`: the tables, and the totals the file holds;
- `core.py`: the open file, the state the parts share, the one write path, what rides on commits;
- `takes.py`: take, and the ends of a take;
- `bounds.py`: max_age and max_size, and the gap a drop leaves;
- `sqlite.py`: `Buffer`: store, settle, heartbeat, dead letters and unmapped uplinks, close;
- `side.py`: dead letters, unmapped uplinks, device counters and details beside the readings;
- `room.py`: room on disk, so a full disk still drains;
- `migrate.py`: a first-version file carried over;
- `view.py`: the read-only view `status` reads, closed or running;
- `results.py`: what store, depth and bounds answer.
"""

from gateway.buffer.core import SEEN_KEPT_ROWS
from gateway.buffer.files import (
    Recovered,
    connect,
    damage_marker,
    file_damage,
    integrity_problems,
    is_damage,
    is_disk_full,
    is_storage_failure,
    lock_path,
    mark_damaged,
    now_ms,
    quarantine,
)
from gateway.buffer.records import Record, Stored
from gateway.buffer.results import Depth, Gap, Heard, StoreResult
from gateway.buffer.sqlite import Buffer
from gateway.buffer.takes import Take, TakeState

__all__ = [
    "SEEN_KEPT_ROWS",
    "Buffer",
    "Depth",
    "Gap",
    "Heard",
    "Record",
    "Recovered",
    "StoreResult",
    "Stored",
    "Take",
    "TakeState",
    "connect",
    "damage_marker",
    "file_damage",
    "integrity_problems",
    "is_damage",
    "is_disk_full",
    "is_storage_failure",
    "lock_path",
    "mark_damaged",
    "now_ms",
    "quarantine",
]
