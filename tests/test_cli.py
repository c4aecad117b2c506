"""The `vinyl-mqtt` command line: identify, library add/list/stats/remove,
--db and --config, and the errors a user sees."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vinyl_mqtt.cli import main

try:
    from conftest import LIBRARY, SIM_RATE, UNKNOWN, cut, data_file
    from media import make_wav
except ImportError:  # tests/ imported as a package
    from tests.conftest import LIBRARY, SIM_RATE, UNKNOWN, cut, data_file
    from tests.media import make_wav

IDENTIFY_KEYS = {"file", "matched", "title", "artist", "album", "library_path", "confidence",
                 "offset_s", "speed", "elapsed_ms"}
CLIP_NAME, CLIP_START = "st_chipdisko", 6.73


@pytest.fixture(scope="module")
def clips(tmp_path_factory, excerpts):
    """A library clip (worn, 2 % fast), an unknown clip and a corrupt file."""
    d = tmp_path_factory.mktemp("clips")
    y = cut(excerpts[CLIP_NAME], CLIP_START, 8.0, "worn_plus2", seed=11)
    known = make_wav(d / "known clip.wav", np.stack([y, 0.9 * y], axis=1), SIM_RATE)
    unknown = make_wav(d / "unknown.wav", cut(excerpts[UNKNOWN[1]], 1.11, 8.0, "good_deck", seed=12), SIM_RATE)
    corrupt = d / "corrupt.mp3"
    corrupt.write_bytes(np.random.default_rng(3).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    return known, unknown, corrupt


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# --------------------------------------------------------------------------- identify


def test_identify_json_batch(library, clips, capsys):
    known, unknown, corrupt = clips
    rc = main(["identify", "--db", str(library.db), "--json", str(known), str(unknown), str(corrupt)])
    out = _lines(capsys.readouterr().out)
    assert [o["file"] for o in out] == [str(known), str(unknown), str(corrupt)]
    for o in out:
        assert IDENTIFY_KEYS <= o.keys(), o
    hit, miss, bad = out
    title, artist, album = LIBRARY[CLIP_NAME]
    assert hit["matched"] is True and "error" not in hit
    assert (hit["title"], hit["artist"], hit["album"]) == (title, artist, album)
    assert hit["library_path"].endswith(f"{CLIP_NAME}.ogg") and Path(hit["library_path"]).is_absolute()
    assert hit["offset_s"] == pytest.approx(CLIP_START, abs=0.2)
    assert hit["speed"] == pytest.approx(1.02, abs=0.003)
    assert 0.5 < hit["confidence"] <= 1.0 and hit["elapsed_ms"] > 0
    assert miss["matched"] is False and "error" not in miss
    assert miss["title"] is None and miss["library_path"] is None and miss["confidence"] < 0.5
    assert bad["matched"] is False and isinstance(bad["error"], str) and bad["error"]
    assert rc == 2  # a file could not be read


def test_identify_text(library, clips, capsys):
    known, unknown, _ = clips
    assert main(["identify", "--db", str(library.db), str(known), str(unknown)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].startswith(f"{known}: Mortimer Twang — Mortimer's Chipdisko")
    speed = float(re.search(r"speed ([+-][0-9.]+) %", out[0]).group(1))
    assert abs(speed - 2.0) <= 0.2, out[0]  # worn deck: wow and crackle blur it a little
    assert out[1] == f"{unknown}: no match"


def test_identify_subprocess_streams_json_lines(library, clips):
    known, unknown, _ = clips
    r = subprocess.run(
        [sys.executable, "-m", "vinyl_mqtt.cli", "identify", "--json", "--db", str(library.db), str(unknown), str(known)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = _lines(r.stdout)
    assert [o["matched"] for o in out] == [False, True]
    assert out[1]["title"] == LIBRARY[CLIP_NAME][0]


def test_identify_very_short_file(library, clips, tmp_path, capsys):
    known, _, _ = clips
    short = make_wav(tmp_path / "blip.wav", np.full(2000, 0.1, np.float32), SIM_RATE)  # 45 ms
    rc = main(["identify", "--db", str(library.db), "--json", str(short), str(known)])
    out = _lines(capsys.readouterr().out)
    assert len(out) == 2 and out[0]["matched"] is False and out[1]["matched"] is True
    assert rc in (0, 2)


def test_identify_without_a_library(tmp_path, clips, capsys):
    known, _, _ = clips
    db = tmp_path / "nothing" / "library.sqlite"
    assert main(["identify", "--db", str(db), str(known)]) == 2
    err = capsys.readouterr().err
    assert str(db) in err and "library add" in err
    assert not db.exists() and not db.parent.exists()  # nothing created by looking
    assert main(["library", "list", "--db", str(db)]) == 2
    assert main(["library", "stats", "--db", str(db)]) == 2
    assert not db.exists()


def test_identify_missing_file(library, tmp_path, capsys):
    missing = tmp_path / "no such clip.wav"
    assert main(["identify", "--db", str(library.db), "--json", str(missing)]) == 2
    (o,) = _lines(capsys.readouterr().out)
    assert o["file"] == str(missing) and o["matched"] is False and o["error"]


# --------------------------------------------------------------------------- library commands


def _music(folder: Path, names) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy2(data_file(name), folder / f"{name}.ogg")
    return folder


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_library_commands_with_db(tmp_path, capsys):
    db = tmp_path / "lib.sqlite"
    names = ["etr_credits_ballad", "st_clavelian_march", "fb_introzik"]
    music = _music(tmp_path / "music", names)

    rc, out, _ = _run(capsys, "library", "add", "--workers", "1", "-q", "--db", str(db), str(music))
    assert rc == 0 and out.startswith("3 added") and "0 failed" in out
    rc, out, _ = _run(capsys, "library", "add", "--workers", "1", "-q", "--db", str(db), str(music))
    assert rc == 0 and out.startswith("0 added") and "3 already in" in out

    rc, out, _ = _run(capsys, "library", "list", "--db", str(db))
    assert rc == 0 and len(out.splitlines()) == 3
    assert "Kristian Picon — Extreme Tux Racer — Credits Ballad" in out and "[0:27]" in out
    rc, out, _ = _run(capsys, "library", "list", "--json", "--db", str(db))
    listed = _lines(out)
    assert sorted(Path(t["path"]).stem for t in listed) == sorted(names)
    assert all(t["n_hashes"] > 0 and t["duration_s"] == pytest.approx(27, abs=0.1) for t in listed)

    rc, out, _ = _run(capsys, "library", "stats", "--json", "--db", str(db))
    stats = json.loads(out)
    assert rc == 0 and stats["tracks"] == 3 and stats["hashes"] == sum(t["n_hashes"] for t in listed)
    assert stats["hours"] == pytest.approx(3 * 27 / 3600, abs=1e-3) and stats["size_bytes"] > 0
    rc, out, _ = _run(capsys, "library", "stats", "--db", str(db))
    assert rc == 0 and "tracks     3" in out and f"hashes     {stats['hashes']}" in out

    gone = next(t for t in listed if "clavelian" in t["path"])
    rc, out, _ = _run(capsys, "library", "remove", "--db", str(db), str(gone["id"]))
    assert rc == 0 and "removed 1 track(s)" in out
    rc, out, _ = _run(capsys, "library", "list", "--json", "--db", str(db))
    assert sorted(t["id"] for t in _lines(out)) == sorted(t["id"] for t in listed if t is not gone)
    rc, out, _ = _run(capsys, "library", "remove", "--db", str(db), str(music / "fb_introzik.ogg"))
    assert rc == 0 and "removed 1 track(s)" in out
    rc, out, _ = _run(capsys, "library", "remove", "--db", str(db), str(music))
    assert rc == 0 and "removed 1 track(s)" in out
    rc, out, _ = _run(capsys, "library", "stats", "--json", "--db", str(db))
    assert json.loads(out)["tracks"] == 0


def test_library_add_reports_failures(tmp_path, capsys):
    db = tmp_path / "lib.sqlite"
    music = _music(tmp_path / "music", ["hw_beach"])
    (music / "broken.flac").write_bytes(b"fLaC" + bytes(3000))
    rc, out, err = _run(capsys, "library", "add", "--workers", "1", "--db", str(db), str(music))
    assert rc == 0 and out.startswith("1 added") and "1 failed" in out
    assert f"failed: {(music / 'broken.flac').resolve()}: " in err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.mp3").write_bytes(b"\0" * 100)
    rc, out, err = _run(capsys, "library", "add", "--workers", "1", "--db", str(tmp_path / "other.sqlite"), str(only_bad))
    assert rc == 1 and "x.mp3" in err  # nothing could be added
    rc, out, err = _run(capsys, "library", "add", "--db", str(db), str(tmp_path / "nowhere"))
    assert rc == 2 and "nowhere" in err


def test_library_commands_with_config(tmp_path, capsys, clips, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the relative db is taken from the config's folder, not here
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    config = conf_dir / "vinyl.yaml"
    config.write_text("library:\n  db: data/lib.sqlite\n")
    music = _music(tmp_path / "music", ["st_chipdisko", "hw_castle"])

    rc, out, _ = _run(capsys, "library", "add", "--workers", "1", "--config", str(config), str(music))
    assert rc == 0 and out.startswith("2 added")
    assert (conf_dir / "data" / "lib.sqlite").exists() and not (tmp_path / "data").exists()
    rc, out, _ = _run(capsys, "library", "list", "--json", "--config", str(config))
    assert sorted(Path(t["path"]).stem for t in _lines(out)) == ["hw_castle", "st_chipdisko"]
    rc, out, _ = _run(capsys, "library", "stats", "--json", "--config", str(config))
    assert json.loads(out)["tracks"] == 2
    known = clips[0]
    rc, out, _ = _run(capsys, "identify", "--json", "--config", str(config), str(known))
    assert rc == 0 and _lines(out)[0]["title"] == "Mortimer's Chipdisko"
    # --db wins over the config's
    rc, out, _ = _run(capsys, "library", "stats", "--json", "--config", str(config), "--db", str(tmp_path / "x.sqlite"))
    assert rc == 2  # that one does not exist
    rc, out, _ = _run(capsys, "library", "remove", "--config", str(config), str(music))
    assert rc == 0 and "removed 2 track(s)" in out


@pytest.mark.parametrize(
    "text,key",
    [
        ("library:\n  dbb: lib.sqlite\n", "library.dbb"),
        ("libary:\n  db: lib.sqlite\n", "libary"),
    ],
)
@pytest.mark.parametrize("command", [["library", "add", "MUSIC"], ["library", "list"], ["identify", "CLIP"]])
def test_config_typo_is_an_error(tmp_path, capsys, clips, text, key, command):
    config = tmp_path / "vinyl.yaml"
    config.write_text(text)
    music = _music(tmp_path / "music", ["hw_beach"])
    argv = [{"MUSIC": str(music), "CLIP": str(clips[0])}.get(a, a) for a in command]
    rc, out, err = _run(capsys, *argv, "--config", str(config))
    assert rc == 2
    assert str(config) in err and key in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("**/*.sqlite"))  # nothing was written anywhere near


@pytest.mark.parametrize("text,what", [("library: [db\n", "not valid YAML"), ("- a\n- b\n", "mapping")])
def test_config_not_yaml_mapping(tmp_path, capsys, text, what):
    config = tmp_path / "vinyl.yaml"
    config.write_text(text)
    rc, out, err = _run(capsys, "library", "list", "--config", str(config))
    assert rc == 2 and str(config) in err and what in err


def test_config_missing_file(tmp_path, capsys):
    config = tmp_path / "absent.yaml"
    rc, out, err = _run(capsys, "library", "stats", "--config", str(config))
    assert rc == 2 and str(config) in err
