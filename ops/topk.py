"""Verbalizer head + top-k + log-softmax normaliser without a [tokens x vocab] tensor (the extraction-side head op).

Contract (what the cache stores per answer position and layer, see docs/design.md "Top-k record"):

- ``ids``: int32 [N, k], the k most likely token ids of the REAL vocabulary, by descending log-prob;
- ``logprobs``: float32 [N, k], log-softmax over the first ``real_vocab`` head rows at those ids (temperature 1);
- ``tail``: float32 [N], ``log(1 - sum(exp(logprobs)))`` computed as ``log1mexp(logsumexp(logprobs))``, floored at
  :data:`vlsi.ops.TAIL_FLOOR` (= -20, mass 2e-9, under fp32's resolution of ``1 - sum``); exactly the floor
  when ``k == real_vocab``.

Padded head rows (``real_vocab <= row < padded_vocab``) are never read: they can hold anything (even huge values)
and neither enter the normaliser nor the top-k. Ids of exactly tied logits may come in any order.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ._numerics import TAIL_FLOOR, logits_fp32, no_autocast, tail_logmass
from .dispatch import resolve_impl


class TopK(NamedTuple):
    """Per-row top-k record: ``ids`` int32 [N, k], ``logprobs`` float32 [N, k], ``tail`` float32 [N]."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor


def _check_head_args(fn: str, x: torch.Tensor, head_weight: torch.Tensor, real_vocab: int,
                     head_bias: torch.Tensor | None = None) -> None:
    """One-line ValueErrors naming the argument, shared by every head op."""
    if x.dim() != 2:
        raise ValueError(f"{fn}: x must be 2-D [tokens, hidden], got shape {tuple(x.shape)}")
    if head_weight.dim() != 2:
        raise ValueError(f"{fn}: head_weight must be 2-D [padded_vocab, hidden], got shape {tuple(head_weight.shape)}")
    if x.shape[1] != head_weight.shape[1]:
        raise ValueError(f"{fn}: hidden size of x ({x.shape[1]}) != hidden size of head_weight ({head_weight.shape[1]})")
    if not 1 <= real_vocab <= head_weight.shape[0]:
        raise ValueError(f"{fn}: real_vocab={real_vocab} must be in [1, head rows={head_weight.shape[0]}]")
    if x.device != head_weight.device:
        raise ValueError(f"{fn}: x is on {x.device} but head_weight is on {head_weight.device}")
    if head_bias is not None and (head_bias.dim() != 1 or head_bias.shape[0] < real_vocab):
        raise ValueError(f"{fn}: head_bias must be 1-D with >= real_vocab={real_vocab} entries, got {tuple(head_bias.shape)}")


def head_topk(
    x: torch.Tensor,
    head_weight: torch.Tensor,
    k: int,
    real_vocab: int,
    *,
    head_bias: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_tokens: int = 1024,
    chunk_vocab: int = 32768,
) -> TopK:
    """Top-k ids, their log-probs under the full softmax over the real vocab, and the tail log-mass.

    x: [N, d] final-normed hidden states (the caller applies verbalizer + final norm), any float dtype;
    head_weight: [Vp, d]; head_bias: optional [>= real_vocab]. Math accumulates in fp32 (fp64 for fp64 inputs),
    under any autocast context (autocast is disabled inside; inputs are upcast explicitly).
    ``impl``: "auto" (Triton on CUDA when importable, else torch), "torch" or "triton" (see vlsi.ops.dispatch).
    torch path: tiles of ``chunk_tokens x chunk_vocab`` logits with a running max / sum-exp and a running top-k
    merge, so memory is bounded by one tile whatever N and the vocab. Not differentiable (extraction only).
    """
    _check_head_args("head_topk", x, head_weight, real_vocab, head_bias)
    if not 1 <= k <= real_vocab:
        raise ValueError(f"head_topk: k={k} must be in [1, real_vocab={real_vocab}]")
    if chunk_tokens < 1 or chunk_vocab < 1:
        raise ValueError(f"head_topk: chunk_tokens={chunk_tokens} and chunk_vocab={chunk_vocab} must be >= 1")
    backend = resolve_impl(impl, x.device)
    with no_autocast(x, head_weight):  # fp32 math whatever the caller's autocast context
        if backend == "triton":
            from .triton_head import MAX_TRITON_K, head_topk_triton  # lazy: importing triton costs seconds

            if k <= MAX_TRITON_K or impl == "triton":
                out = head_topk_triton(x, head_weight, k, real_vocab, head_bias=head_bias)
            else:  # "auto" with a huge k: the register-tile kernel does not apply
                out = _head_topk_torch(x, head_weight, k, real_vocab, head_bias, chunk_tokens, chunk_vocab)
        else:
            out = _head_topk_torch(x, head_weight, k, real_vocab, head_bias, chunk_tokens, chunk_vocab)
    if k == real_vocab:  # no tail token exists: exactly the floor, not 1 - sum rounding noise
        out.tail.fill_(TAIL_FLOOR)
    return out


