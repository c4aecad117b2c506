"""The real pyalsaaudio capture path, fed by ALSA's `file` plugin (see tests/alsa.py)."""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
import sys
import threading
import time

import alsaaudio
import numpy as np
import pytest

from vinyl_mqtt.audio import decode, pcm_to_float
from vinyl_mqtt.capture import PACE_ENV, Block, Capture, CaptureError, list_devices, open_capture
from vinyl_mqtt.config import ListenerConfig

try:
    from alsa import DTYPES, alsa_file_device, to_raw
    from conftest import data_file
except ImportError:  # tests/ imported as a package
    from tests.alsa import DTYPES, alsa_file_device, to_raw
    from tests.conftest import data_file


def stereo_music(rate: int, seconds: float) -> np.ndarray:
    """(frames, 2): two different real recordings, one per channel."""
    n = int(rate * seconds)
    left = decode(data_file("st_clavelian_march"), rate)[:n]
    right = decode(data_file("hw_beach"), rate)[:n]
    return np.stack([left, right], axis=1) * 0.9


def device(tmp_path, monkeypatch, samples, rate, channels, fmt, **kw) -> str:
    name, env = alsa_file_device(tmp_path, samples, rate, channels, fmt, **kw)
    monkeypatch.setenv("ALSA_CONFIG_PATH", env["ALSA_CONFIG_PATH"])
    return name


def raw_head(tmp_path, name: str, nbytes: int) -> bytes:
    """The start of the device's raw file (the rest is a long sparse silence)."""
    with open(tmp_path / "alsa" / f"{name}.raw", "rb") as f:
        return f.read(nbytes)


def config(name: str, rate: int, channels: int, fmt: str, period: int = 1024) -> ListenerConfig:
    return ListenerConfig(device=name, rate=rate, channels=channels, format=fmt, period_frames=period)


async def collect(cap: Capture, frames: int) -> list[Block]:
    out: list[Block] = []
    got = 0
    async for b in cap.blocks():
        out.append(b)
        got += b.frames
        if got >= frames:
            break
    cap.close()
    return out


def capture(cfg: ListenerConfig, frames: int, **kw) -> tuple[list[Block], Capture]:
    cap = Capture(cfg, overflow="block", **kw)
    blocks = asyncio.run(collect(cap, frames))
    return blocks, cap


@pytest.mark.parametrize(
    "rate, channels, fmt, period",
    [(44100, 2, "S16_LE", 1024), (44100, 2, "S32_LE", 1000), (48000, 1, "FLOAT_LE", 512)],
)
def test_captured_samples_are_the_files(tmp_path, monkeypatch, rate, channels, fmt, period):
    src = stereo_music(rate, 4.0)
    if channels == 1:
        src = src[:, 0]
    name = device(tmp_path, monkeypatch, src, rate, channels, fmt)
    n = len(src)
    want = pcm_to_float(raw_head(tmp_path, name, n * channels * DTYPES[fmt].itemsize), fmt, channels)
    assert len(want) == n

    blocks, cap = capture(config(name, rate, channels, fmt, period), n)
    assert not cap.running and cap.error is None
    got = np.concatenate([b.samples for b in blocks])[:n]
    assert got.dtype == np.float32
    # bit-exact through ALSA: the same bytes, converted the same way
    np.testing.assert_array_equal(got, want)
    # and it is the music: correlation with the source's mono mix
    mono = src.mean(axis=1) if src.ndim == 2 else src
    assert np.corrcoef(got, mono)[0, 1] > 0.9999
    # every block a full period, numbered by samples at the capture rate
    assert all(b.frames == period == len(b.samples) and b.rate == rate for b in blocks)
    assert [b.index for b in blocks] == [i * period for i in range(len(blocks))]
    assert cap.frames_read >= n and cap.xruns == 0 and cap.dropped_blocks == 0


def test_end_of_file_is_silence_for_tail_s(tmp_path, monkeypatch):
    rate = 44100
    src = decode(data_file("hw_castle"), rate)[: rate]
    name = device(tmp_path, monkeypatch, src, rate, 1, "S16_LE", tail_s=3.0)
    blocks, _ = capture(config(name, rate, 1, "S16_LE"), 3 * rate)
    got = np.concatenate([b.samples for b in blocks])
    assert np.abs(got[: rate]).max() > 0.3
    assert not got[rate : 3 * rate].any()  # past the music: digital silence


