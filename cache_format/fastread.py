"""A direct reader for the one array layout vlsi writers produce (SPEC section 5): one shard along axis 0, inner
chunks over whole rows, inner codecs ``bytes(little) -> blosc -> crc32c``, shard index ``bytes(little) -> crc32c``.

Why: a random ``get`` touches five arrays of a segment it has often not read yet; through zarr-python each array
costs an array open plus a sharded read that hops to zarr's event-loop thread (~4 ms each on a small VM). Here an
inner chunk is two byte-range reads (the shard index, cached per array, and the chunk), one crc32c check and one
blosc decode. Arrays with any other layout or codec chain return None from :func:`open_fast` and are read through
zarr-python (readers MUST accept any valid Zarr v3 codec chain). Checksums are checked exactly as zarr does: a
mismatch raises ValueError("Stored and computed checksum do not match ...") for the caller to name the chunk.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

#: VLSI_CACHE_FAST_READS=0 reads every array through zarr-python (conformance checks, debugging)
FAST_READS = os.environ.get("VLSI_CACHE_FAST_READS", "1") != "0"
_EMPTY = 2**64 - 1
_DTYPES = {"int32", "int64", "uint32", "uint64", "float16", "float32", "float64", "int16", "uint16", "int8", "uint8"}


def _crc32c(data) -> int:
    import crc32c

    return crc32c.crc32c(data)


def _check_crc(data: memoryview, what: str) -> memoryview:
    if len(data) < 4:
        raise ValueError(f"{what}: {len(data)} bytes, too short for its crc32c")
    body, stored = data[:-4], bytes(data[-4:])
    computed = int(_crc32c(body)).to_bytes(4, "little")
    if computed != stored:
        raise ValueError(f"Stored and computed checksum do not match. Stored: {stored!r}. Computed: {computed!r}.")
    return body


class FastArray:
    """Read-only view of one vlsi-layout sharded array: ``shape``, ``dtype``, ``chunks`` (inner chunk shape), and
    ``arr[lo:hi]`` along axis 0, like the zarr array it stands in for."""

    def __init__(self, loc, path: str, shape: tuple, dtype: np.dtype, inner: tuple, fill: Any, compressed: bool,
                 index_at_end: bool, key: str):
        self.loc, self.path = loc, path
        self.shape, self.dtype, self.chunks = shape, dtype, inner
        self._fill, self._compressed, self._index_at_end = fill, compressed, index_at_end
        self._key = f"{path}/{key}"
        self._n_index = max(-(-shape[0] // inner[0]), 1)  # inner chunks the shard index lists
        self._index: np.ndarray | None = None
        self._missing = False  # no shard object: every chunk is the fill value (zarr skips writing those)

    # ---- shard index -------------------------------------------------------------------------------------------
    def _load_index(self) -> np.ndarray:
        if self._index is None:
            from .errors import CacheNotFoundError

            nbytes = 16 * self._n_index + 4
            try:
                raw = self.loc.read_range(self._key, -nbytes if self._index_at_end else 0,
                                          None if self._index_at_end else nbytes)
            except CacheNotFoundError:
                self._missing = True
                self._index = np.full((self._n_index, 2), _EMPTY, dtype=np.uint64)
                return self._index
            if len(raw) != nbytes:
                raise ValueError(f"shard index: read {len(raw)} bytes, expected {nbytes} (truncated shard)")
            body = _check_crc(memoryview(raw), "shard index")
            self._index = np.frombuffer(body, dtype="<u8").reshape(self._n_index, 2)
        return self._index

    def read_chunk(self, c: int) -> np.ndarray:
        """Inner chunk ``c`` (rows ``c * inner0 ..``), decoded, trimmed to the array's shape."""
        inner = self.chunks
        rows = min(inner[0], self.shape[0] - c * inner[0])
        off, nbytes = (int(x) for x in self._load_index()[c])
        if off == _EMPTY and nbytes == _EMPTY:
            return np.full((rows,) + tuple(inner[1:]), self._fill, dtype=self.dtype)
        raw = self.loc.read_range(self._key, off, off + nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"read {len(raw)} bytes of {nbytes} (truncated shard)")
        body = _check_crc(memoryview(raw), "chunk")
        if self._compressed:
            from numcodecs import blosc

            body = blosc.decompress(body)
        a = np.frombuffer(body, dtype=self.dtype.newbyteorder("<"))
        want = int(np.prod(inner))
        if a.size != want:
            raise ValueError(f"decoded {a.size} values, expected {want}")
        return a.reshape(inner)[:rows].astype(self.dtype, copy=False)

    def __getitem__(self, sl: slice) -> np.ndarray:
        lo, hi, step = sl.indices(self.shape[0])
        if step != 1:
            raise IndexError("only contiguous row slices")
        if hi <= lo:
            return np.zeros((0,) + tuple(self.shape[1:]), self.dtype)
        C = self.chunks[0]
        parts = [self.read_chunk(c)[max(lo - c * C, 0):hi - c * C] for c in range(lo // C, (hi - 1) // C + 1)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def open_fast(loc, path: str) -> FastArray | None:
    """A FastArray for the array at ``path`` if its metadata is exactly the vlsi layout, else None."""
    try:
        meta = json.loads(loc.read_range(f"{path}/zarr.json", 0, None))
    except Exception:  # noqa: BLE001 - let zarr report it
        return None
    try:
        return _from_meta(loc, path, meta)
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _from_meta(loc, path: str, meta: dict) -> FastArray | None:
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers"):
        return None
    if meta.get("data_type") not in _DTYPES:
        return None
    shape = tuple(int(x) for x in meta["shape"])
    if not shape:
        return None
    grid = meta["chunk_grid"]
    if grid.get("name") != "regular":
        return None
    shard = tuple(int(x) for x in grid["configuration"]["chunk_shape"])
    cke = meta["chunk_key_encoding"]
    if cke.get("name") != "default" or cke.get("configuration", {}).get("separator", "/") != "/":
        return None
    codecs = meta["codecs"]
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    cfg = codecs[0]["configuration"]
    inner = tuple(int(x) for x in cfg["chunk_shape"])
    if shard[1:] != shape[1:] or inner[1:] != shape[1:] or shard[0] < shape[0] or shard[0] % inner[0]:
        return None
    if max(-(-shape[0] // inner[0]), 1) != shard[0] // inner[0]:
        return None  # the index covers shard0 / inner0 chunks: only shards that end with the array's last chunk
    names = [c.get("name") for c in cfg["codecs"]]
    if names not in (["bytes", "blosc", "crc32c"], ["bytes", "crc32c"]):
        return None
    if cfg["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
        return None
    idx = cfg.get("index_codecs", [])
    if [c.get("name") for c in idx] != ["bytes", "crc32c"] or idx[0].get("configuration", {}).get("endian",
                                                                                                    "little") != "little":
        return None
    loc_ = cfg.get("index_location", "end")
    if loc_ not in ("end", "start"):
        return None
    fill = meta.get("fill_value", 0)
    if not isinstance(fill, (int, float)) or isinstance(fill, bool):
        return None
    dtype = np.dtype(meta["data_type"])
    key = "c/" + "/".join("0" for _ in shape)
    return FastArray(loc, path, shape, dtype, inner, fill, names[1] == "blosc", loc_ == "end", key)
