"""The YAML configuration, validated by pydantic.

One file configures every role; each role reads only its own section.

    cfg = load("config.yaml")          # -> Config, or raises ConfigError
    ok, text = check("config.yaml")    # what `vinyl-mqtt config check` prints
    log.info("config: %s", redacted(cfg))

Errors name the file, the line, the key path and what was expected, one per
line, sorted by line; every problem in the file is reported at once:

    config.yaml:14 listener.gate.threshold_db: must be a number ≤ 0, got "loud"
    config.yaml:3 mqtt.hots: unknown key, did you mean "host"?

Beyond plain YAML:

* ``!secret name`` takes the value from ``secrets.yaml`` beside the config file
  (Home Assistant's convention).  Secret values never appear in error messages
  (``<secret name>`` is shown instead) nor in :func:`redacted`.
* Environment variables override the file: ``VINYL_MQTT__MQTT__HOST=broker.lan``
  (``__`` separates the levels; the value is read as a YAML scalar; a list from
  comma-separated items: ``VINYL_MQTT__ROLES=listener,matcher``).  An error in
  an override names the variable instead of a file line.
* Relative paths (library.db, listener.spool.dir, the TLS files) are taken from
  the config file's folder, not from the current directory.
* Duplicate keys are an error (plain PyYAML silently keeps the last one).
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import types
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .errors import VinylError
from .wol import WakerConfig

ROLES = ("listener", "matcher", "dedupe", "nowplaying", "scrobbler", "waker")
Role = Literal["listener", "matcher", "dedupe", "nowplaying", "scrobbler", "waker"]

ENV_PREFIX = "VINYL_MQTT__"
SECRETS_FILE = "secrets.yaml"


def default_db() -> Path:
    env = os.environ.get("VINYL_MQTT_DB")
    if env:
        return Path(env)
    data = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return data / "vinyl-mqtt" / "library.sqlite"


def default_spool() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "vinyl-mqtt" / "spool"


def _hostname() -> str:
    return socket.gethostname().split(".")[0] or "vinyl"


# --------------------------------------------------------------------------- types


def _unwrap(tp: Any) -> Any:
    """`X | None` -> X."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_text(tp: Any) -> bool:
    return _unwrap(tp) in (str, SecretStr, Path)


def _child_type(tp: Any, key: Any) -> Any:
    tp = _unwrap(tp)
    if _is_model(tp) and isinstance(key, str):
        fi = tp.model_fields.get(key)
        return fi.annotation if fi else None
    if get_origin(tp) is list and isinstance(key, int):
        return get_args(tp)[0]
    return None


# --------------------------------------------------------------------------- models


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _lenient(cls, v: Any, info) -> Any:
        fi = cls.model_fields.get(info.field_name or "")
        tp = _unwrap(fi.annotation) if fi else None
        if v is None and _is_model(tp):
            return {}  # a section whose keys are all commented out: its defaults
        if isinstance(v, bool) and tp in (int, float):
            # pydantic would take `true` as 1: almost certainly a slip
            raise PydanticCustomError("bool_not_number", "a number is expected, not true/false")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and tp in (str, SecretStr):
            return str(v)  # e.g. a numeric password from secrets.yaml
        return v


class TlsConfig(_Section):
    enabled: bool = False
    ca_certs: Path | None = None  # None: the system's trust store
    certfile: Path | None = None  # client certificate, if the broker asks for one
    keyfile: Path | None = None
    insecure: bool = False  # skip hostname verification (self-signed test brokers only)


class MqttConfig(_Section):
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsConfig = Field(default_factory=TlsConfig)
    client_id: str | None = None  # prefix; each role appends "-<role>"; default vinyl-mqtt-<node>
    base_topic: str = Field("vinyl_mqtt", min_length=1, pattern=r"^[^#+$][^#+]*$")
    discovery_prefix: str = Field("homeassistant", min_length=1, pattern=r"^[^#+]+$")
    keepalive: int = Field(30, ge=5, le=3600)


class LibraryConfig(_Section):
    db: Path = Field(default_factory=default_db)


class GateConfig(_Section):
    threshold_db: float = Field(-45.0, le=0)  # RMS above this is music (dBFS)
    hysteresis_db: float = Field(6.0, ge=0, le=40)  # silence is below threshold - hysteresis
    attack_s: float = Field(1.0, ge=0, le=30)  # music this long: playing
    release_s: float = Field(5.0, ge=0.5, le=120)  # silence this long: idle (gap between tracks is shorter)


