"""coarse_kl, sparse_kl_from_hidden, ce_from_hidden (torch paths) against dense float64 references written here."""

import pytest
import torch
import torch.nn.functional as F

from vlsi.ops import TAIL_FLOOR, coarse_kl, ce_from_hidden, head_topk, sparse_kl_from_hidden

V = 1000


def teacher_record(n=37, d=48, k=7, vocab=V, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xt = torch.randn(n, d, generator=g, dtype=dtype)
    wt = torch.randn(vocab, d, generator=g, dtype=dtype) * 0.4
    return head_topk(xt, wt, k, vocab, impl="torch")


def explicit_coarse_kl(student_logits, ids, t_lp, t_tail, vocab, direction, tau=1.0):
    """Build both (k + 1)-bucket distributions explicitly, in float64, row by row; then KL."""
    out = []
    for r in range(student_logits.shape[0]):
        q_full = torch.softmax(student_logits[r, :vocab].double() / tau, 0)
        q = q_full[ids[r].long()]
        q = torch.cat([q, (1 - q.sum()).clamp(min=torch.exp(torch.tensor(TAIL_FLOOR, dtype=torch.float64)))[None]])
        p = torch.cat([t_lp[r].double(), t_tail[r].double()[None]]) / tau
        p = torch.softmax(p, 0)
        a, b = (p, q) if direction == "forward" else (q, p)
        out.append((a * (a.log() - b.log())).sum())
    return torch.stack(out)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_coarse_kl_equals_explicit_coarse_distributions(direction, tau):
    rec = teacher_record()
    z = torch.randn(37, 1024, dtype=torch.float64) * 2
    z[:, V:] = 1e4  # padded columns must be ignored
    got = coarse_kl(z, rec.ids, rec.logprobs, rec.tail, real_vocab=V, direction=direction, temperature=tau)
    ref = explicit_coarse_kl(z, rec.ids, rec.logprobs, rec.tail, V, direction, tau)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert torch.all(got >= -1e-7)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_coarse_kl_equals_full_kl_when_k_is_vocab(direction):
    vocab = 50
    g = torch.Generator().manual_seed(1)
    zt, zs = torch.randn(6, vocab, generator=g, dtype=torch.float64), torch.randn(6, vocab, generator=g, dtype=torch.float64)
    lp_t = torch.log_softmax(zt, 1)
    vals, ids = lp_t.topk(vocab, dim=1)
    tail = torch.full((6,), TAIL_FLOOR, dtype=torch.float64)
    lp_s = torch.log_softmax(zs, 1)
    full = (lp_t.exp() * (lp_t - lp_s)).sum(1) if direction == "forward" else (lp_s.exp() * (lp_s - lp_t)).sum(1)
    got = coarse_kl(zs, ids, vals, tail, real_vocab=vocab, direction=direction)
    torch.testing.assert_close(got, full, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_zero_when_student_is_teacher_and_positive_otherwise(direction):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(20, 16, generator=g), torch.randn(300, 16, generator=g)
    rec = head_topk(x, w, 5, 300, impl="torch")
    kl_same = coarse_kl(x @ w.T, rec.ids, rec.logprobs, rec.tail, real_vocab=300, direction=direction)
    assert kl_same.abs().max() < 1e-5
    kl_other = coarse_kl((x + 0.5 * torch.randn(20, 16, generator=g)) @ w.T, rec.ids, rec.logprobs, rec.tail,
                         real_vocab=300, direction=direction)
    assert torch.all(kl_other > 1e-4)


def test_neg_inf_teacher_logprobs_and_empty_tail_stay_finite():
    z = torch.randn(3, 10, requires_grad=True)
    ids = torch.arange(10).repeat(3, 1)
    lp = torch.log_softmax(torch.randn(3, 10), 1)
    lp[:, -1] = float("-inf")
    tail = torch.full((3,), float("-inf"))
    for direction in ("forward", "reverse"):
        kl = coarse_kl(z, ids, lp, tail, real_vocab=10, direction=direction)
        (gz,) = torch.autograd.grad(kl.sum(), z)
        assert torch.isfinite(kl).all() and torch.isfinite(gz).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gradcheck_coarse_kl_float64(direction):
    rec = teacher_record(n=4, d=6, k=3, vocab=12)
    z = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z: coarse_kl(z, rec.ids, rec.logprobs, rec.tail, real_vocab=12, direction=direction, temperature=1.5),
        (z,))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [5, 64])
def test_sparse_kl_from_hidden_equals_dense(direction, tau, chunk):
    rec = teacher_record()
    g = torch.Generator().manual_seed(4)
    w = torch.randn(1024, 48, generator=g, dtype=torch.float64) * 0.4
    w[V:] = 1e3  # padded head rows
    x = torch.randn(37, 48, generator=g, dtype=torch.float64, requires_grad=True)
    dense = coarse_kl(x @ w.T, rec.ids, rec.logprobs, rec.tail, real_vocab=V, direction=direction, temperature=tau)
    upstream = torch.rand(37, generator=g, dtype=torch.float64)  # non-uniform: tests the row scaling in backward
    (g_dense,) = torch.autograd.grad((dense * upstream).sum(), x)
    got = sparse_kl_from_hidden(x, w, rec.ids, rec.logprobs, rec.tail, real_vocab=V, direction=direction,
                                temperature=tau, chunk_tokens=chunk, impl="torch")
    (g_got,) = torch.autograd.grad((got * upstream).sum(), x)
    torch.testing.assert_close(got, dense, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g_got, g_dense, atol=1e-10, rtol=1e-10)


