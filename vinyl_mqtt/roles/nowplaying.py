"""The nowplaying role: Home Assistant entities for every turntable, by MQTT discovery.

It watches the pipeline (``<base>/+/listener``, ``<base>/+/now_playing``,
``<base>/+/play``, matcher availability, library covers) and keeps, for every
listener it has seen, a Home Assistant device (see :mod:`vinyl_mqtt.hass`):

* discovery configs, retained, published when a listener first appears and
  again whenever Home Assistant announces itself (``<discovery_prefix>/status``
  ``online``);
* entity states, retained, under ``<base>/<listener>/ha/...``: title, artist,
  album (capped at 255 characters; full texts in the attributes), progress
  (moved on every few seconds from the last known position and the measured
  speed), speed error, signal level, playing, "any matcher online";
* the cover art: the current track's library cover (``<base>/library/cover/<id>``,
  subscribed while a listener plays that track) republished as the image
  entity's bytes, or a placeholder record when there is none;
* events (never retained): track_changed, side_finished, record_finished,
  unknown_record -- only for messages that arrive live, never for retained
  state replayed at (re)connect.

Turntables are found from their retained listener states, and from
dedupe's now playing when it is not idle. A listener whose retained state is
cleared (``vinyl-mqtt hass remove``, see :func:`remove_listener`) is
forgotten and its entities removed (empty retained discovery configs, states
cleared).

After every (re)connect, states are held for ``SETTLE_S`` while the retained
ones come in, so a restart of this role does not flicker Home Assistant's
entities.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .. import hass
from ..config import Config
from ..messages import (
    JSON_CONTENT_TYPE,
    OFFLINE,
    ONLINE,
    ListenerState,
    MessageError,
    NowPlaying,
    Play,
    PlayEvent,
    Topics,
)
from ..mqtt import Connection, Message

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0  # the progress sensor moves on this often while a track plays
COVER_WAIT_S = 3.0  # a cover not on the broker by then: show the placeholder
SETTLE_S = 1.0  # after (re)connecting, retained state is gathered this long before states are published
_FINISHED_MEMORY = 64  # ended plays remembered per listener (QoS 1 may deliver an event twice)


@dataclass
class _Turntable:
    name: str
    node: str  # whose listener role hears it (<base>/<node>/listener/status)
    listener_state: ListenerState | None = None
    status: str = "idle"  # dedupe's NowPlaying.state
    play: Play | None = None  # set while status is playing
    updated_at: float = 0.0  # of the newest now-playing information applied
    announced_play: str | None = None  # play id track_changed was sent for
    announced_unknown: bool = False  # unknown_record sent (or seen retained) for the current unknown music
    finished: deque = field(default_factory=lambda: deque(maxlen=_FINISHED_MEMORY))
    cover_id: int | None = None  # the cover the current track wants
    image: str | None = None  # what is on the image topic: "placeholder" or "cover:<id>"
    image_type: str = hass.PLACEHOLDER_TYPE  # content type in the image entity's discovery config (idle: placeholder)
    published: dict[str, bytes] = field(default_factory=dict)  # state topic -> last payload set
    cover_wait: asyncio.Task | None = None


class NowPlayingRole:
    name = "nowplaying"

    def __init__(self, cfg: Config, conn: Connection):
        self.cfg = cfg
        self.conn = conn
        self.topics = Topics(cfg.mqtt.base_topic)
        self.base = self.topics.base
        self.prefix = cfg.mqtt.discovery_prefix.rstrip("/")
        self.birth_topic = hass.birth_topic(self.prefix)
        settings = getattr(cfg, "nowplaying", None)
        self.progress_every_s = float(getattr(settings, "progress_every_s", PROGRESS_EVERY_S))
        self.cover_wait_s = COVER_WAIT_S
        self.settle_s = SETTLE_S
        self._settle_until = 0.0  # loop time; states are held until then
        self._settler: asyncio.Task | None = None
        self.turntables: dict[str, _Turntable] = {}
        self.matchers: set[str] = set()  # nodes whose matcher is online
        self.covers: dict[int, tuple[bytes, str]] = {}  # cover id -> (bytes, content type), while wanted
        self._lock = asyncio.Lock()  # the handler, the progress ticker and cover timeouts take turns

    # -- running ---------------------------------------------------------------

    async def run(self) -> None:
        # matcher statuses first: their retained states arrive before the listeners', so a
        # listener's "matcher online" is right from its first publish (Mosquitto keeps the order)
        for topic in (
            self.topics.role_status_any("matcher"),
            self.birth_topic,
            self.topics.any_listener("listener"),
            self.topics.any_listener("now_playing"),
            self.topics.any_listener("play"),
        ):
            await self.conn.subscribe(topic, qos=1)
        ticker = asyncio.create_task(self._tick(), name="nowplaying-progress")
        try:
            await self.conn.run(self.handle, self._on_connect)
        finally:
            ticker.cancel()
            if self._settler is not None:
                self._settler.cancel()
            for t in self.turntables.values():
                if t.cover_wait is not None:
                    t.cover_wait.cancel()
            await asyncio.gather(ticker, return_exceptions=True)

    async def _on_connect(self) -> None:
        """Hold entity states until the retained ones have come in.

        Retained listener states, now playings and matcher statuses arrive in no
        guaranteed order; publishing after each would flicker Home Assistant's
        entities (title -> unknown -> title) on every restart of this role.
        """
        self._settle_until = asyncio.get_running_loop().time() + self.settle_s
        if self._settler is not None:
            self._settler.cancel()
        self._settler = asyncio.create_task(self._settle(), name="nowplaying-settle")

    async def _settle(self) -> None:
        await asyncio.sleep(self.settle_s)
        async with self._lock:
            self._settle_until = 0.0
            for t in list(self.turntables.values()):
                await self._refresh(t)

    @property
    def _holding(self) -> bool:
        return asyncio.get_running_loop().time() < self._settle_until

    @property
    def matcher_online(self) -> bool:
        return bool(self.matchers)

    async def handle(self, msg: Message) -> None:
        async with self._lock:
            await self._handle(msg)

    async def _handle(self, msg: Message) -> None:
        if msg.topic == self.birth_topic:
            await self._on_birth(msg)
            return
        parts = self.topics.parts(msg.topic)
        match parts:
            case [node, "matcher", "status"]:
                await self._on_matcher(node, msg)
            case ["library", "cover", cover_id]:
                await self._on_cover(cover_id, msg)
            case [listener, "listener"]:
                await self._on_listener_state(listener, msg)
            case [listener, "now_playing"]:
                await self._on_now_playing(listener, msg)
            case [listener, "play"]:
                await self._on_play_event(listener, msg)
            case _:
                return

    # -- Home Assistant ----------------------------------------------------------

    async def _on_birth(self, msg: Message) -> None:
        text = msg.payload.decode(errors="replace").strip()
        if text == hass.OFFLINE:
            log.info("Home Assistant went offline")
            return
        if text != hass.ONLINE:
            raise MessageError(f"Home Assistant status must be online or offline, got {text[:40]!r}")
        log.info("Home Assistant is online: republishing discovery for %d turntable(s)", len(self.turntables))
        for t in self.turntables.values():
            await self._announce(t)

    async def _announce(self, t: _Turntable, keys: tuple[str, ...] | None = None) -> None:
        configs = hass.discovery_configs(
            t.name, prefix=self.prefix, base=self.base, listener_node=t.node,
            role_status=self.conn.status_topic, image_type=t.image_type,
        )
        wanted = None if keys is None else {hass.discovery_topic(self.prefix, t.name, k) for k in keys}
        for topic, payload in configs.items():
            if wanted is None or topic in wanted:
                await self.conn.set_retained(topic, hass.encode(payload), content_type=JSON_CONTENT_TYPE)

    # -- matchers ----------------------------------------------------------------

    async def _on_matcher(self, node: str, msg: Message) -> None:
        text = msg.payload.decode(errors="replace").strip()
        if text not in (ONLINE, OFFLINE, ""):
            raise MessageError(f"matcher status must be online or offline, got {text[:40]!r}")
        was = self.matcher_online
        if text == ONLINE:
            self.matchers.add(node)
        else:
            self.matchers.discard(node)
        if was != self.matcher_online:
            log.info("matcher %s: %s", "online" if self.matcher_online else "none online",
                     ", ".join(sorted(self.matchers)) or node)
        if not self._holding:
            for t in self.turntables.values():
                await self._set(t, "matcher_connectivity", self._matcher_payload())

    def _matcher_payload(self) -> bytes:
        return (ONLINE if self.matcher_online else OFFLINE).encode()

    # -- listeners -----------------------------------------------------------------

    async def _ensure(self, listener: str, node: str | None = None) -> _Turntable:
        t = self.turntables.get(listener)
        if t is None:
            s = hass.slug(listener)
            for other in self.turntables.values():
                if hass.slug(other.name) == s:
                    raise MessageError(f"turntable {listener!r} would get the same Home Assistant ids as "
                                       f"{other.name!r} ({s}_...): rename one of them")
            t = self.turntables[listener] = _Turntable(listener, node or listener)
            log.info("turntable %r: Home Assistant device %s (%s)", listener, hass.device_id(listener),
                     hass.entity_id(listener, "now_playing"))
            await self._announce(t)
            if not self._holding:
                await self._set(t, "matcher_connectivity", self._matcher_payload())
        elif node and node != t.node:
            log.info("turntable %r is heard by node %s (was %s)", listener, node, t.node)
            t.node = node
            await self._announce(t)
        return t

    async def _on_listener_state(self, listener: str, msg: Message) -> None:
        if not msg.payload:  # retained state cleared: the listener is decommissioned
            if listener in self.turntables:
                await self._forget(listener)
            return
        state = ListenerState.parse(msg.payload)
        if state.listener != listener:
            raise MessageError(f"listener state names {state.listener!r}, its topic {listener!r}")
        t = await self._ensure(listener, getattr(state, "node", None))
        t.listener_state = state
        await self._refresh(t)

    async def _forget(self, listener: str) -> None:
        t = self.turntables.pop(listener)
        if t.cover_wait is not None:
            t.cover_wait.cancel()
        await self._release_cover(t.cover_id)
        log.info("turntable %r removed: its Home Assistant entities are deleted", listener)
        await remove_listener(self.conn, listener, pipeline_states=False)

    # -- what is playing ---------------------------------------------------------------

    async def _on_now_playing(self, listener: str, msg: Message) -> None:
        if not msg.payload:
            t = self.turntables.get(listener)
            if t is not None:
                t.status, t.play = "idle", None
                await self._refresh(t)
            return
        np = NowPlaying.parse(msg.payload)
        if np.listener != listener:
            raise MessageError(f"now playing names {np.listener!r}, its topic {listener!r}")
        if np.play is not None and np.play.listener != listener:
            raise MessageError(f"now playing's play names {np.play.listener!r}, its topic {listener!r}")
        if listener not in self.turntables and np.state == "idle":
            return  # an idle turntable no listener state speaks for (e.g. one just removed): no device
        t = await self._ensure(listener)
        live = not msg.retain
        if np.updated_at < t.updated_at:
            return  # older than what a play event already told
        t.status = np.state
        t.play = np.play if np.state == "playing" else None
        t.updated_at = np.updated_at
        await self._refresh(t)
        if t.play is not None and t.play.play_id != t.announced_play:
            if live:
                await self._event(t, "track_changed", t.play)
            t.announced_play = t.play.play_id
        await self._unknown_music(t, live)

    async def _on_play_event(self, listener: str, msg: Message) -> None:
        ev = PlayEvent.parse(msg.payload)
        p = ev.play
        if p.listener != listener:
            raise MessageError(f"play event names {p.listener!r}, its topic {listener!r}")
        t = await self._ensure(listener)
        live = not msg.retain
        if ev.event in ("started", "updated"):
            current = t.play is not None and t.play.play_id == p.play_id
            if p.updated_at >= t.updated_at or (current and p.updated_at >= t.play.updated_at):
                t.status, t.play, t.updated_at = "playing", p, max(t.updated_at, p.updated_at)
                await self._refresh(t)
                await self._unknown_music(t, live)
            if ev.event == "started" and p.play_id != t.announced_play:
                if live:
                    await self._event(t, "track_changed", p)
                t.announced_play = p.play_id
            return
        # ended (updated_at: when dedupe decided it; ended_at may be earlier, e.g. when the silence began)
        if t.play is not None and t.play.play_id == p.play_id and p.end_reason != "next_track" \
                and p.updated_at >= t.updated_at:
            t.status = "unknown" if p.end_reason == "unknown_music" else "idle"
            t.play, t.updated_at = None, p.updated_at
            await self._refresh(t)
            await self._unknown_music(t, live)
        if live and p.play_id not in t.finished:
            t.finished.append(p.play_id)
            kind = finish_kind(p)
            if kind is not None:
                await self._event(t, kind, p)

    async def _unknown_music(self, t: _Turntable, live: bool) -> None:
        """unknown_record once each time the turntable turns to music not in the library."""
        if t.status != "unknown":
            t.announced_unknown = False
        elif not t.announced_unknown:
            t.announced_unknown = True
            if live:
                await self._event(t, "unknown_record", None)

    async def _event(self, t: _Turntable, event_type: str, play: Play | None, **extra: Any) -> None:
        log.info("turntable %r: %s%s", t.name, event_type, f" ({play.track.title})" if play is not None else "")
        await self.conn.publish(hass.state_topic(self.base, t.name, "playback"),
                                hass.event_payload(event_type, t.name, play, **extra),
                                qos=1, retain=False, content_type=JSON_CONTENT_TYPE)

    # -- states ---------------------------------------------------------------------------

    async def _set(self, t: _Turntable, key: str, payload: bytes, content_type: str | None = None) -> None:
        topic = hass.state_topic(self.base, t.name, key)
        if t.published.get(topic) == payload:
            return
        t.published[topic] = payload
        await self.conn.set_retained(topic, payload, content_type=content_type)

    async def _refresh(self, t: _Turntable) -> None:
        """Publish what changed in the turntable's entity states (not while settling)."""
        if self._holding:
            return
        await self._set(t, "matcher_connectivity", self._matcher_payload())
        states = hass.entity_states(t.name, t.status, t.play, t.listener_state)
        for key, payload in states.items():
            await self._set(t, key, payload, JSON_CONTENT_TYPE if key.endswith("attributes") else None)
        playing = t.play if t.status == "playing" else None
        await self._want_cover(t, playing.track.cover_id if playing is not None else None)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.progress_every_s)
            async with self._lock:
                if self._holding:
                    continue
                now = time.time()
                for t in list(self.turntables.values()):
                    if t.status == "playing" and t.play is not None:
                        await self._set(t, "progress", hass.progress_state(t.play, now))

    # -- cover art -------------------------------------------------------------------------

    async def _want_cover(self, t: _Turntable, cover_id: int | None) -> None:
        if cover_id == t.cover_id and (t.image is not None or t.cover_wait is not None):
            return  # shown, or on its way
        old, t.cover_id = t.cover_id, cover_id
        if old is not None and old != cover_id:
            await self._release_cover(old)
        if t.cover_wait is not None:
            t.cover_wait.cancel()
            t.cover_wait = None
        if cover_id is None:
            await self._show(t, None)
        elif cover_id in self.covers:
            await self._show(t, cover_id)
        else:
            # a (re)subscription makes the broker send the retained cover now
            await self.conn.subscribe(self.topics.cover(cover_id), qos=1)
            t.cover_wait = asyncio.create_task(self._cover_timeout(t, cover_id))

    async def _release_cover(self, cover_id: int | None) -> None:
        if cover_id is None or any(o.cover_id == cover_id for o in self.turntables.values()):
            return
        self.covers.pop(cover_id, None)
        await self.conn.unsubscribe(self.topics.cover(cover_id))

    async def _cover_timeout(self, t: _Turntable, cover_id: int) -> None:
        await asyncio.sleep(self.cover_wait_s)
        async with self._lock:
            if t.cover_id == cover_id and cover_id not in self.covers and self.turntables.get(t.name) is t:
                log.info("turntable %r: cover %d is not on the broker; showing the placeholder", t.name, cover_id)
                await self._show(t, None)

    async def _on_cover(self, raw_id: str, msg: Message) -> None:
        try:
            cover_id = int(raw_id)
        except ValueError:
            raise MessageError(f"cover id {raw_id!r} is not a number") from None
        wanting = [t for t in self.turntables.values() if t.cover_id == cover_id]
        if not wanting:
            return  # a cover no turntable plays any more
        if msg.payload:
            self.covers[cover_id] = (msg.payload, hass.image_type(msg.payload, msg.content_type))
        else:
            self.covers.pop(cover_id, None)
        if self._holding:
            return  # shown when the states are
        for t in wanting:
            if t.cover_wait is not None:
                t.cover_wait.cancel()
                t.cover_wait = None
            await self._show(t, cover_id if cover_id in self.covers else None)

    async def _show(self, t: _Turntable, cover_id: int | None) -> None:
        if cover_id is None:
            data, ctype, what = hass.PLACEHOLDER_SVG, hass.PLACEHOLDER_TYPE, "placeholder"
        else:
            (data, ctype), what = self.covers[cover_id], f"cover:{cover_id}"
        if t.image == what and t.published.get(hass.state_topic(self.base, t.name, "cover_art")) == data:
            return
        if ctype != t.image_type:
            t.image_type = ctype  # Home Assistant serves the bytes with the type its config names
            await self._announce(t, ("cover_art",))
        t.image = what
        await self._set(t, "cover_art", data, ctype)


