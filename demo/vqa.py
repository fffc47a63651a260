"""Procedural VQA data for the embedded default: small images of coloured shapes + questions that need looking.

Categories (``meta["category"]``): ``colour``, ``shape``, ``count``, ``position``, ``sequence`` (a 2x3 grid read left
to right, top to bottom, whose last cell is blank: "which comes next", like VLsI's Figure 3), ``multi_turn`` (two
Q/A about one image), ``text`` (no image: the answer is stated in the question) and ``two_image``; single-object images
hold one large object near the centre. Some questions are multiple choice (``meta["options"]`` = 4 strings listed
as A-D; the answer is the option's text, which the scorer maps to its letter), the others short answers (1-2
words). ``meta["answer"]`` is the gold answer of the last turn, ``meta["scene"]`` lists, per image, the drawn
objects (``shape``, ``colour``, centre ``x``/``y`` and size ``r`` in pixels) so tests and eval can re-derive answers.

Determinism: every split draws from its own ``random.Random`` stream seeded by ``(seed, split)``; shapes are
rasterised with exact float maths on pixel centres (no anti-aliasing, no dependence on PIL's drawing code) and
written by a small PNG encoder with stored (uncompressed) deflate blocks and a palette, so the same seed gives
byte-identical files and content hashes on any machine and any Pillow/zlib version. Splits are disjoint by
construction: test is drawn first, then val, then train, and a draw whose content hash already appears in an
earlier split is redrawn.
"""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import click
import numpy as np

from vlsi.models.data import IMAGE_PLACEHOLDER, Sample, Turn, content_hash, write_llava_json

__all__ = [
    "COLOURS",
    "SHAPES",
    "CATEGORIES",
    "generate_vqa",
    "make_split",
    "vqa_corpus_texts",
    "render_scene",
    "encode_png",
]

# Palette index 0 is the background, 1..6 the shape colours, 7 the outline of the sequence task's blank cell.
BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BLANK_OUTLINE = (150, 150, 150)
_PALETTE = [BACKGROUND, *COLOURS.values(), BLANK_OUTLINE]
_COLOUR_INDEX = {name: i + 1 for i, name in enumerate(COLOURS)}
_BLANK_INDEX = len(_PALETTE) - 1

SHAPES = ("circle", "square", "triangle", "diamond")
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
# Things the text-only questions talk about (the answer is in the question, so the skill carries over to the test
# split: a fact question would be memorised in train, and the splits never share a sample).
# 40 nouns x 10 answers = 400 distinct text samples: enough for a teacher split of its own disjoint from the others
# (8 nouns left 80, which the train split alone used up).
NOUNS = ("ball", "box", "car", "cup", "hat", "kite", "book", "bag", "bike", "boat", "bell", "bowl", "chair", "clock",
         "coat", "door", "drum", "fan", "flag", "fork", "jar", "key", "lamp", "leaf", "mug", "pen", "plate", "ring",
         "shoe", "sock", "spoon", "rug", "tent", "toy", "train", "tree", "vase", "wall", "sofa", "kettle")
LETTERS = ("A", "B", "C", "D")

# Question templates (also the tokenizer corpus, through vqa_corpus_texts).
Q_COLOUR = ("What colour is the shape?", "What colour is the {shape}?")
Q_SHAPE = ("What shape is this?", "What shape is the {colour} object?")
Q_COUNT_ALL = "How many shapes are there?"
Q_COUNT_SHAPE = "How many {plural} are there?"
Q_POSITION = "Is the {colour} {shape} on the left or the right?"
Q_SEQUENCE = "Which shape comes next in the sequence?"
Q_FOLLOW_SHAPE = "And what shape is it?"
Q_FOLLOW_COLOUR = "And what colour is it?"
Q_SAME_COLOUR = "Are the shapes in both images the same colour?"
Q_SAME_SHAPE = "Are the shapes in both images the same shape?"
Q_TEXT_COLOUR = "The {noun} is {colour}. What colour is the {noun}?"
Q_TEXT_SHAPE = "The {noun} is a {shape}. What shape is the {noun}?"
MC_SUFFIX = "Answer with one of the options."