class ClipConfig(_Section):
    seconds: float = Field(8.0, ge=2, le=30)
    rate: int = Field(8000, ge=8000, le=48000)  # sent at this rate (the matcher works at 8 kHz)
    first_after_s: float = Field(3.0, ge=1, le=30)  # after the needle drops
    recheck_s: float = Field(30.0, ge=5, le=3600)  # while playing


class SpoolConfig(_Section):
    dir: Path = Field(default_factory=default_spool)
    max_clips: int = Field(30, ge=1, le=10000)
    max_age_s: float = Field(180.0, ge=5, le=86400)  # older clips are useless: dropped, not matched late


class ListenerConfig(_Section):
    name: str | None = None  # this turntable's id in topics; default: the node name
    device: str = "default"  # ALSA PCM (`vinyl-mqtt devices` lists them)
    rate: int = Field(44100, ge=8000, le=192000)
    channels: int = Field(2, ge=1, le=8)
    format: Literal["S16_LE", "S32_LE", "FLOAT_LE"] = "S16_LE"
    period_frames: int = Field(4096, ge=64, le=65536)  # each wake-up costs more than the numpy work
    # default_factory: defaults that read the environment (XDG_*, VINYL_MQTT_DB) are taken when
    # the config is built, not when this module is imported
    gate: GateConfig = Field(default_factory=GateConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)


class MatcherConfig(_Section):
    workers: int = Field(2, ge=1, le=64)  # identify threads
    max_clip_bytes: int = Field(2_000_000, ge=10_000)
    max_clip_seconds: float = Field(30.0, ge=1, le=120)
    reload_check_s: float = Field(10.0, ge=1, le=3600)  # pick up `library add` without a restart
    share_group: str = "vinyl_mqtt_matchers"  # matchers in one group split the clips


class DedupeConfig(_Section):
    agree_matches: int = Field(2, ge=1, le=10)  # agreeing matches that confirm a track
    confident: float | None = Field(0.95, gt=0.5, le=1)  # one match this confident confirms (null: never)
    confident_score: int = Field(30, ge=14)  # ... and at least this many consistent hashes
    predict: bool = True  # one match of the album's next track confirms it
    timeline_tol_s: float = Field(2.0, gt=0, le=30)  # matches agree when their implied start is this close
    speed_tol: float = Field(0.03, gt=0, le=0.2)  # ... and their speeds this close (fraction)
    duration_grace_s: float = Field(10.0, ge=0, le=120)  # a play ends this long after its expected end
    played_through: float = Field(0.9, gt=0, le=1)  # fraction of the duration that counts as played through
    unknown_after: int = Field(2, ge=1, le=20)  # unmatched answers in a row: music not in the library
    unknown_end_after: int = Field(3, ge=0, le=20)  # ... that end a play (0: never)
    predict_window_s: float = Field(1200.0, ge=0)  # the next track is expected within this long of the end


LASTFM_API_ROOT = "https://ws.audioscrobbler.com/2.0/"
SCROBBLE_MAX_AGE_S = 14 * 86400  # Last.fm ignores older scrobbles (ignored code 3)


class ScrobblerConfig(_Section):
    api_key: str = ""  # https://www.last.fm/api/account/create
    api_secret: SecretStr = SecretStr("")
    session_key_file: Path = Field(default_factory=lambda: default_db().parent / "lastfm.session")  # `lastfm login` writes it
    api_root: str = LASTFM_API_ROOT  # Libre.fm: https://libre.fm/2.0/ (or a GNU FM server's /2.0/)
    auth_url: str | None = None  # where the user grants access; default: www.last.fm or the api_root's host
    queue_db: Path = Field(default_factory=lambda: default_db().parent / "scrobbles.sqlite")
    dry_run: bool = False  # log what would be sent; send nothing
    now_playing: bool = True  # track.updateNowPlaying when a play starts
    batch: int = Field(50, ge=1, le=50)  # scrobbles per request (Last.fm takes at most 50)
    retry_first_s: float = Field(30.0, gt=0, le=3600)  # first wait after a temporary error
    retry_max_s: float = Field(1800.0, gt=0, le=86400)  # the wait doubles up to this
    auth_recheck_s: float = Field(60.0, gt=0, le=86400)  # after an auth failure: look for a new session key
    max_age_s: float = Field(float(SCROBBLE_MAX_AGE_S), gt=0, le=SCROBBLE_MAX_AGE_S)  # older: too_old, not sent


