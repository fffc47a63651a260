"""Format version table and in-memory migrations (SPEC sections 3 and 11).

A migration reads an older layout *in memory*; nothing is ever rewritten in place.

- Root attributes: 1.0 and 1.1 have the same keys (1.1 only adds a `required` feature), so ``check_and_migrate``
  validates them and returns them as stored: ``format_version`` stays the cache's version, which tells writers which
  layout to add (SPEC section 3) and readers which read path each record takes. A later version whose root keys
  change adds a function to ``MIGRATIONS`` keyed by the version it upgrades from (it MUST keep
  ``format_version``).
- Commit records: a 1.0 record carries its samples as JSON lists; ``samples_from_v1_0`` is the 1.0 read path that
  turns them into the columnar table a 1.1 segment keeps in its Parquet sample table.

To add a version: append to VERSIONS, teach ``commit.Segment.from_record`` its records, keep the golden fixtures of
every older version passing (tests/cache_format/golden).
"""
from __future__ import annotations

from typing import Any, Callable

from .errors import CorruptCacheError, SchemaError, VersionError
from .schema import FORMAT_NAME, FORMAT_VERSION, KNOWN_FEATURES, REQUIRED_BY_VERSION

#: every released format version, oldest first, with what changed
VERSIONS: dict[tuple[int, int], str] = {
    (1, 0): "first release: CSR segments, commit records, manifests, fp16-logprob encoding",
    (1, 1): "per-segment Parquet sample tables (ids, content hashes, id hashes) referenced with size + crc32c by "
            "constant-size commit records; checksummed index with id_hash; required feature sample-tables-v1",
    (1, 2): "optional fingerprint features, each its own required feature: topk1-* encodings (topk-encodings-v1), "
            "sampled targets with a sample_counts array (sampled-targets-v1), derived caches (derived-caches-v1)",
}
#: from-version -> function(attrs) -> attrs in the next version's root layout (format_version kept as stored)
MIGRATIONS: dict[tuple[int, int], Callable[[dict], dict]] = {}

ROOT_KEYS = frozenset({"format", "format_version", "required", "fingerprint"})


def parse_version(v: Any, where: str) -> tuple[int, int]:
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise SchemaError(f"{where}: format_version must be [major, minor], got {v!r}")
    return int(v[0]), int(v[1])


def check_and_migrate(attrs: Any, where: str) -> dict:
    """Validate root attributes and bring their layout to FORMAT_VERSION (``format_version`` keeps the cache's
    version). Raises VersionError / SchemaError."""
    if not isinstance(attrs, dict):
        raise SchemaError(f"{where}: root attribute 'vlsi_cache' missing or not an object (not a vlsi cache)")
    if attrs.get("format") != FORMAT_NAME:
        raise SchemaError(f"{where}: format is {attrs.get('format')!r}, expected {FORMAT_NAME!r}")
    ver = parse_version(attrs.get("format_version"), where)
    if ver[0] > FORMAT_VERSION[0]:
        raise VersionError(f"{where}: cache format version {ver[0]}.{ver[1]} is newer than this reader "
                           f"({FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}); upgrade vlsi to read it")
    required = attrs.get("required")
    if not isinstance(required, list):
        raise SchemaError(f"{where}: 'required' must be a list of feature names")
    unknown = sorted(set(required) - KNOWN_FEATURES)
    if unknown:
        raise VersionError(f"{where}: cache requires features this reader does not know: {unknown} "
                           f"(cache version {ver[0]}.{ver[1]}, reader {FORMAT_VERSION[0]}.{FORMAT_VERSION[1]})")
    if ver <= FORMAT_VERSION:  # a newer minor MAY add keys; only same-or-older versions are checked strictly
        unknown_keys = sorted(set(attrs) - ROOT_KEYS)
        if unknown_keys:
            raise SchemaError(f"{where}: unknown root keys {unknown_keys}")
    missing = sorted(ROOT_KEYS - set(attrs))
    if missing:
        raise SchemaError(f"{where}: missing root keys {missing}")
    if ver >= (1, 2):  # every feature the fingerprint uses must be declared, or an older reader would misread it
        from .schema import Fingerprint

        undeclared = sorted(set(Fingerprint.from_dict(attrs["fingerprint"]).features) - set(required))
        if undeclared:
            raise SchemaError(f"{where}: fingerprint uses features {undeclared} missing from 'required'")
    if ver < (1, 0):
        raise VersionError(f"{where}: no migration from format version {ver[0]}.{ver[1]}")
    for v in VERSIONS:
        if ver <= v < FORMAT_VERSION and v in MIGRATIONS:
            attrs = MIGRATIONS[v](dict(attrs))
    return attrs


