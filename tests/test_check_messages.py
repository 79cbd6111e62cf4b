"""What `hub-gateway check` tells a field engineer (issue 9): metric overrides that match nothing,
YAML syntax errors in plain words, empty maps, the buffer's directory, sizes without a unit,
ids written the way labels print them, and did-you-mean for codecs. Each message is pinned by
its key words and its FILE:LINE:COL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_config, load_device_maps
from gateway.config.types import parse_size
from gateway.model import DeviceKey

GATEWAY = """\
gateway: {id: gw-t-01, tenant_id: acme, site_id: leeds}
sources: [{kind: chirpstack}]
cloud: {kind: directory, directory: out}
buffer: {path: buffer.db}
"""

ONE_DEVICE = "devices:\n  - dev_eui: 70b3d57ed0009999\n    sensor_id: other\n    codec: osm-v2\n"


def site(tmp_path: Path, devices: str, gateway: str = GATEWAY) -> tuple[Path, Path]:
    """gateway.yaml and devices/a.yaml under `tmp_path`; returns both paths."""
    (tmp_path / "devices").mkdir(exist_ok=True)
    device_map = tmp_path / "devices" / "a.yaml"
    device_map.write_text(devices)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(gateway)
    return cfg, device_map


def check(cfg: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["check", "-c", str(cfg)])
    return code, capsys.readouterr().out.splitlines()


def entry(codec: str, metrics: str, options: str = "") -> str:
    """One device of `codec` whose `metrics:` block (given as its lines) starts on line 6."""
    text = f"devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id: s-1\n    codec: {codec}\n"
    return text + "    metrics:\n" + metrics + options


# ---- 1. a metric override that matches nothing --------------------------------------------------


def test_a_mistyped_osm_override_is_a_warning_with_did_you_mean_at_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`CCl` (letter l) for `CC1` on osm-v2 is a `warning:` line at the override's key that suggests
    'CC1', and check still exits 0."""
    cfg, device_map = site(tmp_path, entry("osm-v2", "      CCl: {name: spindle_current, scale: 0.001, unit: A}\n"))
    code, out = check(cfg, capsys)
    assert code == 0
    assert out[0] == (
        f"warning: {device_map}:6:7: devices.0.metrics: unknown metric 'CCl' for codec osm-v2 "
        "(did you mean 'CC1'?); this override changes nothing unless a metric of exactly that name is decoded"
    )
    assert out[-1].startswith(f"{cfg}: OK (")


def test_an_osm_override_of_a_metric_the_table_lacks_warns_without_a_guess(tmp_path: Path) -> None:
    """A name far from every firmware name (a measurement a newer firmware may add) is a warning
    without a suggestion, and the config still loads for `run` with the warning in `Config.warnings`."""
    cfg, device_map = site(tmp_path, entry("osm-json", "      WXYZ: {unit: A}\n"))
    config = load_config(cfg)
    (warning,) = config.warnings
    assert str(warning).startswith(f"{device_map}:6:7: devices.0.metrics: unknown metric 'WXYZ' for codec osm-json;")
    assert "did you mean" not in warning.message


def test_known_osm_names_and_their_min_max_variants_pass_silently(tmp_path: Path) -> None:
    """CC1 (which also covers CC1_min/CC1_max), an explicit TEMP_max and the unit-less FW give no warning."""
    metrics = "      CC1: {scale: 0.001, unit: A}\n      TEMP_max: {unit: K}\n      FW: {name: firmware}\n"
    cfg, _ = site(tmp_path, entry("osm-v2", metrics))
    assert load_config(cfg).warnings == ()


def test_cayenne_overrides_are_checked_as_type_and_channel(tmp_path: Path) -> None:
    """cayenne-lpp knows `<type>_<channel>[_axis]` for any channel: temperature_200 and
    accelerometer_6_x pass, `temprature_3` is flagged with 'temperature_3'."""
    metrics = "      temperature_200: {unit: K}\n      accelerometer_6_x: {unit: g}\n      temprature_3: {unit: K}\n"
    cfg, device_map = site(tmp_path, entry("cayenne-lpp", metrics))
    (warning,) = load_config(cfg).warnings
    assert str(warning).startswith(
        f"{device_map}:8:7: devices.0.metrics: unknown metric 'temprature_3' for codec cayenne-lpp "
        "(did you mean 'temperature_3'?)"
    )


