"""Play detection (vinyl_mqtt.plays), pure logic: realistic sessions replayed on a fake clock.

A small model of the listener and the matcher turns "what the record played
when" into the messages the dedupe role would get, timed as the real roles
time them: the listener says ``playing`` a second after the music starts
(dated to its start) and ``idle`` 5 s into a silence (dated to the silence);
it sends a 3.25 s clip 3 s after a needle drop or a gap between tracks
(starting 0.25 s before the music), then an 8 s clip every 30 s; a matcher
answers half a second after a clip ends, with the track's position at the
clip's first sample.  Tests override single answers (strays, misses, loop
jumps) by clip number.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

import pytest

from vinyl_mqtt.messages import ListenerState, MatchedTrack, MatchResult, MessageError, NowPlaying, PlayEvent
from vinyl_mqtt.plays import PlayTracker, Rules

T0 = 1_700_000_000.0
L = "pi"

GAP_S, RELEASE_S, ATTACK_S = 1.0, 5.0, 1.0  # the listener's gate
FIRST_AFTER_S, RECHECK_S, CLIP_S, PREROLL_S = 3.0, 30.0, 8.0, 0.25  # its clip scheduler
ANSWER_S = 0.5  # matcher latency after a clip ends


def trk(id: int, number: int | None, duration: float, album: str | None = "Blue Side", **kw) -> MatchedTrack:
    return MatchedTrack(id=id, title=kw.pop("title", f"Track {id}"), artist="The Band", album=album,
                        album_artist=kw.pop("album_artist", "The Band"), track_number=number,
                        disc_number=kw.pop("disc_number", 1), duration_s=duration, path=f"/music/{id}.flac", **kw)


ALBUM = [trk(1, 1, 200.0), trk(2, 2, 150.0), trk(3, 3, 245.0), trk(4, 4, 180.0)]
OTHER = trk(99, 7, 320.0, album="Somebody Else")


@dataclass
class Seg:
    """The record played `track` (None: music not in the library) from t0 to t1, at `offset` at t0."""

    t0: float
    t1: float
    track: MatchedTrack | None
    offset: float = 0.0
    speed: float = 1.0

    def position(self, t: float) -> float:
        return self.offset + (t - self.t0) * self.speed


@dataclass
class Clip:
    seq: int
    start: float
    end: float
    reason: str


@dataclass
class Deck:
    """A turntable, its listener and a matcher, replayed into a tracker on a fake clock."""

    tracker: PlayTracker = field(default_factory=lambda: PlayTracker(L))
    now: float = T0
    events: list[tuple[float, PlayEvent]] = field(default_factory=list)
    states: list[NowPlaying] = field(default_factory=list)  # every changed NowPlaying
    clips: list[Clip] = field(default_factory=list)
    _queue: list = field(default_factory=list)
    _n: itertools.count = field(default_factory=itertools.count)

    # -- what the record does ------------------------------------------------------

    def play(self, segs: list[Seg], answers: dict | None = None, *, listener: bool = True, delay: float = 0.0) -> None:
        """Schedule what the listener and the matcher send for this audio.

        ``answers[seq]``: a MatchResult-field dict to answer clip ``seq`` with instead
        (``{"matched": False}`` for a miss), or None to drop the answer;
        ``delay``: answers arrive no earlier than this after the first clip (a sleeping matcher)."""
        answers = answers or {}
        states, clips = listen(segs, first_seq=len(self.clips))
        if listener:
            for at, st in states:
                self._push(at, "listener", st)
        wake = clips[0].end + delay if clips else 0.0
        for c in clips:
            self.clips.append(c)
            ans = answers.get(c.seq, "default")
            if ans is None:
                continue
            m = hear(c, segs) if ans == "default" else answer(c, **ans)
            self._push(max(c.end + ANSWER_S, wake + 0.01 * c.seq), "match", m)

    def match(self, at: float, **fields) -> None:
        self._push(at, "match", answer(Clip(900 + next(self._n), fields.pop("captured_at"), at, "recheck"), **fields))

    def state(self, at: float, state: str, since: float) -> None:
        self._push(at, "listener", ListenerState(listener=L, state=state, rms_dbfs=-20.0, peak_dbfs=-6.0, since=since,
                                                 updated_at=at))

    def _push(self, at: float, kind: str, payload) -> None:
        heapq.heappush(self._queue, (at, next(self._n), kind, payload))

    # -- running ---------------------------------------------------------------------

    def run(self, until: float) -> None:
        """Deliver everything due up to ``until``, ticking every whole second in between."""
        while True:
            nxt = self._queue[0][0] if self._queue else math.inf
            tick = math.floor(self.now) + 1.0
            if min(nxt, tick) > until:
                break
            if tick <= nxt:
                self.now = tick
                self._take(self.tracker.tick(tick))
            else:
                at, _, kind, payload = heapq.heappop(self._queue)
                self.now = max(self.now, at)
                fn = self.tracker.on_match if kind == "match" else self.tracker.on_listener
                self._take(fn(payload, self.now))
        self.now = until

    def _take(self, out) -> None:
        self.events += [(self.now, e) for e in out.events]
        if out.changed:
            self.states.append(out.now_playing)

    # -- what came out -----------------------------------------------------------

    def of(self, kind: str) -> list:
        return [e.play for _, e in self.events if e.event == kind]

    def kinds(self) -> list[tuple[str, int]]:
        return [(e.event, e.play.track.id) for _, e in self.events if e.event != "updated"]

    def when(self, kind: str, track_id: int) -> float:
        return next(t for t, e in self.events if e.event == kind and e.play.track.id == track_id)

    def state_names(self) -> list[str]:
        out: list[str] = []
        for s in self.states:
            name = s.state if s.play is None else f"playing {s.play.track.id}"
            if not out or out[-1] != name:
                out.append(name)
        return out

    @property
    def now_playing(self) -> NowPlaying:
        return self.tracker.now_playing(self.now)


def listen(segs: list[Seg], first_seq: int = 0) -> tuple[list[tuple[float, ListenerState]], list[Clip]]:
    """The listener's states and clips for this audio (the gate and clip scheduler, in seconds)."""
    segs = sorted(segs, key=lambda s: s.t0)
    runs: list[list[float]] = []  # music runs (silences shorter than the gap detector merged)
    gaps: list[float] = []  # gap ends
    for s in segs:
        if runs and s.t0 - runs[-1][1] < GAP_S:
            runs[-1][1] = max(runs[-1][1], s.t1)
        else:
            runs.append([s.t0, s.t1])
    states: list[tuple[float, ListenerState]] = []
    clips: list[Clip] = []
    seq = first_seq

    def state(at, st, since):
        states.append((at, ListenerState(listener=L, state=st, rms_dbfs=-20.0, peak_dbfs=-6.0, since=since,
                                         updated_at=at)))

    session_end = None
    for i, (a, b) in enumerate(runs):
        new_session = session_end is None or a - session_end >= RELEASE_S
        if new_session:
            if session_end is not None:
                state(session_end + RELEASE_S, "idle", session_end)
            state(a + ATTACK_S, "playing", a)
        else:
            gaps.append(a)
        nxt = runs[i + 1][0] if i + 1 < len(runs) else math.inf
        stop = b + RELEASE_S if nxt - b >= RELEASE_S else nxt  # the clip timetable is reset at `stop`
        due, floor, reason = a + FIRST_AFTER_S, a, "needle_drop" if new_session else "after_gap"
        while due <= stop:
            clips.append(Clip(seq, max(due - CLIP_S, floor - PREROLL_S), due, reason))
            seq += 1
            due, reason = due + RECHECK_S, "recheck"
        session_end = b
    if session_end is not None:
        state(session_end + RELEASE_S, "idle", session_end)
    return states, clips


