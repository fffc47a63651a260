"""Scoring rules on hand-written, messy model outputs."""

from __future__ import annotations

import pytest

from vlsi.eval.scoring import aggregate, extract_choice, gold_answer, normalize_answer, options_map, score
from vlsi.models.data import Sample, Turn

OPTS = ["red", "blue", "green circle", "yellow"]  # A B C D


@pytest.mark.parametrize("text,want", [
    ("B", "B"),
    ("b", "B"),
    ("(c)", "C"),
    ("D.", "D"),
    ("  A  ", "A"),
    ("The answer is (B).", "B"),
    ("The correct answer is C because the circle is green.", "C"),
    ("Answer: C", "C"),
    ("answer: b", "B"),
    ("b) blue", "B"),
    ("B. red", "B"),  # the explicit letter wins over the option text
    ("Option D is right", "D"),
    ("I think (A) fits", "A"),
    ("blue", "B"),
    ("Yellow!", "D"),
    ("It is a green circle.", "C"),
    ("green", "C"),  # part of exactly one option's text
    ("The answer is blue.", "B"),
    ("I pick C", "C"),
    ("the answer is a red one", "A"),  # "a" is an article here; "red" names option A
])
def test_extract_choice(text, want):
    assert extract_choice(text, OPTS) == want


@pytest.mark.parametrize("text", [
    "", "Nothing fits", "A and B", "red or blue", "E", "The answer is E.", None, "!!!",
])
def test_extract_choice_none_or_ambiguous(text):
    assert extract_choice(text, OPTS) is None


def test_extract_choice_nested_option_texts():
    opts = ["red", "red circle", "blue", "green"]
    assert extract_choice("red circle", opts) == "B"
    assert extract_choice("a red circle it is", opts) == "B"  # "red" inside "red circle" is not a pick of A
    assert extract_choice("red", opts) == "A"
    assert extract_choice("the red one, not the red circle", opts) is None
    assert extract_choice("blue", ["blue circle", "blue square", "red", "x"]) is None  # in two options


def test_extract_choice_dict_options_and_letters_beyond_d():
    opts = {"A": "cat", "B": "dog", "C": "", "E": "fish"}  # empty option dropped; E valid
    assert options_map(opts) == {"A": "cat", "B": "dog", "E": "fish"}
    assert extract_choice("E", opts) == "E"
    assert extract_choice("C", opts) is None
    assert extract_choice("a dog", opts) == "B"


@pytest.mark.parametrize("text,want", [
    ("Three.", "3"),
    ("THE Cat", "cat"),
    ("twenty-one", "21"),
    ("3.5", "3.5"),
    ("-2 apples", "-2 apples"),
    ("An apple, a pear", "apple pear"),
    ("  left  ", "left"),
    (7, "7"),
    (None, ""),
    ("zero", "0"),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def _sample(answer, options=None, category="colour", turns=None):
    meta = {"category": category}
    if answer is not None:
        meta["answer"] = answer
    if options is not None:
        meta["options"] = options
    turns = turns or [Turn("user", "q?"), Turn("assistant", str(answer) if answer is not None else "")]
    return Sample(id="x", turns=turns, images=[], meta=meta)


def test_score_short_and_mc():
    assert score("Three", _sample("3"))["correct"]
    assert score("the blue.", _sample("blue"))["correct"]
    assert not score("blue circle", _sample("blue"))["correct"]  # exact match after normalisation, no containment
    r = score("The answer is (C).", _sample("C", OPTS))
    assert r == {"kind": "mc", "gold": "C", "extracted": "C", "correct": True}
    assert score("yellow", _sample("yellow", OPTS))["correct"]  # gold given as option text
    assert not score("A", _sample("C", OPTS))["correct"]


def test_gold_falls_back_to_last_assistant_turn():
    s = Sample(id="m", turns=[Turn("user", "q1"), Turn("assistant", "red"), Turn("user", "q2"),
                              Turn("assistant", "circle")], images=[], meta={})
    assert gold_answer(s) == "circle"
    assert score("Circle.", s)["correct"]
    unscored = score("x", _sample(None, turns=[Turn("user", "q"), Turn("assistant", "")]))
    assert unscored["gold"] is None and not unscored["correct"]


def test_aggregate():
    rows = [
        {"correct": True, "gold": "a", "category": "colour", "kind": "short"},
        {"correct": False, "gold": "b", "category": "colour", "kind": "short"},
        {"correct": True, "gold": "C", "category": "sequence", "kind": "mc"},
        {"correct": False, "gold": None, "category": "sequence", "kind": "mc"},
    ]
    agg = aggregate(rows)
    assert agg["n"] == 3 and agg["correct"] == 2 and agg["n_unscored"] == 1
    assert agg["accuracy"] == pytest.approx(2 / 3)
    assert agg["per_category"] == {"colour": {"accuracy": 0.5, "n": 2, "correct": 1},
                                   "sequence": {"accuracy": 1.0, "n": 1, "correct": 1}}
    assert agg["per_kind"]["mc"]["n"] == 1
    assert aggregate([])["accuracy"] is None
    assert aggregate([{"correct": True, "gold": "a"}])["per_category"] == {}
