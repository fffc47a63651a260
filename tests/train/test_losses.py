"""Interaction / SFT losses against dense float64 references written here (not vlsi.ops' reference)."""

from __future__ import annotations

import pytest
import torch

from vlsi.train.losses import TeacherTargets, interaction_loss, kl_matrix, sft_loss

torch.set_default_dtype(torch.float32)


def _teacher(n, L, k, V, *, seed, sharp=3.0):
    """Random teacher: full float64 log-distributions [n, L, V] and their cache record (top-k + tail)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.log_softmax(torch.randn(n, L, V, generator=g, dtype=torch.float64) * sharp, dim=-1)
    lp, ids = full.topk(k, dim=-1)
    tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-300)) if k < V else torch.full((n, L), -1e4, dtype=torch.float64)
    return full, TeacherTargets(ids.to(torch.int32), lp.float(), tail.float())


def _coarse(logp_full, ids):
    """Coarse log-distribution [n, k+1] of a full log-distribution at the given ids (+ the rest as one bucket)."""
    at = torch.gather(logp_full, 1, ids.long())
    rest = 1 - at.exp().sum(1, keepdim=True)
    return torch.cat([at, torch.log(rest.clamp(min=0))], 1)


def _kl(logp, logq):
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(1)


def _dense_kl(x, W, V, teacher_full_j, ids_j, *, reverse=False, coarse=True):
    logq_full = torch.log_softmax((x.double() @ W.double().T)[:, :V], dim=1)
    if not coarse:
        return _kl(teacher_full_j, logq_full) if not reverse else _kl(logq_full, teacher_full_j)
    p, q = _coarse(teacher_full_j, ids_j), _coarse(logq_full, ids_j)
    return _kl(p, q) if not reverse else _kl(q, p)


def _setup(n=13, d=8, V=37, Vp=40, L=4, k=5, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    W = torch.randn(Vp, d, generator=g)
    W[V:] = 80.0  # padded rows: would dominate any softmax that let them in
    xs = [torch.randn(n, d, generator=g, requires_grad=True) for _ in range(3)]
    xf = torch.randn(n, d, generator=g, requires_grad=True)
    full, t = _teacher(n, L, k, V, seed=seed)
    return W, xs, xf, full, t, V


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_full_vocab_topk_equals_full_kl(direction):
    """k = V: the coarse KL is the full KL (values and gradients), both directions; only uses layer "final".

    float64 inputs. The empty tail bucket sits at vlsi.ops' TAIL_FLOOR (exp(floor) ~ 2e-9 at -20), which bounds
    the agreement at ~1e-5 relative (reverse direction); tolerances say so."""
    n, d, V = 9, 6, 11
    g = torch.Generator().manual_seed(1)
    W = torch.randn(V + 5, d, generator=g, dtype=torch.float64)
    W[V:] = 80.0
    full, t = _teacher(n, 2, V, V, seed=1)
    t = TeacherTargets(t.ids, full.topk(V, dim=-1).values, t.tail.double())
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    res = interaction_loss([], x, W, t, torch.zeros(n, dtype=torch.long), real_vocab=V, n_norm=n, il_loss="none",
                           ll_loss="kld", direction=direction, chunk_tokens=4)
    ref_x = x.detach().double().requires_grad_(True)
    ref = _dense_kl(ref_x, W, V, full[:, -1], t.ids[:, -1], reverse=direction == "reverse", coarse=False).sum() / n
    torch.testing.assert_close(res.loss.double(), ref, rtol=2e-5, atol=1e-8)
    (gx,) = torch.autograd.grad(res.loss, x)
    (gr,) = torch.autograd.grad(ref, ref_x)
    torch.testing.assert_close(gx.double(), gr, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_interaction_loss_equals_coarse_reference(direction, chunk):
    """k < V: loss == sum over student layers of coarse KL at the matched teacher layer + final KL, / n_norm;
    gradients wrt every student input equal the float64 reference; chunk size changes nothing."""
    W, xs, xf, full, t, V = _setup()
    n, n_norm = xf.shape[0], 29  # a window larger than this micro-batch
    gen = torch.Generator().manual_seed(5)
    res = interaction_loss(xs, xf, W, t, torch.zeros(n, dtype=torch.long), real_vocab=V, n_norm=n_norm,
                           direction=direction, match_kwargs=dict(rule="multinomial"), generator=gen,
                           chunk_tokens=chunk)
    assert res.matching is not None and len(res.matching.matched) == len(xs)
    rev = direction == "reverse"
    refs = [x.detach().double().requires_grad_(True) for x in xs]
    ref_f = xf.detach().double().requires_grad_(True)
    ref = sum(_dense_kl(r, W, V, full[:, j], t.ids[:, j], reverse=rev).sum() for r, j in zip(refs, res.matching.matched))
    ref = (ref + _dense_kl(ref_f, W, V, full[:, -1], t.ids[:, -1], reverse=rev).sum()) / n_norm
    torch.testing.assert_close(res.loss.double(), ref, rtol=1e-5, atol=1e-7)
    got = torch.autograd.grad(res.loss, xs + [xf])
    want = torch.autograd.grad(ref, refs + [ref_f])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)
    # per-layer log figures are the per-row means of the terms actually used
    for v, r, j in zip(res.layer_kl, refs, res.matching.matched):
        assert v == pytest.approx(float(_dense_kl(r.detach(), W, V, full[:, j], t.ids[:, j], reverse=rev).mean()), rel=1e-4)


def test_kl_matrix_matches_reference():
    W, xs, xf, full, t, V = _setup(n=11)
    m = kl_matrix([x.detach() for x in xs], W, t, real_vocab=V, chunk_tokens=3)
    assert m.shape == (3, 3)
    for i, x in enumerate(xs):
        for j in range(3):
            ref = _dense_kl(x.detach(), W, V, full[:, j], t.ids[:, j]).mean()
            assert float(m[i, j]) == pytest.approx(float(ref), rel=1e-5, abs=1e-8)


def test_zero_when_student_equals_teacher():
    """A teacher record computed from the student's own logits gives zero loss and zero gradient."""
    n, d, V, k = 7, 6, 19, 4
    g = torch.Generator().manual_seed(3)
    W = torch.randn(V + 3, d, generator=g)
    W[V:] = 80.0
    x = torch.randn(n, d, generator=g, requires_grad=True)
    logq = torch.log_softmax((x.detach() @ W.T)[:, :V], 1)
    lp, ids = logq.topk(k, 1)
    tail = torch.log1p(-lp.exp().sum(1))
    t = TeacherTargets(ids[:, None].expand(n, 3, k).to(torch.int32).contiguous(), lp[:, None].expand(n, 3, k).contiguous(),
                       tail[:, None].expand(n, 3).contiguous())
    for direction in ("forward", "reverse"):
        res = interaction_loss([x, x], x, W, t, torch.zeros(n, dtype=torch.long), real_vocab=V, n_norm=n,
                               direction=direction, match_kwargs=dict(rule="argmin"))
        assert abs(float(res.loss)) < 1e-6
        (gx,) = torch.autograd.grad(res.loss, x)
        assert float(gx.abs().max()) < 1e-5