def hear(c: Clip, segs: list[Seg]) -> MatchResult:
    """The matcher's answer: the track heard longest in the clip, at the clip's first sample."""
    best, most = None, 0.0
    for s in segs:
        overlap = min(c.end, s.t1) - max(c.start, s.t0)
        if overlap > most:
            best, most = s, overlap
    if best is None or best.track is None or most < 1.5:
        return answer(c, matched=False)
    short = c.end - c.start < 5
    return answer(c, track=best.track, offset_s=round(best.position(c.start), 3), speed=best.speed,
                  confidence=0.9999 if short else 1.0, score=60 if short else 150)


def answer(c: Clip, **fields) -> MatchResult:
    matched = fields.pop("matched", "track" in fields)
    base = dict(listener=L, clip_id=f"c{c.seq}", seq=c.seq, captured_at=round(c.start, 3), matched=matched,
                matcher="m1")
    if matched:
        base.update(speed=1.0, confidence=0.9999, score=150)
    return MatchResult(**{**base, **fields})


def side(tracks: list[MatchedTrack], start: float, gap: float = 2.0, speed: float = 1.0) -> list[Seg]:
    """An album side played through: each track whole, `gap` s of silence between them."""
    segs, t = [], start
    for tr in tracks:
        length = tr.duration_s / speed
        segs.append(Seg(t, t + length, tr, 0.0, speed))
        t += length + gap
    return segs


