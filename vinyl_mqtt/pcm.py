"""Sample conversion and resampling: captured PCM and decoded files alike.

Kept apart from :mod:`vinyl_mqtt.audio` (which loads FFmpeg through PyAV) so
that the Pi listener, which only converts and resamples, stays small.
"""

from __future__ import annotations

import numpy as np
import soxr

#: soxr quality recipe used by :func:`resample` and :func:`decode`.
#: Measured for 44.1 kHz -> 8 kHz: 'LQ' already rolls off inside the band
#: the fingerprints use (-0.2 dB at 3.0 kHz, -8 dB at 3.4, -46 dB at 3.8 kHz),
#: 'MQ' and 'HQ' are flat (<= 0.1 dB) to 3.7 kHz and -2.7 dB at 3.8 kHz.
#: CPU per second of audio: LQ 0.109 ms, MQ 0.117 ms, HQ 0.133 ms, next to
#: ~0.7 ms for the Vorbis decode itself, so MQ costs under 1 % over LQ.
DEFAULT_QUALITY = "MQ"


_PCM_DTYPES = {"S16_LE": np.dtype("<i2"), "S32_LE": np.dtype("<i4"), "FLOAT_LE": np.dtype("<f4")}

# integer dtype kind/size -> (offset, scale) so that (x - offset) * scale is in [-1, 1]
_INT_SCALE = {
    np.dtype(np.uint8): (128.0, 1.0 / 128),
    np.dtype(np.int8): (0.0, 1.0 / 128),
    np.dtype(np.int16): (0.0, 1.0 / 32768),
    np.dtype(np.int32): (0.0, 1.0 / 2147483648),
    np.dtype(np.int64): (0.0, 1.0 / 9223372036854775808),
}


def to_mono(samples: np.ndarray, channels: int) -> np.ndarray:
    """Average channels to float32 mono in [-1, 1].

    ``samples`` is either interleaved 1-D (``frames * channels`` values) or
    2-D ``(frames, channels)``; int8/uint8/int16/int32/int64 are scaled to
    full range, float input is taken as already in [-1, 1] (and clipped).
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    a = np.asarray(samples)
    if a.ndim == 1:
        if a.size % channels:
            raise ValueError(f"{a.size} samples is not a whole number of {channels}-channel frames")
        a = a.reshape(-1, channels)
    elif a.ndim == 2:
        if a.shape[1] != channels:
            raise ValueError(f"expected shape (frames, {channels}), got {a.shape}")
    else:
        raise ValueError(f"expected 1-D or 2-D samples, got {a.ndim}-D")

    dt = a.dtype.newbyteorder("=") if a.dtype.byteorder not in "=|" else a.dtype
    if dt.kind == "f":
        if channels == 1:
            out = a[:, 0].astype(np.float32)  # copy
        else:
            out = a.sum(axis=1, dtype=np.float32)
            out *= np.float32(1.0 / channels)
        np.clip(out, -1.0, 1.0, out=out)
        return out
    if dt in _INT_SCALE:
        offset, scale = _INT_SCALE[dt]
        if channels == 1:
            out = a[:, 0].astype(np.float32)
        else:
            out = a.sum(axis=1, dtype=np.float64 if dt.itemsize >= 4 else np.float32).astype(
                np.float32, copy=False
            )
        if offset:
            out -= np.float32(offset * channels)
        out *= np.float32(scale / channels)
        return out
    raise ValueError(f"unsupported sample dtype {a.dtype}")


def pcm_to_float(buf: bytes, fmt: str, channels: int) -> np.ndarray:
    """Interleaved little-endian PCM bytes (ALSA ``S16_LE``, ``S32_LE`` or
    ``FLOAT_LE``) -> float32 mono in [-1, 1]."""
    try:
        dtype = _PCM_DTYPES[fmt.upper()]
    except KeyError:
        raise ValueError(
            f"unsupported PCM format {fmt!r} (expected one of {', '.join(_PCM_DTYPES)})"
        ) from None
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    frame_bytes = dtype.itemsize * channels
    if len(buf) % frame_bytes:
        raise ValueError(
            f"{len(buf)} bytes is not a whole number of {fmt} {channels}-channel frames"
        )
    a = np.frombuffer(buf, dtype=dtype)
    if dtype.byteorder not in "=|":  # big-endian host: make native before arithmetic
        a = a.astype(dtype.newbyteorder("="))
    return to_mono(a, channels)


def resample(
    x: np.ndarray, from_rate: int, to_rate: int, *, quality: str = DEFAULT_QUALITY
) -> np.ndarray:
    """Resample float32 audio (1-D, or ``(frames, channels)``) with soxr."""
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if from_rate == to_rate:
        return x.copy()
    if x.shape[0] == 0:
        return np.zeros((0,) + x.shape[1:], dtype=np.float32)
    return soxr.resample(x, from_rate, to_rate, quality=quality)
