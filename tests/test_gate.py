"""The music/silence gate and the clip timetable, on real recordings.

Groove "silence" is what a record really gives between tracks: a -70 dBFS
hiss floor with dust clicks peaking around -10 dBFS.
"""

from __future__ import annotations

import numpy as np
import pytest

from vinyl_mqtt.audio import decode
from vinyl_mqtt.config import ClipConfig, GateConfig
from vinyl_mqtt.gate import DB_FLOOR, ClipScheduler, Gate, LevelMeter, downsample, dbfs
from vinyl_mqtt.turntable import crackle

try:
    from conftest import data_file
except ImportError:  # pragma: no cover - run as a package
    from tests.conftest import data_file

R = 44100
BLOCK = 1024
GATE = GateConfig()  # threshold -45 dBFS, hysteresis 6 dB, attack 1 s, release 5 s
CLIP = ClipConfig()  # 8 s clips, first after 3 s, recheck every 30 s


@pytest.fixture(scope="module")
def music() -> dict[str, np.ndarray]:
    return {n: decode(data_file(n), R) for n in ("hw_beach", "st_chipdisko", "etr_credits_ballad")}


def groove(seconds: float, seed: int, clicks_per_s: float = 8.0) -> np.ndarray:
    """Silent groove: -70 dBFS hiss plus clicks of about -10 dBFS peak."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 10 ** (-70 / 20), int(round(seconds * R))).astype(np.float32)
    return crackle(x, R, clicks_per_s, -10.0, rng) if clicks_per_s else x


def at_level(x: np.ndarray, db: float) -> np.ndarray:
    return (x * (10 ** (db / 20) / np.sqrt(np.mean(x.astype(np.float64) ** 2)))).astype(np.float32)


def run(sig: np.ndarray, gate: Gate, sched: ClipScheduler | None = None):
    """Feed ``sig`` in blocks; returns [(kind, index, reported_at)] and clips."""
    events, clips = [], []
    for i in range(0, len(sig), BLOCK):
        blk = sig[i : i + BLOCK]
        ev = gate.update(blk, i)
        events += [(k, j, i + len(blk)) for k, j in ev]
        if sched is not None:
            clips += [(c, i + len(blk)) for c in sched.feed(blk, i, ev)]
    return events, clips


def kinds(events) -> list[str]:
    return [e[0] for e in events]


# ---------------------------------------------------------------- LevelMeter


def test_level_meter_reads_dbfs():
    m = LevelMeter(R)
    t = np.arange(R) / R
    sine = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)  # RMS 0.354: -9.03 dBFS
    for i in range(0, R - BLOCK, BLOCK):  # whole blocks only
        m.update(sine[i : i + BLOCK])
    assert m.peak_dbfs == pytest.approx(-6.02, abs=0.05)
    assert m.rms_dbfs == pytest.approx(-9.03, abs=0.1)
    assert m.smoothed_rms_dbfs == pytest.approx(-9.03, abs=0.05)
    assert m.level_dbfs == pytest.approx(-9.03, abs=0.1)
    m.update(np.zeros(R, dtype=np.float32))
    assert m.rms_dbfs == m.peak_dbfs == m.smoothed_rms_dbfs == m.level_dbfs == DB_FLOOR
    assert dbfs(0.0) == DB_FLOOR and dbfs(1.0) == 0.0


def test_level_meter_ignores_clicks_but_rms_does_not():
    m = LevelMeter(R)
    sig = groove(3.0, seed=5, clicks_per_s=8.0)
    levels, rms, peaks = [], [], []
    for i in range(0, len(sig), BLOCK):
        m.update(sig[i : i + BLOCK])
        levels.append(m.level_dbfs)
        rms.append(m.smoothed_rms_dbfs)
        peaks.append(m.peak_dbfs)
    assert max(peaks) > -16  # the clicks are there
    assert max(rms) > GATE.threshold_db - 5  # plain RMS gets close to the threshold
    assert max(levels[20:]) < -65  # the robust level stays at the hiss floor


# ---------------------------------------------------------------------- Gate


def test_needle_drop_plays_within_attack(music):
    lead = groove(4.0, seed=1)
    sig = np.concatenate([lead, music["hw_beach"][: 6 * R]])
    events, _ = run(sig, g := Gate(GATE, R))
    assert kinds(events) == ["playing"]
    _, index, reported = events[0]
    drop = len(lead)
    # dated to the needle drop, reported attack_s after it (+ at most one block)
    assert abs(index - drop) <= 0.05 * R, (index - drop) / R
    assert index + GATE.attack_s * R <= reported <= drop + GATE.attack_s * R + BLOCK
    assert g.state == "playing" and g.since_index == index
    assert g.rms_dbfs > -30 and g.peak_dbfs > g.rms_dbfs


def test_crackle_only_lead_in_does_not_start_playing():
    # a long lead-in groove with plenty of dust: clicks of -10 dBFS peak over -70 dBFS
    sig = np.concatenate([groove(10.0, seed=2, clicks_per_s=15.0), groove(10.0, seed=3, clicks_per_s=30.0)])
    events, _ = run(sig, g := Gate(GATE, R))
    assert events == [] and g.state == "idle"


def test_quiet_passage_does_not_flap(music):
    x = music["etr_credits_ballad"]
    silence_db = GATE.threshold_db - GATE.hysteresis_db
    quiet = at_level(x[6 * R : 9 * R], GATE.threshold_db - 3.5)  # 3 s at -48.5 dBFS: in the band
    assert silence_db < -48.5 < GATE.threshold_db
    sig = np.concatenate([groove(2.0, 4), x[: 6 * R], quiet, x[9 * R : 14 * R]])
    events, _ = run(sig, g := Gate(GATE, R))
    assert kinds(events) == ["playing"]
    assert g.state == "playing"


def test_short_drop_below_silence_does_not_go_idle(music):
    # 3 s of very quiet music (below the silence level, shorter than release_s): held
    x = music["etr_credits_ballad"]
    very_quiet = at_level(x[6 * R : 9 * R], -60.0)
    sig = np.concatenate([x[: 6 * R], very_quiet, x[9 * R : 14 * R]])
    events, _ = run(sig, Gate(GATE, R))
    assert "idle" not in kinds(events)
    assert kinds(events)[0] == "playing"


def test_gap_between_tracks_gives_gap_end_not_idle(music):
    a, b = music["hw_beach"][: 10 * R], music["st_chipdisko"][: 10 * R]
    gap = groove(1.5, seed=6)
    sig = np.concatenate([groove(2.0, 7), a, gap, b])
    events, _ = run(sig, g := Gate(GATE, R))
    assert kinds(events) == ["playing", "gap_end"]
    second = 2 * R + len(a) + len(gap)
    assert abs(events[1][1] - second) <= 0.2 * R  # dated to the start of track 2
    assert events[1][2] <= second + 0.5 * R  # and reported promptly
    assert g.state == "playing"


def test_needle_lifted_goes_idle_after_release(music):
    a = music["hw_beach"][: 8 * R]
    sig = np.concatenate([groove(2.0, 8), a, groove(8.0, 9)])
    events, _ = run(sig, g := Gate(GATE, R))
    assert kinds(events) == ["playing", "idle"]
    lifted = 2 * R + len(a)
    _, index, reported = events[1]
    assert abs(index - lifted) <= 0.05 * R, (index - lifted) / R
    # release_s after the silence began (+ at most one block)
    assert index + GATE.release_s * R <= reported <= index + GATE.release_s * R + BLOCK
    assert g.state == "idle" and g.since_index == index
    # and the needle dropping again starts a new play
    events2, _ = [], None
    more = np.concatenate([music["st_chipdisko"][: 3 * R]])
    for i in range(0, len(more), BLOCK):
        events2 += g.update(more[i : i + BLOCK], len(sig) + i)
    assert [e.kind for e in events2] == ["playing"]


def test_gate_is_block_size_independent(music):
    sig = np.concatenate([groove(2.0, 10), music["hw_beach"][: 5 * R], groove(1.2, 11), music["st_chipdisko"][: 4 * R], groove(6.0, 12)])
    results = []
    for bs in (256, 1024, 4410):
        g = Gate(GATE, R)
        ev = []
        for i in range(0, len(sig), bs):
            ev += g.update(sig[i : i + bs], i)
        results.append(ev)
    assert [e.kind for e in results[0]] == ["playing", "gap_end", "idle"]
    for ev in results[1:]:
        assert [e.kind for e in ev] == [e.kind for e in results[0]]
        for e, ref in zip(ev, results[0]):
            assert abs(e.index - ref.index) <= 4410 + 256


# ------------------------------------------------------------- ClipScheduler


def test_clip_schedule_needle_drop_recheck_after_gap(music):
    cfg = ClipConfig(seconds=8, first_after_s=3, recheck_s=5)
    a = np.concatenate([music["hw_beach"], music["etr_credits_ballad"][: 5 * R]])  # 32 s
    b = music["st_chipdisko"][:12 * R]
    lead, gap = groove(3.0, 13), groove(1.5, 14)
    sig = np.concatenate([lead, a, gap, b, groove(7.0, 15)])
    events, clips = run(sig, Gate(GATE, R), ClipScheduler(cfg, R))
    assert kinds(events) == ["playing", "gap_end", "idle"]
    play_i, gap_i = events[0][1], events[1][1]
    reasons = [c.reason for c, _ in clips]
    # needle drop at +3 s, rechecks every 5 s while track 1 plays, after_gap 3 s into track 2,
    # then rechecks until the needle is lifted
    assert reasons[0] == "needle_drop" and "after_gap" in reasons
    k = reasons.index("after_gap")
    assert set(reasons[1:k]) == {"recheck"} and len(reasons[1:k]) == 6  # (32 - 3) // 5 = 5..6
    assert set(reasons[k + 1 :]) == {"recheck"} and 1 <= len(reasons[k + 1 :]) <= 2

    first, at = clips[0]
    assert at - BLOCK < play_i + 3 * R <= at  # due first_after_s after the drop
    # starts at the drop (short pre-roll), not in the lead-in groove
    assert play_i - 0.25 * R - 1 <= first.start <= play_i
    assert first.start + len(first.samples) == at
    np.testing.assert_array_equal(first.samples, sig[first.start : at])

    recheck, at2 = clips[1]
    assert at2 - at == pytest.approx(5 * R, abs=BLOCK)
    assert len(recheck.samples) == 8 * R  # a full clip
    np.testing.assert_array_equal(recheck.samples, sig[at2 - 8 * R : at2])

    after_gap, at3 = clips[k]
    assert at3 - BLOCK < gap_i + 3 * R <= at3
    assert after_gap.start >= gap_i - 0.25 * R - 1  # none of track 1 in it
    np.testing.assert_array_equal(after_gap.samples, sig[after_gap.start : at3])

    # no later clip of track 2 reaches back into track 1
    assert all(c.start >= gap_i - 0.25 * R - 1 for c, _ in clips[k:])

    # nothing after the needle is lifted
    idle_reported = events[2][2]
    assert all(at <= idle_reported for _, at in clips)


def test_clip_downsample_to_matcher_rate(music):
    x = music["hw_beach"][: 8 * R]
    y = downsample(x, R, 8000)
    assert y.dtype == np.float32 and abs(len(y) - 8 * 8000) <= 1
    assert np.sqrt(np.mean(y**2)) == pytest.approx(np.sqrt(np.mean(x**2)), rel=0.3)


def test_scheduler_ring_wraps_and_request():
    s = ClipScheduler(ClipConfig(seconds=2, first_after_s=1, recheck_s=5), 1000)
    x = np.arange(5000, dtype=np.float32)
    for i in range(0, 3000, 300):
        s.feed(x[i : i + 300], i)
    np.testing.assert_array_equal(s.audio(0), x[1000:3000])  # only the last 2 s are held
    np.testing.assert_array_equal(s.audio(1500, 2700), x[1500:2700])
    assert s.feed(x[3000:3300], 3000, [("playing", 3000)]) == []
    clips = s.feed(x[3300:4100], 3300)
    assert [c.reason for c in clips] == ["needle_drop"] and clips[0].start == 3000 - 250
    s.request()
    clips = s.feed(x[4100:4200], 4100)
    # a full 2 s would reach back to 2200, before the music began: starts at the pre-roll
    assert [c.reason for c in clips] == ["recheck"] and clips[0].start == 2750
    np.testing.assert_array_equal(clips[0].samples, x[2750:4200])
    assert s.feed(x[4200:4300], 4200, [("idle", 4000)]) == [] and s.due is None
