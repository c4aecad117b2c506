"""The scrobbler: Last.fm's rules, the persistent queue, exactly once across kill -9.

Real pylast against tests/lastfm_server.py (signed requests, XML answers,
Last.fm's error and ignore codes, its duplicate detection); a real Mosquitto
for the role.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pylast
import pytest
from aio import aio, until
from broker import Probe
from lastfm_server import FakeLastfm, api_sig

from vinyl_mqtt.config import Config
from vinyl_mqtt.lastfm_login import LoginError, login
from vinyl_mqtt.messages import MatchedTrack, Play, PlayEvent, ScrobbleEvent, Topics
from vinyl_mqtt.mqtt import Connection
from vinyl_mqtt.roles.scrobbler import (
    LastfmClient, ScrobblerConfig, ScrobblerRole, Sender, classify, needed_s, network, qualifies,
)
from vinyl_mqtt.scrobble_queue import Scrobble, ScrobbleQueue

NOW = time.time()


@pytest.fixture
def lastfm():
    server = FakeLastfm().start()
    yield server
    server.stop()


def settings(tmp_path: Path, server: FakeLastfm, *, session: bool = True, **kw) -> ScrobblerConfig:
    skf = tmp_path / "lastfm.session"
    if session:
        skf.write_text(server.new_session() + "\n")
    values = dict(api_key=server.api_key, api_secret=server.api_secret, session_key_file=skf, api_root=server.url,
                  queue_db=tmp_path / "queue.sqlite", retry_first_s=0.01, retry_max_s=0.04, auth_recheck_s=0.05)
    values.update(kw)
    return ScrobblerConfig(**values)


def item(i: int, *, ts: float | None = None, artist: str = "Artist", **kw) -> Scrobble:
    return Scrobble(play_id=f"play-{i}", listener="deck", artist=artist, track=f"Track {i}",
                    timestamp=int(ts if ts is not None else NOW - 3600 + i), album="Album", **kw)


def track(duration: float = 200.0, artist: str | None = "Kristian Picon", title: str = "Credits Ballad") -> MatchedTrack:
    return MatchedTrack(id=1, title=title, artist=artist, album="Extreme Tux Racer", duration_s=duration,
                        path="/music/ballad.ogg", track_number=3)


def event(kind: str, *, play_id: str = "p1", duration: float = 200.0, position: float = 12.0,
          played: float | None = None, started_at: float | None = None, **kw) -> PlayEvent:
    now = time.time()
    started_at = started_at if started_at is not None else now - position
    play = Play(play_id=play_id, listener="deck", track=track(duration, **kw), started_at=started_at, speed=1.0,
                confidence=0.99, position_s=position, updated_at=now, played_s=played,
                ended_at=now if kind == "ended" else None, end_reason="silence" if kind == "ended" else None)
    return PlayEvent(event=kind, play=play)


async def queue_with(cfg: ScrobblerConfig, items) -> ScrobbleQueue:
    q = await ScrobbleQueue.open(cfg.queue_db)
    for s in items:
        assert await q.add(s)
    return q


class Events:
    def __init__(self):
        self.seen: list[tuple[str, str, str | None]] = []

    async def __call__(self, status, s, reason):
        self.seen.append((status, s.play_id, reason))

    def of(self, status):
        return [e for e in self.seen if e[0] == status]


# --------------------------------------------------------------------------- Last.fm's rules


def test_scrobble_timing_rules():
    assert needed_s(30.0) is None and needed_s(20.0) is None  # 30 s or shorter: never
    assert needed_s(31.0) == 15.5
    assert needed_s(200.0) == 100.0  # half
    assert needed_s(600.0) == 240.0  # or 4 minutes, whichever first
    # updated: the position reached the threshold (a play seen from its start)
    assert not qualifies(event("updated", position=99.0), first_position_s=11.0)
    assert qualifies(event("updated", position=100.0), first_position_s=11.0)
    assert qualifies(event("updated", duration=600, position=241.0), first_position_s=11.0)
    # needle dropped at 2:30 of a 200 s track: its position alone is not what was heard
    assert not qualifies(event("updated", position=160.0), first_position_s=150.0)
    assert qualifies(event("updated", duration=400, position=360.0), first_position_s=150.0)
    # start unknown here (restart): the ended event decides
    assert not qualifies(event("updated", position=150.0), first_position_s=None)
    # ended: played_s
    assert qualifies(event("ended", position=190, played=100.0))
    assert not qualifies(event("ended", position=40, played=35.0))  # skipped early
    assert not qualifies(event("ended", duration=29.0, position=29, played=29.0))  # too short a track
    assert not qualifies(event("started", position=150))


# --------------------------------------------------------------------------- the fake server is Last.fm


def test_server_checks_signatures_and_speaks_lastfm_errors(lastfm, tmp_path):
    cfg = settings(tmp_path, lastfm)
    sk = cfg.session_key_file.read_text().strip()
    good = network(cfg.api_key, "test-api-secret", sk, api_root=lastfm.url)
    LastfmClient(good).update_now_playing(item(1))
    assert lastfm.now_playing[-1]["artist"] == "Artist" and lastfm.now_playing[-1]["method"] == "track.updateNowPlaying"
    p = lastfm.requests[-1]
    assert p["api_sig"] == api_sig(p, "test-api-secret")
    cases = [
        (network(cfg.api_key, "wrong-secret", sk, api_root=lastfm.url), "13", "auth"),
        (network(cfg.api_key, "test-api-secret", "no-such-session", api_root=lastfm.url), "9", "auth"),
        (network("other-key", "test-api-secret", sk, api_root=lastfm.url), "10", "auth"),
    ]
    for net, code, kind in cases:
        with pytest.raises(pylast.WSError) as e:
            LastfmClient(net).scrobble([_with_id(item(1), 1)])
        assert str(e.value.status) == code
        assert classify(e.value)[0] == kind
    assert lastfm.scrobbles == []
    for code in (11, 16, 29, 8):
        lastfm.fail(code=code)
        with pytest.raises(pylast.WSError) as e:
            LastfmClient(good).scrobble([_with_id(item(1), 1)])
        assert str(e.value.status) == str(code) and classify(e.value)[0] == "temporary"
    lastfm.outage(1)
    with pytest.raises(pylast.WSError) as e:
        LastfmClient(good).scrobble([_with_id(item(1), 1)])
    assert e.value.status == 503 and classify(e.value)[0] == "temporary"
    lastfm.fail(drop=True)
    with pytest.raises(pylast.NetworkError) as e:
        LastfmClient(good).scrobble([_with_id(item(1), 1)])
    assert classify(e.value)[0] == "temporary"
    lastfm.fail(code=6)
    with pytest.raises(pylast.WSError) as e:
        LastfmClient(good).scrobble([_with_id(item(1), 1)])
    assert classify(e.value)[0] == "permanent"


def _with_id(s: Scrobble, i: int) -> Scrobble:
    from dataclasses import replace

    return replace(s, id=i)


# --------------------------------------------------------------------------- the queue and the sender


@aio(20)
async def test_batches_of_50_oldest_first(lastfm, tmp_path):
    cfg = settings(tmp_path, lastfm)
    items = [item(i) for i in range(120)]
    random.Random(1).shuffle(items)  # queued in any order, sent by timestamp
    q = await queue_with(cfg, items)
    assert not await q.add(item(5))  # keyed by play_id: once
    ev = Events()
    sender = Sender(q, cfg, on_event=ev)
    assert await sender.drain() == "idle"
    sizes = [sum(k.startswith("artist[") for k in r) for r in lastfm.requests if r["method"] == "track.scrobble"]
    assert sizes == [50, 50, 20]
    assert [s.track for s in lastfm.scrobbles] == [f"Track {i}" for i in range(120)]
    assert len(lastfm.submissions) == 120
    assert (await q.counts())["sent"] == 120 and await q.pending() == 0
    assert len(ev.of("sent")) == 120
    first = lastfm.scrobbles[0]
    assert (first.album, first.timestamp, first.album_artist) == ("Album", int(NOW - 3600), None)
    await q.close()


@aio(20)
async def test_temporary_errors_back_off_and_retry(lastfm, tmp_path):
    cfg = settings(tmp_path, lastfm)
    q = await queue_with(cfg, [item(i) for i in range(3)])
    sender = Sender(q, cfg)
    for failure in ({"code": 11}, {"code": 16}, {"code": 29}, {"http": 500}, {"http": 503}, {"drop": True}):
        lastfm.fail(**failure)
        assert await sender.step() == "retry"
        assert sender._delay > 0
        assert (await q.counts())["sending"] == 3  # kept: the same batch goes again
    assert await sender.step() == "sent"
    assert sender._delay == 0
    assert [s.track for s in lastfm.scrobbles] == ["Track 0", "Track 1", "Track 2"]
    assert (await q.counts())["sent"] == 3
    await q.close()


@aio(20)
async def test_ambiguous_answer_is_resent_and_deduplicated_by_lastfm(lastfm, tmp_path):
    cfg = settings(tmp_path, lastfm)
    q = await queue_with(cfg, [item(i) for i in range(4)])
    lastfm.fail(after=True, http=502)  # Last.fm records it, the answer is lost
    sender = Sender(q, cfg)
    assert await sender.drain() == "idle"
    assert len(lastfm.submissions) == 8  # sent twice ...
    assert [s.track for s in lastfm.scrobbles] == [f"Track {i}" for i in range(4)]  # ... recorded once
    assert (await q.counts())["sent"] == 4
    await q.close()


@aio(20)
async def test_invalid_session_key_stops_and_keeps_the_queue(lastfm, tmp_path, caplog):
    cfg = settings(tmp_path, lastfm)
    lastfm.revoke(cfg.session_key_file.read_text().strip())
    q = await queue_with(cfg, [item(i) for i in range(3)])
    ev = Events()
    sender = Sender(q, cfg, on_event=ev)
    with caplog.at_level(logging.ERROR):
        assert await sender.drain() == "auth"
    assert "lastfm login" in caplog.text and "error 9" in caplog.text
    assert [e[0] for e in ev.seen] == ["auth_failed"]
    assert await q.pending() == 3 and lastfm.scrobbles == []
    n = len(lastfm.requests)
    assert await sender.step() == "auth" and len(lastfm.requests) == n  # stopped: nothing sent
    cfg.session_key_file.write_text(lastfm.new_session())  # `vinyl-mqtt lastfm login` again
    assert await sender.drain() == "idle"
    assert [s.track for s in lastfm.scrobbles] == ["Track 0", "Track 1", "Track 2"]
    await q.close()


@aio(20)
async def test_no_session_key_keeps_plays_queued(lastfm, tmp_path):
    cfg = settings(tmp_path, lastfm, session=False)
    q = await queue_with(cfg, [item(1)])
    sender = Sender(q, cfg)
    assert await sender.drain() == "auth"
    assert lastfm.requests == [] and await q.pending() == 1
    await q.close()


@aio(20)
async def test_permanent_errors_and_ignored_scrobbles_are_recorded_not_retried(lastfm, tmp_path):
    cfg = settings(tmp_path, lastfm)
    lastfm.ignore_artists.add("Spam Artist")
    lastfm.clock = lambda: time.time() + 2 * 86400  # Last.fm's clock: 13.5 days ago is 15.5 days to it
    items = [item(0), item(1, artist="Spam Artist"), item(2, ts=NOW - 13.5 * 86400), item(3, ts=NOW - 15 * 86400),
             item(4), item(5)]
    q = await queue_with(cfg, items)
    ev = Events()
    sender = Sender(q, cfg, on_event=ev)
    lastfm.invalid_tracks.add("Track 0")  # the batch is refused (error 6); alone, only Track 0 is
    assert await sender.drain() == "idle"
    rows = {s.play_id: s for s in await q.all()}
    assert rows["play-3"].state == "too_old"  # older than 14 days: never sent
    assert "14 days" in rows["play-3"].reason
    assert rows["play-2"].state == "too_old" and rows["play-2"].code == 3  # Last.fm's verdict
    assert rows["play-1"].state == "ignored" and rows["play-1"].code == 1 and "Artist was ignored" in rows["play-1"].reason
    assert rows["play-0"].state == "failed" and rows["play-0"].code == 6
    assert rows["play-4"].state == "sent" and rows["play-5"].state == "sent"
    assert {s.track for s in lastfm.submissions} == {"Track 1", "Track 2", "Track 4", "Track 5"}
    assert "Track 3" not in {s.track for s in lastfm.submissions}
    assert {e[0] for e in ev.seen} == {"too_old", "ignored", "failed", "sent"}
    n = len(lastfm.requests)
    assert await sender.drain() == "idle" and len(lastfm.requests) == n  # nothing retried
    await q.close()


@aio(30)
async def test_outage_then_recovery_sends_everything_once_in_order(lastfm, tmp_path):
    cfg = settings(tmp_path, lastfm, batch=7)
    q = await queue_with(cfg, [item(i) for i in range(30)])
    sender = Sender(q, cfg)
    lastfm.outage(40)  # minutes of 503s, at the test's backoff
    done = asyncio.create_task(sender.drain())
    await asyncio.sleep(0.3)
    for i in range(30, 40):  # plays keep coming during the outage
        await q.add(item(i))
    assert await done == "idle"
    assert [s.track for s in lastfm.scrobbles] == [f"Track {i}" for i in range(40)]
    assert (await q.counts())["sent"] == 40
    assert sender._delay == 0
    await q.close()


CHILD = textwrap.dedent("""
    import asyncio, sys
    import pylast  # imported before "ready": the kills land in the sending, not in the imports
    from vinyl_mqtt.roles.scrobbler import ScrobblerConfig, Sender
    from vinyl_mqtt.scrobble_queue import ScrobbleQueue

    async def main():
        cfg = ScrobblerConfig.model_validate_json(sys.argv[1])
        q = await ScrobbleQueue.open(cfg.queue_db)
        print("ready", flush=True)
        outcome = await Sender(q, cfg).drain()
        await q.close()
        print(outcome, flush=True)

    asyncio.run(main())