def test_packed_samples_overrides_are_checked_against_its_ports(tmp_path: Path) -> None:
    """packed-samples gives only the metrics its options.ports name: `curent` suggests 'current', and
    a name far from all of them lists what the codec gives."""
    options = "    options:\n      ports: {10: {metric: current, scale: 0.01, unit: A}}\n"
    metrics = "      curent: {unit: mA}\n      power: {unit: W}\n"
    cfg, device_map = site(tmp_path, entry("packed-samples", metrics, options))
    first, second = (str(w) for w in load_config(cfg).warnings)
    assert first.startswith(f"{device_map}:6:7: devices.0.metrics: unknown metric 'curent' for codec packed-samples")
    assert "(did you mean 'current'?)" in first
    assert second.startswith(f"{device_map}:7:7: devices.0.metrics: unknown metric 'power' for codec packed-samples")
    assert "(it gives 'current')" in second


def test_chirpstack_object_overrides_are_never_flagged(tmp_path: Path) -> None:
    """chirpstack-object names come from the device's JavaScript codec, so no override is questioned."""
    cfg, _ = site(tmp_path, entry("chirpstack-object", "      CCl: {unit: A}\n      any.thing: {unit: K}\n"))
    assert load_config(cfg).warnings == ()


def test_reloaded_device_maps_carry_their_warnings(tmp_path: Path) -> None:
    """`load_device_maps` (the SIGHUP reload path) returns the map with its override warnings, not an error."""
    _, device_map = site(tmp_path, entry("osm-v2", "      CCl: {unit: A}\n"))
    devices = load_device_maps([device_map])
    assert devices.get(DeviceKey("dev_eui", "70b3d57ed0001234")) is not None
    assert [w.line for w in devices.warnings] == [6] and "did you mean 'CC1'?" in devices.warnings[0].message


# ---- 3. YAML syntax errors in plain words, at the right line -----------------------------------


@pytest.mark.parametrize(
    ("text", "line", "col", "message"),
    [
        pytest.param(
            "devices:\n  - dev_eui: 70b3d57ed0001234\n\tsensor_id: press-03\n",
            3,
            1,
            "tabs are not allowed for indentation in YAML; use spaces",
            id="tab",
        ),
        pytest.param(
            "devices:\n  - dev_eui: 70b3d57ed0001234\n   sensor_id: press-03\n    codec: osm-v2\n",
            3,
            4,
            "this line's indentation (3 spaces) does not match its siblings at line 2 (4 spaces)",
            id="one-space-too-few",
        ),
        pytest.param(
            "devices:\n  - dev_eui: 70b3d57ed0001234\n     sensor_id: press-03\n    codec: osm-v2\n",
            3,
            6,
            "this line's indentation (5 spaces) does not match its siblings at line 2 (4 spaces)",
            id="one-space-too-many",
        ),
        pytest.param(
            "devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id: a\n  codec: osm-v2\n"
            "  - dev_eui: 70b3d57ed0001235\n",
            4,
            3,
            "this line's indentation (2 spaces) does not match its siblings at line 3 (4 spaces)",
            id="key-dedented-to-the-dash",
        ),
        pytest.param(
            "devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id:press-03\n    codec: osm-v2\n",
            3,
            14,
            "missing space after ':' in 'sensor_id:press-03': write 'sensor_id: press-03'",
            id="no-space-after-colon",
        ),
        pytest.param(
            'devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id: "press-03\n    codec: "osm-v2"\n',
            3,
            16,
            'this quoted value is not closed on its line: add the closing " at its end',
            id="unclosed-quote",
        ),
        pytest.param(
            "devices:\n  - dev_eui: 70b3d57ed0001234\n    tags: {machine: press-03, line: A\n    codec: osm-v2\n",
            3,
            11,
            "this '{' is never closed: add '}' after its last item",
            id="unclosed-bracket",
        ),
        pytest.param(
            "devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id: a\n"
            "  -dev_eui: 70b3d57ed0001235\n    sensor_id: b\n",
            4,
            3,
            "a list item needs a space after '-': write '- dev_eui: 70b3d57ed0001235'",
            id="dash-without-space",
        ),
    ],
)
def test_yaml_mistakes_are_explained_in_plain_words_at_their_line(
    tmp_path: Path, text: str, line: int, col: int, message: str
) -> None:
    """Tab indentation, a key one space off, no space after ':' or '-', an unclosed quote or bracket
    are each named in plain words at the line and column of the mistake, not the parser's words."""
    _, device_map = site(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_device_maps([device_map])
    (problem,) = info.value.problems
    assert str(problem) == f"{device_map}:{line}:{col}: YAML: {message}"


def test_text_that_parses_but_lost_a_space_gets_a_hint(tmp_path: Path) -> None:
    """`id:gw-t-01` alone under a key is one string to YAML: the type error says a space is missing after ':'."""
    gateway = GATEWAY.replace("gateway: {id: gw-t-01, tenant_id: acme, site_id: leeds}\n", "gateway:\n  id:gw-t-01\n")
    cfg, _ = site(tmp_path, ONE_DEVICE, gateway)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{cfg}:2:3: gateway: ")
    assert problem.message.endswith("(a space is missing after ':'? write 'id: gw-t-01')")


# ---- 4. check's gaps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "at", "why"),
    [("", "1:1", "the file is empty"), ("devices: []\n", "1:1", "its devices list is empty")],
)
def test_a_device_map_with_no_devices_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, at: str, why: str
) -> None:
    """An empty map file, or one whose devices list is empty, is a `warning: ... no devices in FILE`
    line; check exits 0. A glob that matches no file stays an error."""
    cfg, device_map = site(tmp_path, text)
    code, out = check(cfg, capsys)
    assert code == 0
    assert out[0] == f"warning: {device_map}:{at}: no devices in {device_map} ({why})"
    cfg.write_text(GATEWAY + "devices: [devices/*.yaml, more/*.yaml]\n")
    code, out = check(cfg, capsys)
    assert code == 1 and out[0] == f"{cfg}:5:10: devices: 'more/*.yaml' matches no file"


