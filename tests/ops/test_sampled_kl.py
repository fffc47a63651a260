"""Sampled teacher targets (RS-KD): the importance-weighted KL estimate and its gradient are unbiased (over many
draws they equal the full KL's, within sigma bounds, row by row), and the memory-bounded op equals its dense
float64 reference in value and gradient, also under bf16 autocast."""
from __future__ import annotations

import pytest
import torch

from vlsi.ops import sampled_kl_from_hidden, sampled_kl_terms


def _draws(p: torch.Tensor, n: int, m: int, g: torch.Generator, k: int | None = None):
    """m rows of n draws from p [V]: (unique ids [m, k], counts [m, k]) as an extractor stores them."""
    k = k or n
    d = torch.multinomial(p.expand(m, -1), n, replacement=True, generator=g)
    s, _ = d.sort(1)
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    cnt = (s[:, :, None] == s[:, None, :]).sum(-1) * first
    order = torch.sort(cnt, dim=1, descending=True, stable=True).indices[:, :k]
    ids, c = s.gather(1, order), cnt.gather(1, order)
    return torch.where(c > 0, ids, torch.zeros_like(ids)), c


def _setup(V=40, d=12, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V + 3, d, dtype=torch.float64, generator=g)  # 3 padded head rows, never used
    xt = torch.randn(rows, d, dtype=torch.float64, generator=g) * 0.6
    logp = torch.log_softmax(xt @ w[:V].T, 1)  # teacher rows
    xs = torch.randn(rows, d, dtype=torch.float64, generator=g) * 0.6  # student rows
    return g, w, logp, xs


def _full_kl_and_grad(x, w, logp, V):
    x = x.clone().requires_grad_(True)
    logq = torch.log_softmax(x @ w[:V].T, 1)
    kl = (logp.exp() * (logp - logq)).sum(1)
    (gx,) = torch.autograd.grad(kl.sum(), x)
    return kl.detach(), gx


@pytest.mark.parametrize("n", [1, 4, 12])
def test_unbiased_loss_and_gradient_per_row(n):
    V = 40
    g, w, logp, xs = _setup(V=V)
    kl_full, g_full = _full_kl_and_grad(xs, w, logp, V)
    M = 4000
    for r in range(xs.shape[0]):
        ids, c = _draws(logp[r].exp(), n, M, g)
        lp = torch.where(c > 0, logp[r][ids], torch.full_like(ids, float("-inf"), dtype=torch.float64))
        x = xs[r:r + 1].expand(M, -1).clone().requires_grad_(True)
        est = sampled_kl_from_hidden(x, w, ids, lp, c, real_vocab=V, impl="torch", chunk_tokens=997)
        (gx,) = torch.autograd.grad(est.sum(), x)
        # per-row calibration: the mean estimate and mean gradient are the row's full KL / gradient (5 sigma)
        se = est.std() / M ** 0.5
        assert abs(est.mean() - kl_full[r]) < 5 * se + 1e-9, (r, float(est.mean()), float(kl_full[r]), float(se))
        gse = gx.std(0) / M ** 0.5
        assert torch.all((gx.mean(0) - g_full[r]).abs() < 5 * gse + 1e-9), r
        # and the weights are calibrated: E[counts / n] = p, id by id
        wts = torch.zeros(M, V, dtype=torch.float64).scatter_add_(1, ids, c.double() / n)
        p = logp[r].exp()
        # ids with >= 20 expected draws one by one (normal approximation), the rare ones pooled into one bucket
        common = p * n * M >= 20
        buckets_obs = torch.cat([wts.mean(0)[common], wts.mean(0)[~common].sum()[None]])
        buckets_p = torch.cat([p[common], p[~common].sum()[None]])
        sigma = (buckets_p * (1 - buckets_p) / (n * M)).sqrt()  # binomial: counts ~ Bin(n M, p)
        bad = (buckets_obs - buckets_p).abs() >= 5 * sigma
        assert not bad.any(), (buckets_obs[bad], buckets_p[bad], sigma[bad])

def test_a_biased_estimate_is_caught():
    """The sigma bound has teeth: CE against the draws' renormalised teacher log-probs (a plausible mistake) fails."""
    V, n, M = 40, 4, 4000
    g, w, logp, xs = _setup(V=V, seed=3)
    kl_full, g_full = _full_kl_and_grad(xs, w, logp, V)
    ids, c = _draws(logp[0].exp(), n, M, g)
    lp = torch.where(c > 0, logp[0][ids], torch.full_like(ids, float("-inf"), dtype=torch.float64))
    p_ren = torch.softmax(lp, 1)  # weights from the teacher's probabilities of the drawn ids, not the counts
    x = xs[:1].expand(M, -1).clone().requires_grad_(True)
    logq = torch.log_softmax(x @ w[:V].T, 1).gather(1, ids)
    (gx,) = torch.autograd.grad((p_ren * -logq).sum(), x)
    gse = gx.std(0) / M ** 0.5
    assert not torch.all((gx.mean(0) - g_full[0]).abs() < 5 * gse + 1e-9)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("chunk", [3, 64])
def test_equals_dense_reference(chunk, device):
    V, N = 40, 11
    g, w, logp, _ = _setup(V=V, rows=N, seed=4)
    ids, c = _draws(logp[0].exp(), 6, N, g)
    lp = torch.where(c > 0, logp[0][ids], torch.full_like(ids, float("-inf"), dtype=torch.float64))
    x = torch.randn(N, 12, dtype=torch.float64, generator=g, requires_grad=True)
    got = sampled_kl_from_hidden(x, w, ids, lp, c, real_vocab=V, impl="torch", chunk_tokens=chunk)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    logq = torch.log_softmax(x2 @ w[:V].T, 1).gather(1, ids)
    wt = c.double() / c.sum(1, keepdim=True)
    want = torch.where(c > 0, wt * (torch.where(c > 0, lp, 0.0) - logq), 0.0).sum(1)
    (g_want,) = torch.autograd.grad(want.sum(), x2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    # fp32 inputs under bf16 autocast: fp32 math inside, same numbers to fp32 precision
    # (on CUDA: the default implementation, Triton where available)
    xf, wf = x.detach().float().to(device).requires_grad_(True), w.float().to(device)
    impl = "torch" if device == "cpu" else "auto"
    with torch.autocast(device, dtype=torch.bfloat16):
        got32 = sampled_kl_from_hidden(xf, wf, ids.to(device), lp.float().to(device), c.to(device), real_vocab=V,
                                       impl=impl, chunk_tokens=chunk)
    (g32,) = torch.autograd.grad(got32.sum(), xf)
    assert got32.dtype == torch.float32 and g32.dtype == torch.float32
    torch.testing.assert_close(got32.double().cpu(), want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g32.double().cpu(), g_want, rtol=1e-4, atol=1e-5)


def test_terms_ignore_absent_slots_and_check_shapes():
    y = torch.randn(2, 4, dtype=torch.float64)
    lse = torch.logsumexp(torch.randn(2, 9, dtype=torch.float64), 1) + 3
    lp = torch.tensor([[-0.5, -1.0, float("-inf"), float("-inf")]] * 2, dtype=torch.float64)
    c = torch.tensor([[3, 1, 0, 0]] * 2)
    a = sampled_kl_terms(y, lse, lp, c)
    b = sampled_kl_terms(y[:, :2], lse, lp[:, :2], c[:, :2])
    torch.testing.assert_close(a, b)
    w = torch.randn(9, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="t_counts must be an integer tensor"):
        sampled_kl_from_hidden(torch.randn(2, 3, dtype=torch.float64), w, c, lp, c.double(), real_vocab=9)
