"""Fixtures shared by the engine, library and CLI tests.

The audio is real music: short excerpts of freely licensed game soundtracks
in tests/data (see tests/data/LICENSE.md).  LIBRARY excerpts are fingerprinted
into a session-wide library; UNKNOWN ones are other tracks, never added, and
no version of them is in LIBRARY.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from vinyl_mqtt.audio import decode
from vinyl_mqtt.library import ingest
from vinyl_mqtt.matcher import Index
from vinyl_mqtt.store import Store, Track
from vinyl_mqtt.turntable import CONDITIONS, simulate

DATA = Path(__file__).parent / "data"

# name (file stem) -> (title, artist, album) as tagged in the excerpt; None: untagged
LIBRARY: dict[str, tuple[str | None, str | None, str | None]] = {
    "etr_credits_ballad": ("Credits Ballad", "Kristian Picon", "Extreme Tux Racer"),
    "etr_freezing_point": ("Freezing Point", "Grady O'Connell", None),
    "fb_introzik": (None, None, None),
    "hw_beach": (None, None, "Hedgewars"),
    "hw_castle": (None, None, None),
    "st_chipdisko": ("Mortimer's Chipdisko", "Mortimer Twang", "SuperTux Soundtrack"),
    "st_clavelian_march": ("Clavelian March", "Treskalle", "Supertux Soundtrack"),  # the stereo one
    "st_tropical_breeze": ("Tropical Breeze", "Flan", None),
}
UNKNOWN = ("unknown_etr_race1", "unknown_hw_city", "unknown_st_eyes_in_the_deep")

SIM_RATE = 44100  # clips are simulated at a capture rate, then go through fingerprint.prepare
MARGIN_S = 0.5  # extra source for a simulated clip, so it is never short


def data_file(name: str) -> Path:
    return DATA / f"{name}.ogg"


def cut(x: np.ndarray, start_s: float, seconds: float, condition: str, seed: int) -> np.ndarray:
    """``seconds`` of mono ``x`` (at SIM_RATE) from ``start_s`` as heard under ``condition``.

    Cuts ``seconds * speed + MARGIN_S`` of source, plays it with a fixed seed and
    keeps the first ``seconds``: the clip starts at ``start_s`` in track time.
    """
    c = CONDITIONS[condition]
    i0 = int(round(start_s * SIM_RATE))
    n_src = int(round((seconds * c.speed + MARGIN_S) * SIM_RATE))
    seg = x[i0 : i0 + n_src]
    assert len(seg) == n_src, "clip runs past the end of the excerpt"
    y = simulate(seg, SIM_RATE, condition, np.random.default_rng(seed))
    n = int(round(seconds * SIM_RATE))
    assert len(y) >= n
    return y[:n]


@dataclass
class Library:
    """The session's library: the store, its loaded index and who is who."""

    db: Path
    store: Store
    index: Index
    tracks: dict[int, Track]
    ids: dict[str, int]  # excerpt name -> track id


@pytest.fixture(scope="session")
def library(tmp_path_factory) -> Library:
    root = tmp_path_factory.mktemp("library")
    music = root / "music"
    music.mkdir()
    for name in LIBRARY:
        shutil.copy2(data_file(name), music / f"{name}.ogg")
    store = Store(root / "library.sqlite")
    report = ingest(store, [music], workers=1)
    assert report.failed == [] and report.added == len(LIBRARY), report.summary()
    tracks = {t.id: t for t in store.tracks()}
    ids = {Path(t.path).stem: t.id for t in tracks.values()}
    assert sorted(ids) == sorted(LIBRARY)
    yield Library(root / "library.sqlite", store, store.load_index(), tracks, ids)
    store.close()


@pytest.fixture(scope="session")
def excerpts() -> dict[str, np.ndarray]:
    """Every excerpt (library and unknown) decoded to mono float32 at SIM_RATE."""
    return {name: decode(data_file(name), SIM_RATE) for name in (*LIBRARY, *UNKNOWN)}

# a real Mosquitto on a free loopback port, for every test module (tests/broker.py)
from broker import broker  # noqa: E402,F401


# --------------------------------------------------------------------------- the pipeline's parts

TURNTABLE = "pi"  # the listener name the in-process pipeline tests use


def needle_drop(excerpts, name: str, lead_s: float = 2.0, tail_s: float = 6.0) -> np.ndarray:
    """A record as the line-in hears it: silence, the track, then the needle lifted."""
    z = lambda s: np.zeros(int(s * SIM_RATE), np.float32)  # noqa: E731
    return np.concatenate([z(lead_s), excerpts[name], z(tail_s)])


def node_config(mqtt_broker, library, tmp_path, node: str, **listener):
    """One node's config against the test broker and library (listener settings as given)."""
    from vinyl_mqtt.config import Config, LibraryConfig, ListenerConfig, MatcherConfig, SpoolConfig

    return Config(
        node=node,
        mqtt=mqtt_broker.config(),
        library=LibraryConfig(db=library.db),
        listener=ListenerConfig(name=TURNTABLE, spool=SpoolConfig(dir=tmp_path / f"spool-{node}"), **listener),
        matcher=MatcherConfig(reload_check_s=1.0),
    )
