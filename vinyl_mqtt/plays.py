"""From a stream of matches to plays: one track-play per real play.

Pure logic: no I/O, no MQTT, no clock of its own (every call is given
``now``).  One :class:`PlayTracker` per turntable is fed

* ``on_match(MatchResult, now)``: the matcher's answers, in arrival order;
* ``on_listener(ListenerState, now)``: the turntable's playing / idle state;
* ``tick(now)``: about once a second (plays end by duration);

and each call returns an :class:`Output`: the :class:`PlayEvent`\\ s to
publish (in order) and the current :class:`NowPlaying` (with ``changed``
telling whether it differs from the last one returned).  A tracker can be
rebuilt from its retained ``NowPlaying`` (:meth:`PlayTracker.restore`): the
play it was in continues under the same ``play_id``, no second ``started``.

Timeline
    A match says "track T was at ``offset_s`` at ``captured_at``, playing at
    ``speed``", so it implies when the track's first second played:
    ``captured_at - offset_s / speed``.  Two matches *agree* when they name
    the same track, their speeds are within ``speed_tol`` (3 %: a 33/45
    mix-up is 35 %) and the later one's offset is where the earlier timeline
    puts it, within ``timeline_tol_s`` (2 s) plus ``timeline_tol_rel`` of the
    offset (0.4 %: speed measured on a short clip is good to ~0.3 % at p95).
    A play's start and speed are the score-weighted means of its agreeing
    matches; ``position = (now - started_at) * speed``, capped at the
    duration; its expected end is ``started_at + duration / speed``.

Confirmation (a new play starts when one of these holds for a track)
    * ``agree_matches`` (2) agreeing matches;
    * one *very confident* match (``confidence >= confident`` and
      ``score >= confident_score``): while another play is live, only if its
      timeline follows that play's expected end (a stray wrong match has a
      random offset; mid-play, a different track needs two agreeing matches),
      and not during music already found unknown (unmatched answers);
    * one match of the *predicted next track*: the track after the previous
      play on the same album (same album and album artist, same disc and
      track number + 1, or the next disc's track 1), at a speed consistent
      with it, whose timeline starts no earlier than ``predict_early_s``
      before the previous play's expected end and within
      ``predict_window_s`` of its end (flipping the record is allowed for).

Same track, same play
    While a play is live, every match of its track belongs to it: an agreeing
    one is published as ``updated``; one on another timeline (a looped tune
    matched at another repetition of the same bars, or a re-drop) keeps the
    play alive and is tallied on a side timeline, which replaces the play's
    own if more matches agree with it, or if as many do, the latest answer
    is on it and the play's own timeline has run out.  Only a timeline that
    begins where the play ends is the track played again (a new play).  A
    match of an ended play's track that agrees with it, or was captured
    before it ended, is a late echo and is ignored; the same track on a new
    timeline after its play ended is a new play (confirmed like any other).

Ends
    * ``silence``: the listener went idle (ended at the idle ``since``).  If
      a confident answer of another track, near that track's start, came
      after the play's last answer and nothing contradicted it before the
      silence, the play had been skipped to that track: it ends as
      ``next_track`` and that track's play is made (and ended by the
      silence);
    * ``next_track``: another track was confirmed (ended where it began);
    * ``duration``: ``duration_grace_s`` (10 s) after the expected end,
      ended at the expected end.  The grace is longer than a gap between
      tracks plus the first clip after it (~3.5 s), so an album side goes
      from one play to the next without an "unknown" in between;
    * ``unknown_music``: ``unknown_end_after`` unmatched answers in a row
      (while the listener plays) after the play's last match (0 disables).

    ``played_s`` counts from when the track was first heard (the needle
    drop, or the previous play's end) to ``ended_at``; ``played_through``
    is true when the position reached ``played_through`` (90 %) of the
    duration or the play ended by duration.

NowPlaying.state
    ``playing`` while a play is live; ``unknown`` once the listener plays
    music nobody recognises (``unknown_after`` unmatched answers in a row
    and no play confirmed, or a play ended by duration or as unknown music
    while the listener still plays: never an invented track); ``idle``
    otherwise (needle up, or music not identified yet).
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from dataclasses import dataclass, field

from .messages import ListenerState, MatchedTrack, MatchResult, MessageError, NowPlaying, Play, PlayEvent

# Defaults of the tunables (see Rules); bench/dedupe.py measures the trade-offs.
AGREE_MATCHES = 2
CONFIDENT = 0.95  # margin of 18 pairs over the matcher's threshold and 2x lead (score >= 32)
CONFIDENT_SCORE = 30
TIMELINE_TOL_S = 2.0
TIMELINE_TOL_REL = 0.004
SPEED_TOL = 0.03
PREDICT_EARLY_S = 10.0
PREDICT_WINDOW_S = 1200.0
DURATION_GRACE_S = 10.0
PLAYED_THROUGH = 0.9
UNKNOWN_AFTER = 2
UNKNOWN_END_AFTER = 3

_MAX_CANDIDATES = 32  # unconfirmed timelines kept per turntable
_MAX_EVIDENCE = 64  # matches kept per timeline (the oldest are dropped)
_ENDED_KEPT = 4  # ended plays remembered (late echoes, prediction)
_SEEN_CLIPS = 512  # clip ids remembered (QoS 1 may deliver twice)
_RESTORED_WEIGHT = 50.0  # weight of a restored play's timeline per match it had
_SLACK_S = 1.0  # clock slack between the listener's and the matcher's times
_FRESH_S = 30.0  # a skip drops the needle near a track's start (a stray's offset is anywhere)


@dataclass(frozen=True)
class Rules:
    """The tunables of play detection (defaults: the module constants)."""

    agree_matches: int = AGREE_MATCHES  # agreeing matches that confirm a track
    confident: float | None = CONFIDENT  # one match this confident confirms (None: never)
    confident_score: int = CONFIDENT_SCORE  # ... if its score is at least this
    predict: bool = True  # one match of the predicted next track confirms
    timeline_tol_s: float = TIMELINE_TOL_S
    timeline_tol_rel: float = TIMELINE_TOL_REL
    speed_tol: float = SPEED_TOL
    predict_early_s: float = PREDICT_EARLY_S  # the next track may start this much before the expected end
    predict_window_s: float = PREDICT_WINDOW_S  # ... and this long after the previous play's end
    duration_grace_s: float = DURATION_GRACE_S
    played_through: float = PLAYED_THROUGH
    unknown_after: int = UNKNOWN_AFTER  # unmatched answers in a row (no play): state unknown
    unknown_end_after: int = UNKNOWN_END_AFTER  # ... during a play: it ends as unknown_music (0: never)

    @classmethod
    def from_config(cls, section) -> Rules:
        """Rules from a config section with the same field names (missing ones: defaults)."""
        if section is None:
            return cls()
        values = {k: getattr(section, k) for k in cls.__dataclass_fields__ if hasattr(section, k)}
        return cls(**values)


class Output:
    """What a tracker call produced: events to publish in order, and the current state.

    ``now_playing`` is built when first read (a tick that changed nothing costs little)."""

    __slots__ = ("events", "changed", "_tracker", "_now", "_np")

    def __init__(self, events: list[PlayEvent], changed: bool, tracker: PlayTracker, now: float):
        self.events = events
        self.changed = changed  # now_playing differs from the last one returned: publish it (retained)
        self._tracker, self._now, self._np = tracker, now, None

    @property
    def now_playing(self) -> NowPlaying:
        if self._np is None:
            self._np = self._tracker.now_playing(self._now)
        return self._np


# --------------------------------------------------------------------------- albums


AlbumPos = tuple[tuple[str, str], int, int]  # ((album, album artist), disc, track number)


def album_pos(track: MatchedTrack) -> AlbumPos | None:
    """Where a track sits on its album, or None if its tags don't say."""
    if not track.album or track.track_number is None:
        return None
    key = (track.album.strip().casefold(), (track.album_artist or "").strip().casefold())
    return key, track.disc_number or 1, track.track_number


