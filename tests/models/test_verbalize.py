"""The verbalization step: loss falls on embedded-like data, only verbalizers change, exact resume, bad samples,
CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from vlsi.models import VerbalizerSet, collate, encode_sample, load_model
from vlsi.models.data import read_dataset
from vlsi.train.cli import verbalize as main
from vlsi.train.config import VerbalizeConfig
from vlsi.train.recipe import run_verbalize as run
from vlsi.train.stages import verbalization_loss


def _cfg(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), out=str(out), layers=[0, 1, 2], batch_size=4, lr=0.1,
                progress=False, device="cpu")
    return VerbalizeConfig(**{**base, **kw})


def test_loss_falls_on_embedded_data(sharp_qwen_dir, vqa_data, tmp_path):
    summary = run(_cfg(sharp_qwen_dir, vqa_data["train"], tmp_path / "v", steps=24))
    first, last = summary["first_loss_per_layer"], summary["last_loss_per_layer"]
    for layer in ("0", "1", "2"):
        assert last[layer] < 0.6 * first[layer], (layer, first[layer], last[layer])
    log = [json.loads(x) for x in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 25))
    assert all(r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 for r in log)
    assert log[-1]["lr"] < log[0]["lr"]  # cosine decay
    assert (tmp_path / "v" / "verbalizers.safetensors").is_file() and summary["verbalizer_sha256"]


def test_only_verbalizer_parameters_change(sharp_qwen_dir, vqa_data):
    ad = load_model(sharp_qwen_dir, device="cpu")
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    vs = VerbalizerSet.for_model(ad, [0, 2])
    v_before = {k: v.clone() for k, v in vs.state_dict().items()}
    opt = torch.optim.AdamW(vs.parameters(), lr=1e-2)
    samples = list(read_dataset(vqa_data["train"]))[:8]
    batch = collate([encode_sample(s, ad) for s in samples], ad.tokenizer.pad_token_id)
    for _ in range(3):
        opt.zero_grad()
        loss, _ = verbalization_loss(vs, ad, batch)
        (loss / batch.num_answer_rows).backward()
        opt.step()
    assert all(p.grad is None for p in ad.model.parameters())  # backbone under no_grad, head detached
    for k, v in ad.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = [k for k, v in vs.state_dict().items() if not torch.equal(v, v_before[k])]
    assert len(changed) == len(v_before)


def test_resume_reproduces_uninterrupted_run(sharp_qwen_dir, vqa_data, tmp_path):
    kw = dict(steps=6, grad_accum=2, batch_size=3, warmup_steps=1, save_every=2)
    run(_cfg(sharp_qwen_dir, vqa_data["train"], tmp_path / "a", **kw))
    part = run(_cfg(sharp_qwen_dir, vqa_data["train"], tmp_path / "b", stop_after=3, **kw))
    assert not part["finished"] and part["step"] == 3
    with pytest.raises(Exception, match="--resume"):
        run(_cfg(sharp_qwen_dir, vqa_data["train"], tmp_path / "b", **kw))
    done = run(_cfg(sharp_qwen_dir, vqa_data["train"], tmp_path / "b", resume=True, **kw))
    assert done["finished"] and done["step"] == 6
    a = load_file(str(tmp_path / "a" / "verbalizers.safetensors"))
    b = load_file(str(tmp_path / "b" / "verbalizers.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def _bad_data(tmp_path, make_png):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(make_png(0))
    rows = [
        {"id": "good", "image": "img/ok.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                 {"from": "gpt", "value": "red"}]},
        {"id": "missing", "image": "img/nope.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                      {"from": "gpt", "value": "x"}]},
        {"id": "long", "image": "img/ok.png", "conversations": [{"from": "human", "value": "<image>\n" + "red " * 80},
                                                                 {"from": "gpt", "value": "x"}]},
    ]
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_cli_bad_samples_error_and_skip(tiny_dirs, tmp_path, make_png):
    data = _bad_data(tmp_path, make_png)
    args = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(data), "--layers", "0,2", "--steps", "2",
            "--batch-size", "2", "--max-length", "72", "--device", "cpu", "--no-progress", "--verify-join", "full"]
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "error:" in r.output and "'missing'" in r.output and "not found" in r.output
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "s"), "--on-bad-sample", "skip", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["finished"] and summary["skipped"] == 2
    report = [json.loads(x) for x in (tmp_path / "s" / "bad_samples.jsonl").read_text().splitlines()]
    assert {e["id"] for e in report} == {"missing", "long"}
    assert any("max length 72" in e["reason"] for e in report)


def test_cli_help_is_fast_and_complete():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for flag in ("--model", "--data", "--image-root", "--layers", "--out", "--steps", "--epochs", "--batch-size",
                 "--grad-accum", "--lr", "--seed", "--resume", "--on-bad-sample", "--max-length", "--json"):
        assert flag in r.output
    # --help must not import torch / transformers
    code = "import sys; from vlsi.train import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
