"""Per-layer verbalized answers == a no-cache reference loop; the `layers` command writes its files."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import random_verbalizers, reference_greedy

from vlsi.eval.cli import main
from vlsi.eval.layers import layer_answers
from vlsi.eval.prompting import encode_prompt


@pytest.mark.parametrize("family,kind", [("qwen2_vl", "verb-ffn"), ("llava_onevision", "decoder"), ("qwen2", "mlp")])
def test_layer_answers_match_reference(adapters, samples, family, kind):
    ad = adapters[family]
    vs = random_verbalizers(ad, [0, 2], kind=kind)
    s = next(x for x in samples if (family == "qwen2") == (not x.images))
    got = layer_answers(ad, vs, s, max_new_tokens=5)
    assert [a.layer for a in got] == [0, 2, "final"]
    enc = encode_prompt(s, ad)
    for a in got:
        if a.layer == "final":
            ref = reference_greedy(ad, enc, 5)
        else:
            ref = reference_greedy(ad, enc, 5, layer=a.layer, verbalizers=vs)
        assert a.token_ids == ref, (family, a.layer)
    # random verbalizers make the layers disagree: the view is not the same answer repeated
    assert len({tuple(a.token_ids) for a in got}) > 1


def test_untrained_verbalizer_is_the_logit_lens_on_the_last_layer(adapters, samples):
    """An untrained verb-ffn is the identity, so on the last decoder layer it must reproduce the model's own
    greedy answer (final norm + head on the last hidden state)."""
    from vlsi.models.verbalizers import VerbalizerSet

    ad = adapters["qwen2_vl"]
    last = ad.num_layers - 1
    vs = VerbalizerSet(layers=[last], hidden_size=ad.hidden_size)
    got = layer_answers(ad, vs, samples[0], max_new_tokens=6)
    assert got[0].token_ids == got[1].token_ids


def _save_random_verbalizers(adapter, path, layers, seed):
    vs = random_verbalizers(adapter, layers, seed=seed)
    vs.save(path, adapter.fingerprint())
    return path


def test_layers_command_writes_json_and_png(tiny_dirs, adapters, vqa, samples, tmp_path):
    v1 = _save_random_verbalizers(adapters["qwen2_vl"], tmp_path / "v1", [0, 1, 2], 1)
    v2 = _save_random_verbalizers(adapters["llava_onevision"], tmp_path / "v2", [1, 2], 2)
    sid = samples[1].id
    out, png = tmp_path / "layers.json", tmp_path / "layers.png"
    r = CliRunner().invoke(main, [
        "layers", "--model", str(tiny_dirs["qwen2_vl"]), "--verbalizers", str(v1), "--data", str(vqa["test"]),
        "--sample", sid, "--compare", str(tiny_dirs["llava_onevision"]), "--compare-verbalizers", str(v2),
        "--max-new-tokens", "4", "--out", str(out), "--png", str(png), "--device", "cpu",
    ])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["sample_id"] == sid and res["gold"] == samples[1].meta["answer"]
    assert [a["layer"] for a in res["views"][0]["answers"]] == [0, 1, 2, "final"]
    assert [a["layer"] for a in res["views"][1]["answers"]] == [1, 2, "final"]
    # the command's answers are layer_answers' answers
    from vlsi.models import load_verbalizers

    direct = layer_answers(adapters["qwen2_vl"], load_verbalizers(v1, adapter=adapters["qwen2_vl"]), samples[1],
                           max_new_tokens=4)
    assert [a["token_ids"] for a in res["views"][0]["answers"]] == [a.token_ids for a in direct]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final" in r.output and sid in r.output


def test_layers_command_errors(tiny_dirs, adapters, vqa, tmp_path):
    v1 = _save_random_verbalizers(adapters["qwen2_vl"], tmp_path / "v1", [0], 1)
    base = ["layers", "--model", str(tiny_dirs["qwen2_vl"]), "--verbalizers", str(v1), "--data", str(vqa["test"])]
    r = CliRunner().invoke(main, base + ["--sample", "no-such-id"])
    assert r.exit_code == 2 and "error:" in r.output and "no-such-id" in r.output
    r = CliRunner().invoke(main, base + ["--sample", "test-000000", "--compare", str(tiny_dirs["qwen2"])])
    assert r.exit_code == 2 and "go together" in r.output
    # verbalizers of another model are refused by the fingerprint check
    r = CliRunner().invoke(main, ["layers", "--model", str(tiny_dirs["qwen2"]), "--verbalizers", str(v1),
                                  "--data", str(vqa["test"]), "--sample", "test-000000"])
    assert r.exit_code == 2 and "trained for another model" in r.output


def test_bf16_model_with_fp32_verbalizers(tiny_dirs, samples):
    """The GPU setting (model in bf16, verbalizers kept in fp32) runs and decodes real-vocab tokens."""
    import torch

    from vlsi.models import load_model

    ad = load_model(tiny_dirs["qwen2_vl"], device="cpu", dtype=torch.bfloat16)
    vs = random_verbalizers(ad, [0, 2])
    assert next(vs.parameters()).dtype == torch.float32
    got = layer_answers(ad, vs, samples[0], max_new_tokens=3)
    assert [a.layer for a in got] == [0, 2, "final"]
    assert all(0 <= t < ad.vocab_size for a in got for t in a.token_ids)
