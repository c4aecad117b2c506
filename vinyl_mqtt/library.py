"""Library ingest: folders of music files in, fingerprinted tracks in the store.

Workers (one process per core) read, decode and fingerprint; the parent alone
writes, one transaction per track, so an interrupted ingest leaves a sound
store and the next run carries on where it stopped. Files are known by their
bytes: an unchanged file is skipped from its size and mtime without being
read, and a moved one is recognised by its content hash and only re-pointed.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import fingerprint as fp
from .audio import AUDIO_EXTENSIONS, AudioError, decode
from .store import Store, content_hash
from .tags import TrackInfo, read_tags

log = logging.getLogger(__name__)

MIN_HASHES = 50  # fewer and no clip of the track could ever be identified


@dataclass
class IngestReport:
    added: int = 0
    skipped: int = 0
    moved: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    audio_seconds: float = 0.0
    elapsed_s: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.added} added ({self.audio_seconds / 3600:.2f} h of audio), {self.skipped} already in, "
            f"{self.moved} moved, {len(self.failed)} failed, in {self.elapsed_s:.1f} s"
        )


def scan(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Audio files under the given files and folders, in a stable order."""
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                        yield Path(root, name).resolve()
        elif p.exists():
            yield p.resolve()
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")


@dataclass(frozen=True)
class _Analysed:
    path: str
    size: int
    mtime: float
    content_hash: str
    info: TrackInfo | None = None
    prints: fp.TrackPrints | None = None
    error: str | None = None


def _analyse(job: tuple[str, int, float, frozenset[str]]) -> _Analysed:
    """In a worker: hash, and unless the content is known, tag, decode, fingerprint."""
    path, size, mtime, known = job
    try:
        digest = content_hash(path)
    except OSError as e:
        return _Analysed(path, size, mtime, "", error=f"cannot read: {e.strerror or e}")
    if digest in known:
        return _Analysed(path, size, mtime, digest)
    try:
        samples = decode(path, fp.SAMPLE_RATE)
        if len(samples) < fp.SAMPLE_RATE:
            return _Analysed(path, size, mtime, digest, error="shorter than one second of audio")
        prints = fp.fingerprint(samples)
        if len(prints.hashes) < MIN_HASHES:
            return _Analysed(path, size, mtime, digest, error="no music found to fingerprint (silent or a plain tone?)")
    except AudioError as e:
        return _Analysed(path, size, mtime, digest, error=e.reason)
    except MemoryError:
        return _Analysed(path, size, mtime, digest, error="too long to decode in memory")
    return _Analysed(path, size, mtime, digest, read_tags(path), prints)


def ingest(
    store: Store,
    paths: Iterable[str | os.PathLike[str]],
    *,
    workers: int | None = None,
    progress: bool = False,
    on_failure: Callable[[str, str], None] | None = None,
) -> IngestReport:
    """Add every audio file under ``paths``; report, never stop, on a bad file."""
    t0 = time.perf_counter()
    report = IngestReport()
    known_files = store.known_files()
    known_hashes = store.known_hashes()
    jobs = []
    for p in scan(paths):
        st = p.stat()
        old = known_files.get(str(p))
        if old and old[0] == st.st_size and old[1] == st.st_mtime:
            report.skipped += 1
            continue
        jobs.append((str(p), st.st_size, st.st_mtime))
    # Largest first keeps every core busy to the end; the bar counts bytes.
    jobs.sort(key=lambda j: -j[1])
    hashes = frozenset(known_hashes)
    bar = _progress_bar(sum(j[1] for j in jobs), progress)
    workers = workers or os.cpu_count() or 1
    try:
        for res in _run(_analyse, [(*j, hashes) for j in jobs], workers):
            bar.update(res.size)
            _record(store, res, known_hashes, known_files, report, on_failure)
            bar.set_postfix_str(f"{report.added} added, {len(report.failed)} failed", refresh=False)
    finally:
        bar.close()
    report.elapsed_s = time.perf_counter() - t0
    return report


def _record(store: Store, res: _Analysed, known_hashes, known_files, report: IngestReport, on_failure) -> None:
    if res.error:
        report.failed.append((res.path, res.error))
        log.warning("%s: %s (skipped)", res.path, res.error)
        if on_failure:
            on_failure(res.path, res.error)
    elif res.content_hash in known_hashes:
        track_id, old_path = known_hashes[res.content_hash]
        if old_path == res.path:  # touched, not changed: remember the new mtime
            store.update_location(track_id, res.path, res.size, res.mtime)
            report.skipped += 1
        elif not os.path.exists(old_path):
            store.update_location(track_id, res.path, res.size, res.mtime)
            known_hashes[res.content_hash] = (track_id, res.path)
            report.moved += 1
        else:
            report.skipped += 1  # same bytes twice in the library: one track
    else:
        # New bytes at a known path (re-tagged, re-encoded) replace the old track.
        old = known_files.get(res.path)
        replaces = known_hashes.pop(old[2])[0] if old and old[2] in known_hashes else None
        track_id = store.add_track(
            path=res.path, size=res.size, mtime=res.mtime, content_hash=res.content_hash,
            info=res.info, prints=res.prints, replaces=replaces,
        )
        known_hashes[res.content_hash] = (track_id, res.path)
        report.added += 1
        report.audio_seconds += res.prints.duration_s


def _run(fn, jobs: list, workers: int) -> Iterator:
    """Results in job order; in-process for one worker (tests, profiling)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(fn, jobs, chunksize=1)


def _progress_bar(total_bytes: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
        desc="fingerprinting", dynamic_ncols=True,
    )
