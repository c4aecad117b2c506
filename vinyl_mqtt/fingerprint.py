"""Landmark fingerprints that survive a turntable.

A turntable running at speed ``s`` moves every spectral peak from (t, f) to
(t/s, f*s). On a *log-frequency* axis that is a plain shift of log2(s), and on
the time axis a plain scaling: so peaks are picked on a log-frequency
spectrogram (the same peaks are found whatever the speed), and each triplet
of peaks (an anchor and two targets after it) is hashed from numbers whose
dependence on speed is known exactly:

* the anchor's log-frequency ``pa``  (shifts by log2(s)),
* the log-frequency steps ``d1``, ``d2`` to the targets (do not change at all),
* the time steps ``t1``, ``t2`` to the targets (scale by 1/s).

Library files store each triplet once, quantised. A query clip is looked up
under a few speed hypotheses: it corrects ``pa`` and the time steps for the
hypothesis and asks for every cell its continuous values could fall in, within
the jitter of peak positions and half the hypothesis step. The hits then vote for a
(track, speed, offset) and the winner is verified by regression (see
:mod:`vinyl_mqtt.matcher`), which also measures the real playback speed.

Library files and captured clips go through exactly the same code below, after
:func:`prepare` brings any rate and channel count to mono at SAMPLE_RATE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.sparse
from scipy import ndimage

from .pcm import resample

SAMPLE_RATE = 8000
N_FFT = 1024
HOP = 256
FRAME_RATE = SAMPLE_RATE / HOP  # frames per second (31.25)

# Log-frequency axis: a speed error is a shift along it.
F_MIN = 150.0  # below: rumble, hum and room modes
F_MAX = 3800.0  # below Nyquist; cartridges and mics keep this band
BINS_PER_OCTAVE = 36
N_BINS = int(np.floor(BINS_PER_OCTAVE * np.log2(F_MAX / F_MIN))) + 1

# Peak picking.
PEAK_DT = 3  # a peak is the maximum of +-PEAK_DT frames ...
PEAK_DF = 6  # ... and +-PEAK_DF log bins (1/6 octave) around it
PEAKS_PER_SECOND = 24  # density cap: index size and query time follow it
MIN_PROMINENCE = 1.0  # natural-log power above the frame's median (~4.3 dB)

# Each anchor makes a triplet with every two of the first TARGETS peaks in its zone.
TARGETS = 4
DT_MIN, DT_MAX = 2, 40  # frames (64 ms .. 1.28 s)
DP_MIN, DP_MAX = 2, 54  # log bins: not the same note, at most 1.5 octaves away

# Cells: anchor bin (8 bits), two pitch steps (7 bits each), two time steps (6 bits each).
assert N_BINS <= 256 and 2 * DP_MAX < 128 and DT_MAX < 64


@dataclass(frozen=True)
class Peaks:
    """Spectral peaks with sub-bin positions (frames, log bins)."""

    t: np.ndarray  # float32 frame position
    p: np.ndarray  # float32 log-frequency bin position
    duration_s: float

    def __len__(self) -> int:
        return len(self.t)


@dataclass(frozen=True)
class Triplets:
    """Anchor with two targets, in continuous coordinates."""

    anchor: np.ndarray  # index of the anchor peak (several triplets share one)
    ta: np.ndarray  # float32 anchor frame
    pa: np.ndarray  # float32 anchor log bin
    d1: np.ndarray  # first target - anchor, log bins
    t1: np.ndarray  # first target - anchor, frames
    d2: np.ndarray  # second target - anchor, log bins
    t2: np.ndarray  # second target - anchor, frames

    def __len__(self) -> int:
        return len(self.ta)


def prepare(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 at SAMPLE_RATE from any rate: the one entry for files and clips."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    if rate != SAMPLE_RATE:
        x = resample(x, rate, SAMPLE_RATE)
    return x


def _log_filterbank() -> tuple[int, int, np.ndarray]:
    """Triangular weights from linear FFT bins to log bins (min width one FFT bin)."""
    df = SAMPLE_RATE / N_FFT
    centers = F_MIN * 2.0 ** (np.arange(N_BINS) / BINS_PER_OCTAVE)
    half = np.maximum(centers * (2.0 ** (1.0 / BINS_PER_OCTAVE) - 1.0), df)
    lo = int(np.floor((centers[0] - half[0]) / df))
    hi = int(np.ceil((centers[-1] + half[-1]) / df)) + 1
    freqs = np.arange(lo, hi) * df
    w = np.maximum(0.0, 1.0 - np.abs(freqs[:, None] - centers[None, :]) / half[None, :])
    w /= w.sum(axis=0, keepdims=True)
    # Sparse: each log bin spans a few FFT bins; dense BLAS was 30x slower here.
    return lo, hi, scipy.sparse.csc_array(w.astype(np.float32))


_FB_LO, _FB_HI, _FB = _log_filterbank()
_WINDOW = np.hanning(N_FFT + 1)[:-1].astype(np.float32)


def spectrogram(x: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Log power on the log-frequency axis, shape (frames, N_BINS), float32."""
    n = 1 + (len(x) - N_FFT) // HOP if len(x) >= N_FFT else 0
    out = np.empty((n, N_BINS), dtype=np.float32)
    if n == 0:  # shorter than one window: nothing to hear
        return out
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP]
    for s in range(0, n, chunk):
        spec = scipy.fft.rfft(frames[s : s + chunk] * _WINDOW, axis=1)[:, _FB_LO:_FB_HI]
        power = spec.real**2 + spec.imag**2
        np.log(power @ _FB + np.float32(1e-10), out=out[s : s + chunk])
    return out


