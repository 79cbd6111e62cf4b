"""The `directory` cloud: each batch becomes a file `<batch_id>.json[.gz]`, written atomically.

For the demo, tests and sites that ship files some other way. A file is complete or absent:
it is written under a temporary name, fsynced, and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.cloud import Done, PublishResult
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

    def stop(self, timeout_s: float) -> None:
        """Nothing to release."""

    @property
    def connected(self) -> bool:
        """A directory is always there."""
        return True

    def publish(self, batch: Batch, done: Done) -> None:
        """Write the batch's bytes to its file; report success once they are on disk."""
        name = batch.batch_id + (".json.gz" if batch.gzip else ".json")
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(batch.payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            done(batch.seq, PublishResult(False, None, f"cannot write {final}: {exc.strerror or exc}"))
            return
        done(batch.seq, PublishResult(True, 0))
