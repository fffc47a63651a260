"""Per-sample bookkeeping at scale (SPEC sections 5a, 8 and 10): id hashes, sample tables, the columnar lookup.

Nothing here keeps one Python object per sample. A cache's ids are one UTF-8 buffer + offsets
(:class:`StringColumn`), its content hashes raw bytes when they are lowercase hex (:class:`HexColumn`), its
token / answer counts cumulative int64 arrays, and the id lookup (:class:`IdLookup`) the stored ``id_hash`` column
sorted, with its argsort permutation: ``find(id)`` is a ``searchsorted`` and a comparison of the id bytes of each
candidate with an equal hash (so hash collisions only cost a comparison). About 85 B per sample for 20-byte ids,
and arrays that fork-shared DataLoader workers do not copy on read (no refcounts to touch).
"""
from __future__ import annotations

import binascii
import hashlib
import io
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .commit import Segment, Visible, crc32c_hex
from .errors import CorruptCacheError

#: columns of a v1.1 sample table, in file order (SPEC section 5a)
TABLE_COLUMNS = ("sample_id", "content_hash", "id_hash", "n_tokens", "n_answer")
_HEX = b"0123456789abcdef"
#: Parquet row groups of sample tables and indexes: readers decode one at a time (bounded pyarrow memory)
ROW_GROUP_ROWS = 65536
_SLICE_ROWS = 8192


