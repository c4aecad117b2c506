"""Physics checks for the turntable simulator (vinyl_mqtt.turntable).

The signals are synthesised here (tones and a deterministic "music-like" mix
of harmonic notes) so the tests need no audio files; what is checked is that
each degradation does what the physical effect it models does, measurably.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.signal

from vinyl_mqtt import turntable as tt
from vinyl_mqtt.turntable import CONDITIONS, Condition, simulate

# --------------------------------------------------------------------------- helpers


def tone(sr: int, dur: float, hz: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * dur))) / sr
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def music(sr: int, dur: float, seed: int = 0) -> np.ndarray:
    """A deterministic music-like signal: harmonic notes with attack/decay envelopes."""
    rng = np.random.default_rng(seed)
    n = int(round(sr * dur))
    t = np.arange(n) / sr
    y = np.zeros(n)
    step = 0.25
    for start in np.arange(0.0, dur, step):
        f0 = 110.0 * 2 ** (rng.integers(0, 36) / 12)
        length = rng.choice([0.25, 0.5, 1.0])
        i0, i1 = int(start * sr), min(n, int((start + length) * sr))
        tt_ = t[i0:i1] - start
        env = np.minimum(tt_ / 0.01, 1.0) * np.exp(-tt_ / (0.4 * length))
        for h in range(1, 7):
            if f0 * h < 0.45 * sr:
                y[i0:i1] += env * np.sin(2 * np.pi * f0 * h * tt_ + h) / h**1.3
    return (0.7 * y / np.max(np.abs(y))).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def db(a: float, b: float) -> float:
    return 20 * np.log10(a / b)


def peak_hz(y: np.ndarray, sr: int) -> float:
    """Frequency of the strongest spectral peak (windowed, zero-padded, parabolic)."""
    w = np.hanning(len(y))
    nfft = 8 * len(y)
    mag = np.log(np.abs(np.fft.rfft(y * w, nfft)) + 1e-20)
    k = int(np.argmax(mag[1:-1])) + 1
    a, b, c = mag[k - 1 : k + 2]
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * sr / nfft


def amp_at(y: np.ndarray, sr: int, hz: float) -> float:
    """Amplitude of a tone whose frequency falls exactly on an FFT bin."""
    spec = np.fft.rfft(y)
    k = int(round(hz * len(y) / sr))
    assert abs(k * sr / len(y) - hz) < 1e-9, "choose len(y) so the tone is on a bin"
    return 2 * abs(spec[k]) / len(y)


def inst_hz(y: np.ndarray, sr: int, trim_s: float = 0.2) -> np.ndarray:
    phase = np.unwrap(np.angle(scipy.signal.hilbert(y.astype(np.float64))))
    f = np.diff(phase) * sr / (2 * np.pi)
    k = int(trim_s * sr)
    return f[k:-k]


def events(y: np.ndarray, thr: float, gap: int) -> list[np.ndarray]:
    """Groups of above-threshold sample indices separated by more than `gap` samples."""
    idx = np.flatnonzero(np.abs(y) > thr)
    if len(idx) == 0:
        return []
    return np.split(idx, np.flatnonzero(np.diff(idx) > gap) + 1)


# --------------------------------------------------------------------------- speed


@pytest.mark.parametrize("factor", [1.02, 0.98, 1.03, 0.97, 45 / (100 / 3), (100 / 3) / 45])
def test_speed_moves_pitch_and_tempo_together(factor):
    sr = 8000
    x = tone(sr, 4.0, 1000.0)
    y = tt.speed(x, sr, factor)
    assert y.dtype == np.float32
    assert abs(len(y) - len(x) / factor) <= 2
    assert abs(peak_hz(y, sr) - 1000 * factor) < 0.5


def test_speed_45_at_33_lands_on_741_hz():
    y = tt.speed(tone(8000, 4.0, 1000.0), 8000, 0.7407)
    assert abs(peak_hz(y, 8000) - 740.7) < 0.5


def test_speed_up_drops_content_pushed_past_nyquist_instead_of_aliasing():
    sr = 8000
    x = tone(sr, 2.0, 3500.0)  # x1.35 -> 4725 Hz, above the 4 kHz Nyquist
    y = tt.speed(x, sr, 1.35)
    assert db(rms(y[1000:-1000]), rms(x)) < -40
    # while in-band content keeps its level
    y2 = tt.speed(tone(sr, 2.0, 1000.0), sr, 1.35)
    assert abs(db(rms(y2[1000:-1000]), rms(x))) < 0.2


# --------------------------------------------------------------------------- wow & flutter


def test_wow_is_slow_fm_of_the_requested_depth_around_unchanged_mean():
    sr = 8000
    x = tone(sr, 12.0, 1000.0)
    y = tt.wow_flutter(x, sr, 0.004, 0.0, np.random.default_rng(1))
    assert abs(len(y) - len(x)) <= 0.005 * len(x)
    f = inst_hz(y, sr)
    assert abs(f.mean() - 1000.0) < 0.3  # mean speed unchanged
    assert np.std(f) * np.sqrt(2) == pytest.approx(4.0, rel=0.1)  # +-0.4 % of 1 kHz
    spec = np.abs(np.fft.rfft((f - f.mean()) * np.hanning(len(f)), 2 * len(f)))
    assert np.argmax(spec) * sr / (2 * len(f)) == pytest.approx(0.55, abs=0.1)


def test_flutter_is_faster_fm_of_roughly_the_requested_depth():
    sr = 8000
    x = tone(sr, 10.0, 1000.0)
    y = tt.wow_flutter(x, sr, 0.0, 0.002, np.random.default_rng(2))
    f = inst_hz(y, sr)
    # periodic +-2 Hz plus a little random flutter (a quarter of the depth, rms)
    assert np.std(f) * np.sqrt(2) == pytest.approx(2.0 * np.sqrt(1 + 2 * 0.25**2), rel=0.15)
    spec = np.abs(np.fft.rfft((f - f.mean()) * np.hanning(len(f)), 4 * len(f)))
    assert np.argmax(spec) * sr / (4 * len(f)) == pytest.approx(6.0, abs=0.3)


def test_wow_flutter_keeps_the_top_octave():
    # Reading the groove between samples must not dull the treble.
    sr = 8000
    x = tone(sr, 4.0, 3500.0)
    y = tt.wow_flutter(x, sr, 0.003, 0.0015, np.random.default_rng(3))
    assert abs(db(rms(y[800:-800]), rms(x))) < 0.5


def test_wow_flutter_keeps_music_length():
    x = music(11025, 3.0)
    y = tt.wow_flutter(x, 11025, 0.005, 0.002, np.random.default_rng(4))
    assert abs(len(y) - len(x)) <= 0.005 * len(x)
    assert y.dtype == np.float32 and np.max(np.abs(y)) <= 1.0


# --------------------------------------------------------------------------- hiss


@pytest.mark.parametrize("snr", [20.0, 30.0, 45.0])
def test_hiss_reaches_requested_snr_and_is_white(snr):
    sr = 16000
    x = music(sr, 3.0) * np.float32(0.5)
    y = tt.hiss(x, snr, np.random.default_rng(5))
    noise = y.astype(np.float64) - x
    assert db(rms(x), rms(noise)) == pytest.approx(snr, abs=1.0)
    f, p = scipy.signal.welch(noise, sr, nperseg=1024)
    lo, hi = p[(f > 200) & (f < 4000)].mean(), p[(f > 4000) & (f < 7800)].mean()
    assert abs(10 * np.log10(lo / hi)) < 1.0


# --------------------------------------------------------------------------- crackle


def test_crackle_click_count_level_and_sign():
    sr, dur, rate, level = 8000, 20.0, 20.0, -20.0
    x = np.zeros(int(sr * dur), np.float32)
    y = tt.crackle(x, sr, rate, level, np.random.default_rng(6))
    ev = events(y, 10 ** ((level - 16) / 20), gap=int(0.002 * sr))
    expected = rate * dur
    assert 0.8 * expected < len(ev) < 1.15 * expected
    peaks = np.array([y[e[np.argmax(np.abs(y[e]))]] for e in ev])
    assert np.median(20 * np.log10(np.abs(peaks))) == pytest.approx(level, abs=2.0)
    assert 0.35 < np.mean(peaks > 0) < 0.65
    # short: every click is over within about a millisecond
    assert max(e[-1] - e[0] for e in ev) / sr < 0.0015 + 0.002  # allow one merged pair
    # broadband: the top half of the band holds a fair share of the energy
    f, p = scipy.signal.welch(y, sr, nperseg=256)
    assert p[f > sr / 4].sum() > 0.2 * p[f <= sr / 4].sum()


def test_pops_are_rarer_louder_and_longer():
    sr, dur, level = 16000, 20.0, -30.0
    x = np.zeros(int(sr * dur), np.float32)
    y = tt.crackle(x, sr, 0.0, level, np.random.default_rng(7), pops_per_s=5.0)
    ev = events(y, 10 ** ((level - 6) / 20), gap=int(0.003 * sr))
    assert 70 < len(ev) < 130
    peaks = np.array([np.max(np.abs(y[e])) for e in ev])
    assert np.median(20 * np.log10(peaks)) > level + 6
    # decaying over milliseconds, not a single-sample tick
    assert np.median([(e[-1] - e[0]) / sr for e in ev]) > 0.0005


def test_crackle_adds_to_the_music_untouched_elsewhere():
    sr = 8000
    x = music(sr, 2.0)
    y = tt.crackle(x, sr, 5.0, -30.0, np.random.default_rng(8))
    diff = np.abs(y.astype(np.float64) - x)
    assert np.mean(diff < 1e-7) > 0.95  # impulses, not a broadband bed


# --------------------------------------------------------------------------- rumble


def test_rumble_level_and_band():
    sr = 8000
    x = music(sr, 6.0)
    y = tt.rumble(x, sr, -20.0, np.random.default_rng(9))
    r = y.astype(np.float64) - x
    assert db(rms(r), rms(x)) == pytest.approx(-20.0, abs=0.5)
    f, p = scipy.signal.welch(r, sr, nperseg=8192)
    assert p[f < 50].sum() > 0.95 * p.sum()
    assert p[f > 100].sum() < 1e-3 * p.sum()


# --------------------------------------------------------------------------- phono EQ


@pytest.mark.parametrize("tilt", [3.0, -3.0, 1.5])
def test_phono_eq_tilts_about_1khz(tilt):
    sr = 16000
    n = sr  # 1 s: 1 Hz bins, all tones on bins
    x = (tone(sr, 1.0, 250, 0.2) + tone(sr, 1.0, 1000, 0.2) + tone(sr, 1.0, 4000, 0.2))
    y = tt.phono_eq(x, sr, tilt)
    assert len(y) == n
    before = db(amp_at(x, sr, 4000), amp_at(x, sr, 250))
    after = db(amp_at(y, sr, 4000), amp_at(y, sr, 250))
    assert after - before == pytest.approx(tilt * 4, abs=0.2)  # 250 Hz -> 4 kHz is 4 octaves
    assert db(amp_at(y, sr, 1000), amp_at(x, sr, 1000)) == pytest.approx(0.0, abs=0.1)


def test_phono_eq_opposite_tilts_differ_by_twice_tilt_times_octaves():
    sr = 16000
    x = tone(sr, 1.0, 250, 0.3) + tone(sr, 1.0, 4000, 0.3)
    up, down = tt.phono_eq(x, sr, 3.0), tt.phono_eq(x, sr, -3.0)
    d_up = db(amp_at(up, sr, 4000), amp_at(up, sr, 250))
    d_down = db(amp_at(down, sr, 4000), amp_at(down, sr, 250))
    assert d_up - d_down == pytest.approx(2 * 3.0 * 4, abs=0.3)


# --------------------------------------------------------------------------- lowpass


def test_lowpass_3k_at_16k():
    sr = 16000
    g = {
        hz: db(rms(tt.lowpass(tone(sr, 1.0, hz), sr, 3000)[2000:]), rms(tone(sr, 1.0, hz)))
        for hz in (500, 3000, 5000)
    }
    assert abs(g[500]) < 0.2
    assert g[3000] == pytest.approx(-3.0, abs=0.5)
    assert g[5000] < -20


def test_lowpass_at_or_above_nyquist_is_a_no_op():
    x = music(8000, 1.0)
    np.testing.assert_array_equal(tt.lowpass(x, 8000, 5000), x)


# --------------------------------------------------------------------------- room


def schroeder_rt60(h: np.ndarray, sr: int) -> float:
    e = np.cumsum(h[::-1].astype(np.float64) ** 2)[::-1]
    level = 10 * np.log10(e / e[0] + 1e-30)
    t5 = np.argmax(level <= -5)
    t25 = np.argmax(level <= -25)
    return 3.0 * (t25 - t5) / sr  # T20 extrapolated to 60 dB


@pytest.mark.parametrize("rt60", [0.3, 0.5, 1.0])
def test_room_decays_with_requested_rt60(rt60):
    sr = 16000
    x = np.zeros(int(2.0 * sr), np.float32)
    x[100] = 0.5
    y = tt.room(x, sr, rt60, None, np.random.default_rng(10))
    assert len(y) == len(x)
    assert y[100] == pytest.approx(0.5)  # direct path kept
    assert schroeder_rt60(y[100:], sr) == pytest.approx(rt60, rel=0.15)
    # the dry signal has no decay at all
    assert np.all(tt.room(x, sr, 0.0, None, np.random.default_rng(10))[101:] == 0)


def test_room_lengthens_the_decay_of_music():
    sr = 8000
    x = music(sr, 2.0)
    x[sr:] = 0  # music stops after 1 s
    y = tt.room(x, sr, 0.5, None, np.random.default_rng(11))
    tail = y[sr + int(0.05 * sr) : sr + int(0.3 * sr)]
    assert db(rms(tail), rms(x[: sr])) > -30  # the room keeps ringing
    assert rms(y[sr + int(0.7 * sr) :]) < 0.05 * rms(tail)  # ...and dies away


def test_room_ambient_noise_snr_and_colour():
    sr = 16000
    x = music(sr, 4.0)
    wet = tt.room(x, sr, 0.5, None, np.random.default_rng(12))
    noisy = tt.room(x, sr, 0.5, 20.0, np.random.default_rng(12))  # same IR drawn first
    noise = noisy.astype(np.float64) - wet
    assert db(rms(wet), rms(noise)) == pytest.approx(20.0, abs=0.5)
    f, p = scipy.signal.welch(noise, sr, nperseg=4096)
    low, high = p[(f > 100) & (f < 500)].mean(), p[(f > 2000) & (f < 6000)].mean()
    assert 10 * np.log10(low / high) > 6  # pink-ish: density falls with frequency


# --------------------------------------------------------------------------- conditions & simulate

REQUIRED = [
    "clean", "good_deck", "speed_+2", "speed_-2", "speed_+3", "speed_-3", "wow_flutter",
    "hiss", "crackle", "rumble", "phono_eq", "lowpass", "room", "33_at_45", "45_at_33",
    "worn_plus2", "worn_minus2", "worn_belt_noisy_room",
]


def test_conditions_table():
    assert set(REQUIRED) <= set(CONDITIONS)
    for name, c in CONDITIONS.items():
        assert c.name == name and c.description
    assert CONDITIONS["speed_+2"].speed == pytest.approx(1.02)
    assert CONDITIONS["speed_-3"].speed == pytest.approx(0.97)
    assert CONDITIONS["33_at_45"].speed == pytest.approx(1.35)
    assert CONDITIONS["45_at_33"].speed == pytest.approx(0.7407, abs=1e-4)
    assert CONDITIONS["worn_minus2"] == dataclasses.replace(
        CONDITIONS["worn_plus2"], name="worn_minus2",
        description=CONDITIONS["worn_minus2"].description, speed=0.98,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        CONDITIONS["clean"].speed = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("sr", [8000, 44100])
@pytest.mark.parametrize("name", sorted(CONDITIONS))
def test_simulate_every_condition(name, sr):
    x = music(sr, 1.5)
    c = CONDITIONS[name]
    a = simulate(x, sr, name, np.random.default_rng(42))
    b = simulate(x, sr, c, np.random.default_rng(42))
    assert a.dtype == np.float32 and a.ndim == 1
    assert np.all(np.isfinite(a)) and np.max(np.abs(a)) <= 1.0
    np.testing.assert_array_equal(a, b)  # deterministic per seed, name == Condition
    assert abs(len(a) - len(x) / c.speed) <= 0.005 * len(x) + 2
    random_parts = (c.wow, c.hiss_snr_db, c.crackle_per_s, c.rumble_db, c.room_rt60_s)
    if any(p is not None and p != 0 for p in random_parts):
        assert not np.array_equal(a, simulate(x, sr, c, np.random.default_rng(43)))
    assert np.array_equal(x, music(sr, 1.5))  # input untouched


@pytest.mark.parametrize("name", sorted(CONDITIONS))
def test_condition_speed_is_the_mean_playback_speed(name):
    # What a recogniser's speed estimate should recover, whatever else happens.
    sr = 8000
    c = CONDITIONS[name]
    y = simulate(tone(sr, 4.0, 1000.0, 0.3), sr, c, np.random.default_rng(13))
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y)), 8 * len(y))) ** 2
    f = np.fft.rfftfreq(8 * len(y), 1 / sr)
    band = np.abs(f - 1000 * c.speed) < 25
    centroid = np.sum(f[band] * spec[band]) / np.sum(spec[band])
    assert centroid == pytest.approx(1000 * c.speed, abs=1.5)


def test_clean_is_identity_and_loud_results_are_scaled_not_clipped():
    sr = 8000
    x = music(sr, 1.0)
    np.testing.assert_array_equal(simulate(x, sr, "clean", np.random.default_rng(0)), x)
    loud = Condition("loud", "pops on a hot signal", crackle_per_s=50.0, crackle_db=-1.0,
                     pops_per_s=5.0)
    y = simulate(x / np.max(np.abs(x)), sr, loud, np.random.default_rng(0))
    assert np.max(np.abs(y)) == pytest.approx(0.99, abs=1e-6)
    with pytest.raises(KeyError):
        simulate(x, sr, "no_such_condition", np.random.default_rng(0))

