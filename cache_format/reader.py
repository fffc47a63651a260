"""open_cache / CacheReader: read-only random and sequential access (SPEC sections 5, 7, 8)."""
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Iterator

import numpy as np

from . import layout
from .commit import Segment, Visible, visible_set
from .encodings import get_encoding
from .errors import CacheError, CorruptCacheError
from .schema import Fingerprint, SampleRecord
from .samples import SampleIndex, StringColumn, load_samples
from .store import Location, _one_line
from .writer import read_root

INDEX_SCHEMA_COLUMNS = ("sample_id", "content_hash", "part", "segment", "row", "input_offset", "answer_offset",
                        "n_tokens", "n_answer")
#: v1.1 index columns: the v1.0 ones + id_hash (SPEC section 8)
INDEX_COLUMNS = INDEX_SCHEMA_COLUMNS + ("id_hash",)


def open_cache(url: str, *, storage_options: dict | None = None, cache_bytes: int = 256 << 20) -> "CacheReader":
    """Open a cache read-only. Raises CacheNotFoundError, VersionError (newer major), SchemaError, StorageError,
    CorruptCacheError (a commit record, sample table or index that fails its checksum or bookkeeping)."""
    loc = Location(url, storage_options, read_only=True)
    attrs = read_root(loc)
    fp = Fingerprint.from_dict(attrs["fingerprint"])
    vis = visible_set(loc)
    samples = load_samples(loc, vis)
    return CacheReader(loc, attrs, fp, vis.generation, vis.segments, cache_bytes=cache_bytes, samples=samples)


def _reopen(url: str, storage_options: dict | None, cache_bytes: int) -> "CacheReader":
    return open_cache(url, storage_options=storage_options, cache_bytes=cache_bytes)


def build_index(segments: list[Segment], samples: SampleIndex | None = None, *, with_id_hash: bool | None = None):
    """The sample index (SPEC section 8) as a pyarrow Table, in storage order. Without ``samples`` the segments'
    in-memory ``columns`` are used. ``id_hash`` (v1.1) is included when the hashes are stored ones unless
    ``with_id_hash`` says otherwise."""
    if samples is None:
        samples = SampleIndex.from_tables([s.columns for s in segments], [s.n_samples for s in segments]) \
            if segments else SampleIndex.empty()
    return samples.to_arrow(segments, with_id_hash=with_id_hash)


