"""The scrobbler role: plays in, Last.fm now-playing and scrobbles out, from a persistent queue.

It subscribes ``<base>/+/play`` (the dedupe role's :class:`~vinyl_mqtt.messages.PlayEvent`)
and follows Last.fm's rules:

* ``started``: ``track.updateNowPlaying``, once (a failed one is not retried:
  by then it is stale; a ``started`` that arrives late is not sent at all);
* a play is scrobbled once the track is longer than 30 s and it has played
  half its length or 4 minutes, whichever comes first, with the play's start
  as the timestamp.  Decided on ``updated`` (the position reached the
  threshold) or on ``ended`` (``played_s``); either way the queue is keyed by
  ``play_id``, so a play is queued once.  A play skipped early is not scrobbled.

Every scrobble goes through :class:`~vinyl_mqtt.scrobble_queue.ScrobbleQueue`
(stored before anything is sent; see there for the exactly-once design) and
is sent by :class:`Sender`: oldest first, batches of up to 50, marked sent
only on Last.fm's answer.  Network errors, HTTP 5xx and Last.fm's temporary
errors (8, 11, 16, 29) back off (doubling, with jitter) and retry the same
batch; an invalid session key (9) or any other credentials problem (4, 10,
13, 14, 15, 17, 26) stops sending, keeps the queue, says so in the log and
publishes ``auth_failed``, and sending resumes when the session key file
changes (``vinyl-mqtt lastfm login``); a permanent error refuses the batch
(each is then sent alone to find the culprit, which is marked failed);
ignored scrobbles are recorded with Last.fm's reason; older than 14 days:
``too_old``, never sent.

Each step is published as a :class:`~vinyl_mqtt.messages.ScrobbleEvent` on
``<base>/<listener>/scrobble`` (QoS 1).  pylast runs off the event loop
(``asyncio.to_thread``).  ``dry_run``: a queue in memory, nothing sent to
Last.fm, every request logged instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit


from ..config import LASTFM_API_ROOT, ScrobblerConfig
from ..messages import JSON_CONTENT_TYPE, MessageError, Play, PlayEvent, ScrobbleEvent, Topics
from ..scrobble_queue import Batch, Result, Scrobble, ScrobbleQueue

log = logging.getLogger(__name__)

LIBREFM_API_ROOT = "https://libre.fm/2.0/"
MIN_TRACK_S = 30.0  # Last.fm: "the track must be longer than 30 seconds"
MAX_NEEDED_S = 240.0  # "... played for half its duration, or for 4 minutes"
FROM_START_S = 30.0  # a play first seen this close to the track's start is taken as heard from 0
NOW_PLAYING_FRESH_S = 60.0  # a `started` older than this is stale: no now-playing
MAX_PENDING = 10_000  # events waiting for the broker

TEMPORARY = {8, 11, 16, 29, 500, 502, 503, 504}
AUTH = {4, 9, 10, 13, 14, 15, 17, 26}


# --------------------------------------------------------------------------- rules


def needed_s(duration_s: float) -> float | None:
    """Seconds a track must play to be scrobbled; None: never (30 s or shorter)."""
    if not duration_s or duration_s <= MIN_TRACK_S:
        return None
    return min(duration_s / 2.0, MAX_NEEDED_S)


def heard_s(event: PlayEvent, first_position_s: float | None = None) -> float | None:
    """How much of the play has been heard at this event (None: can't tell yet).

    ``ended`` carries ``played_s``.  For ``updated`` the position counts, from
    where the play was first seen (``first_position_s``, the position on its
    ``started``; a play first seen in its first 30 s counts from 0).
    """
    p = event.play
    if event.event == "ended":
        return p.played_s if p.played_s is not None else None
    if first_position_s is None:
        return None  # its start is unknown here (a restart): the `ended` decides
    start = 0.0 if first_position_s <= FROM_START_S else first_position_s
    return max(0.0, p.position_s - start)


def qualifies(event: PlayEvent, first_position_s: float | None = None) -> bool:
    """Last.fm's rule: longer than 30 s, and half of it or 4 minutes heard."""
    need = needed_s(event.play.track.duration_s)
    heard = heard_s(event, first_position_s)
    return need is not None and heard is not None and heard >= need


def scrobble_of(play: Play) -> Scrobble | None:
    t = play.track
    if not t.artist or not t.title:
        return None
    return Scrobble(
        play_id=play.play_id, listener=play.listener, artist=t.artist, track=t.title,
        timestamp=int(play.started_at), album=t.album or None, album_artist=t.album_artist or None,
        track_number=t.track_number or None, duration=int(round(t.duration_s)) if t.duration_s else None,
    )


# --------------------------------------------------------------------------- Last.fm


def network(api_key: str, api_secret: str, session_key: str = "", *, api_root: str = LASTFM_API_ROOT,
            auth_url: str | None = None):
    """A pylast network for ``api_root`` (Last.fm, Libre.fm, a GNU FM server, a test server)."""
    import pylast

    u = urlsplit(api_root)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ValueError(f"api_root {api_root!r} is not an http(s) URL")
    if u.netloc == "ws.audioscrobbler.com":
        net = pylast.LastFMNetwork(api_key=api_key, api_secret=api_secret, session_key=session_key)
    else:
        net = pylast.LibreFMNetwork(api_key=api_key, api_secret=api_secret, session_key=session_key)
        net.name = u.netloc
        net.homepage = f"{u.scheme}://{u.netloc}"
    if auth_url:
        net.homepage = auth_url.rstrip("/")
    net.ws_server = (u.netloc, u.path or "/2.0/")
    if u.scheme == "http":  # pylast always speaks https: a transport that does plain http (local servers)
        net.proxy = {"all://": _plain_http_transport()}
    return net


def _plain_http_transport():
    """An httpx transport sending pylast's https:// requests as http:// (a local or LAN server).

    pylast builds every URL as https://<ws_server>; its ``proxy`` attribute is
    handed to httpx as ``mounts``, the documented way to route requests.  The
    pool outlives pylast's per-request clients (their close() is ignored).
    """
    import pylast

    httpx = pylast.httpx

    class PlainHTTP(httpx.BaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()

        def handle_request(self, request):
            request.url = request.url.copy_with(scheme="http")
            return self.inner.handle_request(request)

        def close(self) -> None:
            pass

    return PlainHTTP()


def classify(exc: BaseException) -> tuple[str, int | None, str]:
    """(kind, code, reason): kind is temporary, auth or permanent."""
    import pylast

    if isinstance(exc, pylast.WSError):
        try:
            code = int(exc.status)
        except (TypeError, ValueError):
            code = None
        reason = f"Last.fm error {exc.status}: {exc.details}"
        if code in TEMPORARY:
            return "temporary", code, reason
        if code in AUTH:
            return "auth", code, reason
        return "permanent", code, reason
    if isinstance(exc, (pylast.NetworkError, pylast.MalformedResponseError)):
        return "temporary", None, str(exc)
    return "temporary", None, f"{type(exc).__name__}: {exc}"


class LastfmClient:
    """The two calls the scrobbler makes, through pylast (blocking: run them in a thread)."""

    def __init__(self, net):
        self.net = net

    def update_now_playing(self, s: Scrobble) -> None:
        p = s.params()
        self.net.update_now_playing(p["artist"], p["title"], album=p["album"], album_artist=p["album_artist"],
                                    duration=p["duration"], track_number=p["track_number"])

    def scrobble(self, items: list[Scrobble]) -> list[Result]:
        """One track.scrobble request for up to 50; Last.fm's verdict on each (raises pylast errors)."""
        import pylast

        assert 0 < len(items) <= 50
        params: dict[str, object] = {}
        names = {"album_artist": "albumArtist", "track_number": "trackNumber"}
        for i, s in enumerate(items):
            params[f"artist[{i}]"] = s.artist
            params[f"track[{i}]"] = s.track
            for k, v in s.params().items():
                if k in ("artist", "title") or v is None:
                    continue
                params[f"{names.get(k, k)}[{i}]"] = v
        # pylast's scrobble_many() drops the answer; the same request, keeping it:
        doc = pylast._Request(self.net, "track.scrobble", params).execute()
        return parse_scrobbles(doc, items)


def parse_scrobbles(doc, items: list[Scrobble]) -> list[Result]:
    nodes = doc.getElementsByTagName("scrobble")
    out = []
    for i, s in enumerate(items):
        code, msg = 0, ""
        if i < len(nodes):
            ign = nodes[i].getElementsByTagName("ignoredMessage")
            if ign:
                try:
                    code = int(ign[0].getAttribute("code") or 0)
                except ValueError:
                    code = 0
                msg = "".join(n.data for n in ign[0].childNodes if n.nodeType == n.TEXT_NODE).strip()
        if code == 0:
            out.append(Result(s.id, "sent"))
        elif code == 3:
            out.append(Result(s.id, "too_old", code, msg or "Timestamp was too old"))
        else:
            out.append(Result(s.id, "ignored", code, f"{msg or 'ignored'} (code {code})"))
    return out


class DryRunClient:
    """Sends nothing: logs the requests a real run would make."""

    def update_now_playing(self, s: Scrobble) -> None:
        log.info("dry run: would send now playing: %s — %s", s.artist, s.track)

    def scrobble(self, items: list[Scrobble]) -> list[Result]:
        for s in items:
            log.info("dry run: would scrobble %s — %s (%s) at %d", s.artist, s.track, s.album or "no album",
                     s.timestamp)
        return [Result(s.id, "sent", None, "dry run") for s in items]


def read_session_key(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------- sending


EventSink = Callable[[str, Scrobble, "str | None"], Awaitable[None]]


async def _no_events(status: str, s: Scrobble, reason: str | None) -> None:
    return None


class Sender:
    """Empties the queue into Last.fm (see the module docstring for the rules)."""

    def __init__(self, queue: ScrobbleQueue, cfg: ScrobblerConfig, *, client=None,
                 on_event: EventSink = _no_events, clock: Callable[[], float] = time.time):
        self.queue = queue
        self.cfg = cfg
        self.on_event = on_event
        self.clock = clock
        self.wake = asyncio.Event()
        self._fixed_client = client
        self.client = client
        self._session_key: str | None = None
        self.held: str | None = None  # why sending is stopped (auth), None while sending
        self._delay = 0.0
        self.batches_sent = 0

    # -- credentials --------------------------------------------------------------------

    def _load_client(self) -> bool:
        """(Re)build the client if the session key changed; False if there is none."""
        if self._fixed_client is not None:
            self.client = self._fixed_client
            return True
        if self.cfg.dry_run:
            self.client = DryRunClient()
            return True
        key = read_session_key(self.cfg.session_key_file)
        if not key:
            return False
        if key != self._session_key or self.client is None:
            self._session_key = key
            self.client = LastfmClient(network(
                self.cfg.api_key, self.cfg.api_secret.get_secret_value(), key, api_root=self.cfg.api_root,
                auth_url=self.cfg.auth_url))
        return True

    def _credentials_changed(self) -> bool:
        if self._fixed_client is not None:
            return False
        key = read_session_key(self.cfg.session_key_file)
        return bool(key) and key != self._session_key

    # -- one step -----------------------------------------------------------------------

    async def step(self) -> str:
        """Send one batch: idle (nothing to send), sent, retry (temporary error), auth (held)."""
        if self.held is not None:
            if not self._credentials_changed():
                return "auth"
            log.info("scrobbler: a new Last.fm session key: sending again")
            self.held = None
            self.client = None
        if self.client is None and not self._load_client():
            self.held = f"no Last.fm session key in {self.cfg.session_key_file} (run `vinyl-mqtt lastfm login`)"
            log.error("scrobbler: %s; plays stay queued", self.held)
            return "auth"
        for s in await self.queue.expire(self.clock(), self.cfg.max_age_s):
            log.warning("scrobbler: not sending %s — %s from %s: %s", s.artist, s.track,
                        time.strftime("%Y-%m-%d %H:%M", time.localtime(s.timestamp)), s.reason)
            await self.on_event("too_old", s, s.reason)
        batch = await self.queue.next_batch(self.cfg.batch)
        if batch is None:
            return "idle"
        if batch.resumed:
            log.info("scrobbler: resending batch %s (%d scrobbles) whose answer was not recorded",
                     batch.id[:8], len(batch.items))
        try:
            results = await asyncio.to_thread(self.client.scrobble, batch.items)
        except Exception as e:  # noqa: BLE001 - classified below
            return await self._failed(batch, e)
        await self.queue.finish(batch, results, self.clock())
        self._delay = 0.0
        self.batches_sent += 1
        by_id = {s.id: s for s in batch.items}
        sent = sum(r.state == "sent" for r in results)
        log.info("scrobbler: batch of %d: %d scrobbled, %d not", len(results), sent, len(results) - sent)
        for r in results:
            if r.state != "sent":
                log.warning("scrobbler: %s — %s %s: %s", by_id[r.id].artist, by_id[r.id].track, r.state, r.reason)
            await self.on_event(r.state, by_id[r.id], r.reason)
        return "sent"

    async def _failed(self, batch: Batch, e: Exception) -> str:
        kind, code, reason = classify(e)
        if kind == "temporary":
            self._delay = min(self.cfg.retry_max_s, self._delay * 2 if self._delay else self.cfg.retry_first_s)
            log.warning("scrobbler: Last.fm did not take %d scrobble(s) (%s); retrying in %.0f s",
                        len(batch.items), reason, self._delay)
            return "retry"  # the batch stays "sending": the same one goes again
        if kind == "auth":
            self.held = reason
            log.error("scrobbler: Last.fm refused the credentials (%s): sending stopped, %d play(s) kept in the "
                      "queue; run `vinyl-mqtt lastfm login` to get a new session key", reason,
                      await self.queue.pending())
            await self.on_event("auth_failed", batch.items[0], reason)
            return "auth"
        if len(batch.items) > 1:
            log.warning("scrobbler: Last.fm refused a batch of %d (%s): sending them one by one",
                        len(batch.items), reason)
            await self.queue.split(batch)
            return "sent"
        s = batch.items[0]
        await self.queue.finish(batch, [Result(s.id, "failed", code, reason)], self.clock())
        log.error("scrobbler: %s — %s failed for good: %s", s.artist, s.track, reason)
        await self.on_event("failed", s, reason)
        return "sent"

    # -- loops --------------------------------------------------------------------------

    async def drain(self, max_steps: int = 10_000) -> str:
        """Send until the queue is empty or sending is held; waits out backoffs. Returns the last step."""
        outcome = "idle"
        for _ in range(max_steps):
            outcome = await self.step()
            if outcome in ("idle", "auth"):
                return outcome
            if outcome == "retry":
                await asyncio.sleep(self._jittered())
        return outcome

    async def run(self) -> None:
        """Forever: send what is queued, sleep until woken (or the backoff / recheck ends)."""
        while True:
            outcome = await self.step()
            if outcome == "sent":
                continue
            if outcome == "retry":
                await asyncio.sleep(self._jittered())
                continue
            self.wake.clear()
            timeout = self.cfg.auth_recheck_s if outcome == "auth" else None
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _jittered(self) -> float:
        return self._delay * random.uniform(0.8, 1.2)


# --------------------------------------------------------------------------- the role


class ScrobblerRole:
    name = "scrobbler"

    def __init__(self, cfg, conn, *, settings: ScrobblerConfig | None = None, client=None,
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.conn = conn
        self.settings = settings or getattr(cfg, "scrobbler", None) or ScrobblerConfig()
        self.topics = Topics(cfg.mqtt.base_topic)
        self.clock = clock
        self._client = client
        self.queue: ScrobbleQueue | None = None
        self.sender: Sender | None = None
        self._first_pos: dict[str, float] = {}  # play_id -> position when first seen (its `started`)
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._wake_pub = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        s = self.settings
        if s.dry_run:
            log.warning("scrobbler: dry run: nothing is sent to Last.fm; the queue is kept in memory")
        elif not s.api_key or not s.api_secret.get_secret_value():
            log.error("scrobbler: scrobbler.api_key / api_secret are not set: plays are queued, not sent")
        self.queue = await ScrobbleQueue.open(":memory:" if s.dry_run else s.queue_db)
        self.sender = Sender(self.queue, s, client=self._client, on_event=self._event, clock=self.clock)
        await self.conn.subscribe(self.topics.any_listener("play"), qos=1)
        helpers = [asyncio.create_task(self.sender.run(), name="scrobbler-send"),
                   asyncio.create_task(self._publisher(), name="scrobbler-publish")]
        try:
            await self.conn.run(self.handle)
        finally:
            for t in [*helpers, *self._tasks]:
                t.cancel()
            await asyncio.gather(*helpers, *self._tasks, return_exceptions=True)
            await self.queue.close()

    # -- incoming ----------------------------------------------------------------------

    async def handle(self, msg) -> None:
        parts = self.topics.parts(msg.topic)
        if len(parts) != 2 or parts[1] != "play" or not msg.payload:
            return
        ev = PlayEvent.parse(msg.payload)
        if ev.play.listener != parts[0]:
            raise MessageError(f"play names listener {ev.play.listener!r}, topic says {parts[0]!r}")
        p = ev.play
        if ev.event == "started":
            self._first_pos.setdefault(p.play_id, p.position_s)
            if len(self._first_pos) > 1000:
                self._first_pos.pop(next(iter(self._first_pos)))
            if self.settings.now_playing:
                t = asyncio.create_task(self._now_playing(p))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
        if qualifies(ev, self._first_pos.get(p.play_id)):
            await self._enqueue(p)
        elif ev.event == "ended":
            need = needed_s(p.track.duration_s)
            log.info("%s: not scrobbling %s — %s: %s", p.listener, p.track.artist or "?", p.track.title,
                     "30 s or shorter" if need is None else f"played {p.played_s or 0:.0f} s of the {need:.0f} s needed")
        if ev.event == "ended":
            self._first_pos.pop(p.play_id, None)

    async def _enqueue(self, p: Play) -> None:
        assert self.queue is not None and self.sender is not None
        s = scrobble_of(p)
        if s is None:
            if await self.queue.add(_untagged(p), state="ignored", reason="no artist tag: Last.fm needs one",
                                    now=self.clock()):
                log.warning("%s: not scrobbling %s: the track has no artist tag", p.listener, p.track.title)
                await self._event("ignored", _untagged(p), "no artist tag: Last.fm needs one")
            return
        if await self.queue.add(s, now=self.clock()):
            log.info("%s: queued scrobble %s — %s", p.listener, s.artist, s.track)
            await self._event("queued", s, None)
            self.sender.wake.set()

    async def _now_playing(self, p: Play) -> None:
        s = scrobble_of(p)
        if s is None:
            return
        if self.clock() - p.updated_at > NOW_PLAYING_FRESH_S:
            log.debug("%s: %s is stale: no now playing", p.listener, p.track.title)
            return
        sender = self.sender
        if sender is None or (sender.client is None and not sender._load_client()):
            return
        try:
            await asyncio.to_thread(sender.client.update_now_playing, s)
        except Exception as e:  # noqa: BLE001 - never retried
            log.warning("%s: now playing %s — %s not sent (%s); not retried", p.listener, s.artist, s.track,
                        classify(e)[2])
            return
        await self._event("now_playing", s, None)

    # -- outgoing ----------------------------------------------------------------------

    async def _event(self, status: str, s: Scrobble, reason: str | None) -> None:
        queued = await self.queue.pending() if self.queue is not None else 0
        ev = ScrobbleEvent(listener=s.listener, play_id=s.play_id, status=status, artist=s.artist or None,
                           title=s.track, album=s.album, timestamp=s.timestamp, reason=reason, queued=queued,
                           at=self.clock())
        self._outbox.append((self.topics.scrobble(s.listener), ev.to_json()))
        while len(self._outbox) > MAX_PENDING:
            self._outbox.popleft()
        self._wake_pub.set()

    async def _publisher(self) -> None:
        while True:
            await self._wake_pub.wait()
            self._wake_pub.clear()
            while self._outbox:
                topic, payload = self._outbox[0]
                if not await self.conn.publish(topic, payload, qos=1, content_type=JSON_CONTENT_TYPE):
                    if self.conn.connected.is_set():
                        await asyncio.sleep(0.5)
                    else:
                        await self.conn.connected.wait()
                    continue
                self._outbox.popleft()


def _untagged(p: Play) -> Scrobble:
    return Scrobble(play_id=p.play_id, listener=p.listener, artist="", track=p.track.title,
                    timestamp=int(p.started_at), album=p.track.album)
