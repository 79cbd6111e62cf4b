"""Config hardening against a hostile tester: unusable key pairs, trailing newlines in ids,
invisible characters in the cloud topic, unsafe device-map tags and unreadable tenant ids."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_config, load_device_maps
from gateway.config.types import parse_duration, parse_size
from gateway.model import DeviceKey
from tests.support.certs import KeyPair, TestCerts

ROOT = Path(__file__).resolve().parent.parent

IDENTITY = "gateway: {id: gw-t-01, tenant_id: acme, site_id: leeds}\n"


def iot_core_site(tmp_path: Path, ca: Path, cert: Path, key: Path, sources: str = "[{kind: chirpstack}]") -> Path:
    """A gateway.yaml with an iot-core cloud naming these files; `cloud.key` is on line 9, column 8."""
    (tmp_path / "devices").mkdir(exist_ok=True)
    (tmp_path / "devices" / "a.yaml").write_text(
        "devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id: s\n    codec: osm-v2\n"
    )
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        IDENTITY + f"sources: {sources}\n"
        "cloud:\n"
        "  kind: iot-core\n"
        "  endpoint: 127.0.0.1\n"
        "  port: 1\n"
        f"  ca: {ca}\n"
        f"  cert: {cert}\n"
        f"  key: {key}\n"
        "buffer: {path: buffer.db}\n"
    )
    return cfg


def encrypted_copy(key: Path, into: Path) -> Path:
    """The key encrypted with a passphrase, as `openssl pkey -aes256` writes it (mode 0600)."""
    out = into / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:x", "-out", str(out)],
        check=True,
        capture_output=True,
    )
    out.chmod(0o600)
    return out


def check(cfg: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["check", "-c", str(cfg)])
    return code, capsys.readouterr().out.splitlines()


def run_daemon(cfg: Path) -> subprocess.CompletedProcess[str]:
    """`python -m gateway run` as systemd starts it; a daemon that starts is killed after 30 s."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdin=subprocess.DEVNULL,
    )


# ---- certificate and key belong together, key usable (finding 10) ---------------------------


