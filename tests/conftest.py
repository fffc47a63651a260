"""Fixtures shared by every test folder (tests/models, tests/train, ...): built once per session, lazily.

``qwen2vl_28_dir``: a local Qwen2-VL model directory with the 7B/2B students' decoder depth (28 layers) at the
``test`` width (hidden 32, one-block vision tower, ~0.36M parameters), so code that derives default target layers
from a local directory's depth (``ModelAdapter.target_layers`` -> ``(2, 6, ..., 26)``) runs as for a real student.
Its tokenizer is ``vlsi.demo.tiny.build_tokenizer()`` with the defaults (deterministic), so it has the same
``tokenizer_hash`` as any other tiny model written with a default-built tokenizer.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qwen2vl_28_dir(tmp_path_factory):
    """Path of a random-weight 28-decoder-layer Qwen2-VL directory (``test`` width), written once per session."""
    from vlsi.demo.tiny import build_tokenizer, write_tiny_model

    out = tmp_path_factory.mktemp("qwen2vl_28") / "qwen2_vl"
    return write_tiny_model(out, "qwen2_vl", tokenizer=build_tokenizer(), size="test", num_layers=28)


@pytest.fixture(scope="session", autouse=True)
def _dataset_index_dir(tmp_path_factory):
    """Dataset indexes (vlsi.models.dataset) go to a session temp dir, not the user's ~/.cache; subprocesses inherit
    it through the environment."""
    import os

    old = os.environ.get("VLSI_INDEX_DIR")
    os.environ["VLSI_INDEX_DIR"] = str(tmp_path_factory.mktemp("dataset_index"))
    yield
    if old is None:
        os.environ.pop("VLSI_INDEX_DIR", None)
    else:
        os.environ["VLSI_INDEX_DIR"] = old
