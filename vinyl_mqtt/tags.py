"""Track metadata and cover art for library ingest.

:func:`read_tags` reads what the file's tags say (via mutagen) and falls back
to the file and folder names when there is no title tag.  It never raises for
missing or broken tags: a file whose tags cannot be parsed is described from
its name, and a warning names the file and the reason.

Supported tag systems: ID3 (MP3, WAV ``id3 `` chunk, AIFF), MP4 atoms
(M4A/MP4/AAC-in-MP4), Vorbis comments (Ogg Vorbis, Opus, FLAC, Ogg FLAC) with
FLAC picture blocks and base64 ``METADATA_BLOCK_PICTURE``, and RIFF ``INFO``
lists in WAV (parsed here; mutagen does not read them).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mutagen
from mutagen.flac import Picture

from .images import sniff_image_mime

log = logging.getLogger(__name__)

__all__ = ["TrackInfo", "read_tags", "parse_filename", "find_folder_cover"]

FRONT_COVER = 3  # ID3 / FLAC picture type "Cover (front)"


@dataclass(frozen=True)
class TrackInfo:
    title: str
    artist: str | None = None
    album: str | None = None
    album_artist: str | None = None
    track_number: int | None = None
    disc_number: int | None = None
    year: int | None = None
    cover: bytes | None = field(default=None, repr=False)
    cover_mime: str | None = None
    tags_from: str = "tags"  # "tags" or "filename"


# --------------------------------------------------------------------------
# small parsers


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).replace("\x00", "").strip()
    return s or None


def _join(values: Any) -> str | None:
    """Tag value(s) -> one string; several values are joined with '; '."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        values = [values]
    parts: list[str] = []
    for v in values:
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        c = _clean(v)
        if c and c not in parts:
            parts.append(c)
    return "; ".join(parts) or None


_LEADING_INT = re.compile(r"\s*0*(\d{1,4})")


def _number(value: Any) -> int | None:
    """'3', '03', '3/12', 3, (3, 12) -> 3; 'A1', '', 0 -> None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return _number(value[0]) if value else None
    if isinstance(value, int):
        return value if value > 0 else None
    m = _LEADING_INT.match(str(value))
    if not m:
        return None
    n = int(m.group(1))
    return n if n > 0 else None


_YEAR = re.compile(r"(?<!\d)(\d{4})(?!\d)")


def _year(value: Any) -> int | None:
    """'2001', '2001-05-01', '2001-05-01T10:00', 2001 -> 2001."""
    s = _join(value)
    if not s:
        return None
    m = _YEAR.search(s)
    if not m:
        return None
    y = int(m.group(1))
    return y if 1000 <= y <= 2999 else None


_MIME_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "jpg": "image/jpeg",
                 "jpeg": "image/jpeg", "png": "image/png", "image/x-png": "image/png"}


def _mime(data: bytes, declared: str | None = None) -> str | None:
    """The image's real type when recognisable, else the declared one."""
    sniffed = sniff_image_mime(data)
    if sniffed:
        return sniffed
    d = (declared or "").strip().lower()
    d = _MIME_ALIASES.get(d, d)
    return d if d.startswith("image/") else None


# --------------------------------------------------------------------------
# file name fallback

_DISC_TRACK = re.compile(r"^(\d{1,2})[-.](\d{1,3})(?:\s*[-._]\s*|\s+)(.+)$")
_TRACK = re.compile(r"^(\d{1,3})(?:\s*[-._)]\s*|\s+)(.+)$")
_DISC_DIR = re.compile(r"^(?:cd|disc|disk)[\s._-]*(\d{1,2})$", re.I)


