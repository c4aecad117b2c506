"""Home Assistant over MQTT discovery: entity ids, discovery payloads, entity states.

Pure functions only (no I/O): the ``nowplaying`` role publishes what they build.

One Home Assistant *device* per listener (turntable), identified by
``vinyl_mqtt_<listener>``, with the entities in :data:`ENTITIES`.  Each entity is
announced by per-entity discovery (Home Assistant 2024.1 and later)::

    <discovery_prefix>/<component>/vinyl_mqtt_<listener>/<key>/config

and gets its state from a plain retained topic the role derives from the
pipeline's messages (no templates in Home Assistant, every state ≤ 255 characters)::

    <base>/<listener>/ha/<key>               the entity's state (text, number, ON/OFF, image bytes)
    <base>/<listener>/ha/<key>/attributes    JSON attributes (now_playing, last_scrobble)
    <base>/<listener>/ha/playback            event entity: JSON {"event_type": ..., ...}, never retained

Two entities read other roles' topics directly: listener connectivity is the
listener's own status topic (its last will), so it shows "disconnected" even
when the nowplaying role is down too.

Entity ids are stable: ``unique_id`` ``vinyl_mqtt_<listener>_<key>``, and both
``object_id`` (Home Assistant < 2025.10; ignored from 2026.4) and
``default_entity_id`` (2025.10+; older releases drop unknown keys) give
``<component>.<listener>_<key>``, e.g. ``sensor.turntable_now_playing``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import __version__
from .images import sniff_image_mime
from .messages import ListenerState, Play

MAX_STATE = 255  # Home Assistant refuses longer states (MAX_LENGTH_STATE_STATE)
NONE = "None"  # the MQTT payload Home Assistant reads as "unknown" (text sensors: since 2024.10)
ON, OFF = "ON", "OFF"
ONLINE, OFFLINE = "online", "offline"
ORIGIN_NAME = "vinyl-mqtt"
JSON_CONTENT_TYPE = "application/json"

# What the event entity reports (its ``event_types``):
EVENT_TYPES = ("track_changed", "side_finished", "record_finished", "unknown_record")
EVENT_MEANINGS = {
    "track_changed": "a new track started playing (one per play, also the first track after the needle drops)",
    "side_finished": "a track played through to silence and the turntable went idle: the side is over, flip it "
                     "(not sent when the needle was lifted mid-track, nor when it was the album's last track)",
    "record_finished": "as side_finished, but the track was the album's last: nothing left to flip "
                       "(needs dedupe to mark the play last_on_album)",
    "unknown_record": "music that is not in the library is playing (once, when it starts)",
}

# Where an entity's availability comes from
ROLE, LISTENER, MATCHER = "role", "listener", "matcher"

PLACEHOLDER_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 512 512">'
    b'<rect width="512" height="512" fill="#1c1c1c"/>'
    b'<circle cx="256" cy="256" r="230" fill="#0b0b0b"/>'
    b'<g fill="none" stroke="#2a2a2a" stroke-width="3">'
    b'<circle cx="256" cy="256" r="210"/><circle cx="256" cy="256" r="185"/>'
    b'<circle cx="256" cy="256" r="160"/><circle cx="256" cy="256" r="135"/>'
    b'<circle cx="256" cy="256" r="110"/></g>'
    b'<circle cx="256" cy="256" r="80" fill="#8a8a8a"/>'
    b'<circle cx="256" cy="256" r="8" fill="#1c1c1c"/>'
    b"</svg>"
)
PLACEHOLDER_TYPE = "image/svg+xml"
DEFAULT_IMAGE_TYPE = "image/jpeg"  # Home Assistant's own default content_type


@dataclass(frozen=True)
class Entity:
    """One entity every listener's device gets."""

    key: str  # object id suffix, unique id suffix, state topic leaf
    component: str  # sensor, binary_sensor, image, event
    name: str  # entity name (Home Assistant shows "<device> <name>")
    needs: tuple[str, ...]  # availability: any of ROLE, LISTENER, MATCHER (all must be online)
    fields: Mapping[str, Any] = field(default_factory=dict)  # platform options
    attributes: bool = False  # JSON attributes on <state topic>/attributes


