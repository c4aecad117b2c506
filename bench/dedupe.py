#!/usr/bin/env python
"""How well does the dedupe logic turn matches into plays, and how soon?

Replays generated listening sessions through :class:`vinyl_mqtt.plays.PlayTracker`
under several confirmation rules and prints Markdown tables: plays expected
vs produced, wrong splits, wrong merges, missed and invented plays, start-time
error, and the seconds from the music starting to ``started``.

A session is an evening at the turntable: 1-4 records, each side played with
2-3.5 s gaps between tracks (some gapless), the record flipped after a side
(idle 20-120 s), with skips (the needle moved on to a later track, lifted
briefly or long enough for the listener to go idle), replays of a track,
needle drops into the middle of a track, sides abandoned, records that are
not in the library, 45s played at 33 and 33s at 45, belt speed errors, a
matcher asleep at the start (answers arrive 15-60 s late, in a burst), and
restarts of the dedupe role (the tracker rebuilt from the last retained
NowPlaying; messages during the 3-15 s it is down are lost, the retained
listener state is re-delivered).

The listener and matcher are modelled on the real ones: the listener's gate
(playing after 1 s, idle after 5 s of silence, a gap of 1-5 s is a gap) and
clip scheduler (3.25 s clip 3 s after a needle drop or gap, 8 s clips every
30 s), and a matcher whose answers follow bench/accuracy.py's measurements:
score log-normal around 31 consistent pairs per second of clip on a good
deck (4.7 per second through a room microphone), a miss when the score is
under the matcher's threshold (14), confidence from score and runner-up with
the matcher's own formula, speed noise of 0.25 % on 3 s clips and 0.06 % on
8 s ones, and, on looped tracks, 8 % of answers at another repetition of the
bars.  Stray wrong answers replace a real answer at ``--stray-rate`` (default
2 % of clips: ~200x what bench/accuracy.py measured) and come in two models:
``observed`` (scores 14-19, confidence ~0.5-0.7, as the wrong answers
bench/accuracy.py saw) and ``confident`` (scores drawn like right answers:
what a miscalibrated matcher would do).

    python bench/dedupe.py                 # ~1-2 min
    python bench/dedupe.py --sessions 40   # quicker
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # `python bench/dedupe.py` works without installing

from vinyl_mqtt.messages import ListenerState, MatchedTrack, MatchResult, NowPlaying  # noqa: E402
from vinyl_mqtt.plays import Catalog, PlayTracker, Rules  # noqa: E402

T0 = 1_750_000_000.0
L = "pi"
GAP_S, RELEASE_S, ATTACK_S = 1.0, 5.0, 1.0
FIRST_AFTER_S, RECHECK_S, CLIP_S, PREROLL_S = 3.0, 30.0, 8.0, 0.25
MIN_INLIERS, MIN_LEAD = 14, 2.0

RULES: dict[str, Rules] = {
    "any 1 match": Rules(agree_matches=1, confident=None, predict=False),
    "2 agreeing": Rules(agree_matches=2, confident=None, predict=False),
    "3 agreeing": Rules(agree_matches=3, confident=None, predict=False),
    "2 agreeing | 1 confident": Rules(predict=False),
    "2 agr. | 1 conf. ≥ 0.99 | pred. + 1": Rules(confident=0.99),
    "2 agreeing | predicted + 1": Rules(confident=None),
    "2 agr. | 1 conf. | pred. + 1 (default)": Rules(),
}
CONDITIONS = {  # score median per second of clip, log-sigma, speed noise (3 s clip, 8 s clip)
    "good deck": (31.0, 0.6, 0.0025, 0.0006),
    "room mic": (4.7, 0.8, 0.006, 0.0015),
}


# --------------------------------------------------------------------------- the library


@dataclass
class Library:
    albums: list[list[MatchedTrack]]
    unknown: list[list[float]]  # records not in the library: their track durations
    loopy: dict[int, float]  # track id -> bar length (s) of looped tracks
    tracks: list[MatchedTrack]


def make_library(rng: random.Random, n_albums: int = 40, n_unknown: int = 8) -> Library:
    albums, loopy, ids = [], {}, itertools.count(1)
    for a in range(n_albums):
        n = rng.randint(6, 12)
        discs = 2 if rng.random() < 0.15 else 1
        album = []
        for i in range(n):
            tid = next(ids)
            disc = 1 + (i * discs) // n
            number = i + 1 - (n // discs) * (disc - 1) if discs > 1 else i + 1
            album.append(MatchedTrack(id=tid, title=f"Song {tid}", artist=f"Artist {a}", album=f"Album {a}",
                                      album_artist=f"Artist {a}", track_number=number, disc_number=disc,
                                      duration_s=round(rng.uniform(90, 420) if rng.random() < 0.9
                                                       else rng.uniform(420, 900), 2),
                                      path=f"/music/{a}/{tid}.flac"))
            if rng.random() < 0.3:
                loopy[tid] = rng.uniform(2.0, 8.0)
        albums.append(album)
    unknown = [[rng.uniform(120, 360) for _ in range(rng.randint(6, 10))] for _ in range(n_unknown)]
    return Library(albums, unknown, loopy, [t for al in albums for t in al])


# --------------------------------------------------------------------------- sessions


@dataclass
class Seg:
    t0: float
    t1: float
    track: MatchedTrack | None
    offset: float
    speed: float
    truth: int  # index into Session.truth (-1: not a library track)

    def position(self, t: float) -> float:
        return self.offset + (t - self.t0) * self.speed


@dataclass
class Truth:
    track: MatchedTrack
    start: float  # when the track's first second played (or would have)
    heard_from: float
    heard_to: float
    through: bool
    kind: str  # needle drop / after gap / gapless / skip
    clips: int = 0  # clips in which it is heard longest (0: not recognisable)


@dataclass
class Session:
    segs: list[Seg] = field(default_factory=list)
    truth: list[Truth] = field(default_factory=list)
    restarts: list[tuple[float, float]] = field(default_factory=list)  # (at, downtime)
    wake: float = 0.0  # answers to clips before this arrive at this time
    end: float = 0.0


def make_session(rng: random.Random, lib: Library) -> Session:
    s = Session()
    t = T0 + rng.uniform(0, 30)
    kind = "needle drop"

    def play(track: MatchedTrack | None, duration: float, speed: float, offset: float, heard: float | None, k: str):
        nonlocal t
        length = (duration - offset) / speed if heard is None else heard
        idx = -1
        if track is not None:
            pos_end = offset + length * speed
            s.truth.append(Truth(track, t - offset / speed, t, t + length,
                                 pos_end >= 0.9 * track.duration_s, k))
            idx = len(s.truth) - 1
        s.segs.append(Seg(t, t + length, track, offset, speed, idx))
        t += length

    for _record in range(rng.randint(1, 4)):
        known = rng.random() < 0.85
        tracks: list = rng.choice(lib.albums) if known else [(None, d) for d in rng.choice(lib.unknown)]
        r = rng.random()
        speed = (33.333 / 45 if r < 0.05 else 45 / 33.333 if r < 0.08 else 1.0) * (1 + rng.gauss(0, 0.006))
        half = (len(tracks) + 1) // 2
        for side_no, side in enumerate((tracks[:half], tracks[half:])):
            if side_no == 1 and rng.random() < 0.1:
                break  # didn't flip it
            t += rng.uniform(1, 4)
            kind = "needle drop"
            i = 0
            first = True
            while i < len(side):
                item = side[i]
                track, duration = (item, item.duration_s) if known else item
                offset = 0.0
                if first and rng.random() < 0.1:
                    offset = rng.uniform(20, 0.6 * duration)  # dropped into the middle
                first = False
                length = (duration - offset) / speed
                r = rng.random()
                if r < 0.05 and length > 40:  # skip: lifted part-way, dropped on a later track
                    play(track, duration, speed, offset, rng.uniform(15, 0.8 * length), kind)
                    t += rng.uniform(1.5, 4.5) if rng.random() < 0.5 else rng.uniform(6, 20)
                    i += rng.choice((1, 2))
                    kind = "skip"
                    continue
                if r < 0.07 and length > 40:  # lifted part-way: the side is abandoned
                    play(track, duration, speed, offset, rng.uniform(15, 0.8 * length), kind)
                    break
                play(track, duration, speed, offset, None, kind)
                if rng.random() < 0.03:  # played again straight away
                    t += rng.uniform(2, 4) if rng.random() < 0.5 else rng.uniform(8, 30)
                    play(track, duration, speed, 0.0, None, "replay")
                gapless = rng.random() < 0.08
                t += rng.uniform(0.2, 0.6) if gapless else rng.uniform(1.5, 3.5)
                kind = "gapless" if gapless else "after gap"
                i += 1
            t += rng.uniform(20, 120)  # flipping the record (idle)
        t += rng.uniform(30, 180)  # changing records
    s.end = t
    if rng.random() < 0.5:
        s.wake = s.segs[0].t0 + rng.uniform(15, 60)
    if rng.random() < 0.3:
        s.restarts.append((rng.uniform(s.segs[0].t0 + 30, s.end - 60), rng.uniform(3, 15)))
    return s


# --------------------------------------------------------------------------- listener and matcher models


@dataclass
class Clip:
    seq: int
    start: float
    end: float


def listen(segs: list[Seg]) -> tuple[list[tuple[float, ListenerState]], list[Clip]]:
    """The listener's gate and clip scheduler, in seconds (see tests/test_plays.py)."""
    runs: list[list[float]] = []
    for sg in sorted(segs, key=lambda x: x.t0):
        if runs and sg.t0 - runs[-1][1] < GAP_S:
            runs[-1][1] = max(runs[-1][1], sg.t1)
        else:
            runs.append([sg.t0, sg.t1])
    states: list[tuple[float, ListenerState]] = []
    clips: list[Clip] = []

    def state(at, st, since):
        states.append((at, ListenerState(listener=L, state=st, rms_dbfs=-20.0, peak_dbfs=-6.0, since=since,
                                         updated_at=at)))

    end = None
    for i, (a, b) in enumerate(runs):
        new = end is None or a - end >= RELEASE_S
        if new:
            if end is not None:
                state(end + RELEASE_S, "idle", end)
            state(a + ATTACK_S, "playing", a)
        nxt = runs[i + 1][0] if i + 1 < len(runs) else math.inf
        stop = b + RELEASE_S if nxt - b >= RELEASE_S else nxt
        due = a + FIRST_AFTER_S
        while due <= stop:
            clips.append(Clip(len(clips), max(due - CLIP_S, a - PREROLL_S), due))
            due += RECHECK_S
        end = b
    if end is not None:
        state(end + RELEASE_S, "idle", end)
    return states, clips


