"""The README's main command, at the CI budget (`vlsi-demo --quick`): every stage runs and the table is printed."""

from __future__ import annotations

import json

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
