"""What the two benchmarks share: the corpus, the fixed hold-out set, the
decoded-audio cache, clip making and the Markdown tables.

Kept in one place so that accuracy.py and scale.py draw their clips, split the
library and print their figures the same way, and a change to how a clip is
made changes both.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
OUT = PROJECT / "bench" / "out"  # git-ignored
sys.path.insert(0, str(PROJECT))  # `python bench/x.py` works without installing

from vinyl_mqtt import audio, turntable  # noqa: E402
from vinyl_mqtt import fingerprint as fp  # noqa: E402
from vinyl_mqtt import matcher  # noqa: E402

# Tracks that are *not* put in the library: clips from them must get "don't know".
# Chosen so that no other version of the same tune stays in the library (a
# match to it would be right, not a false positive): checked by querying every
# corpus track against an index of all the others (see README, "Hold-outs").
# The corpus's families of versions -- airship_2/airship_remix, cave/cave_old,
# fortress/fortress_old, forest*, ghostforest*, voc-*, Olympics/olympics_sd,
# frozen-mainzik-* -- are all left whole in the library.
HOLD_OUT = (
    "frozen-bubble-data/introzik",
    "extremetuxracer-data/freezingpoint",
    "hedgewars-data/Art",
    "hedgewars-data/Beach",
    "hedgewars-data/Brick",
    "hedgewars-data/Castle",
    "hedgewars-data/City",
    "supertux-data/chipdisko",
    "supertux-data/jewels",
    "supertux-data/clavelian_march",
)

# Library tracks that contain the same recorded material as another library
# track (found the same way): theme and christmas_theme open identically, the
# other two pairs share loops. A clip from one that names the other is not
# counted right or wrong, but reported as "sibling".
SAME_MATERIAL = (
    ("supertux-data/theme", "supertux-data/christmas_theme"),
    ("supertux-data/call_of_the_winding_path", "supertux-data/shallow-green"),
    ("supertux-data/forest", "supertux-data/ghostforest"),
)


def siblings(tracks: list[Track]) -> set[tuple[int, int]]:
    """(i, j) index pairs of `tracks` that share material, both ways round."""
    where = {t.key: i for i, t in enumerate(tracks)}
    out = set()
    for a, b in SAME_MATERIAL:
        if a in where and b in where:
            out |= {(where[a], where[b]), (where[b], where[a])}
    return out


# A turntable listener sends clips only while music plays.
SILENCE_DBFS = -45.0
# Source audio kept on both sides of a clip, so reverb, rumble and filters
# have settled by the time the clip starts.
MARGIN_S = 1.0


def fetch_hint(corpus: Path) -> str:
    return (
        f"No corpus at {corpus} (tracks.tsv missing). Fetch it with\n"
        f"    ../shared/corpus/fetch.sh {corpus}\n"
        "(needs apt-get and ffprobe; 81 tracks, 211 min), or point --corpus / "
        "$VINYL_CORPUS at an existing one."
    )


def default_corpus() -> Path:
    return Path(os.environ.get("VINYL_CORPUS") or PROJECT.parent / "corpus")


@dataclass(frozen=True)
class Track:
    path: str
    package: str
    seconds: float

    @property
    def key(self) -> str:
        """package/stem: unique in the corpus, stable across machines."""
        return f"{self.package}/{Path(self.path).stem}"


def load_corpus(corpus: Path) -> tuple[list[Track], list[Track]]:
    """(library, held_out) from DIR/tracks.tsv; exits 2 if there is none."""
    tsv = corpus / "tracks.tsv"
    if not tsv.is_file():
        print(fetch_hint(corpus), file=sys.stderr)
        sys.exit(2)
    tracks = []
    for line in tsv.read_text().splitlines():
        if line.strip():
            path, package, seconds = line.split("\t")[:3]
            tracks.append(Track(path, package, float(seconds)))
    keys = {t.key for t in tracks}
    missing = [k for k in HOLD_OUT if k not in keys]
    if missing:
        sys.exit(f"hold-out tracks not in {tsv}: {', '.join(missing)}")
    library = [t for t in tracks if t.key not in HOLD_OUT]
    held_out = [t for t in tracks if t.key in HOLD_OUT]
    return library, held_out


def cache_file(track: Track, rate: int) -> Path:
    st = os.stat(track.path)
    tag = hashlib.sha1(f"{track.path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return OUT / "cache" / str(rate) / f"{track.key.replace('/', '__')}-{tag}.npy"


def save_cached(track: Track, rate: int, x: np.ndarray) -> None:
    f = cache_file(track, rate)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, x)
    tmp.replace(f)


def cached_audio(track: Track, rate: int) -> np.ndarray:
    """Decoded mono float32 at `rate`, from bench/out/cache/ once decoded."""
    f = cache_file(track, rate)
    if f.is_file():
        return np.load(f, mmap_mode="r")
    x = audio.decode(track.path, rate)
    save_cached(track, rate, x)
    return x


def fingerprint_all(tracks: list[Track], log=print) -> list[fp.TrackPrints]:
    """Fingerprints of `tracks` from cached audio (no timing: see accuracy.ingest)."""
    prints = []
    for i, t in enumerate(tracks):
        prints.append(fp.fingerprint(np.asarray(cached_audio(t, fp.SAMPLE_RATE))))
        if (i + 1) % 20 == 0 or i + 1 == len(tracks):
            log(f"  fingerprinted {i + 1}/{len(tracks)}")
    return prints


# --------------------------------------------------------------------------- clips


def dbfs(x: np.ndarray) -> float:
    r = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
    return 20.0 * math.log10(max(r, 1e-12))


@dataclass(frozen=True)
class Clip:
    samples: np.ndarray  # mono float32 at fp.SAMPLE_RATE, as the listener sends it
    track: int  # index into the track list it was cut from
    start_s: float  # where in that track the clip starts


def clip_rng(seed: int, *key: int) -> np.random.Generator:
    """An independent, reproducible stream per clip, whatever process makes it."""
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def pick_position(
    durations: np.ndarray, need_s: float, rng: np.random.Generator
) -> tuple[int, float] | None:
    """A uniformly random moment of listening: track chosen by its length."""
    usable = np.maximum(durations - need_s, 0.0)
    if usable.sum() <= 0:
        return None
    t = int(rng.choice(len(durations), p=usable / usable.sum()))
    return t, float(rng.uniform(0.0, usable[t]))


def make_clip(
    sources: list[np.ndarray],
    rate: int,
    condition: turntable.Condition,
    length_s: float,
    seed: int,
    *key: int,
    tries: int = 50,
) -> Clip | None:
    """Play a random stretch of one source under `condition` and capture `length_s`.

    At speed s the clip holds length_s * s seconds of the record, so that much
    (plus MARGIN_S each side) is cut, played, and length_s seconds kept from
    where the clip's own start landed. Stretches whose source is quieter than
    SILENCE_DBFS are redrawn. The capture is brought to the fingerprint rate
    by fp.prepare, as the live listener does. The clip's position depends only
    on (seed, *key), its noise also on the condition: conditions of equal speed
    are compared on the same passages, whatever process makes the clip.
    """
    pos_rng = clip_rng(seed, *key)
    noise_rng = clip_rng(seed, *key, zlib.crc32(condition.name.encode()))
    durations = np.array([len(s) / rate for s in sources])
    span = length_s * condition.speed
    for _ in range(tries):
        pick = pick_position(durations, span + 2 * MARGIN_S, pos_rng)
        if pick is None:
            return None
        t, a = pick
        lo, n = int(a * rate), int(math.ceil((span + 2 * MARGIN_S) * rate))
        src = np.asarray(sources[t][lo : lo + n], dtype=np.float32)
        m = int(MARGIN_S * rate)
        if dbfs(src[m : m + int(span * rate)]) < SILENCE_DBFS:
            continue
        y = turntable.simulate(src, rate, condition, noise_rng)
        k = int(round(MARGIN_S / condition.speed * rate))
        y = y[k : k + int(round(length_s * rate))]
        return Clip(fp.prepare(y, rate), t, a + MARGIN_S)
    return None


# --------------------------------------------------------------------------- output


def pct(k: int, n: int, digits: int = 1) -> str:
    return f"{100.0 * k / n:.{digits}f}" if n else "–"


def quantiles(v, qs=(50, 95)) -> list[float]:
    v = np.asarray(v, dtype=np.float64)
    return [float(np.percentile(v, q)) if len(v) else float("nan") for q in qs]


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats are printed as they come (format before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def check(ok: bool) -> str:
    return "✓" if ok else "✗"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}; load average at start {os.getloadavg()[0]:.2f}"
    )


ENGINE_FILES = ("vinyl_mqtt/fingerprint.py", "vinyl_mqtt/matcher.py", "vinyl_mqtt/audio.py",
                "vinyl_mqtt/turntable.py")


def engine_version() -> str:
    """The commit that last changed the engine (figures belong to it), and
    whether its files differ from that commit now."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(PROJECT), *a], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        last = git("log", "-1", "--format=%h %s", "--", *ENGINE_FILES)
        head = git("log", "-1", "--format=%h")
        status = git("status", "--porcelain", "--", *ENGINE_FILES)
        dirty = [line[3:] for line in status.splitlines()]
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (f"`{last}` (HEAD `{head}`)"
            + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else ""))


ENGINE = engine_version()  # when the engine was imported, not when the run ends


def header(title: str, argv: list[str]) -> str:
    return (
        f"## {title}\n\n{time.strftime('%Y-%m-%d %H:%M')} — {machine()}\n\n"
        f"Engine: {ENGINE}\n\n`python {' '.join(argv)}`\n"
    )


class Log:
    """Progress on stderr (tables go to stdout), with the time since start."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", type=Path, default=default_corpus(),
                   help="directory with tracks.tsv (default: $VINYL_CORPUS or ../corpus)")
    p.add_argument("--seed", type=int, default=1, help="seed of every random choice")
    p.add_argument("--sim-rate", type=int, default=16000,
                   help="rate the turntable is simulated at before the capture is brought "
                        "to the fingerprint rate (default 16000: see README)")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
