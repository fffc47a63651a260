"""Shard workers creating one new cache at the same moment: same fingerprint -> all proceed; different -> refused."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cache_helpers import make_fp, make_record
from vlsi.cache_format import CacheWriter, FingerprintMismatchError, open_cache


def _race(url, fps):
    barrier = threading.Barrier(len(fps))
    results: list = [None] * len(fps)

    def work(i, fp):
        barrier.wait()
        try:
            with CacheWriter(url, fp, shard=(i, len(fps))) as w:
                w.append(make_record(np.random.default_rng(i), f"s{i}", fp, T=8, A=3))
            results[i] = "ok"
        except Exception as e:  # noqa: BLE001 - the test inspects what each worker got
            results[i] = e

    threads = [threading.Thread(target=work, args=(i, fp)) for i, fp in enumerate(fps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("round_", range(3))
def test_same_fingerprint_workers_all_succeed(tmp_path, round_):
    url = str(tmp_path / "c")
    fp = make_fp()
    assert _race(url, [fp] * 4) == ["ok"] * 4
    assert sorted(open_cache(url).sample_ids) == ["s0", "s1", "s2", "s3"]


def test_different_fingerprints_never_both_proceed(tmp_path):
    url = str(tmp_path / "c")
    res = _race(url, [make_fp(k=4), make_fp(k=5)])
    assert res.count("ok") == 1, res
    err = next(r for r in res if r != "ok")
    assert isinstance(err, FingerprintMismatchError) and "top_k" in str(err)
