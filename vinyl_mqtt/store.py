"""The library store: one SQLite file with tracks, covers and fingerprints.

Each track's fingerprint is one blob (8 bytes a triplet) in the same row as
its metadata and written in the same transaction, so a crash mid-ingest
leaves either the whole track or nothing; WAL keeps readers (a running
matcher) working while `library add` writes. The matcher does not query
SQLite per hash: it loads the blobs once into :class:`~vinyl_mqtt.matcher.Index`
and reloads when ``generation`` moves.

:class:`Store` is the plain synchronous path for batch CLI work;
:class:`AsyncStore` is the same reads over aiosqlite for the roles.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import aiosqlite

from . import fingerprint as fp
from .errors import VinylError
from .matcher import Index, IndexBuilder
from .tags import TrackInfo

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS covers (
    id INTEGER PRIMARY KEY,
    sha1 TEXT NOT NULL UNIQUE,
    mime TEXT,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tracks (
    id INTEGER PRIMARY KEY,
    content_hash TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    title TEXT NOT NULL,
    artist TEXT,
    album TEXT,
    album_artist TEXT,
    track_number INTEGER,
    disc_number INTEGER,
    year INTEGER,
    tags_from TEXT NOT NULL,
    duration_s REAL NOT NULL,
    cover_id INTEGER REFERENCES covers(id),
    added_at REAL NOT NULL,
    n_hashes INTEGER NOT NULL,
    fingerprint BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS tracks_path ON tracks(path);
"""

_TRACK_COLUMNS = (
    "id, path, title, artist, album, album_artist, track_number, disc_number, year, "
    "duration_s, cover_id, content_hash, n_hashes"
)
_ENTRIES = "SELECT COALESCE(SUM(n_hashes), 0) FROM tracks"  # sizes IndexBuilder
_PRINTS = "SELECT id, duration_s, fingerprint FROM tracks ORDER BY id"
_ALL_TRACKS = (
    f"SELECT {_TRACK_COLUMNS} FROM tracks ORDER BY album_artist, artist, album, disc_number, track_number, title"
)


class StoreError(VinylError):
    """The store cannot be used as it is (names the file and what is wrong)."""


@dataclass(frozen=True)
class Track:
    """A library track as the rest of the program sees it (no fingerprint)."""

    id: int
    path: str
    title: str
    artist: str | None
    album: str | None
    album_artist: str | None
    track_number: int | None
    disc_number: int | None
    year: int | None
    duration_s: float
    cover_id: int | None
    content_hash: str
    n_hashes: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Stats:
    tracks: int
    hours: float
    hashes: int
    covers: int
    size_bytes: int


