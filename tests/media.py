"""Test helper: make small audio files in every library format.

Audio is encoded with the ffmpeg CLI; tags and the front cover are written
with mutagen afterwards (more dependable across formats than ffmpeg's own
tag/attached-picture muxing).  Not a test module.
"""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import wave
import zlib
from pathlib import Path

import numpy as np

# format -> (file extension, ffmpeg codec arguments)
FORMATS: dict[str, tuple[str, list[str]]] = {
    "mp3": (".mp3", ["-c:a", "libmp3lame", "-b:a", "128k"]),
    "flac": (".flac", ["-c:a", "flac"]),
    "m4a": (".m4a", ["-c:a", "aac", "-b:a", "128k"]),
    "ogg": (".ogg", ["-c:a", "libvorbis", "-q:a", "4"]),
    "opus": (".opus", ["-c:a", "libopus", "-b:a", "96k"]),
    "wav": (".wav", ["-c:a", "pcm_s16le"]),
}

ENCODERS = {"libmp3lame", "flac", "aac", "libvorbis", "libopus", "pcm_s16le"}


def have_ffmpeg() -> bool:
    return shutil.which("ffmpeg") is not None


def available_encoders() -> set[str]:
    """Which of the encoders used here this machine's ffmpeg has."""
    if not have_ffmpeg():
        return set()
    out = subprocess.run(
        ["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True, check=False
    ).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ENCODERS:
            found.add(parts[1])
    return found


def encoder_for(fmt: str) -> str:
    args = FORMATS[fmt][1]
    return args[args.index("-c:a") + 1]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def tiny_png(width: int = 4, height: int = 4, rgb: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    """A valid, small RGB PNG (no PIL needed)."""
    row = b"\x00" + bytes(rgb) * width  # filter type 0 + pixels
    raw = row * height
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw, 9))
        + _png_chunk(b"IEND", b"")
    )


def tiny_jpeg() -> bytes:
    """A valid 2x2 baseline JPEG (fixed bytes, made once with ffmpeg's mjpeg)."""
    return base64.b64decode(
        "/9j/4AAQSkZJRgABAgAAAQABAAD/2wBDAAgKCgsKCw0NDQ0NDRAPEBAQEBAQEBAQEBASEhIVFRUSEhIQ"
        "EBISFBQVFRcXFxUVFRUXFxkZGR4eHBwjIyQrKzP/xABLAAEBAAAAAAAAAAAAAAAAAAAABQEBAAAAAAAA"
        "AAAAAAAAAAAABhABAAAAAAAAAAAAAAAAAAAAABEBAAAAAAAAAAAAAAAAAAAAAP/AABEIAAIAAgMBIgAC"
        "EQADEQD/2gAMAwEAAhEDEQA/AIIB2Ov/2Q=="
    )


def image_mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    raise ValueError("cover must be PNG or JPEG")


def harmonic(seconds: float, rate: int, f0: float = 440.0, channels: int = 2) -> np.ndarray:
    """Deterministic harmonic test signal, (frames, channels) float in [-1, 1].

    Fundamental ``f0`` is the strongest partial; channels differ slightly in
    phase so a downmix is not a trivial copy.
    """
    t = np.arange(int(round(seconds * rate))) / rate
    out = np.empty((t.size, channels))
    for c in range(channels):
        sig = np.zeros_like(t)
        for k, amp in ((1, 0.5), (2, 0.2), (3, 0.12), (5, 0.06)):
            sig += amp * np.sin(2 * np.pi * k * f0 * t + 0.3 * c * k)
        out[:, c] = sig
    env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)  # 20 ms fade in/out
    return out * env[:, None] * 0.9


