"""The real daemon as a subprocess (`python -m gateway run`), for integration tests.

Readiness comes from systemd's notify protocol: the test binds a Unix datagram socket, passes
it as NOTIFY_SOCKET, and waits for `READY=1`, as systemd would, so no test sleeps and hopes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.brokers import Mosquitto
from tests.support.certs import TestCerts

ROOT = Path(__file__).resolve().parents[2]
GATEWAY_ID = "gw-test-01"
TOPIC = "dt/hub/acme/leeds/gw-test-01/readings"
HEALTH_TOPIC = "dt/hub/acme/leeds/gw-test-01/health"
#: What the cloud side of the tests reads batches from: readings only, not health messages.
READINGS_FILTER = "dt/hub/+/+/+/readings"


class Daemon:
    """One `hub-gateway run` process with its own gateway.yaml, device maps and buffer."""

    def __init__(
        self,
        workdir: Path,
        local: Mosquitto,
        cloud: Mosquitto,
        certs: TestCerts,
        devices_yaml: str,
        *,
        encoding: str = "json",
        max_delay: str = "200ms",
        extra_yaml: str = "",
        batch_yaml: str | None = None,
        buffer_yaml: str = "",
        buffer_path: Path | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "devices").mkdir(exist_ok=True)
        (workdir / "devices" / "site.yaml").write_text(devices_yaml)
        client = certs.client(GATEWAY_ID)
        self.config = workdir / "gateway.yaml"
        self.config.write_text(
            f"""\
gateway: {{id: {GATEWAY_ID}, tenant_id: acme, site_id: leeds}}
sources:
  - kind: chirpstack
    broker: {{host: {local.host}, port: {local.port}}}
    encoding: {encoding}
  - kind: osm-mqtt
    broker: {{host: {local.host}, port: {local.port}}}
cloud:
  kind: iot-core
  endpoint: localhost
  port: {cloud.port}
  ca: {certs.ca_cert}
  cert: {client.cert}
  key: {client.key}
buffer: {{path: {buffer_path or workdir / "buffer.db"}, status_interval: 2s{", " + buffer_yaml if buffer_yaml else ""}}}
batch: {batch_yaml or f"{{max_delay: {max_delay}, max_bytes: 120KiB, compression: gzip}}"}
log: {{level: debug, format: json}}
{extra_yaml}"""
        )
        self.log_path = workdir / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._notify: socket.socket | None = None
        self.notifications: list[str] = []

    def start(self, timeout: float = 30.0) -> Daemon:
        """Start the daemon and wait for READY=1 on the notify socket."""
        self.launch()
        self.wait_notification("READY=1", timeout)
        return self

    def launch(self) -> Daemon:
        """Start the daemon process without waiting for it to be ready."""
        self.notifications = []  # a new process: its READY=1 is still to come
        sock_path = self.workdir / f"notify-{time.monotonic_ns()}.sock"
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(sock_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), PYTHONPATH=str(ROOT))
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
        )
        log.close()
        return self

    def wait_notification(self, wanted: str, timeout: float) -> None:
        """Wait for a notify line (READY=1, STOPPING=1); fail with the log if it never comes."""
        assert self._notify is not None and self.process is not None
        deadline = time.monotonic() + timeout
        while wanted not in self.notifications:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                raise AssertionError(f"daemon never sent {wanted}; log:\n{self.log_tail()}")
            self._notify.settimeout(min(remaining, 0.5))
            try:
                data = self._notify.recv(4096)
            except TimeoutError:
                continue
            self.notifications += data.decode().splitlines()

    def stop(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; return the exit code and how long the stop took."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL: no chance to flush or close anything."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def close(self) -> None:
        """Make sure nothing is left running."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self._notify is not None:
            self._notify.close()

    def status(self) -> dict[str, Any]:
        """`hub-gateway status --json`, as a separate process, as an engineer would run it."""
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "status", "--json", "-c", str(self.config)],
            capture_output=True,
            check=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            timeout=30,
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def wait_status(self, predicate: Any, timeout: float = 20.0) -> dict[str, Any]:
        """Poll status until predicate(status) holds (status is a separate process: polling is
        the only way to observe it); fail with the last status and the log."""
        deadline = time.monotonic() + timeout
        while True:
            report = self.status()
            if predicate(report):
                return report
            if time.monotonic() > deadline:
                raise AssertionError(f"status never matched: {report}\nlog:\n{self.log_tail()}")
            time.sleep(0.2)

    def reload(self) -> None:
        """SIGHUP, as `systemctl reload` sends."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        """Wait until the daemon's log contains `text` (the log is a file: polled)."""
        deadline = time.monotonic() + timeout
        while text not in (self.log_path.read_text(errors="replace") if self.log_path.exists() else ""):
            if time.monotonic() > deadline:
                raise AssertionError(f"log never showed {text!r}:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 60) -> str:
        """The end of the daemon's log."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
