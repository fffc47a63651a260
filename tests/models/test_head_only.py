"""``load_head_only``: the same fingerprint, final norm and LM head as the full ``load_model`` adapter, without the
decoder. Checked on tiny random models whose norm and head weights are random (not the ones/normal init, so that
reading the wrong tensor or skipping the norm weight would show), sharded checkpoints, tied embeddings and bf16."""

from __future__ import annotations

import json

import pytest
import torch

from vlsi.models import load_model
from vlsi.models.errors import VlsiError
from vlsi.models.head_only import checkpoint_key_map, load_head_only


def _write(root, family, tokenizer, *, shard: bool = False, tied: bool = False, seed: int = 0):
    """A tiny ``family`` model with every parameter random; ``shard`` writes several files + the index."""
    from vlsi.demo.tiny import make_config, model_class

    cfg = make_config(family, "test", tokenizer)
    if tied:
        cfg.tie_word_embeddings = True
        cfg.get_text_config().tie_word_embeddings = True
    torch.manual_seed(seed)
    model = model_class(family)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    out = root / f"{family}{'-shard' if shard else ''}{'-tied' if tied else ''}"
    model.save_pretrained(out, max_shard_size="100KB" if shard else "5GB")
    tokenizer.save_pretrained(out)
    from vlsi.demo.tiny import make_image_processor

    proc = make_image_processor(family)
    if proc is not None:
        proc.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok():
    from vlsi.demo.tiny import build_tokenizer

    return build_tokenizer(vocab_size=300, family="qwen2_vl")


def _assert_same(full, head, dtype=torch.float32):
    assert head.fingerprint() == full.fingerprint()
    assert (head.num_layers, head.hidden_size, head.vocab_size, head.padded_vocab_size, head.family) == (
        full.num_layers, full.hidden_size, full.vocab_size, full.padded_vocab_size, full.family)
    assert head.vocab_size < head.padded_vocab_size  # the tiny models pad their head: the distinction is exercised
    assert type(head.final_norm) is type(full.final_norm)
    assert head.lm_head.bias is None and not head.lm_head.weight.requires_grad
    assert head.lm_head.weight.dtype == dtype and head.dtype == dtype
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, full.hidden_size, generator=g).to(dtype) * 3
    with torch.no_grad():
        assert torch.equal(head.final_norm(x), full.final_norm(x))
        assert torch.equal(head.lm_head(head.final_norm(x)), full.lm_head(full.final_norm(x)))


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl", "llava_onevision"])
def test_head_only_equals_full_model(tmp_path, tok, family):
    d = _write(tmp_path, family, tok, shard=family == "qwen2_vl")
    full, head = load_model(d, device="cpu"), load_head_only(d, device="cpu")
    _assert_same(full, head)
    assert head.is_vlm == (family != "qwen2")
    # the norm weight was really read (random, not the ones init)
    assert not torch.allclose(head.final_norm.weight, torch.ones_like(head.final_norm.weight))


def test_sharded_index_reads_only_head_and_norm(tmp_path, tok):
    d = _write(tmp_path, "qwen2_vl", tok, shard=True)
    files = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(files) > 2  # really sharded
    key_map = checkpoint_key_map(d)
    assert set(key_map.values()) == {d / f for f in files}


def test_tied_embeddings_use_the_embedding_matrix(tmp_path, tok):
    d = _write(tmp_path, "qwen2", tok, tied=True)
    full, head = load_model(d, device="cpu"), load_head_only(d, device="cpu")
    _assert_same(full, head)
    torch.testing.assert_close(head.lm_head.weight, full.model.get_input_embeddings().weight, rtol=0, atol=0)


def test_bf16_fingerprint_matches_for_a_vlm(tmp_path, tok):
    # from_pretrained records the load dtype in the VLM's sub-configs, which the config hash sees
    d = _write(tmp_path, "qwen2_vl", tok)
    full = load_model(d, device="cpu", dtype=torch.bfloat16)
    head = load_head_only(d, device="cpu", dtype=torch.bfloat16)
    _assert_same(full, head, torch.bfloat16)


def test_missing_weights_are_one_line_errors(tmp_path, tok):
    d = _write(tmp_path, "qwen2", tok)
    (d / "model.safetensors").rename(d / "other.bin")
    with pytest.raises(VlsiError, match="no model.safetensors") as e:
        load_head_only(d, device="cpu")
    assert "\n" not in str(e.value)
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, str(d / "model.safetensors"))
    with pytest.raises(VlsiError, match="no final norm weight tensor"):
        load_head_only(d, device="cpu")
