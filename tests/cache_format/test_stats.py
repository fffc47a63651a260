"""cache_stats against dense references: records built from full softmax distributions whose exact top-k mass,
coarse-grained entropy and full entropy the test knows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlsi.cache_format import CacheWriter, Fingerprint, SampleRecord, open_cache
from vlsi.cache_format.stats import cache_stats, format_cache_stats, plot_cache_stats

V, K, LAYERS = 50, 5, (1, 3)


def _fp() -> Fingerprint:
    return Fingerprint(teacher={"name": "t"}, verbalizers={"hash": "v", "kind": "verb-ffn", "layers": list(LAYERS)},
                       target_layers=LAYERS, tokenizer_hash="tok", processor={}, vocab_size=V, padded_vocab_size=64,
                       top_k=K, tool_version="test", created_at="2025-01-01T00:00:00Z")


def _records(seed: int, n: int):
    """Records + the full distributions they were cut from, [A, L, V] per sample. Layer scales differ so that the
    shallow layer is flat and the final layer is peaked (as in a real teacher)."""
    rng = np.random.default_rng(seed)
    scales = np.array([0.3, 1.5, 4.0])  # L = 3: layers 1, 3, final
    recs, fulls = [], []
    for s in range(n):
        T = int(rng.integers(4, 12))
        A = int(rng.integers(0, T - 1)) if s else 0  # the first sample has no answer rows: must not break means
        pos = np.sort(rng.choice(T - 1, A, replace=False)).astype(np.int32)
        logits = rng.standard_normal((A, 3, V)) * scales[None, :, None]
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        order = np.argsort(-logp, axis=-1)[..., :K]
        lp = np.take_along_axis(logp, order, -1)
        tail = np.log1p(-np.exp(lp).sum(-1))
        recs.append(SampleRecord(f"s{s}", f"h{s}", rng.integers(0, V, T).astype(np.int32), pos,
                                 order.astype(np.int32), lp.astype(np.float32), tail.astype(np.float32)))
        fulls.append(np.exp(logp))
    return recs, fulls


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("stats") / "cache")
    recs, fulls = _records(0, 12)
    with CacheWriter(url, _fp(), commit_every=5) as w:
        for r in recs:
            w.append(r)
    return url, recs, fulls


def test_stats_match_dense_reference(cache):
    url, recs, fulls = cache
    stats = cache_stats(open_cache(url))
    P = np.concatenate([f for f in fulls if len(f)])  # [N, L, V] full distributions
    N = P.shape[0]
    assert stats["n_answer_tokens"] == N and stats["n_samples"] == len(recs)
    assert stats["layers"] == ["1", "3", "final"]
    top = -np.sort(-P, axis=-1)[..., :K]
    mass = top.sum(-1)
    tail = 1.0 - mass
    h_coarse = -(top * np.log(top)).sum(-1) - tail * np.log(tail)
    h_full = -(P * np.log(P)).sum(-1)
    agree = (P.argmax(-1) == P[:, -1:].argmax(-1)).mean(0)
    for li, row in enumerate(stats["per_layer"]):
        # fp16 log-probs perturb entropy slightly; the tail is fp32
        assert row["coverage_mean"] == pytest.approx(mass[:, li].mean(), abs=1e-6)
        assert row["coverage_min"] == pytest.approx(mass[:, li].min(), abs=1e-6)
        assert row["entropy_lb_mean"] == pytest.approx(h_coarse[:, li].mean(), abs=2e-3)
        assert row["top1_prob_mean"] == pytest.approx(top[:, li, 0].mean(), rel=2e-3)
        assert row["top1_agrees_final"] == pytest.approx(agree[li])
        # the true mean entropy lies between the two bounds
        assert row["entropy_lb_mean"] - 2e-3 <= h_full[:, li].mean() <= row["entropy_ub_mean"] + 2e-3
        assert row["raw_bytes_per_answer_token"] == K * (4 + 2) + 4
    cov = [r["coverage_mean"] for r in stats["per_layer"]]
    assert cov[0] < cov[1] < cov[2]  # flatter shallow layers keep less mass in the top-k
    assert stats["per_layer"][-1]["top1_agrees_final"] == 1.0
    assert stats["bytes_on_disk"] > 0
    # apportioned per-layer disk bytes never exceed the whole
    assert sum(r["stored_bytes_per_answer_token"] for r in stats["per_layer"]) < stats["stored_bytes_per_answer_token"]


def test_exact_when_k_equals_vocab(tmp_path):
    """k = V: no tail, the lower bound is the full entropy and both bounds meet."""
    rng = np.random.default_rng(1)
    v = 8
    fp = Fingerprint(teacher={}, verbalizers={}, target_layers=(0,), tokenizer_hash="t", processor={}, vocab_size=v,
                     padded_vocab_size=v, top_k=v, tool_version="t", created_at="x")
    logits = rng.standard_normal((6, 2, v)) * 2
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-logp, -1)
    lp = np.take_along_axis(logp, order, -1)
    rec = SampleRecord("a", "h", np.arange(8, dtype=np.int32), np.arange(6, dtype=np.int32), order.astype(np.int32),
                       lp.astype(np.float32), np.full((6, 2), -np.inf, np.float32))
    with CacheWriter(str(tmp_path / "c"), fp) as w:
        w.append(rec)
    stats = cache_stats(open_cache(str(tmp_path / "c")))
    h = -(np.exp(logp) * logp).sum(-1).mean(0)
    for li, row in enumerate(stats["per_layer"]):
        assert row["coverage_mean"] == 1.0
        assert row["entropy_lb_mean"] == pytest.approx(h[li], abs=2e-3)
        assert row["entropy_ub_mean"] == pytest.approx(row["entropy_lb_mean"])
        assert math.isfinite(row["entropy_lb_mean"])


def test_table_and_plot(cache, tmp_path):
    url, _, _ = cache
    stats = cache_stats(open_cache(url))
    text = format_cache_stats(stats)
    assert "final" in text and "cover" in text and str(stats["n_answer_tokens"]) in text
    png = plot_cache_stats(stats, tmp_path / "stats.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_limit_and_empty(cache, tmp_path):
    url, recs, _ = cache
    stats = cache_stats(open_cache(url), limit=1)  # the first sample has no answer rows
    assert stats["n_samples"] == 1 and stats["n_answer_tokens"] == 0
    assert all(r["coverage_mean"] is None for r in stats["per_layer"])
    assert "-" in format_cache_stats(stats)
    plot_cache_stats(stats, tmp_path / "empty.png")
