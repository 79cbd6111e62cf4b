"""A stand-in for IoT Core's fleet provisioning service, on the TLS Mosquitto stand-in.

`ProvisioningResponder` is a paho MQTT v5 client subscribed to the two request topics of
fleet provisioning by claim, answering as IoT Core does on the `/accepted` or `/rejected` topic
next to each request:

- `$aws/certificates/create-from-csr/json` (CreateCertificateFromCsr): the CSR is signed by the
  test CA (so the certificate works against the same Mosquitto) and answered with
  `certificateId`, `certificatePem` and `certificateOwnershipToken`;
- `$aws/provisioning-templates/<name>/provision/json` (RegisterThing): the token must be one it
  issued and the template the one it knows; answered with `thingName` (the ThingName parameter)
  and `deviceConfiguration`.

A refusal is `{"statusCode", "errorCode", "errorMessage"}` on the rejected topic, as IoT Core
words it. What IoT Core does besides (policies, the thing registry) is not stood in for.
Mosquitto needs no ACL for these topics: MQTT keeps topics starting with `$` only from filters
that start with a wildcard (`#`, `+/...`), and every filter here starts with the literal `$aws`.
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.brokers import Mosquitto
from tests.support.certs import TestCerts

CREATE_TOPIC = "$aws/certificates/create-from-csr/json"
REGISTER_FILTER = "$aws/provisioning-templates/+/provision/json"


@dataclass(frozen=True)
class Refusal:
    """What the stand-in answers on a rejected topic."""

    status_code: int
    error_code: str
    error_message: str

    def payload(self) -> bytes:
        return json.dumps(
            {"statusCode": self.status_code, "errorCode": self.error_code, "errorMessage": self.error_message}
        ).encode()


@dataclass
class Seen:
    """Every request the stand-in received: (topic, payload) in arrival order."""

    requests: list[tuple[str, bytes]] = field(default_factory=list)


class ProvisioningResponder:
    """IoT Core's CreateCertificateFromCsr and RegisterThing, answered from the test CA."""

    def __init__(
        self,
        broker: Mosquitto,
        certs: TestCerts,
        *,
        template: str = "hub-gateway",
        refuse_csr: Refusal | None = None,
        refuse_register: Refusal | None = None,
        silent: bool = False,
        thing_name: str | None = None,
    ) -> None:
        self.template = template
        self.refuse_csr = refuse_csr
        self.refuse_register = refuse_register
        self.silent = silent
        #: Register the thing under this name instead of the ThingName parameter (a bad template).
        self.thing_name = thing_name
        self.seen = Seen()
        self._certs = certs
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        pair = certs.client("iot-core-provisioning")
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="iot-core-provisioning", protocol=mqtt.MQTTv5)
        self._client.tls_set(ca_certs=str(certs.ca_cert), certfile=str(pair.cert), keyfile=str(pair.key))
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._broker = broker

    def start(self, timeout: float = 5.0) -> ProvisioningResponder:
        """Connect and return once both subscriptions are granted."""
        self._client.connect(self._broker.host, self._broker.port, keepalive=30)
        self._client.loop_start()
        if not self._ready.wait(timeout):
            self.close()
            raise TimeoutError(f"provisioning stand-in: no SUBACK within {timeout}s\n{self._broker.log_tail()}")
        return self

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def requests(self) -> list[tuple[str, bytes]]:
        """A copy of the requests received so far."""
        with self._lock:
            return list(self.seen.requests)

    # paho callbacks, on its network thread

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        client.subscribe([(CREATE_TOPIC, 1), (REGISTER_FILTER, 1)])

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Properties | None
    ) -> None:
        if not any(r.is_failure for r in reasons):
            self._ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.seen.requests.append((message.topic, bytes(message.payload)))
        if self.silent:
            return
        if message.topic == CREATE_TOPIC:
            accepted, body = self._create(message.payload)
        else:
            accepted, body = self._register(message.topic, message.payload)
        client.publish(f"{message.topic}/{'accepted' if accepted else 'rejected'}", body, qos=1)

    def _create(self, payload: bytes) -> tuple[bool, bytes]:
        if self.refuse_csr is not None:
            return False, self.refuse_csr.payload()
        try:
            csr = json.loads(payload)["certificateSigningRequest"]
            pem = self._certs.ca.sign_csr(csr)
        except Exception as exc:  # a malformed request is IoT Core's 400, not a dead responder
            return False, Refusal(400, "InvalidCsr", f"cannot read the CSR: {exc}").payload()
        certificate_id = secrets.token_hex(32)
        token = secrets.token_urlsafe(48)
        with self._lock:
            self._tokens[token] = certificate_id
        body = {"certificateId": certificate_id, "certificatePem": pem, "certificateOwnershipToken": token}
        return True, json.dumps(body).encode()

    def _register(self, topic: str, payload: bytes) -> tuple[bool, bytes]:
        template = topic.split("/")[2]
        if template != self.template:
            return False, Refusal(404, "ResourceNotFound", f"Template {template} not found").payload()
        if self.refuse_register is not None:
            return False, self.refuse_register.payload()
        request = json.loads(payload)
        with self._lock:
            known = request.get("certificateOwnershipToken") in self._tokens
        if not known:
            return False, Refusal(400, "InvalidCertificateOwnershipToken", "Token is invalid").payload()
        thing = self.thing_name or request.get("parameters", {}).get("ThingName", "")
        return True, json.dumps({"thingName": thing, "deviceConfiguration": {}}).encode()