def test_a_missing_buffer_directory_is_a_warning_that_run_will_create_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """buffer.path in a directory that does not exist yet: a warning naming the directory and saying
    `run` will create it (it does, mkdir -p); check exits 0."""
    cfg, _ = site(tmp_path, ONE_DEVICE, GATEWAY.replace("path: buffer.db", "path: state/db/buffer.db"))
    code, out = check(cfg, capsys)
    assert code == 0
    assert out[0] == (
        f"warning: {cfg}:4:16: buffer.path: directory {tmp_path / 'state' / 'db'} does not exist; `run` will create it"
    )


def test_a_buffer_directory_that_cannot_be_created_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A buffer.path under a regular file cannot be created: an error at buffer.path naming both, exit 1."""
    cfg, _ = site(tmp_path, ONE_DEVICE, GATEWAY.replace("path: buffer.db", "path: state/db/buffer.db"))
    (tmp_path / "state").write_text("not a directory")
    code, out = check(cfg, capsys)
    assert code == 1
    assert out[0] == (
        f"{cfg}:4:16: buffer.path: cannot create directory {tmp_path / 'state' / 'db'}: "
        f"{tmp_path / 'state'} is a file, not a directory"
    )


def test_a_buffer_directory_that_is_not_writable_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent directory the user cannot write (as `access(2)` answers) is an error naming it, exit 1."""
    cfg, _ = site(tmp_path, ONE_DEVICE, GATEWAY.replace("path: buffer.db", "path: state/buffer.db"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    code, out = check(cfg, capsys)
    assert code == 1
    assert out[0].startswith(
        f"{cfg}:4:16: buffer.path: cannot create directory {tmp_path / 'state'}: {tmp_path} is not writable by user "
    )


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("1024", "size 1024 has no unit: if it is bytes, write 1024B (= 1KiB)"),
        ("1073741824", "size 1073741824 has no unit: if it is bytes, write 1073741824B (= 1GiB)"),
        ("1000", "size 1000 has no unit: if it is bytes, write 1000B; else 1000KiB or 1000MiB"),
        ("1GB", "'1GB' is not a size: did you mean 1GiB?"),
        ("64mb", "'64mb' is not a size: did you mean 64MiB?"),
    ],
)
def test_sizes_need_a_binary_unit(tmp_path: Path, size: str, message: str) -> None:
    """A bare number is refused as ambiguous and GB/MB/KB as a guess, each saying what to write, at the value."""
    cfg, _ = site(tmp_path, ONE_DEVICE, GATEWAY.replace("path: buffer.db}", f"path: buffer.db, max_size: {size}}}"))
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{cfg}:4:37: buffer.max_size: {message}")
    assert parse_size("4096B") == 4096 and parse_size("1.5KiB") == 1536


