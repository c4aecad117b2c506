"""Library ingest: every format, tags and covers, bad files, re-runs, moves,
an interrupted run, and removing tracks.

Files are made from the real excerpts in tests/data with tests/media.py
(ffmpeg encodes, mutagen tags); each format gets a different excerpt, so a
clip of it can only match that one file.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vinyl_mqtt import fingerprint as fp
from vinyl_mqtt import library as library_mod
from vinyl_mqtt.audio import decode
from vinyl_mqtt.cli import main
from vinyl_mqtt.library import ingest
from vinyl_mqtt.store import Store

try:
    from conftest import LIBRARY, SIM_RATE, UNKNOWN, cut, data_file
    from media import FORMATS, available_encoders, encoder_for, make_media, make_wav, tiny_jpeg, tiny_png
except ImportError:  # tests/ imported as a package
    from tests.conftest import LIBRARY, SIM_RATE, UNKNOWN, cut, data_file
    from tests.media import FORMATS, available_encoders, encoder_for, make_media, make_wav, tiny_jpeg, tiny_png

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg CLI not installed")

SEG_START_S, SEG_S = 3.0, 12.0  # each format file holds this part of its excerpt
SOURCE = dict(zip(FORMATS, LIBRARY))  # format -> excerpt it is made from


def _tags(i: int, fmt: str) -> dict:
    return dict(
        title=f"Title {fmt} – ü", artist=f"Artist {i}", album=f"Album {fmt}",
        album_artist=f"Album Artist {i}", track=i + 1, disc=(i % 2) + 1, year=1990 + i,
    )


def _cover(i: int) -> bytes:
    return tiny_png(rgb=(10 * i, 200, 30)) if i % 2 else tiny_jpeg()[:-2] + bytes([i]) + b"\xff\xd9"


@pytest.fixture(scope="module")
def media(tmp_path_factory, excerpts):
    """One tagged file with an embedded cover per available format, in music/."""
    root = tmp_path_factory.mktemp("media")
    music = root / "music"
    encoders = available_encoders()
    made = {}
    for i, (fmt, name) in enumerate(SOURCE.items()):
        if encoder_for(fmt) not in encoders:
            continue
        x = excerpts[name]
        wav = make_wav(root / f"{name}.wav", x[int(SEG_START_S * SIM_RATE): int((SEG_START_S + SEG_S) * SIM_RATE)], SIM_RATE)
        path = make_media(wav, music, fmt, cover=_cover(i), name=f"{i:02d} {name}", **_tags(i, fmt))
        made[fmt] = (path, _tags(i, fmt), _cover(i))
    assert len(made) >= 4, f"too few encoders: {sorted(encoders)}"
    return music, made


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _by_path(store: Store) -> dict[str, object]:
    return {t.path: t for t in store.tracks()}


# --------------------------------------------------------------------------- every format


def test_ingest_every_format(tmp_path, media, excerpts):
    music, made = media
    with Store(tmp_path / "lib.sqlite") as store:
        report = ingest(store, [music], workers=1)
        assert report.failed == []
        assert report.added == len(made) and report.skipped == 0 and report.moved == 0
        assert report.audio_seconds == pytest.approx(SEG_S * len(made), abs=0.5 * len(made))
        tracks = _by_path(store)
        index = store.load_index()
        for fmt, (path, tags, cover) in made.items():
            t = tracks[str(path.resolve())]
            got = dict(title=t.title, artist=t.artist, album=t.album, album_artist=t.album_artist,
                       track=t.track_number, disc=t.disc_number, year=t.year)
            assert got == tags, fmt
            assert t.duration_s == pytest.approx(SEG_S, abs=0.1), fmt
            assert t.cover_id is not None, fmt
            mime, data = store.cover(t.cover_id)
            assert data == cover, fmt
            assert mime == ("image/png" if cover.startswith(b"\x89PNG") else "image/jpeg"), fmt
            # A worn 6 s clip from the middle of the file's music names this file.
            start = SEG_START_S + 4.37
            m = index.match(fp.prepare(cut(excerpts[SOURCE[fmt]], start, 6.0, "worn_plus2", seed=3), SIM_RATE))
            assert m.track_id == t.id, (fmt, m)
            assert abs(m.offset_s - (start - SEG_START_S)) <= 0.2, (fmt, m)
        assert store.stats().covers == len(made)


def test_folder_cover_when_no_embedded_picture(tmp_path, media, excerpts):
    album = tmp_path / "Some Artist - Some Album"
    album.mkdir()
    folder_cover = tiny_png(rgb=(1, 2, 3))
    (album / "cover.png").write_bytes(folder_cover)
    src = make_wav(tmp_path / "src.wav", excerpts["hw_castle"][: 8 * SIM_RATE], SIM_RATE)
    bare = make_media(src, album, "flac", title="Bare", artist="A", album="B", cover=None, name="01 bare")
    embedded = tiny_jpeg()
    own = make_media(src, album, "ogg", title="Own", artist="A", album="B", cover=embedded, name="02 own")
    with Store(tmp_path / "lib.sqlite") as store:
        report = ingest(store, [album], workers=1)
        assert report.added == 2 and report.failed == []
        tracks = _by_path(store)
        assert store.cover(tracks[str(bare.resolve())].cover_id) == ("image/png", folder_cover)
        assert store.cover(tracks[str(own.resolve())].cover_id) == ("image/jpeg", embedded)


# --------------------------------------------------------------------------- bad files


def test_corrupt_files_are_reported_and_the_rest_added(tmp_path, media):
    music, made = media
    folder = _copy(music, tmp_path / "music")
    garbage = folder / "garbage.mp3"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 60_000, dtype=np.uint8).tobytes())
    truncated = folder / "truncated.flac"
    flac = made["flac"][0].read_bytes()
    truncated.write_bytes(flac[: len(flac) // 2])
    empty = folder / "empty.ogg"
    empty.write_bytes(b"")
    with Store(tmp_path / "lib.sqlite") as store:
        report = ingest(store, [folder], workers=1)
        failed = dict(report.failed)
        print("\nfailed:", report.failed)
        assert set(failed) == {str(p.resolve()) for p in (garbage, truncated, empty)}
        assert all(isinstance(r, str) and r.strip() for r in failed.values())
        assert report.added == len(made)
        stored = {Path(p).name for p in _by_path(store)}
        assert stored.isdisjoint({"garbage.mp3", "truncated.flac", "empty.ogg"})
        assert len(stored) == len(made)


def test_parallel_workers_report_the_same(tmp_path, media):
    """Two worker processes: same tracks, and a bad file still only reported."""
    music, made = media
    folder = _copy(music, tmp_path / "music")
    (folder / "garbage.ogg").write_bytes(b"OggS" + bytes(5000))
    with Store(tmp_path / "lib.sqlite") as store:
        report = ingest(store, [folder], workers=2)
        assert report.added == len(made)
        assert [Path(p).name for p, _ in report.failed] == ["garbage.ogg"]
        assert all(t.n_hashes > 0 for t in store.tracks())


# --------------------------------------------------------------------------- re-runs and moves


class _Spy:
    """Counts calls of functions in vinyl_mqtt.library and file opens under a folder."""

    def __init__(self, monkeypatch, folder: Path):
        self.calls: dict[str, int] = {}
        self.opened: list[str] = []
        self.folder = str(folder.resolve())
        for name in ("content_hash", "decode", "read_tags"):
            self._wrap(monkeypatch, library_mod, name)
        self._wrap(monkeypatch, fp, "fingerprint")
        _OPEN_WATCH.append(self)

    def _wrap(self, monkeypatch, mod, name):
        real = getattr(mod, name)

        def spy(*a, **k):
            self.calls[name] = self.calls.get(name, 0) + 1
            return real(*a, **k)

        monkeypatch.setattr(mod, name, spy)

    def close(self):
        _OPEN_WATCH.remove(self)


_OPEN_WATCH: list[_Spy] = []


def _audit(event, args):
    if event == "open" and _OPEN_WATCH and args and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.fsdecode(args[0])
        for spy in _OPEN_WATCH:
            if p.startswith(spy.folder):
                spy.opened.append(p)


sys.addaudithook(_audit)  # cannot be removed: inert while nothing is watched


def test_reingest_skips_without_reading(tmp_path, media, monkeypatch):
    music, made = media
    folder = _copy(music, tmp_path / "music")
    with Store(tmp_path / "lib.sqlite") as store:
        first = ingest(store, [folder], workers=1)
        assert first.added == len(made)
        before = {t.id: t for t in store.tracks()}
        generation = store.generation
        spy = _Spy(monkeypatch, folder)
        try:
            again = ingest(store, [folder], workers=1)
        finally:
            spy.close()
        assert (again.added, again.skipped, again.moved, again.failed) == (0, len(made), 0, [])
        assert spy.calls == {} and spy.opened == [], (spy.calls, spy.opened)
        assert {t.id: t for t in store.tracks()} == before
        assert store.generation == generation


def test_moved_file_is_repointed_not_refingerprinted(tmp_path, media, monkeypatch):
    music, made = media
    folder = _copy(music, tmp_path / "music")
    with Store(tmp_path / "lib.sqlite") as store:
        ingest(store, [folder], workers=1)
        old = folder / made["ogg"][0].name
        track = _by_path(store)[str(old.resolve())]
        (folder / "moved").mkdir()
        new = folder / "moved" / "renamed.ogg"
        old.rename(new)
        spy = _Spy(monkeypatch, folder)
        try:
            report = ingest(store, [folder], workers=1)
        finally:
            spy.close()
        assert (report.added, report.moved, report.skipped, report.failed) == (0, 1, len(made) - 1, [])
        assert spy.calls == {"content_hash": 1}, spy.calls  # hashed, not decoded nor fingerprinted
        assert spy.opened == [str(new.resolve())]  # (and the spy does see files being read)
        moved = store.track(track.id)
        assert moved.path == str(new.resolve())
        assert moved.content_hash == track.content_hash and moved.n_hashes == track.n_hashes
        assert len(store.tracks()) == len(made)


def test_same_bytes_twice_is_one_track(tmp_path, media):
    music, made = media
    folder = _copy(music, tmp_path / "music")
    shutil.copy2(made["mp3"][0], folder / "copy of it.mp3")
    with Store(tmp_path / "lib.sqlite") as store:
        report = ingest(store, [folder], workers=1)
        assert report.added == len(made) and report.skipped == 1
        assert len(store.tracks()) == len(made)


# --------------------------------------------------------------------------- interrupted ingest


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("vinyl-mqtt")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vinyl_mqtt.cli"]


def _count(db: Path) -> int | None:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2) as c:
            return c.execute("SELECT COUNT(*) FROM tracks").fetchone()[0]
    except sqlite3.Error:
        return None  # not created yet, or the schema is being written


def _kill_after_first_track(cmd: list[str], db: Path) -> int | None:
    """Run cmd, SIGKILL it once db holds a track; tracks then stored (None: it finished first)."""
    log = db.with_suffix(".log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            n = _count(db)
            if n:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait()
        log.close()
    if proc.returncode != -signal.SIGKILL:
        assert proc.returncode == 0, db.with_suffix(".log").read_text()
        return None
    return _count(db)


def test_interrupted_ingest_leaves_a_sound_store(tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    for name in (*LIBRARY, *UNKNOWN):
        shutil.copy2(data_file(name), music / f"{name}.ogg")
    extra = shutil.copy2(data_file("hw_beach"), music / "hw_beach (other tags).ogg")
    from mutagen.oggvorbis import OggVorbis

    f = OggVorbis(extra)
    f["title"] = ["Beach, tagged again"]
    f.save()
    total = len(LIBRARY) + len(UNKNOWN) + 1
    assert total == 12

    for attempt in range(3):  # the run may, rarely, finish before it could be stopped
        db = tmp_path / f"lib{attempt}.sqlite"
        kept = _kill_after_first_track([*_cli(), "library", "add", "--workers", "1", "--db", str(db), str(music)], db)
        if kept is not None:
            break
    else:
        pytest.fail("library add finished every time before it could be killed")
    print(f"\nkilled with {kept}/{total} tracks stored")
    assert 1 <= kept < total

    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = c.execute("SELECT id, n_hashes, length(fingerprint), duration_s FROM tracks").fetchall()
        assert len(rows) == kept
        for track_id, n_hashes, nbytes, duration in rows:
            assert n_hashes > 0 and nbytes == 8 * n_hashes and duration > 1, track_id
        generation = int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
        assert generation == kept  # one bump per committed track, none half-done

    with Store(db) as store:
        report = ingest(store, [music], workers=1)
        assert report.failed == []
        assert report.added == total - kept and report.skipped == kept
        tracks = store.tracks()
        assert len(tracks) == total
        assert len({t.path for t in tracks}) == total and len({t.content_hash for t in tracks}) == total
        assert len(store.load_index()) == total


# --------------------------------------------------------------------------- remove and stats


def _stats_agree(store: Store) -> None:
    s = store.stats()
    tracks = store.tracks()
    assert s.tracks == len(tracks)
    assert s.hashes == sum(t.n_hashes for t in tracks)
    assert s.hours == pytest.approx(sum(t.duration_s for t in tracks) / 3600)
    assert s.covers == len({t.cover_id for t in tracks if t.cover_id is not None})
    assert s.size_bytes >= store.path.stat().st_size > 0
    assert store.load_index().entries == s.hashes


def test_remove_by_id_and_by_folder(tmp_path, media, capsys):
    music, made = media
    a = _copy(music, tmp_path / "album")
    b = tmp_path / "album2"  # a folder whose name starts like the other one
    b.mkdir()
    for name in UNKNOWN:
        shutil.copy2(data_file(name), b / f"{name}.ogg")
    db = tmp_path / "lib.sqlite"
    with Store(db) as store:
        report = ingest(store, [a, b], workers=1)
        assert report.failed == [] and report.added == len(made) + len(UNKNOWN)
        _stats_agree(store)
        covers = store.stats().covers
        in_a = [t for t in store.tracks() if Path(t.path).parent == a.resolve()]
        in_b = [t for t in store.tracks() if Path(t.path).parent == b.resolve()]
        assert len(in_a) == len(made) and len(in_b) == len(UNKNOWN)

    one = in_b[0]
    assert main(["library", "remove", "--db", str(db), str(one.id)]) == 0
    assert "removed 1 track(s)" in capsys.readouterr().out
    with Store(db, create=False) as store:
        assert store.track(one.id) is None
        assert len(store.tracks()) == len(made) + len(UNKNOWN) - 1
        _stats_agree(store)

    assert main(["library", "remove", "--db", str(db), str(a)]) == 0
    assert f"removed {len(in_a)} track(s)" in capsys.readouterr().out
    with Store(db, create=False) as store:
        assert {t.id for t in store.tracks()} == {t.id for t in in_b[1:]}  # album2 untouched
        _stats_agree(store)
        assert covers == len(made) and store.stats().covers == 0  # their covers went with them
        assert len(store.load_index()) == len(in_b) - 1

    assert main(["library", "remove", "--db", str(db), "999999", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "999999" in err and "nowhere" in err
    with Store(db, create=False) as store:
        assert len(store.tracks()) == len(in_b) - 1


def test_touched_file_is_read_once(tmp_path, media, monkeypatch):
    music, made = media
    folder = _copy(music, tmp_path / "music")
    with Store(tmp_path / "lib.sqlite") as store:
        ingest(store, [folder], workers=1)
        touched = folder / made["flac"][0].name
        st = touched.stat()
        os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        first = ingest(store, [folder], workers=1)  # may read it once, to see it is the same
        assert (first.added, first.skipped, first.failed) == (0, len(made), [])
        spy = _Spy(monkeypatch, folder)
        try:
            again = ingest(store, [folder], workers=1)
        finally:
            spy.close()
        assert (again.added, again.skipped) == (0, len(made))
        assert spy.calls == {} and spy.opened == [], (spy.calls, spy.opened)


def test_retagged_file_replaces_its_track(tmp_path, excerpts):
    from mutagen.oggvorbis import OggVorbis

    music = tmp_path / "music"
    music.mkdir()
    for name in LIBRARY:
        shutil.copy2(data_file(name), music / f"{name}.ogg")
    path = music / "hw_castle.ogg"
    with Store(tmp_path / "lib.sqlite") as store:
        ingest(store, [music], workers=1)
        f = OggVorbis(path)
        f["title"] = ["Castle (tag fixed)"]
        f.save()
        report = ingest(store, [music], workers=1)
        assert report.failed == []
        same_path = [t for t in store.tracks() if t.path == str(path.resolve())]
        m = store.load_index().match(fp.prepare(cut(excerpts["hw_castle"], 5.37, 10.0, "good_deck", seed=1), SIM_RATE))
        assert [t.title for t in same_path] == ["Castle (tag fixed)"], [(t.id, t.title) for t in same_path]
        assert m.track_id == same_path[0].id, m
        assert len(store.tracks()) == len(LIBRARY)


def test_silent_file_is_reported_not_added(tmp_path):
    """A track no clip could ever match is a failure to report, not a dead entry."""
    folder = tmp_path / "music"
    folder.mkdir()
    make_wav(folder / "silence.wav", np.zeros(44100 * 5, np.float32), 44100)
    with Store(tmp_path / "lib.sqlite") as store:
        report = ingest(store, [folder], workers=1)
        assert report.added == 0
        assert [Path(p).name for p, _ in report.failed] == ["silence.wav"]
        assert "no music" in report.failed[0][1]
        assert store.tracks() == []


def test_remove_numeric_folder_name_is_a_folder(tmp_path, media, monkeypatch):
    """`library remove 2024` means the folder 2024 when there is one, not track id 2024."""
    music, made = media
    folder = _copy(music, tmp_path / "2024")
    with Store(tmp_path / "lib.sqlite") as store:
        ingest(store, [folder], workers=1)
        monkeypatch.chdir(tmp_path)
        assert sorted(store.find("2024")) == sorted(t.id for t in store.tracks())
        assert store.find("2024") != []
