"""The YAML configuration, validated by pydantic.

One file configures every role; each role reads only its own section. Errors
name the file, the key path and what was expected.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

ROLES = ("listener", "matcher", "dedupe", "nowplaying", "scrobbler", "waker")
Role = Literal["listener", "matcher", "dedupe", "nowplaying", "scrobbler", "waker"]


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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    tls: TlsConfig = TlsConfig()
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
    period_frames: int = Field(1024, ge=64, le=65536)
    gate: GateConfig = GateConfig()
    clip: ClipConfig = ClipConfig()
    spool: SpoolConfig = SpoolConfig()


class MatcherConfig(_Section):
    workers: int = Field(2, ge=1, le=64)  # identify threads
    max_clip_bytes: int = Field(2_000_000, ge=10_000)
    max_clip_seconds: float = Field(30.0, ge=1, le=120)
    reload_check_s: float = Field(10.0, ge=1, le=3600)  # pick up `library add` without a restart
    share_group: str = "vinyl_mqtt_matchers"  # matchers in one group split the clips


class Config(_Section):
    node: str = Field(default_factory=_hostname, pattern=r"^[A-Za-z0-9_-]+$")
    roles: list[Role] = Field(default_factory=list)
    mqtt: MqttConfig = MqttConfig()
    library: LibraryConfig = LibraryConfig()
    listener: ListenerConfig = ListenerConfig()
    matcher: MatcherConfig = MatcherConfig()

    @property
    def listener_name(self) -> str:
        return self.listener.name or self.node


class ConfigError(Exception):
    """Names the file, the key and what is wrong."""


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from e
    if not cfg.library.db.is_absolute():
        cfg.library.db = (path.parent / cfg.library.db).resolve()
    return cfg
