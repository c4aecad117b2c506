"""The dedupe role against a real Mosquitto: matches and listener states published as the
listener and matcher roles publish them, plays and now_playing checked on the wire."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time

from aio import aio, until
from broker import Probe
from vinyl_mqtt.config import Config
from vinyl_mqtt.messages import ListenerState, MatchedTrack, MatchResult, NowPlaying, PlayEvent, Topics
from vinyl_mqtt.mqtt import Connection
from vinyl_mqtt.plays import Rules
from vinyl_mqtt.roles.dedupe import DedupeRole

BASE = "vinyl_mqtt"
TOPICS = Topics(BASE)
PI, DEN = "pi", "den"
_seq = itertools.count()


def trk(id: int, number: int, duration: float, album: str = "Blue Side") -> MatchedTrack:
    return MatchedTrack(id=id, title=f"Track {id}", artist="The Band", album=album, album_artist="The Band",
                        track_number=number, disc_number=1, duration_s=duration, path=f"/music/{id}.flac")


A1, A2, A3 = trk(1, 1, 300.0), trk(2, 2, 6.0), trk(3, 3, 240.0)
STRAY = trk(90, 5, 400.0, album="Other")


def match(listener: str, track: MatchedTrack | None, captured_at: float, offset_s: float = 0.0, *,
          confidence: float = 0.9999, score: int = 150, speed: float = 1.0) -> bytes:
    seq = next(_seq)
    fields = dict(listener=listener, clip_id=f"{listener}-{seq}", seq=seq, captured_at=captured_at,
                  matched=track is not None, matcher="m1")
    if track is not None:
        fields.update(track=track, offset_s=offset_s, speed=speed, confidence=confidence, score=score)
    return MatchResult(**fields).to_json()


def state(listener: str, st: str, since: float) -> bytes:
    return ListenerState(listener=listener, state=st, rms_dbfs=-20.0, peak_dbfs=-6.0, since=since).to_json()


def start(broker, node: str = "box", rules: Rules | None = None) -> tuple[asyncio.Task, DedupeRole]:
    cfg = Config(node=node, mqtt=broker.config())
    role = DedupeRole(cfg, Connection(cfg.mqtt, node=node, role="dedupe", topics=TOPICS))
    if rules is not None:
        role.rules = rules
    return asyncio.create_task(role.run()), role


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def online(probe: Probe, node: str = "box") -> None:
    await probe.wait_for(lambda m: m.topic.value == TOPICS.status(node, "dedupe") and m.payload == b"online")


def events(probe: Probe, listener: str = PI) -> list[PlayEvent]:
    return [PlayEvent.parse(m.payload) for m in probe.on(TOPICS.play(listener))]


def kinds(probe: Probe, listener: str = PI) -> list[tuple[str, int]]:
    return [(e.event, e.play.track.id) for e in events(probe, listener)]


async def now_playing(probe: Probe, pred, listener: str = PI, timeout: float = 5.0) -> NowPlaying:
    m = await probe.wait_for(lambda m: m.topic.value == TOPICS.now_playing(listener) and m.payload
                             and pred(NowPlaying.parse(m.payload)), timeout=timeout)
    return NowPlaying.parse(m.payload)


async def retained(broker, listener: str = PI) -> NowPlaying:
    """What a client that connects now is given on now_playing."""
    async with Probe(broker, TOPICS.now_playing(listener)) as p:
        m = await p.wait_for(lambda m: bool(m.retain), timeout=3)
    return NowPlaying.parse(m.payload)


@aio(15)
async def test_needle_drop_stray_update_and_lift(broker):
    task, role = start(broker)
    async with Probe(broker, TOPICS.any_listener("play"), TOPICS.any_listener("now_playing"),
                     TOPICS.status("box", "dedupe")) as probe:
        await online(probe)
        t = time.time()
        drop = t - 4.0
        await probe.publish(TOPICS.listener_state(PI), state(PI, "playing", drop), qos=1, retain=True)
        # the needle-drop clip: 3.25 s from 0.25 s before the music, confidently matched
        await probe.publish(TOPICS.match(PI), match(PI, A1, drop - 0.25, -0.25), qos=1)
        np = await now_playing(probe, lambda n: n.state == "playing")
        assert np.play.track.id == 1 and abs(np.play.started_at - drop) < 0.01
        # a stray wrong answer, then an agreeing one a "recheck" later (same timeline)
        await probe.publish(TOPICS.match(PI), match(PI, STRAY, t - 2, 211.0, confidence=0.7, score=19), qos=1)
        await probe.publish(TOPICS.match(PI), match(PI, A1, t - 1, t - 1 - drop), qos=1)
        await until(lambda: len(events(probe)) >= 2, what="the update")
        # the needle is lifted
        lift = time.time()
        await probe.publish(TOPICS.listener_state(PI), state(PI, "idle", lift), qos=1, retain=True)
        await now_playing(probe, lambda n: n.state == "idle" and abs(n.since - lift) < 0.01)
        got = events(probe)
        final = await retained(broker)
    await stop(task)
    assert [(e.event, e.play.track.id) for e in got] == [("started", 1), ("updated", 1), ("ended", 1)]
    started, updated, ended = (e.play for e in got)
    assert started.play_id == updated.play_id == ended.play_id
    assert updated.matches == 2 and updated.confidence > 0.9999
    assert ended.end_reason == "silence" and not ended.played_through
    assert abs(ended.ended_at - lift) < 0.01 and abs(ended.played_s - (lift - drop)) < 0.01
    assert final.state == "idle" and final.play is None and abs(final.since - lift) < 0.01


@aio(15)
async def test_duration_end_unknown_then_predicted_next_track(broker):
    task, role = start(broker, rules=Rules(duration_grace_s=1.0))
    async with Probe(broker, TOPICS.play(PI), TOPICS.now_playing(PI), TOPICS.status("box", "dedupe")) as probe:
        await online(probe)
        t = time.time()
        await probe.publish(TOPICS.listener_state(PI), state(PI, "playing", t - 60), qos=1, retain=True)
        # a 6 s track that began 3 s ago: it ends by duration ~4 s from now
        await probe.publish(TOPICS.match(PI), match(PI, A2, t - 1.0, 2.0), qos=1)
        np = await now_playing(probe, lambda n: n.state == "unknown", timeout=8)
        assert np.play is None and abs(np.since - (t + 3.0)) < 0.01
        # track 3 (the album's next) heard once, weakly, after the gap: confirmed at once
        t3 = time.time()
        await probe.publish(TOPICS.match(PI), match(PI, A3, t3 - 3.0, 1.0, confidence=0.6, score=17), qos=1)
        np = await now_playing(probe, lambda n: n.state == "playing" and n.play.track.id == 3)
        got = events(probe)
    await stop(task)
    assert [(e.event, e.play.track.id) for e in got] == [("started", 2), ("ended", 2), ("started", 3)]
    ended = got[1].play
    assert ended.end_reason == "duration" and ended.played_through
    assert abs(ended.ended_at - (t + 3.0)) < 0.01 and ended.position_s == 6.0
    assert ended.next_track_id is None  # track 3 had not been seen yet when 2 ended
    assert abs(np.play.started_at - (t3 - 4.0)) < 0.01


@aio(20)
async def test_restart_resumes_the_play_without_a_second_start(broker):
    async with Probe(broker, TOPICS.play(PI), TOPICS.now_playing(PI), TOPICS.status("box", "dedupe")) as probe:
        task, _ = start(broker)
        await online(probe)
        t = time.time()
        drop = t - 40
        await probe.publish(TOPICS.listener_state(PI), state(PI, "playing", drop), qos=1, retain=True)
        await probe.publish(TOPICS.match(PI), match(PI, A1, drop - 0.25, -0.25), qos=1)
        await probe.publish(TOPICS.match(PI), match(PI, A1, t - 9.0, t - 9.0 - drop), qos=1)
        await until(lambda: len(events(probe)) >= 2, what="started and updated")
        first = await now_playing(probe, lambda n: n.state == "playing" and n.play.matches == 2)
        await stop(task)
        await probe.wait_for(lambda m: m.topic.value == TOPICS.status("box", "dedupe") and m.payload == b"offline")
        n_before = len(events(probe))

        task, role = start(broker)  # a new process: resumes from the retained now_playing
        await until(lambda: PI in role.trackers and role.trackers[PI].play is not None, what="restored play")
        await probe.publish(TOPICS.match(PI), match(PI, A1, time.time() - 8.0, time.time() - 8.0 - drop), qos=1)
        await until(lambda: len(events(probe)) > n_before, what="an update after the restart")
        await asyncio.sleep(0.3)
        got = events(probe)[n_before:]
        final = await retained(broker)
    await stop(task)
    assert [(e.event, e.play.track.id) for e in got] == [("updated", 1)]
    assert got[0].play.play_id == first.play.play_id and got[0].play.matches == 3
    assert abs(got[0].play.started_at - drop) < 0.05
    assert final.state == "playing" and final.play.play_id == first.play.play_id and final.play.matches == 3


@aio(15)
async def test_bad_payloads_are_logged_and_turntables_are_independent(broker, caplog):
    caplog.set_level(logging.WARNING)
    task, role = start(broker)
    async with Probe(broker, TOPICS.any_listener("play"), TOPICS.status("box", "dedupe")) as probe:
        await online(probe)
        t = time.time()
        bad = {
            "not JSON": b"{nope",
            "matched without a track": json.dumps({"v": 1, "listener": PI, "clip_id": "x", "seq": 1,
                                                   "captured_at": t, "matched": True, "matcher": "m"}).encode(),
            "names another listener": match(DEN, A1, t - 3, 5.0),
            "schema version": b'{"v": 9}',
        }
        for payload in bad.values():
            await probe.publish(TOPICS.match(PI), payload, qos=1)
        await probe.publish(TOPICS.listener_state(PI), b"[]", qos=1)
        # two turntables at once, each confirmed independently
        await probe.publish(TOPICS.match(PI), match(PI, A1, t - 3, 10.0), qos=1)
        await probe.publish(TOPICS.match(DEN), match(DEN, A3, t - 3, 100.0, confidence=0.8, score=25), qos=1)
        await probe.publish(TOPICS.match(DEN), match(DEN, A3, t - 1, 102.0, confidence=0.8, score=25), qos=1)
        await until(lambda: events(probe, PI) and events(probe, DEN), what="a play on each turntable")
        await asyncio.sleep(0.3)
        pi, den = kinds(probe, PI), kinds(probe, DEN)
    await stop(task)
    assert pi == [("started", 1)] and den == [("started", 3)]
    assert events(probe, DEN)[0].play.matches == 2 and events(probe, DEN)[0].play.listener == DEN
    text = caplog.text
    assert text.count(f"dropped message on {TOPICS.match(PI)}") == len(bad), text
    assert f"dropped message on {TOPICS.listener_state(PI)}" in text
    for reason in ("not JSON", "without track", "names listener 'den'", "schema version 9"):
        assert reason in text, reason


@aio(20)
async def test_an_end_while_the_broker_is_down_is_sent_when_it_is_back(broker):
    task, role = start(broker, rules=Rules(duration_grace_s=0.5))
    async with Probe(broker, TOPICS.play(PI), TOPICS.status("box", "dedupe")) as probe:
        await online(probe)
        t = time.time()
        await probe.publish(TOPICS.match(PI), match(PI, A2, t - 1.0, 3.0), qos=1)  # ends at t + 2
        await until(lambda: kinds(probe) == [("started", 2)], what="started")
    broker.stop()
    await until(lambda: any(o[1].startswith(b'{"v":1,"event":"ended"') for o in role._outbox), timeout=6,
                what="the end, queued")
    broker.start()
    async with Probe(broker, TOPICS.play(PI), TOPICS.now_playing(PI)) as probe:
        ended = await probe.wait_for(lambda m: m.topic.value == TOPICS.play(PI), timeout=8)
        np = await now_playing(probe, lambda n: n.state == "unknown")
    await stop(task)
    e = PlayEvent.parse(ended.payload)
    assert e.event == "ended" and e.play.end_reason == "duration" and abs(e.play.ended_at - (t + 2.0)) < 0.01
    assert np.play is None
