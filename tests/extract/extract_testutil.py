"""Helpers shared by the extraction tests (a uniquely named module: tests/extract is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "blue": (40, 90, 220), "green": (40, 160, 60), "yellow": (235, 200, 30)}


def _conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def make_records(n: int, *, vlm: bool, seed: int = 0) -> list[dict]:
    """``n`` samples cycling through single-turn image, multi-turn, two-image and text-only kinds."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    out = []
    for i in range(n):
        c1, c2 = (names[j] for j in rng.choice(len(names), 2, replace=False))
        kind = i % 4 if vlm else 3
        if kind == 0:
            r = {"image": f"img/{c1}.png",
                 "conversations": _conv("<image>\nWhat colour is the shape?", f"The shape is {c1}.")}
        elif kind == 1:
            r = {"image": f"img/{c1}.png",
                 "conversations": _conv("<image>\nWhat colour is the shape?", f"It is {c1}.",
                                        "How many circles are there?", "There are two circles.")}
        elif kind == 2:
            r = {"image": [f"img/{c1}.png", f"img/{c2}.png"],
                 "conversations": _conv("<image>\n<image>\nCompare the two images.",
                                        f"No, they differ: {c1} and {c2}.")}
        else:
            words = " ".join(rng.choice(["two", "three", "red", "blue", "left", "right"], 1 + i % 5))
            r = {"conversations": _conv(f"What is two plus three? {words}", f"The answer is five. {words}",
                                        "Is it on the left or the right?", "It is on the left side.")[: 2 + 2 * (i % 2)]}
        r["id"] = f"sample-{i:03d}"
        out.append(r)
    return out


def write_data(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def assert_same_record(a, b, *, atol: float = 2e-3) -> None:
    """Two records of one sample agree: identity, ids, alignment exactly; values within fp16 tolerance.

    Top-k ids may differ only where two log-probs tie within tolerance (batch composition changes float
    rounding in the last bits); then the ids' values must still agree position by position.
    """
    assert a.sample_id == b.sample_id and a.content_hash == b.content_hash
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.answer_positions, b.answer_positions)
    np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=atol, rtol=0)
    np.testing.assert_allclose(a.tail_logmass, b.tail_logmass, atol=atol, rtol=0)
    diff = a.topk_ids != b.topk_ids
    k = a.topk_ids.shape[-1]
    for r, l, j in zip(*np.nonzero(diff)):  # allowed only at near-ties: a neighbour with (almost) the same value
        row = a.topk_logprobs[r, l]
        near = [jj for jj in range(k) if jj != j and abs(row[jj] - row[j]) <= atol]
        assert near or j == k - 1, f"{a.sample_id}: top-k id differs at row {r} layer {l} rank {j} without a tie"


def assert_same_cache_contents(r1, r2) -> None:
    """Same set of sample ids and, per id, the same record (storage order may differ)."""
    assert sorted(r1.sample_ids) == sorted(r2.sample_ids)
    for sid in r1.sample_ids:
        assert_same_record(r1.get(sid), r2.get(sid))
