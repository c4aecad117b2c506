"""The nowplaying role against a real Mosquitto (tests/broker.py): discovery per
listener, entity states and attributes, the cover, events, availability, the
Home Assistant birth message, removal, the 255-character cap, bad payloads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from types import SimpleNamespace

import aiomqtt
import pytest

from vinyl_mqtt import hass
from vinyl_mqtt.config import Config
from vinyl_mqtt.messages import (
    ListenerState,
    MatchedTrack,
    MessageError,
    NowPlaying,
    Play,
    PlayEvent,
    Topics,
)
from vinyl_mqtt.mqtt import Connection, Message
from vinyl_mqtt.roles.nowplaying import NowPlayingRole, finish_kind, remove_listener_once

try:
    from broker import Broker, Probe, broker  # noqa: F401 (the fixture)
except ImportError:  # tests/ imported as a package
    from tests.broker import Broker, Probe, broker  # noqa: F401

from aio import aio, until  # noqa: E402

BASE = "vinyl_mqtt"
PREFIX = "homeassistant"
L = "turntable"
T = Topics(BASE)
HA = f"{BASE}/{L}/ha"
ROLE_STATUS = f"{BASE}/server/nowplaying/status"
LISTENER_STATUS = f"{BASE}/{L}/listener/status"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 + b"cover-7"
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 40 + b"cover-8"


def config(broker: Broker) -> Config:
    return Config(node="server", mqtt=broker.config())


@contextlib.asynccontextmanager
async def running(broker: Broker, *, progress_every_s: float = 60.0):
    cfg = config(broker)
    conn = Connection(cfg.mqtt, node=cfg.node, role="nowplaying", topics=T)
    role = NowPlayingRole(cfg, conn)
    role.progress_every_s = progress_every_s
    role.cover_wait_s = 0.3
    role.settle_s = 0.3
    task = asyncio.create_task(role.run())
    try:
        await asyncio.wait_for(conn.connected.wait(), 5)
        yield role
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def retained(broker: Broker, *filters: str, settle: float = 0.3) -> dict[str, aiomqtt.Message]:
    """What a client subscribing now gets as retained messages: topic -> message."""
    async with Probe(broker, *filters) as p:
        seen = -1
        while seen != len(p.messages):
            seen = len(p.messages)
            await asyncio.sleep(settle)
        return {m.topic.value: m for m in p.messages if m.retain}


def payloads(msgs: dict[str, aiomqtt.Message]) -> dict[str, bytes]:
    return {t: bytes(m.payload) for t, m in msgs.items()}


def track(title: str = "Clavelian March", cover_id: int | None = 7, **kw) -> MatchedTrack:
    return MatchedTrack(id=3, title=title, artist="Treskalle", album="Supertux Soundtrack", track_number=4,
                        duration_s=200.0, path="/music/st_clavelian_march.ogg", cover_id=cover_id, **kw)


def play(play_id: str = "p1", *, t: MatchedTrack | None = None, position: float = 30.0, at: float | None = None,
         **kw) -> Play:
    at = time.time() if at is None else at
    return Play(play_id=play_id, listener=L, track=t or track(), started_at=at - position, speed=1.008,
                confidence=0.9, position_s=position, updated_at=at, **kw)


def listener_state(state: str = "playing", level: float = -20.54) -> bytes:
    return ListenerState(listener=L, state=state, rms_dbfs=level, peak_dbfs=-3.0, since=time.time()).to_json()


def now_playing(state: str, p: Play | None = None) -> bytes:
    return NowPlaying(listener=L, state=state, play=p, since=time.time()).to_json()


def config_topic(key: str) -> str:
    return hass.discovery_topic(PREFIX, L, key)


def available(cfg: dict, state: dict[str, bytes]) -> bool:
    """Home Assistant's availability rule for a discovery config, given the retained topics."""
    rules = cfg.get("availability")
    if not rules:
        return True
    seen = []
    for a in rules:
        got = state.get(a["topic"])
        seen.append(True if got == a.get("payload_available", "online").encode()
                    else False if got == a.get("payload_not_available", "offline").encode() else None)
    mode = cfg.get("availability_mode", "latest")
    assert mode == "all"
    return all(v is True for v in seen)


