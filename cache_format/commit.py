"""Commit records and manifests (SPEC section 7): which segments are visible, in which order.

A v1.1 commit record is constant-size: segment totals, array shapes and a reference (path, rows, bytes, crc32c)
to the segment's Parquet sample table (SPEC section 5a), never a list of ids. v1.0 records (ids as JSON lists)
are read through ``migrations.samples_from_v1_0``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from . import layout
from .errors import CacheError, CorruptCacheError, SchemaError
from .schema import FORMAT_NAME, FORMAT_VERSION

V1_0 = (1, 0)
V1_1 = (1, 1)
TABLE_REF_KEYS = ("path", "n_rows", "bytes", "crc32c")


def crc32c_hex(data: bytes) -> str:
    import crc32c

    return str(crc32c.crc32c(data))


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal(obj: dict) -> dict:
    """Return obj plus `checksum` = crc32c of its canonical JSON (detects flipped bytes in JSON objects)."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return {**body, "checksum": crc32c_hex(canonical(body))}


def unseal(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict) or "checksum" not in obj:
        raise CorruptCacheError(f"{where}: not a sealed record (no checksum)")
    body = {k: v for k, v in obj.items() if k != "checksum"}
    if crc32c_hex(canonical(body)) != str(obj["checksum"]):
        raise CorruptCacheError(f"{where}: checksum mismatch (record corrupted)")
    return body


def record_version(body: dict, where: str) -> tuple[int, int]:
    from .migrations import parse_version

    ver = parse_version(body.get("format_version"), where)
    if ver[0] > FORMAT_VERSION[0]:
        raise SchemaError(f"{where}: record version {ver[0]}.{ver[1]} is newer than this reader "
                          f"({FORMAT_VERSION[0]}.{FORMAT_VERSION[1]})")
    return ver


def check_table_ref(ref: Any, where: str) -> dict:
    """A table reference ``{path, n_rows, bytes, crc32c}`` (SPEC section 5a), validated."""
    if not isinstance(ref, dict) or set(ref) != set(TABLE_REF_KEYS):
        raise CorruptCacheError(f"{where}: table reference must have exactly the keys {list(TABLE_REF_KEYS)}, "
                                f"got {ref!r}"[:300])
    if not isinstance(ref["path"], str) or not ref["path"] or ".." in ref["path"].split("/"):
        raise CorruptCacheError(f"{where}: bad table path {ref['path']!r}")
    for k in ("n_rows", "bytes"):
        if isinstance(ref[k], bool) or not isinstance(ref[k], int) or ref[k] < 0:
            raise CorruptCacheError(f"{where}: table {k} must be a non-negative int, got {ref[k]!r}")
    if not isinstance(ref["crc32c"], str) or not ref["crc32c"].isdigit():
        raise CorruptCacheError(f"{where}: table crc32c must be a decimal string, got {ref['crc32c']!r}")
    return dict(ref)


