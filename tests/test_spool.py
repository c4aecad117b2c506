"""The on-disk clip spool: bounded, expiring, crash-safe, self-healing."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from vinyl_mqtt.config import SpoolConfig
from vinyl_mqtt.messages import ClipHeader, decode_clip, encode_clip
from vinyl_mqtt.spool import Spool

T0 = 1_700_000_000.0


def frame(seq: int, captured_at: float, seconds: float = 1.0) -> tuple[str, bytes]:
    """A real encoded clip frame, as the listener spools them."""
    rng = np.random.default_rng(seq)
    pcm = rng.normal(0, 0.1, int(8000 * seconds)).astype(np.float32)
    clip_id = f"turntable-{seq:04d}"
    header = ClipHeader(
        listener="turntable", clip_id=clip_id, seq=seq, captured_at=captured_at,
        rate=8000, samples=len(pcm), rms_dbfs=-20.0, reason="recheck",
    )
    return clip_id, encode_clip(header, pcm)


def spool(tmp_path, now: float = T0, **kw) -> Spool:
    cfg = SpoolConfig(dir=tmp_path / "spool", **{"max_clips": 30, "max_age_s": 180.0, **kw})
    return Spool(cfg, clock=lambda: now)


def test_put_drain_ack_oldest_first(tmp_path):
    s = spool(tmp_path)
    clips = {}
    for seq, at in [(2, T0 + 20), (0, T0), (1, T0 + 10)]:  # stored out of order
        cid, fr = frame(seq, at)
        clips[cid] = fr
        assert s.put(cid, at, fr, now=T0 + 30)
    assert len(s) == 3
    got = []
    for item in s.drain(now=T0 + 30):
        cid, at, fr = item
        assert fr == clips[cid]
        header, pcm = decode_clip(fr, max_bytes=10**6, max_seconds=30)
        assert header.clip_id == cid and header.captured_at == at and len(pcm) == 8000
        got.append(cid)
        assert s.ack(cid)
    assert got == ["turntable-0000", "turntable-0001", "turntable-0002"]
    assert len(s) == 0 and list(s.dir.iterdir()) == []
    assert not s.ack("turntable-0000")  # twice: nothing to do


def test_bound_by_count_keeps_the_newest(tmp_path):
    s = spool(tmp_path, max_clips=5)
    for seq in range(12):
        cid, fr = frame(seq, T0 + seq)
        s.put(cid, T0 + seq, fr, now=T0 + 12)
    assert len(s) == 5
    assert s.ids() == [f"turntable-{i:04d}" for i in range(7, 12)]
    assert s.dropped_overflow == 7 and s.dropped_age == 0
    assert len(list(s.dir.glob("*.clip"))) == 5


def test_expired_clips_are_dropped_not_sent(tmp_path):
    s = spool(tmp_path, max_age_s=100)
    for seq in range(4):
        cid, fr = frame(seq, T0 + 30 * seq)  # captured at 0, 30, 60, 90 s
        s.put(cid, T0 + 30 * seq, fr, now=T0 + 30 * seq)
    assert len(s) == 4
    sent = [item.clip_id for item in s.drain(now=T0 + 140)]  # those of 0 s and 30 s are too old
    assert sent == ["turntable-0002", "turntable-0003"]
    assert s.dropped_age == 2 and len(s) == 2  # not acked: still spooled
    assert len(list(s.dir.glob("*.clip"))) == 2
    # a clip that is too old already is not even stored
    cid, fr = frame(9, T0)
    assert not s.put(cid, T0, fr, now=T0 + 1000)
    assert cid not in s and s.dropped_age == 3


def test_survives_restart(tmp_path):
    s = spool(tmp_path)
    stored = {}
    for seq in range(3):
        cid, fr = frame(seq, T0 + seq)
        s.put(cid, T0 + seq, fr, now=T0 + 5)
        stored[cid] = fr
    del s
    s2 = spool(tmp_path, max_age_s=86400)
    assert len(s2) == 3
    assert [(c, a, f) for c, a, f in s2.drain(now=T0 + 10)] == [
        (cid, T0 + i, stored[cid]) for i, cid in enumerate(sorted(stored))
    ]


def test_unacked_clip_is_still_there_after_a_crash(tmp_path):
    s = spool(tmp_path, max_age_s=86400)
    for seq in range(3):
        cid, fr = frame(seq, T0 + seq)
        s.put(cid, T0 + seq, fr, now=T0 + 5)
    it = s.drain(now=T0 + 10)
    first = next(it)
    s.ack(first.clip_id)  # delivered
    second = next(it)  # "sent" but the process dies before the broker confirms
    del it, s
    s2 = spool(tmp_path, max_age_s=86400)
    assert s2.ids() == [second.clip_id, "turntable-0002"]
    # the context-manager form acks only when the block succeeds
    item = next(s2.drain(now=T0 + 10))
    with pytest.raises(ConnectionError):
        with s2.sending(item):
            raise ConnectionError("broker went away")
    assert item.clip_id in s2
    with s2.sending(item):
        pass
    assert item.clip_id not in s2 and len(s2) == 1


def test_interrupted_write_leaves_no_clip(tmp_path):
    s = spool(tmp_path, max_age_s=86400)
    cid, fr = frame(1, T0)
    s.put(cid, T0, fr, now=T0)
    # a crash between writing the temporary file and renaming it
    (s.dir / "000001700000001000-turntable-0002.clip.tmp").write_bytes(fr[:100])
    s2 = spool(tmp_path, max_age_s=86400)
    assert s2.ids() == [cid]
    assert sorted(p.name for p in s2.dir.iterdir()) == [next(s2.dir.glob("*.clip")).name]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_file_is_logged_and_removed(tmp_path, caplog, damage):
    s = spool(tmp_path, max_age_s=86400)
    for seq in range(3):
        cid, fr = frame(seq, T0 + seq)
        s.put(cid, T0 + seq, fr, now=T0)
    victim = sorted(s.dir.glob("*.clip"))[1]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        b = bytearray(data)
        b[-100] ^= 0x40  # bit rot inside the PCM: only the checksum notices
        victim.write_bytes(bytes(b))
    elif damage == "garbage":
        victim.write_bytes(os.urandom(500))
    else:
        victim.write_bytes(b"")
    caplog.set_level(logging.WARNING, logger="vinyl_mqtt.spool")

    s2 = spool(tmp_path, max_age_s=86400)
    sent = [item.clip_id for item in s2.drain(now=T0 + 10)]
    assert sent == ["turntable-0000", "turntable-0002"]
    assert not victim.exists()
    assert s2.dropped_corrupt == 1
    assert any(str(victim) in r.getMessage() for r in caplog.records), caplog.text


def test_same_clip_id_replaces(tmp_path):
    s = spool(tmp_path)
    cid, fr = frame(1, T0)
    s.put(cid, T0, fr, now=T0)
    _, fr2 = frame(2, T0 + 1)
    s.put(cid, T0 + 1, fr2, now=T0 + 1)
    assert len(s) == 1 and len(list(s.dir.glob("*.clip"))) == 1
    assert next(s.drain(now=T0 + 2)).frame == fr2


def test_odd_clip_ids_get_distinct_files(tmp_path):
    s = spool(tmp_path)
    for i, cid in enumerate(["a/b", "a_b", "a b", "../../etc/passwd", ""]):
        _, fr = frame(i, T0)
        s.put(cid, T0, fr, now=T0)
    assert len(s) == 5 and len(list(s.dir.glob("*.clip"))) == 5
    assert all(p.parent == s.dir for p in s.dir.iterdir())
    s2 = spool(tmp_path)
    assert sorted(s2.ids()) == sorted(["a/b", "a_b", "a b", "../../etc/passwd", ""])
