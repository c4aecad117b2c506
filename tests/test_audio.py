"""Decoding every library format, damaged files, and PCM conversion."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vinyl_mqtt.audio import (
    AUDIO_EXTENSIONS,
    AudioError,
    decode,
    pcm_to_float,
    probe_duration,
    resample,
    to_mono,
)

try:
    from media import FORMATS, available_encoders, encoder_for, harmonic, make_media, make_wav, tiny_png
except ImportError:  # tests/ imported as a package
    from tests.media import FORMATS, available_encoders, encoder_for, harmonic, make_media, make_wav, tiny_png

SRC_RATE = 44100
SECONDS = 3.0
F0 = 440.0

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg CLI not installed")


@pytest.fixture(scope="module")
def encoders() -> set[str]:
    return available_encoders()


@pytest.fixture(scope="module")
def src_wav(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src")
    return make_wav(d / "tone.wav", harmonic(SECONDS, SRC_RATE, F0), SRC_RATE)


@pytest.fixture(scope="module")
def media(tmp_path_factory, src_wav, encoders) -> dict[str, Path]:
    """One tagged file per format (only those this ffmpeg can encode)."""
    out = tmp_path_factory.mktemp("media")
    files = {}
    for fmt in FORMATS:
        if encoder_for(fmt) in encoders:
            files[fmt] = make_media(src_wav, out, fmt, title="Tone", artist="Band",
                                    album="Album", track=1, cover=tiny_png())
    return files


def _get(media: dict[str, Path], fmt: str) -> Path:
    if fmt not in media:
        pytest.skip(f"ffmpeg has no encoder for {fmt}")
    return media[fmt]


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spec)])


def test_extensions():
    assert AUDIO_EXTENSIONS == frozenset(
        {".mp3", ".flac", ".m4a", ".mp4", ".aac", ".ogg", ".oga", ".opus", ".wav"}
    )
    assert all(e == e.lower() and e.startswith(".") for e in AUDIO_EXTENSIONS)


@needs_ffmpeg
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("rate", [8000, 11025])
def test_decode_every_format(media, fmt, rate):
    x = decode(_get(media, fmt), rate)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) / rate - SECONDS) <= 0.05
    assert np.isfinite(x).all()
    assert 0.2 < np.abs(x).max() <= 1.0
    assert abs(_peak_hz(x, rate) - F0) < 3.0


@needs_ffmpeg
@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_lossless_native_rate_is_exact_downmix(media, src_wav, fmt):
    import wave

    with wave.open(str(src_wav)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
    expected = pcm.astype(np.float32).sum(axis=1) * np.float32(1 / 65536)
    x = decode(_get(media, fmt), SRC_RATE)
    assert len(x) == len(expected)
    np.testing.assert_allclose(x, expected, atol=1e-7)


@needs_ffmpeg
@pytest.mark.parametrize(
    "codec, extra, ext",
    [
        ("pcm_u8", [], ".wav"),
        ("pcm_s24le", [], ".wav"),  # -> s32
        ("pcm_s32le", [], ".wav"),
        ("pcm_f32le", [], ".wav"),  # flt
        ("pcm_f64le", [], ".wav"),  # dbl
        ("flac", ["-sample_fmt", "s32"], ".flac"),  # 24-bit FLAC -> s32
        ("alac", [], ".m4a"),  # s16p
        ("alac", ["-sample_fmt", "s32p"], ".m4a"),  # s32p
        ("pcm_s16le", ["-ac", "1"], ".wav"),  # mono
        ("pcm_s16le", ["-ac", "6"], ".wav"),  # 5.1 packed
        ("flac", ["-ac", "6"], ".flac"),
        ("alac", ["-ac", "6"], ".m4a"),  # 6 planes
    ],
)
def test_sample_formats_and_layouts(tmp_path, src_wav, codec, extra, ext):
    out = tmp_path / f"x{ext}"
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src_wav), "-c:a", codec, *extra, str(out)]
    if subprocess.run(cmd, capture_output=True).returncode:
        pytest.skip(f"ffmpeg cannot write {codec}")
    ref = decode(src_wav, SRC_RATE)
    x = decode(out, SRC_RATE)
    assert x.dtype == np.float32 and len(x) == len(ref)
    if "-ac" in extra:
        # ffmpeg's own down/upmix changes levels; shape and pitch must survive
        assert abs(_peak_hz(x, SRC_RATE) - F0) < 3.0
        assert 0.1 < np.abs(x).max() <= 1.0
    else:
        tol = 1 / 64 if codec == "pcm_u8" else 1e-4
        np.testing.assert_allclose(x, ref, atol=tol)


def test_mono_22k_source(tmp_path):
    src = make_wav(tmp_path / "t.wav", harmonic(2.0, 22050, 300.0, channels=1), 22050)
    x = decode(src, 8000)
    assert abs(len(x) - 16000) <= 1
    assert abs(_peak_hz(x, 8000) - 300.0) < 3.0


def test_decode_native_rate_wav_no_ffmpeg(tmp_path):
    sig = harmonic(1.0, 16000, 250.0, channels=2)
    p = make_wav(tmp_path / "n.wav", sig, 16000)
    x = decode(p, 16000)
    assert len(x) == 16000
    np.testing.assert_allclose(x, sig.mean(axis=1), atol=2e-4)
    y = decode(p, 8000)
    assert len(y) == 8000 and abs(_peak_hz(y, 8000) - 250.0) < 3.0


@needs_ffmpeg
def test_colon_in_file_name(media, tmp_path):
    p = tmp_path / "Artist: Title.mp3"
    shutil.copy(_get(media, "mp3"), p)
    assert abs(len(decode(p, 8000)) / 8000 - SECONDS) <= 0.05


@needs_ffmpeg
def test_probe_duration(media):
    for p in media.values():
        d = probe_duration(p)
        assert d is not None and abs(d - SECONDS) < 0.05


def test_probe_duration_bad_file(tmp_path):
    p = tmp_path / "x.mp3"
    p.write_bytes(b"nope")
    assert probe_duration(p) is None
    assert probe_duration(tmp_path / "missing.mp3") is None


# --- damaged and non-audio files ------------------------------------------


def _raises(path: Path, *words: str) -> AudioError:
    with pytest.raises(AudioError) as ei:
        decode(path, 8000)
    e = ei.value
    assert e.path == str(path)
    assert str(e).startswith(f"{path}: ")
    assert str(e) == f"{path}: {e.reason}"
    for w in words:
        assert w in e.reason
    return e


def test_random_bytes_mp3(tmp_path):
    p = tmp_path / "noise.mp3"
    p.write_bytes(np.random.default_rng(7).bytes(20000))
    _raises(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.flac"
    p.write_bytes(b"")
    _raises(p, "empty")


def test_text_file_renamed_ogg(tmp_path):
    p = tmp_path / "notes.ogg"
    p.write_text("this is a shopping list, not music\n" * 40)
    _raises(p, "not an audio file")


def test_missing_file_and_directory(tmp_path):
    _raises(tmp_path / "missing.mp3", "not found")
    d = tmp_path / "dir.mp3"
    d.mkdir()
    _raises(d, "directory")


@needs_ffmpeg
def test_truncated_flac(media, tmp_path):
    data = _get(media, "flac").read_bytes()
    p = tmp_path / "cut.flac"
    p.write_bytes(data[: len(data) // 2])
    e = _raises(p)
    assert " s" in e.reason  # names the position


@needs_ffmpeg
def test_truncated_mp3(media, tmp_path):
    data = _get(media, "mp3").read_bytes()
    p = tmp_path / "cut.mp3"
    p.write_bytes(data[: len(data) // 2])
    _raises(p, "truncated")


def test_truncated_wav(tmp_path):
    src = make_wav(tmp_path / "full.wav", harmonic(2.0, 16000, 300.0), 16000)
    data = src.read_bytes()
    p = tmp_path / "cut.wav"
    p.write_bytes(data[: len(data) // 2])
    _raises(p, "truncated")


def test_wav_with_unknown_length_is_fine(tmp_path):
    """A WAV written to a pipe has a placeholder data size: not truncation."""
    src = make_wav(tmp_path / "full.wav", harmonic(1.0, 16000, 300.0), 16000)
    b = bytearray(src.read_bytes())
    i = b.index(b"data")
    b[i + 4 : i + 8] = (0xFFFFFFFF).to_bytes(4, "little")
    b[4:8] = (0xFFFFFFFF).to_bytes(4, "little")
    p = tmp_path / "pipe.wav"
    p.write_bytes(bytes(b))
    assert abs(len(decode(p, 8000)) - 8000) <= 1


@needs_ffmpeg
@pytest.mark.parametrize("fmt", ["flac", "mp3", "m4a", "ogg", "opus"])
def test_damaged_in_the_middle(media, tmp_path, fmt):
    data = bytearray(_get(media, fmt).read_bytes())
    i = len(data) // 2
    data[i : i + 2000] = np.random.default_rng(3).bytes(2000)
    p = tmp_path / f"damaged.{fmt}"
    p.write_bytes(bytes(data))
    _raises(p)


# --- conversion helpers ----------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 3, 6])
@pytest.mark.parametrize("fmt", ["S16_LE", "S32_LE", "FLOAT_LE"])
def test_pcm_to_float(fmt, channels):
    rng = np.random.default_rng(channels)
    frames = 480
    ref = rng.uniform(-0.9, 0.9, size=(frames, channels))
    if fmt == "S16_LE":
        raw = np.round(ref * 32767).astype("<i2")
        expected = raw.astype(np.float64).mean(axis=1) / 32768
    elif fmt == "S32_LE":
        raw = np.round(ref * 2147483647).astype("<i4")
        expected = raw.astype(np.float64).mean(axis=1) / 2147483648
    else:
        raw = ref.astype("<f4")
        expected = raw.astype(np.float64).mean(axis=1)
    x = pcm_to_float(raw.tobytes(), fmt, channels)
    assert x.dtype == np.float32 and x.shape == (frames,)
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert np.abs(x).max() <= 1.0


def test_pcm_to_float_full_scale_and_errors():
    s16 = np.array([-32768, 32767, 0, 16384], "<i2").tobytes()
    np.testing.assert_allclose(pcm_to_float(s16, "S16_LE", 1), [-1.0, 32767 / 32768, 0.0, 0.5])
    s32 = np.array([-(2**31), 2**31 - 1], "<i4").tobytes()
    x = pcm_to_float(s32, "S32_LE", 2)
    assert x.shape == (1,) and abs(x[0]) < 1e-6
    f = np.array([1.5, -2.0], "<f4").tobytes()
    np.testing.assert_allclose(pcm_to_float(f, "FLOAT_LE", 1), [1.0, -1.0])
    assert pcm_to_float(b"", "S16_LE", 2).shape == (0,)
    with pytest.raises(ValueError):
        pcm_to_float(b"\x00\x00\x00", "S16_LE", 1)  # partial sample
    with pytest.raises(ValueError):
        pcm_to_float(b"\x00\x00", "S16_LE", 2)  # partial frame
    with pytest.raises(ValueError):
        pcm_to_float(b"\x00\x00", "S24_3LE", 1)
    with pytest.raises(ValueError):
        pcm_to_float(b"", "S16_LE", 0)


def test_to_mono_shapes_and_types():
    inter = np.array([1000, -1000, 2000, 0], np.int16)
    np.testing.assert_allclose(to_mono(inter, 2), [0.0, 1000 / 32768])
    two_d = inter.reshape(2, 2)
    np.testing.assert_array_equal(to_mono(two_d, 2), to_mono(inter, 2))
    u8 = np.array([128, 255, 0], np.uint8)
    np.testing.assert_allclose(to_mono(u8, 1), [0.0, 127 / 128, -1.0])
    i32 = np.array([[2**30, 2**30]], np.int32)
    np.testing.assert_allclose(to_mono(i32, 2), [0.5])
    f64 = np.array([[0.25, 0.75]])
    out = to_mono(f64, 2)
    assert out.dtype == np.float32 and out.tolist() == [0.5]
    with pytest.raises(ValueError):
        to_mono(np.zeros((4, 3), np.int16), 2)
    with pytest.raises(ValueError):
        to_mono(np.zeros(5, np.int16), 2)


def test_resample():
    t = np.arange(44100) / 44100
    x = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    y = resample(x, 44100, 8000)
    assert y.dtype == np.float32 and len(y) == 8000
    assert abs(_peak_hz(y, 8000) - 1000) < 2
    same = resample(x, 8000, 8000)
    np.testing.assert_array_equal(same, x)
    assert same is not x
    assert resample(np.zeros(0, np.float32), 44100, 8000).shape == (0,)
    assert resample(x.astype(np.float64), 44100, 16000).dtype == np.float32


def test_audio_error_str():
    e = AudioError("/m/a.mp3", "file is empty")
    assert str(e) == "/m/a.mp3: file is empty"
    assert e.path == "/m/a.mp3" and e.reason == "file is empty"
    assert AudioError(Path("/m/b.ogg"), "x").path == "/m/b.ogg"
    import pickle

    back = pickle.loads(pickle.dumps(e))
    assert (back.path, back.reason, str(back)) == (e.path, e.reason, str(e))
