"""vinyl_mqtt.mqtt against a real Mosquitto (tests/broker.py): availability,
reconnects, retained state, expiry, content type, shared subscriptions,
handler errors, slow handlers, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vinyl_mqtt.config import TlsConfig
from vinyl_mqtt.messages import OFFLINE, ONLINE, MessageError, Topics
from vinyl_mqtt.mqtt import Connection, Message

try:
    from broker import Broker, Probe, broker, free_port  # noqa: F401 (the fixture)
except ImportError:  # tests/ imported as a package
    from tests.broker import Broker, Probe, broker, free_port  # noqa: F401

from aio import aio, until  # noqa: E402

BASE = "vm"
TOPICS = Topics(BASE)
LOGGER = "vinyl_mqtt.mqtt"


async def _ignore(msg: Message) -> None:
    pass


def make(broker: Broker, node: str = "n1", role: str = "matcher", **cfg) -> Connection:
    return Connection(broker.config(**cfg), node=node, role=role, topics=TOPICS)


@contextlib.asynccontextmanager
async def running(conn: Connection, handler=_ignore, on_connect=None, wait: bool = True):
    """conn.run() as a task (connected on entry unless wait=False); cancelled on exit."""
    task = asyncio.create_task(conn.run(handler, on_connect))
    try:
        if wait:
            await asyncio.wait_for(conn.connected.wait(), 5)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def messages(caplog, level: int, pattern: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == LOGGER and r.levelno == level and re.search(pattern, r.getMessage())]


def published_by(broker: Broker, conn: Connection, topic: str, payload: str) -> bool:
    """Whether the broker's log shows ``conn`` itself publishing ``payload`` (by its length) on ``topic``."""
    line = re.compile(rf"Received PUBLISH from {re.escape(conn.client_id)} \(d0, q1, r1, m\d+, "
                      rf"'{re.escape(topic)}', \.\.\. \({len(payload)} bytes\)\)")
    return bool(line.search(broker.log_text()))


def payloads(probe: Probe, topic: str) -> list[bytes]:
    return [m.payload for m in probe.on(topic)]


# -- availability ------------------------------------------------------------------


