"""Data-parallel training under torchrun (gloo, CPU): the same run whatever the world size, exact resume across
world sizes, rank 0 alone writes, a failing rank stops them all with the one-line error."""

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


def _weights_close(a, b, rel=1e-5):
    import torch
    from safetensors.torch import load_file

    wa = load_file(str(Path(a) / "final" / "model.safetensors"))
    wb = load_file(str(Path(b) / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=rel, atol=1e-6)


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