def starts(segs: list[Seg]) -> list[float]:
    return [s.t0 - s.offset / s.speed for s in segs]


# --------------------------------------------------------------------------- album sides


def test_album_side_gives_exactly_one_play_per_track():
    d = Deck()
    segs = side(ALBUM, T0 + 10)
    d.play(segs)
    d.run(segs[-1].t1 + 30)
    assert d.kinds() == [("started", 1), ("ended", 1), ("started", 2), ("ended", 2),
                         ("started", 3), ("ended", 3), ("started", 4), ("ended", 4)]
    started, ended = d.of("started"), d.of("ended")
    for p, s in zip(started, segs):
        assert abs(p.started_at - s.t0) < 0.5
    assert [p.play_id for p in started] == [p.play_id for p in ended]
    assert len({p.play_id for p in started}) == 4
    assert all(p.played_through for p in ended)
    assert [p.end_reason for p in ended] == ["next_track"] * 3 + ["silence"]
    for p, s in zip(ended, segs):
        assert abs(p.ended_at - s.t1) < 0.5 and abs(p.played_s - (s.t1 - s.t0)) < 0.5
    # known as soon as the first clip is answered: 3 s after the needle drop, then at each gap
    assert d.when("started", 1) - segs[0].t0 == pytest.approx(FIRST_AFTER_S + ANSWER_S, abs=0.01)
    for s, tr in zip(segs[1:], ALBUM[1:]):
        assert d.when("started", tr.id) - s.t0 == pytest.approx(FIRST_AFTER_S + ANSWER_S, abs=0.01)
    # playing straight through: never "unknown" between tracks
    assert d.state_names() == ["idle", "playing 1", "playing 2", "playing 3", "playing 4", "idle"]
    assert d.now_playing.state == "idle" and d.now_playing.play is None
    # next_track_id is known once the next track has been seen
    assert [p.next_track_id for p in ended] == [2, 3, 4, None]
    # updated on each agreeing match, with the count
    ups = [p for p in d.of("updated") if p.track.id == 3]
    assert [p.matches for p in ups] == list(range(2, 2 + len(ups))) and len(ups) == 8


def test_predicted_next_track_is_confirmed_by_one_weak_match():
    """After a gap, one barely-over-the-threshold match of the album's next track is enough."""
    d = Deck()
    segs = side(ALBUM[:2], T0 + 10)
    first_after_gap = next(c for c in listen(segs)[1] if c.reason == "after_gap").seq
    weak = dict(track=ALBUM[1], offset_s=-0.25, confidence=0.6, score=17)
    d.play(segs, {first_after_gap: weak})
    d.run(segs[-1].t1 + 30)
    assert d.kinds() == [("started", 1), ("ended", 1), ("started", 2), ("ended", 2)]
    assert d.when("started", 2) - segs[1].t0 == pytest.approx(FIRST_AFTER_S + ANSWER_S, abs=0.01)


def test_weak_single_match_of_an_unpredicted_track_waits_for_a_second():
    d = Deck()
    tr = trk(50, None, 240.0, album=None)
    segs = [Seg(T0 + 10, T0 + 250, tr)]
    d.play(segs, {0: dict(track=tr, offset_s=-0.25, confidence=0.6, score=17),
                  1: dict(track=tr, offset_s=25.0, confidence=0.7, score=22)})
    d.run(T0 + 300)
    assert d.kinds() == [("started", 50), ("ended", 50)]
    assert d.when("started", 50) == pytest.approx(d.clips[1].end + ANSWER_S)  # the second match confirmed it
    assert d.of("started")[0].matches == 2
    assert abs(d.of("started")[0].started_at - (T0 + 10)) < 0.5


def test_flip_to_side_b_predicts_its_first_track():
    a, b = [trk(i, i, 100.0) for i in (1, 2)], [trk(i, i, 100.0) for i in (3, 4)]
    d = Deck()
    side_a = side(a, T0 + 10)
    side_b = side(b, side_a[-1].t1 + 60)  # a minute to flip the record
    segs = side_a + side_b
    drop_b = next(c.seq for c in listen(segs)[1] if c.start > side_b[0].t0 - 1)
    d.play(segs, {drop_b: dict(track=b[0], offset_s=-0.25, confidence=0.55, score=15)})
    d.run(side_b[-1].t1 + 30)
    assert d.kinds() == [("started", 1), ("ended", 1), ("started", 2), ("ended", 2),
                         ("started", 3), ("ended", 3), ("started", 4), ("ended", 4)]
    assert [p.end_reason for p in d.of("ended")] == ["next_track", "silence", "next_track", "silence"]
    assert d.state_names() == ["idle", "playing 1", "playing 2", "idle", "playing 3", "playing 4", "idle"]


