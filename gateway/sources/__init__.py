"""Sources: what the gateway subscribes to on the local broker, and how each message parses.

`build_sources` turns the `sources:` of gateway.yaml into running subscriptions; `parser_for`
gives the pure function that turns one message of that source into an event.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol

from gateway.config.settings import ChirpStackSource, Settings, Source
from gateway.sources.events import Event, parse_chirpstack, parse_osm
from gateway.sources.mqtt import ClientFactory, Delivery, MqttSource, paho_client

Parser = Callable[[str, bytes, int], Event]


class RunningSource(Protocol):
    """A source the service starts and stops."""

    name: str

    def start(self) -> None:
        """Begin receiving (in the background)."""

    def stop(self) -> None:
        """Stop receiving; what was not acknowledged stays with the broker."""

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the source receives (subscribed); False on timeout."""


def parser_for(source: Source) -> Parser:
    """The function that parses messages of this source into events."""
    if isinstance(source, ChirpStackSource):
        return partial(parse_chirpstack, encoding=source.encoding)
    return lambda topic, payload, received_ms: parse_osm(topic, payload, received_ms)


def source_name(settings: Settings, index: int) -> str:
    """A short name for logs and status: `<kind>-<n>`."""
    return f"{settings.sources[index].kind}-{index + 1}"


def build_sources(
    settings: Settings,
    deliver: Callable[[Delivery], None],
    client_factory: ClientFactory = paho_client,
) -> tuple[list[RunningSource], dict[str, Parser]]:
    """The subscriptions of gateway.yaml, and a parser for each by source name."""
    running: list[RunningSource] = []
    parsers: dict[str, Parser] = {}
    for i, source in enumerate(settings.sources):
        name = source_name(settings, i)
        running.append(
            MqttSource(
                name=name,
                broker=source.broker,
                topic=source.topic,
                client_id=settings.source_client_id(i),
                session_expiry_s=source.session_expiry,
                deliver=deliver,
                client_factory=client_factory,
                max_message_size=source.max_message_size,
            )
        )
        parsers[name] = parser_for(source)
    return running, parsers


__all__ = ["Delivery", "Parser", "RunningSource", "build_sources", "parser_for", "source_name"]