def id_hash(sample_id: str) -> int:
    """SPEC section 5a: the first 8 bytes of BLAKE2b(utf8(id), digest_size=8), little-endian, as a uint64."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest(), "little")


def id_hashes(ids: Sequence[str]) -> np.ndarray:
    """``id_hash`` of every id (uint64[n])."""
    h = id_hash  # looked up at call time: tests swap in a colliding hash
    return np.fromiter((h(s) for s in ids), dtype=np.uint64, count=len(ids))


def py_hash(sample_id: str) -> int:
    """The in-process lookup key of ids read from v1.0 records (which store no id_hash): Python's own string
    hash, computed in C while the JSON lists are parsed. Valid only inside one process; never stored."""
    return hash(sample_id) & 0xFFFFFFFFFFFFFFFF


def py_hashes(ids: Sequence[str]) -> np.ndarray:
    return np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids)).view(np.uint64)


# ---- flat string columns ------------------------------------------------------------------------------------------
class StringColumn:
    """n strings as one UTF-8 buffer (``bytes`` or a uint8 array) + offsets (int32, or int64 past 2 GiB): two
    objects for all of them."""

    __slots__ = ("data", "offsets")

    def __init__(self, data, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, i: int) -> bytes:
        o = self.offsets
        return bytes(self.data[o[i]:o[i + 1]])

    def __getitem__(self, i: int) -> str:
        return self.raw(i).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        o, d = self.offsets.tolist(), bytes(self.data)
        for a, b in zip(o, o[1:]):
            yield d[a:b].decode("utf-8")

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.offsets.nbytes

    @classmethod
    def from_arrow(cls, chunks: Iterable[Any]) -> "StringColumn":
        """From pyarrow string / large_string arrays (chunks of one column), copying their bytes once."""
        import pyarrow as pa

        pieces, offs, base = [], [np.zeros(1, np.int64)], 0
        for a in chunks:
            if a.null_count:
                raise CorruptCacheError("null in a string column")
            if pa.types.is_large_string(a.type) or pa.types.is_large_binary(a.type):
                width = np.int64
            elif pa.types.is_string(a.type) or pa.types.is_binary(a.type):
                width = np.int32
            else:
                raise CorruptCacheError(f"expected a string column, got {a.type}")
            bufs = a.buffers()
            o = np.frombuffer(bufs[1], dtype=width)[a.offset:a.offset + len(a) + 1] if len(a) else np.zeros(1, width)
            lo, hi = int(o[0]), int(o[-1])
            if hi > lo:
                pieces.append(memoryview(bufs[2])[lo:hi])
            offs.append(o[1:].astype(np.int64) - lo + base)
            base += hi - lo
        offsets = np.concatenate(offs)
        return cls(b"".join(pieces), offsets.astype(np.int32) if base < 2**31 - 1 else offsets)

    @classmethod
    def concat(cls, cols: Sequence["StringColumn"]) -> "StringColumn":
        offs, base = [np.zeros(1, np.int64)], 0
        for c in cols:
            offs.append(c.offsets[1:].astype(np.int64) + base)
            base += len(c.data)
        offsets = np.concatenate(offs)
        return cls(b"".join(c.data for c in cols), offsets.astype(np.int32) if base < 2**31 - 1 else offsets)

    def to_arrow(self):
        import pyarrow as pa

        large = self.offsets.dtype == np.int64
        offs = self.offsets.astype(np.int64 if large else np.int32)
        return pa.Array.from_buffers(pa.large_string() if large else pa.string(), len(self),
                                     [None, pa.py_buffer(offs), pa.py_buffer(self.data)])


class HexColumn:
    """Strings that are all ``2 * width`` lowercase hex characters (content hashes), kept as ``width`` raw bytes
    each: half the memory, no offsets. ``col[i]`` gives back the exact string."""

    __slots__ = ("data", "width")

    def __init__(self, data, width: int):
        self.data, self.width = data, width  # bytes or a uint8 array

    def __len__(self) -> int:
        return len(self.data) // self.width

    def __getitem__(self, i: int) -> str:
        w = self.width
        return memoryview(self.data[i * w:(i + 1) * w]).hex()

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def to_arrow(self):
        import pyarrow as pa

        n, w = len(self), 2 * self.width
        large = n * w >= 2**31 - 1
        offsets = np.arange(n + 1, dtype=np.int64 if large else np.int32) * w
        return pa.Array.from_buffers(pa.large_string() if large else pa.string(), n,
                                     [None, pa.py_buffer(offsets), pa.py_buffer(binascii.hexlify(self.data))])


# ---- the id lookup --------------------------------------------------------------------------------------------------
class IdLookup:
    """Sorted uint64 id hashes + their argsort permutation over a :class:`StringColumn` of ids.

    ``hash_fn`` None: the hashes are SPEC ``id_hash`` values (stored in sample tables); else the function that made
    them (``py_hash`` for ids from v1.0 records)."""

    __slots__ = ("ids", "_sorted", "_order", "hash_fn")

    def __init__(self, ids: StringColumn, hashes: np.ndarray, hash_fn=None):
        if len(hashes) != len(ids):
            raise CorruptCacheError(f"{len(hashes)} id hashes for {len(ids)} ids")
        hashes = np.asarray(hashes, dtype=np.uint64)
        order = np.argsort(hashes, kind="quicksort")
        self.ids, self.hash_fn = ids, hash_fn
        self._order = order.astype(np.int32) if len(ids) < 2**31 - 1 else order
        self._sorted = hashes[order]

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, sample_id: Any) -> int:
        """Position of ``sample_id``, or -1. O(log n) + one id comparison per colliding hash."""
        if not isinstance(sample_id, str) or not len(self._sorted):
            return -1
        try:
            key = sample_id.encode("utf-8")
        except UnicodeEncodeError:
            return -1
        h = np.uint64(id_hash(sample_id) if self.hash_fn is None else self.hash_fn(sample_id))
        s, n = self._sorted, len(self._sorted)
        j = int(np.searchsorted(s, h))
        while j < n and s[j] == h:
            i = int(self._order[j])
            if self.ids.raw(i) == key:
                return i
            j += 1
        return -1

    def __contains__(self, sample_id: object) -> bool:
        return self.find(sample_id) >= 0

    def find_many(self, sample_ids: Sequence[str]) -> np.ndarray:
        """Positions (int64, -1 when absent) of many ids: one vectorised search, then an id comparison per hit."""
        n = len(sample_ids)
        out = np.full(n, -1, np.int64)
        s = self._sorted
        if not n or not len(s):
            return out
        fn = id_hash if self.hash_fn is None else self.hash_fn
        bad: list[int] = []

        def hashed():
            for k, x in enumerate(sample_ids):
                try:
                    x.encode("utf-8")  # not an id a cache can hold (lone surrogates, not a str): absent
                    yield fn(x)
                except (UnicodeEncodeError, AttributeError, TypeError):
                    bad.append(k)
                    yield 0

        h = np.fromiter(hashed(), dtype=np.uint64, count=n)
        j = np.searchsorted(s, h)
        ok = (j < len(s)) & (s[np.minimum(j, len(s) - 1)] == h)
        ok[bad] = False
        order, raw = self._order, self.ids.raw
        for k in np.flatnonzero(ok).tolist():
            key, hk = sample_ids[k].encode("utf-8"), h[k]
            jk = int(j[k])
            while jk < len(s) and s[jk] == hk:
                i = int(order[jk])
                if raw(i) == key:
                    out[k] = i
                    break
                jk += 1
        return out

    def hashes(self) -> np.ndarray:
        """The id hashes in id order."""
        out = np.empty_like(self._sorted)
        out[self._order] = self._sorted
        return out

    def spec_hashes(self) -> np.ndarray:
        """SPEC ``id_hash`` of every id, in id order (computed here when the lookup uses another function)."""
        return self.hashes() if self.hash_fn is None else id_hashes(list(self.ids))

    def duplicates(self) -> list[tuple[int, int]]:
        """``(first, other)`` positions of ids that occur more than once (checked within runs of equal hashes)."""
        s = self._sorted
        if len(s) < 2:
            return []
        eq = np.flatnonzero(s[1:] == s[:-1])
        if not eq.size:
            return []
        out = []
        breaks = np.flatnonzero(np.diff(eq) != 1) + 1
        for run in np.split(eq, breaks):
            seen: dict[bytes, int] = {}
            for j in range(int(run[0]), int(run[-1]) + 2):
                i = int(self._order[j])
                key = self.ids.raw(i)
                if key in seen:
                    a, b = sorted((seen[key], i))
                    out.append((a, b))
                else:
                    seen[key] = i
        return sorted(out)

    @classmethod
    def concat(cls, parts: Sequence["IdLookup"]) -> "IdLookup":
        ids = StringColumn.concat([p.ids for p in parts])
        fns = {p.hash_fn for p in parts}
        if len(fns) == 1:
            return cls(ids, np.concatenate([p.hashes() for p in parts]), fns.pop())
        return cls(ids, np.concatenate([p.spec_hashes() for p in parts]))


# ---- a cache's samples ----------------------------------------------------------------------------------------------
class SampleIndex:
    """Everything per sample a reader needs, columnar, in storage order (SPEC section 10).

    ``lookup`` (ids + sorted hashes), ``content`` (content hashes; None when not loaded), ``tok_cum`` /
    ``ans_cum`` (int64[n + 1] cumulative input-token / answer counts over the whole cache), ``seg_start``
    (int64[n_segments + 1]: the first position of each segment).
    """

    def __init__(self, lookup: IdLookup, content, tok_cum: np.ndarray, ans_cum: np.ndarray, seg_start: np.ndarray):
        self.lookup, self.content = lookup, content
        self.tok_cum, self.ans_cum, self.seg_start = tok_cum, ans_cum, seg_start

    def __len__(self) -> int:
        return len(self.lookup)

    @property
    def ids(self) -> StringColumn:
        return self.lookup.ids

    def find(self, sample_id: Any) -> int:
        return self.lookup.find(sample_id)

    def segment_of(self, i: int) -> int:
        return int(np.searchsorted(self.seg_start, i, side="right")) - 1

    def segment_offsets(self, si: int) -> tuple[np.ndarray, np.ndarray]:
        """CSR offsets (input, answer; int64[n_seg + 1]) of segment ``si`` from its samples' counts."""
        a, b = int(self.seg_start[si]), int(self.seg_start[si + 1])
        return self.tok_cum[a:b + 1] - self.tok_cum[a], self.ans_cum[a:b + 1] - self.ans_cum[a]

    def n_tokens(self) -> np.ndarray:
        return np.diff(self.tok_cum)

    def n_answer(self) -> np.ndarray:
        return np.diff(self.ans_cum)

    @property
    def nbytes(self) -> int:
        lk = self.lookup
        return (lk.ids.nbytes + lk._sorted.nbytes + lk._order.nbytes + (self.content.nbytes if self.content else 0)
                + self.tok_cum.nbytes + self.ans_cum.nbytes + self.seg_start.nbytes)

    @classmethod
    def empty(cls) -> "SampleIndex":
        z = np.zeros(1, np.int64)
        return cls(IdLookup(StringColumn(b"", np.zeros(1, np.int32)), np.zeros(0, np.uint64)),
                   StringColumn(b"", np.zeros(1, np.int32)), z, z.copy(), z.copy())

    @classmethod
    def from_tables(cls, tables: Sequence[Any], seg_rows: Sequence[int], *, content: bool = True) -> "SampleIndex":
        """From pyarrow tables (sample tables or index slices, in storage order) covering segments of
        ``seg_rows`` rows each."""
        b = _Builder(int(sum(seg_rows)), content)
        for t in tables:
            b.add(t)
        return b.finish(seg_rows)

    def check_segments(self, segments: Sequence[Segment]) -> list[tuple[int, str]]:
        """(segment number, problem) for every segment whose rows / token / answer sums differ from its record."""
        s0, s1 = self.seg_start[:-1], self.seg_start[1:]
        rows = s1 - s0
        tok = self.tok_cum[s1] - self.tok_cum[s0]
        ans = self.ans_cum[s1] - self.ans_cum[s0]
        want = np.array([(s.n_samples, s.n_input_tokens, s.n_answer_tokens) for s in segments],
                        dtype=np.int64).reshape(-1, 3)
        bad = np.flatnonzero((rows != want[:, 0]) | (tok != want[:, 1]) | (ans != want[:, 2]))
        return [(int(k), f"sample table has {int(rows[k])} rows / {int(tok[k])} input tokens / {int(ans[k])} answer "
                         f"positions, the record {want[k].tolist()}") for k in bad]

    def segment_table(self, si: int):
        """Segment ``si``'s per-sample columns as a pyarrow table (sample_id, content_hash, n_tokens, n_answer)."""
        import pyarrow as pa

        a, b = int(self.seg_start[si]), int(self.seg_start[si + 1])
        ids = [self.ids[i] for i in range(a, b)]
        return pa.table({"sample_id": pa.array(ids, pa.string()),
                         "content_hash": pa.array([self.content[i] for i in range(a, b)], pa.string()),
                         "n_tokens": pa.array(np.diff(self.tok_cum[a:b + 1]).astype(np.int32)),
                         "n_answer": pa.array(np.diff(self.ans_cum[a:b + 1]).astype(np.int32))})

    def to_arrow(self, segments: Sequence[Segment], *, with_id_hash: bool | None = None):
        """The index table (SPEC section 8) of these samples, in storage order."""
        import pyarrow as pa

        n_seg = len(segments)
        counts = np.diff(self.seg_start)
        seg_no = np.repeat(np.arange(n_seg, dtype=np.int32), counts)
        row = np.arange(len(self), dtype=np.int64) - np.repeat(self.seg_start[:-1], counts)
        base_t = np.repeat(self.tok_cum[self.seg_start[:-1]], counts)
        base_a = np.repeat(self.ans_cum[self.seg_start[:-1]], counts)

        def names(vals):
            return pa.DictionaryArray.from_arrays(pa.array(seg_no, pa.int32()),
                                                  pa.array(vals, pa.string())).dictionary_decode()

        cols = {
            "sample_id": self.ids.to_arrow(),
            "content_hash": self.content.to_arrow() if self.content is not None else pa.nulls(len(self), pa.string()),
            "part": names([s.part for s in segments]), "segment": names([s.segment for s in segments]),
            "row": pa.array(row), "input_offset": pa.array(self.tok_cum[:-1] - base_t),
            "answer_offset": pa.array(self.ans_cum[:-1] - base_a),
            "n_tokens": pa.array(self.n_tokens().astype(np.int32)), "n_answer": pa.array(self.n_answer().astype(np.int32)),
        }
        if with_id_hash is None:  # the v1.1 schema when the hashes are stored ones, the v1.0 schema otherwise
            with_id_hash = self.lookup.hash_fn is None
        if with_id_hash:
            cols["id_hash"] = pa.array(self.lookup.spec_hashes(), pa.uint64())
        return pa.table(cols)