# --------------------------------------------------------------------------- within one play


def test_stray_wrong_match_mid_play_is_ignored():
    d = Deck()
    segs = [Seg(T0 + 10, T0 + 210, ALBUM[0])]
    # clip 3 answered with another library track, confidently, at a random place in it
    d.play(segs, {3: dict(track=OTHER, offset_s=143.2, confidence=0.995, score=45)})
    d.run(T0 + 260)
    assert d.kinds() == [("started", 1), ("ended", 1)]
    p = d.of("ended")[0]
    assert p.played_through and p.end_reason == "silence"
    assert d.state_names() == ["idle", "playing 1", "idle"]
    # the stray was not counted: one update per agreeing match
    assert [u.matches for u in d.of("updated")] == [2, 3, 4, 5, 6]


def test_two_strays_of_different_tracks_never_end_the_play():
    d = Deck()
    segs = [Seg(T0 + 10, T0 + 210, ALBUM[0])]
    d.play(segs, {2: dict(track=OTHER, offset_s=43.2, confidence=0.62, score=18),
                  3: dict(track=ALBUM[2], offset_s=11.0, confidence=0.58, score=16)})
    d.run(T0 + 260)
    assert d.kinds() == [("started", 1), ("ended", 1)] and d.of("ended")[0].played_through


def test_same_track_minutes_later_is_the_same_play():
    """The matcher was away for five minutes of a long track: the next answer continues the play."""
    long = trk(7, 2, 600.0)
    d = Deck()
    segs = [Seg(T0 + 10, T0 + 610, long)]
    d.play(segs, {i: None for i in range(2, 12)})  # no answers for clips 2..11 (~5 min)
    d.run(T0 + 650)
    assert d.kinds() == [("started", 7), ("ended", 7)]
    ups = d.of("updated")
    assert ups[0].matches == 2 and ups[1].matches == 3
    assert {u.play_id for u in ups} == {d.of("started")[0].play_id}
    gap_update = [t for t, e in d.events if e.event == "updated"][1]
    assert gap_update - d.when("started", 7) > 300
    assert abs(ups[-1].started_at - (T0 + 10)) < 0.5


def test_same_track_again_after_it_ended_is_a_second_play():
    tr = ALBUM[1]
    d = Deck()
    first = Seg(T0 + 10, T0 + 160, tr)
    again = Seg(first.t1 + 20, first.t1 + 170, tr)  # needle lifted, put back at the start
    d.play([first, again])
    d.run(again.t1 + 30)
    assert d.kinds() == [("started", 2), ("ended", 2), ("started", 2), ("ended", 2)]
    p1, p2 = d.of("ended")
    assert p1.play_id != p2.play_id
    assert abs(p1.started_at - first.t0) < 0.5 and abs(p2.started_at - again.t0) < 0.5
    assert p1.played_through and p2.played_through


def test_same_track_again_after_a_short_gap_is_a_second_play():
    """Replayed straight away (the listener never went idle): a timeline that starts where the
    play ended is a new play, not a jump inside the old one."""
    tr = ALBUM[1]
    d = Deck()
    first = Seg(T0 + 10, T0 + 160, tr)
    again = Seg(first.t1 + 3, first.t1 + 153, tr)
    d.play([first, again])
    d.run(again.t1 + 30)
    assert d.kinds() == [("started", 2), ("ended", 2), ("started", 2), ("ended", 2)]
    p1, p2 = d.of("ended")
    assert p1.end_reason == "next_track" and p1.played_through
    assert abs(p2.started_at - again.t0) < 0.5


def test_looped_tune_offset_jump_stays_in_the_play():
    """The matcher names another repetition of the same bars (+16 s): same play, no restart."""
    loop = trk(8, None, 180.0, album=None)
    d = Deck()
    segs = [Seg(T0 + 10, T0 + 190, loop)]
    c3 = listen(segs)[1][3]
    jumped = round(segs[0].position(c3.start) + 16.0, 3)
    d.play(segs, {3: dict(track=loop, offset_s=jumped, score=90)})
    d.run(T0 + 240)
    assert d.kinds() == [("started", 8), ("ended", 8)]
    p = d.of("ended")[0]
    assert abs(p.started_at - (T0 + 10)) < 0.5 and p.played_through and p.end_reason == "silence"
    # the jumped answer was not an agreeing match: no update for it
    assert len(d.of("updated")) == len(d.clips) - 2