def _confidence(score: int, runner_up: int) -> float:
    margin = min(score - MIN_INLIERS, score - MIN_LEAD * runner_up)
    return 1.0 / (1.0 + math.exp(-margin / 6.0))


def hear(rng: random.Random, c: Clip, segs: list[Seg], session: Session, lib: Library, cond: str,
         stray_rate: float, stray_model: str) -> MatchResult:
    per_s, sigma, sp3, sp8 = CONDITIONS[cond]
    best, most = None, 0.0
    for sg in segs:
        if sg.t1 <= c.start or sg.t0 >= c.end:
            continue
        ov = min(c.end, sg.t1) - max(c.start, sg.t0)
        if ov > most:
            best, most = sg, ov
    base = dict(listener=L, clip_id=f"c{c.seq}", seq=c.seq, captured_at=round(c.start, 3), matcher="m")
    if best is not None and best.truth >= 0 and most >= 1.5:
        session.truth[best.truth].clips += 1
    if rng.random() < stray_rate and best is not None:
        wrong = rng.choice(lib.tracks)
        while best.track is not None and wrong.id == best.track.id:
            wrong = rng.choice(lib.tracks)
        if stray_model == "observed":
            score, ru = rng.randint(14, 19), rng.randint(5, 9)
        else:
            score, ru = max(14, int(rng.lognormvariate(math.log(per_s * most), sigma))), rng.randint(0, 8)
        return MatchResult(**base, matched=True, track=wrong, offset_s=round(rng.uniform(0, wrong.duration_s), 3),
                           speed=round(best.speed * (1 + rng.uniform(-0.03, 0.03)), 5),
                           confidence=round(_confidence(score, ru), 6), score=score)
    if best is None or best.track is None or most < 1.5:
        return MatchResult(**base, matched=False, score=rng.randint(0, 9))
    score = int(rng.lognormvariate(math.log(per_s * most), sigma))
    if score < MIN_INLIERS:
        return MatchResult(**base, matched=False, score=score)
    ru = rng.randint(0, 8)
    offset = best.position(c.start) + rng.gauss(0, 0.03)
    bar = lib.loopy.get(best.track.id)
    if bar is not None and rng.random() < 0.08:
        k = rng.choice((-3, -2, -1, 1, 2, 3))
        if 0 <= offset + k * bar <= best.track.duration_s:
            offset += k * bar
    speed = best.speed * (1 + rng.gauss(0, sp3 if most < 5 else sp8))
    return MatchResult(**base, matched=True, track=best.track, offset_s=round(offset, 3), speed=round(speed, 5),
                       confidence=round(_confidence(score, ru), 6), score=score)