async def setup_pipeline(probe: Probe, *, cover: bytes | None = PNG, cover_type: str | None = "image/png") -> Play:
    """A listener online and playing, a matcher online, a cover, dedupe's now playing: all retained."""
    await probe.publish(LISTENER_STATUS, "online", qos=1, retain=True)
    await probe.publish(f"{BASE}/m1/matcher/status", "online", qos=1, retain=True)
    await probe.publish(T.listener_state(L), listener_state(), qos=1, retain=True)
    if cover is not None:
        props = None
        if cover_type:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = cover_type
        await probe.publish(T.cover(7), cover, qos=1, retain=True, properties=props)
    p = play()
    await probe.publish(T.now_playing(L), now_playing("playing", p), qos=1, retain=True)
    return p


async def arrives(probe: Probe, since: int, pred, timeout: float = 5.0) -> aiomqtt.Message:
    """The first message after the first ``since`` ones for which pred is true."""
    await until(lambda: any(pred(m) for m in probe.messages[since:]), timeout, "a message")
    return next(m for m in probe.messages[since:] if pred(m))


def last(probe: Probe, topic: str) -> bytes | None:
    msgs = probe.on(topic)
    return bytes(msgs[-1].payload) if msgs else None


# -- discovery and states ------------------------------------------------------------------


@aio(30)
async def test_discovery_states_attributes_and_cover(broker):
    async with Probe(broker, f"{PREFIX}/#", f"{BASE}/#") as probe:
        p = await setup_pipeline(probe)
        async with running(broker) as role:
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/cover_art" and bytes(m.payload) == PNG)
            await probe.wait_for(lambda m: m.topic.value == config_topic("cover_art")
                                 and json.loads(m.payload)["content_type"] == "image/png")
            assert list(role.turntables) == [L]

            snap = await retained(broker, f"{PREFIX}/#", f"{BASE}/#")
            state = payloads(snap)
            # the exact discovery configs, one device with 12 entities
            expected = hass.discovery_configs(L, prefix=PREFIX, base=BASE, role_status=ROLE_STATUS,
                                              image_type="image/png")
            got = {t: json.loads(v) for t, v in state.items() if t.startswith(PREFIX + "/")}
            assert got == expected
            for t in expected:
                assert snap[t].properties.ContentType == "application/json"
            # spelled out once, as Home Assistant receives it
            assert got[config_topic("now_playing")] == {
                "name": "Now playing",
                "unique_id": "vinyl_mqtt_turntable_now_playing",
                "object_id": "turntable_now_playing",
                "default_entity_id": "sensor.turntable_now_playing",
                "state_topic": "vinyl_mqtt/turntable/ha/now_playing",
                "json_attributes_topic": "vinyl_mqtt/turntable/ha/now_playing/attributes",
                "icon": "mdi:record-player",
                "qos": 1,
                "availability": [
                    {"topic": "vinyl_mqtt/server/nowplaying/status"},
                    {"topic": "vinyl_mqtt/turntable/listener/status"},
                    {"topic": "vinyl_mqtt/turntable/ha/matcher_connectivity"},
                ],
                "availability_mode": "all",
                "device": {"identifiers": ["vinyl_mqtt_turntable"], "name": "turntable",
                           "manufacturer": "vinyl-mqtt", "model": "Turntable"},
                "origin": {"name": "vinyl-mqtt", "sw_version": "0.1.0"},
            }
            # entity states
            assert state[f"{HA}/now_playing"] == b"Clavelian March"
            assert state[f"{HA}/artist"] == b"Treskalle"
            assert state[f"{HA}/album"] == b"Supertux Soundtrack"
            assert state[f"{HA}/playing"] == b"ON"
            assert state[f"{HA}/signal_level"] == b"-20.5"
            assert state[f"{HA}/speed_error"] == b"0.80"
            assert state[f"{HA}/matcher_connectivity"] == b"online"
            assert 14 <= int(state[f"{HA}/progress"]) <= 17  # 30 s (+ a little) of 200 s
            assert f"{HA}/last_scrobble" not in state  # unknown until the scrobbler reports
            assert f"{HA}/playback" not in state  # events are never retained
            attrs = json.loads(state[f"{HA}/now_playing/attributes"])
            assert {k: attrs[k] for k in ("status", "title", "artist", "album", "track_number", "duration",
                                          "position", "speed", "speed_error", "confidence", "play_id")} == {
                "status": "playing", "title": "Clavelian March", "artist": "Treskalle",
                "album": "Supertux Soundtrack", "track_number": 4, "duration": 200.0, "position": 30.0,
                "speed": 1.008, "speed_error": 0.8, "confidence": 0.9, "play_id": p.play_id}
            assert attrs["started"] == hass.iso(p.started_at)
            # the cover: the library's bytes, with their type
            assert state[f"{HA}/cover_art"] == PNG
            assert snap[f"{HA}/cover_art"].properties.ContentType == "image/png"
            # every entity is available
            for cfg in expected.values():
                assert available(cfg, state), cfg["unique_id"]