def _declick(s: np.ndarray) -> np.ndarray:
    """Grey opening along time: removes anything shorter than 3 frames.

    A crackle or pop is broadband and lasts one or two frames; left in, it makes
    a column of false peaks and hides the real ones next to it. Notes last longer.
    """
    if len(s) < 3:
        return s
    e = s.copy()
    np.minimum(e[1:], s[:-1], out=e[1:])
    np.minimum(e[:-1], s[1:], out=e[:-1])
    o = e.copy()
    np.maximum(o[1:], e[:-1], out=o[1:])
    np.maximum(o[:-1], e[1:], out=o[:-1])
    return o


def find_peaks(x: np.ndarray) -> Peaks:
    """Peaks of the spectrogram of mono SAMPLE_RATE audio, density-capped."""
    raw = spectrogram(x)
    s = _declick(raw)
    duration = len(x) / SAMPLE_RATE
    if len(s) < 3:
        return Peaks(np.zeros(0, np.float32), np.zeros(0, np.float32), duration)
    local_max = ndimage.maximum_filter(
        s, size=(2 * PEAK_DT + 1, 2 * PEAK_DF + 1), mode="constant", cval=-np.inf
    )
    floor = np.median(s, axis=1, keepdims=True) + MIN_PROMINENCE
    loud = s.max() - 11.5  # 50 dB below the loudest point: silence has no peaks
    cand = (s == local_max) & (s > floor) & (s > loud)
    # A held note is a plateau after the opening: keep only where it starts.
    cand[1:] &= s[1:] > s[:-1]
    cand[0] = cand[-1] = False
    cand[:, 0] = cand[:, -1] = False
    t, p = np.nonzero(cand)
    prominence = s[t, p] - floor[t, 0]
    # Keep the most prominent PEAKS_PER_SECOND in each one-second window.
    per_window = int(round(FRAME_RATE))
    window = t // per_window
    order = np.lexsort((-prominence, window))
    t, p, window = t[order], p[order], window[order]
    first = np.searchsorted(window, window, side="left")
    keep = (np.arange(len(t)) - first) < PEAKS_PER_SECOND
    t, p = t[keep], p[keep]
    # Sub-bin positions by parabolic interpolation in each direction.
    pf = _parabolic(s[t, p - 1], s[t, p], s[t, p + 1])
    tf = _parabolic(raw[t - 1, p], raw[t, p], raw[t + 1, p])
    tt = (t + tf).astype(np.float32)
    pp = (p + pf).astype(np.float32)
    order = np.lexsort((pp, tt))
    return Peaks(tt[order], pp[order], duration)


