"""The scrobbler's persistent queue: every play to scrobble, stored before anything is sent.

One SQLite table (WAL, ``synchronous=FULL``: a committed change survives a
power cut), one row per play, keyed by ``play_id`` (a play that qualifies
twice, on ``updated`` and again on ``ended``, is queued once).  A row moves

    queued ──► sending ──► sent            (Last.fm accepted it)
       │          │   └──► ignored         (Last.fm ignored it: reason + code)
       │          └──────► failed          (a permanent error: reason + code)
       └────────────────► too_old          (older than Last.fm takes: never sent)

Exactly once across crashes
---------------------------
Each transition is one committed transaction, made *before* the step it
enables: a row is stored before it is announced or sent, and a batch is
marked ``sending`` (with a batch id) before its request goes out; it is
marked ``sent`` only after Last.fm's answer.  A process killed at any moment
therefore leaves each row in exactly one of three situations:

* ``queued``: never sent; sent later, nothing lost;
* ``sending``: the request may or may not have reached Last.fm (the one
  ambiguous window no client can close).  :meth:`ScrobbleQueue.next_batch`
  hands the same batch out again, first, before anything newer: it is
  resent, identically (same artist, track, album and timestamp), and
  Last.fm's duplicate detection (the same track at the same timestamp is
  recorded once) makes the resend harmless.  Resending rather than dropping
  is the choice: a lost scrobble cannot be repaired, a resent one is
  absorbed by the server;
* ``sent`` / ``ignored`` / ``failed`` / ``too_old``: final, never sent again.

Order: oldest scrobble (timestamp) first, in batches of at most 50.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from .config import SCROBBLE_MAX_AGE_S

STATES = ("queued", "sending", "sent", "ignored", "failed", "too_old")
FINAL = ("sent", "ignored", "failed", "too_old")
MAX_BATCH = 50  # Last.fm's limit per track.scrobble
MAX_AGE_S = SCROBBLE_MAX_AGE_S  # Last.fm ignores scrobbles older than this (ignored code 3)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scrobbles (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    play_id      TEXT NOT NULL UNIQUE,
    listener     TEXT NOT NULL,
    artist       TEXT NOT NULL,
    track        TEXT NOT NULL,
    album        TEXT,
    album_artist TEXT,
    track_number INTEGER,
    duration     INTEGER,
    timestamp    INTEGER NOT NULL,
    state        TEXT NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'sending', 'sent', 'ignored', 'failed', 'too_old')),
    batch        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    solo         INTEGER NOT NULL DEFAULT 0,
    code         INTEGER,
    reason       TEXT,
    queued_at    REAL NOT NULL,
    done_at      REAL
);
CREATE INDEX IF NOT EXISTS scrobbles_pending ON scrobbles (state, timestamp, id);
"""

_COLS = ("id, play_id, listener, artist, track, album, album_artist, track_number, duration, timestamp, "
         "state, batch, attempts, solo, code, reason, queued_at, done_at")


@dataclass(frozen=True)
class Scrobble:
    """What to scrobble (the row, once stored)."""

    play_id: str
    listener: str
    artist: str
    track: str
    timestamp: int  # when the play started (epoch seconds)
    album: str | None = None
    album_artist: str | None = None
    track_number: int | None = None
    duration: int | None = None
    # set by the queue
    id: int | None = None
    state: str = "queued"
    batch: str | None = None
    attempts: int = 0
    solo: bool = False
    code: int | None = None
    reason: str | None = None
    queued_at: float | None = None
    done_at: float | None = None

    @classmethod
    def _from_row(cls, r) -> Scrobble:
        (id_, play_id, listener, artist, track, album, album_artist, track_number, duration, timestamp,
         state, batch, attempts, solo, code, reason, queued_at, done_at) = r
        return cls(play_id, listener, artist, track, timestamp, album, album_artist, track_number, duration,
                   id_, state, batch, attempts, bool(solo), code, reason, queued_at, done_at)

    def params(self) -> dict:
        """The keyword arguments pylast's scrobble() takes for this one."""
        return {"artist": self.artist, "title": self.track, "timestamp": self.timestamp, "album": self.album,
                "album_artist": self.album_artist if self.album_artist and self.album_artist != self.artist else None,
                "track_number": self.track_number, "duration": self.duration}


@dataclass(frozen=True)
class Batch:
    id: str
    items: list[Scrobble]
    resumed: bool  # left in "sending" by an earlier run (or an earlier try): a resend


@dataclass(frozen=True)
class Result:
    """Last.fm's verdict on one scrobble of a batch."""

    id: int
    state: str  # sent / ignored / failed / too_old
    code: int | None = None
    reason: str | None = None


