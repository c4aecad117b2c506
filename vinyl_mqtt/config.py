"""The YAML configuration, validated by pydantic.

Only the library section exists so far; each role adds its own section here.
Errors name the file, the key path and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


def default_db() -> Path:
    env = os.environ.get("VINYL_MQTT_DB")
    if env:
        return Path(env)
    data = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return data / "vinyl-mqtt" / "library.sqlite"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LibraryConfig(_Section):
    db: Path = default_db()


class Config(_Section):
    library: LibraryConfig = LibraryConfig()


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
