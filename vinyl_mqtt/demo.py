"""`vinyl-mqtt demo`: the recogniser on this one machine, no turntable needed.

Builds a library from the bundled recordings, then "plays" clips of them
through the turntable simulator (a good deck, a worn belt drive, a record on
the wrong speed, a mic in a noisy room) and says what it hears — plus a
recording that is not in the library, to show it says "don't know".
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from . import fingerprint as fp
from .audio import decode
from .library import ingest, scan
from .store import Store
from .turntable import CONDITIONS, simulate

BUNDLED = Path(__file__).resolve().parent.parent / "tests" / "data"
PLAY = ("good_deck", "worn_plus2", "33_at_45", "worn_belt_noisy_room")
CLIP_S = 8.0


def run(music: Path | None = None, out=print) -> int:
    music = Path(music) if music else BUNDLED
    files = sorted(scan([music])) if music.exists() else []
    library = [f for f in files if not f.name.startswith("unknown")]
    strangers = [f for f in files if f.name.startswith("unknown")]
    if not library:
        out(f"no recordings found in {music}; pass --music DIR with a few audio files")
        return 2
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "library.sqlite") as store:
        out(f"building a library from {len(library)} recordings in {music} ...")
        report = ingest(store, library)
        out(f"  {report.summary()}")
        index = store.load_index()
        tracks = {t.path: t for t in store.tracks()}
        out("")
        for i, path in enumerate(library[: len(PLAY)] + strangers[:1]):
            cond = CONDITIONS[PLAY[i % len(PLAY)]]
            x = decode(path, 44100)
            start = rng.uniform(0, max(0.0, len(x) / 44100 - CLIP_S * cond.speed - 1))
            seg = x[int(start * 44100) : int((start + CLIP_S * cond.speed + 0.5) * 44100)]
            clip = simulate(seg, 44100, cond, rng)[: int(CLIP_S * 44100)]
            t0 = time.perf_counter()
            m = index.match(fp.prepare(clip, 44100))
            took = (time.perf_counter() - t0) * 1000
            known = str(path) in tracks
            out(f"playing {'(not in library) ' if not known else ''}{path.name} at {start:.0f} s, {cond.description}")
            if m.matched:
                t = next(t for t in tracks.values() if t.id == m.track_id)
                rpm = f", the record is playing {m.rpm_mistake} rpm" if m.rpm_mistake else ""
                out(f"  heard: {t.artist or '?'} — {t.title} at {m.offset_s:.1f} s, "
                    f"speed {100 * (m.speed - 1):+.2f} %{rpm} (confidence {m.confidence:.2f}, {took:.0f} ms)")
            else:
                out(f"  heard: don't know ({took:.0f} ms)")
        out("")
    return 0
