"""Random-access datasets over LLaVA JSON / JSONL / Parquet files, local or on any fsspec URL, at millions of samples.

:func:`open_dataset` returns a :class:`Dataset`: ``len(ds)``, ``ds.sample_id(i)`` (no file read) and ``ds[i]`` (one
record read and parsed, its images read then) -> :class:`~vlsi.models.data.Sample`. What it holds is an index of
bytes per sample, not the samples: memory does not grow with image bytes, and start-up reads no record.

The index (``SampleIndex``) is built by ONE streaming pass over the file, never holding it:

- JSONL: the byte span of every line; JSON (a top-level list): the byte span of every element, found by an
  incremental decoder over fixed-size blocks; Parquet: (row group, row) of every row, from the ``id`` and
  ``conversations`` columns only (images are never read while indexing).
- Each record is parsed and checked (id, conversations, image references and placeholder counts) while indexing;
  records that fail (malformed line, missing / duplicate id, bad conversation ...) are kept as bad entries with
  their ``file:line`` and id, and go through ``--on-bad-sample`` every time the dataset is opened. Images are only
  read when a sample is loaded: a missing image is a bad sample at load time.

The index is stored under ``$VLSI_INDEX_DIR`` (default ``~/.cache/vlsi/index``) as memory-mappable ``.npy`` arrays,
keyed by the file's URL, size, modification time and a digest of its first and last 64 KiB: a file changed after
its index was built gets a new key and a new index, never a misread. DataLoader workers share the mapped pages
(pickling a :class:`Dataset` carries the index path, not the arrays).
"""

from __future__ import annotations

import collections
import hashlib
from array import array
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlsi.models.errors import BadSampleError, DatasetError

__all__ = ["Dataset", "open_dataset", "index_dir"]

INDEX_FORMAT = 1
_BLOCK = 8 << 20  # bytes read per step while indexing: memory while indexing is O(block + bytes per sample)


def index_dir() -> Path:
    """Where dataset indexes live (``$VLSI_INDEX_DIR`` or ``~/.cache/vlsi/index``)."""
    return Path(os.environ.get("VLSI_INDEX_DIR") or Path.home() / ".cache" / "vlsi" / "index")


# ---- files, local or fsspec ------------------------------------------------------------------------------------