def finish_kind(play: Play) -> str | None:
    """The event an ended play is: side_finished, record_finished, or none.

    A side is over when a track ends in silence (the turntable went idle) after
    playing through; a needle lifted mid-track is not a finished side. It is
    the record's end when the track is the album's last: the play says so
    (``last_on_album``), or the track's tags do (track n of n on the last disc).
    Without either, every finished side is a side_finished.
    """
    if play.end_reason != "silence" or play.played_through is False:
        return None
    last = getattr(play, "last_on_album", None)
    if last is None:
        last = last_on_album(play.track)
    return "record_finished" if last else "side_finished"


def last_on_album(track) -> bool | None:
    """Whether the track is its album's last, from its track and disc totals; None: not known."""
    number, total = track.track_number, getattr(track, "track_total", None)
    if not number or not total:
        return None
    if number < total:
        return False
    disc, discs = track.disc_number, getattr(track, "disc_total", None)
    if discs and disc:
        return disc >= discs
    return None if discs else True


async def remove_listener(conn: Any, listener: str, *, pipeline_states: bool = True) -> list[str]:
    """Delete a decommissioned turntable from Home Assistant; the topics cleared.

    Publishes empty retained payloads on every discovery config of its device
    (Home Assistant removes the entities, then the device) and on its entity
    states; with ``pipeline_states`` also on its retained ``listener`` and
    ``now_playing`` states, so no nowplaying role discovers it again (a running
    one sees the cleared listener state and forgets it too). Stop the
    listener first, or it publishes its state again.

    ``conn`` is a :class:`~vinyl_mqtt.mqtt.Connection` (or anything with its
    ``cfg.discovery_prefix``, ``topics`` and ``set_retained``).
    """
    topics: Topics = conn.topics
    cleared = hass.discovery_topics(conn.cfg.discovery_prefix, listener) + hass.state_topics(topics.base, listener)
    if pipeline_states:
        cleared += [topics.listener_state(listener), topics.now_playing(listener)]
    for topic in cleared:
        await conn.set_retained(topic, b"")
    return cleared