class _Builder:
    """Collects per-sample columns table by table into preallocated arrays, so that the pyarrow memory of one table
    is freed before the next is read and nothing long-lived is interleaved with the transient allocations (a
    reader's RSS is its arrays, not the allocators' retained pages)."""

    def __init__(self, n: int, content: bool):
        self.n, self.at = n, 0
        self.hashes = np.empty(n, np.uint64)
        self.kinds: set[str] = set()  # "id_hash" (stored) and/or "py_hash" (v1.0 records)
        self.py_rows: list[tuple[int, int]] = []
        self.n_tok = np.empty(n, np.int64)
        self.n_ans = np.empty(n, np.int64)
        self.ids = _Bytes(n * 24)
        self.id_lens = np.empty(n, np.int64)
        self.content = content
        self.hex_width = None  # raw bytes per content hash while every one so far is lowercase hex; 0: strings
        self.c_raw: np.ndarray | None = None  # [n * hex_width] raw bytes (hex mode)
        self.c_str: _Bytes | None = None  # UTF-8 (string mode)
        self.c_lens: np.ndarray | None = None

    @staticmethod
    def _strings(col) -> tuple[list[memoryview], np.ndarray]:
        """(UTF-8 views, lengths int64) of a pyarrow string column (views into pyarrow's buffers)."""
        import pyarrow as pa

        data, lens = [], []
        for a in col.chunks:
            if a.null_count:
                raise CorruptCacheError("null in a string column")
            t = a.type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
                    or pa.types.is_large_binary(t)):
                raise CorruptCacheError(f"expected a string column, got {t}")
            if not len(a):
                continue
            width = np.int64 if pa.types.is_large_string(t) or pa.types.is_large_binary(t) else np.int32
            bufs = a.buffers()
            o = np.frombuffer(bufs[1], dtype=width)[a.offset:a.offset + len(a) + 1]
            lo, hi = int(o[0]), int(o[-1])
            data.append(memoryview(bufs[2])[lo:hi] if hi > lo else memoryview(b""))
            lens.append(np.diff(o))
        return data, (np.concatenate(lens) if len(lens) > 1 else lens[0] if lens else np.zeros(0, np.int64))

    def _add_content(self, views: list[memoryview], lens: np.ndarray) -> None:
        m, at = len(lens), self.at
        if not m:
            return
        if self.hex_width != 0:
            total = sum(len(v) for v in views)
            w = total // m
            data = views[0].tobytes() if len(views) == 1 else b"".join(views)
            if w and w % 2 == 0 and total == w * m and self.hex_width in (None, w // 2) \
                    and bool((lens == w).all()) and not data.translate(None, _HEX):
                if self.c_raw is None:
                    self.hex_width = w // 2
                    self.c_raw = np.empty(self.n * self.hex_width, np.uint8)
                hw = self.hex_width
                self.c_raw[at * hw:(at + m) * hw] = np.frombuffer(binascii.unhexlify(data), np.uint8)
                return
            # not (all) hex after all: strings from here on, those before turned back into their hex text
            self.c_str, self.c_lens = _Bytes(self.n * 64), np.empty(self.n, np.int64)
            if self.hex_width:
                self.c_str.append(binascii.hexlify(self.c_raw[:at * self.hex_width].tobytes()))
                self.c_lens[:at] = 2 * self.hex_width
            self.hex_width, self.c_raw = 0, None
        for v in views:
            self.c_str.append(v)
        self.c_lens[at:at + m] = lens

    def add(self, table) -> None:
        for lo in range(0, table.num_rows, _SLICE_ROWS):  # cache-sized pieces: 4 MB copies run 5x slower here
            self._add(table.slice(lo, _SLICE_ROWS))

    def _add(self, table) -> None:
        m = table.num_rows
        if self.at + m > self.n:
            raise CorruptCacheError(f"more sample rows than the {self.n} samples of the segments")
        sl = slice(self.at, self.at + m)
        kind = "id_hash" if "id_hash" in table.column_names else "py_hash"
        self.kinds.add(kind)
        if kind == "py_hash":
            self.py_rows.append((self.at, self.at + m))
        for name, out in ((kind, self.hashes), ("n_tokens", self.n_tok), ("n_answer", self.n_ans)):
            col = table.column(name)
            if col.null_count:
                raise CorruptCacheError(f"null in column {name}")
            out[sl] = np.asarray(col.to_numpy())
        views, lens = self._strings(table.column("sample_id"))
        for v in views:
            self.ids.append(v)
        self.id_lens[sl] = lens
        if self.content:
            self._add_content(*self._strings(table.column("content_hash")))
        self.at += m

    @staticmethod
    def _column(data: "_Bytes", lens: np.ndarray) -> StringColumn:
        offsets = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        if offsets[-1] < 2**31 - 1:
            offsets = offsets.astype(np.int32)
        return StringColumn(data.finish(), offsets)

    def finish(self, seg_rows: Sequence[int]) -> "SampleIndex":
        if self.at != self.n:
            raise CorruptCacheError(f"{self.at} sample rows for {self.n} samples in the segments")
        if (self.n_tok < 0).any() or (self.n_ans < 0).any():
            raise CorruptCacheError("negative n_tokens / n_answer")
        ids = self._column(self.ids, self.id_lens)
        self.ids = self.id_lens = None
        cont = None
        if self.content:
            if self.hex_width:
                cont = HexColumn(self.c_raw, self.hex_width)
            elif self.c_str is not None:
                cont = self._column(self.c_str, self.c_lens)
            else:  # no rows
                cont = StringColumn(b"", np.zeros(self.n + 1, np.int32))
            self.c_raw = self.c_str = self.c_lens = None
        tok_cum = np.zeros(self.n + 1, np.int64)
        np.cumsum(self.n_tok, out=tok_cum[1:])
        ans_cum = np.zeros(self.n + 1, np.int64)
        np.cumsum(self.n_ans, out=ans_cum[1:])
        seg_start = np.concatenate([[0], np.cumsum(np.asarray(seg_rows, dtype=np.int64))]).astype(np.int64)
        if self.kinds == {"py_hash"}:
            lookup = IdLookup(ids, self.hashes, py_hash)
        else:
            for a, b in self.py_rows:  # a mix (not written by vlsi writers): SPEC hashes for all
                self.hashes[a:b] = id_hashes([ids[i] for i in range(a, b)])
            lookup = IdLookup(ids, self.hashes)
        self.hashes = self.n_tok = self.n_ans = None
        return SampleIndex(lookup, cont, tok_cum, ans_cum, seg_start)


class _Bytes:
    """A growable byte buffer in one numpy array (no list of pieces kept alive between allocations)."""

    def __init__(self, capacity: int):
        self.buf = np.empty(max(int(capacity), 64), np.uint8)
        self.size = 0

    def append(self, data) -> None:
        b = np.frombuffer(data, np.uint8)
        end = self.size + len(b)
        if end > len(self.buf):
            grown = np.empty(max(end, int(len(self.buf) * 1.5)), np.uint8)
            grown[:self.size] = self.buf[:self.size]
            self.buf = grown
        self.buf[self.size:end] = b
        self.size = end

    def finish(self) -> np.ndarray:
        out = self.buf[:self.size]  # a view: the unused tail of the allocation was never touched (not resident)
        self.buf = None
        return out


# ---- sample tables on storage -------------------------------------------------------------------------------------
def columns_table(ids: Sequence[str], content_hashes: Sequence[str], n_tokens, n_answer):
    """A segment's sample table (SPEC section 5a) as a pyarrow Table."""
    import pyarrow as pa

    return pa.table({
        "sample_id": pa.array(list(ids), type=pa.string()),
        "content_hash": pa.array(list(content_hashes), type=pa.string()),
        "id_hash": pa.array(id_hashes(ids), type=pa.uint64()),
        "n_tokens": pa.array(np.asarray(n_tokens, dtype=np.int32), type=pa.int32()),
        "n_answer": pa.array(np.asarray(n_answer, dtype=np.int32), type=pa.int32()),
    })


def encode_parquet(table) -> bytes:
    """Parquet bytes: zstd, no dictionaries or statistics on the (unique, random) string columns."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=["part", "segment"],
                   write_statistics=["row", "n_tokens", "n_answer"], row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


def write_table(loc, rel: str, table) -> dict:
    """Write a Parquet table (write-once) and return its table reference ``{path, n_rows, bytes, crc32c}``."""
    data = encode_parquet(table)
    loc.write_bytes(rel, data)
    return {"path": rel, "n_rows": int(table.num_rows), "bytes": len(data), "crc32c": crc32c_hex(data)}


def read_table(loc, ref: dict, where: str, columns: Sequence[str] | None = None):
    """Read a referenced Parquet table after checking its size and crc32c (CorruptCacheError naming ``where``)."""
    import pyarrow as pa

    pf = _parquet(_checked_bytes(loc, ref, where), ref, where)
    return pa.concat_tables(list(_row_groups(pf, columns or pf.schema_arrow.names, ref, where))) \
        if pf.num_row_groups else pf.schema_arrow.empty_table()


def segment_where(loc, seg: Segment) -> str:
    return f"{loc.url}: part {seg.part} segment {seg.segment} sample table"


def _fetch(loc, refs: list[tuple[dict, str]]) -> Iterator[bytes]:
    """The checked bytes of each referenced table, in order; fetched ahead in threads on object stores (one
    round trip each), at most 32 in flight."""
    if loc.is_local or len(refs) < 4:
        for ref, where in refs:
            yield _checked_bytes(loc, ref, where)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=16) as ex:
        window: deque = deque()
        it = iter(refs)
        for ref, where in it:
            window.append(ex.submit(_checked_bytes, loc, ref, where))
            if len(window) >= 32:
                break
        while window:
            yield window.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                window.append(ex.submit(_checked_bytes, loc, *nxt))


def _checked_bytes(loc, ref: dict, where: str) -> bytes:
    data = loc.read_bytes(ref["path"])
    if len(data) != ref["bytes"] or crc32c_hex(data) != ref["crc32c"]:
        raise CorruptCacheError(f"{where} {ref['path']}: crc32c mismatch ({len(data)} bytes, "
                                f"recorded {ref['bytes']}; table corrupted)")
    return data


def _parquet(data: bytes, ref: dict, where: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # ParquetFile, not read_table: read_table goes through pyarrow.dataset (0.2 s of imports per process)
        pf = pq.ParquetFile(pa.BufferReader(data))
    except Exception as e:  # noqa: BLE001 - a crc-valid but unreadable table: written wrongly
        raise CorruptCacheError(f"{where} {ref['path']}: unreadable Parquet ({type(e).__name__}: {e})"[:400]) from None
    if pf.metadata.num_rows != ref["n_rows"]:
        raise CorruptCacheError(f"{where} {ref['path']}: {pf.metadata.num_rows} rows, recorded {ref['n_rows']}")
    return pf


def _row_groups(pf, columns, ref: dict, where: str) -> Iterator[Any]:
    try:
        for i in range(pf.num_row_groups):
            yield pf.read_row_group(i, columns=list(columns), use_threads=False)
    except CorruptCacheError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CorruptCacheError(f"{where} {ref['path']}: unreadable Parquet ({type(e).__name__}: {e})"[:400]) from None


def load_samples(loc, vis: Visible, *, content: bool = True) -> SampleIndex:
    """The per-sample columns of the visible segments (SPEC sections 8 and 10): the manifest's index for its
    segments (one GET), each other segment's sample table (v1.0 records: their JSON lists, already parsed).
    Checked against the records (rows, token and answer sums); CorruptCacheError names the segment.

    Tables are decoded one row group at a time into preallocated arrays, so pyarrow never holds more than one."""
    segs = vis.segments
    if not segs:
        return SampleIndex.empty()
    cols = [c for c in TABLE_COLUMNS if content or c != "content_hash"]
    b = _Builder(sum(s.n_samples for s in segs), content)
    start = 0
    if vis.index is not None and vis.n_listed:
        where = f"{loc.url}: manifest {vis.generation} index"
        data = _checked_bytes(loc, vis.index, where)
        for t in _row_groups(_parquet(data, vis.index, where), cols, vis.index, where):
            b.add(t)
        del data
        start = vis.n_listed
    rest = segs[start:]
    for s in rest:
        if s.columns is None and s.table is None:
            raise CorruptCacheError(f"{loc.url}: part {s.part} segment {s.segment}: no sample table reference")
    fetched = _fetch(loc, [(s.table, segment_where(loc, s)) for s in rest if s.columns is None])
    for s in rest:
        if s.columns is not None:
            b.add(s.columns)
            if s.table is None:
                s.columns = None  # v1.0: parsed from its record; the builder holds the only copy needed
            continue
        where = segment_where(loc, s)
        data = next(fetched)
        pf = _parquet(data, s.table, where)
        if pf.metadata.num_rows != s.n_samples:
            raise CorruptCacheError(f"{where}: {pf.metadata.num_rows} rows for {s.n_samples} samples")
        for t in _row_groups(pf, cols, s.table, where):
            b.add(t)
    try:
        idx = b.finish([s.n_samples for s in segs])
    except CorruptCacheError as e:
        raise CorruptCacheError(f"{loc.url}: {e}") from None
    bad = idx.check_segments(segs)
    if bad:
        k, msg = bad[0]
        src = "index" if k < start else "sample table"
        raise CorruptCacheError(f"{loc.url}: part {segs[k].part} segment {segs[k].segment}: "
                                f"{msg.replace('sample table', src)}")
    release_memory()
    return idx


def release_memory() -> None:
    """Give the transient memory of an open back to the OS: pyarrow's pool and glibc's heap (freed Parquet pages,
    parsed records). Without it a process keeps ~the open's peak as RSS, in every DataLoader worker."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except Exception:  # noqa: BLE001
        pass
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            import ctypes.util

            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        try:
            _LIBC.malloc_trim(0)
        except Exception:  # noqa: BLE001 - not glibc
            pass


_LIBC = None