def _is_url(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


class _Files:
    """Read bytes from a local folder or an fsspec URL, with the same storage options as the cache."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = root[len("file://"):] if root.startswith("file://") else root
        self.url = _is_url(self.root)
        self.storage_options = storage_options or {}
        self._fs = None

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            self._fs = fsspec.core.url_to_fs(self.root, **self.storage_options)[0]
        return self._fs

    def join(self, rel: str) -> str:
        if os.path.isabs(rel) or _is_url(rel):
            return rel
        return self.root.rstrip("/") + "/" + rel if self.url else str(Path(self.root) / rel)

    def open(self, path: str):
        return self.fs.open(path, "rb") if self.url or _is_url(path) else open(path, "rb")

    def read(self, rel: str) -> bytes:
        with self.open(self.join(rel)) as f:
            return f.read()

    def stat(self, path: str) -> tuple[int, str]:
        """(size, modification stamp) of a file; DatasetError when it is not a file."""
        if not (self.url or _is_url(path)):
            p = Path(path)
            if not p.is_file():
                raise DatasetError(f"{path}: dataset file not found")
            st = p.stat()
            return st.st_size, str(st.st_mtime_ns)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            raise DatasetError(f"{path}: dataset file not found") from None
        except Exception as e:  # credentials, endpoint: name the URL
            raise DatasetError(f"{path}: cannot stat ({type(e).__name__}: {' '.join(str(e).split())})") from None
        if info.get("type") == "directory":
            raise DatasetError(f"{path}: is a directory, not a dataset file")
        stamp = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
        return int(info.get("size") or 0), str(stamp)

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(path) if self.url else Path(path).is_dir()

    def __getstate__(self):
        return {**self.__dict__, "_fs": None}


# ---- the index ---------------------------------------------------------------------------------------------------


@dataclass
class SampleIndex:
    """Per sample (good records only, in file order): id, where its record is, its ordinal in the file."""

    id_bytes: np.ndarray  # uint8, the ids' UTF-8 concatenated
    id_off: np.ndarray  # int64 [n + 1]
    loc: np.ndarray  # int64 [n, 2]: (start, end) byte span for JSON/JSONL, (row group, row) for Parquet
    pos: np.ndarray  # int64 [n]: 1-based line (JSONL), element index (JSON) or row (Parquet)
    bad: list  # [(pos, sample id or None, source, reason)] of records that failed while indexing

    def __len__(self) -> int:
        return len(self.pos)

    def sample_id(self, i: int) -> str:
        return bytes(self.id_bytes[self.id_off[i]:self.id_off[i + 1]]).decode("utf-8")

    def save(self, d: Path, meta: dict) -> None:
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in ("id_bytes", "id_off", "loc", "pos"):
            np.save(tmp / f"{name}.npy", getattr(self, name))
        (tmp / "bad.json").write_text(json.dumps(self.bad))
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))  # written last: a complete index
        try:
            tmp.rename(d)
        except OSError:  # another process built it first: theirs is equally valid
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, d: Path) -> "SampleIndex":
        arrays = {n: np.load(d / f"{n}.npy", mmap_mode="r") for n in ("id_bytes", "id_off", "loc", "pos")}
        return cls(**arrays, bad=[tuple(b) for b in json.loads((d / "bad.json").read_text())])


class _Builder:
    """Accumulates a SampleIndex one record at a time (ids hashed to find duplicates without a set of strings)."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind = path, kind
        # typed arrays, not lists of Python ints: the build's memory is ~40 bytes per sample, too
        self.ids = bytearray()
        self.id_off, self.loc, self.pos, self.hashes = array("q", [0]), array("q"), array("q"), array("q")
        self.bad: list = []

    def add(self, pos: int, source: str, loc: tuple[int, int], record: Any) -> None:
        from .data import check_record

        try:
            sid = check_record(record, source=source)
        except BadSampleError as e:
            self.bad.append((pos, e.sample_id, source, e.reason))
            return
        raw = sid.encode("utf-8")
        self.ids += raw
        self.id_off.append(len(self.ids))
        self.loc.extend(loc)
        self.pos.append(pos)
        self.hashes.append(int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 1)

    def bad_line(self, pos: int, source: str, reason: str, raw: bytes | str = b"") -> None:
        self.bad.append((pos, _guess_id(raw), source, reason))

    def finish(self) -> SampleIndex:
        idx = SampleIndex(np.frombuffer(bytes(self.ids), dtype=np.uint8), np.frombuffer(self.id_off, np.int64),
                          np.frombuffer(self.loc, np.int64).reshape(-1, 2), np.frombuffer(self.pos, np.int64), [])
        keep = np.ones(len(idx), dtype=bool)
        h = np.frombuffer(self.hashes, dtype=np.int64)
        order = np.argsort(h, kind="stable")
        same = np.nonzero(h[order][1:] == h[order][:-1])[0]
        first_seen: dict[str, int] = {}
        for j in sorted({int(x) for k in same for x in order[k:k + 2]}):  # candidates only: confirm by the string
            sid = idx.sample_id(j)
            if sid in first_seen:
                keep[j] = False
                src = self.source_of(int(idx.pos[j]))
                self.bad.append((int(idx.pos[j]), sid, src, "duplicate id (an earlier sample has the same id)"))
            else:
                first_seen[sid] = j
        if not keep.all():
            ids = [idx.sample_id(j) for j in np.nonzero(keep)[0]]
            raw = [s.encode() for s in ids]
            idx = SampleIndex(np.frombuffer(b"".join(raw), dtype=np.uint8),
                              np.concatenate([[0], np.cumsum([len(r) for r in raw])]).astype(np.int64),
                              idx.loc[keep], idx.pos[keep], [])
        idx.bad = sorted(self.bad, key=lambda b: b[0])
        return idx

    def source_of(self, pos: int) -> str:
        return _source(self.kind, self.path, pos)


def _source(kind: str, path: str, pos: int) -> str:
    return {"jsonl": f"{path}:{pos}", "json": f"{path}[{pos}]", "parquet": f"{path}[row {pos}]"}[kind]


def _guess_id(raw) -> str | None:
    """The id of a record that does not parse, for the error message (best effort)."""
    import re

    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    m = re.search(r'"id"\s*:\s*("((?:[^"\\]|\\.)*)"|-?\d+)', text)
    return None if m is None else (m.group(2) if m.group(2) is not None else m.group(1))


def _index_jsonl(f, b: _Builder) -> None:
    offset = 0
    for lineno, raw in enumerate(f, start=1):
        start, offset = offset, offset + len(raw)
        if not raw.strip():
            continue
        source = f"{b.path}:{lineno}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            b.bad_line(lineno, source, f"line is not UTF-8: {e}", raw)
            continue
        except json.JSONDecodeError as e:
            b.bad_line(lineno, source, f"malformed JSON line: {e}", raw)
            continue
        b.add(lineno, source, (start, offset), record)


def _index_json(f, b: _Builder) -> None:
    """Byte spans of the elements of a top-level JSON list, by raw_decode over blocks (never the whole file)."""
    import codecs

    dec, text_dec = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buf, base, pos, eof = "", 0, 0, False  # base: byte offset of buf[0]; pos: char index in buf

    def more() -> bool:
        nonlocal buf, eof, base, pos
        if eof:
            return False
        chunk = f.read(_BLOCK)
        eof = not chunk
        base += len(buf[:pos].encode("utf-8"))  # drop what was consumed, keep byte offsets exact
        buf, pos = buf[pos:] + text_dec.decode(chunk, final=eof), 0
        return True

    def skip_ws():
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return

    def where() -> str:
        return f"{b.path}: malformed JSON near byte {base + len(buf[:pos].encode('utf-8'))}"

    try:
        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":  # an error either way: say which one
            while True:
                try:
                    top, _ = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if not more():
                        raise DatasetError(f"{b.path}: malformed JSON: {e}") from None
            raise DatasetError(f"{b.path}: top level must be a list of samples, got {type(top).__name__}")
        pos += 1
        i = 0
        while True:
            skip_ws()
            if pos < len(buf) and buf[pos] == "]":
                return
            if i and pos < len(buf) and buf[pos] == ",":
                pos += 1
                skip_ws()
            elif i:
                raise DatasetError(where() + " (expected ',' or ']')")
            while True:
                try:
                    record, end = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError:
                    if not more():  # the element does not end before the file does
                        raise DatasetError(where() + f" (element {i})") from None
            start = base + len(buf[:pos].encode("utf-8"))
            stop = start + len(buf[pos:end].encode("utf-8"))
            pos = end
            b.add(i, f"{b.path}[{i}]", (start, stop), record)
            i += 1
    except UnicodeDecodeError as e:
        raise DatasetError(f"{b.path}: not UTF-8 ({e})") from None


def _index_parquet(f, b: _Builder) -> None:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-Parquet files
        raise DatasetError(f"{b.path}: not a readable Parquet file: {e}") from None
    names = set(pf.schema_arrow.names)
    missing = [c for c in ("id", "conversations") if c not in names]
    if missing:
        raise DatasetError(f"{b.path}: missing column(s) {missing} (columns: {sorted(names)})")
    cols = [c for c in ("id", "conversations", "image", "images") if c in names]
    row = 0
    for rg in range(pf.num_row_groups):
        # image columns are read only for their shape (lists / nulls), the bytes are dropped right away
        table = pf.read_row_group(rg, columns=cols)
        for r, rec in enumerate(_rows_without_image_bytes(table)):
            b.add(row, f"{b.path}[row {row}]", (rg, r), rec)
            row += 1


def _rows_without_image_bytes(table):
    out = {}
    for name in table.column_names:
        col = table.column(name).to_pylist() if name in ("id", "conversations") else None
        if col is None:  # keep only "is there an image / how many": enough to check placeholder counts
            col = [_image_shape(v) for v in table.column(name).to_pylist()]
        out[name] = col
    return [dict(zip(out, vals)) for vals in zip(*out.values())]


def _image_shape(v):
    if v is None:
        return None
    if isinstance(v, list):
        return [b"" for _ in v]
    return b""


_INDEXERS = {".jsonl": ("jsonl", _index_jsonl), ".json": ("json", _index_json), ".parquet": ("parquet", _index_parquet)}


def _fingerprint(files: _Files, path: str, size: int) -> str:
    """Digest of the first and last 64 KiB: an edit that keeps size and mtime still changes the index key."""
    h = hashlib.sha256()
    with files.open(path) as f:
        h.update(f.read(1 << 16))
        if size > 1 << 17:
            f.seek(size - (1 << 16))
            h.update(f.read(1 << 16))
    return h.hexdigest()[:16]


# ---- the dataset -------------------------------------------------------------------------------------------------


class Dataset:
    """Random access to the good records of a dataset file (see the module doc). ``ds[i]`` raises
    :class:`BadSampleError` for a sample that cannot be loaded (e.g. a missing image); the caller's policy decides."""

    def __init__(self, path: str, *, image_root: str | None = None, storage_options: dict | None = None,
                 verify_images: bool = True, progress: bool = False):
        self.path = str(path)
        self.storage_options = storage_options or {}
        self.verify_images = verify_images
        suffix = Path(self.path.split("?")[0]).suffix.lower()
        if suffix not in _INDEXERS:
            raise DatasetError(f"{self.path}: unknown dataset format {suffix!r} (expected .json, .jsonl or .parquet)")
        self.kind, indexer = _INDEXERS[suffix]
        files = _Files(self.path, self.storage_options)
        size, stamp = files.stat(self.path)
        root = image_root if image_root is not None else self.path.rsplit("/", 1)[0] if "/" in self.path else "."
        self.images = _Files(str(root), self.storage_options)
        if image_root is not None and not self.images.isdir(self.images.root):
            raise DatasetError(f"{image_root}: --image-root is not a directory")
        canon = self.path if files.url else str(Path(self.path).resolve())
        key = hashlib.sha256(f"{canon}\0{size}\0{stamp}".encode()).hexdigest()[:20]
        self.index_path = index_dir() / f"{Path(canon).name}-{key}-{_fingerprint(files, self.path, size)}"
        if not (self.index_path / "meta.json").is_file():
            self._build(files, indexer, progress, {"format": INDEX_FORMAT, "url": canon, "size": size,
                                                   "stamp": stamp, "kind": self.kind})
        self._index: SampleIndex | None = None
        self._local = threading.local()

    def _build(self, files: _Files, indexer, progress: bool, meta: dict) -> None:
        b = _Builder(self.path, self.kind)
        with files.open(self.path) as f:
            if progress:
                from tqdm import tqdm

                with tqdm.wrapattr(f, "read", total=meta["size"], desc=f"index {Path(self.path).name}",
                                   unit="B", unit_scale=True, leave=False) as g:
                    indexer(g, b)
            else:
                indexer(f, b)
        idx = b.finish()
        meta["n"] = len(idx)
        idx.save(self.index_path, meta)

    @property
    def index(self) -> SampleIndex:
        if self._index is None:
            self._index = SampleIndex.load(self.index_path)
        return self._index

    def __getstate__(self):  # workers re-map the index and reopen files
        return {k: v for k, v in self.__dict__.items() if k not in ("_index", "_local")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._index, self._local = None, threading.local()

    def __len__(self) -> int:
        return len(self.index)

    def sample_id(self, i: int) -> str:
        return self.index.sample_id(i)

    def source(self, i: int) -> str:
        return _source(self.kind, self.path, int(self.index.pos[i]))

    @property
    def bad_entries(self) -> list[BadSampleError]:
        """Records that failed while indexing, in file order (handled by the caller's ``--on-bad-sample``)."""
        return [BadSampleError(sid, reason, source=src) for _, sid, src, reason in self.index.bad]

    def record(self, i: int) -> dict:
        """The raw record of sample ``i`` (one read of its byte span, or its row group's row). A record that is not
        the one indexed (the file changed under a running job) is a DatasetError, never a misread sample."""
        a, b = (int(x) for x in self.index.loc[i])
        try:
            if self.kind == "parquet":
                rec = self._row_group(a).slice(b, 1).to_pylist()[0]
            else:
                f = self._file()
                f.seek(a)
                rec = json.loads(f.read(b - a).decode("utf-8"))
        except (ValueError, IndexError, UnicodeDecodeError):
            rec = None
        if not isinstance(rec, dict) or str(rec.get("id")) != self.sample_id(i):
            raise DatasetError(f"{self.source(i)}: the file changed after its index was built (expected sample "
                               f"{self.sample_id(i)!r}); reopen it to rebuild the index")
        return rec

    def __getitem__(self, i: int):
        from .data import to_sample

        return to_sample(self.record(i), source=self.source(i), files=self.images, verify_images=self.verify_images)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def _file(self):
        f = getattr(self._local, "file", None)
        if f is None:
            f = self._local.file = _Files(self.path, self.storage_options).open(self.path)
        return f

    def _row_group(self, rg: int):
        # Random access decodes whole row groups: keep the last few per thread (write training Parquet files with
        # small row groups, e.g. 64 rows).
        cache = getattr(self._local, "groups", None)
        if cache is None:
            import pyarrow.parquet as pq

            cache = self._local.groups = collections.OrderedDict()
            self._local.pf = pq.ParquetFile(self._file())
        if rg not in cache:
            cache[rg] = self._local.pf.read_row_group(rg)
            while len(cache) > 2:
                cache.popitem(last=False)
        cache.move_to_end(rg)
        return cache[rg]


def open_dataset(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                 storage_options: dict | None = None, verify_images: bool = True, progress: bool = False) -> Dataset:
    """Open a dataset file (local path or fsspec URL) for random access, building its index on first use."""
    return Dataset(str(path), image_root=None if image_root is None else str(image_root),
                   storage_options=storage_options, verify_images=verify_images, progress=progress)