def test_paced_capture_runs_in_real_time_and_dates_blocks(tmp_path, monkeypatch):
    rate = 8000
    src = decode(data_file("fb_introzik"), rate)[: 2 * rate]
    name = device(tmp_path, monkeypatch, src, rate, 1, "S16_LE")
    t0 = time.time()
    blocks, cap = capture(config(name, rate, 1, "S16_LE", period=400), rate, pace=1.0)  # 1 s
    elapsed = time.time() - t0
    assert 0.85 <= elapsed < 2.0
    at = np.array([b.captured_at for b in blocks])
    # (an unpaced plugin always reports a full buffer available, 0.2 s here,
    # so the first block is dated up to that much early)
    assert at[0] == pytest.approx(t0, abs=0.5)
    # sample-clock dating: exactly frames / rate apart, unless the reader was
    # so late (a loaded machine) that it re-anchored on the wall clock
    off = np.abs(np.diff(at) - 400 / rate) > 1e-6
    assert off.sum() <= cap.reanchors <= 2
    # pacing cost: the reader thread sleeps most of the time
    assert cap.cpu_seconds < 0.2


def test_unpaced_source_and_a_slow_loop_drop_oldest(tmp_path, monkeypatch):
    rate = 44100
    src = stereo_music(rate, 6.0)[:, 0]
    name = device(tmp_path, monkeypatch, src, rate, 1, "S16_LE")

    async def slow() -> tuple[list[Block], Capture]:
        cap = Capture(config(name, rate, 1, "S16_LE"), queue_blocks=8)
        out = []
        async for b in cap.blocks():
            out.append(b)
            if len(out) == 1:
                await asyncio.sleep(0.3)  # the loop is busy; ALSA keeps delivering
            if len(out) == 20:
                break
        cap.close()
        return out, cap

    blocks, cap = asyncio.run(slow())
    assert cap.dropped_blocks > 0
    assert len(cap._queue) <= 8  # bounded
    idx = [b.index for b in blocks]
    assert idx == sorted(idx) and idx[1] - idx[0] > 1024  # the oldest were dropped
    # what survives is still exactly what ALSA delivered for those indices
    # (unpaced, ALSA may well have run past the music into the silent tail)
    raw = raw_head(tmp_path, name, 2 * len(src))
    for b in blocks[1:4] + blocks[-2:]:
        want = pcm_to_float(raw[2 * b.index : 2 * b.end], "S16_LE", 1)
        want = np.concatenate([want, np.zeros(b.frames - len(want), dtype=np.float32)])
        np.testing.assert_array_equal(b.samples, want)


def test_missing_device_is_a_clear_error(tmp_path, monkeypatch):
    device(tmp_path, monkeypatch, np.zeros(100, dtype=np.float32), 44100, 1, "S16_LE")
    with pytest.raises(CaptureError) as e:
        open_capture(config("no_such_turntable", 44100, 2, "S16_LE"))
    assert e.value.device == "no_such_turntable"
    assert "no_such_turntable" in str(e.value) and "No such file" in str(e.value)
    # from the async path too
    cap = Capture(config("no_such_turntable", 44100, 2, "S16_LE"))

    async def run():
        async for _ in cap.blocks():
            pass

    with pytest.raises(CaptureError, match="no_such_turntable"):
        asyncio.run(run())


def test_missing_infile_is_a_clear_error(tmp_path, monkeypatch):
    name = device(tmp_path, monkeypatch, np.zeros(100, dtype=np.float32), 44100, 1, "S16_LE")
    (tmp_path / "alsa" / f"{name}.raw").unlink()
    with pytest.raises(CaptureError, match=name):
        open_capture(config(name, 44100, 1, "S16_LE"))


