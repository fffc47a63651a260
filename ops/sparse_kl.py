"""Memory-bounded losses from hidden states through a frozen LM head (the training-side head ops).

Both losses here depend on the full-vocab logits ``z = x @ W[:real_vocab].T`` only through
``lse = logsumexp(z / tau)`` and the logits at a few ids ``y = z[ids] / tau``. So for any such per-row loss L:

    dL/dz_v = (dL/dlse * softmax(z / tau)_v + sum_j [ids_j == v] dL/dy_j) / tau
    dL/dx   = dL/dz @ W[:real_vocab]

The two scalars-per-row factors (dL/dlse, dL/dy) come from autograd on a tiny [N, k] graph (the same formula
as the dense reference), and the vocab-sized part is done chunk by chunk, Liger-style: the forward pass computes
each token chunk's loss AND its gradient wrt x (logits GEMM + gradient GEMM, the same two GEMMs as plain
autograd), keeps only grad_x ([N, d], the size of x), and the backward scales it by the upstream gradient.
Peak extra memory: one [chunk_tokens x real_vocab] fp32 tile (torch path) or none (Triton path).

Precision: every step (logits, log-sum-exp, the gathers at the ids, both gradient GEMMs) runs in fp32 (fp64 for
fp64 inputs) whatever the caller's autocast context: autocast is disabled inside the forward and the backward and
the inputs are upcast explicitly, on the torch and the Triton paths alike. The gradient wrt ``x`` comes back in
``x``'s dtype.

The head is frozen in vlsi: ``head_weight`` (and ``head_bias``) must not require grad while grad is enabled.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._numerics import auto_chunk_tokens, grad_matmul, logits_fp32, no_autocast
from .dispatch import resolve_impl
from .kl import check_teacher_args, coarse_kl_terms
from .topk import _check_head_args

# terms(y [n, k] tempered logits at ids, lse [n], row slice) -> per-row loss [n]
Terms = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]


def _terms_grads(terms: Terms, y: torch.Tensor, lse: torch.Tensor, rows: slice, need_grad: bool):
    """Loss [n] and, when needed, (dL/dy [n, k], dL/dlse [n]) from autograd on the small [n, k] graph."""
    if not need_grad:
        return terms(y, lse, rows), None, None
    with torch.enable_grad():
        y_ = y.detach().requires_grad_(True)
        lse_ = lse.detach().requires_grad_(True)
        loss = terms(y_, lse_, rows)
        g_y, g_lse = torch.autograd.grad(loss.sum(), (y_, lse_))
    return loss.detach(), g_y, g_lse


def _gather_logits(x: torch.Tensor, w: torch.Tensor, bias, ids: torch.Tensor, budget: int = 1 << 24) -> torch.Tensor:
    """``x[n] . W[ids[n, j]] (+ bias)`` -> fp32 [N, k] without forming [N, V]; chunks keep [n, k, d] <= budget."""
    n, k = ids.shape
    dt = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
    out = torch.empty(n, k, dtype=dt, device=x.device)
    step = max(1, budget // max(1, k * x.shape[1]))
    with no_autocast(x, w):  # an einsum under autocast would run in bf16
        for t0 in range(0, n, step):
            idc = ids[t0:t0 + step]
            wg = w[idc].to(dt)  # [n, k, d]
            out[t0:t0 + step] = torch.einsum("nkd,nd->nk", wg, x[t0:t0 + step].to(dt))
        if bias is not None:
            out += bias.to(dt)[ids]
    return out


def _scatter_rows(g: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, budget: int = 1 << 24) -> torch.Tensor:
    """``sum_j g[n, j] * W[ids[n, j]]`` -> [N, d] (the sparse part of dL/dx), chunked like _gather_logits."""
    n, k = ids.shape
    out = torch.empty(n, w.shape[1], dtype=g.dtype, device=g.device)
    step = max(1, budget // max(1, k * w.shape[1]))
    with no_autocast(g, w):
        for t0 in range(0, n, step):
            out[t0:t0 + step] = torch.einsum("nk,nkd->nd", g[t0:t0 + step], w[ids[t0:t0 + step]].to(g.dtype))
    return out


class _HeadLoss(torch.autograd.Function):
    """Per-row loss of (x @ W.T / tau) through ``terms``; gradient wrt x computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, x, w, bias, ids, terms, real_vocab, temperature, chunk_tokens, backend):
        with no_autocast(x, w):  # fp32 math under any autocast context (see the module doc)
            return _HeadLoss._forward(ctx, x, w, bias, ids, terms, real_vocab, temperature, chunk_tokens, backend)

    @staticmethod
    def _forward(ctx, x, w, bias, ids, terms, real_vocab, temperature, chunk_tokens, backend):
        need_grad = ctx.needs_input_grad[0]
        n = x.shape[0]
        wv = w[:real_vocab]
        bv = None if bias is None else bias[:real_vocab]
        loss = torch.empty(n, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
        grad_x = torch.empty(n, x.shape[1], dtype=loss.dtype, device=x.device) if need_grad else None
        ids = ids.long()
        if backend == "triton":
            from .triton_head import head_lse_triton, head_softmax_matmul_triton

            lse = head_lse_triton(x, wv, bv, scale=1.0 / temperature)
            y = _gather_logits(x, wv, bv, ids) / temperature
            loss_v, g_y, g_lse = _terms_grads(terms, y, lse, slice(0, n), need_grad)
            loss.copy_(loss_v)
            if need_grad:
                dense = head_softmax_matmul_triton(x, wv, bv, lse, g_lse / temperature, scale=1.0 / temperature)
                grad_x.copy_(dense + _scatter_rows(g_y / temperature, wv, ids))
        else:
            for t0 in range(0, n, chunk_tokens):
                rows = slice(t0, min(n, t0 + chunk_tokens))
                z = logits_fp32(x[rows], wv, bv)
                if temperature != 1.0:
                    z.div_(temperature)
                lse = torch.logsumexp(z, dim=1)
                idc = ids[rows]
                y = torch.gather(z, 1, idc)
                loss_c, g_y, g_lse = _terms_grads(terms, y, lse, rows, need_grad)
                loss[rows] = loss_c
                if need_grad:
                    # Reuse the logits tile in place: z -> softmax * dL/dlse, then the sparse part at the ids.
                    g = z.sub_(lse[:, None]).exp_().mul_(g_lse[:, None])
                    g.scatter_add_(1, idc, g_y)
                    if temperature != 1.0:
                        g.div_(temperature)
                    grad_x[rows] = grad_matmul(g, wv)
                    del g
                del z
        if need_grad:
            ctx.save_for_backward(grad_x.to(x.dtype))  # [N, d]: the only thing kept between the passes
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_x,) = ctx.saved_tensors
        # Row n's loss depends only on x[n], so the full vector-Jacobian product is a row scaling; done in fp32
        # (one rounding to x's dtype at the end), with autocast off like the forward.
        with no_autocast(grad_x):
            dt = torch.float64 if grad_x.dtype == torch.float64 else torch.float32
            g = (grad_x.to(dt) * grad_loss.to(dt)[:, None]).to(grad_x.dtype)
        return g, None, None, None, None, None, None, None, None


