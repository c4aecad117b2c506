"""A local HTTP server that speaks Last.fm's web service API (2.0), for tests.

It answers what the real pylast sends (form-encoded POSTs to ``/2.0/``) the
way ws.audioscrobbler.com does:

* every write method and the auth methods must be signed: ``api_sig`` is the
  md5 of the parameters sorted by name, each as ``name + value`` (``format``,
  ``callback`` and ``api_sig`` itself left out), followed by the shared secret
  (error 13 otherwise);
* an unknown ``api_key`` is error 10, an unknown ``sk`` error 9, a missing
  parameter error 6, an unknown method error 3;
* answers are XML: ``<lfm status="ok">...</lfm>`` or
  ``<lfm status="failed"><error code="N">message</error></lfm>``;
* ``track.scrobble`` takes up to 50 scrobbles as ``artist[i]``, ``track[i]``,
  ``timestamp[i]``, ``album[i]`` ... and answers ``<scrobbles accepted=""
  ignored="">`` with one ``<scrobble>`` per item, each with its
  ``<ignoredMessage code="N">`` (1 artist ignored, 2 track ignored, 3
  timestamp too old (> 14 days), 4 timestamp too new, 5 daily limit);
* a scrobble identical to one already recorded (same artist, track and
  timestamp) is answered as accepted but recorded once: Last.fm's duplicate
  detection, on which a client resending an ambiguous batch relies;
* ``auth.getToken`` / ``auth.getSession`` (web authentication): a token is
  unauthorised (error 14) until the user opens ``GET /api/auth/?api_key=&token=``
  (or the test calls :meth:`FakeLastfm.authorize`); an unknown token is error 4,
  an expired one error 15; a session key is issued once per token.

Programmable failures: :meth:`fail` queues answers for the next requests
(an error code, an HTTP status, a dropped connection, or "process it, then
answer 500" -- the ambiguous case); ``outage`` answers N requests with 503.
Everything accepted is recorded in :attr:`FakeLastfm.scrobbles` (deduplicated,
in order) and every submitted item in :attr:`FakeLastfm.submissions`.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

MAX_AGE_S = 14 * 86400
MAX_FUTURE_S = 3600  # Last.fm ignores timestamps "too far in the future"
DAILY_LIMIT = 2800

ERRORS = {
    2: "Invalid service - This service does not exist",
    3: "Invalid Method - No method with that name in this package",
    4: "Authentication Failed - You do not have permissions to access the service",
    5: "Invalid format - This service doesn't exist in that format",
    6: "Invalid parameters - Your request is missing a required parameter",
    7: "Invalid resource specified",
    8: "Operation failed - Something else went wrong",
    9: "Invalid session key - Please re-authenticate",
    10: "Invalid API key - You must be granted a valid key by last.fm",
    11: "Service Offline - This service is temporarily offline. Try again later.",
    13: "Invalid method signature supplied",
    14: "Unauthorized Token - This token has not been authorized",
    15: "This token has expired",
    16: "There was a temporary error processing your request. Please try again",
    26: "Suspended API key - Access for your account has been suspended, please contact Last.fm",
    29: "Rate limit exceeded - Your IP has made too many requests in a short period",
}
IGNORED = {1: "Artist was ignored", 2: "Track was ignored", 3: "Timestamp was too old",
           4: "Timestamp was too new", 5: "Daily scrobble limit exceeded"}
SIGNED = {"track.scrobble", "track.updateNowPlaying", "auth.getToken", "auth.getSession", "auth.getMobileSession"}


def api_sig(params: dict[str, str], secret: str) -> str:
    """Last.fm's request signature."""
    text = "".join(f"{k}{params[k]}" for k in sorted(params) if k not in ("format", "callback", "api_sig"))
    return hashlib.md5((text + secret).encode("utf-8")).hexdigest()


class LfmError(Exception):
    def __init__(self, code: int, message: str | None = None):
        super().__init__(code)
        self.code = code
        self.message = message or ERRORS.get(code, "Error")


@dataclass
class Failure:
    """One programmed answer: an error code, an HTTP status, a dropped connection, or
    ``after=True``: process the request normally, then answer with the failure."""

    code: int | None = None
    http: int | None = None
    drop: bool = False
    after: bool = False
    method: str | None = None  # only requests for this method consume it


@dataclass
class Scrobble:
    artist: str
    track: str
    timestamp: int
    album: str | None = None
    album_artist: str | None = None
    track_number: str | None = None
    duration: str | None = None
    sk: str = ""

    @property
    def key(self) -> tuple:
        return (self.sk, self.artist, self.track, self.timestamp)