@aio(30)
async def test_track_change_cover_change_and_progress_ticks(broker):
    async with Probe(broker, f"{PREFIX}/#", f"{BASE}/#") as probe:
        await setup_pipeline(probe)
        await probe.publish(T.cover(8), JPEG, qos=1, retain=True)  # no content type: sniffed
        async with running(broker, progress_every_s=0.1) as role:
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/cover_art" and bytes(m.payload) == PNG)
            # the progress sensor moves by itself between plays' updates
            first = int(last(probe, f"{HA}/progress"))
            p2 = play("p2", t=track("Tropical Breeze", cover_id=8), position=0.0)
            p2 = p2.model_copy(update={"track": p2.track.model_copy(update={"duration_s": 4.0})})
            await probe.publish(T.play(L), PlayEvent(event="started", play=p2).to_json(), qos=1)
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/now_playing" and m.payload == b"Tropical Breeze")
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/cover_art" and bytes(m.payload) == JPEG)
            cfg = await probe.wait_for(lambda m: m.topic.value == config_topic("cover_art")
                                       and json.loads(m.payload)["content_type"] == "image/jpeg")
            assert cfg.retain is False  # live
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/progress" and m.payload.isdigit()
                                 and int(m.payload) >= 25, timeout=5)
            assert first >= 14
            ev = await probe.wait_for(lambda m: m.topic.value == f"{HA}/playback")
            assert json.loads(ev.payload)["event_type"] == "track_changed"
            assert json.loads(ev.payload)["title"] == "Tropical Breeze"
            # only the cover in use stays subscribed
            assert T.cover(7) not in role.conn._subscriptions and T.cover(8) in role.conn._subscriptions
            # a track without a cover: the placeholder
            p3 = play("p3", t=track("Freezing Point", cover_id=None))
            await probe.publish(T.now_playing(L), now_playing("playing", p3), qos=1, retain=True)
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/cover_art"
                                 and bytes(m.payload) == hass.PLACEHOLDER_SVG)
            await probe.wait_for(lambda m: m.topic.value == config_topic("cover_art")
                                 and json.loads(m.payload)["content_type"] == "image/svg+xml")
            # a cover id the broker has nothing for: the placeholder stays after the wait
            p4 = play("p4", t=track("Credits Ballad", cover_id=99))
            n = len(probe.messages)
            await probe.publish(T.now_playing(L), now_playing("playing", p4), qos=1, retain=True)
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/now_playing" and m.payload == b"Credits Ballad")
            await asyncio.sleep(0.6)
            assert not [m for m in probe.messages[n:] if m.topic.value == f"{HA}/cover_art"]  # already shown
            assert payloads(await retained(broker, f"{HA}/cover_art"))[f"{HA}/cover_art"] == hass.PLACEHOLDER_SVG


