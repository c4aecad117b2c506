"""The listener role: the turntable's line-in, heard and sent as clips.

ALSA blocks flow through the gate (music or silence, with hysteresis) and the
clip scheduler (first clip seconds after the needle drops, a re-check while
playing, another right after a gap between tracks). Each clip is downsampled
and published with an expiry; while no matcher is online, or the broker is
unreachable, it goes to the on-disk spool instead and is sent when a matcher
returns (clips past their useful age are dropped there, never matched late).
The turntable's state (playing / idle, level, since) is published retained.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from ..capture import Block, open_capture
from ..config import Config
from ..gate import Clip, ClipScheduler, Gate, downsample
from ..messages import CLIP_CONTENT_TYPE, JSON_CONTENT_TYPE, ONLINE, ClipHeader, ListenerState, Topics, encode_clip
from ..mqtt import Connection, Message
from ..spool import Spool

log = logging.getLogger(__name__)

STATE_EVERY_S = 5.0  # level updates between state changes
# A matcher says "online" just before it subscribes to clips: a clip sent in
# between would reach nobody, so spooled clips wait this long after it appears.
MATCHER_SETTLE_S = 1.0


class ListenerRole:
    name = "listener"

    def __init__(self, cfg: Config, conn: Connection):
        self.cfg = cfg
        self.conn = conn
        self.settings = cfg.listener
        self.listener = cfg.listener_name
        self.topics = Topics(cfg.mqtt.base_topic)
        self.matchers: set[str] = set()  # nodes whose matcher is online
        self.spool = Spool(self.settings.spool)
        self.seq = 0
        self.sent = 0
        self.spooled = 0
        self._state_at = 0.0
        self._draining: asyncio.Task | None = None

    @property
    def matcher_online(self) -> bool:
        return bool(self.matchers) and self.conn.connected.is_set()

    async def run(self) -> None:
        await self.conn.subscribe(self.topics.role_status_any("matcher"), qos=1)
        capture = open_capture(self.settings)
        log.info("listening on %s at %d Hz as turntable %r", capture.device, capture.rate, self.listener)
        gate = Gate(self.settings.gate, capture.rate)
        scheduler = ClipScheduler(self.settings.clip, capture.rate)
        session = asyncio.create_task(self.conn.run(self.handle), name="listener-mqtt")
        try:
            async for block in capture.blocks():
                events = gate.update(block.samples, block.index)
                changed = any(e.kind in ("playing", "idle") for e in events)
                if changed or time.monotonic() - self._state_at >= STATE_EVERY_S:
                    await self._publish_state(gate, block)
                for clip in scheduler.feed(block.samples, block.index, events):
                    await self._send(clip, block, gate)
                if session.done():
                    break
        finally:
            capture.close()
            session.cancel()
            await asyncio.gather(session, return_exceptions=True)
        if session.done() and not session.cancelled() and session.exception():
            raise session.exception()

    async def handle(self, msg: Message) -> None:
        """Matcher availability: who can answer clips right now."""
        node, role, _ = self.topics.parts(msg.topic)
        if role != "matcher":
            return
        was_online = bool(self.matchers)
        if msg.payload.decode(errors="replace") == ONLINE:
            self.matchers.add(node)
        else:
            self.matchers.discard(node)
        if self.matchers and not was_online:
            log.info("matcher %s online; %d spooled clip(s) to send", node, len(self.spool))
            self._drain_soon(delay=MATCHER_SETTLE_S)
        elif was_online and not self.matchers:
            log.warning("no matcher online: clips go to the spool (%s)", self.spool.dir)

    async def _publish_state(self, gate: Gate, block: Block) -> None:
        since = block.captured_at + (gate.since_index - block.index) / block.rate
        state = ListenerState(
            listener=self.listener,
            node=self.cfg.node,
            state="playing" if gate.playing else "idle",
            rms_dbfs=round(gate.level_dbfs, 1),
            peak_dbfs=round(gate.peak_dbfs, 1),
            since=round(since, 3),
        )
        self._state_at = time.monotonic()
        await self.conn.set_retained(self.topics.listener_state(self.listener), state.to_json(),
                                     content_type=JSON_CONTENT_TYPE)

    async def _send(self, clip: Clip, block: Block, gate: Gate) -> None:
        rate = self.settings.clip.rate
        pcm = downsample(clip.samples, block.rate, rate)
        header = ClipHeader(
            listener=self.listener,
            clip_id=uuid.uuid4().hex,
            seq=self.seq,
            captured_at=round(block.captured_at + (clip.start - block.index) / block.rate, 3),
            rate=rate,
            samples=len(pcm),
            rms_dbfs=round(gate.level_dbfs, 1),
            reason=clip.reason,
        )
        self.seq += 1
        frame = encode_clip(header, pcm)
        draining = self._draining is not None and not self._draining.done()
        if self.matcher_online and not len(self.spool) and not draining and await self._publish(frame, header.captured_at):
            self.sent += 1
            log.info("clip %d (%s, %.1f s) sent", header.seq, clip.reason, header.duration_s)
            return
        if await asyncio.to_thread(self.spool.put, header.clip_id, header.captured_at, frame):
            self.spooled += 1
            log.info("clip %d (%s) spooled: %s", header.seq, clip.reason,
                     "no matcher online" if not self.matcher_online else "sending spooled clips first")
        if self.matcher_online:
            self._drain_soon()

    async def _publish(self, frame: bytes, captured_at: float) -> bool:
        """Publish a clip frame with the rest of its useful life as expiry."""
        life = self.settings.spool.max_age_s - (time.time() - captured_at)
        if life <= 0:
            return True  # useless now: count it as handled, not worth sending
        return await self.conn.publish(self.topics.clip(self.listener), frame, qos=1, expiry_s=life,
                                       content_type=CLIP_CONTENT_TYPE)

    def _drain_soon(self, delay: float = 0.0) -> None:
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain(delay))

    async def _drain(self, delay: float = 0.0) -> None:
        """Send spooled clips oldest first; stop at the first failure (they stay spooled)."""
        await asyncio.sleep(delay)
        sent = 0
        for item in self.spool.drain():
            if not self.matcher_online or not await self._publish(item.frame, item.captured_at):
                break
            self.spool.ack(item.clip_id)
            sent += 1
        if sent:
            self.sent += sent
            log.info("sent %d spooled clip(s); %d left", sent, len(self.spool))