CATEGORIES = ("colour", "shape", "count", "position", "sequence", "multi_turn", "text", "two_image")
# One shuffled "deck" per 16 samples: every category appears in any 16 consecutive samples, in these proportions.
_DECK = ("colour", "colour", "colour", "shape", "shape", "shape", "multi_turn", "multi_turn", "two_image", "two_image",
         "count", "count", "position", "position", "sequence", "text")
# Below a 5-pixel radius a rasterised circle is an octagon indistinguishable from a square (measured), so no
# shape is drawn smaller; 48-pixel images are the smallest whose 3x3 grid still fits such shapes apart.
MIN_RADIUS = 5.0
MIN_IMAGE_SIZE = 48
_SPLIT_ORDER = ("test", "val", "train")  # drawn in this order; later splits avoid earlier splits' samples
_MAX_REDRAWS = 1000


# ---------------------------------------------------------------------------------------------------------------
# rendering


def _mask(shape: str, x: float, y: float, r: float, size: int) -> np.ndarray:
    """Pixels (tested at their centres) covered by ``shape`` centred at (x, y) with size ``r``."""
    c = np.arange(size, dtype=np.float64) + 0.5
    dx = c[None, :] - x
    dy = c[:, None] - y
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":  # half-side 0.85 r: about the circle's area, so size alone does not give the shape away
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "triangle":  # apex up at y - r, base at y + 0.8 r, half-base r; contains its centre (x, y)
        t = (dy + r) / (1.8 * r)
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= t * r)
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(objects: list[dict], size: int, blank: tuple[float, float, float] | None = None) -> np.ndarray:
    """Palette-index image ``uint8[size, size]`` of ``objects`` (dicts with shape, colour, x, y, r).

    ``blank`` = (x, y, half-side) draws the outline of the sequence task's empty cell.
    """
    img = np.zeros((size, size), dtype=np.uint8)
    for o in objects:
        img[_mask(o["shape"], o["x"], o["y"], o["r"], size)] = _COLOUR_INDEX[o["colour"]]
    if blank is not None:
        x, y, h = blank
        inner = _mask("square", x, y, (h - 1.0) / 0.85, size)
        outer = _mask("square", x, y, h / 0.85, size)
        img[outer & ~inner] = _BLANK_INDEX
    return img


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(indices: np.ndarray, palette: list[tuple[int, int, int]] = _PALETTE) -> bytes:
    """PNG bytes of a palette image; byte-identical everywhere (stored deflate blocks, filter 0, fixed chunks).

    Compression is skipped on purpose: zlib implementations (zlib, zlib-ng) emit different compressed bytes, and
    the content hash of every sample covers the image bytes. A 64x64 image is ~4 KB.
    """
    h, w = indices.shape
    raw = b"".join(b"\x00" + indices[row].tobytes() for row in range(h))
    stream = bytearray(b"\x78\x01")  # zlib header: deflate, 32K window, no dictionary
    for start in range(0, len(raw), 65535):
        block = raw[start:start + 65535]
        final = start + 65535 >= len(raw)
        stream += bytes([1 if final else 0]) + struct.pack("<HH", len(block), len(block) ^ 0xFFFF) + block
    stream += struct.pack(">I", zlib.adler32(raw) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)  # 8-bit palette, deflate, filter method 0, no interlace
    plte = b"".join(bytes(c) for c in palette)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"PLTE", plte)
            + _chunk(b"IDAT", bytes(stream)) + _chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------------------------
# scenes


def _q(v: float) -> float:
    """Quantise to half pixels: keeps the stored scene short and exactly representable."""
    return round(v * 2.0) / 2.0


def _obj(shape: str, colour: str, x: float, y: float, r: float) -> dict:
    return {"shape": shape, "colour": colour, "x": _q(x), "y": _q(y), "r": _q(r)}


