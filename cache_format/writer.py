"""CacheWriter: append samples, commit write-once segments (SPEC section 7)."""
from __future__ import annotations

import json
import time
import uuid

import numpy as np

from . import layout
from .commit import Segment, visible_segments, write_commit
from .encodings import get_encoding
from .errors import CacheError, CacheNotFoundError, CorruptCacheError, DuplicateSampleError, FingerprintMismatchError, SchemaError, StorageError
from .migrations import check_and_migrate, root_attrs
from .schema import Fingerprint, SampleRecord, diff_fingerprints, validate_record
from .store import Location, _one_line


def read_root(loc: Location) -> dict:
    """Validated, migrated root attributes of the cache at `loc` (CacheNotFoundError if absent)."""
    try:
        meta = loc.read_json("zarr.json")
    except CacheNotFoundError:
        raise CacheNotFoundError(f"{loc.url}: no cache here (zarr.json not found)") from None
    attrs = meta.get("attributes", {}).get(layout.ROOT_ATTR) if isinstance(meta, dict) else None
    return check_and_migrate(attrs, loc.url)


def _part_name(shard: tuple[int, int] | None) -> str:
    # creation time first so a resumed shard's new part sorts after its older parts (storage order = write order)
    i, n = shard if shard is not None else (0, 1)
    return f"p{i:04d}of{n:04d}-{time.time_ns() // 1000:014x}{uuid.uuid4().hex[:6]}"


