"""Scoring of generated answers: option-letter extraction, answer normalisation, accuracy aggregation.

Pure functions (no torch, no I/O), so every rule is unit-tested on hand-written strings.

Contracts:

* Multiple choice (the sample's ``meta["options"]`` is a list of option texts, lettered A, B, ... in order, or a
  ``{letter: text}`` dict): the prediction is reduced to a letter by :func:`extract_choice` and compared with the
  gold letter (``meta["answer"]``; a gold answer given as the option's text is mapped to its letter).
* Short answer: :func:`normalize_answer` on both sides, then exact string equality.
* The gold answer is ``meta["answer"]`` when present, otherwise the text of the sample's last assistant turn.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "extract_choice",
    "normalize_answer",
    "options_map",
    "gold_answer",
    "score",
    "aggregate",
]

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
         "ninety": 90}
NUMBER_WORDS: dict[str, int] = {w: i for i, w in enumerate(_UNITS)} | _TENS | {"hundred": 100}
_ARTICLES = frozenset({"a", "an", "the"})
# Keep digits' decimal point and minus sign meaningful ("3.5", "-2"): punctuation elsewhere becomes a space.
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def _number_words_to_digits(tokens: list[str]) -> list[str]:
    """["twenty", "one"] -> ["21"], ["three"] -> ["3"]; hyphenated forms were split before."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        w = tokens[i]
        if w in _TENS and i + 1 < len(tokens) and tokens[i + 1] in NUMBER_WORDS and NUMBER_WORDS[tokens[i + 1]] < 10:
            out.append(str(_TENS[w] + NUMBER_WORDS[tokens[i + 1]]))
            i += 2
            continue
        out.append(str(NUMBER_WORDS[w]) if w in NUMBER_WORDS else w)
        i += 1
    return out


def normalize_answer(text: Any) -> str:
    """Canonical form of a short answer for exact-match scoring.

    Lowercase; number words become digits ("Three" -> "3", "twenty-one" -> "21"); punctuation is removed (except a
    decimal point between digits and a leading minus); the articles a/an/the are dropped; whitespace collapsed.
    ``None`` becomes "".
    """
    if text is None:
        return ""
    s = str(text).lower().strip()
    # protect "3.5" and "-2" before punctuation goes
    s = re.sub(r"(?<=\d)\.(?=\d)", "\x00", s)
    s = re.sub(r"(^|\s)-(?=\d)", "\\1\x01", s)
    s = s.translate(_PUNCT).replace("\x00", ".").replace("\x01", "-")
    tokens = [t for t in s.split() if t not in _ARTICLES]
    return " ".join(_number_words_to_digits(tokens))


def options_map(options: Any) -> dict[str, str]:
    """Options as ``{letter: text}``: a list is lettered A, B, ... in order; a dict is taken as given (keys
    upper-cased).

    Empty / missing options (NaN cells of an MMBench TSV, ``None``) are dropped.
    """
    if options is None:
        return {}
    if isinstance(options, Mapping):
        items = [(str(k).strip().upper(), v) for k, v in options.items()]
    elif isinstance(options, (list, tuple)):
        items = [(string.ascii_uppercase[i], v) for i, v in enumerate(options)]
    else:
        raise TypeError(f"options must be a list or a dict, got {type(options).__name__}")
    out = {}
    for k, v in items:
        if v is None or (isinstance(v, float) and v != v):  # NaN
            continue
        v = str(v).strip()
        if v:
            out[k] = v
    return out


def _word_re(phrase: str) -> re.Pattern:
    return re.compile(r"(?<![a-z0-9])" + re.escape(phrase) + r"(?![a-z0-9])")


