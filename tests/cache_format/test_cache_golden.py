"""The committed golden v1.0 cache must be read by every later version with exactly these values."""
from __future__ import annotations

import os
import shutil

import numpy as np
from make_golden import K, N_SAMPLES, golden_arrays, golden_fingerprint_dict

from vlsi.cache_format import Fingerprint, open_cache, verify_cache

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "v1_0")


def test_golden_v1_0_reads_exactly():
    rd = open_cache(GOLDEN)
    assert rd.attrs["format_version"] == [1, 0]
    assert rd.fingerprint == Fingerprint.from_dict(golden_fingerprint_dict())
    assert len(rd) == N_SAMPLES and len(rd.segments) == 2
    for want, got in zip(golden_arrays(), rd.iter()):
        assert got.sample_id == want["sample_id"] and got.content_hash == want["content_hash"]
        for f in ("input_ids", "answer_positions", "topk_ids", "tail_logmass"):
            np.testing.assert_array_equal(getattr(got, f), want[f])
        np.testing.assert_array_equal(got.topk_logprobs, want["topk_logprobs"].astype(np.float16).astype(np.float32))
        raw = rd.get(want["sample_id"], decode=False).topk_logprobs
        assert raw.dtype == np.float16 and raw.shape[-1] == K
    assert rd.get("golden-2").topk_ids.shape == (0, 3, K)


def test_golden_verifies_and_is_read_only(tmp_path):
    before = sorted(os.listdir(GOLDEN))
    assert verify_cache(GOLDEN).ok
    assert sorted(os.listdir(GOLDEN)) == before  # reading/verifying never writes
    # a copy can be compacted by the current version and still reads the same
    from vlsi.cache_format import compact
    dst = str(tmp_path / "g")
    shutil.copytree(GOLDEN, dst)
    compact(dst)
    assert [r.sample_id for r in open_cache(dst).iter()] == [d["sample_id"] for d in golden_arrays()]
