"""Turntable simulator: degrade clean audio the way a record player and a room do.

The recogniser is built from clean digital files but listens to a record
being played, so benchmarks and tests need the difference between the two
on demand.  Each function models one physical cause:

* the platter turning at the wrong mean speed (belt stretch, 33/45 mix-up),
* the speed wobbling around that mean (eccentric record, motor and belt),
* the groove's own noise (surface hiss, dust clicks, scratch pops),
* the mechanics under the stylus (rumble from bearing and motor),
* the electrical chain (mismatched phono EQ, tired stylus / cheap cartridge),
* and, when the deck is heard through a microphone, the room.

`simulate` applies a named `Condition` in the order the signal meets those
causes.  Everything takes and returns float32 mono arrays in [-1, 1] at any
sample rate, is vectorised, and draws randomness only from the caller's
``numpy.random.Generator`` so that runs are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft
import scipy.signal
import soxr

__all__ = [
    "CONDITIONS",
    "Condition",
    "crackle",
    "hiss",
    "lowpass",
    "phono_eq",
    "room",
    "rumble",
    "simulate",
    "speed",
    "wow_flutter",
]

# Noise levels are set relative to the programme's RMS, but a silent stretch of
# groove still hisses: never reference anything quieter than this (-40 dBFS).
_RMS_FLOOR = 10.0 ** (-40.0 / 20.0)
# Peak ceiling used when a step would otherwise clip.
_PEAK = 0.99
# Phono EQ mismatch acts on the band the RIAA curve shapes; outside it the
# error levels off instead of growing without bound towards DC and Nyquist.
_TILT_LO_HZ = 100.0
_TILT_HI_HZ = 8000.0
# Energy decays 60 dB in RT60: amplitude envelope exp(-_DECAY * t / rt60).
_DECAY = 3.0 * np.log(10.0)


# --------------------------------------------------------------------------- helpers


def _mono(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"expected a mono 1-D signal, got shape {x.shape}")
    return x


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def _ref_rms(x: np.ndarray) -> float:
    return max(_rms(x), _RMS_FLOOR)


def _out(y: np.ndarray) -> np.ndarray:
    """Return float32, scaled down (never clipped) only if it would exceed the ceiling.

    Scaling rather than clipping mirrors someone setting the recording level:
    clipping would add distortion that no real deck produces.
    """
    y = np.asarray(y, dtype=np.float32)
    if len(y):
        peak = float(np.max(np.abs(y)))
        if peak > _PEAK:
            y = y * np.float32(_PEAK / peak)
    return y


@lru_cache(maxsize=64)
def _butter(order: int, freqs: tuple[float, ...], btype: str, fs: float) -> np.ndarray:
    wn = freqs[0] if len(freqs) == 1 else list(freqs)
    return scipy.signal.butter(order, wn, btype=btype, fs=fs, output="sos")


# The classic 3-pole/3-zero pinking filter (J. O. Smith, CCRMA): about
# -3 dB/octave across the band for the cost of one IIR pass.
_PINK_B = np.array([0.049922035, -0.095993537, 0.050612699, -0.004408786])
_PINK_A = np.array([1.0, -2.494956002, 2.017265875, -0.522189400])
_PINK_WARMUP = 2000  # ~10 time constants of the slowest pole (0.9952)


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal(n + _PINK_WARMUP)
    p = scipy.signal.lfilter(_PINK_B, _PINK_A, w)[_PINK_WARMUP:]
    return p / max(_rms(p), 1e-12)


# --------------------------------------------------------------------------- effects


def speed(x: np.ndarray, sr: int, factor: float) -> np.ndarray:
    """Play at `factor` x the intended speed: the platter, not a DSP, is off.

    A stretched belt or a 33/45 mix-up moves pitch and tempo together, so this
    is a plain resampling (output length ~ len(x)/factor).  soxr band-limits
    properly, so speeding up drops what would land above Nyquist, as the
    recording ADC's anti-alias filter would, rather than aliasing it.
    """
    x = _mono(x)
    if factor <= 0:
        raise ValueError("speed factor must be positive")
    if factor == 1.0 or len(x) == 0:
        return _out(x.copy())
    y = soxr.resample(np.ascontiguousarray(x, dtype=np.float32), sr * factor, sr)
    return _out(y)


def wow_flutter(
    x: np.ndarray,
    sr: int,
    wow_depth: float,
    flutter_depth: float,
    rng: np.random.Generator,
    wow_hz: float = 0.55,
    flutter_hz: float = 6.0,
) -> np.ndarray:
    """Wobble the speed around its mean, as a real platter does.

    Wow (~0.55 Hz, once per revolution at 33 1/3) comes from an off-centre
    spindle hole or a warped record; flutter (a few Hz) from motor cogging,
    belt and idler irregularities, plus a little random "scrape" flutter.
    The instantaneous speed is integrated into a read position in the groove
    and the groove is read there, so the result is frequency modulation with
    the mean speed (and length) unchanged.
    """
    x = _mono(x)
    n = len(x)
    if n < 2 or (wow_depth == 0 and flutter_depth == 0):
        return _out(x.copy())
    # The read position drifts from the nominal one by a smooth offset (wow
    # and flutter are all below ~25 Hz), so build that offset, in samples, at a
    # 200 Hz control rate and interpolate it up: cheap at any sample rate.
    cr = 200.0
    m = int(np.ceil(n / sr * cr)) + 2
    tc = np.arange(m) / cr
    phi = rng.uniform(0.0, 2.0 * np.pi, 2)
    offset = np.zeros(m)
    for depth, hz, ph in ((wow_depth, wow_hz, phi[0]), (flutter_depth, flutter_hz, phi[1])):
        if depth and hz > 0:
            # exact integral of depth*sin(2*pi*hz*t + ph) from 0 to t, in samples
            offset += sr * depth / (2.0 * np.pi * hz) * (np.cos(ph) - np.cos(2.0 * np.pi * hz * tc + ph))
    if flutter_depth:
        # Random ("scrape") flutter, 3-20 Hz, a quarter of the periodic depth.
        warm = 200
        noise = scipy.signal.sosfilt(
            _butter(2, (3.0, 20.0), "bandpass", cr), rng.standard_normal(m + warm)
        )[warm:]
        noise *= 0.25 * flutter_depth / max(_rms(noise), 1e-12)
        offset[1:] += sr / cr * np.cumsum(0.5 * (noise[1:] + noise[:-1]))
    k = np.arange(n, dtype=np.float64)
    p = k + np.interp(k * (cr / sr), np.arange(m), offset)
    # Read the groove from a 2x oversampled copy: cubic interpolation is then
    # flat to within ~0.4 dB up to the original Nyquist, where at 1x it would
    # dull and modulate the top octave as the fractional position drifts.
    x2 = soxr.resample(np.ascontiguousarray(x, dtype=np.float32), sr, 2 * sr)
    p *= 2.0
    np.clip(p, 0.0, len(x2) - 1, out=p)
    i = p.astype(np.intp)
    f = (p - i).astype(np.float32)
    xp = np.empty(len(x2) + 3, np.float32)  # edge-padded by 1 before, 2 after
    xp[1:-2] = x2
    xp[0], xp[-2:] = x2[0], x2[-1]
    y0, y1, y2, y3 = xp[i], xp[i + 1], xp[i + 2], xp[i + 3]
    # Catmull-Rom
    y = y1 + 0.5 * f * (
        y2 - y0 + f * (2.0 * y0 - 5.0 * y1 + 4.0 * y2 - y3 + f * (3.0 * (y1 - y2) + y3 - y0))
    )
    return _out(y)


def hiss(x: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add surface noise: the vinyl's own grain, a steady broadband hiss.

    White Gaussian noise scaled so that RMS(x)/RMS(noise) is exactly `snr_db`.
    """
    x = _mono(x)
    if len(x) == 0:
        return _out(x.copy())
    noise = rng.standard_normal(len(x), dtype=np.float32)
    noise *= _ref_rms(x) * 10.0 ** (-snr_db / 20.0) / max(_rms(noise), 1e-12)
    return _out(x + noise)