@dataclass
class FakeLastfm:
    api_key: str = "test-api-key"
    api_secret: str = "test-api-secret"
    user: str = "vinyl-tester"
    latency_s: float = 0.0  # after processing, before answering (widens the ambiguous window)
    sessions: dict[str, str] = field(default_factory=dict)  # session key -> user
    tokens: dict[str, dict] = field(default_factory=dict)  # token -> {authorized, issued, used}
    token_ttl_s: float = 3600.0
    ignore_artists: set[str] = field(default_factory=set)
    ignore_tracks: set[str] = field(default_factory=set)
    invalid_tracks: set[str] = field(default_factory=set)  # a request carrying one of these: error 6
    daily_limit: int = DAILY_LIMIT
    scrobbles: list[Scrobble] = field(default_factory=list)  # recorded (deduplicated), in order
    submissions: list[Scrobble] = field(default_factory=list)  # every item of every track.scrobble
    now_playing: list[dict] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)  # every request's parameters
    failures: list[Failure] = field(default_factory=list)
    clock: Any = time.time

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self._seen: set[tuple] = set()
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- test controls ------------------------------------------------------------------

    def new_session(self, user: str | None = None) -> str:
        sk = secrets.token_hex(16)
        self.sessions[sk] = user or self.user
        return sk

    def revoke(self, sk: str) -> None:
        self.sessions.pop(sk, None)

    def authorize(self, token: str) -> None:
        with self.lock:
            self.tokens[token]["authorized"] = True

    def fail(self, n: int = 1, **kw) -> None:
        """The next n matching requests get this failure (see :class:`Failure`)."""
        with self.lock:
            self.failures.extend(Failure(**kw) for _ in range(n))

    def outage(self, n: int, http: int = 503) -> None:
        self.fail(n, http=http)

    def methods(self) -> list[str]:
        return [r.get("method", "") for r in self.requests]

    @property
    def url(self) -> str:
        assert self.httpd is not None
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/2.0/"

    @property
    def root(self) -> str:
        assert self.httpd is not None
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeLastfm:
        server = self

        class Handler(_Handler):
            fake = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True, name="fake-lastfm")
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self) -> FakeLastfm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the API ------------------------------------------------------------------------

    def _take_failure(self, method: str) -> Failure | None:
        with self.lock:
            for i, f in enumerate(self.failures):
                if f.method is None or f.method == method:
                    return self.failures.pop(i)
        return None

    def call(self, params: dict[str, str]) -> str:
        """The XML body for one request (raises LfmError)."""
        method = params.get("method", "")
        if not method:
            raise LfmError(6, "Invalid parameters - method is missing")
        if params.get("api_key") != self.api_key:
            raise LfmError(10)
        handler = {
            "auth.getToken": self._get_token,
            "auth.getSession": self._get_session,
            "track.updateNowPlaying": self._now_playing,
            "track.scrobble": self._scrobble,
        }.get(method)
        if handler is None:
            raise LfmError(3)
        if method in SIGNED:
            if "api_sig" not in params:
                raise LfmError(13, "Invalid method signature supplied (api_sig is missing)")
            if params["api_sig"] != api_sig(params, self.api_secret):
                raise LfmError(13)
        return handler(params)

    def _session(self, params: dict[str, str]) -> str:
        sk = params.get("sk")
        if not sk or sk not in self.sessions:
            raise LfmError(9)
        return sk

    def _get_token(self, params: dict[str, str]) -> str:
        token = secrets.token_hex(16)
        with self.lock:
            self.tokens[token] = {"authorized": False, "issued": self.clock(), "used": False}
        return f"<token>{token}</token>"

    def _get_session(self, params: dict[str, str]) -> str:
        token = params.get("token")
        if not token:
            raise LfmError(6)
        with self.lock:
            t = self.tokens.get(token)
            if t is None or t["used"]:
                raise LfmError(4, "Invalid authentication token supplied")
            if self.clock() - t["issued"] > self.token_ttl_s:
                raise LfmError(15)
            if not t["authorized"]:
                raise LfmError(14)
            t["used"] = True
        sk = self.new_session()
        return f"<session><name>{escape(self.user)}</name><key>{sk}</key><subscriber>0</subscriber></session>"

    def _now_playing(self, params: dict[str, str]) -> str:
        sk = self._session(params)
        if not params.get("artist") or not params.get("track"):
            raise LfmError(6)
        with self.lock:
            self.now_playing.append({k: v for k, v in params.items() if k not in ("api_sig", "api_key", "sk")} | {"user": self.sessions[sk]})
        code = 1 if params["artist"] in self.ignore_artists else 2 if params["track"] in self.ignore_tracks else 0
        return (
            "<nowplaying>"
            f'<track corrected="0">{escape(params["track"])}</track>'
            f'<artist corrected="0">{escape(params["artist"])}</artist>'
            f'<album corrected="0">{escape(params.get("album", ""))}</album>'
            f'<albumArtist corrected="0">{escape(params.get("albumArtist", ""))}</albumArtist>'
            f'<ignoredMessage code="{code}">{IGNORED.get(code, "")}</ignoredMessage>'
            "</nowplaying>"
        )

    def _items(self, params: dict[str, str], sk: str) -> list[Scrobble]:
        if "artist" in params or "track" in params:  # a single, unindexed scrobble
            indexed = {f"{k}[0]": v for k, v in params.items() if "[" not in k}
        else:
            indexed = params
        items = []
        i = 0
        while f"artist[{i}]" in indexed or f"track[{i}]" in indexed or f"timestamp[{i}]" in indexed:
            g = lambda name: indexed.get(f"{name}[{i}]")  # noqa: E731
            if not g("artist") or not g("track") or not g("timestamp"):
                raise LfmError(6, f"Invalid parameters - scrobble {i} needs artist, track and timestamp")
            try:
                ts = int(g("timestamp"))
            except ValueError:
                raise LfmError(6, f"Invalid parameters - timestamp[{i}] is not a number") from None
            items.append(Scrobble(g("artist"), g("track"), ts, g("album"), g("albumArtist"), g("trackNumber"),
                                  g("duration"), sk))
            i += 1
        if not items:
            raise LfmError(6)
        bad = [s.track for s in items if s.track in self.invalid_tracks]
        if bad:
            raise LfmError(6, f"Invalid parameters - track {bad[0]!r} is not valid")
        if len(items) > 50:
            raise LfmError(6, "Invalid parameters - at most 50 scrobbles per request")
        return items

    def _scrobble(self, params: dict[str, str]) -> str:
        sk = self._session(params)
        items = self._items(params, sk)
        now = self.clock()
        out = []
        accepted = ignored = 0
        with self.lock:
            today = sum(1 for s in self.scrobbles if s.sk == sk and s.timestamp > now - 86400)
            for s in items:
                self.submissions.append(s)
                if s.artist in self.ignore_artists:
                    code = 1
                elif s.track in self.ignore_tracks:
                    code = 2
                elif s.timestamp < now - MAX_AGE_S:
                    code = 3
                elif s.timestamp > now + MAX_FUTURE_S:
                    code = 4
                elif s.key not in self._seen and today >= self.daily_limit:
                    code = 5
                else:
                    code = 0
                if code:
                    ignored += 1
                else:
                    accepted += 1
                    if s.key not in self._seen:  # Last.fm's duplicate detection
                        self._seen.add(s.key)
                        self.scrobbles.append(s)
                        today += 1
                out.append(
                    "<scrobble>"
                    f'<track corrected="0">{escape(s.track)}</track>'
                    f'<artist corrected="0">{escape(s.artist)}</artist>'
                    f'<album corrected="0">{escape(s.album or "")}</album>'
                    f'<albumArtist corrected="0">{escape(s.album_artist or "")}</albumArtist>'
                    f"<timestamp>{s.timestamp}</timestamp>"
                    f'<ignoredMessage code="{code}">{IGNORED.get(code, "")}</ignoredMessage>'
                    "</scrobble>"
                )
        return f'<scrobbles accepted="{accepted}" ignored="{ignored}">{"".join(out)}</scrobbles>'


def http_status(code: int) -> int:
    """The HTTP status an API error comes with (the XML body carries the code)."""
    return 403 if code in (4, 9, 10, 13, 14, 15, 26) else 429 if code == 29 else 400


def ok(body: str) -> bytes:
    return f'<?xml version="1.0" encoding="utf-8"?>\n<lfm status="ok">{body}</lfm>\n'.encode()


def failed(code: int, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<lfm status="failed">'
            f'<error code="{code}">{escape(message)}</error></lfm>\n').encode()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeLastfm
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "text/xml; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if url.path.rstrip("/") == "/api/auth":  # the page the user opens to grant access
            token = q.get("token", "")
            if q.get("api_key") != self.fake.api_key or token not in self.fake.tokens:
                self._send(400, b"<html><body>Invalid API key or token</body></html>", "text/html")
                return
            self.fake.authorize(token)
            self._send(200, b"<html><body>Application authorized</body></html>", "text/html")
            return
        self._api(q)

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n).decode("utf-8")
        params = {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}
        url = urlsplit(self.path)
        for k, v in parse_qs(url.query).items():
            params.setdefault(k, v[-1])
        self._api(params)

    def _api(self, params: dict[str, str]) -> None:
        fake = self.fake
        with fake.lock:
            fake.requests.append(dict(params))
        f = fake._take_failure(params.get("method", ""))
        if f is not None and not f.after:
            self._fail(f)
            return
        try:
            status, body = 200, ok(fake.call(params))
        except LfmError as e:
            # Last.fm answers API errors with a 4xx/5xx status and the XML error document
            status, body = http_status(e.code), failed(e.code, e.message)
        if fake.latency_s:
            time.sleep(fake.latency_s)
        if f is not None:
            self._fail(f)
            return
        self._send(status, body)

    def _fail(self, f: Failure) -> None:
        if f.drop:
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return
        if f.code is not None:
            self._send(f.http or http_status(f.code), failed(f.code, ERRORS.get(f.code, "Error")))
            return
        self._send(f.http or 503, b"<html><body>Service Unavailable</body></html>", "text/html")
