"""Verbalization of a frozen model spread over devices (``vlsi-verbalize --device-map auto``).

This machine has no second accelerator, so "two devices" are made the way accelerate itself makes them on one
host: an explicit device map puts the embeddings, layers 0-1, the final norm and the LM head on ``cpu`` and layers
2-3 on ``disk`` (offloaded: their weights live in an offload folder as memory maps, the parameters are ``meta``
tensors, and accelerate's hooks load them for each forward). So the run goes through accelerate's dispatch and
hooks exactly as a multi-GPU teacher does, and the verbalizers of the offloaded layers are placed from the hooks'
execution device; the test checks that this changes nothing in training (losses and trained weights bitwise equal
to the one-device run). Where a verbalizer goes when its layer runs on ANOTHER device is checked with a stand-in
accelerate hook whose execution device is ``meta`` (no computation needed to see the placement).
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from vlsi.common.errors import ConfigError

LAYERS = [0, 2]  # one verbalizer on a cpu layer, one on an offloaded layer


def _split_map() -> dict:
    lm = "model.language_model"
    return {"model.visual": "cpu", f"{lm}.embed_tokens": "cpu", f"{lm}.layers.0": "cpu", f"{lm}.layers.1": "cpu",
            f"{lm}.layers.2": "disk", f"{lm}.layers.3": "disk", f"{lm}.norm": "cpu", f"{lm}.rotary_emb": "cpu",
            "lm_head": "cpu"}


def _cfg(model, data, out, **kw):
    from vlsi.train.config import VerbalizeConfig

    base = dict(model=str(model), data=str(data), out=str(out), layers=LAYERS, batch_size=4, steps=3, lr=0.05,
                progress=False, device="cpu")
    return VerbalizeConfig(**{**base, **kw})


def test_split_model_trains_verbalizers_like_one_device(sharp_qwen_dir, vqa_data, tmp_path, monkeypatch):
    import vlsi.models.adapter as adapter_mod
    from vlsi.train.recipe import run_verbalize

    one = run_verbalize(_cfg(sharp_qwen_dir, vqa_data["train"], tmp_path / "one"))

    real_load, seen = adapter_mod.load_model, {}

    def split_load(name, **kw):  # --device-map auto on this 1-device host -> the explicit cpu + disk split
        assert kw.get("device_map") == "auto"
        kw.update(device_map=_split_map(), offload_folder=str(tmp_path / "offload"))
        seen["adapter"] = ad = real_load(name, **kw)
        return ad

    monkeypatch.setattr(adapter_mod, "load_model", split_load)
    split = run_verbalize(_cfg(sharp_qwen_dir, vqa_data["train"], tmp_path / "split", device_map="auto"))

    ad = seen["adapter"]
    assert set(ad.model.hf_device_map.values()) == {"cpu", "disk"}
    assert ad.decoder_layers[2].mlp.up_proj.weight.device.type == "meta"  # really offloaded: hooks load it
    assert [str(ad.layer_device(i)) for i in range(4)] == ["cpu"] * 4  # accelerate runs offloaded layers on cpu
    assert one["finished"] and split["finished"]
    assert split["last_loss_per_layer"] == one["last_loss_per_layer"]

    def losses(d):
        return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "split") == losses(tmp_path / "one")
    a = load_file(str(tmp_path / "one" / "verbalizers.safetensors"))
    b = load_file(str(tmp_path / "split" / "verbalizers.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_verbalizer_is_placed_on_its_layers_device(tiny_dirs):
    """A layer dispatched to another device (accelerate hook, execution device ``meta`` here) gets its verbalizer
    there; the others stay on the model's device; the states handed to the head come back on the head's device."""
    from vlsi.models import VerbalizerSet, load_model

    ad = load_model(tiny_dirs["qwen2_vl"], device="cpu")  # a private copy: the hook below must not leak
    ad.decoder_layers[2]._hf_hook = types.SimpleNamespace(execution_device=torch.device("meta"))
    assert str(ad.layer_device(2)) == "meta" and str(ad.layer_device(0)) == "cpu"
    vs = VerbalizerSet.for_model(ad, LAYERS)
    assert vs.device_of(0).type == "cpu" and vs.device_of(2).type == "meta"
    assert {p.device.type for p in vs.blocks["2"].parameters()} == {"meta"}
    del ad.decoder_layers[2]._hf_hook
    vs = VerbalizerSet.for_model(ad, LAYERS)
    assert {p.device.type for p in vs.parameters()} == {"cpu"}


def test_cli_device_map_auto_bf16_runs_on_cpu(tiny_dirs, vqa_data, tmp_path):
    from vlsi.train.cli import verbalize

    out = tmp_path / "v"
    args = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(vqa_data["train"]), "--out", str(out),
            "--layers", "0,2", "--steps", "2", "--batch-size", "2", "--device-map", "auto", "--dtype", "bf16",
            "--max-memory", "cpu:2GiB", "--no-progress", "--json"]
    r = CliRunner().invoke(verbalize, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["finished"] and summary["step"] == 2
    losses = summary["last_loss_per_layer"]
    assert set(losses) == {"0", "2"} and all(0 < v < 100 for v in losses.values())
    saved = load_file(str(out / "verbalizers.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())  # fp32 master weights over a bf16 model
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["device_map"] == "auto" and cfg["max_memory"] == {"cpu": "2GiB"} and cfg["dtype"] == "bf16"


def test_max_memory_parsing_and_refusals():
    from vlsi.common.config import parse_max_memory
    from vlsi.train.config import VerbalizeConfig

    assert parse_max_memory("0:70GiB,1:70GiB,cpu:200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    assert parse_max_memory(("0:70", "cuda:1:500mb")) == {0: "70GiB", 1: "500MB"}
    assert parse_max_memory({0: 60, "cpu": "1.5GiB"}) == {0: "60GiB", "cpu": "1.5GiB"}
    for bad in ("0", "x:3GiB", "0:lots", "0:1TB"):
        with pytest.raises(ConfigError, match="--max-memory"):
            parse_max_memory(bad)
    with pytest.raises(ConfigError, match="--max-memory needs --device-map auto"):
        VerbalizeConfig(model="m", data="d", out="o", max_memory={"cpu": "1GiB"})
    with pytest.raises(ConfigError, match="--device-map"):
        VerbalizeConfig(model="m", data="d", out="o", device_map="balanced")
