"""A real Mosquitto for tests: its own config on a free loopback port.

Never the system broker on 1883: every Broker writes a config file into its
own directory (``listener <port> 127.0.0.1``, anonymous access, persistence
off unless asked for) and runs ``mosquitto -c`` on it.  ``stop()`` and
``start()`` keep the port, so ``restart()`` is a broker restart as a client
sees it; with ``persistence=True`` a restart keeps retained messages (and
persistent sessions), as a real deployment does.

    broker = Broker(tmp_path)          # or use the ``broker`` fixture
    broker.start()
    cfg = broker.config()              # an MqttConfig pointing at it
    ...
    broker.restart()
    broker.close()                     # kills it; the fixture does this

``Probe`` is a plain aiomqtt subscriber that records what arrives, for tests
that watch the wire from outside the code under test.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import aiomqtt
import pytest

from vinyl_mqtt.config import MqttConfig

HOST = "127.0.0.1"


def mosquitto_binary() -> str | None:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    """A TCP port nothing listens on right now (never 1883)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port != 1883:
            return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class BrokerError(RuntimeError):
    pass


class Broker:
    """One Mosquitto process (restartable) on a fixed loopback port."""

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        port: int | None = None,
        persistence: bool = False,
        verbose: bool = True,
        extra_config: Iterable[str] = (),
    ):
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError("mosquitto is not installed")
        self.binary = binary
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="mosquitto-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port or free_port()
        if self.port == 1883:
            raise BrokerError("refusing to use 1883: that is the system broker's port")
        self.persistence = persistence
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        self._write_config(verbose, list(extra_config))

    def _write_config(self, verbose: bool, extra: list[str]) -> None:
        lines = [
            f"listener {self.port} {HOST}",
            "allow_anonymous true",
            f"log_dest file {self.log}",
            "log_timestamp true",
            "connection_messages true",
        ]
        # `all` includes every packet (PUBACK from <client> ...): tests can read the log.
        lines += ["log_type all"] if verbose else ["log_type error", "log_type warning", "log_type notice"]
        if os.geteuid() == 0:
            lines.append(f"user {getpass.getuser()}")  # don't drop to 'mosquitto': it could not write here
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.dir}/",
                "persistence_file mosquitto.db",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        lines += extra
        self.conf.write_text("\n".join(lines) + "\n")

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> Broker:
        """Start (if not running) and wait until the port accepts connections."""
        if self.running:
            return self
        deadline = time.monotonic() + timeout
        with open(self.dir / "mosquitto.stderr", "ab") as err:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        while True:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}:\n{self.log_text()[-2000:]}")
            if _accepts(self.port):
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(f"mosquitto did not listen on {HOST}:{self.port} within {timeout} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop cleanly (SIGTERM: clients see the connection close; persistence is saved)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._wait_port_free()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL: nothing saved)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> Broker:
        """Stop and start again on the same port."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Teardown: kill the process (and remove the directory if it was ours)."""
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _wait_port_free(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while _accepts(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- conveniences --------------------------------------------------------

    def config(self, **overrides) -> MqttConfig:
        """An MqttConfig for this broker (keepalive 5 s unless overridden)."""
        values = {"host": self.host, "port": self.port, "keepalive": 5, **overrides}
        return MqttConfig(**values)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Broker {self.host}:{self.port} {state}{' persistent' if self.persistence else ''}>"


@pytest.fixture
def broker(tmp_path_factory) -> Broker:
    """A fresh Mosquitto on a free loopback port, killed after the test."""
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    try:
        yield b
    finally:
        b.close()


class Probe:
    """An independent MQTT v5 subscriber that records every message it gets.

        async with Probe(broker, "vinyl_mqtt/#") as probe:
            msg = await probe.wait_for(lambda m: m.topic == t and m.payload == b"online")
    """

    def __init__(self, broker: Broker, *topics: str, client_id: str | None = None, qos: int = 1):
        self.broker = broker
        self.topics = topics
        self.client_id = client_id
        self.qos = qos
        self.messages: list[aiomqtt.Message] = []
        self._new = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Probe:
        self._client = aiomqtt.Client(
            self.broker.host, self.broker.port, identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5, timeout=5,
        )
        await self._client.__aenter__()
        for t in self.topics:
            await self._client.subscribe(t, self.qos)
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, aiomqtt.MqttError):
                pass
        if self._client is not None:
            try:
                await self._client.__aexit__(None, None, None)
            except aiomqtt.MqttError:
                pass

    async def _collect(self) -> None:
        assert self._client is not None
        async for m in self._client.messages:
            self.messages.append(m)
            self._new.set()

    async def publish(self, topic: str, payload: bytes | str, **kw) -> None:
        assert self._client is not None
        await self._client.publish(topic, payload, **kw)

    def on(self, topic: str) -> list[aiomqtt.Message]:
        return [m for m in self.messages if m.topic.value == topic]

    async def wait_for(self, pred: Callable[[aiomqtt.Message], bool], timeout: float = 5.0) -> aiomqtt.Message:
        """The first recorded message (old or new) for which pred is true."""
        async def scan() -> aiomqtt.Message:
            seen = 0
            while True:
                for m in self.messages[seen:]:
                    if pred(m):
                        return m
                seen = len(self.messages)
                self._new.clear()
                await self._new.wait()

        return await asyncio.wait_for(scan(), timeout)
