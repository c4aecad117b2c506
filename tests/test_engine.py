"""The recognition engine on real music: fingerprint + matcher against a library.

Clips are cut from the library excerpts, played through the turntable
simulator at a capture rate (44.1 kHz, with a fixed seed) and handed to the
matcher through :func:`vinyl_mqtt.fingerprint.prepare`, so the resampling
path a captured clip takes is the one exercised.  Start positions are chosen
off the fingerprint's frame grid (a clip starting on a multiple of 32 ms would
reproduce the library's frames exactly and score unrealistically high).
"""

from __future__ import annotations

import av
import numpy as np
import pytest

from vinyl_mqtt import fingerprint as fp
from vinyl_mqtt import turntable
from vinyl_mqtt.matcher import Index, Match
from vinyl_mqtt.turntable import CONDITIONS

try:
    from conftest import LIBRARY, MARGIN_S, SIM_RATE, UNKNOWN, cut, data_file
except ImportError:  # tests/ imported as a package
    from tests.conftest import LIBRARY, MARGIN_S, SIM_RATE, UNKNOWN, cut, data_file

CLIP_S = 10.0
OFFSET_TOL_S = 0.2
# One start per library excerpt (seconds into the excerpt; off the 32 ms frame grid).
STARTS = {name: round(1.37 + 1.61 * i, 2) for i, name in enumerate(LIBRARY)}
RPM = {"33_at_45": "33 at 45", "45_at_33": "45 at 33"}

# The microphone conditions lose a 10 s clip now and then ("don't know", never a
# wrong track), so they are judged on two clips of every excerpt: at least this
# many of the 16 must be identified (measured with these seeds: room 11/16,
# worn_belt_noisy_room 8/16; at 15 s, 16/16 and 14/16). The bar for a match
# rises with the clip's length (zero false matches in the benchmark's 19,000
# not-in-library clips), which costs the room a clip that scored 16.
MIN_IDENTIFIED = {"room": 11, "worn_belt_noisy_room": 7}


def clips_for(condition: str) -> list[tuple[str, float, int]]:
    """(excerpt, start, seed) of the clips a condition is judged on."""
    ci = list(CONDITIONS).index(condition)
    out = []
    for ei, (name, start) in enumerate(STARTS.items()):
        out.append((name, start, 1000 * ci + ei))
        if condition in MIN_IDENTIFIED:
            second = round((start + 6.11) % 12.0 + 0.2, 2)
            out.append((name, second, 1000 * ci + ei + 100))
    return out


def identify(index: Index, y: np.ndarray, rate: int = SIM_RATE) -> Match:
    return index.match(fp.prepare(y, rate))


def describe(name: str, m: Match, start: float | None = None) -> str:
    off = f" offset {m.offset_s:.2f} (cut at {start:.2f})" if start is not None else ""
    return (f"{name}: track {m.track_id} score {m.score} runner-up {m.runner_up} "
            f"conf {m.confidence:.2f} speed {m.speed:.4f}{off}")


# --------------------------------------------------------------------------- conditions


def _run_condition(library, excerpts, condition):
    """(identified, problems, report lines) for the condition's clips."""
    c = CONDITIONS[condition]
    found, problems, lines = 0, [], []
    for name, start, seed in clips_for(condition):
        m = identify(library.index, cut(excerpts[name], start, CLIP_S, condition, seed))
        lines.append(describe(name, m, start))
        if m.track_id is None:
            continue
        if m.track_id != library.ids[name]:
            problems.append("WRONG TRACK " + lines[-1])
            continue
        found += 1
        if abs(m.offset_s - start) > OFFSET_TOL_S:
            problems.append("offset " + lines[-1])
        if m.rpm_mistake != RPM.get(condition):
            problems.append(f"rpm_mistake {m.rpm_mistake!r} " + lines[-1])
        if abs(m.speed / c.speed - 1) > 0.01:
            problems.append("speed " + lines[-1])
    return found, problems, lines


