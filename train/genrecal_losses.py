"""GenRecal's losses through the frozen teacher head, memory-bounded, fp32 under any autocast.

Shapes (docs/method.md "GenRecal"):

- ``r`` [N, d_T]: the Recalibrator's output at the N teacher answer rows of a micro-batch (concatenated over
  samples in batch order); row ``t`` predicts teacher token ``t + 1``.
- ``z_t`` [N, d_T]: the teacher's own post-final-norm states at the same rows (what its head reads; data, no grad).
- ``targets`` int [N]: the teacher's answer ids (``teacher input_ids[answer_positions + 1]``).
- ``head_weight`` [V_pad, d_T]: the frozen teacher LM head; only the first ``real_vocab`` rows are read.

Per row: ``ce = -log softmax(head(r))[target]`` and ``kl = KL(softmax head(z_t) || softmax head(r))`` over the real
vocab. Both come from one logits tile per chunk of ``chunk_tokens`` rows; each chunk runs under activation
checkpointing, so forward keeps no [rows x vocab] tensor and backward recomputes one chunk at a time (peak extra
memory ~ 3 tiles of chunk x vocab fp32, whatever N). Math in fp32 (fp64 for fp64 inputs) under autocast
(``vlsi.ops.no_autocast``, ``logits_fp32``); the gradient wrt ``r`` comes back in ``r``'s dtype.

Reduction: the callers sum rows and divide by the step's ``n_norm`` (grad-accumulation invariant, as every loss of
the project).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from vlsi.ops import logits_fp32, no_autocast

__all__ = ["head_ce_kl", "GenRecalTerms", "genrecal_terms"]


def _chunk_terms(r: torch.Tensor, z_t: torch.Tensor, targets: torch.Tensor, w: torch.Tensor,
                 bias: torch.Tensor | None):
    with no_autocast(r, w):
        lr = logits_fp32(r, w, bias)  # [c, V] fp32 (fp64 for fp64 r)
        with torch.no_grad():
            lt = logits_fp32(z_t, w, bias).to(lr.dtype)
            log_p = torch.log_softmax(lt, dim=1)
        log_q = torch.log_softmax(lr, dim=1)
        ce = -log_q.gather(1, targets.long()[:, None])[:, 0]
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
        return ce, kl


def head_ce_kl(r: torch.Tensor, z_t: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, *,
               real_vocab: int, head_bias: torch.Tensor | None = None, chunk_tokens: int = 1024):
    """Per-row ``(ce [N], kl [N])`` of ``r`` under the frozen head (module doc); differentiable wrt ``r`` only."""
    if r.dim() != 2 or r.shape != z_t.shape:
        raise ValueError(f"head_ce_kl: r {tuple(r.shape)} and z_t {tuple(z_t.shape)} must be the same [N, d]")
    if targets.shape != (r.shape[0],):
        raise ValueError(f"head_ce_kl: targets must be [N={r.shape[0]}], got {tuple(targets.shape)}")
    if head_weight.shape[0] < real_vocab or head_weight.shape[1] != r.shape[1]:
        raise ValueError(f"head_ce_kl: head_weight {tuple(head_weight.shape)} does not fit d={r.shape[1]}, "
                         f"real_vocab={real_vocab}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= real_vocab):
        raise ValueError(f"head_ce_kl: a target id is outside the real vocab [0, {real_vocab})")
    w = head_weight.detach()[:real_vocab]
    b = head_bias.detach()[:real_vocab] if head_bias is not None else None
    z_t = z_t.detach()
    ces, kls = [], []
    step = max(1, int(chunk_tokens))
    for s in range(0, r.shape[0], step):
        # why checkpoint: autograd would otherwise keep every chunk's [c x V] softmax until backward
        args = (r[s:s + step], z_t[s:s + step], targets[s:s + step], w, b)
        if r.requires_grad and torch.is_grad_enabled():
            ce, kl = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            ce, kl = _chunk_terms(*args)
        ces.append(ce)
        kls.append(kl)
    if not ces:
        z = r.new_zeros(0, dtype=torch.float64 if r.dtype == torch.float64 else torch.float32)
        return z, z
    return torch.cat(ces), torch.cat(kls)


@dataclass
class GenRecalTerms:
    """Summed (not averaged) terms of one micro-batch: ``loss`` (weighted sum, a tensor) and the float sums of its
    parts, ``ce``, ``kl``, ``reg_ce``, ``reg_kl`` (0.0 when a part is off), over ``rows`` teacher answer rows."""

    loss: torch.Tensor
    ce: float
    kl: float
    reg_ce: float
    reg_kl: float
    rows: int


def genrecal_terms(r_main: torch.Tensor, r_reg: torch.Tensor | None, z_t: torch.Tensor, head_weight: torch.Tensor,
                   targets: torch.Tensor, *, real_vocab: int, ce_weight: float = 1.0, kl_weight: float = 1.0,
                   reg_weight: float = 1.0, head_bias: torch.Tensor | None = None,
                   chunk_tokens: int = 1024) -> GenRecalTerms:
    """``sum_rows [ce_w * CE + kl_w * KL](r_main) + reg_w * sum_rows [ce_w * CE + kl_w * KL](r_reg)``.

    ``r_main``: the Recalibrator on ``[student question ; pre(teacher answer)]``; ``r_reg``: on
    ``[pre(teacher question) ; pre(teacher answer)]`` (None: no regulariser). Both at the same answer rows as
    ``z_t`` / ``targets``.
    """
    kw = dict(real_vocab=real_vocab, head_bias=head_bias, chunk_tokens=chunk_tokens)
    ce, kl = head_ce_kl(r_main, z_t, head_weight, targets, **kw)
    ce_s, kl_s = ce.sum(), kl.sum()
    loss = ce_weight * ce_s + kl_weight * kl_s
    reg_ce = reg_kl = 0.0
    if r_reg is not None:
        rce, rkl = head_ce_kl(r_reg, z_t, head_weight, targets, **kw)
        rce_s, rkl_s = rce.sum(), rkl.sum()
        loss = loss + reg_weight * (ce_weight * rce_s + kl_weight * rkl_s)
        reg_ce, reg_kl = float(rce_s.detach()), float(rkl_s.detach())
    return GenRecalTerms(loss, float(ce_s.detach()), float(kl_s.detach()), reg_ce, reg_kl, int(r_main.shape[0]))
