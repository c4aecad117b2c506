"""The listening pipeline end to end: a record played through ALSA's file
plugin, the real listener and matcher roles, a real Mosquitto in between."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time

import numpy as np
import yaml

from aio import aio, start, stop, until
from alsa import alsa_file_device
from broker import Probe
from conftest import LIBRARY, SIM_RATE, TURNTABLE, needle_drop, node_config
from vinyl_mqtt.messages import (
    ClipHeader, ListenerState, MatchResult, Topics, decode_clip, encode_clip,
)
from vinyl_mqtt.roles.listener import ListenerRole
from vinyl_mqtt.roles.matcher import MatcherRole
from vinyl_mqtt.spool import Spool

BASE = "vinyl_mqtt"
TOPICS = Topics(BASE)
PI = TURNTABLE
SONG = "st_chipdisko"  # a library excerpt with full tags
PACE = "6"  # the file plugin does not pace: play at 6x real time




def matches(probe) -> list[MatchResult]:
    return [MatchResult.parse(m.payload) for m in probe.on(TOPICS.match(PI))]


def clip_frame(x: np.ndarray, seq: int, start_s: float = 3.0, seconds: float = 6.0, **header) -> bytes:
    from vinyl_mqtt.pcm import resample

    seg = resample(x[int(start_s * SIM_RATE): int((start_s + seconds) * SIM_RATE)], SIM_RATE, 8000)
    fields = dict(listener=PI, clip_id=f"c{seq}", seq=seq, captured_at=time.time(), rate=8000,
                  samples=len(seg), rms_dbfs=-20.0, reason="recheck")
    fields.update(header)
    return encode_clip(ClipHeader(**fields), seg)


# --------------------------------------------------------------------------- the real process


def test_record_through_alsa_is_matched(broker, library, excerpts, tmp_path):
    """`vinyl-mqtt run` as a user starts it: listener and matcher processes, one config file."""
    device, env = alsa_file_device(tmp_path, needle_drop(excerpts, SONG), SIM_RATE, 1, "S16_LE")
    cfg = {
        "node": "box",
        "mqtt": {"host": broker.host, "port": broker.port, "base_topic": BASE},
        "library": {"db": str(library.db)},
        "listener": {"name": PI, "device": device, "rate": SIM_RATE, "channels": 1, "period_frames": 2048,
                     "spool": {"dir": str(tmp_path / "spool")}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**env, "VINYL_MQTT_CAPTURE_PACE": PACE}
    cmd = [sys.executable, "-m", "vinyl_mqtt.cli", "run", "-v", "--config", str(path), "--roles"]
    procs = [subprocess.Popen(cmd + [role], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for role in ("matcher", "listener")]

    async def watch():
        async with Probe(broker, f"{BASE}/#") as probe:
            m = await probe.wait_for(
                lambda m: m.topic.value == TOPICS.match(PI) and json.loads(m.payload)["matched"], timeout=60)
            playing = await probe.wait_for(
                lambda m: m.topic.value == TOPICS.listener_state(PI) and b'"playing"' in m.payload, timeout=5)
            return MatchResult.parse(m.payload), ListenerState.parse(playing.payload), probe

    try:
        result, state, probe = asyncio.run(watch())
    finally:
        for p in procs:
            p.terminate()
        logs = [p.communicate(timeout=20)[0] for p in procs]
    assert result.track is not None and result.track.title == LIBRARY[SONG][0], logs
    assert result.track.path.endswith(f"{SONG}.ogg")
    assert result.matcher == "box" and result.confidence > 0.5
    assert abs(result.speed - 1.0) < 0.01  # the first clip holds ~3 s of music
    assert -0.5 <= result.offset_s < 27.0  # the first clip starts a pre-roll before the music
    assert state.state == "playing" and state.rms_dbfs > -45
    # SIGTERM: both roles said goodbye and exited cleanly
    assert [p.returncode for p in procs] == [0, 0], logs


# --------------------------------------------------------------------------- in-process roles


@aio(60)
async def test_two_matchers_share_a_burst(broker, library, excerpts, tmp_path):
    tasks, roles = zip(*(start(MatcherRole, node_config(broker, library, tmp_path, f"m{i}")) for i in (1, 2)))
    async with Probe(broker, TOPICS.match(PI), TOPICS.role_status_any("matcher")) as probe:
        await probe.wait_for(lambda m: m.topic.value == TOPICS.status("m2", "matcher") and m.payload == b"online")
        await probe.wait_for(lambda m: m.topic.value == TOPICS.status("m1", "matcher") and m.payload == b"online")
        x = excerpts[SONG]
        for seq in range(16):
            await probe.publish(TOPICS.clip(PI), clip_frame(x, seq, start_s=1.0 + seq), qos=1)
        await until(lambda: len(matches(probe)) >= 16, timeout=40, what="16 answers")
        got = matches(probe)
    await stop(*tasks)
    assert sorted(r.seq for r in got) == list(range(16))  # each clip answered once
    by = {r.matcher for r in got}
    assert by == {"m1", "m2"}, [r.matcher for r in got]
    assert all(r.matched and r.track.title == LIBRARY[SONG][0] for r in got)
    off = {r.seq: round(r.offset_s - (1.0 + r.seq), 3) for r in got}
    # a looped tune repeats itself: the same bars 7 s later are an equally right answer
    assert sum(abs(d) < 0.1 for d in off.values()) >= 14, str(sorted(off.items()))


@aio(60)
async def test_bad_clips_are_logged_and_the_matcher_keeps_serving(broker, library, excerpts, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    task, role = start(MatcherRole, node_config(broker, library, tmp_path, "m1"))
    x = excerpts[SONG]
    async with Probe(broker, TOPICS.match(PI), TOPICS.status("m1", "matcher")) as probe:
        await probe.wait_for(lambda m: m.payload == b"online")
        bad = {
            "not a clip": b"hello",
            "truncated header": b"VMC1\xff\x00\x00\x00{}",
            "wrong sample format": clip_frame(x, 1).replace(b'"S16_LE"', b'"S24_LE"'),
            "wrong sample count": clip_frame(x, 2)[:-100],
            "50 MB": b"VMC1" + bytes(50 * 1024 * 1024),
        }
        for payload in bad.values():
            await probe.publish(TOPICS.clip(PI), payload, qos=1)
        await probe.publish(TOPICS.clip(PI), clip_frame(x, 3), qos=1)
        await until(lambda: len(matches(probe)) >= 1, timeout=30, what="the good clip's answer")
        got = matches(probe)
    await stop(task)
    assert [r.seq for r in got] == [3] and got[0].matched
    text = caplog.text
    assert text.count(f"dropped message on {TOPICS.clip(PI)}") == len(bad), text
    for reason in ("bad magic", "runs past the end", "S24_LE", "samples, frame carries", "over the 2000000-byte limit"):
        assert reason in text, reason


@aio(90)
async def test_late_matcher_gets_spooled_clips_and_stale_ones_are_dropped(broker, library, excerpts, tmp_path,
                                                                          monkeypatch):
    """No matcher online: clips wait in the spool; a stale one is dropped, the rest are matched."""
    monkeypatch.setenv("VINYL_MQTT_CAPTURE_PACE", PACE)
    device, env = alsa_file_device(tmp_path, needle_drop(excerpts, SONG, tail_s=2.0), SIM_RATE, 1)
    monkeypatch.setenv("ALSA_CONFIG_PATH", env["ALSA_CONFIG_PATH"])
    lcfg = node_config(broker, library, tmp_path, "pi-node", device=device, rate=SIM_RATE, channels=1,
                  period_frames=2048)
    lcfg.listener.clip.recheck_s = 8.0
    # a clip from an earlier run with 1 s of useful life left: stale by the time a matcher is back
    stale_at = time.time() - lcfg.listener.spool.max_age_s + 1.0
    assert Spool(lcfg.listener.spool).put("stale", stale_at, clip_frame(excerpts[SONG], 99))
    listener_task, listener = start(ListenerRole, lcfg)
    async with Probe(broker, TOPICS.match(PI), TOPICS.clip(PI)) as probe:
        await until(lambda: listener.spooled >= 2, timeout=30, what="two spooled clips")
        await until(lambda: time.time() > stale_at + lcfg.listener.spool.max_age_s + 0.2, timeout=5, what="staleness")
        assert listener.sent == 0
        matcher_task, _ = start(MatcherRole, node_config(broker, library, tmp_path, "late"))
        await until(lambda: len(matches(probe)) >= listener.spooled, timeout=30, what="spooled clips answered")
        got = matches(probe)
    await stop(listener_task, matcher_task)
    assert 99 not in {r.seq for r in got}  # the stale clip was dropped, not matched late
    assert listener.spool.dropped_age == 1
    sent = [decode_clip(m.payload, max_bytes=10**7, max_seconds=60)[0] for m in probe.on(TOPICS.clip(PI))]
    # oldest capture first (at 6x pace a re-check clip can predate the needle drop's on the wall clock)
    assert [h.captured_at for h in sent] == sorted(h.captured_at for h in sent)
    assert sorted(r.seq for r in got) == sorted(h.seq for h in sent)  # each answered once
    assert all(r.matched and r.track.title == LIBRARY[SONG][0] for r in got)
    assert len(listener.spool) == 0


@aio(90)
async def test_broker_restart_mid_play_loses_no_state(broker, library, excerpts, tmp_path, monkeypatch):
    monkeypatch.setenv("VINYL_MQTT_CAPTURE_PACE", "1.5")
    device, env = alsa_file_device(tmp_path, needle_drop(excerpts, SONG, tail_s=1.0), SIM_RATE, 1)
    monkeypatch.setenv("ALSA_CONFIG_PATH", env["ALSA_CONFIG_PATH"])
    cfg = node_config(broker, library, tmp_path, "box", device=device, rate=SIM_RATE, channels=1, period_frames=2048)
    cfg.listener.clip.recheck_s = 5.0
    tasks = [start(MatcherRole, cfg)[0], start(ListenerRole, cfg)[0]]
    async with Probe(broker, TOPICS.match(PI)) as probe:
        await until(lambda: any(r.matched for r in matches(probe)), timeout=30, what="a first match")
    broker.restart()  # no persistence: every retained message is gone with it
    async with Probe(broker, f"{BASE}/#") as probe:
        state = await probe.wait_for(lambda m: m.topic.value == TOPICS.listener_state(PI), timeout=20)
        assert ListenerState.parse(state.payload).state == "playing"
        for role in ("matcher", "listener"):
            await probe.wait_for(lambda m, r=role: m.topic.value == TOPICS.status("box", r) and m.payload == b"online",
                                 timeout=20)
        await until(lambda: any(r.matched for r in matches(probe)), timeout=30, what="a match after the restart")
    await stop(*tasks)


@aio(60)
async def test_library_added_while_running_is_picked_up(broker, library, excerpts, tmp_path):
    """A `library add` on the matcher's store is seen without a restart."""
    from vinyl_mqtt.library import ingest
    from vinyl_mqtt.store import Store
    import shutil

    db = tmp_path / "lib.sqlite"
    Store(db).close()
    cfg = node_config(broker, library, tmp_path, "m1")
    cfg.library.db = db
    task, role = start(MatcherRole, cfg)
    async with Probe(broker, TOPICS.match(PI), TOPICS.status("m1", "matcher")) as probe:
        await probe.wait_for(lambda m: m.payload == b"online")
        await probe.publish(TOPICS.clip(PI), clip_frame(excerpts[SONG], 0), qos=1)
        await until(lambda: len(matches(probe)) == 1, timeout=20, what="the first answer")
        music = tmp_path / "music"
        music.mkdir()
        from conftest import data_file
        shutil.copy2(data_file(SONG), music / f"{SONG}.ogg")
        def add():
            with Store(db) as store:  # what `vinyl-mqtt library add` does, beside the running matcher
                return ingest(store, [music], workers=1)

        assert (await asyncio.to_thread(add)).added == 1
        await until(lambda: role.generation > 0 and len(role.index) == 1, timeout=10, what="the reload")
        await probe.publish(TOPICS.clip(PI), clip_frame(excerpts[SONG], 1), qos=1)
        await until(lambda: len(matches(probe)) == 2, timeout=20, what="the second answer")
        first, second = matches(probe)
    await stop(task)
    assert not first.matched and second.matched and second.track.title == LIBRARY[SONG][0]
