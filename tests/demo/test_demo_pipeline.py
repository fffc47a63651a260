"""The README's main command, at the CI budget (`vlsi-demo --quick`): every stage runs and the table is printed."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from click.testing import CliRunner

from vlsi.demo.cli import main


def test_demo_help():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "--quick" in res.output


def test_demo_quick_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["--quick", "--out", str(out), "--no-progress", "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    summary = json.loads(res.output[res.output.index("{"):])
    assert [r["model"].split(":")[0] for r in summary["results"]] == ["teacher (SFT from scratch)", "student", "student"]
    for r in summary["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 32
        assert 0.0 <= r["fresh_accuracy"] <= 1.0  # also measured on a second, freshly drawn test split
    assert summary["results"][1]["steps"] == summary["results"][2]["steps"]  # the same budget for both students
    assert summary["extract"]["written"] == 160
    for key in ("matching", "kl_curves", "cache_stats"):
        assert (out / "plots").exists() and summary["plots"][key].endswith(".png"), summary["plots"]
    fresh = {s["id"]: s for s in json.loads((out / "data-fresh" / "test.json").read_text())}
    test = json.loads((out / "data" / "test.json").read_text())
    assert len(fresh) == 32 and [s["conversations"] for s in test] != [s["conversations"] for s in fresh.values()]
    assert (out / "summary.json").is_file() and (out / "runs" / "student-vlsi" / "final" / "config.json").is_file()
    # the teacher learned from its own clean split, the students (and so the cache) from the noisy train split
    data = {run: yaml.safe_load((out / "runs" / run / "config.yaml").read_text())["data"]
            for run in ("teacher", "student-start", "student-sft", "student-vlsi")}
    assert Path(data.pop("teacher")).name == "teacher.json" and {Path(d).name for d in data.values()} == {"train.json"}


def test_demo_teacher_knows_more_than_the_students_labels(tmp_path):
    """The cause of VLsI <= SFT on the old demo: its teacher learned from the students' own clean labels, so its
    targets were those labels. The default recipe gives the students noisy labels and the teacher a clean split of
    its own; the extract (the teacher's targets) and the student arms read the noisy split."""
    from vlsi.demo.pipeline import DemoConfig, make_assets
    from vlsi.models.data import read_dataset

    cfg = DemoConfig(out=str(tmp_path / "demo"), n_train=60, n_val=8, n_test=8, fresh_test_seed=None)
    assert cfg.label_noise > 0
    splits = make_assets(cfg)["splits"]
    train, teacher = list(read_dataset(splits["train"])), list(read_dataset(splits["teacher"]))
    assert len(teacher) == cfg.n_train and not any(s.meta.get("label_noise") for s in teacher)
    assert 0.2 < sum(bool(s.meta.get("label_noise")) for s in train) / len(train) < 0.6
    assert not {s.content_hash for s in teacher} & {s.content_hash for s in train}