def test_check_refuses_a_key_that_is_not_the_certificates(
    tmp_path: Path, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cloud.cert with another certificate's key is a problem at cloud.key, and check exits 1."""
    mine, other = certs.client("gw-pair-a"), certs.client("gw-pair-b")
    cfg = iot_core_site(tmp_path, certs.ca_cert, mine.cert, other.key)
    code, out = check(cfg, capsys)
    assert code == 1
    assert out[0] == (
        f"{cfg}:9:8: cloud.cert and cloud.key do not belong together (the key is not the certificate's): "
        f"{mine.cert}, {other.key}"
    )
    assert out[-1] == f"1 problem found in {cfg} and the files it names"
    cfg.write_text(cfg.read_text().replace(str(other.key), str(mine.key)))
    assert check(cfg, capsys)[0] == 0


def test_check_refuses_a_passphrase_encrypted_key_without_prompting(
    tmp_path: Path, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """An encrypted cloud.key is reported with the openssl command that decrypts it; nothing prompts."""
    pair = certs.client("gw-enc")
    key = encrypted_copy(pair.key, tmp_path)
    cfg = iot_core_site(tmp_path, certs.ca_cert, pair.cert, key)
    code, out = check(cfg, capsys)
    assert code == 1
    assert out[0] == (
        f"{cfg}:9:8: cloud.key: {key} is encrypted with a passphrase; the daemon needs an unencrypted key "
        f"(openssl pkey -in {key} -out {key}.new)"
    )


def test_key_mode_and_mismatch_are_reported_together(
    tmp_path: Path, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key readable by others that is also the wrong key gives both problems in one check."""
    mine, other = certs.client("gw-pair-a"), certs.client("gw-pair-b")
    loose = tmp_path / "loose.key"
    shutil.copy(other.key, loose)
    loose.chmod(0o644)
    cfg = iot_core_site(tmp_path, certs.ca_cert, mine.cert, loose)
    code, out = check(cfg, capsys)
    assert code == 1 and len(out) == 3
    assert "readable by group or others (mode 0644)" in out[0] and "do not belong together" in out[1]


def test_source_broker_tls_pair_is_checked_too(
    tmp_path: Path, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """A local broker's tls cert and key that do not belong together are a problem at that key."""
    mine, other = certs.client("gw-pair-a"), certs.client("gw-pair-b")
    tls = f"{{ca: {certs.ca_cert}, cert: {mine.cert}, key: {other.key}}}"
    cfg = iot_core_site(
        tmp_path, certs.ca_cert, mine.cert, mine.key, sources=f"[{{kind: chirpstack, broker: {{tls: {tls}}}}}]"
    )
    code, out = check(cfg, capsys)
    assert code == 1
    assert out[0].startswith(f"{cfg}:2:") and (
        "sources.0.broker.tls.cert and sources.0.broker.tls.key do not belong together" in out[0]
    )


@pytest.mark.parametrize("fault", ["mismatch", "encrypted"])
def test_run_exits_2_on_an_unusable_key_without_a_traceback(tmp_path: Path, certs: TestCerts, fault: str) -> None:
    """`run` refuses a key that is not the certificate's or is encrypted: exit 2, the message, no traceback."""
    pair: KeyPair = certs.client("gw-run")
    if fault == "mismatch":
        key, needle = certs.client("gw-run-other").key, "do not belong together"
    else:
        key, needle = encrypted_copy(pair.key, tmp_path), "is encrypted with a passphrase"
    done = run_daemon(iot_core_site(tmp_path, certs.ca_cert, pair.cert, key))
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "cloud.key" in done.stderr
    assert "Traceback" not in done.stderr


# ---- patterns match the whole value: no trailing newline ------------------------------------


def test_ids_written_as_block_scalars_are_refused(tmp_path: Path) -> None:
    """`tenant_id: |` gives "acme\\n", which is not an id; nor are dev_eui, osm_id, sensor_id or a
    metric name with a trailing newline."""
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "a.yaml").write_text(
        "devices:\n"
        '  - dev_eui: "70b3d57ed0001234\\n"\n'
        "    sensor_id: a\n"
        "    codec: osm-v2\n"
        '  - osm_id: "0A1B2C3D\\n"\n'
        "    sensor_id: b\n"
        "    codec: osm-json\n"
        "  - dev_eui: 70b3d57ed0005678\n"
        "    sensor_id: |\n"
        "      c\n"
        "    codec: osm-v2\n"
        '    metrics: {CC1: {name: "current\\n"}}\n'
    )
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        "gateway:\n  id: gw-t-01\n  tenant_id: |\n    acme\n  site_id: leeds\n"
        "sources: [{kind: chirpstack}]\ncloud: {kind: directory, directory: out}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    text = "\n".join(str(p) for p in info.value.problems)
    for where in ("gateway.tenant_id", "devices.0.dev_eui", "devices.1.osm_id", "devices.2.sensor_id"):
        assert where in text, text
    assert "devices.2.metrics.CC1.name" in text


def test_durations_and_sizes_refuse_a_trailing_newline_and_non_finite_numbers() -> None:
    """ "5s\\n", "1GiB\\n", Unicode digits and a .nan or .inf duration are refused."""
    for bad in ("5s\n", "\u0665s", float("nan"), float("inf")):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for bad in ("1GiB\n", "\u0661KiB"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_duration(" 5 s ") == 5 and parse_size("120 KiB") == 120 * 1024


# ---- the cloud topic: no invisible characters -------------------------------------------------


@pytest.mark.parametrize(
    ("char", "named"),
    [
        ("\\0", "(U+0000)"),
        (" ", "SPACE (U+0020)"),
        ("\\t", "(U+0009)"),
        ("\\u202e", "RIGHT-TO-LEFT OVERRIDE (U+202E)"),
        ("\\u200b", "ZERO WIDTH SPACE (U+200B)"),
        ("\\x7f", "(U+007F)"),
    ],
)
def test_cloud_topic_refuses_nul_whitespace_and_control_characters(tmp_path: Path, char: str, named: str) -> None:
    """NUL, whitespace, control and format characters (bidi overrides) in cloud.topic are refused, named."""
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "a.yaml").write_text("devices: []\n")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        IDENTITY + "sources: [{kind: chirpstack}]\n"
        f'cloud: {{kind: directory, directory: out, topic: "dt/hub/{{tenant_id}}/x{char}y/readings"}}\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    (problem,) = info.value.problems
    assert problem.line == 3 and named in problem.message and "position 21" in problem.message
    assert "topics may not contain NUL, whitespace, control or format characters" in problem.message


# ---- device-map tags and metric overrides -----------------------------------------------------


def device_map(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "map.yaml"
    path.write_text(f"devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id: s\n    codec: osm-v2\n{extra}")
    return path


def map_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_device_maps([path])
    return [str(p) for p in info.value.problems]


def test_tags_must_be_finite_bounded_and_well_named(tmp_path: Path) -> None:
    """A .nan or .inf tag, a 39-digit integer, text over 256 characters and a bad tag name are each
    refused, naming the tag."""
    long = "x" * 257
    path = device_map(
        tmp_path,
        "    tags:\n"
        "      ok: 1\n"
        "      ratio: .nan\n"
        "      limit: -.inf\n"
        f"      serial: {10**38}\n"
        f"      note: {long}\n"
        "      'bad key': 1\n",
    )
    problems = map_problems(path)
    assert problems == [
        f"{path}:7:14: devices.0.tags.ratio: tag value nan is not a finite number",
        f"{path}:8:14: devices.0.tags.limit: tag value -inf is not a finite number",
        f"{path}:9:15: devices.0.tags.serial: integer tag is too large: the cloud stores at most 38 digits "
        "(NUMBER(38))",
        f"{path}:10:13: devices.0.tags.note: tag value is 257 characters long; at most 256 are allowed",
        f"{path}:11:7: devices.0.tags: key 'bad key': tag names are 1-64 ASCII letters (a-z, A-Z), digits, '_', "
        "'.', ':' or '-'",
    ]
    good = device_map(
        tmp_path, f"    tags: {{machine: press-03, 'line.a:b-c_d': x, n: {10**38 - 1}, on: true, f: 1.5}}\n"
    )
    entry = load_device_maps([good]).by_key[DeviceKey("dev_eui", "70b3d57ed0001234")].entry
    assert entry.tags == {"machine": "press-03", "line.a:b-c_d": "x", "n": 10**38 - 1, "on": True, "f": 1.5}


def test_metric_scale_and_offset_must_be_finite(tmp_path: Path) -> None:
    """A .nan scale or .inf offset would turn every reading into NaN or inf: refused."""
    path = device_map(tmp_path, "    metrics:\n      CC1: {scale: .nan}\n      CC2: {offset: .inf}\n")
    assert map_problems(path) == [
        f"{path}:6:20: devices.0.metrics.CC1.scale: must be a finite number, not nan",
        f"{path}:7:21: devices.0.metrics.CC2.offset: must be a finite number, not inf",
    ]


# ---- ChirpStack tenant ids ----------------------------------------------------------------------

TENANT = "52f14cd4-c6f1-4fbd-8f87-4025e1d49242"


def test_chirpstack_tenant_id_must_be_a_uuid_and_is_normalised(tmp_path: Path) -> None:
    """A tenant id that is not a UUID is refused (file level and per entry); upper case is normalised."""
    path = tmp_path / "map.yaml"
    path.write_text(
        "chirpstack_tenant_id: acme\n"
        "devices:\n"
        "  - dev_eui: 70b3d57ed0001234\n"
        "    sensor_id: s\n"
        "    codec: osm-v2\n"
        f'    chirpstack_tenant_id: "{TENANT}\\n"\n'
    )
    problems = map_problems(path)
    assert problems[0].startswith(f"{path}:1:23: chirpstack_tenant_id: 'acme' is not a UUID")
    assert problems[1].startswith(f"{path}:6:27: devices.0.chirpstack_tenant_id: ")
    path.write_text(
        f"chirpstack_tenant_id: {TENANT.upper()}\n"
        "devices:\n"
        "  - dev_eui: 70b3d57ed0001234\n"
        "    sensor_id: s\n"
        "    codec: osm-v2\n"
        "  - osm_id: 0A1B2C3D\n"
        "    sensor_id: k\n"
        "    codec: osm-json\n"
    )
    devices = load_device_maps([path])
    lorawan = devices.get(DeviceKey("dev_eui", "70b3d57ed0001234"))
    osm = devices.get(DeviceKey("osm_id", "0A1B2C3D"))
    assert lorawan is not None and lorawan.network_tenant == TENANT
    assert osm is not None and osm.network_tenant is None  # OSM units publish without ChirpStack


def test_an_osm_unit_cannot_name_a_chirpstack_tenant(tmp_path: Path) -> None:
    """chirpstack_tenant_id on an osm_id entry is refused: none of its uplinks could ever pass."""
    path = tmp_path / "map.yaml"
    path.write_text(
        f"devices:\n  - osm_id: 0A1B2C3D\n    sensor_id: k\n    codec: osm-json\n    chirpstack_tenant_id: {TENANT}\n"
    )
    (problem,) = map_problems(path)
    assert "chirpstack_tenant_id is for LoRaWAN devices (dev_eui)" in problem


def test_nested_aliases_that_expand_to_billions_are_refused_at_once(tmp_path: Path) -> None:
    """A device map of nine lines whose aliases expand to 10^8 values ("billion laughs") is a
    problem at line 1 found at once, not minutes of validation that hold intake and SIGTERM."""
    import time

    from gateway.config import load_device_maps
    from gateway.errors import ConfigError

    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        levels.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 10)}]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(levels) + "\ndevices: *h\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="with anchors and aliases expanded, are more than 50,000"):
        load_device_maps([path])
    assert time.monotonic() - started < 5


def test_a_config_that_is_not_a_regular_file_or_is_huge_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check -c /dev/zero` answers at once ("not a regular file"), and a 5 MiB file is refused
    by its size, never read whole."""
    from gateway.cli import main

    assert main(["check", "-c", "/dev/zero"]) == 1
    assert "/dev/zero:1:1: not a regular file" in capsys.readouterr().out
    big = tmp_path / "gateway.yaml"
    big.write_text("# padding\n" * 600_000)
    assert main(["check", "-c", str(big)]) == 1
    assert "file is larger than 4 MiB" in capsys.readouterr().out


@pytest.mark.parametrize("depth", [40, 300, 3000])
def test_a_deeply_nested_file_is_a_problem_not_a_crash(tmp_path: Path, depth: int) -> None:
    """`x: [[[...]]]` nested hundreds deep (the parser recurses) is a problem at line 1, never a
    RecursionError out of check, run, status or a reload."""
    from gateway.config import load_device_maps
    from gateway.errors import ConfigError

    path = tmp_path / "deep.yaml"
    path.write_text("devices: []\nx: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError, match="nests deeper than 32 levels"):
        load_device_maps([path])
