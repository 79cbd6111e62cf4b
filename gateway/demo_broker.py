"""The demo's own local broker: a throwaway Mosquitto, and the site's client that publishes to it.

`DemoBroker` runs `mosquitto -c <conf>` from a temporary directory: one listener on 127.0.0.1
at a port it picks, anonymous clients allowed, no persistence, its log on its own stderr
(a file the demo opens, so a Mosquitto started as root that drops to user `mosquitto` needs
no access to the directory). It runs in its own session, so a terminal's Ctrl-C reaches only
the demo, which stops the broker after the daemon. On Linux the kernel also stops it if the
demo dies without cleaning up (`kill -9`), unless Mosquitto dropped root privileges, which
clears that request. `stop()` ends it and removes the directory.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.sources import Delivery

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
#: Where Debian and the source build put the binary when it is not on PATH (/usr/sbin is not on
#: an ordinary user's PATH).
MOSQUITTO_PLACES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The demo's Mosquitto did not start."""


def find_mosquitto() -> str | None:
    """The mosquitto executable: PATH, then /usr/sbin and /usr/local/sbin; None if absent."""
    for candidate in (shutil.which("mosquitto"), *MOSQUITTO_PLACES):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the demo's process dies (Linux only)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class DemoBroker:
    """One Mosquitto on a free loopback port, with its files in a temporary directory."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.host = HOST
        self.port = 0
        self.workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self) -> DemoBroker:
        """Start Mosquitto and return once it accepts connections; `BrokerError` if it cannot."""
        self.workdir = Path(tempfile.mkdtemp(prefix="hub-gateway-demo-"))
        try:
            for _ in range(3):  # another program may take the port between the pick and the bind
                self.port = _free_port()
                if self._spawn_and_wait():
                    return self
                if "Address already in use" not in self.output():
                    break
            raise BrokerError(f"mosquitto did not start: {self.output().strip()[-300:] or 'no output'}")
        except BaseException:
            self.stop()
            raise

    def _spawn_and_wait(self) -> bool:
        assert self.workdir is not None
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            "# hub-gateway demo: a throwaway local broker\n"
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"  # unbuffered, unlike stdout to a file: " running" shows at once
        )
        with (self.workdir / "mosquitto.out").open("wb") as output:
            self._process = subprocess.Popen(
                [self.executable, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Safe here: the demo starts the broker before any thread of its own.
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            # Mosquitto's word that its listener is open, then the port answering: a connect
            # alone could reach whoever held the port before.
            if " running" in self.output():
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.5):
                        return True
                except OSError:
                    pass
            time.sleep(0.02)
        raise BrokerError(f"mosquitto did not open {self.host}:{self.port} within {START_TIMEOUT_S:.0f} s")

    def output(self) -> str:
        """What Mosquitto has logged."""
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / "mosquitto.out").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it hangs), wait for it, remove the temporary directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> DemoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SitePublisher:
    """The simulated site's MQTT client: publishes each message it is given at QoS 1."""

    def __init__(self, broker: DemoBroker) -> None:
        self._broker = broker
        self._connected = threading.Event()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"hub-gateway-demo-site-{os.getpid()}",
            protocol=mqtt.MQTTv5,
        )
        self._client.on_connect = self._on_connect

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def start(self, timeout_s: float = 5.0) -> None:
        """Connect; `BrokerError` if the broker does not accept us in time."""
        self._client.connect(self._broker.host, self._broker.port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self.stop()
            raise BrokerError(f"the simulated site could not connect to {self._broker.host}:{self._broker.port}")

    def send(self, delivery: Delivery) -> None:
        """Publish one message of the site (from the site's thread; paho queues it)."""
        self._client.publish(delivery.topic, delivery.payload, qos=1)

    def stop(self) -> None:
        """Disconnect; what is still queued is dropped (the demo is ending)."""
        self._client.disconnect()
        self._client.loop_stop()