def crackle(
    x: np.ndarray,
    sr: int,
    clicks_per_s: float,
    level_db: float,
    rng: np.random.Generator,
    pops_per_s: float = 0.0,
) -> np.ndarray:
    """Add dust clicks and scratch pops: the impulsive noise of a used record.

    Clicks (dust, static, micro-scratches) are 0.05-1 ms broadband impulses at
    Poisson times, random sign, peak around `level_db` dBFS (+-4 dB spread).
    Pops (deeper scratches) are rarer, ~10 dB louder, 2-5 ms decaying thumps
    as the stylus is knocked sideways and settles.
    """
    x = _mono(x)
    n = len(x)
    if n == 0:
        return _out(x.copy())
    dur = n / sr
    idx_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []

    def add(pos: np.ndarray, lengths: np.ndarray, shape: np.ndarray) -> None:
        # shape: (k, L) per-event waveform; only the first lengths[j] samples count.
        k_idx = np.arange(shape.shape[1])
        idx = pos[:, None] + k_idx[None, :]
        keep = (k_idx[None, :] < lengths[:, None]) & (idx < n)
        idx_parts.append(idx[keep])
        val_parts.append(shape[keep])

    k = rng.poisson(max(clicks_per_s, 0.0) * dur)
    if k:
        pos = rng.integers(0, n, k)
        d = np.exp(rng.uniform(np.log(0.05e-3), np.log(1e-3), k))  # log-uniform: mostly tiny
        lengths = np.maximum(1, np.ceil(d * sr)).astype(np.intp)
        amp = 10.0 ** (np.clip(level_db + rng.normal(0.0, 4.0, k), level_db - 12, level_db + 6) / 20)
        amp *= rng.choice((-1.0, 1.0), k)
        ring = rng.uniform(0.0, 0.8, k)  # ringing up to 0.8*Nyquist: cartridge resonance
        tau = np.maximum(d * sr / 3.0, 0.25)
        kk = np.arange(int(lengths.max()))[None, :]
        shape = amp[:, None] * np.exp(-kk / tau[:, None]) * np.cos(np.pi * ring[:, None] * kk)
        add(pos, lengths, shape)

    k = rng.poisson(max(pops_per_s, 0.0) * dur)
    if k:
        pos = rng.integers(0, n, k)
        d = rng.uniform(2e-3, 5e-3, k)
        lengths = np.maximum(1, np.ceil(d * sr)).astype(np.intp)
        amp = np.minimum(10.0 ** ((level_db + 10.0 + rng.normal(0.0, 3.0, k)) / 20), 1.0)
        amp *= rng.choice((-1.0, 1.0), k)
        f0 = np.minimum(rng.uniform(150.0, 600.0, k), 0.45 * sr)
        tau = d * sr / 4.0  # down ~35 dB by the end of the pop
        kk = np.arange(int(lengths.max()))[None, :]
        shape = amp[:, None] * np.exp(-kk / tau[:, None]) * np.cos(2 * np.pi * f0[:, None] * kk / sr)
        add(pos, lengths, shape)

    if not idx_parts:
        return _out(x.copy())
    noise = np.bincount(np.concatenate(idx_parts), weights=np.concatenate(val_parts), minlength=n)
    return _out(x + noise)


