"""The demo's GenRecal arm (``vlsi-demo --genrecal``): a student with ANOTHER tokenizer, distilled from the same
trained teacher, next to SFT-only of that same student (docs/method.md "GenRecal", "The demo arm").

After the demo's steps 1-3 (:func:`vlsi.demo.pipeline.prepare`: the trained teacher, the data):

1. another tokenizer: a byte-level BPE with :data:`OTHER_VOCAB` entries learnt on the distinct WORDS of the VQA
   corpus (type frequencies, not the demo tokenizer's token frequencies), so the merges come in another order:
   every merged token has another id, the vocabulary size differs and every sentence splits differently
   (:func:`other_tokenizer`); a student of the demo's ``student`` size with it (``models/student-othertok-init``);
2. its start: the same short SFT as the demo's shared student (``student_pretrain_steps``), from which both arms
   train;
3. the teacher's features (``vlsi-extract --hidden-states answer``, no verbalizers: a features-only cache,
   ``cache-features``), the extraction docs/method.md recommends ("What the features cost");
4. the two arms with the same optimizer-step budget (``student_steps``): SFT only, and GenRecal
   (``--method genrecal --genrecal-reg-rows answer``: recalibrate -> joint -> sft, split by :data:`GENRECAL_SPLIT`;
   the recalibrate steps train only the Recalibrator, so the student itself trains fewer steps in that arm);
5. both evaluated on the test split by the demo's evaluation.

Everything is a recipe call (``vlsi.extract.run``, ``vlsi.train.recipe``, ``vlsi.eval.run``), as the other arms.
"""

from __future__ import annotations

from pathlib import Path

OTHER_VOCAB = 440
"""Entries of the other student's tokenizer (the demo tokenizer has ~480-500, padded to 512 embedding rows; 440 pads
to 448). The corpus's distinct words must support that many merges: ``other_tokenizer`` checks it."""
GENRECAL_SPLIT = (0.3, 0.4, 0.3)
"""Fractions of ``student_steps`` for the GenRecal arm's recalibrate / joint / sft stages."""
LABEL_SFT = "other-tok student: SFT only"
LABEL_GENRECAL = "other-tok student: GenRecal"


def other_tokenizer():
    """The other student's tokenizer (module doc, step 1); deterministic."""
    from vlsi.demo import tiny, vqa

    words = sorted({w for text in vqa.vqa_corpus_texts() for w in text.split()})
    tok = tiny.build_tokenizer(words + [" " + w for w in words], vocab_size=OTHER_VOCAB, family="qwen2_vl")
    if len(tok) != OTHER_VOCAB:  # a smaller corpus learns fewer merges: the pair's sizes must still differ as stated
        raise ValueError(f"other_tokenizer: the corpus's {len(words)} distinct words give {len(tok)} entries, "
                         f"not {OTHER_VOCAB}; lower OTHER_VOCAB")
    return tok


def make_other_student(cfg, out: Path) -> str:
    """A random-weight student of the demo's ``student`` size with :func:`other_tokenizer` (seeded like the demo's)."""
    from vlsi.demo import tiny

    proc = dict(image_mean=[cfg.image_mean] * 3, image_std=[cfg.image_std] * 3)
    return str(tiny.write_tiny_model(out / "models" / "student-othertok-init", "qwen2_vl", tokenizer=other_tokenizer(),
                                     size="student", seed=cfg.seed + 1, processor=proc))


def extract_features(cfg, prep, out: Path) -> dict:
    """The teacher's answer-row features over the train split (a features-only cache); returns the extract summary
    with the cache's bytes per sample (``cache_info``)."""
    from vlsi.cache_format import open_cache
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import run_extract

    cache = out / "cache-features"
    res = run_extract(ExtractConfig(teacher=prep.teacher, data=prep.train_data, out=str(cache), top_k=cfg.top_k,
                                    hidden_states="answer", resume=True, progress=cfg.progress))
    info = open_cache(str(cache)).info()
    res["cache_info"] = {k: info.get(k) for k in ("n_samples", "hidden_size", "bytes_on_disk", "bytes_per_sample",
                                                  "hidden_answer_bytes_per_sample", "bytes_per_answer_token")}
    return res


def genrecal_steps(total: int) -> dict:
    """The GenRecal arm's stage steps: ``total`` split by :data:`GENRECAL_SPLIT` (sums to ``total``)."""
    from .pipeline import _split

    return dict(zip(("recalibrate", "joint", "sft"), _split(total, GENRECAL_SPLIT)))