def test_looped_tune_confirmed_at_the_wrong_repetition_is_corrected():
    """The first answer named a repetition 20 s on, the next ones the right place: one play, right start,
    not ended by the wrong timeline's duration."""
    loop = trk(9, None, 100.0, album=None)
    d = Deck()
    segs = [Seg(T0 + 10, T0 + 110, loop)]
    d.play(segs, {0: dict(track=loop, offset_s=19.75, score=90), 1: None})
    d.run(T0 + 150)
    assert d.kinds() == [("started", 9), ("ended", 9)]
    p = d.of("ended")[0]
    assert p.end_reason == "silence" and p.played_through and abs(p.started_at - (T0 + 10)) < 0.5
    assert d.of("started")[0].started_at == pytest.approx(T0 + 10 - 20, abs=0.5)  # (what it first believed)


def test_skip_ends_the_play_not_played_through():
    """Needle moved from track 1 to the start of track 3 (3 s up: the listener sees a gap)."""
    d = Deck()
    t1 = Seg(T0 + 10, T0 + 100, ALBUM[0])  # 90 s of a 200 s track
    t3 = Seg(t1.t1 + 3, t1.t1 + 3 + 245, ALBUM[2])
    d.play([t1, t3])
    d.run(t3.t1 + 30)
    assert d.kinds() == [("started", 1), ("ended", 1), ("started", 3), ("ended", 3)]
    p1, p3 = d.of("ended")
    assert p1.end_reason == "next_track" and not p1.played_through
    assert 80 <= p1.played_s <= 96 and p1.ended_at <= t3.t0
    assert abs(p3.started_at - t3.t0) < 0.5 and p3.played_through
    # mid-play, one confident answer of an unpredicted track is not enough: the recheck confirms
    assert d.when("started", 3) - t3.t0 == pytest.approx(FIRST_AFTER_S + RECHECK_S + ANSWER_S, abs=0.01)


def test_skip_with_the_needle_up_starts_the_next_at_once():
    d = Deck()
    t1 = Seg(T0 + 10, T0 + 100, ALBUM[0])
    t3 = Seg(t1.t1 + 8, t1.t1 + 8 + 245, ALBUM[2], offset=0.0)
    d.play([t1, t3])
    d.run(t3.t1 + 30)
    assert d.kinds() == [("started", 1), ("ended", 1), ("started", 3), ("ended", 3)]
    p1 = d.of("ended")[0]
    assert p1.end_reason == "silence" and not p1.played_through
    assert p1.ended_at == pytest.approx(t1.t1) and p1.played_s == pytest.approx(90.0)
    assert d.when("started", 3) - t3.t0 == pytest.approx(FIRST_AFTER_S + ANSWER_S, abs=0.01)


def test_skip_then_lift_before_a_second_answer():
    """Skipped to track 3, lifted 20 s later: its one confident answer is not contradicted."""
    d = Deck()
    t1 = Seg(T0 + 10, T0 + 100, ALBUM[0])
    t3 = Seg(t1.t1 + 3, t1.t1 + 23, ALBUM[2])
    d.play([t1, t3])
    d.run(t3.t1 + 30)
    assert d.kinds() == [("started", 1), ("ended", 1), ("started", 3), ("ended", 3)]
    p1, p3 = d.of("ended")
    assert p1.end_reason == "next_track" and not p1.played_through and p1.ended_at <= t3.t0
    assert p3.end_reason == "silence" and p3.ended_at == pytest.approx(t3.t1)
    assert abs(p3.started_at - t3.t0) < 0.5 and p3.played_s == pytest.approx(20.0, abs=0.5)
    assert d.when("started", 3) == pytest.approx(t3.t1 + RELEASE_S)  # when the lift was known


def test_stray_as_the_last_answer_before_a_lift_is_still_ignored():
    """The stray names a place far into its track: not a skip (a skip lands near a track's start)."""
    d = Deck()
    seg = Seg(T0 + 10, T0 + 120, ALBUM[0])
    d.play([seg], {3: dict(track=OTHER, offset_s=201.0, confidence=0.999, score=70)})
    d.run(T0 + 160)
    assert d.kinds() == [("started", 1), ("ended", 1)]
    assert d.of("ended")[0].end_reason == "silence" and d.of("ended")[0].ended_at == pytest.approx(T0 + 120)