def make_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Write 16-bit PCM WAV; ``samples`` is 1-D mono or (frames, channels),
    float in [-1, 1] or int16."""
    path = Path(path)
    a = np.asarray(samples)
    if a.ndim == 1:
        a = a[:, None]
    if a.dtype.kind == "f":
        a = np.round(np.clip(a, -1.0, 1.0) * 32767).astype("<i2")
    else:
        a = a.astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(a.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(a).tobytes())
    return path


def encode(src: Path, dst: Path, fmt: str, extra: list[str] | None = None) -> Path:
    """Encode ``src`` to ``dst`` in ``fmt`` with ffmpeg, without any metadata."""
    cmd = [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-i", str(src), "-map", "0:a", "-map_metadata", "-1",
        *FORMATS[fmt][1], *(extra or []),
    ]
    if fmt == "mp3":
        cmd += ["-id3v2_version", "0", "-write_id3v1", "0"]
    elif fmt in ("ogg", "opus"):
        cmd += ["-fflags", "+bitexact"]
    cmd.append(str(dst))
    subprocess.run(cmd, check=True, capture_output=True)
    return dst


def _num(n: int | None, total: int | None) -> str | None:
    if n is None:
        return None
    return f"{n}/{total}" if total else str(n)


def make_media(
    src_wav: Path,
    out_dir: Path,
    fmt: str,
    *,
    title: str | None,
    artist: str | None,
    album: str | None,
    album_artist: str | None = None,
    track: int | None = None,
    disc: int | None = None,
    cover: bytes | None = None,
    year: int | None = None,
    track_total: int | None = None,
    disc_total: int | None = None,
    name: str | None = None,
) -> Path:
    """Encode ``src_wav`` as ``fmt`` into ``out_dir`` and tag it.

    ``fmt`` is one of mp3, flac, m4a, ogg, opus, wav.  ``cover`` (PNG or JPEG
    bytes) is embedded as the front cover.  Tags that are None are left out.
    The file is named ``name`` (default: the source's stem) plus the format's
    extension.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{name or Path(src_wav).stem}{FORMATS[fmt][0]}"
    encode(Path(src_wav), dst, fmt)
    tags = dict(
        title=title, artist=artist, album=album, album_artist=album_artist,
        track=_num(track, track_total), disc=_num(disc, disc_total),
        year=str(year) if year is not None else None,
    )
    if fmt in ("mp3", "wav"):
        _tag_id3(dst, fmt, tags, cover)
    elif fmt == "m4a":
        _tag_mp4(dst, tags, cover, track, track_total, disc, disc_total)
    else:
        _tag_vorbis(dst, fmt, tags, cover)
    return dst


def _picture(cover: bytes):
    from mutagen.flac import Picture

    pic = Picture()
    pic.type = 3  # front cover
    pic.mime = image_mime(cover)
    pic.desc = "Front"
    pic.data = cover
    return pic


def _tag_id3(path: Path, fmt: str, tags: dict, cover: bytes | None) -> None:
    from mutagen import id3

    frames = {
        "title": id3.TIT2, "artist": id3.TPE1, "album": id3.TALB, "album_artist": id3.TPE2,
        "track": id3.TRCK, "disc": id3.TPOS, "year": id3.TDRC,
    }
    if fmt == "wav":
        from mutagen.wave import WAVE

        f = WAVE(path)
        if f.tags is None:
            f.add_tags()
        t = f.tags
    else:
        t = id3.ID3()
    for key, cls in frames.items():
        if tags[key] is not None:
            t.add(cls(encoding=id3.Encoding.UTF8, text=[tags[key]]))
    if cover is not None:
        t.add(id3.APIC(encoding=id3.Encoding.UTF8, mime=image_mime(cover),
                       type=id3.PictureType.COVER_FRONT, desc="Front", data=cover))
    if fmt == "wav":
        f.save()
    else:
        t.save(path)


def _tag_mp4(path, tags, cover, track, track_total, disc, disc_total) -> None:
    from mutagen.mp4 import MP4, MP4Cover

    f = MP4(path)
    if f.tags is None:
        f.add_tags()
    for key, atom in (("title", "\xa9nam"), ("artist", "\xa9ART"), ("album", "\xa9alb"),
                      ("album_artist", "aART"), ("year", "\xa9day")):
        if tags[key] is not None:
            f.tags[atom] = [tags[key]]
    if track is not None:
        f.tags["trkn"] = [(track, track_total or 0)]
    if disc is not None:
        f.tags["disk"] = [(disc, disc_total or 0)]
    if cover is not None:
        kind = MP4Cover.FORMAT_PNG if image_mime(cover) == "image/png" else MP4Cover.FORMAT_JPEG
        f.tags["covr"] = [MP4Cover(cover, imageformat=kind)]
    f.save()


def _tag_vorbis(path: Path, fmt: str, tags: dict, cover: bytes | None) -> None:
    if fmt == "flac":
        from mutagen.flac import FLAC as Kind
    elif fmt == "ogg":
        from mutagen.oggvorbis import OggVorbis as Kind
    else:
        from mutagen.oggopus import OggOpus as Kind

    f = Kind(path)
    if f.tags is None:
        f.add_tags()
    names = {"title": "TITLE", "artist": "ARTIST", "album": "ALBUM",
             "album_artist": "ALBUMARTIST", "track": "TRACKNUMBER", "disc": "DISCNUMBER",
             "year": "DATE"}
    for key, field in names.items():
        if tags[key] is not None:
            f.tags[field] = [tags[key]]
    if cover is not None:
        pic = _picture(cover)
        if fmt == "flac":
            f.add_picture(pic)
        else:
            f.tags["METADATA_BLOCK_PICTURE"] = [base64.b64encode(pic.write()).decode("ascii")]
    f.save()
