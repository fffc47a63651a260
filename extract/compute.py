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

    def to_records(self) -> list[SampleRecord]:
        ids = self.topk.ids.cpu().numpy()
        lps = self.topk.logprobs.cpu().numpy()
        tails = self.topk.tail.cpu().numpy()
        out, r = [], 0
        for m in self.metas:
            a = m.n_answer
            out.append(SampleRecord(m.sample_id, m.content_hash, m.input_ids, m.answer_positions,
                                    ids[r:r + a], lps[r:r + a], tails[r:r + a]))
            r += a
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