@pytest.mark.parametrize("condition", list(CONDITIONS))
def test_condition_identified(library, excerpts, condition):
    """10 s clips of every library excerpt under each playback condition: the right
    track, at the right place (in track time), with the 33/45 mix-up told."""
    found, problems, lines = _run_condition(library, excerpts, condition)
    n = len(lines)
    print(f"\n[{condition}] {found}/{n} identified\n  " + "\n  ".join(lines))
    assert not problems, "\n".join(problems)
    need = MIN_IDENTIFIED.get(condition, n)
    assert found >= need, f"{condition}: {found}/{n} identified, need {need}\n" + "\n".join(lines)


@pytest.mark.xfail(
    strict=True,
    reason="weak spot: through a room microphone some 10 s clips are not identified "
    "(room ~80-92 %, worn_belt_noisy_room ~50-67 %; 'don't know', never a wrong track)",
)
@pytest.mark.parametrize("condition", list(MIN_IDENTIFIED))
def test_microphone_condition_every_clip(library, excerpts, condition):
    found, problems, lines = _run_condition(library, excerpts, condition)
    assert not problems and found == len(lines), "\n".join(lines)


def test_offset_along_the_track(library, excerpts):
    """Clean and worn clips from many places: the offset says where, in track time."""
    name = "st_clavelian_march"
    for cond in ("clean", "worn_plus2", "worn_minus2"):
        for k, start in enumerate(np.arange(0.23, 15.0, 1.37)):
            start = float(start)
            m = identify(library.index, cut(excerpts[name], start, CLIP_S, cond, seed=k))
            assert m.track_id == library.ids[name], describe(name, m, start)
            assert abs(m.offset_s - start) <= OFFSET_TOL_S, describe(name, m, start)


# --------------------------------------------------------------------------- speed


def _speed_errors(library, excerpts, factor: float, seconds: float = CLIP_S) -> list[tuple[str, float]]:
    """(clip, measured - true speed) for two clips of every library excerpt played at ``factor``."""
    out = []
    for i, name in enumerate(LIBRARY):
        for start in (STARTS[name], STARTS[name] + 0.71):
            i0 = int(round(start * SIM_RATE))
            seg = excerpts[name][i0 : i0 + int(round((seconds * factor + MARGIN_S) * SIM_RATE))]
            y = turntable.speed(seg, SIM_RATE, factor)[: int(round(seconds * SIM_RATE))]
            m = identify(library.index, y)
            assert m.track_id == library.ids[name], describe(name, m, start)
            out.append((f"{name}@{start:.2f}", m.speed - factor))
    return out


SPEED_TOL = {1.008: 0.001, 0.992: 0.001, 1.02: 0.0015, 0.98: 0.0015, 1.03: 0.0015, 0.97: 0.0015}
_PRECISION = pytest.mark.xfail(
    strict=True,
    reason="weak spot: speed error on 10 s clips is ~0.03 % median, but about 1 clip in 16 is "
    "0.10-0.12 % off, just outside +-0.1 %: the query's peak times jitter by ~0.3 frame",
)


@pytest.mark.parametrize("factor", list(SPEED_TOL))
def test_speed_estimate_typical(library, excerpts, factor):
    """The measured speed on 10 s clips: unbiased, typically well inside the
    tolerance (1.008: +-0.1 %; +-2 %, +-3 %: +-0.15 %), never far outside it."""
    tol = SPEED_TOL[factor]
    errs = _speed_errors(library, excerpts, factor)
    d = np.array([e for _, e in errs])
    print(f"\nspeed {factor}: error % median |e| {np.median(np.abs(d)) * 100:.3f} "
          f"max |e| {np.abs(d).max() * 100:.3f} mean {d.mean() * 100:+.3f}")
    assert np.median(np.abs(d)) <= 0.7 * tol, errs
    assert abs(d.mean()) <= 0.3 * tol, errs  # no bias
    assert np.abs(d).max() <= 2 * tol, errs


@pytest.mark.parametrize(
    "factor",
    [pytest.param(f, marks=_PRECISION) if f in (1.008, 0.992) else f for f in SPEED_TOL],
)
def test_speed_estimate_every_clip(library, excerpts, factor):
    """Every one of 16 clips within the tolerance."""
    tol = SPEED_TOL[factor]
    errs = _speed_errors(library, excerpts, factor)
    outside = [(clip, round(e * 100, 3)) for clip, e in errs if abs(e) > tol]
    assert not outside, f"outside +-{tol * 100:.2f} %: {outside}"


