"""Configuration: gateway.yaml and device maps load into typed objects or report every problem
as FILE:LINE:COL: message."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_config, load_device_maps
from gateway.config.types import parse_duration, parse_size
from gateway.model import DeviceKey
from gateway.schemas import schemas
from tests.support.certs import TestCerts

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
gateway: {id: gw-t-01, tenant_id: acme, site_id: leeds}
sources:
  - kind: chirpstack
  - kind: osm-mqtt
    broker: {host: 127.0.0.1, port: 1884}
cloud: {kind: directory, directory: out}
buffer: {path: buf/buffer.db, max_size: 64MiB, max_age: 2h}
batch: {max_delay: 500ms, max_bytes: 60KiB, compression: none}
"""

DEVICES = """\
devices:
  - dev_eui: 70B3D57ED0001234
    sensor_id: press-03-clamp
    codec: osm-v2
    tags: {machine: press-03}
    metrics:
      CC1: {name: spindle_current, scale: 0.001, unit: A}
  - osm_id: 0a1b2c3d
    sensor_id: kettle-1
    codec: osm-v2
"""


def write_site(tmp_path: Path, gateway: str = GOOD, **maps: str) -> Path:
    (tmp_path / "devices").mkdir(exist_ok=True)
    for name, text in (maps or {"a": DEVICES}).items():
        (tmp_path / "devices" / f"{name}.yaml").write_text(text)
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def test_good_config_loads_typed_values_relative_to_its_file(tmp_path: Path) -> None:
    """Durations, sizes, relative paths and device identities come out parsed and normalised."""
    config = load_config(write_site(tmp_path))
    s = config.settings
    assert s.batch.max_delay == 0.5 and s.batch.max_bytes == 60 * 1024
    assert s.buffer.max_size == 64 * 1024**2 and s.buffer.max_age == 7200
    assert s.buffer.path == tmp_path / "buf" / "buffer.db"
    assert s.source_client_id(0) == "hub-gateway-gw-t-01-1"
    assert s.cloud.topic_for(s.gateway) == "dt/hub/acme/leeds/gw-t-01/readings"
    press = config.devices.get(DeviceKey("dev_eui", "70b3d57ed0001234"))
    assert press is not None and press.entry.sensor_id == "press-03-clamp"
    assert config.devices.get(DeviceKey("osm_id", "0A1B2C3D")) is not None


def test_every_problem_is_reported_at_once_with_position(tmp_path: Path) -> None:
    """Typos, bad values and unknown kinds in gateway.yaml each give FILE:LINE:COL: message."""
    bad = (
        GOOD.replace("tenant_id: acme", "tenant_id: ACME")
        .replace("  - kind: osm-mqtt\n", "  - kind: osm-mqtt\n    topik: x\n")
        .replace("max_delay: 500ms", "max_delay: 5 sec")
    )
    path = write_site(tmp_path, bad)
    problems = problems_of(path)
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{path}:1:") and "tenant_id" in problems[0]
    assert problems[1] == f"{path}:5:5: unknown key 'topik' in sources.1 (did you mean 'topic'?)"
    assert problems[2].startswith(f"{path}:9:") and "'5 sec' is not a duration" in problems[2]


def test_device_map_problems_name_file_line_and_both_places_of_a_duplicate(tmp_path: Path) -> None:
    """A duplicate dev_eui or sensor_id across files names both places; an unknown codec suggests the
    closest known one."""
    second = """\
devices:
  - dev_eui: 70b3d57ed0001234
    sensor_id: other
    codec: osm-v2
  - dev_eui: 70b3d57ed0009999
    sensor_id: press-03-clamp
    codec: osm-v2
  - dev_eui: 70b3d57ed0008888
    sensor_id: x
    codec: osm-v9
"""
    path = write_site(tmp_path, a=DEVICES, b=second)
    a, b = tmp_path / "devices" / "a.yaml", tmp_path / "devices" / "b.yaml"
    problems = problems_of(path)
    assert problems == [
        f"{b}:2:14: dev_eui 70b3d57ed0001234 is already defined at {a}:2:5",
        f"{b}:6:16: sensor_id 'press-03-clamp' is already used at {a}:2:5",
        f"{b}:10:12: devices.2.codec: unknown codec 'osm-v9' (did you mean 'osm-v2'?)",
    ]