@torch.no_grad()
def _head_topk_torch(x, w, k, real_vocab, bias, chunk_tokens, chunk_vocab) -> TopK:
    n = x.shape[0]
    ids = torch.empty(n, k, dtype=torch.int32, device=x.device)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=x.device)
    tail = torch.empty(n, dtype=torch.float32, device=x.device)
    for t0 in range(0, n, chunk_tokens):
        xc = x[t0:t0 + chunk_tokens]
        run_max = run_sum = best_val = best_id = None
        for v0 in range(0, real_vocab, chunk_vocab):
            v1 = min(v0 + chunk_vocab, real_vocab)  # never past the real vocab: padded rows are not read
            z = logits_fp32(xc, w[v0:v1], None if bias is None else bias[v0:v1])
            # Online log-sum-exp: rescale the running sum to the new running max (flash-attention style).
            tile_max = z.amax(dim=1)
            new_max = tile_max if run_max is None else torch.maximum(run_max, tile_max)
            tile_sum = torch.exp(z - new_max[:, None]).sum(dim=1)
            run_sum = tile_sum if run_sum is None else run_sum * torch.exp(run_max - new_max) + tile_sum
            run_max = new_max
            # Running top-k: the tile's own top-k can only contain the global winners of this tile, so merging
            # k + k candidates per row is exact.
            tv, ti = torch.topk(z, min(k, v1 - v0), dim=1)
            ti = ti + v0
            if best_val is None:
                best_val, best_id = tv, ti
            else:
                cand_v = torch.cat([best_val, tv], dim=1)
                cand_i = torch.cat([best_id, ti], dim=1)
                best_val, pos = torch.topk(cand_v, min(k, cand_v.shape[1]), dim=1)
                best_id = torch.gather(cand_i, 1, pos)
        lse = run_max + torch.log(run_sum)
        lp = best_val - lse[:, None]
        ids[t0:t0 + chunk_tokens] = best_id.to(torch.int32)
        logprobs[t0:t0 + chunk_tokens] = lp.float()
        tail[t0:t0 + chunk_tokens] = tail_logmass(lp).float()
    return TopK(ids, logprobs, tail)


def verbalized_topk(
    hidden: torch.Tensor,
    verbalizer: Callable[[torch.Tensor], torch.Tensor],
    norm: Callable[[torch.Tensor], torch.Tensor],
    head_weight: torch.Tensor,
    k: int,
    real_vocab: int,
    **kw,
) -> TopK:
    """``head_topk(norm(verbalizer(hidden)), head_weight, k, real_vocab, **kw)``.

    hidden: [..., d] decoder-layer outputs (before the final norm); the leading axes are flattened and restored,
    so the result fields have shapes [..., k], [..., k] and [...]. Pass ``verbalizer=torch.nn.Identity()`` for the
    final layer (its own head) or a logit-lens view.
    """
    lead = hidden.shape[:-1]
    with torch.no_grad():
        x = norm(verbalizer(hidden))
        x = x.reshape(-1, x.shape[-1])
    out = head_topk(x, head_weight, k, real_vocab, **kw)
    return TopK(out.ids.reshape(*lead, k), out.logprobs.reshape(*lead, k), out.tail.reshape(lead))
