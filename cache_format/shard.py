"""Stable assignment of sample ids to `--shard I/N` workers."""
from __future__ import annotations

import hashlib


def in_shard(sample_id: str, shard: tuple[int, int]) -> bool:
    """True when `sample_id` belongs to shard (i, n). Stable across processes, machines and Python versions
    (sha1, not hash()), so N workers split a dataset into disjoint, covering parts."""
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    return int.from_bytes(hashlib.sha1(sample_id.encode()).digest()[:8], "big") % n == i
