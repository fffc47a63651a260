"""vlsi-cache: --help of every subcommand, and each command on a real cache."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
from cache_helpers import make_fp, make_records
from click.testing import CliRunner

from vlsi.cache_format import CacheWriter, open_cache
from vlsi.cache_format.cli import main

COMMANDS = ["info", "verify", "ls", "finalize", "compact", "merge"]


@pytest.mark.parametrize("cmd", [[]] + [[c] for c in COMMANDS])
def test_help(cmd):
    res = CliRunner().invoke(main, cmd + ["--help"])
    assert res.exit_code == 0 and "Usage:" in res.output
    if not cmd:
        assert all(c in res.output for c in COMMANDS)


def test_help_is_instant_without_heavy_imports():
    code = "import sys; from vlsi.cache_format.cli import main; assert 'zarr' not in sys.modules, 'zarr'; " \
           "assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def two_caches(tmp_path):
    fp = make_fp()
    urls = []
    for name, seed in (("a", 0), ("b", 1)):
        url = str(tmp_path / name)
        with CacheWriter(url, fp, commit_every=3) as w:
            for r in make_records(7, seed, fp, prefix=f"{name}-"):
                w.append(r)
        urls.append(url)
    return urls


def test_commands(two_caches):
    a, b = two_caches
    run = CliRunner().invoke
    res = run(main, ["info", a, "--json"])
    d = json.loads(res.output)
    assert res.exit_code == 0 and d["n_samples"] == 7 and d["top_k"] == 4 and d["format_version"] == [1, 2]
    assert d["n_answer_tokens"] == int(open_cache(a).index.column("n_answer").to_numpy().sum())
    assert run(main, ["info", a]).exit_code == 0
    assert run(main, ["verify", a]).exit_code == 0
    res = run(main, ["ls", a, "--json", "--limit", "0", "--filter-min-answer", "10"])
    rows = [json.loads(x) for x in res.output.splitlines()]
    assert res.exit_code == 0 and rows and all(r["n_answer"] >= 10 for r in rows)
    assert len(rows) == sum(n >= 10 for n in open_cache(a).index.column("n_answer").to_pylist())
    res = run(main, ["merge", a, b])
    assert res.exit_code == 0 and "merged 7" in res.output
    assert len(open_cache(a)) == 14
    assert run(main, ["merge", a, b]).exit_code == 2  # duplicates refused
    res = run(main, ["compact", a, "--delete-retired"])
    assert res.exit_code == 0 and json.loads(res.output)["segments_after"] == 1
    assert len(open_cache(a)) == 14 and run(main, ["verify", a]).exit_code == 0
    assert run(main, ["finalize", a]).exit_code == 0


def test_errors_are_one_line_exit_2(two_caches, tmp_path):
    a, _ = two_caches
    res = CliRunner().invoke(main, ["info", str(tmp_path / "missing")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and res.output.count("\n") == 1
    path = [p for p in glob.glob(f"{a}/parts/*/s000001/topk_ids/c/**", recursive=True) if os.path.isfile(p)][0]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 1
    open(path, "wb").write(bytes(data))
    res = CliRunner().invoke(main, ["verify", a, "--json"])
    rep = json.loads(res.output)
    assert res.exit_code == 1 and not rep["ok"] and "s000001 array topk_ids chunk" in rep["problems"][0]
