"""ALSA line-in capture for the listener (pyalsaaudio).

A :class:`Capture` opens one capture PCM, reads whole periods in a dedicated
thread (``snd_pcm_readi`` blocks, and must never block the asyncio loop),
converts each period to float32 mono with :func:`vinyl_mqtt.audio.pcm_to_float`
in that thread, and hands :class:`Block` objects to the loop through a small
bounded buffer::

    cap = open_capture(cfg.listener)
    try:
        async for block in cap.blocks():
            ...  # block.samples, block.index, block.captured_at
    finally:
        cap.close()

The listener's clock is the sample count: :attr:`Block.index` is the index of
the block's first sample at the capture rate, counted over every frame
delivered since the PCM was opened.  So the listener behaves the same whether
ALSA paces reads in real time (a sound card) or not (ALSA's ``file`` plugin in
tests, which returns periods as fast as they are asked for).

Overload and errors:

* If the loop falls behind, the *oldest* queued block is dropped (counted in
  :attr:`Capture.dropped_blocks`, logged with a rate limit): memory stays
  bounded and the listener keeps hearing the present.  ``overflow="block"``
  makes the reader wait instead (ALSA then overruns on a real card; with an
  unpaced test source nothing is lost).
* An ALSA overrun (xrun) is recovered by pyalsaaudio (the next ``read()``
  re-prepares the PCM), counted in :attr:`Capture.xruns` and logged.  The
  samples lost in an xrun are not counted by ``index``; ``captured_at`` is
  re-anchored to the wall clock so it stays honest.
* Anything else (no such device, busy, unplugged, unsupported parameters) is a
  :class:`CaptureError` naming the device and the reason: raised by
  :func:`open_capture` / :meth:`Capture.start` when opening, or from
  :meth:`Capture.blocks` when the device fails while running.

Sources that are not paced by a clock (the ``file`` plugin on a ``null``
slave) return audio as fast as it is read, and at the end of the input file
they return silence (zeros) forever, never an error.  ``pace`` (or the
environment variable ``VINYL_MQTT_CAPTURE_PACE`` read by
:func:`open_capture`: ``1`` = real time, ``10`` = ten times faster) makes the
reader sleep so it never delivers faster than that multiple of real time.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .pcm import pcm_to_float
from .config import ListenerConfig

try:  # pyalsaaudio; absent on non-Linux development machines
    import alsaaudio
except ImportError:  # pragma: no cover - exercised only without pyalsaaudio
    alsaaudio = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = [
    "Block",
    "Capture",
    "CaptureError",
    "PACE_ENV",
    "cards",
    "list_devices",
    "open_capture",
]

#: Environment variable read by :func:`open_capture`: pace an unpaced source
#: (ALSA ``file`` plugin) at this multiple of real time.
PACE_ENV = "VINYL_MQTT_CAPTURE_PACE"

# Blocks held between the reader thread and the loop: ~1.5 s at the default
# 1024 frames / 44.1 kHz.  Enough to ride out a slow callback on the loop,
# small enough that a stalled loop costs only ~256 KiB.
DEFAULT_QUEUE_BLOCKS = 64

# captured_at is the anchor time + index / rate; when that estimate and the
# time the read returned disagree by more than this, re-anchor (an xrun lost
# samples, the card clock drifted, or the source is not paced by a clock).
_REANCHOR_S = 0.25

# Log at most one overload / xrun line per this many seconds.
_LOG_EVERY_S = 10.0

# How long close() waits for the reader thread (one period is ~23 ms).
_JOIN_S = 2.0


class CaptureError(Exception):
    """Capture failed: names the device and the reason."""

    def __init__(self, device: str, reason: str) -> None:
        self.device = device
        self.reason = reason
        super().__init__(f"ALSA capture device {device!r}: {reason}")

    def __reduce__(self):
        return (type(self), (self.device, self.reason))


@dataclass(frozen=True, slots=True)
class Block:
    """One period of captured audio."""

    samples: np.ndarray  # float32 mono in [-1, 1]
    frames: int  # == len(samples)
    index: int  # sample index of samples[0] at the capture rate
    rate: int  # capture rate (Hz)
    captured_at: float  # wall-clock (epoch seconds) estimate of samples[0]

    @property
    def end(self) -> int:
        """Index one past the last sample."""
        return self.index + self.frames


def _require_alsa() -> None:
    if alsaaudio is None:  # pragma: no cover
        raise CaptureError("(any)", "pyalsaaudio (module alsaaudio) is not installed")


def _formats() -> dict[str, int]:
    _require_alsa()
    return {
        "S16_LE": alsaaudio.PCM_FORMAT_S16_LE,
        "S32_LE": alsaaudio.PCM_FORMAT_S32_LE,
        "FLOAT_LE": alsaaudio.PCM_FORMAT_FLOAT_LE,
    }


def _alsa_reason(e: BaseException) -> str:
    """pyalsaaudio's message without the trailing ``[device]`` it appends."""
    msg = str(e.args[0]) if getattr(e, "args", None) else str(e)
    if msg.endswith("]") and " [" in msg:
        msg = msg[: msg.rindex(" [")]
    low = msg.lower()
    if "no such file" in low:
        msg += " (unknown PCM name, or a file it needs is missing; see `vinyl-mqtt devices`)"
    elif "busy" in low:
        msg += " (another program is capturing from it)"
    elif "no such device" in low:
        msg += " (unplugged?)"
    return msg


