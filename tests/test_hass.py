"""vinyl_mqtt.hass: discovery payloads against Home Assistant's documented MQTT
options, stable ids, the 255-character state cap, and the hass/ folder (card,
blueprints, package): valid YAML naming only entities the integration creates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from vinyl_mqtt import __version__, hass
from vinyl_mqtt.messages import ListenerState, MatchedTrack, Play

HASS_DIR = Path(__file__).resolve().parent.parent / "hass"
BLUEPRINTS = HASS_DIR / "blueprints" / "automation" / "vinyl_mqtt"
CARD = HASS_DIR / "cards" / "now_playing.yaml"
PACKAGE = HASS_DIR / "packages" / "vinyl_mqtt.yaml"

BASE = "vinyl_mqtt"
PREFIX = "homeassistant"
ROLE_STATUS = "vinyl_mqtt/server/nowplaying/status"

# --------------------------------------------------------------------------------------
# What Home Assistant documents for MQTT discovery of each platform (home-assistant.io,
# source/_integrations/{sensor,binary_sensor,image,event}.mqtt.markdown and mqtt.markdown).
# `platform` is left out: it is only for device-based discovery (2024.11+), which this is not.

COMMON = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "default_entity_id",  # 2025.10+ (older releases drop unknown discovery keys)
    "device", "enabled_by_default", "encoding", "entity_category", "entity_picture", "icon",
    "json_attributes_template", "json_attributes_topic", "name",
    "object_id",  # deprecated in 2025.10, ignored from 2026.4: kept for 2024.1 - 2025.9
    "origin", "unique_id",
}
ALLOWED = {
    "sensor": COMMON | {
        "device_class", "expire_after", "force_update", "last_reset_value_template", "options",
        "payload_available", "payload_not_available", "qos", "state_class", "state_topic",
        "suggested_display_precision", "unit_of_measurement", "value_template",
    },
    "binary_sensor": COMMON | {
        "device_class", "expire_after", "force_update", "off_delay", "payload_available",
        "payload_not_available", "payload_off", "payload_on", "qos", "state_topic", "value_template",
    },
    # no qos, no payload_(not_)available for images
    "image": COMMON | {"content_type", "image_encoding", "image_topic", "url_template", "url_topic"},
    "event": COMMON | {
        "device_class", "event_types", "payload_available", "payload_not_available", "qos",
        "state_topic", "value_template",
    },
}
REQUIRED = {
    "sensor": {"state_topic"},
    "binary_sensor": {"state_topic"},
    "image": {"image_topic"},  # or url_topic; this integration sends the bytes
    "event": {"state_topic", "event_types"},
}
# every entity of ours: a device entity with stable ids
OURS_REQUIRED = {"name", "unique_id", "object_id", "default_entity_id", "device", "origin"}
# device keys Home Assistant 2024.1 already knows (an unknown device key fails the whole config)
DEVICE_KEYS_2024_1 = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
    "name", "serial_number", "suggested_area", "sw_version", "via_device",
}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
AVAILABILITY_KEYS = {"topic", "payload_available", "payload_not_available", "value_template"}
SENSOR_STATE_CLASSES = {"measurement", "total", "total_increasing"}
DISCOVERY_TOPIC = re.compile(r"^homeassistant/(sensor|binary_sensor|image|event)/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/config$")


def configs(listener: str = "turntable", **kw) -> dict[str, dict]:
    return hass.discovery_configs(listener, prefix=PREFIX, base=BASE, role_status=ROLE_STATUS, **kw)


def component_of(topic: str) -> str:
    return topic.split("/")[1]


# -- discovery payloads -----------------------------------------------------------------


def test_every_payload_has_only_documented_fields_and_the_required_ones():
    cs = configs()
    assert len(cs) == len(hass.ENTITIES) == 12
    for topic, cfg in cs.items():
        assert DISCOVERY_TOPIC.match(topic), topic
        comp = component_of(topic)
        unknown = set(cfg) - ALLOWED[comp]
        assert not unknown, f"{topic}: not a documented {comp} option: {unknown}"
        missing = (REQUIRED[comp] | OURS_REQUIRED) - set(cfg)
        assert not missing, f"{topic}: missing {missing}"
        assert "availability_topic" not in cfg  # the list form only
        # the JSON really is JSON with these keys
        assert json.loads(hass.encode(cfg)) == cfg


def test_device_origin_and_availability_blocks():
    for topic, cfg in configs().items():
        dev = cfg["device"]
        assert set(dev) <= DEVICE_KEYS_2024_1
        assert dev["identifiers"] == ["vinyl_mqtt_turntable"]
        assert dev["name"] == "turntable"
        assert cfg["origin"] == {"name": "vinyl-mqtt", "sw_version": __version__}
        assert set(cfg["origin"]) <= ORIGIN_KEYS
        if "availability" in cfg:
            assert cfg["availability_mode"] == "all"
            assert cfg["availability"], topic
            for a in cfg["availability"]:
                assert set(a) <= AVAILABILITY_KEYS and "topic" in a
                assert "+" not in a["topic"] and "#" not in a["topic"]
        if "entity_category" in cfg:
            assert cfg["entity_category"] == "diagnostic"
        if "state_class" in cfg:
            assert cfg["state_class"] in SENSOR_STATE_CLASSES
        for key in ("state_topic", "image_topic", "json_attributes_topic"):
            if key in cfg:
                assert "+" not in cfg[key] and "#" not in cfg[key]


def test_platform_specifics():
    cs = {cfg["unique_id"].removeprefix("vinyl_mqtt_turntable_"): cfg for cfg in configs().values()}
    ev = cs["playback"]
    assert ev["event_types"] == ["track_changed", "side_finished", "record_finished", "unknown_record"]
    assert ev["state_topic"] == "vinyl_mqtt/turntable/ha/playback"
    img = cs["cover_art"]
    assert img["image_topic"] == "vinyl_mqtt/turntable/ha/cover_art"
    assert img["content_type"] == "image/jpeg"
    assert configs(image_type="image/png")["homeassistant/image/vinyl_mqtt_turntable/cover_art/config"][
        "content_type"] == "image/png"
    # connectivity: the listener's own status (its will), the matcher's from the role
    lc, mc = cs["listener_connectivity"], cs["matcher_connectivity"]
    assert lc["device_class"] == mc["device_class"] == "connectivity"
    assert lc["state_topic"] == "vinyl_mqtt/turntable/listener/status"
    assert (lc["payload_on"], lc["payload_off"]) == ("online", "offline")
    assert "availability" not in lc  # shows "disconnected", never "unavailable"
    assert mc["availability"] == [{"topic": ROLE_STATUS}]
    # recognition-fed entities need the role, the listener and a matcher; playing only the listener
    needs_all = [{"topic": ROLE_STATUS}, {"topic": "vinyl_mqtt/turntable/listener/status"},
                 {"topic": "vinyl_mqtt/turntable/ha/matcher_connectivity"}]
    for key in ("now_playing", "artist", "album", "cover_art", "progress", "speed_error", "playback"):
        assert cs[key]["availability"] == needs_all, key
    for key in ("playing", "signal_level"):
        assert cs[key]["availability"] == needs_all[:2], key
    assert cs["now_playing"]["json_attributes_topic"] == "vinyl_mqtt/turntable/ha/now_playing/attributes"
    assert cs["signal_level"]["unit_of_measurement"] == "dBFS"
    assert cs["speed_error"]["unit_of_measurement"] == cs["progress"]["unit_of_measurement"] == "%"
    # the listener heard by another node
    other = configs(listener_node="pi4")[hass.discovery_topic(PREFIX, "turntable", "listener_connectivity")]
    assert other["state_topic"] == "vinyl_mqtt/pi4/listener/status"


def test_ids_are_unique_stable_and_match_the_entity_ids():
    expected = {
        "now_playing": "sensor.turntable_now_playing",
        "artist": "sensor.turntable_artist",
        "album": "sensor.turntable_album",
        "cover_art": "image.turntable_cover_art",
        "playing": "binary_sensor.turntable_playing",
        "progress": "sensor.turntable_progress",
        "speed_error": "sensor.turntable_speed_error",
        "signal_level": "sensor.turntable_signal_level",
        "last_scrobble": "sensor.turntable_last_scrobble",
        "listener_connectivity": "binary_sensor.turntable_listener_connectivity",
        "matcher_connectivity": "binary_sensor.turntable_matcher_connectivity",
        "playback": "event.turntable_playback",
    }
    assert hass.entity_ids("turntable") == expected
    a, b = configs("turntable"), configs("kitchen")
    uids = [c["unique_id"] for c in [*a.values(), *b.values()]]
    assert len(uids) == len(set(uids)) == 24
    assert configs("turntable") == a  # same input, same payloads
    for cfg in a.values():
        key = cfg["unique_id"].removeprefix("vinyl_mqtt_turntable_")
        assert cfg["default_entity_id"] == expected[key]
        assert cfg["default_entity_id"].split(".", 1) == [hass.BY_KEY[key].component, cfg["object_id"]]
    # names Home Assistant cannot use as ids are slugged the same everywhere
    lr = configs("Living-Room")
    np = lr["homeassistant/sensor/vinyl_mqtt_living_room/now_playing/config"]
    assert np["default_entity_id"] == "sensor.living_room_now_playing"
    assert np["state_topic"] == "vinyl_mqtt/Living-Room/ha/now_playing"  # topics keep the real name


def test_birth_and_removal_topics():
    assert hass.birth_topic("homeassistant") == "homeassistant/status"
    assert set(hass.discovery_topics(PREFIX, "turntable")) == set(configs())
    st = hass.state_topics(BASE, "turntable")
    assert "vinyl_mqtt/turntable/ha/cover_art" in st and "vinyl_mqtt/turntable/ha/now_playing/attributes" in st
    assert "vinyl_mqtt/turntable/ha/playback" not in st  # events are never retained


# -- states -------------------------------------------------------------------------------


def _play(title: str = "Clavelian March", **kw) -> Play:
    track = MatchedTrack(id=3, title=title, artist="Treskalle", album="Supertux Soundtrack", track_number=4,
                         duration_s=200.0, path="/m/x.ogg", cover_id=7)
    values = dict(play_id="p1", listener="turntable", track=track, started_at=1000.0, speed=1.008,
                  confidence=0.91, position_s=50.0, updated_at=1050.0)
    values.update(kw)
    return Play(**values)


def test_the_255_character_cap():
    assert hass.MAX_STATE == 255
    long = "A" * 400
    s = hass.cap(long)
    assert len(s) == 255 and s.endswith("…") and s.startswith("AAAA")
    assert hass.cap("x" * 255) == "x" * 255
    assert hass.cap(None) == hass.cap("") == hass.cap("   ") == "None"
    assert hass.cap("two\nlines") == "two lines"
    assert hass.cap("None") != "None"  # a song called None is not "unknown"
    states = hass.entity_states("turntable", "playing", _play(title=long), None, now=1050.0)
    assert len(states["now_playing"].decode()) == 255
    attrs = json.loads(states["now_playing/attributes"])
    assert attrs["title"] == long
    for payload in states.values():
        if not payload.startswith(b"{"):
            assert len(payload.decode()) <= 255


def test_entity_states_playing_idle_unknown():
    ls = ListenerState(listener="turntable", state="playing", rms_dbfs=-20.54, peak_dbfs=-3.0, since=1.0)
    s = hass.entity_states("turntable", "playing", _play(), ls, now=1060.0)
    assert s["now_playing"] == b"Clavelian March"
    assert s["artist"] == b"Treskalle" and s["album"] == b"Supertux Soundtrack"
    assert s["playing"] == b"ON" and s["signal_level"] == b"-20.5"
    assert s["speed_error"] == b"0.80"
    assert s["progress"] == b"30"  # 50 s + 10 s x 1.008 of 200 s
    attrs = json.loads(s["now_playing/attributes"])
    assert attrs == {
        "listener": "turntable", "status": "playing", "title": "Clavelian March", "artist": "Treskalle",
        "album": "Supertux Soundtrack", "album_artist": None, "track_number": 4, "disc_number": None,
        "year": None, "duration": 200.0, "position": 50.0, "updated": "1970-01-01T00:17:30+00:00",
        "speed": 1.008, "speed_error": 0.8, "confidence": 0.91, "started": "1970-01-01T00:16:40+00:00",
        "play_id": "p1", "track_id": 3,
    }
    # no key Home Assistant drops from MQTT attributes
    assert not set(attrs) & {"state", "icon", "friendly_name", "unit_of_measurement", "entity_picture"}
    # the attributes do not move with the clock (no state write every tick)
    assert hass.entity_states("turntable", "playing", _play(), ls, now=1099.0)["now_playing/attributes"] == \
        s["now_playing/attributes"]
    idle = hass.entity_states("turntable", "idle", None, ls.model_copy(update={"state": "idle"}))
    assert idle["now_playing"] == idle["artist"] == idle["progress"] == idle["speed_error"] == b"None"
    assert idle["playing"] == b"OFF"
    assert json.loads(idle["now_playing/attributes"])["status"] == "idle"
    unknown = hass.entity_states("turntable", "unknown", _play(), None)
    assert unknown["now_playing"] == b"None" and unknown["playing"] == b"None"
    assert json.loads(unknown["now_playing/attributes"])["status"] == "unknown"


def test_progress_stays_within_the_track():
    p = _play()
    assert hass.position(p, now=1050.0) == 50.0
    assert hass.position(p, now=10_000.0) == 200.0
    assert hass.position(p, now=0.0) == 50.0  # never backwards from the last report
    assert hass.progress_state(p, now=10_000.0) == b"100"
    assert hass.progress_state(None) == b"None"


def test_event_payloads():
    e = json.loads(hass.event_payload("side_finished", "turntable", _play(played_s=199.0)))
    assert e["event_type"] == "side_finished" and e["album"] == "Supertux Soundtrack" and e["played"] == 199.0
    assert json.loads(hass.event_payload("unknown_record", "turntable")) == {
        "event_type": "unknown_record", "listener": "turntable"}
    with pytest.raises(ValueError):
        hass.event_payload("nope", "turntable")


def test_image_types():
    assert hass.image_type(b"\xff\xd8\xff\xe0....") == "image/jpeg"
    assert hass.image_type(b"\x89PNG\r\n\x1a\n....") == "image/png"
    assert hass.image_type(b"GIF89a...") == "image/gif"
    assert hass.image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert hass.image_type(hass.PLACEHOLDER_SVG) == "image/svg+xml"
    assert hass.image_type(b"\xff\xd8\xff", "image/png") == "image/png"  # the declared type wins
    assert hass.image_type(b"\xff\xd8\xff", "application/octet-stream") == "image/jpeg"


# -- the hass/ folder -----------------------------------------------------------------------


class _HassLoader(yaml.SafeLoader):
    """PyYAML plus Home Assistant's tags (!input, !secret, !include...)."""


