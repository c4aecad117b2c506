"""The MQTT foundation every role stands on: one session per role, kept up.

A :class:`Connection` is one role's MQTT v5 session (aiomqtt over paho-mqtt).
``run()`` connects and reconnects forever with backoff (1 s doubling to 60 s,
with jitter) until cancelled or closed.  On every (re)connect it, in order:

1. publishes ``online`` retained on the role's status topic (the last will,
   set at connect time, is ``offline`` retained, QoS 1: Home Assistant's
   availability pattern);
2. re-subscribes every topic given to :meth:`Connection.subscribe`;
3. re-publishes every retained state given to :meth:`Connection.set_retained`
   (a broker restarted without persistence comes back with them);
4. awaits ``on_connect()``;

and only then sets :attr:`Connection.connected` and hands the messages of that
session to the handler.

Messages are handed over in order, one at a time, by a worker task of their
own, so a slow handler never blocks the network: paho keeps reading,
acknowledging (QoS 1 PUBACK is sent when the message is *received*, not when
the handler is done) and sending while the handler runs.  A handler raising
:class:`~vinyl_mqtt.messages.MessageError` gets one WARNING per (topic,
reason); any other exception is logged with its traceback; the connection keeps
serving either way.  A handler that wants parallelism starts its own tasks.
Because paho acknowledges on receipt, messages received but not yet handled
are lost if the process dies (the inbox is in memory and unbounded); sessions
are clean (no broker-side queue across reconnects).

``publish()`` works from inside ``on_connect()`` (before ``connected`` is set).
It never raises because the broker is down: it answers whether the
broker took the message (for QoS 1: PUBACK received), and the caller decides
whether to spool, drop or retry.

Shutdown: ``close()`` drains what was already received (a few seconds at
most), publishes ``offline`` retained and disconnects cleanly.  Cancelling
``run()`` instead ends the session with MQTT v5's "disconnect with will
message", so the broker publishes the ``offline`` will at once; either way the
role's status ends ``offline``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .config import MqttConfig, TlsConfig
from .messages import OFFLINE, ONLINE, MessageError, Topics

log = logging.getLogger("vinyl_mqtt.mqtt")
_paho_log = logging.getLogger("vinyl_mqtt.mqtt.paho")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
BACKOFF_JITTER = 0.2  # each wait is the backoff times a random factor in [1 - j, 1 + j]
STABLE_SESSION_S = 10.0  # a session this long resets the backoff (a flapping one does not)
DRAIN_S = 5.0  # close(): how long to let the handler finish messages already received
_MAX_REPORTED = 4096  # (topic, reason) pairs remembered for once-only warnings


@dataclass(frozen=True)
class Message:
    """An incoming message, as a handler receives it."""

    topic: str
    payload: bytes
    retain: bool
    content_type: str | None
    qos: int

    @classmethod
    def from_aiomqtt(cls, m: aiomqtt.Message) -> Message:
        payload = m.payload  # paho gives bytes; aiomqtt's type also allows str, numbers, None
        if payload is None:
            payload = b""
        elif isinstance(payload, (int, float)):
            payload = str(payload).encode()
        else:
            payload = _as_bytes(payload)
        content_type = getattr(m.properties, "ContentType", None) if m.properties is not None else None
        return cls(topic=m.topic.value, payload=payload, retain=bool(m.retain), content_type=content_type, qos=m.qos)


Handler = Callable[[Message], Awaitable[None]]
OnConnect = Callable[[], Awaitable[None]]


class _SessionDown(Exception):
    """The session ended while an operation waited on the broker."""


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The SSL context for ``tls`` (blocking: it reads certificate files)."""
    ctx = ssl.create_default_context(cafile=str(tls.ca_certs) if tls.ca_certs else None)
    if tls.certfile is not None:
        ctx.load_cert_chain(str(tls.certfile), str(tls.keyfile) if tls.keyfile else None)
    if tls.insecure:
        ctx.check_hostname = False  # the certificate chain is still verified
    return ctx