def test_yaml_syntax_errors_and_unreadable_identity_numbers(tmp_path: Path) -> None:
    """Broken YAML is a positioned problem; all-digit ids keep their leading zeros."""
    path = write_site(tmp_path, a="devices:\n  - dev_eui: [1, 2\n")
    (problem,) = problems_of(path)
    assert problem.startswith(str(tmp_path / "devices" / "a.yaml") + ":") and "YAML:" in problem
    digits = "devices:\n  - dev_eui: 0000000000001234\n    sensor_id: s\n    codec: osm-v2\n"
    (tmp_path / "devices" / "a.yaml").write_text(digits)
    devices = load_device_maps([tmp_path / "devices" / "a.yaml"])
    assert devices.get(DeviceKey("dev_eui", "0000000000001234")) is not None


def test_codec_options_are_validated_against_the_codec_the_entry_names(tmp_path: Path) -> None:
    """An option another codec has, or a typo, is an error at the option's key."""
    maps = "devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id: s\n    codec: osm-v2\n    options: {portz: [1]}\n"
    path = write_site(tmp_path, a=maps)
    (problem,) = problems_of(path)
    assert (
        problem
        == f"{tmp_path / 'devices' / 'a.yaml'}:5:15: unknown key 'portz' in devices.0.options (did you mean 'ports'?)"
    )


def test_topic_placeholders_and_wildcards_are_refused(tmp_path: Path) -> None:
    """No wildcard, reserved $ prefix or unknown placeholder can reach a publish topic."""
    for topic, needle in (
        ("dt/{tenant}/x", "unknown placeholder"),
        ("dt/+/x", "wildcards"),
        ("$sys/x", "reserved"),
    ):
        path = write_site(tmp_path, GOOD.replace("directory: out}", f"directory: out, topic: '{topic}'}}"))
        (problem,) = problems_of(path)
        assert needle in problem
    path = write_site(tmp_path, GOOD.replace("directory: out}", "directory: out, topic: '$aws/rules/r1/{gateway_id}'}"))
    assert load_config(path).settings.cloud.topic_for(load_config(path).settings.gateway) == "$aws/rules/r1/gw-t-01"


def test_private_key_readable_by_others_is_refused(tmp_path: Path, certs: TestCerts) -> None:
    """check refuses a key with group/other permissions and a file that is not PEM."""
    pair = certs.client("gw-t-01")
    (tmp_path / "dev.crt").write_text("not pem")
    key = tmp_path / "dev.key"
    shutil.copy(pair.key, key)
    os.chmod(key, 0o644)
    cloud = (
        "cloud: {kind: iot-core, endpoint: x-ats.iot.eu-west-2.amazonaws.com, "
        f"ca: {certs.ca_cert}, cert: dev.crt, key: dev.key}}"
    )
    path = write_site(tmp_path, GOOD.replace("cloud: {kind: directory, directory: out}", cloud))
    problems = problems_of(path)
    assert len(problems) == 2
    assert "cloud.cert" in problems[0] and "is not a PEM certificate" in problems[0]
    assert "cloud.key" in problems[1] and "readable by group or others (mode 0644)" in problems[1]
    os.chmod(key, 0o600)
    shutil.copy(pair.cert, tmp_path / "dev.crt")
    assert load_config(path).settings.cloud.kind == "iot-core"


def test_check_command_prints_problems_and_summary_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`hub-gateway check` prints one problem per line, a summary, and exits 1 (0 when clean)."""
    path = write_site(tmp_path, GOOD.replace("id: gw-t-01", "id: GW"))
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}:1:") and out[-1] == f"1 problem found in {path} and the files it names"
    path.write_text(GOOD)
    assert main(["check", "-c", str(path)]) == 0


def test_durations_and_sizes() -> None:
    """The units SPEC section 4 names parse; anything else is refused."""
    assert [parse_duration(x) for x in ("500ms", "5s", "10m", "2h", "7d", 3)] == [0.5, 5, 600, 7200, 604800, 3]
    assert [parse_size(x) for x in ("120KiB", "1MiB", "1GiB", "4096B")] == [122880, 1048576, 1073741824, 4096]
    for bad in ("5 sec", "-1s", "0s", True):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for bad_size in ("10MB", 4096, "4096"):  # binary units only, and a unit is required
        with pytest.raises(ValueError):
            parse_size(bad_size)


def test_shipped_examples_are_valid(tmp_path: Path) -> None:
    """config/gateway.yaml and config/devices/*.yaml validate (certificates aside)."""
    config = load_config(ROOT / "config" / "gateway.yaml", check_certs=False)
    assert len(config.devices) >= 2 and config.settings.cloud.kind == "iot-core"


def test_shipped_json_schemas_match_the_models() -> None:
    """config/schema/*.schema.json are what `hub-gateway schema` prints (regenerate with make schema)."""
    for name, schema in schemas().items():
        shipped = json.loads((ROOT / "config" / "schema" / f"{name}.schema.json").read_text())
        assert shipped == schema, f"config/schema/{name}.schema.json is stale: run make schema"
