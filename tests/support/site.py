"""A minimal gateway.yaml for tests that need a config but no brokers: a directory cloud, an
empty device map, the buffer at `buffer.db` beside it."""

from __future__ import annotations

from pathlib import Path


def directory_site(where: Path) -> Path:
    """Write the files under `where`; return the gateway.yaml path."""
    (where / "devices").mkdir(exist_ok=True)
    (where / "devices" / "a.yaml").write_text("devices: []\n")
    cfg = where / "gateway.yaml"
    cfg.write_text(
        "gateway: {id: gw-t-01, tenant_id: acme, site_id: leeds}\n"
        "sources: [{kind: chirpstack}]\n"
        "cloud: {kind: directory, directory: out}\n"
        "buffer: {path: buffer.db}\n"
    )
    return cfg