def list_devices() -> list[str]:
    """Names usable as ``listener.device``: ALSA's capture PCMs (from the
    device hints: ``default``, ``sysdefault:CARD=x``, ``plughw:CARD=x,DEV=0``,
    and PCMs defined in asoundrc files), then ``plughw:CARD=<id>`` for every
    card whose hints did not already name it."""
    _require_alsa()
    try:
        names = list(alsaaudio.pcms(alsaaudio.PCM_CAPTURE))
    except alsaaudio.ALSAAudioError as e:
        log.warning("cannot list ALSA capture PCMs: %s", e)
        names = []
    seen = set(names)
    for _, card_id, _ in cards():
        if not any(f"CARD={card_id}" in n for n in names):
            name = f"plughw:CARD={card_id}"
            if name not in seen:
                names.append(name)
                seen.add(name)
    return names


def cards() -> list[tuple[int, str, str]]:
    """``(index, id, long name)`` of every sound card (cheap: no PCM is opened)."""
    _require_alsa()
    out: list[tuple[int, str, str]] = []
    try:
        ids = alsaaudio.cards()
        indexes = alsaaudio.card_indexes()
    except alsaaudio.ALSAAudioError as e:
        log.warning("cannot list ALSA cards: %s", e)
        return out
    for idx, card_id in zip(indexes, ids):
        try:
            _short, long_name = alsaaudio.card_name(idx)
        except alsaaudio.ALSAAudioError:
            long_name = card_id
        out.append((idx, card_id, long_name))
    return out


