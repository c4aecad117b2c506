"""The waker role: Wake-on-LAN for the matcher node when a record needs it.

The matcher usually runs on a bigger machine that may be asleep; the
listener then spools its clips.  The waker watches, over MQTT only,

* ``<base>/+/matcher/status``: matcher availability (``online`` / ``offline``,
  retained, last will); with ``matcher_nodes`` set, only those nodes count;
* ``<base>/+/listener/status``: a listener whose node is offline is not
  playing, whatever its retained state still says;
* ``<base>/+/listener``: each turntable's retained
  :class:`~vinyl_mqtt.messages.ListenerState`;

and when a turntable plays while no matcher is online it sends the magic
packet (:mod:`vinyl_mqtt.wol`) and publishes a
:class:`~vinyl_mqtt.messages.WakeEvent` on ``<base>/<listener>/wake``:

* ``sent``: packets out, a wake is in progress.  While it is, nothing is sent
  again: other turntables that start playing join it;
* ``woke``: a matcher came online within ``wake_timeout_s`` (``waited_s`` says
  how long it took), published for every turntable that waited;
* ``failed``: none did.  It is logged, and for the turntables concerned no
  packet is sent again during that play: the next try is at the next start
  of play (a machine that does not wake is not hammered in a loop).

Nothing is ever sent while a matcher is online.  One target machine (one
MAC) per waker: one wake in progress at a time.  A matcher that goes away in
the middle of a play (the node went to sleep) is woken again, as music is
still waiting to be matched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .. import wol
from ..config import ConfigError
from ..messages import JSON_CONTENT_TYPE, ONLINE, ListenerState, MessageError, Topics, WakeEvent, WakeStatus
from ..mqtt import Connection, Message
from ..wol import WakerConfig

__all__ = ["WakerConfig", "WakerRole"]

log = logging.getLogger(__name__)

SETTLE_S = 0.5  # after (re)connecting: let every retained state in before deciding anything


@dataclass
class _Turntable:
    playing: bool = False
    node: str | None = None
    gave_up: bool = False  # a wake failed during this play: wait for the next start of play


@dataclass
class _Wake:
    mac: str
    attempt: int
    started: float  # monotonic
    listeners: list[str] = field(default_factory=list)  # turntables waiting on it, first the one that asked
    timer: asyncio.Task | None = None


Sender = Callable[..., Awaitable[int]]


class WakerRole:
    name = "waker"

    def __init__(self, cfg, conn: Connection, *, sender: Sender = wol.asend):
        settings = getattr(cfg, "waker", None)
        if settings is None:
            raise ConfigError("the waker role needs a waker: section with the mac: of the matcher node to wake")
        if isinstance(settings, dict):
            settings = WakerConfig.model_validate(settings)
        self.cfg = cfg
        self.conn = conn
        self.settings: WakerConfig = settings
        self.mac = settings.mac
        self.topics = Topics(cfg.mqtt.base_topic)
        self.sender = sender
        self.matchers: set[str] = set()  # nodes (that count) whose matcher is online
        self.turntables: dict[str, _Turntable] = {}
        self.offline_nodes: set[str] = set()  # nodes whose listener role said offline
        self.wake: _Wake | None = None
        self.attempt = 0  # attempts since the last successful wake
        self.packets = 0  # magic packets sent (all wakes)
        self.events: deque[WakeEvent] = deque(maxlen=100)  # the latest published (for tests and logs)
        self._lock = asyncio.Lock()
        self._settled = False
        self._settle_task: asyncio.Task | None = None

    async def run(self) -> None:
        log.info("waker: will wake %s via %s:%d when a turntable plays and no matcher%s is online",
                 self.mac, self.settings.broadcast, self.settings.port,
                 f" of {', '.join(self.settings.matcher_nodes)}" if self.settings.matcher_nodes else "")
        # availability first: its retained copies arrive before the turntables' states
        await self.conn.subscribe(self.topics.role_status_any("matcher"), qos=1)
        await self.conn.subscribe(self.topics.role_status_any("listener"), qos=1)
        await self.conn.subscribe(self.topics.any_listener("listener"), qos=1)
        try:
            await self.conn.run(self.handle, self._on_connect)
        finally:
            for t in (self._settle_task, self.wake.timer if self.wake else None):
                if t is not None:
                    t.cancel()
                    await asyncio.gather(t, return_exceptions=True)

    async def _on_connect(self) -> None:
        self._settled = False
        if self._settle_task is not None:
            self._settle_task.cancel()
        self._settle_task = asyncio.create_task(self._settle(), name="waker-settle")

    async def _settle(self) -> None:
        await asyncio.sleep(SETTLE_S)
        self._settled = True
        await self._evaluate()

    # -- incoming ----------------------------------------------------------------------

    async def handle(self, msg: Message) -> None:
        parts = self.topics.parts(msg.topic)
        if len(parts) == 3 and parts[2] == "status":
            node, role, _ = parts
            online = msg.payload.decode(errors="replace") == ONLINE
            if role == "matcher":
                if self.settings.matcher_nodes is not None and node not in self.settings.matcher_nodes:
                    return
                if online:
                    self.matchers.add(node)
                else:
                    self.matchers.discard(node)
            elif role == "listener":
                if online:
                    self.offline_nodes.discard(node)
                else:
                    self.offline_nodes.add(node)
                    for t in self.turntables.values():
                        if t.node == node:  # that listener is gone: its play (and any give-up) ended
                            t.playing = t.gave_up = False
            else:
                return
        elif len(parts) == 2 and parts[1] == "listener":
            listener = parts[0]
            if not msg.payload:
                self.turntables.pop(listener, None)  # a cleared retained state
                return
            st = ListenerState.parse(msg.payload)
            if st.listener != listener:
                raise MessageError(f"listener state names {st.listener!r}, topic says {listener!r}")
            t = self.turntables.setdefault(listener, _Turntable())
            t.node = st.node
            playing = st.state == "playing"
            if playing and not t.playing:
                t.gave_up = False  # a new start of play: worth another try
                log.debug("%s: playing", listener)
            elif not playing:
                t.gave_up = False
            t.playing = playing
        else:
            return
        await self._evaluate()

    # -- deciding ------------------------------------------------------------------------

    def _wants(self, t: _Turntable) -> bool:
        return t.playing and not t.gave_up and (t.node is None or t.node not in self.offline_nodes)

    async def _evaluate(self) -> None:
        async with self._lock:
            if self.matchers:
                if self.wake is not None:
                    await self._woke()
                return
            if not self._settled:
                return  # _settle() evaluates once the retained states are in
            wanting = [name for name, t in self.turntables.items() if self._wants(t)]
            if not wanting:
                return
            if self.wake is not None:  # one wake at a time: the others wait on it
                for name in wanting:
                    if name not in self.wake.listeners:
                        log.info("%s: playing with no matcher online; waiting on the wake already in progress", name)
                        self.wake.listeners.append(name)
                return
            await self._send(wanting)

    async def _send(self, listeners: list[str]) -> None:
        s = self.settings
        self.attempt += 1
        wake = _Wake(self.mac, self.attempt, time.monotonic(), list(listeners))
        self.wake = wake
        try:
            n = await self.sender(self.mac, broadcast=s.broadcast, port=s.port, repeat=s.repeat,
                                  interval_s=s.interval_s)
        except OSError as e:
            log.error("%s: no matcher online, and the Wake-on-LAN packet for %s to %s:%d could not be sent: %s",
                      ", ".join(listeners), self.mac, s.broadcast, s.port, e.strerror or e)
            self.wake = None
            self._give_up(wake)
            await self._announce(wake, "failed")
            return
        self.packets += n
        log.info("%s: playing with no matcher online: sent %d Wake-on-LAN packet(s) for %s to %s:%d "
                 "(attempt %d; waiting up to %g s)", ", ".join(listeners), n, self.mac, s.broadcast, s.port,
                 wake.attempt, s.wake_timeout_s)
        wake.timer = asyncio.create_task(self._expire(wake), name="waker-timeout")
        await self._announce(wake, "sent")

    async def _woke(self) -> None:
        wake, self.wake = self.wake, None
        assert wake is not None
        if wake.timer is not None:
            wake.timer.cancel()
        waited = time.monotonic() - wake.started
        log.info("matcher %s online %.1f s after the Wake-on-LAN packet for %s", ", ".join(sorted(self.matchers)),
                 waited, self.mac)
        self.attempt = 0
        await self._announce(wake, "woke", waited)

    async def _expire(self, wake: _Wake) -> None:
        await asyncio.sleep(self.settings.wake_timeout_s)
        async with self._lock:
            if self.wake is not wake:
                return
            self.wake = None
            self._give_up(wake)
            waited = time.monotonic() - wake.started
            log.warning("no matcher came online within %g s of the Wake-on-LAN packet for %s (attempt %d): "
                        "is Wake-on-LAN enabled on that machine, and the broadcast address %s right? "
                        "Trying again at the next start of play", self.settings.wake_timeout_s, self.mac,
                        wake.attempt, self.settings.broadcast)
            await self._announce(wake, "failed", waited)

    def _give_up(self, wake: _Wake) -> None:
        for name in wake.listeners:
            t = self.turntables.get(name)
            if t is not None and t.playing:
                t.gave_up = True

    async def _announce(self, wake: _Wake, status: WakeStatus, waited: float | None = None) -> None:
        for name in wake.listeners:
            event = WakeEvent(listener=name, status=status, mac=wake.mac, attempt=wake.attempt,
                              waited_s=None if waited is None else round(waited, 3))
            self.events.append(event)
            if not await self.conn.publish(self.topics.wake(name), event.to_json(), qos=1,
                                           content_type=JSON_CONTENT_TYPE):
                log.debug("%s: wake event %s not published (broker away)", name, status)
