"""Small numerics shared by every vlsi.ops path (torch reference, chunked, Triton).

Why a module of its own: the tail floor, the stable ``log(1 - exp(x))`` and the fp32 logits product must be the
same function in extraction (what the cache stores) and in training (what the KL reads), or the two sides of
the coarse-grained KL disagree by construction.
"""

from __future__ import annotations

import math

import torch

TAIL_FLOOR: float = -20.0
"""Floor of every tail log-mass: the value for a tail that is zero or below fp32 resolution (always when
``k == real_vocab``). Why -20 (mass 2e-9): a tail computed in fp32 as ``1 - sum(top-k probs)`` cannot resolve
masses below ~2^-24 = 6e-8 (log -16.6), so the floor sits just under every tail fp32 can actually measure, while
keeping both KL directions sane when one side is at the floor: a bucket empty on both sides contributes exactly
``p * (F - F) = 0`` (never ``0 * -inf = NaN``), and rounding noise of ~1e-7 against a floored tail costs
~1e-7 * 4 nats instead of the ~1e-7 * 1e4 a floor like -1e4 would charge in the reverse KL. Below the floor the
gradient is zero (a bounded loss, like the eps in ``log(q + eps)``). Representable in fp16/bf16 encodings."""

_NEG_INF_GUARD: float = -1.0e4
"""Log-probs below this (e.g. ``-inf`` from a low-precision encoding) are raised to it: exp() is still exactly 0,
so the bucket still contributes 0, but ``0 * (-inf)`` can no longer make a NaN."""

# log(1 - exp(x)) == TAIL_FLOOR at x == _X_FLOOR; x above it (mass of the tail below the floor) is floored.
_X_FLOOR: float = math.log1p(-math.exp(TAIL_FLOOR))
_LN_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable in both regimes, floored at :data:`TAIL_FLOOR`.

    Maechler's split: ``log(-expm1(x))`` near 0 (where ``1 - exp(x)`` cancels), ``log1p(-exp(x))`` below -ln 2.
    Where the result would fall under the floor (``x`` within ~2e-9 of 0, or ``x >= 0``: the mass rounds to 1)
    it returns ``TAIL_FLOOR`` with zero gradient. The inner ``where`` feeds a safe dummy value to those lanes so
    autograd never multiplies a zero by the huge (or infinite) slope of ``log(-expm1(x))`` at 0 (NaN).
    """
    valid = x < _X_FLOOR
    xs = torch.where(valid, x, torch.full_like(x, -1.0))
    y = torch.where(xs > _LN_HALF, torch.log(-torch.expm1(xs)), torch.log1p(-torch.exp(xs)))
    y = torch.where(valid, y, torch.full_like(y, TAIL_FLOOR))
    return y.clamp(min=TAIL_FLOOR)


def tail_logmass(logprobs: torch.Tensor) -> torch.Tensor:
    """Tail log-mass ``log(1 - sum(exp(logprobs)))`` over the last axis, fp32 (or fp64) math, floored.

    ``logprobs``: [..., k] log-probabilities under the full softmax. Returns [...]. Computed as
    ``log1mexp(logsumexp(logprobs))`` so no probability is ever summed in linear space.
    """
    lp = logprobs if logprobs.dtype == torch.float64 else logprobs.float()
    return log1mexp(torch.logsumexp(lp, dim=-1))


def logits_fp32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` with fp32 (or fp64) output whatever the input dtype: [n, d] x [v, d] -> [n, v].

    bf16/fp16 logits would be rounded to 8/11 mantissa bits before the softmax (an error of ~0.1 nats at logit 30),
    so low-precision inputs accumulate AND return fp32: on CUDA through ``torch.mm(..., out_dtype=float32)``
    (no upcast copy of the weight), elsewhere by upcasting the operands.
    """
    out_dtype = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
    if x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda:
        try:
            z = torch.mm(x, w.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without mm.dtype for this combo
            z = x.float() @ w.float().t()
    else:
        z = x.to(out_dtype) @ w.to(out_dtype).t()
    if bias is not None:
        z = z + bias.to(z.dtype)
    return z


def grad_matmul(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``g @ w`` for a fp32 gradient ``g`` [n, v] and a (possibly bf16) weight ``w`` [v, d] -> fp32/fp64 [n, d].

    On CUDA with a low-precision weight the gradient is rounded to the weight's dtype (what autograd does for a
    bf16 ``nn.Linear``) and the product accumulates in fp32; elsewhere the weight is upcast.
    """
    if w.dtype in (torch.bfloat16, torch.float16) and w.is_cuda:
        try:
            return torch.mm(g.to(w.dtype), w, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            return g.to(w.dtype).float() @ w.float()
    out_dtype = torch.float64 if torch.float64 in (g.dtype, w.dtype) else torch.float32
    return g.to(out_dtype) @ w.to(out_dtype)


def auto_chunk_tokens(vocab: int, *, budget_elems: int = 1 << 26, multiple: int = 16) -> int:
    """Token-chunk size so one [chunk x vocab] fp32 tile stays under ``budget_elems`` (default 2^26 = 256 MiB)."""
    n = max(1, budget_elems // max(1, vocab))
    if n >= multiple:
        n -= n % multiple
    return n