class Config(_Section):
    node: str = Field(default_factory=_hostname, pattern=r"^[A-Za-z0-9_-]+$")
    roles: list[Role] = Field(default_factory=list)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    library: LibraryConfig = Field(default_factory=LibraryConfig)
    listener: ListenerConfig = Field(default_factory=ListenerConfig)
    matcher: MatcherConfig = Field(default_factory=MatcherConfig)
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)
    scrobbler: ScrobblerConfig = Field(default_factory=ScrobblerConfig)
    waker: WakerConfig | None = None  # required by the waker role: the matcher node to wake

    # set by load(): the file it came from and which keys came from secrets.yaml
    _source: Path | None = PrivateAttr(default=None)
    _secret_paths: dict = PrivateAttr(default_factory=dict)

    @field_validator("roles", mode="before")
    @classmethod
    def _roles_from_text(cls, v: Any) -> Any:
        if isinstance(v, str):  # `roles: listener, matcher` or a single role
            return [r.strip() for r in v.split(",") if r.strip()]
        return v

    @field_validator("roles")
    @classmethod
    def _roles_once(cls, v: list) -> list:
        return list(dict.fromkeys(v))

    @property
    def listener_name(self) -> str:
        return self.listener.name or self.node

    @property
    def source(self) -> Path | None:
        """The file load() read this from (None when built in code)."""
        return self._source


class ConfigError(VinylError):
    """Names the file, the line, the key and what is wrong; one problem per line."""

    def __init__(self, message: str, lines: list[str] | None = None):
        super().__init__(message)
        self.lines = lines if lines is not None else message.splitlines()


# --------------------------------------------------------------------------- YAML with lines

_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_SKIP = object()


class _Loader(yaml.SafeLoader):
    """Only composes nodes: values are built by _Builder, which keeps each key's line."""


class Where(NamedTuple):
    """Where a value came from: a file and line, or an environment variable (line None)."""

    source: str
    line: int | None = None


class _Err(NamedTuple):
    where: Where
    loc: tuple
    msg: str


def _keypath(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _compose(text: str, label: str) -> tuple[yaml.Node | None, _Loader]:
    loader = _Loader(text)
    try:
        return loader.get_single_node(), loader
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_syntax_error(label, e)) from None
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        code = ord(e.character) if isinstance(e.character, str) else e.character
        raise ConfigError(f"{label}:{line}: not valid YAML: a character YAML does not allow (#x{code:x})") from None
    except yaml.YAMLError as e:  # pragma: no cover - every PyYAML error is one of the above
        raise ConfigError(f"{label}: not valid YAML: {type(e).__name__}") from None


def _syntax_error(label: str, e: yaml.MarkedYAMLError) -> str:
    """file:line:col: the problem, never a quote of the file (it may hold a secret)."""
    mark = e.problem_mark or e.context_mark
    pos = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark else label
    msg = f"{pos}: not valid YAML: {e.problem or e.context or 'syntax error'}"
    if e.problem and e.context and e.problem.startswith("but "):  # "expected a single document ..., but found another"
        msg = f"{pos}: not valid YAML: {e.context}, {e.problem}"
    elif e.problem and e.context:
        msg += f" ({e.context}"
        if e.context_mark and e.context_mark is not mark:
            msg += f" that starts at line {e.context_mark.line + 1}, column {e.context_mark.column + 1}"
        msg += ")"
    if e.problem and "'\\t'" in e.problem:
        msg += "; indent with spaces, not tabs"
    return msg


class _Secrets:
    """secrets.yaml beside the config file, read on the first `!secret`."""

    def __init__(self, path: Path, errors: list[_Err]):
        self.path = path
        self.errors = errors
        self.loaded = False
        self.missing = False
        self.nodes: dict[str, yaml.Node] = {}
        self.loader: _Loader | None = None

    def get(self, name: str) -> tuple[yaml.Node | None, str | None]:
        """(node, None) or (None, why not)."""
        if not self.loaded:
            self._load()
        if self.missing:
            return None, f"!secret {name}, but there is no secrets file {self.path} (it must sit beside the config file)"
        if name not in self.nodes:
            hint = difflib.get_close_matches(name, list(self.nodes), n=1, cutoff=0.75)
            why = f"!secret {name}, but {self.path} has no {name}"
            return None, why + (f'; did you mean "{hint[0]}"?' if hint else "")
        return self.nodes[name], None

    def _load(self) -> None:
        self.loaded = True
        label = str(self.path)
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.missing = True
            return
        except (OSError, UnicodeDecodeError) as e:
            self.missing = True
            raise ConfigError(f"{label}: cannot read ({getattr(e, 'strerror', None) or 'not UTF-8 text'})") from None
        node, self.loader = _compose(text, label)
        if node is None:
            return
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{label}:{node.start_mark.line + 1}: must be a mapping of name: value lines")
        first: dict[str, int] = {}
        for k, v in node.value:
            line = k.start_mark.line + 1
            if not isinstance(k, yaml.ScalarNode):
                self.errors.append(_Err(Where(label, line), (), "a secret's name must be a plain word"))
                continue
            if k.value in first:
                self.errors.append(
                    _Err(Where(label, line), (), f"duplicate secret {k.value} (first at line {first[k.value]}); only one is allowed")
                )
            first.setdefault(k.value, line)
            self.nodes[k.value] = v


