"""`vlsi-cache derive` (layers / top-k / encoding, fingerprint records the derivation, resumable), `info` bytes per
row, `stats --reference` KL error."""
from __future__ import annotations

import json

import numpy as np
import pytest
from cache_helpers import make_fp, make_records
from click.testing import CliRunner

from vlsi.cache_format import CacheWriter, open_cache, verify_cache
from vlsi.cache_format.cli import main
from vlsi.cache_format.derive import derive
from vlsi.cache_format.stats import row_kl


@pytest.fixture()
def src(tmp_path):
    fp = make_fp(layers=(0, 2, 5), k=6, vocab=80)
    url = str(tmp_path / "src")
    with CacheWriter(url, fp, commit_every=4) as w:
        for r in make_records(10, 11, fp):
            w.append(r)
    return url


def test_derive_layers_topk_encoding(src, tmp_path):
    dst = str(tmp_path / "d")
    d = derive(src, dst, layers=[5, 0], top_k=3, encoding="topk1-prev-q8")
    assert d["written"] == 10 and d["layers"] == ["0", "5", "final"]
    a, b = open_cache(src), open_cache(dst)
    fp = b.fingerprint
    assert fp.target_layers == (0, 5) and fp.top_k == 3 and fp.value_encoding == "topk1-prev-q8"
    assert fp.derived_from["source_digest"] == a.fingerprint.digest()
    assert fp.derived_from["layers"] == [0, 5] and fp.derived_from["top_k"] == 3
    assert b.attrs["required"] == ["csr-segments-v1", "sample-tables-v1", "topk-encodings-v1", "derived-caches-v1"]
    for r in a.iter():
        g = b.get(r.sample_id)
        np.testing.assert_array_equal(g.input_ids, r.input_ids)
        for jb, ja in ((0, 0), (1, 2), (2, 3)):
            np.testing.assert_array_equal(g.topk_ids[:, jb], r.topk_ids[:, ja, :3])
            # the mass of the dropped entries is in the tail
            want = np.log(np.exp(r.tail_logmass[:, ja].astype(np.float64))
                          + np.exp(r.topk_logprobs[:, ja, 3:].astype(np.float64)).sum(-1))
            np.testing.assert_allclose(g.tail_logmass[:, jb], want, rtol=0, atol=1e-5)
    assert verify_cache(dst).ok
    # the same derivation again resumes (nothing new); another one is refused
    assert derive(src, dst, layers=[0, 5], top_k=3, encoding="topk1-prev-q8")["written"] == 0
    from vlsi.cache_format.errors import FingerprintMismatchError

    with pytest.raises(FingerprintMismatchError, match="top_k"):
        derive(src, dst, layers=[0, 5], top_k=2, encoding="topk1-prev-q8")


def test_derive_resumes_after_a_crash(src, tmp_path, monkeypatch):
    dst = str(tmp_path / "d")
    import vlsi.cache_format.derive as dv

    calls = {"n": 0}
    real = dv.truncate_rows

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(dv, "truncate_rows", boom)
    with pytest.raises(RuntimeError):
        derive(src, dst, encoding="topk1-plain-q8", segment_bytes=1)  # one segment per sample
    monkeypatch.setattr(dv, "truncate_rows", real)
    done = len(open_cache(dst))
    assert 0 < done < 10
    assert derive(src, dst, encoding="topk1-plain-q8")["written"] == 10 - done
    assert len(open_cache(dst)) == 10 and verify_cache(dst).ok


def test_derive_refuses_bad_requests(src, tmp_path):
    from vlsi.cache_format.errors import CacheError, SchemaError

    with pytest.raises(CacheError, match=r"layers \[3\] are not target layers"):
        derive(src, str(tmp_path / "x"), layers=[3])
    with pytest.raises(CacheError, match=r"--top-k 9 must be in \[1, 6\]"):
        derive(src, str(tmp_path / "x"), top_k=9)
    with pytest.raises(SchemaError, match="unknown value_encoding"):
        derive(src, str(tmp_path / "x"), encoding="zip")


def test_row_kl_identities():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(100, 5, replace=False) for _ in range(4)])
    lp = np.log(np.sort(rng.dirichlet(np.ones(6), 4)[:, :5], -1)[:, ::-1])
    tail = np.log1p(-np.exp(lp).sum(-1))
    assert np.abs(row_kl(ids, lp, tail, ids, lp, tail, 100)).max() < 1e-12
    # dropping entries into the tail costs > 0, and more the more is dropped
    lp2, lp3 = lp.copy(), lp.copy()
    lp2[:, 4:], lp3[:, 2:] = -np.inf, -np.inf
    t2 = np.log(np.exp(tail) + np.exp(lp[:, 4:]).sum(-1))
    t3 = np.log(np.exp(tail) + np.exp(lp[:, 2:]).sum(-1))
    k2, k3 = row_kl(ids, lp, tail, ids, lp2, t2, 100), row_kl(ids, lp, tail, ids, lp3, t3, 100)
    assert (k2 > 0).all() and (k3 > k2).all()
    # brute force over the whole vocabulary
    def full(ids_, lp_, t_):
        p = np.full(100, 0.0)
        pres = np.isfinite(lp_)
        p[ids_[pres]] = np.exp(lp_[pres])
        p[p == 0] = np.exp(t_) / (100 - pres.sum())
        return p / p.sum()
    for r in range(4):
        P, Q = full(ids[r], lp[r], tail[r]), full(ids[r], lp3[r], t3[r])
        assert abs((P * np.log(P / Q)).sum() - k3[r]) < 1e-9


def test_cli_derive_info_stats_reference(src, tmp_path):
    run = CliRunner().invoke
    dst = str(tmp_path / "d")
    res = run(main, ["derive", src, dst, "--top-k", "4", "--encoding", "topk1-sorted-q8", "--json"])
    assert res.exit_code == 0, res.output
    res = run(main, ["info", dst, "--json"])
    d = json.loads(res.output)
    assert d["value_encoding"] == "topk1-sorted-q8" and d["bytes_per_row"] > 0 and d["targets"] == "topk"
    res = run(main, ["info", dst])
    assert "bytes_per_row" in res.output and "topk1-sorted-q8" in res.output
    res = run(main, ["stats", dst, "--reference", src, "--plot", "-"])
    assert res.exit_code == 0, res.output
    assert "KL(reference || cache)" in res.output and "final" in res.output
    res = run(main, ["stats", dst, "--reference", src, "--plot", "-", "--json"])
    st = json.loads(res.output)
    assert st["reference"]["n_samples"] == 10 and st["reference"]["kl_mean"] > 0
    same = json.loads(run(main, ["stats", src, "--reference", src, "--plot", "-", "--json"]).output)
    assert abs(same["reference"]["kl_mean"]) < 1e-9
    res = run(main, ["derive", src, str(tmp_path / "e"), "--layers", "0,x"])
    assert res.exit_code == 2 and "error: --layers" in res.output
    assert run(main, ["derive", "--help"]).exit_code == 0
