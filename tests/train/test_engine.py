"""The one training engine: clipping in every stage, resume-critical fields refused by name, default target layers
of a local 28-layer directory in vlsi-verbalize and vlsi-train, and that nothing else steps an optimizer."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from vlsi.demo.vqa import generate_vqa

    return generate_vqa(tmp_path_factory.mktemp("data"), n_train=8, n_val=2, n_test=2, seed=0, image_size=56)


def test_max_grad_norm_applies_in_the_verbalize_stage(env, tmp_path, monkeypatch):
    """The verbalize stage clips with --max-grad-norm, on the verbalizer parameters, once per optimizer step."""
    import torch

    from vlsi.train.config import VerbalizeConfig
    from vlsi.train.recipe import run_verbalize

    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        calls.append((len(params), max_norm))
        return real(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg = VerbalizeConfig(model=str(env["student"]), data=str(env["train"]), out=str(tmp_path / "v"), layers=(0, 1),
                          steps=3, batch_size=4, max_grad_norm=1e-4, device="cpu", progress=False)
    run_verbalize(cfg)
    assert [m for _, m in calls] == [1e-4] * 3
    assert all(n == 2 * 3 for n, _ in calls), calls  # two verb-ffn blocks x (gate, up, down)
    log = [json.loads(x) for x in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 1e-4 for r in log), [r["grad_norm"] for r in log]
    calls.clear()
    run_verbalize(dataclasses.replace(cfg, out=str(tmp_path / "off"), max_grad_norm=None))
    assert calls == []


def _changed(cfg, f):
    """A valid value for field ``f`` that differs from ``cfg``'s, or None when the field has none to give."""
    from vlsi.common.config import ConfigError

    v = getattr(cfg, f.name)
    choices = f.metadata.get("choices")
    if choices:
        candidates = [c for c in choices if c not in (v, "auto")]  # "auto" may resolve to the value it replaces
    elif isinstance(v, bool):
        candidates = [not v]
    elif isinstance(v, (int, float)) and v is not None:
        candidates = [v + 1 if isinstance(v, int) else (v / 2 if v else 0.25)]
    elif isinstance(v, tuple):
        candidates = [v[:-1] or (7,)] if f.name != "stages" else [("interact", "sft"), ("sft",)]
    else:
        candidates = ["elsewhere", 3, 0.5]
    for c in candidates:
        try:
            return dataclasses.replace(cfg, **{f.name: c})
        except (ConfigError, TypeError, ValueError):
            continue
    return None


@pytest.mark.parametrize("which", ["train", "verbalize"])
def test_a_resume_with_any_changed_resume_critical_field_is_refused(tmp_path, which):
    from vlsi.train.config import TrainConfig, VerbalizeConfig
    from vlsi.train.engine import prepare_out

    out = tmp_path / "o"
    if which == "train":
        cfg = TrainConfig(student="s", data="d.json", out=str(out), cache="c", student_layers=(1, 3),
                          steps=5, resume=True)
    else:
        cfg = VerbalizeConfig(model="m", data="d.json", out=str(out), layers=(1, 3), steps=5, resume=True)
    prepare_out(out, cfg)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "latest").write_text("step_00000001\n")
    prepare_out(out, cfg)  # unchanged: accepted
    critical = [f for f in dataclasses.fields(cfg) if f.metadata.get("resume")]
    tried = []
    for f in critical:
        new = _changed(cfg, f)
        if new is None:
            continue
        with pytest.raises(Exception, match="different settings") as e:
            prepare_out(out, new)
        assert cfg.flag(f.name) in str(e.value) and "\n" not in str(e.value)
        tried.append(f.name)
    # the fields a hand-kept list once missed are among them
    must = {"dtype", "max_grad_norm", "lr", "seed", "batch_size"} | (
        {"verbalizer_kind", "student_layers", "match", "stages"} if which == "train" else {"kind", "layers"})
    assert must <= set(tried), must - set(tried)
    assert len(tried) >= len(critical) - 2
    with pytest.raises(Exception, match="pass --resume"):
        prepare_out(out, dataclasses.replace(cfg, resume=False))
    # the global batch (ranks x micro-batch x accumulation) is what a resume keeps, not each factor
    with pytest.raises(Exception, match=r"global batch = ranks x --batch-size x --grad-accum \(4 -> 8\)"):
        prepare_out(out, dataclasses.replace(cfg, grad_accum=cfg.grad_accum * 2))
    out2 = tmp_path / "o2"
    two = dataclasses.replace(cfg, out=str(out2), grad_accum=2)
    prepare_out(out2, two)
    (out2 / "checkpoints").mkdir()
    (out2 / "checkpoints" / "latest").write_text("step_00000001\n")
    prepare_out(out2, dataclasses.replace(two, grad_accum=1), world_size=2)  # 1 x 4 x 2 == 2 x 4 x 1


