"""Is the record playing?  Levels, a music/silence gate, and when to send clips.

Pure logic, no I/O, no clocks: everything is driven by blocks of float32 mono
samples and their sample index (the listener's clock is the sample count, so
the same audio gives the same decisions however fast it arrives).

Level
    :class:`LevelMeter` measures each block's RMS and peak (dBFS, floored at
    -120) and, over a sliding window (300 ms), the true RMS and a *robust
    level*: the median of the 10 ms sub-block levels in the window.  A dust
    click or a pop lights up one or two 10 ms sub-blocks, so lead-in crackle
    on a silent groove (peaks of -10 dBFS over a -70 dBFS floor) leaves the
    median at the floor, while music, which fills every sub-block, moves it.
    The median describes the middle of its window, so decisions come
    ``window / 2`` late but are dated ``window / 2`` back.

Gate
    :class:`Gate` turns the robust level into ``idle``/``playing`` with
    hysteresis: playing after ``attack_s`` above ``threshold_db``; idle after
    ``release_s`` below ``threshold_db - hysteresis_db``; anything else holds.
    A silence of at least ``gap_s`` (1 s) but shorter than ``release_s``,
    followed by music, is the gap between two tracks: event ``gap_end``.

Clips
    :class:`ClipScheduler` keeps the last ``clip.seconds`` of audio and says
    when a clip is due: ``first_after_s`` after the needle drop
    (``needle_drop``) or after a gap (``after_gap``), then every
    ``recheck_s`` while playing (``recheck``).  A first clip after a needle
    drop or gap starts where the music did (minus a short pre-roll), and no
    clip reaches back past that point, so clips carry no lead-in groove and
    none of the previous track.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np

from .pcm import resample
from .config import ClipConfig, GateConfig

__all__ = [
    "DB_FLOOR",
    "Clip",
    "ClipScheduler",
    "Event",
    "Gate",
    "LevelMeter",
    "dbfs",
    "downsample",
]

DB_FLOOR = -120.0
_MS_FLOOR = 10.0 ** (DB_FLOOR / 10.0)  # mean square at the floor

GateState = Literal["idle", "playing"]
EventKind = Literal["playing", "idle", "gap_end"]


class Event(NamedTuple):
    kind: EventKind
    index: int  # sample index the change is dated to


def dbfs(mean_square: float) -> float:
    """Mean square (full scale = 1.0) -> dBFS, floored at -120."""
    return 10.0 * math.log10(mean_square) if mean_square > _MS_FLOOR else DB_FLOOR


class LevelMeter:
    """Per-block RMS/peak and windowed RMS / robust level, in dBFS."""

    def __init__(self, rate: int, window_s: float = 0.3, sub_s: float = 0.01) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if not (0 < sub_s <= window_s):
            raise ValueError("need 0 < sub_s <= window_s")
        self.rate = rate
        self.sub = max(1, int(round(rate * sub_s)))  # samples per sub-block
        self.nsub = max(1, int(round(window_s / sub_s)))  # sub-blocks per window
        self.window = self.sub * self.nsub  # samples per window
        self._ms = np.zeros(self.nsub)  # mean square per sub-block (ring)
        self._pos = 0
        self._filled = 0
        self._part_sum = 0.0
        self._part_n = 0
        self.rms_dbfs = DB_FLOOR  # last block
        self.peak_dbfs = DB_FLOOR  # last block
        self.smoothed_rms_dbfs = DB_FLOOR  # true RMS over the window
        self.level_dbfs = DB_FLOOR  # median of sub-block levels over the window

    def _push(self, ms: np.ndarray) -> None:
        m = len(ms)
        if m >= self.nsub:
            self._ms[:] = ms[-self.nsub :]
            self._pos = 0
            self._filled = self.nsub
            return
        k = min(m, self.nsub - self._pos)
        self._ms[self._pos : self._pos + k] = ms[:k]
        if m > k:
            self._ms[: m - k] = ms[k:]
        self._pos = (self._pos + m) % self.nsub
        self._filled = min(self.nsub, self._filled + m)

    def update(self, samples: np.ndarray) -> None:
        x = np.asarray(samples, dtype=np.float32)
        n = len(x)
        if n == 0:
            return
        peak = max(float(x.max()), -float(x.min()))
        self.peak_dbfs = 20.0 * math.log10(peak) if peak > 1e-6 else DB_FLOOR
        x2 = np.square(x, dtype=np.float64)
        self.rms_dbfs = dbfs(float(x2.sum()) / n)

        i = 0
        sub = self.sub
        if self._part_n:
            take = min(sub - self._part_n, n)
            self._part_sum += float(x2[:take].sum())
            self._part_n += take
            i = take
            if self._part_n == sub:
                self._push(np.array([self._part_sum / sub]))
                self._part_sum, self._part_n = 0.0, 0
        m = (n - i) // sub
        if m:
            self._push(x2[i : i + m * sub].reshape(m, sub).mean(axis=1))
            i += m * sub
        if i < n:
            self._part_sum += float(x2[i:].sum())
            self._part_n += n - i

        f = self._filled
        if f:
            ms = self._ms if f == self.nsub else self._ms[:f]
            self.smoothed_rms_dbfs = dbfs(float(ms.sum()) / f)
            # median (the upper one for an even count); it commutes with log
            self.level_dbfs = dbfs(float(np.sort(ms)[f // 2]))

    def reset(self) -> None:
        self.__init__(self.rate, self.window / self.rate, self.sub / self.rate)


class Gate:
    """Music/silence state with attack, release and hysteresis; gap detection.

    Feed every block in order: ``events = gate.update(samples, index)``.
    Events are ``Event(kind, index)`` tuples (``("playing", i)``,
    ``("idle", i)``, ``("gap_end", i)``), the index dated to where the
    change happened in the audio (start of the music / of the silence),
    which is earlier than the block that reports it by the attack, the
    release, or ``window / 2``."""

    def __init__(
        self,
        cfg: GateConfig,
        rate: int,
        *,
        gap_s: float = 1.0,
        window_s: float = 0.3,
    ) -> None:
        self.cfg = cfg
        self.rate = rate
        self.meter = LevelMeter(rate, window_s)
        self.delay = self.meter.window // 2  # the median's group delay (samples)
        self.attack = int(round(cfg.attack_s * rate))
        self.release = int(round(cfg.release_s * rate))
        # a gap must be shorter than the release to be seen at all
        self.gap = int(round(min(gap_s, 0.5 * cfg.release_s) * rate))
        self.threshold_db = cfg.threshold_db
        self.silence_db = cfg.threshold_db - cfg.hysteresis_db
        self.state: GateState = "idle"
        self.since_index = 0
        self._run_start: int | None = None  # idle: start of the loud run
        self._quiet_start: int | None = None  # playing: start of the silent run
        self._gap_pending = False  # playing: a gap-long silence ended, music not yet back
        self._end = 0

    # levels of the last block / window
    @property
    def rms_dbfs(self) -> float:
        """True RMS over the last window (300 ms)."""
        return self.meter.smoothed_rms_dbfs

    @property
    def peak_dbfs(self) -> float:
        """Peak of the last block."""
        return self.meter.peak_dbfs

    @property
    def level_dbfs(self) -> float:
        """The robust level the gate decides on (median of 10 ms levels)."""
        return self.meter.level_dbfs

    @property
    def playing(self) -> bool:
        return self.state == "playing"

    def update(self, samples: np.ndarray, index: int) -> list[Event]:
        n = len(samples)
        if n == 0:
            return []
        self.meter.update(samples)
        end = index + n
        self._end = end
        # the sample the current (median) level describes
        t = max(end - self.delay, self.since_index, 0)
        level = self.meter.level_dbfs
        events: list[Event] = []

        if self.state == "idle":
            if level > self.threshold_db:
                if self._run_start is None:
                    self._run_start = t
                if end - self._run_start >= self.attack:
                    self.state = "playing"
                    self.since_index = self._run_start
                    self._run_start = None
                    self._quiet_start = None
                    self._gap_pending = False
                    events.append(Event("playing", self.since_index))
            else:
                self._run_start = None
            return events

        # playing
        if level < self.silence_db:
            if self._quiet_start is None:
                self._quiet_start = t
            if end - self._quiet_start >= self.release:
                self.state = "idle"
                self.since_index = self._quiet_start
                self._quiet_start = None
                self._gap_pending = False
                self._run_start = None
                events.append(Event("idle", self.since_index))
            return events

        if self._quiet_start is not None:
            if t - self._quiet_start >= self.gap:
                self._gap_pending = True
            self._quiet_start = None
        if self._gap_pending and level > self.threshold_db:
            self._gap_pending = False
            events.append(Event("gap_end", t))
        return events


class Clip(NamedTuple):
    reason: Literal["needle_drop", "recheck", "after_gap"]
    samples: np.ndarray  # float32 mono at the capture rate
    start: int  # sample index of samples[0]


class ClipScheduler:
    """Ring buffer of the last ``cfg.seconds`` and the clip timetable.

    Feed every block in order, with the gate's events for that block::

        events = gate.update(block.samples, block.index)
        for clip in scheduler.feed(block.samples, block.index, events):
            pcm = downsample(clip.samples, rate, cfg.clip.rate)
    """

    def __init__(self, cfg: ClipConfig, rate: int, *, preroll_s: float = 0.25) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.cfg = cfg
        self.rate = rate
        self.capacity = int(math.ceil(cfg.seconds * rate))
        self.first_after = int(round(cfg.first_after_s * rate))
        self.recheck = int(round(cfg.recheck_s * rate))
        self.preroll = int(round(preroll_s * rate))
        self._ring = np.zeros(self.capacity, dtype=np.float32)
        self._end = 0  # index one past the newest sample
        self._valid_from = 0  # oldest index the ring holds real audio for
        self.playing = False
        self.due: int | None = None  # index at which the next clip is due
        self.reason: str | None = None
        self._floor: int | None = None  # where this track's music began: clips start no earlier

    @property
    def end(self) -> int:
        return self._end

    def _write(self, x: np.ndarray, index: int) -> None:
        if index != self._end:  # discontinuity (first block, or a skipped stretch)
            self._valid_from = index
        cap = self.capacity
        n = len(x)
        if n >= cap:
            x = x[-cap:]
            index += n - cap
            n = cap
        p = index % cap
        k = min(n, cap - p)
        self._ring[p : p + k] = x[:k]
        if n > k:
            self._ring[: n - k] = x[k:]
        self._end = index + n
        self._valid_from = max(self._valid_from, self._end - cap)

    def audio(self, start: int, end: int | None = None) -> np.ndarray:
        """Copy of the buffered samples [start, end) (clamped to what is held)."""
        end = self._end if end is None else min(end, self._end)
        start = max(start, self._valid_from, end - self.capacity)
        if end <= start:
            return np.zeros(0, dtype=np.float32)
        cap = self.capacity
        p, q = start % cap, end % cap
        if p < q or q == 0:
            return self._ring[p : (q or cap)].copy()
        return np.concatenate((self._ring[p:], self._ring[:q]))

    def feed(self, samples: np.ndarray, index: int, events=()) -> list[Clip]:
        x = np.asarray(samples, dtype=np.float32)
        if len(x):
            self._write(x, index)
        for kind, i in events:
            if kind == "playing":
                self.playing = True
                self.due, self.reason, self._floor = i + self.first_after, "needle_drop", i
            elif kind == "gap_end":
                self.playing = True
                self.due, self.reason, self._floor = i + self.first_after, "after_gap", i
            elif kind == "idle":
                self.playing = False
                self.due = self.reason = self._floor = None
        clips: list[Clip] = []
        if self.playing and self.due is not None and self._end >= self.due:
            start = self._end - self.capacity
            if self._floor is not None:
                start = max(start, self._floor - self.preroll)
            start = max(start, self._valid_from)
            clips.append(Clip(self.reason, self.audio(start), start))  # type: ignore[arg-type]
            self.due, self.reason = self._end + self.recheck, "recheck"
        return clips

    def request(self, reason: Literal["needle_drop", "recheck", "after_gap"] = "recheck") -> None:
        """Make a clip due with the next block (e.g. a matcher came back online)."""
        if self.playing:
            self.due, self.reason = self._end, reason


def downsample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """float32 mono at ``to_rate`` (soxr via :func:`vinyl_mqtt.audio.resample`)."""
    return resample(np.asarray(samples, dtype=np.float32), from_rate, to_rate)