def _single_object(rng: random.Random, size: int) -> dict:
    # One large object near the centre: its silhouette is then nearly the same pixel pattern wherever it is drawn,
    # which a from-scratch vision tower separates in the demo's budget; small objects anywhere in the image were
    # at chance (a linear probe of the untrained tower's features read shape at 35-44%, a large centred one 93-100%).
    r = rng.uniform(0.28, 0.38) * size
    jitter = 0.05 * size  # the diamond's reach 1.15 r + jitter stays inside the image
    return _obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), size / 2 + rng.uniform(-jitter, jitter),
                size / 2 + rng.uniform(-jitter, jitter), r)


def _grid_object(rng: random.Random, size: int, row: int, col: int, shape: str, colour: str) -> dict:
    # 3x3 cells; size <= 0.32 cell and jitter <= 0.06 cell keep shapes >= ~0.14 cell apart, so they never touch.
    cell = size / 3.0
    x = (col + 0.5) * cell + rng.uniform(-0.06, 0.06) * cell
    y = (row + 0.5) * cell + rng.uniform(-0.06, 0.06) * cell
    r = max(rng.uniform(0.24, 0.32) * cell, MIN_RADIUS)
    return _obj(shape, colour, x, y, r)


def _mc(rng: random.Random, question: str, answer: str, pool: list[str]) -> tuple[str, str, list[str]]:
    """(prompt with options, gold answer, options): the answer plus 3 distractors from ``pool``, shuffled.

    The gold answer is the option's text, not its letter: mapping a seen colour to a letter is a second skill a
    from-scratch model did not learn in the demo's budget (multiple choice was at chance in every category)."""
    distractors = rng.sample([p for p in pool if p != answer], 3)
    options = [answer, *distractors]
    rng.shuffle(options)
    lines = [question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)] + [MC_SUFFIX]
    return "\n".join(lines), answer, options


def _describe(o: dict) -> str:
    return f"{o['colour']} {o['shape']}"


