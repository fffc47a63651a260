"""Generate the golden v1.1 cache fixture (tests/cache_format/golden/v1_1). Run ONCE per format version:

    python tests/cache_format/make_golden_v1_1.py tests/cache_format/golden/v1_1

The same six samples as the v1.0 fixture (``make_golden.golden_arrays``), written by a v1.1 writer so both v1.1
read paths are exercised: the first four in part ...golden000000 (one segment), then ``finalize`` (manifest
generation 1 with its checksummed Parquet index), then the last two in part ...golden000001, committed after the
manifest (read from its per-segment sample table). test_cache_golden_v1_1.py reads the committed files with every
later version of the reader (do not change this generator; a new version gets a new generator and fixture).
"""
from __future__ import annotations

import sys

from make_golden import golden_arrays, golden_fingerprint_dict

PARTS = ("p0000of0001-golden000000", "p0000of0001-golden000001")


def main(dest: str) -> None:
    from vlsi.cache_format import CacheWriter, Fingerprint, SampleRecord, finalize

    fp = Fingerprint.from_dict(golden_fingerprint_dict())
    recs = [SampleRecord(**d) for d in golden_arrays()]
    with CacheWriter(dest, fp, part=PARTS[0], chunk_bytes=256) as w:
        for r in recs[:4]:
            w.append(r)
    finalize(dest)
    with CacheWriter(dest, fp, part=PARTS[1], chunk_bytes=256) as w:
        for r in recs[4:]:
            w.append(r)


if __name__ == "__main__":
    main(sys.argv[1])