@aio(30)
async def test_events_side_finished_record_finished_unknown_record(broker):
    async with Probe(broker, f"{BASE}/#") as probe:
        p1 = await setup_pipeline(probe)
        async with running(broker):
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/now_playing" and m.payload == b"Clavelian March")
            # the retained now playing at start is not a track change
            await asyncio.sleep(0.3)
            assert not probe.on(f"{HA}/playback")

            def events() -> list[dict]:
                return [json.loads(m.payload) for m in probe.on(f"{HA}/playback")]

            # the needle lifted mid-track: no side finished
            lifted = p1.model_copy(update={"ended_at": time.time() - 2, "updated_at": time.time(),
                                           "end_reason": "silence", "played_through": False})
            await probe.publish(T.play(L), PlayEvent(event="ended", play=lifted).to_json(), qos=1)
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/now_playing" and m.payload == b"None")
            # a side played through to silence, twice (QoS 1 may repeat): one event
            p2 = play("p2", position=0.0)
            await probe.publish(T.play(L), PlayEvent(event="started", play=p2).to_json(), qos=1)
            ended = p2.model_copy(update={"ended_at": time.time(), "updated_at": time.time(), "end_reason": "silence",
                                          "played_through": True, "played_s": 199.0})
            for _ in range(2):
                await probe.publish(T.play(L), PlayEvent(event="ended", play=ended).to_json(), qos=1)
            await until(lambda: len(events()) >= 2, what="events")
            await asyncio.sleep(0.3)
            assert [e["event_type"] for e in events()] == ["track_changed", "side_finished"]
            side = events()[1]
            assert side["play_id"] == "p2" and side["album"] == "Supertux Soundtrack" and side["played"] == 199.0
            assert all(m.retain is False for m in probe.on(f"{HA}/playback"))
            # unknown music: one event, the title unknown
            await probe.publish(T.now_playing(L), now_playing("unknown"), qos=1, retain=True)
            await probe.publish(T.now_playing(L), now_playing("unknown"), qos=1, retain=True)
            await until(lambda: len(events()) >= 3, what="unknown_record")
            await asyncio.sleep(0.3)
            assert [e["event_type"] for e in events()] == ["track_changed", "side_finished", "unknown_record"]
            assert last(probe, f"{HA}/now_playing") == b"None"
            assert json.loads(last(probe, f"{HA}/now_playing/attributes"))["status"] == "unknown"
            # a known track, then unknown music ends it: unknown_record once (from the play event),
            # not again for dedupe's now playing that follows
            p3 = play("p3", position=0.0)
            await probe.publish(T.play(L), PlayEvent(event="started", play=p3).to_json(), qos=1)
            gone = p3.model_copy(update={"ended_at": time.time(), "updated_at": time.time(),
                                         "end_reason": "unknown_music", "played_through": False})
            await probe.publish(T.play(L), PlayEvent(event="ended", play=gone).to_json(), qos=1)
            await probe.publish(T.now_playing(L), now_playing("unknown"), qos=1, retain=True)
            await until(lambda: len(events()) >= 5, what="unknown_record again")
            await asyncio.sleep(0.3)
            assert [e["event_type"] for e in events()][3:] == ["track_changed", "unknown_record"]


def test_finish_kind():
    p = play()
    assert finish_kind(p.model_copy(update={"end_reason": "silence", "played_through": True})) == "side_finished"
    assert finish_kind(p.model_copy(update={"end_reason": "silence", "played_through": None})) == "side_finished"
    assert finish_kind(p.model_copy(update={"end_reason": "silence", "played_through": False})) is None
    assert finish_kind(p.model_copy(update={"end_reason": "next_track", "played_through": True})) is None

    # once the schemas carry it: a play marked as the album's last, or a track "n of n" on the last disc
    def ended(last_on_album=None, **track) -> SimpleNamespace:
        t = SimpleNamespace(**{"track_number": 4, "disc_number": None, "track_total": None, "disc_total": None,
                               **track})
        return SimpleNamespace(end_reason="silence", played_through=True, last_on_album=last_on_album, track=t)

    assert finish_kind(ended(last_on_album=True)) == "record_finished"
    assert finish_kind(ended(last_on_album=False, track_total=4)) == "side_finished"
    assert finish_kind(ended(track_total=4)) == "record_finished"
    assert finish_kind(ended(track_total=9)) == "side_finished"
    assert finish_kind(ended(track_total=4, disc_number=1, disc_total=2)) == "side_finished"
    assert finish_kind(ended(track_total=4, disc_number=2, disc_total=2)) == "record_finished"
    assert finish_kind(ended(track_total=4, disc_total=2)) == "side_finished"  # which disc: not known


# -- availability ------------------------------------------------------------------------------


