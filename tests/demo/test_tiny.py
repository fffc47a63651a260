"""The tiny-model factory: real architectures, downloaded-model layout, tiny sizes, padded vocab."""

from __future__ import annotations

import json

import pytest

from vlsi.demo.tiny import FAMILIES, build_tokenizer, parameter_count, write_tiny_model

TEXTS = ["What colour is the circle? red blue green yellow", "How many squares are there? 3 two one"] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=300)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_layout_and_size(tmp_path, tokenizer, family):
    from transformers import AutoConfig, AutoTokenizer

    path = write_tiny_model(tmp_path / family, family, tokenizer=tokenizer, size="test")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (path / name).is_file(), name
    if family in ("qwen2_vl", "qwen2_5_vl", "llava_onevision"):
        assert (path / "preprocessor_config.json").is_file()
    assert parameter_count(path) <= 1_000_000
    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    padded = config.get_text_config().vocab_size
    assert len(tok) < padded and padded % 64 == 0
    assert json.loads((path / "vlsi_tiny.json").read_text())["family"] == family


def test_tokenizer_is_deterministic_and_has_specials(tokenizer):
    again = build_tokenizer(TEXTS, vocab_size=300)
    assert again.get_vocab() == tokenizer.get_vocab()
    for token in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<image>"):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        assert tokenizer(token)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_unknown_family_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="supported"):
        write_tiny_model(tmp_path, "gpt2", tokenizer=tokenizer)
