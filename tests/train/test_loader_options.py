"""Options that must not change the numbers: DataLoader workers and gradient checkpointing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import train_config


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("option", [dict(num_workers=1), dict(grad_checkpointing=True)],
                         ids=["num_workers", "grad_checkpointing"])
def test_option_leaves_losses_unchanged(env, tmp_path, option):
    from vlsi.train.recipe import run

    kw = dict(stages=("interact", "sft"), interact_steps=2, sft_steps=2, batch_size=4, match="multinomial")
    run(train_config(env, tmp_path / "base", **kw))
    run(train_config(env, tmp_path / "opt", **kw, **option))
    assert _losses(tmp_path / "opt") == pytest.approx(_losses(tmp_path / "base"), rel=1e-5)