class Tagged:
    def __init__(self, tag: str, value):
        self.tag, self.value = tag, value

    def __repr__(self):
        return f"{self.tag} {self.value}"


def _tagged(loader, suffix, node):
    return Tagged("!" + suffix, loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else None)


_HassLoader.add_multi_constructor("!", _tagged)


def load(path: Path):
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_HassLoader)  # noqa: S506 - a SafeLoader


def walk(node):
    yield node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(k)
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def strings(node) -> list[str]:
    return [n for n in walk(node) if isinstance(n, str)]


def templates(node) -> list[str]:
    return [s for s in strings(node) if "{{" in s or "{%" in s]


KNOWN = set(hass.entity_ids("turntable").values())
PACKAGE_DEFINES = {"sensor.turntable_track", "sensor.turntable_playing_today"}


def test_the_files_exist():
    for p in (HASS_DIR / "README.md", CARD, PACKAGE, *(BLUEPRINTS / f"{n}.yaml" for n in
                                                        ("amplifier", "flip_reminder", "unknown_record"))):
        assert p.is_file(), p


@pytest.mark.parametrize("name", ["amplifier", "flip_reminder", "unknown_record"])
def test_blueprints_are_valid_and_name_only_our_entities(name):
    path = BLUEPRINTS / f"{name}.yaml"
    bp = load(path)
    meta = bp["blueprint"]
    assert meta["domain"] == "automation" and meta["name"] and meta["description"]
    assert meta["homeassistant"]["min_version"] == "2024.1.0"
    inputs = meta["input"]
    used = {n.value for n in walk({k: v for k, v in bp.items() if k != "blueprint"}) if isinstance(n, Tagged)}
    tags = {n.tag for n in walk(bp) if isinstance(n, Tagged)}
    assert tags == {"!input"}
    assert used == set(inputs), f"inputs declared but unused or used but undeclared: {used ^ set(inputs)}"
    for key, spec in inputs.items():
        assert "selector" in spec and spec.get("name"), key
        default = spec.get("default")
        if "entity" in (spec["selector"] or {}) and isinstance(default, str):
            filt = spec["selector"]["entity"]["filter"][0]
            assert default.split(".")[0] == filt["domain"], key
    assert "trigger" in bp and "action" in bp and bp.get("mode")
    text = path.read_text()
    named = hass.entity_ids_in(text)
    assert named <= KNOWN, named - KNOWN
    # the event types a blueprint tests for are ones the event entity has
    for et in re.findall(r"event_type == '(\w+)'", text):
        assert et in hass.EVENT_TYPES, et
    _check_templates(templates(bp))


