"""The matcher role: clips in, match results out.

Clips arrive through a shared subscription, so several matcher nodes split
the stream. Identification runs in worker threads (numpy releases the GIL for
the heavy parts) so availability and the next clips keep flowing, and the
library is reloaded in the background when `library add` changes the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from .. import fingerprint as fp
from ..config import Config
from ..matcher import Index
from ..messages import MatchedTrack, MatchResult, MessageError, Topics, decode_clip
from ..mqtt import Connection, Message
from ..store import AsyncStore, Track

log = logging.getLogger(__name__)


class MatcherRole:
    name = "matcher"

    def __init__(self, cfg: Config, conn: Connection):
        self.cfg = cfg
        self.conn = conn
        self.topics = Topics(cfg.mqtt.base_topic)
        self.settings = cfg.matcher
        self.index: Index | None = None
        self.tracks: dict[int, Track] = {}
        self.generation = -1
        self._pool = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="identify")
        self._slots = asyncio.Semaphore(self.settings.workers)
        self._tasks: set[asyncio.Task] = set()
        self._store: AsyncStore | None = None
        self._covers_sent: set[int] = set()
        self.identified = 0

    async def run(self) -> None:
        async with AsyncStore(self.cfg.library.db) as store:
            self._store = store
            await self._reload(store)
            await self.conn.subscribe(self.topics.clip_shared(self.settings.share_group), qos=1)
            watcher = asyncio.create_task(self._watch_library(store))
            try:
                await self.conn.run(self.handle)
            finally:
                watcher.cancel()
                for t in self._tasks:
                    t.cancel()
                self._pool.shutdown(wait=False, cancel_futures=True)

    async def _reload(self, store: AsyncStore) -> None:
        gen = await store.generation()
        if gen == self.generation:
            return
        t0 = time.perf_counter()
        index = await store.load_index()
        tracks = {t.id: t for t in await store.tracks()}
        self.index, self.tracks, self.generation = index, tracks, gen
        log.info("library %s: %d tracks loaded in %.1f s", store.path, len(index), time.perf_counter() - t0)

    async def _watch_library(self, store: AsyncStore) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_check_s)
            try:
                await self._reload(store)
            except Exception:  # a busy or half-written store: try again next time
                log.exception("library %s: reload failed; keeping the loaded one", store.path)

    async def handle(self, msg: Message) -> None:
        """Validate now (a bad clip is logged by the connection), identify in the background."""
        listener = self.topics.parts(msg.topic)[0]
        header, samples = decode_clip(
            msg.payload, max_bytes=self.settings.max_clip_bytes, max_seconds=self.settings.max_clip_seconds
        )
        if header.listener != listener:
            raise MessageError(f"clip header names listener {header.listener!r}, topic says {listener!r}")
        task = asyncio.create_task(self._answer(header, samples, time.time()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, header, samples, received_at: float) -> None:
        async with self._slots:
            started = time.time()
            index, tracks = self.index, self.tracks
            loop = asyncio.get_running_loop()
            m = await loop.run_in_executor(self._pool, index.match, fp.prepare(samples, header.rate))
        track = tracks.get(m.track_id) if m.matched else None
        result = MatchResult(
            listener=header.listener,
            clip_id=header.clip_id,
            seq=header.seq,
            captured_at=header.captured_at,
            matched=track is not None,
            track=MatchedTrack(**{k: getattr(track, k) for k in MatchedTrack.model_fields if k != "v"})
            if track
            else None,
            offset_s=round(m.offset_s, 3) if track else None,
            speed=round(m.speed, 5) if track else None,
            rpm_mistake=m.rpm_mistake if track else None,
            confidence=round(m.confidence, 3),
            score=m.score,
            matcher=self.cfg.node,
            identify_ms=round(m.elapsed_ms, 2),
            queue_ms=round((started - header.captured_at - header.duration_s) * 1000, 1),
        )
        self.identified += 1
        log.info(
            "%s clip %s: %s", header.listener, header.seq,
            f"{track.artist or '?'} — {track.title} at {m.offset_s:.1f} s, speed {100 * (m.speed - 1):+.2f} %"
            if track else "no match",
        )
        if track is not None and track.cover_id is not None:
            await self._publish_cover(track.cover_id)
        await self.conn.publish(self.topics.match(header.listener), result.to_json(), qos=1,
                                content_type="application/json")

    async def _publish_cover(self, cover_id: int) -> None:
        """The cover of a matched track, retained, once per cover (before the match that names it)."""
        if cover_id in self._covers_sent or self._store is None:
            return
        cover = await self._store.cover(cover_id)
        if cover is None:
            return
        mime, data = cover
        if await self.conn.publish(self.topics.cover(cover_id), data, qos=1, retain=True,
                                   content_type=mime or "image/jpeg"):
            self._covers_sent.add(cover_id)
