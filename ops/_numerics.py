"""Small numerics shared by every vlsi.ops path (torch reference, chunked, Triton).

Why a module of its own: the tail floor, the stable ``log(1 - exp(x))`` and the fp32 logits product must be the
same function in extraction (what the cache stores) and in training (what the KL reads), or the two sides of
the coarse-grained KL disagree by construction.
"""

from __future__ import annotations

import contextlib
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
    with no_autocast(logprobs):
        lp = logprobs if logprobs.dtype == torch.float64 else logprobs.float()
        return log1mexp(torch.logsumexp(lp, dim=-1))


def no_autocast(*tensors: torch.Tensor | None) -> contextlib.ExitStack:
    """Autocast disabled for the device type(s) of ``tensors``: the ops' fp32 math stays fp32 under the caller's
    ``torch.autocast`` (which would otherwise run every matmul / einsum in bf16 and round the logits to 8 mantissa
    bits before the softmax). Inputs are upcast explicitly inside; low-precision kernels are chosen on purpose
    (``torch.mm(..., out_dtype=float32)``, the Triton dots), never by autocast."""
    stack = contextlib.ExitStack()
    for dev in dict.fromkeys(t.device.type for t in tensors if t is not None):
        if dev in ("cpu", "cuda", "xpu", "mps", "hpu"):
            stack.enter_context(torch.autocast(dev, enabled=False))
    return stack


UPCAST_BLOCK_ELEMS: int = 1 << 24
"""Largest fp32 upcast copy of a low-precision weight made at once (64 MiB): off CUDA, ``x @ W.T`` with a bf16
``W`` upcasts ``W`` block by block of vocab rows instead of whole (a whole 152k x 8192 head would be 5 GB)."""


def _math_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def logits_fp32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` with fp32 (or fp64) output whatever the input dtype: [n, d] x [v, d] -> [n, v].

    bf16/fp16 logits would be rounded to 8/11 mantissa bits before the softmax (an error of ~0.1 nats at logit 30),
    so low-precision inputs accumulate AND return fp32, under any autocast context: on CUDA through
    ``torch.mm(..., out_dtype=float32)`` (no upcast copy of the weight), elsewhere by upcasting the operands (the
    weight in blocks of vocab rows, :data:`UPCAST_BLOCK_ELEMS`). bf16 x bf16 products are exact in fp32, so both
    give the fp32-accumulated logits of the same inputs.
    """
    with no_autocast(x, w):
        out_dtype = _math_dtype(x, w)
        if x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda:
            try:
                z = torch.mm(x, w.t(), out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):  # torch without mm.dtype for this combo
                z = _upcast_mm(x.float(), w, torch.float32)
        else:
            z = _upcast_mm(x.to(out_dtype), w, out_dtype)
        if bias is not None:
            z = z + bias.to(z.dtype)
        return z


def _upcast_mm(xf: torch.Tensor, w: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``xf @ w.T`` in ``dt`` with ``w`` upcast in blocks of rows (one block when it is small or already ``dt``)."""
    v, d = w.shape
    rows = max(1, UPCAST_BLOCK_ELEMS // max(1, d))
    if w.dtype == dt or rows >= v:
        return xf @ w.to(dt).t()
    z = torch.empty(xf.shape[0], v, dtype=dt, device=xf.device)
    for v0 in range(0, v, rows):
        z[:, v0:v0 + rows] = xf @ w[v0:v0 + rows].to(dt).t()
    return z


def grad_matmul(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``g @ w`` for a fp32 gradient ``g`` [n, v] and a (possibly bf16) weight ``w`` [v, d] -> fp32/fp64 [n, d].

    On CUDA with a low-precision weight the gradient is rounded to the weight's dtype (what autograd does for a
    bf16 ``nn.Linear``) and the product accumulates in fp32; elsewhere the weight is upcast (in blocks of rows, as
    in :func:`logits_fp32`). Autocast is off inside.
    """
    with no_autocast(g, w):
        if w.dtype in (torch.bfloat16, torch.float16) and w.is_cuda:
            try:
                return torch.mm(g.to(w.dtype), w, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):
                return g.to(w.dtype).float() @ w.float()
        dt = _math_dtype(g, w)
        v, d = w.shape
        rows = max(1, UPCAST_BLOCK_ELEMS // max(1, d))
        gd = g.to(dt)
        if w.dtype == dt or rows >= v:
            return gd @ w.to(dt)
        out = torch.zeros(g.shape[0], d, dtype=dt, device=g.device)
        for v0 in range(0, v, rows):
            out.addmm_(gd[:, v0:v0 + rows], w[v0:v0 + rows].to(dt))
        return out


def auto_chunk_tokens(vocab: int, *, budget_elems: int = 1 << 26, multiple: int = 16) -> int:
    """Token-chunk size so one [chunk x vocab] fp32 tile stays under ``budget_elems`` (default 2^26 = 256 MiB)."""
    n = max(1, budget_elems // max(1, vocab))
    if n >= multiple:
        n -= n % multiple
    return n
