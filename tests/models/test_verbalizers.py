"""Verbalizers: untrained == logit lens (every kind), save/load round trip, refusal of another model's verbalizers,
parameter counts (the paper's 269M for 7 verb-FFNs on Qwen2-VL-7B)."""

from __future__ import annotations

import json

import pytest
import torch

from vlsi.models import VerbalizerSet, collate, encode_sample, load_verbalizers, parameter_count
from vlsi.models.errors import VlsiError
from vlsi.models.verbalizers import verbalized_states


def _batch(ad, samples):
    return collate([encode_sample(samples[n][0], ad) for n in ("single", "multi", "text")], ad.tokenizer.pad_token_id)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "llama"])
@pytest.mark.parametrize("kind", ["verb-ffn", "mlp", "ffn", "decoder"])
def test_untrained_verbalizer_is_logit_lens(adapters, samples, family, kind):
    ad = adapters[family]
    batch = _batch(ad, samples) if family != "llama" else collate([encode_sample(samples["text"][0], ad)], 0)
    vs = VerbalizerSet.for_model(ad, [0, 2], kind=kind)
    with torch.no_grad():
        states, hid = verbalized_states(vs, ad, batch)
        ref = ad.model(**batch.model_kwargs(), output_hidden_states=True, use_cache=False)
    b, t = batch.answer_index()
    for i in (0, 2):
        lens = ad.lm_head(ad.final_norm(ref.hidden_states[i + 1][b, t]))[:, : ad.vocab_size]
        torch.testing.assert_close(ad.lm_head(states[i])[:, : ad.vocab_size], lens, rtol=1e-5, atol=1e-5)
        if kind != "decoder":
            torch.testing.assert_close(vs.logits(i, hid.layer_hidden[i], ad), lens, rtol=1e-5, atol=1e-5)
    # a trained (non-zero) verbalizer is not the identity: the test above can fail
    with torch.no_grad():
        for p in vs.parameters():
            p.add_(0.05 * torch.randn_like(p))
        moved, _ = verbalized_states(vs, ad, batch)
    assert not torch.allclose(moved[0], states[0], atol=1e-4)


def test_verb_ffn_formula(adapters):
    ad = adapters["qwen2"]
    vs = VerbalizerSet.for_model(ad, [1])
    blk = vs.blocks["1"]
    torch.nn.init.normal_(blk.down.weight)
    h = torch.randn(5, ad.hidden_size)
    ref = h + torch.nn.functional.silu(h @ blk.gate.weight.T) * (h @ blk.up.weight.T) @ blk.down.weight.T
    torch.testing.assert_close(vs(1, h), ref)
    assert all(m.weight.shape == (ad.hidden_size, ad.hidden_size) for m in (blk.gate, blk.up, blk.down))
    assert all(m.bias is None for m in (blk.gate, blk.up, blk.down))


@pytest.mark.parametrize("kind", ["verb-ffn", "decoder"])
def test_save_load_round_trip_and_refusal(adapters, tmp_path, kind):
    ad = adapters["qwen2_vl"]
    vs = VerbalizerSet.for_model(ad, [0, 2], kind=kind)
    with torch.no_grad():
        for p in vs.parameters():
            p.normal_()
    digest = vs.save(tmp_path / "v", ad.fingerprint())
    cfg = json.loads((tmp_path / "v" / "verbalizers.json").read_text())
    assert cfg["weights_sha256"] == digest and cfg["layers"] == [0, 2] and cfg["kind"] == kind
    back = load_verbalizers(tmp_path / "v", adapter=ad)
    assert back.weights_sha256 == digest
    for (k, a), (k2, b) in zip(vs.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # another model (different config / tokenizer) is refused, naming the fields
    with pytest.raises(VlsiError, match="config_hash"):
        load_verbalizers(tmp_path / "v", adapter=adapters["qwen2_5_vl"])
    with pytest.raises(VlsiError, match="family: 'qwen2_vl' != 'llava_onevision'"):
        load_verbalizers(tmp_path / "v", expect_fingerprint=adapters["llava_onevision"].fingerprint())
    # tampered weights are refused
    w = tmp_path / "v" / "verbalizers.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(VlsiError, match="sha256"):
        load_verbalizers(tmp_path / "v", adapter=ad)


def test_target_layer_range(adapters):
    ad = adapters["qwen2"]
    with pytest.raises(VlsiError, match="final layer"):
        VerbalizerSet.for_model(ad, [ad.num_layers - 1])
    with pytest.raises(VlsiError, match="unknown verbalizer kind"):
        VerbalizerSet.for_model(ad, [0], kind="lstm")


def test_parameter_counts_match_modules_and_paper(adapters):
    ad = adapters["qwen2"]
    for kind in ("verb-ffn", "mlp", "ffn", "decoder"):
        vs = VerbalizerSet.for_model(ad, [0, 1], kind=kind)
        tc = ad.text_config
        assert sum(p.numel() for p in vs.parameters()) == parameter_count(
            kind, ad.hidden_size, 2, ad.intermediate_size, num_heads=tc.num_attention_heads,
            num_kv_heads=tc.num_key_value_heads)
    # Paper: 7 verbalizers on the 7B student (d = 3584) = 269M parameters.
    assert parameter_count("verb-ffn", 3584, 7) == 7 * 3 * 3584 ** 2 == 269_746_176