def _check_frozen(fn: str, x: torch.Tensor, head_weight: torch.Tensor, head_bias) -> None:
    frozen_needed = torch.is_grad_enabled() and x.requires_grad
    for name, t in (("head_weight", head_weight), ("head_bias", head_bias)):
        if t is not None and t.requires_grad and frozen_needed:
            raise ValueError(f"{fn}: {name} requires grad; the LM head is frozen in vlsi (pass {name}.detach())")


def sparse_kl_from_hidden(
    x: torch.Tensor,
    head_weight: torch.Tensor,
    t_ids: torch.Tensor,
    t_logprobs: torch.Tensor,
    t_tail: torch.Tensor,
    *,
    real_vocab: int,
    direction: str = "forward",
    temperature: float = 1.0,
    head_bias: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-row coarse KL [N] (fp32) of the student's ``x @ head_weight[:real_vocab].T`` against a cached teacher.

    Equals ``coarse_kl(x @ head_weight.T, t_ids, t_logprobs, t_tail, real_vocab=..., direction=...,
    temperature=...)`` in value and gradient wrt ``x``, without ever holding [N x V] logits: the torch path
    holds one [chunk_tokens x real_vocab] fp32 tile (default: ~256 MiB worth of rows), the Triton path none.
    x: [N, d] final-normed student states (any float dtype; gradient flows to it); head_weight: [Vp, d] frozen;
    t_ids int [N, k], t_logprobs [N, k], t_tail [N] as stored in the cache (see vlsi.ops.coarse_kl).
    """
    _check_head_args("sparse_kl_from_hidden", x, head_weight, real_vocab, head_bias)
    check_teacher_args("sparse_kl_from_hidden", x.shape[0], t_ids, t_logprobs, t_tail, real_vocab)
    if temperature <= 0:
        raise ValueError(f"sparse_kl_from_hidden: temperature={temperature} must be > 0")
    if direction not in ("forward", "reverse"):
        raise ValueError(f"sparse_kl_from_hidden: direction={direction!r} is not 'forward' or 'reverse'")
    _check_frozen("sparse_kl_from_hidden", x, head_weight, head_bias)
    backend = resolve_impl(impl, x.device)
    chunk = chunk_tokens or auto_chunk_tokens(real_vocab)
    # the [N, k] teacher fields follow x (a model spread over devices computes its losses on the head's device)
    t_ids, t_logprobs, t_tail = (t.to(x.device) for t in (t_ids, t_logprobs, t_tail))

    def terms(y, lse, rows):
        return coarse_kl_terms(y, lse, t_logprobs[rows], t_tail[rows], direction=direction, temperature=temperature)

    return _HeadLoss.apply(x, head_weight, head_bias, t_ids, terms, real_vocab, float(temperature), chunk, backend)


def ce_from_hidden(
    x: torch.Tensor,
    head_weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    real_vocab: int,
    head_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-row cross-entropy [N] (fp32) of ``x @ head_weight[:real_vocab].T`` against ``target_ids`` [N].

    Equals ``F.cross_entropy(logits[:, :real_vocab], target_ids, reduction="none", ignore_index=...)`` in value and
    gradient wrt x, memory-bounded like :func:`sparse_kl_from_hidden`. Rows whose target is ``ignore_index`` give
    0 and no gradient.
    """
    _check_head_args("ce_from_hidden", x, head_weight, real_vocab, head_bias)
    if target_ids.shape != (x.shape[0],) or target_ids.dtype.is_floating_point:
        raise ValueError(f"ce_from_hidden: target_ids must be an integer [N={x.shape[0]}] tensor, "
                         f"got {target_ids.dtype} {tuple(target_ids.shape)}")
    target_ids = target_ids.to(x.device)
    valid = target_ids != ignore_index
    if bool(((target_ids < 0) | (target_ids >= real_vocab))[valid].any()):
        raise ValueError(f"ce_from_hidden: target_ids holds an id outside the real vocab [0, {real_vocab})")
    _check_frozen("ce_from_hidden", x, head_weight, head_bias)
    backend = resolve_impl(impl, x.device)
    chunk = chunk_tokens or auto_chunk_tokens(real_vocab)
    ids = torch.where(valid, target_ids, torch.zeros_like(target_ids)).long()[:, None]

    def terms(y, lse, rows):
        return (lse - y[:, 0]) * valid[rows].to(y.dtype)

    return _HeadLoss.apply(x, head_weight, head_bias, ids, terms, real_vocab, 1.0, chunk, backend)


def sampled_kl_terms(y: torch.Tensor, lse: torch.Tensor, t_logprobs: torch.Tensor, t_counts: torch.Tensor) -> torch.Tensor:
    """Per-row importance-weighted KL estimate from sampled targets (RS-KD; proposal = the teacher itself).

    ``t_counts`` [N, k]: draws of each stored id out of ``n = t_counts.sum(1)`` draws with replacement from the
    teacher's distribution ``p``; weights ``w = counts / n`` (the importance weight p/p = 1 per draw). The estimate
    ``sum_j w_j (log p_j - log q_j)`` has expectation KL(p || q); its gradient wrt the logits, ``q - w`` (w placed
    at the ids), has expectation ``q - p`` = the gradient of KL(p || q) and of CE(p, q): unbiased. Slots with count
    0 (absent) add nothing. y: [N, k] student logits at the ids; lse: [N] student normaliser.
    """
    dt = torch.float64 if y.dtype == torch.float64 else torch.float32
    with no_autocast(y):
        c = t_counts.to(dt)
        w = c / c.sum(1, keepdim=True).clamp(min=1.0)
        log_q = y.to(dt) - lse.to(dt)[:, None]
        lp = torch.where(c > 0, t_logprobs.to(dt), torch.zeros_like(log_q))
        return torch.where(c > 0, w * (lp - log_q), torch.zeros_like(log_q)).sum(1)


def sampled_kl_from_hidden(
    x: torch.Tensor,
    head_weight: torch.Tensor,
    t_ids: torch.Tensor,
    t_logprobs: torch.Tensor,
    t_counts: torch.Tensor,
    *,
    real_vocab: int,
    head_bias: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-row sampled-target KL estimate [N] (fp32) of ``x @ head_weight[:real_vocab].T`` (see
    :func:`sampled_kl_terms`), memory-bounded like :func:`sparse_kl_from_hidden` (same chunked / Triton head path,
    gradient wrt x). Forward KL, temperature 1 only: the draws came from the teacher at the cache's temperature.
    t_ids int [N, k], t_logprobs [N, k] (teacher log-probs at the ids, ``-inf`` where absent), t_counts int [N, k].
    """
    _check_head_args("sampled_kl_from_hidden", x, head_weight, real_vocab, head_bias)
    dummy_tail = torch.zeros(x.shape[0], dtype=torch.float32, device=t_logprobs.device)
    check_teacher_args("sampled_kl_from_hidden", x.shape[0], t_ids, t_logprobs, dummy_tail, real_vocab)
    if t_counts.shape != t_ids.shape or t_counts.dtype.is_floating_point:
        raise ValueError(f"sampled_kl_from_hidden: t_counts must be an integer tensor shaped like t_ids "
                         f"{tuple(t_ids.shape)}, got {t_counts.dtype} {tuple(t_counts.shape)}")
    _check_frozen("sampled_kl_from_hidden", x, head_weight, head_bias)
    backend = resolve_impl(impl, x.device)
    chunk = chunk_tokens or auto_chunk_tokens(real_vocab)
    t_ids, t_logprobs, t_counts = (t.to(x.device) for t in (t_ids, t_logprobs, t_counts))

    def terms(y, lse, rows):
        return sampled_kl_terms(y, lse, t_logprobs[rows], t_counts[rows])

    return _HeadLoss.apply(x, head_weight, head_bias, t_ids, terms, real_vocab, 1.0, chunk, backend)