def next_positions(track: MatchedTrack) -> list[AlbumPos]:
    """The album positions that may follow ``track``: the next number, or the next disc's first."""
    pos = album_pos(track)
    if pos is None:
        return []
    key, disc, number = pos
    return [(key, disc, number + 1), (key, disc + 1, 1)]


class Catalog:
    """Tracks seen in matches, by album position (to name a predicted next track's id).

    May be shared by the trackers of several turntables (one library)."""

    def __init__(self) -> None:
        self._by_pos: dict[AlbumPos, MatchedTrack] = {}

    def learn(self, track: MatchedTrack) -> None:
        pos = album_pos(track)
        if pos is not None:
            self._by_pos[pos] = track

    def next_track(self, track: MatchedTrack) -> MatchedTrack | None:
        for pos in next_positions(track):
            found = self._by_pos.get(pos)
            if found is not None:
                return found
        return None

    def __len__(self) -> int:
        return len(self._by_pos)


# --------------------------------------------------------------------------- timelines


@dataclass(frozen=True)
class _Ev:
    """One matched answer, as evidence."""

    clip_id: str
    track: MatchedTrack
    captured_at: float
    offset_s: float
    speed: float
    confidence: float
    score: int

    @property
    def start(self) -> float:
        return self.captured_at - self.offset_s / self.speed

    @property
    def weight(self) -> float:
        return float(max(self.score, 1))


