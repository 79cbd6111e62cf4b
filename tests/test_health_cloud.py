"""The health message from the real daemon to the TLS stand-in for IoT Core (real Mosquitto,
the real awsiotsdk client): retained at connect, again every interval, `stopped` at a clean
stop, and the MQTT 5 will `offline` when the daemon vanishes (kill -9), each valid against
config/schema/hub.health.v1.json."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from gateway.buffer import now_ms
from gateway.cloud import PublishResult
from gateway.cloud.directory import DirectoryPublisher
from tests.chirpstack import encode, topic, uplink_event
from tests.support.brokers import Mosquitto, ReceivedMessage, Subscriber, publishing
from tests.support.certs import TestCerts
from tests.support.daemon import HEALTH_TOPIC, Daemon
from tests.test_bridge import DEVICES, PRESS, T0, press_frame
from tests.test_health import SCHEMA

CONTENT_TYPE = "application/vnd.hub.health.v1+json"


def bodies(messages: list[ReceivedMessage]) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages if m.topic == HEALTH_TOPIC]


def retained(cloud_broker: Mosquitto, certs: TestCerts, client_id: str) -> ReceivedMessage:
    """What a subscriber that arrives now is handed for the health topic (the retained message)."""
    with Subscriber(cloud_broker, HEALTH_TOPIC, client_id=client_id, client_cert=certs.client(client_id)) as late:
        (message,) = late.wait_for_count(1)
        assert message.retain
        return message


@pytest.mark.integration
def test_health_is_retained_at_connect_every_interval_and_says_stopped_at_a_clean_stop(
    local_broker: Mosquitto, cloud_broker: Mosquitto, certs: TestCerts, daemons: list[Daemon], tmp_path: Path
) -> None:
    """At connect the daemon publishes `online` (QoS 1, retained, its content type); after the
    interval again, with the uplinks of that interval counted; at SIGTERM `stopped`, which stays
    the retained state: the will does not follow a clean stop."""
    with Subscriber(
        cloud_broker, HEALTH_TOPIC, client_id="health-watch", client_cert=certs.client("health-watch")
    ) as watch:
        daemon = Daemon(
            tmp_path / "gw",
            local_broker,
            cloud_broker,
            certs,
            DEVICES,
            extra_yaml="health: {interval: 10s, will_delay: 1s}\n",
        )
        daemons.append(daemon)
        daemon.start()
        first = watch.wait_for(lambda m: len(bodies(m)) >= 1, timeout=15)[0]
        assert first.qos == 1 and first.content_type == CONTENT_TYPE
        body = json.loads(first.payload)
        jsonschema.validate(body, SCHEMA)
        assert body["status"] == "online" and body["cloud"]["connected"] and body["cloud"]["reconnects"] == 0
        assert {d["sensor_id"] for d in body["devices"]["list"]} >= {"press-03-clamp"}
        assert retained(cloud_broker, certs, "late-1").payload == first.payload

        with publishing(local_broker) as send:
            for n in range(1, 4):
                event = uplink_event(PRESS, press_frame(n), f_cnt=n, time_ms=T0 + n * 1000, dedup_id=f"h-{n}")
                send(topic(PRESS), encode(event, "json"))
        second = bodies(watch.wait_for(lambda m: len(bodies(m)) >= 2, timeout=20))[1]
        jsonschema.validate(second, SCHEMA)
        assert second["status"] == "online"
        assert 9 <= (second["at"] - body["at"]) / 1000 <= 15  # the interval, as the main loop keeps it
        assert second["since_last_report"]["uplinks"] == 3
        press = next(d for d in second["devices"]["list"] if d["sensor_id"] == "press-03-clamp")
        assert press["readings"] >= 3 and not press["silent"] and press["decode_errors"] == 0

        code, _ = daemon.stop()
        assert code == 0
        stopped = bodies(watch.wait_for(lambda m: any(b["status"] == "stopped" for b in bodies(m)), timeout=10))[-1]
        jsonschema.validate(stopped, SCHEMA)
        assert stopped["cloud"]["connected"]
        # Past the will delay (1 s) the stop is still what is retained: a clean disconnect sends no will.
        time.sleep(2.0)  # the will would come 1 s after the disconnect; this proves it did not
        assert all(b["status"] != "offline" for b in bodies(watch.sync()))
    assert json.loads(retained(cloud_broker, certs, "late-2").payload)["status"] == "stopped"


@pytest.mark.integration
def test_a_gateway_that_vanishes_is_marked_offline_by_its_will(
    local_broker: Mosquitto, cloud_broker: Mosquitto, certs: TestCerts, daemons: list[Daemon], tmp_path: Path
) -> None:
    """kill -9: the stand-in publishes the daemon's will once `will_delay` has passed, retained,
    `offline`, with the gateway's identity, version and start; valid against the schema."""
    daemon = Daemon(
        tmp_path / "gw", local_broker, cloud_broker, certs, DEVICES, extra_yaml="health: {will_delay: 1s}\n"
    )
    daemons.append(daemon)
    with Subscriber(
        cloud_broker, HEALTH_TOPIC, client_id="health-watch", client_cert=certs.client("health-watch")
    ) as watch:
        daemon.start()
        online = bodies(watch.wait_for(lambda m: len(bodies(m)) >= 1, timeout=15))[0]
        daemon.kill()
        killed = time.monotonic()
        offline = bodies(watch.wait_for(lambda m: any(b["status"] == "offline" for b in bodies(m)), timeout=15))[-1]
        assert time.monotonic() - killed >= 0.9  # not before the will delay
    jsonschema.validate(offline, SCHEMA)
    assert offline["started_at"] == online["started_at"] and offline["gateway_id"] == "gw-test-01"
    assert json.loads(retained(cloud_broker, certs, "late-3").payload)["status"] == "offline"


