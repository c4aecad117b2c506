"""`vinyl-mqtt demo`: the whole chain on this one machine, no Pi, no config.

It finds a broker (the one given, one on localhost:1883, or a Mosquitto it
starts), builds a library from the bundled recordings, cuts a "record side"
from them through the turntable simulator (a good deck, a worn belt drive, a
33 played at 45, and a track that is not in the library), plays it through
the real capture path (ALSA's file plugin) into the real listener and
matcher roles, and prints what is heard, sent, matched and published, live.
A Home Assistant on the same broker sees the demo turntable's topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import numpy as np

from .alsa_file import alsa_file_device
from .audio import decode
from .capture import PACE_ENV
from .config import Config, LibraryConfig, ListenerConfig, MqttConfig, ScrobblerConfig, SpoolConfig
from .library import ingest, scan
from .messages import ClipHeader, ListenerState, MatchResult, MessageError, PlayEvent, ScrobbleEvent, Topics
from .run import run
from .store import Store
from .turntable import CONDITIONS, simulate

BUNDLED = Path(__file__).resolve().parent.parent / "tests" / "data"
RATE = 44100
SIDE = ("good_deck", "worn_plus2", "33_at_45")  # one condition per library track played
GAP_S, LEAD_S = 2.5, 2.0
TURNTABLE = "demo_turntable"


def run_demo(music: Path | None, mqtt_host: str | None, mqtt_port: int, pace: float, out=print) -> int:
    music = Path(music) if music else BUNDLED
    files = sorted(scan([music])) if music.exists() else []
    library = [f for f in files if not f.name.startswith("unknown")]
    strangers = [f for f in files if f.name.startswith("unknown")]
    if len(library) < len(SIDE):
        out(f"vinyl-mqtt demo: need at least {len(SIDE)} recordings in {music} (pass --music DIR)")
        return 2
    with tempfile.TemporaryDirectory(prefix="vinyl-mqtt-demo-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        host, port = _broker(mqtt_host, mqtt_port, tmp, stack, out)
        if host is None:
            return 2
        db = tmp / "library.sqlite"
        out(f"library: fingerprinting {len(library)} bundled recordings ...")
        with Store(db) as store:
            report = ingest(store, library)
            titles = {t.path: t for t in store.tracks()}
        out(f"  {report.summary()}")
        side, plan = _record_side(library, strangers, titles)
        device, env = alsa_file_device(tmp, side, RATE, 2, "S16_LE", name="demo_turntable")
        os.environ["ALSA_CONFIG_PATH"] = env["ALSA_CONFIG_PATH"]
        os.environ[PACE_ENV] = str(pace)
        out(f"record: {len(side) / RATE:.0f} s side through ALSA device {device!r}, played at {pace:g}x:")
        for i, (label, cond) in enumerate(plan, 1):
            out(f"  {i}. {label}  [{cond}]")
        cfg = Config(
            node="demo",
            roles=["listener", "matcher", "dedupe", "nowplaying", "scrobbler"],
            mqtt=MqttConfig(host=host, port=port),
            library=LibraryConfig(db=db),
            listener=ListenerConfig(name=TURNTABLE, device=device, rate=RATE, channels=2,
                                    spool=SpoolConfig(dir=tmp / "spool")),
            scrobbler=ScrobblerConfig(dry_run=True, queue_db=tmp / "scrobbles.sqlite",
                                      session_key_file=tmp / "lastfm.session"),
        )
        duration = len(side) / RATE / pace + 8.0
        logging.getLogger("vinyl_mqtt").setLevel(logging.ERROR)  # the demo prints what matters
        out(f"broker {host}:{port}, topics {cfg.mqtt.base_topic}/{TURNTABLE}/... — listening:\n")
        heard = asyncio.run(_play(cfg, duration, out))
    out(f"\nrecognised {len(heard)} of {len(plan) - (1 if strangers else 0)} library tracks: "
        + (", ".join(heard) if heard else "none"))
    return 0


def _broker(host, port, tmp: Path, stack: contextlib.ExitStack, out):
    """The given broker, one already on localhost, or a Mosquitto started here."""
    if host:
        return host, port
    if _reachable("127.0.0.1", 1883):
        return "127.0.0.1", 1883
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        out("vinyl-mqtt demo: no MQTT broker on localhost:1883 and no mosquitto to start "
            "(sudo apt-get install mosquitto, or pass --mqtt-host)")
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(proc.terminate)
    deadline = time.monotonic() + 10
    while not _reachable("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            out(f"vinyl-mqtt demo: could not start {binary}")
            return None, None
        time.sleep(0.05)
    out(f"broker: started Mosquitto on 127.0.0.1:{port}")
    return "127.0.0.1", port


def _reachable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _record_side(library, strangers, titles):
    """Lead-in, then each track through its condition, gaps between: stereo float."""
    rng = np.random.default_rng(7)
    parts = [np.zeros(int(LEAD_S * RATE), np.float32)]
    plan = []
    picks = [(p, c) for p, c in zip(library, SIDE)] + [(p, "good_deck") for p in strangers[:1]]
    for path, cond in picks:
        c = CONDITIONS[cond]
        y = simulate(decode(path, RATE), RATE, c, rng)  # the whole track, as a record plays it
        parts += [y, np.zeros(int(GAP_S * RATE), np.float32)]
        t = titles.get(str(path.resolve()))
        label = f"{t.artist or '?'} — {t.title}" if t else f"{path.name} (not in the library)"
        plan.append((label, c.description))
    mono = np.concatenate(parts)
    return np.stack([mono, mono * 0.95], axis=1), plan


async def _play(cfg: Config, duration: float, out) -> list[str]:
    topics = Topics(cfg.mqtt.base_topic)
    start = time.monotonic()
    narrator = _Narrator(topics)
    stamp = lambda: f"[{time.monotonic() - start:5.1f} s]"  # noqa: E731
    roles = asyncio.create_task(run(cfg))
    try:
        async with aiomqtt.Client(cfg.mqtt.host, cfg.mqtt.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe(f"{topics.base}/{TURNTABLE}/#", qos=1)
            await client.subscribe(topics.status(cfg.node, "+"), qos=1)
            async with asyncio.timeout(duration):
                async for msg in client.messages:
                    line = narrator.describe(msg)
                    if line:
                        out(f"{stamp()} {line}")
    except TimeoutError:
        pass
    finally:
        roles.cancel()
        await asyncio.gather(roles, return_exceptions=True)
    return narrator.heard


class _Narrator:
    """Turns the topics' traffic into one line per event worth telling."""

    def __init__(self, topics: Topics):
        self.topics = topics
        self.heard: list[str] = []
        self.state: str | None = None

    def describe(self, msg) -> str | None:
        topics, topic, payload = self.topics, msg.topic.value, msg.payload
        try:
            if topic.endswith("/status"):
                return f"{topics.parts(topic)[1]} {payload.decode()}"
            if topic == topics.listener_state(TURNTABLE):
                s = ListenerState.parse(payload)
                if s.state == self.state:
                    return None  # a level update, not news
                self.state = s.state
                return f"turntable {s.state} (level {s.rms_dbfs:.0f} dBFS)"
            if topic == topics.clip(TURNTABLE):
                n = int.from_bytes(payload[4:8], "little")
                h = ClipHeader.parse(payload[8: 8 + n])
                return f"clip {h.seq} sent ({h.reason.replace('_', ' ')}, {h.duration_s:.1f} s, {len(payload) // 1024} KiB)"
            if topic == topics.match(TURNTABLE):
                return self._match(MatchResult.parse(payload))
            if topic == topics.play(TURNTABLE):
                e = PlayEvent.parse(payload)
                t = e.play.track
                extra = f", played {e.play.played_s:.0f} s ({e.play.end_reason})" if e.event == "ended" else ""
                return f"play {e.event}: {t.artist or '?'} — {t.title}{extra}" if e.event != "updated" else None
            if topic == topics.scrobble(TURNTABLE):
                e = ScrobbleEvent.parse(payload)
                why = f" ({e.reason})" if e.reason else ""
                return f"Last.fm (dry run): {e.status.replace('_', ' ')} {e.artist or '?'} — {e.title}{why}"
        except (MessageError, UnicodeDecodeError) as e:
            return f"{topic}: unreadable ({e})"
        return None

    def _match(self, r: MatchResult) -> str:
        if not r.matched:
            return f"clip {r.seq}: no match — not in the library ({r.identify_ms:.0f} ms)"
        t = r.track
        name = f"{t.artist or '?'} — {t.title}"
        if name not in self.heard:
            self.heard.append(name)
        rpm = f", playing {r.rpm_mistake} rpm!" if r.rpm_mistake else ""
        return (f"clip {r.seq}: {name} ({t.album or '?'}) at {r.offset_s:.1f} s, speed "
                f"{r.speed_error_pct:+.2f} %{rpm} (confidence {r.confidence:.2f}, {r.identify_ms:.0f} ms)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(None, None, 1883, 2.0))
