"""Batched greedy generation with a :class:`vlsi.models.ModelAdapter`.

Prompts are encoded with :func:`vlsi.eval.prompting.encode_prompt`, collated by ``vlsi.models.collate`` (which knows
each family's image-tensor layout) and then moved to LEFT padding: decoder-only generation appends new tokens at
the right end of every row, so the prompts must end in the same column. Qwen2-VL's M-RoPE and the causal masks read
positions from the attention mask, so left padding does not change any sample's tokens; the tests check batched
== one-by-one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from vlsi.models.encoding import Batch, Encoded, collate, pad_id_of

__all__ = ["Generation", "left_pad", "generate_ids", "generate_answers"]


@dataclass
class Generation:
    """One sample's greedy answer: decoded ``text`` (special tokens skipped), the new ``token_ids`` (up to, not
    including, the end-of-turn token) and ``prompt_tokens`` (prompt length after image expansion)."""

    sample_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    stopped: bool
    """True when the model emitted an end token; False when ``max_new_tokens`` cut it."""


def left_pad(items: Sequence[Encoded], pad_id: int) -> Batch:
    """``collate(items)`` with every row moved to the right end (left padding), per-token inputs shifted alike."""
    import torch

    batch = collate(list(items), pad_id)
    T = batch.input_ids.shape[1]
    ids = torch.full_like(batch.input_ids, int(pad_id))
    attn = torch.zeros_like(batch.attention_mask)
    shifted = {}
    per_token = {k: v for k, v in batch.model_inputs.items() if hasattr(v, "shape") and v.dim() == 2
                 and tuple(v.shape) == tuple(batch.input_ids.shape)}  # e.g. mm_token_type_ids [B, T]
    for k, v in per_token.items():
        shifted[k] = torch.zeros_like(v)
    for b, e in enumerate(items):
        n = e.length
        ids[b, T - n:] = batch.input_ids[b, :n]
        attn[b, T - n:] = 1
        for k, v in per_token.items():
            shifted[k][b, T - n:] = v[b, :n]
    return dataclasses.replace(batch, input_ids=ids, attention_mask=attn,
                               answer_mask=torch.zeros_like(batch.answer_mask),
                               model_inputs={**batch.model_inputs, **shifted})


def _stop_ids(adapter) -> set[int]:
    gc = getattr(adapter.model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = adapter.tokenizer.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    return {int(i) for i in ids}


def _real_vocab_only(vocab_size: int):
    """Padded LM-head rows are not tokens (docs/design.md "Vocab"): never let greedy decoding pick one."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class _RealVocab(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if scores.shape[-1] > vocab_size:
                scores = scores.clone()
                scores[:, vocab_size:] = float("-inf")
            return scores

    return LogitsProcessorList([_RealVocab()])


def generate_ids(adapter, items: Sequence[Encoded], *, max_new_tokens: int) -> list[tuple[list[int], bool]]:
    """Greedy-decode ``items`` as one left-padded batch: per item (new ids before the first stop token, stopped)."""
    import torch

    tok = adapter.tokenizer
    pad_id = pad_id_of(tok)
    stops = _stop_ids(adapter)
    batch = left_pad(items, pad_id)
    kwargs = batch.model_kwargs(adapter.device)
    # float image inputs in the model's dtype (bf16 on GPU)
    kwargs = {k: (v.to(adapter.dtype) if hasattr(v, "is_floating_point") and v.is_floating_point() else v)
              for k, v in kwargs.items()}
    with torch.no_grad():
        out = adapter.model.generate(
            **kwargs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            logits_processor=_real_vocab_only(adapter.vocab_size),
            pad_token_id=pad_id, eos_token_id=sorted(stops) or None,
            temperature=None, top_p=None, top_k=None,
        )
    new = out[:, batch.input_ids.shape[1]:].tolist()
    results = []
    for row in new:
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        results.append((row if cut is None else row[:cut], cut is not None))
    return results


def generate_answers(
    adapter,
    samples: Iterable,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    max_length: int | None = None,
    policy=None,
    progress=None,
) -> Iterator[tuple[object, Generation]]:
    """Yield ``(sample, Generation)`` for every sample, greedy, ``batch_size`` prompts at a time, in input order.

    Samples whose prompt cannot be encoded follow ``policy`` (a ``BadSamplePolicy``; ``None`` raises).
    ``progress`` (e.g. a tqdm bar) gets ``update(n_samples)`` and ``set_postfix`` with generated tokens/s.
    """
    from vlsi.eval.prompting import encode_prompt

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    tok = adapter.tokenizer
    pending: list[tuple[object, Encoded]] = []

    def flush():
        done = generate_ids(adapter, [e for _, e in pending], max_new_tokens=max_new_tokens)
        for (s, e), (ids, stopped) in zip(pending, done):
            text = tok.decode(ids, skip_special_tokens=True).strip()
            yield s, Generation(e.sample_id, text, ids, e.length, stopped)
        if progress is not None:
            progress.update(len(pending))
        pending.clear()

    for s in samples:
        e = encode_prompt(s, adapter, max_length=max_length, policy=policy)
        if e is None:
            continue
        pending.append((s, e))
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()
