"""Data-parallel training under torchrun (gloo, CPU): the same run whatever the world size, exact resume across
world sizes, rank 0 alone writes, a failing rank stops them all with the one-line error; the same under FSDP2
(--parallel fsdp, --full), whose sharded checkpoints resume on one process and the other way round."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # = torchrun, which a venv may not put on PATH

DROP = ("step_s", "tokens_per_s", "answer_tokens_per_s", "samples_per_s", "memory")


def _args(env, out, **kw):
    base = {"--cache": env["cache"], "--student": str(env["student"]), "--data": str(env["train"]),
            "--out": str(out), "--student-verbalizers": str(env["student_verb"]), "--stages": "interact,sft",
            "--interact-steps": "3", "--sft-steps": "1", "--batch-size": "2", "--lr": "1e-3", "--min-lr": "1e-4",
            "--lora-rank": "4", "--device": "cpu", "--chunk-tokens": "7", "--no-progress": None}
    base.update(kw)
    return [x for k, v in base.items() for x in ((k,) if v is None else (k, str(v)))]


def _run(args, nproc: int, timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "VLSI_DIST_TIMEOUT_S": "120"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "vlsi.train", *args]
    else:
        cmd = [*TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "vlsi.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _metrics(out):
    return [{k: v for k, v in json.loads(x).items() if k not in DROP}
            for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _close(a: list, b: list, rel=1e-5):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, float):
                assert vb == pytest.approx(va, rel=rel, abs=1e-7), (k, va, vb)
            elif isinstance(va, list) and va and isinstance(va[0], float):
                assert vb == pytest.approx(va, rel=rel, abs=1e-7), (k, va, vb)
            else:
                assert va == vb, (k, va, vb)


def _weights_close(a, b, rel=1e-5, *, adam_noise: float | None = None):
    """ODIR/final weights of two runs equal within ``rel``. ``adam_noise``: also accept a few elements (at most 1 in
    500) off by up to that much absolutely: AdamW scales each element's step by its own gradient's size, so an
    element whose gradient is float noise (~1e-10, from another summation order) moves by a visible part of the
    LR; FSDP's gathered flat buffers reach the kernels in another layout than one process's weights."""
    import torch
    from safetensors.torch import load_file

    wa = load_file(str(Path(a) / "final" / "model.safetensors"))
    wb = load_file(str(Path(b) / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    off = total = 0
    for k in wa:
        if adam_noise is None:
            torch.testing.assert_close(wb[k], wa[k], rtol=rel, atol=1e-6)
            continue
        torch.testing.assert_close(wb[k], wa[k], rtol=rel, atol=adam_noise)
        off += int(((wb[k] - wa[k]).abs() > 1e-6 + rel * wa[k].abs()).sum())
        total += wa[k].numel()
    assert off <= total / 500, (off, total)


def test_two_ranks_equal_one_process_with_accumulation(env, tmp_path):
    one = _run(_args(env, tmp_path / "one", **{"--grad-accum": "2"}), 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(_args(env, tmp_path / "two", **{"--grad-accum": "1"}), 2)
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["stage"] for r in m2] == ["interact"] * 3 + ["sft"]
    assert all(len(r["matched"]) == 2 for r in m2 if r["stage"] == "interact")  # both ranks' draws, in order
    _close(m1, m2)
    _weights_close(tmp_path / "one", tmp_path / "two")
    # rank 0 alone writes: the output folders hold the same files
    names = lambda d: sorted(str(p.relative_to(d)) for p in Path(d).rglob("*"))
    assert names(tmp_path / "one") == names(tmp_path / "two")


def test_resume_mid_stage_across_world_sizes(env, tmp_path):
    full = tmp_path / "full"
    assert _run(_args(env, full), 2).returncode == 0
    for resume_with in (2, 1):
        part = tmp_path / f"part{resume_with}"
        r = _run(_args(env, part, **{"--stop-after": "2"}), 2)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(_metrics(part)) == 2
        if resume_with == 1:  # one process, the same global batch: two micro-batches per step
            r = _run(_args(env, part, **{"--resume": None, "--grad-accum": "2"}), 1)
        else:
            r = _run(_args(env, part, **{"--resume": None}), 2)
        assert r.returncode == 0, r.stderr[-3000:]
        _close(_metrics(full), _metrics(part))
        _weights_close(full, part)


def test_a_failing_rank_stops_every_rank(env, tmp_path):
    recs = json.loads(Path(env["train"]).read_text())
    for r in recs[1::2]:  # every other sample edited: both ranks meet one in their first micro-batches
        r["conversations"][-1]["value"] += " (edited)"
    data = tmp_path / "edited.json"
    data.write_text(json.dumps(recs))
    shutil.copytree(Path(env["train"]).parent / "images", tmp_path / "images", dirs_exist_ok=True) \
        if (Path(env["train"]).parent / "images").is_dir() else None
    r = _run(_args(env, tmp_path / "o", **{"--data": str(data), "--image-root": str(Path(env["train"]).parent)}), 2,
             timeout=240)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("content_hash differs" in e or "stopped" in e for e in errors), r.stderr[-3000:]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


FSDP = {"--full": None, "--max-grad-norm": "0.5"}  # clipping active: the tiny student's gradient norm is ~2
NOISE = 1e-4  # a tenth of the LR (1e-3): see _weights_close


@pytest.fixture(scope="module")
def full_one(env, tmp_path_factory):
    """The reference: a full fine-tune in one process, two micro-batches per step (global batch 4)."""
    out = tmp_path_factory.mktemp("fsdp") / "one"
    r = _run(_args(env, out, **FSDP, **{"--grad-accum": "2"}), 1)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_fsdp_two_ranks_equal_one_process(env, full_one, tmp_path):
    two = tmp_path / "two"
    r = _run(_args(env, two, **FSDP, **{"--parallel": "fsdp"}), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done:") == 1  # one summary (rank 0's), not one per rank
    m1, m2 = _metrics(full_one), _metrics(two)
    assert all(x["grad_norm"] > 0.5 for x in m1)  # every step clipped: the sharded norm must be the whole one
    _close(m1, m2)
    _weights_close(full_one, two, adam_noise=NOISE)
    # the checkpoints are sharded: each rank wrote its part; rank 0 alone wrote everything else
    meta = json.loads(next((two / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["sharded"] and meta["world_size"] == 2
    names = lambda d: {str(p.relative_to(d)) for p in Path(d).rglob("*")}
    extra = names(two) - names(full_one)
    assert extra and all(Path(x).name == "__1_0.distcp" for x in extra), extra
    assert names(full_one) <= names(two)


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_fsdp_checkpoint_resumes_on_another_world_size(env, full_one, tmp_path, first, then):
    """A checkpoint written by 2 FSDP ranks resumes in 1 process, and one written by 1 process on 2 FSDP ranks:
    the metrics and final weights of the uninterrupted run."""
    part = tmp_path / "part"
    ranks = {1: {"--grad-accum": "2"}, 2: {"--parallel": "fsdp"}}  # the same global batch of 4
    r = _run(_args(env, part, **FSDP, **ranks[first], **{"--stop-after": "2"}), first)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_metrics(part)) == 2
    r = _run(_args(env, part, **FSDP, **ranks[then], **{"--resume": None}), then)
    assert r.returncode == 0, r.stderr[-3000:]
    _close(_metrics(full_one), _metrics(part))
    _weights_close(full_one, part, adam_noise=NOISE)


def test_fsdp_needs_a_full_fine_tune(env, tmp_path):
    from vlsi.common.config import ConfigError

    from conftest import train_config

    with pytest.raises(ConfigError, match="--parallel fsdp shards a full fine-tune"):
        train_config(env, tmp_path / "o", parallel="fsdp").check()
    train_config(env, tmp_path / "o", parallel="fsdp", full=True).check()


def test_parallel_auto_rule(env, tmp_path, monkeypatch):
    """auto: fsdp only for a full fine-tune of several ranks on GPUs whose training state (4 x trainable bytes +
    frozen bytes) exceeds half of one GPU; ddp for LoRA, on CPU, in one process; explicit choices are kept."""
    import types

    import torch

    from conftest import train_config
    from vlsi.train.distributed import World
    from vlsi.train.recipe import _parallel

    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 100))  # 2 x 10,100 fp32 params
    model[0].requires_grad_(False)
    need = 10_100 * 4 * 4 + 10_100 * 4  # trainable: weight, grad, 2 moments; frozen: weight
    gpu = types.SimpleNamespace(device=torch.device("cuda", 0), model=model)
    cpu = types.SimpleNamespace(device=torch.device("cpu"), model=model)
    memory = {"total": 0}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(total_memory=memory["total"]))
    full, lora = train_config(env, tmp_path / "a", full=True), train_config(env, tmp_path / "b")
    two = World(0, 2)
    memory["total"] = 2 * need - 2  # half of it is just below what the full fine-tune needs
    assert _parallel(full, two, gpu) == "fsdp"
    memory["total"] = 2 * need + 2
    assert _parallel(full, two, gpu) == "ddp"
    memory["total"] = 1
    assert _parallel(lora, two, gpu) == "ddp"  # LoRA: never sharded by auto
    assert _parallel(full, two, cpu) == "ddp"  # CPU (gloo): ddp
    assert _parallel(full, World(), gpu) == "ddp"  # one process: nothing to shard
    assert _parallel(train_config(env, tmp_path / "c", full=True, parallel="fsdp"), two, cpu) == "fsdp"
    assert _parallel(train_config(env, tmp_path / "d", full=True, parallel="ddp"), two, gpu) == "ddp"


def test_fsdp_train_all_with_tied_embeddings(env, tmp_path):
    """--train-all under FSDP with the input embeddings tied to the LM head (as Qwen2-VL-2B ties them): the shared
    weight stays replicated (FSDP ignores it) and trains through the all-reduce, the rest sharded; the same run as
    one process."""
    from safetensors.torch import load_file, save_file

    tied = tmp_path / "tied"
    shutil.copytree(env["student"], tied)
    cfg = json.loads((tied / "config.json").read_text())

    def tie(d):
        d["tie_word_embeddings"] = True
        for v in d.values():
            if isinstance(v, dict) and "tie_word_embeddings" in v:
                tie(v)

    tie(cfg)
    (tied / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(tied / "model.safetensors"))
    del weights["lm_head.weight"]  # the head is the embedding
    save_file(weights, str(tied / "model.safetensors"), metadata={"format": "pt"})
    kw = {"--student": str(tied), "--train-all": None, "--stages": "sft", "--sft-steps": "2", "--max-grad-norm": "0.5"}
    one, two = tmp_path / "one", tmp_path / "two"
    r = _run(_args(env, one, **kw, **{"--grad-accum": "2"}), 1)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(_args(env, two, **kw, **{"--parallel": "fsdp"}), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    _close(_metrics(one), _metrics(two))
    _weights_close(one, two, adam_noise=NOISE)
    assert "lm_head.weight" not in load_file(str(two / "final" / "model.safetensors"))  # still tied on export