@aio()
async def test_online_retained_then_will_when_the_socket_dies(broker, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    conn = make(broker)
    assert conn.status_topic == f"{BASE}/n1/matcher/status"
    assert conn.client_id == "vinyl-mqtt-n1-matcher"
    async with running(conn):
        async with Probe(broker, conn.status_topic) as fresh:  # subscribes after: gets the retained one
            m = await fresh.wait_for(lambda m: True)
            assert (m.payload, m.retain) == (ONLINE.encode(), True)

            # the network dies under the client: no DISCONNECT, so the broker publishes the will
            conn._client._client.socket().shutdown(socket.SHUT_RDWR)
            await fresh.wait_for(lambda m: m.payload == OFFLINE.encode())
            assert not published_by(broker, conn, conn.status_topic, OFFLINE)  # so it was the will
            # ... and the connection comes back by itself, online again
            await fresh.wait_for(lambda m: m.payload == ONLINE.encode() and m is not fresh.messages[0], timeout=5)
            await asyncio.wait_for(conn.connected.wait(), 5)
        assert payloads(fresh, conn.status_topic) == [b"online", b"offline", b"online"]
    lost = messages(caplog, logging.WARNING, "lost connection")
    assert len(lost) == 1
    assert f"127.0.0.1:{broker.port}" in lost[0].getMessage() and "matcher" in lost[0].getMessage()
    assert len(messages(caplog, logging.INFO, r"reconnected to MQTT broker .* after \d+\.\d s")) == 1


@aio()
async def test_cancelling_run_leaves_offline_via_the_will(broker):
    conn = make(broker)
    async with Probe(broker, conn.status_topic) as probe:
        task = asyncio.create_task(conn.run(_ignore))
        await asyncio.wait_for(conn.connected.wait(), 5)
        await probe.wait_for(lambda m: m.payload == b"online")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not conn.connected.is_set()
        await probe.wait_for(lambda m: m.payload == b"offline", timeout=3)
    async with Probe(broker, conn.status_topic) as fresh:
        m = await fresh.wait_for(lambda m: True)
        assert (m.payload, m.retain) == (b"offline", True)
    # the client never published offline itself: the broker did, from the will
    assert published_by(broker, conn, conn.status_topic, ONLINE)
    assert not published_by(broker, conn, conn.status_topic, OFFLINE)


@aio()
async def test_close_publishes_offline_once_and_run_returns(broker):
    conn = make(broker, role="dedupe")
    async with Probe(broker, conn.status_topic) as probe:
        task = asyncio.create_task(conn.run(_ignore))
        await asyncio.wait_for(conn.connected.wait(), 5)
        await conn.close()
        assert task.done() and task.exception() is None  # run() returned
        assert not conn.connected.is_set()
        await probe.wait_for(lambda m: m.payload == b"offline", timeout=3)
        await asyncio.sleep(0.3)  # a will would come now, after the offline we published
        assert payloads(probe, conn.status_topic) == [b"online", b"offline"]
    assert published_by(broker, conn, conn.status_topic, OFFLINE)  # by close(), not a will
    assert await conn.publish(f"{BASE}/x", "late") is False
    async with Probe(broker, conn.status_topic) as fresh:
        m = await fresh.wait_for(lambda m: True)
        assert (m.payload, m.retain) == (b"offline", True)
    # closed before running: run() returns at once
    other = make(broker, role="waker")
    await other.close()
    await asyncio.wait_for(other.run(_ignore), 1)


# -- broker restart ------------------------------------------------------------------


@aio()
async def test_broker_restart_restores_subscriptions_and_retained_state(broker, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    got: list[Message] = []
    connects = 0

    async def handler(m: Message) -> None:
        got.append(m)

    async def on_connect() -> None:
        nonlocal connects
        connects += 1

    conn = make(broker, node="pi", role="listener")
    await conn.subscribe(f"{BASE}/+/cmd")  # before run(): remembered
    state = f"{BASE}/pi/listener"
    await conn.set_retained(state, b'{"state": "idle"}', content_type="application/json")
    async with running(conn, handler, on_connect):
        assert connects == 1
        await conn.set_retained(state, b'{"state": "playing"}', content_type="application/json")

        broker.restart()  # no persistence: the broker forgets every retained message
        await until(lambda: not conn.connected.is_set(), 3, "the disconnect")
        await asyncio.wait_for(conn.connected.wait(), 6)
        assert connects == 2

        async with Probe(broker, f"{BASE}/#") as probe:
            await probe.wait_for(lambda m: m.topic.value == state)
            await probe.wait_for(lambda m: m.topic.value == conn.status_topic)
            assert payloads(probe, state) == [b'{"state": "playing"}']  # the latest, not the first
            assert probe.on(state)[0].retain
            assert probe.on(state)[0].properties.ContentType == "application/json"
            assert payloads(probe, conn.status_topic) == [b"online"]
            await probe.publish(f"{BASE}/hass/cmd", b"after restart", qos=1)
            await until(lambda: any(m.payload == b"after restart" for m in got), 3, "the message after the restart")
    assert len(messages(caplog, logging.WARNING, "lost connection to MQTT broker")) == 1
    assert len(messages(caplog, logging.INFO, "reconnected to MQTT broker")) == 1


@aio()
async def test_persistent_broker_keeps_retained_across_restart(tmp_path):
    with Broker(tmp_path / "b", persistence=True) as b:
        async with Probe(b) as p:
            await p.publish(f"{BASE}/kept", b"yes", qos=1, retain=True)
        b.restart()
        async with Probe(b, f"{BASE}/kept") as fresh:
            m = await fresh.wait_for(lambda m: True)
            assert m.payload == b"yes"


# -- publish -------------------------------------------------------------------------


@aio()
async def test_publish_is_false_while_the_broker_is_down_and_true_after(broker, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    conn = make(broker, role="scrobbler")
    assert await conn.publish(f"{BASE}/x/play", b"{}") is False  # not running yet
    async with running(conn):
        assert await conn.publish(f"{BASE}/x/play", b"{}") is True
        broker.stop()
        await until(lambda: not conn.connected.is_set(), 3, "the disconnect")
        t0 = time.monotonic()
        assert await conn.publish(f"{BASE}/x/play", b"{}") is False
        assert await conn.publish(f"{BASE}/x/play", b"{}", qos=0) is False
        assert time.monotonic() - t0 < 0.5  # answered at once, no waiting for a timeout
        await asyncio.sleep(1.5)  # at least one failed reconnect: not logged again
        broker.start()
        await asyncio.wait_for(conn.connected.wait(), 6)
        assert await conn.publish(f"{BASE}/x/play", b"{}") is True
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        f"scrobbler: lost connection to MQTT broker 127.0.0.1:{broker.port} "
        "(connection closed by the broker or the network); reconnecting"
    ]


@aio()
async def test_expiry_reaches_the_broker(broker):
    conn = make(broker, node="pi", role="listener")
    async with running(conn):
        async with Probe(broker, f"{BASE}/pi/#") as live:
            assert await conn.publish(f"{BASE}/pi/short", b"gone soon", retain=True, expiry_s=1)
            assert await conn.publish(f"{BASE}/pi/long", b"stays", retain=True)
            m = await live.wait_for(lambda m: m.topic.value == f"{BASE}/pi/short")
            assert m.properties.MessageExpiryInterval == 1
        await asyncio.sleep(2.5)
        async with Probe(broker, f"{BASE}/pi/short", f"{BASE}/pi/long") as late:
            await late.wait_for(lambda m: m.topic.value == f"{BASE}/pi/long")
            await asyncio.sleep(0.2)
            assert payloads(late, f"{BASE}/pi/short") == []


@aio()
async def test_content_type_round_trips(broker):
    got: list[Message] = []

    async def handler(m: Message) -> None:
        got.append(m)

    conn = make(broker)
    await conn.subscribe(f"{BASE}/+/clip")
    async with running(conn, handler):
        assert await conn.publish(f"{BASE}/pi/clip", b"\x00\x01", content_type="application/vnd.vinyl-mqtt.clip")
        assert await conn.publish(f"{BASE}/pi/clip", "plain")
        await until(lambda: len(got) == 2, 3, "both messages")
    assert got[0] == Message(f"{BASE}/pi/clip", b"\x00\x01", False, "application/vnd.vinyl-mqtt.clip", 1)
    assert got[1] == Message(f"{BASE}/pi/clip", b"plain", False, None, 1)


@aio()
async def test_on_connect_runs_before_messages_are_handed_over(broker, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    events: list[str] = []

    async def on_connect() -> None:
        events.append("on_connect start")
        await asyncio.sleep(0.3)  # retained messages on subscribed topics arrive meanwhile
        events.append("on_connect end")
        raise RuntimeError("on_connect bug")  # logged; the connection stays up

    async def handler(m: Message) -> None:
        events.append(f"message {m.payload.decode()} retain={m.retain}")

    async with Probe(broker) as p:
        await p.publish(f"{BASE}/hass/status", b"online", qos=1, retain=True)
    conn = make(broker, role="nowplaying")
    await conn.subscribe(f"{BASE}/hass/status")
    await conn.subscribe(f"{BASE}/+/cmd")
    async with running(conn, handler, on_connect), Probe(broker) as p:
        assert events[:2] == ["on_connect start", "on_connect end"]
        await until(lambda: len(events) == 3, 2, "the retained message")
        assert events[2] == "message online retain=True"
        await conn.unsubscribe(f"{BASE}/+/cmd")
        await p.publish(f"{BASE}/x/cmd", b"unwanted", qos=1)
        await p.publish(f"{BASE}/hass/status", b"offline", qos=1)
        await until(lambda: len(events) == 4, 2, "the live message")
        assert events[3] == "message offline retain=False"
    failed = messages(caplog, logging.ERROR, "on_connect failed")
    assert len(failed) == 1 and failed[0].exc_info[0] is RuntimeError


@aio()
async def test_close_from_inside_the_handler(broker):
    conn = make(broker, role="waker")
    await conn.subscribe(f"{BASE}/+/cmd")

    async def handler(m: Message) -> None:
        await conn.close()  # returns at once: run() finishes once the handler returns
        await conn.publish(f"{BASE}/waker/ack", b"bye")

    async with Probe(broker, f"{BASE}/waker/#", f"{BASE}/+/waker/status") as p:
        task = asyncio.create_task(conn.run(handler))
        await asyncio.wait_for(conn.connected.wait(), 5)
        await p.publish(f"{BASE}/x/cmd", b"stop", qos=1)
        await asyncio.wait_for(task, 5)
        await p.wait_for(lambda m: m.payload == b"offline")
        assert payloads(p, f"{BASE}/waker/ack") == [b"bye"]


# -- shared subscription -------------------------------------------------------------


@aio()
async def test_shared_subscription_splits_the_clips(broker):
    got: dict[str, list[bytes]] = {"m1": [], "m2": []}

    def collect(name):
        async def handler(m: Message) -> None:
            assert m.topic.startswith(f"{BASE}/") and m.topic.endswith("/clip")
            got[name].append(m.payload)
        return handler

    shared = TOPICS.clip_shared("g")
    assert shared == f"$share/g/{BASE}/+/clip"
    m1, m2 = make(broker, node="m1"), make(broker, node="m2")
    pub = make(broker, node="pi", role="listener")
    await m1.subscribe(shared)  # before connecting
    async with running(m1, collect("m1")), running(m2, collect("m2")), running(pub):
        await m2.subscribe(shared)  # while connected
        for i in range(20):
            assert await pub.publish(TOPICS.clip(f"pi{i % 2}"), f"clip {i}", expiry_s=60)
        await until(lambda: len(got["m1"]) + len(got["m2"]) >= 20, 5, "20 clips")
        await asyncio.sleep(0.3)
    assert got["m1"] and got["m2"], got
    assert len(got["m1"]) + len(got["m2"]) == 20
    assert sorted(got["m1"] + got["m2"]) == sorted(f"clip {i}".encode() for i in range(20))


# -- handler errors --------------------------------------------------------------------


@aio()
async def test_handler_errors_are_logged_and_the_connection_keeps_serving(broker, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    handled: list[bytes] = []

    async def handler(m: Message) -> None:
        if m.payload.startswith(b"bad"):
            raise MessageError("not a clip frame (bad magic)")
        if m.payload == b"boom":
            raise RuntimeError("bug in the handler")
        handled.append(m.payload)

    conn = make(broker)
    await conn.subscribe(f"{BASE}/+/clip")
    a, b = f"{BASE}/pi/clip", f"{BASE}/den/clip"
    async with running(conn, handler), Probe(broker) as p:
        for topic, payload in [(a, b"bad1"), (a, b"bad2"), (a, b"bad3"), (b, b"bad"), (a, b"ok1"),
                               (a, b"boom"), (a, b"boom"), (a, b"ok2")]:
            await p.publish(topic, payload, qos=1)
        await until(lambda: handled == [b"ok1", b"ok2"], 3, "the good messages")
        assert conn.connected.is_set()
    dropped = messages(caplog, logging.WARNING, "dropped message on")
    assert sorted(r.getMessage() for r in dropped) == sorted([
        f"matcher: dropped message on {a}: not a clip frame (bad magic)",
        f"matcher: dropped message on {b}: not a clip frame (bad magic)",
    ])
    assert len(messages(caplog, logging.DEBUG, "dropped message on")) == 2  # the repeats, quietly
    failed = messages(caplog, logging.ERROR, f"handler failed on a message on {a}")
    assert len(failed) == 2
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in failed)
    assert "bug in the handler" in caplog.text and "Traceback" in caplog.text


@aio()
async def test_slow_handler_does_not_block_acks_or_publishing_and_close_drains(broker):
    release = asyncio.Event()
    handled: list[bytes] = []

    async def handler(m: Message) -> None:
        if not handled:
            await release.wait()  # the first message takes "long"
        handled.append(m.payload)

    conn = make(broker, node="slow")
    await conn.subscribe(f"{BASE}/+/clip")
    async with running(conn, handler) as task, Probe(broker) as p:
        for i in range(30):
            await p.publish(f"{BASE}/pi/clip", f"{i:02d}", qos=1)
        # while the handler is stuck on the first message, the broker gets every PUBACK ...
        pubacks = re.compile(rf"Received PUBACK from {conn.client_id} ")
        await until(lambda: len(pubacks.findall(broker.log_text())) >= 30, 3, "30 PUBACKs from the client")
        # ... and the connection still publishes
        t0 = time.monotonic()
        assert await conn.publish(f"{BASE}/slow/match", b"{}")
        assert time.monotonic() - t0 < 0.5
        assert handled == []
        # close() lets the handler finish what was received, in order
        asyncio.get_running_loop().call_later(0.3, release.set)
        await conn.close()
        assert task.done()
    assert handled == [f"{i:02d}".encode() for i in range(30)]


# -- start-up without a broker -----------------------------------------------------------


@aio()
async def test_run_retries_until_the_broker_starts(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    b = Broker(tmp_path / "late")  # configured, not started: nothing listens on its port
    try:
        conn = make(b, node="pi", role="listener")
        async with running(conn, wait=False) as task:
            await asyncio.sleep(2.2)  # attempts at ~0 s and ~1 s (1 s backoff, then 2 s)
            assert not task.done() and not conn.connected.is_set()
            assert len(messages(caplog, logging.DEBUG, "connecting to")) >= 2
            cannot = messages(caplog, logging.WARNING, "cannot connect")
            assert len(cannot) == 1
            assert f"127.0.0.1:{b.port}" in cannot[0].getMessage() and "listener" in cannot[0].getMessage()
            assert "Connection refused" in cannot[0].getMessage()
            b.start()
            await asyncio.wait_for(conn.connected.wait(), 4)
            assert len(messages(caplog, logging.INFO, r"connected to MQTT broker .* after \d")) == 1
            assert await conn.publish(f"{BASE}/pi/listener", b"{}")
    finally:
        b.close()


# -- identity, credentials, TLS -----------------------------------------------------------


@aio()
async def test_client_id_and_credentials_never_logged(broker, caplog):
    caplog.set_level(logging.DEBUG, logger="vinyl_mqtt")
    conn = make(broker, node="pi", role="listener", client_id="turntable", username="u", password="s3cr3t-pw")
    assert conn.client_id == "turntable-listener"
    async with running(conn):
        await conn.publish(f"{BASE}/pi/x", b"1")
    assert re.search(r"New client connected from 127\.0\.0\.1:\d+ as turntable-listener \(p5, c1, k5, u'u'\)", broker.log_text())
    assert "s3cr3t-pw" not in caplog.text
    assert "s3cr3t-pw" not in repr(conn.cfg) and "s3cr3t-pw" not in repr(conn)


def _make_certs(d: Path) -> tuple[Path, Path, Path]:
    def ssl_(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl_("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
         "-keyout", "ca.key", "-out", "ca.crt")
    ssl_("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
         "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    ssl_("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "2", "-extfile", "san.ext", "-out", "server.crt")
    return d / "ca.crt", d / "server.crt", d / "server.key"


@aio()
async def test_tls_verifies_the_broker_and_insecure_skips_the_hostname(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, crt, key = _make_certs(certs)
    tls_port = free_port()
    extra = [f"listener {tls_port} 127.0.0.1", f"cafile {ca}", f"certfile {crt}", f"keyfile {key}"]
    with Broker(tmp_path / "b", extra_config=extra) as b:
        ok = make(b, role="nowplaying", host="localhost", port=tls_port, tls=TlsConfig(enabled=True, ca_certs=ca))
        async with running(ok):
            assert await ok.publish(f"{BASE}/n1/now_playing", b"{}", retain=True)

        # the certificate names localhost, not 127.0.0.1: refused unless insecure
        wrong = make(b, role="waker", port=tls_port, tls=TlsConfig(enabled=True, ca_certs=ca))
        async with running(wrong, wait=False):
            await until(lambda: messages(caplog, logging.WARNING, "waker: cannot connect"), 3, "the TLS failure")
            assert not wrong.connected.is_set()
        assert "certificate" in messages(caplog, logging.WARNING, "waker: cannot connect")[0].getMessage().lower()

        insecure = make(b, role="dedupe", port=tls_port, tls=TlsConfig(enabled=True, ca_certs=ca, insecure=True))
        async with running(insecure):
            assert await insecure.publish(f"{BASE}/n1/x", b"{}")