class CacheWriter:
    """Append SampleRecords to a cache; one writer = one part, written by this process only.

    Samples are buffered; a *segment* (seven write-once sharded arrays) is written and then committed by
    writing its commit record last when the buffered raw bytes reach `segment_bytes`, after `commit_every`
    samples (if set), on `flush()` and on `close()`. A crash loses only the uncommitted buffer.

    resume=True: ids already committed in the cache (by any part) are skipped (`append` returns False).
    resume=False: appending an already-committed id raises DuplicateSampleError.
    Several processes may write one cache URL at once; give each a distinct `shard=(i, n)` (part names also
    carry a random suffix, so they never collide). Ids committed by a concurrent writer after this writer
    opened are not seen here; `verify_cache` reports such duplicates.
    """

    def __init__(self, url: str, fingerprint: Fingerprint, *, part: str | None = None,
                 shard: tuple[int, int] | None = None, storage_options: dict | None = None,
                 chunk_bytes: int = layout.DEFAULT_CHUNK_BYTES, segment_bytes: int = layout.DEFAULT_SEGMENT_BYTES,
                 commit_every: int | None = None, resume: bool = True, _commit_records: bool = True):
        if not isinstance(fingerprint, Fingerprint):
            raise SchemaError(f"{url}: fingerprint must be a Fingerprint, got {type(fingerprint).__name__}")
        if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
            raise CacheError(f"{url}: shard must be (i, n) with 0 <= i < n, got {shard!r}")
        if chunk_bytes < 1 or segment_bytes < 1:
            raise CacheError(f"{url}: chunk_bytes and segment_bytes must be positive")
        self.fingerprint = fingerprint
        self.loc = Location(url, storage_options, read_only=False)
        self.url = url
        self.chunk_bytes, self.segment_bytes, self.commit_every = int(chunk_bytes), int(segment_bytes), commit_every
        self.resume = resume
        self._commit_records = _commit_records
        self._enc = get_encoding(fingerprint.value_encoding)
        self._open_root()
        _, segs = visible_segments(self.loc)
        self._committed: set[str] = {sid for s in segs for sid in s.sample_ids}
        existing_parts = {s.part for s in segs}
        self.part = part or _part_name(shard)
        if self.part in existing_parts or self.loc.exists(f"{layout.PARTS}/{self.part}"):
            raise CacheError(f"{url}: part {self.part!r} already exists; parts are immutable, use a new name")
        self._buf: list[SampleRecord] = []
        self._buf_ids: set[str] = set()
        self._buf_bytes = 0
        self._seq = 0
        self.segments: list[Segment] = []  # segments this writer committed
        self._closed = False

    # ---- root ------------------------------------------------------------------------------------
    def _open_root(self) -> None:
        """Create the root group if absent, then check the cache's fingerprint against ours.

        Shard workers may start at the same moment on an empty URL: the root is created exclusively (atomic on
        local filesystems), the losers read the winner's root, and every writer compares the root that ended up
        stored, so two writers with different fingerprints never both proceed. On object stores without
        conditional writes the creation is check-then-write; the writer compares the root again before its first
        commit, which closes all but a sub-second window (``verify`` reports any segment whose fingerprint
        digest differs from the root's).
        """
        if not self.loc.exists("zarr.json"):
            # the root group's zarr.json, written exclusively: of writers starting together, one creates it
            meta = {"zarr_format": 3, "node_type": "group",
                    "attributes": {layout.ROOT_ATTR: root_attrs(self.fingerprint.to_dict())}}
            self.loc.create_exclusive("zarr.json", json.dumps(meta, indent=1).encode())
        self._check_root()

    def _check_root(self) -> None:
        attrs = self._read_root_settled()
        diffs = diff_fingerprints(Fingerprint.from_dict(attrs["fingerprint"]), self.fingerprint)
        if diffs:
            raise FingerprintMismatchError(
                f"{self.url}: fingerprint differs from the cache's in {', '.join(str(d) for d in diffs)}"[:1000])

    def _read_root_settled(self, attempts: int = 20, wait_s: float = 0.1) -> dict:
        """Read the root attributes, tolerating a root another writer is still writing (brief retries)."""
        import time

        for i in range(attempts):
            try:
                return read_root(self.loc)
            except CorruptCacheError:  # a root being written by another process right now
                if i == attempts - 1:
                    raise
                time.sleep(wait_s)
        raise AssertionError("unreachable")

    # ---- public API ------------------------------------------------------------------------------
    def committed_ids(self) -> set[str]:
        """Sample ids committed in the cache when this writer opened, plus those it committed since."""
        return set(self._committed)

    def append(self, record: SampleRecord) -> bool:
        """Buffer one sample (validated against the fingerprint). Returns False if skipped on resume."""
        if self._closed:
            raise CacheError(f"{self.url}: writer for part {self.part} is closed")
        sid = getattr(record, "sample_id", None)
        if sid in self._committed:
            if self.resume:
                return False
            raise DuplicateSampleError(f"{self.url}: sample {sid!r} is already committed")
        if sid in self._buf_ids:
            raise DuplicateSampleError(f"{self.url}: sample {sid!r} appended twice to part {self.part}")
        rec = validate_record(record, self.fingerprint)
        self._buf.append(rec)
        self._buf_ids.add(sid)
        self._buf_bytes += rec.topk_ids.nbytes + rec.topk_ids.size * self._enc.dtype.itemsize \
            + rec.tail_logmass.nbytes + rec.input_ids.nbytes + rec.answer_positions.nbytes
        if self._buf_bytes >= self.segment_bytes or (self.commit_every and len(self._buf) >= self.commit_every):
            self.flush()
        return True

    def _append_raw(self, record: SampleRecord) -> bool:
        """Append a record whose topk_logprobs are already in the stored encoding (copying between caches
        must not re-round values)."""
        dec = SampleRecord(record.sample_id, record.content_hash, record.input_ids, record.answer_positions,
                           record.topk_ids, self._enc.decode(record.topk_logprobs), record.tail_logmass)
        return self.append(dec)

    def flush(self) -> Segment | None:
        """Write the buffered samples as one segment and commit it. No-op on an empty buffer."""
        if not self._buf:
            return None
        seg = self._write_segment(self._buf)
        if self._commit_records:
            if not self.segments and not self.loc.is_local:
                self._check_root()  # object stores: the root creation was not atomic; look again before committing
            write_commit(self.loc, seg)
        self.segments.append(seg)
        self._committed |= self._buf_ids
        self._buf, self._buf_ids, self._buf_bytes = [], set(), 0
        return seg

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on an exception, still commit what was appended: those samples were validated and are complete;
        # a second failure while doing so must not hide the first
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:  # noqa: BLE001
                self._closed = True

    # ---- internals ---------------------------------------------------------------------------------
    def _write_segment(self, recs: list[SampleRecord]) -> Segment:
        name = layout.segment_name(self._seq)
        self._seq += 1
        fp = self.fingerprint
        n_tok = np.array([len(r.input_ids) for r in recs], dtype=np.int64)
        n_ans = np.array([len(r.answer_positions) for r in recs], dtype=np.int64)
        L, k = fp.n_layers, fp.top_k
        data = {
            "input_ids": np.concatenate([r.input_ids for r in recs]).astype(np.int32, copy=False),
            "input_offsets": np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int64),
            "answer_positions": np.concatenate([r.answer_positions for r in recs]).astype(np.int32, copy=False),
            "answer_offsets": np.concatenate([[0], np.cumsum(n_ans)]).astype(np.int64),
            "topk_ids": np.concatenate([r.topk_ids for r in recs]).reshape(-1, L, k),
            "topk_logprobs": self._enc.encode(np.concatenate([r.topk_logprobs for r in recs]).reshape(-1, L, k)),
            "tail_logmass": np.concatenate([r.tail_logmass for r in recs]).reshape(-1, L).astype(np.float32),
        }
        store = self.loc.zarr_store()
        arrays = {}
        for aname in layout.ARRAYS:
            a = np.ascontiguousarray(data[aname])
            try:
                layout.write_array(store, layout.array_path(self.part, name, aname), a, self.chunk_bytes)
            except Exception as e:  # noqa: BLE001
                raise StorageError(f"{self.url}: cannot write part {self.part} segment {name} array {aname}: "
                                   f"{_one_line(e)}") from None
            arrays[aname] = {"shape": list(a.shape), "dtype": str(a.dtype)}
        return Segment(self.part, name, [r.sample_id for r in recs], [r.content_hash for r in recs],
                       n_tok, n_ans, arrays, fp.digest())