def _cause(exc: BaseException | None) -> str:
    """A short, log-friendly reason for a failed connect or a lost session."""
    if exc is None:
        return "unknown cause"
    inner = exc.__cause__ if isinstance(exc, aiomqtt.MqttError) and exc.__cause__ is not None else exc
    if isinstance(inner, aiomqtt.MqttCodeError) and isinstance(inner.rc, ReasonCode):
        if inner.rc.value == 128 and "Unexpected disconnection" in inner.args:
            # paho reports a socket closed under it (EOF, reset) as "Unspecified error"
            return "connection closed by the broker or the network"
        return f"{inner.rc} (reason code {inner.rc.value})"
    text = str(inner).strip() or type(inner).__name__
    if isinstance(inner, OSError) and not isinstance(inner, aiomqtt.MqttError) and inner.strerror:
        text = inner.strerror
    return text


def _publish_properties(expiry_s: float | None, content_type: str | None) -> Properties | None:
    if expiry_s is None and content_type is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if expiry_s is not None:
        if expiry_s <= 0:
            raise ValueError(f"expiry_s must be positive, not {expiry_s}")
        props.MessageExpiryInterval = max(1, math.ceil(expiry_s))  # whole seconds on the wire
    if content_type is not None:
        props.ContentType = content_type
    return props


def _as_bytes(payload: bytes | bytearray | str) -> bytes:
    return payload.encode() if isinstance(payload, str) else bytes(payload)


