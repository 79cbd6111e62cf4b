"""`hub-gateway enroll` against stand-ins: the TLS Mosquitto for IoT Core's MQTT endpoint and a
small responder (tests/support/provisioning.py) for IoT Core's fleet provisioning service, which
signs the CSR with the test CA and answers CreateCertificateFromCsr and RegisterThing on their
accepted and rejected topics. The client side is the real awsiotsdk (IotIdentityClientV2)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from awsiot import mqtt5_client_builder

from gateway import pki
from gateway.cli import main
from tests.support.brokers import Mosquitto
from tests.support.certs import KeyPair, TestCerts, make_ca
from tests.support.provisioning import CREATE_TOPIC, ProvisioningResponder, Refusal

pytestmark = pytest.mark.integration

GATEWAY_ID = "gw-enrol-01"


def site(tmp_path: Path, broker: Mosquitto, certs: TestCerts, claim: KeyPair, provisioning: bool = True) -> Path:
    """A gateway.yaml whose cloud is the stand-in, with a device map so that `check` can pass; the
    certificate and key go to tmp_path/certs/, and the provisioning section names the claim."""
    (tmp_path / "devices").mkdir(exist_ok=True)
    (tmp_path / "devices" / "a.yaml").write_text(
        "devices:\n  - dev_eui: 70b3d57ed0001234\n    sensor_id: s\n    codec: osm-v2\n"
    )
    (tmp_path / "certs").mkdir(exist_ok=True)
    section = (
        f"provisioning: {{template: hub-gateway, claim_cert: {claim.cert}, claim_key: {claim.key}}}\n"
        if provisioning
        else ""
    )
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        f"gateway: {{id: {GATEWAY_ID}, tenant_id: acme, site_id: leeds}}\n"
        "sources: [{kind: chirpstack}]\n"
        "cloud:\n"
        "  kind: iot-core\n"
        "  endpoint: localhost\n"
        f"  port: {broker.port}\n"
        f"  ca: {certs.ca_cert}\n"
        "  cert: certs/device.pem.crt\n"
        "  key: certs/private.pem.key\n"
        "buffer: {path: buffer.db}\n" + section
    )
    return cfg


@pytest.fixture
def claim(certs: TestCerts) -> KeyPair:
    """The fleet's claim certificate, signed by the CA the stand-in trusts."""
    return certs.client("claim-fleet")


@pytest.fixture
def responders(cloud_broker: Mosquitto, certs: TestCerts) -> Iterator[list[ProvisioningResponder]]:
    """The provisioning stand-ins a test starts with `respond`; all closed at teardown."""
    made: list[ProvisioningResponder] = []
    yield made
    for responder in made:
        responder.close()


def respond(
    made: list[ProvisioningResponder], broker: Mosquitto, certs: TestCerts, **options: object
) -> ProvisioningResponder:
    """Start a provisioning stand-in on the broker (options: see ProvisioningResponder)."""
    responder = ProvisioningResponder(broker, certs, **options).start()  # type: ignore[arg-type]
    made.append(responder)
    return responder


