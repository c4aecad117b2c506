#!/usr/bin/env python
"""The listening pipeline as deployed: real processes, a real broker, real-time audio.

Three questions, one Markdown table on stdout (progress on stderr):

1. **Needle drop to match, through the broker.**  `vinyl-mqtt run --roles
   listener` processes read a record through ALSA's ``file`` plugin at real-time
   pace (``VINYL_MQTT_CAPTURE_PACE=1``): silence (a -70 dBFS noise floor) then
   12 s of a library excerpt, again and again, each silence longer than the
   gate's release so every stretch of music is a new needle drop.  A
   `vinyl-mqtt run --roles matcher` process answers.  Latency = the wall time
   the match message reaches an outside subscriber (a Probe) - the wall time
   the music started, taken as the listener's sample-0 time (the ``since`` of
   its first, idle, state message) + where the music starts in the file.  The
   gate's own ``since`` for each needle drop is compared with that as a check.
   Two listener processes run side by side, one with ``period_frames`` 4096
   (the default) and one with 1024, started half a drop apart so their clips
   do not reach the matcher at the same moment.
2. **Listener CPU and memory**, from ``/proc/<pid>/stat`` (utime + stime, all
   threads) over the whole record after start-up, and ``VmRSS`` / ``VmHWM``
   from ``/proc/<pid>/status``; same two processes.
3. **Matcher throughput**: a burst of clips (8 s, 8 kHz, cut from the library
   excerpts and framed with ``messages.encode_clip``) published to the clip
   topic at once; time until every match result arrived, with 1 and with 2
   `vinyl-mqtt run --roles matcher` processes in the shared subscription, each
   with the default ``workers``.

Run from the project root::

    python bench/pipeline.py            # ~4 min
    python bench/pipeline.py --quick    # ~1.5 min smoke run

Every process it starts (Mosquitto, listeners, matchers) is stopped on exit,
on Ctrl-C and on SIGTERM; the scratch folder (record files, library, logs) is
removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

PROJECT = Path(__file__).resolve().parent.parent
TESTS = PROJECT / "tests"
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(TESTS))

from alsa import alsa_file_device  # noqa: E402  (tests/alsa.py)
from broker import Broker, Probe  # noqa: E402  (tests/broker.py)
from vinyl_mqtt.audio import decode  # noqa: E402
from vinyl_mqtt.config import GateConfig, ListenerConfig  # noqa: E402
from vinyl_mqtt.messages import ClipHeader, ListenerState, MatchResult, Topics, encode_clip  # noqa: E402
from vinyl_mqtt.pcm import resample  # noqa: E402

DATA = TESTS / "data"
BASE = "vinyl_mqtt"
TOPICS = Topics(BASE)
RATE = 44100  # the listener's default capture rate and channel count
CHANNELS = 2
CLIP_RATE = 8000
NOISE_DBFS = -70.0  # the silent groove between drops
CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_TARGET_PCT = 1.0
RSS_TARGET_MB = 60.0
LATENCY_TARGET_S = 5.0  # this bench's own reading of DESIGN.md's "within seconds"


def say(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


def fmt_s(x: float) -> str:
    return "—" if x != x else f"{x:.2f} s"


def mark(ok: bool | None) -> str:
    return "" if ok is None else ("✓" if ok else "✗")


# --------------------------------------------------------------------------- processes


class Procs:
    """Every child process this bench starts, so that all of them are stopped on the way out."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.all: dict[str, tuple[subprocess.Popen, Path]] = {}

    def run(self, name: str, role: str, config: dict, env: dict | None = None, verbose: bool = False) -> subprocess.Popen:
        path = self.logdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        log = self.logdir / f"{name}.log"
        cmd = [sys.executable, "-m", "vinyl_mqtt.cli", "run", "--config", str(path), "--roles", role]
        if verbose:
            cmd.append("-v")
        with open(log, "wb") as out:
            p = subprocess.Popen(cmd, env=env or dict(os.environ), stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, cwd=str(PROJECT))
        self.all[name] = (p, log)
        return p

    def stop(self, name: str, timeout: float = 20.0) -> int | None:
        p, _ = self.all[name]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"  {name} did not stop within {timeout:g} s of SIGTERM: killed")
                p.kill()
                p.wait()
        return p.returncode

    def stop_all(self) -> None:
        for name in reversed(list(self.all)):  # listeners before the matcher they send to
            try:
                self.stop(name, timeout=10.0)
            except Exception as e:  # keep stopping the others
                say(f"  stopping {name}: {e}")

    def alive(self, name: str) -> bool:
        return self.all[name][0].poll() is None

    def log_problems(self) -> dict[str, list[str]]:
        """WARNING / ERROR / Traceback lines of every child's log."""
        out = {}
        for name, (_, log) in self.all.items():
            try:
                lines = log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            bad = [ln for ln in lines if ln.startswith(("WARNING", "ERROR", "CRITICAL", "Traceback"))]
            if bad:
                out[name] = bad
        return out