""")


@aio(50)
async def test_kill_9_at_random_points_loses_nothing_and_doubles_nothing(lastfm, tmp_path):
    cfg = settings(tmp_path, lastfm, batch=3)
    lastfm.latency_s = 0.02  # after recording, before answering: kills land in the ambiguous window too
    rng = random.Random(7)
    q = await ScrobbleQueue.open(cfg.queue_db)
    expected = []
    kills = mid_batch = 0
    child_cfg = json.dumps(cfg.model_dump(mode="json") | {"api_secret": cfg.api_secret.get_secret_value()})

    def scrobble_requests() -> int:
        return sum(r.get("method") == "track.scrobble" for r in list(lastfm.requests))

    async def child(kill_after: float | None) -> None:
        n0 = scrobble_requests()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, child_cfg, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert (await proc.stdout.readline()).strip() == b"ready", await proc.stderr.read()
        if kill_after is None:
            out, err = await proc.communicate()
            assert proc.returncode == 0 and out.strip() == b"idle", err
            return
        # once it is sending (a request has reached the server), kill it at a random moment
        deadline = time.monotonic() + 5
        while scrobble_requests() == n0 and proc.returncode is None and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        try:
            await asyncio.wait_for(proc.wait(), kill_after)
        except asyncio.TimeoutError:
            proc.kill()  # SIGKILL
            await proc.wait()
            nonlocal kills, mid_batch
            kills += 1
            mid_batch += (await q.counts())["sending"] > 0

    for it in range(20):
        for j in range(5):
            s = item(it * 5 + j)
            await q.add(s)
            expected.append(s.track)
        await child(rng.uniform(0.0, 0.25))
    await child(None)  # restart, let it finish
    counts = await q.counts()
    await q.close()
    recorded = [s.track for s in lastfm.scrobbles]
    assert recorded == expected  # nothing lost, nothing doubled, in order
    assert counts["sent"] == 100 and counts["queued"] == counts["sending"] == 0
    resent = len(lastfm.submissions) - len(recorded)
    print(f"{kills} kills, {mid_batch} with a batch in flight, {resent} scrobbles resent")
    assert kills >= 15 and mid_batch >= 3  # the kills did land while sending
    # every resend is a batch that was in flight when a child died: at most one batch per kill
    assert resent <= mid_batch * cfg.batch


# --------------------------------------------------------------------------- login


def test_login_stores_only_the_session_key(lastfm, tmp_path, capsys):
    cfg = settings(tmp_path, lastfm, session=False, auth_url=lastfm.root)
    cfg.session_key_file.parent.mkdir(parents=True, exist_ok=True)
    opened = []

    def user_opens(url: str) -> None:  # the user opens the page and allows access
        opened.append(url)
        urllib.request.urlopen(url, timeout=5).read()

    assert login(cfg, prompt=user_opens, poll_s=0.05) == "vinyl-tester"
    assert opened and opened[0].startswith(f"{lastfm.root}/api/auth/?api_key={lastfm.api_key}&token=")
    assert [r["method"] for r in lastfm.requests] == ["auth.getToken", "auth.getSession"]
    key = cfg.session_key_file.read_text()
    assert key.strip() in lastfm.sessions and key == key.strip() + "\n"  # the key, nothing else
    assert stat.S_IMODE(os.stat(cfg.session_key_file).st_mode) == 0o600
    assert [p.name for p in cfg.session_key_file.parent.iterdir() if p.name.startswith(".lastfm-")] == []
    assert "password" not in cfg.model_dump_json().lower()
    assert "token" not in key and cfg.api_secret.get_secret_value() not in key
    # the stored key works
    LastfmClient(network(cfg.api_key, lastfm.api_secret, key.strip(), api_root=lastfm.url)).update_now_playing(item(1))


def test_login_not_granted_fails_clearly(lastfm, tmp_path, capsys):
    cfg = settings(tmp_path, lastfm, session=False)
    with pytest.raises(LoginError, match="error 14"):
        login(cfg, prompt=lambda url: None, wait_s=0.2, poll_s=0.05)
    assert not cfg.session_key_file.exists()
    bad = settings(tmp_path, lastfm, session=False, api_secret="wrong")
    with pytest.raises(LoginError, match="token"):
        login(bad, prompt=lambda url: None, wait_s=0.2, poll_s=0.05)


# --------------------------------------------------------------------------- the role, over MQTT


async def _run_role(broker, cfg: ScrobblerConfig):
    conf = Config(node="test", mqtt=broker.config())
    conn = Connection(conf.mqtt, node="test", role="scrobbler", topics=Topics())
    role = ScrobblerRole(conf, conn, settings=cfg)
    task = asyncio.create_task(role.run())
    await asyncio.wait_for(conn.connected.wait(), 10)
    return role, conn, task


async def _stop(conn, task):
    await conn.close()
    await asyncio.wait_for(task, 10)


@aio(30)
async def test_role_now_playing_then_one_scrobble(broker, lastfm, tmp_path):
    cfg = settings(tmp_path, lastfm)
    t = Topics()
    async with Probe(broker, t.scrobble("deck")) as probe:
        role, conn, task = await _run_role(broker, cfg)
        started = event("started", position=11.0)
        await probe.publish(t.play("deck"), started.to_json(), qos=1)
        await until(lambda: len(lastfm.now_playing) == 1, 5, "now playing")
        assert lastfm.now_playing[0]["track"] == "Credits Ballad" and lastfm.now_playing[0]["duration"] == "200"
        for pos in (50.0, 101.0, 150.0):  # crosses half of 200 s at 101
            await probe.publish(t.play("deck"), event("updated", position=pos, started_at=started.play.started_at).to_json(), qos=1)
        ended = event("ended", position=190.0, played=180.0, started_at=started.play.started_at)
        await probe.publish(t.play("deck"), ended.to_json(), qos=1)
        # a play skipped early, and a too-short track: nothing
        await probe.publish(t.play("deck"), event("started", play_id="p2", position=5).to_json(), qos=1)
        await probe.publish(t.play("deck"), event("ended", play_id="p2", position=40, played=35).to_json(), qos=1)
        await probe.publish(t.play("deck"), event("ended", play_id="p3", duration=25, played=25).to_json(), qos=1)
        await until(lambda: len(lastfm.scrobbles) == 1, 5, "the scrobble")

        def statuses():
            return [(ScrobbleEvent.parse(m.payload).play_id, ScrobbleEvent.parse(m.payload).status) for m in probe.messages]

        await until(lambda: ("p1", "sent") in statuses(), 5, "sent event")
        await asyncio.sleep(0.3)
        s = lastfm.scrobbles[0]
        assert (s.artist, s.track, s.album, s.timestamp) == ("Kristian Picon", "Credits Ballad", "Extreme Tux Racer",
                                                             int(started.play.started_at))
        assert statuses().count(("p1", "queued")) == 1 and statuses().count(("p1", "sent")) == 1
        assert ("p1", "now_playing") in statuses() and ("p2", "now_playing") in statuses()
        assert not [x for x in statuses() if x[0] in ("p2", "p3") and x[1] != "now_playing"]
        # (p2's now-playing may be published before or after p1's "sent": they are separate tasks)
        sent = next(e for e in map(lambda m: ScrobbleEvent.parse(m.payload), probe.messages)
                    if (e.play_id, e.status) == ("p1", "sent"))
        assert sent.queued == 0 and sent.title == "Credits Ballad"
        await _stop(conn, task)
    q = await ScrobbleQueue.open(cfg.queue_db)
    assert [(x.play_id, x.state) for x in await q.all()] == [("p1", "sent")]
    await q.close()


@aio(30)
async def test_role_publishes_auth_failed(broker, lastfm, tmp_path):
    cfg = settings(tmp_path, lastfm)
    lastfm.revoke(cfg.session_key_file.read_text().strip())
    async with Probe(broker, Topics().scrobble("deck")) as probe:
        role, conn, task = await _run_role(broker, cfg)
        await probe.publish(Topics().play("deck"), event("ended", position=190, played=180).to_json(), qos=1)
        m = await probe.wait_for(lambda m: ScrobbleEvent.parse(m.payload).status == "auth_failed", 5)
        ev = ScrobbleEvent.parse(m.payload)
        assert "9" in ev.reason and ev.queued == 1 and ev.play_id == "p1"
        await _stop(conn, task)
    assert lastfm.scrobbles == []


@aio(30)
async def test_dry_run_sends_nothing(broker, lastfm, tmp_path, caplog):
    cfg = settings(tmp_path, lastfm, dry_run=True)
    async with Probe(broker, Topics().scrobble("deck")) as probe:
        with caplog.at_level(logging.INFO, logger="vinyl_mqtt.roles.scrobbler"):
            role, conn, task = await _run_role(broker, cfg)
            await probe.publish(Topics().play("deck"), event("started", position=5).to_json(), qos=1)
            await probe.publish(Topics().play("deck"), event("ended", position=190, played=180).to_json(), qos=1)
            await probe.wait_for(lambda m: ScrobbleEvent.parse(m.payload).status == "sent", 5)
            await until(lambda: "would send now playing" in caplog.text, 5, "now playing log")
            await _stop(conn, task)
    assert "dry run: would scrobble Kristian Picon — Credits Ballad" in caplog.text
    assert lastfm.requests == []
    assert not cfg.queue_db.exists()
