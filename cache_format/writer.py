"""CacheWriter: append samples, commit write-once segments (SPEC section 7)."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Set
from typing import Callable, Iterator

import numpy as np

from . import layout
from .commit import V1_1, Segment, visible_set, write_commit
from .encodings import get_encoding
from .errors import CacheError, CacheNotFoundError, CorruptCacheError, DuplicateSampleError, FingerprintMismatchError, SchemaError, StorageError
from .migrations import check_and_migrate, root_attrs, writer_version
from .schema import FORMAT_VERSION, REQUIRED_BY_VERSION, Fingerprint, SampleRecord, diff_fingerprints, validate_record
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


class CommittedIds(Set):
    """The sample ids committed in a cache, as a set-like view over columnar lookups (no set of millions of
    strings): ``sid in ids``, ``len(ids)``, iteration, ``==`` with a set."""

    def __init__(self, writer: "CacheWriter"):
        self._w = writer

    def __contains__(self, sample_id: object) -> bool:
        return self._w._is_committed(sample_id)

    def __len__(self) -> int:
        return sum(len(r) for r in self._w._runs)

    def __iter__(self) -> Iterator[str]:
        for r in list(self._w._runs):
            yield from r.ids

    def contains_many(self, sample_ids: list[str]) -> np.ndarray:
        """``[sid in self for sid in sample_ids]`` as a bool array, vectorised (a resume over millions of ids)."""
        found = np.zeros(len(sample_ids), bool)
        for r in list(self._w._runs):
            todo = np.flatnonzero(~found)
            if not todo.size:
                break
            found[todo] = r.find_many([sample_ids[k] for k in todo]) >= 0
        return found


class CacheWriter:
    """Append SampleRecords to a cache; one writer = one part, written by this process only.

    Samples are buffered; a *segment* (seven write-once sharded arrays, then its sample table) is written and then
    committed by writing its commit record last when the buffered raw bytes reach `segment_bytes`, after
    `commit_every` samples (if set), when `commit_seconds` passed since the last commit (if set; checked on each
    append and by `commit_if_due()`, which a background thread may call while no sample arrives), on `flush()` and
    on `close()`. A crash loses only the uncommitted buffer. `clock` (seconds, monotonic) is injectable for tests.

    The writer adds the layout of the cache's version (SPEC section 3): v1.2 for a cache it creates (with the
    `required` features its fingerprint uses), v1.0 records to an existing v1.0 cache. Records are encoded on
    `append` (the fingerprint's value encoding, SPEC section 6); the buffer holds stored arrays.

    resume=True: ids already committed in the cache (by any part) are skipped (`append` returns False).
    resume=False: appending an already-committed id raises DuplicateSampleError.
    Several processes may write one cache URL at once; give each a distinct `shard=(i, n)` (part names also
    carry a random suffix, so they never collide). Ids committed by a concurrent writer after this writer
    opened are not seen here; `verify_cache` reports such duplicates.
    """

    def __init__(self, url: str, fingerprint: Fingerprint, *, part: str | None = None,
                 shard: tuple[int, int] | None = None, storage_options: dict | None = None,
                 chunk_bytes: int = layout.DEFAULT_CHUNK_BYTES, segment_bytes: int = layout.DEFAULT_SEGMENT_BYTES,
                 commit_every: int | None = None, commit_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic, resume: bool = True, _commit_records: bool = True,
                 _keep_columns: bool = False, _create_version: tuple[int, int] = FORMAT_VERSION):
        if not isinstance(fingerprint, Fingerprint):
            raise SchemaError(f"{url}: fingerprint must be a Fingerprint, got {type(fingerprint).__name__}")
        if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
            raise CacheError(f"{url}: shard must be (i, n) with 0 <= i < n, got {shard!r}")
        if chunk_bytes < 1 or segment_bytes < 1:
            raise CacheError(f"{url}: chunk_bytes and segment_bytes must be positive")
        if commit_seconds is not None and not commit_seconds > 0:
            raise CacheError(f"{url}: commit_seconds must be > 0, got {commit_seconds!r}")
        self.fingerprint = fingerprint
        self.loc = Location(url, storage_options, read_only=False)
        self.url = url
        self.chunk_bytes, self.segment_bytes, self.commit_every = int(chunk_bytes), int(segment_bytes), commit_every
        self.commit_seconds = float(commit_seconds) if commit_seconds is not None else None
        self._clock = clock
        self.resume = resume
        self._commit_records = _commit_records
        self._keep_columns = _keep_columns
        self._enc = get_encoding(fingerprint.value_encoding)
        if tuple(_create_version) not in REQUIRED_BY_VERSION:
            raise CacheError(f"{url}: cannot create format version {_create_version}")
        self._new_version = tuple(_create_version)  # a new cache's version (older ones: benchmarks and tests only)
        self.version: tuple[int, int] = self._new_version
        self._open_root()
        from .samples import load_samples

        vis = visible_set(self.loc)
        # committed ids as columnar lookups ("runs"): the cache's at open, then this writer's segments, merged
        # like a log-structured tree so each lookup is a few binary searches and merging costs O(n log n) overall
        base = load_samples(self.loc, vis, content=False).lookup
        self._runs: list = [base] if len(base) else []
        existing_parts = {s.part for s in vis.segments}
        self.part = part or _part_name(shard)
        if self.part in existing_parts or self.loc.exists(f"{layout.PARTS}/{self.part}"):
            raise CacheError(f"{url}: part {self.part!r} already exists; parts are immutable, use a new name")
        self._buf: list[SampleRecord] = []
        self._buf_ids: set[str] = set()
        self._buf_bytes = 0
        self._seq = 0
        self.segments: list[Segment] = []  # segments this writer committed
        self._closed = False
        self._last_commit = self._clock()

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
                    "attributes": {layout.ROOT_ATTR: root_attrs(self.fingerprint.to_dict(), self._new_version)}}
            self.loc.create_exclusive("zarr.json", json.dumps(meta, indent=1).encode())
        self._check_root()

    def _check_root(self) -> None:
        attrs = self._read_root_settled()
        self.version = writer_version(attrs)
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
    def committed_ids(self) -> CommittedIds:
        """Sample ids committed in the cache when this writer opened, plus those it committed since (a set-like
        view: membership, len, iteration)."""
        return CommittedIds(self)

    def _is_committed(self, sample_id: object) -> bool:
        return any(r.find(sample_id) >= 0 for r in self._runs)

    def append(self, record: SampleRecord) -> bool:
        """Buffer one sample (validated against the fingerprint). Returns False if skipped on resume."""
        if not self._admit(getattr(record, "sample_id", None)):
            return False
        rec = self._encode(validate_record(record, self.fingerprint))
        self._buffer(rec)
        return True

    def _admit(self, sid) -> bool:
        """May sample ``sid`` be appended? False: already committed and resuming (skip it); raises on a closed
        writer or a duplicate."""
        if self._closed:
            raise CacheError(f"{self.url}: writer for part {self.part} is closed")
        if isinstance(sid, str) and self._is_committed(sid):
            if self.resume:
                return False
            raise DuplicateSampleError(f"{self.url}: sample {sid!r} is already committed")
        if sid in self._buf_ids:
            raise DuplicateSampleError(f"{self.url}: sample {sid!r} appended twice to part {self.part}")
        return True

    def _encode(self, rec: SampleRecord) -> SampleRecord:
        """The record with its top-k fields in the stored encoding (what the buffer holds)."""
        sids, svals, tail = self._enc.encode(rec.topk_ids, rec.topk_logprobs, rec.tail_logmass,
                                             vocab_size=self.fingerprint.vocab_size)
        return SampleRecord(rec.sample_id, rec.content_hash, rec.input_ids, rec.answer_positions, sids, svals, tail,
                            rec.sample_counts, rec.hidden_answer, rec.hidden_question)

    def _buffer(self, rec: SampleRecord) -> None:
        self._buf.append(rec)
        self._buf_ids.add(rec.sample_id)
        self._buf_bytes += rec.topk_ids.nbytes + rec.topk_logprobs.nbytes + rec.tail_logmass.nbytes \
            + rec.input_ids.nbytes + rec.answer_positions.nbytes \
            + sum(x.nbytes for x in (rec.sample_counts, rec.hidden_answer, rec.hidden_question) if x is not None)
        if self._buf_bytes >= self.segment_bytes or (self.commit_every and len(self._buf) >= self.commit_every):
            self.flush()
        else:
            self.commit_if_due()

    def commit_if_due(self) -> Segment | None:
        """Commit the buffer when `commit_seconds` have passed since the last commit (no-op otherwise)."""
        if self._buf and self.commit_seconds is not None and self._clock() - self._last_commit >= self.commit_seconds:
            return self.flush()
        return None

    def _append_raw(self, record: SampleRecord) -> bool:
        """Append a record whose top-k fields are already in this cache's stored encoding (``decode=False`` from a
        cache with the same fingerprint): copying between caches must not re-round values or move a truncation
        boundary. The decoded form is validated; the stored arrays are kept as they are."""
        sid = record.sample_id
        if not self._admit(sid):
            return False
        ids, lp, tail = self._enc.decode(record.topk_ids, record.topk_logprobs, record.tail_logmass)
        checked = validate_record(SampleRecord(sid, record.content_hash, record.input_ids, record.answer_positions,
                                               ids, lp, tail, record.sample_counts, record.hidden_answer,
                                               record.hidden_question), self.fingerprint)
        self._buffer(SampleRecord(sid, record.content_hash, np.asarray(record.input_ids, np.int32),
                                  np.asarray(record.answer_positions, np.int32),
                                  np.asarray(record.topk_ids, self._enc.ids_dtype),
                                  np.asarray(record.topk_logprobs, self._enc.dtype),
                                  np.asarray(record.tail_logmass, np.float32),
                                  None if record.sample_counts is None else np.asarray(record.sample_counts, np.uint8),
                                  checked.hidden_answer, checked.hidden_question))
        return True

    def flush(self) -> Segment | None:
        """Write the buffered samples as one segment and commit it. No-op on an empty buffer."""
        if not self._buf:
            return None
        seg = self._commit(self._write_segment(self._buf))
        self._buf, self._buf_ids, self._buf_bytes = [], set(), 0
        return seg

    def _commit(self, seg: Segment) -> Segment:
        from .samples import IdLookup, StringColumn

        if self._commit_records:
            if not self.segments and not self.loc.is_local:
                self._check_root()  # object stores: the root creation was not atomic; look again before committing
            write_commit(self.loc, seg)
        cols = seg.columns
        run = IdLookup(StringColumn.from_arrow(cols.column("sample_id").chunks), cols.column("id_hash").to_numpy())
        runs = self._runs + [run]
        while len(runs) > 1 and len(runs[-2]) <= 2 * len(runs[-1]):
            b, a = runs.pop(), runs.pop()
            runs.append(IdLookup.concat([a, b]))
        self._runs = runs  # one assignment: a thread reading committed_ids() sees the old or the new list
        if not self._keep_columns:
            seg.columns = None  # the sample table holds them; a writer of millions keeps none in memory
        self.segments.append(seg)
        self._last_commit = self._clock()
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
        fp = self.fingerprint
        n_tok = np.array([len(r.input_ids) for r in recs], dtype=np.int64)
        n_ans = np.array([len(r.answer_positions) for r in recs], dtype=np.int64)
        L, k = fp.n_layers, fp.top_k
        data = {
            "input_ids": np.concatenate([r.input_ids for r in recs]).astype(np.int32, copy=False),
            "input_offsets": np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int64),
            "answer_positions": np.concatenate([r.answer_positions for r in recs]).astype(np.int32, copy=False),
            "answer_offsets": np.concatenate([[0], np.cumsum(n_ans)]).astype(np.int64),
            "topk_ids": np.concatenate([r.topk_ids for r in recs]).reshape(-1, L, k).astype(self._enc.ids_dtype,
                                                                                              copy=False),
            "topk_logprobs": np.concatenate([r.topk_logprobs for r in recs]).reshape(-1, L, k).astype(
                self._enc.dtype, copy=False),
            "tail_logmass": np.concatenate([r.tail_logmass for r in recs]).reshape(-1, L).astype(np.float32),
        }
        if fp.targets == "sampled":
            data[layout.COUNTS] = np.concatenate([r.sample_counts for r in recs]).reshape(-1, L, k).astype(np.uint8)
        if fp.hidden_states != "none":  # SPEC 5b: bf16 bit patterns, answer rows on the answer axis
            d = fp.hidden_size
            data[layout.HIDDEN_ANSWER] = np.concatenate([r.hidden_answer for r in recs]).reshape(-1, d)
        if fp.hidden_states == "all":  # question rows with their own CSR
            n_q = np.array([len(r.hidden_question) for r in recs], dtype=np.int64)
            data[layout.HIDDEN_QUESTION] = np.concatenate([r.hidden_question for r in recs]).reshape(-1, fp.hidden_size)
            data[layout.QUESTION_OFFSETS] = np.concatenate([[0], np.cumsum(n_q)]).astype(np.int64)
        return self._write_arrays(data, [r.sample_id for r in recs], [r.content_hash for r in recs], n_tok, n_ans)

    def _write_arrays(self, data: dict, sample_ids: list[str], content_hashes: list[str], n_tok: np.ndarray,
                      n_ans: np.ndarray) -> Segment:
        """Write one segment from its seven arrays (stored dtypes) and per-sample columns; no commit record."""
        name = layout.segment_name(self._seq)
        self._seq += 1
        store = self.loc.zarr_store()
        arrays = {}
        for aname in layout.arrays_of(self.fingerprint):
            a = np.ascontiguousarray(data[aname])
            try:
                layout.write_array(store, layout.array_path(self.part, name, aname), a, self.chunk_bytes)
            except Exception as e:  # noqa: BLE001
                raise StorageError(f"{self.url}: cannot write part {self.part} segment {name} array {aname}: "
                                   f"{_one_line(e)}") from None
            arrays[aname] = {"shape": list(a.shape), "dtype": str(a.dtype)}
        from .samples import columns_table, write_table

        cols = columns_table(sample_ids, content_hashes, n_tok, n_ans)
        seg = Segment(self.part, name, len(sample_ids), int(np.sum(n_tok)), int(np.sum(n_ans)), arrays,
                      self.fingerprint.digest(), version=self.version, columns=cols)
        if self.version >= V1_1:  # the sample table: after the arrays, before the commit record
            rel = layout.table_path(self.part, name)
            try:
                seg.table = write_table(self.loc, rel, cols)
            except CacheError:
                raise
            except Exception as e:  # noqa: BLE001
                raise StorageError(f"{self.url}: cannot write part {self.part} segment {name} sample table: "
                                   f"{_one_line(e)}") from None
        return seg

    def _commit_segment_arrays(self, data: dict, sample_ids: list[str], content_hashes: list[str],
                               n_tok: np.ndarray, n_ans: np.ndarray) -> Segment:
        """Benchmarks only: write and commit a whole segment from prebuilt arrays, skipping per-record validation
        (the caller guarantees SPEC-valid data). The buffer must be empty; ids are not checked for duplicates."""
        if self._buf:
            raise CacheError(f"{self.url}: flush() the buffered samples first")
        return self._commit(self._write_arrays(data, sample_ids, content_hashes, n_tok, n_ans))
