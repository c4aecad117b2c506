"""Tag and cover-art reading for every library format."""

from __future__ import annotations

import base64
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vinyl_mqtt.tags import TrackInfo, find_folder_cover, parse_filename, read_tags

try:
    from media import FORMATS, available_encoders, encoder_for, harmonic, make_media, make_wav, tiny_jpeg, tiny_png
except ImportError:  # tests/ imported as a package
    from tests.media import FORMATS, available_encoders, encoder_for, harmonic, make_media, make_wav, tiny_jpeg, tiny_png

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg CLI not installed")

TAGS = dict(
    title="Ünïcode Title – “quoted”",
    artist="Ärtist & Friends",
    album="Albüm",
    album_artist="Various Ärtists",
    track=3,
    track_total=12,
    disc=2,
    disc_total=2,
    year=1979,
)


@pytest.fixture(scope="module")
def encoders() -> set[str]:
    return available_encoders()


@pytest.fixture(scope="module")
def src_wav(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tsrc")
    return make_wav(d / "src.wav", harmonic(1.0, 44100, 330.0), 44100)


def _need(encoders: set[str], fmt: str) -> None:
    if encoder_for(fmt) not in encoders:
        pytest.skip(f"ffmpeg has no encoder for {fmt}")


@needs_ffmpeg
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_tags_and_cover_round_trip(tmp_path, src_wav, encoders, fmt):
    _need(encoders, fmt)
    cover = tiny_png(5, 3)
    p = make_media(src_wav, tmp_path / "Some Folder", fmt, cover=cover, **TAGS)
    info = read_tags(p)
    assert info == TrackInfo(
        title=TAGS["title"],
        artist=TAGS["artist"],
        album=TAGS["album"],
        album_artist=TAGS["album_artist"],
        track_number=3,
        disc_number=2,
        year=1979,
        cover=cover,
        cover_mime="image/png",
        tags_from="tags",
    )
    assert info.cover == cover  # bytes identical


@needs_ffmpeg
@pytest.mark.parametrize("fmt", ["mp3", "m4a", "ogg", "flac"])
def test_jpeg_cover_and_minimal_tags(tmp_path, src_wav, encoders, fmt):
    _need(encoders, fmt)
    jpg = tiny_jpeg()
    p = make_media(src_wav, tmp_path, fmt, title="Only Title", artist=None, album=None, cover=jpg)
    info = read_tags(p)
    assert info.title == "Only Title" and info.tags_from == "tags"
    assert info.artist is None and info.album is None and info.album_artist is None
    assert info.track_number is None and info.disc_number is None and info.year is None
    assert info.cover == jpg and info.cover_mime == "image/jpeg"


@needs_ffmpeg
def test_front_cover_preferred_over_other_pictures(tmp_path, src_wav, encoders):
    _need(encoders, "flac")
    from mutagen.flac import FLAC, Picture

    p = make_media(src_wav, tmp_path, "flac", title="T", artist="A", album="B")
    f = FLAC(p)
    for kind, data in ((4, tiny_png(1, 1)), (0, tiny_png(2, 2)), (3, tiny_jpeg()), (5, tiny_png(3, 3))):
        pic = Picture()
        pic.type, pic.mime, pic.data = kind, "image/png" if kind != 3 else "image/jpeg", data
        f.add_picture(pic)
    f.save()
    info = read_tags(p)
    assert info.cover == tiny_jpeg() and info.cover_mime == "image/jpeg"


@needs_ffmpeg
def test_id3_v23_year_and_track_forms(tmp_path, src_wav, encoders):
    _need(encoders, "mp3")
    from mutagen import id3

    p = make_media(src_wav, tmp_path, "mp3", title="T", artist="A", album="B")
    t = id3.ID3(p)
    t.add(id3.TRCK(encoding=3, text=["07/15"]))
    t.add(id3.TPOS(encoding=3, text=["1/2"]))
    t.add(id3.TYER(encoding=3, text=["1984"]))
    t.add(id3.TPE1(encoding=3, text=["First", "Second"]))
    t.save(p, v2_version=3)
    info = read_tags(p)
    assert (info.track_number, info.disc_number, info.year) == (7, 1, 1984)
    assert info.artist == "First; Second" or info.artist == "First/Second"


@needs_ffmpeg
def test_vorbis_date_and_case_insensitive_keys(tmp_path, src_wav, encoders):
    _need(encoders, "ogg")
    from mutagen.oggvorbis import OggVorbis

    p = make_media(src_wav, tmp_path, "ogg", title=None, artist=None, album=None)
    f = OggVorbis(p)
    f["Title"] = "Mixed Case"
    f["date"] = "2003-05-17"
    f["TrackNumber"] = "4/9"
    f["ALBUM ARTIST"] = "Someone"
    f.save()
    info = read_tags(p)
    assert info.title == "Mixed Case" and info.year == 2003 and info.track_number == 4
    assert info.album_artist == "Someone" and info.tags_from == "tags"


# --- file-name fallback ----------------------------------------------------


@pytest.mark.parametrize(
    "name, title, artist, track, disc",
    [
        ("Artist - Title.wav", "Title", "Artist", None, None),
        ("03 Title.wav", "Title", None, 3, None),
        ("03 - Title.wav", "Title", None, 3, None),
        ("07. Some Song.wav", "Some Song", None, 7, None),
        ("12 - The Band - A Song - Live.wav", "A Song - Live", "The Band", 12, None),
        ("1-05 Disc Track.wav", "Disc Track", None, 5, 1),
        ("plain_name.wav", "plain name", None, None, None),
        ("Just a title.wav", "Just a title", None, None, None),
    ],
)
def test_parse_filename(name, title, artist, track, disc):
    g = parse_filename(Path("/music/x") / name)
    assert (g["title"], g["artist"], g["track_number"], g["disc_number"]) == (title, artist, track, disc)


def _untagged(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return make_wav(folder / name, harmonic(0.2, 8000, 200.0), 8000)


def test_filename_fallback_untagged(tmp_path, caplog):
    p = _untagged(tmp_path / "Greatest Hits", "The Artist - Song Name.wav")
    with caplog.at_level(logging.WARNING, logger="vinyl_mqtt.tags"):
        info = read_tags(p)
    assert info.tags_from == "filename"
    assert (info.title, info.artist, info.album) == ("Song Name", "The Artist", "Greatest Hits")
    assert info.cover is None and info.cover_mime is None
    assert not caplog.records  # no tags is not an error


def test_filename_track_and_disc_folder(tmp_path):
    p = _untagged(tmp_path / "Band - Record" / "CD2", "04 Fourth.wav")
    info = read_tags(p)
    assert (info.title, info.track_number, info.disc_number) == ("Fourth", 4, 2)
    assert info.album == "Band - Record"
    q = _untagged(tmp_path / "Band - Record", "Band - Fifth.wav")
    assert read_tags(q).album == "Record"  # "Artist - Album" folder, artist known


@needs_ffmpeg
def test_title_tag_present_means_no_filename_guessing(tmp_path, src_wav, encoders):
    _need(encoders, "flac")
    p = make_media(src_wav, tmp_path / "Folder Album", "flac", title="Tagged", artist=None,
                   album=None, name="09 Other - Name")
    info = read_tags(p)
    assert info.tags_from == "tags"
    assert (info.title, info.artist, info.album, info.track_number) == ("Tagged", None, None, None)


@needs_ffmpeg
def test_no_title_tag_keeps_other_tags(tmp_path, src_wav, encoders):
    _need(encoders, "m4a")
    p = make_media(src_wav, tmp_path / "Dir", "m4a", title=None, artist="Tag Artist",
                   album="Tag Album", track=6, name="File Artist - File Title")
    info = read_tags(p)
    assert info.tags_from == "filename"
    assert (info.title, info.artist, info.album, info.track_number) == (
        "File Title", "Tag Artist", "Tag Album", 6)


@needs_ffmpeg
def test_wav_riff_info(tmp_path, src_wav):
    p = tmp_path / "info.wav"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src_wav), "-c:a", "pcm_s16le",
         "-metadata", "title=Info Title", "-metadata", "artist=Info Artist",
         "-metadata", "album=Info Album", "-metadata", "track=5", "-metadata", "date=1999",
         str(p)],
        check=True,
    )
    info = read_tags(p)
    assert (info.title, info.artist, info.album, info.track_number, info.year) == (
        "Info Title", "Info Artist", "Info Album", 5, 1999)
    assert info.tags_from == "tags"


