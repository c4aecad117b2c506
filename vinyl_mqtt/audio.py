"""Audio decoding and sample conversion.

Every path into the fingerprinter goes through here and comes out the same
way: float32 mono in [-1, 1] at the fingerprint rate.

* Library files are decoded in-process with PyAV (FFmpeg's libraries), the
  channels are averaged straight from the frames' plane buffers with
  ``np.frombuffer`` (no ``to_ndarray``), and the mono signal is fed block by
  block into a streaming soxr resampler, so memory stays at one small block of
  full-rate audio plus the (small) output.
* Captured ALSA audio (interleaved S16_LE / S32_LE / FLOAT_LE bytes) joins the
  same path via :func:`pcm_to_float` / :func:`to_mono` and :func:`resample`,
  which live in :mod:`vinyl_mqtt.pcm` so the Pi listener need not load FFmpeg.

Failures of any kind are reported as :class:`AudioError`; a file that decodes
only part-way (corrupt or truncated) is an error too, so a damaged library file
gets reported instead of silently half-indexed.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import av
import numpy as np
import soxr

from .pcm import DEFAULT_QUALITY, pcm_to_float, resample, to_mono

log = logging.getLogger(__name__)

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioError",
    "DEFAULT_QUALITY",
    "decode",
    "pcm_to_float",
    "probe_duration",
    "resample",
    "to_mono",
]

AUDIO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp3", ".flac", ".m4a", ".mp4", ".aac", ".ogg", ".oga", ".opus", ".wav"}
)


# Samples of full-rate mono audio collected before they are handed to the
# resampler: 256 KiB of float32 stays in L2 cache between downmix and soxr.
_BLOCK = 1 << 16

# Slack when comparing the decoded length with the length the container
# declares (encoder delay/padding, edit lists, Opus pre-skip: all < 50 ms).
_END_TOLERANCE_S = 0.25

# A forward jump in frame timestamps larger than this means the demuxer skipped
# damaged data (FFmpeg's Ogg demuxer drops pages with a bad CRC and its FLAC
# parser resyncs past broken frames, both without raising).  Healthy files
# show at most ~20 ms of timestamp jitter.
_GAP_S = 0.1
# Audio starting later than this means the beginning was lost.
_START_GAP_S = 0.25
# Demuxers that resync over damage silently and whose timestamps come from the
# stream itself (granules, frame headers), so a gap means lost audio.  MP4 and
# Matroska timestamps may legitimately have gaps and offsets: not checked.
_GAP_CHECKED_FORMATS = frozenset({"ogg", "flac", "mp3", "aac"})

# Containers whose declared duration is exact (taken from headers/index, not
# estimated from the bit rate), so decoding noticeably less means truncation.
_EXACT_DURATION_FORMATS = frozenset(
    {"flac", "ogg", "wav", "w64", "aiff", "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"}
)


class AudioError(Exception):
    """A file (or buffer) could not be turned into audio samples."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self):  # keep (path, reason) across process pools
        return (type(self), (self.path, self.reason))


# --------------------------------------------------------------------------
# file decoding

# PyAV sample format name (packed form) -> (numpy dtype, offset, scale)
_FMT = {
    "u8": (np.dtype(np.uint8), 128.0, 1.0 / 128),
    "s16": (np.dtype(np.int16), 0.0, 1.0 / 32768),
    "s32": (np.dtype(np.int32), 0.0, 1.0 / 2147483648),
    "s64": (np.dtype(np.int64), 0.0, 1.0 / 9223372036854775808),
    "flt": (np.dtype(np.float32), 0.0, 1.0),
    "dbl": (np.dtype(np.float64), 0.0, 1.0),
}