def test_needle_dropped_mid_track():
    """Started_at is computed back to the track's first second; played_s counts what was heard."""
    d = Deck()
    seg = Seg(T0 + 10, T0 + 110, ALBUM[2], offset=145.0)  # dropped 145 s in, heard to the end
    d.play([seg])
    d.run(T0 + 150)
    p = d.of("ended")[0]
    assert abs(p.started_at - (T0 + 10 - 145)) < 0.5
    assert p.played_s == pytest.approx(100.0, abs=0.5) and p.played_through
    s = d.of("started")[0]
    assert s.position_s == pytest.approx(145 + FIRST_AFTER_S + ANSWER_S, abs=0.5)


# --------------------------------------------------------------------------- ends and unknowns


def test_silence_ends_the_play():
    d = Deck()
    seg = Seg(T0 + 10, T0 + 70, ALBUM[0])  # lifted after 60 s
    d.play([seg])
    d.run(T0 + 100)
    assert d.kinds() == [("started", 1), ("ended", 1)]
    p = d.of("ended")[0]
    assert p.end_reason == "silence" and not p.played_through
    assert p.ended_at == pytest.approx(T0 + 70) and p.played_s == pytest.approx(60.0)
    assert p.position_s == pytest.approx(60.0, abs=0.5)
    assert d.when("ended", 1) == pytest.approx(T0 + 70 + RELEASE_S)  # when the listener said idle
    assert d.now_playing.state == "idle" and d.now_playing.since == pytest.approx(T0 + 70)


def test_duration_ends_the_play_and_unknown_music_is_not_invented():
    """The track ends, music that is not in the library carries on: the play ends by duration,
    the turntable is 'unknown', no play is made up."""
    d = Deck()
    known = Seg(T0 + 10, T0 + 210, ALBUM[0])
    unknown = Seg(known.t1 + 2, known.t1 + 182, None)
    d.play([known, unknown])
    d.run(unknown.t1 + 30)
    assert d.kinds() == [("started", 1), ("ended", 1)]
    p = d.of("ended")[0]
    assert p.end_reason == "duration" and p.played_through
    assert p.ended_at == pytest.approx(known.t1, abs=0.5)
    assert d.when("ended", 1) == pytest.approx(known.t1 + Rules().duration_grace_s, abs=1.0)
    assert d.state_names() == ["idle", "playing 1", "unknown", "idle"]
    unknown_state = next(s for s in d.states if s.state == "unknown")
    assert unknown_state.play is None and unknown_state.since == pytest.approx(known.t1, abs=0.5)


def test_unknown_record_gives_no_play():
    d = Deck()
    d.play([Seg(T0 + 10, T0 + 250, None), Seg(T0 + 252, T0 + 400, None)])
    d.run(T0 + 450)
    assert d.events == []
    assert d.state_names() == ["idle", "unknown", "idle"]
    unknown_state = next(s for s in d.states if s.state == "unknown")
    assert unknown_state.since == pytest.approx(d.clips[0].start)  # from the first unmatched clip
    assert d.states[-1].since == pytest.approx(T0 + 400)


def test_one_confident_stray_in_unknown_music_invents_nothing():
    """Music found unknown (unmatched answers): one confident answer does not outweigh it."""
    d = Deck()
    segs = [Seg(T0 + 10, T0 + 250, None)]
    d.play(segs, {3: dict(track=OTHER, offset_s=77.0, confidence=0.999, score=60)})
    d.run(T0 + 300)
    assert d.events == []
    assert d.state_names() == ["idle", "unknown", "idle"]


def test_known_track_after_unknown_music_needs_two_agreeing_answers():
    d = Deck()
    unknown = Seg(T0 + 10, T0 + 130, None)
    known = Seg(unknown.t1 + 2.5, unknown.t1 + 2.5 + 240, trk(51, None, 240.0, album=None))
    d.play([unknown, known])
    d.run(known.t1 + 30)
    assert d.kinds() == [("started", 51), ("ended", 51)]
    assert d.state_names() == ["idle", "unknown", "playing 51", "idle"]
    assert d.when("started", 51) - known.t0 == pytest.approx(FIRST_AFTER_S + RECHECK_S + ANSWER_S, abs=0.01)
    assert abs(d.of("ended")[0].started_at - known.t0) < 0.5