def writer_version(attrs: dict) -> tuple[int, int]:
    """The layout a writer adds to a cache with these root attributes: min(the cache's version, ours)."""
    ver = parse_version(attrs["format_version"], "root")
    return min(ver, FORMAT_VERSION)


def root_attrs(fingerprint_dict: dict, version: tuple[int, int] = FORMAT_VERSION) -> dict:
    """Root attributes of a new cache: ``required`` = the version's base features + (1.2+) the fingerprint's."""
    from .schema import Fingerprint

    required = list(REQUIRED_BY_VERSION[tuple(version)])
    features = Fingerprint.from_dict(fingerprint_dict).features
    if features and tuple(version) < (1, 2):
        raise SchemaError(f"format version {version[0]}.{version[1]} cannot hold features {list(features)}")
    required += [f for f in features if f not in required]
    return {"format": FORMAT_NAME, "format_version": list(version), "required": required,
            "fingerprint": fingerprint_dict}


def samples_from_v1_0(body: dict, where: str):
    """The v1.0 read path of a commit record: its JSON lists of samples -> a columnar table (pyarrow over plain
    buffers, no per-element conversion). 1.0 stores no id hashes: the ``py_hash`` column holds the in-process lookup
    keys (``samples.py_hash``), computed in C. Cost: the JSON parse of every id, which is why 1.1 stores them in
    Parquet (SPEC section 11)."""
    import numpy as np
    import pyarrow as pa

    from .samples import py_hashes

    s = body["samples"]
    ids, hashes = s["sample_id"], s["content_hash"]
    n_tok, n_ans = s["n_tokens"], s["n_answer"]
    if not all(isinstance(x, list) for x in (ids, hashes, n_tok, n_ans)):
        raise CorruptCacheError(f"{where}: samples must be parallel lists")
    if len({len(ids), len(hashes), len(n_tok), len(n_ans)}) != 1:
        raise CorruptCacheError(f"{where}: sample bookkeeping does not add up (list lengths differ)")
    if not all(isinstance(x, str) for x in ids) or not all(isinstance(x, str) for x in hashes):
        raise CorruptCacheError(f"{where}: sample ids and content hashes must be strings")
    return pa.table({
        "sample_id": _string_array(ids), "content_hash": _string_array(hashes),
        "py_hash": pa.array(py_hashes(ids), type=pa.uint64()),
        "n_tokens": pa.array(np.asarray(n_tok, dtype=np.int64).astype(np.int32), type=pa.int32()),
        "n_answer": pa.array(np.asarray(n_ans, dtype=np.int64).astype(np.int32), type=pa.int32()),
    })


def _string_array(items: list):
    """A pyarrow string array over one UTF-8 buffer built by ``str.join`` (C speed; ASCII needs no per-item
    encode)."""
    import numpy as np
    import pyarrow as pa

    joined = "".join(items)
    data = joined.encode("utf-8")
    if len(data) == len(joined):
        lens = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
    else:
        enc = [x.encode("utf-8") for x in items]
        data = b"".join(enc)
        lens = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
    large = len(data) >= 2**31 - 1
    offsets = np.zeros(len(items) + 1, dtype=np.int64 if large else np.int32)
    np.cumsum(lens, out=offsets[1:])
    return pa.Array.from_buffers(pa.large_string() if large else pa.string(), len(items),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(data)])