class _Builder:
    """Turns composed YAML nodes into plain Python data, recording the line of every key.

    It is told the pydantic type expected at each key, so that a plain scalar for a
    text setting stays the text the user wrote (`password: 0123`, `name: off`).
    """

    def __init__(self, label: str, loader: _Loader, errors: list[_Err], secrets: _Secrets | None):
        self.label = label
        self.loader = loader
        self.errors = errors
        self.secrets = secrets
        self.locs: dict[tuple, Where] = {}
        self.secret_paths: dict[tuple, str] = {}
        self.secret_values: dict[str, str] = {}  # value -> name, to scrub messages
        self.bad: set[tuple] = set()  # paths already reported: pydantic's errors there are noise
        self._stack: set[int] = set()

    def error(self, node: yaml.Node, loc: tuple, msg: str) -> None:
        self.errors.append(_Err(Where(self.label, node.start_mark.line + 1), loc, msg))
        self.bad.add(loc)

    def _forget(self, path: tuple) -> None:
        n = len(path)
        for table in (self.locs, self.secret_paths):
            for k in [k for k in table if k[:n] == path and len(k) > n]:
                del table[k]

    def build(self, node: yaml.Node, path: tuple, tp: Any) -> Any:
        if id(node) in self._stack:
            self.error(node, path, "an alias refers to a mapping that contains it (recursive YAML)")
            return _SKIP
        self._stack.add(id(node))
        try:
            if isinstance(node, yaml.ScalarNode):
                return self._scalar(node, path, tp)
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, path, tp)
            return self._mapping(node, path, tp)
        finally:
            self._stack.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode, path: tuple, tp: Any) -> Any:
        if node.tag == "!secret":
            return self._secret(node, path, tp)
        if node.tag.startswith("!"):
            self.error(node, path, f"unknown tag {node.tag} (the only tag understood is !secret)")
            return _SKIP
        if node.style is None and _is_text(tp) and node.tag not in (_STR, _NULL):
            return node.value  # `0123`, `off`, `12:30`: for a text setting, what was written
        try:
            return self.loader.construct_object(node)
        except (yaml.constructor.ConstructorError, ValueError, TypeError):
            self.error(node, path, f"cannot read this value as {node.tag.rsplit(':', 1)[-1]}")
            return _SKIP

    def _sequence(self, node: yaml.SequenceNode, path: tuple, tp: Any) -> Any:
        if node.tag != _SEQ:
            self.error(node, path, f"unsupported tag {node.tag} on a list")
            return _SKIP
        out = []
        for i, item in enumerate(node.value):
            kp = path + (i,)
            self.locs[kp] = Where(self.label, item.start_mark.line + 1)
            value = self.build(item, kp, _child_type(tp, i))
            out.append(None if value is _SKIP else value)  # keep the indices; the error is reported
        return out

    def _mapping(self, node: yaml.MappingNode, path: tuple, tp: Any) -> Any:
        if node.tag != _MAP:
            what = "!secret takes a name, e.g. !secret mqtt_password" if node.tag == "!secret" else f"unsupported tag {node.tag}"
            self.error(node, path, what)
            return _SKIP
        merged: dict = {}
        own: dict = {}
        first: dict[str, int] = {}
        # `<<: *anchor` first: the mapping's own keys win over merged ones
        for k, v in node.value:
            if k.tag != _MERGE:
                continue
            sources = v.value if isinstance(v, yaml.SequenceNode) else [v]
            for src in sources:
                value = self.build(src, path, tp) if isinstance(src, yaml.MappingNode) else _SKIP
                if isinstance(value, dict):
                    for key, val in value.items():
                        merged.setdefault(key, val)  # earlier sources win
                else:
                    self.error(src, path, "<< merges only mappings")
        for k, v in node.value:
            if k.tag == _MERGE:
                continue
            line = k.start_mark.line + 1
            if not isinstance(k, yaml.ScalarNode):
                self.error(k, path, "a key must be a plain name, not a list or mapping")
                continue
            key = k.value
            kp = path + (key,)
            if key in first:
                self.error(k, kp, f"duplicate key (first at line {first[key]}); YAML would keep only the last, remove one")
            first.setdefault(key, line)
            self._forget(kp)
            self.secret_paths.pop(kp, None)
            self.locs[kp] = Where(self.label, line)
            value = self.build(v, kp, _child_type(tp, key))
            if value is _SKIP:
                own.pop(key, None)
                merged.pop(key, None)
            else:
                own[key] = value
        return {**merged, **own}

    def _secret(self, node: yaml.ScalarNode, path: tuple, tp: Any) -> Any:
        name = node.value.strip()
        if not name:
            self.error(node, path, "!secret needs a name, e.g. !secret mqtt_password")
            return _SKIP
        if self.secrets is None:
            self.error(node, path, f"!secret {name}: a secrets file cannot use !secret itself")
            return _SKIP
        snode, why = self.secrets.get(name)
        if snode is None:
            self.error(node, path, why)
            return _SKIP
        sub = _Builder(str(self.secrets.path), self.secrets.loader, self.errors, None)
        value = sub.build(snode, path, tp)
        if sub.bad:
            self.bad.add(path)
        if value is _SKIP:
            return _SKIP
        self._forget(path)
        self.secret_paths[path] = name
        for v in _leaves(value):
            if isinstance(v, (str, int, float)) and not isinstance(v, bool) and len(str(v)) >= 6:
                self.secret_values[str(v)] = name
        return value


