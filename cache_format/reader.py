"""open_cache / CacheReader: read-only random and sequential access (SPEC sections 5, 7, 8)."""
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from typing import Iterator

import numpy as np

from . import layout
from .commit import Segment, visible_segments
from .encodings import get_encoding
from .errors import CacheError, CorruptCacheError
from .schema import Fingerprint, SampleRecord
from .store import Location, _one_line
from .writer import read_root

INDEX_SCHEMA_COLUMNS = ("sample_id", "content_hash", "part", "segment", "row", "input_offset", "answer_offset",
                        "n_tokens", "n_answer")


def open_cache(url: str, *, storage_options: dict | None = None, cache_bytes: int = 256 << 20) -> "CacheReader":
    """Open a cache read-only. Raises CacheNotFoundError, VersionError (newer major), SchemaError, StorageError."""
    loc = Location(url, storage_options, read_only=True)
    attrs = read_root(loc)
    fp = Fingerprint.from_dict(attrs["fingerprint"])
    gen, segs = visible_segments(loc)
    return CacheReader(loc, attrs, fp, gen, segs, cache_bytes=cache_bytes)


def build_index(segments: list[Segment]):
    """The sample index (SPEC section 8) as a pyarrow Table, in storage order."""
    import pyarrow as pa

    cols: dict[str, list] = {c: [] for c in INDEX_SCHEMA_COLUMNS}
    for s in segments:
        n = s.n_samples
        cols["sample_id"] += s.sample_ids
        cols["content_hash"] += s.content_hashes
        cols["part"] += [s.part] * n
        cols["segment"] += [s.segment] * n
        cols["row"].append(np.arange(n, dtype=np.int64))
        cols["input_offset"].append(s.input_offsets()[:-1])
        cols["answer_offset"].append(s.answer_offsets()[:-1])
        cols["n_tokens"].append(s.n_tokens.astype(np.int32))
        cols["n_answer"].append(s.n_answer.astype(np.int32))
    types = {"row": np.int64, "input_offset": np.int64, "answer_offset": np.int64, "n_tokens": np.int32,
             "n_answer": np.int32}
    for c, t in types.items():
        cols[c] = np.concatenate(cols[c]) if cols[c] else np.zeros(0, dtype=t)
    return pa.table({c: (pa.array(cols[c], type=pa.string()) if isinstance(cols[c], list) else pa.array(cols[c]))
                     for c in INDEX_SCHEMA_COLUMNS})


