"""The whole vlsi pipeline on the embedded default, end to end, on a laptop CPU.

1. make the procedural VQA data, a tokenizer trained on its text, a tiny Qwen2-VL teacher and a smaller student.
   The students' train split has noisy labels (``label_noise`` of its answers wrong); the teacher learns from a
   clean split of its own, so it knows more than the students' labels say, which is what distillation transfers;
2. SFT the teacher from scratch (the trainer's ``sft`` stage, full weights): a vision warm-up on the single-object
   questions, then the whole train split. The models normalise images so the white background is 0 and their
   vision tower trains at ``vision_lr_scale`` x the LR: with the CLIP mean/std every patch shared a large constant
   and the teacher learned to ignore the pixels, and a larger vision LR collapses the features again. So what the
   questions ask about must be readable from a nearly untrained tower: single-object images show one large object
   near the centre (small objects anywhere left shape at chance), see ``vlsi.demo.vqa`` and docs/results.md;
3. verbalize the teacher (``vlsi-verbalize``) and extract its cache (``vlsi-extract``); give the student a short SFT
   so it starts as a (weak) pretrained model, as the paper's students do;
4. train two students from that SAME start with the SAME total optimizer-step budget:
   (1) SFT only, (2) VLsI: verbalize -> interact (from the cache) -> sft;
5. evaluate teacher, (1) and (2) on the test split and on a second test split drawn with another data seed
   (``fresh_test_seed``); write one table, ``summary.json`` and the plots.
6. with ``genrecal`` (``--genrecal``): also a student with another tokenizer, GenRecal vs SFT only from the same
   teacher (:mod:`vlsi.demo.genrecal_arm`); its two rows join the table.

Every number printed is measured in this run. The models here start from random weights (the paper starts from
pretrained VLMs), so every parameter trains (``--train-all``: vision tower, embeddings and head included), not
LoRA; the budget split between the VLsI stages is an option (``--vlsi-split``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    """Output folder (data, models, cache, runs, plots, summary.json)."""
    seed: int = 0
    """Seed of the data, the model weights and the training runs."""
    n_train: int = 3000
    n_val: int = 200
    n_test: int = 300
    label_noise: float = 0.4
    """Fraction of the students' train answers replaced by wrong ones (``vlsi.demo.vqa.make_split``), as in a
    machine-labelled instruction set: labels noisier than the teacher. With it > 0 the teacher trains on a clean
    split of its own (``n_train`` samples, disjoint from every other), so what it knows does not come from the
    students' samples. With clean labels (0) the teacher's targets were the labels on every category the student
    can learn, and VLsI had nothing to add (43.7 vs SFT 48.0, docs/results.md)."""
    fresh_test_seed: int | None = 1000
    """Data seed of a second test split (``n_test`` samples, none seen in train/val/test) every model is also
    evaluated on: the numbers must hold on data the recipe was not tuned on (None: no second split)."""
    teacher_steps: int = 800
    """SFT steps of the teacher from scratch."""
    teacher_warmup_steps: int = 200
    """SFT steps of a first teacher stage on the single-object questions only (``warmup_categories``), before
    ``teacher_steps`` on the whole train split: a vision warm-up through the same trainer (0: none)."""
    warmup_categories: tuple[str, ...] = ("colour", "shape", "multi_turn")
    teacher_verbalize_steps: int = 150
    """Verbalization steps of the teacher's verbalizers."""
    student_pretrain_steps: int = 200
    """SFT steps that make the shared student start (stands in for the paper's pretrained small VLM)."""
    student_steps: int = 600
    """Total optimizer steps of EACH student arm after the start (the same budget for SFT-only and VLsI)."""
    vlsi_split: tuple[float, float, float] = (0.05, 0.55, 0.40)
    """Fractions of ``student_steps`` for VLsI's verbalize / interact / sft stages (the verbalize steps train only the
    student verbalizers, so they come out of the backbone's budget: 0.15 of it cost 3-4 points)."""
    batch_size: int = 16
    lr: float = 1e-3
    """Peak LR of the from-scratch runs (cosine to lr/100, after ``warmup_steps``)."""
    warmup_steps: int = 30
    top_k: int = 32
    teacher_layers: tuple[int, ...] = (0, 1, 3, 5)
    """Teacher target layers (8 decoder layers; the final head is separate). Layer 0 is in the list because the
    earliest layer is the least formed one: on a 10-layer teacher its verbalized top-1 agreed with the head on 0.76
    of answer tokens (0.88-0.95 from layer 1 on) and adding it removed the intermediate terms' cost; on this 8-layer
    teacher it agrees on 0.95 already (docs/results.md)."""
    student_layers: tuple[int, ...] = (1, 2)
    """Student target layers (4 decoder layers; the last one has the head, so 0..2)."""
    image_size: int = 56
    """Side of the procedural images in pixels (Qwen2-VL: 28-pixel units; 56 -> 2x2 merged image tokens)."""
    image_mean: float = 1.0
    image_std: float = 0.5
    """The demo models' image normalisation (``preprocessor_config.json``): mean 1 maps the white background to 0,
    so image features carry the shapes rather than a large constant every patch shares."""
    vision_lr_scale: float = 0.03
    """LR of the vision tower as a multiple of ``lr`` in every from-scratch training run (``--vision-lr-scale``)."""
    max_new_tokens: int = 8
    eval_limit: int | None = None
    """Evaluate only the first N test samples (None: all)."""
    progress: bool = True
    genrecal: bool = False
    """Also run the GenRecal arm: a student with another tokenizer, GenRecal vs SFT only (vlsi.demo.genrecal_arm)."""
    timings: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        """A budget that runs in a couple of minutes: every stage runs, numbers are not meaningful."""
        base = dict(n_train=160, n_val=16, n_test=32, teacher_steps=30, teacher_verbalize_steps=10, student_steps=30, warmup_steps=3,
                    student_pretrain_steps=10, teacher_warmup_steps=5,
                    batch_size=8)
        base.update(kw)
        return cls(**base)