# --------------------------------------------------------------------------- don't know


@pytest.mark.parametrize("name", UNKNOWN)
def test_not_in_library_is_unknown(library, excerpts, name):
    """Other music: the whole excerpt, and 5 s / 10 s clips, clean and worn, give None."""
    x = excerpts[name]
    checked = [("whole", x)]
    for cond in ("clean", "good_deck", "worn_plus2", "worn_minus2", "33_at_45", "45_at_33"):
        for k, (start, secs) in enumerate(((0.41, 10.0), (0.37, 5.0), (3.29, 5.0), (6.13, 5.0))):
            if start + secs * CONDITIONS[cond].speed + MARGIN_S > len(x) / SIM_RATE:
                continue
            checked.append((f"{cond} {secs:.0f}s@{start}", cut(x, start, secs, cond, seed=k)))
    worst = None
    for label, y in checked:
        m = identify(library.index, y)
        assert m.track_id is None, f"{name} {label} matched " + describe(name, m)
        if worst is None or m.score > worst[1].score:
            worst = (label, m)
    print(f"\n{name}: {len(checked)} clips, none matched; highest score {worst[1].score} "
          f"({worst[0]}), confidence {worst[1].confidence:.2f}")


def _noises():
    rng = np.random.default_rng(5)
    n = int(10 * SIM_RATE)
    silence = np.zeros(n, np.float32)
    yield "digital silence", silence
    yield "dither", (rng.standard_normal(n) * 1e-5).astype(np.float32)
    for level in (0.01, 0.3):
        yield f"white hiss {level}", (rng.standard_normal(n) * level).astype(np.float32)
    yield "hissing groove", turntable.hiss(silence, 30.0, rng)
    yield "crackle only", turntable.crackle(silence, SIM_RATE, 25.0, -22.0, rng, pops_per_s=0.5)
    yield "crackle on hiss", turntable.crackle(
        turntable.hiss(silence, 20.0, rng), SIM_RATE, 12.0, -28.0, rng, pops_per_s=0.3)
    yield "rumble only", turntable.rumble(silence + 0.01, SIM_RATE, 0.0, rng)
    yield "empty room", turntable.room(silence, SIM_RATE, 0.6, 15.0, rng)
    yield "half a second", (rng.standard_normal(SIM_RATE // 2) * 0.1).astype(np.float32)


@pytest.mark.parametrize("label,y", list(_noises()), ids=lambda v: v if isinstance(v, str) else "")
def test_noise_is_unknown(library, label, y):
    m = identify(library.index, y)
    assert m.track_id is None, describe(label, m)
    assert m.confidence < 0.5


@pytest.mark.parametrize("seconds", [0.0, 0.05, 0.12])
def test_clip_shorter_than_a_frame_is_unknown(library, seconds):
    y = (np.random.default_rng(1).standard_normal(int(seconds * SIM_RATE)) * 0.1).astype(np.float32)
    m = identify(library.index, y)
    assert m.track_id is None


# --------------------------------------------------------------------------- one code path


def _decode_stereo(path) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 and rate, straight from PyAV: no downmix, no resampling."""
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        rate = stream.rate
        parts = [f.to_ndarray() for f in c.decode(stream)]
    a = np.concatenate(parts, axis=1)  # planar float: (channels, frames)
    return np.ascontiguousarray(a.T, dtype=np.float32), rate


def _decode_mono_8k(path) -> np.ndarray:
    """The same audio as an 8 kHz mono capture would deliver it (PyAV's own resampler)."""
    res = av.AudioResampler(format="flt", layout="mono", rate=fp.SAMPLE_RATE)
    out = []
    with av.open(str(path)) as c:
        for frame in c.decode(c.streams.audio[0]):
            out += [f.to_ndarray().reshape(-1) for f in res.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in res.resample(None)]
    return np.concatenate(out).astype(np.float32)


def test_stereo_44k_and_mono_8k_fingerprints_agree(library):
    name = "st_clavelian_march"
    stereo, rate = _decode_stereo(data_file(name))
    assert stereo.shape[1] == 2 and rate == 44100
    assert not np.allclose(stereo[:, 0], stereo[:, 1])  # really two different channels
    mono8 = _decode_mono_8k(data_file(name))
    a = fp.fingerprint(fp.prepare(stereo, rate))
    b = fp.fingerprint(fp.prepare(mono8, fp.SAMPLE_RATE))
    assert abs(a.duration_s - b.duration_s) < 0.05

    def pairs(p):
        return set(zip(p.hashes.tolist(), p.times.tolist()))

    common = len(pairs(a) & pairs(b)) / max(len(pairs(a) | pairs(b)), 1)
    stored = library.store.db.execute(
        "SELECT fingerprint, duration_s FROM tracks WHERE id=?", (library.ids[name],)).fetchone()
    lib = fp.TrackPrints.from_bytes(stored[0], stored[1])
    common_lib = len(pairs(a) & pairs(lib)) / max(len(pairs(a) | pairs(lib)), 1)
    print(f"\nshared (hash, time) pairs: 44.1k stereo vs 8k mono {common:.2f}, vs library file {common_lib:.2f}")
    assert common >= 0.85 and common_lib >= 0.85
    # Each identifies the other: same track, offset 0, speed 1.
    for x, r in ((stereo, rate), (mono8, fp.SAMPLE_RATE)):
        m = Index([1], [b if x is stereo else a]).match(fp.prepare(x, r))
        assert m.track_id == 1 and abs(m.offset_s) < 0.05 and abs(m.speed - 1) < 0.001, m
    # And a 10 s window of either, against the library, lands on the same place.
    ma = identify(library.index, stereo[int(5.55 * rate): int(15.55 * rate)], rate)
    mb = identify(library.index, mono8[int(5.55 * 8000): int(15.55 * 8000)], fp.SAMPLE_RATE)
    assert ma.track_id == mb.track_id == library.ids[name]
    assert abs(ma.offset_s - 5.55) < 0.05 and abs(mb.offset_s - 5.55) < 0.05
    assert abs(ma.speed - mb.speed) < 0.002


def test_library_file_path_is_the_clip_path(library):
    """A library file is decoded and fingerprinted exactly as ingest stored it."""
    from vinyl_mqtt.audio import decode

    name = "hw_beach"
    p = fp.fingerprint(decode(data_file(name), fp.SAMPLE_RATE))
    blob = library.store.db.execute(
        "SELECT fingerprint, n_hashes FROM tracks WHERE id=?", (library.ids[name],)).fetchone()
    assert blob[1] == len(p.hashes) and bytes(blob[0]) == p.to_bytes()


# --------------------------------------------------------------------------- short clips


def test_two_second_clips(library, excerpts):
    """2 s clean clips: most are identified, none wrongly."""
    found, lines = 0, []
    for name, start in STARTS.items():
        for k, s in enumerate((start, start + 7.43)):
            m = identify(library.index, cut(excerpts[name], s, 2.0, "clean", seed=k))
            lines.append(describe(name, m, s))
            assert m.track_id in (None, library.ids[name]), "WRONG TRACK " + lines[-1]
            if m.track_id is not None:
                assert abs(m.offset_s - s) <= OFFSET_TOL_S, lines[-1]
                found += 1
    print(f"\n2 s clean clips: {found}/{len(lines)} identified\n  " + "\n  ".join(lines))
    assert found >= 0.75 * len(lines), "\n".join(lines)


# --------------------------------------------------------------------------- the index


def _zipf_hashes(n: int, seed: int) -> np.ndarray:
    """Sorted hashes as music makes them: a few very common, most rare; some share top bits."""
    rng = np.random.default_rng(seed)
    vocab = rng.integers(0, 1 << 32, size=max(n // 3, 1), dtype=np.uint32)
    vocab[: len(vocab) // 10] &= np.uint32(0xFFFF0000)  # crowd a few buckets
    return np.sort(vocab[np.minimum(rng.zipf(1.3, size=n) - 1, len(vocab) - 1)])


@pytest.mark.parametrize("bits,chunk", [(16, 1 << 24), (16, 64), (20, 1 << 10)])
def test_bucket_table_is_where_each_bucket_starts(bits, chunk):
    from vinyl_mqtt.matcher import _bucket_table

    hashes = _zipf_hashes(200_000, bits)
    start, sizes = _bucket_table(hashes, bits, chunk)
    firsts = np.arange(1 << bits, dtype=np.uint64) << np.uint64(32 - bits)
    expected = np.searchsorted(hashes.astype(np.uint64), firsts)
    assert np.array_equal(start[:-1], expected) and start[-1] == len(hashes)
    counts = np.diff(start.astype(np.int64))
    assert np.array_equal(sizes[1:], np.bincount(counts)[1:])


@pytest.mark.parametrize("n", [1_000, 300_000])
def test_index_finds_every_entry_with_the_key_and_nothing_else(n):
    """Entries keep only the hash bits their bucket does not say: a lookup must
    still return exactly the entries whose full hash equals the key."""
    hashes = _zipf_hashes(n, n)
    pos = np.random.default_rng(1).permutation(n).astype(np.uint32)
    index = Index.from_sorted([1], [n / 125.0], [0], hashes, pos)
    rng = np.random.default_rng(2)
    keys = np.concatenate([rng.choice(hashes, 300), hashes[:5] ^ np.uint32(1),
                           rng.integers(0, 1 << 32, 300, dtype=np.uint32)])
    key_idx, entry = index._lookup(keys)
    for k in range(len(keys)):
        want = set(np.flatnonzero(hashes == keys[k]).tolist())
        if len(want) > index.max_bucket:
            continue  # a stop word: its bucket is skipped on purpose
        assert set(entry[key_idx == k].tolist()) == want, (k, keys[k])


def test_every_entry_is_placed_in_its_own_track():
    """Tracks of very different lengths (a jingle among long sides): each entry's
    track and frame are where the track layout put it."""
    rng = np.random.default_rng(3)
    lengths = rng.choice([40, 400, 4_000, 40_000], size=300)
    starts = np.concatenate([[0], np.cumsum(lengths[:-1] + Index.GAP)])
    track = rng.integers(0, len(lengths), 50_000)
    frame = (rng.random(50_000) * lengths[track]).astype(np.int64)
    pos = (starts[track] + frame).astype(np.uint32)
    hashes = rng.integers(0, 1 << 32, 50_000, dtype=np.uint32)
    order = np.argsort(hashes)
    index = Index.from_sorted(np.arange(len(lengths)), lengths / 125.0, starts, hashes[order], pos[order])
    got_track, got_frame = index._locate(np.arange(50_000))
    assert np.array_equal(got_track, track[order])
    assert np.allclose(got_frame, frame[order] / fp.TIME_UNITS)


def test_index_built_from_a_stream_that_outgrows_its_announced_size(library, excerpts):
    """A store that grows while it is read (ingest running) still loads whole:
    the builder takes more entries than announced and matches as Index does."""
    from vinyl_mqtt.matcher import IndexBuilder

    rows = library.store.db.execute("SELECT id, duration_s, fingerprint FROM tracks ORDER BY id").fetchall()
    prints = [fp.TrackPrints.from_bytes(b, d) for _, d, b in rows]
    builder = IndexBuilder(len(prints[0].hashes))  # announces one track's worth
    for (track_id, _, _), p in zip(rows, prints):
        builder.add(track_id, p)
    streamed, whole = builder.build(), Index([r[0] for r in rows], prints)
    assert streamed.entries == whole.entries == sum(len(p.hashes) for p in prints)
    name, start = "hw_beach", 3.3
    clip = cut(excerpts[name], start, CLIP_S, "good_deck", 5)
    a, b = identify(streamed, clip), identify(whole, clip)
    assert a.track_id == b.track_id == library.ids[name]
    assert (a.score, a.offset_s, a.speed) == (b.score, b.offset_s, b.speed)
