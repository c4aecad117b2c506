"""An ALSA capture PCM that plays a raw file, no hardware needed: the demo's
turntable and the tests' line-in.

ALSA's ``file`` PCM plugin passes a stream through to a slave PCM and, when
``infile`` is set, replaces every captured period with the next bytes of that
file.  With the ``null`` slave (accepts any format, rate and channel count)
that makes a capture device whose samples are exactly the file's::

    pcm.vinyl_test {
        type file
        slave.pcm "null"
        file "/dev/null"          # where a playback stream would be written
        infile "/tmp/.../vinyl_test.raw"
        format "raw"
    }

It is made visible to alsa-lib by ``ALSA_CONFIG_PATH``, a colon-separated list
of top-level configuration files that replaces the built-in default
(``/usr/share/alsa/alsa.conf``, which itself pulls in ``/etc/asound.conf`` and
``~/.asoundrc``): the system file first, then ours.  alsa-lib reads the
variable on every ``snd_pcm_open`` (and reloads when the file list changes),
so it works for this process (``monkeypatch.setenv``) and for any subprocess
given the returned environment.

Behaviour of such a device (measured with alsa-lib 1.2.8, pyalsaaudio 0.11):

* not paced: reads return immediately (hundreds of times faster than real
  time);
* at the end of ``infile`` reads go on returning full periods forever, never
  an error or a short read -- but their content is *undefined*: the plugin
  copies the 0 bytes ``read(2)`` gave into the caller's buffer and the null
  slave never writes capture data, so the caller gets whatever its buffer
  held (pyalsaaudio allocates a fresh, uninitialised ``bytes`` per read:
  sometimes zeros, often recycled memory holding *earlier periods of audio*).
  :func:`alsa_file_device` therefore pads the file with ``tail_s`` of
  silence (a sparse hole: no disk space), so a file that ends sounds like a
  lifted needle for as long as a test runs;
* a missing ``infile`` fails at open time ("No such file or directory").
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

SYSTEM_CONFIG = "/usr/share/alsa/alsa.conf"
DTYPES = {"S16_LE": np.dtype("<i2"), "S32_LE": np.dtype("<i4"), "FLOAT_LE": np.dtype("<f4")}
_SCALE = {"S16_LE": 32767.0, "S32_LE": 2147483647.0}
_serial = itertools.count(1)


def to_raw(samples: np.ndarray, channels: int, fmt: str) -> bytes:
    """Interleaved little-endian PCM bytes for ``samples``.

    ``samples``: float in [-1, 1] (converted and clipped) or already of the
    format's integer dtype (written as is); 1-D mono (duplicated to every
    channel) or ``(frames, channels)``."""
    dt = DTYPES[fmt]
    a = np.asarray(samples)
    if a.ndim == 1:
        a = np.repeat(a[:, None], channels, axis=1)
    if a.ndim != 2 or a.shape[1] != channels:
        raise ValueError(f"expected 1-D or (frames, {channels}) samples, got shape {a.shape}")
    if a.dtype.kind == "f" and fmt != "FLOAT_LE":
        a = np.round(np.clip(a.astype(np.float64), -1.0, 1.0) * _SCALE[fmt])
    return np.ascontiguousarray(a.astype(dt)).tobytes()


def from_raw(buf: bytes, channels: int, fmt: str) -> np.ndarray:
    """``(frames, channels)`` array of the raw bytes in their own dtype."""
    return np.frombuffer(buf, dtype=DTYPES[fmt]).reshape(-1, channels)


def _pcm_block(name: str, raw: Path) -> str:
    return (
        f"pcm.{name} {{\n"
        f"    type file\n"
        f"    slave.pcm \"null\"\n"
        f"    file \"/dev/null\"\n"
        f"    infile {json.dumps(str(raw))}\n"
        f"    format \"raw\"\n"
        f"    hint.description \"vinyl-mqtt capture from {raw.name}\"\n"
        f"}}\n"
    )


def alsa_file_device(
    tmp_path: Path,
    samples: np.ndarray,
    rate: int,
    channels: int,
    fmt: str = "S16_LE",
    *,
    name: str = "vinyl_test",
    tail_s: float = 3600.0,
) -> tuple[str, dict[str, str]]:
    """Write ``samples`` as raw PCM and an ALSA config defining capture PCM
    ``name`` that reads it.  Returns ``(device name, environment)``.

    The environment is a copy of ``os.environ`` with ``ALSA_CONFIG_PATH`` set:
    pass it to ``subprocess`` as is, or activate it in this process with
    ``monkeypatch.setenv("ALSA_CONFIG_PATH", env["ALSA_CONFIG_PATH"])``.
    ``rate`` is not stored anywhere (a raw file has no header): open the
    device at the rate the samples were made for.  Calling again with the
    same ``tmp_path`` and another ``name`` defines both devices.

    ``tail_s`` seconds of digital silence follow the samples (a sparse hole
    in the file); after that the device returns undefined data (see above)."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"PCM name {name!r}: letters, digits, '_' and '-' only")
    if fmt not in DTYPES:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(DTYPES)}")
    if rate <= 0:
        raise ValueError("rate must be positive")
    d = Path(tmp_path) / "alsa"
    d.mkdir(parents=True, exist_ok=True)
    raw = d / f"{name}.raw"
    data = to_raw(samples, channels, fmt)
    frame_bytes = DTYPES[fmt].itemsize * channels
    with open(raw, "wb") as f:
        f.write(data)
        f.truncate(len(data) + int(round(tail_s * rate)) * frame_bytes)
    (d / f"{name}.pcm").write_text(_pcm_block(name, raw))
    # A new file name every time: alsa-lib notices a changed file list at
    # once, whereas a rewritten file is only noticed if its mtime's *second*
    # changed.
    conf = d / f"asoundrc-{os.getpid()}-{next(_serial)}"
    blocks = [p.read_text() for p in sorted(d.glob("*.pcm"))]
    conf.write_text("# vinyl-mqtt file-backed capture PCMs\n" + "\n".join(blocks))
    env = dict(os.environ)
    env["ALSA_CONFIG_PATH"] = f"{SYSTEM_CONFIG}:{conf}"
    return name, env
