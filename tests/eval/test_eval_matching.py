"""Matching heatmap + KL curves from a hand-written metrics.jsonl."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from vlsi.eval.cli import main
from vlsi.eval.matching import matching_counts, matching_report, read_metrics
from vlsi.models.errors import VlsiError

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(path, *, n_interact=20, extra_keys=True, labels=True):
    """3 student layers, 5 teacher layers. First half of interaction: matched [0, 1, 2]; second half [1, 3, 4]."""
    rows = []
    step = 0
    for _ in range(5):
        rows.append({"stage": "verbalize", "step": step, "loss": 3.0, "kl": None})
        step += 1
    for t in range(n_interact):
        matched = [0, 1, 2] if t < n_interact // 2 else [1, 3, 4]
        row = {"stage": "interact", "step": step, "matched": matched,
               "kl": [2.0 / (1 + t), 1.5 / (1 + t), 1.0 / (1 + t), 0.5 / (1 + t)], "loss": 1.0}
        if extra_keys:
            row.update({"lr": 1e-4, "tokens_per_s": 123.0, "unknown_future_key": {"x": 1}})
        if labels and t == 0:
            row.update({"student_layers": [1, 3, 5], "teacher_layers": [1, 3, 5, 7, 9]})
        rows.append(row)
        step += 1
    rows.append({"stage": "sft", "step": step, "loss": 0.5})
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write("\n")  # a trailing blank line is fine
    return rows


def test_counts_start_vs_end(tmp_path):
    rows = _metrics(tmp_path / "metrics.jsonl")
    c = matching_counts(rows, window=0.25)  # 5 of 20 interaction steps per window
    assert c["n_student"] == 3 and c["n_teacher"] == 5 and c["n_steps"] == 20
    start, end = np.array(c["start"]), np.array(c["end"])
    np.testing.assert_allclose(start.sum(1), 1.0)
    assert start[0, 0] == start[1, 1] == start[2, 2] == 1.0
    assert end[0, 1] == end[1, 3] == end[2, 4] == 1.0
    assert c["start_steps"] == [5, 9] and c["end_steps"] == [20, 24]
    mixed = np.array(matching_counts(rows, window=1.0)["start"])
    np.testing.assert_allclose(mixed[0, [0, 1]], [0.5, 0.5])


def test_report_writes_pngs_with_layer_labels(tmp_path):
    _metrics(tmp_path / "metrics.jsonl")
    rep = matching_report(tmp_path, tmp_path / "plots")
    assert rep["student_layers"] == ["1", "3", "5"] and rep["teacher_layers"] == ["1", "3", "5", "7", "9"]
    for key in ("heatmap", "kl_curves"):
        data = open(rep[key], "rb").read()
        assert data[:8] == PNG and len(data) > 5000


def test_labels_from_config_and_index_fallback(tmp_path):
    _metrics(tmp_path / "metrics.jsonl", labels=False)
    assert matching_report(tmp_path)["student_layers"] == ["#0", "#1", "#2"]
    (tmp_path / "config.json").write_text(json.dumps({"student_layers": [2, 4, 6],
                                                      "teacher_layers": [0, 2, 4, 6, 8, 10]}))
    rep = matching_report(tmp_path)
    assert rep["student_layers"] == ["2", "4", "6"] and rep["counts"]["n_teacher"] == 6  # unmatched column kept


def test_errors(tmp_path):
    with pytest.raises(VlsiError, match="metrics file not found"):
        read_metrics(tmp_path)
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"stage": "sft", "step": 0, "loss": 1}\n{oops\n')
    with pytest.raises(VlsiError, match=r"metrics.jsonl:2: malformed JSON"):
        read_metrics(p)
    p.write_text('{"stage": "sft", "step": 0, "loss": 1}\n')
    with pytest.raises(VlsiError, match="no interaction-stage rows"):
        matching_report(tmp_path)
    p.write_text('{"stage": "interact", "step": 0, "matched": [0, 1]}\n'
                 '{"stage": "interact", "step": 1, "matched": [0]}\n')
    with pytest.raises(VlsiError, match="step 1: 'matched' has 1 entries"):
        matching_report(tmp_path)


def test_matching_command(tmp_path):
    _metrics(tmp_path / "metrics.jsonl")
    r = CliRunner().invoke(main, ["matching", "--run", str(tmp_path), "--window", "0.25"])
    assert r.exit_code == 0, r.output
    assert "start (steps 5-9): most frequent match per student layer 1->1, 3->3, 5->5" in r.output
    assert "end (steps 20-24): most frequent match per student layer 1->3, 3->7, 5->9" in r.output
    assert (tmp_path / "matching_heatmap.png").read_bytes()[:8] == PNG
    assert (tmp_path / "kl_curves.png").is_file()
    r = CliRunner().invoke(main, ["matching", "--run", str(tmp_path), "--json"])
    assert json.loads(r.output)["counts"]["n_steps"] == 20
    r = CliRunner().invoke(main, ["matching", "--run", str(tmp_path / "metrics.jsonl"),
                                  "--out-dir", str(tmp_path / "o")])
    assert r.exit_code == 0 and (tmp_path / "o" / "matching_heatmap.png").is_file()
    (tmp_path / "bad").mkdir()
    r = CliRunner().invoke(main, ["matching", "--run", str(tmp_path / "bad")])
    assert r.exit_code == 2 and r.output.startswith("error:") and "metrics file not found" in r.output


def test_per_micro_batch_draws_each_count(tmp_path):
    """vlsi-train logs `matched` as one list per micro-batch of a step: every draw is one observation."""
    rows = [{"stage": "interact", "step": s, "matched": [[0, 1], [0, 2]] if s < 2 else [[1, 2], [1, 2]]}
            for s in range(4)]
    c = matching_counts(rows, window=0.5)
    start, end = np.array(c["start"]), np.array(c["end"])
    np.testing.assert_allclose(start[1, [1, 2]], [0.5, 0.5])
    assert start[0, 0] == 1.0 and end[0, 1] == 1.0 and end[1, 2] == 1.0


def test_kl_curves_from_trainer_keys(tmp_path):
    """vlsi-train logs `layer_kl` + `final_kl` (not `kl`): the curves are drawn from those."""
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(6):
            f.write(json.dumps({"stage": "interact", "step": s, "matched": [[0, 2]], "layer_kl": [1.0 / (s + 1), 0.5],
                                "final_kl": 0.2, "student_layers": [1, 3], "teacher_layers": [1, 3, 5]}) + "\n")
    rep = matching_report(run, tmp_path / "plots")
    assert rep["kl_curves"] and open(rep["kl_curves"], "rb").read(8) == PNG