@aio(30)
async def test_availability_follows_listener_matcher_and_role(broker):
    expected = hass.discovery_configs(L, prefix=PREFIX, base=BASE, role_status=ROLE_STATUS, image_type="image/png")
    by_key = {k: expected[config_topic(k)] for k in hass.BY_KEY}

    async def view() -> dict[str, bytes]:
        return payloads(await retained(broker, f"{PREFIX}/#", f"{BASE}/#"))

    async with Probe(broker, f"{BASE}/#") as probe:
        await setup_pipeline(probe)
        async with running(broker):
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/now_playing" and m.payload == b"Clavelian March")
            s = await view()
            assert all(available(c, s) for c in by_key.values())
            assert s[LISTENER_STATUS] == b"online"  # listener connectivity: on

            # the listener goes offline (its will): its entities go unavailable, connectivity says so
            await probe.publish(LISTENER_STATUS, "offline", qos=1, retain=True)
            s = await view()
            for k in ("now_playing", "artist", "album", "cover_art", "progress", "speed_error", "playback",
                      "playing", "signal_level"):
                assert not available(by_key[k], s), k
            for k in ("listener_connectivity", "matcher_connectivity", "last_scrobble"):
                assert available(by_key[k], s), k
            assert s[by_key["listener_connectivity"]["state_topic"]] == b"offline"  # payload_off: disconnected
            # ... and back by itself
            await probe.publish(LISTENER_STATUS, "online", qos=1, retain=True)
            s = await view()
            assert all(available(c, s) for c in by_key.values())

            # the last matcher goes: recognition entities unavailable, playing and level stay
            await probe.publish(f"{BASE}/m2/matcher/status", "online", qos=1, retain=True)
            await probe.publish(f"{BASE}/m1/matcher/status", "offline", qos=1, retain=True)
            await asyncio.sleep(0.3)
            assert (await view())[f"{HA}/matcher_connectivity"] == b"online"  # m2 still there
            await probe.publish(f"{BASE}/m2/matcher/status", "offline", qos=1, retain=True)
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/matcher_connectivity" and m.payload == b"offline")
            s = await view()
            assert not available(by_key["now_playing"], s) and not available(by_key["playback"], s)
            assert available(by_key["playing"], s) and available(by_key["signal_level"], s)
            assert available(by_key["matcher_connectivity"], s)
            assert s[by_key["matcher_connectivity"]["state_topic"]] == b"offline"
            n = len(probe.messages)
            await probe.publish(f"{BASE}/m1/matcher/status", "online", qos=1, retain=True)
            await arrives(probe, n, lambda m: m.topic.value == f"{HA}/matcher_connectivity" and m.payload == b"online")
            s = await view()
            assert all(available(c, s) for c in by_key.values())
        # the role itself gone (its will): all but listener connectivity unavailable
        s = await view()
        assert s[ROLE_STATUS] == b"offline"
        assert [k for k, c in by_key.items() if available(c, s)] == ["listener_connectivity"]


# -- Home Assistant's birth message, removal ------------------------------------------------------


@aio(30)
async def test_home_assistant_birth_republishes_discovery(broker):
    async with Probe(broker, f"{PREFIX}/#", f"{BASE}/#") as probe:
        await setup_pipeline(probe)
        async with running(broker):
            await until(lambda: len([m for m in probe.messages if m.topic.value.endswith("/config")]) >= 12,
                        what="discovery")
            await asyncio.sleep(0.2)
            n = len(probe.messages)
            await probe.publish(hass.birth_topic(PREFIX), "online", qos=1)
            await until(lambda: len([m for m in probe.messages[n:] if m.topic.value.endswith("/config")]) >= 12,
                        what="discovery again")
            again = {m.topic.value: json.loads(m.payload) for m in probe.messages[n:]
                     if m.topic.value.endswith("/config")}
            assert again == hass.discovery_configs(L, prefix=PREFIX, base=BASE, role_status=ROLE_STATUS,
                                                   image_type="image/png")
            # Home Assistant going away changes nothing
            n = len(probe.messages)
            await probe.publish(hass.birth_topic(PREFIX), "offline", qos=1)
            await asyncio.sleep(0.3)
            assert not [m for m in probe.messages[n:] if m.topic.value.endswith("/config")]


@aio(30)
async def test_remove_clears_configs_and_states_and_the_role_forgets(broker):
    async with Probe(broker, f"{PREFIX}/#", f"{BASE}/#") as probe:
        await setup_pipeline(probe)
        await probe.publish(f"{BASE}/kitchen/listener", ListenerState(
            listener="kitchen", state="idle", rms_dbfs=-70.0, peak_dbfs=-60.0, since=1.0).to_json(),
            qos=1, retain=True)
        async with running(broker) as role:
            await until(lambda: set(role.turntables) == {L, "kitchen"}, what="two turntables")
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/cover_art")
            cleared = await remove_listener_once(config(broker), L)
            assert set(hass.discovery_topics(PREFIX, L)) <= set(cleared)
            await until(lambda: set(role.turntables) == {"kitchen"}, what="the role forgetting")
            await asyncio.sleep(0.3)
            left = await retained(broker, f"{PREFIX}/#", f"{BASE}/#")
            assert not [t for t in left if "vinyl_mqtt_turntable" in t or t.startswith(f"{BASE}/{L}/ha")
                        or t in (T.listener_state(L), T.now_playing(L))]
            # every config went out empty and retained
            for t in hass.discovery_topics(PREFIX, L):
                assert probe.on(t)[-1].payload == b""
            # the other turntable is untouched
            assert len([t for t in left if "vinyl_mqtt_kitchen" in t]) == 12
            # Home Assistant restarting does not bring it back
            n = len(probe.messages)
            await probe.publish(hass.birth_topic(PREFIX), "online", qos=1)
            await until(lambda: len([m for m in probe.messages[n:] if m.topic.value.endswith("/config")]) >= 12,
                        what="kitchen's discovery")
            await asyncio.sleep(0.2)
            assert not [m for m in probe.messages[n:] if "vinyl_mqtt_turntable/" in m.topic.value]
            # nor dedupe's idle now playing for it (it may still publish one)
            await probe.publish(T.now_playing(L), now_playing("idle"), qos=1, retain=True)
            await asyncio.sleep(0.3)
            assert set(role.turntables) == {"kitchen"}
            # nor does a reconnect of the role (its Connection forgot the cleared topics)
            assert not [t for t in role.conn._retained if "vinyl_mqtt_turntable/" in t or t.startswith(HA)]


