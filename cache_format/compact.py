"""finalize (consolidated index), compact (rewrite into big segments atomically), merge (copy other caches in)."""
from __future__ import annotations

import io
import uuid

from . import layout
from .commit import latest_manifest, write_manifest
from .errors import CacheError, FingerprintMismatchError
from .reader import build_index, open_cache
from .schema import diff_fingerprints
from .writer import CacheWriter


def _write_index(loc, gen: int, segments) -> str:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(build_index(segments), buf, compression="zstd")
    rel = f"{layout.INDEXES}/{gen:08d}.parquet"
    loc.write_bytes(rel, buf.getvalue())
    return rel


def finalize(url: str, *, storage_options: dict | None = None) -> int:
    """Write a new manifest generation listing every visible segment + a consolidated Parquet index.

    Opening a finalized cache needs one listing of `manifests/`, one GET and one listing of `commits/`.
    Returns the new generation number. Data are not touched.
    """
    r = open_cache(url, storage_options=storage_options)
    w = _writable(r)
    gen, man = latest_manifest(w)
    gen += 1
    index_rel = _write_index(w, gen, r.segments)
    write_manifest(w, gen, r.segments, list(man["retired"]) if man else [], index_rel)
    return gen


def _writable(r):
    from .store import Location

    return Location(r.url, r.loc.storage_options, read_only=False)


def compact(url: str, *, storage_options: dict | None = None, segment_bytes: int = 512 << 20,
            chunk_bytes: int = layout.DEFAULT_CHUNK_BYTES, delete_retired: bool = False) -> dict:
    """Rewrite every visible segment into a new part of few large segments, then switch atomically.

    The new part has no commit records: the new manifest generation, written last, lists its segments and
    retires the old ones, so a reader sees either the old set or the new one. Segments committed by writers
    while this runs are neither listed nor retired, so they stay visible. One compaction at a time.
    """
    r = open_cache(url, storage_options=storage_options)
    old = list(r.segments)
    w = CacheWriter(url, r.fingerprint, part=f"compact-{uuid.uuid4().hex[:12]}", storage_options=storage_options,
                    chunk_bytes=chunk_bytes, segment_bytes=segment_bytes, resume=False, _commit_records=False)
    w._committed = set()  # the old copies are about to be retired; they are not duplicates of the new part
    for rec in r.iter(decode=False):
        w._append_raw(rec)
    w.close()
    loc = w.loc
    gen, man = latest_manifest(loc)
    gen += 1
    retired = (list(man["retired"]) if man else []) + [s.key for s in old]
    index_rel = _write_index(loc, gen, w.segments)
    write_manifest(loc, gen, w.segments, retired, index_rel)
    if delete_retired:
        for s in old:  # data first, commit record last: a half-deleted segment is still retired
            loc.remove(layout.segment_dir(s.part, s.segment))
            loc.remove(layout.commit_path(s.part, s.segment))
    return {"generation": gen, "segments_before": len(old), "segments_after": len(w.segments),
            "n_samples": len(r), "part": w.part}


def merge(url: str, sources: list[str], *, storage_options: dict | None = None,
          source_storage_options: dict | None = None, skip_existing: bool = False,
          segment_bytes: int = layout.DEFAULT_SEGMENT_BYTES) -> int:
    """Copy every sample of `sources` (caches with a compatible fingerprint) into one new part of `url`.

    Duplicate ids raise unless skip_existing. Returns the number of samples copied.
    """
    n = 0
    readers = [open_cache(s, storage_options=source_storage_options) for s in sources]
    fp = readers[0].fingerprint if readers else None
    for src, rd in zip(sources, readers):
        d = diff_fingerprints(fp, rd.fingerprint)
        if d:
            raise FingerprintMismatchError(f"{src}: fingerprint differs from {sources[0]} in "
                                           f"{', '.join(str(x) for x in d)}"[:1000])
    if fp is None:
        raise CacheError("merge: no source caches given")
    with CacheWriter(url, fp, storage_options=storage_options, resume=skip_existing,
                     segment_bytes=segment_bytes) as w:
        for rd in readers:
            for rec in rd.iter(decode=False):
                if w._append_raw(rec):
                    n += 1
    return n
