"""MMBench-style TSV reader -> :class:`vlsi.models.data.Sample`.

The TSV layout of MMBench / VLMEvalKit: one row per question with columns ``index``, ``question``, ``hint``,
``A``..``D`` (more letters allowed; empty cells = no such option), ``answer`` (a letter; absent in test splits),
``category`` (+ optional ``l2-category``, ``split``, ``source``...) and ``image`` (base64-encoded image bytes). As in
VLMEvalKit, an ``image`` cell of at most 64 characters that is another row's ``index`` reuses that row's image
(MMBench stores each circular-evaluation image once).

The prompt follows LLaVA's MMBench evaluation: ``<hint>\\n<question>\\nA. ...\\nB. ...\\nAnswer with the option's
letter from the given choices directly.`` preceded by the image placeholder. ``meta`` carries ``category``,
``answer`` (letter), ``options`` (``{letter: text}``), ``hint`` and every other column except the image.
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import string
import sys
from collections.abc import Iterator
from pathlib import Path

from vlsi.models.data import IMAGE_PLACEHOLDER, BadSamplePolicy, Sample, Turn
from vlsi.models.errors import BadSampleError, DatasetError

__all__ = ["MC_INSTRUCTION", "read_mmbench_tsv", "mmbench_prompt"]

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_REQUIRED = ("index", "question", "A", "B")
_IMAGE_REF_MAX = 64


def _cell(v: str | None) -> str | None:
    # pandas-written TSVs spell missing cells "nan"/"NaN"; csv gives "" for empty ones
    if v is None:
        return None
    v = v.strip()
    return None if v == "" or v.lower() in ("nan", "none", "null") else v


def mmbench_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """The user prompt text (without the image placeholder) for one MMBench question."""
    lines = ([hint] if hint else []) + [question]
    lines += [f"{k}. {v}" for k, v in options.items()]
    lines.append(MC_INSTRUCTION)
    return "\n".join(lines)


def read_mmbench_tsv(
    path: str | os.PathLike,
    *,
    on_bad_sample: str | BadSamplePolicy = "error",
) -> Iterator[Sample]:
    """Iterate the rows of an MMBench-style TSV as samples (one user turn with the image, one assistant turn with
    the gold letter or ``""`` when the split has no answers).

    Whole-file problems (missing file, missing columns) raise :class:`DatasetError` at call time; a bad row (bad
    base64, unreadable image, dangling image reference, no options) goes through ``on_bad_sample``.
    """
    path = Path(path)
    policy = on_bad_sample if isinstance(on_bad_sample, BadSamplePolicy) else BadSamplePolicy(on_bad_sample)
    if not path.is_file():
        raise DatasetError(f"{path}: TSV file not found")
    csv.field_size_limit(sys.maxsize)  # base64 images are far over csv's default 128 KB cell limit
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter="\t"), None)
    if not header:
        raise DatasetError(f"{path}: empty TSV (no header row)")
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing} (columns: {header})")
    letters = [c for c in string.ascii_uppercase if c in header]
    return _rows(path, policy, letters, has_image="image" in header)


def _rows(path: Path, policy: BadSamplePolicy, letters: list[str], *, has_image: bool) -> Iterator[Sample]:
    images_by_index: dict[str, str] = {}
    if has_image:
        # First pass: the base64 of every row that carries one, so reference cells can point forwards too.
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                img = _cell(row.get("image"))
                if img is not None and len(img) > _IMAGE_REF_MAX:
                    images_by_index[str(row["index"]).strip()] = img
    seen: set[str] = set()
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.DictReader(f, delimiter="\t"), start=2):
            source = f"{path}:{lineno}"
            try:
                sample = _to_sample(row, letters, images_by_index, source, has_image)
                if sample.id in seen:
                    raise sample.bad("duplicate index (an earlier row has the same index)")
            except BadSampleError as err:
                policy.handle(err)
                continue
            seen.add(sample.id)
            yield sample


def _to_sample(row: dict, letters: list[str], images_by_index: dict[str, str], source: str,
               has_image: bool) -> Sample:
    sid = _cell(row.get("index"))
    if sid is None:
        raise BadSampleError(None, "empty index", source=source)

    def bad(reason: str) -> BadSampleError:
        return BadSampleError(sid, reason, source=source)

    question = _cell(row.get("question"))
    if question is None:
        raise bad("empty question")
    options = {k: v for k in letters if (v := _cell(row.get(k))) is not None}
    if len(options) < 2:
        raise bad(f"fewer than 2 options ({sorted(options)})")
    answer = _cell(row.get("answer"))
    if answer is not None:
        answer = answer.upper()
        if answer not in options:
            raise bad(f"answer {answer!r} is not one of the options {sorted(options)}")
    hint = _cell(row.get("hint"))
    images = []
    if has_image:
        img = _cell(row.get("image"))
        if img is None:
            raise bad("empty image cell")
        if len(img) <= _IMAGE_REF_MAX:
            if img not in images_by_index:
                raise bad(f"image cell {img!r} refers to no row with an image")
            img = images_by_index[img]
        try:
            images.append(base64.b64decode(img, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise bad(f"image is not valid base64: {exc}") from None
    prompt = mmbench_prompt(question, options, hint)
    user = (IMAGE_PLACEHOLDER + "\n") * len(images) + prompt
    meta = {k: v for k, v in ((k, _cell(v)) for k, v in row.items() if k is not None)
            if k not in ("index", "image", *letters) and v is not None}
    meta["options"] = options
    meta["answer"] = answer
    if "category" not in meta:
        meta["category"] = None
    sample = Sample(id=sid, turns=[Turn("user", user), Turn("assistant", answer or "")], images=images,
                    image_names=[f"<base64 image of row {sid}>"] * len(images), meta=meta, source=source)
    sample.pil_images()  # decode once now: an unreadable image is this row's error, not a crash mid-generation
    return sample