class Connection:
    """One role's MQTT session, kept up across broker restarts and network drops."""

    def __init__(self, cfg: MqttConfig, *, node: str, role: str, topics: Topics):
        self.cfg = cfg
        self.node = node
        self.role = role
        self.topics = topics
        self.status_topic = topics.status(node, role)
        self.client_id = f"{cfg.client_id or 'vinyl-mqtt-' + node}-{role}"
        self.broker = f"{cfg.host}:{cfg.port}"
        self.connected = asyncio.Event()  # set while a session is up (after on_connect)
        # A dead broker or network ends the session (keepalive), which ends every wait at once;
        # these only bound a live-but-silent broker.  A big clip on slow Wi-Fi takes a while to ack.
        self.connect_timeout_s = 10.0  # TCP + TLS + CONNACK
        self.op_timeout_s = max(60.0, 4.0 * cfg.keepalive)  # PUBACK / SUBACK

        self._subscriptions: dict[str, int] = {}
        self._retained: dict[str, tuple[bytes, str | None]] = {}
        self._client: aiomqtt.Client | None = None  # the current session, from CONNACK to its end
        self._pump: asyncio.Task | None = None  # the current session's reader: done == session over
        self._inbox: asyncio.Queue[tuple[int, Message]] = asyncio.Queue()
        self._session = 0  # number of the current / last session
        self._ready = 0  # sessions up to this one have finished their (re)connect steps
        self._ready_cond = asyncio.Condition()
        self._worker: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self._running = False
        self._finished = asyncio.Event()
        self._drain_s = DRAIN_S
        self._reported: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        state = "connected" if self.connected.is_set() else "disconnected"
        return f"<Connection {self.client_id} {self.broker} {state}>"

    # -- the session loop ------------------------------------------------------

    async def run(self, handler: Handler, on_connect: OnConnect | None = None) -> None:
        """Connect, and reconnect forever with backoff, until cancelled or closed."""
        if self._running:
            raise RuntimeError(f"{self.role}: Connection.run() is already running")
        if self._stop.is_set():
            return  # closed before it ran
        self._running = True
        self._finished.clear()
        try:
            ctx = None
            if self.cfg.tls.enabled:
                try:
                    ctx = await asyncio.to_thread(tls_context, self.cfg.tls)
                except (OSError, ssl.SSLError) as e:
                    log.error("%s: cannot set up TLS for %s: %s", self.role, self.broker, e)
                    raise
            self._worker = asyncio.create_task(self._work(handler), name=f"mqtt-{self.client_id}-handler")
            await self._loop(ctx, on_connect)
        finally:
            self.connected.clear()
            self._client = self._pump = None
            if self._worker is not None:
                self._worker.cancel()
                await asyncio.gather(self._worker, return_exceptions=True)
                self._worker = None
            self._running = False
            self._finished.set()

    async def _loop(self, ctx: ssl.SSLContext | None, on_connect: OnConnect | None) -> None:
        delay = BACKOFF_FIRST_S
        down_since: float | None = None  # start of the current outage (or of the first connect)
        said: set[str] = set()  # causes already logged in this outage
        first = True
        while not self._stop.is_set():
            client = self._new_client(ctx)
            log.debug("%s: connecting to %s as %s", self.role, self.broker, self.client_id)
            try:
                await self._connect(client)
            except aiomqtt.MqttError as e:
                cause = _cause(e)
                if down_since is None:
                    down_since = time.monotonic()
                # once per outage; again only if the broker answers but refuses us (credentials, ACL)
                if not said or (cause not in said and isinstance(e, MqttConnectError)):
                    said.add(cause)
                    log.warning("%s: cannot connect to MQTT broker %s (%s); retrying with backoff up to %g s",
                                self.role, self.broker, cause, BACKOFF_MAX_S)
                else:
                    log.debug("%s: still cannot connect to %s (%s)", self.role, self.broker, cause)
                if await self._sleep(delay):
                    return
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue

            started = time.monotonic()
            if first and down_since is None:
                log.info("%s: connected to MQTT broker %s as %s", self.role, self.broker, self.client_id)
            elif first:
                log.info("%s: connected to MQTT broker %s after %.1f s", self.role, self.broker, started - down_since)
            else:
                log.info("%s: reconnected to MQTT broker %s after %.1f s", self.role, self.broker,
                         started - (down_since or started))
            first, down_since, said = False, None, set()

            try:
                cause = await self._serve(client, on_connect)
            except asyncio.CancelledError:
                await self._abort(client)
                raise
            finally:
                self.connected.clear()
                self._client = self._pump = None

            if cause is None:  # close(): offline was published, leave cleanly
                try:
                    await asyncio.wait_for(client.__aexit__(None, None, None), self.connect_timeout_s)
                except (aiomqtt.MqttError, TimeoutError) as e:
                    log.debug("%s: unclean disconnect from %s: %s", self.role, self.broker, e)
                log.info("%s: disconnected from MQTT broker %s", self.role, self.broker)
                return

            down_since = time.monotonic()
            said.add(cause)
            log.warning("%s: lost connection to MQTT broker %s (%s); reconnecting", self.role, self.broker, cause)
            await self._discard(client)
            if down_since - started >= STABLE_SESSION_S:
                delay = BACKOFF_FIRST_S
            if await self._sleep(delay):
                return
            delay = min(delay * 2, BACKOFF_MAX_S)

    def _new_client(self, ctx: ssl.SSLContext | None) -> aiomqtt.Client:
        cfg = self.cfg
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password is not None else None,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(self.status_topic, OFFLINE, qos=1, retain=True),
            keepalive=cfg.keepalive,
            timeout=self.connect_timeout_s,
            tls_context=ctx,
            logger=_paho_log,
        )
        client.pending_calls_threshold = 1000  # many QoS 1 publishes in flight is normal (spool flush)
        return client

    async def _connect(self, client: aiomqtt.Client) -> None:
        """``client.__aenter__()``; if cancelled meanwhile, don't leave a live session behind."""
        attempt = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # paho's connect runs in a thread that cancellation cannot stop: let it end, then leave
            done, _ = await asyncio.wait({attempt}, timeout=self.connect_timeout_s)
            if attempt in done and attempt.exception() is None:
                await self._abort(client)
            else:
                attempt.cancel()
                await self._discard(client)
            raise
        except aiomqtt.MqttError:
            await self._discard(client)  # e.g. no CONNACK: aiomqtt leaves the socket open
            raise

    async def _sleep(self, delay: float) -> bool:
        """Back off for about ``delay`` s; True if close() was called meanwhile."""
        wait = min(BACKOFF_MAX_S, delay * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER))
        log.debug("%s: next attempt to reach %s in %.1f s", self.role, self.broker, wait)
        try:
            await asyncio.wait_for(self._stop.wait(), wait)
        except TimeoutError:
            return False
        return True

    async def _serve(self, client: aiomqtt.Client, on_connect: OnConnect | None) -> str | None:
        """One session: set it up, serve it; the cause if it was lost, None if close() ended it."""
        self._session += 1
        session = self._session
        pump = asyncio.create_task(self._read(client, session), name=f"mqtt-{self.client_id}-reader")
        self._client, self._pump = client, pump
        stop = asyncio.create_task(self._stop.wait())
        setup = asyncio.create_task(self._setup(client, pump, on_connect))
        try:
            await asyncio.wait({setup, pump, stop}, return_when=asyncio.FIRST_COMPLETED)
            if setup.done() and not pump.done() and not stop.done():
                exc = setup.exception()
                if exc is None:
                    await self._set_ready(session)
                    self.connected.set()
                    await asyncio.wait({pump, stop}, return_when=asyncio.FIRST_COMPLETED)
                elif isinstance(exc, aiomqtt.MqttError):  # e.g. no PUBACK/SUBACK in time: start over
                    return f"setting up the session failed: {_cause(exc)}"
                elif not isinstance(exc, _SessionDown):
                    raise exc
            if stop.done() and not pump.done():
                await self._shutdown(client, pump, setup)
                return None
            await asyncio.wait({pump}, timeout=1.0)  # a session can end in setup before the reader sees it
            if pump.done() and not pump.cancelled():
                return _cause(pump.exception())
            return "session ended"
        finally:
            for t in (setup, stop, pump):
                t.cancel()
            await asyncio.gather(setup, stop, pump, return_exceptions=True)

    async def _setup(self, client: aiomqtt.Client, pump: asyncio.Task, on_connect: OnConnect | None) -> None:
        await self._race(client.publish(self.status_topic, ONLINE, qos=1, retain=True, timeout=self.op_timeout_s), pump)
        if self._subscriptions:
            wanted = list(self._subscriptions.items())
            codes = await self._race(client.subscribe(wanted, timeout=self.op_timeout_s), pump)
            self._check_granted([t for t, _ in wanted], codes)
        retained = list(self._retained.items())
        await asyncio.gather(*(
            self._race(client.publish(topic, payload, qos=1, retain=True,
                                      properties=_publish_properties(None, content_type),
                                      timeout=self.op_timeout_s), pump)
            for topic, (payload, content_type) in retained
        ))
        log.debug("%s: online on %s; %d subscriptions, %d retained states restored", self.role,
                  self.broker, len(self._subscriptions), len(retained))
        if on_connect is not None:
            try:
                await on_connect()
            except (_SessionDown, aiomqtt.MqttError):
                raise
            except Exception:
                log.exception("%s: on_connect failed (connection to %s kept)", self.role, self.broker)

    async def _shutdown(self, client: aiomqtt.Client, pump: asyncio.Task, setup: asyncio.Task) -> None:
        """close(): let the handler finish what was received, then say offline."""
        setup.cancel()
        await self._set_ready(self._session)
        if self._worker is not None and not self._worker.done():
            try:
                await asyncio.wait_for(self._inbox.join(), self._drain_s)
            except TimeoutError:
                log.warning("%s: closing with %d received messages unhandled", self.role, self._inbox.qsize())
        if not pump.done():
            try:
                await self._race(client.publish(self.status_topic, OFFLINE, qos=1, retain=True, timeout=5.0), pump)
            except (_SessionDown, aiomqtt.MqttError) as e:
                log.debug("%s: could not publish offline to %s: %s", self.role, self.broker, e)

    async def _abort(self, client: aiomqtt.Client) -> None:
        """Cancelled: leave with "disconnect with will message" (the broker publishes offline)."""
        try:
            client._client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
            await asyncio.wait_for(client.__aexit__(None, None, None), 2.0)
        except Exception as e:  # noqa: BLE001 - best effort: the will fires on the dropped socket anyway
            log.debug("%s: abrupt disconnect from %s: %r", self.role, self.broker, e)
        log.info("%s: cancelled; left MQTT broker %s with the offline will", self.role, self.broker)

    async def _discard(self, client: aiomqtt.Client) -> None:
        """Close whatever socket a dead or failed client still holds (aiomqtt leaves it
        open when the CONNACK never came); the client is not used again."""
        try:
            if client._client.socket() is not None:
                client._client.disconnect()  # written (and the socket closed) by the event loop
                await asyncio.sleep(0)
        except Exception as e:  # noqa: BLE001
            log.debug("%s: discarding a client for %s: %r", self.role, self.broker, e)

    async def _read(self, client: aiomqtt.Client, session: int) -> None:
        """Move the session's messages into the inbox; raises when the session ends."""
        async for m in client.messages:
            self._inbox.put_nowait((session, Message.from_aiomqtt(m)))

    async def _set_ready(self, session: int) -> None:
        async with self._ready_cond:
            self._ready = max(self._ready, session)
            self._ready_cond.notify_all()

    async def _race(self, op: Awaitable[Any], pump: asyncio.Task) -> Any:
        """Await a broker round trip, unless the session ends first (_SessionDown)."""
        task = asyncio.ensure_future(op)
        try:
            await asyncio.wait({task, pump}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():  # cancel() only asks: it may still be pending
            raise _SessionDown()
        return task.result()

    def _check_granted(self, topics: list[str], codes: Any) -> None:
        for topic, code in zip(topics, codes or ()):
            if isinstance(code, ReasonCode) and code.is_failure:
                log.error("%s: broker %s refused the subscription to %s: %s", self.role, self.broker, topic, code)

    # -- handing messages to the handler ----------------------------------------

    async def _work(self, handler: Handler) -> None:
        while True:
            session, msg = await self._inbox.get()
            try:
                if self._ready < session:  # that session's on_connect has not finished yet
                    async with self._ready_cond:
                        await self._ready_cond.wait_for(lambda: self._ready >= session)
                await self._dispatch(handler, msg)
            finally:
                self._inbox.task_done()

    async def _dispatch(self, handler: Handler, msg: Message) -> None:
        try:
            await handler(msg)
        except MessageError as e:
            reason = str(e)
            key = (msg.topic, reason)
            if key in self._reported:
                log.debug("%s: dropped message on %s: %s", self.role, msg.topic, reason)
                return
            if len(self._reported) >= _MAX_REPORTED:
                self._reported.clear()
            self._reported.add(key)
            log.warning("%s: dropped message on %s: %s", self.role, msg.topic, reason)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being shut down
            log.error("%s: handler was cancelled on a message on %s (not by the connection)", self.role, msg.topic)
        except Exception:
            log.exception("%s: handler failed on a message on %s (connection to %s kept)",
                          self.role, msg.topic, self.broker)

    # -- what roles call -----------------------------------------------------------

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        self._subscriptions[topic] = qos
        client, pump = self._client, self._pump
        if client is None or pump is None or pump.done():
            return  # the next (re)connect subscribes
        try:
            codes = await self._race(client.subscribe(topic, qos, timeout=self.op_timeout_s), pump)
        except (_SessionDown, aiomqtt.MqttError) as e:
            log.debug("%s: subscribe to %s deferred to the next connect: %s", self.role, topic, e)
            return
        self._check_granted([topic], codes)

    async def unsubscribe(self, topic: str) -> None:
        """Forget a subscription (and unsubscribe now if connected)."""
        if self._subscriptions.pop(topic, None) is None:
            return
        client, pump = self._client, self._pump
        if client is None or pump is None or pump.done():
            return
        try:
            await self._race(client.unsubscribe(topic, timeout=self.op_timeout_s), pump)
        except (_SessionDown, aiomqtt.MqttError) as e:
            log.debug("%s: unsubscribe from %s failed: %s", self.role, topic, e)

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: float | None = None,
        content_type: str | None = None,
    ) -> bool:
        """True once the broker has the message (QoS 1: PUBACK), False if not connected.

        Never raises for a down broker: the caller decides whether to spool, drop
        or retry.  False can also mean "the session dropped before the PUBACK":
        the broker may have the message anyway (QoS 1 is at least once).
        """
        props = _publish_properties(expiry_s, content_type)
        client, pump = self._client, self._pump
        if client is None or pump is None or pump.done():
            return False
        try:
            await self._race(client.publish(topic, _as_bytes(payload), qos=qos, retain=retain, properties=props,
                                            timeout=self.op_timeout_s), pump)
        except _SessionDown:
            log.debug("%s: session to %s ended before %s was acknowledged", self.role, self.broker, topic)
            return False
        except aiomqtt.MqttError as e:
            log.debug("%s: publish to %s on %s failed: %s", self.role, topic, self.broker, e)
            return False
        return True

    async def set_retained(self, topic: str, payload: bytes | str, *, content_type: str | None = None) -> None:
        """Publish a retained state now (if connected) and again after every reconnect.

        An empty payload clears the retained message on the broker (and is then forgotten).
        """
        data = _as_bytes(payload)
        self._retained[topic] = (data, content_type)
        if await self.publish(topic, data, qos=1, retain=True, content_type=content_type) and not data:
            if self._retained.get(topic) == (data, content_type):
                del self._retained[topic]

    async def close(self, *, drain_s: float = DRAIN_S) -> None:
        """Publish offline retained on the status topic and disconnect cleanly.

        Messages already received get up to ``drain_s`` to be handled first.
        ``run()`` then returns; a closed Connection does not run again.
        Called from inside the handler, it returns at once (the handler must
        return for the connection to finish closing).
        """
        self._drain_s = drain_s
        self._stop.set()
        if not self._running:
            return
        if self._worker is not None and asyncio.current_task() is self._worker:
            return
        await self._finished.wait()