@dataclass
class Segment:
    """One committed segment (SPEC section 7 commit record): totals, array shapes and where its samples are.

    The per-sample bookkeeping is columnar: ``table`` references the segment's Parquet sample table (v1.1), and
    ``columns`` holds it as a pyarrow Table when it is in memory (v1.0 records, which carry it as JSON lists, and
    segments a writer keeps). A reader keeps per-sample data in ``vlsi.cache_format.samples.SampleIndex`` instead.
    """

    part: str
    segment: str
    n_samples: int
    n_input_tokens: int
    n_answer_tokens: int
    arrays: dict = field(default_factory=dict)
    fingerprint_digest: str = ""
    version: tuple[int, int] = FORMAT_VERSION
    table: dict | None = None
    columns: Any = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.part}/{self.segment}"

    # ---- per-sample views (only when ``columns`` is in memory) ------------------------------------------------
    def _col(self, name: str):
        if self.columns is None:
            raise CacheError(f"segment {self.key}: per-sample columns are not in memory (v1.1 keeps them in its "
                             f"sample table; use the reader's index or samples.read_table)")
        return self.columns.column(name)

    @property
    def sample_ids(self) -> list[str]:
        return self._col("sample_id").to_pylist()

    @property
    def content_hashes(self) -> list[str]:
        return self._col("content_hash").to_pylist()

    @property
    def n_tokens(self) -> np.ndarray:
        return self._col("n_tokens").to_numpy().astype(np.int64)

    @property
    def n_answer(self) -> np.ndarray:
        return self._col("n_answer").to_numpy().astype(np.int64)

    def input_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n_tokens)]).astype(np.int64)

    def answer_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n_answer)]).astype(np.int64)

    # ---- records -----------------------------------------------------------------------------------------------
    def to_record(self) -> dict:
        body = {
            "format": FORMAT_NAME, "format_version": list(self.version),
            "part": self.part, "segment": self.segment, "fingerprint_digest": self.fingerprint_digest,
            "n_samples": int(self.n_samples), "n_input_tokens": int(self.n_input_tokens),
            "n_answer": int(self.n_answer_tokens), "arrays": self.arrays,
        }
        if tuple(self.version) >= V1_1:
            if self.table is None:
                raise CacheError(f"segment {self.key}: a v1.1 record needs its sample table reference")
            body["table"] = dict(self.table)
        else:  # v1.0: the samples as parallel JSON lists
            body["samples"] = {"sample_id": self.sample_ids, "content_hash": self.content_hashes,
                               "n_tokens": [int(x) for x in self.n_tokens],
                               "n_answer": [int(x) for x in self.n_answer]}
        return seal(body)

    @classmethod
    def from_record(cls, obj: Any, where: str) -> "Segment":
        body = unseal(obj, where)
        try:
            if body["format"] != FORMAT_NAME:
                raise SchemaError(f"{where}: format {body['format']!r} is not {FORMAT_NAME!r}")
            ver = record_version(body, where)
            counts = [body["n_samples"], body["n_input_tokens"], body["n_answer"]]
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in counts):
                raise CorruptCacheError(f"{where}: n_samples / n_input_tokens / n_answer must be non-negative ints")
            seg = cls(str(body["part"]), str(body["segment"]), *counts, arrays=dict(body["arrays"]),
                      fingerprint_digest=str(body["fingerprint_digest"]), version=ver)
            if ver >= V1_1:
                seg.table = check_table_ref(body["table"], where)
                if seg.table["n_rows"] != seg.n_samples:
                    raise CorruptCacheError(f"{where}: sample table has {seg.table['n_rows']} rows for "
                                            f"{seg.n_samples} samples")
            else:
                from .migrations import samples_from_v1_0

                seg.columns = samples_from_v1_0(body, where)
                if seg.columns.num_rows != seg.n_samples or int(seg.n_tokens.sum()) != seg.n_input_tokens \
                        or int(seg.n_answer.sum()) != seg.n_answer_tokens:
                    raise CorruptCacheError(f"{where}: sample bookkeeping does not add up")
        except CacheError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise CorruptCacheError(f"{where}: malformed commit record ({type(e).__name__}: {e})") from None
        return seg


def write_commit(loc, seg: Segment) -> None:
    """The commit point: after this object exists the segment is visible."""
    loc.write_json(layout.commit_path(seg.part, seg.segment), seg.to_record())


def iter_objects(loc, rels: list[str], *, window: int = 32) -> Iterator[tuple[str, Any]]:
    """(rel, bytes or the CacheError reading it) for each object, in order; fetched ahead in threads on object
    stores (one round trip each), at most `window` in flight. Consumers parse one at a time, so the Python objects
    of one JSON record are freed before the next is parsed (no heap of millions of parsed ids)."""
    def get(rel):
        try:
            return loc.read_bytes(rel)
        except CacheError as e:
            return e

    if loc.is_local or len(rels) < 4:
        for rel in rels:
            yield rel, get(rel)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=16) as ex:
        pending: deque = deque()
        it = iter(rels)
        for rel in it:
            pending.append((rel, ex.submit(get, rel)))
            if len(pending) >= window:
                break
        while pending:
            rel, fut = pending.popleft()
            yield rel, fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(get, nxt)))