def test_unmatched_answers_during_a_play_end_it_as_unknown_music():
    """Three unmatched answers in a row where the track should be playing: it is not."""
    d = Deck()
    t1 = Seg(T0 + 10, T0 + 70, ALBUM[0])
    other = Seg(t1.t1 + 0.5, t1.t1 + 300, None)  # another (unknown) record, no gap heard
    d.play([t1, other])
    d.run(T0 + 400)
    assert d.kinds() == [("started", 1), ("ended", 1)]
    p = d.of("ended")[0]
    assert p.end_reason == "unknown_music" and not p.played_through
    assert d.state_names() == ["idle", "playing 1", "unknown", "idle"]


def test_a_missed_answer_does_not_end_a_play():
    d = Deck()
    seg = Seg(T0 + 10, T0 + 210, ALBUM[0])
    d.play([seg], {2: dict(matched=False), 3: dict(matched=False), 5: dict(matched=False)})
    d.run(T0 + 260)
    assert d.kinds() == [("started", 1), ("ended", 1)] and d.of("ended")[0].played_through


# --------------------------------------------------------------------------- speed, late answers, restart


def test_45_at_33_position_advances_with_the_measured_speed():
    speed = 33.333 / 45
    d = Deck()
    tr = ALBUM[1]  # 150 s at 45 rpm: 202.5 s at 33
    seg = Seg(T0 + 10, T0 + 10 + tr.duration_s / speed, tr, speed=speed)
    d.play([seg], {i: dict(track=tr, offset_s=round(seg.position(c.start), 3), speed=round(speed, 5),
                           rpm_mistake="45 at 33") for i, c in enumerate(listen([seg])[1])})
    d.run(seg.t1 + 30)
    assert d.kinds() == [("started", 2), ("ended", 2)]
    for (t, e) in d.events:
        if e.event in ("started", "updated"):
            assert e.play.speed == pytest.approx(speed, rel=1e-4)
            assert e.play.position_s == pytest.approx((t - seg.t0) * speed, abs=0.2)
    end = d.of("ended")[0]
    assert end.played_through and end.ended_at == pytest.approx(seg.t1, abs=0.3)
    # NowPlaying extrapolates at the measured speed too, and stops at the track's duration
    mid = Deck()
    mid.play([seg], {i: dict(track=tr, offset_s=round(seg.position(c.start), 3), speed=round(speed, 5))
                     for i, c in enumerate(listen([seg])[1])})
    mid.run(T0 + 110)
    assert mid.now_playing.play.position_s == pytest.approx(100 * speed, abs=0.2)
    assert mid.tracker.now_playing(seg.t1 + 5).play.position_s == pytest.approx(tr.duration_s)


def test_45_at_33_ends_by_duration_at_the_slowed_end():
    speed = 33.333 / 45
    tr = trk(60, None, 60.0, album=None)
    d = Deck()
    seg = Seg(T0 + 10, T0 + 10 + tr.duration_s / speed, tr, speed=speed)  # 81 s
    tail = Seg(seg.t1 + 0.3, seg.t1 + 100, None)  # unknown music straight after
    d.play([seg, tail], {i: dict(track=tr, offset_s=round(seg.position(c.start), 3), speed=round(speed, 5))
                         for i, c in enumerate(listen([seg])[1])})
    d.run(seg.t1 + 40)
    end = d.of("ended")[0]
    assert end.end_reason == "duration" and end.ended_at == pytest.approx(seg.t1, abs=0.3)
    assert d.when("ended", 60) == pytest.approx(seg.t1 + Rules().duration_grace_s, abs=1.0)


def test_late_answers_from_a_sleeping_matcher_still_give_the_right_play():
    d = Deck()
    segs = side(ALBUM[:2], T0 + 10)
    d.play(segs, delay=50.0)  # the first answers arrive ~50 s late, in a burst
    d.run(segs[-1].t1 + 30)
    assert d.kinds() == [("started", 1), ("ended", 1), ("started", 2), ("ended", 2)]
    assert abs(d.of("started")[0].started_at - segs[0].t0) < 0.5
    assert d.when("started", 1) - segs[0].t0 > 50


def test_whole_short_track_answered_after_it_ended():
    """Both answers arrive after the needle was lifted: the play is still made, and ended at once."""
    tr = trk(70, None, 40.0, album=None)
    d = Deck()
    seg = Seg(T0 + 10, T0 + 50, tr)
    d.play([seg], delay=60.0)
    d.run(T0 + 200)
    assert d.kinds() == [("started", 70), ("ended", 70)]
    p = d.of("ended")[0]
    assert p.end_reason == "silence" and p.ended_at == pytest.approx(T0 + 50) and p.played_through
    assert d.now_playing.state == "idle"