def run_genrecal_arm(cfg, prep) -> dict:
    """Steps 1-5 of the module doc on ``prep`` (the demo's prepared teacher and data). Returns ``{"rows": [...]}``
    (the demo's result rows: SFT only, then GenRecal) plus ``features`` (the cache's sizes), ``steps``,
    ``tokenizers`` (both sizes and one sentence's splits) and ``wall_s`` (the whole arm)."""
    import time

    from vlsi.eval.run import run_eval

    from .pipeline import _timed, _train, _wall

    t0 = time.perf_counter()
    out = Path(cfg.out)
    with _timed(cfg, "genrecal student start"):
        init = make_other_student(cfg, out)
        start_dir = out / "runs" / "student-othertok-start"
        _train(cfg, out=start_dir, student=init, data=prep.train_data, stages=["sft"],
               sft_steps=cfg.student_pretrain_steps)
    start = str(start_dir / "final")
    with _timed(cfg, "genrecal features"):
        features = extract_features(cfg, prep, out)

    sft_dir = out / "runs" / "student-othertok-sft"
    with _timed(cfg, "student othertok-sft"):
        _train(cfg, out=sft_dir, student=start, data=prep.train_data, stages=["sft"], sft_steps=cfg.student_steps)
    steps = genrecal_steps(cfg.student_steps)
    gr_dir = out / "runs" / "student-othertok-genrecal"
    with _timed(cfg, "student othertok-genrecal"):
        _train(cfg, out=gr_dir, student=start, data=prep.train_data, cache=str(out / "cache-features"),
               stages=list(steps), method=dict(method="genrecal", teacher_head=prep.teacher,
                                               genrecal_reg_rows="answer"),
               **{f"{k}_steps": v for k, v in steps.items()})

    rows = []
    for name, model_dir, key in ((LABEL_SFT, sft_dir / "final", "student othertok-sft"),
                                 (LABEL_GENRECAL, gr_dir / "final", "student othertok-genrecal")):
        with _timed(cfg, f"eval {name}"):  # the demo's evaluation: the test split and, if made, the fresh one
            res = run_eval(str(model_dir), prep.test_data, max_new_tokens=cfg.max_new_tokens, limit=cfg.eval_limit)
            fresh = (run_eval(str(model_dir), prep.fresh_test_data, max_new_tokens=cfg.max_new_tokens,
                              limit=cfg.eval_limit) if getattr(prep, "fresh_test_data", None) else {})
        rows.append({"model": name, "dir": str(model_dir), "accuracy": res["accuracy"], "n": res.get("n"),
                     "per_category": res.get("per_category"), "per_kind": res.get("per_kind"),
                     "fresh_accuracy": fresh.get("accuracy"), "fresh_per_category": fresh.get("per_category"),
                     "steps": cfg.student_steps, "wall_s": _wall(cfg, key)})
    return {"rows": rows, "features": features["cache_info"], "steps": steps, "tokenizers": _tokenizers(prep, start),
            "wall_s": round(time.perf_counter() - t0, 1)}


def _tokenizers(prep, student: str) -> dict:
    """Both tokenizers' sizes and their splits of one sentence: the pair really differs (shown in the summary)."""
    from transformers import AutoTokenizer

    text = "What colour is the circle left of the square?"
    toks = {"teacher": AutoTokenizer.from_pretrained(prep.teacher), "student": AutoTokenizer.from_pretrained(student)}
    return {k: {"size": len(t), "split": t.tokenize(text)} for k, t in toks.items()}


def format_genrecal(summary: dict) -> list[str]:
    """The lines the demo's table adds for the arm (its rows are in ``summary["results"]`` already)."""
    g = summary.get("genrecal")
    if not g:
        return []
    f, tk = g["features"], g["tokenizers"]
    return ["", f"GenRecal arm ({g['wall_s']:.0f} s): other-tokenizer student ({tk['student']['size']} vs "
                f"{tk['teacher']['size']} tokens: {' '.join(tk['student']['split'][:6])} ... vs "
                f"{' '.join(tk['teacher']['split'][:6])} ...); steps "
                + ", ".join(f"{k} {v}" for k, v in g["steps"].items()),
            f"features cache (--hidden-states answer, d={f['hidden_size']}): {f['bytes_per_sample']:.0f} B/sample "
            f"({f['hidden_answer_bytes_per_sample']:.0f} B hidden states), {f['bytes_on_disk']} B total"]
