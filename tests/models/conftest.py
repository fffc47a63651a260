"""Shared fixtures for tests/models: tiny random models of every supported family (one tokenizer), embedded-like
VQA data, and hand-made samples with known answers."""

from __future__ import annotations

import io

import numpy as np
import pytest

VLM = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
TEXT = ("qwen2", "llama")


def png(seed: int, size=(56, 56)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def make_png():
    return png


@pytest.fixture(scope="session")
def tokenizer():
    from vlsi.demo.tiny import build_tokenizer

    return build_tokenizer()  # trained on the embedded VQA corpus


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    from vlsi.demo.tiny import FAMILIES, write_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {f: write_tiny_model(root / f, f, tokenizer=tokenizer, size="test") for f in FAMILIES}


@pytest.fixture(scope="session")
def adapters(tiny_dirs):
    from vlsi.models import load_model

    return {f: load_model(d, device="cpu") for f, d in tiny_dirs.items()}


@pytest.fixture(scope="session")
def samples():
    """name -> (Sample, [answers in order])."""
    from vlsi.models.data import Sample, Turn

    return {
        "single": (Sample("s1", [Turn("user", "<image>\nWhat colour is the circle?"), Turn("assistant", "red")],
                          [png(0)]), ["red"]),
        "multi": (Sample("s2", [Turn("user", "<image>\nHow many circles are there?"), Turn("assistant", "3"),
                                Turn("user", "What colour is the square?"), Turn("assistant", "blue square")],
                         [png(1, (64, 48))]), ["3", "blue square"]),
        "text": (Sample("s3", [Turn("system", "Answer briefly."), Turn("user", "What is 2 + 3?"),
                               Turn("assistant", "5")], []), ["5"]),
        "two_images": (Sample("s4", [Turn("user", "<image>\n<image>\nAre the shapes the same colour?"),
                                     Turn("assistant", "yes")], [png(2), png(3, (48, 72))]), ["yes"]),
    }


@pytest.fixture(scope="session")
def vqa_data(tmp_path_factory):
    from vlsi.demo.vqa import generate_vqa

    root = tmp_path_factory.mktemp("vqa")
    return generate_vqa(root, n_train=32, n_val=4, n_test=4, seed=0, image_size=56)


@pytest.fixture(scope="session")
def sharp_qwen_dir(tmp_path_factory, tokenizer):
    """A tiny Qwen2-VL whose final norm is scaled up: a random head at init std 0.02 can barely move the softmax
    (logits ~0.1), so no verbalizer could lower the loss; a sharper head makes the step's learning visible."""
    from safetensors.torch import load_file, save_file

    from vlsi.demo.tiny import write_tiny_model

    d = write_tiny_model(tmp_path_factory.mktemp("sharp") / "qwen2_vl", "qwen2_vl", tokenizer=tokenizer, seed=1)
    sd = load_file(str(d / "model.safetensors"))
    key = next(k for k in sd if k.endswith("norm.weight") and "layers" not in k and "visual" not in k)
    sd[key] = sd[key] * 30
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d