def test_blueprint_triggers():
    amp = load(BLUEPRINTS / "amplifier.yaml")
    ids = {t["id"]: t for t in amp["trigger"]}
    assert ids["started"]["to"] == "on"
    assert ids["stopped"]["for"]["minutes"].value == "off_after"
    assert amp["blueprint"]["input"]["playing"]["default"] == "binary_sensor.turntable_playing"
    flip = load(BLUEPRINTS / "flip_reminder.yaml")
    assert "side_finished" in flip["condition"][0]["value_template"]
    unk = load(BLUEPRINTS / "unknown_record.yaml")
    assert "unknown_record" in unk["condition"][0]["value_template"]
    for bp in (flip, unk):
        assert bp["blueprint"]["input"]["playback"]["default"] == "event.turntable_playback"


def test_card_is_valid_and_names_only_our_entities():
    card = load(CARD)
    assert card["type"] == "vertical-stack"
    types = [c["type"] for c in walk(card) if isinstance(c, dict) and "type" in c]
    builtin = {"vertical-stack", "horizontal-stack", "picture-entity", "markdown", "entities", "gauge", "tile",
               "glance", "conditional", "entity"}
    assert set(types) <= builtin, set(types) - builtin
    assert not [n for n in walk(card) if isinstance(n, Tagged)]
    named = hass.entity_ids_in(CARD.read_text())
    assert named <= KNOWN, named - KNOWN
    for must in ("image.turntable_cover_art", "sensor.turntable_now_playing", "sensor.turntable_artist",
                 "sensor.turntable_album", "sensor.turntable_progress", "sensor.turntable_speed_error"):
        assert must in named
    # the attributes the card reads are ones the now_playing sensor has
    attrs = set(hass.attributes("turntable", "idle", None))
    for a in re.findall(r"state_attr\(np, '(\w+)'\)", CARD.read_text()):
        assert a in attrs, a
    _check_templates(templates(card))


