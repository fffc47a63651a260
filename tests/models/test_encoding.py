"""Chat encoding: ids equal the chat template's, image tokens expanded to the model's count, answer masks right for
single-turn, multi-turn, text-only and two-image samples, bad samples error or are skipped with a report."""

from __future__ import annotations

import pytest
import torch

from vlsi.models import collate, encode_sample
from vlsi.models.data import BadSamplePolicy, BadSampleReport, Sample, Turn
from vlsi.models.encoding import build_messages
from vlsi.models.errors import BadSampleError

VLM = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")


def _answer_runs(enc):
    """Contiguous runs of answer-mask tokens, as id lists."""
    runs, cur = [], []
    for i, m in zip(enc.input_ids.tolist(), enc.answer_mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


CASES = [(f, n) for f in VLM for n in ("single", "multi", "text", "two_images")] + [("qwen2", "text"), ("llama", "text")]


@pytest.mark.parametrize("family,name", CASES)
def test_answer_mask_and_ids(adapters, samples, family, name):
    ad = adapters[family]
    sample, answers = samples[name]
    enc = encode_sample(sample, ad)
    tok = ad.tokenizer
    # 1. Masked tokens decode to exactly the answers, each followed by the end-of-turn token.
    runs = _answer_runs(enc)
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]
    # 2. With image runs collapsed, ids are exactly what apply_chat_template gives.
    ref = tok.apply_chat_template(build_messages(sample, vlm=family in VLM), tokenize=True, return_dict=False)
    ids = enc.input_ids.tolist()
    img = ad.image_token_id
    collapsed = [t for k, t in enumerate(ids) if not (t == img and k > 0 and ids[k - 1] == img)]
    assert collapsed == list(ref)
    # 3. Never on image or prompt tokens; answer_positions are t with mask[t + 1].
    if img is not None:
        assert not enc.answer_mask[enc.input_ids == img].any()
        assert int((enc.input_ids == img).sum()) > len(sample.images) > 0 or not sample.images
    assert torch.equal(enc.answer_positions, torch.nonzero(enc.answer_mask[1:]).flatten())
    assert not enc.answer_mask[0]


def test_image_token_counts_match_the_model(adapters, samples):
    # The forward raises if features != tokens; run every VLM on the two-image and multi samples in one batch.
    for f in VLM:
        ad = adapters[f]
        b = collate([encode_sample(samples[n][0], ad) for n in ("two_images", "multi", "text")],
                    ad.tokenizer.pad_token_id)
        with torch.no_grad():
            ad.forward_hidden(b, [0])
        assert b.answer_mask.sum() == sum(int(p.numel()) for p in b.answer_positions)
        assert (b.input_ids[b.attention_mask == 0] == ad.tokenizer.pad_token_id).all()
        assert not b.answer_mask[b.attention_mask == 0].any()
    qwen = adapters["qwen2_vl"]
    enc = encode_sample(samples["single"][0], qwen)
    grid = enc.model_inputs["image_grid_thw"][0]
    assert int((enc.input_ids == qwen.image_token_id).sum()) == int(grid.prod()) // 4  # merge 2x2


def test_collate_targets_are_next_tokens(adapters, samples):
    ad = adapters["qwen2_vl"]
    encs = [encode_sample(samples[n][0], ad) for n in ("single", "multi")]
    b = collate(encs, ad.tokenizer.pad_token_id)
    b_idx, t_idx = b.answer_index()
    assert torch.equal(b.answer_targets, b.input_ids[b_idx, t_idx + 1])
    assert b.answer_mask[b_idx, t_idx + 1].all()
    assert b.model_inputs["pixel_values"].shape[0] == sum(e.model_inputs["pixel_values"].shape[0] for e in encs)
    assert b.model_inputs["mm_token_type_ids"].shape == b.input_ids.shape


def _bad_cases(make_png):
    return {
        "placeholder": Sample("bad-ph", [Turn("user", "What is it?"), Turn("assistant", "x")], [make_png(5)]),
        "no_assistant": Sample("bad-na", [Turn("user", "<image>\nHi?")], [make_png(6)]),
        "unreadable": Sample("bad-img", [Turn("user", "<image>\nHi?"), Turn("assistant", "x")], [b"not an image"]),
        "too_long": Sample("bad-long", [Turn("user", "<image>\n" + "red " * 50), Turn("assistant", "x")],
                           [make_png(7)]),
    }


@pytest.mark.parametrize("case,reason", [("placeholder", "placeholder"), ("no_assistant", "no assistant turn"),
                                         ("unreadable", "unreadable image"), ("too_long", "max length 40")])
def test_bad_samples_error(adapters, make_png, case, reason):
    s = _bad_cases(make_png)[case]
    with pytest.raises(BadSampleError, match=reason) as info:
        encode_sample(s, adapters["qwen2_vl"], max_length=40)
    assert info.value.sample_id == s.id and s.id in str(info.value)


def test_images_for_text_only_model_is_bad(adapters, samples):
    with pytest.raises(BadSampleError, match="text-only"):
        encode_sample(samples["single"][0], adapters["qwen2"])


def test_bad_samples_skip_report(adapters, make_png, samples, tmp_path):
    report = BadSampleReport()
    policy = BadSamplePolicy("skip", report)
    cases = _bad_cases(make_png)
    out = [encode_sample(s, adapters["qwen2_vl"], max_length=40, policy=policy) for s in cases.values()]
    assert out == [None] * len(cases)
    assert encode_sample(samples["text"][0], adapters["qwen2_vl"], max_length=80, policy=policy) is not None
    assert report.ids == [s.id for s in cases.values()]
    lines = report.write(tmp_path / "bad.jsonl").read_text().splitlines()
    assert len(lines) == len(cases) and "max length" in lines[-1]