ENTITIES: tuple[Entity, ...] = (
    Entity("now_playing", "sensor", "Now playing", (ROLE, LISTENER, MATCHER),
           {"icon": "mdi:record-player"}, attributes=True),
    Entity("artist", "sensor", "Artist", (ROLE, LISTENER, MATCHER), {"icon": "mdi:account-music"}),
    Entity("album", "sensor", "Album", (ROLE, LISTENER, MATCHER), {"icon": "mdi:album"}),
    Entity("cover_art", "image", "Cover art", (ROLE, LISTENER, MATCHER)),
    Entity("playing", "binary_sensor", "Playing", (ROLE, LISTENER), {"icon": "mdi:record-player"}),
    Entity("progress", "sensor", "Progress", (ROLE, LISTENER, MATCHER),
           {"icon": "mdi:progress-clock", "unit_of_measurement": "%", "suggested_display_precision": 0}),
    Entity("speed_error", "sensor", "Speed error", (ROLE, LISTENER, MATCHER),
           {"icon": "mdi:speedometer", "unit_of_measurement": "%", "state_class": "measurement",
            "suggested_display_precision": 2, "entity_category": "diagnostic"}),
    Entity("signal_level", "sensor", "Signal level", (ROLE, LISTENER),
           {"icon": "mdi:waveform", "unit_of_measurement": "dBFS", "state_class": "measurement",
            "suggested_display_precision": 1, "entity_category": "diagnostic"}),
    Entity("last_scrobble", "sensor", "Last scrobble", (ROLE,), {"icon": "mdi:playlist-check"}, attributes=True),
    Entity("listener_connectivity", "binary_sensor", "Listener", (),
           {"device_class": "connectivity", "entity_category": "diagnostic",
            "payload_on": ONLINE, "payload_off": OFFLINE}),
    Entity("matcher_connectivity", "binary_sensor", "Matcher", (ROLE,),
           {"device_class": "connectivity", "entity_category": "diagnostic",
            "payload_on": ONLINE, "payload_off": OFFLINE}),
    Entity("playback", "event", "Playback", (ROLE, LISTENER, MATCHER),
           {"icon": "mdi:record-circle-outline", "event_types": list(EVENT_TYPES)}),
)
BY_KEY: dict[str, Entity] = {e.key: e for e in ENTITIES}
QOS_PLATFORMS = {"sensor", "binary_sensor", "event"}  # the image platform has no qos option

# keys whose states the role publishes (retained) -- all but the event and listener connectivity
STATE_KEYS = ("now_playing", "artist", "album", "cover_art", "playing", "progress", "speed_error",
              "signal_level", "last_scrobble", "matcher_connectivity")


# --------------------------------------------------------------------------- ids


def slug(listener: str) -> str:
    """The listener's name as Home Assistant ids want it: lower case, a-z 0-9 and _."""
    s = re.sub(r"[^a-z0-9_]+", "_", listener.lower()).strip("_")
    s = re.sub(r"_+", "_", s)
    return s or "turntable"


def device_id(listener: str) -> str:
    return f"vinyl_mqtt_{slug(listener)}"


def object_id(listener: str, key: str) -> str:
    return f"{slug(listener)}_{key}"


def unique_id(listener: str, key: str) -> str:
    return f"vinyl_mqtt_{slug(listener)}_{key}"


def entity_id(listener: str, key: str) -> str:
    """The entity id Home Assistant gives the entity (unless it is taken or the user renames it)."""
    return f"{BY_KEY[key].component}.{object_id(listener, key)}"


def entity_ids(listener: str) -> dict[str, str]:
    """key -> entity id, for every entity of the listener's device."""
    return {e.key: entity_id(listener, e.key) for e in ENTITIES}


# --------------------------------------------------------------------------- topics


def discovery_topic(prefix: str, listener: str, key: str) -> str:
    return f"{prefix.rstrip('/')}/{BY_KEY[key].component}/{device_id(listener)}/{key}/config"


def discovery_topics(prefix: str, listener: str) -> list[str]:
    return [discovery_topic(prefix, listener, e.key) for e in ENTITIES]


def birth_topic(prefix: str) -> str:
    """Where Home Assistant announces itself (``online``) and its end (``offline``)."""
    return f"{prefix.rstrip('/')}/status"


def state_topic(base: str, listener: str, key: str) -> str:
    return f"{base.rstrip('/')}/{listener}/ha/{key}"