def _leaves(value: Any):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


# --------------------------------------------------------------------------- environment


def _scalar(text: str) -> Any:
    """A YAML scalar as YAML would read it: `-40` -> -40, `true` -> True, `a b` -> 'a b'."""
    loader = _Loader("")
    tag = loader.resolve(yaml.ScalarNode, text, (True, False))
    try:
        return loader.construct_object(yaml.ScalarNode(tag, text))
    except (yaml.YAMLError, ValueError, TypeError):
        return text


def _env_value(text: str, tp: Any) -> Any:
    base = _unwrap(tp)
    if get_origin(base) is list:
        item = get_args(base)[0]
        return [_env_value(t.strip(), item) for t in text.split(",") if t.strip()]
    if _is_text(base):
        return None if text == "" and _is_optional(tp) else text
    return _scalar(text.strip())


def _apply_env(raw: dict, env: Mapping[str, str], b: _Builder, errors: list[_Err]) -> None:
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX):
            continue
        where = Where("$" + var)
        parts = var[len(ENV_PREFIX) :].split("__")
        if not all(parts):
            errors.append(_Err(where, (), f"not a valid override name; use {ENV_PREFIX}SECTION__KEY, e.g. {ENV_PREFIX}MQTT__HOST"))
            continue
        path = tuple(p.lower() for p in parts)
        tp: Any = Config
        for p in path:
            tp = _child_type(tp, p)
        if _is_model(_unwrap(tp)):
            errors.append(_Err(where, path, f"names a whole section; set one key inside it, e.g. {var}__{next(iter(_unwrap(tp).model_fields)).upper()}"))
            continue
        value = _env_value(env[var], tp)
        d = raw
        for i, key in enumerate(path[:-1]):
            if key not in d or d[key] is None:
                d[key] = {}
                b.locs.setdefault(path[: i + 1], where)
            elif not isinstance(d[key], dict):
                errors.append(_Err(where, path, f"cannot be set: {_keypath(path[: i + 1])} in the config file is not a mapping"))
                break
            d = d[key]
        else:
            d[path[-1]] = value
            b._forget(path)
            b.secret_paths.pop(path, None)
            b.bad.discard(path)
            b.locs[path] = where
            if isinstance(value, list):
                for i in range(len(value)):
                    b.locs[path + (i,)] = where


# --------------------------------------------------------------------------- messages

_PATTERN_WORDS = {
    r"^[A-Za-z0-9_-]+$": 'a name of letters, digits, "_" and "-" only (no spaces or dots)',
    r"^[^#+$][^#+]*$": 'an MQTT topic that does not start with "$" and has no "#" or "+" in it',
    r"^[^#+]+$": 'an MQTT topic with no "#" or "+" in it',
}

_VALUE_ERRORS = {
    "int_parsing", "int_type", "int_from_float", "int_parsing_size", "float_parsing", "float_type",
    "finite_number", "bool_parsing", "bool_type", "bool_not_number", "greater_than", "greater_than_equal",
    "less_than", "less_than_equal", "multiple_of", "string_type", "string_too_short", "string_too_long",
    "string_pattern_mismatch", "string_unicode", "path_type", "list_type", "too_short", "too_long",
    "model_type", "model_attributes_type", "dict_type", "none_required",
}  # fmt: skip