def _make_sample(category: str, rng: random.Random, size: int, sid: str) -> Sample:
    """One sample of ``category``; every random choice comes from ``rng`` (the split's stream)."""
    ph = IMAGE_PLACEHOLDER + "\n"
    meta: dict = {"category": category}
    scenes: list[list[dict]] = []
    images: list[bytes] = []
    mc = rng.random() < 0.5

    def image(objects, blank=None):
        scenes.append(objects)
        images.append(encode_png(render_scene(objects, size, blank)))

    if category in ("colour", "shape"):
        o = _single_object(rng, size)
        image([o])
        if category == "colour":
            q = rng.choice(Q_COLOUR).format(shape=o["shape"])
            answer, pool = o["colour"], list(COLOURS)
        else:
            q = rng.choice(Q_SHAPE).format(colour=o["colour"])
            answer, pool = o["shape"], list(SHAPES)
        if mc:
            q, answer, meta["options"] = _mc(rng, q, answer, pool)
        turns = [Turn("user", ph + q), Turn("assistant", answer)]
    elif category == "count":
        n = rng.randint(1, 6)
        cells = rng.sample(range(9), n)
        objs = [_grid_object(rng, size, c // 3, c % 3, rng.choice(SHAPES), rng.choice(list(COLOURS))) for c in cells]
        image(objs)
        if rng.random() < 0.4:
            q, count = Q_COUNT_ALL, n
        else:
            present = sorted({o["shape"] for o in objs})
            shape = rng.choice(present) if rng.random() < 0.85 else rng.choice(SHAPES)
            q, count = Q_COUNT_SHAPE.format(plural=_PLURAL[shape]), sum(o["shape"] == shape for o in objs)
        answer = str(count)
        if mc:
            q, answer, meta["options"] = _mc(rng, q, answer, [str(k) for k in range(0, 8)])
        turns = [Turn("user", ph + q), Turn("assistant", answer)]
    elif category == "position":
        a_shape, a_colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        # the other object differs in shape or colour (or both), so the question names exactly one object
        while True:
            b_shape, b_colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            if (b_shape, b_colour) != (a_shape, a_colour):
                break
        a_left = rng.random() < 0.5
        a = _grid_object(rng, size, rng.randrange(3), 0 if a_left else 2, a_shape, a_colour)
        b = _grid_object(rng, size, rng.randrange(3), 2 if a_left else 0, b_shape, b_colour)
        image([a, b] if rng.random() < 0.5 else [b, a])
        q = Q_POSITION.format(colour=a_colour, shape=a_shape)
        answer = "left" if a_left else "right"
        turns = [Turn("user", ph + q), Turn("assistant", answer)]
    elif category == "sequence":
        period = rng.choice((2, 3))
        kind = rng.choice(("shape", "colour", "both"))
        shapes = rng.sample(SHAPES, period) if kind != "colour" else [rng.choice(SHAPES)] * period
        colours = rng.sample(list(COLOURS), period) if kind != "shape" else [rng.choice(list(COLOURS))] * period
        units = list(zip(shapes, colours))
        # 2 rows x 3 cells, read left to right then top to bottom; the 6th cell is the blank to fill.
        cell = size / 3.0
        objs = []
        for i in range(5):
            row, col = divmod(i, 3)
            s, c = units[i % period]
            objs.append(_obj(s, c, (col + 0.5) * cell, size / 2 + (row - 0.5) * cell, max(0.3 * cell, MIN_RADIUS)))
        image(objs, blank=((2 + 0.5) * cell, size / 2 + 0.5 * cell, max(0.3 * cell, MIN_RADIUS)))
        nxt = units[5 % period]
        answer = f"{nxt[1]} {nxt[0]}"
        # distractors: the pattern's other units first (the plausible mistakes), then random combinations
        pool = [f"{c} {s}" for s, c in units if (s, c) != nxt]
        while len(pool) < 3:
            extra = f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)}"
            if extra != answer and extra not in pool:
                pool.append(extra)
        q, answer, meta["options"] = _mc(rng, Q_SEQUENCE, answer, pool)
        turns = [Turn("user", ph + q), Turn("assistant", answer)]
    elif category == "multi_turn":
        o = _single_object(rng, size)
        image([o])
        if rng.random() < 0.5:
            qa = [(Q_COLOUR[0], o["colour"]), (Q_FOLLOW_SHAPE, o["shape"])]
        else:
            qa = [(Q_SHAPE[0], o["shape"]), (Q_FOLLOW_COLOUR, o["colour"])]
        turns = [Turn("user", ph + qa[0][0]), Turn("assistant", qa[0][1]),
                 Turn("user", qa[1][0]), Turn("assistant", qa[1][1])]
        answer = qa[1][1]
        meta["answers"] = [a for _, a in qa]
    elif category == "text":
        # No image: read the answer from the question (what a language model alone can do).
        noun = rng.choice(NOUNS)
        if rng.random() < 0.5:
            answer = rng.choice(list(COLOURS))
            q = Q_TEXT_COLOUR.format(noun=noun, colour=answer)
        else:
            answer = rng.choice(SHAPES)
            q = Q_TEXT_SHAPE.format(noun=noun, shape=answer)
        turns = [Turn("user", q), Turn("assistant", answer)]
    elif category == "two_image":
        o1 = _single_object(rng, size)
        o2 = _single_object(rng, size)
        same = rng.random() < 0.5  # balance yes/no instead of leaving it to chance (1/6 or 1/4 yes)
        if rng.random() < 0.5:
            o2["colour"] = o1["colour"] if same else rng.choice([c for c in COLOURS if c != o1["colour"]])
            q = Q_SAME_COLOUR
        else:
            o2["shape"] = o1["shape"] if same else rng.choice([s for s in SHAPES if s != o1["shape"]])
            q = Q_SAME_SHAPE
        answer = "yes" if same else "no"
        image([o1])
        image([o2])
        turns = [Turn("user", ph + ph + q), Turn("assistant", answer)]
    else:
        raise ValueError(f"unknown category {category!r} (known: {CATEGORIES})")

    meta["answer"] = answer
    meta["scene"] = scenes
    return Sample(id=sid, turns=turns, images=images, image_names=[], meta=meta)