def test_close_stops_the_thread_promptly(tmp_path, monkeypatch):
    rate = 44100
    name = device(tmp_path, monkeypatch, stereo_music(rate, 3.0), rate, 2, "S16_LE")

    async def run():
        cap = open_capture(config(name, rate, 2, "S16_LE"), pace=1.0)
        n = 0

        async def closer():
            await asyncio.sleep(0.3)
            t = time.monotonic()
            cap.close()
            return time.monotonic() - t

        task = asyncio.create_task(closer())
        async for _ in cap.blocks():  # ends when closed
            n += 1
        return cap, n, await task

    threads_before = threading.active_count()
    cap, n, close_s = asyncio.run(run())
    assert 5 <= n <= 30  # ~0.3 s of 23 ms periods
    assert close_s < 0.2 and not cap.running
    assert threading.active_count() <= threads_before
    cap.close()  # idempotent
    with pytest.raises(alsaaudio.ALSAAudioError):
        cap._pcm.read()  # the PCM was closed


def test_list_devices_includes_the_test_pcm(tmp_path, monkeypatch):
    name = device(tmp_path, monkeypatch, np.zeros(100, dtype=np.float32), 44100, 1, "S16_LE", name="vinyl_listed")
    devs = list_devices()
    assert name in devs and "null" in devs


def test_works_in_a_subprocess_with_the_returned_env(tmp_path):
    rate = 48000
    src = decode(data_file("st_tropical_breeze"), rate)[: rate // 2]
    name, env = alsa_file_device(tmp_path, src, rate, 1, "FLOAT_LE")
    env[PACE_ENV] = "50"
    code = f"""
import asyncio, json
from vinyl_mqtt.capture import open_capture, list_devices
from vinyl_mqtt.config import ListenerConfig
cap = open_capture(ListenerConfig(device={name!r}, rate={rate}, channels=1, format="FLOAT_LE"), overflow="block")
async def main():
    out = []
    async for b in cap.blocks():
        out += b.samples.tolist()
        if len(out) >= {len(src)}:
            cap.close()
    return out
out = asyncio.run(main())
print(json.dumps({{"devices": list_devices(), "pace": cap.pace, "samples": out[:{len(src)}]}}))
"""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert name in res["devices"] and res["pace"] == 50.0
    np.testing.assert_array_equal(np.array(res["samples"], dtype=np.float32), src)


class _FlakyPCM:
    """The real PCM, with one overrun and then (optionally) a failure injected."""

    def __init__(self, pcm, fail_after: int | None):
        self.pcm = pcm
        self.reads = 0
        self.fail_after = fail_after

    def read(self):
        self.reads += 1
        if self.reads == 3:
            return -errno.EPIPE, b""  # what pyalsaaudio 0.11 returns on an overrun
        if self.fail_after is not None and self.reads > self.fail_after:
            raise alsaaudio.ALSAAudioError("No such device [vinyl_test]")
        return self.pcm.read()

    def __getattr__(self, name):
        return getattr(self.pcm, name)


class _FlakyCapture(Capture):
    fail_after: int | None = None

    def _open_pcm(self):
        return _FlakyPCM(super()._open_pcm(), self.fail_after)


def test_xrun_is_counted_and_recovered(tmp_path, monkeypatch):
    rate = 44100
    name = device(tmp_path, monkeypatch, stereo_music(rate, 1.0), rate, 2, "S16_LE")
    cap = _FlakyCapture(config(name, rate, 2, "S16_LE"), overflow="block")
    blocks = asyncio.run(collect(cap, 10 * 1024))
    assert cap.xruns == 1 and cap.error is None
    assert [b.index for b in blocks] == [i * 1024 for i in range(len(blocks))]


def test_device_failure_while_running_raises_from_blocks(tmp_path, monkeypatch):
    rate = 44100
    name = device(tmp_path, monkeypatch, stereo_music(rate, 1.0), rate, 2, "S16_LE")
    cap = _FlakyCapture(config(name, rate, 2, "S16_LE"), overflow="block")
    cap.fail_after = 6
    got = []

    async def run():
        async for b in cap.blocks():
            got.append(b)

    with pytest.raises(CaptureError) as e:
        asyncio.run(run())
    assert e.value.device == name and "No such device" in e.value.reason
    assert len(got) == 5 and not cap.running  # every block read before the failure


def test_to_raw_round_trip():
    x = np.array([[0.5, -0.5], [1.0, -1.0]], dtype=np.float32)
    for fmt in ("S16_LE", "S32_LE", "FLOAT_LE"):
        back = pcm_to_float(to_raw(x, 2, fmt), fmt, 2)
        np.testing.assert_allclose(back, [0.0, 0.0], atol=1e-4)