def test_sparse_kl_gradcheck_and_bias():
    rec = teacher_record(n=5, d=4, k=3, vocab=11)
    w = torch.randn(16, 4, dtype=torch.float64)
    b = torch.randn(16, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    f = lambda x: sparse_kl_from_hidden(x, w, rec.ids, rec.logprobs, rec.tail, real_vocab=11, head_bias=b,  # noqa: E731
                                        direction="reverse", chunk_tokens=2, impl="torch")
    assert torch.autograd.gradcheck(f, (x,))
    dense = coarse_kl(x @ w.T + b, rec.ids, rec.logprobs, rec.tail, real_vocab=11, direction="reverse")
    torch.testing.assert_close(f(x), dense)


def test_sparse_kl_fp32_and_bf16_close_to_fp64():
    rec = teacher_record()
    g = torch.Generator().manual_seed(5)
    w64 = torch.randn(V, 48, generator=g, dtype=torch.float64) * 0.4
    x64 = torch.randn(37, 48, generator=g, dtype=torch.float64, requires_grad=True)
    ref = coarse_kl(x64 @ w64.T, rec.ids, rec.logprobs, rec.tail, real_vocab=V)
    (gref,) = torch.autograd.grad(ref.sum(), x64)
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        x = x64.detach().to(dt).requires_grad_(True)
        w = w64.to(dt)
        got = sparse_kl_from_hidden(x, w, rec.ids, rec.logprobs, rec.tail, real_vocab=V, chunk_tokens=16)
        assert got.dtype == torch.float32
        got.sum().backward()
        assert x.grad.dtype == dt
        torch.testing.assert_close(got.double(), ref.detach(), atol=tol * 10, rtol=tol)
        torch.testing.assert_close(x.grad.double(), gref, atol=tol, rtol=tol * 10)


def test_frozen_head_and_bad_teacher_fields_are_refused():
    rec = teacher_record(n=4, d=8, k=3, vocab=20)
    w = torch.randn(20, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="head_weight requires grad"):
        sparse_kl_from_hidden(x, w, rec.ids, rec.logprobs, rec.tail, real_vocab=20)
    with pytest.raises(ValueError, match="t_tail"):
        sparse_kl_from_hidden(x, w.detach(), rec.ids, rec.logprobs, rec.tail[:2], real_vocab=20)
    with pytest.raises(ValueError, match="outside the real vocab"):
        sparse_kl_from_hidden(x, w.detach(), rec.ids + 100, rec.logprobs, rec.tail, real_vocab=20)
    with pytest.raises(ValueError, match="direction"):
        coarse_kl(x.detach() @ w.detach().T, rec.ids, rec.logprobs, rec.tail, real_vocab=20, direction="both")


@pytest.mark.parametrize("chunk", [3, 100])
def test_ce_from_hidden_equals_cross_entropy(chunk):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(1024, 48, generator=g, dtype=torch.float64) * 0.4
    w[V:] = 1e3
    x = torch.randn(37, 48, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, V, (37,), generator=g)
    tgt[[2, 9]] = -100
    ref = F.cross_entropy(x @ w[:V].T, tgt, reduction="none", ignore_index=-100)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    got = ce_from_hidden(x, w, tgt, real_vocab=V, chunk_tokens=chunk, impl="torch")
    (ggot,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(ggot, gref)
    assert torch.all(ggot[[2, 9]] == 0)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_absent_teacher_entries_equal_the_shorter_record(direction):
    """-inf slots with placeholder (repeated) ids give the loss and gradient of the record without them."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 30, dtype=torch.float64, generator=g)
    ids = torch.stack([torch.randperm(30, generator=g)[:6] for _ in range(4)])
    lp = torch.log_softmax(torch.randn(4, 30, dtype=torch.float64, generator=g), 1).gather(1, ids)
    lp = lp.sort(1, descending=True).values
    tail = torch.log1p(-lp.exp().sum(1))
    n_keep = 3
    lp_pad = lp.clone()
    lp_pad[:, n_keep:] = float("-inf")
    ids_pad = ids.clone()
    ids_pad[:, n_keep:] = 0  # placeholder ids, repeated
    tail_short = torch.log(tail.exp() + lp[:, n_keep:].exp().sum(1))
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    a = coarse_kl(za, ids_pad, lp_pad, tail_short, real_vocab=30, direction=direction)
    b = coarse_kl(zb, ids[:, :n_keep], lp[:, :n_keep], tail_short, real_vocab=30, direction=direction)
    (ga,), (gb,) = torch.autograd.grad(a.sum(), za), torch.autograd.grad(b.sum(), zb)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)
