"""Teacher and student heads padded to DIFFERENT sizes, both larger than the tokenizer, through extract + interact.

Real pairs do this: Qwen2-VL-72B pads its head to 152,064 rows, Qwen2-VL-2B to 151,936, and the tokenizer has
151,646 entries. Here at test width: tokenizer 497 (the demo's), teacher head 640 rows, student head 576 rows, the
padded rows of both poisoned with huge weights (a padded row entering a softmax would blow the KL up). The cache
must record the real vocab (and the teacher's padding), no top-k id may be a padded row, and the student must
train from it over its own, differently padded head.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import _random_verbalizers as _verbalizers  # the trainer fixtures' random verbalizers

TEACHER_PADDED, STUDENT_PADDED = 640, 576


def _write(out: Path, tok, *, padded: int, seed: int, poison: float) -> Path:
    """A tiny Qwen2-VL (``vlsi.demo.tiny``'s config, processor, tokenizer) with ``padded`` embedding/head rows."""
    import torch

    from vlsi.demo.tiny import make_config, make_image_processor, model_class

    cfg = make_config("qwen2_vl", "test", tok)
    cfg.text_config.vocab_size = padded
    cfg.vocab_size = padded
    torch.manual_seed(seed)
    model = model_class("qwen2_vl")(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # a peaked head: random tiny heads are near-uniform
        model.lm_head.weight[len(tok):] = poison
    model.generation_config.eos_token_id = cfg.text_config.eos_token_id
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    make_image_processor("qwen2_vl").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from vlsi.demo.tiny import build_tokenizer
    from vlsi.demo.vqa import generate_vqa

    root = tmp_path_factory.mktemp("padded")
    tok = build_tokenizer(family="qwen2_vl")
    assert len(tok) < STUDENT_PADDED < TEACHER_PADDED
    teacher = _write(root / "teacher", tok, padded=TEACHER_PADDED, seed=1, poison=50.0)
    student = _write(root / "student", tok, padded=STUDENT_PADDED, seed=2, poison=-50.0)
    splits = generate_vqa(root / "data", n_train=8, n_val=1, n_test=1, seed=0, image_size=56)
    return {"root": root, "tok": tok, "teacher": teacher, "student": student, "data": splits["train"],
            "tverb": _verbalizers(teacher, [0, 2], root / "tverb", seed=3, scale=0.2),
            "sverb": _verbalizers(student, [0, 1], root / "sverb", seed=4, scale=0.05)}


def test_extract_then_interact_with_differently_padded_heads(pair, tmp_path):
    from vlsi.cache_format import open_cache
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import run_extract
    from vlsi.models import load_model
    from vlsi.train.config import TrainConfig
    from vlsi.train.recipe import run

    vocab = len(pair["tok"])
    assert load_model(pair["teacher"], device="cpu").padded_vocab_size == TEACHER_PADDED
    assert load_model(pair["student"], device="cpu").padded_vocab_size == STUDENT_PADDED

    url = str(tmp_path / "cache")
    s = run_extract(ExtractConfig(teacher=str(pair["teacher"]), verbalizers=str(pair["tverb"]), data=str(pair["data"]),
                                  out=url, top_k=16, device="cpu", progress=False, batch_size=4,
                                  encoding="exact"))
    assert s["written"] == 8
    reader = open_cache(url)
    fp = reader.fingerprint
    assert (fp.vocab_size, fp.padded_vocab_size) == (vocab, TEACHER_PADDED)
    for sid in reader.sample_ids:
        rec = reader.get(sid)
        assert rec.topk_ids.max() < vocab  # never a padded row (they hold +50: they would win every top-k)
        assert np.all(np.isfinite(rec.topk_logprobs)) and np.all(rec.topk_logprobs <= 0)

    out = tmp_path / "train"
    summary = run(TrainConfig(cache=url, student=str(pair["student"]), data=str(pair["data"]), out=str(out),
                              student_verbalizers=str(pair["sverb"]), stages=("interact",), steps=3, batch_size=4,
                              lr=1e-3, min_lr=1e-4, lora_rank=4, device="cpu", progress=False, chunk_tokens=5))
    assert summary["stages"]["interact"]["finished"] and summary["final"]
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        # a padded student row (-50 weights) or teacher row (+50) in a softmax would make these huge or NaN
        assert math.isfinite(r["loss"]) and 0 <= r["loss"] < 50, r["loss"]
        assert all(math.isfinite(v) and 0 <= v < 50 for v in r["layer_kl"] + [r["final_kl"]])
    assert log[-1]["loss"] < log[0]["loss"] * 1.5