class _Mixdown:
    """Collects decoded frames as mono float32 and streams them into soxr.

    A change of sample format or channel count flushes the current block (its
    scale differs); a change of sample rate (chained Ogg, odd MP3s) also
    finishes the current resampler and starts a new one.
    """

    def __init__(self, out_rate: int, quality: str, time_base: float | None = None) -> None:
        self.out_rate = out_rate
        self.quality = quality
        self.buf = np.empty(_BLOCK, dtype=np.float32)
        self.fill = 0
        self.key: tuple[str, int, int] | None = None
        self.in_rate = 0
        self.channels = 1
        self.planar = False
        self.dtype = np.dtype(np.float32)
        self.offset = 0.0
        self.scale = 1.0
        self.resampler: soxr.ResampleStream | None = None
        self.out: list[np.ndarray] = []
        self.done_seconds = 0.0  # input audio already handed to the resampler
        # timestamp continuity (stream time_base units)
        self.tb = time_base if time_base and time_base > 0 else None
        self.next_pts: float | None = None
        self.ticks_per_sample = 0.0
        self.gap_ticks = _GAP_S / self.tb if self.tb else 0.0

    @property
    def seconds(self) -> float:
        """Seconds of input audio decoded so far."""
        return self.done_seconds + (self.fill / self.in_rate if self.in_rate else 0.0)

    def add(self, frame: av.AudioFrame) -> None:
        n = frame.samples
        if n <= 0:
            return
        key = (frame.format.name, frame.layout.nb_channels, frame.rate)
        if key != self.key:
            self._switch(key)
        if self.tb is not None:
            pts = frame.pts
            if pts is not None:
                nxt = self.next_pts
                if nxt is None:
                    if pts * self.tb > _START_GAP_S:
                        raise _Gap(self.seconds, pts * self.tb)
                elif pts - nxt > self.gap_ticks:
                    raise _Gap(self.seconds, (pts - nxt) * self.tb)
                self.next_pts = pts + n * self.ticks_per_sample
            elif self.next_pts is not None:
                self.next_pts += n * self.ticks_per_sample
        if self.fill + n > self.buf.shape[0]:
            self._flush()
            if n > self.buf.shape[0]:
                self.buf = np.empty(n, dtype=np.float32)
        dst = self.buf[self.fill : self.fill + n]
        planes = frame.planes
        ch = self.channels
        dt = self.dtype
        fb = np.frombuffer
        if self.planar:
            if ch == 1:
                dst[:] = fb(planes[0], dt, n)
            else:
                np.add(fb(planes[0], dt, n), fb(planes[1], dt, n), out=dst, dtype=np.float32)
                for p in planes[2:ch]:
                    np.add(dst, fb(p, dt, n), out=dst, dtype=np.float32)
        else:
            a = fb(planes[0], dt, n * ch)
            if ch == 1:
                dst[:] = a
            elif ch == 2:
                np.add(a[0::2], a[1::2], out=dst, dtype=np.float32)
            else:
                np.sum(a.reshape(n, ch), axis=1, dtype=np.float32, out=dst)
        self.fill += n

    def _switch(self, key: tuple[str, int, int]) -> None:
        name, channels, rate = key
        base = name[:-1] if name.endswith("p") else name
        if base not in _FMT:
            raise _UnsupportedFormat(name)
        if channels < 1:
            raise _UnsupportedFormat(f"{name} with {channels} channels")
        self._flush()
        if rate != self.in_rate:
            self._finish_resampler()
            self.in_rate = rate
            if rate != self.out_rate:
                self.resampler = soxr.ResampleStream(
                    rate, self.out_rate, 1, dtype="float32", quality=self.quality
                )
        self.key = key
        if self.tb is not None:
            self.ticks_per_sample = 1.0 / (rate * self.tb)
        self.channels = channels
        self.planar = name.endswith("p")
        self.dtype, self.offset, self.scale = _FMT[base]

    def _flush(self) -> None:
        if not self.fill:
            return
        blk = self.buf[: self.fill]
        if self.offset:
            blk -= np.float32(self.offset * self.channels)
        k = self.scale / self.channels
        if k != 1.0:
            blk *= np.float32(k)
        if self.resampler is not None:
            y = self.resampler.resample_chunk(blk)
            if y.shape[0]:
                self.out.append(y)
        else:
            self.out.append(blk.copy())
        self.done_seconds += self.fill / self.in_rate
        self.fill = 0

    def _finish_resampler(self) -> None:
        if self.resampler is not None:
            y = self.resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            if y.shape[0]:
                self.out.append(y)
            self.resampler = None

    def finish(self) -> np.ndarray:
        self._flush()
        self._finish_resampler()
        if not self.out:
            return np.zeros(0, dtype=np.float32)
        if len(self.out) == 1:
            return self.out[0]
        return np.concatenate(self.out)