def rumble(x: np.ndarray, sr: int, level_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add rumble: platter-bearing and motor vibration picked up by the stylus.

    Mostly random subsonic/bass noise (3-35 Hz, 8th-order band-pass), plus a weak periodic
    motor component (a random 8-20 Hz fundamental and its 2nd harmonic, -10 dB
    of the total).  The total sits `level_db` relative to the signal's RMS
    (e.g. -25 means 25 dB below the music).
    """
    x = _mono(x)
    n = len(x)
    if n == 0:
        return _out(x.copy())
    # Everything here is below ~70 Hz: synthesise at 400 Hz and let soxr
    # band-limit it up to sr, instead of filtering noise at the full rate.
    cr = 400
    margin = 400  # 1 s: lets the 3 Hz high-pass settle and hides soxr's edges
    m = int(np.ceil(n * cr / sr)) + 2 * margin + 2
    noise = scipy.signal.sosfilt(
        _butter(4, (3.0, 35.0), "bandpass", float(cr)), rng.standard_normal(m)
    )
    noise[:margin] = 0.0
    noise /= max(_rms(noise[margin:]), 1e-12)
    tc = np.arange(m) / cr
    f_m = rng.uniform(8.0, 20.0)
    ph = rng.uniform(0.0, 2.0 * np.pi, 2)
    motor = np.sin(2 * np.pi * f_m * tc + ph[0]) + 0.5 * np.sin(4 * np.pi * f_m * tc + ph[1])
    motor /= np.sqrt(0.5 * 1.25)
    r_lo = np.sqrt(0.9) * noise + np.sqrt(0.1) * motor
    start = int(round(margin * sr / cr))
    r = soxr.resample(r_lo, cr, sr)[start : start + n].astype(np.float64)
    r *= _ref_rms(x) * 10.0 ** (level_db / 20.0) / max(_rms(r), 1e-12)
    return _out(x + r)


def phono_eq(x: np.ndarray, sr: int, tilt_db_per_octave: float) -> np.ndarray:
    """Tilt the spectrum around 1 kHz, as a mismatched phono stage does.

    A missing, doubled or wrong RIAA de-emphasis leaves the response rising
    (positive tilt: thin and bright) or falling (negative: dull, boomy) across
    the band the RIAA curve shapes.  Zero-phase FFT-domain gain of
    tilt*log2(f/1 kHz) dB, levelling off below 100 Hz and above 8 kHz.
    """
    x = _mono(x)
    n = len(x)
    if n == 0 or tilt_db_per_octave == 0:
        return _out(x.copy())
    nfft = scipy.fft.next_fast_len(n, real=True)
    spec = scipy.fft.rfft(np.asarray(x, dtype=np.float64), nfft)
    f = np.clip(np.fft.rfftfreq(nfft, 1.0 / sr), _TILT_LO_HZ, _TILT_HI_HZ)
    spec *= 10.0 ** (tilt_db_per_octave * np.log2(f / 1000.0) / 20.0)
    return _out(scipy.fft.irfft(spec, nfft)[:n])


def lowpass(x: np.ndarray, sr: int, cutoff_hz: float) -> np.ndarray:
    """Cut the treble, as a worn stylus or a cheap ceramic cartridge does.

    A worn tip no longer traces the finest groove modulations; a cheap
    cartridge resonates low.  4th-order Butterworth; no-op when the cutoff is
    at or above ~Nyquist.
    """
    x = _mono(x)
    if len(x) == 0 or cutoff_hz >= 0.49 * sr:
        return _out(x.copy())
    y = scipy.signal.sosfilt(_butter(4, (float(cutoff_hz),), "lowpass", float(sr)), x)
    return _out(y)


def room(
    x: np.ndarray,
    sr: int,
    rt60_s: float,
    noise_snr_db: float | None,
    rng: np.random.Generator,
    drr_db: float = 0.0,
) -> np.ndarray:
    """Hear the deck through a microphone across a room.

    Convolves with a synthetic impulse response: a direct-path impulse, then
    after a 2-8 ms gap (first floor/wall reflection) exponentially decaying
    Gaussian noise with the given RT60, gently low-passed for air and soft
    furnishings; `drr_db` is the direct-to-reverberant energy ratio (0 dB: mic
    at about the critical distance, 1-2 m in a living room).  Then adds
    pink-ish ambient noise (fridge, traffic, talk) `noise_snr_db` below the
    reverberant signal's RMS (None: a silent room).  The output keeps the
    input's length, as a continuous microphone stream would.
    """
    x = _mono(x)
    n = len(x)
    if n == 0:
        return _out(x.copy())
    y = np.asarray(x, dtype=np.float64)
    if rt60_s > 0:
        n_ir = max(int(round(rt60_s * sr)), 2)
        pre = min(int(rng.uniform(2e-3, 8e-3) * sr) + 1, n_ir - 1)
        t = np.arange(n_ir - pre) / sr
        tail = rng.standard_normal(n_ir - pre) * np.exp(-_DECAY * t / rt60_s)
        a = np.exp(-2.0 * np.pi * min(5000.0, 0.45 * sr) / sr)
        tail = scipy.signal.lfilter([1.0 - a], [1.0, -a], tail)
        tail *= np.sqrt(10.0 ** (-drr_db / 10.0) / max(np.sum(tail * tail), 1e-30))
        ir = np.zeros(n_ir)
        ir[0] = 1.0
        ir[pre:] = tail
        y = scipy.signal.fftconvolve(y, ir)[:n]
    if noise_snr_db is not None:
        y = y + _pink(n, rng) * (_ref_rms(y) * 10.0 ** (-noise_snr_db / 20.0))
    return _out(y)


# --------------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class Condition:
    """One playback situation; `None` (or 0) switches a degradation off.

    `speed` is the *mean* playback speed (1.02 = 2 % fast), which is what the
    recogniser's speed estimate should recover; wow and flutter average out.
    """

    name: str
    description: str
    speed: float = 1.0
    wow: float = 0.0  # peak speed deviation as a fraction (0.001 = 0.1 %)
    flutter: float = 0.0
    wow_hz: float = 0.55
    flutter_hz: float = 6.0
    hiss_snr_db: float | None = None
    crackle_per_s: float | None = None
    crackle_db: float = -30.0  # click peak, dBFS
    pops_per_s: float = 0.0
    rumble_db: float | None = None  # relative to signal RMS
    eq_tilt_db_per_oct: float | None = None
    lowpass_hz: float | None = None
    room_rt60_s: float | None = None
    room_noise_snr_db: float | None = None


def _conditions(*cs: Condition) -> dict[str, Condition]:
    return {c.name: c for c in cs}


CONDITIONS: dict[str, Condition] = _conditions(
    Condition("clean", "the digital file itself, untouched"),
    Condition(
        "good_deck",
        "decent consumer deck, clean record, line-in recording",
        wow=0.0005, flutter=0.0003, hiss_snr_db=45.0,
        crackle_per_s=1.0, crackle_db=-42.0,
    ),
    # --- single causes, for tests and for seeing what each costs
    Condition("speed_+2", "belt/pitch 2 % fast", speed=1.02),
    Condition("speed_-2", "belt/pitch 2 % slow", speed=0.98),
    Condition("speed_+3", "pitch 3 % fast", speed=1.03),
    Condition("speed_-3", "pitch 3 % slow (stretched belt)", speed=0.97),
    Condition("33_at_45", "33 1/3 record played at 45 rpm", speed=45.0 / (100.0 / 3.0)),
    Condition("45_at_33", "45 record played at 33 1/3 rpm", speed=(100.0 / 3.0) / 45.0),
    Condition("wow_flutter", "audible wow and flutter: eccentric record, tired motor",
              wow=0.003, flutter=0.0015),
    Condition("hiss", "loud surface noise, 20 dB SNR", hiss_snr_db=20.0),
    Condition("crackle", "dusty, scratched record: heavy crackle and pops",
              crackle_per_s=25.0, crackle_db=-22.0, pops_per_s=0.5),
    Condition("rumble", "noisy bearing/motor, rumble 20 dB below the music", rumble_db=-20.0),
    Condition("phono_eq", "no/mismatched RIAA: thin and bright, +3 dB/octave",
              eq_tilt_db_per_oct=3.0),
    Condition("phono_eq_dark", "doubled/mismatched RIAA: dull and boomy, -3 dB/octave",
              eq_tilt_db_per_oct=-3.0),
    Condition("lowpass", "worn stylus / cheap ceramic cartridge, 3 kHz", lowpass_hz=3000.0),
    Condition("room", "microphone in a living room: RT60 0.5 s, ambient noise 20 dB down",
              room_rt60_s=0.5, room_noise_snr_db=20.0),
    # --- realistic combinations
    Condition(
        "worn_plus2",
        "worn deck and record, 2 % fast: audible wow, crackle, hiss",
        speed=1.02, wow=0.002, flutter=0.001, hiss_snr_db=30.0,
        crackle_per_s=6.0, crackle_db=-30.0, pops_per_s=0.05,
    ),
    Condition(
        "worn_minus2",
        "worn deck and record, 2 % slow: audible wow, crackle, hiss",
        speed=0.98, wow=0.002, flutter=0.001, hiss_snr_db=30.0,
        crackle_per_s=6.0, crackle_db=-30.0, pops_per_s=0.05,
    ),
    Condition(
        "worn_belt_noisy_room",
        "worst case: stretched belt, battered record, dull cartridge, "
        "mismatched preamp, heard by a mic in a noisy room",
        speed=1.015, wow=0.004, flutter=0.002, hiss_snr_db=25.0,
        crackle_per_s=12.0, crackle_db=-28.0, pops_per_s=0.3,
        rumble_db=-25.0, eq_tilt_db_per_oct=-2.0, lowpass_hz=5000.0,
        room_rt60_s=0.6, room_noise_snr_db=15.0,
    ),
)


def simulate(
    x: np.ndarray, sr: int, condition: Condition | str, rng: np.random.Generator
) -> np.ndarray:
    """Play `x` under `condition` (a Condition or a CONDITIONS key).

    Order follows the signal path: speed and wow act on the groove; surface
    noise and rumble are picked up with it by the stylus; then the cartridge
    and preamp filter everything; then, optionally, the room.  Output length
    is ~len(x)/condition.speed, float32, peak-normalised to <= 0.99 only if
    it would otherwise clip.
    """
    c = CONDITIONS[condition] if isinstance(condition, str) else condition
    y = _mono(x).astype(np.float32, copy=False)
    if c.speed != 1.0:
        y = speed(y, sr, c.speed)
    if c.wow or c.flutter:
        y = wow_flutter(y, sr, c.wow, c.flutter, rng, wow_hz=c.wow_hz, flutter_hz=c.flutter_hz)
    # Hiss and rumble are referenced to the music's RMS, so add them before
    # the clicks, whose energy would otherwise count as "signal".
    if c.hiss_snr_db is not None:
        y = hiss(y, c.hiss_snr_db, rng)
    if c.rumble_db is not None:
        y = rumble(y, sr, c.rumble_db, rng)
    if c.crackle_per_s or c.pops_per_s:
        y = crackle(y, sr, c.crackle_per_s or 0.0, c.crackle_db, rng, pops_per_s=c.pops_per_s)
    if c.eq_tilt_db_per_oct:
        y = phono_eq(y, sr, c.eq_tilt_db_per_oct)
    if c.lowpass_hz is not None:
        y = lowpass(y, sr, c.lowpass_hz)
    if c.room_rt60_s is not None or c.room_noise_snr_db is not None:
        y = room(y, sr, c.room_rt60_s or 0.0, c.room_noise_snr_db, rng)
    return _out(y)
