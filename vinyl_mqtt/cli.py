"""The `vinyl-mqtt` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .config import Config, default_db, load
from .errors import VinylError

# The engine (scipy, PyAV, SQLite) is imported by the commands that use it: a
# Pi that only runs the listener stays small (~58 MB instead of ~102 MB).


def _store(args, create: bool = True):
    from .store import Store

    return Store(_db_path(args), create=create)


def _db_path(args) -> Path:
    if args.db:
        return Path(args.db)
    if args.config:
        return load(args.config).library.db
    return default_db()


def cmd_library_add(args) -> int:
    from .library import ingest

    with _store(args) as store:
        report = ingest(store, args.paths, workers=args.workers, progress=not args.quiet and sys.stderr.isatty())
    for path, reason in report.failed:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    print(report.summary())
    return 1 if report.failed and not report.added and not report.skipped else 0


def cmd_library_list(args) -> int:
    with _store(args, create=False) as store:
        tracks = store.tracks()
    for t in tracks:
        if args.json:
            print(json.dumps(t.to_dict()))
        else:
            num = f"{t.track_number:>2}. " if t.track_number else ""
            print(f"{t.id:>6}  {t.artist or '?'} — {t.album or '?'} — {num}{t.title}  [{_mmss(t.duration_s)}]  {t.path}")
    return 0


def cmd_library_stats(args) -> int:
    with _store(args, create=False) as store:
        s = store.stats()
    if args.json:
        print(json.dumps(s.__dict__))
    else:
        per_hour = s.size_bytes / 1e6 / s.hours if s.hours else 0.0
        print(f"tracks     {s.tracks}\nhours      {s.hours:.2f}\nhashes     {s.hashes}\ncovers     {s.covers}")
        print(f"size       {s.size_bytes / 1e6:.1f} MB on disk ({per_hour:.1f} MB per hour of audio)")
    return 0


def cmd_library_remove(args) -> int:
    with _store(args, create=False) as store:
        ids = sorted({i for spec in args.specs for i in store.find(spec)})
        missing = [s for s in args.specs if not store.find(s)]
        n = store.remove(ids)
    for s in missing:
        print(f"not in the library: {s}", file=sys.stderr)
    print(f"removed {n} track(s)")
    return 1 if missing else 0


def cmd_identify(args) -> int:
    with _store(args, create=False) as store:
        index = store.load_index()
        tracks = {t.id: t for t in store.tracks()}
    worst = 0
    for f in args.files:
        out = _identify_one(index, tracks, f)
        worst = max(worst, 2 if "error" in out else 0)
        if args.json:
            print(json.dumps(out), flush=True)
        elif "error" in out:
            print(f"{f}: error: {out['error']}")
        elif out["matched"]:
            rpm = f", played {out['rpm_mistake']}" if out["rpm_mistake"] else ""
            print(
                f"{f}: {out['artist'] or '?'} — {out['title']} ({out['album'] or '?'}) at {_mmss(out['offset_s'])}, "
                f"speed {out['speed_error_pct']:+.2f} %{rpm}, confidence {out['confidence']:.2f}"
            )
        else:
            print(f"{f}: no match")
    return worst


def _identify_one(index, tracks, f: str) -> dict:
    from . import fingerprint as fp
    from .audio import AudioError, decode

    out = {"file": f, "matched": False, "track_id": None, "title": None, "artist": None, "album": None,
           "library_path": None, "confidence": 0.0, "offset_s": None, "speed": None, "speed_error_pct": None,
           "rpm_mistake": None, "score": 0, "elapsed_ms": None, "decode_ms": None}
    t0 = time.perf_counter()
    try:
        x = decode(f, fp.SAMPLE_RATE)
    except AudioError as e:
        return {**out, "error": e.reason}
    out["decode_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    m = index.match(x)
    out.update(confidence=round(m.confidence, 3), score=m.score, elapsed_ms=round(m.elapsed_ms, 2))
    if m.matched:
        t = tracks[m.track_id]
        out.update(matched=True, track_id=t.id, title=t.title, artist=t.artist, album=t.album,
                   library_path=t.path, offset_s=round(m.offset_s, 2), speed=round(m.speed, 5),
                   speed_error_pct=round((m.speed - 1) * 100, 2), rpm_mistake=m.rpm_mistake)
    return out


def cmd_run(args) -> int:
    import asyncio

    from .run import RoleFailed, run

    cfg = load(args.config) if args.config else Config()
    roles = [r.strip() for r in args.roles.split(",")] if args.roles else None
    try:
        asyncio.run(run(cfg, roles))
    except RoleFailed as e:
        print(f"vinyl-mqtt: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_devices(args) -> int:
    from .capture import list_devices

    for d in list_devices():
        print(d)
    return 0


def cmd_config_check(args) -> int:
    from .config import check

    ok, text = check(args.file)
    print(text, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 2


def cmd_hass_remove(args) -> int:
    import asyncio

    import aiomqtt

    from .roles.nowplaying import remove_listener_once

    cfg = load(args.config) if args.config else Config()
    try:
        cleared = asyncio.run(remove_listener_once(cfg, args.listener))
    except aiomqtt.MqttError as e:
        print(f"cannot reach the MQTT broker {cfg.mqtt.host}:{cfg.mqtt.port}: {e}", file=sys.stderr)
        return 1
    print(f"removed turntable {args.listener!r} from Home Assistant ({len(cleared)} retained topics cleared)")
    return 0


def cmd_lastfm_login(args) -> int:
    from .lastfm_login import cmd_lastfm_login as login

    return login(args)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.music, args.mqtt_host, args.mqtt_port, args.pace)


def _mmss(s: float) -> str:
    s = max(0.0, s)
    return f"{int(s // 60)}:{int(s % 60):02d}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vinyl-mqtt", description="Recognise what the turntable plays; tell Home Assistant.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="YAML config (its library.db selects the store)")
    common.add_argument("--db", metavar="FILE", help=f"library store (default {default_db()})")
    common.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    lib = sub.add_parser("library", help="manage the music library").add_subparsers(dest="library_command", required=True)
    a = lib.add_parser("add", parents=[common], help="fingerprint files and folders into the library")
    a.add_argument("paths", nargs="+")
    a.add_argument("--workers", type=int, help="processes (default: every core)")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_library_add)
    ls = lib.add_parser("list", parents=[common], help="list tracks")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_library_list)
    st = lib.add_parser("stats", parents=[common], help="tracks, hours, hashes, size on disk")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_library_stats)
    rm = lib.add_parser("remove", parents=[common], help="remove tracks by id, file or folder")
    rm.add_argument("specs", nargs="+", metavar="ID|PATH")
    rm.set_defaults(func=cmd_library_remove)

    ident = sub.add_parser("identify", parents=[common], help="identify audio files against the library")
    ident.add_argument("files", nargs="+")
    ident.add_argument("--json", action="store_true", help="one JSON object per file per line")
    ident.set_defaults(func=cmd_identify)

    run = sub.add_parser("run", help="run the roles the config names (listener, matcher, ...)")
    run.add_argument("--config", metavar="FILE", help="YAML config")
    run.add_argument("--roles", metavar="ROLE,...", help="run these roles instead of the config's `roles`")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)

    dev = sub.add_parser("devices", help="list ALSA capture devices")
    dev.set_defaults(func=cmd_devices)

    cfg = sub.add_parser("config", help="the YAML configuration").add_subparsers(dest="config_command", required=True)
    chk = cfg.add_parser("check", help="validate a config file without running anything")
    chk.add_argument("file")
    chk.set_defaults(func=cmd_config_check)

    hs = sub.add_parser("hass", help="Home Assistant").add_subparsers(dest="hass_command", required=True)
    hr = hs.add_parser("remove", help="remove a decommissioned turntable's device and entities from Home Assistant "
                                      "(stop its listener first)")
    hr.add_argument("listener")
    hr.add_argument("--config", metavar="FILE")
    hr.set_defaults(func=cmd_hass_remove)

    lf = sub.add_parser("lastfm", help="Last.fm").add_subparsers(dest="lastfm_command", required=True)
    li = lf.add_parser("login", help="authorise vinyl-mqtt on Last.fm (stores only a session key)")
    li.add_argument("--config", metavar="FILE", help="YAML config (its scrobbler: section)")
    li.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the grant")
    li.set_defaults(func=cmd_lastfm_login)

    demo = sub.add_parser("demo", help="the whole chain on this machine: a simulated record through ALSA, "
                                       "the listener and matcher roles over MQTT")
    demo.add_argument("--music", metavar="DIR", help="recordings to use instead of the bundled ones")
    demo.add_argument("--mqtt-host", help="use this broker (default: localhost:1883 if up, else start Mosquitto)")
    demo.add_argument("--mqtt-port", type=int, default=1883)
    demo.add_argument("--pace", type=float, default=1.0,
                      help="play the record this many times real time (plays are timed by the wall clock: above 1 they look short)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (VinylError, FileNotFoundError) as e:
        print(f"vinyl-mqtt: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; everything added so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
