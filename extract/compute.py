"""What extraction computes, given hidden states: verbalizer -> final norm -> LM head -> top-k, layer by layer.

For the answer rows of a batch (row ``t`` predicts token ``t + 1``) and each target layer ``i`` in ascending order,
then the final native head (the LAST row of the layer axis, docs/design.md):

    x_i = final_norm(verbalizer_i(h_i))          # h_i: decoder layer i's output, before the final norm
    x_final = final_hidden                       # already final-normed by the model
    ids, logprobs, tail = head_topk(x, lm_head.weight, k, real_vocab)

``head_topk`` takes the log-softmax over the first ``real_vocab`` head rows only (padded rows never enter), keeps
the top-k and the tail log-mass, and tiles over tokens and vocab; one layer at a time is alive, so the peak is one
tile of logits, never [tokens x vocab] for all layers.

Precision: the verbalizer and the norm run in the teacher's dtype on the head's device, as the teacher's own
final layer does (bf16 on GPU, fp32 on CPU); logits and the softmax accumulate in fp32 inside ``head_topk``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vlsi.cache_format import SampleRecord
from vlsi.ops import TopK, head_topk


@dataclass
class HeadSpec:
    """The frozen pieces every layer's distribution goes through (shared, never copied)."""

    final_norm: Callable[[torch.Tensor], torch.Tensor]
    head_weight: torch.Tensor  # [padded_vocab, d]
    real_vocab: int
    head_bias: torch.Tensor | None = None


@torch.inference_mode()
def layer_topk(
    layer_hidden: dict[int, torch.Tensor],
    final_hidden: torch.Tensor | None,
    *,
    layers: Sequence[int],
    verbalizer: Callable[[int, torch.Tensor], torch.Tensor],
    head: HeadSpec,
    k: int,
    final_topk: TopK | None = None,
    impl: str = "auto",
) -> TopK:
    """Per-row top-k for every target layer (ascending) + the final head, stacked on a layer axis.

    layer_hidden[i]: [R, d]; final_hidden: [R, d] (post final norm) unless ``final_topk`` ([R, k] fields) is
    given by a backend that only exposes log-probs. Returns ``TopK(ids int32[R, L, k], logprobs fp32[R, L, k],
    tail fp32[R, L])`` with ``L = len(layers) + 1``, on the head's device.
    """
    w = head.head_weight
    ids, lps, tails = [], [], []
    for i in sorted(layers):
        h = layer_hidden[i]
        # device_map="auto": layer i may live on another GPU than the head; one [R, d] copy per layer.
        h = h.to(device=w.device, dtype=w.dtype)
        x = head.final_norm(verbalizer(i, h)).to(w.dtype)
        out = head_topk(x, w, k, head.real_vocab, head_bias=head.head_bias, impl=impl)
        ids.append(out.ids)
        lps.append(out.logprobs)
        tails.append(out.tail)
        del h, x  # free before the next layer: one layer's tiles alive at a time
    if final_topk is None:
        if final_hidden is None:
            raise ValueError("layer_topk: give final_hidden or final_topk")
        x = final_hidden.to(device=w.device, dtype=w.dtype)
        final_topk = head_topk(x, w, k, head.real_vocab, head_bias=head.head_bias, impl=impl)
    ids.append(final_topk.ids.to(w.device, torch.int32))
    lps.append(final_topk.logprobs.to(w.device, torch.float32))
    tails.append(final_topk.tail.to(w.device, torch.float32))
    return TopK(torch.stack(ids, 1), torch.stack(lps, 1), torch.stack(tails, 1))


def head_sample(x: torch.Tensor, head: HeadSpec, n: int, generator: torch.Generator, *,
                chunk_tokens: int | None = None) -> tuple[TopK, torch.Tensor]:
    """Sampled targets of rows ``x`` [R, d] (final-normed): ``n`` draws with replacement from each row's full
    softmax over the real vocab (fp32), kept as the row's distinct ids in descending log-prob with their counts.

    Returns ``(TopK(ids int32 [R, n], logprobs fp32 [R, n] = the teacher's log-probs at the ids, -inf in absent
    slots, tail fp32 [R] = log(1 - their mass)), counts int32 [R, n])``. Memory: one [chunk, real_vocab] fp32
    tile at a time (never [R x vocab] for several layers). The draws come from ``generator`` (on x's device).
    """
    from vlsi.ops import logits_fp32, no_autocast, tail_logmass
    from vlsi.ops._numerics import auto_chunk_tokens

    w = head.head_weight[:head.real_vocab]
    b = None if head.head_bias is None else head.head_bias[:head.real_vocab]
    R = x.shape[0]
    chunk = chunk_tokens or auto_chunk_tokens(head.real_vocab)
    ids = torch.zeros(R, n, dtype=torch.int32, device=x.device)
    lps = torch.full((R, n), float("-inf"), dtype=torch.float32, device=x.device)
    counts = torch.zeros(R, n, dtype=torch.int32, device=x.device)
    with no_autocast(x, w):
        for t0 in range(0, R, chunk):
            rows = slice(t0, min(R, t0 + chunk))
            logp = torch.log_softmax(logits_fp32(x[rows], w, b), dim=1)
            draws = torch.multinomial(logp.exp(), n, replacement=True, generator=generator)  # [r, n]
            s, _ = draws.sort(1)
            first = torch.ones_like(s, dtype=torch.bool)
            first[:, 1:] = s[:, 1:] != s[:, :-1]
            cnt = (s[:, :, None] == s[:, None, :]).sum(-1) * first  # the count on each id's first occurrence
            key = torch.where(first, logp.gather(1, s), torch.full_like(logp[:, :n], float("-inf")))
            order = torch.sort(key, dim=1, descending=True, stable=True).indices  # distinct ids first
            c = cnt.gather(1, order)
            ids[rows] = torch.where(c > 0, s.gather(1, order), torch.zeros_like(s)).to(torch.int32)
            lps[rows] = key.gather(1, order)
            counts[rows] = c.to(torch.int32)
            del logp
    tail = tail_logmass(lps) if R else torch.zeros(0, device=x.device)
    return TopK(ids, lps, tail.to(torch.float32)), counts


