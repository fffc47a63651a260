"""Prompt encoding and batched greedy generation against a plain no-cache, one-sample-at-a-time loop."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, reference_greedy

from vlsi.eval.generate import generate_answers, left_pad
from vlsi.eval.prompting import encode_prompt


def _collapse(ids: list[int], image_id) -> list[int]:
    """Runs of the image token -> one token (the template's single placeholder before expansion)."""
    out = []
    for t in ids:
        if image_id is not None and t == image_id and out and out[-1] == image_id:
            continue
        out.append(t)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_is_the_generation_prompt(adapters, samples, family):
    from vlsi.models.encoding import build_messages

    ad = adapters[family]
    tok = ad.tokenizer
    vlm = family != "qwen2"
    for s in samples:
        if s.images and not vlm:
            continue
        enc = encode_prompt(s, ad)
        last_user = max(i for i, t in enumerate(s.turns) if t.role == "user")
        msgs = build_messages(s, vlm=vlm)[: last_user + 1]
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        want_ids = tok(want, add_special_tokens=False)["input_ids"]
        assert _collapse(enc.input_ids.tolist(), ad.image_token_id) == want_ids, s.id
        assert not enc.answer_mask.any() and enc.answer_positions.numel() == 0
        if "mm_token_type_ids" in enc.model_inputs:
            assert enc.model_inputs["mm_token_type_ids"].shape == enc.input_ids.shape
        if s.meta.get("category") == "multi_turn":  # the earlier gold answer stays in the prompt as history
            assert s.turns[1].text in tok.decode(enc.input_ids)


def test_left_pad_moves_rows_right(adapters, samples):
    ad = adapters["qwen2_vl"]
    encs = [encode_prompt(s, ad) for s in samples[:4]]
    b = left_pad(encs, ad.tokenizer.pad_token_id)
    T = b.input_ids.shape[1]
    for row, e in enumerate(encs):
        n = e.length
        assert torch.equal(b.input_ids[row, T - n:], e.input_ids)
        assert b.attention_mask[row, : T - n].sum() == 0 and b.attention_mask[row, T - n:].all()
        if "mm_token_type_ids" in e.model_inputs:
            assert torch.equal(b.model_inputs["mm_token_type_ids"][row, T - n:], e.model_inputs["mm_token_type_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_equals_reference_loop(adapters, samples, family):
    ad = adapters[family]
    if family == "qwen2":
        chosen = [s for s in samples if not s.images][:3] * 2
    else:  # text-only, one-image and two-image prompts of different lengths mixed in each batch
        by_cat = {}
        for s in samples:
            by_cat.setdefault(s.meta["category"], s)
        chosen = [by_cat[c] for c in ("text", "two_image", "sequence", "colour", "multi_turn", "count") if c in by_cat]
        assert {len(s.images) for s in chosen[:4]} == {0, 1, 2}
    got = list(generate_answers(ad, chosen, batch_size=4, max_new_tokens=5))
    assert [s.id for s, _ in got] == [s.id for s in chosen]
    for s, g in got:
        ref = reference_greedy(ad, encode_prompt(s, ad), 5)
        assert g.token_ids == ref, (family, s.id)
        assert all(t < ad.vocab_size for t in g.token_ids)  # padded head rows never chosen
        assert g.text == ad.tokenizer.decode(ref, skip_special_tokens=True).strip()
        assert g.prompt_tokens == encode_prompt(s, ad).length
