"""The models of gateway.yaml: identity, sources, cloud, buffer, batching, devices, logging."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from gateway.config.types import Duration, GatewayId, RelPath, Size, Strict, TenantId

# IoT Core refuses messages over 128 KiB, counting topic and properties; this much is kept back
# for them (topic <= 256 bytes, content type, user properties, expiry).
MAX_MESSAGE_BYTES = 128 * 1024
HEADROOM_BYTES = 2 * 1024
#: IoT Core's limit on a topic name, in bytes.
MAX_TOPIC_BYTES = 256
_TOPIC_FIELDS = ("tenant_id", "site_id", "gateway_id")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class Identity(Strict):
    """Who this gateway is: the names that go into topics and every message."""

    id: GatewayId = Field(description="IoT thing name and cloud MQTT client id.")
    tenant_id: TenantId = Field(description="The tenant (customer) this site belongs to.")
    site_id: TenantId = Field(description="The factory site within the tenant.")


class BrokerTls(Strict):
    """TLS to the local broker (rare: it is usually on loopback)."""

    ca: RelPath = Field(description="CA certificate that signed the broker's certificate.")
    cert: RelPath | None = Field(default=None, description="Client certificate, if the broker wants one.")
    key: RelPath | None = Field(default=None, description="Private key of the client certificate.")


class Broker(Strict):
    """Where the local MQTT broker is."""

    host: str = Field(default="127.0.0.1", description="Host name or address of the broker.")
    port: int = Field(default=1883, ge=1, le=65535, description="TCP port of the broker.")
    username: str | None = Field(default=None, description="User name, if the broker wants one.")
    password_file: RelPath | None = Field(
        default=None, description="File holding the password (the password never goes in YAML)."
    )
    tls: BrokerTls | None = Field(default=None, description="TLS settings; plain TCP when absent.")
    keepalive: Duration = Field(default=30.0, description="MQTT keep-alive interval.")


class _LocalSource(Strict):
    broker: Broker = Field(default_factory=Broker, description="The local broker to subscribe to.")
    client_id: str | None = Field(
        default=None,
        description="Fixed MQTT client id of the persistent session; default "
        "hub-gateway-<gateway.id>-<n> with n the source's position (1-based).",
    )
    session_expiry: Duration = Field(
        default=7 * 86400.0,
        description="How long the broker keeps our session and queued QoS 1 messages while the daemon is away.",
    )
    max_message_size: Size = Field(
        default=256 * 1024,
        description="Largest message accepted from the local broker; a bigger one is a dead letter holding "
        "its size and first bytes, never its whole payload.",
    )

    @field_validator("client_id")
    @classmethod
    def _client_id_is_plain(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
            raise ValueError("client_id must be 1-64 letters, digits, '.', '_' or '-'")
        return value


class ChirpStackSource(_LocalSource):
    """LoRaWAN uplinks as ChirpStack v4's MQTT integration publishes them."""

    kind: Literal["chirpstack"] = Field(description="ChirpStack v4 MQTT integration events.")
    topic: str = Field(
        default="application/+/device/+/event/+",
        description="Subscription of ChirpStack's event topics.",
    )
    encoding: Literal["json", "protobuf"] = Field(
        default="json", description="Must match ChirpStack's [integration.mqtt] json setting."
    )


class OsmMqttSource(_LocalSource):
    """OSM Wi-Fi/PoE units publishing JSON on osm/<HWID>/measurements."""

    kind: Literal["osm-mqtt"] = Field(description="OSM units publishing JSON directly.")
    topic: str = Field(default="osm/+/measurements", description="Subscription of OSM topics.")


Source = Annotated[ChirpStackSource | OsmMqttSource, Field(discriminator="kind")]


def check_topic(value: str, rules: bool) -> str:
    """A topic template to publish to, or ValueError saying what is wrong with it. `rules`: a
    Basic Ingest topic ($aws/rules/<rule>/...) is allowed."""
    for i, char in enumerate(value):
        # NUL, spaces, line breaks, control and format characters (U+202E and the other bidi
        # overrides) cannot be seen in a log or a console and have no place in a topic.
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf"):
            raise ValueError(
                f"topic contains {unicodedata.name(char, 'a control character')} (U+{ord(char):04X}) at "
                f"position {i + 1}; topics may not contain NUL, whitespace, control or format characters"
            )
    for name in _PLACEHOLDER.findall(value):
        if name not in _TOPIC_FIELDS:
            raise ValueError(f"unknown placeholder {{{name}}} (use {{tenant_id}}, {{site_id}}, {{gateway_id}})")
    literal = _PLACEHOLDER.sub("x", value)
    if "+" in literal or "#" in literal:
        raise ValueError("a topic to publish to cannot contain the wildcards + or #")
    if literal.startswith("$aws/rules/") and not rules:
        raise ValueError(
            "a Basic Ingest topic ($aws/rules/...) goes straight to a rule and keeps nothing: "
            "a retained message needs a real topic"
        )
    if literal.startswith("$") and not literal.startswith("$aws/rules/"):
        raise ValueError("topics starting with $ are reserved; only $aws/rules/<rule>/... is allowed")
    if not literal or literal.startswith("/") or literal.endswith("/") or "//" in literal:
        raise ValueError("topic levels must not be empty")
    if len(value.encode()) > 200:
        raise ValueError("topic is too long (IoT Core allows 256 bytes with at most 7 slashes)")
    return value