@dataclass
class _Timeline:
    """Agreeing matches of one track: when it started and at what speed."""

    track: MatchedTrack
    evs: list[_Ev] = field(default_factory=list)
    prior: tuple[float, float, float] | None = None  # (start, speed, weight) of a restored play
    prior_matches: int = 0
    start: float = 0.0
    speed: float = 1.0

    def add(self, ev: _Ev) -> None:
        self.evs.append(ev)
        if len(self.evs) > _MAX_EVIDENCE:
            del self.evs[0]
        self._fit()

    def _fit(self) -> None:
        w = sum(e.weight for e in self.evs)
        ws = sum(e.weight * e.speed for e in self.evs)
        if self.prior is not None:
            w += self.prior[2]
            ws += self.prior[2] * self.prior[1]
        self.speed = ws / w
        wt = sum(e.weight * (e.captured_at - e.offset_s / self.speed) for e in self.evs)
        if self.prior is not None:
            wt += self.prior[2] * self.prior[0]
        self.start = wt / w

    @property
    def count(self) -> int:
        return len(self.evs) + self.prior_matches

    @property
    def expected_end(self) -> float:
        return self.start + self.track.duration_s / self.speed

    @property
    def first_capture(self) -> float:
        return min((e.captured_at for e in self.evs), default=self.start)

    @property
    def last_capture(self) -> float:
        return max((e.captured_at for e in self.evs), default=self.start)

    def agrees(self, ev: _Ev, rules: Rules) -> bool:
        if ev.track.id != self.track.id:
            return False
        if abs(ev.speed / self.speed - 1.0) > rules.speed_tol:
            return False
        expected = (ev.captured_at - self.start) * self.speed
        return abs(ev.offset_s - expected) <= rules.timeline_tol_s + rules.timeline_tol_rel * abs(ev.offset_s)

    def position(self, at: float) -> float:
        return min(self.track.duration_s, max(0.0, (at - self.start) * self.speed))


def _timeline(ev: _Ev) -> _Timeline:
    tl = _Timeline(ev.track)
    tl.add(ev)
    return tl


@dataclass
class _Live:
    """The play in progress."""

    play_id: str
    tl: _Timeline
    heard_from: float  # when this track began to be heard
    last_capture: float  # latest capture that heard this track (any timeline)
    first_capture: float
    confidence: float
    alts: list[_Timeline] = field(default_factory=list)  # same track, other timelines
    unmatched: int = 0  # unmatched answers in a row since its last match
    unmatched_from: float | None = None
    next_track_id: int | None = None
    restored: bool = False  # resumed from a retained NowPlaying

    @property
    def track(self) -> MatchedTrack:
        return self.tl.track


@dataclass(frozen=True)
class _Ended:
    track: MatchedTrack
    tl: _Timeline
    ended_at: float
    reason: str


