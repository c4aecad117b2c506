"""The in-memory index and the match: which track, where in it, at what speed.

The library's fingerprints are loaded once into a hash-addressed table (one
sorted array and a bucket offset table), so a query costs a few array lookups
and a vote, not a database round trip per hash. A match is then verified:
the matched pairs must lie on one straight line (query time -> track time,
whose slope is the playback speed) *and* be shifted in pitch by the same
speed. Random coincidences do neither, which is what lets us say "don't know"
instead of naming a wrong track.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import fingerprint as fp

# Speed hypotheses: a belt drive a few percent off, then the 33 1/3 <-> 45 mix-up.
RPM_FACTOR = 1.5  # the 33/45 search tries more hypotheses: more chances to fool it
HYPOTHESIS_STEP = 0.015
NORMAL_SPEEDS = (0.97, 0.985, 1.0, 1.015, 1.03)
RPM_33, RPM_45 = 100.0 / 3.0, 45.0
RPM_SPEEDS = tuple(r * s for r in (RPM_45 / RPM_33, RPM_33 / RPM_45) for s in (0.985, 1.0, 1.015))
# Most decks are within about 2 %: ask those hypotheses first, the rest only if
# nothing fits (with the 33/45 ones held to a higher standard).
SEARCH_PASSES = (((0.985, 1.0, 1.015), 1.0), ((0.97, 1.03), 1.0), (RPM_SPEEDS, RPM_FACTOR))

# How far a query peak may sit from where the library put it.
JITTER_P = 0.3  # log bins
JITTER_DP = 0.3  # log bins
JITTER_T = 0.4  # frames

MIN_BUCKET_CAP, BUCKET_CAP_FACTOR = 64, 16.0  # lookups into buckets fuller than this x typical are skipped
STOP_WORD_SHARE = 0.01  # ... unless the library is so large that 1 % of its tracks is more
# Entries one search pass may scan. A small library never gets near it; in a
# huge one the rarest cells are looked up first, so identify time stays bounded.
LOOKUP_BUDGET = 400_000

VOTE_BIN = 8  # frames of offset per vote bin (drift within a hypothesis step fits)
INLIER_FRAMES = 1.5  # residual from the fitted line that still counts

# Decision: a match needs this many consistent pairs and this lead over the
# best other track; below, the answer is "don't know".
MIN_INLIERS = 14
INLIERS_PER_TRIPLET = 0.004  # a longer clip asks more questions: more chances of a chance answer
MIN_LEAD = 2.0
MAX_TIME_SE = 0.02  # a real match pins the speed down; chance alignments do not
PITCH_ROUNDING = 0.01  # relative speed error of a pitch rounded to the nearest log bin


@dataclass(frozen=True)
class Match:
    """The answer for one clip; ``track_id`` is None when nothing matched."""

    track_id: int | None
    offset_s: float  # where in the track the clip starts
    speed: float  # measured playback speed (1.008 = 0.8 % fast)
    confidence: float  # 0..1
    score: int  # consistent pairs
    runner_up: int  # consistent pairs of the best other track
    query_pairs: int
    elapsed_ms: float

    @property
    def matched(self) -> bool:
        return self.track_id is not None

    @property
    def rpm_mistake(self) -> str | None:
        """'33 at 45' or '45 at 33' when the speed says the wrong rpm was chosen."""
        if self.track_id is None:
            return None
        if abs(self.speed / (RPM_45 / RPM_33) - 1) < 0.05:
            return "33 at 45"
        if abs(self.speed / (RPM_33 / RPM_45) - 1) < 0.05:
            return "45 at 33"
        return None


class Index:
    """Hash table over the fingerprints of many tracks, 5 bytes an entry and a
    bucket table of 2-4 bytes an entry (one 32-bit offset per 1-2 entries).

    All tracks sit on one global time axis (each starts where the previous
    one ended, plus a gap), so an entry is just (hash, global time) and the
    track is found from the track starts. Times are in
    1/TIME_UNITS frames, as the library stores them.
    """

    GAP = 64 * fp.TIME_UNITS  # between tracks, so no vote window spans two of them

    def __init__(self, track_ids: Sequence[int], prints: Sequence[fp.TrackPrints]):
        builder = IndexBuilder(sum(len(p.hashes) for p in prints))
        for track_id, p in zip(track_ids, prints):
            builder.add(track_id, p)
        builder.build_into(self)

    @classmethod
    def from_sorted(cls, track_ids, durations, track_starts, hashes, positions) -> Index:
        """An index from entries already sorted by hash (benchmarks build big ones)."""
        self = cls.__new__(cls)
        self._build(track_ids, durations, track_starts, hashes, positions)
        return self

    def _build(self, track_ids, durations, track_starts, hashes, positions) -> None:
        end = int(positions.max()) + 1 if len(positions) else 1  # once: a pass over every entry
        if end > 1 << 32:
            raise ValueError("library too large for 32-bit positions (about 9,500 hours)")
        self.track_ids = np.asarray(track_ids, dtype=np.int64)
        self.durations = np.asarray(durations, dtype=np.float64)
        self.track_starts = np.asarray(track_starts, dtype=np.int64)
        self.entry_pos = np.ascontiguousarray(positions, dtype=np.uint32)
        self._build_cells(end)
        # About one bucket per two entries, addressed by a hash's top bits; an
        # entry then keeps only the bits its bucket does not already say (one
        # byte from 16 M entries up), so a 50,000-track library fits in RAM.
        self.table_bits = int(np.clip(np.floor(np.log2(max(len(hashes), 1))), 16, 31))
        self.shift = np.uint32(32 - self.table_bits)
        self.low_mask = np.uint32((1 << int(self.shift)) - 1)
        low = np.uint8 if self.shift <= 8 else np.uint16 if self.shift <= 16 else np.uint32
        self.entry_low = np.empty(len(hashes), dtype=low)
        for a in range(0, len(hashes), _CHUNK):
            self.entry_low[a : a + _CHUNK] = hashes[a : a + _CHUNK] & self.low_mask
        self.bucket_start, sizes = _bucket_table(hashes, self.table_bits)
        # A bucket far fuller than average holds hashes that half the library
        # shares: they cost the most to vote on and tell the least (stop words).
        typical = _median_from_histogram(sizes)
        self.max_bucket = max(MIN_BUCKET_CAP, int(BUCKET_CAP_FACTOR * typical),
                              int(STOP_WORD_SHARE * len(self.track_ids)))

    def __len__(self) -> int:
        return len(self.track_ids)

    @property
    def entries(self) -> int:
        return len(self.entry_pos)

    @property
    def nbytes(self) -> int:
        return self.entry_low.nbytes + self.entry_pos.nbytes + self.bucket_start.nbytes

    def _lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(key index, entry index) for every stored entry with exactly that hash."""
        bucket = (keys >> self.shift).astype(np.int64)
        start = self.bucket_start[bucket].astype(np.int64)
        count = self.bucket_start[bucket + 1].astype(np.int64) - start
        count[count > self.max_bucket] = 0
        total = int(count.sum())
        if total > LOOKUP_BUDGET:
            order = np.argsort(count, kind="stable")
            count[order[np.cumsum(count[order]) > LOOKUP_BUDGET]] = 0
            total = int(count.sum())
        key_idx = np.repeat(np.arange(len(keys)), count)
        first = np.cumsum(count) - count
        entry = np.arange(total) - np.repeat(first - start, count)
        same = self.entry_low[entry] == (keys[key_idx] & self.low_mask)
        return key_idx[same], entry[same]

    def _locate(self, entry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(track index, frame in that track) of entries.

        A coarse table gives the last track starting before each cell of the
        time axis, and a step or two forward finds the right one: bisecting
        50,000 track starts per hit took a third of a big library's search.
        """
        pos = self.entry_pos[entry].astype(np.int64)
        track = self._cell_track[pos >> self._cell_bits]
        while len(track):
            step = self.track_starts[np.minimum(track + 1, len(self.track_starts) - 1)] <= pos
            step &= track + 1 < len(self.track_starts)
            if not step.any():
                break
            track += step
        return track, (pos - self.track_starts[track]) / fp.TIME_UNITS

    def _build_cells(self, end: int) -> None:
        """The coarse table _locate starts from: cells about half a track long."""
        lengths = np.diff(np.append(self.track_starts, end))
        typical = int(np.median(lengths)) if len(lengths) else 1
        self._cell_bits = max(int(typical).bit_length() - 2, 0)
        cells = np.arange((end >> self._cell_bits) + 1, dtype=np.int64) << self._cell_bits
        self._cell_track = np.maximum(np.searchsorted(self.track_starts, cells, side="right") - 1, 0)

    def match(self, x: np.ndarray) -> Match:
        """Identify mono SAMPLE_RATE audio; 33/45 is tried only if nothing fits."""
        t0 = time.perf_counter()
        pairs = fp.triplets(fp.find_peaks(x))
        need = MIN_INLIERS + INLIERS_PER_TRIPLET * len(pairs)
        best = None
        for speeds, factor in SEARCH_PASSES:
            found = self._search(pairs, speeds, factor * need)
            if best is None or found.track_id is not None or found.score > best.score:
                best = found
            if found.track_id is not None:
                break
        elapsed = (time.perf_counter() - t0) * 1000.0
        return Match(**{**best.__dict__, "elapsed_ms": elapsed})

    def _search(self, pairs: fp.Triplets, speeds: Sequence[float], min_inliers: float) -> Match:
        nothing = Match(None, 0.0, 1.0, 0.0, 0, 0, len(pairs), 0.0)
        if len(pairs) == 0 or self.entries == 0:
            return nothing
        keys, q, h, a_cell = _query_cells(pairs, speeds)
        key_idx, entry = self._lookup(keys)
        if len(entry) == 0:
            return nothing
        q, h, a_cell = q[key_idx], h[key_idx], a_cell[key_idx]
        track, frame = self._locate(entry)
        speed = np.asarray(speeds)[h]
        offset = frame - speed * pairs.ta[q]
        cands = _vote(track, h, offset, q, len(speeds))
        results = []
        for tr, hy, center in cands:
            sel = np.nonzero((track == tr) & (h == hy) & (np.abs(offset - center) <= VOTE_BIN))[0]
            fit = self._verify(pairs, sel, q, offset, a_cell, frame, center)
            results.append((tr, fit, fit.plausible(speeds)))
        results.sort(key=lambda r: -r[1].score)
        tr, fit, plausible = results[0]
        runner_up = max((f.score for t, f, _ in results if t != tr), default=0)
        ok = plausible and fit.score >= min_inliers and fit.score >= MIN_LEAD * runner_up
        return Match(
            track_id=int(self.track_ids[tr]) if ok else None,
            offset_s=fit.start / fp.FRAME_RATE,
            speed=fit.speed,
            confidence=_confidence(fit.score, runner_up, min_inliers) if plausible else 0.0,
            score=fit.score,
            runner_up=runner_up,
            query_pairs=len(pairs),
            elapsed_ms=0.0,
        )

    def _verify(self, pairs, sel, q, offset, a_cell, frame, center) -> _Fit:
        """Fit track time = start + speed * clip time to the candidate's hits."""
        if len(sel) < 3:
            return _NO_FIT
        # One hit per query triplet: the one nearest the vote's centre.
        sel = sel[np.argsort(np.abs(offset[sel] - center), kind="stable")]
        _, first = np.unique(q[sel], return_index=True)
        sel = sel[first]
        tq = pairs.ta[q[sel]].astype(np.float64)
        tr = frame[sel].astype(np.float64)
        inl = np.ones(len(sel), dtype=bool)
        slope, icpt = 1.0, center
        for _ in range(3):
            if inl.sum() < 3 or np.ptp(tq[inl]) < 1.0:
                return _NO_FIT
            slope, icpt = np.polyfit(tq[inl], tr[inl], 1)
            inl = np.abs(tr - (icpt + slope * tq)) <= INLIER_FRAMES
        score = int(inl.sum())
        # Triplets of one anchor share its times: precision comes from anchors.
        anchors = pairs.anchor[q[sel]]
        _, one = np.unique(np.where(inl, anchors, -1), return_index=True)
        one = one[inl[one]]
        n = len(one)
        if n < 3 or not (0.6 < slope < 1.6) or np.ptp(tq[one]) < 1.0:
            return _NO_FIT
        # Refit on the anchors that sit tightly on the line: the speed estimate
        # should not lean on peaks the opening or the noise has displaced.
        slope, icpt = np.polyfit(tq[one], tr[one], 1)
        res = tr[one] - (icpt + slope * tq[one])
        tight = np.abs(res) <= max(3.0 * 1.4826 * float(np.median(np.abs(res))), 0.25)
        if tight.sum() >= max(3, n // 2) and np.ptp(tq[one][tight]) >= 1.0:
            one, n = one[tight], int(tight.sum())
            slope, icpt = np.polyfit(tq[one], tr[one], 1)
            res = tr[one] - (icpt + slope * tq[one])
        spread = np.sqrt(np.sum((tq[one] - tq[one].mean()) ** 2))
        slope_se = max(np.sqrt(np.sum(res**2) / max(n - 2, 1)), 0.15) / spread
        # Pitch: every matched anchor is shifted by log2(speed) octaves.
        shift = pairs.pa[q[sel[one]]] - a_cell[sel[one]]
        pitch = 2.0 ** (float(np.mean(shift)) / fp.BINS_PER_OCTAVE)
        pitch_se = pitch * math.log(2) / fp.BINS_PER_OCTAVE * max(float(np.std(shift)), 0.29) / math.sqrt(n)
        return _Fit(score, float(slope), slope_se, float(icpt), pitch, pitch_se)


class IndexBuilder:
    """Builds an Index as tracks stream in from the store, one track's prints
    held at a time: (hash, position) pairs are packed into one 64-bit key,
    sorted in place and split, so loading 50,000 tracks peaks at about twice
    the entries' 8 bytes, not at the blobs + prints + argsort + copies it
    would take to concatenate and argsort them."""

    def __init__(self, entries: int):
        self._key = np.empty(max(entries, 0), dtype=np.uint64)
        self._n, self._end = 0, 0
        self._ids: list[int] = []
        self._durations: list[float] = []
        self._starts: list[int] = []

    def add(self, track_id: int, prints: fp.TrackPrints) -> None:
        n = len(prints.hashes)
        length = int(prints.times.max()) + 1 if n else 0
        if self._end + length >= 1 << 32:
            raise ValueError("library too large for 32-bit positions (about 9,500 hours)")
        if self._n + n > len(self._key):  # more than announced (the store grew meanwhile)
            self._key = np.resize(self._key, max(self._n + n, len(self._key) + len(self._key) // 8))
        key = self._key[self._n : self._n + n]
        np.left_shift(prints.hashes.astype(np.uint64), np.uint64(32), out=key)
        key |= prints.times.astype(np.uint64) + np.uint64(self._end)
        self._ids.append(track_id)
        self._durations.append(prints.duration_s)
        self._starts.append(self._end)
        self._n += n
        self._end += length + Index.GAP

    def build(self) -> Index:
        index = Index.__new__(Index)
        self.build_into(index)
        return index

    def build_into(self, index: Index) -> None:
        key, self._key = self._key[: self._n], np.empty(0, dtype=np.uint64)
        key.sort()
        hashes = np.empty(len(key), dtype=np.uint32)
        pos = np.empty(len(key), dtype=np.uint32)
        for a in range(0, len(key), _CHUNK):
            k = key[a : a + _CHUNK]
            hashes[a : a + len(k)] = k >> np.uint64(32)
            pos[a : a + len(k)] = k & np.uint64(0xFFFFFFFF)
        del key
        index._build(self._ids, self._durations, np.asarray(self._starts, dtype=np.int64), hashes, pos)


@dataclass(frozen=True)
class _Fit:
    """A candidate's line: track frame = start + time_speed * clip frame."""

    score: int
    time_speed: float
    time_se: float
    start: float
    pitch_speed: float
    pitch_se: float

    @property
    def agrees(self) -> bool:
        """Time stretch and pitch shift tell the same speed, as only real playback does.

        The library keeps pitch to the nearest log bin, and notes on a scale all
        round the same way, so pitch may be off by up to half a bin (~1 %)."""
        gap = abs(self.time_speed - self.pitch_speed)
        return self.score > 0 and gap <= 3.0 * math.hypot(self.time_se, self.pitch_se) + PITCH_ROUNDING

    def plausible(self, speeds: Sequence[float]) -> bool:
        """Well determined, speeds agree, and inside the range that was searched."""
        near = min(abs(self.time_speed / s - 1) for s in speeds)
        inside = near <= HYPOTHESIS_STEP / 2 + 3 * self.time_se
        return self.agrees and self.time_se <= MAX_TIME_SE and inside

    @property
    def speed(self) -> float:
        """The time stretch: unbiased, unlike the rounded pitch."""
        return self.time_speed


_NO_FIT = _Fit(0, 1.0, 1.0, 0.0, 1.0, 1.0)


_CHUNK = 1 << 24  # entries per step when building: temporaries stay small


def _bucket_table(hashes: np.ndarray, bits: int, chunk: int = _CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(first entry of each bucket, plus the end; histogram of non-empty bucket sizes).

    Counted a slice of buckets at a time, so no temporary is the size of the
    table: at 50,000 tracks one would be 8 GB.
    """
    shift, n_buckets = 32 - bits, 1 << bits
    dtype = np.uint32 if len(hashes) < (1 << 32) else np.int64
    start = np.empty(n_buckets + 1, dtype=dtype)
    start[-1] = len(hashes)
    step = min(n_buckets, chunk)
    firsts = np.arange(0, n_buckets, step, dtype=np.uint64) << np.uint64(shift)
    bounds = np.append(np.searchsorted(hashes, firsts.astype(np.uint32)), len(hashes))
    sizes = np.zeros(1, dtype=np.int64)
    for k, b0 in enumerate(range(0, n_buckets, step)):
        e0, e1 = int(bounds[k]), int(bounds[k + 1])
        counts = np.bincount((hashes[e0:e1] >> np.uint32(shift)) - np.uint32(b0), minlength=step)
        start[b0 : b0 + step] = e0 + np.cumsum(counts) - counts
        h = np.bincount(counts)
        sizes = np.pad(sizes, (0, max(len(h) - len(sizes), 0)))
        sizes[: len(h)] += h
    sizes[0] = 0
    return start, sizes


def _median_from_histogram(hist: np.ndarray) -> float:
    """Median of the values a histogram counts (1.0 if it counts none)."""
    total = int(hist.sum())
    if total == 0:
        return 1.0
    return float(np.searchsorted(np.cumsum(hist), (total + 1) // 2))


def _query_cells(tr: fp.Triplets, speeds: Sequence[float]):
    """Every hash cell each triplet may occupy under each speed hypothesis.

    Rows are (hypothesis, triplet) pairs. Built one field at a time, dropping
    impossible cells as it goes: the full cartesian grid would be eight times
    larger than what survives.
    """
    n = len(tr)
    speed = np.repeat(np.asarray(speeds, dtype=np.float64), n)
    pa = np.tile(tr.pa, len(speeds)) - fp.BINS_PER_OCTAVE * np.log2(speed)
    t1, t2 = np.tile(tr.t1, len(speeds)) * speed, np.tile(tr.t2, len(speeds)) * speed
    tol_speed_p = fp.BINS_PER_OCTAVE * math.log2(1 + HYPOTHESIS_STEP / 2)
    row = np.arange(len(pa))
    row, key, a_cell = _expand(row, np.zeros(len(row), np.uint64), _cells(pa, JITTER_P + tol_speed_p, 0), keep=True)
    for cells in (
        _cells(np.tile(tr.d1, len(speeds)), JITTER_DP, 1),
        _cells(t1, JITTER_T + t1 * HYPOTHESIS_STEP / 2, 2),
        _cells(np.tile(tr.d2, len(speeds)), JITTER_DP, 3),
        _cells(t2, JITTER_T + t2 * HYPOTHESIS_STEP / 2, 4),
    ):
        sel, key, _ = _expand(row, key, cells)
        row, a_cell = row[sel], a_cell[sel]
    h, q = np.divmod(row, n)
    return fp.mix(key), q, h, a_cell.astype(np.float32)


def _expand(q, key, cells, keep=False):
    """Each row once per valid cell of its triplet: (rows or q, key, cell)."""
    bits, valid, raw = cells
    v = valid[q]
    rows = np.repeat(np.arange(len(q)), v.sum(axis=1))
    key = key[rows] | bits[q][v]
    if keep:
        return q[rows], key, raw[q][v]
    return rows, key, None


def _cells(v: np.ndarray, tol, field: int):
    """Cells within +-tol of v as (key bits, valid mask, cell value), each (n, k)."""
    lo = np.ceil(v - tol - 0.5).astype(np.int64)
    hi = np.floor(v + tol + 0.5).astype(np.int64)
    width = int((hi - lo).max()) + 1 if len(v) else 1
    c = lo[:, None] + np.arange(max(width, 1))[None, :]
    _, _, lowest, highest = fp.CELLS[field]
    valid = (c <= hi[:, None]) & (c >= lowest) & (c <= highest)
    return fp.cell_bits(field, np.where(valid, c, lowest)), valid, c


def _vote(track, h, offset, q, n_hyp, top=4):
    """Best (track, hypothesis, offset) candidates by distinct pairs per bin.

    Counted by sorting one packed integer per hit: np.unique's hash-set path
    (numpy >= 2.3) is many times slower, and a big library's hit list is long.
    """
    q_bits = max(int(q.max()).bit_length(), 1)
    if int(track.max()) * n_hyp >= 1 << (63 - _BIN_BITS - q_bits):
        raise ValueError("too many tracks to pack a vote key")
    group = track.astype(np.int64) * n_hyp + h
    best = {}
    for shift in (0.0, 0.5):
        b = np.floor(offset / VOTE_BIN + shift).astype(np.int64) + _BIN_BIAS
        packed = np.sort((((group << _BIN_BITS) | b) << q_bits) | q)
        # Distinct query pairs per key: a pair hitting one bin twice votes once.
        keys = packed[np.concatenate(([True], packed[1:] != packed[:-1]))] >> q_bits
        first = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        kk, counts = keys[first], np.diff(np.append(first, len(keys)))
        for i in np.argsort(-counts, kind="stable")[: top * 2]:
            k = int(kk[i])
            tr, hy = divmod(k >> _BIN_BITS, n_hyp)
            center = ((k & (1 << _BIN_BITS) - 1) - _BIN_BIAS - shift + 0.5) * VOTE_BIN
            cur = best.get((tr, hy))
            if cur is None or counts[i] > cur[0]:
                best[(tr, hy)] = (int(counts[i]), center)
    ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:top]
    return [(tr, hy, center) for (tr, hy), (_, center) in ranked]


# Vote bins in a packed key: offsets from -2^21 to 2^21 bins of VOTE_BIN frames
# (about 150 hours either way) fit.
_BIN_BITS = 22
_BIN_BIAS = 1 << (_BIN_BITS - 1)


def _confidence(score: int, runner_up: int, min_inliers: float) -> float:
    """Monotone in evidence and lead over the runner-up; 0.5 at the decision threshold."""
    margin = min(score - min_inliers, score - MIN_LEAD * runner_up)
    return float(1.0 / (1.0 + math.exp(-margin / 6.0)))