def test_restart_mid_play_resumes_the_same_play():
    segs = side(ALBUM[:2], T0 + 10)
    before = Deck()
    before.play(segs)
    before.run(T0 + 100)  # in the middle of track 1
    retained = before.states[-1]
    assert retained.state == "playing"
    # the new process: restored from the retained JSON, then fed the rest
    after = Deck(tracker=PlayTracker.restore(NowPlaying.parse(retained.to_json())), now=T0 + 100)
    after.play(segs)
    after._queue = [q for q in after._queue if q[0] > T0 + 100]
    after.state(T0 + 100.5, "playing", segs[0].t0)  # the retained listener state, re-delivered
    after.run(segs[-1].t1 + 30)
    assert after.kinds() == [("ended", 1), ("started", 2), ("ended", 2)]
    assert after.of("ended")[0].play_id == retained.play.play_id
    assert after.of("updated")[0].play_id == retained.play.play_id
    assert after.of("updated")[0].matches == retained.play.matches + 1
    assert abs(after.of("ended")[0].started_at - segs[0].t0) < 0.5 and after.of("ended")[0].played_through
    assert after.of("ended")[0].played_s == pytest.approx(segs[0].t1 - segs[0].t0, abs=0.5)
    # it still predicts: track 2 came in at the first answer after the gap
    assert after.when("started", 2) - segs[1].t0 == pytest.approx(FIRST_AFTER_S + ANSWER_S, abs=0.01)


def test_restart_while_down_across_a_lift():
    """Restored a play, but the turntable has been started again since: the old play is over."""
    segs = side(ALBUM[:1], T0 + 10)
    before = Deck()
    before.play(segs)
    before.run(T0 + 100)
    retained = before.states[-1]
    after = Deck(tracker=PlayTracker.restore(retained), now=T0 + 400)
    after.state(T0 + 400.5, "playing", T0 + 390)  # a new needle drop while we were down
    after.run(T0 + 402)
    assert after.kinds() == [("ended", 1)]
    assert after.of("ended")[0].end_reason == "silence" and after.of("ended")[0].play_id == retained.play.play_id


def test_restored_idle_and_unknown_states():
    for state in ("idle", "unknown"):
        np = NowPlaying(listener=L, state=state, since=T0, updated_at=T0 + 5)
        t = PlayTracker.restore(np)
        out = t.tick(T0 + 10)
        assert out.events == [] and not out.changed
        assert out.now_playing.state == state and out.now_playing.since == T0


# --------------------------------------------------------------------------- robustness


def test_duplicate_delivery_is_ignored():
    d = Deck()
    segs = [Seg(T0 + 10, T0 + 100, ALBUM[0])]
    d.play(segs)
    for at, _, kind, payload in list(d._queue):  # every answer delivered twice (QoS 1)
        if kind == "match":
            d._push(at + 0.2, kind, payload)
    d.run(T0 + 150)
    assert d.kinds() == [("started", 1), ("ended", 1)]
    assert [u.matches for u in d.of("updated")] == [2, 3, 4]


def test_malformed_matches_raise_message_error():
    t = PlayTracker(L)
    c = Clip(0, T0, T0 + 3, "needle_drop")
    with pytest.raises(MessageError, match="without track"):
        t.on_match(answer(c, matched=True, offset_s=1.0), T0 + 4)
    with pytest.raises(MessageError, match="listener"):
        t.on_match(answer(c, track=ALBUM[0], offset_s=1.0).model_copy(update={"listener": "den"}), T0 + 4)
    with pytest.raises(MessageError, match="speed"):
        t.on_match(answer(c, track=ALBUM[0], offset_s=1.0, speed=0.0), T0 + 4)
    out = t.on_match(answer(c, matched=False, error="clip too short"), T0 + 4)
    assert out.events == [] and t.state == "idle"


def test_trackers_of_two_turntables_share_the_catalog_not_the_plays():
    from vinyl_mqtt.plays import Catalog

    cat = Catalog()
    a, b = PlayTracker("pi", catalog=cat), PlayTracker("den", catalog=cat)
    c = Clip(0, T0, T0 + 3, "needle_drop")
    out = a.on_match(answer(c, track=ALBUM[0], offset_s=10.0), T0 + 4)
    assert [e.event for e in out.events] == ["started"]
    assert b.tick(T0 + 5).now_playing.state == "idle"
    assert len(cat) == 1