def _num(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _type_at(loc: tuple) -> tuple[Any, Any]:
    """The annotation expected at loc and the FieldInfo holding its constraints."""
    tp: Any = Config
    fi = None
    for part in loc:
        base = _unwrap(tp)
        if _is_model(base) and isinstance(part, str):
            fi = base.model_fields.get(part)
            tp = fi.annotation if fi else None
        elif get_origin(base) is list and isinstance(part, int):
            tp, fi = get_args(base)[0], None
        else:
            return None, None
    return tp, fi


def _describe(tp: Any, fi: Any) -> str:
    base = _unwrap(tp)
    cons: dict[str, Any] = {}
    for m in getattr(fi, "metadata", None) or []:
        for k in ("ge", "le", "gt", "lt", "min_length", "max_length", "pattern"):
            if getattr(m, k, None) is not None:
                cons[k] = getattr(m, k)
    if get_origin(base) is Literal:
        return "one of " + ", ".join(_quote(str(a)) for a in get_args(base))
    if base is bool:
        return "true or false"
    if base in (int, float):
        what = "a whole number" if base is int else "a number"
        lo = f"≥ {_num(cons['ge'])}" if "ge" in cons else f"> {_num(cons['gt'])}" if "gt" in cons else None
        hi = f"≤ {_num(cons['le'])}" if "le" in cons else f"< {_num(cons['lt'])}" if "lt" in cons else None
        if "ge" in cons and "le" in cons:
            return f"{what} from {_num(cons['ge'])} to {_num(cons['le'])}"
        return " ".join([what, " and ".join(x for x in (lo, hi) if x)]).strip()
    if base in (str, SecretStr):
        if "pattern" in cons:
            return _PATTERN_WORDS.get(cons["pattern"], f"text matching {cons['pattern']}")
        return "non-empty text" if cons.get("min_length") else "text"
    if base is Path:
        return "a file or folder path"
    if get_origin(base) is list:
        item = get_args(base)[0]
        if item == Role:
            return "a list of roles, each " + _describe(item, None)
        return "a list, each item " + _describe(item, None)
    if _is_model(base):
        return "a mapping of settings (indented key: value lines)"
    return "a valid value"


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, str):
        return _quote(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, (int, float)):
        return _num(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return _quote(str(value))


def _message(err: dict, loc: tuple, shown: str) -> str:
    kind = err["type"]
    tp, fi = _type_at(loc)
    if kind == "missing":
        return f"required, but not set (it must be {_describe(tp, fi)})"
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        parent = _unwrap(_type_at(loc[:-1])[0])
        fields = list(parent.model_fields) if _is_model(parent) else []
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
        if close:
            return f'unknown key, did you mean "{close[0]}"?'
        if key in ROLES:
            return f"unknown key: the {key} role has no settings of its own in this file"
        return "unknown key; the keys allowed here are " + ", ".join(fields)
    if kind == "literal_error":
        allowed = [str(a) for a in get_args(_unwrap(tp))] if get_origin(_unwrap(tp)) is Literal else []
        msg = f"must be {_describe(tp, fi) if allowed else err['msg']}, got {shown}"
        if allowed and isinstance(err.get("input"), str) and not shown.startswith("<") and shown != "***":
            close = difflib.get_close_matches(err["input"], allowed, n=1, cutoff=0.6)
            if close:
                msg += f' (did you mean "{close[0]}"?)'
        return msg
    if kind in _VALUE_ERRORS and tp is not None:
        msg = f"must be {_describe(tp, fi)}, got {shown}"
        if kind in ("string_type", "path_type") and isinstance(err.get("input"), bool):
            msg += " (YAML reads yes/no/on/off as true/false: put the text in quotes)"
        return msg
    if kind == "value_error":
        text = err["msg"].removeprefix("Value error, ")
        return f"{text}, got {shown}"
    text = err["msg"]
    return f"{text[:1].lower()}{text[1:]}, got {shown}"


# --------------------------------------------------------------------------- load


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, check and return the config at `path`, with environment overrides applied.

    Raises ConfigError naming every problem (file:line key.path: what was expected).
    `env` defaults to os.environ; only variables starting with VINYL_MQTT__ are read.
    """
    path = Path(path)
    label = str(path)
    env = os.environ if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{label}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label}: cannot read (not UTF-8 text: byte {e.start})") from e

    node, loader = _compose(text, label)
    errors: list[_Err] = []
    secrets = _Secrets(path.parent / SECRETS_FILE, errors)
    b = _Builder(label, loader, errors, secrets)
    b.locs[()] = Where(label, 1)
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL):
        raw: Any = {}  # an empty file (or only comments): every default
    elif not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
        raise ConfigError(
            f"{label}:{node.start_mark.line + 1}: the top level must be a mapping of sections "
            f"(node:, roles:, mqtt:, listener:, ...), got {kind}"
        )
    else:
        raw = b.build(node, (), Config)
        if raw is _SKIP:
            raw = {}
    _apply_env(raw, env, b, errors)

    cfg = None
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            if any(loc[:i] in b.bad for i in range(len(loc) + 1)):
                continue  # already reported (missing secret, duplicate, ...)
            errors.append(_Err(_where(b, loc), loc, _message(err, loc, _shown(b, loc, err.get("input")))))

    if cfg is not None:
        _resolve_paths(cfg, path.parent.absolute())
        for loc, msg in _cross_checks(cfg):
            errors.append(_Err(_where(b, loc), loc, msg))

    if errors:
        lines = _format(errors, label, b.secret_values)
        raise ConfigError("\n".join(lines), lines)
    cfg._source = path.absolute()
    cfg._secret_paths = dict(b.secret_paths)
    return cfg


def _where(b: _Builder, loc: tuple) -> Where:
    """The line of the key, or of its nearest parent that is in the file (a missing key: its section)."""
    for i in range(len(loc), -1, -1):
        if loc[:i] in b.locs:
            return b.locs[loc[:i]]
    return b.locs[()]


def _shown(b: _Builder, loc: tuple, value: Any) -> str:
    for i in range(len(loc), -1, -1):
        if loc[:i] in b.secret_paths:
            return f"<secret {b.secret_paths[loc[:i]]}>"
    if _unwrap(_type_at(loc)[0]) is SecretStr:
        return "***"
    return _render(value)


def _format(errors: list[_Err], label: str, secret_values: dict[str, str]) -> list[str]:
    def order(e: _Err):
        w = e.where
        return (w.line is None, w.source != label, w.source, w.line or 0)

    out: list[str] = []
    for e in sorted(errors, key=order):  # stable: pydantic's order within a line
        where = f"{e.where.source}:{e.where.line}" if e.where.line is not None else e.where.source
        kp = _keypath(e.loc)
        line = f"{where} {kp}: {e.msg}" if kp else f"{where}: {e.msg}"
        for value, name in sorted(secret_values.items(), key=lambda kv: -len(kv[0])):
            line = line.replace(value, f"<secret {name}>")
        if line not in out:
            out.append(line)
    return out


def _resolve_paths(model: BaseModel, base: Path) -> None:
    """Relative paths are relative to the config file's folder; `~` is the home folder."""
    for name, fi in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _resolve_paths(value, base)
        elif isinstance(value, Path):
            p = value.expanduser()
            if not p.is_absolute():
                p = (base / p).resolve()
            setattr(model, name, p)


def _cross_checks(cfg: Config) -> list[tuple[tuple, str]]:
    """Settings that are each valid but wrong together."""
    out: list[tuple[tuple, str]] = []
    m = cfg.mqtt
    if m.password is not None and not m.username:
        out.append((("mqtt", "password"), "is set but mqtt.username is not (MQTT sends a password only with a user name)"))
    if m.tls.enabled:
        for key in ("ca_certs", "certfile", "keyfile"):
            p = getattr(m.tls, key)
            if p is not None and not p.is_file():
                out.append((("mqtt", "tls", key), f"no such file {p}"))
        if m.tls.keyfile is not None and m.tls.certfile is None:
            out.append((("mqtt", "tls", "keyfile"), "is set but mqtt.tls.certfile is not (the key belongs to a client certificate)"))
    if "waker" in cfg.roles and cfg.waker is None:
        out.append((("waker",), "the waker role needs this section with at least mac: (the matcher node's network card)"))
    if "scrobbler" in cfg.roles and not cfg.scrobbler.dry_run and not cfg.scrobbler.api_key:
        out.append((("scrobbler", "api_key"), "the scrobbler role needs a Last.fm API key (or dry_run: true)"))
    if "listener" in cfg.roles and "matcher" in cfg.roles and cfg.listener.clip.seconds > cfg.matcher.max_clip_seconds:
        out.append(
            (
                ("listener", "clip", "seconds"),
                f"{_num(cfg.listener.clip.seconds)} s is longer than matcher.max_clip_seconds "
                f"({_num(cfg.matcher.max_clip_seconds)} s): the matcher would refuse every clip",
            )
        )
    return out


# --------------------------------------------------------------------------- check / redacted


def _set_in(data: Any, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return
    try:
        if path and (isinstance(data, dict) and path[-1] in data or isinstance(data, list)):
            data[path[-1]] = value
    except (IndexError, TypeError):
        pass


def _mask_secretstr(model: BaseModel, data: dict) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            data[name] = "***"
        elif isinstance(value, BaseModel) and isinstance(data.get(name), dict):
            _mask_secretstr(value, data[name])


def redacted(cfg: Config) -> dict:
    """The config as plain JSON-able data, every secret replaced by "***": for logs."""
    data = cfg.model_dump(mode="json")
    _mask_secretstr(cfg, data)
    for path in getattr(cfg, "_secret_paths", None) or {}:
        _set_in(data, path, "***")
    return data


def _role_line(role: str, d: dict, cfg: Config) -> str:
    base = d["mqtt"]["base_topic"]
    if role == "listener":
        li = d["listener"]
        g, c, s = li["gate"], li["clip"], li["spool"]
        return (
            f'turntable "{cfg.listener_name}" on {base}/{cfg.listener_name}/; '
            f"music above {_num(g['threshold_db'])} dBFS (hysteresis {_num(g['hysteresis_db'])} dB, "
            f"playing after {_num(g['attack_s'])} s, idle after {_num(g['release_s'])} s); "
            f"{_num(c['seconds'])} s clips at {c['rate']} Hz, first {_num(c['first_after_s'])} s in, "
            f"then every {_num(c['recheck_s'])} s; spool {s['dir']} (≤ {s['max_clips']} clips, ≤ {_num(s['max_age_s'])} s old)"
        )
    if role == "matcher":
        m = d["matcher"]
        return (
            f"{m['workers']} worker(s) in share group {m['share_group']}; clips ≤ {_num(m['max_clip_seconds'])} s "
            f"and ≤ {m['max_clip_bytes']} bytes; library {d['library']['db']}, re-read check every {_num(m['reload_check_s'])} s"
        )
    if role == "dedupe":
        dd = d["dedupe"]
        rule = f"{dd['agree_matches']} agreeing matches"
        if dd["confident"] is not None:
            rule += f" or 1 with confidence ≥ {_num(dd['confident'])}"
        if dd["predict"]:
            rule += " or 1 of the album's next track"
        return f"matches + listener state from {base}/+/ -> plays on {base}/<listener>/play; a track is confirmed by {rule}"
    if role == "nowplaying":
        return f"Home Assistant discovery under {d['mqtt']['discovery_prefix']}/, entity states on {base}/<listener>/ha/..."
    if role == "scrobbler":
        sc = d["scrobbler"]
        mode = "dry run, nothing sent" if sc["dry_run"] else f"session key {sc['session_key_file']}"
        return f"plays from {base}/+/play -> {sc['api_root']} ({mode}); queue {sc['queue_db']}"
    if role == "waker":
        w = d.get("waker") or {}
        if not w:
            return "no waker: section (needed: mac)"
        return (f"Wake-on-LAN {w['mac']} via {w['broadcast']}:{w['port']} x{w['repeat']}, "
                f"gives up after {_num(w['wake_timeout_s'])} s")
    return ""  # pragma: no cover


def summary(cfg: Config) -> str:
    """A few lines on what this config will do; secrets masked."""
    d = redacted(cfg)
    m = d["mqtt"]
    broker = f"{m['host']}:{m['port']}, " + ("TLS" + (" (no hostname check)" if m["tls"]["insecure"] else "") if m["tls"]["enabled"] else "no TLS")
    broker += f", user {m['username']}" if m["username"] else ", no user"
    if m["password"] is not None:
        broker += ", password ***"
    li = d["listener"]
    rows = [
        ("node", d["node"]),
        ("roles", ", ".join(d["roles"]) or "none (give `run --roles` or set roles:)"),
        ("broker", broker),
        ("topics", f"{m['base_topic']}/..., discovery {m['discovery_prefix']}/..."),
        ("library", d["library"]["db"]),
        ("audio", f"{li['device']}, {li['rate']} Hz, {li['channels']} ch, {li['format']}"),
    ]
    rows += [(role, _role_line(role, d, cfg)) for role in d["roles"]]
    width = max(len(k) for k, _ in rows)
    src = f"{cfg.source}: " if cfg.source else ""
    return "\n".join([f"{src}OK"] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


def check(path: str | Path, env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """What `vinyl-mqtt config check FILE` prints: (True, summary) or (False, the error lines)."""
    try:
        cfg = load(path, env)
    except ConfigError as e:
        return False, str(e)
    return True, summary(cfg)