def _parabolic(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    den = a - 2.0 * b + c
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(den < 0, 0.5 * (a - c) / den, 0.0)
    return np.clip(d, -0.5, 0.5)


def triplets(peaks: Peaks, dt_max: float = DT_MAX, lookahead: int = 48) -> Triplets:
    """Anchor + two of its first TARGETS peaks in the target zone.

    A pair of peaks carries too little information once music's own regularity
    (notes on a scale, beats on a grid) is accounted for; a second target
    multiplies the number of distinguishable hashes by about a thousand.
    """
    n = len(peaks)
    k = min(lookahead, n - 1)
    if k < 2:
        z = np.zeros(0, np.float32)
        return Triplets(np.zeros(0, np.int64), z, z, z, z, z, z)
    i = np.arange(n)[:, None]
    j = i + np.arange(1, k + 1)[None, :]
    valid = j < n
    j = np.minimum(j, n - 1)
    dt = peaks.t[j] - peaks.t[i]
    dp = peaks.p[j] - peaks.p[i]
    adp = np.abs(dp)
    valid &= (dt >= DT_MIN - 0.5) & (dt <= dt_max) & (adp <= DP_MAX) & (adp >= DP_MIN - 0.5)
    rank = np.cumsum(valid, axis=1) - 1
    valid &= rank < TARGETS
    # Column of the r-th target of each anchor (or -1).
    col = np.full((n, TARGETS), -1, dtype=np.int64)
    ai, ki = np.nonzero(valid)
    col[ai, rank[ai, ki]] = ki
    r1, r2 = np.triu_indices(TARGETS, 1)
    c1, c2 = col[:, r1], col[:, r2]
    ok = (c1 >= 0) & (c2 >= 0)
    a, w = np.nonzero(ok)
    c1, c2 = c1[a, w], c2[a, w]
    return Triplets(
        anchor=a,
        ta=peaks.t[a],
        pa=peaks.p[a],
        d1=dp[a, c1],
        t1=dt[a, c1],
        d2=dp[a, c2],
        t2=dt[a, c2],
    )


# Key layout of a triplet's integer cells: (shift, bias, lowest, highest) for
# anchor bin, first pitch step, first time step, second pitch step, second time step.
CELLS = (
    (26, 0, 0, N_BINS - 1),
    (19, DP_MAX, -DP_MAX, DP_MAX),
    (13, 0, DT_MIN, DT_MAX),
    (6, DP_MAX, -DP_MAX, DP_MAX),
    (0, 0, DT_MIN, DT_MAX),
)


def cell_bits(field: int, cell: np.ndarray) -> np.ndarray:
    """One cell's contribution to the 34-bit key (cells must be in range)."""
    shift, bias = CELLS[field][:2]
    return (cell + bias).astype(np.uint64) << np.uint64(shift)


def mix(key: np.ndarray) -> np.ndarray:
    """34-bit key to a 32-bit hash whose top bits address a table evenly."""
    return ((key * _GOLDEN) >> np.uint64(32)).astype(np.uint32)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def in_range(*cells: np.ndarray) -> np.ndarray:
    ok = np.ones(np.shape(cells[0]), dtype=bool)
    for c, (_, _, lo, hi) in zip(cells, CELLS):
        ok &= (c >= lo) & (c <= hi)
    return ok


def pack(*cells: np.ndarray) -> np.ndarray:
    """Hash of integer cells (anchor bin, two steps in pitch and time)."""
    key = np.zeros(np.shape(cells[0]), dtype=np.uint64)
    for field, c in enumerate(cells):
        key |= cell_bits(field, c)
    return mix(key)


# Anchor times are stored in quarter frames (8 ms): whole frames left the
# measured speed of a 10 s clip scattered by +-0.15 %.
TIME_UNITS = 4


@dataclass(frozen=True)
class TrackPrints:
    """What the library stores for one track: hash and anchor time per triplet."""

    hashes: np.ndarray  # uint32
    times: np.ndarray  # uint32 anchor time in 1/TIME_UNITS frames
    duration_s: float

    def to_bytes(self) -> bytes:
        return np.stack([self.hashes, self.times], axis=1).astype("<u4").tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes, duration_s: float) -> TrackPrints:
        a = np.frombuffer(blob, dtype="<u4").reshape(-1, 2)
        return cls(a[:, 0].astype(np.uint32), a[:, 1].astype(np.uint32), duration_s)


def fingerprint(x: np.ndarray) -> TrackPrints:
    """Fingerprint a library track (mono float32 at SAMPLE_RATE)."""
    tr = triplets(find_peaks(x))
    cells = [np.rint(v).astype(np.int64) for v in (tr.pa, tr.d1, tr.t1, tr.d2, tr.t2)]
    ok = in_range(*cells)
    h = pack(*(c[ok] for c in cells))
    t = np.rint(tr.ta[ok] * TIME_UNITS).astype(np.uint32)
    order = np.argsort(h, kind="stable")
    return TrackPrints(h[order], t[order], len(x) / SAMPLE_RATE)