def enroll(cfg: Path, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, str, str]:
    code = main(["enroll", "-c", str(cfg), *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def connects(broker: Mosquitto, ca: Path, cert: Path, key: Path, client_id: str, timeout: float = 10.0) -> bool:
    """Whether awsiotsdk's MQTT 5 client (as the daemon builds it) gets a CONNACK with this pair."""
    outcome: list[bool] = []
    done, stopped = threading.Event(), threading.Event()

    def finish(ok: bool) -> None:
        outcome.append(ok)
        done.set()

    client = mqtt5_client_builder.mtls_from_path(
        endpoint="localhost",
        port=broker.port,
        cert_filepath=str(cert),
        pri_key_filepath=str(key),
        ca_filepath=str(ca),
        client_id=client_id,
        on_lifecycle_connection_success=lambda data: finish(True),
        on_lifecycle_connection_failure=lambda data: finish(False),
        on_lifecycle_stopped=lambda data: stopped.set(),
    )
    client.start()
    try:
        assert done.wait(timeout), "neither CONNACK nor a connection failure"
    finally:
        client.stop()
        stopped.wait(timeout)
    return outcome[0]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_enroll_writes_a_certificate_for_a_key_made_here_and_registers_the_thing(
    tmp_path: Path,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    claim: KeyPair,
    responders: list[ProvisioningResponder],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Enrol end to end: the CSR goes out, the key never does, RegisterThing carries the template
    and the gateway's ids, and the files written are a pair the stand-in accepts and `check` passes."""
    responder = respond(responders, cloud_broker, certs)
    cfg = site(tmp_path, cloud_broker, certs, claim)

    code, out, err = enroll(cfg, capsys)

    assert code == 0, err
    cert, key = tmp_path / "certs" / "device.pem.crt", tmp_path / "certs" / "private.pem.key"
    assert leftovers(tmp_path / "certs") == ["device.pem.crt", "private.pem.key"]
    assert pki.certificate_is_for_key(cert.read_bytes(), key.read_bytes())
    assert "CreateCertificateFromCsr accepted" in out and f"RegisterThing accepted: thing {GATEWAY_ID}" in out
    (create_topic, create), (register_topic, register) = responder.requests
    assert create_topic == CREATE_TOPIC
    assert "BEGIN CERTIFICATE REQUEST" in json.loads(create)["certificateSigningRequest"]
    assert register_topic == "$aws/provisioning-templates/hub-gateway/provision/json"
    assert json.loads(register)["parameters"] == {"ThingName": GATEWAY_ID, "TenantId": "acme", "SiteId": "leeds"}
    key_body = b"".join(key.read_bytes().splitlines()[1:-1])
    for _, payload in responder.requests:
        assert b"PRIVATE KEY" not in payload and key_body not in payload.replace(b"\\n", b"")
    assert connects(cloud_broker, certs.ca_cert, cert, key, GATEWAY_ID)
    assert main(["check", "-c", str(cfg)]) == 0
    assert "certificate 399 days left" in capsys.readouterr().out


def test_a_rejected_create_certificate_from_csr_is_reported_with_its_code_and_nothing_is_written(
    tmp_path: Path,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    claim: KeyPair,
    responders: list[ProvisioningResponder],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A refusal on create-from-csr/json/rejected is exit 1 with IoT Core's status, error code and
    message; no RegisterThing follows and no file (not even a temporary one) is left."""
    refusal = Refusal(400, "InvalidCsr", "The CSR's key is too weak")
    responder = respond(responders, cloud_broker, certs, refuse_csr=refusal)
    cfg = site(tmp_path, cloud_broker, certs, claim)

    code, _, err = enroll(cfg, capsys)

    assert code == 1
    assert "IoT Core refused CreateCertificateFromCsr: [400 InvalidCsr] The CSR's key is too weak" in err
    assert [topic for topic, _ in responder.requests] == [CREATE_TOPIC]
    assert leftovers(tmp_path / "certs") == []


def test_a_rejected_register_thing_is_reported_with_its_code_and_nothing_is_written(
    tmp_path: Path,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    claim: KeyPair,
    responders: list[ProvisioningResponder],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A refusal on provision/json/rejected is exit 1 with IoT Core's code and message, says the
    issued certificate was never activated, and removes the staged certificate and key."""
    refusal = Refusal(403, "AccessDenied", "Pre-provisioning hook denied gw-enrol-01")
    respond(responders, cloud_broker, certs, refuse_register=refusal)
    cfg = site(tmp_path, cloud_broker, certs, claim)

    code, out, err = enroll(cfg, capsys)

    assert code == 1
    assert "CreateCertificateFromCsr accepted" in out
    assert "IoT Core refused RegisterThing: [403 AccessDenied] Pre-provisioning hook denied gw-enrol-01" in err
    assert "issued but not registered" in err and "nothing was written here" in err
    assert leftovers(tmp_path / "certs") == []


def test_an_unknown_template_is_iot_cores_refusal_too(
    tmp_path: Path,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    claim: KeyPair,
    responders: list[ProvisioningResponder],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--template overrides gateway.yaml's, and a template IoT Core does not know is reported as
    its 404 on the rejected topic of that template."""
    respond(responders, cloud_broker, certs)
    cfg = site(tmp_path, cloud_broker, certs, claim)

    code, _, err = enroll(cfg, capsys, "--template", "hub-gateway-old")

    assert code == 1
    assert "IoT Core refused RegisterThing: [404 ResourceNotFound] Template hub-gateway-old not found" in err


def test_a_working_certificate_is_replaced_only_with_force(
    tmp_path: Path,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    claim: KeyPair,
    responders: list[ProvisioningResponder],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a readable, unexpired certificate and its own key in place, enroll exits 1 before it
    connects and leaves both files alone; with --force it enrols and replaces them."""
    responder = respond(responders, cloud_broker, certs)
    cfg = site(tmp_path, cloud_broker, certs, claim)
    working = certs.client("gw-already")
    cert, key = tmp_path / "certs" / "device.pem.crt", tmp_path / "certs" / "private.pem.key"
    shutil.copy(working.cert, cert)
    shutil.copy(working.key, key)

    code, _, err = enroll(cfg, capsys)

    assert code == 1
    assert "already has a working certificate" in err and "--force" in err
    assert responder.requests == []
    assert cert.read_bytes() == working.cert.read_bytes() and key.read_bytes() == working.key.read_bytes()

    code, out, err = enroll(cfg, capsys, "--force")

    assert code == 0, err
    assert f"replacing {cert}" in out
    assert cert.read_bytes() != working.cert.read_bytes()
    assert pki.certificate_is_for_key(cert.read_bytes(), key.read_bytes())


def test_an_expired_certificate_is_replaced_without_force(
    tmp_path: Path,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    claim: KeyPair,
    responders: list[ProvisioningResponder],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An expired certificate is not a working one: enroll replaces it and says what it replaced."""
    respond(responders, cloud_broker, certs)
    cfg = site(tmp_path, cloud_broker, certs, claim)
    now = pki.now_utc()
    old = certs.ca.issue_dated("gw-expired", now.replace(year=now.year - 2), now.replace(year=now.year - 1))
    shutil.copy(old.cert, tmp_path / "certs" / "device.pem.crt")
    shutil.copy(old.key, tmp_path / "certs" / "private.pem.key")

    code, out, err = enroll(cfg, capsys)

    assert code == 0, err
    assert "EXPIRED" in out.splitlines()[0]


def test_the_key_is_written_0600_whatever_the_umask_and_given_to_the_service_user_as_root(
    tmp_path: Path,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    claim: KeyPair,
    responders: list[ProvisioningResponder],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under umask 000 the key is 0600 and the certificate 0644; run as root, the key belongs to the
    service user (here `nobody`, standing in for hub-gateway), else to whoever enrolled."""
    respond(responders, cloud_broker, certs)
    cfg = site(tmp_path, cloud_broker, certs, claim)
    monkeypatch.setattr(pki, "SERVICE_USER", "nobody")
    old_umask = os.umask(0)
    try:
        code, _, err = enroll(cfg, capsys)
    finally:
        os.umask(old_umask)

    assert code == 0, err
    key = (tmp_path / "certs" / "private.pem.key").stat()
    assert stat.S_IMODE(key.st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "certs" / "device.pem.crt").stat().st_mode) == 0o644
    expected = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert key.st_uid == expected


def test_what_a_killed_enrolment_left_staged_is_removed(
    tmp_path: Path,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    claim: KeyPair,
    responders: list[ProvisioningResponder],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A temporary key and certificate that a killed enroll left beside the destinations (another
    pid's) are removed by the next enroll, which leaves only the two files."""
    respond(responders, cloud_broker, certs)
    cfg = site(tmp_path, cloud_broker, certs, claim)
    for name in (".private.pem.key.new-999999", ".device.pem.crt.new-999999"):
        (tmp_path / "certs" / name).write_bytes(b"left by a killed enroll")

    code, _, err = enroll(cfg, capsys)

    assert code == 0, err
    assert leftovers(tmp_path / "certs") == ["device.pem.crt", "private.pem.key"]


def test_no_answer_says_which_topics_were_waited_for(
    tmp_path: Path,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    claim: KeyPair,
    responders: list[ProvisioningResponder],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A provisioning service that never answers is exit 1 after --timeout, naming the request and
    its accepted and rejected topics; nothing is written."""
    respond(responders, cloud_broker, certs, silent=True)
    cfg = site(tmp_path, cloud_broker, certs, claim)

    code, _, err = enroll(cfg, capsys, "--timeout", "1")

    assert code == 1
    assert (
        f"no answer to CreateCertificateFromCsr within 1 s (waited for {CREATE_TOPIC}/accepted or "
        f"{CREATE_TOPIC}/rejected)"
    ) in err
    assert leftovers(tmp_path / "certs") == []


def test_a_claim_the_endpoint_refuses_is_a_connection_timeout_with_the_last_failure(
    tmp_path: Path, cloud_broker: Mosquitto, certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    """A claim certificate from a CA the endpoint does not trust never connects: exit 1 after
    --timeout, saying it waited for a CONNACK and why the last attempt failed."""
    stranger = make_ca(tmp_path / "other-pki", "other-ca").issue_client("claim-stranger")
    cfg = site(tmp_path, cloud_broker, certs, stranger)

    code, _, err = enroll(cfg, capsys, "--timeout", "1")

    assert code == 1
    assert f"no MQTT connection to localhost:{cloud_broker.port} within 1 s (waited for a CONNACK" in err
    assert "the last attempt failed" in err


def test_a_thing_registered_under_another_name_is_an_error(
    tmp_path: Path,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    claim: KeyPair,
    responders: list[ProvisioningResponder],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A template that names the thing otherwise than gateway.id is exit 1: the device policy would
    refuse the daemon's client id."""
    respond(responders, cloud_broker, certs, thing_name="thing-0042")
    cfg = site(tmp_path, cloud_broker, certs, claim)

    code, _, err = enroll(cfg, capsys)

    assert code == 1
    assert "registered the thing as 'thing-0042', but gateway.id is 'gw-enrol-01'" in err


@pytest.mark.parametrize(
    ("options", "provisioning", "needle"),
    [
        ((), False, "missing --template (or provisioning.template in"),
        (("--template", "a/b"), True, "--template: a provisioning template name is 1-36 letters"),
    ],
)
def test_what_enroll_needs_but_lacks_is_exit_2_before_any_connection(
    tmp_path: Path,
    cloud_broker: Mosquitto,
    certs: TestCerts,
    claim: KeyPair,
    capsys: pytest.CaptureFixture[str],
    options: tuple[str, ...],
    provisioning: bool,
    needle: str,
) -> None:
    """No template or claim named (options or gateway.yaml), or a template name that is not one,
    is a configuration error (exit 2) naming the option."""
    cfg = site(tmp_path, cloud_broker, certs, claim, provisioning=provisioning)

    code, _, err = enroll(cfg, capsys, *options)

    assert code == 2
    assert needle in err