# --------------------------------------------------------------------------- replay


@dataclass
class Produced:
    track: MatchedTrack
    emitted: float  # when `started` was published
    started_at: float
    ended_at: float | None = None
    played_through: bool | None = None
    end_reason: str | None = None
    starts: int = 1


def replay(session: Session, inputs: list[tuple[float, int, str, object]], rules: Rules) -> tuple[dict, dict]:
    """Feed the inputs (time-ordered) to a tracker, ticking each second; the plays and display stats."""
    catalog = Catalog()
    tracker = PlayTracker(L, rules, catalog)
    plays: dict[str, Produced] = {}
    retained: NowPlaying | None = None
    last_state: ListenerState | None = None
    restarts = list(session.restarts)
    down_until = -math.inf
    shown_right = shown_stale = shown_wrong = shown_none = 0

    def take(out, now):
        nonlocal retained
        for e in out.events:
            p = e.play
            if e.event == "started":
                if p.play_id in plays:
                    plays[p.play_id].starts += 1
                else:
                    plays[p.play_id] = Produced(p.track, now, p.started_at)
            elif p.play_id in plays:
                pr = plays[p.play_id]
                pr.started_at = p.started_at
                if e.event == "ended":
                    pr.ended_at, pr.played_through, pr.end_reason = p.ended_at, p.played_through, p.end_reason
        if out.changed:
            retained = out.now_playing

    truth_at = _truth_index(session)
    i = 0
    now = math.floor(inputs[0][0]) if inputs else T0
    end = session.end + 60
    while now <= end:
        if restarts and now >= restarts[0][0]:  # the role restarts: down for a while, then restored
            _, downtime = restarts.pop(0)
            down_until = math.ceil(now + downtime)
            snapshot, tracker = retained, None
        if tracker is None and now >= down_until:
            tracker = PlayTracker.restore(snapshot, rules, Catalog()) if snapshot else PlayTracker(L, rules)
            if last_state is not None:  # the retained listener state, delivered on subscribing
                take(tracker.on_listener(last_state, now), now)
        while i < len(inputs) and inputs[i][0] <= now:  # inputs due up to this tick
            at, _, kind, payload = inputs[i]
            i += 1
            if kind == "listener":
                last_state = payload
            if tracker is None or at < down_until:
                continue  # the role was down: lost
            fn = tracker.on_match if kind == "match" else tracker.on_listener
            take(fn(payload, at), at)
        if tracker is None:
            now += 1.0
            continue
        take(tracker.tick(now), now)
        # what Home Assistant would show, against what is playing
        real, recent = truth_at(now)
        shown = tracker.play.track.id if tracker.play is not None else None
        if real is not None:
            if shown == real:
                shown_right += 1
            elif shown is None:
                shown_none += 1
            elif shown in recent:
                shown_stale += 1
            else:
                shown_wrong += 1
        elif shown is not None:
            if shown in recent:
                shown_stale += 1
            else:
                shown_wrong += 1
        now += 1.0
    return plays, {"right": shown_right, "stale": shown_stale, "wrong": shown_wrong, "none": shown_none}