@torch.inference_mode()
def layer_sampled(
    layer_hidden: dict[int, torch.Tensor],
    final_hidden: torch.Tensor | None,
    *,
    layers: Sequence[int],
    verbalizer: Callable[[int, torch.Tensor], torch.Tensor],
    head: HeadSpec,
    n: int,
    generator: torch.Generator,
) -> tuple[TopK, torch.Tensor]:
    """:func:`layer_topk`'s sampled-targets twin: per row ``n`` draws from each target layer's verbalized
    distribution and from the final head's, stacked on the layer axis (``[R, L, n]`` + counts ``[R, L, n]``).
    Needs the final hidden states (a backend that returns only final log-probs cannot be sampled from)."""
    if final_hidden is None:
        raise ValueError("sampled targets need the final hidden states (the backend returned only top-k log-probs)")
    w = head.head_weight
    outs, cnts = [], []
    for i in sorted(layers):
        h = layer_hidden[i].to(device=w.device, dtype=w.dtype)
        o, c = head_sample(head.final_norm(verbalizer(i, h)).to(w.dtype), head, n, generator)
        outs.append(o)
        cnts.append(c)
        del h
    o, c = head_sample(final_hidden.to(device=w.device, dtype=w.dtype), head, n, generator)
    outs.append(o)
    cnts.append(c)
    return TopK(*(torch.stack([getattr(t, f) for t in outs], 1) for f in ("ids", "logprobs", "tail"))), \
        torch.stack(cnts, 1)


@dataclass
class SampleMeta:
    """What a record needs besides the top-k: identity, the exact ids, the answer rows."""

    sample_id: str
    content_hash: str
    input_ids: np.ndarray  # int32 [T]
    answer_positions: np.ndarray  # int32 [A]

    @property
    def n_answer(self) -> int:
        return int(self.answer_positions.shape[0])


@dataclass
class BatchResult:
    """One batch's top-k (rows of all samples concatenated in batch order), still on the device.

    ``to_records`` runs in the background writer thread: the device -> host copy and the split per sample happen
    there, so the forward loop never waits for them.
    """

    metas: list[SampleMeta]
    topk: TopK
    counts: torch.Tensor | None = None  # sampled targets: [R, L, n] draw counts
    hidden_answer: torch.Tensor | None = None  # --hidden-states: [R, d] bf16 post-norm states at the answer rows
    hidden_question: torch.Tensor | None = None  # --hidden-states all: [sum Q, d] bf16 at the question rows
    question_counts: list[int] | None = None  # per sample Q (batch order)

    def to_records(self) -> list[SampleRecord]:
        ids = self.topk.ids.cpu().numpy()
        lps = self.topk.logprobs.cpu().numpy()
        tails = self.topk.tail.cpu().numpy()
        counts = None if self.counts is None else self.counts.cpu().numpy()
        from vlsi.cache_format.features import bits_of_tensor

        ha = None if self.hidden_answer is None else bits_of_tensor(self.hidden_answer)
        hq = None if self.hidden_question is None else bits_of_tensor(self.hidden_question)
        out, r, q = [], 0, 0
        for j, m in enumerate(self.metas):
            a = m.n_answer
            nq = self.question_counts[j] if hq is not None else 0
            out.append(SampleRecord(m.sample_id, m.content_hash, m.input_ids, m.answer_positions,
                                    ids[r:r + a], lps[r:r + a], tails[r:r + a],
                                    None if counts is None else counts[r:r + a],
                                    None if ha is None else ha[r:r + a], None if hq is None else hq[q:q + nq]))
            r, q = r + a, q + nq
        if r != ids.shape[0]:
            raise RuntimeError(f"batch has {ids.shape[0]} result rows but its samples have {r} answer positions")
        return out


def head_spec_of(adapter: Any) -> HeadSpec:
    """The frozen final norm + LM head (+ bias if the head has one) of a ``ModelAdapter``."""
    return HeadSpec(
        final_norm=adapter.final_norm,
        head_weight=adapter.lm_head.weight,
        real_vocab=int(adapter.vocab_size),
        head_bias=getattr(adapter.lm_head, "bias", None),
    )