# -- long titles, discovery from now playing, bad payloads ----------------------------------------------


@aio(30)
async def test_a_400_character_title_is_capped(broker):
    title = "Symphony " + "x" * 391
    assert len(title) == 400
    async with Probe(broker, f"{BASE}/#") as probe:
        await probe.publish(T.now_playing(L), now_playing("playing", play(t=track(title), position=5.0)),
                            qos=1, retain=True)  # only dedupe has spoken: discovered from now playing
        async with running(broker) as role:
            msg = await probe.wait_for(lambda m: m.topic.value == f"{HA}/now_playing")
            state = msg.payload.decode()
            assert len(state) == 255 and state.startswith("Symphony xxx") and state.endswith("…")
            msg = await probe.wait_for(lambda m: m.topic.value == f"{HA}/now_playing/attributes")
            attrs = json.loads(msg.payload)
            assert attrs["title"] == title
            assert role.turntables[L].node == L


@aio(30)
async def test_malformed_payloads_raise_message_error_and_are_dropped(broker):
    async with Probe(broker, f"{BASE}/#") as probe:
        async with running(broker) as role:
            bad = [
                (T.listener_state(L), b"not json"),
                (T.listener_state(L), ListenerState(listener="other", state="idle", rms_dbfs=-60, peak_dbfs=-50,
                                                    since=1.0).to_json()),
                (T.now_playing(L), b'{"v": 1, "listener": "turntable"}'),
                (T.play(L), b'{"v": 99}'),
                (f"{BASE}/m1/matcher/status", b"maybe"),
                (T.cover(7) .replace("/7", "/seven"), b"\x89PNG"),
                (hass.birth_topic(PREFIX), b"rebooting"),
            ]
            for topic, payload in bad:
                with pytest.raises(MessageError):
                    await role.handle(Message(topic, payload, False, None, 1))
            # over MQTT: logged and dropped, the role keeps serving
            for topic, payload in bad[:4]:
                await probe.publish(topic, payload, qos=1)
            await probe.publish(T.listener_state(L), listener_state("idle", -61.0), qos=1, retain=True)
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/signal_level" and m.payload == b"-61.0")
            assert last(probe, f"{HA}/playing") == b"OFF"
            assert list(role.turntables) == [L]


@aio(30)
async def test_a_restart_of_the_role_does_not_flicker_the_entities(broker):
    async with Probe(broker, f"{BASE}/#") as probe:
        await setup_pipeline(probe)
        async with running(broker):
            await probe.wait_for(lambda m: m.topic.value == f"{HA}/cover_art" and bytes(m.payload) == PNG)
        n = len(probe.messages)
        async with running(broker):
            await arrives(probe, n, lambda m: m.topic.value == ROLE_STATUS and m.payload == b"online")
            await asyncio.sleep(0.8)  # past the settling time
        after = [m for m in probe.messages[n:] if m.topic.value.startswith(HA + "/")]
        assert {bytes(m.payload) for m in after if m.topic.value == f"{HA}/now_playing"} <= {b"Clavelian March"}
        assert {bytes(m.payload) for m in after if m.topic.value == f"{HA}/cover_art"} <= {PNG}
        assert {bytes(m.payload) for m in after if m.topic.value == f"{HA}/matcher_connectivity"} <= {b"online"}
        assert {bytes(m.payload) for m in after if m.topic.value == f"{HA}/playing"} <= {b"ON"}
