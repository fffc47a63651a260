"""Every vlsi.ops head op computes in fp32 whatever the caller's autocast context (values AND gradients).

The engine trains under bf16 autocast on GPU; without care, autocast turns the ops' "fp32" matmuls and einsums into
bf16 ones (logits rounded to 8 mantissa bits before the softmax), which at realistic logit scales costs tens of
percent of the gradient, and more the closer the student is to the teacher. Here each op runs under
``torch.autocast("cpu", torch.bfloat16)`` (CPU autocast stands in for CUDA's: the same dispatch mechanism) and,
when CUDA is present, under ``torch.autocast("cuda", torch.bfloat16)``, on both paths (torch and Triton: the
interpreter on CPU, compiled kernels on CUDA), and is compared against float64 references computed from the SAME
low-precision inputs, so the only error left is the op's own arithmetic.

Student/teacher pairs: teacher logits = student logits + noise scaled so the mean coarse KL is ~0.3 or ~0.01 (the
small-KL case is where bf16 logits hurt most: the gradient is a small difference of two large terms). Target:
median relative gradient error <= 1e-2; gradients come back in the input's dtype.
"""

from __future__ import annotations

import functools

import pytest
import torch

from vlsi.ops import ce_from_hidden, coarse_kl, head_topk, logits_fp32, sparse_kl_from_hidden, tail_logmass
from vlsi.ops.dispatch import triton_importable, triton_interpreting

N, D, V, PADDED, K = 24, 64, 2000, 2048, 16
HAS_CUDA = torch.cuda.is_available()

AUTOCASTS = [
    pytest.param("cpu", id="autocast-cpu"),
    pytest.param("cuda", id="autocast-cuda",
                 marks=pytest.mark.skipif(not HAS_CUDA, reason="CUDA autocast needs a CUDA device")),
]
IMPLS = ["torch", "triton"]


def _skip_unless_impl_runs(impl: str, device: str) -> None:
    if impl != "triton":
        return
    if not triton_importable():
        pytest.skip("triton is not importable")
    if device == "cpu" and not triton_interpreting():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest only without CUDA)")


def median_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Median over elements of |got - ref| / |ref| (float64)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float(((got - ref).abs() / ref.abs().clamp(min=1e-300)).median())