def _truth_index(session: Session):
    segs = sorted((sg for sg in session.segs if sg.truth >= 0), key=lambda x: x.t0)
    starts = [sg.t0 for sg in segs]
    import bisect

    def at(t: float) -> tuple[int | None, set[int]]:
        """The library track playing at t (None in its first 5 s, or if none), and those of the last 60 s."""
        k = bisect.bisect_right(starts, t) - 1
        now = segs[k].track.id if k >= 0 and segs[k].t0 + 5 <= t < segs[k].t1 else None
        recent = {segs[j].track.id for j in range(max(0, k - 3), k + 1) if segs[j].t1 >= t - 60}
        return now, recent

    return at


def score(session: Session, plays: dict[str, Produced]) -> dict:
    """Match produced plays to the truth (same track, overlapping by 15 s or half the heard length)."""
    truth = session.truth
    prods = list(plays.values())

    def overlaps(p: Produced, t: Truth) -> bool:
        if p.track.id != t.track.id:
            return False
        a, b = max(p.started_at, t.heard_from), min(p.ended_at if p.ended_at is not None else session.end + 60,
                                                    t.heard_to)
        return b - a >= min(15.0, 0.5 * (t.heard_to - t.heard_from))  # (a loop's echo can shift a play ~15 s)

    by_truth = [[j for j, p in enumerate(prods) if overlaps(p, t)] for t in truth]
    by_prod = [[k for k, t in enumerate(truth) if overlaps(p, t)] for p in prods]
    r = dict(expected=sum(t.clips > 0 for t in truth), produced=len(prods), correct=0, splits=0, merges=0,
             missed=0, invented=0, dup_started=sum(p.starts - 1 for p in prods), through_wrong=0,
             start_err=[], latency={}, unrecognisable_found=0)
    for k, t in enumerate(truth):
        js = by_truth[k]
        if t.clips == 0:
            r["unrecognisable_found"] += bool(js)
            continue
        if not js:
            r["missed"] += 1
            continue
        r["splits"] += len(js) - 1
        if len(js) == 1 and len(by_prod[js[0]]) == 1:
            p = prods[js[0]]
            r["correct"] += 1
            r["start_err"].append(abs(p.started_at - t.start))
            r["through_wrong"] += p.played_through is not None and p.played_through != t.through
            kind = "asleep" if t.heard_from < session.wake else t.kind
            r["latency"].setdefault(kind, []).append(p.emitted - t.heard_from)
    for ks in by_prod:
        if not ks:
            r["invented"] += 1
        r["merges"] += max(0, len(ks) - 1)
    return r


