"""Stages that need no teacher (sft, verbalize) run without a cache; interact without one is refused."""

from __future__ import annotations

import pytest

from vlsi.train.config import ConfigError, TrainConfig

build_config = TrainConfig.build


def test_interact_requires_a_cache(tmp_path):
    with pytest.raises(ConfigError, match="interact stage needs --cache"):
        build_config(student="s", data="d.json", out=str(tmp_path), stages="interact,sft")


def test_sft_without_cache_trains_and_exports(tmp_path, env):
    from transformers import AutoModelForImageTextToText

    from vlsi.train.recipe import run

    cfg = build_config(student=str(env["student"]), data=str(env["train"]), out=str(tmp_path / "o"), stages="sft",
                       sft_steps=3, batch_size=4, full=True, lr=1e-3, device="cpu", progress=False)
    summary = run(cfg)
    assert summary["finished"] and summary["stages"]["sft"]["finished"]
    assert summary["teacher_layers"] == []
    AutoModelForImageTextToText.from_pretrained(tmp_path / "o" / "final")