def attributes_topic(base: str, listener: str, key: str) -> str:
    return f"{state_topic(base, listener, key)}/attributes"


def state_topics(base: str, listener: str) -> list[str]:
    """Every retained topic the role publishes for a listener (to clear them on removal)."""
    out = [state_topic(base, listener, k) for k in STATE_KEYS]
    out += [attributes_topic(base, listener, e.key) for e in ENTITIES if e.attributes]
    return out


# --------------------------------------------------------------------------- discovery


def origin() -> dict[str, str]:
    return {"name": ORIGIN_NAME, "sw_version": __version__}


def device(listener: str) -> dict[str, Any]:
    return {
        "identifiers": [device_id(listener)],
        "name": listener,
        "manufacturer": ORIGIN_NAME,
        "model": "Turntable",
    }


def discovery_config(
    key: str,
    listener: str,
    *,
    base: str,
    listener_node: str | None = None,
    role_status: str,
    image_type: str = DEFAULT_IMAGE_TYPE,
) -> dict[str, Any]:
    """The discovery payload of one entity.

    ``listener_node``: the node whose listener role hears this turntable (its
    status topic is ``<base>/<node>/listener/status``); default the listener's
    name. ``role_status``: the nowplaying role's own status topic.
    ``image_type``: the content type of what is on the cover art topic now.
    """
    e = BY_KEY[key]
    node = listener_node or listener
    base = base.rstrip("/")
    listener_status = f"{base}/{node}/listener/status"
    sources = {
        ROLE: role_status,
        LISTENER: listener_status,
        MATCHER: state_topic(base, listener, "matcher_connectivity"),
    }
    cfg: dict[str, Any] = {
        "name": e.name,
        "unique_id": unique_id(listener, key),
        "object_id": object_id(listener, key),
        "default_entity_id": entity_id(listener, key),
    }
    if e.component == "image":
        cfg["image_topic"] = state_topic(base, listener, key)
        cfg["content_type"] = image_type
    elif key == "listener_connectivity":
        cfg["state_topic"] = listener_status
    else:
        cfg["state_topic"] = state_topic(base, listener, key)
    if e.attributes:
        cfg["json_attributes_topic"] = attributes_topic(base, listener, key)
    cfg.update(e.fields)
    if e.component in QOS_PLATFORMS:
        cfg["qos"] = 1
    if e.needs:
        cfg["availability"] = [{"topic": sources[s]} for s in e.needs]
        cfg["availability_mode"] = "all"
    cfg["device"] = device(listener)
    cfg["origin"] = origin()
    return cfg


def discovery_configs(
    listener: str,
    *,
    prefix: str,
    base: str,
    listener_node: str | None = None,
    role_status: str,
    image_type: str = DEFAULT_IMAGE_TYPE,
) -> dict[str, dict[str, Any]]:
    """discovery topic -> payload, for every entity of the listener's device."""
    return {
        discovery_topic(prefix, listener, e.key): discovery_config(
            e.key, listener, base=base, listener_node=listener_node, role_status=role_status, image_type=image_type
        )
        for e in ENTITIES
    }


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact JSON, as published."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------- states


def cap(text: str | None, limit: int = MAX_STATE) -> str:
    """A state Home Assistant accepts: ``None`` (unknown) for nothing, else at most ``limit`` characters."""
    if text is None:
        return NONE
    text = " ".join(text.split())  # no newlines or runs of blanks in a state
    if not text:
        return NONE
    if text == NONE:
        return NONE + "\u200b"  # a track really called "None" is not "unknown"
    if len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + "…"


def _num(x: float | None, digits: int) -> str:
    if x is None or not math.isfinite(x):
        return NONE
    v = round(x, digits)
    if digits == 0:
        return str(int(v))
    return f"{v:.{digits}f}"


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def position(play: Play, now: float | None = None) -> float:
    """The track position now: the last known one moved on at the measured speed, within the track."""
    now = time.time() if now is None else now
    if play.ended_at is not None:
        now = min(now, play.ended_at)
    pos = play.position_s + max(0.0, now - play.updated_at) * (play.speed or 1.0)
    return max(0.0, min(pos, play.track.duration_s)) if play.track.duration_s > 0 else max(0.0, pos)


def progress(play: Play | None, now: float | None = None) -> float | None:
    if play is None or play.track.duration_s <= 0:
        return None
    return 100.0 * position(play, now) / play.track.duration_s


