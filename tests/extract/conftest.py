"""Fixtures for the extraction tests: tiny random teachers with poisoned padded vocab rows, random (non-identity)
verbalizers saved for them, and small datasets covering single-turn, multi-turn, two-image and text-only samples.

Padded LM-head rows (``vocab_size <= row < padded_vocab_size``) are set to huge weights: if any code path let them
into the softmax or the top-k, they would dominate every distribution and the reference comparison would fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from extract_testutil import make_records, write_data

TEXTS = [
    "What colour is the shape? The shape is red. It is a blue square.",
    "How many circles are there? There are two circles and three squares.",
    "Is the green triangle on the left or the right? It is on the left side.",
    "Compare the two images. Both shapes are yellow. No, they differ.",
    "What is two plus three? The answer is five. Mixing red and yellow makes orange.",
]
VERB_LAYERS = [0, 2]


def _poison_padded_rows(model_dir: Path, vocab_size: int) -> None:
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("lm_head.weight"))
    w = state[key].clone()
    assert w.shape[0] > vocab_size, "tiny model must have padded vocab rows"
    w[vocab_size:] = 50.0  # logits ~ 50 * sum(x): far above any real row
    state[key] = w
    save_file(state, str(f), metadata={"format": "pt"})


def _write_images(root: Path) -> None:
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    from extract_testutil import COLOURS

    for name, rgb in COLOURS.items():
        img = Image.new("RGB", (56, 56), (255, 255, 255))
        for x in range(14, 42):
            for y in range(14, 42):
                img.putpixel((x, y), rgb)
        img.save(root / "img" / f"{name}.png")


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory):
    """Per family: teacher dir, verbalizer dir (random, non-identity), data file. Built lazily, once."""
    cache: dict[str, dict] = {}
    root = tmp_path_factory.mktemp("extract_env")

    def get(family: str) -> dict:
        if family in cache:
            return cache[family]
        import torch

        from vlsi.demo.tiny import build_tokenizer, write_tiny_model
        from vlsi.models import VerbalizerSet, load_model

        d = root / family
        tok = build_tokenizer(TEXTS, vocab_size=300, family=family)
        teacher = write_tiny_model(d / "teacher", family, tokenizer=tok, size="test", seed=1)
        _poison_padded_rows(teacher, len(tok))
        adapter = load_model(teacher, device="cpu")
        vs = VerbalizerSet.for_model(adapter, VERB_LAYERS)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in vs.parameters():  # non-zero everywhere: a real verbalizer, not the logit-lens identity
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        vs.save(d / "verb", adapter.fingerprint())
        _write_images(d)
        vlm = family != "qwen2"
        data = write_data(d / "data.json", make_records(12 if vlm else 10, vlm=vlm))
        cache[family] = {"root": d, "teacher": teacher, "verb": d / "verb", "data": data, "adapter": adapter,
                         "vocab_size": len(tok), "layers": list(VERB_LAYERS)}
        return cache[family]

    return get
