"""`hub-gateway enroll`: AWS IoT fleet provisioning by claim (SPEC section 3).

The gateway connects to IoT Core over MQTT 5 with the fleet's claim certificate and the client id
`gateway.id`, makes its own private key and a CSR (the key never leaves the gateway), asks for a
certificate with CreateCertificateFromCsr, and registers itself with RegisterThing: the template
named, with the parameters ThingName = gateway.id, TenantId and SiteId. Both requests go through
awsiotsdk's `IotIdentityClientV2`, which subscribes to the accepted and rejected topics of each
request before it publishes it.

Nothing is written until IoT Core has accepted both requests: the certificate and key are staged
beside their destinations (fsynced) once the certificate is issued, and renamed into place only
after RegisterThing is accepted, so a refusal, a timeout or a crash leaves the files as they were.
A working certificate (readable, not expired, with its own key) is replaced only with `force`.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awscrt import mqtt5, mqtt_request_response
from awsiot import V2ServiceException, iotidentity, mqtt5_client_builder
from cryptography.exceptions import UnsupportedAlgorithm

from gateway import pki
from gateway.cloud.iot_core import describe_lifecycle
from gateway.errors import EnrollError, EnrollRefused, EnrollTimeout

#: The placeholder endpoint of config/gateway.yaml: enrolling against it can only time out.
EXAMPLE_ENDPOINT = "abc123-ats.iot.eu-west-2.amazonaws.com"
_CREATE_TOPIC = "$aws/certificates/create-from-csr/json"
_REGISTER_TOPIC = "$aws/provisioning-templates/{template}/provision/json"
#: Beyond the request timeout, how long we wait for awsiotsdk to report that timeout itself.
_GRACE_S = 10.0
_STOP_TIMEOUT_S = 5.0

Say = Callable[[str], None]


@dataclass(frozen=True)
class EnrollRequest:
    """Everything one enrolment needs: where IoT Core is, the claim, the template and the identity
    to register, and where the certificate and key go."""

    endpoint: str
    port: int
    ca: Path
    claim_cert: Path
    claim_key: Path
    template: str
    thing_name: str
    tenant_id: str
    site_id: str
    cert: Path
    key: Path
    timeout_s: float = 30.0
    force: bool = False

    @property
    def parameters(self) -> dict[str, str]:
        """The RegisterThing parameters the shipped template (config/aws/) expects."""
        return {"ThingName": self.thing_name, "TenantId": self.tenant_id, "SiteId": self.site_id}


@dataclass(frozen=True)
class Enrolment:
    """What IoT Core made of this gateway."""

    certificate_id: str
    thing_name: str
    validity: pki.Validity
    device_configuration: dict[str, str]


def existing_identity(cert: Path, key: Path) -> tuple[bool, str | None]:
    """(working, what is there): working is a readable certificate, not expired, with its key."""
    now = pki.now_utc()
    if not cert.exists():
        return False, (f"a key {key} without a certificate" if key.exists() else None)
    try:
        validity = pki.certificate_validity(cert)
    except (OSError, pki.CertificateError) as exc:
        return False, f"{cert}, which cannot be used ({exc})"
    if validity.expired(now):
        return False, f"{cert}, {validity.describe(now)}"
    if not key.exists():
        return False, f"{cert} without its key {key}"
    try:
        paired = pki.certificate_is_for_key(cert.read_bytes(), key.read_bytes())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return False, f"{cert} with a key {key} that cannot be used ({exc})"
    if not paired:
        return False, f"{cert} with a key {key} that is not its own"
    return True, f"{cert} ({validity.subject}, {validity.describe(now)}) and its key {key}"


def enroll(request: EnrollRequest, say: Say) -> Enrolment:
    """Enrol this gateway; `say` hears each step. Raises `EnrollRefused` with IoT Core's code and
    message, `EnrollTimeout` naming what was waited for, `EnrollError` for the rest."""
    _preflight(request, say)
    say(
        f"enrolling {request.thing_name} (tenant {request.tenant_id}, site {request.site_id}) "
        f"with provisioning template {request.template!r}"
    )
    key_pem, csr_pem = pki.new_key_and_csr(request.thing_name)
    say("made a new private key (ECDSA P-256) and its CSR here: the key never leaves this gateway")
    link = _ClaimLink(request)
    try:
        say(
            f"connecting to {request.endpoint}:{request.port} as {request.thing_name} with the claim certificate "
            f"{request.claim_cert}"
        )
        link.connect()
        identity = iotidentity.IotIdentityClientV2(
            link.client,
            mqtt_request_response.ClientOptions(
                max_request_response_subscriptions=2,  # one request at a time: accepted + rejected
                max_streaming_subscriptions=0,
                operation_timeout_in_seconds=max(1, math.ceil(request.timeout_s)),
            ),
        )
        created = link.ask(
            "CreateCertificateFromCsr",
            _CREATE_TOPIC,
            identity.create_certificate_from_csr(
                iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr_pem)
            ),
        )
        cert_pem, token, certificate_id = _issued(created, key_pem)
        validity = pki.validity_of_pem(cert_pem)
        now = pki.now_utc()
        say(f"CreateCertificateFromCsr accepted: certificate {certificate_id} ({validity.describe(now)})")
        owner = pki.service_owner()
        staged = [
            pki.stage(request.key, key_pem, pki.KEY_MODE, owner),
            pki.stage(request.cert, cert_pem, pki.CERT_MODE),
        ]
        try:
            registered = link.ask(
                "RegisterThing",
                _REGISTER_TOPIC.format(template=request.template),
                identity.register_thing(
                    iotidentity.RegisterThingRequest(
                        template_name=request.template,
                        certificate_ownership_token=token,
                        parameters=request.parameters,
                    )
                ),
            )
        except BaseException as exc:  # a refusal, a timeout, Ctrl-C: the staged files go
            for file in staged:
                file.discard()
            if isinstance(exc, EnrollError):
                exc.add_note(
                    f"certificate {certificate_id} was issued but not registered, so IoT Core never activates "
                    f"it; nothing was written here ({request.cert} and {request.key} are as they were)"
                )
            raise
        for file in staged:  # the key first: a crash in between leaves a pair `check` calls a mismatch
            file.commit()
    finally:
        link.close()
    thing = str(getattr(registered, "thing_name", None) or "")
    configuration = dict(getattr(registered, "device_configuration", None) or {})
    say(f"RegisterThing accepted: thing {thing or '(not named in the answer)'}")
    owned = f", owner {pki.SERVICE_USER}" if owner is not None else ""
    say(f"wrote {request.key} (mode {pki.KEY_MODE:04o}{owned}) and {request.cert} (mode {pki.CERT_MODE:04o})")
    if thing and thing != request.thing_name:
        raise EnrollError(
            f"IoT Core registered the thing as {thing!r}, but gateway.id is {request.thing_name!r}: the daemon "
            "connects with gateway.id as its client id, which the device policy allows only for the thing's own "
            'name. Make the template\'s ThingName {"Ref": "ThingName"} (config/aws/provisioning-template.json) '
            "or set gateway.id to the thing's name, then enrol again with --force"
        )
    return Enrolment(certificate_id, thing or request.thing_name, validity, configuration)


def _preflight(request: EnrollRequest, say: Say) -> None:
    """Everything that can be known before talking to IoT Core: a working certificate is kept,
    the claim and CA are usable, and both destinations can be written."""
    if request.endpoint == EXAMPLE_ENDPOINT:
        raise EnrollError(
            f"cloud.endpoint is still the example's {EXAMPLE_ENDPOINT}; set this account's endpoint "
            "(aws iot describe-endpoint --endpoint-type iot:Data-ATS)"
        )
    working, there = existing_identity(request.cert, request.key)
    if working and not request.force:
        raise EnrollError(
            f"this gateway already has a working certificate: {there}. enroll replaces it only with --force "
            "(then deactivate the old certificate in IoT Core)"
        )
    if there is not None:
        say(f"replacing {there}")
    for what, path in (("claim certificate", request.claim_cert), ("CA", request.ca)):
        try:
            pki.read_certificates(path)
        except OSError as exc:
            raise EnrollError(f"the {what} {path} cannot be read: {exc.strerror or exc}") from None
        except pki.CertificateError as exc:
            raise EnrollError(f"the {what} {exc}") from None
    try:
        paired = pki.certificate_is_for_key(request.claim_cert.read_bytes(), request.claim_key.read_bytes())
    except OSError as exc:
        raise EnrollError(f"the claim key {request.claim_key} cannot be read: {exc.strerror or exc}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise EnrollError(f"the claim key {request.claim_key} cannot be used ({exc})") from None
    if not paired:
        raise EnrollError(
            f"the claim key {request.claim_key} is not the key of the claim certificate {request.claim_cert}"
        )
    for dest in (request.key, request.cert):
        pki.discard_stale(dest)
        try:
            pki.stage(dest, b"", 0o600).discard()
        except OSError as exc:
            raise EnrollError(
                f"cannot write {dest} ({exc.strerror or exc}): run enroll as root (sudo), which also gives the key "
                f"to the {pki.SERVICE_USER} user"
            ) from None


def _issued(created: Any, key_pem: bytes) -> tuple[bytes, str, str]:
    """The certificate PEM, ownership token and id of an accepted CreateCertificateFromCsr, checked
    to be a certificate of the key made here."""
    pem = getattr(created, "certificate_pem", None)
    token = getattr(created, "certificate_ownership_token", None)
    certificate_id = getattr(created, "certificate_id", None)
    missing = [name for name, value in (("certificatePem", pem), ("certificateOwnershipToken", token)) if not value]
    if missing:
        raise EnrollError(f"IoT Core's answer to CreateCertificateFromCsr has no {' or '.join(missing)}")
    cert_pem = str(pem).encode()
    try:
        ours = pki.certificate_is_for_key(cert_pem, key_pem)
    except ValueError as exc:
        raise EnrollError(f"the certificate IoT Core returned cannot be read ({exc})") from None
    if not ours:
        raise EnrollError("the certificate IoT Core returned is not for the key made here; nothing was written")
    return cert_pem, str(token), str(certificate_id or "(no id given)")


class _ClaimLink:
    """The MQTT 5 connection made with the claim certificate, and what its lifecycle said last."""

    def __init__(self, request: EnrollRequest) -> None:
        self._request = request
        self._connected = threading.Event()
        self._stopped = threading.Event()
        self._last_failure: str | None = None
        self._dropped: str | None = None
        self.client = mqtt5_client_builder.mtls_from_path(
            endpoint=request.endpoint,
            port=request.port,
            cert_filepath=str(request.claim_cert),
            pri_key_filepath=str(request.claim_key),
            ca_filepath=str(request.ca),
            client_id=request.thing_name,
            keep_alive_interval_sec=60,
            session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
            min_reconnect_delay_ms=1000,
            max_reconnect_delay_ms=5000,
            on_lifecycle_connection_success=self._on_success,
            on_lifecycle_connection_failure=self._on_failure,
            on_lifecycle_disconnection=self._on_disconnection,
            on_lifecycle_stopped=self._on_stopped,
        )

    def connect(self) -> None:
        """Start the client and wait for the first CONNACK; retries until the timeout."""
        self.client.start()
        timeout = self._request.timeout_s
        if not self._connected.wait(timeout):
            last = f"; the last attempt failed: {self._last_failure}" if self._last_failure else ""
            raise EnrollTimeout(
                f"no MQTT connection to {self._request.endpoint}:{self._request.port} within {timeout:g} s "
                f"(waited for a CONNACK accepting the claim certificate){last}"
            )

    def ask(self, operation: str, topic: str, future: concurrent.futures.Future[Any]) -> Any:
        """The accepted answer of one request; its rejection, a timeout or a failure as an error."""
        timeout = self._request.timeout_s
        waited = f"waited for {topic}/accepted or {topic}/rejected"
        try:
            return future.result(timeout=math.ceil(timeout) + _GRACE_S)
        except concurrent.futures.TimeoutError:
            raise EnrollTimeout(
                f"no answer to {operation} within {timeout:g} s ({waited}){self._drop_note()}"
            ) from None
        except V2ServiceException as exc:
            modeled = exc.modeled_error
            if modeled is not None:
                raise EnrollRefused(operation, modeled.status_code, modeled.error_code, modeled.error_message) from None
            inner = exc.inner_error
            name = getattr(inner, "name", "")
            if name == "AWS_ERROR_MQTT_REQUEST_RESPONSE_TIMEOUT":
                raise EnrollTimeout(
                    f"no answer to {operation} within {timeout:g} s ({waited}){self._drop_note()}"
                ) from None
            if name == "AWS_ERROR_MQTT_REQUEST_RESPONSE_PUBLISH_FAILURE":
                raise EnrollError(
                    f"{operation}: IoT Core did not take the request on {topic}; the claim policy must allow "
                    f"iot:Publish on it ({inner}){self._drop_note()}"
                ) from None
            if name == "AWS_ERROR_MQTT_REQUEST_RESPONSE_SUBSCRIBE_FAILURE":
                raise EnrollError(
                    f"{operation}: IoT Core refused the subscription to {topic}/accepted and /rejected; the claim "
                    f"policy must allow iot:Subscribe on them (topicfilter/...) and iot:Receive (topic/...) "
                    f"({inner}){self._drop_note()}"
                ) from None
            raise EnrollError(f"{operation} failed: {inner or exc.message}{self._drop_note()}") from None

    def close(self) -> None:
        """Disconnect and wait (briefly) for the client to stop."""
        self.client.stop()
        self._stopped.wait(_STOP_TIMEOUT_S)

    def _drop_note(self) -> str:
        # IoT Core closes the connection of a client whose policy denies what it asked.
        return f"; IoT Core closed the connection meanwhile: {self._dropped}" if self._dropped else ""

    # ---- lifecycle (awscrt's threads) ----------------------------------------------------

    def _on_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        self._connected.set()

    def _on_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        self._last_failure = describe_lifecycle(data)

    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        self._dropped = describe_lifecycle(data)

    def _on_stopped(self, data: mqtt5.LifecycleStoppedData) -> None:
        self._stopped.set()
