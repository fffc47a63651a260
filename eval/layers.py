"""What each target layer "says": greedy answers decoded through each layer's verbalizer (VLsI Figure 3).

For target layer ``i`` the next token is ``argmax lm_head(final_norm(verbalizer_i(h_i)))`` over the real vocab, where
``h_i`` is decoder layer ``i``'s output at the last position; the token is appended and the model runs again, so each
layer decodes its own continuation. The final row is the model's own greedy answer (native head).

How: one batch row per layer (same prompt in every row, so no padding) through ``model.generate`` with a KV cache;
forward hooks keep each target layer's output and a logits processor replaces row ``r``'s scores with layer ``r``'s
verbalizer logits. ``generate`` keeps doing what it does right for every family (M-RoPE positions, image features,
cache), and the tests check the result against a plain no-cache loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["LayerAnswer", "layer_answers"]


@dataclass
class LayerAnswer:
    """One row of the view: ``layer`` (decoder-layer id, or ``"final"``), decoded ``text``, ``token_ids``."""

    layer: int | str
    text: str
    token_ids: list[int]
    stopped: bool


def _repeat(enc, n: int):
    """``n`` copies of one encoded prompt, images included (every row re-reads the same image)."""
    return [dataclasses.replace(enc, sample_id=f"{enc.sample_id}#{r}") for r in range(n)]


def layer_answers(adapter, verbalizers, sample, *, max_new_tokens: int = 16, max_length: int | None = None,
                  include_final: bool = True) -> list[LayerAnswer]:
    """Greedy answer of every verbalizer layer (ascending) and, if ``include_final``, of the native head (last)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from vlsi.eval.generate import _stop_ids, left_pad
    from vlsi.models.encoding import pad_id_of
    from vlsi.eval.prompting import encode_prompt

    layers = list(verbalizers.layers)
    for i in layers:
        if not 0 <= i < adapter.num_layers:
            raise ValueError(f"verbalizer layer {i} out of range for a model with {adapter.num_layers} layers")
    rows: list[int | str] = layers + (["final"] if include_final else [])
    enc = encode_prompt(sample, adapter, max_length=max_length)
    tok = adapter.tokenizer
    pad_id = pad_id_of(tok)
    batch = left_pad(_repeat(enc, len(rows)), pad_id)  # equal lengths: no padding at all
    V = adapter.vocab_size
    context = verbalizers.needs_context
    captured: dict[int, torch.Tensor] = {}
    history: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def hook_for(i: int, r: int):
        def hook(_module, _args, output):
            h = output[0] if isinstance(output, tuple) else output
            if context:  # the decoder kind reads the whole sequence of its layer
                history[i].append(h[r].detach())
            else:
                captured[i] = h[r, -1:].detach()  # only this layer's own row is ever read

        return hook

    # Verbalizers may be kept in fp32 while the model runs in bf16 (GPU): cast at the boundaries.
    v_dtype = next(verbalizers.parameters()).dtype
    m_dtype = adapter.final_norm.weight.dtype

    class VerbalizerScores(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            for r, i in enumerate(layers):
                if context:
                    seq = torch.cat(history[i]).to(v_dtype)
                    y = verbalizers(i, seq, row_counts=[seq.shape[0]])[-1:]
                else:
                    y = verbalizers(i, captured[i].to(v_dtype))
                logits = adapter.lm_head(adapter.final_norm(y.to(m_dtype))).float()
                scores[r] = logits[0, : scores.shape[-1]].to(scores.dtype)
            scores[:, V:] = float("-inf")  # padded head rows are not tokens
            return scores

    handles = [adapter.decoder_layers[i].register_forward_hook(hook_for(i, r)) for r, i in enumerate(layers)]
    stops = _stop_ids(adapter)
    kwargs = batch.model_kwargs(adapter.device)
    kwargs = {k: (v.to(adapter.dtype) if hasattr(v, "is_floating_point") and v.is_floating_point() else v)
              for k, v in kwargs.items()}
    try:
        with torch.no_grad():
            out = adapter.model.generate(
                **kwargs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                logits_processor=LogitsProcessorList([VerbalizerScores()]),
                pad_token_id=pad_id, eos_token_id=sorted(stops) or None, temperature=None, top_p=None, top_k=None,
            )
    finally:
        for h in handles:
            h.remove()
    result = []
    for r, name in enumerate(rows):
        ids = out[r, batch.input_ids.shape[1]:].tolist()
        cut = next((k for k, t in enumerate(ids) if t in stops), None)
        kept = ids if cut is None else ids[:cut]
        result.append(LayerAnswer(name, tok.decode(kept, skip_special_tokens=True).strip(), kept, cut is not None))
    return result