def _answer_pool(category: str, answer: str, meta: dict) -> list[str]:
    """The answers a sample of ``category`` whose gold answer is ``answer`` could be given (``answer`` included)."""
    if "options" in meta:
        return list(meta["options"])
    if answer in COLOURS:
        return list(COLOURS)
    if answer in SHAPES:
        return list(SHAPES)
    pools = {"count": [str(k) for k in range(8)], "position": ["left", "right"], "two_image": ["yes", "no"]}
    if category not in pools:
        raise ValueError(f"no answer pool for category {category!r}, answer {answer!r}")
    return pools[category]


def _corrupt(sample: Sample, rng: random.Random) -> Sample:
    """``sample`` with every assistant answer replaced by a wrong one of the same kind (``_answer_pool``).

    The clean answers stay in ``meta["clean_answers"]`` (one per assistant turn) and ``meta["label_noise"]`` is
    True, so a noisy record says what it is."""
    meta = dict(sample.meta)
    category = meta["category"]
    turns, clean = [], []
    for t in sample.turns:
        if t.role == "assistant":
            clean.append(t.text)
            t = Turn("assistant", rng.choice([a for a in _answer_pool(category, t.text, meta) if a != t.text]))
        turns.append(t)
    meta.update(answer=turns[-1].text, clean_answers=clean, label_noise=True)
    if "answers" in meta:
        meta["answers"] = [t.text for t in turns if t.role == "assistant"]
    return Sample(id=sample.id, turns=turns, images=sample.images, image_names=sample.image_names, meta=meta)


