"""Certificates watched (issue 13 item 3): `check` and `status` say how many days the cloud
certificate has left and warn under 30, an expired one fails `check` (while `run` only warns and
keeps buffering), and `check` compares the CA file with the certificate's chain where it names the
issuer. Certificates come from the test CA with chosen dates."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from gateway import pki
from gateway.buffer import Buffer
from gateway.cli import main
from gateway.config import load_config
from tests.support.certs import KeyPair, TestCerts, make_ca
from tests.test_config_hardening import iot_core_site


def dated(certs: TestCerts, name: str, not_before: datetime, not_after: datetime) -> KeyPair:
    return certs.ca.issue_dated(name, not_before, not_after)


def lasting(certs: TestCerts, name: str, days: int) -> KeyPair:
    """A certificate issued an hour ago that has `days` whole days (and an hour) left."""
    now = pki.now_utc()
    return dated(certs, name, now - timedelta(hours=1), now + timedelta(days=days, hours=1))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().out.splitlines()


def test_check_and_status_say_how_many_days_the_certificate_has_left(
    tmp_path: Path, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """check's OK line and status (text, JSON, with or without a buffer) give the days left."""
    pair = lasting(certs, "gw-long", 400)
    cfg = iot_core_site(tmp_path, certs.ca_cert, pair.cert, pair.key)

    code, lines = run_cli(capsys, "check", "-c", str(cfg))
    assert code == 0 and lines[-1].endswith("cloud iot-core, certificate 400 days left; buffer not created yet)")

    code, lines = run_cli(capsys, "status", "-c", str(cfg))
    assert code == 0
    assert lines[-1].startswith(f"certificate:   {pair.cert} valid until ") and lines[-1].endswith(", 400 days left")

    Buffer(tmp_path / "buffer.db").close()
    code, lines = run_cli(capsys, "status", "-c", str(cfg))
    assert code == 0 and any(line.endswith(", 400 days left") for line in lines)


def test_status_json_carries_the_certificate(
    tmp_path: Path, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """status --json has certificate.days_left, not_after, expired and warning."""
    pair = lasting(certs, "gw-json", 400)
    cfg = iot_core_site(tmp_path, certs.ca_cert, pair.cert, pair.key)

    assert main(["status", "--json", "-c", str(cfg)]) == 0
    certificate = json.loads(capsys.readouterr().out)["certificate"]

    assert certificate["days_left"] == 400 and certificate["expired"] is False and certificate["warning"] is False
    assert certificate["path"] == str(pair.cert)
    assert datetime.fromisoformat(certificate["not_after"]) > pki.now_utc() + timedelta(days=400)


def test_fewer_than_30_days_left_is_a_warning_that_does_not_fail_check(
    tmp_path: Path, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """12 days left: a `warning:` line at cloud.cert saying how to renew, exit 0; status says so too."""
    pair = lasting(certs, "gw-short", 12)
    cfg = iot_core_site(tmp_path, certs.ca_cert, pair.cert, pair.key)

    code, lines = run_cli(capsys, "check", "-c", str(cfg))

    assert code == 0
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert f"cloud.cert: {pair.cert} valid until " in warning and ", 12 days left; renew it: " in warning
    assert warning.startswith(f"warning: {cfg}:8:")  # the cert line of gateway.yaml
    code, lines = run_cli(capsys, "status", "-c", str(cfg))
    assert lines[-1].endswith("12 days left: RENEW IT SOON (sudo hub-gateway enroll --force)")


def test_an_expired_certificate_fails_check_but_run_only_warns(
    tmp_path: Path, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """Expired: a problem for `check` (exit 1), a warning for `run`'s loader, which starts and
    keeps buffering while IoT Core refuses the certificate; status says EXPIRED."""
    now = pki.now_utc()
    pair = dated(certs, "gw-expired", now - timedelta(days=30), now - timedelta(days=3, hours=1))
    cfg = iot_core_site(tmp_path, certs.ca_cert, pair.cert, pair.key)

    code, lines = run_cli(capsys, "check", "-c", str(cfg))

    assert code == 1
    assert any(f"cloud.cert: {pair.cert} EXPIRED 3 days ago, on " in line for line in lines)
    (warning,) = load_config(cfg).warnings
    assert "EXPIRED 3 days ago" in warning.message
    code, lines = run_cli(capsys, "status", "-c", str(cfg))
    assert code == 0 and "EXPIRED 3 days ago" in lines[-1] and "IoT Core refuses it" in lines[-1]


def test_a_certificate_not_yet_valid_warns_about_the_clock(
    tmp_path: Path, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """A certificate whose validity starts tomorrow by this clock: a warning asking whether the
    gateway's clock is right (a Pi without RTC before NTP), not a problem."""
    now = pki.now_utc()
    pair = dated(certs, "gw-future", now + timedelta(days=1), now + timedelta(days=400))
    cfg = iot_core_site(tmp_path, certs.ca_cert, pair.cert, pair.key)

    code, lines = run_cli(capsys, "check", "-c", str(cfg))

    assert code == 0
    assert any("is not valid before" in line and "is the clock right" in line for line in lines)


def test_a_ca_file_whose_ca_of_that_name_did_not_sign_the_certificate_fails_check(
    tmp_path: Path, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """cloud.ca holds a CA with the issuer's name but another key (a test CA made again): check
    says so at cloud.ca, before `run` meets it as a failed handshake."""
    pair = certs.client("gw-chain")
    impostor = make_ca(tmp_path / "remade-pki", certs.ca.name)
    cfg = iot_core_site(tmp_path, impostor.cert, pair.cert, pair.key)

    code, lines = run_cli(capsys, "check", "-c", str(cfg))

    assert code == 1
    (problem,) = [line for line in lines if "cloud.ca:" in line]
    assert problem.startswith(f"{cfg}:7:")
    assert f"names its issuer 'CN={certs.ca.name}', but the certificate of that name in {impostor.cert}" in problem
    assert "did not sign it" in problem


def test_a_ca_file_that_does_not_name_the_issuer_says_nothing(
    tmp_path: Path, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """IoT Core signs device certificates with its own CA while cloud.ca is the root of the
    *server's* certificate: a CA file that does not name the issuer is no problem."""
    pair = certs.client("gw-iot-issued")
    server_root = make_ca(tmp_path / "amazon-like", "amazon-root-like")
    cfg = iot_core_site(tmp_path, server_root.cert, pair.cert, pair.key)

    code, lines = run_cli(capsys, "check", "-c", str(cfg))

    assert code == 0, lines
    assert not [line for line in lines if line.startswith("warning:")]


def test_a_missing_cloud_certificate_suggests_enrolling(
    tmp_path: Path, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """No certificate at cloud.cert yet: the problem says how to get one."""
    cfg = iot_core_site(tmp_path, certs.ca_cert, tmp_path / "none.crt", tmp_path / "none.key")

    code, lines = run_cli(capsys, "check", "-c", str(cfg))

    assert code == 1
    assert any("cloud.cert: cannot read" in line and "sudo hub-gateway enroll" in line for line in lines)