def proc_cpu_s(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def proc_mem_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of ``pid`` in MB (10**6 bytes)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024 / 1e6  # kB (KiB) -> MB
    return out


class TimedProbe(Probe):
    """tests/broker.py's Probe, also noting the wall time each message arrived."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.arrivals: list[tuple[float, object]] = []

    async def _collect(self) -> None:
        assert self._client is not None
        async for m in self._client.messages:
            self.arrivals.append((time.time(), m))
            self.messages.append(m)
            self._new.set()

    def timed(self, topic: str) -> list[tuple[float, object]]:
        return [(t, m) for t, m in self.arrivals if m.topic.value == topic]


async def wait_online(probe: Probe, nodes_roles: list[tuple[str, str]], procs: Procs, names: list[str],
                      timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for node, role in nodes_roles:
        topic = TOPICS.status(node, role)
        while True:
            try:
                await probe.wait_for(lambda m, t=topic: m.topic.value == t and m.payload == b"online", timeout=0.5)
                break
            except (TimeoutError, asyncio.TimeoutError):
                dead = [n for n in names if not procs.alive(n)]
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} exited during start-up; see {procs.logdir}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node}/{role} not online after {timeout:g} s; see {procs.logdir}")


async def until(pred, timeout: float, what: str, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            say(f"  timed out after {timeout:g} s waiting for {what}")
            return False
        await asyncio.sleep(step)
    return True


# --------------------------------------------------------------------------- the record


@dataclass
class Drop:
    name: str  # excerpt
    offset_s: float  # where in the excerpt the music starts
    start_s: float  # where in the record it starts
    end_s: float


def loud_offset(x: np.ndarray, want: float, music_s: float) -> float:
    """``want``, moved later (in 0.25 s steps) until the first 0.5 s is clearly music
    (RMS above -35 dBFS): a quiet intro would measure the record, not the pipeline."""
    last = len(x) / RATE - music_s
    off = min(want, last)
    while off <= last:
        seg = x[int(off * RATE): int((off + 0.5) * RATE)]
        if 10 * np.log10(np.mean(seg.astype(np.float64) ** 2) + 1e-12) > -35.0:
            return off
        off += 0.25
    return min(want, last)


def make_record(excerpts: dict[str, np.ndarray], drops: int, silence_s: float, music_s: float,
                seed: int = 1) -> tuple[np.ndarray, list[Drop]]:
    rng = np.random.default_rng(seed)
    names = sorted(excerpts)
    wants = (1.0, 8.0, 14.0)
    fade = int(0.01 * RATE)
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
    noise_amp = 10 ** (NOISE_DBFS / 20)
    parts, layout, pos = [], [], 0
    for i in range(drops + 1):
        n = int(round(silence_s * RATE))
        parts.append((rng.standard_normal(n) * noise_amp).astype(np.float32))
        pos += n
        if i == drops:
            break
        name = names[i % len(names)]
        x = excerpts[name]
        off = loud_offset(x, wants[(i // len(names) + i) % len(wants)], music_s)
        seg = x[int(off * RATE): int(off * RATE) + int(round(music_s * RATE))].astype(np.float32).copy()
        seg[:fade] *= ramp
        seg[-fade:] *= ramp[::-1]
        parts.append(seg)
        layout.append(Drop(name, off, pos / RATE, (pos + len(seg)) / RATE))
        pos += len(seg)
    return np.concatenate(parts), layout


# --------------------------------------------------------------------------- 1 + 2: listeners


@dataclass
class ListenerRun:
    name: str  # listener (turntable) name, also the process name
    period: int
    delay_s: float  # started this long after the first listener
    pid: int = 0
    since0: float = float("nan")  # the listener's own time of sample 0 (since of its first, idle, state)
    avail: int = 0  # frames the test device reports available after a read (see device_avail)
    t0: float = float("nan")  # wall time of sample 0 as a sound card would have delivered it
    cpu: dict = field(default_factory=dict)
    mem: dict = field(default_factory=dict)
    drops: list[dict] = field(default_factory=list)
    other_results: int = 0  # match results not inside any drop
    exit_code: int | None = None


def device_avail(device: str, env: dict, period: int) -> int:
    """Frames ALSA reports as still available right after reading one period.

    The listener dates a block ``(period + avail) / rate`` before the read
    returned (right for a sound card, where ``avail`` is what arrived since).
    The ``file`` plugin on the ``null`` slave reports its whole buffer (4
    periods) as available after every read, so on this test device the
    listener's ``since`` and ``captured_at`` run that much early; the latency
    reference is corrected by it."""
    import alsaaudio

    saved = os.environ.get("ALSA_CONFIG_PATH")
    os.environ["ALSA_CONFIG_PATH"] = env["ALSA_CONFIG_PATH"]
    try:
        pcm = alsaaudio.PCM(type=alsaaudio.PCM_CAPTURE, mode=alsaaudio.PCM_NORMAL, device=device, rate=RATE,
                            channels=CHANNELS, format=alsaaudio.PCM_FORMAT_S16_LE, periodsize=period)
        try:
            pcm.read()
            return max(int(pcm.avail()), 0)
        finally:
            pcm.close()
    finally:
        if saved is None:
            os.environ.pop("ALSA_CONFIG_PATH", None)
        else:
            os.environ["ALSA_CONFIG_PATH"] = saved


def mqtt_cfg(broker: Broker) -> dict:
    return {"host": broker.host, "port": broker.port, "base_topic": BASE}


async def listener_phase(args, broker: Broker, procs: Procs, work: Path, db: Path,
                         excerpts: dict[str, np.ndarray]) -> tuple[list[ListenerRun], list[Drop], float]:
    record, layout = make_record(excerpts, args.drops, args.silence, args.music)
    total_s = len(record) / RATE
    say(f"record: {len(layout)} needle drops ({args.silence:g} s silence + {args.music:g} s music each), "
        f"{total_s:.0f} s, {RATE} Hz x {CHANNELS} ch")
    runs = [ListenerRun("pi4096", 4096, 0.0), ListenerRun("pi1024", 1024, (args.silence + args.music) / 2)]
    envs = {}
    for r in runs:
        device, env = alsa_file_device(work, record, RATE, CHANNELS, "S16_LE", name=f"rec_{r.name}")
        envs[r.name] = (device, {**env, "VINYL_MQTT_CAPTURE_PACE": "1"})
        r.avail = device_avail(device, env, r.period)

    async with TimedProbe(broker, f"{BASE}/#") as probe:
        procs.run("matcher", "matcher", {"node": "matcher", "mqtt": mqtt_cfg(broker), "library": {"db": str(db)}},
                  verbose=True)
        await wait_online(probe, [("matcher", "matcher")], procs, ["matcher"])
        say("matcher online")

        async def one(r: ListenerRun) -> None:
            await asyncio.sleep(r.delay_s)
            device, env = envs[r.name]
            cfg = {
                "node": r.name,
                "mqtt": mqtt_cfg(broker),
                "listener": {"name": r.name, "device": device, "rate": RATE, "channels": CHANNELS,
                             "period_frames": r.period, "spool": {"dir": str(work / f"spool-{r.name}")}},
            }
            p = procs.run(r.name, "listener", cfg, env=env)
            r.pid = p.pid
            state_topic = TOPICS.listener_state(r.name)
            first = await probe.wait_for(lambda m: m.topic.value == state_topic, timeout=60)
            st = ListenerState.parse(first.payload)
            if st.state != "idle":
                raise RuntimeError(f"{r.name}: first state is {st.state}, expected idle (the record starts silent)")
            r.since0 = st.since
            r.t0 = st.since + r.avail / RATE
            say(f"{r.name} capturing (period {r.period}); sample 0 at {r.t0:.3f} "
                f"(the listener says {r.since0:.3f}: its test device reports {r.avail} frames available)")
            await asyncio.sleep(1.0)  # past start-up (imports, connect, ALSA open)
            c0, w0 = proc_cpu_s(p.pid), time.time()
            end = r.t0 + total_s
            while time.time() < end:
                if p.poll() is not None:
                    raise RuntimeError(f"{r.name} exited with {p.returncode} during the record; see {procs.logdir}")
                await asyncio.sleep(min(1.0, max(0.0, end - time.time())))
            c1, w1 = proc_cpu_s(p.pid), time.time()
            r.mem = proc_mem_mb(p.pid)
            r.cpu = {"cpu_s": c1 - c0, "audio_s": w1 - w0}
            # the last drop's answer comes first_after_s + a bit after its start: long since there
            await asyncio.sleep(2.0)
            r.exit_code = procs.stop(r.name)
            say(f"{r.name} done: {1000 * (c1 - c0) / (w1 - w0):.2f} ms CPU per audio second, "
                f"peak RSS {r.mem.get('VmHWM', float('nan')):.1f} MB")

        await asyncio.gather(*(one(r) for r in runs))
        procs.stop("matcher")

        for r in runs:
            evaluate_drops(r, layout, probe)
    return runs, layout, total_s


def evaluate_drops(r: ListenerRun, layout: list[Drop], probe: TimedProbe) -> None:
    results = [(t, MatchResult.parse(m.payload)) for t, m in probe.timed(TOPICS.match(r.name))]
    clips = []
    for t, m in probe.timed(TOPICS.clip(r.name)):
        n = int.from_bytes(m.payload[4:8], "little")
        clips.append((t, ClipHeader.parse(m.payload[8:8 + n])))
    states = [ListenerState.parse(m.payload) for _, m in probe.timed(TOPICS.listener_state(r.name))]
    playing_since = sorted({s.since for s in states if s.state == "playing"})
    used = set()
    for i, d in enumerate(layout):
        start = r.t0 + d.start_s  # wall time the music started
        # the same in the listener's clock (captured_at, since), early by the test device's avail
        l_start, l_end = r.since0 + d.start_s, r.since0 + d.end_s
        inside = lambda at: l_start - 1.5 <= at <= l_end + 1.0  # noqa: E731  (clips start a pre-roll early)
        mine = [(t, res) for t, res in results if inside(res.captured_at)]
        used |= {res.clip_id for _, res in mine}
        my_clips = [(t, h) for t, h in clips if inside(h.captured_at)]
        right = [(t, res) for t, res in mine if res.matched and Path(res.track.path).stem == d.name]
        wrong = [res for _, res in mine if res.matched and Path(res.track.path).stem != d.name]
        gate = [s for s in playing_since if l_start - 2.0 <= s <= l_end]
        row = {
            "drop": i, "excerpt": d.name, "offset_s": d.offset_s, "music_start": start,
            "clips": len(my_clips), "answers": len(mine), "wrong": len(wrong),
            "wrong_tracks": [Path(w.track.path).stem for w in wrong],
            "no_match": sum(not res.matched for _, res in mine),
            "gate_since_err_s": (gate[0] - l_start) if gate else None,
            "latency_s": None, "clip_at_probe_s": None, "match_after_clip_s": None,
            "identify_ms": None, "reason": None, "speed": None,
        }
        if right:
            t, res = min(right, key=lambda x: x[0])
            row.update(latency_s=t - start, identify_ms=res.identify_ms, speed=res.speed)
            clip = [(tc, h) for tc, h in my_clips if h.clip_id == res.clip_id]
            if clip:
                row.update(clip_at_probe_s=clip[0][0] - start, match_after_clip_s=t - clip[0][0],
                           reason=clip[0][1].reason)
        r.drops.append(row)
    r.other_results = sum(res.clip_id not in used for _, res in results)


# --------------------------------------------------------------------------- 3: matcher throughput


def clip_pcms(excerpts: dict[str, np.ndarray], n: int, seconds: float = 8.0) -> list[tuple[str, np.ndarray]]:
    """n clips of ``seconds``, at CLIP_RATE as int16, round-robin over the excerpts and positions."""
    down = {k: resample(x, RATE, CLIP_RATE) for k, x in excerpts.items()}
    names = sorted(down)
    out = []
    for k in range(n):
        name = names[k % len(names)]
        x = down[name]
        room = len(x) / CLIP_RATE - seconds
        start = (k // len(names) * 1.7) % room
        seg = x[int(start * CLIP_RATE): int(start * CLIP_RATE) + int(seconds * CLIP_RATE)]
        out.append((name, (np.clip(seg, -1, 1) * 32767).astype(np.int16)))
    return out


async def throughput_phase(broker: Broker, procs: Procs, db: Path, pcms, n_matchers: int) -> dict:
    listener = f"burst{n_matchers}"
    names = [f"m{n_matchers}-{k + 1}" for k in range(n_matchers)]
    async with TimedProbe(broker, TOPICS.match(listener), TOPICS.role_status_any("matcher")) as probe:
        for name in names:
            procs.run(name, "matcher", {"node": name, "mqtt": mqtt_cfg(broker), "library": {"db": str(db)}},
                      verbose=True)
        await wait_online(probe, [(n, "matcher") for n in names], procs, names)
        await asyncio.sleep(1.0)  # let them settle (library loaded before they said online)
        sent: dict[str, tuple[float, str]] = {}
        t0 = time.time()
        for seq, (name, pcm) in enumerate(pcms):
            now = time.time()
            header = ClipHeader(listener=listener, clip_id=f"c{seq}", seq=seq, captured_at=round(now - len(pcm) / CLIP_RATE, 3),
                                rate=CLIP_RATE, samples=len(pcm), rms_dbfs=-20.0, reason="recheck")
            await probe.publish(TOPICS.clip(listener), encode_clip(header, pcm), qos=1)
            sent[header.clip_id] = (now, name)
        t_pub = time.time()
        topic = TOPICS.match(listener)
        done = await until(lambda: len({json.loads(m.payload)["clip_id"] for m in probe.on(topic)}) >= len(pcms),
                           timeout=max(60.0, 2.0 * len(pcms)), what="every answer")
        mem = {n: proc_mem_mb(procs.all[n][0].pid) for n in names if procs.alive(n)}
        for n in names:
            procs.stop(n)
        got = {}
        dup = 0
        for t, m in probe.timed(topic):
            res = MatchResult.parse(m.payload)
            if res.clip_id in got:
                dup += 1
                continue
            got[res.clip_id] = (t, res)
    last = max((t for t, _ in got.values()), default=float("nan"))
    e2e = [t - sent[cid][0] for cid, (t, _) in got.items()]
    ident = [res.identify_ms for _, res in got.values()]
    queue = [res.queue_ms for _, res in got.values()]
    right = sum(res.matched and Path(res.track.path).stem == sent[cid][1] for cid, (_, res) in got.items())
    by = {}
    for _, res in got.values():
        by[res.matcher] = by.get(res.matcher, 0) + 1
    return {
        "matchers": n_matchers, "clips": len(pcms), "answered": len(got), "duplicates": dup, "complete": done,
        "right": right, "publish_s": t_pub - t0, "total_s": last - t0,
        "clips_per_s": len(got) / (last - t0) if got else 0.0,
        "identify_ms_p50": pct(ident, 50), "identify_ms_p95": pct(ident, 95),
        "e2e_s_p50": pct(e2e, 50), "e2e_s_p95": pct(e2e, 95), "e2e_s_max": max(e2e, default=float("nan")),
        "queue_ms_p50": pct(queue, 50), "by_matcher": by,
        "peak_rss_mb": {n: m.get("VmHWM") for n, m in mem.items()},
    }


# --------------------------------------------------------------------------- report


def table(args, runs: list[ListenerRun], total_s: float, tps: list[dict], started: dt.datetime) -> str:
    rows = []
    all_lat = []
    all_drops = 0
    all_right = 0
    for r in runs:
        lat = [d["latency_s"] for d in r.drops if d["latency_s"] is not None]
        all_lat += lat
        all_drops += len(r.drops)
        all_right += len(lat)
        p95 = pct(lat, 95)
        rows.append((f"Needle drop → match at a Probe, period {r.period} ({len(r.drops)} drops)",
                     f"median {fmt_s(pct(lat, 50))}, p95 {fmt_s(p95)}, max {fmt_s(max(lat, default=float('nan')))}",
                     f"p95 ≤ {LATENCY_TARGET_S:g} s *", mark(bool(lat) and p95 <= LATENCY_TARGET_S)))
    rows.append(("Drops matched to the right track (any clip of the drop)",
                 f"{all_right}/{all_drops} ({100 * all_right / max(all_drops, 1):.0f} %)",
                 "all *", mark(all_right == all_drops)))
    wrong = sum(d["wrong"] for r in runs for d in r.drops)
    rows.append(("Wrong-track answers", str(wrong), "0", mark(wrong == 0)))
    split_l = [d["clip_at_probe_s"] for r in runs for d in r.drops if d["clip_at_probe_s"] is not None]
    split_m = [d["match_after_clip_s"] for r in runs for d in r.drops if d["match_after_clip_s"] is not None]
    rows.append(("… of which listener (music start → clip at Probe)",
                 f"median {fmt_s(pct(split_l, 50))}, p95 {fmt_s(pct(split_l, 95))}", "—", ""))
    rows.append(("… of which matcher + broker (clip at Probe → match at Probe)",
                 f"median {1000 * pct(split_m, 50):.0f} ms, p95 {1000 * pct(split_m, 95):.0f} ms", "—", ""))
    gate = [d["gate_since_err_s"] for r in runs for d in r.drops if d["gate_since_err_s"] is not None]
    rows.append(("Gate's `since` − true music start",
                 f"median {1000 * pct(gate, 50):+.0f} ms, range {1000 * min(gate, default=0):+.0f} … "
                 f"{1000 * max(gate, default=0):+.0f} ms", "—", ""))
    for r in runs:
        cpu_ms = 1000 * r.cpu["cpu_s"] / r.cpu["audio_s"]
        core = cpu_ms / 10.0
        rows.append((f"Listener CPU, period {r.period} ({r.cpu['audio_s']:.0f} s of audio)",
                     f"{cpu_ms:.2f} ms per audio second = {core:.2f} % of one core",
                     f"≤ {CPU_TARGET_PCT:g} %", mark(core <= CPU_TARGET_PCT)))
        hwm = r.mem.get("VmHWM", float("nan"))
        rows.append((f"Listener memory, period {r.period}",
                     f"peak RSS {hwm:.1f} MB (VmHWM; VmRSS at end {r.mem.get('VmRSS', float('nan')):.1f} MB)",
                     f"≤ {RSS_TARGET_MB:g} MB", mark(hwm <= RSS_TARGET_MB)))
    for t in tps:
        lost = t["clips"] - t["answered"]
        rows.append((f"Matcher throughput, {t['matchers']} process(es) × default workers, burst of {t['clips']} × 8 s",
                     f"{t['clips_per_s']:.1f} clips/s ({t['total_s']:.1f} s; {t['answered']}/{t['clips']} answered, "
                     f"{t['right']} right; split {', '.join(f'{k}: {v}' for k, v in sorted(t['by_matcher'].items()))})",
                     "all answered", mark(lost == 0 and t["duplicates"] == 0)))
        rows.append((f"… `identify_ms` / end-to-end, {t['matchers']} process(es)",
                     f"identify p50 {t['identify_ms_p50']:.0f} ms, p95 {t['identify_ms_p95']:.0f} ms; "
                     f"publish → answer p50 {fmt_s(t['e2e_s_p50'])}, p95 {fmt_s(t['e2e_s_p95'])}", "—", ""))
    rss = [v for t in tps for v in t["peak_rss_mb"].values() if v]
    if rss:
        rows.append(("Matcher peak RSS (per process, after a burst)", f"{max(rss):.0f} MB", "—", ""))

    out = [f"### vinyl-mqtt pipeline bench, {started:%Y-%m-%d %H:%M} ({'quick' if args.quick else 'full'})", "",
           f"`{' '.join(shlex.quote(a) for a in ['python', 'bench/pipeline.py', *sys.argv[1:]])}` — "
           f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; "
           f"record {total_s:.0f} s at {RATE} Hz × {CHANNELS} ch, {args.silence:g} s silence + {args.music:g} s music "
           f"per drop. Latency reference: the music's place in the file + the wall time of sample 0, from the listener's "
           f"first (idle) state `since` corrected by the test device's always-full `avail` "
           f"({', '.join(f'{r.avail} frames = {1000 * r.avail / RATE:.0f} ms at period {r.period}' for r in runs)}).",
           "", "| measure | figure | target | |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out += ["", "\\* this bench's own target (DESIGN.md: \"within seconds\"; clean library excerpts should all match)."]
    return "\n".join(out)


def drops_table(runs: list[ListenerRun]) -> str:
    out = ["| listener | drop | excerpt | clips | answers | latency | clip at Probe | match after clip | gate since err | speed |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for d in r.drops:
            f = lambda x, u="s", k=1.0: "—" if x is None else f"{x * k:.2f} {u}" if u == "s" else f"{x * k:+.0f} {u}"  # noqa: E731
            out.append(f"| {r.name} | {d['drop']} | {d['excerpt']} @ {d['offset_s']:.2f} s | {d['clips']} | {d['answers']}"
                       f"{' (' + str(d['no_match']) + ' no match)' if d['no_match'] else ''}"
                       f"{' (wrong: ' + ', '.join(d['wrong_tracks']) + ')' if d['wrong'] else ''} | {f(d['latency_s'])} | "
                       f"{f(d['clip_at_probe_s'])} | {f(d['match_after_clip_s'])} | {f(d['gate_since_err_s'], 'ms', 1000)} | "
                       f"{'—' if d['speed'] is None else format(d['speed'], '.4f')} |")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


async def bench(args, broker: Broker, procs: Procs, work: Path, started: dt.datetime) -> dict:
    lib_names = sorted(p.stem for p in DATA.glob("*.ogg") if not p.stem.startswith("unknown_"))
    music = work / "music"
    music.mkdir()
    for n in lib_names:
        shutil.copy2(DATA / f"{n}.ogg", music / f"{n}.ogg")
    db = work / "library.sqlite"
    say(f"library add: {len(lib_names)} excerpts")
    subprocess.run([sys.executable, "-m", "vinyl_mqtt.cli", "library", "add", "--db", str(db), "-q", str(music)],
                   check=True, stdout=subprocess.DEVNULL, cwd=str(PROJECT))
    excerpts = {n: decode(DATA / f"{n}.ogg", RATE) for n in lib_names}

    runs, layout, total_s = await listener_phase(args, broker, procs, work, db, excerpts)

    pcms = clip_pcms(excerpts, args.clips)
    tps = []
    for n in (1, 2):
        say(f"throughput: {args.clips} clips, {n} matcher process(es)")
        tps.append(await throughput_phase(broker, procs, db, pcms, n))
        t = tps[-1]
        say(f"  {t['clips_per_s']:.1f} clips/s, {t['answered']}/{t['clips']} answered, "
            f"identify p50 {t['identify_ms_p50']:.0f} ms")

    text = table(args, runs, total_s, tps, started)
    print(text)
    print()
    print("<details><summary>every needle drop</summary>\n")
    print(drops_table(runs))
    print("\n</details>", flush=True)
    return {"runs": [r.__dict__ for r in runs], "layout": [d.__dict__ for d in layout], "throughput": tps,
            "total_s": total_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 drops, 40 clips (~1.5 min)")
    ap.add_argument("--drops", type=int, help="needle drops per listener (default 10; quick 3)")
    ap.add_argument("--silence", type=float, help="seconds of silence before each drop (default 7; must be > the 5 s release)")
    ap.add_argument("--music", type=float, help="seconds of music per drop (default 12; quick 10)")
    ap.add_argument("--clips", type=int, help="clips in each throughput burst (default 200; quick 40)")
    ap.add_argument("--json", metavar="FILE", help="write the raw figures here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, configs, record files)")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default 900)")
    args = ap.parse_args(argv)
    args.drops = args.drops or (3 if args.quick else 10)
    args.silence = args.silence or 7.0
    args.music = args.music or (10.0 if args.quick else 12.0)
    args.clips = args.clips or (40 if args.quick else 200)
    release = GateConfig().release_s
    if args.silence <= release + 0.5:
        ap.error(f"--silence must be longer than the gate's release ({release:g} s) + 0.5 s")
    if args.music > 26.0:
        ap.error("--music: the excerpts are 27 s long")
    assert ListenerConfig().period_frames == 4096, "the default period changed: update this bench"

    def on_term(signum, frame):
        raise KeyboardInterrupt  # same way out as Ctrl-C: every finally runs

    signal.signal(signal.SIGTERM, on_term)
    started = dt.datetime.now()
    work = Path(tempfile.mkdtemp(prefix="vinyl-pipeline-bench-"))
    logdir = work / "logs"
    logdir.mkdir()
    procs = Procs(logdir)
    broker = Broker(work / "mosquitto", verbose=False)
    rc = 0
    try:
        broker.start()
        say(f"mosquitto on {broker.host}:{broker.port}; scratch {work}")
        result = asyncio.run(asyncio.wait_for(bench(args, broker, procs, work, started), args.timeout))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        rc = 130
    except (Exception, asyncio.TimeoutError) as e:
        say(f"failed: {type(e).__name__}: {e}")
        rc = 1
    finally:
        procs.stop_all()
        broker.close()
        problems = procs.log_problems()
        for name, lines in problems.items():
            say(f"log of {name}: {len(lines)} warning/error line(s)")
            for ln in lines[:10]:
                say(f"    {ln}")
        broker_log = (work / "mosquitto" / "mosquitto.log")
        if broker_log.exists():
            bad = [ln for ln in broker_log.read_text(errors="replace").splitlines() if "rror" in ln or "arning" in ln]
            if bad:
                say(f"mosquitto log: {len(bad)} warning/error line(s)")
                for ln in bad[:10]:
                    say(f"    {ln}")
        if args.keep or rc == 1:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
