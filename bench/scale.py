"""Identify time against a simulated library of tens of thousands of tracks.

The corpus has 81 tracks; a user's library may have 50,000 (target: a 10 s
clip identified in < 100 ms). The real library tracks are fingerprinted and
joined by synthetic distractor tracks of the corpus's mean length and mean
number of entries, whose hashes follow the real corpus's hash frequencies (so
the hashes that music makes often stay as crowded as in a real library, which
is what costs lookup time) and whose positions are uniform over the
distractors' frames. Real 10 s clips of library tracks (good_deck, worn_plus2)
are then identified at each size, one at a time: time, accuracy, and false
positives on clips of held-out tracks.

Distractor entries are made already sorted, one slice of the hash space at
a time: the real entries of that slice, the distractors' copies of corpus
hashes (how many of each: one multinomial draw, as --hash-model says) and
fresh random hashes, sorted together. Memory is then the 8 bytes an entry
until Index.from_sorted keeps its 5. Since distractors are random, never a
recording, their false positives are only chance coincidences: a real
library's near-duplicates are tested by accuracy.py, not here.

Each size runs in a forked child whose address space may grow by at most
--memory-gb, so a size that does not fit fails with MemoryError instead of
waking the OOM killer; the largest size that fits is then searched for, and
the trend of the sizes that ran is extrapolated (clearly labelled) to --tracks.

    python bench/scale.py                          # 50,000 tracks, 50 clips
    python bench/scale.py --tracks 20000 --clips 20 --sizes 1000,5000,20000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import resource
import sys
import time
import traceback

import numpy as np

import common as C
from common import fp, matcher, turntable

CONDITIONS = ("good_deck", "worn_plus2")
CLIP_S = 10
TARGET_MS = 100.0
SYNTHETIC_ID = 1_000_000  # distractor track ids start here
SLICE_BITS = 8  # the hash space is generated in 2^SLICE_BITS slices, one at a time
SLICES = 1 << SLICE_BITS
MIN_CLIPS = 5  # per group, however slow
TIMEOUT_SLACK_S = 900  # on top of --budget-min, for building the index
MIN_GAP = 4096  # position units: generous in any unit, and 32 bits still hold 50k tracks


class Library:
    """The real library's entries, laid out as Index lays out tracks, and the
    statistics the distractors are drawn from."""

    def __init__(self, prints: list[fp.TrackPrints]):
        gap = self.gap()
        lengths = np.array([int(p.times.max()) + 1 if len(p.times) else 0 for p in prints])
        self.starts = np.concatenate([[0], np.cumsum(lengths[:-1] + gap)]).astype(np.int64)
        self.end = int(self.starts[-1] + lengths[-1] + gap)
        self.durations = np.array([p.duration_s for p in prints])
        hashes = np.concatenate([p.hashes for p in prints])
        pos = np.concatenate([p.times.astype(np.int64) + s for p, s in zip(prints, self.starts)])
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.pos = hashes[order], pos[order].astype(np.uint32)
        self.uniq, self.counts = np.unique(self.hashes, return_counts=True)
        self.mean_entries = len(hashes) / len(prints)
        # Positions are in the unit of TrackPrints.times, whatever the engine makes it.
        self.mean_len = int(round(lengths.mean()))

    @staticmethod
    def gap() -> int:
        """Space between tracks: at least the engine's own, so no vote spans two."""
        own = [getattr(matcher.Index, a, 0) for a in ("GAP", "GAP_FRAMES")]
        return int(max(*own, MIN_GAP))

    def distractor_counts(self, n_syn_entries: int, model: str, rng: np.random.Generator):
        """(distractor entries on each of the corpus's distinct hashes, entries on fresh hashes).

        "corpus": every distractor hash is one of the corpus's, drawn by its
        corpus frequency. That makes a hash seen once in 71 tracks appear
        ~700 times in 50,000: pessimistic, as most of a real library's
        hashes belong to one recording. "good-turing": seen hashes are drawn
        by their Good-Turing adjusted counts (a hash seen once is really
        rarer), and the unseen mass (hashes seen once / entries, ~64 % here)
        goes to fresh uniformly random hashes.
        """
        r = self.counts
        if model == "corpus":
            return rng.multinomial(n_syn_entries, r / r.sum()), 0
        nr = np.bincount(r, minlength=r.max() + 2).astype(np.float64)
        # Adjust only small counts, where n_r is large enough to be smooth.
        small = r < 5
        w = r.astype(np.float64)
        w[small] = (r[small] + 1) * nr[r[small] + 1] / nr[r[small]]
        n_fresh = int(rng.binomial(n_syn_entries, nr[1] / len(self.hashes)))
        return rng.multinomial(n_syn_entries - n_fresh, w / w.sum()), n_fresh

    def index(self, tracks: int, model: str, rng: np.random.Generator, log) -> matcher.Index:
        """The real tracks plus `tracks - len(real)` distractors, via Index.from_sorted.

        Entries are made sorted, one slice of the hash space at a time (real
        entries, distractor copies of corpus hashes, fresh random hashes), so
        nothing but the entries themselves grows with the library.
        """
        n_real = len(self.durations)
        n_syn = max(tracks - n_real, 0)
        gap, frames = self.gap(), self.mean_len
        syn, n_fresh = self.distractor_counts(int(round(n_syn * self.mean_entries)), model, rng)
        n = len(self.hashes) + int(syn.sum()) + n_fresh
        hashes, pos = np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.uint32)
        edges = np.arange(SLICES + 1, dtype=np.uint64) << np.uint64(32 - SLICE_BITS)
        fresh = rng.multinomial(n_fresh, np.full(SLICES, 1.0 / SLICES))
        u_cut = np.searchsorted(self.uniq, edges[1:-1].astype(np.uint32))
        u_cut = np.concatenate([[0], u_cut, [len(self.uniq)]])
        r_cut = np.searchsorted(self.hashes, edges[1:-1].astype(np.uint32))
        r_cut = np.concatenate([[0], r_cut, [len(self.hashes)]])
        out = 0
        for k in range(SLICES):
            a, b = u_cut[k], u_cut[k + 1]
            copies = np.repeat(self.uniq[a:b], syn[a:b])
            new = rng.integers(edges[k], edges[k + 1], size=fresh[k], dtype=np.uint64)
            h = np.concatenate([self.hashes[r_cut[k] : r_cut[k + 1]], copies, new.astype(np.uint32)])
            u = rng.integers(0, max(n_syn * frames, 1), size=len(copies) + len(new))
            p = np.concatenate([self.pos[r_cut[k] : r_cut[k + 1]],
                                self.end + (u // frames) * (frames + gap) + u % frames])
            order = np.argsort(h, kind="stable")  # the real entry first among equals
            hashes[out : out + len(h)], pos[out : out + len(h)] = h[order], p[order]
            out += len(h)
        log(f"  {n:,} entries generated ({n * 8 / 1e9:.2f} GB before the index keeps its share)")
        starts = np.concatenate([self.starts, self.end + np.arange(n_syn) * (frames + gap)])
        ids = np.concatenate([np.arange(n_real), SYNTHETIC_ID + np.arange(n_syn)])
        durations = np.concatenate([self.durations, np.full(n_syn, self.durations.mean())])
        return matcher.Index.from_sorted(ids, durations, starts, hashes, pos)


def make_clips(library_audio, held_audio, n: int, rate: int, seed: int) -> dict:
    """The same clips at every size: {(condition, kind): [Clip]}; keyed as
    accuracy.py keys its clips, so they are its first `n` 10 s clips."""
    out = {}
    for name in CONDITIONS:
        cond = turntable.CONDITIONS[name]
        for kind, sources in ((0, library_audio), (1, held_audio)):
            clips = [C.make_clip(sources, rate, cond, CLIP_S, seed, kind, CLIP_S, i)
                     for i in range(n)]
            out[(name, kind)] = [c for c in clips if c is not None]
    return out


def run_size(lib: Library, tracks: int, clips: dict, model: str, seed: int, budget_s: float,
             log) -> dict:
    """Build the index for one size and time its clips against it (this process).

    Each of the four clip groups (condition × library/held-out) gets a quarter
    of `budget_s`; a slow size is measured on fewer clips rather than not at all.
    """
    t0 = time.perf_counter()
    index = lib.index(tracks, model, np.random.default_rng([seed, tracks]), log)
    build_s = time.perf_counter() - t0
    log(f"  index built in {build_s:.0f} s: {index.nbytes / 1e9:.2f} GB in memory")
    index.match(clips[(CONDITIONS[0], 0)][0].samples)  # fault the pages in
    res = {"tracks": tracks, "entries": index.entries, "index_bytes": index.nbytes,
           "build_s": build_s, "conditions": {}}

    def identify(group):
        t_end, out = time.perf_counter() + budget_s / 4, []
        for k, c in enumerate(group):
            if k >= MIN_CLIPS and time.perf_counter() > t_end:
                break
            out.append((c, index.match(c.samples)))
        return out

    for name in CONDITIONS:
        lib_m, held_m = identify(clips[(name, 0)]), identify(clips[(name, 1)])
        r = res["conditions"][name] = {
            "ms": [m.elapsed_ms for _, m in lib_m],
            "right": sum(m.track_id == c.track for c, m in lib_m), "n": len(lib_m),
            "held_ms": [m.elapsed_ms for _, m in held_m],
            "false_pos": sum(m.track_id is not None for _, m in held_m), "n_held": len(held_m),
        }
        log(f"  {name}: median {np.median(r['ms']):.1f} ms, {r['right']}/{r['n']} right, "
            f"{r['false_pos']}/{r['n_held']} false positives")
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return res


def _child(conn, lib, tracks, clips, args, limit_bytes, log):
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
        conn.send(run_size(lib, tracks, clips, args.hash_model, args.seed,
                           args.budget_min * 60, log))
    except MemoryError as e:
        conn.send({"tracks": tracks, "error": f"MemoryError: {e}"})
    except BaseException as e:  # noqa: BLE001 - reported, the parent goes on
        conn.send({"tracks": tracks, "error": "".join(traceback.format_exception_only(e)).strip()})
    finally:
        conn.close()


def vm_size() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def attempt(lib, tracks, clips, args, log) -> dict:
    """One size in a fresh child that may allocate at most --memory-gb more."""
    limit = vm_size() + int(args.memory_gb * 1e9)
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(send, lib, tracks, clips, args, limit, log))
    p.start()
    send.close()
    res = None
    if recv.poll(args.budget_min * 60 + TIMEOUT_SLACK_S):
        try:
            res = recv.recv()
        except EOFError:
            pass
    p.join(5)
    if p.is_alive():
        p.kill()  # only this child, which we started
        p.join()
    if res is None:
        res = {"tracks": tracks, "error": f"no result (exit {p.exitcode}, or stopped after "
                                          f"{args.budget_min:g} min + {TIMEOUT_SLACK_S} s)"}
    if "error" in res:
        log(f"  {tracks:,} tracks: {res['error'].splitlines()[-1]}")
    return res


def fit_trend(ok: list[dict], key, target: float) -> tuple[float, float]:
    """`key` at `target` entries: (linear fit over all sizes that ran, power law
    fitted to the sizes with at least 1000 tracks, where the growth is steady)."""
    x = np.array([r["entries"] for r in ok], dtype=np.float64)
    y = np.array([key(r) for r in ok], dtype=np.float64)
    if len(ok) < 2:
        return float("nan"), float("nan")
    b, a = np.polyfit(x, y, 1)
    big = np.array([r["tracks"] >= 1000 for r in ok])
    if big.sum() < 2:
        big[:] = True
    k, c = np.polyfit(np.log(x[big]), np.log(y[big]), 1)
    return float(a + b * target), float(np.exp(c) * target**k)


def short_error(e: str) -> str:
    m = re.search(r"Unable to allocate ([\d.]+ \w+)", e)
    return f"over --memory-gb (next array {m.group(1)})" if m else e.splitlines()[-1][:80]


def report(args, lib: Library, results: list[dict], wall_s: float) -> str:
    ok = [r for r in results if "error" not in r]
    out = [C.header("Scale benchmark", sys.argv), ""]
    out.append(
        f"{len(lib.durations)} real library tracks ({lib.mean_entries:.0f} entries a track, "
        f"mean {lib.durations.mean():.0f} s) plus synthetic distractors up to the "
        f"size shown, hashes drawn by the `{args.hash_model}` model; {args.clips} clips of {CLIP_S} s per condition from library tracks and as "
        f"many from held-out tracks, identified one at a time; index build may allocate up to "
        f"{args.memory_gb:g} GB; wall time {wall_s / 60:.1f} min; load average at the end "
        f"{os.getloadavg()[0]:.2f} (other work on the machine slows the timings).\n")
    rows = []
    for r in results:
        if "error" in r:
            rows.append([f"{r['tracks']:,}", "–", "–", "–", "–", "did not run: "
                         + short_error(r["error"])] + ["–"] * (3 * len(CONDITIONS)))
            continue
        row = [f"{r['tracks']:,}", f"{r['entries'] / 1e6:.1f} M", f"{r['index_bytes'] / 1e9:.2f}",
               f"{r['peak_rss_gb']:.1f}", f"{r['build_s']:.0f}"]
        fps = sum(c["false_pos"] for c in r["conditions"].values())
        nh = sum(c["n_held"] for c in r["conditions"].values())
        row.append(f"{fps} / {nh}")
        for name in CONDITIONS:
            c = r["conditions"][name]
            med, p95 = C.quantiles(c["ms"])
            row += [f"{med:.1f}", f"{p95:.1f}", C.pct(c["right"], c["n"])]
        rows.append(row)
    head = ["tracks", "entries", "index GB", "peak RSS GB", "make + build s",
            "false pos. (held-out)"]
    for name in CONDITIONS:
        head += [f"{name} median ms", f"{name} p95 ms", f"{name} % right"]
    out.append(f"### {CLIP_S} s clips against growing libraries\n\n" + C.table(head, rows) + "\n")
    held = [[f"{r['tracks']:,}"] + [f"{C.quantiles(r['conditions'][n]['held_ms'])[0]:.1f}"
                                     for n in CONDITIONS] for r in ok]
    out.append("Median ms for held-out clips (\"don't know\", which also tries 33/45):\n\n"
               + C.table(["tracks", *CONDITIONS], held) + "\n")

    biggest = max((r["tracks"] for r in ok), default=0)
    if ok and biggest < args.tracks:
        n_target = args.tracks * lib.mean_entries
        rows = []
        for name in CONDITIONS:
            for label, q in (("median", 50), ("p95", 95)):
                lin, pw = fit_trend(ok, lambda r: np.percentile(r["conditions"][name]["ms"], q),
                                    n_target)
                rows.append([f"{name} {label} ms", f"{lin:,.0f}", f"{pw:,.0f}",
                             C.check(max(lin, pw) < TARGET_MS)
                             if label == "median" and np.isfinite(pw) else ""])
        top = [r for r in ok if r["tracks"] == biggest][0]
        out.append(
            f"### Extrapolation to {args.tracks:,} tracks — NOT MEASURED\n\n"
            f"From the {len(ok)} sizes that ran (largest {biggest:,} tracks) to "
            f"{n_target / 1e6:.0f} M entries; target < {TARGET_MS:g} ms median.\n\n"
            + C.table(["figure", "linear in entries", "power law (sizes ≥ 1,000)", ""], rows)
            + f"\n\nMemory: at {biggest:,} tracks the whole index took "
            f"{top['index_bytes'] / top['entries']:.1f} bytes an entry "
            f"({top['index_bytes'] / 1e9:.2f} GB) and its build peaked at "
            f"{top['peak_rss_gb']:.1f} GB resident.\n")
    elif ok:
        r = [r for r in ok if r["tracks"] == biggest][0]
        med = C.quantiles(r["conditions"][CONDITIONS[0]]["ms"])[0]
        out.append(f"Target < {TARGET_MS:g} ms for a {CLIP_S} s clip at {biggest:,} tracks "
                   f"({CONDITIONS[0]} median): {med:.1f} ms {C.check(med < TARGET_MS)}\n")
    return "\n".join(out)


def sizes(args, n_real: int) -> list[int]:
    if args.sizes:
        s = [int(v) for v in args.sizes.split(",")]
    else:
        s = [n_real] + [v for v in (1000, 2000, 5000, 10000, 25000, 50000) if v < args.tracks]
        s.append(args.tracks)
    return sorted(set(s))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.corpus_args(p)
    p.add_argument("--tracks", type=int, default=50000, help="library size to reach")
    p.add_argument("--clips", type=int, default=50, help="clips per condition and kind")
    p.add_argument("--sizes", help="comma-separated sizes to run instead of the ladder")
    p.add_argument("--memory-gb", type=float, default=20.0,
                   help="most one size may allocate (the machine has 24 GB)")
    p.add_argument("--bisect", type=int, default=3,
                   help="steps searching for the largest size that fits when one does not")
    p.add_argument("--hash-model", choices=("corpus", "good-turing"), default="corpus",
                   help="how distractor hashes are drawn (see Library.distinct_counts)")
    p.add_argument("--budget-min", type=float, default=8.0,
                   help="identify time budget per size; slower sizes time fewer clips")
    args = p.parse_args()
    log = C.Log()
    t_start = time.perf_counter()

    library, held = C.load_corpus(args.corpus)
    log(f"fingerprinting {len(library)} library tracks ...")
    lib = Library(C.fingerprint_all(library, log))
    log(f"real library: {len(lib.hashes):,} entries, {len(lib.uniq):,} distinct hashes")
    log(f"making {args.clips} clips per condition at {args.sim_rate} Hz ...")
    clips = make_clips([C.cached_audio(t, args.sim_rate) for t in library],
                       [C.cached_audio(t, args.sim_rate) for t in held],
                       args.clips, args.sim_rate, args.seed)

    results, good, bad = [], None, None
    for n in sizes(args, len(library)):
        log(f"{n:,} tracks ...")
        r = attempt(lib, n, clips, args, log)
        results.append(r)
        if "error" in r:
            bad = n
            break
        good = n
    # The ladder hit the memory ceiling: look for the largest size that fits.
    for _ in range(args.bisect if bad and good else 0):
        n = int(round((good + bad) / 2 / 250) * 250)
        if n in (good, bad):
            break
        log(f"{n:,} tracks (searching for the largest that fits) ...")
        r = attempt(lib, n, clips, args, log)
        results.append(r)
        good, bad = (n, bad) if "error" not in r else (good, n)
    results.sort(key=lambda r: r["tracks"])

    text = report(args, lib, results, time.perf_counter() - t_start)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": C.machine(), "argv": sys.argv,
                                         "results": results}, indent=1, default=float))
        log(f"raw numbers in {args.json}")


if __name__ == "__main__":
    main()