# --- folder cover art --------------------------------------------------------


def test_folder_cover(tmp_path):
    d = tmp_path / "Album"
    p = _untagged(d, "01 One.wav")
    (d / "AlbumArtSmall.jpg").write_bytes(b"\xff\xd8\xff small")
    info = read_tags(p)
    assert info.cover == b"\xff\xd8\xff small" and info.cover_mime == "image/jpeg"
    (d / "AlbumArt_{X}_Large.jpg").write_bytes(b"\xff\xd8\xff large large large")
    assert read_tags(p).cover == b"\xff\xd8\xff large large large"
    png = tiny_png()
    (d / "Folder.PNG").write_bytes(png)
    info = read_tags(p)
    assert info.cover == png and info.cover_mime == "image/png"
    jpg = tiny_jpeg()
    (d / "COVER.jpg").write_bytes(jpg)
    info = read_tags(p)
    assert info.cover == jpg and info.cover_mime == "image/jpeg"
    assert find_folder_cover(d).name == "COVER.jpg"
    assert find_folder_cover(tmp_path / "nowhere") is None


@needs_ffmpeg
def test_embedded_cover_beats_folder_cover(tmp_path, src_wav, encoders):
    _need(encoders, "opus")
    d = tmp_path / "A"
    p = make_media(src_wav, d, "opus", title="T", artist="A", album="B", cover=tiny_png(2, 2))
    (d / "cover.jpg").write_bytes(tiny_jpeg())
    info = read_tags(p)
    assert info.cover == tiny_png(2, 2) and info.cover_mime == "image/png"


