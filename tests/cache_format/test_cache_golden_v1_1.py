"""The committed golden v1.1 cache must be read by every later version with exactly these values.

It holds the v1.0 fixture's six samples: segment 1 listed by manifest 1 (its per-sample columns come from the
manifest's Parquet index), segment 2 committed after it (its own sample table). See make_golden_v1_1.py.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
from make_golden import K, N_SAMPLES, golden_arrays, golden_fingerprint_dict
from make_golden_v1_1 import PARTS

from vlsi.cache_format import Fingerprint, open_cache, verify_cache

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "v1_1")


def test_golden_v1_1_reads_exactly():
    rd = open_cache(GOLDEN)
    assert rd.attrs["format_version"] == [1, 1]
    assert rd.attrs["required"] == ["csr-segments-v1", "sample-tables-v1"]
    assert rd.fingerprint == Fingerprint.from_dict(golden_fingerprint_dict())
    assert rd.generation == 1 and len(rd) == N_SAMPLES
    assert [s.key for s in rd.segments] == [f"{PARTS[0]}/s000000", f"{PARTS[1]}/s000000"]
    want = golden_arrays()
    assert list(rd.sample_ids) == [d["sample_id"] for d in want]
    for d, got in zip(want, rd.iter()):
        assert got.sample_id == d["sample_id"] and got.content_hash == d["content_hash"]
        for f in ("input_ids", "answer_positions", "topk_ids", "tail_logmass"):
            np.testing.assert_array_equal(getattr(got, f), d[f])
        np.testing.assert_array_equal(got.topk_logprobs, d["topk_logprobs"].astype(np.float16).astype(np.float32))
    for d in reversed(want):  # by id, from the index (first 4) and from the sample table (last 2)
        got = rd.get(d["sample_id"])
        np.testing.assert_array_equal(got.input_ids, d["input_ids"])
        raw = rd.get(d["sample_id"], decode=False).topk_logprobs
        assert raw.dtype == np.float16 and raw.shape[-1] == K
    assert rd.get("golden-2").topk_ids.shape == (0, 3, K)
    assert "golden-6" not in rd and "golden-" not in rd
    idx = rd.index
    assert idx.column("sample_id").to_pylist() == [d["sample_id"] for d in want]
    assert idx.column("n_answer").to_pylist() == [len(d["answer_positions"]) for d in want]


def test_golden_v1_1_records_are_small_and_verify(tmp_path):
    for part in PARTS:
        rec = json.load(open(os.path.join(GOLDEN, "commits", part, "s000000.json")))
        assert "samples" not in rec and set(rec["table"]) == {"path", "n_rows", "bytes", "crc32c"}
    before = sorted(os.listdir(GOLDEN))
    rep = verify_cache(GOLDEN)
    assert rep.ok, rep.problems
    assert rep.n_samples == N_SAMPLES and rep.n_segments == 2
    assert sorted(os.listdir(GOLDEN)) == before  # reading/verifying never writes
    from vlsi.cache_format import compact

    dst = str(tmp_path / "g")
    shutil.copytree(GOLDEN, dst)
    compact(dst)
    rd = open_cache(dst)
    assert rd.attrs["format_version"] == [1, 1] and rd.generation == 2 and len(rd.segments) == 1
    assert [r.sample_id for r in rd.iter()] == [d["sample_id"] for d in golden_arrays()]
    assert verify_cache(dst).ok
