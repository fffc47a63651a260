"""MMBench-style TSV parsing on a tiny generated file (base64 PNGs, hints, missing options, image references)."""

from __future__ import annotations

import base64
import csv
import io

import numpy as np
import pytest

from vlsi.eval.mmbench import MC_INSTRUCTION, read_mmbench_tsv
from vlsi.eval.run import load_eval_samples
from vlsi.models.data import IMAGE_PLACEHOLDER, BadSamplePolicy
from vlsi.models.errors import BadSampleError, DatasetError


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def _write(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(h, "") for h in header])
    return path


@pytest.fixture()
def tsv(tmp_path):
    img0, img1 = _png(0), _png(1)
    rows = [
        {"index": 0, "question": "What colour is the shape?", "hint": "Look closely.", "A": "red", "B": "blue",
         "C": "green", "D": "yellow", "answer": "B", "category": "attribute", "l2-category": "perception",
         "image": base64.b64encode(img0).decode()},
        # pandas writes missing cells as "nan"; only A-C exist; the image is a reference to row 0's
        {"index": 1, "question": "How many?", "hint": "nan", "A": "1", "B": "2", "C": "3", "D": "nan",
         "answer": "c", "category": "count", "image": "0"},
        {"index": 2, "question": "Which one?", "A": "x", "B": "y", "answer": "A", "category": "count",
         "image": base64.b64encode(img1).decode()},
    ]
    return _write(tmp_path / "mmb.tsv", rows), img0, img1


def test_parse_rows(tsv):
    path, img0, img1 = tsv
    samples = list(read_mmbench_tsv(path))
    assert [s.id for s in samples] == ["0", "1", "2"]
    s0, s1, s2 = samples
    assert s0.images == [img0] and s1.images == [img0] and s2.images == [img1]  # exact bytes, reference resolved
    user = s0.turns[0].text
    assert user == (IMAGE_PLACEHOLDER + "\nLook closely.\nWhat colour is the shape?\nA. red\nB. blue\nC. green\n"
                    "D. yellow\n" + MC_INSTRUCTION)
    assert s0.turns[1].role == "assistant" and s0.turns[1].text == "B"
    assert s0.meta["options"] == {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    assert s0.meta["category"] == "attribute" and s0.meta["l2-category"] == "perception"
    assert s0.meta["hint"] == "Look closely." and "image" not in s0.meta
    assert s1.meta["options"] == {"A": "1", "B": "2", "C": "3"} and s1.meta["answer"] == "C"
    assert "hint" not in s1.meta and "nan" not in s1.turns[0].text and "D." not in s1.turns[0].text
    assert s0.pil_images()[0].size == (28, 28)
    # content hashes are deterministic and differ between rows with different questions
    assert s0.content_hash == next(iter(read_mmbench_tsv(path))).content_hash != s1.content_hash


def test_dispatch_by_suffix(tsv):
    path, _, _ = tsv
    assert [s.id for s in load_eval_samples(path)] == ["0", "1", "2"]


def test_no_answer_column(tmp_path):
    header = [h for h in HEADER if h != "answer"]
    p = _write(tmp_path / "test.tsv", [{"index": 5, "question": "q", "A": "a", "B": "b",
                                        "image": base64.b64encode(_png(2)).decode()}], header)
    (s,) = list(read_mmbench_tsv(p))
    assert s.meta["answer"] is None and s.turns[-1].text == ""


def test_bad_rows(tmp_path):
    good = base64.b64encode(_png(3)).decode()
    rows = [
        {"index": 0, "question": "q", "A": "a", "B": "b", "answer": "A", "image": "!!notbase64!!" * 10},
        {"index": 1, "question": "q", "A": "a", "B": "b", "answer": "A", "image": "99"},
        {"index": 2, "question": "q", "A": "a", "answer": "A", "image": good},
        {"index": 3, "question": "q", "A": "a", "B": "b", "answer": "D", "image": good},
        {"index": 4, "question": "q", "A": "a", "B": "b", "answer": "A",
         "image": base64.b64encode(b"not an image at all" * 5).decode()},
        {"index": 5, "question": "q", "A": "a", "B": "b", "answer": "B", "image": good},
        {"index": 5, "question": "q2", "A": "a", "B": "b", "answer": "B", "image": good},
    ]
    p = _write(tmp_path / "bad.tsv", rows)
    with pytest.raises(BadSampleError, match=r"bad.tsv:2: sample '0': image is not valid base64"):
        list(read_mmbench_tsv(p))
    policy = BadSamplePolicy("skip")
    kept = list(read_mmbench_tsv(p, on_bad_sample=policy))
    assert [s.id for s in kept] == ["5"]
    reasons = dict(zip(policy.report.ids, (e.reason for e in policy.report.entries)))
    assert "refers to no row" in reasons["1"]
    assert "fewer than 2 options" in reasons["2"]
    assert "not one of the options" in reasons["3"]
    assert "unreadable image" in reasons["4"]
    assert policy.report.count == 6 and "duplicate" in policy.report.entries[-1].reason


def test_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_mmbench_tsv(tmp_path / "nope.tsv")
    p = _write(tmp_path / "cols.tsv", [], header=["index", "question", "A"])
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['B'\]"):
        read_mmbench_tsv(p)