def test_package_is_valid_and_names_only_our_entities():
    pkg = load(PACKAGE)
    defined = {f"sensor.{hass.slug(s['name'])}" for t in pkg["template"] for s in t["sensor"]}
    defined |= {f"sensor.{hass.slug(s['name'])}" for s in pkg["sensor"]}
    assert defined == PACKAGE_DEFINES
    named = hass.entity_ids_in(PACKAGE.read_text())
    assert named <= KNOWN | PACKAGE_DEFINES, named - KNOWN - PACKAGE_DEFINES
    _check_templates(templates(pkg))


def test_readme_names_only_our_entities_and_events():
    text = (HASS_DIR / "README.md").read_text()
    named = hass.entity_ids_in(text)
    assert named <= KNOWN | PACKAGE_DEFINES, named - KNOWN - PACKAGE_DEFINES
    assert KNOWN <= named  # every entity is documented
    for et in hass.EVENT_TYPES:
        assert f"`{et}`" in text
    assert "vinyl-mqtt hass remove" in text


def _check_templates(texts: list[str]) -> None:
    """Jinja syntax of the templates (Home Assistant's functions are not checked, the syntax is)."""
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment()
    for t in texts:
        try:
            env.parse(t)
        except jinja2.TemplateSyntaxError as e:
            pytest.fail(f"template syntax error: {e}\n{t}")