class CacheReader:
    """Read-only view of the visible samples of a cache, in storage order.

    `r[i]`, `r.get(sample_id)`, `sample_id in r`, `len(r)`, `r.iter(prefetch=2)`, `r.index` (pyarrow),
    `r.info()`. Returned arrays are numpy (int32 / float32; `decode=False` gives the stored fp16 values).
    Decoded inner chunks are kept in an LRU of `cache_bytes` so neighbouring samples are cheap.
    """

    def __init__(self, loc: Location, attrs: dict, fingerprint: Fingerprint, generation: int,
                 segments: list[Segment], *, cache_bytes: int = 256 << 20):
        self.loc, self.url, self.attrs, self.fingerprint = loc, loc.url, attrs, fingerprint
        self.generation, self.segments = generation, segments
        self._enc = get_encoding(fingerprint.value_encoding)
        self.sample_ids: list[str] = [sid for s in segments for sid in s.sample_ids]
        self._seg_of = np.repeat(np.arange(len(segments), dtype=np.int64),
                                 [s.n_samples for s in segments]).astype(np.int64)
        self._row_of = np.concatenate([np.arange(s.n_samples) for s in segments]) if segments else np.zeros(0, int)
        self._pos: dict[str, int] = {}
        for i, sid in enumerate(self.sample_ids):
            if sid in self._pos:
                raise CorruptCacheError(f"{self.url}: duplicate sample id {sid!r} in visible segments "
                                        f"({segments[self._seg_of[self._pos[sid]]].key} and {segments[self._seg_of[i]].key})")
            self._pos[sid] = i
        self._offsets = [(s.input_offsets(), s.answer_offsets()) for s in segments]
        self._arrays: dict[tuple[str, str], object] = {}
        self._lru: OrderedDict = OrderedDict()
        self._lru_bytes, self._cache_bytes = 0, cache_bytes
        self._lock = threading.Lock()
        self._index = None

    # ---- container protocol ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sample_ids)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._pos

    def __getitem__(self, i: int) -> SampleRecord:
        n = len(self)
        if not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise IndexError(f"{self.url}: sample index {i!r} out of range for {n} samples")
        return self._read(int(i) % n, decode=True)

    def get(self, sample_id: str, *, decode: bool = True) -> SampleRecord:
        try:
            i = self._pos[sample_id]
        except KeyError:
            raise KeyError(f"{self.url}: no sample {sample_id!r}") from None
        return self._read(i, decode=decode)

    def position(self, sample_id: str) -> int:
        return self._pos[sample_id]

    @property
    def index(self):
        if self._index is None:
            self._index = build_index(self.segments)
        return self._index

    @property
    def n_answer_tokens(self) -> int:
        return int(sum(int(s.n_answer.sum()) for s in self.segments))

    # ---- arrays ----------------------------------------------------------------------------------
    def _array(self, seg: Segment, name: str):
        key = (seg.key, name)
        arr = self._arrays.get(key)
        if arr is None:
            import zarr

            path = layout.array_path(seg.part, seg.segment, name)
            try:
                arr = zarr.open_array(self.loc.zarr_store(), path=path, mode="r")
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
        si, row = int(self._seg_of[i]), int(self._row_of[i])
        seg = self.segments[si]
        io, ao = self._offsets[si]
        t0, t1, a0, a1 = io[row], io[row + 1], ao[row], ao[row + 1]
        return self._record(seg, row, lambda name, lo, hi: self._rows(seg, name, lo, hi), t0, t1, a0, a1, decode)

    def _record(self, seg, row, rows, t0, t1, a0, a1, decode) -> SampleRecord:
        lp = rows("topk_logprobs", a0, a1)
        return SampleRecord(
            sample_id=seg.sample_ids[row], content_hash=seg.content_hashes[row],
            input_ids=rows("input_ids", t0, t1), answer_positions=rows("answer_positions", a0, a1),
            topk_ids=rows("topk_ids", a0, a1), topk_logprobs=self._enc.decode(lp) if decode else lp,
            tail_logmass=rows("tail_logmass", a0, a1))

    # ---- sequential ------------------------------------------------------------------------------
    def read_segment(self, si: int) -> dict[str, np.ndarray]:
        """All arrays of segment `si`, decoded in one pass each (the sequential-read path)."""
        seg = self.segments[si]
        return {name: self._decode(seg, name, 0, self._array(seg, name).shape[0]) for name in layout.ARRAYS}

    def iter(self, *, prefetch: int = 2, decode: bool = True) -> Iterator[SampleRecord]:
        """Samples in storage order; a background thread decodes up to `prefetch` segments ahead."""
        q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        stop = threading.Event()

        def work():
            try:
                for si in range(len(self.segments)):
                    if stop.is_set():
                        return
                    q.put((si, self.read_segment(si)))
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
                io, ao = self._offsets[si]
                self._check_offsets(seg, data)
                for row in range(seg.n_samples):
                    yield self._record(seg, row, lambda name, lo, hi: data[name][lo:hi],
                                       io[row], io[row + 1], ao[row], ao[row + 1], decode)
        finally:
            stop.set()
            while th.is_alive():  # drain so the worker can observe `stop`
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass

    def __iter__(self) -> Iterator[SampleRecord]:
        return self.iter()

    def _check_offsets(self, seg: Segment, data: dict) -> None:
        io, ao = seg.input_offsets(), seg.answer_offsets()
        if not (np.array_equal(data["input_offsets"], io) and np.array_equal(data["answer_offsets"], ao)):
            raise CorruptCacheError(f"{self.url}: part {seg.part} segment {seg.segment}: stored offsets disagree "
                                    f"with the commit record")

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
            "n_input_tokens": int(sum(int(s.n_tokens.sum()) for s in self.segments)),
            "n_answer_tokens": n_ans, "top_k": fp.top_k, "layers": fp.layer_names,
            "value_encoding": fp.value_encoding, "fingerprint": fp.to_dict(), "bytes_on_disk": nbytes,
            "bytes_per_answer_token": (nbytes / n_ans) if n_ans else None,
        }

    def __repr__(self) -> str:
        return f"CacheReader({self.url!r}, n_samples={len(self)}, segments={len(self.segments)})"