def progress_state(play: Play | None, now: float | None = None) -> bytes:
    """The progress sensor's state: whole percent, or None (unknown) with nothing playing."""
    return _num(progress(play, now), 0).encode()


def attributes(listener: str, status: str, play: Play | None) -> dict[str, Any]:
    """The now_playing sensor's attributes (full texts: the states are capped).

    They change only when the play does (``position`` is the one dedupe last
    reported, at ``updated``): a clock-driven attribute would make Home Assistant
    write a state every tick. The moving position is the progress sensor.
    """
    t = play.track if play is not None else None
    speed = play.speed if play is not None else None
    return {
        "listener": listener,
        "status": status,  # playing / idle / unknown (music not in the library)
        "title": t.title if t else None,
        "artist": t.artist if t else None,
        "album": t.album if t else None,
        "album_artist": t.album_artist if t else None,
        "track_number": t.track_number if t else None,
        "disc_number": t.disc_number if t else None,
        "year": t.year if t else None,
        "duration": round(t.duration_s, 1) if t else None,
        "position": round(play.position_s, 1) if play is not None else None,
        "updated": iso(play.updated_at) if play is not None else None,
        "speed": round(speed, 5) if speed is not None else None,
        "speed_error": round((speed - 1.0) * 100.0, 2) if speed is not None else None,
        "confidence": round(play.confidence, 3) if play is not None else None,
        "started": iso(play.started_at) if play is not None else None,
        "play_id": play.play_id if play is not None else None,
        "track_id": t.id if t else None,
    }


def entity_states(
    listener: str,
    status: str,
    play: Play | None,
    listener_state: ListenerState | None,
    now: float | None = None,
) -> dict[str, bytes]:
    """state topic key -> payload, for the states derived from the pipeline's messages.

    ``status``/``play`` are dedupe's NowPlaying (``play`` is None unless status is
    playing); ``listener_state`` the listener's. Not here: cover art, last
    scrobble, matcher connectivity (the role publishes those as they come).
    """
    playing = play if status == "playing" else None
    t = playing.track if playing is not None else None
    ls = listener_state
    out = {
        "now_playing": cap(t.title if t else None),
        "artist": cap(t.artist if t else None),
        "album": cap(t.album if t else None),
        "progress": progress_state(playing, now).decode(),
        "speed_error": _num((playing.speed - 1.0) * 100.0 if playing is not None else None, 2),
        "playing": NONE if ls is None else ON if ls.state == "playing" else OFF,
        "signal_level": _num(ls.rms_dbfs if ls is not None else None, 1),
    }
    states = {k: v.encode() for k, v in out.items()}
    states["now_playing/attributes"] = encode(attributes(listener, status, playing))
    return states


def event_payload(event_type: str, listener: str, play: Play | None = None, **extra: Any) -> bytes:
    """What the event entity receives: ``event_type`` plus attributes automations can use."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    data: dict[str, Any] = {"event_type": event_type, "listener": listener}
    if play is not None:
        t = play.track
        data.update(
            title=t.title, artist=t.artist, album=t.album, track_number=t.track_number,
            disc_number=t.disc_number, duration=round(t.duration_s, 1), play_id=play.play_id,
        )
        if play.played_s is not None:
            data["played"] = round(play.played_s, 1)
    data.update(extra)
    return encode(data)


# --------------------------------------------------------------------------- images


def image_type(data: bytes, declared: str | None = None) -> str:
    """The content type of image bytes: the declared one if it is an image type, else sniffed."""
    if declared and declared.lower().startswith("image/"):
        return declared.lower()
    sniffed = sniff_image_mime(data)
    if sniffed:
        return sniffed
    stripped = data[:64].lstrip()
    if stripped.startswith(b"<svg") or stripped.startswith(b"<?xml"):
        return PLACEHOLDER_TYPE
    return DEFAULT_IMAGE_TYPE


def entity_ids_in(text: str, domains: Iterable[str] = ("sensor", "binary_sensor", "image", "event")) -> set[str]:
    """Every ``<domain>.<object_id>`` named in a text (YAML, templates): for checking cards and blueprints."""
    alt = "|".join(sorted(domains, key=len, reverse=True))
    return set(re.findall(rf"(?<![\w.])(?:{alt})\.[a-z0-9_]+", text))