def test_sensor_id_message_says_ascii_and_names_the_character(tmp_path: Path) -> None:
    """`prëss` is refused with a message that says ASCII letters and names the 'ë' it found."""
    _, device_map = site(tmp_path, "devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id: prëss\n    codec: osm-v2\n")
    with pytest.raises(ConfigError) as info:
        load_device_maps([device_map])
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{device_map}:3:16: devices.0.sensor_id: sensor_id must be 1-128 ASCII letters")
    assert "'ë', LATIN SMALL LETTER E WITH DIAERESIS, which is not ASCII" in problem.message


def test_dev_eui_written_with_separators_is_normalised(tmp_path: Path) -> None:
    """`70-b3-d5-...`, `70:B3:D5:...` and `70 B3 D5 ...` are stored as 16 lower-case hex digits, so
    the same device written two ways is a duplicate."""
    _, device_map = site(
        tmp_path,
        "devices:\n"
        "  - dev_eui: 70-b3-d5-7e-d0-00-12-34\n    sensor_id: a\n    codec: osm-v2\n"
        "  - dev_eui: 70:B3:D5:7E:D0:00:56:78\n    sensor_id: b\n    codec: osm-v2\n"
        "  - dev_eui: 70 B3 D5 7E D0 00 9A BC\n    sensor_id: c\n    codec: osm-v2\n",
    )
    devices = load_device_maps([device_map])
    assert sorted(key.id for key in devices.by_key) == ["70b3d57ed0001234", "70b3d57ed0005678", "70b3d57ed0009abc"]
    again = "  - dev_eui: 70B3D57ED0001234\n    sensor_id: d\n    codec: osm-v2\n"
    device_map.write_text(device_map.read_text() + again)
    with pytest.raises(ConfigError) as info:
        load_device_maps([device_map])
    assert [str(p) for p in info.value.problems] == [
        f"{device_map}:11:14: dev_eui 70b3d57ed0001234 is already defined at {device_map}:2:5"
    ]


def test_a_codec_typo_suggests_the_codec(tmp_path: Path) -> None:
    """`codec: osm-v3` is refused at the codec with "did you mean 'osm-v2'?"."""
    _, device_map = site(tmp_path, "devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id: a\n    codec: osm-v3\n")
    with pytest.raises(ConfigError) as info:
        load_device_maps([device_map])
    (problem,) = info.value.problems
    assert str(problem) == f"{device_map}:4:12: devices.0.codec: unknown codec 'osm-v3' (did you mean 'osm-v2'?)"


def test_a_typo_in_the_codec_key_itself_is_named(tmp_path: Path) -> None:
    """`codex: osm-json` says that `codec` is missing and that `codex` looks like its typo."""
    _, device_map = site(tmp_path, "devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id: s\n    codex: osm-v2\n")
    with pytest.raises(ConfigError) as info:
        load_device_maps([device_map])
    (problem,) = info.value.problems
    assert problem.message == "devices.0: required key 'codec' is missing (is 'codex' a typo for 'codec'?)"


def test_devices_key_with_nothing_under_it_is_the_empty_map_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that says `devices:` and nothing more gets the "no devices" warning, not a type error."""
    cfg, device_map = site(tmp_path, "devices:\n")
    code, out = check(cfg, capsys)
    assert code == 0
    assert out[0] == f"warning: {device_map}:1:1: no devices in {device_map} (its devices list is empty)"


def test_a_tag_without_a_value_is_one_plain_problem(tmp_path: Path) -> None:
    """`tags: {x: null}` is one problem that says the tag has no value, not four type errors."""
    text = "devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id: s\n    codec: osm-v2\n    tags: {x: null}\n"
    _, device_map = site(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_device_maps([device_map])
    (problem,) = info.value.problems
    assert problem.message == "devices.0.tags.x: this tag has no value (empty or null): give it one, or remove the tag"