def read_commits(loc, *, strict: bool = True, problems: list[str] | None = None) -> list[Segment]:
    """All committed segments (commit records), sorted by (part, segment)."""
    # a local writer killed between write and rename leaves *.tmp-* garbage: ignore it
    rels = [rel for rel in loc.find(layout.COMMITS) if rel.endswith(".json") and ".tmp-" not in rel]
    out = []
    for rel, data in iter_objects(loc, rels):
        where = f"{loc.url}: {rel}"
        try:
            if isinstance(data, CacheError):
                raise data
            try:
                obj = json.loads(data)
            except (ValueError, UnicodeDecodeError) as e:
                raise CorruptCacheError(f"{where} is not valid JSON ({type(e).__name__}: {e})"[:400]) from None
            del data
            out.append(Segment.from_record(obj, where))
            del obj
        except CacheError as e:
            if strict:
                raise
            if problems is not None:
                problems.append(str(e))
    out.sort(key=lambda s: (s.part, s.segment))
    return out


def latest_manifest(loc) -> tuple[int, dict | None]:
    """(generation, manifest body) of the newest manifest, or (0, None)."""
    gens = []
    for rel in loc.find(layout.MANIFESTS):
        name = rel.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:-5].isdigit():
            gens.append((int(name[:-5]), rel))
    if not gens:
        return 0, None
    gen, rel = max(gens)
    return gen, unseal(loc.read_json(rel), f"{loc.url}: {rel}")


def write_manifest(loc, gen: int, segments: list[Segment], retired: list[str], index: Any,
                   version: tuple[int, int] = FORMAT_VERSION) -> None:
    """Write generation `gen`. `index`: a table reference (v1.1), a path (v1.0) or None. Every segment's record
    is written in the manifest's version."""
    version = tuple(version)
    for s in segments:
        if tuple(s.version) != version:
            raise CacheError(f"manifest {gen}: segment {s.key} is v{s.version[0]}.{s.version[1]}, the manifest "
                             f"v{version[0]}.{version[1]}")
    if version >= V1_1 and index is not None:
        index = check_table_ref(index, f"manifest {gen} index")
    body = {"format": FORMAT_NAME, "format_version": list(version), "generation": gen,
            "segments": [s.to_record() for s in segments], "retired": sorted(set(retired)), "index": index}
    loc.write_json(f"{layout.MANIFESTS}/{gen:08d}.json", seal(body))


@dataclass
class Visible:
    """The visible set (SPEC section 7): the manifest's segments first (``n_listed`` of them), then committed ones.

    ``index`` is the v1.1 manifest's consolidated index (a table reference covering exactly the listed segments,
    in order) or None."""

    generation: int
    segments: list[Segment]
    n_listed: int = 0
    index: dict | None = None
    manifest_version: tuple[int, int] | None = None


def visible_set(loc, *, strict: bool = True, problems: list[str] | None = None) -> Visible:
    """The visible set (SPEC section 7): manifest segments, then committed ones neither listed nor retired."""
    loc.invalidate()  # object-store filesystems cache listings; other processes may have committed since
    gen, man = latest_manifest(loc)
    listed: list[Segment] = []
    hidden: set[str] = set()
    index, mver = None, None
    if man is not None:
        where = f"{loc.url}: manifest {gen}"
        mver = record_version(man, where)
        for i, rec in enumerate(man["segments"]):
            listed.append(Segment.from_record(rec, f"{where} segment {i}"))
        hidden = {s.key for s in listed} | set(man["retired"])
        if mver >= V1_1 and man.get("index") is not None:
            index = check_table_ref(man["index"], f"{where} index")
            if index["n_rows"] != sum(s.n_samples for s in listed):
                raise CorruptCacheError(f"{where} index: {index['n_rows']} rows for "
                                        f"{sum(s.n_samples for s in listed)} samples in its segments")
    extra = [s for s in read_commits(loc, strict=strict, problems=problems) if s.key not in hidden]
    return Visible(gen, listed + extra, len(listed), index, mver)


def visible_segments(loc, *, strict: bool = True, problems: list[str] | None = None) -> tuple[int, list[Segment]]:
    """(generation, visible segments in order): `visible_set` without the index."""
    v = visible_set(loc, strict=strict, problems=problems)
    return v.generation, v.segments