class _UnsupportedFormat(Exception):
    pass


class _Gap(Exception):
    def __init__(self, at: float, missing: float) -> None:
        self.at = at
        self.missing = missing


def _av_url(path: str) -> str:
    # "file:" stops FFmpeg from reading "Artist: Title.mp3" as a protocol name.
    return "file:" + os.path.abspath(path)


def _first_lower(s: str) -> str:
    return s[:1].lower() + s[1:] if s[:2] != s[:2].upper() else s


def _err_text(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return _first_lower(str(text).strip())


def _open_reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, av.InvalidDataError):
        return f"not an audio file ({_err_text(e)})"
    if isinstance(e, (av.EOFError, EOFError)):
        return "not an audio file, or truncated (end of file reached while reading the headers)"
    return f"cannot open ({_err_text(e)})"


def _check_file(p: str) -> None:
    try:
        st = os.stat(p)
    except OSError as e:
        raise AudioError(p, _open_reason(e)) from e
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(p, "is a directory")
    if st.st_size == 0:
        raise AudioError(p, "file is empty")


def _mp3_has_vbr_header(p: str) -> bool:
    """True if the first MPEG frame carries a Xing/Info/VBRI header, i.e. the
    frame count (and so FFmpeg's duration) is exact rather than estimated."""
    try:
        with open(p, "rb") as f:
            head = f.read(10)
            start = 0
            if len(head) == 10 and head[:3] == b"ID3":
                size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
                start = 10 + size + (10 if head[5] & 0x10 else 0)
            f.seek(start)
            data = f.read(1 << 16)
    except OSError:
        return False
    i = 0
    while True:
        i = data.find(b"\xff", i)
        if i < 0 or i + 4 > len(data):
            return False
        if data[i + 1] & 0xE0 == 0xE0:
            frame = data[i : i + 200]
            return b"Xing" in frame or b"Info" in frame or b"VBRI" in frame
        i += 1