def test_a_local_28_layer_directory_gets_the_papers_layers(qwen2vl_28_dir, small_data, tmp_path):
    """vlsi-verbalize and vlsi-train on a local 28-layer Qwen2-VL dir, without --layers / --student-layers."""
    from vlsi.train.cli import main as train_main
    from vlsi.train.cli import verbalize as verbalize_main

    expect = [2, 6, 10, 14, 18, 22, 26]
    base = ["--data", str(small_data["train"]), "--steps", "1", "--batch-size", "2", "--device", "cpu"]
    r = CliRunner().invoke(verbalize_main, ["--model", str(qwen2vl_28_dir), "--out", str(tmp_path / "v"), "--json",
                                            *base])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["layers"] == expect
    assert "target layers 2,6,10,14,18,22,26 (qwen2_vl rule" in r.stderr
    assert yaml.safe_load((tmp_path / "v" / "config.yaml").read_text())["layers"] == expect

    r = CliRunner().invoke(train_main, ["--student", str(qwen2vl_28_dir), "--out", str(tmp_path / "t"),
                                        "--stages", "verbalize", "--json", *base])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["student_layers"] == expect
    assert "student target layers 2,6,10,14,18,22,26" in r.stderr
    assert yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())["student_layers"] == expect
    assert json.loads((tmp_path / "t" / "verbalizers" / "verbalizers.json").read_text())["layers"] == expect


def test_exactly_one_place_steps_an_optimizer():
    """Outside tests and bench, only vlsi.train.engine calls ``.step()`` on an optimizer or creates one."""
    found = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "bench", ".venv", ".venv-vllm") or rel.parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("AdamW", "Adam", "SGD", "backward"):
                found.append(f"{rel}:{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("opt", "optimizer"):
                found.append(f"{rel}:step")
    assert found and {f.split(":")[0] for f in found} == {"train/engine.py"}, found


def test_vision_lr_scale_gives_the_vision_encoder_its_own_step(env, tmp_path):
    """--vision-lr-scale: the vision tower's AdamW group runs at scale x the LR (here ~0: it barely moves), the
    language model at the LR."""
    from safetensors.torch import load_file

    from vlsi.train.config import TrainConfig
    from vlsi.train.recipe import run

    start = load_file(str(env["student"] / "model.safetensors"))
    moved = {}
    for scale in (1.0, 1e-6):
        out = tmp_path / f"s{scale}"
        run(TrainConfig(student=str(env["student"]), data=str(env["train"]), out=str(out), stages=("sft",),
                        steps=2, batch_size=4, train_all=True, lr=1e-3, vision_lr_scale=scale, device="cpu",
                        progress=False))
        end = load_file(str(out / "final" / "model.safetensors"))
        diff = {k: float((end[k].float() - start[k].float()).abs().max()) for k in start if k in end}
        moved[scale] = ({k: v for k, v in diff.items() if k.startswith("visual.")},
                        {k: v for k, v in diff.items() if k.startswith("model.layers.")})
    vis_full, lm_full = moved[1.0]
    vis_tiny, lm_tiny = moved[1e-6]
    assert vis_full and lm_full
    assert max(vis_full.values()) > 1e-4 and max(vis_tiny.values()) < 1e-6
    assert max(lm_tiny.values()) > 1e-4


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_lr_schedule_decays_from_lr_to_min_lr_after_the_warm_up(kind):
    """Warm-up is linear to the peak; then cosine or linear down to --min-lr at the last step, every group keeping
    its own scale (the vision group at --vision-lr-scale)."""
    import math

    import torch

    from vlsi.train.engine import lr_schedule

    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": 1e-4},
                           {"params": [torch.zeros(1, requires_grad=True)], "lr": 1e-5}], lr=1e-4)
    sched = lr_schedule(opt, kind=kind, total_steps=12, warmup_steps=2, min_ratio=0.1)
    seen = []
    for _ in range(13):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0][0] == pytest.approx(0.5e-4) and seen[1][0] == pytest.approx(1e-4)
    for step in range(2, 13):
        p = (step - 2) / 10
        shape = 1 - p if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        want = 0.1 + 0.9 * shape if p <= 1 else 0.1
        assert seen[step][0] == pytest.approx(1e-4 * want) and seen[step][1] == pytest.approx(1e-5 * want)
    assert seen[12][0] == pytest.approx(1e-5)


def test_schedule_auto_is_each_papers_schedule():
    from vlsi.train.config import TrainConfig

    common = dict(student="s", data="d", out="o")
    assert TrainConfig.build(None, cache="c", **common).schedule == "cosine"
    assert TrainConfig.build(None, method="genrecal", teacher_head="t", **common).schedule == "linear"
    assert TrainConfig.build(None, cache="c", schedule="linear", **common).schedule == "linear"