def test_ce_ops_and_sft_equal_cross_entropy():
    """il/ll = ce: next-token CE of each head on the answer targets (padded vocab rows excluded)."""
    W, xs, xf, full, t, V = _setup(n=10)
    tgt = torch.randint(0, V, (10,), generator=torch.Generator().manual_seed(2))
    res = interaction_loss(xs[:2], xf, W, t, tgt, real_vocab=V, n_norm=10, il_loss="ce", ll_loss="ce")
    ce = lambda x: torch.nn.functional.cross_entropy((x.detach().double() @ W.double().T)[:, :V], tgt, reduction="sum")
    ref = (ce(xs[0]) + ce(xs[1]) + ce(xf)) / 10
    assert float(res.loss) == pytest.approx(float(ref), rel=1e-5)
    assert res.matching is None
    assert float(sft_loss(xf, W, tgt, real_vocab=V, n_norm=10)) == pytest.approx(float(ce(xf) / 10), rel=1e-5)
    # kld on intermediates, none on the last layer: no final term
    res2 = interaction_loss(xs[:2], xf, W, t, tgt, real_vocab=V, n_norm=10, ll_loss="none",
                            match_kwargs=dict(rule="uniform"))
    assert res2.final is None and res2.terms["ll"] == 0.0
    with pytest.raises(ValueError, match="both 'none'"):
        interaction_loss(xs[:2], xf, W, t, tgt, real_vocab=V, n_norm=10, il_loss="none", ll_loss="none")