def content_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """Identity of a file by its bytes: a moved or renamed file stays the same track."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fingerprint_version() -> str:
    """Changes whenever fingerprints made now would not match stored ones."""
    params = (
        fp.SAMPLE_RATE, fp.N_FFT, fp.HOP, fp.F_MIN, fp.F_MAX, fp.BINS_PER_OCTAVE,
        fp.PEAK_DT, fp.PEAK_DF, fp.PEAKS_PER_SECOND, fp.MIN_PROMINENCE, fp.TARGETS,
        fp.DT_MIN, fp.DT_MAX, fp.DP_MIN, fp.DP_MAX, fp.TIME_UNITS,
    )
    return hashlib.sha1(repr(params).encode()).hexdigest()[:12]


FINGERPRINT_VERSION = _fingerprint_version()


class Store:
    """Synchronous access for the CLI and ingest (one writer at a time)."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreError(f"{self.path}: no library here (create one with `vinyl-mqtt library add`)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            with self.db:
                self.db.executescript(_SCHEMA)
                self._check_meta()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable library database ({e})") from e

    def _check_meta(self) -> None:
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        if not meta:
            self.db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("schema", str(SCHEMA_VERSION)), ("fingerprint", FINGERPRINT_VERSION), ("generation", "0")],
            )
            return
        if meta.get("schema") != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path}: library schema {meta.get('schema')}, this version reads {SCHEMA_VERSION}")
        if meta.get("fingerprint") != FINGERPRINT_VERSION:
            raise StoreError(
                f"{self.path}: fingerprints were made by another engine version "
                f"({meta.get('fingerprint')} != {FINGERPRINT_VERSION}); move it aside and run `library add` again"
            )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reads -------------------------------------------------------------

    @property
    def generation(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def known_files(self) -> dict[str, tuple[int, float, str]]:
        """path -> (size, mtime, content hash): lets a re-run skip without reading files."""
        rows = self.db.execute("SELECT path, size, mtime, content_hash FROM tracks")
        return {p: (s, m, h) for p, s, m, h in rows}

    def known_hashes(self) -> dict[str, tuple[int, str]]:
        return {h: (i, p) for i, p, h in self.db.execute("SELECT id, path, content_hash FROM tracks")}

    def tracks(self) -> list[Track]:
        return [Track(*r) for r in self.db.execute(_ALL_TRACKS)]

    def track(self, track_id: int) -> Track | None:
        row = self.db.execute(f"SELECT {_TRACK_COLUMNS} FROM tracks WHERE id=?", (track_id,)).fetchone()
        return Track(*row) if row else None

    def cover(self, cover_id: int) -> tuple[str | None, bytes] | None:
        row = self.db.execute("SELECT mime, data FROM covers WHERE id=?", (cover_id,)).fetchone()
        return (row[0], bytes(row[1])) if row else None

    def load_index(self) -> Index:
        builder = IndexBuilder(self.db.execute(_ENTRIES).fetchone()[0])
        for track_id, duration, blob in self.db.execute(_PRINTS):
            builder.add(track_id, fp.TrackPrints.from_bytes(blob, duration))
        return builder.build()

    def stats(self) -> Stats:
        n, secs, hashes = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(duration_s), 0), COALESCE(SUM(n_hashes), 0) FROM tracks"
        ).fetchone()
        covers = self.db.execute("SELECT COUNT(*) FROM covers").fetchone()[0]
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        size = sum(p.stat().st_size for p in _db_files(self.path))
        return Stats(n, secs / 3600.0, hashes, covers, size)

    # -- writes ------------------------------------------------------------

    def add_track(
        self,
        *,
        path: str,
        size: int,
        mtime: float,
        content_hash: str,
        info: TrackInfo,
        prints: fp.TrackPrints,
        replaces: int | None = None,
    ) -> int:
        """One track, its cover and fingerprint in one transaction (replacing another)."""
        with self.db:
            if replaces is not None:
                self._delete([replaces])
            cover_id = self._cover_id(info.cover, info.cover_mime)
            cur = self.db.execute(
                "INSERT INTO tracks (content_hash, path, size, mtime, title, artist, album, album_artist, "
                "track_number, disc_number, year, tags_from, duration_s, cover_id, added_at, n_hashes, fingerprint) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    content_hash, path, size, mtime, info.title, info.artist, info.album, info.album_artist,
                    info.track_number, info.disc_number, info.year, info.tags_from, prints.duration_s,
                    cover_id, time.time(), len(prints.hashes), prints.to_bytes(),
                ),
            )
            self._bump()
            return int(cur.lastrowid)

    def update_location(self, track_id: int, path: str, size: int, mtime: float) -> None:
        """The same content moved or touched: keep the track, update where and when it is."""
        with self.db:
            self.db.execute("UPDATE tracks SET path=?, size=?, mtime=? WHERE id=?", (path, size, mtime, track_id))

    def remove(self, track_ids: Iterable[int]) -> int:
        with self.db:
            n = self._delete(track_ids)
            if n:
                self._bump()
        return n

    def _delete(self, track_ids: Iterable[int]) -> int:
        n = self.db.executemany("DELETE FROM tracks WHERE id=?", [(int(i),) for i in track_ids]).rowcount
        self.db.execute("DELETE FROM covers WHERE id NOT IN (SELECT cover_id FROM tracks WHERE cover_id IS NOT NULL)")
        return n

    def find(self, spec: str) -> list[int]:
        """Track ids for an id, a file path, or a folder (every track below it)."""
        if spec.isdigit() and not Path(spec).exists():
            return [r[0] for r in self.db.execute("SELECT id FROM tracks WHERE id=?", (int(spec),))]
        p = str(Path(spec).expanduser().resolve())
        rows = self.db.execute(
            "SELECT id FROM tracks WHERE path=? OR substr(path, 1, ?)=?", (p, len(p) + 1, p.rstrip("/") + "/")
        )
        return [r[0] for r in rows]

    def _cover_id(self, data: bytes | None, mime: str | None) -> int | None:
        if not data:
            return None
        sha1 = hashlib.sha1(data).hexdigest()
        row = self.db.execute("SELECT id FROM covers WHERE sha1=?", (sha1,)).fetchone()
        if row:
            return int(row[0])
        return int(self.db.execute("INSERT INTO covers (sha1, mime, data) VALUES (?, ?, ?)", (sha1, mime, data)).lastrowid)

    def _bump(self) -> None:
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")


class AsyncStore:
    """Read access over aiosqlite for the roles: index, tracks, covers, generation."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db: aiosqlite.Connection | None = None

    async def __aenter__(self) -> AsyncStore:
        # The sync Store creates and checks the schema; roles only read.
        Store(self.path, create=False).close()
        self.db = await aiosqlite.connect(self.path, timeout=30.0)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.db is not None:
            await self.db.close()

    async def generation(self) -> int:
        async with self.db.execute("SELECT value FROM meta WHERE key='generation'") as cur:
            return int((await cur.fetchone())[0])

    async def load_index(self) -> Index:
        async with self.db.execute(_ENTRIES) as cur:
            builder = IndexBuilder((await cur.fetchone())[0])
        async with self.db.execute(_PRINTS) as cur:
            async for track_id, duration, blob in cur:
                builder.add(track_id, fp.TrackPrints.from_bytes(blob, duration))
        return builder.build()

    async def tracks(self) -> list[Track]:
        async with self.db.execute(_ALL_TRACKS) as cur:
            return [Track(*r) for r in await cur.fetchall()]

    async def track(self, track_id: int) -> Track | None:
        async with self.db.execute(f"SELECT {_TRACK_COLUMNS} FROM tracks WHERE id=?", (track_id,)) as cur:
            row = await cur.fetchone()
        return Track(*row) if row else None

    async def cover(self, cover_id: int) -> tuple[str | None, bytes] | None:
        async with self.db.execute("SELECT mime, data FROM covers WHERE id=?", (cover_id,)) as cur:
            row = await cur.fetchone()
        return (row[0], bytes(row[1])) if row else None


def _db_files(path: Path) -> list[Path]:
    return [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]