def test_a_directory_cloud_keeps_the_latest_state_beside_the_batches(tmp_path: Path) -> None:
    """kind: directory writes the health message to state/health.json, replacing the last one,
    out of the way of whatever collects the batch files."""
    publisher = DirectoryPublisher(tmp_path / "out")
    publisher.start()
    results: list[PublishResult] = []
    for n in (1, 2):
        publisher.publish_state("dt/hub/a/b/gw/health", f'{{"n":{n}}}'.encode(), CONTENT_TYPE, results.append)
    assert [r.ok for r in results] == [True, True]
    assert json.loads((tmp_path / "out" / "state" / "health.json").read_text()) == {"n": 2}
    assert list((tmp_path / "out").glob("*.json")) == []


@pytest.mark.integration
def test_a_daemon_that_stops_on_a_failure_leaves_its_will_to_be_published(
    local_broker: Mosquitto, cloud_broker: Mosquitto, certs: TestCerts, tmp_path: Path
) -> None:
    """A stop on a failure (here the intake thread died: exit 1, systemd restarts) disconnects
    "with will message": the cloud hears `offline` once the will delay passes without a new
    connection, where a clean stop would have discarded the will."""
    from functools import partial

    from gateway.config import load_config
    from gateway.service import EXIT_WORKER_DIED, Service
    from gateway.sources import Delivery
    from gateway.sources.events import parse_chirpstack

    site = Daemon(  # only its gateway.yaml: the service runs in this process
        tmp_path / "gw", local_broker, cloud_broker, certs, DEVICES, extra_yaml="health: {will_delay: 1s}\n"
    )
    service = Service(load_config(site.config), sources=[])
    service.intake.add_parser("test", partial(parse_chirpstack, encoding="json"))

    def broken_ack() -> None:
        raise RuntimeError("client gone")

    with Subscriber(
        cloud_broker, HEALTH_TOPIC, client_id="health-watch", client_cert=certs.client("health-watch")
    ) as watch:
        runner = threading.Thread(target=service.run)
        runner.start()
        try:
            watch.wait_for(lambda m: len(bodies(m)) >= 1, timeout=15)
            event = encode(uplink_event(PRESS, press_frame(1), dedup_id="w-1"), "json")
            service.intake.deliver(Delivery("test", topic(PRESS), event, now_ms(), broken_ack))
            assert service.stopped.wait(30)
        finally:
            service.request_stop()
            runner.join(10)
        assert service.exit_code == EXIT_WORKER_DIED
        offline = bodies(watch.wait_for(lambda m: any(b["status"] == "offline" for b in bodies(m)), timeout=15))[-1]
    jsonschema.validate(offline, SCHEMA)
