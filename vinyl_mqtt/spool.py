"""A bounded on-disk spool for clips that could not be sent yet.

While no matcher (or no broker) is online the listener keeps its clips here
and sends them, oldest first, when one comes back.  A clip is only useful for
a while (``max_age_s``): older ones are dropped, never sent late.  At most
``max_clips`` are kept; beyond that the *oldest* go, so what survives is the
most recent listening.

Files: one per clip in ``cfg.dir``, named ``<captured_at ms>-<clip id>.clip``,
holding a small self-checking record::

    b"VMS1" | u32 header length | JSON {"clip_id", "captured_at", "size", "crc32"}
    | the encoded clip frame (vinyl_mqtt.messages.encode_clip)

Written to a temporary file, fsync'ed, renamed into place, then the
directory is fsync'ed: after a crash a clip is either there whole or not at
all.  A file that does not check out (truncated, bit rot, foreign) is logged
with its path and removed; it never stops the spool.  Leftover temporary
files of an interrupted write are removed when the spool is opened.

Delivery is at-least-once: :meth:`Spool.drain` yields clips oldest first but
removes one only when the caller confirms with :meth:`Spool.ack` (or uses
:meth:`Spool.sending`), so a crash mid-send leaves it for the next run.

Blocking file I/O, one small file per call: from asyncio, call it in a
thread (``asyncio.to_thread``) if the disk may be slow.  Not thread-safe:
use one Spool from one thread at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .config import SpoolConfig

log = logging.getLogger(__name__)

__all__ = ["Spool", "SpoolItem"]

MAGIC = b"VMS1"
SUFFIX = ".clip"
TMP_SUFFIX = ".tmp"
_MAX_HEADER = 4096
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class SpoolItem(NamedTuple):
    clip_id: str
    captured_at: float
    frame: bytes


@dataclass
class _Entry:
    clip_id: str
    captured_at: float
    path: Path
    seq: int  # arrival order, breaks ties between equal captured_at


class _Corrupt(Exception):
    pass


def _file_name(clip_id: str, captured_at: float) -> str:
    safe = _UNSAFE.sub("_", clip_id)[:100] or "clip"
    if safe != clip_id:  # keep ids that sanitise alike apart
        safe += f"-{zlib.crc32(clip_id.encode()):08x}"
    ms = max(0, int(round(captured_at * 1000)))
    return f"{ms:015d}-{safe}{SUFFIX}"


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_header(f) -> dict:
    head = f.read(8)
    if len(head) < 8 or head[:4] != MAGIC:
        raise _Corrupt("not a spool file (bad magic)" if len(head) >= 4 else "truncated header")
    (n,) = struct.unpack("<I", head[4:])
    if n > _MAX_HEADER:
        raise _Corrupt(f"header length {n} is implausible")
    raw = f.read(n)
    if len(raw) < n:
        raise _Corrupt("truncated header")
    try:
        meta = json.loads(raw)
        clip_id = meta["clip_id"]
        captured_at = float(meta["captured_at"])
        size = int(meta["size"])
        crc = int(meta["crc32"])
    except (ValueError, KeyError, TypeError) as e:
        raise _Corrupt(f"bad header ({e})") from None
    if not isinstance(clip_id, str) or size < 0:
        raise _Corrupt("bad header values")
    return {"clip_id": clip_id, "captured_at": captured_at, "size": size, "crc32": crc}


class Spool:
    """Bounded, crash-safe clip spool in ``cfg.dir`` (see the module doc)."""

    def __init__(self, cfg: SpoolConfig, *, clock: Callable[[], float] = time.time) -> None:
        """``clock``: the wall clock used when a call gives no ``now``."""
        self.cfg = cfg
        self.clock = clock
        self.dir = Path(cfg.dir)
        self.max_clips = cfg.max_clips
        self.max_age_s = cfg.max_age_s
        self.dropped_age = 0
        self.dropped_overflow = 0
        self.dropped_corrupt = 0
        self._entries: dict[str, _Entry] = {}
        self._seq = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        self._load()

    # ----------------------------------------------------------------- state

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, clip_id: object) -> bool:
        return clip_id in self._entries

    def ids(self) -> list[str]:
        """Clip ids, oldest first."""
        return [e.clip_id for e in self._ordered()]

    def stats(self) -> dict[str, int]:
        return {
            "queued": len(self._entries),
            "dropped_age": self.dropped_age,
            "dropped_overflow": self.dropped_overflow,
            "dropped_corrupt": self.dropped_corrupt,
        }

    def _ordered(self) -> list[_Entry]:
        return sorted(self._entries.values(), key=lambda e: (e.captured_at, e.seq))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ------------------------------------------------------------------ load

    def _load(self) -> None:
        try:
            names = sorted(os.listdir(self.dir))
        except OSError as e:
            log.error("spool %s: cannot list: %s", self.dir, e.strerror)
            return
        for name in names:
            path = self.dir / name
            if name.endswith(TMP_SUFFIX):
                log.info("spool: removing %s (an interrupted write)", path)
                self._unlink(path)
                continue
            if not name.endswith(SUFFIX):
                continue
            try:
                with open(path, "rb") as f:
                    meta = _read_header(f)
                    size = os.fstat(f.fileno()).st_size - f.tell()
                if size != meta["size"]:
                    raise _Corrupt(f"{size} bytes of clip where the header says {meta['size']}")
            except _Corrupt as e:
                self._drop_corrupt(path, str(e))
                continue
            except OSError as e:
                self._drop_corrupt(path, f"unreadable ({e.strerror})")
                continue
            cid = meta["clip_id"]
            old = self._entries.get(cid)
            if old is not None:  # two files for one id: keep the newer capture
                if old.captured_at >= meta["captured_at"]:
                    self._unlink(path)
                    continue
                self._unlink(old.path)
            self._entries[cid] = _Entry(cid, meta["captured_at"], path, self._next_seq())
        if self._entries:
            log.info("spool %s: %d clips waiting from before", self.dir, len(self._entries))
        self._enforce(self.clock())

    def _drop_corrupt(self, path: Path, reason: str) -> None:
        self.dropped_corrupt += 1
        log.warning("spool: removing corrupt file %s: %s", path, reason)
        self._unlink(path)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("spool: cannot remove %s: %s", path, e.strerror)

    # ------------------------------------------------------------------- put

    def put(self, clip_id: str, captured_at: float, frame: bytes, *, now: float | None = None) -> bool:
        """Store a clip (replacing one with the same id).  Returns False if
        it was not kept: already older than ``max_age_s``."""
        now = self.clock() if now is None else now
        if now - captured_at > self.max_age_s:
            self.dropped_age += 1
            log.info("spool: clip %s is %.0f s old, not kept", clip_id, now - captured_at)
            return False
        frame = bytes(frame)
        head = json.dumps(
            {"clip_id": clip_id, "captured_at": captured_at, "size": len(frame),
             "crc32": zlib.crc32(frame)},
            separators=(",", ":"),
        ).encode()
        path = self.dir / _file_name(clip_id, captured_at)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(head)) + head)
                f.write(frame)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.dir)
        except OSError:
            self._unlink(tmp)
            raise
        old = self._entries.get(clip_id)
        if old is not None and old.path != path:
            self._unlink(old.path)
        self._entries[clip_id] = _Entry(clip_id, captured_at, path, self._next_seq())
        self._enforce(now)
        return clip_id in self._entries

    def _enforce(self, now: float) -> None:
        for e in self._ordered():
            if now - e.captured_at > self.max_age_s:
                self._remove(e)
                self.dropped_age += 1
                log.info("spool: dropped clip %s (%.0f s old, limit %.0f s)",
                         e.clip_id, now - e.captured_at, self.max_age_s)
        excess = len(self._entries) - self.max_clips
        if excess > 0:
            for e in self._ordered()[:excess]:
                self._remove(e)
                self.dropped_overflow += 1
            log.warning("spool: full (%d clips), dropped the %d oldest", self.max_clips, excess)

    def _remove(self, e: _Entry) -> None:
        self._entries.pop(e.clip_id, None)
        self._unlink(e.path)

    # ----------------------------------------------------------------- drain

    def _read(self, e: _Entry) -> bytes:
        with open(e.path, "rb") as f:
            meta = _read_header(f)
            frame = f.read(meta["size"] + 1)
        if len(frame) != meta["size"]:
            raise _Corrupt(f"{len(frame)} bytes of clip where the header says {meta['size']}")
        if zlib.crc32(frame) != meta["crc32"]:
            raise _Corrupt("checksum mismatch")
        if meta["clip_id"] != e.clip_id:
            raise _Corrupt(f"holds clip {meta['clip_id']!r}, expected {e.clip_id!r}")
        return frame

    def drain(self, now: float | None = None) -> Iterator[SpoolItem]:
        """Clips oldest first, as ``(clip_id, captured_at, frame)``.

        Expired clips are deleted and skipped; a clip stays on disk until
        :meth:`ack` is called for it, so one the caller fails to send is
        yielded again by the next drain (break out of the loop on failure).
        ``now`` is read once per drain (default: the spool's clock)."""
        now = self.clock() if now is None else now
        for e in self._ordered():
            if self._entries.get(e.clip_id) is not e:  # acked/replaced meanwhile
                continue
            if now - e.captured_at > self.max_age_s:
                self._remove(e)
                self.dropped_age += 1
                log.info("spool: dropped clip %s (%.0f s old, limit %.0f s)",
                         e.clip_id, now - e.captured_at, self.max_age_s)
                continue
            try:
                frame = self._read(e)
            except _Corrupt as err:
                self._entries.pop(e.clip_id, None)
                self._drop_corrupt(e.path, str(err))
                continue
            except FileNotFoundError:
                self._entries.pop(e.clip_id, None)
                log.warning("spool: %s vanished", e.path)
                continue
            except OSError as err:
                self._entries.pop(e.clip_id, None)
                self._drop_corrupt(e.path, f"unreadable ({err.strerror})")
                continue
            yield SpoolItem(e.clip_id, e.captured_at, frame)

    def ack(self, clip_id: str) -> bool:
        """The clip was delivered: delete it.  False if it was not spooled."""
        e = self._entries.get(clip_id)
        if e is None:
            return False
        self._remove(e)
        return True

    @contextlib.contextmanager
    def sending(self, item: SpoolItem) -> Iterator[SpoolItem]:
        """``with spool.sending(item): await publish(...)`` acks on success and
        leaves the clip spooled if the block raises."""
        yield item
        self.ack(item.clip_id)