def parse_filename(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Guess title/artist/track/disc from a file name.

    ``"Artist - Title.ext"`` -> artist, title; ``"03 Title.ext"`` /
    ``"03 - Title"`` / ``"03. Title"`` -> track 3; ``"1-03 Title"`` -> disc 1,
    track 3; combinations (``"03 - Artist - Title"``) work; anything else is
    the title.
    """
    stem = Path(path).stem.strip()
    if " " not in stem and "_" in stem:
        stem = stem.replace("_", " ")
    out: dict[str, Any] = {"title": None, "artist": None, "track_number": None,
                           "disc_number": None}
    rest = stem
    m = _DISC_TRACK.match(rest)
    if m:
        out["disc_number"] = _number(m.group(1))
        out["track_number"] = _number(m.group(2))
        rest = m.group(3)
    else:
        m = _TRACK.match(rest)
        if m:
            out["track_number"] = _number(m.group(1))
            rest = m.group(2)
    if " - " in rest:
        artist, title = rest.split(" - ", 1)
        if artist.strip() and title.strip():
            out["artist"] = artist.strip()
            rest = title
    out["title"] = rest.strip() or stem or Path(path).name
    return out


def _folder_album(path: Path, artist: str | None) -> tuple[str | None, int | None]:
    """Album (and disc, for .../Album/CD2/track) from the parent folder name."""
    parent = path.parent
    name = parent.name
    disc = None
    m = _DISC_DIR.match(name)
    if m and parent.parent.name:
        disc = int(m.group(1)) or None
        name = parent.parent.name
    if not name:
        return None, disc
    if artist and " - " in name:
        head, tail = name.split(" - ", 1)
        if head.strip().lower() == artist.lower() and tail.strip():
            name = tail
    return name.strip() or None, disc


# --------------------------------------------------------------------------
# folder cover art

_COVER_EXTS = (".jpg", ".jpeg", ".png")
_COVER_STEMS = ("cover", "folder", "front", "album")


def find_folder_cover(directory: str | os.PathLike[str]) -> Path | None:
    """An album image next to the tracks: cover/folder/front/album .jpg/.jpeg/.png
    (in that order of preference, case-insensitive), else albumart*.jpg
    (largest file, i.e. AlbumArt_{...}_Large before _Small)."""
    try:
        with os.scandir(directory) as it:
            files = {e.name.lower(): e.path for e in it if e.is_file()}
    except OSError:
        return None
    for stem in _COVER_STEMS:
        for ext in _COVER_EXTS:
            hit = files.get(stem + ext)
            if hit:
                return Path(hit)
    albumart = [p for n, p in files.items() if n.startswith("albumart") and n.endswith((".jpg", ".jpeg"))]
    if albumart:
        def size(p: str) -> int:
            try:
                return os.path.getsize(p)
            except OSError:
                return -1
        return Path(max(sorted(albumart), key=size))
    return None


def _folder_cover(path: Path) -> tuple[bytes, str] | None:
    img = find_folder_cover(path.parent)
    if img is None:
        return None
    try:
        data = img.read_bytes()
    except OSError as e:
        log.warning("%s: cannot read cover image: %s", img, e)
        return None
    if not data:
        return None
    mime = _mime(data) or ("image/png" if img.suffix.lower() == ".png" else "image/jpeg")
    return data, mime


# --------------------------------------------------------------------------
# tag systems -> a plain dict


def _pick_picture(pics: list[tuple[int, bytes, str | None]]) -> tuple[bytes, str | None] | None:
    """(type, data, mime) candidates -> front cover first, else type 0 ('other'),
    else the first."""
    pics = [p for p in pics if p[1]]
    if not pics:
        return None
    for want in (FRONT_COVER, 0):
        for t, data, mime in pics:
            if t == want:
                return data, mime
    return pics[0][1], pics[0][2]


def _from_id3(tags: Any) -> dict[str, Any]:
    def text(*frame_ids: str) -> str | None:
        for fid in frame_ids:
            frame = tags.get(fid)
            if frame is not None:
                v = _join(getattr(frame, "text", None))
                if v:
                    return v
        return None

    pics = []
    for apic in tags.getall("APIC"):
        if apic.mime == "-->":  # a URL, not image data
            continue
        pics.append((int(apic.type), bytes(apic.data), apic.mime))
    return {
        "title": text("TIT2"),
        "artist": text("TPE1"),
        "album": text("TALB"),
        "album_artist": text("TPE2"),
        "track_number": _number(text("TRCK")),
        "disc_number": _number(text("TPOS")),
        "year": _year(text("TDRC", "TYER", "TDOR", "TORY", "TDRL")),
        "pictures": pics,
    }


def _from_mp4(tags: Any) -> dict[str, Any]:
    def text(key: str) -> str | None:
        return _join(tags.get(key))

    pics = []
    for c in tags.get("covr") or []:
        declared = {13: "image/jpeg", 14: "image/png", 27: "image/bmp"}.get(
            getattr(c, "imageformat", None)
        )
        pics.append((FRONT_COVER, bytes(c), declared))
    return {
        "title": text("\xa9nam"),
        "artist": text("\xa9ART"),
        "album": text("\xa9alb"),
        "album_artist": text("aART"),
        "track_number": _number(tags.get("trkn")),
        "disc_number": _number(tags.get("disk")),
        "year": _year(tags.get("\xa9day")),
        "pictures": pics,
    }


def _from_vorbis(tags: Any, path: Path, flac_pictures: list[Any]) -> dict[str, Any]:
    def text(*keys: str) -> str | None:
        for k in keys:
            try:
                v = _join(tags.get(k))
            except (KeyError, ValueError):
                v = None
            if v:
                return v
        return None

    pics = [(int(p.type), bytes(p.data), p.mime) for p in flac_pictures]
    for b64 in tags.get("metadata_block_picture") or []:
        try:
            pic = Picture(base64.b64decode(b64))
        except (binascii.Error, ValueError, TypeError, mutagen.MutagenError, IndexError) as e:
            log.warning("%s: unreadable METADATA_BLOCK_PICTURE: %s", path, e)
            continue
        except Exception as e:  # mutagen raises assorted errors on bad data
            log.warning("%s: unreadable METADATA_BLOCK_PICTURE: %s", path, e)
            continue
        pics.append((int(pic.type), bytes(pic.data), pic.mime))
    if not pics:  # old-style COVERART (base64 image) + COVERARTMIME
        for b64 in tags.get("coverart") or []:
            try:
                data = base64.b64decode(b64)
            except (binascii.Error, ValueError):
                continue
            pics.append((FRONT_COVER, data, text("coverartmime")))
    track = text("tracknumber", "track")
    return {
        "title": text("title"),
        "artist": text("artist"),
        "album": text("album"),
        "album_artist": text("albumartist", "album artist", "album_artist"),
        "track_number": _number(track),
        "disc_number": _number(text("discnumber", "disc")),
        "year": _year(text("date", "year", "originaldate", "originalyear")),
        "pictures": pics,
    }


def _riff_info(path: Path) -> dict[str, Any]:
    """RIFF LIST/INFO tags of a WAV file (INAM, IART, IPRD, ITRK/IPRT, ICRD)."""
    found: dict[str, str] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return {}
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            hdr = f.read(8)
            if len(hdr) < 8:
                break
            cid, clen = hdr[:4], int.from_bytes(hdr[4:], "little")
            if cid == b"LIST" and clen >= 4 and clen < (1 << 24):
                body = f.read(clen)
                if body[:4] == b"INFO":
                    i = 4
                    while i + 8 <= len(body):
                        sid, slen = body[i:i + 4], int.from_bytes(body[i + 4:i + 8], "little")
                        raw = body[i + 8:i + 8 + slen].split(b"\x00", 1)[0]
                        for enc in ("utf-8", "latin-1"):
                            try:
                                found[sid.decode("latin-1")] = raw.decode(enc).strip()
                                break
                            except UnicodeDecodeError:
                                continue
                        i += 8 + slen + (slen & 1)
            pos += 8 + clen + (clen & 1)
    if not found:
        return {}
    return {
        "title": _clean(found.get("INAM")),
        "artist": _clean(found.get("IART")),
        "album": _clean(found.get("IPRD")),
        "album_artist": None,
        "track_number": _number(found.get("ITRK") or found.get("IPRT") or found.get("TRCK")),
        "disc_number": None,
        "year": _year(found.get("ICRD")),
        "pictures": [],
    }


def _extract(mf: Any, path: Path) -> dict[str, Any]:
    """mutagen FileType -> plain dict of whatever its tags hold."""
    from mutagen.id3 import ID3
    from mutagen.mp4 import MP4Tags
    from mutagen._vorbis import VComment

    tags = mf.tags
    if isinstance(tags, ID3):
        return _from_id3(tags)
    if isinstance(tags, MP4Tags):
        return _from_mp4(tags)
    if isinstance(tags, VComment):
        return _from_vorbis(tags, path, list(getattr(mf, "pictures", None) or []))
    if tags is None and getattr(mf, "pictures", None):  # FLAC with pictures only
        return _from_vorbis({}, path, list(mf.pictures))
    return {}


# --------------------------------------------------------------------------
# public entry point


def read_tags(path: str | os.PathLike[str]) -> TrackInfo:
    """Metadata and cover art of one library file; never raises for tag
    problems (only a path that cannot be read at all still yields filename
    metadata and a warning)."""
    p = Path(path)
    meta: dict[str, Any] = {}
    try:
        mf = mutagen.File(p, easy=False)
    except Exception as e:
        mf = None
        meta = _salvage_id3(p)
        log.warning("%s: cannot read tags (%s: %s)%s", p, type(e).__name__, e,
                    "; ID3 tag read directly" if meta else "; using the file name")
    else:
        if mf is None:
            log.warning("%s: cannot read tags (format not recognised); using the file name", p)
        else:
            try:
                meta = _extract(mf, p)
            except Exception as e:
                meta = {}
                log.warning("%s: cannot read tags (%s: %s); using the file name",
                            p, type(e).__name__, e)
    if not meta.get("title") and p.suffix.lower() in (".wav", ".wave"):
        try:
            info = _riff_info(p)
        except Exception as e:  # pragma: no cover - defensive
            info = {}
            log.warning("%s: cannot read RIFF INFO: %s", p, e)
        if info.get("title"):
            pics = meta.get("pictures") or []
            meta = {k: meta.get(k) or v for k, v in info.items()}
            meta["pictures"] = pics
    return _build(p, meta)


def _salvage_id3(p: Path) -> dict[str, Any]:
    """mutagen.File fails on an MP3 whose audio it cannot sync to even when the
    ID3 tag in front is fine: read that tag on its own."""
    try:
        from mutagen.id3 import ID3

        return _from_id3(ID3(p))
    except Exception:
        return {}


def _build(p: Path, meta: dict[str, Any]) -> TrackInfo:
    title = meta.get("title")
    artist = meta.get("artist")
    album = meta.get("album")
    track = meta.get("track_number")
    disc = meta.get("disc_number")
    if title:
        tags_from = "tags"
    else:
        tags_from = "filename"
        guess = parse_filename(p)
        title = guess["title"]
        artist = artist or guess["artist"]
        track = track or guess["track_number"]
        disc = disc or guess["disc_number"]
        if not album:
            album, folder_disc = _folder_album(p, artist)
            disc = disc or folder_disc

    cover = cover_mime = None
    picked = _pick_picture(meta.get("pictures") or [])
    if picked:
        cover = picked[0]
        cover_mime = _mime(cover, picked[1])
    else:
        found = _folder_cover(p)
        if found:
            cover, cover_mime = found

    return TrackInfo(
        title=title,
        artist=artist,
        album=album,
        album_artist=meta.get("album_artist"),
        track_number=track,
        disc_number=disc,
        year=meta.get("year"),
        cover=cover,
        cover_mime=cover_mime,
        tags_from=tags_from,
    )
