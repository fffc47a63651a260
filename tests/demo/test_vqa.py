"""Procedural VQA generator: determinism, disjoint splits, and answers re-derived from the pixels."""

from __future__ import annotations

import json
import re
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vlsi.demo import vqa
from vlsi.demo.vqa import CATEGORIES, COLOURS, SHAPES, generate_vqa, vqa_corpus_texts, vqa_command
from vlsi.models.data import read_dataset

SIZE = 64
N = {"n_train": 96, "n_val": 32, "n_test": 32}


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> dict[str, Path]:
    return generate_vqa(tmp_path_factory.mktemp("vqa"), seed=3, image_size=SIZE, **N)


@pytest.fixture(scope="module")
def samples(gen):
    return {split: list(read_dataset(path)) for split, path in gen.items()}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# pixel analysis, independent of the generator: connected components, colour by exact RGB, shape by geometry

_RGB_TO_COLOUR = {v: k for k, v in COLOURS.items()}


def _components(rgb: np.ndarray) -> list[dict]:
    """4-connected components of non-white pixels: colour name (or 'blank'), centroid, bbox, pixel mask."""
    h, w, _ = rgb.shape
    fg = np.any(rgb != 255, axis=2)
    seen = np.zeros_like(fg)
    out = []
    for y0, x0 in zip(*np.nonzero(fg)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        q, pts = deque([(y0, x0)]), []
        while q:
            y, x = q.popleft()
            pts.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        ys, xs = np.array(pts).T
        colours = {tuple(int(c) for c in rgb[y, x]) for y, x in pts}
        assert len(colours) == 1, f"component with several colours {colours} (anti-aliasing or overlap)"
        (c,) = colours
        out.append({"colour": _RGB_TO_COLOUR.get(c, "blank" if c == (150, 150, 150) else c),
                    "x": xs.mean() + 0.5, "y": ys.mean() + 0.5, "ys": ys - ys.min(), "xs": xs - xs.min(),
                    "h": ys.max() - ys.min() + 1, "w": xs.max() - xs.min() + 1})
    return out


def _shape(comp: dict) -> str:
    """Classify a filled component: squares fill their box, circles ~pi/4, triangles and diamonds ~1/2."""
    fill = len(comp["ys"]) / (comp["h"] * comp["w"])
    if fill > 0.9:
        return "square"
    if fill > 0.66:
        return "circle"
    widths = np.bincount(comp["ys"], minlength=comp["h"])
    widest_row = np.flatnonzero(widths == widths.max()).mean() / (comp["h"] - 1)
    return "triangle" if widest_row > 0.75 else "diamond"


def _objects(image) -> list[dict]:
    objs = _components(np.asarray(image))
    for o in objs:
        o["shape"] = _shape(o) if o["colour"] != "blank" else "blank"
    return objs


def _reading_order(objs, size):
    # rows first (top to bottom), then left to right
    return sorted(objs, key=lambda o: (round(o["y"] / (size / 3)), o["x"]))


def _gold(sample) -> str:
    """The answer as words (multiple choice answers with the option's text, one of 4 distinct options)."""
    answer = sample.meta["answer"]
    if "options" in sample.meta:
        assert len(sample.meta["options"]) == 4 and len(set(sample.meta["options"])) == 4
        assert answer in sample.meta["options"]
    return answer


def _derive(sample, size: int = SIZE) -> str:
    """Answer the last question from the pixels (and the question text) alone."""
    q = sample.turns[-2].text
    imgs = [_objects(im) for im in sample.pil_images()]
    cat = sample.meta["category"]
    if cat == "text":
        m = re.search(r"The (\w+) is (?:a )?(\w+)\. What (colour|shape) is the (\w+)\?", q)
        assert m[1] == m[4] and m[2] in (COLOURS if m[3] == "colour" else SHAPES)
        return m[2]
    if cat == "two_image":
        (a,), (b,) = imgs
        key = "colour" if "colour" in q else "shape"
        return "yes" if a[key] == b[key] else "no"
    (objs,) = imgs
    if cat in ("colour", "shape", "multi_turn"):
        (o,) = objs
        return o["colour"] if "colour" in q else o["shape"]
    if cat == "count":
        if m := re.search(r"How many (\w+)s are there", q):
            return str(sum(o["shape"] == m[1] for o in objs)) if m[1] != "shape" else str(len(objs))
    if cat == "position":
        m = re.search(r"Is the (\w+) (\w+) on the left", q)
        (o,) = [o for o in objs if (o["colour"], o["shape"]) == (m[1], m[2])]
        return "left" if o["x"] < size / 2 else "right"
    if cat == "sequence":
        seq = _reading_order(objs, size)
        assert seq[-1]["shape"] == "blank" and len(seq) == 6
        items = [(o["colour"], o["shape"]) for o in seq[:5]]
        period = next(p for p in (1, 2, 3, 4) if all(items[i] == items[i + p] for i in range(5 - p)))
        assert period in (2, 3)
        return " ".join(items[5 - period])
    raise AssertionError(f"no derivation for {cat}")


# ---------------------------------------------------------------------------------------------------------------


def test_answers_match_the_pixels(samples):
    n = 0
    for split in samples.values():
        for s in split:
            gold = _gold(s)
            assert _derive(s) == gold, (s.id, s.meta["category"], [t.text for t in s.turns])
            assert 1 <= len(gold.split()) <= 4 and 1 <= len(s.meta["answer"].split()) <= 4
            n += 1
    assert n == sum(N.values())


@pytest.mark.parametrize("size", [48, 56])
def test_smallest_images_stay_legible(tmp_path, size):
    # below ~5 px radius a drawn circle is an octagon that reads as a square: the generator must not go there
    paths = generate_vqa(tmp_path, n_train=160, n_val=0, n_test=0, seed=5, image_size=size)
    for s in read_dataset(paths["train"]):
        assert _derive(s, size) == _gold(s), (s.id, s.meta["category"])
    with pytest.raises(ValueError, match="image_size must be >= 48"):
        generate_vqa(tmp_path, n_train=1, n_val=0, n_test=0, image_size=40)


def test_scene_metadata_matches_the_pixels(samples):
    for s in samples["train"]:
        for scene, im in zip(s.meta["scene"], s.pil_images(), strict=True):
            rgb = np.asarray(im)
            objs = [o for o in _objects(im) if o["shape"] != "blank"]
            assert len(objs) == len(scene), s.id  # shapes never touch: one component per object
            for o in scene:
                assert tuple(rgb[int(o["y"]), int(o["x"])]) == COLOURS[o["colour"]], s.id  # centre pixel
                # a triangle's centroid lies 0.2 r below its centre (x, y)
                (match,) = [c for c in objs if abs(c["x"] - o["x"]) < 3 and abs(c["y"] - o["y"]) < 0.25 * o["r"] + 2]
                assert (match["colour"], match["shape"]) == (o["colour"], o["shape"]), s.id


def test_shape_classifier_is_not_vacuous(samples):
    # the pixel checks above only mean something if every shape and colour actually occurs
    seen = {(o["shape"], o["colour"]) for split in samples.values() for s in split for sc in s.meta["scene"]
            for o in sc}
    assert {s for s, _ in seen} == set(SHAPES) and {c for _, c in seen} == set(COLOURS)


def test_structure(samples):
    train = samples["train"]
    cats = {s.meta["category"] for s in train}
    assert cats == set(CATEGORIES)
    for s in train:
        n_img = {"text": 0, "two_image": 2}.get(s.meta["category"], 1)
        assert len(s.images) == s.num_placeholders == n_img == len(s.meta["scene"])
        assert s.images == [] or all(im.size == (SIZE, SIZE) for im in s.pil_images())
        roles = [t.role for t in s.turns]
        assert roles == ["user", "assistant"] * (2 if s.meta["category"] == "multi_turn" else 1)
        if s.meta["category"] == "multi_turn":
            assert s.meta["answers"] == [s.turns[1].text, s.turns[3].text]
        assert s.turns[-1].text == s.meta["answer"]
        if "options" in s.meta:
            assert all(f"{l}. {o}" in s.turns[-2].text for l, o in zip("ABCD", s.meta["options"]))
    assert any("options" in s.meta for s in train) and any("options" not in s.meta for s in train)
    # the gold option's letter is not always the same (no trivial majority position)
    letters = ["ABCD"[s.meta["options"].index(s.meta["answer"])] for s in train if "options" in s.meta]
    assert len(set(letters)) == 4


def test_splits_disjoint(samples):
    ids = [s.id for split in samples.values() for s in split]
    assert len(ids) == len(set(ids))
    hashes = {k: {s.content_hash for s in v} for k, v in samples.items()}
    assert not (hashes["train"] & hashes["val"]) and not (hashes["train"] & hashes["test"])
    assert not (hashes["val"] & hashes["test"])


def test_deterministic(gen, tmp_path):
    root = gen["train"].parent
    again = generate_vqa(tmp_path / "again", seed=3, image_size=SIZE, **N)
    assert _tree(again["train"].parent) == _tree(root)  # byte-identical files, images included
    other = generate_vqa(tmp_path / "other", seed=4, image_size=SIZE, **N)
    h_other = {s.content_hash for s in read_dataset(other["train"])}
    h_base = {s.content_hash for s in read_dataset(gen["train"])}
    assert len(h_other & h_base) < len(h_base) // 10  # a different seed gives different data


def test_test_split_does_not_depend_on_train_size(gen, tmp_path):
    small = generate_vqa(tmp_path / "small", seed=3, image_size=SIZE, n_train=5, n_val=32, n_test=32)
    assert small["test"].read_bytes() == gen["test"].read_bytes()
    assert small["val"].read_bytes() == gen["val"].read_bytes()


def test_label_noise_corrupts_that_fraction_of_train_answers_with_wrong_ones_of_the_same_kind(gen, tmp_path):
    noisy = generate_vqa(tmp_path / "noisy", seed=3, image_size=SIZE, label_noise=0.4, n_teacher=48, **N)
    clean = {s.id: s for s in read_dataset(gen["train"])}
    train = list(read_dataset(noisy["train"]))
    corrupted = [s for s in train if s.meta.get("label_noise")]
    assert 0.25 < len(corrupted) / len(train) < 0.55  # 0.4 of 96 draws
    for s in train:
        ref = clean[s.id]
        assert s.images == ref.images and [t.role for t in s.turns] == [t.role for t in ref.turns]
        assert [t.text for t in s.turns if t.role == "user"] == [t.text for t in ref.turns if t.role == "user"]
        answers = [t.text for t in s.turns if t.role == "assistant"]
        gold = [t.text for t in ref.turns if t.role == "assistant"]
        if not s.meta.get("label_noise"):
            assert answers == gold
            continue
        assert s.meta["clean_answers"] == gold and s.meta["answer"] == answers[-1]
        for wrong, right in zip(answers, gold):
            assert wrong != right
            if "options" in ref.meta:
                assert wrong in ref.meta["options"]
            else:
                kinds = [set(COLOURS), set(SHAPES), {str(k) for k in range(8)}, {"left", "right"}, {"yes", "no"}]
                assert any(wrong in k and right in k for k in kinds), (s.id, wrong, right)
    for split in ("val", "test"):  # only train is noisy
        assert noisy[split].read_bytes() == gen[split].read_bytes()
    teacher = list(read_dataset(noisy["teacher"]))
    assert len(teacher) == 48 and not any(s.meta.get("label_noise") for s in teacher)
    others = {vqa.content_hash_clean(s) for split in ("train", "val", "test") for s in read_dataset(noisy[split])}
    assert not others & {s.content_hash for s in teacher}  # the teacher's split is its own
    assert len(others) > 0.9 * sum(N.values())


def test_corpus_covers_every_word(samples):
    corpus = vqa_corpus_texts()
    assert corpus == vqa_corpus_texts()
    vocab = set(re.findall(r"[\w']+|[^\w\s]", " ".join(corpus)))
    for split in samples.values():
        for s in split:
            for t in s.turns:
                words = set(re.findall(r"[\w']+|[^\w\s]", t.text))
                assert words <= vocab, (s.id, words - vocab)
    assert {"<image>", "A", "D", "9"} <= set(corpus)


def test_cli(tmp_path):
    runner = CliRunner()
    assert "--n-train" in runner.invoke(vqa_command, ["--help"]).output
    res = runner.invoke(vqa_command, ["--out", str(tmp_path), "--n-train", "3", "--n-val", "2", "--n-test", "1"])
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "train.json").read_text())) == 3
    assert len(list(read_dataset(tmp_path / "test.json"))) == 1
    res = runner.invoke(vqa_command, ["--out", str(tmp_path / "noisy"), "--n-train", "3", "--n-val", "2",
                                      "--n-test", "1", "--n-teacher", "2", "--label-noise", "0.5"])
    assert res.exit_code == 0 and "teacher:" in res.output, res.output
    assert len(list(read_dataset(tmp_path / "noisy" / "teacher.json"))) == 2
    bad = runner.invoke(vqa_command, ["--out", str(tmp_path / "bad"), "--label-noise", "1.0"])
    assert bad.exit_code != 0 and "label-noise" in bad.output
