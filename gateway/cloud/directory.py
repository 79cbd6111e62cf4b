"""The `directory` cloud: each batch becomes a file `<batch_id>.json[.gz]`, written atomically.

For the demo, tests and sites that ship files some other way. A file is complete or absent:
it is written under a temporary name, fsynced, and renamed. A state message (the health
message) replaces `state/<last topic level>.json`, as a retained message replaces the last: in a
directory of its own, so whatever collects `*.json` batches never takes it for one.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.cloud import Done, PublishResult, StateDone
from gateway.model import Batch


class DirectoryPublisher:
    """Writes batches as files; always connected."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.epoch = 0

    def start(self) -> None:
        """Create the directory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.epoch += 1

    def stop(self, timeout_s: float, send_will: bool = False) -> None:
        """Nothing to release (and no connection to leave a will on)."""

    @property
    def connected(self) -> bool:
        """A directory is always there."""
        return True

    def publish(self, batch: Batch, done: Done) -> None:
        """Write the batch's bytes to its file; report success once they are on disk."""
        name = batch.batch_id + (".json.gz" if batch.gzip else ".json")
        done(batch.seq, _write(self.directory, name, batch.payload))

    def publish_state(self, topic: str, payload: bytes, content_type: str, done: StateDone) -> None:
        """Replace `state/<last topic level>.json` with the payload."""
        state = self.directory / "state"
        try:
            state.mkdir(exist_ok=True)
        except OSError as exc:
            done(PublishResult(False, None, f"cannot create {state}: {exc.strerror or exc}"))
            return
        done(_write(state, topic.rsplit("/", 1)[-1] + ".json", payload))


def _write(directory: Path, name: str, payload: bytes) -> PublishResult:
    """Write a file atomically and durably: complete under its name, or absent."""
    final = directory / name
    tmp = directory / f".{name}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        return PublishResult(False, None, f"cannot write {final}: {exc.strerror or exc}")
    return PublishResult(True, 0)