# --- broken files ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content",
    [
        ("Noise Maker - Random.mp3", np.random.default_rng(5).bytes(5000)),
        ("Noise Maker - Random.flac", np.random.default_rng(6).bytes(5000)),
        ("Noise Maker - Random.m4a", np.random.default_rng(8).bytes(5000)),
        ("Noise Maker - Random.ogg", b"just some text\n" * 20),
        ("Noise Maker - Random.opus", b"OggS" + bytes(60)),
        ("Noise Maker - Random.wav", b"RIFF\x10\x00\x00\x00WAVEjunkjunk"),
        ("Noise Maker - Random.aac", b""),
    ],
)
def test_broken_files_fall_back_to_filename(tmp_path, caplog, name, content):
    d = tmp_path / "Broken Album"
    d.mkdir()
    p = d / name
    p.write_bytes(content)
    (d / "front.png").write_bytes(tiny_png())
    with caplog.at_level(logging.WARNING, logger="vinyl_mqtt.tags"):
        info = read_tags(p)
    assert (info.title, info.artist, info.album) == ("Random", "Noise Maker", "Broken Album")
    assert info.tags_from == "filename"
    assert info.cover == tiny_png() and info.cover_mime == "image/png"
    assert any(str(p) in r.getMessage() for r in caplog.records)


@needs_ffmpeg
def test_id3_salvaged_when_audio_is_garbage(tmp_path, src_wav, encoders):
    _need(encoders, "mp3")
    from mutagen import id3

    good = make_media(src_wav, tmp_path, "mp3", title="Kept", artist="Still", album="Here")
    tag = id3.ID3(good)
    p = tmp_path / "garbage.mp3"
    p.write_bytes(np.random.default_rng(9).bytes(3000))
    tag.save(p)  # valid ID3 in front of garbage
    info = read_tags(p)
    assert (info.title, info.artist, info.album, info.tags_from) == ("Kept", "Still", "Here", "tags")


@needs_ffmpeg
def test_bad_picture_block_is_skipped(tmp_path, src_wav, encoders, caplog):
    _need(encoders, "ogg")
    from mutagen.oggvorbis import OggVorbis

    d = tmp_path / "Alb"
    p = make_media(src_wav, d, "ogg", title="T", artist="A", album="B")
    f = OggVorbis(p)
    f["METADATA_BLOCK_PICTURE"] = [base64.b64encode(b"\x00\x00\x00\x03short").decode()]
    f.save()
    (d / "cover.png").write_bytes(tiny_png())
    with caplog.at_level(logging.WARNING, logger="vinyl_mqtt.tags"):
        info = read_tags(p)
    assert info.title == "T" and info.cover == tiny_png()
    assert any(str(p) in r.getMessage() for r in caplog.records)


def test_trackinfo_is_frozen_and_repr_hides_cover():
    info = TrackInfo(title="t", artist=None, album=None, album_artist=None, track_number=None,
                     disc_number=None, year=None, cover=b"\x89PNG" * 1000, cover_mime="image/png",
                     tags_from="tags")
    with pytest.raises(AttributeError):
        info.title = "x"  # type: ignore[misc]
    assert "PNG" not in repr(info)
