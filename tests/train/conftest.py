"""Fixtures for the trainer tests: a tiny Qwen2-VL teacher/student pair sharing one tokenizer, the procedural VQA
data, random (non-identity) verbalizers for both, and a teacher cache written by ``vlsi-extract`` (its Python
entry point ``run_extract``; the CLI is exercised by the end-to-end test). Built once per session.

The student's padded LM-head rows are poisoned with huge weights: any code path letting padded vocab rows into a
softmax would blow up the KL and fail the loss/e2e checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FAMILY = "qwen2_vl"
TEACHER_LAYERS = [0, 1, 2]  # tl = 3 teacher targets (test-size models have 4 decoder layers)
STUDENT_LAYERS = [0, 1]  # ts = 2 student targets


def _poison_padded_rows(model_dir: Path, vocab_size: int) -> None:
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("lm_head.weight"))
    w = state[key].clone()
    assert w.shape[0] > vocab_size
    w[vocab_size:] = 50.0
    state[key] = w
    save_file(state, str(f), metadata={"format": "pt"})


def _sharpen_head(model_dir: Path, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("lm_head.weight"))
    state[key] = state[key] * factor
    save_file(state, str(f), metadata={"format": "pt"})


def _random_verbalizers(model_dir: Path, layers, out: Path, seed: int, scale: float = 0.2) -> Path:
    import torch

    from vlsi.models import VerbalizerSet, load_model

    adapter = load_model(model_dir, device="cpu")
    vs = VerbalizerSet.for_model(adapter, layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    vs.save(out, adapter.fingerprint())
    return out


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """dict: tok, teacher, student, teacher_verb, student_verb, train/val data, cache (train), val_cache."""
    from vlsi.demo.tiny import build_tokenizer, write_tiny_model
    from vlsi.demo.vqa import generate_vqa
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import run_extract

    root = tmp_path_factory.mktemp("train_env")
    tok = build_tokenizer(family=FAMILY)
    teacher = write_tiny_model(root / "teacher", FAMILY, tokenizer=tok, size="test", seed=1)
    student = write_tiny_model(root / "student", FAMILY, tokenizer=tok, size="test", seed=2)
    _poison_padded_rows(student, len(tok))
    _sharpen_head(teacher, 40.0)  # a peaked teacher: random tiny models are near-uniform, KL would be ~0
    splits = generate_vqa(root / "data", n_train=16, n_val=8, n_test=2, seed=0, image_size=56)
    tverb = _random_verbalizers(teacher, TEACHER_LAYERS, root / "teacher_verb", seed=3)
    sverb = _random_verbalizers(student, STUDENT_LAYERS, root / "student_verb", seed=4, scale=0.05)
    caches = {}
    for split in ("train", "val"):
        url = str(root / f"cache_{split}")
        run_extract(ExtractConfig(teacher=str(teacher), verbalizers=str(tverb), data=str(splits[split]), out=url,
                                  top_k=16, device="cpu", progress=False, batch_size=4))
        caches[split] = url
    return {"root": root, "tok": tok, "teacher": teacher, "student": student, "teacher_verb": tverb,
            "student_verb": sverb, "train": splits["train"], "val": splits["val"], "cache": caches["train"],
            "val_cache": caches["val"], "vocab_size": len(tok)}


def train_config(env, out, **kw):
    """A TrainConfig for the tiny pair: interact only from the given student verbalizers, CPU, no progress bar."""
    from vlsi.train.config import TrainConfig

    base = dict(cache=env["cache"], student=str(env["student"]), data=str(env["train"]), out=str(out),
                student_verbalizers=str(env["student_verb"]), stages=("interact",), steps=2, batch_size=4,
                lr=1e-3, min_lr=1e-4, lora_rank=4, device="cpu", progress=False, chunk_tokens=7)
    base.update(kw)
    return TrainConfig(**base)
