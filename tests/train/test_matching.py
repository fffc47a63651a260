"""Layer matching (Alg. 1 and the ablation variants) against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from vlsi.train.matching import candidates, match_layers, selection_probs, temperature


def _kl(ts, tl, seed=0):
    return torch.rand(ts, tl, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


@pytest.mark.parametrize("ts,tl", [(1, 1), (2, 3), (3, 3), (7, 20), (4, 9)])
@pytest.mark.parametrize("rule", ["multinomial", "random", "argmin", "bottom-k"])
def test_order_and_range(ts, tl, rule):
    """With order preservation + range: strictly increasing and inside start .. tl - ts + i, for every draw."""
    g = torch.Generator().manual_seed(1)
    for seed in range(30):
        m = match_layers(_kl(ts, tl, seed), rule=rule, generator=g)
        j = list(m.matched)
        assert all(b > a for a, b in zip(j, j[1:])), j
        start = 0
        for i, ji in enumerate(j):
            assert start <= ji <= tl - ts + i
            assert all(start <= x <= tl - ts + i for x in m.indices[i])
            start = ji + 1


def test_multinomial_follows_softmax_of_minus_kl_over_T():
    """Empirical frequencies of the first student layer's pick == softmax(-kl / T) over its candidates."""
    kl = torch.tensor([[0.3, 1.0, 0.5, 2.0, 0.9], [0, 0, 0, 0, 0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for adaptive, scale in [("scale-over-range", 2.0), ("range-over-scale", 2.0), ("off", 1.0)]:
        n = 6000
        counts = torch.zeros(5)
        for _ in range(n):
            counts[match_layers(kl, adaptive=adaptive, scale=scale, generator=g).matched[0]] += 1
        cand = kl[0, :4]  # range: 0 .. tl - ts + 0 = 3
        spread = float(cand.max() - cand.min()) + 1e-6
        T = {"scale-over-range": scale / spread, "range-over-scale": spread / scale, "off": 1.0}[adaptive]
        p = torch.softmax(-cand / T, 0)
        assert counts[4] == 0
        emp = counts[:4] / n
        # 5-sigma binomial bound per entry
        tol = 5 * torch.sqrt(p * (1 - p) / n) + 1e-3
        assert torch.all((emp - p.float()).abs() <= tol), (adaptive, emp, p)
        assert temperature(cand, adaptive=adaptive, scale=scale) == pytest.approx(T)
        torch.testing.assert_close(selection_probs(cand, adaptive=adaptive, scale=scale), p)


def test_argmin_uniform_bottomk_definitions():
    kl = torch.tensor([[0.5, 0.1, 0.2, 0.9, 0.05], [0.4, 0.3, 0.2, 0.0, 0.7]], dtype=torch.float64)
    # argmin with range+order: i=0 cand 0..3 -> 1 ; i=1 cand 2..4 -> 3
    assert match_layers(kl, rule="argmin").matched == (1, 3)
    # argmin without range/order: global argmin per row
    assert match_layers(kl, rule="argmin", use_range=False, use_order=False).matched == (4, 3)
    # uniform: j = i * floor(tl / ts)
    assert match_layers(kl, rule="uniform").matched == (0, 2)
    assert match_layers(torch.zeros(7, 20), rule="uniform").matched == tuple(i * 2 for i in range(7))
    # bottom-k (k=2), no range/order: the two lowest of each row, weights 1/2
    m = match_layers(kl, rule="bottom-k", k=2, use_range=False, use_order=False)
    assert [sorted(x) for x in m.indices] == [[1, 4], [2, 3]] and m.weights == ((0.5, 0.5), (0.5, 0.5))
    assert m.matched == (4, 3)  # primary = lowest KL
    # bottom-k with k = 1 is argmin
    assert match_layers(kl, rule="bottom-k", k=1).matched == match_layers(kl, rule="argmin").matched


def test_candidate_sets_of_each_switch():
    assert candidates(1, 2, 3, 6, use_range=True, use_order=True) == [2, 3, 4]
    assert candidates(1, 2, 3, 6, use_range=True, use_order=False) == [0, 1, 2, 3, 4]
    assert candidates(1, 2, 3, 6, use_range=False, use_order=True) == [2, 3, 4, 5]
    assert candidates(1, 6, 3, 6, use_range=False, use_order=True) == [5]  # teacher used up: last layer
    assert candidates(1, 2, 3, 6, use_range=False, use_order=False) == list(range(6))


def test_random_is_uniform_over_candidates():
    kl = torch.tensor([[9.0, 0.0, 5.0, 1.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        counts[match_layers(kl, rule="random", use_range=False, use_order=False, generator=g).matched[0]] += 1
    assert torch.all((counts / n - 0.25).abs() < 5 * math.sqrt(0.25 * 0.75 / n))


def test_seeded_generator_reproduces_draws():
    kl = _kl(7, 20)
    a = [match_layers(kl, generator=torch.Generator().manual_seed(9)).matched for _ in range(2)]
    assert a[0] == a[1]


def test_refuses_fewer_teacher_than_student_targets():
    with pytest.raises(ValueError, match="at least as many teacher targets"):
        match_layers(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="not one of"):
        match_layers(torch.zeros(2, 2), rule="nearest")
