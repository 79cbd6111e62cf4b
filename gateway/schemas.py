"""The JSON Schemas of gateway.yaml and device maps, generated from the config models."""

from __future__ import annotations

from typing import Any

from gateway.config.devices import DeviceMapFile
from gateway.config.settings import Settings


def schemas() -> dict[str, dict[str, Any]]:
    """{"gateway": schema of gateway.yaml, "devices": schema of a device-map file}."""
    out = {}
    for name, model, title in (
        ("gateway", Settings, "hub-gateway gateway.yaml"),
        ("devices", DeviceMapFile, "hub-gateway device map"),
    ):
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = title
        out[name] = schema
    return out
