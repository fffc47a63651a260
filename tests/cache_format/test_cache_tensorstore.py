"""Conformance: tensorstore (an independent Zarr v3 implementation) reads every array identically."""
from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import make_fp, make_records

from vlsi.cache_format import CacheWriter, layout, open_cache

ts = pytest.importorskip("tensorstore")


def test_tensorstore_reads_every_array(tmp_path):
    fp = make_fp(layers=(0, 2, 5), k=6)
    url = str(tmp_path / "c")
    with CacheWriter(url, fp, commit_every=7, chunk_bytes=300) as w:
        for r in make_records(15, 5, fp):
            w.append(r)
    rd = open_cache(url)
    n = 0
    for si, seg in enumerate(rd.segments):
        ours = rd.read_segment(si)
        for name in layout.ARRAYS:
            spec = {"driver": "zarr3", "kvstore": {"driver": "file",
                                                   "path": f"{url}/{layout.array_path(seg.part, seg.segment, name)}"}}
            theirs = ts.open(spec, read=True).result().read().result()
            assert theirs.dtype == ours[name].dtype and theirs.shape == ours[name].shape, name
            np.testing.assert_array_equal(theirs, ours[name])
            n += 1
    assert n == 7 * len(rd.segments) == 21
