"""Shared fixtures: the test PKI and real Mosquitto brokers (SPEC section 10)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.brokers import (
    Mosquitto,
    MosquittoNotFound,
    ServerTLS,
    Subscriber,
    find_mosquitto,
)
from tests.support.certs import TestCerts, make_test_certs
from tests.support.daemon import READINGS_FILTER, Daemon


@pytest.fixture(scope="session")
def mosquitto_executable() -> str:
    """The mosquitto binary; a missing one fails the test with how to get it."""
    try:
        return find_mosquitto()
    except MosquittoNotFound as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    """The test CA, the loopback server pair, and `certs.client(id)` to mint client certs."""
    return make_test_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def local_broker(tmp_path: Path, mosquitto_executable: str) -> Iterator[Mosquitto]:
    """ChirpStack's broker as the README sets it up: plain MQTT on loopback, persistence on, a
    queue of 100,000 messages per session (Mosquitto's default of 1000 drops the rest while the
    gateway holds acks), started."""
    broker = Mosquitto(
        tmp_path / "local-broker", persistence=True, max_queued_messages=100_000, executable=mosquitto_executable
    )
    with broker:
        yield broker


@pytest.fixture
def cloud_broker(tmp_path: Path, certs: TestCerts, mosquitto_executable: str) -> Iterator[Mosquitto]:
    """IoT Core's stand-in: TLS on loopback with require_certificate true, started.

    Like IoT Core it allows 100 unacknowledged publishes per client (Receive Maximum in
    CONNACK); persistence is on so a persistent-session reader keeps its queue across
    restart().
    """
    broker = Mosquitto(
        tmp_path / "cloud-broker",
        tls=ServerTLS(ca=certs.ca_cert, server=certs.server, require_certificate=True),
        persistence=True,
        max_inflight_messages=100,
        executable=mosquitto_executable,
    )
    with broker:
        yield broker


CloudReaderFactory = Callable[..., Subscriber]


@pytest.fixture
def cloud_reader(cloud_broker: Mosquitto, certs: TestCerts) -> Iterator[CloudReaderFactory]:
    """Factory: cloud_reader(topic_filter="#", **Subscriber options) -> a started Subscriber.

    Each reader connects to cloud_broker over mTLS with its own client cert; all are closed
    at teardown.
    """
    readers: list[Subscriber] = []
    numbers = itertools.count(1)

    def make(topic_filter: str = "#", **options: object) -> Subscriber:
        client_id = str(options.pop("client_id", None) or f"cloud-reader-{next(numbers)}")
        reader = Subscriber(
            cloud_broker, topic_filter, client_id=client_id, client_cert=certs.client(client_id), **options
        )  # type: ignore[arg-type]
        readers.append(reader.start())
        return reader

    yield make
    for reader in readers:
        reader.close()


@pytest.fixture
def reader(cloud_reader: CloudReaderFactory) -> Subscriber:
    """The cloud side: a persistent session, so nothing published while it reconnects is lost."""
    return cloud_reader(READINGS_FILTER, clean_start=False, session_expiry_interval=600)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test makes (append them): each is killed at teardown if it is still running."""
    made: list[Daemon] = []
    yield made
    for d in made:
        d.close()
