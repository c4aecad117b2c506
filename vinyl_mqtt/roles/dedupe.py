"""The dedupe role: matches and listener state in, plays out.

One :class:`~vinyl_mqtt.plays.PlayTracker` per turntable decides the plays
(see :mod:`vinyl_mqtt.plays`); this role only moves messages.  It subscribes

* ``<base>/+/now_playing``: its own retained state, so that after a restart
  each turntable resumes the play it was in (same ``play_id``, no second
  ``started``).  Only retained copies that arrive before the turntable's
  first match are used; the echoes of its own publishes are ignored;
* ``<base>/+/listener``: playing / idle (retained);
* ``<base>/+/match``: the matchers' answers;

ticks every second (plays end by duration), and publishes each
:class:`~vinyl_mqtt.messages.PlayEvent` on ``<base>/<listener>/play`` (QoS 1,
not retained) and the turntable's :class:`~vinyl_mqtt.messages.NowPlaying`
retained on ``<base>/<listener>/now_playing``.

Publishing is done by one task, in the order the trackers produced the
output, so an ``ended`` is never overtaken by the ``started`` that follows
it.  While the broker is away events wait (in order, in memory) and are
sent when it is back; the retained state is re-published by the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from ..config import Config
from ..messages import JSON_CONTENT_TYPE, ListenerState, MatchResult, MessageError, NowPlaying, Topics
from ..mqtt import Connection, Message
from ..plays import Catalog, Output, PlayTracker, Rules

log = logging.getLogger(__name__)

TICK_S = 1.0
MAX_PENDING = 10_000  # events waiting for the broker; the oldest are dropped beyond this


class DedupeRole:
    name = "dedupe"

    def __init__(self, cfg: Config, conn: Connection, *, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.conn = conn
        self.topics = Topics(cfg.mqtt.base_topic)
        self.rules = Rules.from_config(cfg.dedupe)
        self.clock = clock
        self.catalog = Catalog()  # one library behind every turntable
        self.trackers: dict[str, PlayTracker] = {}
        self._last_listener: dict[str, ListenerState] = {}
        self._outbox: deque[tuple[str, bytes, bool]] = deque()  # (topic, payload, retained)
        self._wake = asyncio.Event()
        self.published = 0

    async def run(self) -> None:
        # now_playing first: its retained copies arrive before the listener states
        await self.conn.subscribe(self.topics.any_listener("now_playing"), qos=1)
        await self.conn.subscribe(self.topics.any_listener("listener"), qos=1)
        await self.conn.subscribe(self.topics.any_listener("match"), qos=1)
        helpers = [asyncio.create_task(self._tick(), name="dedupe-tick"),
                   asyncio.create_task(self._publisher(), name="dedupe-publish")]
        try:
            await self.conn.run(self.handle)
        finally:
            for t in helpers:
                t.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    # -- incoming ----------------------------------------------------------------------

    async def handle(self, msg: Message) -> None:
        parts = self.topics.parts(msg.topic)
        if len(parts) != 2:
            return
        listener, what = parts
        now = self.clock()
        if what == "now_playing":
            self._restore(listener, msg)
            return
        if not msg.payload:
            return  # a cleared retained message
        if what == "listener":
            st = ListenerState.parse(msg.payload)
            if st.listener != listener:
                raise MessageError(f"listener state names {st.listener!r}, topic says {listener!r}")
            self._last_listener[listener] = st
            self._queue(listener, self._tracker(listener).on_listener(st, now))
        elif what == "match":
            m = MatchResult.parse(msg.payload)
            if m.listener != listener:
                raise MessageError(f"match names listener {m.listener!r}, topic says {listener!r}")
            self._queue(listener, self._tracker(listener).on_match(m, now))

    def _restore(self, listener: str, msg: Message) -> None:
        """Our own retained state, delivered on (re)subscribing: resume from it, once."""
        if not msg.retain or not msg.payload:
            return  # an echo of our own publish, or a cleared state
        current = self.trackers.get(listener)
        if current is not None and current.touched:
            return  # already running on live data: the retained copy is older than what we know
        np = NowPlaying.parse(msg.payload)
        if np.listener != listener:
            raise MessageError(f"now_playing names listener {np.listener!r}, topic says {listener!r}")
        tracker = PlayTracker.restore(np, self.rules, self.catalog)
        self.trackers[listener] = tracker
        if np.play is not None and tracker.play is not None:
            log.info("%s: resuming play %s (%s) at %.0f s", listener, np.play.play_id, np.play.track.title,
                     np.play.position_s)
        now = self.clock()
        # keep it on the connection's list, so a broker restarted without persistence gets it back
        self._outbox.append((self.topics.now_playing(listener), tracker.now_playing(now).to_json(), True))
        self._wake.set()
        st = self._last_listener.get(listener)
        if st is not None:  # a listener state that came first: replay it into the restored tracker
            self._queue(listener, tracker.on_listener(st, now))

    def _tracker(self, listener: str) -> PlayTracker:
        t = self.trackers.get(listener)
        if t is None:
            t = self.trackers[listener] = PlayTracker(listener, self.rules, self.catalog)
        return t

    async def _tick(self) -> None:
        await self.conn.connected.wait()
        await asyncio.sleep(TICK_S)  # let the retained states in first
        while True:
            now = self.clock()
            for listener, t in list(self.trackers.items()):
                self._queue(listener, t.tick(now))
            await asyncio.sleep(TICK_S)

    # -- outgoing ----------------------------------------------------------------------

    def _queue(self, listener: str, out: Output) -> None:
        for e in out.events:
            p = e.play
            say = log.debug if e.event == "updated" else log.info
            say("%s: %s %s — %s (%s)", listener, e.event, p.track.artist or "?", p.track.title,
                p.end_reason or f"at {p.position_s:.0f} s, {p.matches} match(es)")
            self._outbox.append((self.topics.play(listener), e.to_json(), False))
        if out.changed:
            self._outbox.append((self.topics.now_playing(listener), out.now_playing.to_json(), True))
        if len(self._outbox) > MAX_PENDING:
            log.warning("%s: %d play messages wait for the broker; dropping the oldest", listener, len(self._outbox))
            while len(self._outbox) > MAX_PENDING:
                self._outbox.popleft()
        if self._outbox:
            self._wake.set()

    async def _publisher(self) -> None:
        """Send the outbox in order; an event the broker did not take waits for the next session."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                topic, payload, retained = self._outbox[0]
                if retained:
                    await self.conn.set_retained(topic, payload, content_type=JSON_CONTENT_TYPE)
                elif not await self.conn.publish(topic, payload, qos=1, content_type=JSON_CONTENT_TYPE):
                    if self.conn.connected.is_set():
                        await asyncio.sleep(0.5)  # the session is ending (or flapped): try again shortly
                    else:
                        await self.conn.connected.wait()
                    continue
                self._outbox.popleft()
                self.published += 1
