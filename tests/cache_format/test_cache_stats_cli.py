"""`vlsi-cache stats` on the golden cache: the table, JSON and the PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from vlsi.cache_format.cli import main

GOLDEN = Path(__file__).parent / "golden" / "v1_0"


def test_stats_json_and_plot(tmp_path):
    png = tmp_path / "stats.png"
    res = CliRunner().invoke(main, ["stats", str(GOLDEN), "--json", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert [row["layer"] for row in st["per_layer"]] == ["0", "2", "final"]
    for row in st["per_layer"]:
        assert 0.0 < row["coverage_mean"] <= 1.0
        assert row["entropy_lb_mean"] <= row["entropy_ub_mean"] + 1e-9
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_table_and_missing_cache(tmp_path):
    res = CliRunner().invoke(main, ["stats", str(GOLDEN), "--plot", "-"])
    assert res.exit_code == 0 and "final" in res.output and "plot:" not in res.output
    res = CliRunner().invoke(main, ["stats", str(tmp_path / "nope")])
    assert res.exit_code == 2 and res.output.startswith("error:") and "nope" in res.output