def fill_topic(template: str, identity: Identity) -> str:
    """A topic template with its placeholders filled from validated ids."""
    return template.format(tenant_id=identity.tenant_id, site_id=identity.site_id, gateway_id=identity.id)


class _Cloud(Strict):
    topic: str = Field(
        default="dt/hub/{tenant_id}/{site_id}/{gateway_id}/readings",
        description="Topic of every message; {tenant_id}, {site_id}, {gateway_id} are filled in. "
        "May be a Basic Ingest topic $aws/rules/<rule>/...",
    )
    message_expiry: Duration = Field(
        default=7 * 86400.0, description="MQTT message expiry of each batch (IoT Core keeps at most 7d)."
    )
    max_in_flight: int = Field(
        default=8,
        ge=2,
        le=99,
        description="Batches published and not yet acknowledged at once; one slot is kept for "
        "live readings while a backlog drains. At most 99: IoT Core allows 100 unacknowledged "
        "publishes a connection, and the health message may be one.",
    )

    @field_validator("topic")
    @classmethod
    def _topic_is_safe(cls, value: str) -> str:
        return check_topic(value, rules=True)

    def topic_for(self, identity: Identity) -> str:
        """The topic with its placeholders filled from validated ids."""
        return fill_topic(self.topic, identity)


class IotCoreCloud(_Cloud):
    """AWS IoT Core over MQTT 5 with X.509 mutual TLS."""

    kind: Literal["iot-core"] = Field(description="Publish to AWS IoT Core.")
    endpoint: str = Field(description="The account's ATS data endpoint, xxxx-ats.iot.<region>.amazonaws.com.")
    port: int = Field(default=8883, ge=1, le=65535, description="MQTT over TLS port.")
    ca: RelPath = Field(description="Amazon Root CA (AmazonRootCA1.pem) or the stand-in's CA.")
    cert: RelPath = Field(description="The thing's certificate (PEM).")
    key: RelPath = Field(description="The thing's private key (PEM); must not be readable by group or others.")


class DirectoryCloud(_Cloud):
    """Write each message as a file: for the demo, tests and air-gapped sites."""

    kind: Literal["directory"] = Field(description="Write messages into a directory.")
    directory: RelPath = Field(description="Where <batch_id>.json[.gz] files go.")


Cloud = Annotated[IotCoreCloud | DirectoryCloud, Field(discriminator="kind")]


class BufferSettings(Strict):
    """The SQLite store-and-forward buffer."""

    path: RelPath = Field(default=Path("/var/lib/hub-gateway/buffer.db"), description="SQLite file.")
    max_size: Size = Field(default=1024**3, description="Readings on disk, not counting SQLite overhead.")
    max_age: Duration = Field(default=7 * 86400.0, description="Readings older than this are dropped.")
    when_full: Literal["drop-oldest", "stop-intake"] = Field(
        default="drop-oldest",
        description="drop-oldest: delete the oldest readings and report a gap; stop-intake: stop "
        "acknowledging upstream so the local broker holds the data.",
    )
    commit_interval: Duration = Field(
        default=1.0,
        le=10.0,
        description="Intake gathers what arrives within this window into one durable commit (one "
        "fsync) before acknowledging it upstream: fewer writes to flash; 1ms commits each group at once.",
    )
    status_interval: Duration = Field(
        default=30.0,
        ge=1.0,
        le=300.0,
        description="How often the running daemon writes its counters for `status` (devices' latest values "
        "with every other write): shorter is fresher and writes more to flash (`watch` is live regardless).",
    )


class BatchSettings(Strict):
    """How readings are grouped into messages."""

    max_delay: Duration = Field(default=5.0, description="A reading waits at most this long before it is sent.")
    max_bytes: Size = Field(
        default=120 * 1024,
        description="Encoded message size limit; at most 128 KiB minus topic and properties.",
    )
    compression: Literal["gzip", "none"] = Field(default="gzip", description="Compress each message.")

    @field_validator("max_bytes")
    @classmethod
    def _fits_iot_core(cls, value: int) -> int:
        limit = MAX_MESSAGE_BYTES - HEADROOM_BYTES
        if value > limit:
            raise ValueError(f"max_bytes {value} exceeds {limit} (IoT Core's 128 KiB less topic and properties)")
        if value < 4096:
            raise ValueError("max_bytes must be at least 4KiB")
        return value


