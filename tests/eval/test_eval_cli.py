"""`vlsi-eval`: default-command dispatch, end-to-end eval on a tiny model, --help of every subcommand."""

from __future__ import annotations

import base64
import csv
import json
import subprocess
import sys
from collections import Counter

import pytest
from click.testing import CliRunner

from vlsi.eval.cli import main
from vlsi.eval.scoring import score


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["layers", "--help"], ["matching", "--help"]])
def test_help(args):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output


def test_help_is_fast_and_light():
    """--help must not import torch / transformers (heavy imports live inside the commands)."""
    code = ("import sys; from vlsi.eval.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('torch', 'transformers', 'zarr') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_default_command_end_to_end(tiny_dirs, vqa, samples, tmp_path):
    out = tmp_path / "res.json"
    args = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(vqa["test"]), "--out", str(out),
            "--max-new-tokens", "3", "--batch-size", "4", "--limit", "10", "--device", "cpu"]
    r = CliRunner().invoke(main, args)  # no subcommand name: dispatched to `run`
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    preds = res["predictions"]
    assert [p["id"] for p in preds] == [s.id for s in samples[:10]]
    by_id = {s.id: s for s in samples}
    for p in preds:  # every stored verdict is the scoring of the stored prediction
        s = score(p["prediction"], by_id[p["id"]])
        assert (p["correct"], p["extracted"], p["kind"]) == (s["correct"], s["extracted"], s["kind"])
        assert p["category"] == by_id[p["id"]].meta["category"]
        assert p["new_tokens"] <= 3
    assert res["n"] == 10 and res["correct"] == sum(p["correct"] for p in preds)
    assert res["accuracy"] == pytest.approx(res["correct"] / 10)
    cats = Counter(s.meta["category"] for s in samples[:10])
    assert {k: v["n"] for k, v in res["per_category"].items()} == dict(cats)
    assert res["per_kind"]["mc"]["n"] == sum(1 for s in samples[:10] if s.meta.get("options"))
    assert res["generated_tokens"] > 0 and res["wall_s"] > 0
    assert "overall" in r.output and "acc %" in r.output
    # the explicit subcommand gives the same predictions (greedy is deterministic)
    r2 = CliRunner().invoke(main, ["run", *args[:-4], "--limit", "10", "--json", "--no-predictions"])
    assert r2.exit_code == 0, r2.output
    j = json.loads(r2.output[r2.output.index("{"):])
    assert "predictions" not in j and j["correct"] == res["correct"] and j["per_category"] == res["per_category"]


def test_eval_on_mmbench_tsv(tiny_dirs, samples, tmp_path):
    """An MMBench-style TSV built from the VQA test split's MC samples evaluates end to end."""
    mc = [s for s in samples if s.meta.get("options") and len(s.images) == 1][:3]
    path = tmp_path / "mmb.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        for i, s in enumerate(mc):
            opts = s.meta["options"]  # the demo's answer is the option's text; MMBench's answer column a letter
            w.writerow([i, "Which one?", "", *opts, "ABCD"[opts.index(s.meta["answer"])], s.meta["category"],
                        base64.b64encode(s.images[0]).decode()])
    out = tmp_path / "mmb.json"
    r = CliRunner().invoke(main, ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(path), "--out", str(out),
                                  "--max-new-tokens", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["n"] == 3 and res["per_kind"] == {"mc": res["per_kind"]["mc"]} and res["per_kind"]["mc"]["n"] == 3
    assert [p["gold"] for p in res["predictions"]] == ["ABCD"[s.meta["options"].index(s.meta["answer"])] for s in mc]


def test_user_errors_exit_2(tiny_dirs, tmp_path):
    bad = tmp_path / "d.json"
    bad.write_text("{not json")
    r = CliRunner().invoke(main, ["--model", str(tiny_dirs["qwen2"]), "--data", str(bad)])
    assert r.exit_code == 2 and r.output.startswith("error:") and "d.json: malformed JSON" in r.output
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "yo"}]}) + "\n")
    r = CliRunner().invoke(main, ["--model", str(tmp_path), "--data", str(good)])
    assert r.exit_code == 2 and r.output.startswith("error:") and "not a model directory" in r.output
    r = CliRunner().invoke(main, ["--data", str(bad)])
    assert r.exit_code == 2 and "--model" in r.output  # click's own usage error