def _timed(cfg: DemoConfig, name: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()
            _say(cfg, f"[demo] {name} ...")

        def __exit__(self, *exc):
            cfg.timings[name] = round(time.perf_counter() - self.t, 2)
            if exc[0] is None:
                _say(cfg, f"[demo] {name}: {cfg.timings[name]:.1f} s")

    return _T()


def _say(cfg: DemoConfig, msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def make_assets(cfg: DemoConfig) -> dict:
    """Data splits, the shared tokenizer, the teacher and ONE student initialisation (copied for both runs)."""
    from vlsi.demo import tiny, vqa

    out = Path(cfg.out)
    splits = vqa.generate_vqa(out / "data", n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed,
                              image_size=cfg.image_size, n_teacher=cfg.n_train if cfg.label_noise else 0,
                              label_noise=cfg.label_noise)
    if cfg.fresh_test_seed is not None:
        splits["fresh_test"] = _fresh_test(cfg, out / "data-fresh", splits)
    tok = tiny.build_tokenizer(vqa.vqa_corpus_texts(), family="qwen2_vl")
    proc = dict(image_mean=[cfg.image_mean] * 3, image_std=[cfg.image_std] * 3)
    teacher = tiny.write_tiny_model(out / "models" / "teacher-init", "qwen2_vl", tokenizer=tok, size="teacher",
                                    seed=cfg.seed, processor=proc)
    student = tiny.write_tiny_model(out / "models" / "student-init", "qwen2_vl", tokenizer=tok, size="student",
                                    seed=cfg.seed + 1, processor=proc)
    return {"splits": {k: str(v) for k, v in splits.items()}, "teacher_init": str(teacher), "student_init": str(student)}


def _fresh_test(cfg: DemoConfig, out: Path, splits: dict) -> Path:
    """A test split drawn with data seed ``cfg.fresh_test_seed``, no sample of which is in any of ``splits``."""
    from vlsi.demo import vqa
    from vlsi.models.data import read_dataset, write_llava_json

    seen = {vqa.content_hash_clean(s) for path in splits.values() for s in read_dataset(path)}
    samples = vqa.make_split("test", cfg.n_test, seed=cfg.fresh_test_seed, image_size=cfg.image_size, exclude=seen)
    return write_llava_json(samples, out / "test.json", image_dir=out / "images")


def _train(cfg: DemoConfig, *, out: Path, student: str, data: str, stages, cache: str | None = None,
           method: dict | None = None, **steps) -> dict:
    from vlsi.train.config import TrainConfig
    from vlsi.train.recipe import run as run_train

    tcfg = TrainConfig.build(
        cache=cache, student=student, data=data, out=str(out), stages=tuple(stages), train_all=True,
        batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.lr / 100, warmup_steps=cfg.warmup_steps, seed=cfg.seed,
        student_layers=cfg.student_layers, vision_lr_scale=cfg.vision_lr_scale, progress=cfg.progress,
        **(method or {}), **steps,
    )
    return run_train(tcfg)


def _split(total: int, fractions) -> list[int]:
    parts = [max(1, int(round(total * f))) for f in fractions]
    parts[-1] = max(1, total - sum(parts[:-1]))
    return parts


def _subset(data: str, out: Path, categories) -> str:
    """The records of the LLaVA JSON ``data`` whose category is in ``categories``, as ``out`` (same image folder)."""
    records = [r for r in json.loads(Path(data).read_text()) if r.get("category") in set(categories)]
    if not records:
        raise ValueError(f"{data}: no sample of categories {list(categories)}")
    out.write_text(json.dumps(records) + "\n")
    return str(out)


@dataclass
class Prepared:
    """What every student run of one seed shares: data, the trained teacher, its cache, the student's start."""

    train_data: str
    val_data: str
    test_data: str
    fresh_test_data: str | None
    teacher: str
    cache: str
    student_start: str
    extract_summary: dict


def prepare(cfg: DemoConfig) -> Prepared:
    """Steps 1-3: assets, teacher SFT from scratch, teacher verbalizers, the teacher cache, the student's start.

    The paper's students are pretrained small VLMs; ours start from random weights, so both arms start from the same
    briefly SFT-ed student (``student_pretrain_steps``) and then get the same budget.
    """
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import run_extract
    from vlsi.train.config import VerbalizeConfig
    from vlsi.train.recipe import run_verbalize

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with _timed(cfg, "assets"):
        assets = make_assets(cfg)
    train_data = assets["splits"]["train"]
    teacher_data = assets["splits"].get("teacher", train_data)  # its own clean split when the students' is noisy

    teacher_start = assets["teacher_init"]
    if cfg.teacher_warmup_steps:
        with _timed(cfg, "teacher warm-up"):
            warm = _subset(teacher_data, out / "data" / "warmup.json", cfg.warmup_categories)
            _train(cfg, out=out / "runs" / "teacher-warmup", student=teacher_start, data=warm, stages=["sft"],
                   sft_steps=cfg.teacher_warmup_steps)
        teacher_start = str(out / "runs" / "teacher-warmup" / "final")
    with _timed(cfg, "teacher sft"):
        _train(cfg, out=out / "runs" / "teacher", student=teacher_start, data=teacher_data, stages=["sft"],
               sft_steps=cfg.teacher_steps)
    teacher = str(out / "runs" / "teacher" / "final")

    with _timed(cfg, "teacher verbalize"):
        run_verbalize(VerbalizeConfig(model=teacher, data=teacher_data, out=str(out / "verbalizers" / "teacher"),
                                      layers=cfg.teacher_layers, steps=cfg.teacher_verbalize_steps,
                                      batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.lr / 100, seed=cfg.seed,
                                      progress=cfg.progress))

    cache = out / "cache"
    with _timed(cfg, "extract"):
        extract_summary = run_extract(ExtractConfig(teacher=teacher, verbalizers=str(out / "verbalizers" / "teacher"),
                                                    data=train_data, out=str(cache), top_k=cfg.top_k,
                                                    resume=True, progress=cfg.progress))  # a rerun continues

    with _timed(cfg, "student start"):
        _train(cfg, out=out / "runs" / "student-start", student=assets["student_init"], data=train_data,
               stages=["sft"], sft_steps=cfg.student_pretrain_steps)
    return Prepared(train_data, assets["splits"]["val"], assets["splits"]["test"], assets["splits"].get("fresh_test"),
                    teacher, str(cache), str(out / "runs" / "student-start" / "final"), extract_summary)


# The arms a run can train; "vlsi" is the paper's full method, the others its key ablations (docs/method.md "Step 2").
ARMS = {
    "sft": None,
    "vlsi": {},
    "kld-none": {"ll_loss": "none"},
    "ce-none": {"il_loss": "ce", "ll_loss": "none"},
    "random-index": {"match": "random"},
    "no-sft": {},  # verbalize -> interact only: the sft stage's steps go to interact (the same total budget)
}
_NO_SFT = ("no-sft",)


def train_arm(cfg: DemoConfig, prep: Prepared, arm: str) -> tuple[str, int]:
    """Train one student arm from ``prep.student_start`` with ``cfg.student_steps`` optimizer steps in all."""
    out = Path(cfg.out) / "runs" / f"student-{arm}"
    if ARMS[arm] is None:
        _train(cfg, out=out, student=prep.student_start, data=prep.train_data, stages=["sft"],
               sft_steps=cfg.student_steps)
    elif arm in _NO_SFT:
        v, i, s = _split(cfg.student_steps, cfg.vlsi_split)
        _train(cfg, out=out, student=prep.student_start, data=prep.train_data, cache=prep.cache,
               stages=["verbalize", "interact"], method=ARMS[arm], verbalize_steps=v, interact_steps=i + s)
    else:
        v, i, s = _split(cfg.student_steps, cfg.vlsi_split)
        _train(cfg, out=out, student=prep.student_start, data=prep.train_data, cache=prep.cache,
               stages=["verbalize", "interact", "sft"], method=ARMS[arm], verbalize_steps=v, interact_steps=i,
               sft_steps=s)
    return str(out / "final"), cfg.student_steps


def run_demo(cfg: DemoConfig, *, prep: Prepared | None = None, done_arms: tuple[str, ...] = ()) -> dict:
    """Run the whole pipeline; returns the summary (also written to ``OUT/summary.json``).

    ``prep`` / ``done_arms``: steps 1-3 / student arms already done in ``cfg.out`` (to finish an interrupted run).
    """
    from vlsi.eval.run import run_eval

    out = Path(cfg.out)
    t0 = time.perf_counter()
    prep = prep or prepare(cfg)
    models = [("teacher (SFT from scratch)", prep.teacher, cfg.teacher_warmup_steps + cfg.teacher_steps,
               ("teacher warm-up", "teacher sft"))]
    for arm, label in (("sft", "student: SFT only"), ("vlsi", "student: VLsI (verbalize+interact+sft)")):
        if arm in done_arms:
            models.append((label, str(out / "runs" / f"student-{arm}" / "final"), cfg.student_steps, f"student {arm}"))
            continue
        with _timed(cfg, f"student {arm}"):
            model_dir, steps = train_arm(cfg, prep, arm)
        models.append((label, model_dir, steps, f"student {arm}"))

    rows = []
    for name, model_dir, steps, wall_key in models:
        with _timed(cfg, f"eval {name}"):
            res = run_eval(model_dir, prep.test_data, max_new_tokens=cfg.max_new_tokens, limit=cfg.eval_limit)
            fresh = (run_eval(model_dir, prep.fresh_test_data, max_new_tokens=cfg.max_new_tokens, limit=cfg.eval_limit)
                     if prep.fresh_test_data else {})
        rows.append({"model": name, "dir": model_dir, "accuracy": res["accuracy"], "n": res.get("n"),
                     "per_category": res.get("per_category"), "per_kind": res.get("per_kind"),
                     "fresh_accuracy": fresh.get("accuracy"), "fresh_per_category": fresh.get("per_category"),
                     "steps": steps, "wall_s": _wall(cfg, wall_key)})

    genrecal = None
    if cfg.genrecal:  # the optional other-tokenizer arm, after the shared-tokenizer ones (vlsi.demo.genrecal_arm)
        from .genrecal_arm import run_genrecal_arm

        genrecal = run_genrecal_arm(cfg, prep)
        rows += genrecal.pop("rows")

    plots = _plots(cfg, out, Path(prep.cache))
    with _timed(cfg, "layer view"):
        layers = _layer_view(cfg, out, prep, [m[1] for m in models])
    if layers.get("png"):
        plots["layers"] = layers["png"]
    summary = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "timings"},
        "vlsi_steps": dict(zip(("verbalize", "interact", "sft"), _split(cfg.student_steps, cfg.vlsi_split))),
        "results": rows,
        "extract": prep.extract_summary,
        "plots": plots,
        "layers": layers,
        **({"genrecal": genrecal} if genrecal else {}),
        "timings_s": cfg.timings,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _wall(cfg: DemoConfig, keys) -> float | None:
    walls = [cfg.timings[k] for k in ((keys,) if isinstance(keys, str) else keys) if k in cfg.timings]
    return round(sum(walls), 2) if walls else None


def _plots(cfg: DemoConfig, out: Path, cache: Path) -> dict:
    """Matching heatmap of the VLsI run and the cache's per-layer coverage plot."""
    plots = {}
    try:
        from vlsi.eval.matching import matching_report

        rep = matching_report(out / "runs" / "student-vlsi", out / "plots")
        plots["matching"] = str(rep["heatmap"])
        if rep["kl_curves"]:
            plots["kl_curves"] = str(rep["kl_curves"])
    except Exception as e:  # a plot must never hide the measured table
        plots["matching_error"] = f"{type(e).__name__}: {e}"
    try:
        from vlsi.cache_format import open_cache
        from vlsi.cache_format.stats import cache_stats, plot_cache_stats

        stats = cache_stats(open_cache(str(cache)))
        png = out / "plots" / "cache_stats.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        plot_cache_stats(stats, png)
        plots["cache_stats"] = str(png)
    except Exception as e:
        plots["cache_stats_error"] = f"{type(e).__name__}: {e}"
    return plots


LAYER_VIEW_CATEGORY = "colour"
"""The category of the test sample whose per-layer answers the demo shows (its first such sample)."""


def _layer_view(cfg: DemoConfig, out: Path, prep: Prepared, model_dirs: list[str]) -> dict:
    """Per-layer verbalized answers (``vlsi.eval.layers``) of the teacher and the VLsI student on one test sample."""
    try:
        from vlsi.eval.layer_view import format_layer_table, plot_layer_table
        from vlsi.eval.layers import layer_answers
        from vlsi.eval.run import load_eval_samples
        from vlsi.eval.scoring import gold_answer
        from vlsi.models.adapter import load_model
        from vlsi.models.verbalizers import load_verbalizers

        samples = list(load_eval_samples(prep.test_data))
        sample = next((s for s in samples if (s.meta or {}).get("category") == LAYER_VIEW_CATEGORY), samples[0])
        question = [t.text for t in sample.turns if t.role == "user"][-1].replace("<image>\n", "").replace("<image>", "")
        views = []
        for name, model, vdir in (("teacher", prep.teacher, out / "verbalizers" / "teacher"),
                                  ("VLsI student", model_dirs[-1], out / "runs" / "student-vlsi" / "verbalizers")):
            adapter = load_model(model, device="cpu")
            answers = layer_answers(adapter, load_verbalizers(vdir, adapter=adapter), sample,
                                    max_new_tokens=cfg.max_new_tokens)
            views.append({"model": name, "dir": str(model), "verbalizers": str(vdir),
                          "answers": [{"layer": a.layer, "text": a.text} for a in answers]})
        result = {"sample_id": sample.id, "question": question, "gold": gold_answer(sample), "views": views}
        result["png"] = str(plot_layer_table(result, out / "plots" / "layers.png"))
        result["table"] = format_layer_table(result)
        return result
    except Exception as e:  # the per-layer view must never hide the measured table
        return {"error": f"{type(e).__name__}: {e}"}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def format_summary(summary: dict) -> str:
    """The one table the demo prints."""
    fresh_seed = (summary.get("config") or {}).get("fresh_test_seed")
    lines = [f"{'model':<42} {'test acc':>9} {'fresh test':>11} {'steps':>6} {'train wall':>11}", "-" * 83]
    for r in summary["results"]:
        acc = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        fresh = "" if r.get("fresh_accuracy") is None else f"{100 * r['fresh_accuracy']:.1f}%"
        wall = "" if r["wall_s"] is None else f"{r['wall_s']:.0f} s"
        lines.append(f"{r['model']:<42} {acc:>9} {fresh:>11} {r['steps']:>6} {wall:>11}")
    if fresh_seed is not None and any(r.get("fresh_accuracy") is not None for r in summary["results"]):
        lines.append(f"(fresh test: a second test split drawn with data seed {fresh_seed}, disjoint from all others)")
    ex = summary.get("extract") or {}
    if ex:
        lines.append("")
        lines.append("cache: " + ", ".join(f"{k}={ex[k]}" for k in ("samples", "answer_tokens", "bytes",
                                                                      "bytes_per_answer_token") if k in ex))
    from .genrecal_arm import format_genrecal

    lines += format_genrecal(summary)
    cats = sorted({c for r in summary["results"] for c in (r.get("per_category") or {})})
    if cats:
        lines.append("")
        lines.append("per category (test acc %): " + " | ".join(
            r["model"].split(" (")[0].replace("student: ", "") for r in summary["results"]))
        for c in cats:
            accs = [(r.get("per_category") or {}).get(c) or {} for r in summary["results"]]
            cells = "".join(f"{_pct(a.get('accuracy')):>9}" for a in accs)
            lines.append(f"  {c:<12}{cells}   (n={accs[0].get('n', '')})")
    layers = summary.get("layers") or {}
    if layers.get("table"):
        lines.append("")
        lines.append("per-layer verbalized answers (vlsi.eval.layers):")
        lines.append(layers["table"])
    elif layers.get("error"):
        lines.append(f"per-layer view failed: {layers['error']}")
    if summary["plots"].get("matching"):
        lines.append(f"matching heatmap: {summary['plots']['matching']}")
    lines.append(f"total wall time: {summary['total_s']:.0f} s; plots: "
                 + ", ".join(str(v) for k, v in summary["plots"].items() if not k.endswith("error")))
    return "\n".join(lines)