def test_bottom_k_averages_the_k_lowest():
    W, xs, xf, full, t, V = _setup(n=9)
    res = interaction_loss(xs[:1], xf, W, t, torch.zeros(9, dtype=torch.long), real_vocab=V, n_norm=9,
                           ll_loss="none", match_kwargs=dict(rule="bottom-k", k=2, use_range=False, use_order=False))
    row = res.kl_matrix[0]
    two = torch.argsort(row)[:2].tolist()
    assert sorted(res.matching.indices[0]) == sorted(two)
    assert float(res.loss) == pytest.approx(float(row[two].mean()), rel=1e-5)


def test_sft_loss_trainable_head_matches_frozen_path():
    """--train-all: the autograd path (trainable head) equals the memory-bounded one, and the head gets gradient."""
    import torch

    from vlsi.train.losses import sft_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=g, requires_grad=True)
    w = torch.randn(13, 6, generator=g)  # 11 real + 2 padded rows
    t = torch.randint(0, 11, (9,), generator=g)
    frozen = sft_loss(x, w, t, real_vocab=11, n_norm=12, chunk_tokens=4)
    wt = w.clone().requires_grad_(True)
    trainable = sft_loss(x, wt, t, real_vocab=11, n_norm=12)
    torch.testing.assert_close(trainable, frozen)
    trainable.backward()
    assert wt.grad[:11].abs().sum() > 0 and wt.grad[11:].abs().sum() == 0


@pytest.mark.parametrize("autocast", [False, True])
def test_a_trainable_head_learns_from_the_final_term_only(autocast):
    """--train-all: the final (native head) KL sends gradient into the head, equal to the float64 reference of that
    term alone; the verbalized layers read the head frozen; the loss and the input gradients are those of the
    frozen-head path. Under bf16 autocast the math stays fp32."""
    W, xs, xf, full, t, V = _setup()
    n, n_norm = xf.shape[0], 21
    kw = dict(real_vocab=V, n_norm=n_norm, match_kwargs=dict(rule="argmin"), chunk_tokens=4)
    answer = torch.zeros(n, dtype=torch.long)
    frozen = interaction_loss(xs, xf, W, t, answer, **kw)
    g_frozen = torch.autograd.grad(frozen.loss, xs + [xf])
    Wt = W.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        res = interaction_loss(xs, xf, Wt, t, answer, **kw)
    assert res.loss.dtype == torch.float32 and res.matching.matched == frozen.matching.matched
    torch.testing.assert_close(res.loss, frozen.loss, rtol=1e-5, atol=1e-7)
    got = torch.autograd.grad(res.loss, xs + [xf, Wt])
    for a, b in zip(got[:-1], g_frozen):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    W64 = W.double().requires_grad_(True)
    ref = _dense_kl(xf.detach(), W64, V, full[:, -1], t.ids[:, -1]).sum() / n_norm
    (want,) = torch.autograd.grad(ref, W64)
    assert float(want[:V].abs().sum()) > 0 and float(got[-1][V:].abs().sum()) == 0  # padded rows get nothing
    torch.testing.assert_close(got[-1].double(), want, rtol=1e-4, atol=1e-7)