def make_split(split: str, n: int, *, seed: int = 0, image_size: int = 64,
               exclude: set[str] | None = None, label_noise: float = 0.0) -> list[Sample]:
    """``n`` samples of ``split`` (ids ``"{split}-000000"`` ...), none whose content hash is in ``exclude``.

    ``label_noise``: the fraction of samples whose answers are replaced by wrong ones (:func:`_corrupt`), as in a
    machine-labelled instruction set. The corrupted samples are drawn from a stream of their own, so the images and
    questions are those of the clean split and ``exclude`` is checked on the clean samples."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    rng = random.Random(f"vlsi-demo-vqa/{seed}/{split}")  # str seeds hash with sha512: stable across runs
    noise_rng = random.Random(f"vlsi-demo-vqa/{seed}/{split}/label-noise")
    exclude = exclude or set()
    out: list[Sample] = []
    deck: list[str] = []
    for i in range(n):
        if not deck:
            deck = list(_DECK)
            rng.shuffle(deck)
        category = deck.pop()
        for _ in range(_MAX_REDRAWS):
            sample = _make_sample(category, rng, image_size, f"{split}-{i:06d}")
            if sample.content_hash not in exclude:
                break
        else:
            raise ValueError(f"split {split!r}: could not draw a {category!r} sample unseen in earlier splits; "
                             f"ask for fewer samples")
        if label_noise and noise_rng.random() < label_noise:
            sample = _corrupt(sample, noise_rng)
        out.append(sample)
    return out


def generate_vqa(out_dir, *, n_train: int, n_val: int, n_test: int, seed: int = 0, image_size: int = 64,
                 n_teacher: int = 0, label_noise: float = 0.0) -> dict[str, Path]:
    """Write ``train.json``, ``val.json``, ``test.json`` (LLaVA layout) and ``images/`` under ``out_dir``.

    ``n_teacher`` > 0 also writes ``teacher.json``: a clean split of its own, drawn last and disjoint from the others,
    for a teacher that must not have seen the students' samples. ``label_noise`` corrupts that fraction of the TRAIN
    split's answers (:func:`make_split`); val, test and teacher stay clean. Returns ``{split: path}``. Read the
    files back with :func:`vlsi.models.data.read_dataset`.
    """
    out_dir = Path(out_dir)
    counts = {"train": n_train, "val": n_val, "test": n_test, "teacher": n_teacher}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    taken: set[str] = set()
    paths: dict[str, Path] = {}
    for split in _SPLIT_ORDER + (("teacher",) if n_teacher else ()):
        samples = make_split(split, counts[split], seed=seed, image_size=image_size, exclude=taken,
                             label_noise=label_noise if split == "train" else 0.0)
        # the clean draws are what later splits must avoid (a corrupted sample hashes differently)
        taken.update(content_hash_clean(s) for s in samples)
        paths[split] = write_llava_json(samples, out_dir / f"{split}.json", image_dir=out_dir / "images")
    return {split: paths[split] for split in ("train", "val", "test", "teacher") if split in paths}


def content_hash_clean(sample: Sample) -> str:
    """The content hash of ``sample`` as drawn, before any label noise (:func:`_corrupt`)."""
    clean = iter((sample.meta or {}).get("clean_answers") or ())
    turns = [Turn(t.role, next(clean)) if t.role == "assistant" and sample.meta.get("label_noise") else t
             for t in sample.turns]
    return content_hash(turns, sample.images)


def vqa_corpus_texts() -> list[str]:
    """Every word and phrase the generator can emit: templates with all fillings, options, numbers, answers.

    Meant for training the demo tokenizer, so no sample text falls back to rare byte-level pieces.
    """
    colours, shapes = list(COLOURS), list(SHAPES)
    texts: list[str] = []
    texts += [Q_COLOUR[0], Q_SHAPE[0], Q_COUNT_ALL, Q_SEQUENCE, Q_FOLLOW_SHAPE, Q_FOLLOW_COLOUR,
              Q_SAME_COLOUR, Q_SAME_SHAPE, MC_SUFFIX, IMAGE_PLACEHOLDER]
    texts += [Q_COLOUR[1].format(shape=s) for s in shapes]
    texts += [Q_SHAPE[1].format(colour=c) for c in colours]
    texts += [Q_COUNT_SHAPE.format(plural=_PLURAL[s]) for s in shapes]
    texts += [Q_POSITION.format(colour=c, shape=s) for c in colours for s in shapes]
    texts += [Q_TEXT_COLOUR.format(noun=n, colour=c) for n in NOUNS for c in colours]
    texts += [Q_TEXT_SHAPE.format(noun=n, shape=s) for n in NOUNS for s in shapes]
    texts += [str(k) for k in range(41)]
    texts += colours + shapes + list(_PLURAL.values()) + ["yes", "no", "left", "right"] + list(LETTERS)
    texts += [f"{letter}. {c} {s}" for letter in LETTERS for c in colours for s in shapes]
    texts += [f"{letter}. {o}" for letter in LETTERS for o in colours + shapes + [str(k) for k in range(8)]]
    # whole prompts as the model sees them (placeholders, newlines, option blocks), one deck of each split stream
    for split in _SPLIT_ORDER:
        for s in make_split(split, len(_DECK), seed=0, image_size=MIN_IMAGE_SIZE):
            texts += [t.text for t in s.turns]
    return texts


@click.command("vqa")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--n-train", default=2000, show_default=True, type=click.IntRange(min=0))
@click.option("--n-val", default=200, show_default=True, type=click.IntRange(min=0))
@click.option("--n-test", default=200, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--image-size", default=64, show_default=True, type=click.IntRange(min=MIN_IMAGE_SIZE))
@click.option("--n-teacher", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also write teacher.json: a clean split of this size, disjoint from the others.")
@click.option("--label-noise", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Fraction of the train split's answers replaced by wrong ones of the same kind.")
def vqa_command(out_dir, n_train, n_val, n_test, seed, image_size, n_teacher, label_noise):
    """Write the procedural VQA splits (LLaVA JSON + images/) to OUT."""
    paths = generate_vqa(out_dir, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, image_size=image_size,
                         n_teacher=n_teacher, label_noise=label_noise)
    for split, path in paths.items():
        click.echo(f"{split}: {path}")


if __name__ == "__main__":
    vqa_command()