def _noisy_or(a: float, b: float) -> float:
    return 1.0 - (1.0 - a) * (1.0 - b)


# --------------------------------------------------------------------------- the tracker


class PlayTracker:
    """One turntable's plays, decided from its matches and listener state."""

    def __init__(self, listener: str, rules: Rules | None = None, catalog: Catalog | None = None):
        self.listener = listener
        self.rules = rules or Rules()
        self.catalog = catalog if catalog is not None else Catalog()
        self.play: _Live | None = None
        self.state: str = "idle"
        self.since: float | None = None
        self.listener_state: str | None = None  # None: never heard from the listener
        self.playing_since: float | None = None
        self.idle_since: float | None = None
        self.touched = False  # has seen a match (a restore would now come too late)
        self._ls_key: tuple[str, float] | None = None
        self._candidates: list[_Timeline] = []
        self._ended: deque[_Ended] = deque(maxlen=_ENDED_KEPT)
        self._seen: deque[str] = deque(maxlen=_SEEN_CLIPS)
        self._seen_set: set[str] = set()
        self._unmatched = 0
        self._unmatched_from: float | None = None
        self._unknown_music = False  # this stretch of music was heard and not recognised
        self._events: list[PlayEvent] = []
        self._dirty = True  # the first state is news

    # -- restore -----------------------------------------------------------------

    @classmethod
    def restore(cls, now_playing: NowPlaying, rules: Rules | None = None,
                catalog: Catalog | None = None) -> PlayTracker:
        """A tracker that resumes from its retained state (same play, no new ``started``)."""
        t = cls(now_playing.listener, rules, catalog)
        t.state, t.since = now_playing.state, now_playing.since
        p = now_playing.play
        if now_playing.state == "playing" and p is not None and p.ended_at is None and p.speed > 0:
            tl = _Timeline(p.track, prior=(p.started_at, p.speed, _RESTORED_WEIGHT * max(p.matches, 1)),
                           prior_matches=p.matches, start=p.started_at, speed=p.speed)
            heard = max(p.started_at, min(now_playing.since, p.updated_at))
            t.play = _Live(play_id=p.play_id, tl=tl, heard_from=heard, last_capture=max(heard, p.updated_at),
                           first_capture=heard, confidence=p.confidence, next_track_id=p.next_track_id,
                           restored=True)
            t.catalog.learn(p.track)
        elif now_playing.state == "playing":
            t.state = "idle"  # a playing state without a live play: nothing to resume
        t._dirty = False
        return t

    # -- inputs --------------------------------------------------------------------

    def on_match(self, m: MatchResult, now: float) -> Output:
        if m.listener != self.listener:
            raise MessageError(f"match for listener {m.listener!r} given to the tracker of {self.listener!r}")
        ev = None
        if m.matched:
            if m.track is None or m.offset_s is None:
                raise MessageError("MatchResult: matched without track or offset_s")
            speed = 1.0 if m.speed is None else m.speed
            if not (0.2 < speed < 5.0) or not math.isfinite(m.offset_s) or not math.isfinite(m.captured_at):
                raise MessageError(f"MatchResult: implausible speed {m.speed!r} or offset {m.offset_s!r}")
            if m.track.duration_s <= 0:
                raise MessageError(f"MatchResult: track duration {m.track.duration_s!r}")
            ev = _Ev(m.clip_id, m.track, m.captured_at, m.offset_s, speed, m.confidence, m.score)
        if m.clip_id in self._seen_set:  # a QoS 1 redelivery
            return self._output(now)
        self._remember(m.clip_id)
        self.touched = True
        self._advance(now)
        if ev is not None:
            self.catalog.learn(ev.track)
            self._evidence(ev, now)
        elif m.error is None:  # "could not identify at all" says nothing about the music
            self._no_match(m.captured_at, now)
        self._advance(now)
        return self._output(now)

    def on_listener(self, st: ListenerState, now: float) -> Output:
        if st.listener != self.listener:
            raise MessageError(f"state of listener {st.listener!r} given to the tracker of {self.listener!r}")
        key = (st.state, st.since)
        if key != self._ls_key:
            self._ls_key = key
            if st.state == "playing":
                p = self.play
                restored = self.listener_state is None and p is not None and p.restored
                if restored and st.since > p.last_capture + _SLACK_S:
                    # the turntable started again while we were down: the restored play ended unseen
                    self.idle_since = p.last_capture
                    self.listener_state = "idle"
                    self._advance(now)
                elif (self.listener_state == "playing" and self.playing_since is not None
                      and st.since > self.playing_since):
                    # a new session began without us seeing the idle in between
                    self.idle_since = st.since
                    self.listener_state = "idle"
                    self._advance(now)
                    if self.play is None:
                        self._set_state("idle", st.since)
                self.listener_state, self.playing_since = "playing", st.since
                self._unmatched, self._unmatched_from, self._unknown_music = 0, None, False
                p = self.play
                if p is not None and p.heard_from < st.since <= p.first_capture + _SLACK_S:
                    p.heard_from = st.since  # the needle dropped into the middle of it
                    self._set_state("playing", st.since)
            else:
                self.listener_state, self.idle_since = "idle", st.since
                self._unmatched, self._unmatched_from, self._unknown_music = 0, None, False
                self._advance(now)
                if self.play is None:
                    self._set_state("idle", st.since)
        self._advance(now)
        return self._output(now)

    def tick(self, now: float) -> Output:
        self._advance(now)
        return self._output(now)

    # -- state -------------------------------------------------------------------------

    def now_playing(self, now: float) -> NowPlaying:
        p = self.play
        since = self.since if self.since is not None else now
        return NowPlaying(listener=self.listener, state=self.state, since=round(since, 3),
                          play=self._snapshot(p, now) if p is not None else None, updated_at=round(now, 3))

    @property
    def candidates(self) -> int:
        return len(self._candidates)

    # -- the logic -------------------------------------------------------------------

    def _evidence(self, ev: _Ev, now: float) -> None:
        self._unmatched, self._unmatched_from = 0, None
        p = self.play
        if p is not None and ev.track.id == p.track.id and not (
            not p.tl.agrees(ev, self.rules) and ev.start >= p.tl.expected_end - self.rules.predict_early_s
        ):  # (a timeline that begins where this play ends is the track played again: a new play)
            p.unmatched, p.unmatched_from = 0, None
            p.last_capture = max(p.last_capture, ev.captured_at)
            if p.tl.agrees(ev, self.rules):
                p.tl.add(ev)
                p.confidence = _noisy_or(p.confidence, ev.confidence)
                self._emit("updated", p, now)
            else:
                self._side_timeline(p, ev, now)
            return
        for ended in self._ended:
            if ended.tl.agrees(ev, self.rules) or (
                ev.track.id == ended.track.id and ev.captured_at <= ended.ended_at + _SLACK_S
            ):
                return  # a late echo of a play that is over (perhaps at another repetition of a loop)
        tl = next((c for c in self._candidates if c.agrees(ev, self.rules)), None)
        if tl is None:
            tl = _timeline(ev)
            self._candidates.append(tl)
            if len(self._candidates) > _MAX_CANDIDATES:
                self._candidates.pop(0)
        else:
            tl.add(ev)
        if p is not None and tl.last_capture <= p.first_capture:
            self._candidates.remove(tl)  # heard before the current play: history, not news
            return
        if self._confirmed(tl, p):
            self._candidates.remove(tl)
            self._start(tl, now)
        self._prune(ev.captured_at)

    def _side_timeline(self, p: _Live, ev: _Ev, now: float) -> None:
        """Same track, another timeline: a loop matched at another repetition (or a re-drop)."""
        alt = next((a for a in p.alts if a.agrees(ev, self.rules)), None)
        if alt is None:
            p.alts.append(_timeline(ev))
            del p.alts[:-8]
            return
        alt.add(ev)
        if alt.count > p.tl.count:  # more matches agree with it: it is the track's real timeline
            p.alts.remove(alt)
            p.alts.append(p.tl)
            p.tl = alt
            self._emit("updated", p, now)

    def _confirmed(self, tl: _Timeline, p: _Live | None) -> bool:
        r = self.rules
        if tl.count >= r.agree_matches:
            return True
        # one confident answer is not enough mid-play, nor against a stretch of unrecognised music
        if p is not None:
            follows = tl.start >= p.tl.expected_end - r.predict_early_s
        else:
            follows = not self._unknown_music
        if r.confident is not None and follows and any(
            e.confidence >= r.confident and e.score >= r.confident_score for e in tl.evs
        ):
            return True
        return r.predict and self._predicted(tl, p)

    def _predicted(self, tl: _Timeline, p: _Live | None) -> bool:
        r = self.rules
        pos = album_pos(tl.track)
        if pos is None:
            return False
        if p is not None:
            prev_track, prev_tl, prev_end = p.track, p.tl, None
        elif self._ended:
            last = self._ended[-1]
            prev_track, prev_tl, prev_end = last.track, last.tl, last.ended_at
        else:
            return False
        if pos not in next_positions(prev_track):
            return False
        if abs(tl.speed / prev_tl.speed - 1.0) > r.speed_tol:
            return False
        if tl.start < prev_tl.expected_end - r.predict_early_s:
            return False
        return prev_end is None or tl.start <= prev_end + r.predict_window_s

    def _start(self, tl: _Timeline, now: float) -> None:
        p = self.play
        first = tl.first_capture
        if p is not None:
            # it ended where the new one began: between its last capture and the new one's first
            ended_at = min(max(min(tl.start, first), p.last_capture), p.tl.expected_end)
            self._end(p, max(ended_at, p.heard_from), "next_track", now)
            heard = max(tl.start, ended_at)
        else:
            heard = tl.start
            for bound in (self.playing_since if self.listener_state == "playing" else None,
                          self._ended[-1].ended_at if self._ended else None):
                if bound is not None and bound <= first + _SLACK_S:
                    heard = max(heard, bound)
        nxt = self.catalog.next_track(tl.track)
        self.play = _Live(
            play_id=uuid.uuid4().hex, tl=tl, heard_from=heard,
            last_capture=tl.last_capture, first_capture=first,
            confidence=1.0 - math.prod(1.0 - e.confidence for e in tl.evs),
            next_track_id=nxt.id if nxt is not None else None,
        )
        self._candidates = [c for c in self._candidates if c.last_capture > first]  # older ones are history
        self._unknown_music = False
        self._set_state("playing", heard)
        self._emit("started", self.play, now)

    def _no_match(self, captured_at: float, now: float) -> None:
        if self.listener_state == "idle" and self.idle_since is not None and captured_at < self.idle_since:
            return  # a late answer from before the needle was lifted
        p = self.play
        r = self.rules
        if p is not None:
            if captured_at <= p.last_capture:
                return
            p.unmatched += 1
            if p.unmatched_from is None:
                p.unmatched_from = captured_at
            if r.unknown_end_after and p.unmatched >= r.unknown_end_after and self.listener_state != "idle":
                at = min(max(p.unmatched_from, p.heard_from), p.tl.expected_end)
                self._end(p, at, "unknown_music", now)
                self._set_state("unknown", at)
                self._unknown_music = True
            return
        self._unmatched += 1
        if self._unmatched_from is None:
            self._unmatched_from = captured_at
        if self._unmatched >= r.unknown_after and self.listener_state != "idle":
            self._unknown_music = True
            if self.state != "unknown":
                self._set_state("unknown", self._unmatched_from)

    def _advance(self, now: float) -> None:
        """End the live play if the needle was lifted or its time is up."""
        p = self.play
        if p is None:
            return
        r = self.rules
        end = p.tl.expected_end
        idle = self.idle_since if self.listener_state == "idle" else None
        if idle is not None and idle >= p.heard_from - _SLACK_S and p.last_capture <= idle + _SLACK_S:
            q = self._successor(p, idle)
            if q is not None:  # it was skipped, and the next track lifted before a second answer
                self._candidates.remove(q)
                self._start(q, now)
                self._advance(now)
                return
            if idle <= end + r.duration_grace_s:
                at = max(min(idle, end), p.heard_from)
                self._end(p, at, "silence", now)
            else:
                self._end(p, end, "duration", now)
            self._set_state("idle", idle)
        elif now >= end + r.duration_grace_s:
            alt = max((a for a in p.alts if a.last_capture > p.tl.last_capture and a.count >= p.tl.count
                       and now < a.expected_end + r.duration_grace_s), key=lambda a: a.last_capture, default=None)
            if alt is not None:  # the latest answers put the track later: its timeline was a loop's echo
                p.alts.remove(alt)
                p.alts.append(p.tl)
                p.tl = alt
                self._emit("updated", p, now)
                return
            self._end(p, end, "duration", now)
            if self.listener_state == "idle" and self.idle_since is not None:
                self._set_state("idle", self.idle_since)
            else:
                self._set_state("unknown", end)

    def _successor(self, p: _Live, idle: float) -> _Timeline | None:
        """A confident answer of another track near its start, after the play's last answer and
        before the silence.

        Mid-play, one answer of another track waits for a second (it may be a stray, and a
        stray is followed by more answers of the play).  If the needle is lifted first, nothing
        contradicts it any more: the play was skipped to that track."""
        r = self.rules
        if r.confident is None:
            return None
        found = [c for c in self._candidates
                 if c.track.id != p.track.id and p.last_capture < c.first_capture and c.last_capture <= idle + _SLACK_S
                 and any(e.confidence >= r.confident and e.score >= r.confident_score and e.offset_s <= _FRESH_S
                         for e in c.evs)]
        return max(found, key=lambda c: c.first_capture, default=None)

    def _end(self, p: _Live, at: float, reason: str, now: float) -> None:
        r = self.rules
        reached = p.tl.position(at)
        through = reason == "duration" or reached >= r.played_through * p.track.duration_s
        nxt = self.catalog.next_track(p.track)
        if nxt is not None:
            p.next_track_id = nxt.id
        snap = self._snapshot(p, now)
        ended = snap.model_copy(update=dict(
            position_s=round(reached, 3), ended_at=round(at, 3), played_s=round(max(0.0, at - p.heard_from), 3),
            played_through=through, end_reason=reason,
        ))
        self._events.append(PlayEvent(event="ended", play=ended))
        self._ended.append(_Ended(p.track, p.tl, at, reason))
        self.play = None
        self._dirty = True

    def _prune(self, latest_capture: float) -> None:
        grace = self.rules.duration_grace_s
        self._candidates = [c for c in self._candidates if c.expected_end + grace >= latest_capture]

    # -- helpers -------------------------------------------------------------------------

    def _snapshot(self, p: _Live, now: float) -> Play:
        return Play(
            play_id=p.play_id, listener=self.listener, track=p.track, started_at=round(p.tl.start, 3),
            speed=round(p.tl.speed, 5), confidence=round(p.confidence, 6), position_s=round(p.tl.position(now), 3),
            updated_at=round(now, 3), matches=p.tl.count, next_track_id=p.next_track_id,
        )

    def _emit(self, kind: str, p: _Live, now: float) -> None:
        nxt = self.catalog.next_track(p.track)
        if nxt is not None:
            p.next_track_id = nxt.id
        self._events.append(PlayEvent(event=kind, play=self._snapshot(p, now)))
        self._dirty = True

    def _set_state(self, state: str, since: float) -> None:
        if state != self.state or since != self.since:
            self.state, self.since = state, since
            self._dirty = True

    def _remember(self, clip_id: str) -> None:
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(clip_id)
        self._seen_set.add(clip_id)

    def _output(self, now: float) -> Output:
        if self.since is None:
            self.since = now  # a new tracker: idle since it started
        events, self._events = self._events, []
        changed, self._dirty = self._dirty, False
        out = Output(events, changed, self, now)
        if changed:
            _ = out.now_playing  # the state as of this call, not of a later read
        return out


__all__ = ["AlbumPos", "Catalog", "Output", "PlayTracker", "Rules", "album_pos", "next_positions"]