class Capture:
    """Reads one ALSA capture PCM in a thread; :meth:`blocks` yields on the loop."""

    def __init__(
        self,
        cfg: ListenerConfig,
        *,
        queue_blocks: int = DEFAULT_QUEUE_BLOCKS,
        overflow: Literal["drop_oldest", "block"] = "drop_oldest",
        pace: float | None = None,
        max_frames: int | None = None,
    ) -> None:
        """``pace``: never deliver faster than ``pace`` x real time (for
        unpaced sources); ``max_frames``: stop (end of :meth:`blocks`) after
        this many frames; both are mainly for tests and demos."""
        if queue_blocks < 1:
            raise ValueError("queue_blocks must be >= 1")
        if overflow not in ("drop_oldest", "block"):
            raise ValueError(f"overflow must be 'drop_oldest' or 'block', not {overflow!r}")
        if pace is not None and not (pace > 0 and math.isfinite(pace)):
            raise ValueError(f"pace must be a positive number, not {pace!r}")
        self.cfg = cfg
        self.device = cfg.device
        self.format = cfg.format
        self.channels = cfg.channels
        self.rate = cfg.rate  # updated to what the device actually gives
        self.period_frames = cfg.period_frames
        self.queue_blocks = queue_blocks
        self.overflow = overflow
        self.pace = pace
        self.max_frames = max_frames

        # counters (written by the reader thread, read anywhere)
        self.frames_read = 0
        self.blocks_read = 0
        self.dropped_blocks = 0
        self.dropped_frames = 0
        self.xruns = 0
        self.reanchors = 0

        self._pcm = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._queue: collections.deque[Block] = collections.deque()
        self._error: CaptureError | None = None
        self._finished = False  # reader thread ended (error, max_frames or close)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._waiting = False
        self._last_drop_log = 0.0
        self._last_xrun_log = 0.0
        self._cpu_s = 0.0  # reader thread CPU time, measured at exit

    # ------------------------------------------------------------------ open

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _open_pcm(self):
        """Open and configure the PCM; CaptureError on any failure."""
        _require_alsa()
        fmt = _formats()[self.format]
        try:
            pcm = alsaaudio.PCM(
                type=alsaaudio.PCM_CAPTURE,
                mode=alsaaudio.PCM_NORMAL,
                device=self.device,
                rate=self.rate,
                channels=self.channels,
                format=fmt,
                periodsize=self.period_frames,
            )
        except alsaaudio.ALSAAudioError as e:
            raise CaptureError(self.device, f"cannot open: {_alsa_reason(e)}") from e
        except (TypeError, ValueError) as e:  # bad parameter for this pyalsaaudio
            raise CaptureError(self.device, f"cannot open: {e}") from e
        try:
            info = pcm.info()
        except alsaaudio.ALSAAudioError as e:
            pcm.close()
            raise CaptureError(self.device, f"cannot query parameters: {_alsa_reason(e)}") from e
        got_fmt = info.get("format_name")
        got_ch = info.get("channels")
        if got_fmt != self.format or got_ch != self.channels:
            pcm.close()
            raise CaptureError(
                self.device,
                f"does not support {self.format} x {self.channels} channels "
                f"(it offered {got_fmt} x {got_ch}); try the plughw: or default device",
            )
        rate = int(info.get("rate") or self.rate)
        if rate != self.rate:
            log.warning(
                "ALSA capture device %r: asked for %d Hz, got %d Hz; capturing at %d Hz",
                self.device, self.rate, rate, rate,
            )
            self.rate = rate
        period = int(info.get("period_size") or self.period_frames)
        if period != self.period_frames:
            log.info(
                "ALSA capture device %r: period of %d frames instead of %d",
                self.device, period, self.period_frames,
            )
            self.period_frames = period
        log.info(
            "capturing from %r: %s x %d @ %d Hz, %d-frame periods, %s buffer frames",
            self.device, self.format, self.channels, self.rate, self.period_frames,
            info.get("buffer_size"),
        )
        return pcm

    def start(self) -> "Capture":
        """Open the PCM (raising CaptureError right away if it cannot be) and
        start the reader thread.  Idempotent."""
        if self._thread is not None:
            return self
        self._pcm = self._open_pcm()
        self._thread = threading.Thread(
            target=self._run, name=f"capture:{self.device}", daemon=True
        )
        self._thread.start()
        return self

    # ---------------------------------------------------------------- reader

    def _run(self) -> None:
        pcm = self._pcm
        fmt, channels = self.format, self.channels
        rate = self.rate
        index = 0
        anchor_t: float | None = None  # wall time of sample anchor_i
        anchor_i = 0
        pace_t0 = time.monotonic()
        cpu0 = time.thread_time()
        try:
            while not self._stop.is_set():
                try:
                    n, data = pcm.read()
                except alsaaudio.ALSAAudioError as e:
                    if self._stop.is_set():
                        break
                    raise CaptureError(self.device, f"read failed: {_alsa_reason(e)}") from e
                now = time.time()
                if n < 0:
                    if n == -errno.EPIPE:  # overrun; the next read() re-prepares
                        self.xruns += 1
                        anchor_t = None  # samples were lost: re-anchor on the next block
                        if now - self._last_xrun_log >= _LOG_EVERY_S:
                            self._last_xrun_log = now
                            log.warning(
                                "ALSA capture device %r: overrun (xrun), %d so far; recovered",
                                self.device, self.xruns,
                            )
                        continue
                    raise CaptureError(self.device, f"read failed: {os.strerror(-n)}")
                if n == 0:
                    continue
                frames = n
                samples = pcm_to_float(data, fmt, channels)
                if self.max_frames is not None and index + frames > self.max_frames:
                    frames = self.max_frames - index
                    samples = samples[:frames]
                    if frames <= 0:
                        break

                # wall time of the first sample: the read returned when the
                # period's last frame (and `avail` later ones) had arrived
                try:
                    avail = max(pcm.avail(), 0)
                except alsaaudio.ALSAAudioError:
                    avail = 0
                read_est = now - (n + avail) / rate
                if anchor_t is None:
                    anchor_t, anchor_i = read_est, index
                    est = read_est
                else:
                    est = anchor_t + (index - anchor_i) / rate
                    if abs(est - read_est) > _REANCHOR_S:
                        anchor_t, anchor_i = read_est, index
                        est = read_est
                        self.reanchors += 1

                self._put(Block(samples, frames, index, rate, est))
                index += frames
                self.frames_read = index
                self.blocks_read += 1
                if self.max_frames is not None and index >= self.max_frames:
                    break
                if self.pace is not None:
                    ahead = index / (rate * self.pace) - (time.monotonic() - pace_t0)
                    if ahead > 0 and self._stop.wait(ahead):
                        break
        except CaptureError as e:
            log.error("%s", e)
            self._error = e
        except Exception as e:  # never die silently
            log.exception("capture thread for %r failed", self.device)
            self._error = CaptureError(self.device, f"capture thread failed: {e!r}")
        finally:
            self._cpu_s = time.thread_time() - cpu0
            try:
                pcm.close()
            except Exception:  # pragma: no cover
                pass
            with self._lock:
                self._finished = True
                self._space.notify_all()
            self._wake()

    def _put(self, block: Block) -> None:
        with self._lock:
            if len(self._queue) >= self.queue_blocks:
                if self.overflow == "block":
                    while len(self._queue) >= self.queue_blocks and not self._stop.is_set():
                        self._space.wait(0.1)
                    if self._stop.is_set():
                        return
                else:
                    old = self._queue.popleft()
                    self.dropped_blocks += 1
                    self.dropped_frames += old.frames
                    now = time.monotonic()
                    if now - self._last_drop_log >= _LOG_EVERY_S:
                        self._last_drop_log = now
                        log.warning(
                            "capture from %r: the listener fell behind, dropped the oldest "
                            "audio (%d blocks, %.1f s so far)",
                            self.device, self.dropped_blocks, self.dropped_frames / self.rate,
                        )
            self._queue.append(block)
            wake = self._waiting
            self._waiting = False
        if wake:
            self._wake()

    def _wake(self) -> None:
        loop, ev = self._loop, self._wakeup
        if loop is not None and ev is not None:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed
                pass

    # ------------------------------------------------------------------ loop

    def get_nowait(self) -> Block | None:
        """The oldest queued block, or None (thread-safe, non-blocking)."""
        with self._lock:
            if self._queue:
                b = self._queue.popleft()
                self._space.notify()
                return b
        return None

    async def blocks(self) -> AsyncIterator[Block]:
        """Yield blocks as they are captured (starting the reader if needed).

        Ends when :meth:`close` is called or ``max_frames`` were delivered;
        raises :class:`CaptureError` if the device fails."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self.start()
        while True:
            with self._lock:
                if self._stop.is_set():
                    break
                if self._queue:
                    b = self._queue.popleft()
                    self._space.notify()
                else:
                    b = None
                    if self._finished:
                        break
                    self._waiting = True
                    self._wakeup.clear()
            if b is not None:
                yield b
            else:
                await self._wakeup.wait()
        t = self._thread
        if self._finished and t is not None:
            t.join(_JOIN_S)  # it is past its last statement of interest: instant
        if self._error is not None and not self._stop.is_set():
            raise self._error

    @property
    def error(self) -> CaptureError | None:
        return self._error

    @property
    def cpu_seconds(self) -> float:
        """CPU time the reader thread used (read + convert); final after close()."""
        return self._cpu_s

    def stats(self) -> dict[str, float | int]:
        return {
            "frames": self.frames_read,
            "blocks": self.blocks_read,
            "dropped_blocks": self.dropped_blocks,
            "dropped_seconds": self.dropped_frames / self.rate if self.rate else 0.0,
            "xruns": self.xruns,
            "queued": len(self._queue),
        }

    def close(self) -> None:
        """Stop the reader thread (within about one period) and close the PCM."""
        self._stop.set()
        with self._lock:
            self._space.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(_JOIN_S)
            if t.is_alive():  # a read stuck in the driver: the daemon thread is abandoned
                log.warning("capture thread for %r did not stop within %.0f s", self.device, _JOIN_S)
        elif t is None and self._pcm is not None:
            self._pcm.close()
        self._wake()

    def __enter__(self) -> "Capture":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "Capture":
        return self.start()

    async def __aexit__(self, *exc) -> None:
        self.close()


def open_capture(cfg: ListenerConfig, *, pace: float | None = None, **kwargs) -> Capture:
    """Open ``cfg.device`` and start capturing (CaptureError if it cannot).

    ``pace`` defaults to the environment variable ``VINYL_MQTT_CAPTURE_PACE``
    (unset: no pacing, ALSA's clock paces the reads)."""
    if pace is None:
        env = os.environ.get(PACE_ENV, "").strip()
        if env:
            try:
                pace = float(env)
            except ValueError:
                raise CaptureError(cfg.device, f"{PACE_ENV}={env!r} is not a number") from None
            if not (pace > 0 and math.isfinite(pace)):
                raise CaptureError(cfg.device, f"{PACE_ENV}={env!r} must be > 0")
    return Capture(cfg, pace=pace, **kwargs).start()
