"""`vlsi-extract` as users run it (subprocesses): crash + resume, shards, bad samples, refusals, --help."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from extract_testutil import assert_same_cache_contents, make_records, write_data


N_LONG = 80


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlsi.extract.cli", *args]


def _base(env, out, data=None) -> list[str]:
    return ["--teacher", str(env["teacher"]), "--verbalizers", str(env["verb"]),
            "--data", str(data or env["data"]), "--out", str(out), "--top-k", "8", "--no-progress"]


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run(args) -> _Result:
    """The CLI in this process (no interpreter + torch start-up per call); crash tests use real subprocesses."""
    from click.testing import CliRunner

    from vlsi.extract.cli import main

    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return _Result(r.exit_code, r.stdout, r.stderr)


@pytest.fixture(scope="module")
def long_data(tiny_env):
    """A text dataset long enough that a run can be killed in the middle."""
    env = tiny_env("qwen2")
    return write_data(env["root"] / "long.json", make_records(N_LONG, vlm=False, seed=3))


@pytest.fixture(scope="module")
def full_cache(tiny_env, long_data, tmp_path_factory):
    """The uninterrupted single-worker run every other run is compared with."""
    env = tiny_env("qwen2")
    out = tmp_path_factory.mktemp("full") / "cache"
    r = _run(_base(env, out, long_data) + ["--batch-size", "4", "--json"])  # in-process: saves a start-up
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["written"] == N_LONG and s["cache_samples"] == N_LONG
    return out


def test_sigkill_then_resume_equals_uninterrupted(tiny_env, long_data, full_cache, tmp_path):
    from vlsi.cache_format import open_cache, verify_cache

    env = tiny_env("qwen2")
    out = tmp_path / "cache"
    args = _base(env, out, long_data) + ["--batch-size", "1", "--commit-every", "4"]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    commits = out / "commits"
    # Kill as soon as the first segments are committed: the run is then mid-way with work buffered.
    while time.time() < deadline and proc.poll() is None:
        if commits.is_dir() and sum(1 for _ in commits.rglob("*.json")) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(open_cache(str(out)))
    assert 0 < n_before < N_LONG, n_before

    # Without --resume the worker refuses to silently continue a shard it already wrote.
    r = _run(args)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: ") and "--resume" in last

    r = _run(args + ["--resume", "--json"])
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["already_committed"] == n_before and s["written"] == N_LONG - n_before
    assert verify_cache(str(out)).ok
    assert_same_cache_contents(open_cache(str(out)), open_cache(str(full_cache)))


def test_two_shards_together_equal_single_run(tiny_env, long_data, full_cache, tmp_path):
    from vlsi.cache_format import open_cache, verify_cache

    env = tiny_env("qwen2")
    out = tmp_path / "cache"
    procs = [subprocess.Popen(_cli(*_base(env, out, long_data), "--shard", f"{i}/2", "--batch-size", "4", "--json"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-400:] for o in outs]
    written = [json.loads(o[0])["written"] for o in outs]
    assert all(w > 0 for w in written) and sum(written) == N_LONG
    assert verify_cache(str(out)).ok
    reader = open_cache(str(out))
    assert len({s.part for s in reader.segments}) == 2
    assert_same_cache_contents(reader, open_cache(str(full_cache)))


def test_bad_samples_per_policy(tiny_env, tmp_path):
    from vlsi.cache_format import open_cache

    env = tiny_env("qwen2_vl")
    recs = make_records(6, vlm=True, seed=5)
    recs[2]["image"] = "img/missing.png"  # missing image file
    recs[4]["conversations"][0]["value"] += " and more" * 40  # over --max-length
    data = write_data(env["root"] / "bad.json", recs)
    args = _base(env, tmp_path / "err", data) + ["--max-length", "200", "--batch-size", "2"]

    r = _run(args)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "sample-002" in line and "image not found" in line

    report = tmp_path / "skipped.jsonl"
    r = _run(_base(env, tmp_path / "skip", data) + ["--max-length", "200", "--on-bad-sample", "skip",
                                                    "--bad-sample-report", str(report), "--json"])
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["skipped"] == 2 and s["written"] == 4
    reasons = {e["id"]: e["reason"] for e in s["skipped_samples"]}
    assert "image not found" in reasons["sample-002"] and "max length" in reasons["sample-004"]
    assert [json.loads(x)["id"] for x in report.read_text().splitlines()] == ["sample-002", "sample-004"]
    assert set(open_cache(str(tmp_path / "skip")).sample_ids) == {r["id"] for r in recs} - {"sample-002", "sample-004"}


def test_refuses_mismatched_verbalizers_and_cache(tiny_env, tmp_path):
    env, other = tiny_env("qwen2"), tiny_env("qwen2_vl")
    r = _run(["--teacher", str(env["teacher"]), "--verbalizers", str(other["verb"]), "--data", str(env["data"]),
              "--out", str(tmp_path / "c"), "--no-progress"])
    assert r.returncode == 2 and "trained for another model" in r.stderr and "config_hash" in r.stderr
    assert not (tmp_path / "c").exists()

    r = _run(_base(env, tmp_path / "c") + ["--layers", "2"])
    assert r.returncode == 0, r.stderr
    r = _run(_base(env, tmp_path / "c") + ["--resume"])  # all layers now: differs from the cache
    assert r.returncode == 2 and "target_layers" in r.stderr
    r = _run(_base(env, tmp_path / "c") + ["--layers", "2", "--top-k", "4", "--resume"])
    assert r.returncode == 2 and "top_k" in r.stderr
    r = _run(_base(env, tmp_path / "d") + ["--layers", "1"])  # no verbalizer for layer 1
    assert r.returncode == 2 and "--layers [1]" in r.stderr


def test_help_is_instant_and_light():
    code = ("import sys; from click.testing import CliRunner; from vlsi.extract.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "assert '--shard' in r.output and '--resume' in r.output and '--storage-option' in r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'zarr') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