def extract_choice(text: Any, options: Any) -> str | None:
    """The option letter a free-text answer picks, or ``None`` when it picks none or is ambiguous.

    Tried in order (the first rule that yields exactly one valid letter wins):

    1. the whole answer is a letter, bare or decorated: ``"B"``, ``"(b)"``, ``"C."``;
    2. an explicit marker: ``"The answer is (B)."``, ``"Answer: C"``, ``"option D"``, ``"B) blue"``, ``"b. blue"``
       at the start, ``"(A)"`` anywhere;
    3. the option text: the normalised answer equals one option's text; or exactly one option's text occurs in it
       as whole words (a mention inside a longer option's mention does not count: "red circle" picks "red circle",
       not "red"); or the answer occurs inside exactly one option's text ("green" -> "green circle");
    4. a lone capital letter that is a valid option, when only one such letter occurs (``"I pick C"``); the article
       "A" before a lower-case word ("A red circle") is not a letter.
    """
    opts = options_map(options)
    if text is None or not opts:
        return None
    letters = set(opts)
    raw = str(text).strip()
    if not raw:
        return None
    ls = "".join(sorted(letters))

    def one(found: Iterable[str]) -> str | None:
        found = {f.upper() for f in found} & letters
        return found.pop() if len(found) == 1 else None

    # 1. bare letter
    m = re.fullmatch(rf"[\s(\[]*([{ls}{ls.lower()}])[\s)\].:,]*", raw)
    if m:
        return m.group(1).upper()
    # 2. explicit markers. A lower-case letter counts only when punctuation or the end follows it, so the article
    # in "the answer is a red circle" is not read as option A.
    def marked(pat: str) -> str | None:
        found = []
        for m in re.finditer(pat, raw, flags=re.IGNORECASE):
            letter, rest = m.group(1), raw[m.end():]
            if letter.islower() and not re.match(r"\s*(?:$|[).:,;\]!?])", rest):
                continue
            found.append(letter)
        return one(found)

    for pat in (
        rf"\banswer\s*(?:is|would be|:)?\s*:?\s*(?:option\s*)?[(\[]?([{ls}])(?![a-z0-9'])",
        rf"\b(?:option|choice)\s*[(\[]?([{ls}])(?![a-z0-9'])",
        rf"^[(\[]?([{ls}])(?=[).:\]]|\s*-\s)",
    ):
        got = marked(pat)
        if got:
            return got
    got = one(re.findall(rf"[(\[]([{ls}])[)\]]", raw))
    if got:
        return got
    # 3. option text
    norm = normalize_answer(raw)
    norm_opts = {k: normalize_answer(v) for k, v in opts.items()}
    exact = [k for k, v in norm_opts.items() if v and v == norm]
    if len(exact) == 1:
        return exact[0]
    spans = {k: [m.span() for m in _word_re(v).finditer(norm)] for k, v in norm_opts.items() if v}
    spans = {k: sp for k, sp in spans.items() if sp}
    # An option whose every mention lies inside another option's mention ("red" in "red circle") is not a pick.
    picked = [k for k, sp in spans.items()
              if not all(any(o != k and a <= s0 and e0 <= b and (b - a) > (e0 - s0)
                             for o, osp in spans.items() for a, b in osp) for s0, e0 in sp)]
    if len(picked) == 1:
        return picked[0]
    if len(picked) > 1:
        return None  # several options named: ambiguous, and a stray capital letter must not decide it
    # The answer is part of exactly one option's text ("green" for "green circle").
    if len(norm) > 1:
        inside = [k for k, v in norm_opts.items() if _word_re(norm).search(v)]
        if len(inside) == 1:
            return inside[0]
    # 4. lone capital letter
    found = [m.group(1) for m in re.finditer(rf"(?<![A-Za-z'])([{ls}])(?![A-Za-z'])", raw)
             if not (m.group(1) == "A" and re.match(r"\s+(?!and\b|or\b)[a-z]", raw[m.end():]))]
    return one(found)


def gold_answer(sample) -> str | None:
    """The gold answer of ``sample``: ``meta["answer"]``, else the last assistant turn's text, else ``None``."""
    meta = getattr(sample, "meta", None) or {}
    ans = meta.get("answer")
    if ans is not None and not (isinstance(ans, float) and ans != ans):
        return str(ans)
    for turn in reversed(getattr(sample, "turns", []) or []):
        if turn.role == "assistant" and turn.text.strip():
            return turn.text
    return None


def score(pred: str, sample) -> dict:
    """Score one prediction against ``sample``'s gold answer.

    Returns ``{"kind": "mc"|"short", "gold", "extracted", "correct": bool}``; ``correct`` is False when the sample
    has no gold answer (``gold`` is then ``None``, and :func:`aggregate` counts it under ``n_unscored``).
    """
    meta = getattr(sample, "meta", None) or {}
    gold = gold_answer(sample)
    opts = options_map(meta.get("options"))
    if opts:
        gold_letter = None
        if gold is not None:
            g = gold.strip()
            if g.upper() in opts:
                gold_letter = g.upper()
            else:  # gold written as the option's text
                gold_letter = next((k for k, v in opts.items() if normalize_answer(v) == normalize_answer(g)), None)
        got = extract_choice(pred, opts)
        return {"kind": "mc", "gold": gold_letter, "extracted": got,
                "correct": gold_letter is not None and got == gold_letter}
    got = normalize_answer(pred)
    return {"kind": "short", "gold": gold, "extracted": got,
            "correct": gold is not None and got == normalize_answer(gold)}


def _acc(correct: int, n: int) -> float | None:
    return correct / n if n else None


def aggregate(rows: Iterable[Mapping]) -> dict:
    """Accuracy overall, per category and per kind from per-sample rows (``correct``, ``gold``, ``category``,
    ``kind``).

    Samples without a gold answer are counted in ``n_unscored`` and left out of every accuracy. Returns
    ``{"accuracy", "n", "correct", "n_unscored", "per_category": {cat: {"accuracy", "n", "correct"}},
    "per_kind": {...}}``; ``per_category`` is empty when no row has a category. Accuracies are fractions in [0, 1]
    (``None`` for an empty group).
    """
    total = correct = unscored = 0
    cats: dict[str, list[int]] = {}
    kinds: dict[str, list[int]] = {}
    for r in rows:
        if r.get("gold") is None:
            unscored += 1
            continue
        ok = int(bool(r["correct"]))
        total += 1
        correct += ok
        for key, groups in ((r.get("category"), cats), (r.get("kind"), kinds)):
            if key is not None:
                g = groups.setdefault(str(key), [0, 0])
                g[0] += ok
                g[1] += 1

    def group(d):
        return {k: {"accuracy": _acc(c, n), "n": n, "correct": c} for k, (c, n) in sorted(d.items())}

    return {"accuracy": _acc(correct, total), "n": total, "correct": correct, "n_unscored": unscored,
            "per_category": group(cats), "per_kind": group(kinds)}