def inputs_for(rng: random.Random, session: Session, lib: Library, cond: str, stray_rate: float,
               stray_model: str) -> list:
    states, clips = listen(session.segs)
    n = itertools.count()
    out = [(at, next(n), "listener", st) for at, st in states]
    for c in clips:
        m = hear(rng, c, session.segs, session, lib, cond, stray_rate, stray_model)
        arrive = c.end + rng.uniform(0.1, 1.5)
        if arrive < session.wake:
            arrive = session.wake + 0.05 * c.seq
        out.append((arrive, next(n), "match", m))
    out.sort(key=lambda x: (x[0], x[1]))
    return out


# --------------------------------------------------------------------------- report


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stray-rate", type=float, default=0.02, help="share of clips answered with a wrong track")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    lib = make_library(random.Random(args.seed))
    sessions = [make_session(random.Random(args.seed * 1000 + k), lib) for k in range(args.sessions)]
    hours = sum(s.end - s.segs[0].t0 for s in sessions) / 3600
    n_truth = sum(len(s.truth) for s in sessions)
    kinds_count: dict[str, int] = {}
    results: dict[str, dict] = {}
    for cond in CONDITIONS:
        for model in ("observed", "confident"):
            # the same answers for every rule
            rng = random.Random(f"{args.seed}-{cond}-{model}")
            for s in sessions:
                for t in s.truth:
                    t.clips = 0
            per_session = [inputs_for(rng, s, lib, cond, args.stray_rate, model) for s in sessions]
            if not kinds_count:
                for s in sessions:
                    for t in s.truth:
                        if t.clips:
                            kinds_count[t.kind] = kinds_count.get(t.kind, 0) + 1
            for name, rules in RULES.items():
                agg: dict = {}
                shown = {"right": 0, "stale": 0, "wrong": 0, "none": 0}
                for s, inputs in zip(sessions, per_session):
                    plays, disp = replay(s, inputs, rules)
                    r = score(s, plays)
                    for k, v in r.items():
                        if isinstance(v, list):
                            agg.setdefault(k, []).extend(v)
                        elif isinstance(v, dict):
                            for kk, vv in v.items():
                                agg.setdefault(k, {}).setdefault(kk, []).extend(vv)
                        else:
                            agg[k] = agg.get(k, 0) + v
                    for k in shown:
                        shown[k] += disp[k]
                agg["shown"] = shown
                results[f"{cond}|{model}|{name}"] = agg
                print(f"{cond:9s} {model:9s} {name:40s} done ({time.perf_counter() - t_start:.0f} s)",
                      file=sys.stderr)

    print("## Dedupe benchmark: matches to plays\n")
    print(f"{args.sessions} sessions, {hours:.1f} h of listening, {n_truth} real plays "
          f"({', '.join(f'{v} {k}' for k, v in sorted(kinds_count.items()))} recognisable); "
          f"library {len(lib.tracks)} tracks in {len(lib.albums)} albums, 15 % of records not in it; "
          f"stray wrong answers on {100 * args.stray_rate:g} % of clips; seed {args.seed}; "
          f"`python bench/dedupe.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    for cond in CONDITIONS:
        for model in ("observed", "confident"):
            print(f"### {cond}, {model} strays\n")
            print("| rule | expected | produced | correct | wrong splits | wrong merges | missed | invented | "
                  "started twice | start err p50 / p95 s | needle drop → started p50 / p95 s | "
                  "after gap → started p50 / p95 s | "
                  "skip → started p50 / p95 s | asleep matcher → started p50 / p95 s | "
                  "shown right / previous / wrong % |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for name in RULES:
                a = results[f"{cond}|{model}|{name}"]
                lat = a.get("latency", {})
                shown = a["shown"]
                tot = max(1, sum(shown.values()))

                def pp(xs):
                    return f"{pct(xs, 50):.1f} / {pct(xs, 95):.1f}" if xs else "–"

                print(f"| {name} | {a['expected']} | {a['produced']} | {a['correct']} | {a['splits']} | "
                      f"{a['merges']} | {a['missed']} | {a['invented']} | {a['dup_started']} | "
                      f"{pp(a.get('start_err', []))} | "
                      f"{pp(lat.get('needle drop', []))} | {pp(lat.get('after gap', []))} | "
                      f"{pp(lat.get('skip', []))} | {pp(lat.get('asleep', []))} | "
                      f"{100 * shown['right'] / tot:.1f} / {100 * shown['stale'] / tot:.1f} / "
                      f"{100 * shown['wrong'] / tot:.2f} |")
            print()
    print(f"Wall time {time.perf_counter() - t_start:.0f} s.")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