class _Publisher:
    """Just enough of a Connection for :func:`remove_listener`, over a plain client (no status topic)."""

    def __init__(self, client, cfg, topics: Topics):
        self.client, self.cfg, self.topics = client, cfg, topics

    async def set_retained(self, topic: str, payload: bytes | str, *, content_type: str | None = None) -> None:
        await self.client.publish(topic, payload, qos=1, retain=True)


async def remove_listener_once(cfg: Config, listener: str, *, timeout: float = 10.0) -> list[str]:
    """``vinyl-mqtt hass remove LISTENER``: connect, remove, disconnect; the topics cleared.

    A one-shot client (no role status topic, no last will); raises
    ``aiomqtt.MqttError`` when the broker cannot be reached.
    """
    import aiomqtt

    from ..mqtt import tls_context

    m = cfg.mqtt
    ctx = await asyncio.to_thread(tls_context, m.tls) if m.tls.enabled else None
    client = aiomqtt.Client(
        m.host, m.port, username=m.username,
        password=m.password.get_secret_value() if m.password is not None else None,
        identifier=f"{m.client_id or 'vinyl-mqtt-' + cfg.node}-hass-remove",
        protocol=aiomqtt.ProtocolVersion.V5, tls_context=ctx, timeout=timeout,
    )
    async with client:
        return await remove_listener(_Publisher(client, m, Topics(m.base_topic)), listener)