@functools.lru_cache(maxsize=None)
def pair(kl_target: float, seed: int = 0):
    """(x bf16 [N, D], w bf16 [PADDED, D] with poisoned padded rows, ids, logprobs, tail, achieved mean KL).

    Student logits ``x @ w.T`` (std ~8, as trained heads give); teacher logits = student logits + eps * noise,
    eps bisected in float64 so the mean coarse (top-k + tail) KL of the pair is ``kl_target``.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).bfloat16()
    w = torch.randn(PADDED, D, generator=g).bfloat16()
    w[V:] = 1.0e3  # padded head rows: must never enter a softmax
    zs = x.double() @ w[:V].double().T
    noise = torch.randn(N, V, generator=g, dtype=torch.float64)

    def record(eps):
        lp = torch.log_softmax(zs + eps * noise, 1)
        vals, ids = lp.topk(K, 1)
        return ids.to(torch.int32), vals.float(), tail_logmass(vals.double()).float()

    lo, hi = 0.0, 8.0
    for _ in range(60):
        mid = (lo + hi) / 2
        ids, lp, tail = record(mid)
        kl = float(coarse_kl(zs, ids, lp, tail, real_vocab=V).mean())
        lo, hi = (mid, hi) if kl < kl_target else (lo, mid)
    assert abs(kl - kl_target) < 0.05 * kl_target
    return x, w, ids, lp, tail, kl


def on(device, *ts):
    return [t.to(device) for t in ts]


# --- logits_fp32 --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", AUTOCASTS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_logits_fp32_is_fp32_under_autocast(device, x_dtype):
    x, w, *_ = pair(0.3)
    x, w = on(device, x.to(x_dtype), w[:V])
    bias = torch.linspace(-1, 1, V, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        z = logits_fp32(x, w, bias)
    assert z.dtype == torch.float32
    ref = x.double() @ w.double().T + bias.double()
    torch.testing.assert_close(z.double(), ref, atol=1e-4, rtol=1e-5)


# --- head top-k (extraction) --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", AUTOCASTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_head_topk_under_autocast_matches_float64(device, impl):
    _skip_unless_impl_runs(impl, device)
    x, w, *_ = pair(0.3)
    x, w = on(device, x, w)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = head_topk(x, w, K, V, impl=impl, chunk_vocab=512)
    assert out.logprobs.dtype == torch.float32 and out.tail.dtype == torch.float32
    lp_ref = torch.log_softmax(x.double().cpu() @ w[:V].double().cpu().T, 1)
    ref_vals, ref_ids = lp_ref.topk(K, 1)
    assert torch.equal(out.ids.cpu().long(), ref_ids)
    torch.testing.assert_close(out.logprobs.cpu().double(), ref_vals, atol=2e-5, rtol=0)
    # the tail is 1 - sum(top-k mass) in fp32 by contract: compare masses at fp32's resolution of that difference
    torch.testing.assert_close(out.tail.cpu().double().exp(), tail_logmass(ref_vals).exp(), atol=5e-6, rtol=1e-4)


# --- sparse KL and CE from hidden states (training) --------------------------------------------------------------


@pytest.mark.parametrize("device", AUTOCASTS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kl_target", [0.3, 0.01])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_sparse_kl_under_autocast_values_and_grads(device, impl, kl_target, direction, x_dtype):
    _skip_unless_impl_runs(impl, device)
    x, w, ids, lp, tail, _ = pair(kl_target)
    x, w, ids, lp, tail = on(device, x.to(x_dtype), w, ids, lp, tail)
    up = torch.linspace(0.5, 1.5, N, device=device)  # a non-uniform upstream gradient
    xi = x.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = sparse_kl_from_hidden(xi, w, ids, lp, tail, real_vocab=V, direction=direction, impl=impl,
                                    chunk_tokens=7)
        (grad,) = torch.autograd.grad((got * up).sum(), xi)
    assert got.dtype == torch.float32
    assert grad.dtype == x_dtype, "the gradient wrt the hidden input comes back in the input's dtype"
    x64 = x.detach().double().cpu().requires_grad_(True)
    ref = coarse_kl(x64 @ w.double().cpu().T, ids.cpu(), lp.cpu(), tail.cpu(), real_vocab=V, direction=direction)
    (g_ref,) = torch.autograd.grad((ref * up.double().cpu()).sum(), x64)
    assert median_rel(got, ref) <= 1e-3, f"KL values: median rel. error {median_rel(got, ref):.3g}"
    err = median_rel(grad, g_ref)
    assert err <= 1e-2, f"KL {float(ref.mean()):.3g}: median rel. gradient error {err:.3g} > 1e-2"


@pytest.mark.parametrize("device", AUTOCASTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_ce_under_autocast_values_and_grads(device, impl):
    _skip_unless_impl_runs(impl, device)
    x, w, ids, *_ = pair(0.01)
    tgt = ids[:, 0].long().clone()  # the likely tokens: small CE, small gradients (the hard case)
    tgt[3] = -100
    x, w, tgt = on(device, x, w, tgt)
    xi = x.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = ce_from_hidden(xi, w, tgt, real_vocab=V, impl=impl, chunk_tokens=5)
        (grad,) = torch.autograd.grad(got.sum(), xi)
    assert got.dtype == torch.float32 and grad.dtype == x.dtype
    x64 = x.detach().double().cpu().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(x64 @ w[:V].double().cpu().T, tgt.cpu(), reduction="none")
    (g_ref,) = torch.autograd.grad(ref.sum(), x64)
    keep = tgt.cpu() != -100
    assert float(got[3]) == 0.0 and float(grad[3].abs().max()) == 0.0
    assert median_rel(got.cpu()[keep], ref[keep]) <= 1e-3
    err = median_rel(grad.cpu()[keep], g_ref[keep])
    assert err <= 1e-2, f"CE: median rel. gradient error {err:.3g} > 1e-2"


# --- the KL matrix of layer matching (vlsi.train.losses) ---------------------------------------------------------


@pytest.mark.parametrize("device", AUTOCASTS)
def test_kl_matrix_under_autocast_matches_float64(device):
    from vlsi.train.losses import TeacherTargets, kl_matrix

    xs, rows = [], []
    _, w, *_ = pair(0.3)
    for target in (0.3, 0.01):
        x, _, ids, lp, tail, _ = pair(target)
        xs.append(x)
        rows.append((ids, lp, tail))
    # teacher layers = the two records (+ a final-head row, unused by the matrix)
    targets = TeacherTargets(*(torch.stack([r[f] for r in rows] + [rows[0][f]], 1) for f in range(3)))
    w_d, = on(device, w)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = kl_matrix([x.to(device) for x in xs], w_d, targets.to(device), real_vocab=V, chunk_tokens=5)
    ref = torch.empty(2, 2, dtype=torch.float64)
    for i, x in enumerate(xs):
        z = x.double() @ w[:V].double().T
        for j, (ids, lp, tail) in enumerate(rows):
            ref[i, j] = coarse_kl(z, ids, lp, tail, real_vocab=V).mean()
    rel = ((got - ref).abs() / ref).max()
    assert rel <= 1e-3, f"kl_matrix under autocast: max rel. error {float(rel):.3g}\n{got}\n{ref}"
