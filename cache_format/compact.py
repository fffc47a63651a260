"""finalize (consolidated index), compact (rewrite into big segments atomically), merge (copy other caches in).

All three write the layout of the target cache's version (SPEC section 3): v1.1 manifests hold constant-size
segment records and reference a checksummed index; a merge into a new cache makes a v1.1 cache.
"""
from __future__ import annotations

import uuid

from . import layout
from .commit import V1_1, latest_manifest, write_manifest
from .errors import CacheError, FingerprintMismatchError
from .migrations import writer_version
from .reader import build_index, open_cache
from .samples import SampleIndex, encode_parquet, write_table
from .schema import diff_fingerprints
from .writer import CacheWriter


def _write_index(loc, gen: int, segments, samples: SampleIndex | None, version) -> dict | str:
    """Write `indexes/<gen>.parquet`; return its table reference (v1.1) or path (v1.0)."""
    rel = f"{layout.INDEXES}/{gen:08d}.parquet"
    if tuple(version) >= V1_1:
        return write_table(loc, rel, build_index(segments, samples, with_id_hash=True))
    loc.write_bytes(rel, encode_parquet(build_index(segments, samples, with_id_hash=False)))
    return rel


def finalize(url: str, *, storage_options: dict | None = None) -> int:
    """Write a new manifest generation listing every visible segment + a consolidated Parquet index.

    Opening a finalized cache needs one listing of `manifests/`, one GET of the manifest, one of the index and one
    listing of `commits/`. Returns the new generation number. Data are not touched.
    """
    r = open_cache(url, storage_options=storage_options)
    w = _writable(r)
    version = writer_version(r.attrs)
    if any(tuple(s.version) != version for s in r.segments):
        raise CacheError(f"{url}: segments of another format version than the cache's "
                         f"{version[0]}.{version[1]}; cannot list them in one manifest")
    if version < V1_1:  # v1.0 manifests list the ids of every segment: back from the reader's columns
        for si, seg in enumerate(r.segments):
            seg.columns = r.samples.segment_table(si)
    gen, man = latest_manifest(w)
    gen += 1
    index = _write_index(w, gen, r.segments, r.samples, version)
    write_manifest(w, gen, r.segments, list(man["retired"]) if man else [], index, version)
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
                    chunk_bytes=chunk_bytes, segment_bytes=segment_bytes, resume=False, _commit_records=False,
                    _keep_columns=True)
    w._runs = []  # the old copies are about to be retired; they are not duplicates of the new part
    for rec in r.iter(decode=False):
        w._append_raw(rec)
    w.close()
    loc = w.loc
    gen, man = latest_manifest(loc)
    gen += 1
    retired = (list(man["retired"]) if man else []) + [s.key for s in old]
    index = _write_index(loc, gen, w.segments, None, w.version)
    write_manifest(loc, gen, w.segments, retired, index, w.version)
    if delete_retired:
        for s in old:  # data and sample table first, commit record last: a half-deleted segment is still retired
            loc.remove(layout.segment_dir(s.part, s.segment))
            if s.table is not None:
                loc.remove(s.table["path"])
            loc.remove(layout.commit_path(s.part, s.segment))
    return {"generation": gen, "segments_before": len(old), "segments_after": len(w.segments),
            "n_samples": len(r), "part": w.part}


def merge(url: str, sources: list[str], *, storage_options: dict | None = None,
          source_storage_options: dict | None = None, skip_existing: bool = False,
          segment_bytes: int = layout.DEFAULT_SEGMENT_BYTES) -> int:
    """Copy every sample of `sources` (caches with a compatible fingerprint, any readable version) into one new
    part of `url` (a new cache is v1.1: merging a v1.0 cache into a new URL upgrades it).

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
