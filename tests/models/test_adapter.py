"""Adapters: hooks == hidden_states[i+1] for every family, final_hidden @ head == logits, presets, errors,
processors without torchvision."""

from __future__ import annotations

import json

import pytest
import torch

from vlsi.models import PRESETS, collate, encode_sample, load_model, resolve_model
from vlsi.models.errors import VlsiError

VLM = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
TEXT = ("qwen2", "llama")


def _batch(adapter, samples):
    names = ["single", "multi", "text", "two_images"] if adapter.family in VLM else ["text"]
    encs = [encode_sample(samples[n][0], adapter) for n in names]
    return collate(encs, adapter.tokenizer.pad_token_id)


@pytest.mark.parametrize("family", VLM + TEXT)
def test_hooks_equal_output_hidden_states(adapters, samples, family):
    ad = adapters[family]
    batch = _batch(ad, samples)
    layers = [0, 2, ad.num_layers - 1]
    with torch.no_grad():
        out = ad.forward_hidden(batch, layers)
        ref = ad.model(**batch.model_kwargs(), output_hidden_states=True, use_cache=False)
    b, t = batch.answer_index()
    assert sorted(out.layer_hidden) == layers
    for i in layers[:-1]:
        torch.testing.assert_close(out.layer_hidden[i], ref.hidden_states[i + 1][b, t], rtol=0, atol=0)
    # transformers stores the LAST entry after the final norm; the hook gives the layer output before it.
    last = layers[-1]
    torch.testing.assert_close(ad.final_norm(out.layer_hidden[last]), ref.hidden_states[last + 1][b, t],
                               rtol=0, atol=0)
    torch.testing.assert_close(out.final_hidden, ref.hidden_states[-1][b, t], rtol=0, atol=0)
    torch.testing.assert_close(ad.lm_head(out.final_hidden), ref.logits[b, t], rtol=1e-5, atol=1e-5)
    assert out.row_counts == [int(p.numel()) for p in batch.answer_positions]
    # rows="all": every non-padding position, in order
    with torch.no_grad():
        allrows = ad.forward_hidden(batch, [1], rows="all")
    bb, tt = batch.attention_mask.nonzero(as_tuple=True)
    torch.testing.assert_close(allrows.layer_hidden[1], ref.hidden_states[2][bb, tt], rtol=0, atol=0)


def test_forward_hidden_supports_autograd_and_leaves_no_hooks(adapters, samples):
    ad = adapters["qwen2_vl"]
    batch = _batch(ad, samples)
    emb = ad.model.get_input_embeddings().weight
    hooks_before = [len(layer._forward_hooks) for layer in ad.decoder_layers]  # transformers keeps its own
    emb.requires_grad_(True)
    try:
        out = ad.forward_hidden(batch, [1])
        out.layer_hidden[1].sum().backward()
        assert emb.grad is not None and emb.grad.abs().sum() > 0
    finally:
        emb.requires_grad_(False)
        emb.grad = None
    assert [len(layer._forward_hooks) for layer in ad.decoder_layers] == hooks_before
    with pytest.raises(VlsiError, match="out of range"):
        ad.forward_hidden(batch, [ad.num_layers])


@pytest.mark.parametrize("family", VLM + TEXT)
def test_uniform_accessors_and_fingerprint(adapters, family):
    ad = adapters[family]
    assert ad.num_layers == len(ad.decoder_layers) == 4
    assert ad.hidden_size == ad.final_norm.weight.shape[0]
    assert ad.vocab_size == len(ad.tokenizer) < ad.padded_vocab_size == ad.lm_head.weight.shape[0]
    assert ad.dtype == torch.float32 and ad.device.type == "cpu"
    assert not any(p.requires_grad for p in ad.model.parameters())
    fp = ad.fingerprint()
    assert fp["family"] == family and fp["num_layers"] == 4 and len(fp["config_hash"]) == 64
    json.dumps(fp)  # JSON-able
    if family in VLM:
        assert ad.image_token_id is not None and fp["processor"]


def test_processors_load_without_torchvision(adapters):
    try:
        import torchvision  # noqa: F401

        has_tv = True
    except Exception:
        has_tv = False
    for f in VLM:
        ip = adapters[f].image_processor
        assert ip is not None
        if not has_tv:
            assert type(ip).__name__.endswith("Pil"), type(ip).__name__


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(VlsiError, match="unsupported model_type 'gpt2'.*qwen2_vl.*llava_onevision.*llama"):
        load_model(tmp_path)


def test_presets_target_layers():
    assert PRESETS["qwen2-vl-7b"].target_layers == (2, 6, 10, 14, 18, 22, 26)
    assert PRESETS["qwen2-vl-2b"].target_layers == (2, 6, 10, 14, 18, 22, 26)
    assert PRESETS["qwen2-vl-72b"].target_layers == tuple(range(2, 79, 4)) and len(PRESETS["qwen2-vl-72b"].target_layers) == 20
    assert PRESETS["llava-ov-7b"].target_layers == (4, 12, 20)
    assert PRESETS["llava-ov-0.5b"].target_layers == (4, 12, 20)
    assert PRESETS["llava-ov-72b"].target_layers == (10, 30, 50, 70)
    assert PRESETS["qwen2-vl-7b"].hub_id == "Qwen/Qwen2-VL-7B-Instruct"
    assert PRESETS["llava-ov-0.5b"].hub_id == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"


def test_resolve_model(tmp_path, monkeypatch, tiny_dirs):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d, preset = resolve_model(tiny_dirs["qwen2"])
    assert d == tiny_dirs["qwen2"] and preset is None
    with pytest.raises(VlsiError, match=r"huggingface-cli download Qwen/Qwen2-VL-7B-Instruct"):
        resolve_model("qwen2-vl-7b")
    with pytest.raises(VlsiError, match="not a model directory, preset"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlsiError, match="no config.json"):
        resolve_model(tmp_path / "empty")
