"""The lazy join: start-up reads no sample, and a sample that fails its check mid-run follows --on-bad-sample
without ever reaching a loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import train_config


def _edited(env, tmp_path, k: int = 5):
    recs = json.loads(Path(env["train"]).read_text())
    recs[k]["conversations"][-1]["value"] += " (edited)"
    data = Path(env["train"]).parent / f"edited-{tmp_path.name}.json"
    data.write_text(json.dumps(recs))
    return data, recs[k]["id"], recs


def test_start_up_reads_no_sample(env, tmp_path, monkeypatch):
    from vlsi.models.dataset import Dataset
    from vlsi.train.recipe import run

    loaded = []
    real = Dataset.__getitem__
    monkeypatch.setattr(Dataset, "__getitem__", lambda self, i: (loaded.append(i), real(self, i))[1])
    run(train_config(env, tmp_path / "o", steps=1, batch_size=4))
    assert len(loaded) == 4  # the first micro-batch only: no pass over the dataset before step 1


def test_mid_run_mismatch_error_names_the_sample(env, tmp_path):
    from vlsi.models.errors import BadSampleError
    from vlsi.train.recipe import run

    data, bad_id, recs = _edited(env, tmp_path)
    with pytest.raises(BadSampleError, match=f"sample '{bad_id}': content_hash differs") as e:
        run(train_config(env, tmp_path / "e", data=str(data), steps=None, epochs=1.0, batch_size=4))
    assert "\n" not in str(e.value)
    steps = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()] \
        if (tmp_path / "e" / "metrics.jsonl").exists() else []
    assert len(steps) < len(recs) // 4  # stopped at the batch that held it


def test_mid_run_mismatch_skip_never_feeds_a_wrong_target(env, tmp_path):
    from vlsi.cache_format import open_cache
    from vlsi.train.recipe import run

    data, bad_id, recs = _edited(env, tmp_path)
    s = run(train_config(env, tmp_path / "s", data=str(data), steps=None, epochs=1.0, batch_size=4,
                         on_bad_sample="skip"))
    assert s["finished"] and s["skipped"] == 1
    report = [json.loads(x) for x in (tmp_path / "s" / "bad_samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in report] == [bad_id] and "content_hash" in report[0]["reason"]
    steps = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    cache = open_cache(env["cache"])
    good_rows = sum(len(cache.get(r["id"]).answer_positions) for r in recs if r["id"] != bad_id)
    assert sum(r["answer_tokens"] for r in steps) == good_rows  # one epoch: every good row once, the bad one never
    assert sum(r["samples"] for r in steps) == len(recs) - 1


def test_an_image_missing_at_load_time_follows_the_policy(env, tmp_path):
    from vlsi.models.errors import BadSampleError
    from vlsi.train.recipe import run

    recs = json.loads(Path(env["train"]).read_text())
    k = next(i for i, r in enumerate(recs) if r.get("image"))
    recs[k]["image"] = "gone/missing.png"
    data = Path(env["train"]).parent / f"missing-{tmp_path.name}.json"
    data.write_text(json.dumps(recs))
    kw = dict(data=str(data), steps=None, epochs=1.0, batch_size=4)
    with pytest.raises(BadSampleError, match=f"sample '{recs[k]['id']}': image not found"):
        run(train_config(env, tmp_path / "e", **kw))
    s = run(train_config(env, tmp_path / "s", on_bad_sample="skip", **kw))
    assert s["finished"] and s["skipped"] == 1
    assert json.loads((tmp_path / "s" / "bad_samples.jsonl").read_text())["id"] == recs[k]["id"]