class Provisioning(Strict):
    """`hub-gateway enroll`: AWS IoT fleet provisioning by claim. Read by `enroll` only (its
    command-line options override each key); `check` and `run` never open the claim files, which
    a site may delete once the gateway is enrolled."""

    template: str | None = Field(
        default=None,
        description="Name of the fleet provisioning template in IoT Core (1-36 letters, digits, '_' or '-').",
    )
    claim_cert: RelPath | None = Field(
        default=None, description="The claim certificate shared by the fleet (PEM), allowed by the claim policy."
    )
    claim_key: RelPath | None = Field(
        default=None, description="The claim certificate's private key (PEM); must not be readable by group or others."
    )

    @field_validator("template")
    @classmethod
    def _template_name(cls, value: str | None) -> str | None:
        # IoT Core's rule for template names; it also keeps the name a single, literal topic level.
        if value is not None and not re.fullmatch(r"[0-9A-Za-z_-]{1,36}", value):
            raise ValueError("a provisioning template name is 1-36 letters, digits, '_' or '-'")
        return value


class LogSettings(Strict):
    """Logging."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Least severe level logged."
    )
    format: Literal["json", "console"] = Field(
        default="json", description="json for journald/shipping, console for people."
    )


class HealthSettings(Strict):
    """The hub.health.v1 message: the gateway's latest state, retained on a topic of its own."""

    interval: Duration = Field(
        default=60.0,
        ge=10.0,
        le=3600.0,
        description="How often the health message is published (also at each connect and at a clean stop).",
    )
    topic: str = Field(
        default="dt/hub/{tenant_id}/{site_id}/{gateway_id}/health",
        description="Topic of the health message and of the offline will; {tenant_id}, {site_id}, "
        "{gateway_id} are filled in. Retained, so not a Basic Ingest topic.",
    )
    will_delay: Duration = Field(
        default=120.0,
        ge=1.0,
        le=3600.0,
        description="How long the cloud waits after the connection is lost before it publishes the "
        "retained offline message: a reconnect within it sends nothing.",
    )

    @field_validator("topic")
    @classmethod
    def _topic_is_safe(cls, value: str) -> str:
        return check_topic(value, rules=False)

    def topic_for(self, identity: Identity) -> str:
        """The topic with its placeholders filled from validated ids."""
        return fill_topic(self.topic, identity)


class MetricsSettings(Strict):
    """Prometheus metrics in the text exposition format, at http://<listen>/metrics."""

    listen: str = Field(
        description="host:port to serve on, e.g. 127.0.0.1:9464 ([::1]:9464 for IPv6). A non-loopback "
        "address exposes the metrics to the network: the daemon logs a warning when it is used.",
    )

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(
                f"listen must be host:port with a port 0-65535 (0: any free port, logged), e.g. "
                f"127.0.0.1:9464 (not {value!r})"
            )
        return value

    @property
    def host(self) -> str:
        """The address to bind, without IPv6 brackets."""
        return self.listen.rpartition(":")[0].removeprefix("[").removesuffix("]")

    @property
    def port(self) -> int:
        """The TCP port."""
        return int(self.listen.rpartition(":")[2])


class Settings(Strict):
    """gateway.yaml: everything but the device maps, which it names."""

    gateway: Identity = Field(description="This gateway's identity.")
    sources: list[Source] = Field(min_length=1, description="Local brokers and topics to take data from.")
    cloud: Cloud = Field(description="Where batches go.")
    buffer: BufferSettings = Field(default_factory=BufferSettings, description="The durable buffer.")
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Batching.")
    devices: list[str] = Field(default=["devices/*.yaml"], description="Device-map files: globs relative to this file.")
    log: LogSettings = Field(default_factory=LogSettings, description="Logging.")
    health: HealthSettings = Field(
        default_factory=HealthSettings, description="The hub.health.v1 message to the cloud."
    )
    metrics: MetricsSettings | None = Field(default=None, description="Prometheus metrics endpoint; absent = off.")
    provisioning: Provisioning | None = Field(
        default=None, description="Fleet provisioning by claim, for `hub-gateway enroll`; absent = options only."
    )

    @model_validator(mode="after")
    def _distinct_client_ids(self) -> Settings:
        ids = [s.client_id for s in self.sources if s.client_id]
        if len(ids) != len(set(ids)):
            raise ValueError("two sources use the same client_id; each needs its own session")
        return self

    @model_validator(mode="after")
    def _health_apart_from_readings(self) -> Settings:
        for name, filled in (
            ("cloud.topic", self.cloud.topic_for(self.gateway)),
            ("health.topic", self.health.topic_for(self.gateway)),
        ):
            if len(filled.encode()) > MAX_TOPIC_BYTES:
                raise ValueError(
                    f"{name} is {len(filled.encode())} bytes with this gateway's ids filled in "
                    f"({filled}); IoT Core takes at most {MAX_TOPIC_BYTES}"
                )
        if self.health.topic_for(self.gateway) == self.cloud.topic_for(self.gateway):
            raise ValueError(
                "health.topic is the readings topic (cloud.topic): the cloud tells health messages "
                "from batches by topic, so the two must differ"
            )
        return self

    def source_client_id(self, index: int) -> str:
        """The fixed client id of the source at `index` (0-based)."""
        return self.sources[index].client_id or f"hub-gateway-{self.gateway.id}-{index + 1}"