def _declared_duration(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _duration_is_exact(container: av.container.InputContainer, path: str) -> bool:
    name = container.format.name
    if name in _EXACT_DURATION_FORMATS:
        return True
    if name == "mp3":
        return _mp3_has_vbr_header(path)
    return False


def decode(
    path: str | os.PathLike[str], rate: int, *, quality: str = DEFAULT_QUALITY
) -> np.ndarray:
    """Decode the first audio stream of ``path`` to float32 mono at ``rate`` Hz.

    Raises :class:`AudioError` for anything that goes wrong: missing, empty or
    non-audio files, no audio stream, a decode error part-way through (unless
    it is within the last moments of the declared length), or a file that ends
    noticeably before the length its container declares (truncated).
    """
    p = os.fspath(path)
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    _check_file(p)
    try:
        container = av.open(_av_url(p), metadata_errors="replace")
    except (av.FFmpegError, OSError) as e:
        raise AudioError(p, _open_reason(e)) from e
    except Exception as e:  # pragma: no cover - anything else PyAV may raise
        raise AudioError(p, f"cannot open ({_err_text(e)})") from e

    with container:
        try:
            streams = container.streams.audio
            if not streams:
                fmt = container.format.long_name or container.format.name
                raise AudioError(p, f"no audio stream (detected as {fmt})")
            stream = streams[0]
            cc = stream.codec_context
            if cc is None:
                raise AudioError(p, "unsupported audio codec")
            fmt_name = container.format.name
            declared = _declared_duration(container, stream)
            exact = declared is not None and _duration_is_exact(container, p)
        except AudioError:
            raise
        except Exception as e:
            raise AudioError(p, f"cannot read streams ({_err_text(e)})") from e

        tb = None
        if fmt_name in _GAP_CHECKED_FORMATS and stream.time_base is not None:
            tb = float(stream.time_base)
        mix = _Mixdown(rate, quality, tb)

        def near_end() -> bool:
            return declared is not None and mix.seconds >= declared - _END_TOLERANCE_S

        def failed(e: BaseException) -> AudioError:
            t = mix.seconds
            where = "at the start" if t == 0 else f"after {t:.1f} s"
            return AudioError(p, f"decoding failed {where}: {_err_text(e)}")

        try:
            packets = container.demux(stream)
            while True:
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                except av.FFmpegError as e:  # container damaged
                    if near_end():
                        log.debug("%s: read error at the end ignored: %s", p, e)
                        break
                    raise failed(e) from e
                if packet.size == 0:
                    # Nothing to decode (the end-of-stream marker, or an empty
                    # Ogg packet, which FFmpeg's Vorbis decoder rejects).
                    continue
                try:
                    frames = cc.decode(packet)
                except av.FFmpegError as e:
                    if near_end():
                        log.debug("%s: decode error at the end ignored: %s", p, e)
                        continue
                    raise failed(e) from e
                for frame in frames:
                    mix.add(frame)
            try:
                for frame in cc.decode(None):
                    mix.add(frame)
            except av.FFmpegError as e:
                if not near_end():
                    raise failed(e) from e
            out = mix.finish()
        except AudioError:
            raise
        except _Gap as e:
            where = "at the start" if e.at == 0 else f"after {e.at:.1f} s"
            raise AudioError(p, f"damaged: {e.missing:.2f} s of audio missing {where}") from e
        except _UnsupportedFormat as e:
            raise AudioError(p, f"unsupported sample format {e}") from e
        except MemoryError as e:
            raise AudioError(p, f"out of memory after {mix.seconds:.1f} s") from e
        except Exception as e:
            raise failed(e) from e

    decoded = mix.seconds
    if decoded == 0:
        raise AudioError(p, "no audio decoded")
    if exact and declared is not None and decoded < declared - _END_TOLERANCE_S:
        raise AudioError(
            p, f"truncated: decoding stopped after {decoded:.1f} s of {declared:.1f} s"
        )
    if fmt_name == "wav":
        missing = _wav_missing_seconds(p)
        if missing > _END_TOLERANCE_S:
            raise AudioError(
                p, f"truncated: decoding stopped after {decoded:.1f} s, "
                f"{missing:.1f} s of the declared data missing"
            )
    return out


def _wav_missing_seconds(p: str) -> float:
    """Seconds of PCM the RIFF header promises beyond the end of the file
    (FFmpeg quietly clamps a truncated WAV's length to the file size)."""
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return 0.0
            byte_rate = 0
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                hdr = f.read(8)
                if len(hdr) < 8:
                    return 0.0
                cid, clen = hdr[:4], int.from_bytes(hdr[4:], "little")
                if cid == b"fmt ":
                    fmt = f.read(16)
                    if len(fmt) == 16:
                        byte_rate = int.from_bytes(fmt[8:12], "little")
                elif cid == b"data":
                    # 0 and ~0xFFFFFFFF mean "length unknown" (written to a pipe)
                    if not byte_rate or clen == 0 or clen >= 0x7FFF0000:
                        return 0.0
                    return max(0, pos + 8 + clen - size) / byte_rate
                pos += 8 + clen + (clen & 1)
    except OSError:
        return 0.0
    return 0.0


def probe_duration(path: str | os.PathLike[str]) -> float | None:
    """Duration in seconds from container metadata (no decoding), or None."""
    p = os.fspath(path)
    try:
        with av.open(_av_url(p), metadata_errors="replace") as container:
            streams = container.streams.audio
            if not streams:
                return None
            return _declared_duration(container, streams[0])
    except Exception:
        return None


def is_audio_path(path: str | os.PathLike[str]) -> bool:
    """True if the file name has one of :data:`AUDIO_EXTENSIONS`."""
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS
