"""Every MQTT message the roles exchange, in one place, versioned.

Roles talk only through these: a listener never imports the matcher, the
matcher never imports the listener. JSON messages are pydantic models; a clip
is a small binary frame (magic, header length, JSON header, PCM) so that audio
is not base64-inflated. Anything that does not parse raises MessageError with
a reason a log line can carry.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

VERSION = 1
CLIP_MAGIC = b"VMC1"
CLIP_CONTENT_TYPE = "application/vnd.vinyl-mqtt.clip"
JSON_CONTENT_TYPE = "application/json"
ONLINE, OFFLINE = "online", "offline"


class MessageError(ValueError):
    """A payload that is not what its topic promises (the reason says why)."""


class Topics:
    """The topic layout (Zigbee2MQTT style: base / device / what)."""

    def __init__(self, base: str = "vinyl_mqtt"):
        self.base = base.rstrip("/")

    def status(self, node: str, role: str) -> str:
        return f"{self.base}/{node}/{role}/status"

    def role_status_any(self, role: str) -> str:
        return f"{self.base}/+/{role}/status"

    def clip(self, listener: str) -> str:
        return f"{self.base}/{listener}/clip"

    def clip_shared(self, group: str) -> str:
        return f"$share/{group}/{self.base}/+/clip"

    def match(self, listener: str) -> str:
        return f"{self.base}/{listener}/match"

    def listener_state(self, listener: str) -> str:
        return f"{self.base}/{listener}/listener"

    def play(self, listener: str) -> str:
        return f"{self.base}/{listener}/play"

    def now_playing(self, listener: str) -> str:
        return f"{self.base}/{listener}/now_playing"

    def scrobble(self, listener: str) -> str:
        return f"{self.base}/{listener}/scrobble"

    def wake(self, listener: str) -> str:
        return f"{self.base}/{listener}/wake"

    def cover(self, cover_id: int) -> str:
        """A library cover image (raw bytes, retained), published by a matcher."""
        return f"{self.base}/library/cover/{cover_id}"

    def any_listener(self, what: str) -> str:
        """``what`` (match, listener, play, ...) of every turntable."""
        return f"{self.base}/+/{what}"

    def parts(self, topic: str) -> list[str]:
        """The levels after the base topic (``[node, role, 'status']`` ...)."""
        if not topic.startswith(self.base + "/"):
            raise MessageError(f"topic {topic!r} is not under {self.base!r}")
        return topic[len(self.base) + 1 :].split("/")


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = VERSION

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def parse(cls, payload: bytes | str):
        """The message, or MessageError naming what was wrong."""
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MessageError(f"not JSON ({e})") from e
        if not isinstance(data, dict):
            raise MessageError("not a JSON object")
        if data.get("v") != VERSION:
            raise MessageError(f"schema version {data.get('v')!r}, this program speaks {VERSION}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"])) or "message"
            got = f", got {first['input']!r}" if first["type"] != "missing" else ""
            raise MessageError(f"{cls.__name__}: {where}: {first['msg']}{got}"[:300]) from e


ClipReason = Literal["needle_drop", "recheck", "after_gap"]


class ClipHeader(_Message):
    """What the listener knows about a clip; PCM follows it in the frame."""

    listener: str
    clip_id: str
    seq: int = Field(ge=0)
    captured_at: float  # epoch seconds of the first sample
    rate: int = Field(ge=4000, le=48000)
    channels: Literal[1] = 1
    format: Literal["S16_LE"] = "S16_LE"
    samples: int = Field(ge=1)
    rms_dbfs: float
    reason: ClipReason

    @property
    def duration_s(self) -> float:
        return self.samples / self.rate


def encode_clip(header: ClipHeader, pcm: np.ndarray) -> bytes:
    """Frame: magic, u32 header length, JSON header, int16 little-endian PCM."""
    pcm16 = np.asarray(pcm)
    if pcm16.dtype != np.int16:
        pcm16 = (np.clip(pcm16, -1.0, 1.0) * 32767.0).astype(np.int16)
    head = header.to_json()
    return CLIP_MAGIC + struct.pack("<I", len(head)) + head + pcm16.astype("<i2").tobytes()


def decode_clip(payload: bytes, *, max_bytes: int, max_seconds: float) -> tuple[ClipHeader, np.ndarray]:
    """Header and float32 samples, or MessageError before any large allocation."""
    if len(payload) > max_bytes:
        raise MessageError(f"clip of {len(payload)} bytes is over the {max_bytes}-byte limit")
    if len(payload) < 8 or payload[:4] != CLIP_MAGIC:
        raise MessageError("not a clip frame (bad magic)")
    (n,) = struct.unpack_from("<I", payload, 4)
    if n > len(payload) - 8:
        raise MessageError(f"header length {n} runs past the end of a {len(payload)}-byte frame")
    header = ClipHeader.parse(payload[8 : 8 + n])
    pcm = payload[8 + n :]
    if len(pcm) != 2 * header.samples:
        raise MessageError(f"header says {header.samples} samples, frame carries {len(pcm) / 2:g}")
    if header.duration_s > max_seconds:
        raise MessageError(f"clip of {header.duration_s:.1f} s is over the {max_seconds:g} s limit")
    return header, np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


class MatchedTrack(_Message):
    id: int
    title: str
    artist: str | None = None
    album: str | None = None
    album_artist: str | None = None
    track_number: int | None = None
    disc_number: int | None = None
    year: int | None = None
    duration_s: float
    path: str
    cover_id: int | None = None


class MatchResult(_Message):
    """The matcher's answer for one clip, matched or not."""

    listener: str
    clip_id: str
    seq: int
    captured_at: float
    matched: bool
    track: MatchedTrack | None = None
    offset_s: float | None = None  # track position at the clip's first sample
    speed: float | None = None  # measured playback speed (1.008 = 0.8 % fast)
    rpm_mistake: Literal["33 at 45", "45 at 33"] | None = None
    confidence: float = 0.0
    score: int = 0
    matcher: str  # node that answered
    identify_ms: float = 0.0
    queue_ms: float = 0.0  # from capture to the start of identification
    error: str | None = None  # why the clip could not be identified at all

    @property
    def speed_error_pct(self) -> float | None:
        return None if self.speed is None else (self.speed - 1.0) * 100.0


class ListenerState(_Message):
    """The turntable as the listener hears it; retained."""

    listener: str
    node: str | None = None  # the machine it runs on: its availability is <base>/<node>/listener/status
    state: Literal["playing", "idle"]
    rms_dbfs: float
    peak_dbfs: float
    since: float  # epoch seconds the state began
    updated_at: float = Field(default_factory=time.time)


PlayEventKind = Literal["started", "updated", "ended"]
EndReason = Literal["silence", "next_track", "duration", "unknown_music", "restart"]


class Play(_Message):
    """One real play of one track, as the dedupe role decided it."""

    play_id: str
    listener: str
    track: MatchedTrack
    started_at: float  # epoch seconds the track's first second played (back from the offset)
    speed: float  # measured playback speed
    confidence: float
    position_s: float  # track position at updated_at
    updated_at: float
    matches: int = 1  # agreeing matches so far
    next_track_id: int | None = None  # predicted from the album order, if known
    ended_at: float | None = None
    played_s: float | None = None  # seconds actually heard, set when ended
    played_through: bool | None = None  # reached (near) its end
    end_reason: EndReason | None = None


class PlayEvent(_Message):
    """A change in what is playing: QoS 1, not retained (automations react to it)."""

    event: PlayEventKind
    play: Play


class NowPlaying(_Message):
    """What one turntable is playing now; retained, so a restarted role resumes it."""

    listener: str
    state: Literal["playing", "idle", "unknown"]  # unknown: music that is not in the library
    play: Play | None = None
    since: float
    updated_at: float = Field(default_factory=time.time)


ScrobbleStatus = Literal["now_playing", "queued", "sent", "ignored", "failed", "too_old", "auth_failed"]


class ScrobbleEvent(_Message):
    """What the scrobbler did with a play (for the "last scrobble" entity); QoS 1."""

    listener: str
    play_id: str
    status: ScrobbleStatus
    artist: str | None = None
    title: str
    album: str | None = None
    timestamp: float | None = None  # the scrobble's timestamp: when the play started
    reason: str | None = None  # why ignored / failed / not sent
    queued: int = 0  # plays waiting in the queue after this event
    at: float = Field(default_factory=time.time)


WakeStatus = Literal["sent", "woke", "failed"]


class WakeEvent(_Message):
    """A Wake-on-LAN attempt for a sleeping matcher node; QoS 1."""

    listener: str  # the turntable whose music needed a matcher
    status: WakeStatus  # sent: packets out; woke: a matcher came online; failed: none within the timeout
    mac: str
    attempt: int = 1
    waited_s: float | None = None
    at: float = Field(default_factory=time.time)