class SampleIds(Sequence):
    """The visible sample ids in storage order, as a read-only sequence over the reader's flat id buffer (no list of
    millions of strings). Compares equal to a list/tuple with the same ids."""

    def __init__(self, ids: StringColumn):
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._ids[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        return self._ids[int(i) % n]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (SampleIds, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        n = len(self)
        head = ", ".join(repr(self[i]) for i in range(min(n, 3)))
        return f"SampleIds([{head}{', ...' if n > 3 else ''}], n={n})"


class CacheReader:
    """Read-only view of the visible samples of a cache, in storage order.

    `r[i]`, `r.get(sample_id)`, `sample_id in r`, `len(r)`, `r.iter(prefetch=2)`, `r.index` (pyarrow),
    `r.info()`, `r.sample_ids` (a sequence). Returned arrays are numpy (int32 / float32; `decode=False` gives the
    stored top-k arrays of the cache's encoding, e.g. fp16 values or coded ids). Decoded inner chunks are kept in an LRU of `cache_bytes` so neighbouring samples are cheap.

    Per-sample bookkeeping is columnar (`samples`, a :class:`vlsi.cache_format.samples.SampleIndex`): lookups by
    id are a binary search over sorted id hashes, no dict of ids is built. A reader pickles as its URL and options
    and reopens where it is unpickled (a DataLoader worker), seeing the cache as it is then.
    """

    def __init__(self, loc: Location, attrs: dict, fingerprint: Fingerprint, generation: int,
                 segments: list[Segment], *, cache_bytes: int = 256 << 20, samples: SampleIndex | None = None):
        self.loc, self.url, self.attrs, self.fingerprint = loc, loc.url, attrs, fingerprint
        self.generation, self.segments = generation, segments
        self._enc = get_encoding(fingerprint.value_encoding)
        self._sampled = fingerprint.targets == "sampled"
        self._hidden = fingerprint.hidden_states  # "none" | "answer" | "all" (SPEC 5b)
        self._qoffs: dict[str, np.ndarray] = {}  # segment key -> its question_offsets (kind "all"; n + 1 int64)
        if samples is None:
            samples = load_samples(loc, Visible(generation, segments))
        self.samples = samples
        self._cache_bytes = cache_bytes
        dups = samples.lookup.duplicates()
        if dups:
            a, b = dups[0]
            raise CorruptCacheError(f"{self.url}: duplicate sample id {samples.ids[a]!r} in visible segments "
                                    f"({segments[samples.segment_of(a)].key} and {segments[samples.segment_of(b)].key})")
        self._arrays: dict[tuple[str, str], object] = {}
        self._lru: OrderedDict = OrderedDict()
        self._lru_bytes = 0
        self._lock = threading.Lock()
        self._index = None
        self._pool = None

    def __reduce__(self):
        return _reopen, (self.url, self.loc.storage_options or None, self._cache_bytes)

    @property
    def sample_ids(self) -> SampleIds:
        return SampleIds(self.samples.ids)

    # ---- container protocol ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def __contains__(self, sample_id: object) -> bool:
        return self.samples.find(sample_id) >= 0

    def __getitem__(self, i: int) -> SampleRecord:
        n = len(self)
        if not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise IndexError(f"{self.url}: sample index {i!r} out of range for {n} samples")
        return self._read(int(i) % n, decode=True)

    def get(self, sample_id: str, *, decode: bool = True) -> SampleRecord:
        i = self.samples.find(sample_id)
        if i < 0:
            raise KeyError(f"{self.url}: no sample {sample_id!r}")
        return self._read(i, decode=decode)

    def position(self, sample_id: str) -> int:
        i = self.samples.find(sample_id)
        if i < 0:
            raise KeyError(sample_id)
        return i

    @property
    def index(self):
        if self._index is None:
            self._index = build_index(self.segments, self.samples)
        return self._index

    @property
    def n_answer_tokens(self) -> int:
        return int(sum(s.n_answer_tokens for s in self.segments))

    # ---- arrays ----------------------------------------------------------------------------------
    def _array(self, seg: Segment, name: str):
        key = (seg.key, name)
        arr = self._arrays.get(key)
        if arr is None:
            import zarr

            from .fastread import FAST_READS, open_fast

            path = layout.array_path(seg.part, seg.segment, name)
            try:
                arr = (open_fast(self.loc, path) if FAST_READS else None) \
                    or zarr.open_array(self.loc.zarr_store(), path=path, mode="r")
            except Exception as e:  # noqa: BLE001
                raise CorruptCacheError(f"{self.url}: part {seg.part} segment {seg.segment} array {name}: "
                                        f"cannot open ({_one_line(e)})") from None
            want = seg.arrays.get(name, {})
            if list(arr.shape) != list(want.get("shape", arr.shape)) or str(arr.dtype) != want.get("dtype", str(arr.dtype)):
                raise CorruptCacheError(f"{self.url}: part {seg.part} segment {seg.segment} array {name}: shape/dtype "
                                        f"{list(arr.shape)}/{arr.dtype} != committed {want}")
            self._arrays[key] = arr
        return arr

    def _decode(self, seg: Segment, name: str, lo: int, hi: int) -> np.ndarray:
        arr = self._array(seg, name)
        try:
            return np.asarray(arr[lo:hi])
        except Exception as e:  # noqa: BLE001 - crc mismatch, truncated shard, blosc error...
            c = arr.chunks[0]
            raise CorruptCacheError(f"{self.url}: part {seg.part} segment {seg.segment} array {name} chunk "
                                    f"{lo // c} (rows {lo}..{hi}): {_one_line(e)}") from None

    def _chunk(self, seg: Segment, name: str, c: int) -> np.ndarray:
        key = (seg.key, name, c)
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                return hit
        arr = self._array(seg, name)
        C = arr.chunks[0]
        block = self._decode(seg, name, c * C, min((c + 1) * C, arr.shape[0]))
        with self._lock:
            self._lru[key] = block
            self._lru_bytes += block.nbytes
            while self._lru_bytes > self._cache_bytes and len(self._lru) > 1:
                _, old = self._lru.popitem(last=False)
                self._lru_bytes -= old.nbytes
        return block

    def _rows(self, seg: Segment, name: str, lo: int, hi: int) -> np.ndarray:
        arr = self._array(seg, name)
        if hi <= lo:
            return np.zeros((0,) + tuple(arr.shape[1:]), dtype=arr.dtype)
        C = arr.chunks[0]
        parts = [self._chunk(seg, name, c)[max(lo - c * C, 0):hi - c * C] for c in range(lo // C, (hi - 1) // C + 1)]
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def _read(self, i: int, *, decode: bool) -> SampleRecord:
        smp = self.samples
        si = smp.segment_of(i)
        seg = self.segments[si]
        first = int(smp.seg_start[si])
        t_base, a_base = smp.tok_cum[first], smp.ans_cum[first]
        t0, t1 = int(smp.tok_cum[i] - t_base), int(smp.tok_cum[i + 1] - t_base)
        a0, a1 = int(smp.ans_cum[i] - a_base), int(smp.ans_cum[i + 1] - a_base)
        if not self.loc.is_local:
            ranges = {"input_ids": (t0, t1), "answer_positions": (a0, a1), "topk_ids": (a0, a1),
                      "topk_logprobs": (a0, a1), "tail_logmass": (a0, a1)}
            if self._sampled:
                ranges[layout.COUNTS] = (a0, a1)
            if self._hidden != "none":
                ranges[layout.HIDDEN_ANSWER] = (a0, a1)
            self._prefetch(seg, ranges)
        q = None
        if self._hidden == "all":
            qo = self._question_offsets(seg)
            q = (int(qo[i - first]), int(qo[i - first + 1]))
        return self._record(seg, i, lambda name, lo, hi: self._rows(seg, name, lo, hi), t0, t1, a0, a1, decode, q)

    def _question_offsets(self, seg: Segment) -> np.ndarray:
        """A segment's ``question_offsets`` (read once, checked: a CSR over its ``hidden_question`` rows)."""
        qo = self._qoffs.get(seg.key)
        if qo is None:
            qo = self._decode(seg, layout.QUESTION_OFFSETS, 0, seg.n_samples + 1)
            self._check_question_offsets(seg, qo)
            self._qoffs[seg.key] = qo
        return qo

    def _check_question_offsets(self, seg: Segment, qo: np.ndarray) -> None:
        n_q = int(self._array(seg, layout.HIDDEN_QUESTION).shape[0])
        if len(qo) != seg.n_samples + 1 or qo[0] != 0 or qo[-1] != n_q or np.any(np.diff(qo) < 0):
            raise CorruptCacheError(f"{self.url}: part {seg.part} segment {seg.segment} array question_offsets: not a "
                                    f"CSR over the {n_q} hidden_question rows")

    def _prefetch(self, seg: Segment, ranges: dict[str, tuple[int, int]]) -> None:
        """Object stores: fetch the arrays a sample needs in parallel (a few round trips each) into the LRU."""
        todo = [name for name, (lo, hi) in ranges.items() if hi > lo]
        if len(todo) < 2:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="vlsi-cache-get")

        def fetch(name):
            lo, hi = ranges[name]
            self._rows(seg, name, lo, hi)

        for f in [self._pool.submit(fetch, name) for name in todo]:
            f.result()  # re-raises a CorruptCacheError naming the array and chunk

    def _record(self, seg, i, rows, t0, t1, a0, a1, decode, q=None) -> SampleRecord:
        """Sample at global position ``i``; ``rows(name, lo, hi)`` reads rows of ``seg``'s arrays; ``q``: its
        ``(lo, hi)`` question rows (kind "all")."""
        ids, lp, tail = rows("topk_ids", a0, a1), rows("topk_logprobs", a0, a1), rows("tail_logmass", a0, a1)
        if decode:
            ids, lp, tail = self._enc.decode(ids, lp, tail)
        return SampleRecord(
            sample_id=self.samples.ids[i], content_hash=self.samples.content[i],
            input_ids=rows("input_ids", t0, t1), answer_positions=rows("answer_positions", a0, a1),
            topk_ids=ids, topk_logprobs=lp, tail_logmass=tail,
            sample_counts=rows(layout.COUNTS, a0, a1) if self._sampled else None,
            hidden_answer=rows(layout.HIDDEN_ANSWER, a0, a1) if self._hidden != "none" else None,
            hidden_question=rows(layout.HIDDEN_QUESTION, *q) if q is not None else None)

    # ---- sequential ------------------------------------------------------------------------------
    def read_segment(self, si: int) -> dict[str, np.ndarray]:
        """All arrays of segment `si`, decoded in one pass each (the sequential-read path)."""
        seg = self.segments[si]
        return {name: self._decode(seg, name, 0, self._array(seg, name).shape[0])
                for name in layout.arrays_of(self.fingerprint)}

    def iter(self, *, prefetch: int = 2, decode: bool = True) -> Iterator[SampleRecord]:
        """Samples in storage order; a background thread decodes up to `prefetch` segments ahead."""
        q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        stop = threading.Event()

        def work():
            try:
                for si in range(len(self.segments)):
                    if stop.is_set():
                        return
                    data = self.read_segment(si)
                    if decode:
                        self._decode_segment(data)
                    q.put((si, data))
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                q.put((-1, e))
                return
            q.put(None)

        th = threading.Thread(target=work, daemon=True, name="vlsi-cache-prefetch")
        th.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                si, data = item
                if si < 0:
                    raise data
                seg = self.segments[si]
                io, ao = self.samples.segment_offsets(si)
                self._check_offsets(seg, data, io, ao)
                qo = data.get(layout.QUESTION_OFFSETS)
                if qo is not None:
                    self._check_question_offsets(seg, qo)
                first = int(self.samples.seg_start[si])
                for row in range(seg.n_samples):
                    yield self._record(seg, first + row, lambda name, lo, hi: data[name][lo:hi],
                                       io[row], io[row + 1], ao[row], ao[row + 1], False,
                                       None if qo is None else (int(qo[row]), int(qo[row + 1])))
        finally:
            stop.set()
            while th.is_alive():  # drain so the worker can observe `stop`
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass

    #: answer rows decoded per block on the sequential path: a few MB of temporaries, cache-sized
    DECODE_BLOCK_ENTRIES = 1 << 18

    def _decode_segment(self, data: dict) -> None:
        """Decode a segment's top-k arrays in place in ``data``, in blocks of rows, in the prefetch thread. Every
        encoding decodes row by row (SPEC section 6), so slicing the decoded segment per sample returns exactly
        what decoding each sample does, with one vectorised call per block instead of one per sample."""
        ids, vals, tail = data["topk_ids"], data["topk_logprobs"], data["tail_logmass"]
        n = ids.shape[0]
        out_ids = np.empty(ids.shape, np.int32)
        out_lp = np.empty(ids.shape, np.float32)
        out_tail = np.empty(tail.shape, np.float32)
        step = max(1, self.DECODE_BLOCK_ENTRIES // max(1, int(np.prod(ids.shape[1:]))))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            out_ids[lo:hi], out_lp[lo:hi], out_tail[lo:hi] = self._enc.decode(ids[lo:hi], vals[lo:hi], tail[lo:hi])
        data["topk_ids"], data["topk_logprobs"], data["tail_logmass"] = out_ids, out_lp, out_tail

    def __iter__(self) -> Iterator[SampleRecord]:
        return self.iter()

    def _check_offsets(self, seg: Segment, data: dict, io: np.ndarray, ao: np.ndarray) -> None:
        if not (np.array_equal(data["input_offsets"], io) and np.array_equal(data["answer_offsets"], ao)):
            raise CorruptCacheError(f"{self.url}: part {seg.part} segment {seg.segment}: stored offsets disagree "
                                    f"with its sample table")

    # ---- summary ---------------------------------------------------------------------------------
    def bytes_on_disk(self) -> int:
        try:
            return int(self.loc.fs.du(self.loc.root, total=True))
        except Exception as e:  # noqa: BLE001
            raise CacheError(f"{self.url}: cannot measure size: {_one_line(e)}") from None

    def files_on_disk(self) -> int:
        return len(self.loc.find(""))

    def info(self) -> dict:
        fp = self.fingerprint
        nbytes = self.bytes_on_disk()
        n_ans = self.n_answer_tokens
        return {
            "url": self.url, "format": self.attrs["format"], "format_version": list(self.attrs["format_version"]),
            "generation": self.generation, "n_samples": len(self), "n_segments": len(self.segments),
            "n_parts": len({s.part for s in self.segments}),
            "n_input_tokens": int(sum(s.n_input_tokens for s in self.segments)),
            "n_answer_tokens": n_ans, "top_k": fp.top_k, "layers": fp.layer_names,
            "value_encoding": fp.value_encoding, "targets": fp.targets, "required": list(self.attrs["required"]),
            "fingerprint": fp.to_dict(), "bytes_on_disk": nbytes,
            "bytes_per_answer_token": (nbytes / n_ans) if n_ans else None,
            # one row = one (answer token, layer) pair, the unit the format's size targets are stated in
            "bytes_per_row": (nbytes / (n_ans * fp.n_layers)) if n_ans else None,
            "bytes_per_sample": (nbytes / len(self)) if len(self) else None,
            **self._hidden_info(),
        }

    def _hidden_info(self) -> dict:
        """(feature caches) the kinds, d, and the stored bytes per sample of the hidden-state arrays."""
        fp = self.fingerprint
        if fp.hidden_states == "none":
            return {"hidden_states": "none"}
        names = {layout.HIDDEN_ANSWER: "answer", layout.HIDDEN_QUESTION: "question",
                 layout.QUESTION_OFFSETS: "question"}
        sizes = dict.fromkeys(("answer", "question"), 0)
        try:  # one listing of parts/ with sizes (info is not a hot path)
            found = self.loc.fs.find(self.loc.path(layout.PARTS), detail=True)
        except Exception as e:  # noqa: BLE001
            raise CacheError(f"{self.url}: cannot measure size: {_one_line(e)}") from None
        live = {s.key for s in self.segments}
        for full, meta in found.items():
            bits = self.loc.rel(full).split("/")  # parts/<part>/<segment>/<array>/...
            if len(bits) >= 4 and f"{bits[1]}/{bits[2]}" in live and bits[3] in names:
                sizes[names[bits[3]]] += int(meta.get("size") or 0)
        n = max(1, len(self))
        out = {"hidden_states": fp.hidden_states, "hidden_size": fp.hidden_size, "hidden_dtype": "bf16 (uint16 bits)",
               "hidden_answer_bytes_per_sample": sizes["answer"] / n}
        if fp.hidden_states == "all":
            out["hidden_question_bytes_per_sample"] = sizes["question"] / n
        return out

    def __repr__(self) -> str:
        return f"CacheReader({self.url!r}, n_samples={len(self)}, segments={len(self.segments)})"
