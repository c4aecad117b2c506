"""How well, how safely and how cheaply the recogniser identifies a turntable.

Against the user's own library (here: the free-music corpus, minus a fixed
set of held-out tracks) it measures, for every simulated playback condition
and clip length:

* accuracy: library clips given the right track;
* false positives: clips of held-out tracks given *any* track (the user sees
  a wrong title: worse than "don't know");
* wrong track: library clips given another library track;
* the measured playback speed's error, and whether 33/45 mix-ups are told;

and, once: ingest speed (decode + fingerprint, CPU time in one process), the
index's size per hour of audio, and identify time per clip length measured in
a separate single-process pass with no other work running in this program.

    python bench/accuracy.py                 # full run, ~15 min on 2 cores
    python bench/accuracy.py --quick         # smoke run, ~2 min
    python bench/accuracy.py --conditions good_deck,worn_plus2 --clips 300
    python bench/accuracy.py --find-versions # list tracks sharing material

Tables go to stdout (Markdown), progress to stderr. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

import common as C
from common import audio, fp, matcher, turntable

LENGTHS = (1, 2, 3, 5, 10)
SPEED_LENGTHS = (5, 10)  # the speed estimate is reported where it is used
DEFAULT_CLIPS = 200
QUICK_CLIPS = 10
OFFSET_TOLERANCE_S = 1.0  # a right track at the wrong place is reported, not counted wrong
SAME_AUDIO = 0.9  # spectral correlation above which two passages are the same music
RPM_CONDITIONS = {"33_at_45": "33 at 45", "45_at_33": "45 at 33"}

# Targets (see README): ingest × real time per core, MB/h, ms, % right at (condition, s).
INGEST_X = 500.0
INDEX_MB_H = 10.0
IDENTIFY_10S_MS = 20.0
ACC_TARGETS = {
    ("good_deck", 5): 99.0,
    ("good_deck", 2): 90.0,
    ("worn_plus2", 5): 95.0,
    ("worn_plus2", 10): 99.0,
    ("worn_minus2", 5): 95.0,
    ("worn_minus2", 10): 99.0,
}


# --------------------------------------------------------------------------- ingest


@dataclass
class Ingest:
    tracks: int = 0
    audio_s: float = 0.0
    decode_cpu_s: float = 0.0
    fingerprint_cpu_s: float = 0.0
    print_bytes: int = 0  # sum of TrackPrints.to_bytes(): what the library stores
    entries: int = 0
    index_bytes: int = 0  # Index.nbytes: what the running recogniser holds

    @property
    def x_realtime(self) -> float:
        return self.audio_s / max(self.decode_cpu_s + self.fingerprint_cpu_s, 1e-9)

    @property
    def hours(self) -> float:
        return self.audio_s / 3600.0

    @property
    def mb_per_hour(self) -> float:
        return self.print_bytes / 1e6 / self.hours


def ingest(library: list[C.Track], log) -> tuple[list[fp.TrackPrints], Ingest]:
    """Decode and fingerprint every library file, timing CPU in this one process.

    process_time() counts every thread of the process, so the figure is per
    core whatever the decoder does internally; the decoded audio is cached for
    scale.py afterwards, outside the timed part.
    """
    st, prints = Ingest(tracks=len(library)), []
    for i, t in enumerate(library):
        c0 = time.process_time()
        x = audio.decode(t.path, fp.SAMPLE_RATE)
        c1 = time.process_time()
        p = fp.fingerprint(x)
        c2 = time.process_time()
        st.decode_cpu_s += c1 - c0
        st.fingerprint_cpu_s += c2 - c1
        st.audio_s += len(x) / fp.SAMPLE_RATE
        st.print_bytes += len(p.to_bytes())
        st.entries += len(p.hashes)
        prints.append(p)
        C.save_cached(t, fp.SAMPLE_RATE, x)
        if (i + 1) % 20 == 0 or i + 1 == len(library):
            log(f"ingest {i + 1}/{len(library)}: {st.x_realtime:.0f}x real time so far")
    return prints, st


# --------------------------------------------------------------------------- clips

# Per-clip record. kind 0: library clip, 1: held-out clip. pred -1: "don't know".
FIELDS = ("kind", "track", "start_s", "pred", "speed", "score", "runner_up", "rpm",
          "elapsed_ms", "offset_s")
RPM_CODE = {None: 0, "33 at 45": 1, "45 at 33": 2}

_S: dict = {}  # read-only state the forked workers inherit


def _clip(kind: int, cond: turntable.Condition, length: int, i: int) -> C.Clip | None:
    """Clip i of a kind and length; its position does not depend on the condition's
    noise, so conditions of equal speed are compared on the same passages."""
    sources = _S["library_audio"] if kind == 0 else _S["held_audio"]
    return C.make_clip(sources, _S["rate"], cond, length, _S["seed"], kind, length, i)


def evaluate_cell(task: tuple[str, int]) -> tuple[str, int, np.ndarray]:
    """All clips of one (condition, length), library and held-out."""
    name, length = task
    cond = turntable.CONDITIONS[name]
    rows = []
    for kind in (0, 1):
        for i in range(_S["clips"]):
            clip = _clip(kind, cond, length, i)
            if clip is None:
                continue
            m = _S["index"].match(clip.samples)
            rows.append((kind, clip.track, clip.start_s, -1 if m.track_id is None else m.track_id,
                         m.speed, m.score, m.runner_up, RPM_CODE[m.rpm_mistake], m.elapsed_ms,
                         m.offset_s))
    return name, length, np.array(rows, dtype=np.float64).reshape(-1, len(FIELDS))


def time_identify(n: int, log) -> dict[int, dict[str, list[float]]]:
    """Identify time per length, one clip at a time in this process, no pool alive.

    good_deck clips; library clips (a match) and held-out clips ("don't know",
    which also tries the 33/45 hypotheses) are timed apart because they cost
    differently.
    """
    cond = turntable.CONDITIONS["good_deck"]
    index = _S["index"]
    out: dict[int, dict[str, list[float]]] = {}
    warm = _clip(0, cond, 5, 0)
    if warm is not None:
        index.match(warm.samples)
    for length in LENGTHS:
        out[length] = {"library": [], "held_out": []}
        for kind, label in ((0, "library"), (1, "held_out")):
            for i in range(n):
                clip = _clip(kind, cond, length, 100_000 + i)
                if clip is not None:
                    out[length][label].append(index.match(clip.samples).elapsed_ms)
        log(f"timing {length} s: median {np.median(out[length]['library']):.1f} ms")
    return out


# --------------------------------------------------------------------------- figures


@dataclass
class Cell:
    n_lib: int = 0
    correct: int = 0
    wrong: int = 0
    sibling: int = 0
    n_held: int = 0
    false_pos: int = 0
    rpm_told: int = 0  # right track and the right 33/45 mix-up reported
    rpm_false: int = 0  # a mix-up reported where there was none
    repeat: int = 0  # right track, placed where the track repeats the same passage
    misplaced: int = 0  # right track, placed where the music differs
    right_scores: list[int] = field(default_factory=list)
    held_scores: list[int] = field(default_factory=list)  # best candidate, accepted or not
    speed_err_pct: list[float] = field(default_factory=list)


def same_audio(x: np.ndarray, a_s: float, b_s: float, length: float) -> bool:
    """Whether the clean track has the same music at a_s and b_s (game music
    loops whole sections, so a clip can truly be in several places)."""
    n = int(length * fp.SAMPLE_RATE)
    a, b = int(a_s * fp.SAMPLE_RATE), int(b_s * fp.SAMPLE_RATE)
    if min(a, b) < 0 or max(a, b) + n > len(x):
        return False
    sa, sb = fp.spectrogram(np.asarray(x[a : a + n])), fp.spectrogram(np.asarray(x[b : b + n]))
    sa, sb = sa - sa.mean(), sb - sb.mean()
    return float((sa * sb).sum() / np.sqrt((sa * sa).sum() * (sb * sb).sum())) >= SAME_AUDIO


def summarise(name: str, length: int, r: np.ndarray, sib: set[tuple[int, int]], false_list: list,
              library: list[C.Track], held: list[C.Track]) -> Cell:
    cond = turntable.CONDITIONS[name]
    c = Cell()
    want_rpm = RPM_CODE[RPM_CONDITIONS.get(name)]
    for row in r:
        kind, track, start, pred, speed, score, runner_up, rpm, _, offset = row
        kind, track, pred, rpm = int(kind), int(track), int(pred), int(rpm)
        if kind == 0:
            c.n_lib += 1
            c.rpm_false += rpm != 0 and want_rpm == 0
            if pred == track:
                c.correct += 1
                c.rpm_told += rpm == want_rpm != 0
                c.speed_err_pct.append(100.0 * abs(speed / cond.speed - 1.0))
                c.right_scores.append(int(score))
                if abs(offset - start) > OFFSET_TOLERANCE_S:
                    x = C.cached_audio(library[track], fp.SAMPLE_RATE)
                    if same_audio(x, start, offset, length):
                        c.repeat += 1
                    else:
                        c.misplaced += 1
            elif (track, pred) in sib:
                c.sibling += 1
            elif pred >= 0:
                c.wrong += 1
        else:
            c.n_held += 1
            c.false_pos += pred >= 0
            c.held_scores.append(int(score))
        if pred < 0 or kind == 0 and (pred == track or (track, pred) in sib):
            continue
        false_list.append({
            "condition": name, "length_s": length,
            "kind": "library" if kind == 0 else "held-out",
            "clip_from": (library if kind == 0 else held)[track].key, "at_s": round(start, 1),
            "named": library[pred].key, "score": int(score), "runner_up": int(runner_up),
            "speed": round(speed, 4),
        })
    return c


def report(args, ing: Ingest, cells: dict[tuple[str, int], Cell], timing, false_list,
           wall_s: float) -> tuple[str, dict]:
    names = list(args.conditions)
    L = LENGTHS
    out = [C.header("Accuracy benchmark", sys.argv), ""]
    n_lib = sum(c.n_lib for c in cells.values())
    n_held = sum(c.n_held for c in cells.values())
    out.append(
        f"{len(names)} conditions × {len(L)} lengths × {args.clips} clips from library tracks "
        f"and {args.clips} from held-out tracks ({n_lib} + {n_held} clips, silence skipped); "
        f"library {ing.tracks} tracks, {ing.hours * 60:.0f} min; held out "
        f"{len(C.HOLD_OUT)} tracks; simulated at {args.sim_rate} Hz; seed {args.seed}; "
        f"{args.workers} worker(s); wall time {wall_s / 60:.1f} min; load average at the end "
        f"{os.getloadavg()[0]:.2f} (other work on the machine slows the timings).\n"
    )

    def grid(title, fn):
        rows = [[n] + [fn(cells[(n, l)]) for l in L] for n in names]
        return f"### {title}\n\n" + C.table(["condition"] + [f"{l} s" for l in L], rows) + "\n"

    out.append(grid("Accuracy: % of library clips given the right track",
                    lambda c: C.pct(c.correct, c.n_lib)))
    fp_total = sum(c.false_pos for c in cells.values())
    out.append(grid(f"False positives: % of not-in-library clips given a track "
                    f"(overall {fp_total} / {n_held})", lambda c: C.pct(c.false_pos, c.n_held)))
    wr_total = sum(c.wrong for c in cells.values())
    sib_total = sum(c.sibling for c in cells.values())
    out.append(grid(f"Wrong track: % of library clips given another library track "
                    f"(overall {wr_total} / {n_lib}; plus {sib_total} given a track sharing "
                    f"the same material, not counted)", lambda c: C.pct(c.wrong, c.n_lib)))

    rows = []
    for n in names:
        row = [n, f"{(turntable.CONDITIONS[n].speed - 1) * 100:+.1f}"]
        for l in SPEED_LENGTHS:
            c = cells.get((n, l))
            med, p95 = C.quantiles(c.speed_err_pct) if c else (float("nan"),) * 2
            row += [f"{med:.2f}", f"{p95:.2f}"]
        rows.append(row)
    out.append("### Speed estimate: |measured / true − 1| in %, right-track clips\n\n" + C.table(
        ["condition", "true speed %"] + [f"{l} s {q}" for l in SPEED_LENGTHS for q in
                                         ("median", "p95")], rows) + "\n")

    rpm_rows = [[n] + [C.pct(cells[(n, l)].rpm_told, cells[(n, l)].n_lib) for l in L]
                for n in names if n in RPM_CONDITIONS]
    rpm_false = sum(c.rpm_false for (n, _), c in cells.items() if n not in RPM_CONDITIONS)
    rpm_n = sum(c.n_lib for (n, _), c in cells.items() if n not in RPM_CONDITIONS)
    if rpm_rows:
        out.append("### 33/45 mix-up told: % of library clips with the right track and the "
                   "right `rpm_mistake`\n\n" + C.table(["condition"] + [f"{l} s" for l in L],
                                                       rpm_rows) + "\n")
    out.append(f"Mix-up reported where there was none: {rpm_false} / {rpm_n} library clips.\n")
    rep = sum(c.repeat for c in cells.values())
    mis = sum(c.misplaced for c in cells.values())
    out.append(f"Right track but `offset_s` more than {OFFSET_TOLERANCE_S:g} s from where the "
               f"clip was cut: {rep + mis} / {sum(c.correct for c in cells.values())}; of these "
               f"{rep} where the track repeats the same passage (spectral correlation ≥ "
               f"{SAME_AUDIO:g}), {mis} elsewhere.\n")

    rows = []
    for l in L:
        right = np.concatenate([cells[(n, l)].right_scores for n in names] + [[]])
        held_s = np.concatenate([cells[(n, l)].held_scores for n in names] + [[]])
        q = C.quantiles(right, (1, 5, 50)) if len(right) else [float("nan")] * 3
        rows.append([f"{l} s", *(f"{v:.0f}" for v in q),
                     f"{C.quantiles(held_s, (99,))[0]:.0f}" if len(held_s) else "–",
                     f"{held_s.max():.0f}" if len(held_s) else "–",
                     sum(cells[(n, l)].false_pos for n in names)])
    out.append("### Decision margin: `score` (consistent pairs), all conditions\n\n" + C.table(
        ["clip", "right p1", "right p5", "right median", "held-out best p99", "held-out best max",
         "false positives"], rows) + "\n")

    rows = []
    for l in L:
        lib_q = C.quantiles(timing[l]["library"])
        held_q = C.quantiles(timing[l]["held_out"])
        rows.append([f"{l} s", f"{lib_q[0]:.1f}", f"{lib_q[1]:.1f}", f"{held_q[0]:.1f}",
                     f"{held_q[1]:.1f}"])
    out.append(
        f"### Identify time per clip (ms, `Match.elapsed_ms`, good_deck, "
        f"{args.timing_clips} clips each, one at a time in the main process after the "
        f"worker pool has exited)\n\n" + C.table(
            ["clip", "library median", "library p95", "not-in-library median",
             "not-in-library p95"], rows) + "\n")

    dec_x = ing.audio_s / ing.decode_cpu_s
    fp_x = ing.audio_s / ing.fingerprint_cpu_s
    out.append("### Ingest and index\n\n" + C.table(["figure", "value"], [
        ["ingest, decode + fingerprint", f"{ing.x_realtime:.0f}× real time per core"],
        ["  decode only", f"{dec_x:.0f}× ({ing.decode_cpu_s:.1f} CPU s)"],
        ["  fingerprint only", f"{fp_x:.0f}× ({ing.fingerprint_cpu_s:.1f} CPU s)"],
        ["library audio", f"{ing.hours * 60:.1f} min, {ing.tracks} tracks"],
        ["stored prints (to_bytes)", f"{ing.print_bytes / 1e6:.1f} MB = "
                                     f"{ing.mb_per_hour:.2f} MB/h "
                                     f"({ing.entries / ing.audio_s:.0f} entries/s)"],
        ["index in memory (nbytes)", f"{ing.index_bytes / 1e6:.1f} MB = "
                                     f"{ing.index_bytes / 1e6 / ing.hours:.2f} MB/h"],
    ]) + "\n")

    # Targets
    t_rows = [
        ["ingest ≥ 500× real time per core, decode included", f"{ing.x_realtime:.0f}×",
         C.check(ing.x_realtime >= INGEST_X)],
        ["index ≤ 10 MB/h", f"{ing.mb_per_hour:.2f} MB/h", C.check(ing.mb_per_hour <= INDEX_MB_H)],
    ]
    med10 = C.quantiles(timing[10]["library"])[0]
    t_rows.append(["10 s identify ≤ 20 ms median", f"{med10:.1f} ms",
                   C.check(med10 <= IDENTIFY_10S_MS)])
    for (n, l), goal in ACC_TARGETS.items():
        c = cells.get((n, l))
        if c is None:
            t_rows.append([f"≥ {goal:g} % at {l} s on {n}", "not run", "–"])
        else:
            acc = 100.0 * c.correct / max(c.n_lib, 1)
            t_rows.append([f"≥ {goal:g} % at {l} s on {n}", f"{acc:.1f} %",
                           C.check(acc >= goal)])
    bad = sorted({n for (n, _), c in cells.items() if c.false_pos})
    t_rows.append(["zero false positives at every condition", f"{fp_total} / {n_held}"
                   + (f" ({', '.join(bad)})" if bad else ""), C.check(fp_total == 0)])
    bad = sorted({n for (n, _), c in cells.items() if c.wrong})
    t_rows.append(["zero wrong tracks at every condition", f"{wr_total} / {n_lib}"
                   + (f" ({', '.join(bad)})" if bad else ""), C.check(wr_total == 0)])
    out.append("### Targets\n\n" + C.table(["target", "measured", ""], t_rows) + "\n")

    if false_list:
        cols = ("condition", "length_s", "kind", "clip_from", "at_s", "named", "score",
                "runner_up", "speed")
        rows = [[f[k] for k in cols] for f in false_list]
        out.append(f"### Every false match ({len(false_list)})\n\n" + C.table(
            ["condition", "length s", "clip", "from", "at s", "named", "score", "runner-up",
             "speed"], rows) + "\n")

    raw = {
        "args": {k: str(v) if not isinstance(v, (int, float, list)) else v
                 for k, v in vars(args).items()},
        "machine": C.machine(),
        "wall_s": wall_s,
        "ingest": {**asdict(ing), "x_realtime": ing.x_realtime, "mb_per_hour": ing.mb_per_hour},
        "cells": {f"{n}@{l}": {**asdict(c), "speed_err_pct": c.speed_err_pct}
                  for (n, l), c in cells.items()},
        "timing_ms": {str(l): v for l, v in timing.items()},
        "false_matches": false_list,
        "targets": [[a, b, c] for a, b, c in t_rows],
    }
    return "\n".join(out), raw


# --------------------------------------------------------------------------- versions


def find_versions(tracks: list[C.Track], log) -> None:
    """Which tracks share material: each track's clean 10 s clips (every 15 s)
    against an index of all the *other* tracks. A hold-out must name nothing,
    except by chance (one hit at a low score and an odd speed)."""
    prints = C.fingerprint_all(tracks, log)
    rows = []
    for i, t in enumerate(tracks):
        others = [j for j in range(len(tracks)) if j != i]
        index = matcher.Index(others, [prints[j] for j in others])
        x = np.asarray(C.cached_audio(t, fp.SAMPLE_RATE))
        n = 10 * fp.SAMPLE_RATE
        for a in range(0, max(len(x) - n, 1), 15 * fp.SAMPLE_RATE):
            m = index.match(x[a : a + n])
            if m.track_id is not None:
                rows.append([t.key, a // fp.SAMPLE_RATE, tracks[m.track_id].key,
                             f"{m.offset_s:.1f}", m.score, f"{m.speed:.3f}"])
        log(f"versions {i + 1}/{len(tracks)}")
    print(C.table(["clip from", "at s", "named", "at s in it", "score", "speed"], rows))


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.corpus_args(p)
    p.add_argument("--clips", type=int, help=f"clips per condition × length, each of library "
                   f"and held-out tracks (default {DEFAULT_CLIPS}, --quick {QUICK_CLIPS})")
    p.add_argument("--quick", action="store_true", help="a smoke run in a couple of minutes")
    p.add_argument("--conditions", help="comma-separated subset of "
                   + ", ".join(turntable.CONDITIONS))
    p.add_argument("--timing-clips", type=int, help="clips per length and kind in the "
                   "single-process timing pass (default 50, --quick 10)")
    p.add_argument("--workers", type=int, default=2, help="processes for the clip evaluation")
    p.add_argument("--find-versions", action="store_true",
                   help="only list which corpus tracks share material with another")
    a = p.parse_args()
    a.clips = a.clips or (QUICK_CLIPS if a.quick else DEFAULT_CLIPS)
    a.timing_clips = a.timing_clips or (10 if a.quick else 50)
    a.conditions = a.conditions.split(",") if a.conditions else list(turntable.CONDITIONS)
    unknown = [c for c in a.conditions if c not in turntable.CONDITIONS]
    if unknown:
        p.error(f"unknown condition(s) {', '.join(unknown)}")
    return a


def main() -> None:
    args = parse_args()
    log = C.Log()
    t_start = time.perf_counter()
    library, held = C.load_corpus(args.corpus)
    if args.find_versions:
        find_versions(library + held, log)
        return

    log(f"ingest of {len(library)} library tracks from the files (timed) ...")
    prints, ing = ingest(library, log)
    index = matcher.Index(list(range(len(library))), prints)
    ing.index_bytes = index.nbytes
    log(f"index: {index.entries} entries, {index.nbytes / 1e6:.1f} MB in memory")

    log(f"audio at {args.sim_rate} Hz for clips (cached in {C.OUT / 'cache'}) ...")
    _S.update(
        index=index, rate=args.sim_rate, seed=args.seed, clips=args.clips,
        library_audio=[C.cached_audio(t, args.sim_rate) for t in library],
        held_audio=[C.cached_audio(t, args.sim_rate) for t in held],
    )

    tasks = [(n, l) for n in args.conditions for l in LENGTHS]
    results: dict[tuple[str, int], np.ndarray] = {}
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(args.workers) as pool:
        # Longest first, so the two workers finish together.
        order = sorted(tasks, key=lambda t: -t[1])
        for k, (name, length, r) in enumerate(pool.imap_unordered(evaluate_cell, order)):
            results[(name, length)] = r
            lib = r[r[:, 0] == 0]
            acc = 100.0 * np.mean(lib[:, 3] == lib[:, 1]) if len(lib) else float("nan")
            fpos = int(np.sum(r[r[:, 0] == 1][:, 3] >= 0))
            el = time.perf_counter() - t0
            log(f"{k + 1}/{len(tasks)} {name} {length} s: {acc:.0f} % right, {fpos} false "
                f"positives (ETA {el / (k + 1) * (len(tasks) - k - 1) / 60:.1f} min)")

    log("timing pass (single process) ...")
    timing = time_identify(args.timing_clips, log)

    sib = C.siblings(library)
    false_list: list = []
    cells = {key: summarise(*key, results[key], sib, false_list, library, held)
             for key in tasks}
    text, raw = report(args, ing, cells, timing, false_list, time.perf_counter() - t_start)
    raw["records"] = {f"{n}@{l}": {"fields": FIELDS, "rows": results[(n, l)].tolist()}
                      for (n, l) in tasks}
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(raw, indent=1, default=float))
        log(f"raw numbers in {args.json}")


if __name__ == "__main__":
    main()
