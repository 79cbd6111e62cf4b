"""Loading gateway.yaml and its device maps into typed objects, or every problem at once.

`check`, `run` and SIGHUP reloads share `load_config` / `load_device_maps`; each problem is
reported as FILE:LINE:COL: message, and the first problem never hides the others. Warnings
(`Config.warnings`, `DeviceMap.warnings`) are what validates but is most likely a mistake: `check`
prints them, `run` may log them, and neither fails on them.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError

from gateway.config.checks import syntax_hint, unknown_override_warnings
from gateway.config.devices import (
    DeviceEntry,
    DeviceEntryBase,
    DeviceMap,
    DeviceMapFile,
    MappedDevice,
)
from gateway.config.files import buffer_path_problems, check_files
from gateway.config.settings import Settings
from gateway.config.suggest import close_names, did_you_mean
from gateway.config.yamlfile import YamlDocument, load_yaml
from gateway.errors import ConfigError, Problem
from gateway.model import DeviceKey

__all__ = [
    "Config",
    "ConfigError",
    "ConfigReport",
    "DeviceMap",
    "Problem",
    "Settings",
    "check_files",
    "examine_config",
    "load_config",
    "load_device_maps",
    "load_settings",
    "read_device_maps",
]


@dataclass(frozen=True)
class Config:
    """A validated gateway.yaml and the device maps it names."""

    path: Path
    settings: Settings
    devices: DeviceMap
    #: Valid but most likely not meant (an override of a metric the codec never gives, a map file
    #: with no devices, a buffer directory `run` will create): printed by `check`, never fatal.
    warnings: tuple[Problem, ...] = ()


@dataclass(frozen=True)
class ConfigReport:
    """Everything `check` shows: the config when it has no problem, the problems, the warnings."""

    config: Config | None
    problems: list[Problem]
    warnings: list[Problem]


def _problems_from(exc: ValidationError, doc: YamlDocument, name: str, root_model: type[BaseModel]) -> list[Problem]:
    """Translate pydantic errors into positioned, field-engineer-readable problems."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = [part for part in err["loc"] if not _is_variant_tag(part)]
        kind = err["type"]
        if loc and loc[-1] == "[key]":
            # A bad dict key (a tag name): point at the key itself; the message names it.
            loc = loc[:-1]
            line, col = doc.locate_key(loc)
            path = ".".join(str(p) for p in loc[:-1])
            text = err["msg"].removeprefix("Value error, ")
            problems.append(Problem(name, line, col, f"{path}: key {loc[-1]!r}: {text}"))
            continue
        path = ".".join(str(p) for p in loc)
        if kind == "extra_forbidden":
            key = str(loc[-1]) if loc else "?"
            line, col = doc.locate_key(loc)
            parent = ".".join(str(p) for p in loc[:-1])
            message = f"unknown key {key!r}" + (f" in {parent}" if parent else "")
            known = _known_keys(root_model, err["loc"][:-1])
            close = difflib.get_close_matches(key, known, n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
            elif known:
                message += f" (expected one of: {', '.join(known)})"
        elif kind == "missing":
            line, col = doc.locate(loc[:-1])
            message = f"{path}: required key is missing"
        elif kind == "union_tag_invalid":
            line, col = doc.locate([*loc, err["ctx"]["discriminator"].strip("'")])
            tag, expected = err["ctx"]["tag"], err["ctx"]["expected_tags"]
            field = err["ctx"]["discriminator"].strip("'")
            hint = did_you_mean(str(tag), re.findall(r"'([^']*)'", expected))
            message = f"{path}.{field}: unknown {field} {tag!r} ({hint or f'known: {expected}'})"
        elif kind == "union_tag_not_found":
            line, col = doc.locate(loc)
            field = err["ctx"]["discriminator"].strip("'")
            message = f"{path}: required key {field!r} is missing"
            given = err.get("input")
            near = close_names(field, given) if isinstance(given, dict) else []
            if near:  # `codex: osm-json`: the typo, not only the key it hides
                message += f" (is {near[0]!r} a typo for {field!r}?)"
        else:
            line, col = doc.locate(loc)
            text = err["msg"].removeprefix("Value error, ") + syntax_hint(err.get("input"))
            message = f"{path}: {text}" if path else text
        problems.append(Problem(name, line, col, message))
    return problems


_VARIANT_TAGS: set[str] = set()


def _is_variant_tag(part: Any) -> bool:
    """Discriminated unions put the chosen tag in error locations; the YAML has no such key."""
    if not _VARIANT_TAGS:
        from gateway.codecs import CODECS

        _VARIANT_TAGS.update(CODECS, {"chirpstack", "osm-mqtt", "iot-core", "directory"})
    return isinstance(part, str) and part in _VARIANT_TAGS


def _nested_models(annotation: Any) -> tuple[list[type[BaseModel]], bool]:
    """The models inside an annotation (through Optional, list, dict, unions, Annotated);
    the flag says they are dict values, so the next location element is a free key."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation], False
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is dict and len(args) == 2:
        return _nested_models(args[1])[0], True
    models: list[type[BaseModel]] = []
    for arg in args:
        models += _nested_models(arg)[0]
    return models, False


def _known_keys(root: type[BaseModel], raw_loc: Sequence[Any]) -> list[str]:
    """The keys allowed where an unknown key was found, following the models along `raw_loc`."""
    models: list[type[BaseModel]] = [root]
    free_key = False
    for part in raw_loc:
        if isinstance(part, int):
            continue
        if free_key:
            free_key = False
            continue
        if _is_variant_tag(part):
            models = [m for m in models if _variant_tag(m) == part]
            continue
        found: list[type[BaseModel]] = []
        for model in models:
            field = model.model_fields.get(part)
            if field is not None:
                nested, free_key = _nested_models(field.annotation)
                found += nested
        models = found
    return sorted({key for model in models for key in model.model_fields})


def _variant_tag(model: type[BaseModel]) -> str | None:
    for name in ("kind", "codec"):
        field = model.model_fields.get(name)
        if field is not None and get_origin(field.annotation) is Literal:
            return str(get_args(field.annotation)[0])
    return None


def load_settings(path: Path | str) -> Settings:
    """gateway.yaml alone, without its device maps (what `status` needs); `ConfigError` if bad."""
    settings, problems = _load_settings(Path(path))
    if settings is None:
        raise ConfigError(problems)
    return settings


def _load_settings(path: Path) -> tuple[Settings | None, list[Problem]]:
    name = str(path)
    try:
        doc = load_yaml(path, name)
    except ConfigError as exc:
        return None, exc.problems
    if not isinstance(doc.root, dict):
        return None, [Problem(name, 1, 1, "expected a mapping with gateway, sources, cloud, ...")]
    try:
        settings = Settings.model_validate(doc.root, context={"base_dir": path.parent})
    except ValidationError as exc:
        return None, _problems_from(exc, doc, name, Settings)
    return settings, []


def _map_files(patterns: Sequence[str], base: Path) -> tuple[list[Path], list[str]]:
    """Expand the device-map globs; also return the patterns that match no file."""
    files: list[Path] = []
    unmatched = []
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        matched = sorted(Path(p) for p in glob.glob(full, recursive=True))
        if not matched:
            unmatched.append(pattern)
        files.extend(p for p in matched if p not in files)
    return files, unmatched


def load_device_maps(files: Sequence[Path]) -> DeviceMap:
    """Load and validate device-map files; raise `ConfigError` with every problem found.

    A `dev_eui`, `osm_id` or `sensor_id` defined twice, in one file or across files, is a
    problem at the second place that names the first. The map's `warnings` say what validates
    but is most likely a mistake.
    """
    devices, problems = _read_device_maps(files)
    if problems:
        raise ConfigError(problems)
    return devices


def _read_device_maps(files: Sequence[Path]) -> tuple[DeviceMap, list[Problem]]:
    """The devices of every valid entry (with the warnings) and the problems, sorted by position."""
    problems: list[Problem] = []
    warnings: list[Problem] = []
    by_key: dict[DeviceKey, MappedDevice] = {}
    by_sensor: dict[str, MappedDevice] = {}
    for path in files:
        name = str(path)
        try:
            doc = load_yaml(path, name)
        except ConfigError as exc:
            problems += exc.problems
            continue
        if not isinstance(doc.root, dict):
            problems.append(Problem(name, 1, 1, "expected a mapping with a 'devices' list"))
            continue
        try:
            parsed = DeviceMapFile.model_validate(doc.root)
            entries = list(enumerate(parsed.devices))
            file_tenant = parsed.chirpstack_tenant_id
            if not entries:
                warnings.append(_no_devices(doc))
        except ValidationError as exc:
            problems += _problems_from(exc, doc, name, DeviceMapFile)
            # Keep checking the valid entries, so one bad entry hides no duplicate.
            entries = _valid_entries(doc.root.get("devices"))
            file_tenant = None
        for i, entry in entries:
            warnings += unknown_override_warnings(entry, i, doc)
            # The file's tenant is that of its LoRaWAN devices; OSM units have none.
            if entry.chirpstack_tenant_id is None and file_tenant is not None and entry.dev_eui is not None:
                entry = entry.model_copy(update={"chirpstack_tenant_id": file_tenant})
            line, col = doc.locate(["devices", i])
            mapped = MappedDevice(entry, name, line, col)
            key = entry.key
            if key in by_key:
                at_line, at_col = doc.locate(["devices", i, key.kind])
                problems.append(
                    Problem(name, at_line, at_col, f"{key.kind} {key.id} is already defined at {by_key[key].where}")
                )
                continue
            if entry.sensor_id in by_sensor:
                at_line, at_col = doc.locate(["devices", i, "sensor_id"])
                first = by_sensor[entry.sensor_id].where
                problems.append(
                    Problem(name, at_line, at_col, f"sensor_id {entry.sensor_id!r} is already used at {first}")
                )
                continue
            by_key[key] = mapped
            by_sensor[entry.sensor_id] = mapped
    return DeviceMap(by_key, tuple(_by_position(warnings))), _by_position(problems)


def _by_position(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line, p.col))


def _no_devices(doc: YamlDocument) -> Problem:
    """A map file that maps nothing: saved empty, or the devices went to another file."""
    name = str(doc.path)
    if "devices" in doc.root:
        line, col = doc.locate_key(["devices"])
        return Problem(name, line, col, f"no devices in {name} (its devices list is empty)")
    what = "the file is empty" if not doc.root else "it has no 'devices' list"
    return Problem(name, 1, 1, f"no devices in {name} ({what})")


_ENTRY: TypeAdapter[DeviceEntryBase] = TypeAdapter(DeviceEntry)


def _valid_entries(raw: Any) -> list[tuple[int, DeviceEntryBase]]:
    """The entries of a raw `devices` list that validate on their own, with their index."""
    if not isinstance(raw, list):
        return []
    valid = []
    for i, item in enumerate(raw):
        try:
            valid.append((i, _ENTRY.validate_python(item)))
        except ValidationError:
            pass
    return valid


def load_config(path: Path | str, check_certs: bool = True) -> Config:
    """Load gateway.yaml and every device map; raise `ConfigError` listing all problems.

    The device maps are checked even when gateway.yaml has problems (with the globs it names,
    if those are readable), so one run of `check` shows everything. `check_certs` also checks
    the files gateway.yaml names: certificates, keys, the buffer's directory. An expired
    certificate is a warning here (`run` keeps buffering while the cloud refuses it), where
    `check` (`examine_config`) calls it a problem.
    """
    report = examine_config(path, check_certs, strict=False)
    if report.config is None:
        raise ConfigError(report.problems)
    return report.config


def examine_config(path: Path | str, check_certs: bool = True, strict: bool = True) -> ConfigReport:
    """Like `load_config`, but return the problems and warnings instead of raising: for `check`,
    which prints the warnings found alongside problems too. `strict`: an expired certificate or a
    CA file that contradicts its chain is a problem, not a warning."""
    path = Path(path)
    settings, problems = _load_settings(path)
    warnings: list[Problem] = []
    patterns = settings.devices if settings is not None else _raw_device_globs(path)
    files, unmatched = _map_files(patterns, path.parent)
    if unmatched:
        line, col = load_yaml(path).locate(["devices"])
        problems += [Problem(str(path), line, col, f"devices: {p!r} matches no file") for p in unmatched]
    if settings is not None and not settings.devices:
        line, col = load_yaml(path).locate(["devices"])
        warnings.append(Problem(str(path), line, col, "devices: names no device-map file; every uplink is unmapped"))
    if check_certs and settings is not None:
        file_problems, file_warnings = check_files(settings, path, strict)
        problems += file_problems
        warnings += file_warnings
        errors, notes = buffer_path_problems(settings.buffer.path, load_yaml(path))
        problems += errors
        warnings += notes
    devices, map_problems = _read_device_maps(files)
    problems += map_problems
    warnings += devices.warnings

    def order(p: Problem) -> tuple[bool, str, int, int]:
        return (p.file != str(path), p.file, p.line, p.col)

    problems.sort(key=order)
    warnings.sort(key=order)
    if problems or settings is None:
        return ConfigReport(None, problems, warnings)
    return ConfigReport(Config(path, settings, devices, tuple(warnings)), problems, warnings)


def _raw_device_globs(path: Path) -> list[str]:
    """The `devices` globs of a gateway.yaml that failed validation, when they are usable."""
    default: list[str] = list(Settings.model_fields["devices"].get_default(call_default_factory=True))
    try:
        root = load_yaml(path).root
    except ConfigError:
        return []
    if not isinstance(root, dict):
        return []
    globs = root.get("devices", default)
    if isinstance(globs, list) and all(isinstance(g, str) for g in globs):
        return list(globs)
    return []


def device_map_files(config: Config) -> list[Path]:
    """The device-map files gateway.yaml names, as they are on disk now (for reloads)."""
    return _map_files(config.settings.devices, config.path.parent)[0]


def read_device_maps(config: Path | str, settings: Settings) -> tuple[DeviceMap, list[Problem]]:
    """The device maps gateway.yaml names as they are on disk: every entry that validates, and
    the problems (never raises: `status` shows what it can while a map is broken)."""
    path = Path(config)
    files, unmatched = _map_files(settings.devices, path.parent)
    devices, problems = _read_device_maps(files)
    problems += [Problem(str(path), 1, 1, f"devices: {p!r} matches no file") for p in unmatched]
    return devices, problems
