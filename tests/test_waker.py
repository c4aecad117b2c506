"""The waker role and Wake-on-LAN: real UDP sockets on loopback, a real Mosquitto,
and the whole story with the real listener (ALSA file plugin) and matcher roles."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from pydantic import ValidationError

from aio import aio, start, stop, until
from alsa import alsa_file_device
from broker import Probe
from conftest import LIBRARY, SIM_RATE, needle_drop, node_config
from vinyl_mqtt import wol
from vinyl_mqtt.config import Config, ConfigError
from vinyl_mqtt.messages import ListenerState, MatchResult, Topics, WakeEvent
from vinyl_mqtt.mqtt import Connection
from vinyl_mqtt.roles.listener import ListenerRole
from vinyl_mqtt.roles.matcher import MatcherRole
from vinyl_mqtt.roles.waker import WakerConfig, WakerRole

BASE = "vinyl_mqtt"
TOPICS = Topics(BASE)
MAC = "52:54:00:12:34:56"
MAC_BYTES = bytes.fromhex("525400123456")
PI = "pi"
SONG = "st_chipdisko"
PACE = "6"  # the ALSA file plugin does not pace: play at 6x real time


class WakerTestConfig(Config):
    """A Config with the waker section (whether or not config.py has it yet)."""

    waker: WakerConfig | None = None


class UdpSink:
    """A real UDP socket on 127.0.0.1 that receives what a waker broadcasts."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.packets: list[bytes] = []

    async def recv(self, timeout: float = 5.0) -> bytes:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), timeout)
        self.packets.append(data)
        return data

    async def settle(self, seconds: float) -> list[bytes]:
        """Everything that arrives within ``seconds``."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(await self.recv(left))
            except TimeoutError:
                break
        return got

    async def burst(self, timeout: float = 5.0) -> list[bytes]:
        """The packets of the next wake: the first within ``timeout``, then the rest of its repeats."""
        return [await self.recv(timeout)] + await self.settle(0.4)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink():
    s = UdpSink()
    yield s
    s.close()


def magic(mac: bytes = MAC_BYTES) -> bytes:
    return b"\xff" * 6 + mac * 16


def waker_config(broker, sink: UdpSink, node: str = "lan", **waker) -> WakerTestConfig:
    values = dict(mac=MAC, broadcast="127.0.0.1", port=sink.port, repeat=3, interval_s=0.02, wake_timeout_s=10.0)
    values.update(waker)
    return WakerTestConfig(node=node, mqtt=broker.config(), waker=WakerConfig(**values))


def state(listener: str, what: str, node: str | None = None, since: float | None = None) -> bytes:
    return ListenerState(listener=listener, node=node, state=what, rms_dbfs=-20.0, peak_dbfs=-6.0,
                         since=since or time.time()).to_json()


async def matcher_status(probe: Probe, node: str, status: str) -> None:
    await probe.publish(TOPICS.status(node, "matcher"), status, qos=1, retain=True)


async def play(probe: Probe, listener: str, what: str = "playing", **kw) -> None:
    await probe.publish(TOPICS.listener_state(listener), state(listener, what, **kw), qos=1, retain=True)


def wakes(probe: Probe, listener: str = PI) -> list[WakeEvent]:
    return [WakeEvent.parse(m.payload) for m in probe.on(TOPICS.wake(listener))]


async def wait_wake(probe: Probe, status: str, listener: str = PI, timeout: float = 5.0) -> WakeEvent:
    m = await probe.wait_for(lambda m: m.topic.value == TOPICS.wake(listener)
                             and json.loads(m.payload)["status"] == status, timeout)
    return WakeEvent.parse(m.payload)


# --------------------------------------------------------------------------- the magic packet


@pytest.mark.parametrize("text", ["52:54:00:12:34:56", "52-54-00-12-34-56", "525400123456", "52:54:00:12:34:56 ",
                                  "52:54:00:12:34:56".upper()])
def test_mac_formats(text):
    assert wol.parse_mac(text) == MAC_BYTES
    assert wol.normalize_mac(text) == MAC
    packet = wol.magic_packet(text)
    assert len(packet) == wol.PACKET_SIZE == 102
    assert packet[:6] == b"\xff" * 6
    assert all(packet[6 + 6 * i: 12 + 6 * i] == MAC_BYTES for i in range(16))


@pytest.mark.parametrize("text", ["52:54:00:12:34", "52:54:00:12:34:56:78", "52:54:00:12:34:5g", "52:54-00:12:34:56",
                                  "5254.0012.3456", "", "00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "525400123456a"])
def test_bad_macs_are_refused_clearly(text):
    with pytest.raises(wol.WolError, match="MAC address"):
        wol.magic_packet(text)
    with pytest.raises(ValidationError, match="MAC address"):
        WakerConfig(mac=text)


def test_config_section():
    cfg = WakerConfig(mac="52-54-00-12-34-56")
    assert (cfg.mac, cfg.broadcast, cfg.port, cfg.repeat, cfg.wake_timeout_s, cfg.matcher_nodes) == (
        MAC, "255.255.255.255", 9, 3, 120.0, None)
    with pytest.raises(ValidationError, match="IPv4"):
        WakerConfig(mac=MAC, broadcast="the lan")
    with pytest.raises(ValidationError, match="Extra inputs"):
        WakerConfig(mac=MAC, macc=MAC)
    with pytest.raises(ValidationError):
        WakerConfig(mac=MAC, port=0)
    with pytest.raises(ValidationError):
        WakerConfig()
    with pytest.raises(ConfigError, match="waker: section"):
        WakerRole(Config(node="x"), conn=None)


def test_send_is_a_repeated_udp_broadcast(sink):
    async def go():
        n = await wol.asend("52-54-00-12-34-56", broadcast="127.0.0.1", port=sink.port, repeat=4, interval_s=0.01)
        return n, await sink.settle(0.3)

    assert wol.send(MAC, broadcast="127.0.0.1", port=sink.port, repeat=2, interval_s=0) == 2
    first = [sink.sock.recv(4096) for _ in range(2)]
    n, got = asyncio.run(go())
    assert first == [magic()] * 2
    assert n == 4 and got == [magic()] * 4


# --------------------------------------------------------------------------- the role


@aio(20)
async def test_play_without_matcher_wakes_it(broker, sink):
    async with Probe(broker, f"{BASE}/+/wake") as probe:
        await matcher_status(probe, "big", "offline")  # the matcher node went to sleep earlier
        task, role = start(WakerRole, waker_config(broker, sink))
        await play(probe, PI, "idle")
        assert await sink.settle(1.0) == []  # idle: nothing to match
        await play(probe, PI, "playing")
        got = await sink.burst()
        assert got == [magic()] * 3  # repeat: 3
        sent = await wait_wake(probe, "sent")
        assert (sent.mac, sent.attempt, sent.listener) == (MAC, 1, PI)
        await asyncio.sleep(0.3)
        await matcher_status(probe, "big", "online")  # it booted
        woke = await wait_wake(probe, "woke")
        assert 0.3 <= woke.waited_s < 5 and woke.mac == MAC
        assert await sink.settle(0.3) == []
    await stop(task)
    assert [e.status for e in wakes(probe)] == ["sent", "woke"]
    assert role.packets == 3


@aio(20)
async def test_no_packet_while_a_matcher_is_online(broker, sink):
    async with Probe(broker, f"{BASE}/+/wake") as probe:
        # retained before the waker starts: it must see the matcher before acting on the play
        await matcher_status(probe, "big", "online")
        await play(probe, PI, "playing")
        task, role = start(WakerRole, waker_config(broker, sink))
        await until(lambda: role.conn.connected.is_set(), what="the waker online")
        await play(probe, PI, "idle")
        await play(probe, PI, "playing")
        await play(probe, "den", "playing")
        assert await sink.settle(1.5) == []
        # a matcher on a node that does not count is no matcher
        await stop(task)
        task, role = start(WakerRole, waker_config(broker, sink, matcher_nodes=["other"]))
        assert len(await sink.burst()) == 3
        await matcher_status(probe, "other", "online")
        await wait_wake(probe, "woke")
    await stop(task)
    assert [e.status for e in wakes(probe)] == ["sent", "woke"]
    assert role.matchers == {"other"}


@aio(20)
async def test_one_wake_at_a_time(broker, sink):
    async with Probe(broker, f"{BASE}/+/wake") as probe:
        await matcher_status(probe, "big", "offline")
        task, role = start(WakerRole, waker_config(broker, sink, wake_timeout_s=5.0))
        await play(probe, PI, "playing")
        assert len(await sink.burst()) == 3
        # while it is in progress: level updates, a new play, another turntable: no second wake
        await play(probe, PI, "playing")
        await play(probe, PI, "idle")
        await play(probe, PI, "playing")
        await play(probe, "den", "playing")
        assert await sink.settle(1.0) == []
        assert role.wake is not None and role.wake.listeners == [PI, "den"]
        await matcher_status(probe, "big", "online")
        for listener in (PI, "den"):
            await wait_wake(probe, "woke", listener)  # every turntable that waited hears it
    await stop(task)
    assert [e.status for e in wakes(probe, PI)] == ["sent", "woke"]
    assert [e.status for e in wakes(probe, "den")] == ["woke"]


@aio(20)
async def test_failed_wake_retries_on_the_next_play_only(broker, sink):
    async with Probe(broker, f"{BASE}/+/wake") as probe:
        await matcher_status(probe, "big", "offline")
        task, role = start(WakerRole, waker_config(broker, sink, wake_timeout_s=0.8))
        await play(probe, PI, "playing")
        assert len(await sink.burst()) == 3
        failed = await wait_wake(probe, "failed")
        assert failed.attempt == 1 and failed.waited_s >= 0.8
        # the same play goes on (level updates): no loop of packets
        await play(probe, PI, "playing")
        await play(probe, PI, "playing")
        assert await sink.settle(1.2) == []
        await play(probe, PI, "idle")
        assert await sink.settle(0.3) == []
        await play(probe, PI, "playing")  # the next start of play: try again
        assert len(await sink.burst()) == 3
        await until(lambda: len(wakes(probe)) >= 3, what="the second sent event")
        assert (wakes(probe)[2].status, wakes(probe)[2].attempt) == ("sent", 2)
        await until(lambda: len(wakes(probe)) >= 4, what="the second failed event")  # still no loop
        assert await sink.settle(1.0) == []
    await stop(task)
    assert [e.status for e in wakes(probe)] == ["sent", "failed", "sent", "failed"]
    assert role.packets == 6


@aio(20)
async def test_gone_listener_and_unsendable_packet(broker, sink):
    """A listener whose node is offline plays nothing; a packet that cannot go out is a failed wake."""
    async with Probe(broker, f"{BASE}/+/wake") as probe:
        await matcher_status(probe, "big", "offline")
        await probe.publish(TOPICS.status("pi-node", "listener"), "offline", qos=1, retain=True)
        await play(probe, PI, "playing", node="pi-node")  # its last retained state
        cfg = waker_config(broker, sink)

        async def broken(*args, **kw):
            raise OSError(101, "Network is unreachable")

        conn = Connection(cfg.mqtt, node=cfg.node, role="waker", topics=TOPICS)
        role = WakerRole(cfg, conn, sender=broken)
        task = asyncio.create_task(role.run())
        await asyncio.sleep(1.2)
        assert role.wake is None and not role.events
        await probe.publish(TOPICS.status("pi-node", "listener"), "online", qos=1, retain=True)
        failed = await wait_wake(probe, "failed")
        assert failed.waited_s is None and role.packets == 0 and role.wake is None
    await stop(task)


# --------------------------------------------------------------------------- the whole story




@aio(40)
async def test_sleeping_matcher_is_woken_and_the_spooled_clips_are_matched(broker, library, excerpts, tmp_path,
                                                                         monkeypatch, sink):
    monkeypatch.setenv("VINYL_MQTT_CAPTURE_PACE", PACE)
    device, env = alsa_file_device(tmp_path, needle_drop(excerpts, SONG, tail_s=2.0), SIM_RATE, 1)
    monkeypatch.setenv("ALSA_CONFIG_PATH", env["ALSA_CONFIG_PATH"])
    big = node_config(broker, library, tmp_path, "big")
    status = TOPICS.status("big", "matcher")
    async with Probe(broker, TOPICS.match(PI), TOPICS.wake(PI), status) as probe:
        # the matcher node is up ...
        matcher_task, _ = start(MatcherRole, big)
        await probe.wait_for(lambda m: m.topic.value == status and m.payload == b"online", timeout=15)
        # ... and goes to sleep: its availability goes offline (the broker publishes its will)
        await stop(matcher_task)
        await probe.wait_for(lambda m: m.topic.value == status and m.payload == b"offline")
        waker_task, waker = start(WakerRole, waker_config(broker, sink, wake_timeout_s=30.0))
        await until(lambda: waker.conn.connected.is_set(), what="the waker online")
        # the needle drops on the Pi
        lcfg = node_config(broker, library, tmp_path, "pi-node", device=device, rate=SIM_RATE, channels=1,
                           period_frames=2048)
        lcfg.listener.clip.recheck_s = 8.0
        listener_task, listener = start(ListenerRole, lcfg)
        packet = await sink.recv(timeout=20)
        assert packet == magic()
        assert (await wait_wake(probe, "sent")).listener == PI
        # the node takes a while to boot; meanwhile the clips wait in the listener's spool
        await until(lambda: listener.spooled >= 2, timeout=20, what="two spooled clips")
        assert listener.sent == 0 and not probe.on(TOPICS.match(PI))
        spooled = set(range(listener.seq))  # every clip so far went to the spool
        matcher_task, _ = start(MatcherRole, big)  # the magic packet woke it
        woke = await wait_wake(probe, "woke", timeout=15)
        assert woke.waited_s > 0 and woke.mac == MAC
        results = lambda: [MatchResult.parse(m.payload) for m in probe.on(TOPICS.match(PI))]  # noqa: E731
        # (a clip drained in the moment between the matcher's "online" and its SUBSCRIBE would reach
        # nobody: the listener waits MATCHER_SETTLE_S after a matcher appears before draining)
        await until(lambda: spooled <= {r.seq for r in results()}, timeout=10, what="an answer for every spooled clip")
        got = [r for r in results() if r.seq in spooled]
        rest = await sink.settle(0.3)  # the other repeats of that one wake; never a second wake
    await stop(listener_task, waker_task, matcher_task)
    assert len(spooled) >= 2 and sorted(r.seq for r in got) == sorted(spooled)  # each answered once
    assert all(r.matched and r.track.title == LIBRARY[SONG][0] and r.matcher == "big" for r in got), got
    assert [e.status for e in wakes(probe)] == ["sent", "woke"]
    assert [packet] + rest == [magic()] * 3 and waker.packets == 3
