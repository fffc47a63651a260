"""The interaction and SFT losses of the student, assembled from vlsi.ops' memory-bounded per-row losses.

Shapes and conventions (docs/design.md):

- ``N`` = answer rows of a micro-batch (row ``t`` predicts token ``t + 1``), concatenated over samples in batch
  order - the order of ``ModelAdapter.forward_hidden`` and of :class:`TeacherTargets`.
- Student inputs to the frozen head: ``xs[i] = final_norm(verbalizer_i(h_i))`` [N, d] for each student target
  layer ``i`` (ascending), and ``x_final`` = the final-normed last hidden state [N, d].
- Teacher targets from the cache: ``ids`` int [N, L, k], ``logprobs`` [N, L, k], ``tail`` [N, L] with
  ``L = tl + 1``: rows ``0 .. tl-1`` the teacher's target layers ascending, row ``L-1`` the final head.

Reduction: every per-row loss is SUMMED over rows and divided by ``n_norm``, the number of answer rows of the
whole accumulation window (all micro-batches of one optimizer step), so the accumulated gradient of G micro-batches
equals the gradient of one batch holding all of them (grad-accum invariance; torchtune's normalisation by the
global token count). Per-layer figures returned for logging are plain means over this micro-batch's rows.

Never holds [N x vocab] logits for more than one token chunk at a time: the head work is done by
``vlsi.ops.sparse_kl_from_hidden`` / ``ce_from_hidden`` (gradients computed chunk by chunk) and, for the matching
matrix, by :func:`kl_matrix` under ``no_grad`` (one logits tile per (student layer, chunk), shared by all teacher
layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from vlsi.ops import ce_from_hidden, sampled_kl_from_hidden, sampled_kl_terms, sparse_kl_from_hidden
from vlsi.ops import logits_fp32, no_autocast  # the fp32 head product of vlsi.ops (no bf16 logits, any autocast)
from vlsi.ops.kl import coarse_kl_terms

from .matching import Matching, match_layers
from .names import DIRECTIONS, LOSS_OPS

__all__ = ["LOSS_OPS", "TeacherTargets", "InteractionOut", "kl_matrix", "interaction_loss", "sft_loss"]


@dataclass
class TeacherTargets:
    """Cached teacher top-k targets of a micro-batch's answer rows (see module doc for shapes)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    counts: torch.Tensor | None = None
    """Sampled targets (cache ``targets="sampled"``): int [N, L, k] draw counts; None for top-k targets."""

    @property
    def sampled(self) -> bool:
        return self.counts is not None

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_teacher_targets(self) -> int:
        """``tl``: teacher target layers (the final head excluded)."""
        return int(self.ids.shape[1]) - 1

    def to(self, device) -> "TeacherTargets":
        return TeacherTargets(self.ids.to(device), self.logprobs.to(device), self.tail.to(device),
                              None if self.counts is None else self.counts.to(device))

    def layer(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [N, k], logprobs [N, k], tail [N]) of teacher row ``j`` (``-1`` = final head)."""
        return self.ids[:, j], self.logprobs[:, j], self.tail[:, j]

    @staticmethod
    def cat(parts: Sequence["TeacherTargets"]) -> "TeacherTargets":
        sampled = {p.sampled for p in parts}
        if len(sampled) > 1:
            raise ValueError("TeacherTargets.cat: top-k and sampled targets cannot share a batch")
        return TeacherTargets(
            torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]), torch.cat([p.tail for p in parts]),
            torch.cat([p.counts for p in parts]) if sampled == {True} else None,
        )

    def kl_rows(self, x: torch.Tensor, w: torch.Tensor, j: int, *, real_vocab: int, direction: str = "forward",
                temperature: float = 1.0, chunk_tokens: int = 1024) -> torch.Tensor:
        """Per-row KL [N] of the student's ``x`` (through the head ``w``) against teacher row ``j``: the coarse KL
        for top-k targets, the unbiased importance-weighted estimate for sampled ones. A frozen ``w`` (the normal
        case) goes through the memory-bounded ops; a trainable one (``--train-all``: the final term of a student
        trained from scratch) through plain autograd on the [N x real vocab] fp32 logits, as :func:`sft_loss`."""
        if w.requires_grad and torch.is_grad_enabled():
            z = logits_fp32(x, w[:real_vocab])
            with no_autocast(z):
                z = z / temperature if temperature != 1.0 else z
                lse = torch.logsumexp(z, dim=1)
                if self.counts is None:
                    t_ids, t_lp, t_tail = self.layer(j)
                    y = torch.gather(z, 1, t_ids.long())
                    return coarse_kl_terms(y, lse, t_lp, t_tail, direction=direction, temperature=temperature)
                _check_sampled(direction, temperature)
                y = torch.gather(z, 1, self.ids[:, j].long())
                return sampled_kl_terms(y, lse, self.logprobs[:, j], self.counts[:, j])
        if self.counts is None:
            return sparse_kl_from_hidden(x, w, *self.layer(j), real_vocab=real_vocab, direction=direction,
                                         temperature=temperature, chunk_tokens=chunk_tokens)
        _check_sampled(direction, temperature)
        return sampled_kl_from_hidden(x, w, self.ids[:, j], self.logprobs[:, j], self.counts[:, j],
                                      real_vocab=real_vocab, chunk_tokens=chunk_tokens)


def _check_sampled(direction: str, temperature: float) -> None:
    from vlsi.ops import OpsError  # a VlsiError and a ValueError: the CLI prints one line

    if direction != "forward" or temperature != 1.0:
        raise OpsError(f"sampled teacher targets support only the forward KL at temperature 1 (the draws came from "
                         f"the teacher's own distribution), got direction={direction!r}, temperature={temperature}")


@torch.no_grad()
def kl_matrix(
    xs: Sequence[torch.Tensor],
    head_weight: torch.Tensor,
    targets: TeacherTargets,
    *,
    real_vocab: int,
    direction: str = "forward",
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """``[ts, tl]`` matrix of the mean (over rows) coarse KL between student target ``i`` and teacher target ``j``.

    One logits tile [chunk, real_vocab] per (student layer, token chunk) is shared by all ``tl`` teacher layers
    (only the gather at each teacher's ids and an O(k) formula differ), so the cost is ``ts`` head GEMMs without
    grad, not ``ts * tl``. Numerically the same function as ``vlsi.ops.coarse_kl`` (sampled targets: the same
    estimate as ``sampled_kl_from_hidden``, so layer matching ranks teacher layers by an unbiased KL estimate).
    Returns float64 on CPU.
    """
    if targets.sampled:
        _check_sampled(direction, temperature)
    ts, tl, n = len(xs), targets.num_teacher_targets, targets.num_rows
    out = torch.zeros(ts, tl, dtype=torch.float64)
    if n == 0 or ts == 0:
        return out
    w = head_weight[:real_vocab]
    ids = targets.ids.long()
    with no_autocast(head_weight, *xs):  # fp32 math under the engine's bf16 autocast, as in vlsi.ops
        for i, x in enumerate(xs):
            out[i] = _kl_row(x, w, ids, targets, n, tl, direction, temperature, chunk_tokens)
    return out


def _kl_row(x, w, ids, targets, n, tl, direction, temperature, chunk_tokens) -> torch.Tensor:
    """Row ``i`` of :func:`kl_matrix`: mean coarse KL of one student layer against each teacher layer."""
    acc = torch.zeros(tl, dtype=torch.float64, device=x.device)
    for t0 in range(0, n, chunk_tokens):
        rows = slice(t0, min(n, t0 + chunk_tokens))
        z = logits_fp32(x[rows].detach(), w)
        if temperature != 1.0:
            z.div_(temperature)
        lse = torch.logsumexp(z, dim=1)
        for j in range(tl):
            y = torch.gather(z, 1, ids[rows, j])
            if targets.counts is not None:
                kl = sampled_kl_terms(y, lse, targets.logprobs[rows, j], targets.counts[rows, j])
            else:
                kl = coarse_kl_terms(y, lse, targets.logprobs[rows, j], targets.tail[rows, j],
                                     direction=direction, temperature=temperature)
            acc[j] += kl.sum().to(torch.float64)
        del z
    return (acc / n).cpu()


@dataclass
class InteractionOut:
    """What one micro-batch's interaction loss produced.

    ``loss``: scalar with grad (already divided by the window's row count). ``terms``: detached sums of each loss
    term over this micro-batch's rows, divided the same way (``il``, ``ll``). ``layer_kl``: per student target, the
    mean (over this micro-batch's rows) of the loss actually used for it (KL to its matched teacher layer(s), or CE
    for ``il_loss="ce"``); ``final``: the same for the final layer. ``matching``: the matching used (``None``
    when no KL term needs one); ``kl_matrix``: the [ts, tl] matrix it was drawn from.
    """

    loss: torch.Tensor
    terms: dict
    layer_kl: list
    final: float | None
    matching: Matching | None
    kl_matrix: torch.Tensor | None


def interaction_loss(
    xs: Sequence[torch.Tensor],
    x_final: torch.Tensor,
    head_weight: torch.Tensor,
    targets: TeacherTargets,
    answer_targets: torch.Tensor,
    *,
    real_vocab: int,
    n_norm: int,
    il_loss: str = "kld",
    ll_loss: str = "kld",
    direction: str = "forward",
    temperature: float = 1.0,
    match_kwargs: dict | None = None,
    generator: torch.Generator | None = None,
    chunk_tokens: int = 1024,
) -> InteractionOut:
    """VLsI step-2 loss of one micro-batch: per-layer KL at the matched teacher layers + KL on the final layer.

    ``il_loss`` (intermediate layers) / ``ll_loss`` (last layer): ``"kld"`` = coarse KL to the teacher (cache),
    ``"ce"`` = next-token CE on ``answer_targets`` [N] (no teacher), ``"none"``. Matching (``match_kwargs``
    forwarded to :func:`vlsi.train.matching.match_layers`) runs on the no-grad :func:`kl_matrix` of this
    micro-batch; gradients then flow only through the matched pairs.
    """
    for name, op in (("il_loss", il_loss), ("ll_loss", ll_loss)):
        if op not in LOSS_OPS:
            raise ValueError(f"{name}={op!r} is not one of {LOSS_OPS}")
    if il_loss == "none" and ll_loss == "none":
        raise ValueError("il_loss and ll_loss are both 'none': the interaction step would train nothing")
    n = targets.num_rows
    if x_final.shape[0] != n or any(x.shape[0] != n for x in xs) or answer_targets.shape[0] != n:
        raise ValueError(f"interaction_loss: row counts differ (teacher targets {n}, final {x_final.shape[0]}, "
                         f"layers {[int(x.shape[0]) for x in xs]}, answer targets {answer_targets.shape[0]})")
    w = head_weight.detach()  # the verbalizers read the head frozen (method); the final term may train it (below)
    kw = dict(real_vocab=real_vocab, chunk_tokens=chunk_tokens)
    klkw = dict(kw, direction=direction, temperature=temperature)
    layer_vals: list[float] = []
    matching = matrix = None
    il_sum = x_final.new_zeros((), dtype=torch.float32)
    if il_loss == "kld" and xs:
        matrix = kl_matrix(xs, w, targets, direction=direction, temperature=temperature, **kw)
        matching = match_layers(matrix, generator=generator, **(match_kwargs or {}))
        for x, idx, wts in zip(xs, matching.indices, matching.weights):
            per_row = sum(wt * targets.kl_rows(x, w, j, **klkw) for j, wt in zip(idx, wts))
            s = per_row.sum()
            il_sum = il_sum + s
            layer_vals.append(float(s.detach()) / max(n, 1))
    elif il_loss == "ce" and xs:
        for x in xs:
            s = ce_from_hidden(x, w, answer_targets, **kw).sum()
            il_sum = il_sum + s
            layer_vals.append(float(s.detach()) / max(n, 1))
    ll_sum = x_final.new_zeros((), dtype=torch.float32)
    final_val = None
    if ll_loss == "kld":  # a trainable head (--train-all) learns from the final term, as from the SFT loss
        ll_sum = targets.kl_rows(x_final, head_weight, -1, **klkw).sum()
    elif ll_loss == "ce":
        ll_sum = sft_loss(x_final, head_weight, answer_targets, n_norm=1, **kw)
    if ll_loss != "none":
        final_val = float(ll_sum.detach()) / max(n, 1)
    total = (il_sum + ll_sum) / n_norm
    terms = {"il": float(il_sum.detach()) / n_norm, "ll": float(ll_sum.detach()) / n_norm}
    return InteractionOut(total, terms, layer_vals, final_val, matching, matrix)


def sft_loss(x_final: torch.Tensor, head_weight: torch.Tensor, answer_targets: torch.Tensor, *, real_vocab: int,
             n_norm: int, chunk_tokens: int = 1024) -> torch.Tensor:
    """Step-3 loss: next-token CE of the native head on the answer rows, summed and divided by ``n_norm``.

    A frozen head (the normal case) goes through the memory-bounded ``vlsi.ops.ce_from_hidden``; a trainable head
    (``--train-all``, models trained from scratch) through plain autograd on the [rows x real vocab] logits.
    """
    if head_weight.requires_grad and torch.is_grad_enabled():
        logits = torch.nn.functional.linear(x_final, head_weight[:real_vocab]).float()
        return torch.nn.functional.cross_entropy(logits, answer_targets.long(), reduction="sum") / n_norm
    return ce_from_hidden(x_final, head_weight.detach(), answer_targets, real_vocab=real_vocab,
                          chunk_tokens=chunk_tokens).sum() / n_norm