class ScrobbleQueue:
    """The queue on disk (``path``) or in memory (``":memory:"``, for dry runs)."""

    def __init__(self, db: aiosqlite.Connection, path: str):
        self.db = db
        self.path = path

    @classmethod
    async def open(cls, path: str | Path) -> ScrobbleQueue:
        path = str(path)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)  # explicit transactions only
        try:
            await db.execute("PRAGMA busy_timeout = 10000")
            if path != ":memory:":
                await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.executescript(_SCHEMA)
        except BaseException:
            await db.close()
            raise
        return cls(db, path)

    async def close(self) -> None:
        await self.db.close()

    async def __aenter__(self) -> ScrobbleQueue:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- adding ---------------------------------------------------------------------------

    async def add(self, s: Scrobble, *, state: str = "queued", reason: str | None = None,
                  now: float | None = None) -> bool:
        """Store a play (committed before this returns); False if its play_id is already here."""
        if state not in STATES or state == "sending":
            raise ValueError(f"cannot add a scrobble in state {state!r}")
        now = time.time() if now is None else now
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO scrobbles (play_id, listener, artist, track, album, album_artist, track_number,"
            " duration, timestamp, state, reason, queued_at, done_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (s.play_id, s.listener, s.artist, s.track, s.album, s.album_artist, s.track_number, s.duration,
             int(s.timestamp), state, reason, now, None if state == "queued" else now),
        )
        return cur.rowcount == 1

    # -- sending --------------------------------------------------------------------------

    async def expire(self, now: float | None = None, max_age_s: float = MAX_AGE_S) -> list[Scrobble]:
        """Queued scrobbles too old for Last.fm, now marked too_old (never sent)."""
        now = time.time() if now is None else now
        cur = await self.db.execute(
            f"UPDATE scrobbles SET state = 'too_old', done_at = ?, reason = ? "
            f"WHERE state = 'queued' AND timestamp < ? RETURNING {_COLS}",
            (now, f"older than {max_age_s / 86400:g} days: Last.fm does not take it", now - max_age_s),
        )
        rows = await cur.fetchall()
        return sorted((Scrobble._from_row(r) for r in rows), key=lambda s: (s.timestamp, s.id))

    async def next_batch(self, limit: int = MAX_BATCH) -> Batch | None:
        """The next batch to send, marked ``sending`` (committed) before it is returned.

        A batch already in ``sending`` (an earlier run died, or its request failed
        in a way that may have reached Last.fm) comes first, unchanged.
        """
        limit = max(1, min(int(limit), MAX_BATCH))
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            cur = await self.db.execute(
                f"SELECT {_COLS} FROM scrobbles WHERE state = 'sending' ORDER BY timestamp, id")
            rows = [Scrobble._from_row(r) for r in await cur.fetchall()]
            if rows:
                first = rows[0].batch
                items = [s for s in rows if s.batch == first]
                await self.db.execute("UPDATE scrobbles SET attempts = attempts + 1 WHERE batch = ? AND state = 'sending'",
                                      (first,))
                await self.db.execute("COMMIT")
                return Batch(first or "", items, resumed=True)
            cur = await self.db.execute(
                f"SELECT {_COLS} FROM scrobbles WHERE state = 'queued' ORDER BY timestamp, id LIMIT ?", (limit,))
            rows = [Scrobble._from_row(r) for r in await cur.fetchall()]
            if not rows:
                await self.db.execute("COMMIT")
                return None
            if rows[0].solo:
                items = rows[:1]  # one that made a whole batch fail: alone, to find the culprit
            else:
                items = []
                for s in rows:
                    if s.solo:
                        break
                    items.append(s)
            batch = uuid.uuid4().hex
            await self.db.executemany(
                "UPDATE scrobbles SET state = 'sending', batch = ?, attempts = attempts + 1 WHERE id = ?",
                [(batch, s.id) for s in items])
            await self.db.execute("COMMIT")
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        return Batch(batch, [_with(s, state="sending", batch=batch, attempts=s.attempts + 1) for s in items],
                     resumed=False)

    async def finish(self, batch: Batch, results: Iterable[Result], now: float | None = None) -> None:
        """Record Last.fm's answer for a batch (one transaction)."""
        now = time.time() if now is None else now
        rows = [(r.state, r.code, r.reason, now, r.id, batch.id) for r in results]
        for r in rows:
            if r[0] not in FINAL:
                raise ValueError(f"{r[0]!r} is not a final state")
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await self.db.executemany(
                "UPDATE scrobbles SET state = ?, code = ?, reason = ?, done_at = ? "
                "WHERE id = ? AND batch = ? AND state = 'sending'", rows)
            await self.db.execute("COMMIT")
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise

    async def split(self, batch: Batch) -> None:
        """A whole batch was refused for one bad item: back to the queue, each to be sent alone."""
        await self.db.execute(
            "UPDATE scrobbles SET state = 'queued', batch = NULL, solo = 1 WHERE batch = ? AND state = 'sending'",
            (batch.id,))

    # -- looking ---------------------------------------------------------------------------

    async def pending(self) -> int:
        """Scrobbles not yet final (queued or sending)."""
        cur = await self.db.execute("SELECT count(*) FROM scrobbles WHERE state IN ('queued', 'sending')")
        return (await cur.fetchone())[0]

    async def get(self, play_id: str) -> Scrobble | None:
        cur = await self.db.execute(f"SELECT {_COLS} FROM scrobbles WHERE play_id = ?", (play_id,))
        r = await cur.fetchone()
        return None if r is None else Scrobble._from_row(r)

    async def all(self, state: str | None = None) -> list[Scrobble]:
        if state is None:
            cur = await self.db.execute(f"SELECT {_COLS} FROM scrobbles ORDER BY timestamp, id")
        else:
            cur = await self.db.execute(f"SELECT {_COLS} FROM scrobbles WHERE state = ? ORDER BY timestamp, id",
                                        (state,))
        return [Scrobble._from_row(r) for r in await cur.fetchall()]

    async def counts(self) -> dict[str, int]:
        cur = await self.db.execute("SELECT state, count(*) FROM scrobbles GROUP BY state")
        out = {s: 0 for s in STATES}
        out.update({k: v for k, v in await cur.fetchall()})
        return out


def _with(s: Scrobble, **kw) -> Scrobble:
    from dataclasses import replace

    return replace(s, **kw)
